//! `[[shm.region]] mode = "channel"` across processes: the daemon (the real
//! binary) against the Rust client (this process), the Python client and the
//! C client (built by gcc), a client SIGKILLed mid-stream, corrupt headers, a
//! full ring and a daemon restart.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::{Daemon, Scenario};
use pyipcd::shm::client::{ClientError, ShmClient};

const T: Duration = Duration::from_secs(15);

const HANDLERS: &str = r#"
import time, threading
gate = threading.Event()

def echo(data):
    return data

def rev(data):
    if data == b"raise":
        raise ValueError("channel handler failed")
    if data == b"none":
        return None
    return data[::-1]

def slow(data):
    time.sleep(0.02)
    return data

def slow_check(data):
    time.sleep(0.02)
    if data != data[:1] * len(data):
        raise ValueError("torn or overwritten request")
    return None

def very_slow(data):
    time.sleep(3)
    return data
"#;

fn daemon(s: &Scenario, handler: &str, extra: &str) -> (Daemon, std::path::PathBuf) {
    common::channel_daemon(
        s,
        HANDLERS,
        handler,
        &format!("max_message = \"16KiB\"\n{extra}"),
    )
}

fn payload(i: usize) -> Vec<u8> {
    (0..(i * 131) % 16000).map(|j| (j ^ i) as u8).collect()
}

#[test]
fn the_rust_client_exchanges_many_messages_byte_for_byte() {
    let s = Scenario::new();
    let (_d, path) = daemon(&s, "rev", "");
    let mut c = ShmClient::connect(&path, T).unwrap();
    for i in 0..2000 {
        let p = payload(i);
        let mut want = p.clone();
        want.reverse();
        assert_eq!(c.call(&p).unwrap().unwrap(), want, "message {i}");
    }
    assert_eq!(c.call(b"none").unwrap(), None);
    match c.call(b"raise") {
        Err(ClientError::Handler(msg)) => {
            assert!(msg.contains("ValueError: channel handler failed"), "{msg}")
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        c.call(&vec![0u8; 20000]),
        Err(ClientError::TooLarge(20000, 16384))
    ));
    // Still serving after all that.
    assert_eq!(c.call(b"abc").unwrap().unwrap(), b"cba");
    let meta = std::fs::metadata(&path).unwrap();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o777,
        0o600
    );
}

#[test]
fn a_full_ring_makes_the_writer_wait_and_loses_nothing() {
    let s = Scenario::new();
    let (_d, path) = daemon(&s, "slow_check", "");
    let mut c = ShmClient::connect(&path, T).unwrap();
    // 40 x 8 KiB requests into a 64 KiB ring served at 50/s: once 7 are
    // queued, each send must wait for the daemon to take one.
    let started = std::time::Instant::now();
    let seqs: Vec<u32> = (0..40u8).map(|i| c.send(&[i; 8192]).unwrap()).collect();
    assert!(
        started.elapsed() > Duration::from_millis(400),
        "sends never waited: {:?}",
        started.elapsed()
    );
    // Every request arrived whole (the handler checks each byte) and in order.
    for seq in seqs {
        assert_eq!(c.recv().unwrap(), (seq, None));
    }
}

#[test]
fn a_second_live_client_is_refused_and_a_dead_ones_lock_is_taken_over() {
    let s = Scenario::new();
    let (_d, path) = daemon(&s, "echo", "");
    let first = ShmClient::connect(&path, T).unwrap();
    assert!(matches!(
        ShmClient::connect(&path, T),
        Err(ClientError::Busy(_))
    ));
    drop(first);
    let mut again = ShmClient::connect(&path, T).unwrap();
    assert_eq!(again.call(b"x").unwrap().unwrap(), b"x");
}

#[test]
fn a_client_killed_mid_stream_leaves_the_channel_usable() {
    let s = Scenario::new();
    let (d, path) = daemon(&s, "echo", "");
    // A Python client that streams requests until it is killed.
    let script = format!(
        "import sys; sys.path.insert(0, {:?})\nimport pyipcd_shm\nc = pyipcd_shm.Client({:?})\nprint('attached', flush=True)\n\
         i = 0\nwhile True:\n    assert c.call(b'x' * (i % 5000)) == b'x' * (i % 5000)\n    i += 1\n",
        concat!(env!("CARGO_MANIFEST_DIR"), "/python"),
        path.to_str().unwrap()
    );
    let mut child = common::python_until(&script, "attached");
    std::thread::sleep(Duration::from_millis(200));
    child.kill().unwrap(); // SIGKILL, mid-stream
    child.wait().unwrap();
    let mut c = ShmClient::connect(&path, T).unwrap();
    for i in 0..500 {
        let p = payload(i);
        assert_eq!(c.call(&p).unwrap().unwrap(), p);
    }
    assert_eq!(d.lines.count(&["checksum"]), 0, "{}", d.lines.text());
}

