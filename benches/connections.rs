//! Many connections, side by side in one run: pyipcd (a len32 `[[tcp.server]]`,
//! pool dispatch, the release binary) beside a uvloop and an asyncio
//! `Protocol` server, all with the same listen backlog (`--backlog`, default
//! 4096, pyipcd's default), each fresh:
//! - **sequential connects**: N clients connect one after another, as fast
//!   as each connect returns (an accept queue that overflows costs a SYN
//!   retry of a second);
//! - **idle memory**: the server's RSS with the N connections open and idle,
//!   minus its RSS before them, per connection;
//! - **after traffic**: every connection sends one 64 B message and reads
//!   the reply, then all go quiet for 3 s: RSS per connection again.
//!
//! Run: `cargo build --release && cargo bench --bench connections -- --conns 10000`
//! (the file-descriptor limit must allow N per process; `--only A,B` keeps
//! the servers whose name contains A or B; `--settle S` how long the
//! connections stay quiet before the last reading, 3 s: pyipcd releases a
//! quiet connection's buffers after 1 s and purges freed memory within 1 s more).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Child;
use std::time::{Duration, Instant};

#[path = "common/args.rs"]
mod args;
#[path = "common/daemon.rs"]
mod daemon;
#[path = "common/python_echo.rs"]
mod python_echo;
use args::{arg, arg_text};
use python_echo::free_port;

struct Server {
    name: &'static str,
    addr: SocketAddr,
    child: Child,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn pyipcd(dir: &std::path::Path, conns: usize) -> Server {
    let port = free_port();
    let root = env!("CARGO_MANIFEST_DIR");
    let cfg = dir.join("bench.toml");
    std::fs::write(
        &cfg,
        format!(
            "[log]\nlevel = \"warn\"\n[python]\npaths = [\"{root}/python\"]\n\
             [[tcp.server]]\nname = \"bench\"\nlisten = \"127.0.0.1:{port}\"\nframing = \"len32\"\n\
             handler = \"handlers:echo\"\nmax_connections = {}\nbacklog = {}\n",
            conns + 16,
            backlog()
        ),
    )
    .unwrap();
    let child = daemon::spawn_release(&cfg);
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    daemon::wait_listening(addr);
    Server {
        name: "pyipcd pool",
        addr,
        child,
    }
}

fn python(uvloop: bool) -> Option<Server> {
    let (child, addr) = python_echo::spawn_python_echo(uvloop, backlog())?;
    Some(Server {
        name: if uvloop {
            "uvloop Protocol"
        } else {
            "asyncio Protocol"
        },
        addr,
        child,
    })
}

/// `--backlog N` (default pyipcd's, 4096) for every server.
fn backlog() -> u32 {
    arg("--backlog", 4096.0) as u32
}

/// The process's resident set, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

fn echo(s: &mut TcpStream) {
    let mut frame = 64u32.to_be_bytes().to_vec();
    frame.extend([7u8; 64]);
    s.write_all(&frame).unwrap();
    let mut back = vec![0u8; frame.len()];
    s.read_exact(&mut back).unwrap();
    assert_eq!(back, frame);
}

fn main() {
    let n = arg("--conns", 10000.0) as usize;
    let only = arg_text("--only").unwrap_or_default();
    let dir = tempfile::tempdir().unwrap();
    println!(
        "| server | {n} sequential connects, s | slowest connect, ms | idle KiB/conn | after one message, KiB/conn |"
    );
    println!("| --- | ---: | ---: | ---: | ---: |");
    let starts: [&dyn Fn() -> Option<Server>; 3] =
        [&|| Some(pyipcd(dir.path(), n)), &|| python(true), &|| {
            python(false)
        }];
    for start in starts {
        let Some(server) = start() else { continue };
        if !only.split(',').any(|o| server.name.contains(o)) {
            continue;
        }
        let pid = server.child.id();
        // Warm up: the first connections and messages allocate once-only state.
        for _ in 0..50 {
            echo(&mut connect(server.addr));
        }
        std::thread::sleep(Duration::from_millis(1500));
        let before = rss_kib(pid);
        let started = Instant::now();
        let mut slowest = Duration::ZERO;
        let mut open = Vec::with_capacity(n);
        for _ in 0..n {
            let t = Instant::now();
            open.push(connect(server.addr));
            slowest = slowest.max(t.elapsed());
        }
        let connects = started.elapsed();
        // Let the server accept (and set up) every one of them.
        std::thread::sleep(Duration::from_millis(1500));
        let idle = rss_kib(pid);
        for s in &mut open {
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            echo(s);
        }
        std::thread::sleep(Duration::from_secs_f64(arg("--settle", 3.0)));
        let after = rss_kib(pid);
        let per = |kib: u64| kib.saturating_sub(before) as f64 / n as f64;
        println!(
            "| {} | {:.3} | {:.1} | {:.2} | {:.2} |",
            server.name,
            connects.as_secs_f64(),
            slowest.as_secs_f64() * 1000.0,
            per(idle),
            per(after)
        );
        drop(open);
    }
}

/// Connects with `SO_LINGER` 0, so closing sends a reset and leaves no
/// `TIME_WAIT` behind: the next run, often on the same server port, would
/// otherwise sometimes reuse a 4-tuple still in `TIME_WAIT` and wait 1 s for
/// a SYN retry (seen as a 1,000 ms "slowest connect" for every server).
fn connect(addr: std::net::SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).unwrap();
    socket2::SockRef::from(&s)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    s
}
