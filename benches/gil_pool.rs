//! GIL hand-off benchmark: a trivial `def echo(b): return b` on 64-byte `bytes`,
//! called (1) directly on one attached thread (the ceiling), (2) through
//! `spawn_blocking` + `Python::attach` per call (the obvious design), and
//! (3) through pyipcd's `GilPool`, at several concurrencies.
//!
//! (4) through a plain channel-fed pool (attached threads, one channel, a
//! oneshot per call, no spinning: the baseline the GilPool must beat).
//!
//! Run: `cargo bench --bench gil_pool` (options: `--seconds S`, `--workers N`,
//! `--io-threads N`, `--busy N` for N CPU-bound processes beside it).
//! Each row runs for a bounded time after a warm-up; figures go to docs/PERFORMANCE.md.

use std::ffi::CString;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use hdrhistogram::Histogram;
use pyipcd::py::handler::Handler;
use pyipcd::py::pool::{GilPool, PoolConfig};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyModule};

#[path = "common/args.rs"]
mod args;
#[path = "common/busy.rs"]
mod busy;
use args::arg;

const PAYLOAD: usize = 64;

struct Row {
    design: String,
    concurrency: usize,
    calls: u64,
    elapsed: Duration,
    hist: Histogram<u64>,
    threads: usize,
}

fn os_threads() -> usize {
    std::fs::read_dir("/proc/self/task").map_or(0, |d| d.count())
}

fn echo(py: Python<'_>) -> Bound<'_, PyAny> {
    let code = CString::new("def echo(b):\n    return b\n").unwrap();
    PyModule::from_code(py, &code, c"bench_handlers.py", c"bench_handlers")
        .unwrap()
        .getattr("echo")
        .unwrap()
}

fn direct(seconds: f64) -> Row {
    let payload = vec![7u8; PAYLOAD];
    Python::attach(|py| {
        let f = echo(py);
        let mut hist = Histogram::new(3).unwrap();
        let run_for = Duration::from_secs_f64(seconds);
        let start = Instant::now();
        let mut calls = 0u64;
        while start.elapsed() < run_for {
            for _ in 0..1000 {
                let t = Instant::now();
                let r = f.call1((PyBytes::new(py, &payload),)).unwrap();
                let b = Bytes::copy_from_slice(r.cast::<PyBytes>().unwrap().as_bytes());
                assert_eq!(b.len(), PAYLOAD);
                hist.record(t.elapsed().as_nanos() as u64).unwrap();
            }
            calls += 1000;
        }
        Row {
            design: "direct call on one attached thread (ceiling)".into(),
            concurrency: 1,
            calls,
            elapsed: start.elapsed(),
            hist,
            threads: 1,
        }
    })
}

/// Runs `concurrency` closed-loop callers of `call` for `seconds` (after a warm-up).
fn closed_loop<F, Fut>(
    rt: &tokio::runtime::Runtime,
    design: &str,
    concurrency: usize,
    seconds: f64,
    call: F,
) -> Row
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let call = Arc::new(call);
    let warmup = Duration::from_millis(300);
    let run_for = Duration::from_secs_f64(seconds);
    rt.block_on(async {
        let begin = Instant::now() + warmup;
        let end = begin + run_for;
        let mut joins = Vec::new();
        for _ in 0..concurrency {
            let call = call.clone();
            joins.push(tokio::spawn(async move {
                let mut hist = Histogram::<u64>::new(3).unwrap();
                let mut calls = 0u64;
                let mut peak_threads = 0;
                // One clock read per call: each call's end is the next one's start.
                let mut t = Instant::now();
                while t < end {
                    call().await;
                    let done = Instant::now();
                    let took = done - t;
                    let measured = t >= begin;
                    t = done;
                    if measured {
                        hist.record(took.as_nanos() as u64).unwrap();
                        calls += 1;
                        if calls % 4096 == 1 {
                            peak_threads = peak_threads.max(os_threads());
                        }
                    }
                }
                (hist, calls, peak_threads)
            }));
        }
        let mut hist = Histogram::<u64>::new(3).unwrap();
        let mut calls = 0;
        let mut threads = 0;
        for j in joins {
            let (h, c, t) = j.await.unwrap();
            hist.add(h).unwrap();
            calls += c;
            threads = threads.max(t);
        }
        Row {
            design: design.into(),
            concurrency,
            calls,
            elapsed: run_for,
            hist,
            threads,
        }
    })
}

type PlainJob = (Bytes, tokio::sync::oneshot::Sender<Bytes>);

/// A plain pool: attached threads taking jobs from one channel (a mutex
/// around the receiver), each detaching while it waits; no spinning.
#[derive(Clone)]
struct PlainPool {
    tx: std::sync::mpsc::Sender<PlainJob>,
}

impl PlainPool {
    fn start(workers: usize) -> Self {
        let (tx, rx) = std::sync::mpsc::channel::<PlainJob>();
        let rx = Arc::new(std::sync::Mutex::new(rx));
        for _ in 0..workers {
            let rx = rx.clone();
            std::thread::spawn(move || {
                Python::attach(|py| {
                    let f = echo(py);
                    loop {
                        let job = py.detach(|| rx.lock().unwrap().recv());
                        let Ok((payload, reply)) = job else { return };
                        let r = f.call1((PyBytes::new(py, &payload),)).unwrap();
                        let _ = reply.send(Bytes::copy_from_slice(
                            r.cast::<PyBytes>().unwrap().as_bytes(),
                        ));
                    }
                });
            });
        }
        Self { tx }
    }

