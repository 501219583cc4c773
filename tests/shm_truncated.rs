//! A shared-memory file truncated under the daemon (`open(path, "wb")`,
//! `truncate`): the real binary must log it and go on, where touching a
//! mapping past the end of its file used to kill it with `SIGBUS`.

mod common;

use std::time::Duration;

use common::{Daemon, Scenario};
use pyipcd::shm::client::{ClientError, ShmClient};

const T: Duration = Duration::from_secs(15);

#[test]
fn a_watched_file_rewritten_with_truncation_is_logged_and_watched_on() {
    let s = Scenario::new();
    s.write(
        "h.py",
        "def seen(contents):\n    print('handler saw', repr(contents.split(b'\\0', 1)[0].decode()))\n",
    );
    let cfg = s.config(
        "[python]\npaths = [\".\"]\n[[shm.region]]\nname = \"r\"\npath = \"region.dat\"\n\
         size = \"8KiB\"\ncreate = true\npoll = \"1ms\"\non_change = \"h:seen\"\n",
    );
    let mut d = Daemon::start(&cfg, &[]);
    d.wait_ready();
    d.lines.wait_for(&["watching every 1ms", "role=r"], T);
    let path = s.path("region.dat");
    let rewrite = |code: &str| {
        common::run_python(&format!("p = {:?}\n{code}", path.to_str().unwrap()));
    };
    rewrite("open(p, 'wb').write(b'short')");
    d.lines
        .wait_for(&["the region 8192: was it truncated?", "role=r"], T);
    d.lines.wait_for(&["handler saw 'short'", "role=r"], T);
    // A careless writer: every rewrite truncates the file first, and most
    // leave it shorter than the region.
    rewrite(
        "for i in range(300):\n    open(p, 'wb').write(b'short %d' % i)\n\
         open(p, 'wb').write(b'whole again' + bytes(8192 - 11))\n",
    );
    d.lines
        .wait_for(&["handler saw 'whole again'", "role=r"], T);
    d.lines
        .wait_for(&["the file has the region's 8192 bytes again"], T);
    d.assert_running();
    d.signal("TERM");
    assert_eq!(d.wait_exit(T).code(), Some(0));
}

fn channel(s: &Scenario) -> (Daemon, std::path::PathBuf) {
    common::channel_daemon(
        s,
        "def echo(data):\n    return data\n",
        "echo",
        "max_message = \"4KiB\"",
    )
}

fn full_size(path: &std::path::Path) -> u64 {
    std::fs::metadata(path).unwrap().len()
}

fn truncate(path: &std::path::Path, len: u64) {
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap()
        .set_len(len)
        .unwrap();
}

#[test]
fn an_idle_channel_whose_file_is_truncated_is_initialised_afresh() {
    let s = Scenario::new();
    let (mut d, path) = channel(&s);
    let size = full_size(&path);
    let mut c = ShmClient::connect(&path, T).unwrap();
    assert_eq!(c.call(b"before").unwrap().unwrap(), b"before");
    // Not dropped while the file is short (its drop writes to the mapping,
    // which would kill this process if the daemon never restored the file).
    let c = std::mem::ManuallyDrop::new(c);
    truncate(&path, 0);
    d.lines.wait_for(
        &["the channel file was truncated while the daemon used it (it has 0 bytes"],
        T,
    );
    d.lines.wait_for(&["channel ready", "generation=2"], T);
    d.assert_running();
    assert_eq!(full_size(&path), size);
    // The attached client, idle meanwhile, is told; a new one is served.
    let mut c = std::mem::ManuallyDrop::into_inner(c);
    match c.call(b"stale") {
        Err(ClientError::DaemonRestarted) => {}
        other => panic!("expected DaemonRestarted, got {other:?}"),
    }
    drop(c);
    let mut c = ShmClient::connect(&path, T).unwrap();
    assert_eq!(c.call(b"after").unwrap().unwrap(), b"after");
    drop(c);
    // Only the last page goes, which an idle channel never touches: its
    // periodic look at the file's length finds it.
    truncate(&path, size - 4096);
    d.lines.wait_for(&["channel ready", "generation=3"], T);
    let mut c = ShmClient::connect(&path, T).unwrap();
    assert_eq!(c.call(b"again").unwrap().unwrap(), b"again");
}

