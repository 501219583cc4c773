//! The daemon against docs/shm-protocol.md, one test per rule, driven with
//! raw reads and writes of the mapping (tests/common/raw_shm.rs), never
//! through the shipped clients.

mod common;

use std::time::{Duration, Instant};

use common::raw_shm::{EPOCH, PAGE, RawChannel, Ring};
use common::{Daemon, Scenario};

const T: Duration = Duration::from_secs(10);

const HANDLERS: &str = r#"
import time

def rev(data):
    if data == b"raise":
        raise ValueError("caf\u00e9 failed")
    if data == b"none":
        return None
    if data.startswith(b"SLEEP"):
        time.sleep(0.3)
    return data[::-1]
"#;

/// A daemon serving `h:rev` on `ch.shm` (64 KiB rings, 1 KiB max) and a raw peer attached to it.
fn serving() -> (Scenario, Daemon, RawChannel) {
    let s = Scenario::new();
    let (d, path) = common::channel_daemon(&s, HANDLERS, "rev", "max_message = \"1KiB\"");
    let mut raw = RawChannel::open(&path);
    raw.attach();
    (s, d, raw)
}

fn reversed(b: &[u8]) -> Vec<u8> {
    b.iter().rev().copied().collect()
}

#[test]
fn header_fields_are_as_specified() {
    let (_s, d, raw) = serving();
    assert_eq!(raw.bytes(0, 8), b"PYIPCSH1");
    assert_eq!(raw.u32(8), 2, "layout version");
    assert_eq!(raw.u32(12), 4096, "header size");
    assert_eq!(raw.u32(16), 65536, "ring size");
    assert_eq!(raw.u32(20), 1024, "max payload");
    assert!(raw.u64(24) >= 1, "generation");
    assert_eq!(raw.u32(32), 1, "state ready");
    assert_eq!(raw.u32(36), d.child.id(), "daemon pid");
    let file = std::fs::metadata(_s.path("ch.shm")).unwrap();
    assert_eq!(file.len(), PAGE + 2 * (PAGE + 65536));
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(file.permissions().mode() & 0o777, 0o600);
}

#[test]
fn a_request_is_answered_with_its_seq_epoch_and_a_valid_crc() {
    let (_s, _d, raw) = serving();
    assert!(raw.send(7, b"hello"));
    let r = raw.recv(T).expect("a reply");
    assert_eq!((r.seq, r.flags, r.epoch), (7, 0, raw.epoch));
    assert_eq!(r.payload, b"olleh");
    assert_eq!(r.crc, crc32fast::hash(&r.payload));
}

#[test]
fn none_and_exceptions_have_their_flags_and_utf8_text() {
    let (_s, _d, raw) = serving();
    raw.send(1, b"none");
    let r = raw.recv(T).unwrap();
    assert_eq!((r.seq, r.flags, r.len), (1, 1, 0));
    raw.send(2, b"raise");
    let r = raw.recv(T).unwrap();
    assert_eq!((r.seq, r.flags), (2, 2));
    assert!(r.text().contains("ValueError: café failed"), "{}", r.text());
}

#[test]
fn requests_of_an_older_epoch_are_consumed_unanswered() {
    let (_s, _d, mut raw) = serving();
    let old = raw.epoch;
    raw.attach();
    let crc = crc32fast::hash(b"old");
    assert!(raw.put([3, 1, crc, 0], old, b"old", true));
    assert!(raw.send(2, b"new"));
    let r = raw.recv(T).unwrap();
    assert_eq!(
        (r.seq, r.epoch, r.payload.as_slice()),
        (2, raw.epoch, b"wen".as_slice())
    );
    assert_eq!(raw.recv(Duration::from_millis(300)), None);
    let (head, tail) = raw.positions(Ring::Request);
    assert_eq!(head, tail, "the stale request was consumed");
}

