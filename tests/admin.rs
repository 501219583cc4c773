//! The admin endpoint through the real binary: /metrics counters move with
//! traffic, /health turns 503 while a handler wedges the pool and while a
//! client role is disconnected, and `pyipcd health` maps that to exit codes.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::{Daemon, Scenario, free_port, http_get as get, metric, run_to_end};

const T: Duration = Duration::from_secs(15);

/// A daemon with an admin endpoint and one line-framed TCP server, `srv`,
/// calling `h:handle` from `handler_py` on one pool worker; ready, admin
/// listening. Returns the daemon, the admin port and the config file.
fn line_server_with_admin(s: &Scenario, handler_py: &str) -> (Daemon, u16, std::path::PathBuf) {
    s.write("h.py", handler_py);
    let admin = free_port();
    let cfg = s.config(&format!(
        "[admin]\nlisten = \"127.0.0.1:{admin}\"\n[python]\npaths = [\".\"]\nworkers = 1\n\
         [[tcp.server]]\nname = \"srv\"\nlisten = \"127.0.0.1:0\"\nframing = \"line\"\nhandler = \"h:handle\"\n"
    ));
    let mut d = Daemon::start(&cfg, &[]);
    d.wait_ready();
    d.lines.wait_for(&["admin endpoint listening"], T);
    (d, admin, cfg)
}

