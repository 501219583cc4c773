//! TCP echo benchmark, side by side in one run, on loopback: messages/s and
//! p50/p99 round-trip latency through a trivial Python echo for
//! - pyipcd (the release binary, a len32 `[[tcp.server]]`, `handlers:echo`),
//!   with `dispatch = "pool"` and with `dispatch = "inline"`, each on TCP
//!   loopback and on a Unix socket (`listen = "unix:…"`),
//! - a stdlib asyncio `Protocol` calling the same Python function,
//! - the same on uvloop (skipped when `import uvloop` fails),
//! - a Rust-only tokio len32 echo (the ceiling).
//!
//! Rows: C=1 ping-pong 64 B, C=64 ping-pong 64 B, C=64 pipelined ×16 64 B,
//! C=16 ping-pong 16 KiB, C=1000 ping-pong 64 B (fairness: its p99). Every
//! server is warmed up before each row. The C=1000 row measures at least 10 s
//! (its p99 needs ~500 round trips per connection).
//!
//! Run: `cargo build --release && cargo bench --bench tcp_echo -- --seconds 2`
//! (`--busy N`: N CPU-bound processes run beside it, a busy host)
//! (`--io-threads N --workers N` set pyipcd's `daemon.io_threads` / `python.workers`;
//! `--only A,B` / `--row TEXT` keep the servers / rows whose name contains one of them;
//! `--no-unix` leaves out the Unix-socket servers;
//! `--against PATH` adds pyipcd's TCP servers from another build, `PATH`,
//! to compare builds in the same run; `--sched-slice V` sets
//! `daemon.sched_slice` for this tree's servers only;
//! The last column is the CPU time the server process used per message
//! (`/proc/PID/stat`, 10 ms ticks: use rows of several seconds), which on a
//! busy host decides how often its wake-ups win a core.
//! `--interleave K` measures each row in K slices, the servers taking turns
//! slice by slice, each slice starting one server further on, so that a
//! noisy host's swings fall on every server alike; `--restart` also starts
//! every server process afresh for each slice; `--warm-up MS`: how long a
//! freshly started server is driven before measuring, default 500). With
//! slices, each pyipcd server is also compared with uvloop slice by slice
//! (the two ran within seconds of each other): in how many slices it made
//! at least uvloop's msg/s (with a sign test), the median slice ratio, the
//! run's total ratio with a 95% bootstrap interval, and in how many slices
//! it had at most uvloop's p99.

use std::net::SocketAddr;
use std::process::Child;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;

#[path = "common/args.rs"]
mod args;
#[path = "common/busy.rs"]
mod busy;
#[path = "common/daemon.rs"]
mod daemon;
#[path = "common/load.rs"]
mod load;
#[path = "common/paired.rs"]
mod paired;
#[path = "common/python_echo.rs"]
mod python_echo;
use args::{arg, arg_text};
use load::{Addr, Row, drive_timed};
use python_echo::free_port;

struct Server {
    name: String,
    addr: Addr,
    child: Option<Child>,
    /// pyipcd's admin endpoint (`--metrics` prints its pool counters).
    admin: Option<SocketAddr>,
    /// Starts the server again, a new process on the same address
    /// (`--restart`, which restarts servers on TCP only); `None` for the
    /// in-process ceilings.
    again: Option<Box<dyn Fn() -> Child>>,
}

