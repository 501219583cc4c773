//! Start-up and shutdown through the real binary: readiness, SIGTERM/SIGINT
//! exit codes and timing, forced SystemExit, abandoned tasks, a second signal.

mod common;

use std::time::{Duration, Instant};

use common::{Daemon, Scenario};

const T: Duration = Duration::from_secs(15);

fn scenario(task_body: &str, grace: &str) -> (Scenario, std::path::PathBuf) {
    let s = Scenario::new();
    s.write("job.py", task_body);
    let cfg = s.write(
        "pyipcd.toml",
        &format!(
            "[daemon]\nshutdown_grace = \"{grace}\"\n[python]\npaths = [\".\"]\n\
             [[python.task]]\nname = \"job\"\nrun = \"job:run\"\n"
        ),
    );
    (s, cfg)
}

#[test]
fn sigterm_stops_a_cooperative_task_promptly_with_exit_0() {
    let (_s, cfg) = scenario(
        "import pyipcd, time\ndef run():\n    print('started')\n    while not pyipcd.stopping():\n        time.sleep(0.01)\n    print('clean exit')\n",
        "10s",
    );
    let mut d = Daemon::start(&cfg, &[]);
    d.wait_ready();
    d.lines.wait_for(&["started", "role=job"], T);
    let sent = Instant::now();
    d.signal("TERM");
    let status = d.wait_exit(T);
    let took = sent.elapsed();
    assert_eq!(status.code(), Some(0), "{}", d.lines.text());
    // Well inside the 10 s grace: the task noticed pyipcd.stopping().
    assert!(took < Duration::from_secs(5), "took {took:?}");
    d.lines.wait_for(&["SIGTERM received"], T);
    d.lines.wait_for(&["clean exit", "role=job"], T);
    d.lines.wait_for(&["stopped cleanly"], T);
}

#[test]
fn sigint_is_handled_like_sigterm() {
    let (_s, cfg) = scenario(
        "import pyipcd, time\ndef run():\n    while not pyipcd.stopping():\n        time.sleep(0.01)\n",
        "10s",
    );
    let mut d = Daemon::start(&cfg, &[]);
    d.wait_ready();
    d.signal("INT");
    assert_eq!(d.wait_exit(T).code(), Some(0), "{}", d.lines.text());
    d.lines.wait_for(&["SIGINT received"], T);
}

#[test]
fn a_task_ignoring_stop_gets_system_exit_at_the_deadline() {
    let (_s, cfg) = scenario(
        "import time\ndef run():\n    try:\n        while True:\n            time.sleep(0.01)\n    except SystemExit:\n        print('got SystemExit')\n        raise\n",
        "500ms",
    );
    let mut d = Daemon::start(&cfg, &[]);
    d.wait_ready();
    let sent = Instant::now();
    d.signal("TERM");
    let status = d.wait_exit(T);
    assert!(
        sent.elapsed() >= Duration::from_millis(500),
        "exited before the grace period"
    );
    assert_eq!(status.code(), Some(0), "{}", d.lines.text());
    d.lines.wait_for(&["raising SystemExit", "task=job"], T);
    d.lines.wait_for(&["got SystemExit", "role=job"], T);
}

#[test]
fn a_task_stuck_in_c_code_is_abandoned_with_exit_1_and_named() {
    // A blocking C call never returns to the eval loop, so SystemExit cannot land.
    let (_s, cfg) = scenario(
        "import socket\ndef run():\n    s = socket.socket()\n    s.bind(('127.0.0.1', 0))\n    s.listen(1)\n    print('accepting')\n    s.accept()\n",
        "300ms",
    );
    let mut d = Daemon::start(&cfg, &[]);
    d.wait_ready();
    d.lines.wait_for(&["accepting"], T);
    d.signal("TERM");
    let status = d.wait_exit(T);
    assert_eq!(status.code(), Some(1), "{}", d.lines.text());
    d.lines.wait_for(&["abandoning", "task job"], T);
}

#[test]
fn a_second_signal_exits_at_once() {
    let (_s, cfg) = scenario(
        "import time\ndef run():\n    while True:\n        try:\n            time.sleep(0.01)\n        except SystemExit:\n            pass\n",
        "60s",
    );
    let mut d = Daemon::start(&cfg, &[]);
    d.wait_ready();
    d.signal("TERM");
    d.lines.wait_for(&["SIGTERM received"], T);
    let sent = Instant::now();
    d.signal("TERM");
    let status = d.wait_exit(T);
    assert!(sent.elapsed() < Duration::from_secs(10));
    assert_eq!(status.code(), Some(128 + 15), "{}", d.lines.text());
    d.lines.wait_for(&["received again"], T);
}