#[test]
fn the_python_client_exchanges_many_messages_byte_for_byte() {
    let s = Scenario::new();
    let (_d, path) = daemon(&s, "rev", "");
    let script = format!(
        "import sys; sys.path.insert(0, {:?})\nimport pyipcd_shm\nc = pyipcd_shm.Client({:?})\n\
         for i in range(3000):\n    p = bytes((j ^ i) & 255 for j in range((i * 131) % 16000))\n    assert c.call(p) == p[::-1], i\n\
         assert c.call(b'none') is None\ntry:\n    c.call(b'raise')\nexcept pyipcd_shm.HandlerError as e:\n    assert 'channel handler failed' in str(e)\n\
         else:\n    raise SystemExit('no HandlerError')\nprint('python client ok')\n",
        concat!(env!("CARGO_MANIFEST_DIR"), "/python"),
        path.to_str().unwrap()
    );
    assert_eq!(common::run_python(&script).trim(), "python client ok");
}

#[test]
fn the_c_client_exchanges_many_messages_byte_for_byte() {
    let s = Scenario::new();
    let (_d, path) = daemon(&s, "rev", "");
    let exe = s.path("shm_client");
    common::gcc("include/examples/shm_client.c", &exe);
    let out = Command::new(&exe).arg(&path).arg("3000").output().unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("3000 round trips ok"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn a_corrupt_header_is_refused_by_the_daemon_and_by_clients() {
    let s = Scenario::new();
    let (mut d, path) = daemon(&s, "echo", "");
    d.signal("TERM");
    assert_eq!(d.wait_exit(T).code(), Some(0));
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[..8].copy_from_slice(b"NOTOURS!");
    std::fs::write(&path, &bytes).unwrap();
    assert!(matches!(
        ShmClient::connect(&path, T),
        Err(ClientError::Layout(_))
    ));
    let (code, _, err) =
        common::run_to_end(&["run", "-c", s.path("pyipcd.toml").to_str().unwrap()], &[]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("refusing to reuse it: bad magic"), "{err}");
    // A wrong version is named too.
    bytes[..8].copy_from_slice(b"PYIPCSH1");
    bytes[8..12].copy_from_slice(&7u32.to_le_bytes());
    std::fs::write(&path, &bytes).unwrap();
    let err = ShmClient::connect(&path, Duration::from_millis(300))
        .unwrap_err()
        .to_string();
    assert!(err.contains("layout version 7"), "{err}");
}

#[test]
fn a_daemon_restart_is_noticed_by_a_waiting_client() {
    let s = Scenario::new();
    let (mut d, path) = daemon(&s, "very_slow", "");
    let p = path.clone();
    let waiting = std::thread::spawn(move || {
        let mut c = ShmClient::connect(&p, Duration::from_secs(30)).unwrap();
        c.call(b"slow one")
    });
    std::thread::sleep(Duration::from_millis(300));
    d.signal("KILL");
    d.wait_exit(T);
    let cfg = s.path("pyipcd.toml");
    let mut again = Daemon::start(&cfg, &[]);
    again.wait_ready();
    match waiting.join().unwrap() {
        Err(ClientError::DaemonRestarted) => {}
        other => panic!("expected DaemonRestarted, got {other:?}"),
    }
}

#[test]
fn an_async_channel_handler_is_refused_by_run_and_check() {
    let s = Scenario::new();
    s.write("h.py", "async def upper(data):\n    return data.upper()\n");
    let cfg = s.config(
        "[python]\npaths = [\".\"]\n[[shm.region]]\nname = \"ch\"\nmode = \"channel\"\n\
         path = \"ch.shm\"\nhandler = \"h:upper\"\n",
    );
    for cmd in ["run", "check"] {
        let (code, _, err) = common::run_to_end(&[cmd, "-c", cfg.to_str().unwrap()], &[]);
        assert_eq!(code, 78, "{cmd}: {err}");
        assert!(err.contains("async def"), "{cmd}: {err}");
    }
}

/// Counts how often this process reads 0 from the 8-byte word at offset 64
/// of a file while a Python process stores non-zero values there with
/// `store` (a statement using `mm`, `words` and `v`), until this side has
/// seen `want` changes (the two really raced) or 30 s pass.
/// Returns (zeros, changes seen).
fn race_python_stores(store: &str, want: u64) -> (u64, u64) {
    use std::sync::atomic::{AtomicU64, Ordering};
    let s = Scenario::new();
    let path = s.path("words.bin");
    let mut start = vec![0u8; 4096];
    start[64..72].copy_from_slice(&1u64.to_ne_bytes());
    std::fs::write(&path, start).unwrap();
    // The writer stops when the word at offset 128 turns non-zero (or after 60 s).
    let script = format!(
        "import sys, time, mmap, struct; sys.path.insert(0, {:?})\nimport pyipcd_shm\n\
         f = open({:?}, 'r+b'); mm = mmap.mmap(f.fileno(), 4096); words = pyipcd_shm._Words(mm)\n\
         print('go', flush=True)\nend = time.monotonic() + 60\ni = 0\n\
         while words.u64(128) == 0 and time.monotonic() < end:\n    for _ in range(1024):\n        \
         i += 1\n        v = (1 << 40) | (i & 0xFFFF) | 1\n        {store}\n",
        concat!(env!("CARGO_MANIFEST_DIR"), "/python"),
        path.to_str().unwrap()
    );
    let mut child = common::python_until(&script, "go");
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    let map = memmap2::MmapRaw::map_raw(&file).unwrap();
    // SAFETY: offsets 64 and 128 are 8-aligned and inside the 4 KiB mapping,
    // which lives until the end of this function; both words are only
    // accessed atomically here.
    let (word, stop) = unsafe {
        (
            &*(map.as_ptr().add(64).cast::<AtomicU64>()),
            &*(map.as_ptr().add(128).cast::<AtomicU64>()),
        )
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let (mut zeros, mut changes, mut last) = (0u64, 0u64, 1u64);
    for i in 0u64.. {
        let v = word.load(Ordering::Acquire);
        if v == 0 {
            zeros += 1;
        } else if v != last {
            changes += 1;
            last = v;
        }
        if i % 4096 == 0 && (changes >= want || std::time::Instant::now() > deadline) {
            break;
        }
    }
    stop.store(1, Ordering::Release);
    assert!(child.wait().unwrap().success());
    (zeros, changes)
}

#[test]
fn the_python_clients_position_stores_are_never_seen_half_done() {
    let want = 200_000;
    let (zeros, changes) = race_python_stores("words.set_u64(64, v)", want);
    assert!(
        changes >= want,
        "the reader never raced the writer ({changes} changes seen)"
    );
    assert_eq!(
        zeros, 0,
        "a position read as 0 mid-store ({changes} changes seen)"
    );
}

#[test]
fn a_stuck_channel_handler_is_reported_and_its_reply_still_arrives() {
    let s = Scenario::new();
    s.write("h.py", HANDLERS);
    let cfg = s.config(
        "[python]\npaths = [\".\"]\ncall_timeout = \"300ms\"\n[[shm.region]]\nname = \"ch\"\n\
         mode = \"channel\"\npath = \"ch.shm\"\nhandler = \"h:very_slow\"\n",
    );
    let mut d = Daemon::start(&cfg, &[]);
    d.wait_ready();
    d.lines.wait_for(&["channel ready", "role=ch"], T);
    let mut c = ShmClient::connect(&s.path("ch.shm"), T).unwrap();
    let waiting = std::thread::spawn(move || c.call(b"slow"));
    // One multi-line event: the message, the stack, the thread's name.
    d.lines.wait_for(&["call running for at least"], T);
    d.lines.wait_for(&["in very_slow"], T);
    d.lines.wait_for(&["py-shm-ch"], T);
    assert_eq!(waiting.join().unwrap().unwrap().unwrap(), b"slow");
    d.lines.wait_for(&["stuck call returned", "role=ch"], T);
}

/// Runs `python3 -c script`, which prints `ready` once attached and then
/// waits for a line on stdin: runs `meanwhile`, lets the script go on, and
/// returns the next line it prints (it must then exit successfully).
fn python_step(script: &str, meanwhile: impl FnOnce()) -> String {
    use std::io::{BufRead, Write};
    let mut child = Command::new("python3")
        .args(["-c", script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "ready");
    meanwhile();
    child.stdin.take().unwrap().write_all(b"go\n").unwrap();
    line.clear();
    out.read_line(&mut line).unwrap();
    assert!(child.wait().unwrap().success());
    line
}

/// Publishes a record header whose length cannot be framed, as a buggy or
/// hostile writer would, behind the attached client's back.
fn inject_lost_framing(path: &std::path::Path) {
    use common::raw_shm::{PAGE, RawChannel, Ring};
    let raw = RawChannel::open(path);
    let (_, tail) = raw.positions(Ring::Request);
    let mut bad = Vec::new();
    for w in [60_000u32, 0, 0, 0] {
        bad.extend_from_slice(&w.to_le_bytes());
    }
    bad.extend_from_slice(&raw.u64(common::raw_shm::EPOCH).to_le_bytes());
    raw.write(raw.data(Ring::Request) + tail % raw.ring, &bad);
    raw.set_u64(PAGE, tail + bad.len() as u64);
    raw.ring_bell(Ring::Request);
}

#[test]
fn a_stream_reset_reaches_the_rust_and_python_clients_as_an_error() {
    let s = Scenario::new();
    let (_d, path) = daemon(&s, "rev", "");
    let mut c = ShmClient::connect(&path, T).unwrap();
    assert_eq!(c.call(b"abc").unwrap().unwrap(), b"cba");
    inject_lost_framing(&path);
    match c.call(b"lost") {
        Err(ClientError::Reset(text)) => assert!(text.starts_with("framing lost"), "{text}"),
        other => panic!("expected a reset, got {other:?}"),
    }
    drop(c);
    let lib = concat!(env!("CARGO_MANIFEST_DIR"), "/python");
    let script = format!(
        "import sys; sys.path.insert(0, {lib:?})\nimport pyipcd_shm\n\
         c = pyipcd_shm.Client({path:?})\nassert c.call(b'abc') == b'cba'\nprint('ready', flush=True)\n\
         sys.stdin.readline()\n\
         try:\n    c.call(b'lost')\nexcept pyipcd_shm.StreamReset as e:\n    print('reset:', e)\n"
    );
    let line = python_step(&script, || inject_lost_framing(&path));
    assert!(line.starts_with("reset: framing lost"), "{line}");
}

#[test]
fn the_c_headers_crc32_matches_the_bitwise_definition() {
    let s = Scenario::new();
    let exe = s.path("crc32_check");
    common::gcc("tests/fixtures/c/crc32_check.c", &exe);
    let out = Command::new(&exe).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains("crc32 ok"), "{text}");
}

#[test]
fn the_rust_and_python_clients_skip_a_reply_of_another_epoch() {
    use common::raw_shm::RawChannel;
    let s = Scenario::new();
    let (_d, path) = daemon(&s, "rev", "");
    let raw = RawChannel::open(&path);
    let mut c = ShmClient::connect(&path, T).unwrap();
    assert_eq!(c.call(b"warm").unwrap().unwrap(), b"mraw");
    // A reply of the previous epoch, with the seq the next call will use.
    let epoch = raw.u64(common::raw_shm::EPOCH);
    raw.inject_reply(1, epoch - 1, b"NOT YOURS");
    assert_eq!(c.call(b"mine").unwrap().unwrap(), b"enim");
    drop(c);
    let lib = concat!(env!("CARGO_MANIFEST_DIR"), "/python");
    let script = format!(
        "import sys; sys.path.insert(0, {lib:?})\nimport pyipcd_shm\n\
         c = pyipcd_shm.Client({path:?})\nprint('ready', flush=True)\nsys.stdin.readline()\n\
         print(c.call(b'mine'))\n"
    );
    let line = python_step(&script, || {
        let epoch = raw.u64(common::raw_shm::EPOCH);
        raw.inject_reply(0, epoch - 1, b"NOT YOURS");
    });
    assert_eq!(line.trim(), "b'enim'");
}
