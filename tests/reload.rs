//! SIGHUP reload of server roles through the real binary, watched through a
//! test-owned NOTIFY_SOCKET and the admin endpoint: the notify sequence, a
//! broken file keeping the old config, and reload as a transaction per role:
//! a replacement that cannot start leaves the old instance serving, the
//! listening socket is handed over (no connect refused), open connections
//! finish on the old instance (until `reload_drain`), an unchanged handler
//! keeps its class instance, and a late old instance never marks its
//! successor down.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::{Daemon, Scenario, free_port};

const T: Duration = Duration::from_secs(15);

fn config(a: u16, b: u16) -> String {
    format!(
        "[daemon]\nshutdown_grace = \"2s\"\n[python]\npaths = [\".\"]\n\
         [[tcp.server]]\nname = \"a\"\nlisten = \"127.0.0.1:{a}\"\nframing = \"line\"\nhandler = \"h:echo\"\n\
         [[tcp.server]]\nname = \"b\"\nlisten = \"127.0.0.1:{b}\"\nframing = \"line\"\nhandler = \"h:echo\"\n"
    )
}

/// One server role `a` with an admin endpoint; `extra` goes into `[daemon]`,
/// `role` into the role's table.
fn one_role(admin: u16, a: u16, daemon: &str, role: &str) -> String {
    format!(
        "[daemon]\nshutdown_grace = \"1s\"\n{daemon}\n[admin]\nlisten = \"127.0.0.1:{admin}\"\n\
         [python]\npaths = [\".\"]\n\
         [[tcp.server]]\nname = \"a\"\nlisten = \"127.0.0.1:{a}\"\nframing = \"line\"\n{role}\n"
    )
}

struct Line(BufReader<TcpStream>, TcpStream);

impl Line {
    fn open(port: u16) -> Self {
        let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(T)).unwrap();
        Self(BufReader::new(s.try_clone().unwrap()), s)
    }

    fn send(&mut self, msg: &str) {
        writeln!(self.1, "{msg}").unwrap();
    }

    fn read(&mut self) -> String {
        let mut l = String::new();
        self.0.read_line(&mut l).unwrap();
        l.trim_end().to_string()
    }

    fn echo(&mut self, msg: &str) -> String {
        self.send(msg);
        self.read()
    }
}

/// `GET /health`: (status code, body).
fn health(admin: u16) -> (u16, String) {
    let mut s = TcpStream::connect(("127.0.0.1", admin)).unwrap();
    s.set_read_timeout(Some(T)).unwrap();
    s.write_all(b"GET /health HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let code = text[9..12].parse().unwrap();
    assert!(
        text.to_ascii_lowercase()
            .contains("content-type: application/json"),
        "{text}"
    );
    (
        code,
        text.split("\r\n\r\n").nth(1).unwrap_or("").to_string(),
    )
}

/// Non-status notify lines (`RELOADING=1`, `READY=1`, …) and the STATUS texts.
fn milestones(d: &Daemon, window: Duration) -> (Vec<String>, Vec<String>) {
    let notes = d.notify_lines(window);
    let kinds = notes
        .iter()
        .map(|(_, l)| l.clone())
        .filter(|l| !l.starts_with("STATUS=") && !l.starts_with("MONOTONIC_USEC="))
        .collect();
    let status = notes
        .iter()
        .filter_map(|(_, l)| l.strip_prefix("STATUS=").map(str::to_string))
        .collect();
    (kinds, status)
}

/// Connects and echoes in a loop on another thread until stopped; counts
/// the round trips and the failures (a refused connect is one).
struct Prober {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicUsize>,
    failed: Arc<AtomicUsize>,
    thread: Option<std::thread::JoinHandle<Vec<String>>>,
}

impl Prober {
    fn start(port: u16) -> Self {
        let (stop, ok, failed) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicUsize::new(0)),
            Arc::new(AtomicUsize::new(0)),
        );
        let (s, o, f) = (stop.clone(), ok.clone(), failed.clone());
        let thread = std::thread::spawn(move || {
            let mut errors = Vec::new();
            while !s.load(Ordering::Relaxed) {
                let round = (|| -> std::io::Result<String> {
                    let c = TcpStream::connect(("127.0.0.1", port))?;
                    c.set_read_timeout(Some(T))?;
                    let mut r = BufReader::new(c.try_clone()?);
                    (&c).write_all(b"probe\n")?;
                    let mut l = String::new();
                    r.read_line(&mut l)?;
                    Ok(l)
                })();
                match round {
                    // Either handler of these tests: echo or upper.
                    Ok(l) if l.eq_ignore_ascii_case("probe\n") => o.fetch_add(1, Ordering::Relaxed),
                    Ok(l) => {
                        errors.push(format!("got {l:?}"));
                        f.fetch_add(1, Ordering::Relaxed)
                    }
                    Err(e) => {
                        errors.push(e.to_string());
                        f.fetch_add(1, Ordering::Relaxed)
                    }
                };
            }
            errors
        });
        Self {
            stop,
            ok,
            failed,
            thread: Some(thread),
        }
    }

    /// Stops; returns (round trips, failures).
    fn finish(mut self) -> (usize, usize, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        let errors = self.thread.take().unwrap().join().unwrap();
        (
            self.ok.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
            errors,
        )
    }
}