#[test]
fn json_log_format_emits_one_object_per_line() {
    let (s, _) = scenario("def run():\n    print('json please')\n", "1s");
    let cfg = s.write(
        "json.toml",
        "[log]\nformat = \"json\"\n[python]\npaths = [\".\"]\n[[python.task]]\nname = \"job\"\nrun = \"job:run\"\n",
    );
    let mut d = Daemon::start(&cfg, &[]);
    d.wait_ready();
    let line = d.lines.wait_for(&["json please"], T);
    assert!(
        line.starts_with('{') && line.contains("\"role\":\"job\""),
        "{line}"
    );
    d.signal("TERM");
    assert_eq!(d.wait_exit(T).code(), Some(0));
}

#[test]
fn watchdog_pings_only_while_the_gil_pool_answers() {
    let s = Scenario::new();
    s.write(
        "h.py",
        "import time\n\ndef block(data):\n    time.sleep(1.5)\n    return data\n",
    );
    let cfg = s.write(
        "pyipcd.toml",
        "[python]\npaths = [\".\"]\nworkers = 1\n[[tcp.server]]\nname = \"srv\"\nlisten = \"127.0.0.1:0\"\n\
         framing = \"line\"\nhandler = \"h:block\"\n",
    );
    // systemd's contract: WATCHDOG_USEC (200 ms) for this process.
    let mut d = Daemon::start(&cfg, &[("WATCHDOG_USEC", "200000")]);
    d.wait_ready();
    let healthy = d.notify_lines(Duration::from_millis(600));
    let pings = healthy.iter().filter(|(_, l)| l == "WATCHDOG=1").count();
    assert!(pings >= 3, "too few pings while healthy: {healthy:?}");
    // Wedge the only pool thread for 1.5 s with a request.
    let port = d.listening_port("srv");
    let mut conn = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    std::io::Write::write_all(&mut conn, b"wedge\n").unwrap();
    let wedged_at = Instant::now();
    let during = d.notify_lines(Duration::from_millis(1000));
    let early: Vec<_> = during
        .iter()
        .filter(|(at, l)| {
            l == "WATCHDOG=1" && at.duration_since(wedged_at) > Duration::from_millis(300)
        })
        .collect();
    assert!(
        early.is_empty(),
        "pinged while the pool was wedged: {during:?}"
    );
    d.lines.wait_for(&["did not answer the watchdog probe"], T);
    // The handler returns; pings resume.
    let after = d.notify_lines(Duration::from_millis(1200));
    assert!(
        after.iter().any(|(_, l)| l == "WATCHDOG=1"),
        "pings never resumed: {after:?}"
    );
    d.signal("TERM");
    assert_eq!(d.wait_exit(T).code(), Some(0));
}

#[test]
fn journald_without_a_journal_falls_back_to_text_with_a_warning() {
    let (s, _) = scenario("def run():\n    print('still logged')\n", "1s");
    for (format, env) in [
        ("journald", vec![]),
        ("auto", vec![("JOURNAL_STREAM", "1:1")]),
    ] {
        let cfg = s.write(
            "fmt.toml",
            &format!(
                "[log]\nformat = \"{format}\"\n[python]\npaths = [\".\"]\n[[python.task]]\nname = \"job\"\nrun = \"job:run\"\n"
            ),
        );
        let mut d = Daemon::start(&cfg, &env);
        d.wait_ready();
        let line = d.lines.wait_for(&["still logged", "role=job"], T);
        assert!(
            !line.starts_with('{'),
            "{format}: expected text, got {line}"
        );
        if format == "journald" {
            d.lines.wait_for(&["journal is not reachable"], T);
        } else {
            assert_eq!(
                d.lines.count(&["journal is not reachable"]),
                0,
                "auto chose journald"
            );
        }
        d.signal("TERM");
        assert_eq!(d.wait_exit(T).code(), Some(0));
    }
}

/// A line server `slow` whose handler sleeps `sleep` seconds, `workers = 2`.
fn slow_server(sleep: f64, grace: &str) -> (Scenario, std::path::PathBuf) {
    let s = Scenario::new();
    s.write(
        "h.py",
        &format!("import time\n\ndef wedged(data):\n    time.sleep({sleep})\n    return data\n"),
    );
    let cfg = s.write(
        "pyipcd.toml",
        &format!(
            "[daemon]\nshutdown_grace = \"{grace}\"\n[python]\npaths = [\".\"]\nworkers = 2\ncall_timeout = \"60s\"\n\
             [[tcp.server]]\nname = \"slow\"\nlisten = \"127.0.0.1:0\"\nframing = \"line\"\nhandler = \"h:wedged\"\n"
        ),
    );
    (s, cfg)
}

