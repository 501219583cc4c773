//! SIGHUP reload through the real binary, watched through a test-owned
//! NOTIFY_SOCKET: the notify sequence, a broken config keeping the old one
//! serving, and a moved listener that leaves unchanged roles' connections alone.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::{Daemon, Scenario, free_port};

const T: Duration = Duration::from_secs(15);

fn config(a: u16, b: u16) -> String {
    format!(
        "[daemon]\nshutdown_grace = \"2s\"\n[python]\npaths = [\".\"]\n\
         [[tcp.server]]\nname = \"a\"\nlisten = \"127.0.0.1:{a}\"\nframing = \"line\"\nhandler = \"h:echo\"\n\
         [[tcp.server]]\nname = \"b\"\nlisten = \"127.0.0.1:{b}\"\nframing = \"line\"\nhandler = \"h:echo\"\n"
    )
}

struct Line(BufReader<TcpStream>, TcpStream);

impl Line {
    fn open(port: u16) -> Self {
        let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(T)).unwrap();
        Self(BufReader::new(s.try_clone().unwrap()), s)
    }

    fn echo(&mut self, msg: &str) -> String {
        writeln!(self.1, "{msg}").unwrap();
        let mut l = String::new();
        self.0.read_line(&mut l).unwrap();
        l.trim_end().to_string()
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
        &["reloaded: started [\"a\"], stopped [\"a\"], failed []"],
        T,
    );
    assert_eq!(Line::open(a2).echo("a2"), "a2");
    assert!(
        TcpStream::connect(("127.0.0.1", a1)).is_err(),
        "old port still listening"
    );
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
fn a_role_that_fails_to_restart_shows_as_down_until_fixed() {
    let s = Scenario::new();
    s.write("h.py", "def echo(data):\n    return data\n");
    let (admin, a) = (free_port(), free_port());
    let good = format!(
        "[admin]\nlisten = \"127.0.0.1:{admin}\"\n[python]\npaths = [\".\"]\n\
         [[tcp.server]]\nname = \"a\"\nlisten = \"127.0.0.1:{a}\"\nframing = \"line\"\nhandler = \"h:echo\"\n"
    );
    let cfg = s.write("pyipcd.toml", &good);
    let mut d = Daemon::start(&cfg, &[]);
    d.wait_ready();
    let health = || common::run_to_end(&["health", "-c", cfg.to_str().unwrap()], &[]).0;
    assert_eq!(health(), 0);
    std::fs::write(&cfg, good.replace("h:echo", "h:missing")).unwrap();
    d.signal("HUP");
    d.lines.wait_for(
        &["reloaded: started [], stopped [\"a\"], failed [\"a\"]"],
        T,
    );
    assert_eq!(health(), 1, "a role that failed to start must show as down");
    std::fs::write(&cfg, &good).unwrap();
    d.signal("HUP");
    d.lines
        .wait_for(&["reloaded: started [\"a\"], stopped [], failed []"], T);
    assert_eq!(health(), 0);
    assert_eq!(Line::open(a).echo("back"), "back");
    d.signal("TERM");
    assert_eq!(d.wait_exit(T).code(), Some(0));
}

#[test]
fn sighup_switches_a_role_to_inline_dispatch_on_the_same_port() {
    let s = Scenario::new();
    s.write("h.py", "def echo(data):\n    return data\n");
    let (a, b) = (free_port(), free_port());
    let pool = config(a, b);
    let cfg = s.write("pyipcd.toml", &pool);
    let mut d = Daemon::start(&cfg, &[]);
    d.wait_ready();
    let mut on_b = Line::open(b);
    assert_eq!(Line::open(a).echo("pool"), "pool");
    // Only role a changes; it must get its port back at once.
    let inline = pool.replacen(
        "handler = \"h:echo\"\n",
        "handler = \"h:echo\"\ndispatch = \"inline\"\n",
        1,
    );
    std::fs::write(&cfg, inline).unwrap();
    d.signal("HUP");
    d.lines.wait_for(
        &["reloaded: started [\"a\"], stopped [\"a\"], failed []"],
        T,
    );
    // Log lines carry thread names: role a now listens from its own thread.
    d.lines.wait_for(&["py-tcp-a", "listening", "role=a"], T);
    assert_eq!(Line::open(a).echo("inline"), "inline");
    assert_eq!(on_b.echo("b untouched"), "b untouched");
    d.signal("TERM");
    assert_eq!(d.wait_exit(T).code(), Some(0));
}
