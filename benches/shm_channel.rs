//! Shared-memory channel benchmark, side by side in one run: round-trip
//! p50/p99 and round trips/s, ping-pong with one client, 64 B and 4 KiB:
//! - pyipcd channel + Python echo handler, C client (`include/examples/shm_client.c`)
//! - the same with the Rust client
//! - the same Python handler behind a Unix socket (a blocking Python server)
//! - the same handler behind pyipcd's TCP server role (loopback, len32)
//! - iceoryx2's Python bindings (PyPI `iceoryx2`), request-response, the same
//!   Python echo on the server side (`benches/iceoryx2_pingpong.py`)
//! - the raw ring without Python (a Rust echo thread): the ceiling
//!
//! Run: `cargo build --release && cargo bench --bench shm_channel -- --seconds 2`
//! A busy host: `-- --busy 2` starts two CPU-bound processes beside it first
//! (the clients this serves share their host's cores).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use pyipcd::shm::client::ShmClient;
use pyipcd::shm::ring::{Channel, Dir, file_size, flags};

#[path = "common/args.rs"]
mod args;
#[path = "common/busy.rs"]
mod busy;
use busy::{Kill, busy_host};
#[path = "common/daemon.rs"]
mod daemon;
use args::arg;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// Prints a row from a helper's `round_trips_per_s=… p50_us=… p99_us=…` line.
fn external_row(name: &str, size: usize, text: &str) {
    let field = |k: &str| -> f64 {
        text.split_whitespace()
            .find_map(|w| w.strip_prefix(k))
            .and_then(|v| v.parse().ok())
            .unwrap_or(f64::NAN)
    };
    println!(
        "| {name} | {size} | {:.0} | {:.2} | {:.2} |",
        field("round_trips_per_s="),
        field("p50_us="),
        field("p99_us=")
    );
}

fn row(name: &str, size: usize, calls: u64, secs: f64, h: &Histogram<u64>) {
    println!(
        "| {name} | {size} | {:.0} | {:.2} | {:.2} |",
        calls as f64 / secs,
        h.value_at_quantile(0.5) as f64 / 1000.0,
        h.value_at_quantile(0.99) as f64 / 1000.0
    );
}

/// Ping-pong `call` for `secs` after a warm-up; returns (calls, histogram).
fn measure(secs: f64, mut call: impl FnMut()) -> (u64, Histogram<u64>) {
    let warm = Instant::now() + Duration::from_millis(300);
    while Instant::now() < warm {
        call();
    }
    let mut h = Histogram::<u64>::new(3).unwrap();
    let end = Instant::now() + Duration::from_secs_f64(secs);
    let mut n = 0;
    let mut t = Instant::now();
    while t < end {
        call();
        let done = Instant::now();
        h.record((done - t).as_nanos() as u64).unwrap();
        t = done;
        n += 1;
    }
    (n, h)
}

fn daemon(dir: &std::path::Path) -> (Kill, std::path::PathBuf, u16) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let shm = dir.join("bench.shm");
    let cfg = dir.join("bench.toml");
    std::fs::write(
        &cfg,
        format!(
            "[log]\nlevel = \"warn\"\n[daemon]\nio_threads = 1\n[python]\npaths = [\"{ROOT}/python\"]\nworkers = 1\n\
             [[shm.region]]\nname = \"ch\"\nmode = \"channel\"\npath = \"{}\"\nhandler = \"handlers:echo\"\n\
             ring_size = \"1MiB\"\nmax_message = \"64KiB\"\n\
             [[shm.region]]\nname = \"zc\"\nmode = \"channel\"\npath = \"{}\"\nhandler = \"handlers:echo\"\n\
             ring_size = \"1MiB\"\nmax_message = \"64KiB\"\nzero_copy = true\n\
             [[tcp.server]]\nname = \"tcp\"\nlisten = \"127.0.0.1:{port}\"\nframing = \"len32\"\nhandler = \"handlers:echo\"\n",
            shm.display(),
            dir.join("bench-zc.shm").display()
        ),
    )
    .unwrap();
    let child = daemon::spawn_release(&cfg);
    daemon::wait_listening(([127, 0, 0, 1], port).into());
    (Kill(child), shm, port)
}

fn len32_call(s: &mut (impl Read + Write), payload: &[u8], back: &mut Vec<u8>) {
    let mut frame = (payload.len() as u32).to_be_bytes().to_vec();
    frame.extend_from_slice(payload);
    s.write_all(&frame).unwrap();
    let mut len = [0u8; 4];
    s.read_exact(&mut len).unwrap();
    back.resize(u32::from_be_bytes(len) as usize, 0);
    s.read_exact(back).unwrap();
}

/// iceoryx2's Python bindings, both ends busy-polling (skipped when not installed).
fn iceoryx2_row(secs: f64, size: usize) {
    let out = Command::new("python3")
        .arg(format!("{ROOT}/benches/iceoryx2_pingpong.py"))
        .args([secs.to_string(), size.to_string()])
        .stderr(Stdio::null())
        .output();
    let text = match out {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).into_owned(),
        _ => {
            eprintln!("iceoryx2 row skipped (pip install iceoryx2)");
            return;
        }
    };
    external_row(
        "iceoryx2 Python bindings, request-response, busy-polling both ends",
        size,
        &text,
    );
}

