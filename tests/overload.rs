//! Overload through the real binary: a role whose handlers block holds at
//! most its `max_in_flight` pool threads, so a fast role sharing the pool
//! keeps answering and `/health` names the holder; a call whose caller gave
//! up before a thread took it never runs.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::{Daemon, Scenario, free_port, http_get, metric};

const T: Duration = Duration::from_secs(15);

fn line_client(port: u16, timeout: Duration) -> (BufReader<TcpStream>, TcpStream) {
    let conn = TcpStream::connect(("127.0.0.1", port)).unwrap();
    conn.set_read_timeout(Some(timeout)).unwrap();
    (BufReader::new(conn.try_clone().unwrap()), conn)
}

fn ask(r: &mut BufReader<TcpStream>, w: &mut TcpStream, msg: &str) -> String {
    writeln!(w, "{msg}").unwrap();
    let mut l = String::new();
    r.read_line(&mut l)
        .unwrap_or_else(|e| panic!("no reply to {msg}: {e}"));
    l
}

#[test]
fn a_blocked_role_holds_one_thread_and_a_fast_role_keeps_answering() {
    let s = Scenario::new();
    s.write(
        "h.py",
        "import time\n\ndef slow(data):\n    time.sleep(3)\n    return data\n\ndef fast(data):\n    return data\n",
    );
    let admin = free_port();
    let cfg = s.config(&format!(
        "[admin]\nlisten = \"127.0.0.1:{admin}\"\n[python]\npaths = [\".\"]\nworkers = 2\ncall_timeout = \"10s\"\n\
         [[tcp.server]]\nname = \"slow\"\nlisten = \"127.0.0.1:0\"\nframing = \"line\"\nhandler = \"h:slow\"\n\
         [[tcp.server]]\nname = \"fast\"\nlisten = \"127.0.0.1:0\"\nframing = \"line\"\nhandler = \"h:fast\"\n"
    ));
    let mut d = Daemon::start(&cfg, &[]);
    d.wait_ready();
    d.lines.wait_for(&["admin endpoint listening"], T);
    let (slow, fast) = (d.listening_port("slow"), d.listening_port("fast"));

    // Two callers block the slow role: with workers = 2 and the default
    // max_in_flight (workers - 1 = 1), one runs and one is parked.
    let blocked: Vec<_> = (0..2)
        .map(|i| {
            std::thread::spawn(move || {
                let (mut r, mut w) = line_client(slow, T);
                ask(&mut r, &mut w, &format!("block{i}"))
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    // The fast role answers at once (it would wait ~3 s behind both blocked
    // calls if the slow role could take both threads).
    let (mut r, mut w) = line_client(fast, Duration::from_secs(2));
    for i in 0..20 {
        assert_eq!(ask(&mut r, &mut w, &format!("f{i}")), format!("f{i}\n"));
    }
    // The fast role's last reply can go out a moment before its thread
    // counts itself free: ask again until it has (the slow one stays busy).
    let want =
        "\"pool\":{\"threads\":2,\"queued\":0,\"busy\":{\"slow\":1},\"parked\":{\"slow\":1}}";
    let deadline = std::time::Instant::now() + Duration::from_secs(1);
    let body = loop {
        let (status, body) = http_get(admin, "/health");
        assert_eq!(status, 200, "the probe got the free thread: {body}");
        if body.contains(want) || std::time::Instant::now() > deadline {
            break body;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(body.contains(want), "{body}");
    for (i, b) in blocked.into_iter().enumerate() {
        assert_eq!(b.join().unwrap(), format!("block{i}\n"));
    }
    d.signal("TERM");
    assert_eq!(d.wait_exit(T).code(), Some(0), "{}", d.lines.text());
}

#[test]
fn a_call_whose_caller_gave_up_before_it_started_never_runs() {
    let s = Scenario::new();
    let effects = s.path("effects.txt");
    s.write(
        "h.py",
        &format!(
            "import time\n\ndef handle(data):\n    if data == b'block':\n        time.sleep(2)\n    \
             with open({effects:?}, 'ab') as f:\n        f.write(data + b'\\n')\n    return data\n"
        ),
    );
    let admin = free_port();
    let cfg = s.config(&format!(
        "[admin]\nlisten = \"127.0.0.1:{admin}\"\n[python]\npaths = [\".\"]\nworkers = 1\ncall_timeout = \"500ms\"\n\
         [[tcp.server]]\nname = \"srv\"\nlisten = \"127.0.0.1:0\"\nframing = \"line\"\nhandler = \"h:handle\"\n"
    ));
    let mut d = Daemon::start(&cfg, &[]);
    d.wait_ready();
    d.lines.wait_for(&["admin endpoint listening"], T);
    let port = d.listening_port("srv");
    // The only thread blocks for 2 s (its caller stops waiting after 500 ms).
    let (_r1, mut w1) = line_client(port, T);
    writeln!(w1, "block").unwrap();
    std::thread::sleep(Duration::from_millis(200));
    // Queued behind it; its caller stops waiting after 500 ms too, long
    // before the thread is free.
    let (mut r2, mut w2) = line_client(port, T);
    writeln!(w2, "late").unwrap();
    d.lines.wait_count(&["did not finish within 500ms"], 2, T);
    let deadline = std::time::Instant::now() + T;
    // Once the block returns, the thread skips the late call and serves
    // the next one.
    while !std::fs::read_to_string(&effects).is_ok_and(|t| t.contains("block")) {
        assert!(std::time::Instant::now() < deadline, "{}", d.lines.text());
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(ask(&mut r2, &mut w2, "after"), "after\n");
    let written = std::fs::read_to_string(&effects).unwrap();
    assert_eq!(written, "block\nafter\n", "the late call ran for nobody");
    let (_, body) = http_get(admin, "/metrics");
    assert_eq!(metric(&body, "pyipcd_pool_skipped_total"), 1.0, "{body}");
    d.signal("TERM");
    assert_eq!(d.wait_exit(T).code(), Some(0), "{}", d.lines.text());
}