    async fn call(&self, payload: Bytes) -> Bytes {
        let (reply, rx) = tokio::sync::oneshot::channel();
        self.tx.send((payload, reply)).unwrap();
        rx.await.unwrap()
    }
}

fn main() {
    let seconds = arg("--seconds", 2.0);
    let workers = arg("--workers", 2.0) as usize;
    pyipcd::py::init(&[], &Default::default()).unwrap();
    // The callers' runtime is the daemon's I/O runtime.
    let rt = pyipcd::daemon::io_runtime(arg("--io-threads", 2.0) as usize).unwrap();
    let only_pool = std::env::args().any(|a| a == "--only-pool");
    // `--busy N`: N CPU-bound processes beside the bench.
    let busy = arg("--busy", 0.0) as usize;
    let _busy = busy::busy_host(busy);
    if busy > 0 {
        println!("({busy} CPU-bound processes running beside the bench)\n");
    }
    let mut rows = vec![direct(seconds)];

    let mut config = PoolConfig::new(workers, 1024, Duration::from_secs(10));
    config.caller_spin_polls =
        arg("--caller-spin-polls", f64::from(config.caller_spin_polls)) as u32;
    config.io_threads = arg("--io-threads", 2.0) as usize;
    config.spin = Duration::from_micros(arg("--spin-us", config.spin.as_micros() as f64) as u64);
    let pool = GilPool::start(&config).unwrap();
    pool.watch_io_runtime(rt.metrics());
    let handler = Arc::new(Python::attach(|py| {
        Handler::from_callable(py, "bench", "bench_handlers:echo", echo(py)).unwrap()
    }));
    for c in [1, 16, 256] {
        let (caller_pool, handler) = (pool.clone(), handler.clone());
        let pool_before = (
            pool.stats()
                .calls
                .load(std::sync::atomic::Ordering::Relaxed),
            pool.stats()
                .calls_here
                .load(std::sync::atomic::Ordering::Relaxed),
            pool.spin_gate_shuts(),
        );
        rows.push(closed_loop(
            &rt,
            &format!("pyipcd GilPool ({workers} workers)"),
            c,
            seconds,
            move || {
                let (pool, handler) = (caller_pool.clone(), handler.clone());
                async move {
                    let out = pool
                        .call(&handler, Bytes::from_static(&[7u8; PAYLOAD]))
                        .await
                        .unwrap()
                        .unwrap();
                    assert_eq!(out.len(), PAYLOAD);
                }
            },
        ));
        let stats = pool.stats();
        eprintln!(
            "  GilPool, {c} in flight: {} calls, {} made by the calling thread, {} spin gate shuts",
            stats.calls.load(std::sync::atomic::Ordering::Relaxed) - pool_before.0,
            stats.calls_here.load(std::sync::atomic::Ordering::Relaxed) - pool_before.1,
            pool.spin_gate_shuts() - pool_before.2
        );
    }

    // The plain pool: `workers` attached threads fed by one channel, a
    // oneshot per call, no spinning anywhere (the baseline to beat).
    let plain = PlainPool::start(workers);
    for c in [1, 16, 256] {
        let plain = plain.clone();
        rows.push(closed_loop(
            &rt,
            &format!("plain channel-fed pool ({workers} workers)"),
            c,
            seconds,
            move || {
                let plain = plain.clone();
                async move {
                    let out = plain.call(Bytes::from_static(&[7u8; PAYLOAD])).await;
                    assert_eq!(out.len(), PAYLOAD);
                }
            },
        ));
    }

    let func: Arc<Py<PyAny>> = Arc::new(Python::attach(|py| echo(py).unbind()));
    let sb_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(arg("--io-threads", 2.0) as usize)
        .enable_all()
        .build()
        .unwrap();
    for c in [1, 16, 256] {
        if only_pool {
            break;
        }
        let f = func.clone();
        rows.push(closed_loop(
            &sb_rt,
            "spawn_blocking + Python::attach per call",
            c,
            seconds,
            move || {
                let f = f.clone();
                async move {
                    let payload = Bytes::from_static(&[7u8; PAYLOAD]);
                    let out = tokio::task::spawn_blocking(move || {
                        Python::attach(|py| {
                            let r = f.bind(py).call1((PyBytes::new(py, &payload),)).unwrap();
                            Bytes::copy_from_slice(r.cast::<PyBytes>().unwrap().as_bytes())
                        })
                    })
                    .await
                    .unwrap();
                    assert_eq!(out.len(), PAYLOAD);
                }
            },
        ));
    }

    println!("| design | in flight | calls/s | p50 µs | p99 µs | OS threads |");
    println!("| --- | ---: | ---: | ---: | ---: | ---: |");
    for r in rows {
        println!(
            "| {} | {} | {:.0} | {:.2} | {:.2} | {} |",
            r.design,
            r.concurrency,
            r.calls as f64 / r.elapsed.as_secs_f64(),
            r.hist.value_at_quantile(0.5) as f64 / 1000.0,
            r.hist.value_at_quantile(0.99) as f64 / 1000.0,
            r.threads
        );
    }
    let s = pool.stats();
    eprintln!(
        "pool: calls={} queue_full_waits={}",
        s.calls.load(std::sync::atomic::Ordering::Relaxed),
        s.queue_full_waits
            .load(std::sync::atomic::Ordering::Relaxed)
    );
}
