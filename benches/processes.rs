//! Past one GIL: a CPU-bound handler (about `--work-us` µs of pure Python
//! per message, 50 by default, the loop calibrated here) behind a len32
//! server at C=64 ping-pong, served by pyipcd with `daemon.processes` = 1
//! and = 2 (each with `dispatch = "pool"` and `"inline"`), beside the same handler in one uvloop process and in two
//! sharing the port with `SO_REUSEPORT` (what a Python user does instead).
//! The servers take turns slice by slice (`--interleave`, default 10), so a
//! noisy host's swings fall on all of them. For pyipcd with 2 processes it
//! also prints how the messages were spread over the workers.
//!
//! Run: `cargo build --release && cargo bench --bench processes -- --seconds 10`
//! (`--conns N`, `--work-us N`, `--interleave K`, `--dispatch pool,inline`, `--bin PATH`;
//! `BENCH_DAEMON_LOG=1` shows the daemons' logs, at `info`).

use std::net::SocketAddr;
use std::process::{Child, Command};
use std::time::Duration;

use hdrhistogram::Histogram;

#[path = "common/args.rs"]
mod args;
#[path = "common/daemon.rs"]
mod daemon;
// Each bench uses part of the shared modules.
#[allow(dead_code)]
#[path = "common/load.rs"]
mod load;
#[allow(dead_code)]
#[path = "common/python_echo.rs"]
mod python_echo;
use args::arg;
use load::{Addr, Row, drive_timed};
use python_echo::free_port;

/// A server under test and the processes to stop afterwards.
struct Server {
    name: String,
    addr: SocketAddr,
    children: Vec<Child>,
    /// pyipcd's admin endpoint (per-worker message counts).
    admin: Option<u16>,
}

impl Drop for Server {
    fn drop(&mut self) {
        for c in &mut self.children {
            // SIGTERM, so a supervisor stops its workers.
            let _ = Command::new("kill").arg(c.id().to_string()).status();
            let _ = c.wait();
        }
    }
}

/// The loop count that makes `cpu_work.work` take about `micros` µs here.
fn calibrate(dir: &std::path::Path, micros: f64) -> u64 {
    const PROBE: u64 = 2000;
    write_work(dir, PROBE);
    let out = Command::new("python3")
        .arg("-c")
        .arg(format!(
            "import sys, time; sys.path.insert(0, {dir:?}); from cpu_work import work\n\
             work(b'x'); t = time.perf_counter()\nfor _ in range(2000): work(b'x')\n\
             print((time.perf_counter() - t) / 2000 * 1e6)",
            dir = dir.display().to_string()
        ))
        .output()
        .expect("python3");
    let per_call: f64 = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("calibration output");
    ((PROBE as f64) * micros / per_call).round() as u64
}

/// `dir/cpu_work.py`: a pure-Python loop of `loops` steps per message.
fn write_work(dir: &std::path::Path, loops: u64) {
    std::fs::write(
        dir.join("cpu_work.py"),
        format!(
            "LOOPS = {loops}\n\ndef work(data):\n    x = 0\n    for i in range(LOOPS):\n        x += i * i\n    return data\n"
        ),
    )
    .unwrap();
}

fn pyipcd(dir: &std::path::Path, processes: usize, dispatch: &str) -> Server {
    let (port, admin) = (free_port(), free_port());
    let cfg = dir.join(format!("processes-{processes}-{dispatch}.toml"));
    std::fs::write(
        &cfg,
        format!(
            "[log]\nlevel = \"{level}\"\n[admin]\nlisten = \"127.0.0.1:{admin}\"\n\
             [daemon]\nprocesses = {processes}\nio_threads = 1\n[python]\npaths = [\"{}\"]\nworkers = 1\n\
             [[tcp.server]]\nname = \"work\"\nlisten = \"127.0.0.1:{port}\"\nframing = \"len32\"\nhandler = \"cpu_work:work\"\ndispatch = \"{}\"\n",
            dir.display(),
            dispatch,
            level = if std::env::var_os("BENCH_DAEMON_LOG").is_some() {
                "info"
            } else {
                "warn"
            },
        ),
    )
    .unwrap();
    let child = daemon::spawn_release(&cfg);
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    daemon::wait_listening(addr);
    // Every worker up (each answers /health through the supervisor's).
    std::thread::sleep(Duration::from_secs(1));
    Server {
        name: format!("pyipcd {dispatch}, daemon.processes = {processes}"),
        addr,
        children: vec![child],
        admin: Some(admin),
    }
}

fn uvloop(dir: &std::path::Path, processes: usize) -> Option<Server> {
    let port = free_port();
    let handler = dir.display().to_string();
    let mut children = Vec::new();
    for _ in 0..processes {
        let extra = ["--reuseport", "--handler-dir", handler.as_str()];
        children.push(python_echo::spawn_python_echo_on(port, true, 4096, &extra)?);
    }
    // The second process binds a moment after the first accepts.
    std::thread::sleep(Duration::from_secs(1));
    Some(Server {
        name: format!("uvloop x {processes}, SO_REUSEPORT"),
        addr: SocketAddr::from(([127, 0, 0, 1], port)),
        children,
        admin: None,
    })
}

