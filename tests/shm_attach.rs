//! Attaching after a client died, whatever it left: full request and
//! response rings (the daemon blocked pushing a reply), a half-written
//! record, a slow call in flight. Each shipped client (Rust, C via gcc,
//! Python) must attach and get correct answers, byte for byte, within 1 s
//! plus the in-flight handler's time. The dead client is a raw peer
//! (tests/common/raw_shm.rs) that holds no lock, as a killed process does.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::raw_shm::{RawChannel, Ring};
use common::{Daemon, Scenario};
use pyipcd::shm::client::ShmClient;

const T: Duration = Duration::from_secs(10);
/// The in-flight handler's time (`SLEEP…` requests).
const HANDLER: Duration = Duration::from_millis(300);
const CALLS: usize = 50;

const HANDLERS: &str = r#"
import time

def rev(data):
    if data.startswith(b"SLEEP"):
        time.sleep(0.3)
    return data[::-1]
"#;

fn serving(s: &Scenario) -> (Daemon, std::path::PathBuf) {
    common::channel_daemon(s, HANDLERS, "rev", "max_message = \"16KiB\"")
}

/// What a dead client can leave behind.
#[derive(Debug, Clone, Copy)]
enum Leftovers {
    /// Requests it never collected the replies of, until both rings were full.
    FullRings,
    /// A record written but never published.
    HalfWritten,
    /// A request to a slow handler, still running.
    SlowCallInFlight,
}

fn die_leaving(path: &Path, what: Leftovers) {
    let mut raw = RawChannel::open(path);
    raw.attach();
    match what {
        Leftovers::FullRings => {
            let mut last_progress = Instant::now();
            let mut seq = 0;
            while last_progress.elapsed() < Duration::from_millis(300) {
                if raw.send(seq, format!("OLD CLIENT'S REQUEST {seq}").as_bytes()) {
                    seq += 1;
                    last_progress = Instant::now();
                } else {
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
            for ring in [Ring::Request, Ring::Response] {
                let (head, tail) = raw.positions(ring);
                assert!(
                    tail - head > raw.ring - 128,
                    "{ring:?} ring full: {}",
                    tail - head
                );
            }
        }
        Leftovers::HalfWritten => {
            let p = b"OLD CLIENT'S HALF-WRITTEN REQUEST";
            raw.send(0, b"OLD CLIENT'S REQUEST");
            raw.put(
                [p.len() as u32, 1, crc32fast::hash(p), 0],
                raw.epoch,
                &p[..20],
                false,
            );
        }
        Leftovers::SlowCallInFlight => {
            raw.send(0, b"SLEEP: OLD CLIENT'S REQUEST");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn payload(i: usize) -> Vec<u8> {
    (0..(i * 131) % 16000).map(|j| (j ^ i) as u8).collect()
}

/// Runs each kind of leftovers, then `client` (which must make CALLS
/// correct calls), checking it took at most 1 s plus the handler's time.
fn after_each_death(client: impl Fn(&Path) -> Duration) {
    let s = Scenario::new();
    let (_d, path) = serving(&s);
    for what in [
        Leftovers::FullRings,
        Leftovers::HalfWritten,
        Leftovers::SlowCallInFlight,
    ] {
        die_leaving(&path, what);
        let took = client(&path);
        assert!(
            took <= Duration::from_secs(1) + HANDLER,
            "{what:?}: attach and first call took {took:?}"
        );
    }
}

#[test]
fn the_rust_client_attaches_after_any_death() {
    after_each_death(|path| {
        let start = Instant::now();
        let mut c = ShmClient::connect(path, T).unwrap();
        let mut took = None;
        for i in 0..CALLS {
            let p = payload(i);
            let reply = c.call(&p).unwrap().unwrap();
            let expected: Vec<u8> = p.iter().rev().copied().collect();
            assert_eq!(reply, expected, "call {i}");
            took.get_or_insert(start.elapsed());
        }
        took.unwrap()
    });
}

#[test]
fn the_c_client_attaches_after_any_death() {
    let s = Scenario::new();
    let exe = s.path("shm_client");
    common::gcc("include/examples/shm_client.c", &exe);
    after_each_death(|path| {
        let start = Instant::now();
        let out = Command::new(&exe)
            .arg(path)
            .arg(CALLS.to_string())
            .output()
            .unwrap();
        let took = start.elapsed();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "{text}");
        assert!(text.contains(&format!("{CALLS} round trips ok")), "{text}");
        took
    });
}

#[test]
fn the_python_client_attaches_after_any_death() {
    let lib = concat!(env!("CARGO_MANIFEST_DIR"), "/python");
    after_each_death(|path| {
        let script = format!(
            "import sys, time; sys.path.insert(0, {lib:?})\n\
             start = time.monotonic()\n\
             import pyipcd_shm\n\
             c = pyipcd_shm.Client({path:?}, timeout=10)\n\
             took = None\n\
             for i in range({CALLS}):\n    \
                 p = bytes((j ^ i) & 0xFF for j in range((i * 131) % 16000))\n    \
                 r = c.call(p)\n    \
                 assert r == p[::-1], (i, r[:40])\n    \
                 took = took or time.monotonic() - start\n\
             print('ok', took)\n"
        );
        let out = Command::new("python3")
            .args(["-c", &script])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "{text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let took: f64 = text
            .trim()
            .strip_prefix("ok ")
            .and_then(|t| t.parse().ok())
            .unwrap_or_else(|| panic!("{text}"));
        Duration::from_secs_f64(took)
    });
}
