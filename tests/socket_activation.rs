//! `listen = "systemd:NAME"`: sockets passed as systemd passes them
//! (`LISTEN_FDS`, `LISTEN_PID`, `LISTEN_FDNAMES`, descriptors from 3 on),
//! by `systemd-socket-activate` for TCP and by the test itself for a Unix
//! socket. A connection made before the daemon started is answered; reloads
//! (a changed role, the role removed and added again) never close the socket;
//! a missing or unusable socket is a configuration error (exit 78).

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::wire::read_line;
use common::{Daemon, Scenario};

const T: Duration = Duration::from_secs(20);

fn config(s: &Scenario, roles: &str) -> String {
    s.write("h.py", "def echo(data):\n    return b'activated ' + data\n");
    format!("[daemon]\nshutdown_grace = \"3s\"\n[python]\npaths = [\".\"]\n{roles}")
}

fn role(name: &str, socket: &str, extra: &str) -> String {
    format!(
        "[[tcp.server]]\nname = \"{name}\"\nlisten = \"systemd:{socket}\"\nhandler = \"h:echo\"\n{extra}\n"
    )
}

/// `pyipcd run -c cfg` with `fds` passed as systemd passes them: moved to
/// 3, 4, … in the child, `LISTEN_FDS`/`LISTEN_FDNAMES` set, and
/// `LISTEN_PID` the daemon's own pid (a shell sets it, then execs).
fn passing(fds: &[(RawFd, &str)], cfg: &Path) -> Command {
    let names: Vec<&str> = fds.iter().map(|(_, n)| *n).collect();
    let mut cmd = Command::new("/bin/sh");
    cmd.args(["-c", "export LISTEN_PID=$$; exec \"$0\" run -c \"$1\""])
        .arg(common::bin())
        .arg(cfg)
        .env_clear()
        .env("LISTEN_FDS", fds.len().to_string())
        .env("LISTEN_FDNAMES", names.join(":"));
    // Built before the fork: the child only calls fcntl and dup2.
    let mut raw = [-1 as RawFd; 4];
    assert!(fds.len() <= raw.len());
    for (slot, (fd, _)) in raw.iter_mut().zip(fds) {
        *slot = *fd;
    }
    let n = fds.len();
    // SAFETY: only async-signal-safe calls (fcntl, dup2), no allocation,
    // between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            // Out of the way first (close-on-exec), so moving one to 3
            // cannot clobber another; dup2 leaves 3, 4, … open across exec.
            let mut high = [-1 as RawFd; 4];
            for i in 0..n {
                high[i] = libc::fcntl(raw[i], libc::F_DUPFD_CLOEXEC, 100);
                if high[i] < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            for (i, h) in high.iter().enumerate().take(n) {
                if libc::dup2(*h, 3 + i as i32) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    cmd
}

#[test]
fn a_tcp_socket_from_systemd_socket_activate_answers_a_connect_made_before_start() {
    if Command::new("systemd-socket-activate")
        .arg("--version")
        .output()
        .is_err()
    {
        assert!(
            std::env::var_os("CI").is_none(),
            "systemd-socket-activate is required in CI"
        );
        eprintln!("systemd-socket-activate not installed: skipped");
        return;
    }
    let s = Scenario::new();
    let cfg = s.write("pyipcd.toml", &config(&s, &role("web", "web", "")));
    let port = common::free_port();
    let mut cmd = Command::new("systemd-socket-activate");
    // It passes on only a few variables of its own: -E adds the one the
    // test reads readiness from.
    cmd.args([
        "-l",
        &format!("127.0.0.1:{port}"),
        "--fdname=web",
        "-E",
        "NOTIFY_SOCKET",
    ])
    .arg(common::bin())
    .args(["run", "-c"])
    .arg(&cfg)
    .env_clear();
    let mut d = Daemon::spawn(cmd);
    // The activator listens at once and starts the daemon on the first connect.
    let deadline = Instant::now() + T;
    let mut c = loop {
        match TcpStream::connect(("127.0.0.1", port)) {
            Ok(c) => break c,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => panic!("activator never listened: {e}"),
        }
    };
    c.set_read_timeout(Some(T)).unwrap();
    c.write_all(b"early\n").unwrap();
    assert_eq!(
        read_line(&mut c),
        "activated early",
        "log:\n{}",
        d.lines.text()
    );
    d.wait_ready();
    d.lines.wait_for(
        &["listening", "role=web", &format!("addr=127.0.0.1:{port}")],
        T,
    );
    d.lines
        .wait_for(&["systemd passed 1 socket(s) named `web`"], T);
    d.signal("TERM");
    assert_eq!(d.wait_exit(T).code(), Some(0));
}

#[test]
fn a_passed_unix_socket_survives_reloads_and_the_role_going_and_coming_back() {
    let s = Scenario::new();
    let path = s.path("act.sock");
    let listener = UnixListener::bind(&path).unwrap();
    // Queued before the daemon exists.
    let mut early = UnixStream::connect(&path).unwrap();
    early.set_read_timeout(Some(T)).unwrap();
    early.write_all(b"before start\n").unwrap();

    let cfg = s.write(
        "pyipcd.toml",
        &config(&s, &role("u", "uds", "pipeline = 8")),
    );
    let mut d = Daemon::spawn(passing(&[(listener.as_raw_fd(), "uds")], &cfg));
    drop(listener); // the daemon holds the only listening socket now
    d.wait_ready();
    assert_eq!(read_line(&mut early), "activated before start");
    let ask = |text: &str| {
        let mut c = UnixStream::connect(&path).unwrap();
        c.set_read_timeout(Some(T)).unwrap();
        c.write_all(format!("{text}\n").as_bytes()).unwrap();
        read_line(&mut c)
    };
    // Peer credentials work on an activated Unix socket too (allow_uids is
    // accepted for it; the test's own uid is allowed).
    let uid = std::fs::metadata("/proc/self")
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m))
        .unwrap();
    let changed = config(
        &s,
        &role("u", "uds", &format!("pipeline = 4\nallow_uids = [{uid}]")),
    );
    d.reload(
        &cfg,
        &changed,
        &["reloaded:", "replaced [\"u\"]", "failed []"],
        T,
    );
    assert_eq!(ask("after a change"), "activated after a change");

    // The role removed: the socket stays open (a connect queues, nothing is
    // refused), and answers when the role is back.
    let without = config(
        &s,
        "[[tcp.server]]\nname = \"other\"\nlisten = \"127.0.0.1:0\"\nhandler = \"h:echo\"\n",
    );
    d.reload(
        &cfg,
        &without,
        &["reloaded:", "stopped [\"u\"]", "failed []"],
        T,
    );
    let mut queued =
        UnixStream::connect(&path).expect("the activated socket was closed by a reload");
    queued.set_read_timeout(Some(T)).unwrap();
    queued.write_all(b"while away\n").unwrap();
    d.reload(
        &cfg,
        &changed,
        &["reloaded: started [\"u\"]", "failed []"],
        T,
    );
    assert_eq!(read_line(&mut queued), "activated while away");
    // The daemon does not own the file: it is not removed at exit.
    d.signal("TERM");
    assert_eq!(d.wait_exit(T).code(), Some(0));
    assert!(path.exists());
}

