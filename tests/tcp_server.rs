//! `[[tcp.server]]` through the real binary with real peers: a C client built
//! by gcc, a Python socket client, 200 concurrent connections, pipelining,
//! split frames, truncated and oversize frames, connection limits, exceptions;
//! and the same guarantees with `dispatch = "inline"` (the role's own thread).

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::Duration;

use common::wire::{assert_closed, frame, read_frame};
use common::{Daemon, Scenario};

const T: Duration = Duration::from_secs(15);

const HANDLERS: &str = r#"
import asyncio, random, time
import pyipcd

def echo(data):
    return data

def upper(data):
    if data == b"boom":
        raise ValueError("handler exploded")
    return data.upper()

def whoami(data, peer, conn_id):
    return f"{conn_id}@{peer}:".encode() + data

def opened(conn_id, peer):
    print(f"hook open {conn_id} {peer}")

def closed(conn_id, peer):
    print(f"hook close {conn_id} {peer}")

def bracket(data):
    return b"[" + data + b"]"

def forward(data):
    for i in range(3):
        pyipcd.send("out", data + b" %d" % i)  # waits while the outbox is full
    return b"forwarded"

def slow(data):
    if data == b"hang":
        time.sleep(2.5)
    return data

async def jitter(data):
    await asyncio.sleep(random.random() * 0.005)
    return data
"#;

/// Starts a daemon with one server role; returns it and the bound port.
fn server(framing: &str, handler: &str, extra: &str) -> (Scenario, Daemon, u16) {
    let s = Scenario::new();
    s.write("h.py", HANDLERS);
    let cfg = s.config(&format!(
        "[python]\npaths = [\".\"]\nworkers = 2\n[[tcp.server]]\nname = \"srv\"\nlisten = \"127.0.0.1:0\"\n\
         framing = \"{framing}\"\nhandler = \"h:{handler}\"\n{extra}\n"
    ));
    let mut d = Daemon::start(&cfg, &[]);
    d.wait_ready();
    let port = d.listening_port("srv");
    (s, d, port)
}

fn connect(port: u16) -> TcpStream {
    let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(T)).unwrap();
    s.set_nodelay(true).unwrap();
    s
}

#[test]
fn the_classic_c_client_gets_its_echo() {
    for dispatch in ["pool", "inline"] {
        let (s, mut d, port) = server("raw", "echo", &format!("dispatch = \"{dispatch}\""));
        let exe = s.path("classic_client");
        common::gcc("tests/fixtures/c/classic_client.c", &exe);
        for _ in 0..3 {
            let out = Command::new(&exe).arg(port.to_string()).output().unwrap();
            assert!(
                out.status.success(),
                "{dispatch}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            assert_eq!(
                String::from_utf8_lossy(&out.stdout),
                "Client read from Server Hello, Server!\n",
                "{dispatch}"
            );
        }
        d.signal("TERM");
        assert_eq!(d.wait_exit(T).code(), Some(0), "{dispatch}");
    }
}

#[test]
fn a_python_socket_client_gets_its_echo() {
    let (_s, _d, port) = server("raw", "echo", "");
    let script = format!(
        "import socket\ns = socket.create_connection(('127.0.0.1', {port}))\ns.sendall(b'Hello, world')\nprint(s.recv(1024))\ns.close()\n"
    );
    assert_eq!(common::run_python(&script), "b'Hello, world'\n");
}

#[test]
fn two_hundred_connections_interleave_messages_byte_for_byte() {
    for dispatch in ["pool", "inline"] {
        let (_s, d, port) = server(
            "len32",
            "echo",
            &format!("max_connections = 300\ndispatch = \"{dispatch}\""),
        );
        interleave_200_connections(port);
        assert_eq!(d.lines.count(&["refusing connection"]), 0);
    }
}