impl Server {
    /// Replaces the server's process with a fresh one, if it has one.
    fn restart(&mut self) {
        let (Some(again), Addr::Tcp(addr)) = (&self.again, &self.addr) else {
            return;
        };
        if let Some(mut old) = self.child.take() {
            let _ = old.kill();
            let _ = old.wait();
        }
        self.child = Some(again());
        daemon::wait_listening(*addr);
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(c) = &mut self.child {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A pyipcd server with `dispatch`, on TCP or a Unix socket, from this
/// tree's release binary (or `--bin`), or from `other`, another build
/// (`--against`), whose rows are marked with its path.
fn pyipcd_server(dir: &std::path::Path, dispatch: &str, unix: bool, other: Option<&str>) -> Server {
    let port = free_port();
    let tag = if other.is_some() { "-other" } else { "" };
    let sock = dir.join(format!("bench-{dispatch}{tag}.sock"));
    let listen = if unix {
        format!("unix:{}", sock.display())
    } else {
        format!("127.0.0.1:{port}")
    };
    // The admin endpoint only with `--metrics`: with it, every message is
    // also timed into a histogram.
    let admin_port = std::env::args().any(|a| a == "--metrics").then(free_port);
    let admin = admin_port.map_or(String::new(), |p| {
        format!("[admin]\nlisten = \"127.0.0.1:{p}\"\n")
    });
    let root = env!("CARGO_MANIFEST_DIR");
    // `--sched-slice V`: `daemon.sched_slice` for this tree's servers (a
    // build from before the setting would refuse the key).
    let slice = match (arg_text("--sched-slice"), other) {
        (Some(v), None) => format!("sched_slice = \"{v}\"\n"),
        _ => String::new(),
    };
    let cfg = dir.join(format!("bench-{dispatch}-{unix}{tag}.toml"));
    std::fs::write(
        &cfg,
        format!(
            "[log]\nlevel = \"warn\"\n{admin}[daemon]\nio_threads = {}\n{slice}[python]\npaths = [\"{root}/python\"]\nworkers = {}\nspin = \"{}us\"\ncaller_polls = {}\n\
             [[tcp.server]]\nname = \"bench\"\nlisten = \"{listen}\"\nframing = \"len32\"\nhandler = \"handlers:echo\"\n\
             max_message = \"1MiB\"\npipeline = 64\ndispatch = \"{dispatch}\"\n",
            arg("--io-threads", 1.0) as usize,
            arg("--workers", 1.0) as usize,
            arg("--spin-us", 50.0) as u64,
            arg("--caller-polls", 128.0) as u32
        ),
    )
    .unwrap();
    let bin = other.map(str::to_string);
    let again = move || match &bin {
        Some(bin) => daemon::spawn_binary(bin, &cfg),
        None => daemon::spawn_release(&cfg),
    };
    let child = again();
    let addr = if unix {
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::os::unix::net::UnixStream::connect(&sock).is_err() {
            assert!(
                Instant::now() < deadline,
                "server on {} never came up",
                sock.display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Addr::Unix(sock)
    } else {
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        daemon::wait_listening(addr);
        Addr::Tcp(addr)
    };
    let kind = if unix { "Unix socket" } else { "TCP" };
    let mut name = if dispatch == "inline" {
        format!("pyipcd inline, {kind} (role's own GIL thread)")
    } else {
        format!(
            "pyipcd pool, {kind} ({} io + {} GIL thread)",
            arg("--io-threads", 1.0),
            arg("--workers", 1.0)
        )
    };
    if let Some(bin) = other {
        name = format!("{name} [{bin}]");
    }
    Server {
        name,
        addr,
        child: Some(child),
        admin: admin_port.map(|p| SocketAddr::from(([127, 0, 0, 1], p))),
        again: Some(Box::new(again)),
    }
}

/// `name value` of each `pyipcd_pool_*` series on `admin`'s `/metrics`.
fn pool_counters(admin: SocketAddr) -> Vec<(String, f64)> {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(admin) else {
        return Vec::new();
    };
    let _ = s.write_all(b"GET /metrics HTTP/1.1\r\nHost: b\r\nConnection: close\r\n\r\n");
    let mut text = String::new();
    let _ = s.read_to_string(&mut text);
    text.lines()
        .filter(|l| l.starts_with("pyipcd_pool_"))
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_string(), v.parse().ok()?))
        })
        .collect()
}

fn python_server(uvloop: bool) -> Option<Server> {
    let (child, addr) = python_echo::spawn_python_echo(uvloop, 4096)?;
    let again = move || {
        python_echo::spawn_python_echo_on(addr.port(), uvloop, 4096, &[]).expect("it started once")
    };
    Some(Server {
        name: if uvloop {
            "uvloop Protocol + Python echo".into()
        } else {
            "asyncio Protocol + Python echo".into()
        },
        addr: Addr::Tcp(addr),
        child: Some(child),
        admin: None,
        again: Some(Box::new(again)),
    })
}

/// The ceiling: no Python, every complete frame in a read echoed with one write.
async fn rust_echo(listener: TcpListener) {
    loop {
        let (s, _) = listener.accept().await.unwrap();
        let _ = s.set_nodelay(true);
        tokio::spawn(echo_frames(s));
    }
}

/// The ceiling on a Unix socket.
async fn rust_echo_unix(listener: tokio::net::UnixListener) {
    loop {
        let (s, _) = listener.accept().await.unwrap();
        tokio::spawn(echo_frames(s));
    }
}

/// Echoes every complete len32 frame in a read with one write.
async fn echo_frames<S: AsyncRead + AsyncWrite + Unpin>(mut s: S) {
    let mut buf = bytes::BytesMut::with_capacity(64 * 1024);
    loop {
        match s.read_buf(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let mut complete = 0;
        while buf.len() >= complete + 4 {
            let n = u32::from_be_bytes(buf[complete..complete + 4].try_into().unwrap()) as usize;
            if buf.len() < complete + 4 + n {
                break;
            }
            complete += 4 + n;
        }
        if complete > 0 {
            let out = buf.split_to(complete);
            if s.write_all(&out).await.is_err() {
                return;
            }
        }
    }
}

fn main() {
    let seconds = arg("--seconds", 2.0);
    // `--busy N`: N CPU-bound processes beside servers and clients.
    let busy = arg("--busy", 0.0) as usize;
    let _busy = busy::busy_host(busy);
    if busy > 0 {
        println!("({busy} CPU-bound processes running beside the bench)\n");
    }
    // The load generator: one thread, a current-thread runtime, whose run
    // queue is FIFO and unbounded, so it is fair to 1000 connections (a
    // one-worker multi-thread runtime overflows its 256-task local queue
    // into a global one that waits, which showed in every server's p99).
    let load = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    // The ceiling runs like pyipcd's default: one current-thread runtime on a thread of its own.
    let rust_listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let rust_addr = rust_listener.local_addr().unwrap();
    rust_listener.set_nonblocking(true).unwrap();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move { rust_echo(TcpListener::from_std(rust_listener).unwrap()).await });
    });

    let mut servers = vec![
        pyipcd_server(dir.path(), "pool", false, None),
        pyipcd_server(dir.path(), "inline", false, None),
    ];
    // `--against PATH`: the same TCP servers from another build, measured
    // in the same run (interleaved too, with `--interleave`).
    if let Some(other) = arg_text("--against") {
        servers.push(pyipcd_server(dir.path(), "pool", false, Some(&other)));
        servers.push(pyipcd_server(dir.path(), "inline", false, Some(&other)));
    }
    if !std::env::args().any(|a| a == "--no-unix") {
        servers.push(pyipcd_server(dir.path(), "pool", true, None));
        servers.push(pyipcd_server(dir.path(), "inline", true, None));
    }
    servers.extend(python_server(false));
    servers.extend(python_server(true));
    servers.push(Server {
        name: "Rust-only tokio echo, TCP (ceiling)".into(),
        addr: Addr::Tcp(rust_addr),
        child: None,
        admin: None,
        again: None,
    });
    if !std::env::args().any(|a| a == "--no-unix") {
        let path = dir.path().join("ceiling.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        listener.set_nonblocking(true).unwrap();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                rust_echo_unix(tokio::net::UnixListener::from_std(listener).unwrap()).await
            });
        });
        servers.push(Server {
            name: "Rust-only tokio echo, Unix socket (ceiling)".into(),
            addr: Addr::Unix(path),
            child: None,
            admin: None,
            again: None,
        });
    }
    let rows = [
        Row {
            label: "C=1 ping-pong 64 B",
            conns: 1,
            depth: 1,
            size: 64,
            min_seconds: 0.0,
        },
        Row {
            label: "C=64 ping-pong 64 B",
            conns: 64,
            depth: 1,
            size: 64,
            min_seconds: 0.0,
        },
        Row {
            label: "C=64 pipelined x16 64 B",
            conns: 64,
            depth: 16,
            size: 64,
            min_seconds: 0.0,
        },
        Row {
            label: "C=16 ping-pong 16 KiB",
            conns: 16,
            depth: 1,
            size: 16 * 1024,
            min_seconds: 0.0,
        },
        Row {
            label: "C=1000 ping-pong 64 B",
            conns: 1000,
            depth: 1,
            size: 64,
            min_seconds: 10.0,
        },
    ];
    // `--only A,B` / `--row TEXT`: keep servers whose name contains A or B /
    // rows whose label contains TEXT (or one of `A,B`).
    let only = arg_text("--only").unwrap_or_default();
    let row_filter = arg_text("--row").unwrap_or_default();
    servers.retain(|s| only.split(',').any(|o| s.name.contains(o)));
    println!("| workload | server | msg/s | p50 µs | p99 µs | server CPU µs/msg |");
    println!("| --- | --- | ---: | ---: | ---: | ---: |");
    // `--metrics`: after each pyipcd row, how its calls were made.
    let metrics = std::env::args().any(|a| a == "--metrics");
    // `--interleave K`: K slices per row, servers taking turns (a shorter
    // warm-up per slice: the servers are warm after the first).
    let slices = (arg("--interleave", 1.0) as usize).max(1);
    let restart = std::env::args().any(|a| a == "--restart");
    // `--warm-up MS`: the warm-up of a fresh server (default 500 ms).
    let fresh_warm_up = arg("--warm-up", 500.0) as u64;
    for row in rows
        .iter()
        .filter(|r| row_filter.split(',').any(|f| r.label.contains(f)))
    {
        let seconds = seconds.max(row.min_seconds);
        let mut results: Vec<(u64, Histogram<u64>)> = servers
            .iter()
            .map(|_| (0, Histogram::<u64>::new(3).unwrap()))
            .collect();
        // CPU seconds each server process used while measured (none for the in-process ceiling).
        let mut cpu: Vec<f64> = vec![0.0; servers.len()];
        // Per server, per slice: msg/s and p99 µs.
        let mut by_slice: Vec<Vec<(f64, f64)>> = vec![Vec::new(); servers.len()];
        for slice in 0..slices {
            // `--restart`: fresh server processes for every slice after the
            // first, so that what one process happened to get (its threads'
            // CPUs, its memory layout) is averaged over the slices too.
            let fresh = restart && slice > 0;
            if fresh {
                servers.iter_mut().for_each(Server::restart);
            }
            let warm_up = Duration::from_millis(if slice == 0 || fresh {
                fresh_warm_up
            } else {
                200
            });
            // Each slice starts one server further on: whoever runs first
            // after a pause (or right after a given other) has no fixed seat.
            for i in (0..servers.len()).map(|k| (k + slice) % servers.len()) {
                let (server, (total, hist)) = (&servers[i], &mut results[i]);
                let before = server.admin.filter(|_| metrics).map(pool_counters);
                let pids: Vec<u32> = server.child.iter().map(Child::id).collect();
                let slice = seconds / slices as f64;
                let (msgs, h, used) =
                    load.block_on(drive_timed(&server.addr, row, warm_up, slice, &pids));
                cpu[i] += used;
                by_slice[i].push((
                    msgs as f64 / slice,
                    h.value_at_quantile(0.99) as f64 / 1000.0,
                ));
                *total += msgs;
                hist.add(h).unwrap();
                if let (Some(admin), Some(before)) = (server.admin, before) {
                    let after = pool_counters(admin);
                    let delta = |k: &str| {
                        let v = |c: &[(String, f64)]| {
                            c.iter().find(|(n, _)| n == k).map_or(0.0, |x| x.1)
                        };
                        v(&after) - v(&before)
                    };
                    eprintln!(
                        "  {}: {:.0} calls, {:.0} made on the I/O thread, {:.0} spin gate shuts",
                        server.name,
                        delta("pyipcd_pool_calls_total"),
                        delta("pyipcd_pool_calls_here_total"),
                        delta("pyipcd_pool_spin_gate_shuts_total")
                    );
                }
            }
        }
        for ((server, (total, hist)), cpu) in servers.iter().zip(&results).zip(&cpu) {
            let per_msg = if server.child.is_some() && *total > 0 {
                format!("{:.1}", cpu * 1e6 / *total as f64)
            } else {
                "-".into()
            };
            println!(
                "| {} | {} | {:.0} | {:.1} | {:.1} | {per_msg} |",
                row.label,
                server.name,
                *total as f64 / seconds,
                hist.value_at_quantile(0.5) as f64 / 1000.0,
                hist.value_at_quantile(0.99) as f64 / 1000.0
            );
        }
        if slices > 1 {
            paired_with_uvloop(row.label, &servers, &by_slice);
        }
    }
}

