//! `[[tcp.client]]` through the real binary against servers the test runs:
//! a server that comes up late, one that restarts mid-stream, a producer
//! generator, and `pyipcd.send` from a task.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Duration;

use common::{Daemon, Scenario, free_port};

const T: Duration = Duration::from_secs(15);

fn accept(listener: &TcpListener) -> BufReader<TcpStream> {
    let (s, _) = listener.accept().unwrap();
    s.set_read_timeout(Some(T)).unwrap();
    BufReader::new(s)
}

fn read_line(r: &mut BufReader<TcpStream>) -> Option<String> {
    let mut line = String::new();
    match r.read_line(&mut line) {
        Ok(0) | Err(_) => None,
        Ok(_) => Some(line.trim_end().to_string()),
    }
}

fn client(s: &Scenario, port: u16, extra: &str) -> std::path::PathBuf {
    s.write(
        "h.py",
        "def on_reply(data):\n    print('reply handler got', data.decode())\n\n\
         def numbers():\n    for i in range(1000000):\n        yield f'n{i}'.encode()\n",
    );
    s.config(&format!(
        "[python]\npaths = [\".\"]\n[[tcp.client]]\nname = \"out\"\nconnect = \"127.0.0.1:{port}\"\n\
         framing = \"line\"\nbackoff_min = \"50ms\"\nbackoff_max = \"200ms\"\n{extra}\n"
    ))
}

#[test]
fn a_server_that_starts_late_gets_the_message_and_the_reply_is_handled() {
    let s = Scenario::new();
    let port = free_port();
    let cfg = client(
        &s,
        port,
        "send = [\"Hello, Server!\"]\non_reply = \"h:on_reply\"",
    );
    let mut d = Daemon::start(&cfg, &[]);
    d.wait_ready();
    d.lines
        .wait_for(&["connect to 127.0.0.1", "failed", "retrying"], T);
    let listener = TcpListener::bind(("127.0.0.1", port)).unwrap();
    let mut conn = accept(&listener);
    assert_eq!(read_line(&mut conn).as_deref(), Some("Hello, Server!"));
    conn.get_mut().write_all(b"echo: Hello, Server!\n").unwrap();
    d.lines
        .wait_for(&["reply handler got echo: Hello, Server!", "role=out"], T);
    d.signal("TERM");
    assert_eq!(d.wait_exit(T).code(), Some(0));
}

#[test]
fn a_server_restart_mid_stream_is_survived_and_sending_resumes() {
    let s = Scenario::new();
    let port = free_port();
    let cfg = client(&s, port, "producer = \"h:numbers\"\ninterval = \"5ms\"");
    let listener = TcpListener::bind(("127.0.0.1", port)).unwrap();
    let mut d = Daemon::start(&cfg, &[]);
    d.wait_ready();
    let mut conn = accept(&listener);
    let mut first = Vec::new();
    for _ in 0..20 {
        first.push(read_line(&mut conn).unwrap());
    }
    assert_eq!(first[0], "n0");
    // The server goes away (listener too), then comes back on the same port.
    drop(conn);
    drop(listener);
    d.lines
        .wait_for(&["connection to 127.0.0.1", "lost", "reconnecting"], T);
    let listener = TcpListener::bind(("127.0.0.1", port)).unwrap();
    let mut conn = accept(&listener);
    let resumed: Vec<u64> = (0..20)
        .map(|_| read_line(&mut conn).unwrap()[1..].parse().unwrap())
        .collect();
    // In order, no duplicates, continuing after what the first server saw.
    assert!(resumed.windows(2).all(|w| w[1] == w[0] + 1), "{resumed:?}");
    assert!(resumed[0] >= 20, "{resumed:?}");
    d.signal("TERM");
    assert_eq!(d.wait_exit(T).code(), Some(0));
}

#[test]
fn an_async_generator_producer_feeds_the_role_in_order() {
    let s = Scenario::new();
    let port = free_port();
    s.write(
        "agen.py",
        "import asyncio\n\nasync def ticks():\n    for i in range(5):\n        await asyncio.sleep(0.001)\n        print('yielding', i)\n        yield f'async {i}'\n",
    );
    let listener = TcpListener::bind(("127.0.0.1", port)).unwrap();
    let cfg = client(&s, port, "producer = \"agen:ticks\"\ninterval = \"1ms\"");
    let mut d = Daemon::start(&cfg, &[]);
    d.wait_ready();
    let mut conn = accept(&listener);
    for i in 0..5 {
        assert_eq!(read_line(&mut conn).unwrap(), format!("async {i}"));
    }
    d.lines.wait_for(&["producer finished", "role=out"], T);
    d.lines.wait_for(&["yielding 4", "role=out"], T);
    d.signal("TERM");
    assert_eq!(d.wait_exit(T).code(), Some(0));
}

#[test]
fn pyipcd_send_from_a_task_goes_out_through_the_role() {
    let s = Scenario::new();
    let port = free_port();
    s.write(
        "sender.py",
        "import pyipcd\n\ndef run():\n    for i in range(3):\n        pyipcd.send('out', f'from task {i}'.encode())\n    try:\n        pyipcd.send('nope', b'x')\n    except KeyError as e:\n        print('KeyError:', e)\n",
    );
    let listener = TcpListener::bind(("127.0.0.1", port)).unwrap();
    let cfg = client(
        &s,
        port,
        "[[python.task]]\nname = \"sender\"\nrun = \"sender:run\"",
    );
    let mut d = Daemon::start(&cfg, &[]);
    d.wait_ready();
    let mut conn = accept(&listener);
    for i in 0..3 {
        assert_eq!(read_line(&mut conn).unwrap(), format!("from task {i}"));
    }
    d.lines
        .wait_for(&["KeyError:", "no role named \"nope\""], T);
    d.signal("TERM");
    assert_eq!(d.wait_exit(T).code(), Some(0));
}

#[test]
fn the_embedded_classic_echo_server_scenario_runs_end_to_end() {
    // config/socket-embedded.toml with the port moved off 50007.
    let port = free_port();
    let s = Scenario::new();
    let shipped = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/config/socket-embedded.toml"
    ))
    .unwrap()
    .replace("../python", concat!(env!("CARGO_MANIFEST_DIR"), "/python"))
    .replace("50007", &port.to_string());
    let cfg = s.write("embedded.toml", &shipped);
    let mut d = Daemon::start(&cfg, &[("ECHO_SERVER_PORT", &port.to_string())]);
    d.wait_ready();
    d.lines
        .wait_for(&["Waiting for connection...", "role=echo-server"], T);
    d.lines
        .wait_for(&["Received b'Hello, Server!'", "role=echo-server"], T);
    d.lines
        .wait_for(&["Client read from Server Hello, Server!", "role=hello"], T);
    d.signal("TERM");
    assert_eq!(d.wait_exit(T).code(), Some(0), "{}", d.lines.text());
}