fn interleave_200_connections(port: u16) {
    let threads: Vec<_> = (0..200)
        .map(|c| {
            std::thread::spawn(move || {
                let mut s = connect(port);
                for m in 0..25u32 {
                    // Varying sizes and contents, binary included.
                    let payload: Vec<u8> = (0..(c * 7 + m as usize * 13) % 3000)
                        .map(|i| (i as u32 ^ m ^ c as u32) as u8)
                        .collect();
                    s.write_all(&frame(&payload)).unwrap();
                    assert_eq!(read_frame(&mut s), payload, "conn {c} msg {m}");
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
}

#[test]
fn pipelined_requests_get_replies_in_request_order() {
    // The async handler finishes requests in random order; replies must not.
    let (_s, _d, port) = server("len32", "jitter", "pipeline = 32");
    pipeline_200(&mut connect(port), |m| m.to_vec());
}

/// Sends 200 requests in one write; checks the replies arrive in order.
fn pipeline_200(s: &mut TcpStream, expect: impl Fn(&[u8]) -> Vec<u8>) {
    let requests: Vec<String> = (0..200).map(|i| format!("request {i}")).collect();
    let batch: Vec<u8> = requests.iter().flat_map(|r| frame(r.as_bytes())).collect();
    s.write_all(&batch).unwrap();
    for r in &requests {
        assert_eq!(read_frame(s), expect(r.as_bytes()));
    }
}

#[test]
fn frames_split_across_writes_are_reassembled() {
    let (_s, _d, port) = server("len32", "upper", "");
    let mut s = connect(port);
    let f = frame(b"split me");
    for byte in &f {
        s.write_all(std::slice::from_ref(byte)).unwrap();
        std::thread::sleep(Duration::from_millis(2));
    }
    assert_eq!(read_frame(&mut s), b"SPLIT ME");
    // Line framing: two messages in one write, one message over two writes.
    let (_s2, _d2, port) = server("line", "upper", "");
    let mut s = connect(port);
    s.write_all(b"one\ntw").unwrap();
    std::thread::sleep(Duration::from_millis(20));
    s.write_all(b"o\n").unwrap();
    let mut got = Vec::new();
    while got.len() < 8 {
        let mut buf = [0u8; 64];
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0);
        got.extend_from_slice(&buf[..n]);
    }
    assert_eq!(got, b"ONE\nTWO\n");
}

#[test]
fn a_peer_closing_mid_frame_is_logged_and_the_server_goes_on() {
    let (_s, d, port) = server("len32", "echo", "");
    let mut s = connect(port);
    s.write_all(&[0, 0, 0, 10, b'a', b'b']).unwrap();
    drop(s);
    d.lines.wait_for(
        &["closing connection: connection closed in the middle of a message"],
        T,
    );
    let mut s = connect(port);
    s.write_all(&frame(b"still here")).unwrap();
    assert_eq!(read_frame(&mut s), b"still here");
}

#[test]
fn an_all_ones_length_prefix_closes_only_that_connection() {
    let (_s, d, port) = server("len32", "echo", "max_message = \"1MiB\"");
    let mut other = connect(port);
    let mut s = connect(port);
    s.write_all(&[0xFF, 0xFF, 0xFF, 0xFF]).unwrap();
    assert_closed(&mut s);
    d.lines.wait_for(
        &["closing connection: message longer than 1048576 bytes"],
        T,
    );
    other.write_all(&frame(b"unaffected")).unwrap();
    assert_eq!(read_frame(&mut other), b"unaffected");
}

#[test]
fn an_oversize_line_closes_its_connection() {
    let (_s, d, port) = server("line", "echo", "max_message = \"16B\"");
    let mut s = connect(port);
    s.write_all(&[b'x'; 100]).unwrap();
    assert_closed(&mut s);
    d.lines.wait_for(&["message longer than 16 bytes"], T);
}

#[test]
fn connections_over_the_limit_are_refused() {
    let (_s, d, port) = server("line", "echo", "max_connections = 2");
    let mut a = connect(port);
    let mut b = connect(port);
    for s in [&mut a, &mut b] {
        s.write_all(b"hi\n").unwrap();
        let mut buf = [0u8; 3];
        s.read_exact(&mut buf).unwrap();
    }
    let mut c = connect(port);
    assert_closed(&mut c);
    d.lines
        .wait_for(&["refusing connection: max_connections (2) reached"], T);
    drop(a);
    // A freed slot is usable again.
    let deadline = std::time::Instant::now() + T;
    loop {
        let mut s = connect(port);
        s.write_all(b"again\n").unwrap();
        let mut buf = [0u8; 6];
        if s.read_exact(&mut buf).is_ok() {
            assert_eq!(&buf, b"again\n");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "slot never freed");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_handler_exception_skips_that_reply_and_keeps_the_connection() {
    let (_s, d, port) = server("line", "upper", "");
    let mut s = connect(port);
    s.write_all(b"boom\nafter\n").unwrap();
    let mut buf = [0u8; 6];
    s.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"AFTER\n");
    d.lines
        .wait_for(&["handler raised ValueError: handler exploded"], T);
}

#[test]
fn handlers_can_ask_for_peer_and_connection_id() {
    let (_s, _d, port) = server("line", "whoami", "");
    let mut s = connect(port);
    let local = s.local_addr().unwrap();
    s.write_all(b"x\n").unwrap();
    let mut got = String::new();
    let mut buf = [0u8; 64];
    while !got.ends_with('\n') {
        let n = s.read(&mut buf).unwrap();
        got.push_str(std::str::from_utf8(&buf[..n]).unwrap());
    }
    assert_eq!(got, format!("1@{local}:x\n"));
}

#[test]
fn idle_connections_are_closed_and_hooks_see_open_and_close() {
    let (_s, d, port) = server(
        "line",
        "echo",
        "idle_timeout = \"300ms\"\non_connect = \"h:opened\"\non_close = \"h:closed\"",
    );
    let mut s = connect(port);
    let local = s.local_addr().unwrap().to_string();
    d.lines
        .wait_for(&[&format!("hook open 1 {local}"), "role=srv"], T);
    s.write_all(b"ping\n").unwrap();
    let mut buf = [0u8; 5];
    s.read_exact(&mut buf).unwrap();
    // Then silence: the server closes the connection.
    assert_closed(&mut s);
    d.lines.wait_for(&["idle for 300ms, closing"], T);
    d.lines
        .wait_for(&[&format!("hook close 1 {local}"), "role=srv"], T);
}

#[test]
fn inline_dispatch_keeps_order_across_pipelined_and_split_frames() {
    let (_s, d, port) = server("len32", "upper", "dispatch = \"inline\"");
    d.lines.wait_for(&["listening", "role=srv"], T);
    let mut s = connect(port);
    // 200 pipelined requests in one write, then one frame byte by byte.
    pipeline_200(&mut s, <[u8]>::to_ascii_uppercase);
    for byte in frame(b"split") {
        s.write_all(&[byte]).unwrap();
    }
    assert_eq!(read_frame(&mut s), b"SPLIT");
    // A handler exception skips that reply; the connection carries on.
    s.write_all(&[frame(b"boom"), frame(b"after")].concat())
        .unwrap();
    assert_eq!(read_frame(&mut s), b"AFTER");
    d.lines
        .wait_for(&["handler raised ValueError: handler exploded"], T);
    // A bad length prefix closes only that connection.
    let mut bad = connect(port);
    bad.write_all(&[0xFF; 4]).unwrap();
    assert_closed(&mut bad);
    s.write_all(&frame(b"still here")).unwrap();
    assert_eq!(read_frame(&mut s), b"STILL HERE");
}

#[test]
fn inline_dispatch_runs_hooks_and_tags_output_on_its_own_thread() {
    let (_s, d, port) = server(
        "line",
        "whoami",
        "dispatch = \"inline\"\non_connect = \"h:opened\"\non_close = \"h:closed\"",
    );
    let mut s = connect(port);
    let local = s.local_addr().unwrap().to_string();
    s.write_all(b"x\n").unwrap();
    let mut got = vec![0u8; format!("1@{local}:x\n").len()];
    s.read_exact(&mut got).unwrap();
    assert_eq!(got, format!("1@{local}:x\n").as_bytes());
    drop(s);
    d.lines
        .wait_for(&[&format!("hook open 1 {local}"), "role=srv"], T);
    d.lines
        .wait_for(&[&format!("hook close 1 {local}"), "role=srv"], T);
}

#[test]
fn inline_dispatch_refuses_an_async_handler_at_start_up() {
    let s = Scenario::new();
    s.write("h.py", HANDLERS);
    let cfg = s.config(
        "[python]\npaths = [\".\"]\n[[tcp.server]]\nname = \"srv\"\nlisten = \"127.0.0.1:0\"\n\
         handler = \"h:jitter\"\ndispatch = \"inline\"\n",
    );
    for cmd in ["run", "check"] {
        let (code, _, err) = common::run_to_end(&[cmd, "-c", cfg.to_str().unwrap()], &[]);
        assert_eq!(code, 78, "{cmd}: {err}");
        assert!(err.contains("plain def handlers only"), "{cmd}: {err}");
    }
}

#[test]
fn a_hung_inline_handler_is_reported_with_its_stack_and_still_answers() {
    let s = Scenario::new();
    s.write("h.py", HANDLERS);
    let admin = common::free_port();
    let cfg = s.config(&format!(
        "[admin]\nlisten = \"127.0.0.1:{admin}\"\n[python]\npaths = [\".\"]\ncall_timeout = \"300ms\"\n\
         [[tcp.server]]\nname = \"srv\"\nlisten = \"127.0.0.1:0\"\nhandler = \"h:slow\"\ndispatch = \"inline\"\n"
    ));
    let health = || common::run_to_end(&["health", "-c", cfg.to_str().unwrap()], &[]).0;
    let mut d = Daemon::start(&cfg, &[]);
    d.wait_ready();
    assert_eq!(health(), 0);
    let mut s = connect(d.listening_port("srv"));
    s.write_all(b"hang\nnext\n").unwrap();
    // One multi-line event: the message, the stack, the thread's name.
    d.lines.wait_for(&["call running for at least"], T);
    d.lines.wait_for(&["in slow"], T);
    d.lines.wait_for(&["py-tcp-srv"], T);
    // Its only thread is busy: the role is down meanwhile.
    assert_eq!(
        health(),
        1,
        "a role whose thread is stuck must show as down"
    );
    // Nothing is lost: both replies arrive, in order, once the handler returns.
    let mut buf = [0u8; 10];
    s.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"hang\nnext\n");
    d.lines.wait_for(&["stuck call returned", "role=srv"], T);
    assert_eq!(health(), 0);
    d.signal("TERM");
    assert_eq!(d.wait_exit(T).code(), Some(0));
}

#[test]
fn an_inline_handler_can_wait_on_a_full_outbox_of_another_role() {
    let s = Scenario::new();
    s.write("h.py", HANDLERS);
    let port = common::free_port(); // nothing listens yet: the outbox fills
    let cfg = s.config(&format!(
        "[python]\npaths = [\".\"]\n[[tcp.server]]\nname = \"srv\"\nlisten = \"127.0.0.1:0\"\n\
         framing = \"line\"\nhandler = \"h:forward\"\ndispatch = \"inline\"\n\
         [[tcp.client]]\nname = \"out\"\nconnect = \"127.0.0.1:{port}\"\nframing = \"line\"\n\
         outbox = 1\nbackoff_min = \"20ms\"\nbackoff_max = \"50ms\"\n"
    ));
    let mut d = Daemon::start(&cfg, &[]);
    d.wait_ready();
    let mut s = connect(d.listening_port("srv"));
    s.write_all(b"msg\n").unwrap();
    std::thread::sleep(Duration::from_millis(300)); // the handler now waits
    let listener = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
    let (peer, _) = listener.accept().unwrap();
    peer.set_read_timeout(Some(T)).unwrap();
    let mut lines = std::io::BufReader::new(peer);
    for i in 0..3 {
        let mut l = String::new();
        std::io::BufRead::read_line(&mut lines, &mut l).unwrap();
        assert_eq!(l, format!("msg {i}\n"));
    }
    let mut reply = [0u8; 10];
    s.read_exact(&mut reply).unwrap();
    assert_eq!(&reply, b"forwarded\n");
    assert_eq!(d.lines.count(&["handler raised"]), 0, "{}", d.lines.text());
}

#[test]
fn raw_reads_longer_than_max_message_arrive_in_pieces_with_nothing_lost() {
    let (_s, d, port) = server("raw", "bracket", "max_message = \"4B\"");
    let mut s = connect(port);
    let sent = b"abcdefghijklmnopqrstuvwxyz";
    s.write_all(sent).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 256];
    // 26 bytes in pieces of at most 4: every piece comes back bracketed.
    while got.iter().filter(|b| **b != b'[' && **b != b']').count() < sent.len() {
        let n = s.read(&mut buf).unwrap();
        assert!(
            n > 0,
            "closed early; got {:?}",
            String::from_utf8_lossy(&got)
        );
        got.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8(got).unwrap();
    let pieces: Vec<&str> = text
        .split(']')
        .filter(|p| !p.is_empty())
        .map(|p| p.strip_prefix('[').unwrap())
        .collect();
    assert!(
        pieces.iter().all(|p| (1..=4).contains(&p.len())),
        "{pieces:?}"
    );
    assert_eq!(pieces.concat().as_bytes(), sent);
    assert_eq!(d.lines.count(&["closing connection"]), 0);
}

#[test]
fn a_connection_that_went_quiet_gave_back_its_buffers_and_still_answers_in_order() {
    let (_s, d, port) = server("len32", "echo", "");
    let mut c = connect(port);
    // Quiet past a second: its buffers go back; the next messages (one
    // larger than the first read buffer, and a pipelined burst) get new ones.
    c.write_all(&frame(b"before")).unwrap();
    assert_eq!(read_frame(&mut c), b"before");
    std::thread::sleep(Duration::from_millis(1500));
    let big: Vec<u8> = (0..100_000u32).map(|i| i as u8).collect();
    c.write_all(&frame(&big)).unwrap();
    assert_eq!(read_frame(&mut c), big);
    std::thread::sleep(Duration::from_millis(1500));
    let burst: Vec<u8> = (0..50u8).flat_map(|i| frame(&[i; 300])).collect();
    c.write_all(&burst).unwrap();
    for i in 0..50u8 {
        assert_eq!(read_frame(&mut c), [i; 300]);
    }
    drop(d);
}

#[test]
fn a_backlog_over_somaxconn_is_capped_and_said_and_zero_is_refused() {
    let somaxconn: u64 = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let over = somaxconn + 1;
    let (_s, d, port) = server("len32", "echo", &format!("backlog = {over}"));
    d.lines.wait_for(
        &[
            &format!("backlog {over} capped to {somaxconn} by net.core.somaxconn"),
            "role=srv",
        ],
        T,
    );
    let mut c = connect(port);
    c.write_all(&frame(b"ok")).unwrap();
    assert_eq!(read_frame(&mut c), b"ok");
    let s = Scenario::new();
    let cfg = s.config(
        "[[tcp.server]]\nname = \"srv\"\nlisten = \"127.0.0.1:0\"\nhandler = \"h:echo\"\nbacklog = 0\n",
    );
    let (code, _, err) = common::run_to_end(&["check", "-c", cfg.to_str().unwrap()], &[]);
    assert_eq!(code, 78, "{err}");
    assert!(err.contains("backlog must be at least 1"), "{err}");
}

#[test]
fn a_pool_with_more_threads_than_cores_does_not_spin_and_still_serves() {
    let cores = std::thread::available_parallelism().unwrap().get();
    let s = Scenario::new();
    s.write("h.py", HANDLERS);
    let cfg = s.config(&format!(
        "io_threads = {cores}\n[python]\npaths = [\".\"]\nworkers = 2\n\
         [[tcp.server]]\nname = \"srv\"\nlisten = \"127.0.0.1:0\"\nframing = \"len32\"\nhandler = \"h:echo\"\n"
    ));
    let mut d = Daemon::start(&cfg, &[]);
    d.wait_ready();
    d.lines.wait_for(
        &[&format!(
            "{} pool and I/O threads on {cores} core(s): the GIL pool will not spin",
            cores + 2
        )],
        T,
    );
    let mut c = connect(d.listening_port("srv"));
    for i in 0..100u32 {
        let msg = i.to_be_bytes();
        c.write_all(&frame(&msg)).unwrap();
        assert_eq!(read_frame(&mut c), msg);
    }
}
