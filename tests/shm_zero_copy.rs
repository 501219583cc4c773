//! `zero_copy = true`: the handler reads the request where it lies in the
//! mapping, through a read-only `memoryview` that is valid for the call only.
//! Using it afterwards raises; a view kept past the call (a slice) holds the
//! request's ring space until it is dropped, so it never reads reused memory.

mod common;

use std::time::{Duration, Instant};

use common::{Daemon, Scenario};
use pyipcd::shm::client::ShmClient;

const T: Duration = Duration::from_secs(10);

const HANDLERS: &str = r#"
import threading

KEPT = []
SEEN = []

def zc(data):
    cmd = bytes(data[:8]).split(b" ")[0]
    if cmd == b"kind":
        return type(data).__name__.encode() + b":" + bytes(data[5:10])
    if cmd == b"echo":
        return data  # the lent view itself
    if cmd == b"keepview":
        KEPT.append(data)
        return b"kept"
    if cmd == b"usekept":
        try:
            bytes(KEPT.pop())
        except ValueError as e:
            return str(e).encode()
        return b"no error"
    if cmd == b"keepobj":
        KEPT.append(data.obj)
        return b"kept"
    if cmd == b"useobj":
        try:
            memoryview(KEPT.pop())
        except BufferError as e:
            return str(e).encode()
        return b"no error"
    if cmd == b"slice":
        kept = data[:12]
        def later():
            SEEN.append(bytes(kept))  # still the original bytes
            kept.release()
        threading.Timer(0.3, later).start()
        return b"sliced"
    if cmd == b"seen":
        return b"|".join(SEEN)
    if cmd == b"hold":
        KEPT.append(data[:4])  # never released
        return b"held"
    if cmd == b"raise":
        raise ValueError("zero-copy handler failed")
    if cmd == b"none":
        return None
    if cmd == b"write":
        try:
            data[0] = 0
        except TypeError:
            return b"read-only"
        return b"writable"
    return b"?"
"#;

fn serving(s: &Scenario) -> (Daemon, ShmClient) {
    let region = "max_message = \"16KiB\"\nzero_copy = true";
    let (d, path) = common::channel_daemon(s, HANDLERS, "zc", region);
    assert_eq!(d.lines.count(&["channel ready", "zero_copy=true"]), 1);
    let c = ShmClient::connect(&path, T).unwrap();
    (d, c)
}

fn call(c: &mut ShmClient, data: &[u8]) -> Vec<u8> {
    c.call(data).unwrap().unwrap()
}

#[test]
fn the_handler_reads_a_read_only_memoryview_and_echoes_it_byte_for_byte() {
    let s = Scenario::new();
    let (_d, mut c) = serving(&s);
    assert_eq!(call(&mut c, b"kind hello"), b"memoryview:hello");
    assert_eq!(call(&mut c, b"write"), b"read-only");
    for i in 0..200usize {
        let mut p = b"echo ".to_vec();
        p.extend((0..(i * 97) % 16000).map(|j| (j ^ i) as u8));
        assert_eq!(call(&mut c, &p), p, "call {i}");
    }
}

#[test]
fn exceptions_and_none_answer_as_with_bytes_handlers() {
    let s = Scenario::new();
    let (_d, mut c) = serving(&s);
    match c.call(b"raise") {
        Err(pyipcd::shm::client::ClientError::Handler(text)) => {
            assert!(
                text.contains("ValueError: zero-copy handler failed"),
                "{text}"
            )
        }
        other => panic!("expected a handler error, got {other:?}"),
    }
    assert_eq!(c.call(b"none").unwrap(), None);
    assert_eq!(call(&mut c, b"echo after"), b"echo after");
}

#[test]
fn the_view_and_its_exporter_are_revoked_after_the_call() {
    let s = Scenario::new();
    let (_d, mut c) = serving(&s);
    assert_eq!(call(&mut c, b"keepview"), b"kept");
    let err = String::from_utf8(call(&mut c, b"usekept")).unwrap();
    assert!(err.contains("released memoryview"), "{err}");
    assert_eq!(call(&mut c, b"keepobj"), b"kept");
    let err = String::from_utf8(call(&mut c, b"useobj")).unwrap();
    assert!(err.contains("only for the duration of its call"), "{err}");
}

#[test]
fn a_kept_slice_holds_the_memory_until_released_and_never_sees_reuse() {
    let s = Scenario::new();
    let (d, mut c) = serving(&s);
    assert_eq!(call(&mut c, b"slice ORIGINAL"), b"sliced");
    d.lines
        .wait_for(&["kept a view of the request's memory"], T);
    // The channel waits for the slice (released 0.3 s after the call)
    // before it reuses the space; then everything goes on.
    // 50 x 4 KiB wraps the 64 KiB request ring three times over: without
    // the hold, the slice would read these bytes.
    let mut p = b"echo ".to_vec();
    p.extend([b'x'; 4000]);
    let start = Instant::now();
    for _ in 0..50 {
        assert_eq!(call(&mut c, &p), p);
    }
    assert!(start.elapsed() < T);
    // What the slice read when its holder looked, 0.3 s after the call.
    let seen = loop {
        let seen = call(&mut c, b"seen");
        if !seen.is_empty() || start.elapsed() > T {
            break seen;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(seen, b"slice ORIGIN");
}

#[test]
fn zero_copy_is_refused_outside_channel_mode() {
    let s = Scenario::new();
    let cfg = s.config(
        "[[shm.region]]\nname = \"w\"\nmode = \"watch\"\npath = \"w.bin\"\nsize = \"1KiB\"\n\
         create = true\nzero_copy = true\n",
    );
    let (code, _, err) = common::run_to_end(&["check", "-c", cfg.to_str().unwrap()], &[]);
    assert_eq!(code, 78, "{err}");
    assert!(
        err.contains("shm.region[0]: handler and zero_copy are for mode = \"channel\""),
        "{err}"
    );
}

#[test]
fn shutdown_does_not_wait_for_a_view_held_forever() {
    let s = Scenario::new();
    let (mut d, mut c) = serving(&s);
    assert_eq!(call(&mut c, b"hold"), b"held");
    d.lines
        .wait_for(&["kept a view of the request's memory"], T);
    d.signal("TERM");
    let status = d.wait_exit(T);
    assert!(status.success(), "{status}: {}", d.lines.text());
    assert_eq!(
        d.lines.count(&["leaving it mapped"]),
        1,
        "{}",
        d.lines.text()
    );
}