#[test]
fn sighup_moves_a_changed_listener_and_keeps_the_rest() {
    let s = Scenario::new();
    s.write("h.py", "def echo(data):\n    return data\n");
    let (a1, a2, b) = (free_port(), free_port(), free_port());
    let cfg = s.write("pyipcd.toml", &config(a1, b));
    let mut d = Daemon::start(&cfg, &[]);
    d.wait_ready();
    let mut on_b = Line::open(b);
    assert_eq!(on_b.echo("before"), "before");
    assert_eq!(Line::open(a1).echo("a1"), "a1");

    // A broken file: the old config keeps serving.
    std::fs::write(&cfg, "[python]\nworkers = \"many\"\n").unwrap();
    d.signal("HUP");
    let notes = d.notify_lines(Duration::from_millis(800));
    let kinds: Vec<&str> = notes
        .iter()
        .map(|(_, l)| l.as_str())
        .filter(|l| !l.starts_with("STATUS=") && !l.starts_with("MONOTONIC_USEC="))
        .collect();
    assert_eq!(kinds, ["RELOADING=1", "READY=1"], "{notes:?}");
    assert!(
        notes.iter().any(|(_, l)| l.starts_with("MONOTONIC_USEC=")),
        "{notes:?}"
    );
    d.lines.wait_for(
        &[
            "reload failed; still serving the previous configuration",
            "python.workers",
        ],
        T,
    );
    assert_eq!(Line::open(a1).echo("still a1"), "still a1");
    assert_eq!(on_b.echo("still b"), "still b");

    // Move role a; b is unchanged and its open connection must survive.
    std::fs::write(&cfg, config(a2, b)).unwrap();
    d.signal("HUP");
    d.lines.wait_for(
        &["reloaded: started [], replaced [\"a\"], stopped [], failed []"],
        T,
    );
    assert_eq!(Line::open(a2).echo("a2"), "a2");
    // The old instance closes its listener as it retires, just after.
    let deadline = Instant::now() + T;
    while TcpStream::connect(("127.0.0.1", a1)).is_ok() {
        assert!(Instant::now() < deadline, "old port still listening");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(on_b.echo("after"), "after");

    d.signal("TERM");
    let notes = d.notify_lines(Duration::from_millis(300));
    assert!(notes.iter().any(|(_, l)| l == "STOPPING=1"), "{notes:?}");
    assert_eq!(d.wait_exit(T).code(), Some(0));
}

#[test]
fn notify_sees_ready_watchdog_reloading_ready_stopping_in_order() {
    let s = Scenario::new();
    s.write("h.py", "def echo(data):\n    return data\n");
    let cfg = s.write("pyipcd.toml", &config(free_port(), free_port()));
    let mut d = Daemon::start(&cfg, &[("WATCHDOG_USEC", "200000")]);
    let mut seen: Vec<String> = Vec::new();
    let mut take = |d: &Daemon, window: u64| {
        for (_, l) in d.notify_lines(Duration::from_millis(window)) {
            if ["READY=1", "WATCHDOG=1", "RELOADING=1", "STOPPING=1"].contains(&l.as_str())
                && seen.last() != Some(&l)
            {
                seen.push(l);
            }
        }
    };
    take(&d, 600);
    d.signal("HUP");
    take(&d, 400);
    d.signal("TERM");
    take(&d, 400);
    assert_eq!(d.wait_exit(T).code(), Some(0));
    // Pings may land between the others; the order of the milestones is fixed.
    let milestones: Vec<&str> = seen
        .iter()
        .map(String::as_str)
        .filter(|l| *l != "WATCHDOG=1")
        .collect();
    assert_eq!(
        milestones,
        ["READY=1", "RELOADING=1", "READY=1", "STOPPING=1"],
        "{seen:?}"
    );
    assert_eq!(
        seen.get(1).map(String::as_str),
        Some("WATCHDOG=1"),
        "{seen:?}"
    );
}

#[test]
fn a_replacement_that_cannot_start_leaves_the_old_instance_serving() {
    let s = Scenario::new();
    s.write("h.py", "def echo(data):\n    return data\n");
    let (admin, a) = (free_port(), free_port());
    let good = one_role(admin, a, "", "handler = \"h:echo\"");
    let cfg = s.write("pyipcd.toml", &good);
    let mut d = Daemon::start(&cfg, &[]);
    d.wait_ready();
    let mut open = Line::open(a);
    assert_eq!(open.echo("first"), "first");
    let prober = Prober::start(a);

    // A function added to h.py after start: `check` (a fresh process) finds
    // it, the running interpreter, which imported h at start, does not
    // (--no-bind: the daemon holds the ports, as under the unit's ExecReload).
    s.write(
        "h.py",
        "def echo(data):\n    return data\n\ndef shout(data):\n    return data.upper()\n",
    );
    let added = good.replace("h:echo", "h:shout");
    std::fs::write(&cfg, &added).unwrap();
    let (code, out, err) =
        common::run_to_end(&["check", "--no-bind", "-c", cfg.to_str().unwrap()], &[]);
    assert_eq!(code, 0, "check must accept it: {out}{err}");
    d.signal("HUP");
    let (kinds, status) = milestones(&d, Duration::from_millis(1500));
    assert_eq!(kinds, ["RELOADING=1", "READY=1"], "{status:?}");
    assert!(
        status.iter().any(|s| s.contains("failed [\"a\"]")),
        "{status:?}"
    );
    let line = d.lines.wait_for(
        &[
            "reload failed; the previous instance keeps serving",
            "h:shout",
        ],
        T,
    );
    assert!(line.contains("needs a restart"), "{line}");
    assert_eq!(open.echo("still"), "still", "the open connection survives");
    assert_eq!(Line::open(a).echo("new conn"), "new conn", "old handler");
    let (code, body) = health(admin);
    assert_eq!(code, 200, "the role serves: {body}");
    assert!(body.contains("reload failed"), "{body}");

    // A port held by someone else: the old listener stays.
    let squatter = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = squatter.local_addr().unwrap().port();
    std::fs::write(
        &cfg,
        good.replace(&format!(":{a}\""), &format!(":{taken}\"")),
    )
    .unwrap();
    d.signal("HUP");
    d.lines.wait_for(
        &[
            "reload failed; the previous instance keeps serving",
            "cannot listen",
        ],
        T,
    );
    assert_eq!(Line::open(a).echo("kept"), "kept");
    assert_eq!(health(admin).0, 200);

    // Back to the running config: the notes go.
    std::fs::write(&cfg, &good).unwrap();
    d.signal("HUP");
    d.lines.wait_for(
        &["reloaded: started [], replaced [], stopped [], failed []"],
        T,
    );
    let (code, body) = health(admin);
    assert_eq!(
        (code, body.trim()),
        (
            200,
            "{\"status\":\"ok\",\"roles\":{\"a\":\"up\"},\"pool\":{\"threads\":2,\"queued\":0}}"
        )
    );
    let (ok, failed, errors) = prober.finish();
    assert!(ok > 0);
    assert_eq!(
        failed, 0,
        "round trips failed during the reloads: {errors:?}"
    );
    d.signal("TERM");
    assert_eq!(d.wait_exit(T).code(), Some(0));
}

#[test]
fn a_new_role_that_fails_to_start_shows_as_down_until_fixed() {
    let s = Scenario::new();
    s.write("h.py", "def echo(data):\n    return data\n");
    let (admin, a, b) = (free_port(), free_port(), free_port());
    let good = one_role(admin, a, "", "handler = \"h:echo\"");
    let cfg = s.write("pyipcd.toml", &good);
    let mut d = Daemon::start(&cfg, &[]);
    d.wait_ready();
    let role_b = |h: &str| {
        format!(
            "{good}[[tcp.server]]\nname = \"b\"\nlisten = \"127.0.0.1:{b}\"\nframing = \"line\"\nhandler = \"h:{h}\"\n"
        )
    };
    std::fs::write(&cfg, role_b("missing")).unwrap();
    d.signal("HUP");
    d.lines.wait_for(
        &["reloaded: started [], replaced [], stopped [], failed [\"b\"]"],
        T,
    );
    let (code, body) = health(admin);
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("role b is down: not started"), "{body}");
    assert!(body.contains("AttributeError"), "{body}");
    std::fs::write(&cfg, role_b("echo")).unwrap();
    d.signal("HUP");
    d.lines.wait_for(
        &["reloaded: started [\"b\"], replaced [], stopped [], failed []"],
        T,
    );
    assert_eq!(health(admin).0, 200);
    assert_eq!(Line::open(b).echo("back"), "back");
    // Removed again: its health entry goes with it.
    std::fs::write(&cfg, &good).unwrap();
    d.signal("HUP");
    d.lines.wait_for(
        &["reloaded: started [], replaced [], stopped [\"b\"], failed []"],
        T,
    );
    assert_eq!(
        health(admin),
        (
            200,
            "{\"status\":\"ok\",\"roles\":{\"a\":\"up\"},\"pool\":{\"threads\":2,\"queued\":0}}\n"
                .into()
        )
    );
    d.signal("TERM");
    assert_eq!(d.wait_exit(T).code(), Some(0));
}