/// Sends one line to `slow` and returns the reader for its reply.
fn send_slow(d: &Daemon) -> std::io::BufReader<std::net::TcpStream> {
    use std::io::Write;
    let mut c = std::net::TcpStream::connect(("127.0.0.1", d.listening_port("slow"))).unwrap();
    c.set_read_timeout(Some(T)).unwrap();
    writeln!(c, "hello").unwrap();
    std::io::BufReader::new(c)
}

#[test]
fn sigterm_waits_for_a_slow_call_that_ends_within_the_grace_and_exits_0() {
    use std::io::BufRead;
    let (_s, cfg) = slow_server(1.5, "10s");
    let mut d = Daemon::start(&cfg, &[]);
    d.wait_ready();
    let mut reply = send_slow(&d);
    std::thread::sleep(Duration::from_millis(300));
    d.signal("TERM");
    let mut l = String::new();
    reply.read_line(&mut l).unwrap();
    assert_eq!(l, "hello\n", "the in-flight call was answered");
    assert_eq!(d.wait_exit(T).code(), Some(0), "{}", d.lines.text());
    d.lines.wait_for(&["stopped cleanly"], T);
    assert_eq!(d.lines.count(&["abandon"]), 0, "{}", d.lines.text());
}

#[test]
fn sigterm_past_the_grace_names_only_the_thread_in_a_call_with_its_role_and_stack() {
    let (_s, cfg) = slow_server(60.0, "1s");
    let mut d = Daemon::start(&cfg, &[]);
    d.wait_ready();
    let _reply = send_slow(&d);
    std::thread::sleep(Duration::from_millis(300));
    let sent = Instant::now();
    d.signal("TERM");
    assert_eq!(d.wait_exit(T).code(), Some(1), "{}", d.lines.text());
    assert!(
        sent.elapsed() < Duration::from_secs(6),
        "{:?}",
        sent.elapsed()
    );
    // One thread is in a call; the idle one exited and is not reported.
    let line = d.lines.wait_for(&["stopped, abandoning"], T);
    assert!(
        line.contains("abandoning: GIL pool thread py-pool-")
            && line.contains("(in a call of role slow)"),
        "{line}"
    );
    assert_eq!(line.matches("GIL pool thread").count(), 1, "{line}");
    let text = d.lines.text();
    assert!(text.contains("still in a call of role slow"), "{text}");
    assert!(text.contains("in wedged"), "no stack:\n{text}");
}

/// `se.slice` (ns) of every thread of process `pid`, from `/proc/PID/task/*/sched`.
fn thread_slices(pid: u32) -> Vec<(String, u64)> {
    let mut slices = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let dir = task.unwrap().path();
        let name = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        let sched = std::fs::read_to_string(dir.join("sched")).unwrap_or_default();
        if let Some(ns) = sched
            .lines()
            .find(|l| l.starts_with("se.slice"))
            .and_then(|l| l.rsplit(':').next()?.trim().parse().ok())
        {
            slices.push((name.trim().to_string(), ns));
        }
    }
    slices
}

#[test]
fn every_thread_runs_with_the_configured_time_slice() {
    if !std::fs::read_to_string("/proc/self/sched").is_ok_and(|s| s.contains("se.slice")) {
        eprintln!("this kernel shows no per-thread slice: nothing to check");
        return;
    }
    let (_s, cfg) = scenario(
        "import threading, time\ndef run():\n    threading.Thread(target=time.sleep, args=(30,), daemon=True).start()\n    print('started')\n    time.sleep(30)\n",
        "1s",
    );
    for (setting, want) in [("", Some(100_000)), ("sched_slice = \"0s\"\n", None)] {
        let text = std::fs::read_to_string(&cfg).unwrap();
        let text = text.replacen("[daemon]\n", &format!("[daemon]\n{setting}"), 1);
        let cfg2 = cfg.with_file_name("slice.toml");
        std::fs::write(&cfg2, text).unwrap();
        let mut d = Daemon::start(&cfg2, &[]);
        d.wait_ready();
        d.lines.wait_for(&["started", "role=job"], T);
        let slices = thread_slices(d.child.id());
        // The I/O thread, the GIL pool, the task's thread and the thread
        // Python started: all of them.
        assert!(slices.len() >= 4, "{slices:?}");
        match want {
            Some(ns) => assert!(slices.iter().all(|(_, s)| *s == ns), "{slices:?}"),
            None => assert!(slices.iter().all(|(_, s)| *s != 100_000), "{slices:?}"),
        }
        d.signal("TERM");
        d.wait_exit(T);
    }
}
