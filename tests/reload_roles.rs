//! SIGHUP reload of client and shm region roles through the real binary:
//! a replacement that cannot be resolved leaves the old instance running, a
//! client's replacement takes over its outbox (nothing a Python task sends
//! through `pyipcd.send` is lost, reordered or refused across reloads), and
//! a channel whose file layout is unchanged is handed to the new instance
//! without its attached client noticing.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Daemon, Scenario};
use pyipcd::shm::client::ShmClient;

const T: Duration = Duration::from_secs(15);

/// A line server in the test: records every line it gets (per connection)
/// and echoes it back.
#[derive(Clone, Default)]
struct Sink(Arc<Mutex<Vec<(usize, String)>>>);

impl Sink {
    fn start() -> (Self, u16) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let sink = Sink::default();
        let s = sink.clone();
        std::thread::spawn(move || {
            for (conn, stream) in listener.incoming().enumerate() {
                let Ok(stream) = stream else { return };
                let s = s.clone();
                std::thread::spawn(move || {
                    let mut w = stream.try_clone().unwrap();
                    for line in BufReader::new(stream).lines() {
                        let Ok(line) = line else { return };
                        s.0.lock().unwrap().push((conn, line.clone()));
                        let _ = writeln!(w, "{line}");
                    }
                });
            }
        });
        (sink, port)
    }

    /// The task's sequence numbers received so far, in the order sent:
    /// connections follow one another (a replacement connects after the old
    /// instance closed), each in arrival order.
    fn numbers(&self) -> Vec<u64> {
        let mut lines = self.0.lock().unwrap().clone();
        lines.sort_by_key(|(conn, _)| *conn);
        lines
            .iter()
            .filter_map(|(_, l)| l.strip_prefix("task ")?.parse().ok())
            .collect()
    }

    fn wait_beyond(&self, n: usize) {
        let deadline = Instant::now() + T;
        while self.numbers().len() <= n {
            assert!(Instant::now() < deadline, "no new messages after {n}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn client_config(port: u16, on_reply: &str, interval: &str) -> String {
    format!(
        "[daemon]\nshutdown_grace = \"2s\"\n[python]\npaths = [\".\"]\n\
         [[python.task]]\nname = \"feed\"\nrun = \"h:feed\"\n\
         [[tcp.client]]\nname = \"c\"\nconnect = \"127.0.0.1:{port}\"\nframing = \"line\"\n\
         on_reply = \"{on_reply}\"\ninterval = \"{interval}\"\n"
    )
}

#[test]
fn client_reloads_lose_nothing_pyipcd_send_queued_and_a_failed_one_keeps_the_old() {
    let s = Scenario::new();
    s.write(
        "h.py",
        "import time\nimport pyipcd\n\n\
         def feed():\n    n = 0\n    while not pyipcd.stopping():\n        n += 1\n\
        \x20       try:\n            pyipcd.send('c', f'task {n}'.encode())\n\
        \x20       except Exception as e:\n            print('send failed:', repr(e))\n\
        \x20       if n % 50 == 0:\n                time.sleep(0.001)\n\n\
         def on_reply(data):\n    time.sleep(0.0002)\n    return None\n",
    );
    let (sink, port) = Sink::start();
    let cfg = s.write("pyipcd.toml", &client_config(port, "h:on_reply", "1ms"));
    let mut d = Daemon::start(&cfg, &[]);
    d.wait_ready();
    sink.wait_beyond(20);
    // Replies are handled (slowly) between sends, so the outbox is full when
    // a reload comes. Three replacements (each takes over the outbox), then
    // a failed one.
    for interval in ["2ms", "1ms", "3ms"] {
        let before = sink.numbers().len();
        d.reload(
            &cfg,
            &client_config(port, "h:on_reply", interval),
            &["replaced [\"c\"]"],
            T,
        );
        sink.wait_beyond(before + 200);
    }
    std::fs::write(&cfg, client_config(port, "h:missing", "1ms")).unwrap();
    d.signal("HUP");
    d.lines.wait_for(
        &[
            "reload failed; the previous instance keeps serving",
            "h:missing",
        ],
        T,
    );
    let before = sink.numbers().len();
    sink.wait_beyond(before + 20);
    d.signal("TERM");
    assert_eq!(d.wait_exit(T).code(), Some(0));
    let got = sink.numbers();
    // In order and without a gap, across three hand-overs (the last ones
    // may be dropped at shutdown, never in the middle).
    let want: Vec<u64> = (1..=got.len() as u64).collect();
    if got != want {
        let lines = sink.0.lock().unwrap().clone();
        let mut runs: Vec<(usize, String, String, usize)> = Vec::new();
        for (c, l) in lines {
            match runs.last_mut() {
                Some(r) if r.0 == c => {
                    r.2 = l;
                    r.3 += 1;
                }
                _ => runs.push((c, l.clone(), l, 1)),
            }
        }
        panic!(
            "lost or reordered messages; arrival runs (conn, first, last, n): {runs:?}\n{}",
            d.lines.text()
        );
    }
    let text = d.lines.text();
    let running = text.split("SIGTERM received").next().unwrap();
    assert!(!running.contains("send failed"), "{text}");
    assert!(
        !text.contains("unsent message(s) to the instance"),
        "the outbox was taken over, not copied: {text}"
    );
    // Each replacement connected anew: four connections.
    let conns: std::collections::BTreeSet<usize> =
        sink.0.lock().unwrap().iter().map(|(c, _)| *c).collect();
    assert_eq!(conns.len(), 4, "{conns:?}");
}

fn channel_config(handler: &str, ring: &str) -> String {
    format!(
        "[daemon]\nshutdown_grace = \"2s\"\n[python]\npaths = [\".\"]\n\
         [[shm.region]]\nname = \"ch\"\nmode = \"channel\"\npath = \"ch.shm\"\n\
         handler = \"{handler}\"\nring_size = \"{ring}\"\nmax_message = \"1KiB\"\n"
    )
}

#[test]
fn a_channel_handler_reload_is_invisible_to_its_attached_client() {
    let s = Scenario::new();
    s.write("h.py", "def upper(data):\n    return data.upper()\n");
    let cfg = s.write("pyipcd.toml", &channel_config("h:upper", "64KiB"));
    let mut d = Daemon::start(&cfg, &[]);
    d.wait_ready();
    d.lines.wait_for(&["channel ready", "role=ch"], T);
    let mut c = ShmClient::connect(&s.path("ch.shm"), T).unwrap();
    assert_eq!(c.call(b"abc").unwrap().unwrap(), b"ABC");

    // A name the running interpreter does not have: the old handler stays.
    s.write(
        "h.py",
        "def upper(data):\n    return data.upper()\n\ndef rev(data):\n    return data[::-1]\n",
    );
    std::fs::write(&cfg, channel_config("h:rev", "64KiB")).unwrap();
    d.signal("HUP");
    d.lines.wait_for(
        &[
            "reload failed; the previous instance keeps serving",
            "needs a restart",
        ],
        T,
    );
    assert_eq!(c.call(b"still").unwrap().unwrap(), b"STILL");

    // A new module: the new instance adopts the file; the same attached
    // client, calling without a pause throughout, gets the old handler's
    // replies, then the new one's, with no error, reset or re-attach.
    s.write("h2.py", "def rev(data):\n    return data[::-1]\n");
    let busy = std::thread::spawn(move || {
        let (mut old, deadline) = (0, Instant::now() + T);
        loop {
            let reply = c.call(b"abc").unwrap().unwrap();
            if reply == b"cba" {
                return (c, old);
            }
            assert_eq!(reply, b"ABC", "only the old or the new handler answers");
            assert!(Instant::now() < deadline, "the new handler never answered");
            old += 1;
        }
    });
    std::thread::sleep(Duration::from_millis(100));
    std::fs::write(&cfg, channel_config("h2:rev", "64KiB")).unwrap();
    d.signal("HUP");
    d.lines.wait_for(
        &["reloaded: started [], replaced [\"ch\"], stopped [], failed []"],
        T,
    );
    let (mut c, old_replies) = busy.join().unwrap();
    assert!(old_replies > 100, "the client was busy: {old_replies}");
    for i in 0..200u32 {
        let msg = format!("m{i}");
        let want: Vec<u8> = msg.bytes().rev().collect();
        assert_eq!(c.call(msg.as_bytes()).unwrap().unwrap(), want);
    }
    d.lines.wait_count(&["channel ready", "role=ch"], 2, T);

    // A new ring size re-initialises the file: the client is told (a new
    // generation) and a new client attaches.
    std::fs::write(&cfg, channel_config("h2:rev", "128KiB")).unwrap();
    d.signal("HUP");
    d.lines.wait_for(&["replaced [\"ch\"]", "failed []"], T);
    d.lines.wait_count(&["channel ready", "role=ch"], 3, T);
    assert!(c.call(b"old client").is_err(), "the old client must notice");
    drop(c);
    let mut c2 = ShmClient::connect(&s.path("ch.shm"), T).unwrap();
    assert_eq!(c2.call(b"xyz").unwrap().unwrap(), b"zyx");
    d.signal("TERM");
    assert_eq!(d.wait_exit(T).code(), Some(0));
}

#[test]
fn a_watch_region_whose_new_handler_fails_keeps_watching() {
    let s = Scenario::new();
    s.write(
        "h.py",
        "def seen(data):\n    print('seen', bytes(data).rstrip(b'\\0').decode())\n",
    );
    let region = |on_change: &str| {
        format!(
            "[daemon]\nshutdown_grace = \"2s\"\n[python]\npaths = [\".\"]\n\
             [[shm.region]]\nname = \"w\"\npath = \"w.shm\"\nsize = 64\ncreate = true\n\
             poll = \"20ms\"\non_change = \"{on_change}\"\n"
        )
    };
    let cfg = s.write("pyipcd.toml", &region("h:seen"));
    let mut d = Daemon::start(&cfg, &[]);
    d.wait_ready();
    // In place, as a writer of a shared region does: `fs::write` would
    // truncate the file first, and a poll in that instant would see a short
    // file (a change of its own) instead of this write.
    let write = |text: &str| {
        let mut bytes = text.as_bytes().to_vec();
        bytes.resize(64, 0);
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(s.path("w.shm"))
            .unwrap();
        std::os::unix::fs::FileExt::write_all_at(&f, &bytes, 0).unwrap();
    };
    // The poller's first snapshot is taken just after it logs this; a
    // write before that would be its baseline, not a change.
    d.lines.wait_for(&["watching every", "role=w"], T);
    std::thread::sleep(Duration::from_millis(100));
    write("one");
    d.lines.wait_for(&["seen one"], T);
    std::fs::write(&cfg, region("h:gone")).unwrap();
    d.signal("HUP");
    d.lines.wait_for(
        &[
            "reload failed; the previous instance keeps serving",
            "h:gone",
        ],
        T,
    );
    write("two");
    d.lines.wait_for(&["seen two"], T);
    d.signal("TERM");
    assert_eq!(d.wait_exit(T).code(), Some(0));
}

/// Eight replacements of a busy client role in a row (a producer with no
/// interval, a small outbox, an echo upstream), each going on sending, with
/// every produced message arriving in order. This test reads none of the
/// daemon's notify datagrams meanwhile, like a service manager that stopped
/// reading: the sixth reload used to block the I/O thread in the notify
/// `send` once the socket's queue was full, freezing every role (it looked
/// like this client role stalling). Notices now go out on a thread of their own.
#[test]
fn a_busy_client_role_survives_many_reloads_in_a_row() {
    let s = Scenario::new();
    // The counter lives in the module (imported once), so it runs on across
    // replacements, each of which calls the producer function anew.
    s.write(
        "h.py",
        "import itertools\n_n = itertools.count(1)\n\n\
         def produce():\n    while True:\n        yield f'task {next(_n)}'.encode()\n\n\
         def ignore(data):\n    return None\n",
    );
    let (sink, port) = Sink::start();
    let config = |backoff: u32| {
        format!(
            "[daemon]\nshutdown_grace = \"2s\"\n[python]\npaths = [\".\"]\n\
             [[tcp.client]]\nname = \"c\"\nconnect = \"127.0.0.1:{port}\"\nframing = \"line\"\n\
             producer = \"h:produce\"\non_reply = \"h:ignore\"\ninterval = \"0s\"\noutbox = 16\n\
             backoff_max = \"{backoff}s\"\n"
        )
    };
    let cfg = s.write("pyipcd.toml", &config(30));
    let mut d = Daemon::start(&cfg, &[]);
    d.wait_ready();
    sink.wait_beyond(100);
    for i in 0..8 {
        let before = sink.numbers().len();
        d.reload(&cfg, &config(31 + i), &["replaced [\"c\"]"], T);
        let deadline = Instant::now() + T;
        while sink.numbers().len() <= before + 100 {
            assert!(
                Instant::now() < deadline,
                "stalled after reload {i}:\n{}",
                d.lines.text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    d.signal("TERM");
    assert_eq!(d.wait_exit(T).code(), Some(0));
    // Every produced message arrived, in order, across the replacements.
    let got = sink.numbers();
    let want: Vec<u64> = (1..=got.len() as u64).collect();
    assert_eq!(got, want, "produced messages lost or reordered");
}
