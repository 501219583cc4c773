//! The admin endpoint through the real binary: /metrics counters move with
//! traffic, /health turns 503 while a handler wedges the pool and while a
//! client role is disconnected, and `pyipcd health` maps that to exit codes.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::{Daemon, Scenario, free_port, http_get as get, metric, run_to_end};

const T: Duration = Duration::from_secs(15);

#[test]
fn metrics_move_with_traffic_and_health_follows_the_pool() {
    let s = Scenario::new();
    s.write(
        "h.py",
        "import time\n\ndef handle(data):\n    if data == b'block':\n        time.sleep(2.5)\n    if data == b'boom':\n        raise ValueError('boom')\n    return data\n",
    );
    let admin = free_port();
    let cfg = s.config(&format!(
        "[admin]\nlisten = \"127.0.0.1:{admin}\"\n[python]\npaths = [\".\"]\nworkers = 1\n\
         [[tcp.server]]\nname = \"srv\"\nlisten = \"127.0.0.1:0\"\nframing = \"line\"\nhandler = \"h:handle\"\n"
    ));
    let mut d = Daemon::start(&cfg, &[]);
    d.wait_ready();
    d.lines.wait_for(&["admin endpoint listening"], T);
    let port = d.listening_port("srv");

    assert_eq!(get(admin, "/health").0, 200);
    let (code, out, _) = run_to_end(&["health", "-c", cfg.to_str().unwrap()], &[]);
    assert_eq!(code, 0, "{out}");

    let conn = TcpStream::connect(("127.0.0.1", port)).unwrap();
    conn.set_read_timeout(Some(T)).unwrap();
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut w = conn;
    for i in 0..5 {
        writeln!(w, "m{i}").unwrap();
        let mut l = String::new();
        reader.read_line(&mut l).unwrap();
        assert_eq!(l, format!("m{i}\n"));
    }
    writeln!(w, "boom").unwrap();
    writeln!(w, "after").unwrap();
    let mut l = String::new();
    reader.read_line(&mut l).unwrap();
    assert_eq!(l, "after\n");
    let (status, body) = get(admin, "/metrics");
    assert_eq!(status, 200);
    assert_eq!(metric(&body, "pyipcd_messages_total{role=\"srv\"}"), 7.0);
    assert_eq!(metric(&body, "pyipcd_errors_total{role=\"srv\"}"), 1.0);
    assert_eq!(
        metric(&body, "pyipcd_bytes_total{role=\"srv\",direction=\"in\"}"),
        19.0 // m0..m4 (10), boom (4), after (5); newlines are framing
    );
    assert_eq!(metric(&body, "pyipcd_connections{role=\"srv\"}"), 1.0);
    assert!(
        metric(&body, "pyipcd_handler_seconds_count{role=\"srv\"}") >= 6.0,
        "{body}"
    );
    assert!(
        body.contains("pyipcd_handler_seconds_bucket{role=\"srv\",le=\"0.001\"}"),
        "{body}"
    );
    assert_eq!(metric(&body, "pyipcd_pool_queue_depth"), 0.0);

    // Wedge the only pool thread: /health turns 503 and says why.
    writeln!(w, "block").unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let (status, body) = get(admin, "/health");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("GIL pool did not answer"), "{body}");
    let (code, _, err) = run_to_end(&["health", "-c", cfg.to_str().unwrap()], &[]);
    assert_eq!(code, 1, "{err}");
    // Once the handler returns, healthy again.
    let mut l = String::new();
    reader.read_line(&mut l).unwrap();
    assert_eq!(l, "block\n");
    assert_eq!(get(admin, "/health").0, 200);
    d.signal("TERM");
    assert_eq!(d.wait_exit(T).code(), Some(0));
}

#[test]
fn a_disconnected_client_role_makes_health_503() {
    let s = Scenario::new();
    let admin = free_port();
    let nowhere = free_port();
    let cfg = s.config(&format!(
        "[admin]\nlisten = \"127.0.0.1:{admin}\"\n[[tcp.client]]\nname = \"out\"\nconnect = \"127.0.0.1:{nowhere}\"\n\
         backoff_min = \"50ms\"\nbackoff_max = \"100ms\"\n"
    ));
    let mut d = Daemon::start(&cfg, &[]);
    d.wait_ready();
    d.lines.wait_for(&["admin endpoint listening"], T);
    let (status, body) = get(admin, "/health");
    assert_eq!(status, 503);
    assert!(body.contains("role out is down"), "{body}");
    // The server comes up: healthy.
    let listener = std::net::TcpListener::bind(("127.0.0.1", nowhere)).unwrap();
    let _conn = listener.accept().unwrap();
    let deadline = std::time::Instant::now() + T;
    loop {
        let (status, body) = get(admin, "/health");
        if status == 200 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never healthy: {body}\n{}",
            d.lines.text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    d.signal("TERM");
    assert_eq!(d.wait_exit(T).code(), Some(0));
}
