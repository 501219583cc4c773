//! Shared helpers for the integration tests: temp configs and Python modules,
//! the real `pyipcd` binary as a child process, its log lines, readiness via a
//! NOTIFY_SOCKET datagram socket the test owns, and signals.

#![allow(dead_code)]

pub mod raw_shm;
pub mod wire;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// The binary under test.
pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_pyipcd")
}

/// A temp folder holding a config and Python modules.
pub struct Scenario {
    pub dir: tempfile::TempDir,
}

impl Scenario {
    pub fn new() -> Self {
        Self {
            dir: tempfile::tempdir().expect("tempdir"),
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Writes a file (creating folders) and returns its path.
    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.path(name);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent).unwrap();
        }
        std::fs::write(&p, text).unwrap();
        p
    }

    /// Writes `pyipcd.toml` with `[python] paths = ["."]` plus `body`.
    pub fn config(&self, body: &str) -> PathBuf {
        self.write(
            "pyipcd.toml",
            &format!("[daemon]\nshutdown_grace = \"3s\"\n{body}\n"),
        )
    }
}

/// Collected stderr lines of a child, with a way to wait for one.
#[derive(Clone, Default)]
pub struct Lines(Arc<(Mutex<Vec<String>>, Condvar)>);

impl Lines {
    fn push(&self, line: String) {
        let (lock, cv) = &*self.0;
        lock.lock().unwrap().push(line);
        cv.notify_all();
    }

    pub fn all(&self) -> Vec<String> {
        self.0.0.lock().unwrap().clone()
    }

    pub fn text(&self) -> String {
        self.all().join("\n")
    }

    /// Waits until a line contains every one of `parts`; panics with the log on timeout.
    pub fn wait_for(&self, parts: &[&str], timeout: Duration) -> String {
        self.wait_until(timeout, &format!("no log line with {parts:?}"), |lines| {
            lines
                .iter()
                .find(|l| parts.iter().all(|p| l.contains(p)))
                .cloned()
        })
    }

    /// Waits until `n` lines contain every one of `parts` (the log is read
    /// by a thread of its own, so a line the daemon wrote may arrive late);
    /// panics with the log on timeout.
    pub fn wait_count(&self, parts: &[&str], n: usize, timeout: Duration) {
        self.wait_until(
            timeout,
            &format!("not {n} log lines with {parts:?}"),
            |lines| {
                let seen = lines
                    .iter()
                    .filter(|l| parts.iter().all(|p| l.contains(p)))
                    .count();
                (seen >= n).then_some(())
            },
        );
    }

    /// Waits until `found` returns something for the lines so far, waking
    /// on each new line; panics with `missing` and the log on timeout.
    fn wait_until<R>(
        &self,
        timeout: Duration,
        missing: &str,
        mut found: impl FnMut(&[String]) -> Option<R>,
    ) -> R {
        let (lock, cv) = &*self.0;
        let deadline = Instant::now() + timeout;
        let mut lines = lock.lock().unwrap();
        loop {
            if let Some(r) = found(&lines) {
                return r;
            }
            let now = Instant::now();
            if now >= deadline {
                panic!("{missing} within {timeout:?}; log:\n{}", lines.join("\n"));
            }
            lines = cv.wait_timeout(lines, deadline - now).unwrap().0;
        }
    }

    /// How many lines contain every one of `parts`.
    pub fn count(&self, parts: &[&str]) -> usize {
        self.all()
            .iter()
            .filter(|l| parts.iter().all(|p| l.contains(p)))
            .count()
    }
}

/// A running daemon.
pub struct Daemon {
    pub child: Child,
    pub lines: Lines,
    notify: UnixDatagram,
    _notify_dir: tempfile::TempDir,
}

impl Daemon {
    /// Starts `pyipcd run -c config` with an empty environment plus `env`.
    pub fn start(config: &Path, env: &[(&str, &str)]) -> Self {
        let mut cmd = Command::new(bin());
        cmd.arg("run").arg("-c").arg(config).env_clear();
        for (k, v) in env {
            cmd.env(k, v);
        }
        Self::spawn(cmd)
    }