#[test]
fn a_late_old_instance_never_marks_its_successor_down() {
    let s = Scenario::new();
    s.write(
        "h.py",
        "import time\n\ndef echo(data):\n    if data == b'slow':\n        time.sleep(4)\n    return data\n",
    );
    let (admin, a) = (free_port(), free_port());
    let cfg = s.write(
        "pyipcd.toml",
        &one_role(admin, a, "", "handler = \"h:echo\""),
    );
    let mut d = Daemon::start(&cfg, &[]);
    d.wait_ready();
    let mut slow = Line::open(a);
    let started = Instant::now();
    slow.send("slow");
    std::thread::sleep(Duration::from_millis(300));
    let changed = one_role(admin, a, "", "handler = \"h:echo\"\npipeline = 8");
    std::fs::write(&cfg, changed).unwrap();
    d.signal("HUP");
    d.lines.wait_for(
        &["reloaded: started [], replaced [\"a\"], stopped [], failed []"],
        T,
    );
    assert_eq!(Line::open(a).echo("new"), "new");
    // The slow call ends on the old instance, past shutdown_grace (1 s):
    // its reply still arrives, and its end does not touch the new instance.
    assert_eq!(slow.read(), "slow");
    assert!(started.elapsed() > Duration::from_millis(3500));
    drop(slow);
    d.lines.wait_for(&["stopped listening", "role=a"], T);
    for _ in 0..3 {
        assert_eq!(
            health(admin),
            (200, "{\"status\":\"ok\",\"roles\":{\"a\":\"up\"},\"pool\":{\"threads\":2,\"queued\":0}}\n".into())
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(Line::open(a).echo("still"), "still");
    d.signal("TERM");
    assert_eq!(d.wait_exit(T).code(), Some(0));
}

#[test]
fn an_unchanged_handler_keeps_its_state_and_open_connections_drain() {
    let s = Scenario::new();
    s.write(
        "h.py",
        "class Counter:\n    def __init__(self):\n        self.n = 0\n\n    def hit(self, data):\n        self.n += 1\n        return str(self.n).encode()\n",
    );
    let (admin, a) = (free_port(), free_port());
    let role = "handler = \"h:Counter.hit\"";
    let cfg = s.write(
        "pyipcd.toml",
        &one_role(admin, a, "reload_drain = \"2s\"", role),
    );
    let mut d = Daemon::start(&cfg, &[]);
    d.wait_ready();
    let mut old = Line::open(a);
    assert_eq!(old.echo("x"), "1");
    assert_eq!(old.echo("x"), "2");
    std::fs::write(
        &cfg,
        one_role(
            admin,
            a,
            "reload_drain = \"2s\"",
            &format!("{role}\npipeline = 4"),
        ),
    )
    .unwrap();
    d.signal("HUP");
    d.lines.wait_for(
        &["reloaded: started [], replaced [\"a\"], stopped [], failed []"],
        T,
    );
    d.lines.wait_for(
        &["1 open connection(s) finish on this instance", "role=a"],
        T,
    );
    assert_eq!(Line::open(a).echo("x"), "3", "the class instance was kept");
    assert_eq!(old.echo("x"), "4", "the open connection still works");
    // Past reload_drain the old instance closes it, saying so.
    d.lines.wait_for(&["reload_drain (2s) passed", "role=a"], T);
    let mut rest = String::new();
    assert_eq!(old.0.read_line(&mut rest).unwrap(), 0, "closed: {rest:?}");
    assert_eq!(Line::open(a).echo("x"), "5");
    d.signal("TERM");
    assert_eq!(d.wait_exit(T).code(), Some(0));
}

#[test]
fn reloads_on_the_same_port_refuse_no_connect_even_across_dispatch_modes() {
    let s = Scenario::new();
    s.write("h.py", "def echo(data):\n    return data\n");
    let (admin, a) = (free_port(), free_port());
    let modes = [
        "dispatch = \"inline\"",
        "pipeline = 4",
        "dispatch = \"inline\"\npipeline = 2",
    ];
    let cfg = s.write(
        "pyipcd.toml",
        &one_role(admin, a, "", "handler = \"h:echo\""),
    );
    let mut d = Daemon::start(&cfg, &[]);
    d.wait_ready();
    let prober = Prober::start(a);
    for extra in modes {
        d.reload(
            &cfg,
            &one_role(admin, a, "", &format!("handler = \"h:echo\"\n{extra}")),
            &["reloaded: started [], replaced [\"a\"]"],
            T,
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    // Log lines carry thread names: two inline instances listened.
    d.lines
        .wait_for(&["reloaded: started [], replaced [\"a\"]"], T);
    assert_eq!(d.lines.count(&["py-tcp-a", "listening", "framing="]), 2);
    let (ok, failed, errors) = prober.finish();
    assert!(ok > 10, "{ok}");
    assert_eq!(failed, 0, "{errors:?}");
    d.signal("TERM");
    assert_eq!(d.wait_exit(T).code(), Some(0));
}

/// Two server roles with handlers `h:echo` (a) and `h:upper` (b) on the given ports.
fn two_roles(admin: u16, a: u16, b: Option<u16>) -> String {
    let mut text = one_role(admin, a, "", "handler = \"h:echo\"");
    if let Some(b) = b {
        text += &format!(
            "[[tcp.server]]\nname = \"b\"\nlisten = \"127.0.0.1:{b}\"\nframing = \"line\"\nhandler = \"h:upper\"\n"
        );
    }
    text
}

#[test]
fn a_socket_passes_between_roles_and_never_from_a_role_whose_reload_failed() {
    let s = Scenario::new();
    s.write(
        "h.py",
        "def echo(data):\n    return data\n\ndef upper(data):\n    return data.upper()\n",
    );
    let (admin, p1, p2) = (free_port(), free_port(), free_port());
    let cfg = s.write("pyipcd.toml", &two_roles(admin, p1, None));
    let mut d = Daemon::start(&cfg, &[]);
    d.wait_ready();
    let reload = |d: &Daemon, text: &str, want: &str| d.reload(&cfg, text, &[want], T);
    // `a` (processed first) moves to p2; new role `b` takes p1 from it, so
    // p1 never refuses a connect.
    let on_p1 = Prober::start(p1);
    reload(
        &d,
        &two_roles(admin, p2, Some(p1)),
        "reloaded: started [\"b\"], replaced [\"a\"], stopped [], failed []",
    );
    let (ok, failed, errors) = on_p1.finish();
    assert!(ok > 0);
    assert_eq!(failed, 0, "{errors:?}");
    assert_eq!(Line::open(p1).echo("x"), "X", "p1 is b's now");
    assert_eq!(Line::open(p2).echo("x"), "x", "p2 is a's");
    // Swap them: each takes the other's socket.
    reload(
        &d,
        &two_roles(admin, p1, Some(p2)),
        "reloaded: started [], replaced [\"a\", \"b\"], stopped [], failed []",
    );
    assert_eq!(Line::open(p1).echo("y"), "y");
    assert_eq!(Line::open(p2).echo("y"), "Y");
    // `a` cannot move (its new port is taken): `b`, which was to take a's
    // socket, must not start on it; both keep what they had.
    let squatter = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let p3 = squatter.local_addr().unwrap().port();
    reload(&d, &two_roles(admin, p3, Some(p1)), "failed [\"a\", \"b\"]");
    d.lines
        .wait_for(&["takes over the socket or file of role `a`", "role=b"], T);
    assert_eq!(Line::open(p1).echo("z"), "z", "p1 is still a's alone");
    for _ in 0..5 {
        assert_eq!(Line::open(p1).echo("z"), "z");
    }
    assert_eq!(Line::open(p2).echo("z"), "Z", "p2 is still b's");
    assert_eq!(health(admin).0, 200);
    d.signal("TERM");
    assert_eq!(d.wait_exit(T).code(), Some(0));
}