/// Series counted per worker (`pyipcd_messages_total` first), as printed after the table.
const PER_WORKER: [(&str, &str); 3] = [
    ("pyipcd_messages_total{", "messages"),
    (
        "pyipcd_pool_calls_here_total{",
        "pool calls made on the I/O thread",
    ),
    ("pyipcd_pool_spin_gate_shuts_total{", "spin gate shuts"),
];

/// Series `prefix` per worker, from the supervisor's `/metrics`.
fn per_worker(admin: u16, prefix: &str) -> Vec<(String, f64)> {
    let Ok((200, text)) = pyipcd::admin::fetch(&format!("127.0.0.1:{admin}"), "/metrics") else {
        return Vec::new();
    };
    text.lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| {
            let worker = l.split("worker=\"").nth(1)?.split('"').next()?.to_string();
            Some((worker, l.rsplit(' ').next()?.parse().ok()?))
        })
        .collect()
}

fn main() {
    let seconds = arg("--seconds", 10.0);
    let slices = (arg("--interleave", 10.0) as usize).max(1);
    let row = Row {
        label: "C=64 ping-pong 64 B, CPU-bound handler",
        conns: arg("--conns", 64.0) as usize,
        depth: 1,
        size: 64,
        min_seconds: 0.0,
    };
    let dir = tempfile::tempdir().unwrap();
    let micros = arg("--work-us", 50.0);
    let loops = calibrate(dir.path(), micros);
    write_work(dir.path(), loops);
    println!("handler: {loops} loop steps = about {micros} µs of Python per message here\n");
    let dispatch = args::arg_text("--dispatch").unwrap_or_else(|| "pool,inline".into());
    let mut servers = Vec::new();
    for d in dispatch.split(',') {
        servers.push(pyipcd(dir.path(), 1, d));
        servers.push(pyipcd(dir.path(), 2, d));
    }
    servers.extend(uvloop(dir.path(), 1));
    servers.extend(uvloop(dir.path(), 2));
    let load = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let counts = |s: &Server| {
        s.admin
            .map(|a| PER_WORKER.map(|(prefix, _)| per_worker(a, prefix)))
    };
    let before: Vec<_> = servers.iter().map(counts).collect();
    let mut results: Vec<(u64, Histogram<u64>)> = servers
        .iter()
        .map(|_| (0, Histogram::<u64>::new(3).unwrap()))
        .collect();
    let mut cpu = vec![0.0; servers.len()];
    for slice in 0..slices {
        let warm_up = Duration::from_millis(if slice == 0 { 500 } else { 200 });
        for (i, (server, (total, hist))) in servers.iter().zip(results.iter_mut()).enumerate() {
            // The CPU of every process of the server (supervisor and
            // workers; or both uvloop processes).
            let pids: Vec<u32> = server.children.iter().map(Child::id).collect();
            let (msgs, h, used) = load.block_on(drive_timed(
                &Addr::Tcp(server.addr),
                &row,
                warm_up,
                seconds / slices as f64,
                &pids,
            ));
            *total += msgs;
            hist.add(h).unwrap();
            cpu[i] += used;
        }
    }
    println!("| workload | server | msg/s | p50 µs | p99 µs | server CPU µs/msg |");
    println!("| --- | --- | ---: | ---: | ---: | ---: |");
    for ((server, (total, hist)), cpu) in servers.iter().zip(&results).zip(&cpu) {
        println!(
            "| {} | {} | {:.0} | {:.1} | {:.1} | {:.1} |",
            row.label,
            server.name,
            *total as f64 / seconds,
            hist.value_at_quantile(0.5) as f64 / 1000.0,
            hist.value_at_quantile(0.99) as f64 / 1000.0,
            cpu * 1e6 / (*total).max(1) as f64
        );
    }
    // Each server with 2 processes against the same with 1 (the row before it).
    println!();
    for i in (1..servers.len()).step_by(2) {
        println!(
            "{} -> 2 processes: {:.2}x",
            servers[i - 1].name,
            results[i].0 as f64 / results[i - 1].0 as f64
        );
    }
    for (server, before) in servers.iter().zip(&before) {
        let (Some(after), Some(before)) = (counts(server), before) else {
            continue;
        };
        for ((after, before), (_, what)) in after.iter().zip(before).zip(PER_WORKER) {
            let spread: Vec<String> = after
                .iter()
                .map(|(w, n)| {
                    let b = before.iter().find(|(bw, _)| bw == w).map_or(0.0, |x| x.1);
                    format!("worker {w}: {:.0}", n - b)
                })
                .collect();
            if !spread.is_empty() {
                println!("{}: {what} by worker: {}", server.name, spread.join(", "));
            }
        }
    }
}