#[test]
fn a_reply_whose_client_left_during_the_call_is_dropped() {
    let (_s, _d, mut raw) = serving();
    raw.send(1, b"SLEEP then reply");
    std::thread::sleep(Duration::from_millis(100));
    raw.attach(); // a new client while the handler runs
    raw.send(2, b"second");
    let r = raw.recv(T).unwrap();
    assert_eq!(
        (r.seq, r.epoch, r.payload.as_slice()),
        (2, raw.epoch, b"dnoces".as_slice())
    );
    assert_eq!(raw.recv(Duration::from_millis(300)), None);
}

#[test]
fn a_checksum_mismatch_is_answered_as_such_and_the_next_request_too() {
    let (_s, _d, raw) = serving();
    assert!(raw.put([4, 1, 12345, 0], raw.epoch, b"data", true));
    raw.send(2, b"ok");
    let r = raw.recv(T).unwrap();
    assert_eq!((r.seq, r.flags), (1, 2));
    assert_eq!(r.text(), "request 1 failed its checksum");
    let r = raw.recv(T).unwrap();
    assert_eq!(
        (r.seq, r.flags, r.payload.as_slice()),
        (2, 0, b"ko".as_slice())
    );
}

#[test]
fn an_over_long_framed_record_is_answered_and_skipped_alone() {
    let (_s, _d, raw) = serving();
    let big = vec![b'x'; 2000];
    assert!(raw.put([2000, 1, crc32fast::hash(&big), 0], raw.epoch, &big, true));
    raw.send(2, b"behind");
    let r = raw.recv(T).unwrap();
    assert_eq!((r.seq, r.flags), (1, 2));
    assert_eq!(r.text(), "length 2000 over max 1024");
    let r = raw.recv(T).unwrap();
    assert_eq!(
        (r.seq, r.flags, r.payload.as_slice()),
        (2, 0, b"dniheb".as_slice())
    );
}

#[test]
fn lost_framing_drops_what_was_published_and_says_reset() {
    let (_s, _d, raw) = serving();
    // A length that runs past the published bytes, then a request behind it
    // in the same publication: both dropped, one RESET reply.
    let (_, tail) = raw.positions(Ring::Request);
    let at = raw.data(Ring::Request) + tail % raw.ring;
    let mut bytes = Vec::new();
    for w in [60_000u32, 1, 0, 0] {
        bytes.extend_from_slice(&w.to_le_bytes());
    }
    bytes.extend_from_slice(&raw.epoch.to_le_bytes());
    for w in [4u32, 2, crc32fast::hash(b"lost"), 0] {
        bytes.extend_from_slice(&w.to_le_bytes());
    }
    bytes.extend_from_slice(&raw.epoch.to_le_bytes());
    bytes.extend_from_slice(b"lost\0\0\0\0");
    raw.write(at, &bytes);
    raw.set_u64(PAGE, tail + bytes.len() as u64); // both published at once
    raw.ring_bell(Ring::Request);
    let r = raw.recv(T).unwrap();
    assert_eq!(r.flags, 3, "RESET");
    assert_eq!(r.epoch, raw.epoch);
    assert!(r.text().starts_with("framing lost"), "{}", r.text());
    assert_eq!(
        raw.recv(Duration::from_millis(300)),
        None,
        "nothing for seq 2"
    );
    raw.send(3, b"after");
    let r = raw.recv(T).unwrap();
    assert_eq!(
        (r.seq, r.flags, r.payload.as_slice()),
        (3, 0, b"retfa".as_slice())
    );
}

#[test]
fn a_wrap_marker_sends_the_reader_to_offset_zero_in_both_rings() {
    let (_s, _d, raw) = serving();
    // Enough traffic to wrap both 64 KiB rings several times, sizes chosen
    // so records land near the end of the data area.
    for i in 0..400u32 {
        let p = vec![(i % 251) as u8; 500 + (i as usize * 7) % 500];
        while !raw.send(i, &p) {
            std::thread::sleep(Duration::from_micros(100));
        }
        let r = raw.recv(T).unwrap();
        assert_eq!((r.seq, r.flags), (i, 0));
        assert_eq!(r.payload, reversed(&p));
    }
    let (head, tail) = raw.positions(Ring::Response);
    assert_eq!(head, tail);
    assert!(tail > 3 * raw.ring, "wrapped: {tail}");
}