fn main() {
    let secs = arg("--seconds", 2.0);
    let busy = arg("--busy", 0.0) as usize;
    let _busy = busy_host(busy);
    if busy > 0 {
        println!("({busy} CPU-bound processes running beside the bench)\n");
    }
    let dir = tempfile::tempdir().unwrap();
    let (_daemon, shm, port) = daemon(dir.path());

    // The C client, built here.
    let exe = dir.path().join("shm_client");
    let ok = Command::new("gcc")
        .args(["-std=c11", "-O2", "-I"])
        .arg(format!("{ROOT}/include"))
        .arg("-o")
        .arg(&exe)
        .arg(format!("{ROOT}/include/examples/shm_client.c"))
        .status()
        .unwrap()
        .success();
    assert!(ok, "gcc failed");

    // The Unix-socket baseline.
    let sock = dir.path().join("echo.sock");
    let mut unix = Command::new("python3")
        .arg(format!("{ROOT}/benches/unix_echo.py"))
        .arg(&sock)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut ready = [0u8; 6];
    unix.stdout.take().unwrap().read_exact(&mut ready).unwrap();
    let _unix = Kill(unix);

    println!("| path | size B | round trips/s | p50 µs | p99 µs |");
    println!("| --- | ---: | ---: | ---: | ---: |");
    for size in [64usize, 4096] {
        let payload = vec![b'x'; size];
        let out = Command::new(&exe)
            .arg(&shm)
            .args(["--bench", &secs.to_string(), &size.to_string()])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        external_row("pyipcd channel + Python echo, C client", size, &text);
        let out = Command::new(&exe)
            .arg(dir.path().join("bench-zc.shm"))
            .args(["--bench", &secs.to_string(), &size.to_string()])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        external_row(
            "pyipcd channel, zero_copy = true, Python echo, C client",
            size,
            &text,
        );

        iceoryx2_row(secs, size);

        let mut c = ShmClient::connect(&shm, Duration::from_secs(10)).unwrap();
        let (n, h) = measure(secs, || {
            assert_eq!(c.call(&payload).unwrap().unwrap().len(), size);
        });
        row(
            "pyipcd channel + Python echo, Rust client",
            size,
            n,
            secs,
            &h,
        );
        // The first request after idle: the daemon's thread is asleep on
        // the doorbell each time (20 ms gaps; calls/s counts the gaps too).
        let mut h = Histogram::<u64>::new(3).unwrap();
        let gaps = ((secs * 25.0) as u64).max(20);
        for _ in 0..gaps {
            std::thread::sleep(Duration::from_millis(20));
            let t = Instant::now();
            assert_eq!(c.call(&payload).unwrap().unwrap().len(), size);
            h.record(t.elapsed().as_nanos() as u64).unwrap();
        }
        row(
            "pyipcd channel, first call after 20 ms idle, Rust client",
            size,
            gaps,
            gaps as f64 * 0.02,
            &h,
        );
        drop(c);

        let mut s = UnixStream::connect(&sock).unwrap();
        let mut back = Vec::new();
        let (n, h) = measure(secs, || len32_call(&mut s, &payload, &mut back));
        row(
            "Unix socket + Python echo (blocking Python server)",
            size,
            n,
            secs,
            &h,
        );

        let mut t = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        t.set_nodelay(true).unwrap();
        let (n, h) = measure(secs, || len32_call(&mut t, &payload, &mut back));
        row(
            "TCP loopback + Python echo (pyipcd tcp.server)",
            size,
            n,
            secs,
            &h,
        );
    }
    // Last, alone: its echo thread spins on a core of its own.
    // The raw ring: a Rust echo thread on a channel file of its own.
    let raw_path = dir.path().join("raw.shm");
    let stop = Arc::new(AtomicBool::new(false));
    let raw_server = {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&raw_path)
            .unwrap();
        f.set_len(file_size(1 << 20) as u64).unwrap();
        let map = memmap2::MmapOptions::new().map_raw(&f).unwrap();
        let ch = Channel::initialise(map, 1 << 20, 64 * 1024, 1).unwrap();
        ch.set_state(pyipcd::shm::ring::State::Ready);
        let stop = stop.clone();
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                if let Some(r) = ch.try_pop(Dir::Request) {
                    while !ch.try_push(Dir::Response, r.seq, flags::OK, r.epoch, &r.payload) {
                        std::hint::spin_loop();
                    }
                } else {
                    std::hint::spin_loop();
                }
            }
        })
    };

    for size in [64usize, 4096] {
        let payload = vec![b'x'; size];
        let mut raw = ShmClient::connect(&raw_path, Duration::from_secs(10)).unwrap();
        let (n, h) = measure(secs, || {
            assert_eq!(raw.call(&payload).unwrap().unwrap().len(), size);
        });
        row(
            "raw ring, Rust echo thread, no Python (ceiling)",
            size,
            n,
            secs,
            &h,
        );
    }
    stop.store(true, Ordering::Relaxed);
    let _ = raw_server.join();
}