/// Prints, for each pyipcd server, how it fared against uvloop slice by
/// slice (`by_slice`: per server, per slice, msg/s and p99).
fn paired_with_uvloop(label: &str, servers: &[Server], by_slice: &[Vec<(f64, f64)>]) {
    let Some(uvloop) = servers.iter().position(|s| s.name.starts_with("uvloop")) else {
        return;
    };
    let rates = |slices: &[(f64, f64)]| slices.iter().map(|s| s.0).collect::<Vec<_>>();
    let reference = rates(&by_slice[uvloop]);
    for (server, slices) in servers.iter().zip(by_slice) {
        if !server.name.starts_with("pyipcd") {
            continue;
        }
        let p = paired::compare(&rates(slices), &reference);
        let tail = slices
            .iter()
            .zip(&by_slice[uvloop])
            .filter(|(a, b)| a.1 <= b.1)
            .count();
        eprintln!(
            "  {label}, {} vs uvloop: msg/s at or above in {} of {n} slices (sign test p = {:.3}), \
             median ratio {:.2}, total {:.3} (95% bootstrap {:.3}-{:.3}); p99 at or below in {tail} of {n}",
            server.name,
            p.at_or_above,
            p.sign_p,
            p.median_ratio,
            p.total_ratio,
            p.interval.0,
            p.interval.1,
            n = p.n
        );
    }
}
