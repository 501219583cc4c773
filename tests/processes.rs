//! `[daemon] processes = N`: a supervisor and N worker processes of the real
//! binary behind one listening socket. What runs where, restarts, the crash
//! loop, the stop, one admin endpoint for all, and the rolling reload that
//! loses no request.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::{Daemon, Scenario, free_port, http_get};

/// A handler that says which worker answered: `index:pid:version:line`.
const WHO: &str = r#"
import os
VERSION = "v1"

def who(data):
    return f"{os.environ['PYIPCD_WORKER']}:{os.getpid()}:{VERSION}:{data.decode().strip()}".encode()
"#;

/// A worker-0 task that notes each start, holds a lock while it runs and
/// takes half a second to stop: a second copy running at the same time
/// writes `twice.txt`.
const HOLDER: &str = r#"
import fcntl, os, time, pyipcd
HERE = os.path.dirname(os.path.abspath(__file__))

def beat():
    with open(os.path.join(HERE, "starts.txt"), "a") as f:
        f.write(os.environ["PYIPCD_WORKER"] + "\n")
    lock = open(os.path.join(HERE, "roles.lock"), "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        with open(os.path.join(HERE, "twice.txt"), "a") as f:
            f.write(f"{os.getpid()}\n")
        fcntl.flock(lock, fcntl.LOCK_EX)
    while not pyipcd.stopping():
        time.sleep(0.02)
    time.sleep(0.5)
    lock.close()
"#;

/// One line request, its reply.
fn ask(port: u16, line: &str) -> String {
    hold(port, line).1
}

/// Connects, asks `line`, and returns the connection, still open, with the reply.
fn hold(port: u16, line: &str) -> (TcpStream, String) {
    let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    (&s).write_all(format!("{line}\n").as_bytes()).unwrap();
    let mut reply = String::new();
    BufReader::new(&s).read_line(&mut reply).unwrap();
    (s, reply.trim_end().to_string())
}

/// The `[[tcp.server]]` "who" of these tests, answering with [`WHO`] on `port`.
fn who_server(port: u16) -> String {
    format!(
        "[[tcp.server]]\nname = \"who\"\nlisten = \"127.0.0.1:{port}\"\nframing = \"line\"\nhandler = \"h:who\"\n"
    )
}

/// Clients in a closed loop against a [`WHO`] server, each reconnecting
/// after `per_connection` requests and checking that every reply answers
/// its own request.
struct ClosedLoop {
    stop: Arc<AtomicBool>,
    asked: Arc<AtomicU64>,
    clients: Vec<std::thread::JoinHandle<BTreeSet<(String, String)>>>,
}

impl ClosedLoop {
    fn start(port: u16, clients: usize, per_connection: usize) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let asked = Arc::new(AtomicU64::new(0));
        let clients = (0..clients)
            .map(|c| {
                let (stop, asked) = (stop.clone(), asked.clone());
                std::thread::spawn(move || {
                    let (mut n, mut seen) = (0u64, BTreeSet::new());
                    while !stop.load(Ordering::Relaxed) {
                        let s = TcpStream::connect(("127.0.0.1", port)).expect("connect refused");
                        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                        let mut r = BufReader::new(s.try_clone().unwrap());
                        for _ in 0..per_connection {
                            let msg = format!("c{c}n{n}");
                            (&s).write_all(format!("{msg}\n").as_bytes()).unwrap();
                            let mut reply = String::new();
                            r.read_line(&mut reply).unwrap();
                            assert!(
                                reply.trim_end().ends_with(&format!(":{msg}")),
                                "request {msg} got {reply:?}"
                            );
                            let fields: Vec<&str> = reply.split(':').collect();
                            seen.insert((fields[1].to_string(), fields[2].to_string()));
                            n += 1;
                            asked.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    seen
                })
            })
            .collect();
        Self {
            stop,
            asked,
            clients,
        }
    }

    /// Stops the clients; returns the requests answered and every (pid,
    /// version) that answered. Panics if a client lost a request.
    fn stop(self) -> (u64, BTreeSet<(String, String)>) {
        self.stop.store(true, Ordering::Relaxed);
        let mut seen = BTreeSet::new();
        for c in self.clients {
            seen.extend(c.join().expect("a client lost a request"));
        }
        (self.asked.load(Ordering::Relaxed), seen)
    }
}

/// The pid a log line like "worker 1 started (pid 123)" names.
fn started_pid(d: &Daemon, index: usize, nth: usize) -> u32 {
    let needle = format!("worker {index} started (pid ");
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let found: Vec<u32> = d
            .lines
            .all()
            .iter()
            .filter_map(|l| l.split(&needle).nth(1))
            .filter_map(|r| r.split(')').next()?.parse().ok())
            .collect();
        if let Some(pid) = found.get(nth) {
            return *pid;
        }
        assert!(
            Instant::now() < deadline,
            "no {needle}; log:\n{}",
            d.lines.text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn kill9(pid: u32) {
    let killed = std::process::Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .unwrap()
        .success();
    assert!(killed, "kill -KILL {pid}");
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        !s.rsplit_once(')')
            .is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
    })
}

/// Names of the threads of process `pid`.
fn thread_names(pid: u32) -> Vec<String> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .map(|n| n.trim().to_string())
        .collect()
}

#[test]
fn two_workers_share_one_port_behind_one_admin_endpoint() {
    let sc = Scenario::new();
    sc.write("h.py", WHO);
    let (port, admin) = (free_port(), free_port());
    let cfg = sc.config(&format!(
        r#"processes = 2
[python]
paths = ["."]
workers = 1
[admin]
listen = "127.0.0.1:{admin}"
{}"#,
        who_server(port)
    ));
    let mut d = Daemon::start(&cfg, &[]);
    d.wait_ready();
    // READY=1 came after both workers said they were ready. (The log is
    // read by a thread of its own: READY=1 may arrive before its lines.)
    d.lines.wait_for(
        &["supervising 2 worker process(es)"],
        Duration::from_secs(10),
    );
    let log = d.lines.text();
    let ready_at = log.find("supervising 2 worker process(es)").unwrap();
    for i in 0..2 {
        let at = log
            .find(&format!("worker {i} ready"))
            .expect("worker ready line");
        assert!(at < ready_at, "{log}");
    }
    // Each worker's log lines say which worker wrote them; the supervisor's do not.
    // (The log is read by a thread of its own: wait for the lines.)
    for i in 0..2 {
        let tag = format!("[worker {i}] ");
        let line = d
            .lines
            .wait_for(&[&tag, "listening"], Duration::from_secs(10));
        assert!(line.starts_with(&tag), "{line}");
    }
    let lines = d.lines.all();
    let supervising = lines
        .iter()
        .find(|l| l.contains("supervising 2 worker"))
        .unwrap();
    assert!(!supervising.starts_with("[worker"), "{supervising}");
    // The supervisor runs no interpreter: none of the daemon's threads.
    let threads = thread_names(d.child.id());
    assert!(
        threads
            .iter()
            .all(|t| !t.starts_with("py-") && t != "pyipcd-io"),
        "{threads:?}"
    );
    // 200 connections, one request each, 20 at a time: both workers answer.
    let mut by_worker: BTreeMap<String, usize> = BTreeMap::new();
    for round in 0..10 {
        let replies: Vec<String> = (0..20)
            .map(|i| std::thread::spawn(move || ask(port, &format!("r{round}c{i}"))))
            .collect::<Vec<_>>()
            .into_iter()
            .map(|h| h.join().unwrap())
            .collect();
        for (i, r) in replies.iter().enumerate() {
            let parts: Vec<&str> = r.split(':').collect();
            assert_eq!(parts.len(), 4, "{r}");
            assert_eq!(parts[3], format!("r{round}c{i}"));
            *by_worker
                .entry(format!("{}:{}", parts[0], parts[1]))
                .or_default() += 1;
        }
    }
    assert_eq!(by_worker.len(), 2, "both workers served: {by_worker:?}");
    eprintln!("connections per worker: {by_worker:?}");
    // 40 connections held open, made in a burst: the workers share them
    // (each steps back while it holds more than the other plus one).
    let held: Vec<TcpStream> = (0..40)
        .map(|_| TcpStream::connect(("127.0.0.1", port)).unwrap())
        .collect();
    let mut per_pid: BTreeMap<String, usize> = BTreeMap::new();
    for (i, s) in held.iter().enumerate() {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        (&*s).write_all(format!("h{i}\n").as_bytes()).unwrap();
        let mut reply = String::new();
        BufReader::new(s).read_line(&mut reply).unwrap();
        *per_pid
            .entry(reply.split(':').nth(1).unwrap().to_string())
            .or_default() += 1;
    }
    let counts: Vec<usize> = per_pid.values().copied().collect();
    assert!(
        counts.len() == 2 && counts.iter().max().unwrap() - counts.iter().min().unwrap() <= 6,
        "40 held connections per worker: {per_pid:?}"
    );
    eprintln!("held connections per worker: {per_pid:?}");
    drop(held);
    // One /health and one /metrics for both, with a worker label.
    let (status, health) = http_get(admin, "/health");
    assert_eq!(status, 200, "{health}");
    assert!(
        health.contains(r#""0":{"health":{"#) && health.contains(r#""1":{"health":{"#),
        "{health}"
    );
    let (status, metrics) = http_get(admin, "/metrics");
    assert_eq!(status, 200);
    let served: f64 = (0..2)
        .map(|w| {
            common::metric(
                &metrics,
                &format!("pyipcd_messages_total{{worker=\"{w}\",role=\"who\"}}"),
            )
        })
        .sum();
    assert_eq!(served, 240.0, "{metrics}");
    assert_eq!(common::metric(&metrics, "pyipcd_workers "), 2.0);
    assert_eq!(
        metrics
            .matches("# TYPE pyipcd_messages_total counter")
            .count(),
        1,
        "one group per family:\n{metrics}"
    );
    d.signal("TERM");
    assert!(
        d.wait_exit(Duration::from_secs(15)).success(),
        "{}",
        d.lines.text()
    );
}

#[test]
fn json_log_lines_stay_json_and_name_their_worker() {
    let sc = Scenario::new();
    sc.write(
        "h.py",
        "import os\ndef who(data):\n    print('asked', data.decode().strip())\n    return (os.environ['PYIPCD_WORKER'] + ':' + data.decode().strip()).encode()\n",
    );
    let port = free_port();
    let cfg = sc.config(&format!(
        r#"processes = 2
[log]
format = "json"
[python]
paths = ["."]
workers = 1
{}"#,
        who_server(port)
    ));
    let mut d = Daemon::start(&cfg, &[]);
    d.wait_ready();
    // Python's own output goes through the same log (a print in a handler).
    assert!(ask(port, "hello").ends_with(":hello"));
    d.signal("TERM");
    assert!(d.wait_exit(Duration::from_secs(20)).success());
    let (mut workers, mut printed) = (BTreeSet::new(), None);
    for line in d.lines.all() {
        let v: serde_json::Value =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(v.get("fields").is_some(), "{line}");
        if let Some(w) = v.get("worker") {
            workers.insert(w.as_u64().expect("a number"));
        }
        if line.contains("asked hello") {
            printed = v.get("worker").cloned();
        }
    }
    assert_eq!(workers, BTreeSet::from([0, 1]), "{}", d.lines.text());
    assert!(
        printed.is_some(),
        "the print has no worker: {}",
        d.lines.text()
    );
}

#[test]
fn worker_0_roles_run_once_unless_placed_in_every_worker() {
    let sc = Scenario::new();
    sc.write(
        "t.py",
        r#"
import os, time, pyipcd

HERE = os.path.dirname(os.path.abspath(__file__))

def mark(name):
    with open(os.path.join(HERE, name), "a") as f:
        f.write(os.environ["PYIPCD_WORKER"] + "\n")

def once():
    mark("once.txt")
    while not pyipcd.stopping():
        time.sleep(0.05)

def each():
    mark("each.txt")
    while not pyipcd.stopping():
        time.sleep(0.05)

def relay(data):
    try:
        pyipcd.send("out", data)
        return b"sent by " + os.environ["PYIPCD_WORKER"].encode()
    except KeyError as e:
        return (os.environ["PYIPCD_WORKER"] + " " + str(e)).encode()

def seen(reply):
    pass
"#,
    );
    let (port, sink) = (free_port(), free_port());
    let sink_listener = std::net::TcpListener::bind(("127.0.0.1", sink)).unwrap();
    let cfg = sc.config(&format!(
        r#"processes = 2
[python]
paths = ["."]
workers = 1
[[python.task]]
name = "once"
run = "t:once"
[[python.task]]
name = "each"
run = "t:each"
processes = "all"
[[tcp.client]]
name = "out"
connect = "127.0.0.1:{sink}"
framing = "line"
on_reply = "t:seen"
[[shm.region]]
name = "mine"
path = "region-{{worker}}.bin"
size = "4KiB"
create = true
processes = "all"
[[tcp.server]]
name = "relay"
listen = "127.0.0.1:{port}"
framing = "line"
handler = "t:relay"
"#
    ));
    let mut d = Daemon::start(&cfg, &[]);
    d.wait_ready();
    std::thread::sleep(Duration::from_millis(500));
    let read = |f: &str| {
        let mut v: Vec<String> = std::fs::read_to_string(sc.path(f))
            .unwrap_or_default()
            .lines()
            .map(String::from)
            .collect();
        v.sort();
        v
    };
    assert_eq!(read("once.txt"), ["0"], "a task runs in worker 0 only");
    assert_eq!(read("each.txt"), ["0", "1"], "processes = \"all\": in both");
    assert!(sc.path("region-0.bin").exists() && sc.path("region-1.bin").exists());
    // The client role lives in worker 0: a send from worker 1 says so.
    let mut answers = BTreeSet::new();
    for i in 0..200 {
        answers.insert(ask(port, &format!("m{i}")));
        if answers.len() == 2 {
            break;
        }
    }
    let from_1 = answers
        .iter()
        .find(|a| a.starts_with("1 "))
        .expect("worker 1 answered");
    assert!(
        from_1.contains("runs in worker 0, and this is worker 1"),
        "{answers:?}"
    );
    assert!(answers.contains("sent by 0"), "{answers:?}");
    // ... and what worker 0 sent arrived.
    let (upstream, _) = sink_listener.accept().unwrap();
    upstream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut line = String::new();
    BufReader::new(upstream).read_line(&mut line).unwrap();
    assert!(line.starts_with('m'), "{line}");
    d.signal("TERM");
    assert!(
        d.wait_exit(Duration::from_secs(15)).success(),
        "{}",
        d.lines.text()
    );
}

#[test]
fn a_dead_worker_is_started_again_and_a_crash_loop_stops_the_daemon() {
    let sc = Scenario::new();
    sc.write("h.py", WHO);
    sc.write(
        "crash.py",
        r#"
import os, time
def maybe_die():
    # Worker 1 dies at once while the file `die` exists.
    here = os.path.dirname(os.path.abspath(__file__))
    if os.environ["PYIPCD_WORKER"] == "1" and os.path.exists(os.path.join(here, "die")):
        os._exit(3)
    while True:
        time.sleep(1)
"#,
    );
    let port = free_port();
    let cfg = sc.config(&format!(
        r#"processes = 2
[python]
paths = ["."]
workers = 1
[[python.task]]
name = "maybe"
run = "crash:maybe_die"
processes = "all"
{}"#,
        who_server(port)
    ));
    let mut d = Daemon::start(&cfg, &[]);
    d.wait_ready();
    // SIGKILL worker 1: it is started again, on the config the supervisor
    // loaded (the file is no longer even TOML), and serves.
    std::fs::write(&cfg, "this is not the config any more").unwrap();
    let first = started_pid(&d, 1, 0);
    kill9(first);
    d.lines.wait_for(
        &[&format!("worker 1 (pid {first}) exited: signal: 9")],
        Duration::from_secs(10),
    );
    let second = started_pid(&d, 1, 1);
    assert_ne!(first, second);
    d.lines.wait_for(
        &["worker 1 ready", &format!("pid={second}")],
        Duration::from_secs(15),
    );
    let mut pids = BTreeSet::new();
    for i in 0..200 {
        pids.insert(
            ask(port, &format!("{i}"))
                .split(':')
                .nth(1)
                .unwrap()
                .to_string(),
        );
        if pids.contains(&second.to_string()) {
            break;
        }
    }
    assert!(
        pids.contains(&second.to_string()),
        "the new worker 1 serves: {pids:?}"
    );
    // Now worker 1 dies on every start: a crash loop ends the daemon (1).
    sc.write("die", "");
    kill9(second);
    let status = d.wait_exit(Duration::from_secs(30));
    assert_eq!(status.code(), Some(1), "{}", d.lines.text());
    let log = d.lines.text();
    assert!(
        log.contains("crash loop: worker 1 exited 5 times in a row"),
        "{log}"
    );
    assert!(
        log.contains("starting it again in 800ms"),
        "backoff doubles: {log}"
    );
    // No worker outlives the supervisor.
    let worker_0 = started_pid(&d, 0, 0);
    std::thread::sleep(Duration::from_millis(200));
    assert!(!alive(worker_0), "worker 0 still running");
}

/// Connects, asks `line`, and returns the open connection with the index
/// of the worker that answered.
fn held_by(port: u16, line: &str) -> (TcpStream, String) {
    let (s, reply) = hold(port, line);
    let worker = reply.split(':').next().unwrap().to_string();
    (s, worker)
}

#[test]
fn a_restarted_worker_counts_its_connections_from_zero() {
    let sc = Scenario::new();
    sc.write("h.py", WHO);
    let port = free_port();
    let cfg = sc.config(&format!(
        r#"processes = 2
[python]
paths = ["."]
workers = 1
{}"#,
        who_server(port)
    ));
    let mut d = Daemon::start(&cfg, &[]);
    d.wait_ready();
    // 20 connections, one after another: the balancing splits them. Worker
    // 0's are closed, so worker 1 holds about ten and worker 0 none.
    let (on_0, held): (Vec<_>, Vec<_>) = (0..20)
        .map(|i| held_by(port, &format!("a{i}")))
        .partition(|(_, w)| w == "0");
    let on_1 = held.len();
    assert!((5..=15).contains(&on_1), "worker 1 holds {on_1} of 20");
    drop(on_0);
    // Worker 1 dies with its connections. The one started in its place
    // must not inherit their count: it would step back from the next
    // connections until worker 0 had caught up with ten it does not hold.
    let first = started_pid(&d, 1, 0);
    kill9(first);
    let second = started_pid(&d, 1, 1);
    d.lines.wait_for(
        &["worker 1 ready", &format!("pid={second}")],
        Duration::from_secs(15),
    );
    // Both start from zero: the next ten are shared (about five each;
    // with the dead worker's count, worker 1 took none to two of them).
    let fresh: Vec<_> = (0..10).map(|i| held_by(port, &format!("b{i}"))).collect();
    let to_1 = fresh.iter().filter(|(_, w)| w == "1").count();
    assert!(
        to_1 >= 3,
        "the new worker 1 took {to_1} of 10 new connections (it lost {on_1} when the old one died)"
    );
    drop((held, fresh));
    d.signal("TERM");
    assert!(d.wait_exit(Duration::from_secs(20)).success());
}

#[test]
fn a_configuration_the_workers_cannot_run_exits_78() {
    let sc = Scenario::new();
    let port = free_port();
    let cfg = sc.config(&format!(
        r#"processes = 2
[python]
paths = ["."]
[[tcp.server]]
name = "bad"
listen = "127.0.0.1:{port}"
framing = "line"
handler = "no_such_module:f"
"#
    ));
    let (code, _, err) = common::run_to_end(&["run", "-c", cfg.to_str().unwrap()], &[]);
    assert_eq!(code, 78, "{err}");
    assert!(
        err.contains("no_such_module") && err.contains("exited with status 78"),
        "{err}"
    );
}

#[test]
fn sigterm_drains_every_worker_and_a_second_one_kills_them() {
    let sc = Scenario::new();
    sc.write(
        "slow.py",
        "import time\ndef slow(data):\n    time.sleep(float(data))\n    return b'done ' + data.strip()\n",
    );
    let port = free_port();
    let cfg = sc.config(&format!(
        r#"processes = 2
[python]
paths = ["."]
workers = 1
[[tcp.server]]
name = "slow"
listen = "127.0.0.1:{port}"
framing = "line"
handler = "slow:slow"
"#
    ));
    // A 1.5 s call in flight at SIGTERM is answered; every worker stops; exit 0.
    let mut d = Daemon::start(&cfg, &[]);
    d.wait_ready();
    let call = std::thread::spawn(move || ask(port, "1.5"));
    std::thread::sleep(Duration::from_millis(400));
    d.signal("TERM");
    assert_eq!(call.join().unwrap(), "done 1.5");
    assert!(
        d.wait_exit(Duration::from_secs(15)).success(),
        "{}",
        d.lines.text()
    );
    assert_eq!(
        d.lines.count(&["worker", "stopped worker="]),
        2,
        "{}",
        d.lines.text()
    );

    // A 60 s call: a second SIGTERM kills the workers at once; exit 1.
    let mut d = Daemon::start(&cfg, &[]);
    d.wait_ready();
    let pids = [started_pid(&d, 0, 0), started_pid(&d, 1, 0)];
    let _call = std::thread::spawn(move || {
        let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        (&s).write_all(b"60\n").unwrap();
        std::thread::sleep(Duration::from_secs(60));
    });
    std::thread::sleep(Duration::from_millis(400));
    d.signal("TERM");
    std::thread::sleep(Duration::from_millis(300));
    let t = Instant::now();
    d.signal("TERM");
    let status = d.wait_exit(Duration::from_secs(10));
    assert_eq!(status.code(), Some(1), "{}", d.lines.text());
    assert!(t.elapsed() < Duration::from_secs(3));
    assert!(
        d.lines
            .text()
            .contains("SIGTERM received again: killing the workers")
    );
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        pids.iter().all(|p| !alive(*p)),
        "a worker outlived the supervisor"
    );
}

#[test]
fn rolling_reloads_lose_no_request_and_new_connections_get_the_new_code() {
    let sc = Scenario::new();
    sc.write("h.py", WHO);
    sc.write("t.py", HOLDER);
    let port = free_port();
    let text = format!(
        r#"processes = 2
reload_drain = "5s"
[python]
paths = ["."]
workers = 1
[[python.task]]
name = "beat"
run = "t:beat"
{}"#,
        who_server(port)
    );
    let cfg = sc.config(&text);
    let text = std::fs::read_to_string(&cfg).unwrap();
    // As the shipped unit does: a .pyc keyed by the source's mtime (whole
    // seconds) and size would hide a same-size edit made within a second.
    let mut d = Daemon::start(&cfg, &[("PYTHONDONTWRITEBYTECODE", "1")]);
    d.wait_ready();
    // Eight clients in a closed loop, each reconnecting after 25 requests.
    let clients = ClosedLoop::start(port, 8, 25);
    for version in ["v2", "v3", "v4"] {
        std::thread::sleep(Duration::from_millis(700));
        sc.write("h.py", &WHO.replace("\"v1\"", &format!("\"{version}\"")));
        d.reload(
            &cfg,
            &text,
            &["reloaded: supervising 2 worker"],
            Duration::from_secs(30),
        );
    }
    // New connections get the new code at once.
    assert!(ask(port, "x").contains(":v4:x"));
    std::thread::sleep(Duration::from_millis(700));
    let (asked, answered) = clients.stop();
    let seen: BTreeSet<String> = answered.into_iter().map(|(_, version)| version).collect();
    assert_eq!(
        seen,
        ["v1", "v2", "v3", "v4"].map(String::from).into(),
        "{seen:?}"
    );
    eprintln!("{asked} requests answered across three rolling reloads");
    // Every previous worker has left; the worker-0 task ran once per generation.
    d.lines
        .wait_for(&["previous worker 1", "exited"], Duration::from_secs(15));
    d.lines
        .wait_count(&["previous worker", "exited"], 6, Duration::from_secs(15));
    let starts = std::fs::read_to_string(sc.path("starts.txt")).unwrap();
    assert_eq!(
        starts, "0\n0\n0\n0\n",
        "the worker-0 task, once per generation"
    );
    assert!(
        !sc.path("twice.txt").exists(),
        "the worker-0 task ran twice at once"
    );
    assert_eq!(d.lines.count(&["killing it"]), 0);
    d.signal("TERM");
    assert!(
        d.wait_exit(Duration::from_secs(15)).success(),
        "{}",
        d.lines.text()
    );
}

#[test]
fn workers_are_recycled_by_requests_age_and_memory_without_losing_a_request() {
    for (reason, limits, log_line) in [
        ("max_requests", "max_requests = 3000", "): max_requests"),
        ("lifetime", "lifetime = \"2s\"", "): lifetime"),
        (
            "max_rss",
            "max_rss = \"1MiB\"\nmax_rss_samples = 2",
            "over max_rss for 2 samples in a row",
        ),
    ] {
        recycled_without_loss(reason, limits, log_line);
    }
}

/// Closed-loop clients while workers are replaced for `reason` (set by
/// `limits`) at least twice: every request answered, replacements served.
fn recycled_without_loss(reason: &str, limits: &str, log_line: &str) {
    let sc = Scenario::new();
    sc.write("h.py", WHO);
    sc.write("t.py", HOLDER);
    let (port, admin) = (free_port(), free_port());
    let cfg = sc.config(&format!(
        r#"processes = 2
reload_drain = "5s"
recycle_jitter = 0.0
{limits}
[python]
paths = ["."]
workers = 1
[[python.task]]
name = "beat"
run = "t:beat"
[admin]
listen = "127.0.0.1:{admin}"
{}"#,
        who_server(port)
    ));
    let mut d = Daemon::start(&cfg, &[]);
    d.wait_ready();
    let clients = ClosedLoop::start(port, 4, 10);
    let deadline = Instant::now() + Duration::from_secs(30);
    let series = format!("pyipcd_worker_respawns_total{{reason=\"{reason}\"}}");
    loop {
        let (_, body) = http_get(admin, "/metrics");
        if common::metric(&body, &series) >= 2.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{reason}: {body}\n{}",
            d.lines.text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // The replacements serve a while before the clients stop.
    std::thread::sleep(Duration::from_secs(1));
    let (_, answered) = clients.stop();
    let pids: BTreeSet<String> = answered.into_iter().map(|(pid, _)| pid).collect();
    assert!(pids.len() > 2, "{reason}: replacements served: {pids:?}");
    let log = d.lines.text();
    assert!(
        log.contains(log_line),
        "{reason}: no `{log_line}` in:\n{log}"
    );
    assert_eq!(d.lines.count(&["exited before it was ready"]), 0, "{log}");
    assert!(
        !sc.path("twice.txt").exists(),
        "{reason}: the worker-0 task ran twice at once"
    );
    let starts = std::fs::read_to_string(sc.path("starts.txt")).unwrap();
    assert!(starts.lines().all(|l| l == "0"), "{starts}");
    let (status, health) = http_get(admin, "/health");
    assert_eq!(status, 200, "{reason}: {health}");
    d.signal("TERM");
    assert!(
        d.wait_exit(Duration::from_secs(20)).success(),
        "{}",
        d.lines.text()
    );
}