#[test]
fn a_socket_systemd_did_not_pass_or_cannot_serve_is_a_configuration_error() {
    let s = Scenario::new();
    let cfg = s.write("pyipcd.toml", &config(&s, &role("web", "web", "")));
    // Nothing passed.
    let (code, _, err) = common::run_to_end(&["run", "-c", cfg.to_str().unwrap()], &[]);
    assert_eq!(code, 78, "{err}");
    assert!(
        err.contains("no socket named `web`: systemd passed no sockets"),
        "{err}"
    );

    // Passed under another name.
    let other = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    exits_78_saying(
        &[(other.as_raw_fd(), "api")],
        &cfg,
        "no socket named `web`: systemd passed: api",
    );

    // A TCP socket where peer credentials are asked for.
    let cfg2 = s.write(
        "p2.toml",
        &config(&s, &role("web", "web", "allow_uids = [0]")),
    );
    exits_78_saying(
        &[(other.as_raw_fd(), "web")],
        &cfg2,
        "is a TCP socket: allow_uids/allow_gids need a Unix socket",
    );

    // Not listening.
    let unbound = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    exits_78_saying(
        &[(unbound.as_raw_fd(), "web")],
        &cfg,
        "is not a listening stream socket",
    );
}

/// Runs the daemon with `fds` passed as systemd passes them; it must exit
/// 78 with `want` in its log.
fn exits_78_saying(fds: &[(RawFd, &str)], cfg: &Path, want: &str) {
    let mut d = Daemon::spawn(passing(fds, cfg));
    assert_eq!(d.wait_exit(T).code(), Some(78), "{}", d.lines.text());
    assert!(d.lines.text().contains(want), "{}", d.lines.text());
}