#[test]
fn the_epoch_word_only_moves_when_a_client_attaches() {
    let (_s, _d, mut raw) = serving();
    let e = raw.u64(EPOCH);
    for i in 0..20 {
        raw.send(i, b"x");
        raw.recv(T).unwrap();
    }
    assert_eq!(raw.u64(EPOCH), e, "the daemon never writes the epoch");
    assert_eq!(raw.attach(), e + 1);
}

#[test]
fn a_full_response_ring_waits_for_the_client_never_overwrites() {
    let (_s, _d, raw) = serving();
    let p = vec![b'y'; 1000];
    let mut sent = 0u32;
    let start = Instant::now();
    // Fill both rings without reading a reply.
    while start.elapsed() < Duration::from_secs(2) {
        if raw.send(sent, &p) {
            sent += 1;
        } else {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    let (h, t) = raw.positions(Ring::Response);
    assert!(t - h > raw.ring - 1100, "response ring full: {}", t - h);
    for i in 0..sent {
        let r = raw.recv(T).unwrap_or_else(|| panic!("reply {i} of {sent}"));
        assert_eq!((r.seq, r.flags), (i, 0));
        assert_eq!(r.payload, p);
    }
}

#[test]
fn a_channel_file_of_layout_version_1_is_reinitialised_as_version_2() {
    let s = Scenario::new();
    s.write("h.py", HANDLERS);
    let mut old = vec![0u8; 4096];
    old[..8].copy_from_slice(b"PYIPCSH1");
    old[8..12].copy_from_slice(&1u32.to_le_bytes());
    old[24..32].copy_from_slice(&41u64.to_le_bytes());
    s.write("ch.shm", "");
    std::fs::write(s.path("ch.shm"), &old).unwrap();
    let cfg = s.config(
        "[python]\npaths = [\".\"]\n[[shm.region]]\nname = \"ch\"\nmode = \"channel\"\npath = \"ch.shm\"\n\
         handler = \"h:rev\"\nring_size = \"64KiB\"\nmax_message = \"1KiB\"\n",
    );
    let mut d = Daemon::start(&cfg, &[]);
    d.wait_ready();
    d.lines
        .wait_for(&["layout version 1: re-initialising it as version 2"], T);
    let mut raw = RawChannel::open(&s.path("ch.shm"));
    assert_eq!((raw.u32(8), raw.u64(24)), (2, 42));
    raw.attach();
    raw.send(1, b"v2");
    assert_eq!(raw.recv(T).unwrap().payload, b"2v");
}

#[test]
fn an_idle_daemon_sleeps_on_the_request_bell_and_a_ring_wakes_it() {
    let (_s, _d, raw) = serving();
    let sleeping = PAGE + 132;
    let deadline = Instant::now() + T;
    while raw.u32(sleeping) == 0 {
        assert!(Instant::now() < deadline, "the daemon never went to sleep");
        std::thread::sleep(Duration::from_millis(5));
    }
    std::thread::sleep(Duration::from_millis(50));
    let t = Instant::now();
    assert!(raw.send(1, b"wake up")); // publishes and rings
    let r = raw.recv(T).unwrap();
    assert_eq!(r.payload, b"pu ekaw");
    // Woken by the ring, not by its 500 ms timeout (which, the daemon having
    // slept 50 ms already, would come 450 ms or more after the request).
    assert!(
        t.elapsed() < Duration::from_millis(200),
        "{:?}",
        t.elapsed()
    );
}

#[test]
fn the_daemon_rings_a_client_asleep_on_the_response_bell() {
    let (_s, _d, raw) = serving();
    assert!(raw.send(1, b"SLEEP 300 ms, then reply"));
    // Asleep long before the reply exists; a daemon that never rang would
    // leave this asleep for the whole 5 s.
    let slept = raw.sleep_for_reply(Duration::from_secs(5));
    assert!(slept < Duration::from_secs(2), "slept {slept:?}");
    let r = raw
        .recv(Duration::ZERO)
        .expect("the reply is there when woken");
    assert_eq!((r.seq, r.flags), (1, 0));
}