    /// Spawns `cmd` (the daemon, or something that execs it) with
    /// `NOTIFY_SOCKET` added and its stderr collected.
    pub fn spawn(mut cmd: Command) -> Self {
        let notify_dir = tempfile::tempdir().unwrap();
        let sock_path = notify_dir.path().join("notify.sock");
        let notify = UnixDatagram::bind(&sock_path).unwrap();
        notify
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        cmd.env("NOTIFY_SOCKET", &sock_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn pyipcd");
        let lines = Lines::default();
        let stderr = child.stderr.take().unwrap();
        let sink = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.push(line);
            }
        });
        Self {
            child,
            lines,
            notify,
            _notify_dir: notify_dir,
        }
    }

    /// Waits for `READY=1` on the notify socket.
    pub fn wait_ready(&mut self) -> &mut Self {
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut buf = [0u8; 4096];
        while Instant::now() < deadline {
            if let Ok(n) = self.notify.recv(&mut buf)
                && String::from_utf8_lossy(&buf[..n])
                    .lines()
                    .any(|l| l == "READY=1")
            {
                return self;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "daemon exited ({status}) before READY=1; log:\n{}",
                    self.lines.text()
                );
            }
        }
        panic!("no READY=1 within 20s; log:\n{}", self.lines.text());
    }

    /// Every notify datagram line received during `window`, with its arrival time.
    pub fn notify_lines(&self, window: Duration) -> Vec<(Instant, String)> {
        let end = Instant::now() + window;
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        while Instant::now() < end {
            if let Ok(n) = self.notify.recv(&mut buf) {
                let at = Instant::now();
                for line in String::from_utf8_lossy(&buf[..n]).lines() {
                    out.push((at, line.to_string()));
                }
            }
        }
        out
    }

    /// Writes `text` to the config file `cfg`, sends SIGHUP and waits until
    /// one more log line than before contains every one of `parts`.
    pub fn reload(&self, cfg: &Path, text: &str, parts: &[&str], timeout: Duration) {
        std::fs::write(cfg, text).unwrap();
        let seen = self.lines.count(parts);
        self.signal("HUP");
        let deadline = Instant::now() + timeout;
        while self.lines.count(parts) == seen {
            assert!(
                Instant::now() < deadline,
                "no new line with {parts:?} within {timeout:?}; log:\n{}",
                self.lines.text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends a signal by name (`TERM`, `INT`).
    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.child.id().to_string())
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{sig} failed");
    }

    /// Panics, with the log, if the daemon has exited.
    pub fn assert_running(&mut self) {
        assert!(
            self.child.try_wait().unwrap().is_none(),
            "the daemon died:\n{}",
            self.lines.text()
        );
    }

    /// Waits for the process to exit; panics after `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                // Let the reader thread drain the pipe.
                std::thread::sleep(Duration::from_millis(50));
                return status;
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                panic!(
                    "daemon still running after {timeout:?}; log:\n{}",
                    self.lines.text()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs the binary to completion with an empty environment plus `env`.
pub fn run_to_end(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let mut cmd = Command::new(bin());
    cmd.args(args).env_clear();
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run pyipcd");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs `python3 -c script`; returns its stdout, panicking with its stderr on failure.
pub fn run_python(script: &str) -> String {
    let out = Command::new("python3")
        .args(["-c", script])
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "python3 failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Starts `python3 -c script` and waits for it to print `ready` on stdout.
pub fn python_until(script: &str, ready: &str) -> Child {
    let mut child = Command::new("python3")
        .args(["-c", script])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    assert_eq!(line.trim(), ready);
    child
}

/// Compiles a C file of the repository (strict C11, warnings as errors) into `out`.
pub fn gcc(src: &str, out: &Path) {
    let root = env!("CARGO_MANIFEST_DIR");
    let ok = Command::new("gcc")
        .args([
            "-std=c11",
            "-D_DEFAULT_SOURCE",
            "-Wall",
            "-Wextra",
            "-Werror",
            "-O2",
            "-I",
        ])
        .arg(format!("{root}/include"))
        .arg("-o")
        .arg(out)
        .arg(format!("{root}/{src}"))
        .status()
        .expect("gcc");
    assert!(ok.success(), "gcc {src} failed");
}

/// A loopback port that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Daemon {
    /// The port a `[[tcp.server]]` role bound (from its "listening" log line).
    pub fn listening_port(&self, role: &str) -> u16 {
        let line = self.lines.wait_for(
            &["listening", &format!("role={role}")],
            Duration::from_secs(15),
        );
        line.split("addr=127.0.0.1:")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .and_then(|p| p.parse().ok())
            .expect("port in the listening line")
    }
}

/// The `PATH` systemd gives every unit.
pub const SYSTEMD_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// `python -m venv [extra] dir` with `python` (a path); panics if it fails.
pub fn make_venv(python: &str, dir: &Path, extra: &[&str]) -> PathBuf {
    let ok = Command::new(python)
        .args(["-m", "venv"])
        .args(extra)
        .arg(dir)
        .env_remove("PYTHONHOME")
        .status()
        .expect("python -m venv");
    assert!(ok.success(), "{python} -m venv {} failed", dir.display());
    dir.to_path_buf()
}

/// Starts a daemon serving one channel region `ch` (file `ch.shm`, 64 KiB
/// rings) with handler `h:{handler}`, writing `handlers` as `h.py`; `region`
/// adds keys to the region (`max_message = "1KiB"`). Returns it and the
/// channel file once the channel is ready.
pub fn channel_daemon(
    s: &Scenario,
    handlers: &str,
    handler: &str,
    region: &str,
) -> (Daemon, PathBuf) {
    s.write("h.py", handlers);
    let cfg = s.config(&format!(
        "[python]\npaths = [\".\"]\n[[shm.region]]\nname = \"ch\"\nmode = \"channel\"\npath = \"ch.shm\"\n\
         handler = \"h:{handler}\"\nring_size = \"64KiB\"\n{region}\n"
    ));
    let mut d = Daemon::start(&cfg, &[]);
    d.wait_ready();
    d.lines
        .wait_for(&["channel ready", "role=ch"], Duration::from_secs(15));
    (d, s.path("ch.shm"))
}

/// `GET path` on 127.0.0.1:`port`: the status and the body.
pub fn http_get(port: u16, path: &str) -> (u16, String) {
    let (status, _, body) = http_get_full(port, path);
    (status, body)
}

/// `GET path` on 127.0.0.1:`port`: the status, the header lines, the body.
pub fn http_get_full(port: u16, path: &str) -> (u16, String, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let status = text.split_whitespace().nth(1).unwrap().parse().unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    (status, head.to_lowercase(), body.to_string())
}

/// The value of the first series in a `/metrics` body that starts with `name_and_labels`.
pub fn metric(body: &str, name_and_labels: &str) -> f64 {
    body.lines()
        .find(|l| l.starts_with(name_and_labels))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {name_and_labels} in:\n{body}"))
}