#[test]
fn a_channel_truncated_under_a_streaming_client_survives_it() {
    let s = Scenario::new();
    let (mut d, path) = channel(&s);
    let size = full_size(&path);
    // A client in another process: it may well die of the truncation itself.
    let script = format!(
        "import sys; sys.path.insert(0, {:?})\nimport pyipcd_shm\nc = pyipcd_shm.Client({:?})\n\
         print('attached', flush=True)\ni = 0\nwhile True:\n    c.call(b'x' * (i % 3000))\n    i += 1\n",
        concat!(env!("CARGO_MANIFEST_DIR"), "/python"),
        path.to_str().unwrap()
    );
    let mut child = common::python_until(&script, "attached");
    std::thread::sleep(Duration::from_millis(200));
    // The header page stays; the rings go.
    truncate(&path, 4096);
    d.lines.wait_for(
        &["the channel file was truncated while the daemon used it"],
        T,
    );
    d.lines.wait_for(&["channel ready", "generation=2"], T);
    let _ = child.kill();
    let _ = child.wait();
    d.assert_running();
    assert_eq!(full_size(&path), size);
    let mut c = ShmClient::connect(&path, T).unwrap();
    for i in 0..200usize {
        let p = vec![i as u8; i * 7];
        assert_eq!(c.call(&p).unwrap().unwrap(), p);
    }
}

#[test]
fn a_channel_truncated_again_and_again_goes_down_instead_of_looping() {
    let s = Scenario::new();
    let port = common::free_port();
    let (mut d, path) = common::channel_daemon(
        &s,
        "def echo(data):\n    return data\n",
        "echo",
        &format!("max_message = \"4KiB\"\n[admin]\nlisten = \"127.0.0.1:{port}\""),
    );
    assert_eq!(common::http_get(port, "/health").0, 200);
    for generation in 2..=6 {
        truncate(&path, 0);
        d.lines
            .wait_for(&["channel ready", &format!("generation={generation}")], T);
    }
    truncate(&path, 0);
    d.lines.wait_for(
        &[
            "not initialising it again: 5 times within a minute",
            "role=ch",
        ],
        T,
    );
    d.assert_running();
    let (status, body) = common::http_get(port, "/health");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("channel file lost"), "{body}");
    d.signal("TERM");
    assert_eq!(d.wait_exit(T).code(), Some(0));
}

/// A small tmpfs mounted for one test, unmounted when dropped.
struct TinyFs(std::path::PathBuf);

impl TinyFs {
    /// `None` where this process may not mount (not root, or no
    /// CAP_SYS_ADMIN in a container).
    fn mount(at: std::path::PathBuf, size: &str) -> Option<Self> {
        std::fs::create_dir_all(&at).unwrap();
        let ok = std::process::Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(&at)
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        ok.then_some(Self(at))
    }
}

impl Drop for TinyFs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn a_channel_on_a_full_file_system_fails_to_start_with_the_reason() {
    use std::io::Write;
    let s = Scenario::new();
    let Some(fs) = TinyFs::mount(s.path("tiny"), "256k") else {
        eprintln!("skipped: cannot mount a tmpfs here (needs root)");
        return;
    };
    // Fill it, leaving less than the channel's 140 KiB.
    let mut filler = std::fs::File::create(fs.0.join("filler")).unwrap();
    filler.write_all(&vec![1u8; 160 * 1024]).unwrap();
    filler.sync_all().unwrap();
    s.write("h.py", "def echo(data):\n    return data\n");
    let cfg = s.config(
        "[python]\npaths = [\".\"]\n[[shm.region]]\nname = \"ch\"\nmode = \"channel\"\n\
         path = \"tiny/ch.shm\"\nhandler = \"h:echo\"\nring_size = \"64KiB\"\nmax_message = \"4KiB\"\n",
    );
    let mut d = Daemon::start(&cfg, &[]);
    let status = d.wait_exit(T);
    let log = d.lines.text();
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(
        log.contains("ch.shm") && log.contains("No space left on device"),
        "{log}"
    );
}
