//! Caller runs (`py::pool::here`): when spinning cannot pay (here: more pool
//! and I/O threads than cores), a proven-fast handler of a `dispatch = "pool"`
//! server runs on the I/O thread; a handler that turns out slow goes back to
//! the GIL pool for good, and one that is slow from the start never leaves it.
//! Each reply names the OS thread that ran the handler.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::{Daemon, Scenario, free_port, http_get, metric};

const T: Duration = Duration::from_secs(15);

const HANDLERS: &str = r#"
import threading, time

def _thread():
    with open(f"/proc/self/task/{threading.get_native_id()}/comm") as f:
        return f.read().strip().encode()

def where(data):
    if data == b"block":
        time.sleep(0.2)
    return _thread()

def slowpoke(data):
    time.sleep(0.06)
    return _thread()
"#;

/// A daemon whose pool and I/O threads outnumber the cores, with `where`
/// and `slowpoke` servers; returns it, its admin port and the two ports.
fn oversubscribed() -> (Scenario, Daemon, u16, u16, u16) {
    let cores = std::thread::available_parallelism().unwrap().get();
    let admin = free_port();
    let s = Scenario::new();
    s.write("h.py", HANDLERS);
    let cfg = s.config(&format!(
        "io_threads = {cores}\n[admin]\nlisten = \"127.0.0.1:{admin}\"\n[python]\npaths = [\".\"]\nworkers = 2\n\
         [[tcp.server]]\nname = \"fast\"\nlisten = \"127.0.0.1:0\"\nframing = \"len32\"\nhandler = \"h:where\"\n\
         [[tcp.server]]\nname = \"slow\"\nlisten = \"127.0.0.1:0\"\nframing = \"len32\"\nhandler = \"h:slowpoke\"\n"
    ));
    let mut d = Daemon::start(&cfg, &[]);
    d.wait_ready();
    d.lines.wait_for(&["the GIL pool will not spin"], T);
    let (fast, slow) = (d.listening_port("fast"), d.listening_port("slow"));
    (s, d, admin, fast, slow)
}

fn call(c: &mut TcpStream, payload: &[u8]) -> String {
    let mut msg = (payload.len() as u32).to_be_bytes().to_vec();
    msg.extend_from_slice(payload);
    c.write_all(&msg).unwrap();
    let mut len = [0u8; 4];
    c.read_exact(&mut len).unwrap();
    let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
    c.read_exact(&mut body).unwrap();
    String::from_utf8(body).unwrap()
}

fn connect(port: u16) -> TcpStream {
    let c = TcpStream::connect(("127.0.0.1", port)).unwrap();
    c.set_read_timeout(Some(T)).unwrap();
    c
}

#[test]
fn a_proven_fast_handler_runs_on_the_io_thread_until_it_blocks() {
    let (_s, d, admin, fast, _) = oversubscribed();
    let mut c = connect(fast);
    // The first 16 calls prove the handler on the pool.
    for i in 0..16 {
        let t = call(&mut c, b"x");
        assert!(t.starts_with("py-pool-"), "call {i} ran on {t}");
    }
    let here = call(&mut c, b"x");
    assert!(!here.starts_with("py-pool-"), "proven, yet ran on {here}");
    for _ in 0..50 {
        assert_eq!(call(&mut c, b"x"), here, "stays on the I/O thread");
    }
    let (_, body) = http_get(admin, "/metrics");
    assert!(metric(&body, "pyipcd_pool_calls_here") >= 51.0, "{body}");

    // One call blocks for 200 ms on the I/O thread; from then on, the pool.
    assert_eq!(call(&mut c, b"block"), here);
    d.lines.wait_for(
        &[
            "role=fast",
            "calls take up to 200.",
            "this handler's calls stay on the GIL pool",
        ],
        T,
    );
    for _ in 0..20 {
        let t = call(&mut c, b"x");
        assert!(t.starts_with("py-pool-"), "after blocking, ran on {t}");
    }
}

#[test]
fn a_handler_slow_from_the_start_never_runs_on_the_io_thread() {
    let (_s, d, admin, fast, slow) = oversubscribed();
    let mut c = connect(slow);
    for i in 0..20 {
        let t = call(&mut c, b"x");
        assert!(t.starts_with("py-pool-"), "slow call {i} ran on {t}");
    }
    // While it sleeps on the pool, another role is still answered.
    let mut other = connect(fast);
    assert!(call(&mut other, b"x").starts_with("py-pool-"));
    let (_, body) = http_get(admin, "/metrics");
    assert_eq!(metric(&body, "pyipcd_pool_calls_here"), 0.0, "{body}");
    assert_eq!(d.lines.count(&["stay on the GIL pool"]), 0);
}