#[test]
fn metrics_move_with_traffic_and_health_follows_the_pool() {
    let s = Scenario::new();
    let (mut d, admin, cfg) = line_server_with_admin(
        &s,
        "import time\n\ndef handle(data):\n    if data == b'block':\n        time.sleep(2.5)\n    if data == b'boom':\n        raise ValueError('boom')\n    return data\n",
    );
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

/// CPUs online on this host (`/sys/devices/system/cpu/online`, e.g. `0-1,3`).
fn online_cpus() -> usize {
    let list = std::fs::read_to_string("/sys/devices/system/cpu/online").unwrap_or_default();
    list.trim()
        .split(',')
        .filter_map(|r| match r.split_once('-') {
            Some((a, b)) => Some(b.parse::<usize>().ok()? + 1 - a.parse::<usize>().ok()?),
            None => r.parse::<usize>().ok().map(|_| 1),
        })
        .sum()
}

#[test]
fn the_spin_gate_sees_how_busy_the_io_thread_is() {
    // The gate samples only where the pool may spin (pool and I/O threads no
    // more than the cores) and the host's runnable count means something
    // (this process may use every CPU).
    let cores = std::thread::available_parallelism().unwrap().get();
    if cores < 2 || cores != online_cpus() {
        eprintln!(
            "skipped: {cores} usable of {} CPUs, the gate never samples",
            online_cpus()
        );
        return;
    }
    let s = Scenario::new();
    let (mut d, admin, _) = line_server_with_admin(&s, "def handle(data):\n    return data\n");
    let conn = TcpStream::connect(("127.0.0.1", d.listening_port("srv"))).unwrap();
    conn.set_read_timeout(Some(T)).unwrap();
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut w = conn;
    // Calls flowing for a second: the gate samples every 5 ms meanwhile.
    let start = std::time::Instant::now();
    let mut line = String::new();
    while start.elapsed() < Duration::from_secs(1) {
        writeln!(w, "ping").unwrap();
        line.clear();
        reader.read_line(&mut line).unwrap();
        assert_eq!(line, "ping\n");
    }
    let (_, body) = get(admin, "/metrics");
    let busy = metric(&body, "pyipcd_pool_io_busy_percent");
    assert!(busy > 0.0 && busy <= 100.0, "{busy}: {body}");
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

/// Every documented family: name as exposed (counters with `_total`), type,
/// and the labels of its series. The list is the docs', written out here
/// rather than read from the source, so a renamed series fails this test.
const FAMILIES: &[(&str, &str, &[&str])] = &[
    ("pyipcd_messages_total", "counter", &["role"]),
    ("pyipcd_bytes_total", "counter", &["direction", "role"]),
    ("pyipcd_errors_total", "counter", &["role"]),
    ("pyipcd_handler_seconds", "histogram", &["role"]),
    ("pyipcd_connections", "gauge", &["role"]),
    ("pyipcd_connections_refused_total", "counter", &["role"]),
    ("pyipcd_shm_stale_total", "counter", &["role"]),
    ("pyipcd_task_restarts_total", "counter", &["task"]),
    ("pyipcd_pool_calls_total", "counter", &[]),
    ("pyipcd_pool_errors_total", "counter", &[]),
    ("pyipcd_pool_timeouts_total", "counter", &[]),
    ("pyipcd_pool_queue_full_waits_total", "counter", &[]),
    ("pyipcd_pool_calls_here_total", "counter", &[]),
    ("pyipcd_pool_skipped_total", "counter", &[]),
    ("pyipcd_pool_spin_gate_shuts_total", "counter", &[]),
    ("pyipcd_pool_queue_depth", "gauge", &[]),
    ("pyipcd_pool_busy_threads", "gauge", &[]),
    ("pyipcd_pool_io_busy_percent", "gauge", &[]),
];

/// Parses a `/metrics` body with the `prometheus_client` package's own
/// exposition parser (installed from PyPI into a venv of the test's own);
/// one line per family: name, type, whether it has help, and per sample
/// `name{labels}=value`.
fn parse_exposition(body: &str) -> String {
    let venv = tempfile::tempdir().unwrap();
    common::make_venv(pyipcd::py::interpreter::built::EXECUTABLE, venv.path(), &[]);
    let python = venv.path().join("bin/python");
    let pip = std::process::Command::new(&python)
        .args(["-m", "pip", "install", "-q", "--disable-pip-version-check"])
        .arg("prometheus-client==0.26.0")
        .status()
        .expect("pip");
    assert!(pip.success(), "pip install prometheus-client failed");
    let script = r#"
import sys
from prometheus_client.parser import text_string_to_metric_families
for f in text_string_to_metric_families(sys.stdin.read()):
    samples = ' '.join(
        '%s{%s}=%s' % (s.name, ','.join('%s:%s' % kv for kv in sorted(s.labels.items())), s.value)
        for s in f.samples)
    print(f.name, f.type, 'help' if f.documentation else 'nohelp', samples)
"#;
    let mut child = std::process::Command::new(&python)
        .args(["-c", script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("python3");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(body.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the Prometheus parser refused /metrics:\n{}\n{body}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn metrics_follow_the_prometheus_conventions_from_the_start() {
    let s = Scenario::new();
    s.write("h.py", "def handle(data):\n    return data\n");
    s.write(
        "t.py",
        "import pyipcd, time\n\ndef run():\n    while not pyipcd.stopping():\n        time.sleep(0.02)\n",
    );
    let admin = free_port();
    let cfg = s.config(&format!(
        "[admin]\nlisten = \"127.0.0.1:{admin}\"\n[python]\npaths = [\".\"]\n\
         [[python.task]]\nname = \"t\"\nrun = \"t:run\"\n\
         [[tcp.server]]\nname = \"srv\"\nlisten = \"127.0.0.1:0\"\nframing = \"line\"\nhandler = \"h:handle\"\n\
         [[shm.region]]\nname = \"ch\"\nmode = \"channel\"\npath = \"ch.shm\"\nhandler = \"h:handle\"\n"
    ));
    let mut d = Daemon::start(&cfg, &[]);
    d.wait_ready();
    d.lines.wait_for(&["admin endpoint listening"], T);
    d.lines.wait_for(&["task starting", "task=t"], T);

    // Nothing has happened yet: every documented series is there, at zero.
    let (status, head, body) = common::http_get_full(admin, "/metrics");
    assert_eq!(status, 200);
    assert!(
        head.contains("content-type: text/plain; version=0.0.4"),
        "{head}"
    );
    let families = parse_exposition(&body);
    for (name, kind, labels) in FAMILIES {
        // The parser names a counter's family without `_total`.
        let family = if *kind == "counter" {
            name.strip_suffix("_total").expect("counters end in _total")
        } else {
            name
        };
        let line = families
            .lines()
            .find(|l| l.split(' ').next() == Some(family))
            .unwrap_or_else(|| panic!("no family {family} in:\n{families}\n{body}"));
        let mut fields = line.split(' ');
        fields.next();
        assert_eq!(fields.next(), Some(*kind), "{line}");
        assert_eq!(fields.next(), Some("help"), "no # HELP for {name}: {line}");
        let samples: Vec<&str> = fields.collect();
        assert!(!samples.is_empty(), "{line}");
        for sample in samples {
            let (sample_name, rest) = sample.split_once('{').unwrap();
            let (labels_text, value) = rest.split_once("}=").unwrap();
            if *kind == "counter" {
                assert_eq!(sample_name, *name, "{line}");
            }
            if *kind != "histogram" {
                let got: Vec<&str> = labels_text
                    .split(',')
                    .filter(|l| !l.is_empty())
                    .map(|l| l.split_once(':').unwrap().0)
                    .collect();
                assert_eq!(&got, labels, "{line}");
            }
            // Before any traffic, everything but the pool's probe is zero.
            if !name.starts_with("pyipcd_pool_") && sample_name != "pyipcd_handler_seconds_created"
            {
                assert_eq!(value.parse::<f64>().unwrap(), 0.0, "{sample}");
            }
        }
    }
    // Per-role series carry the role's name.
    for series in [
        "pyipcd_messages_total{role:srv}",
        "pyipcd_messages_total{role:ch}",
        "pyipcd_bytes_total{direction:in,role:ch}",
        "pyipcd_shm_stale_total{role:ch}",
        "pyipcd_connections{role:srv}",
        "pyipcd_task_restarts_total{task:t}",
        "pyipcd_handler_seconds_count{role:srv}",
        "pyipcd_handler_seconds_count{role:ch}",
    ] {
        let zero = |v: &str| v.parse::<f64>() == Ok(0.0);
        assert!(
            families.split_whitespace().any(|t| t
                .split_once('=')
                .is_some_and(|(k, v)| k == series && zero(v))),
            "no {series} at zero in:\n{families}"
        );
    }

    let (status, head, body) = common::http_get_full(admin, "/health");
    assert_eq!(status, 200, "{body}");
    assert!(head.contains("content-type: application/json"), "{head}");
    d.signal("TERM");
    assert_eq!(d.wait_exit(T).code(), Some(0));
}
