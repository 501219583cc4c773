//! The load generator of the stream benches: closed-loop clients over TCP
//! or a Unix socket, each keeping `depth` len32 requests in flight, timed
//! into a histogram; and the CPU a server process used.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};

/// Where a server listens.
#[derive(Clone)]
pub enum Addr {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

/// A workload.
pub struct Row {
    pub label: &'static str,
    pub conns: usize,
    pub depth: usize,
    pub size: usize,
    /// The row's shortest measurement. At C=1000 a connection makes only
    /// ~100 round trips in 2 s, so its p99 would be each connection's slowest
    /// trip: one hiccup of the host (it shows in the in-process Rust ceiling
    /// too) set the whole row's p99. Ten seconds give ~500 per connection.
    pub min_seconds: f64,
}

/// Closed-loop clients: each keeps `depth` requests in flight on its connection.
/// `row` against `addr` for `seconds` after `warm_up`: messages counted, and their round trips.
pub async fn drive(
    addr: &Addr,
    row: &Row,
    warm_up: Duration,
    seconds: f64,
) -> (u64, Histogram<u64>) {
    let warm = Instant::now() + warm_up;
    let end = warm + Duration::from_secs_f64(seconds);
    let mut joins = Vec::new();
    for c in 0..row.conns {
        let (depth, size, addr) = (row.depth, row.size, addr.clone());
        joins.push(tokio::spawn(async move {
            let mut frame = (size as u32).to_be_bytes().to_vec();
            frame.extend((0..size).map(|i| (i + c) as u8));
            let batch: Vec<u8> = frame
                .iter()
                .copied()
                .cycle()
                .take(frame.len() * depth)
                .collect();
            match addr {
                Addr::Tcp(a) => {
                    let s = TcpStream::connect(a).await.unwrap();
                    s.set_nodelay(true).unwrap();
                    trips(s, &batch, depth, warm, end).await
                }
                Addr::Unix(p) => {
                    let s = UnixStream::connect(p).await.unwrap();
                    trips(s, &batch, depth, warm, end).await
                }
            }
        }));
    }
    let mut total = 0;
    let mut hist = Histogram::<u64>::new(3).unwrap();
    for j in joins {
        let (m, h) = j.await.unwrap();
        total += m;
        hist.add(h).unwrap();
    }
    (total, hist)
}

/// Round trips of `batch` (`depth` messages) on one connection until `end`;
/// those after `warm` are counted and timed.
async fn trips<S: AsyncRead + AsyncWrite + Unpin>(
    mut s: S,
    batch: &[u8],
    depth: usize,
    warm: Instant,
    end: Instant,
) -> (u64, Histogram<u64>) {
    let mut back = vec![0u8; batch.len()];
    let mut hist = Histogram::<u64>::new(3).unwrap();
    let mut msgs = 0u64;
    loop {
        let t = Instant::now();
        if t >= end {
            break;
        }
        s.write_all(batch).await.unwrap();
        s.read_exact(&mut back).await.unwrap();
        assert_eq!(back, batch, "echo mismatch");
        if t >= warm {
            hist.record(t.elapsed().as_nanos() as u64).unwrap();
            msgs += depth as u64;
        }
    }
    (msgs, hist)
}

/// [`drive`], and the CPU seconds processes `pids` and their descendants
/// used over the measured part (after the warm-up).
pub async fn drive_timed(
    addr: &Addr,
    row: &Row,
    warm_up: Duration,
    seconds: f64,
    pids: &[u32],
) -> (u64, Histogram<u64>, f64) {
    let total = || pids.iter().copied().map(tree_cpu_seconds).sum::<f64>();
    let measure = async {
        tokio::time::sleep(warm_up).await;
        let start = total();
        tokio::time::sleep(Duration::from_secs_f64(seconds)).await;
        total() - start
    };
    let ((msgs, hist), used) = tokio::join!(drive(addr, row, warm_up, seconds), measure);
    (msgs, hist, used)
}

/// CPU seconds of process `pid` and of its children, theirs, and so on.
pub fn tree_cpu_seconds(pid: u32) -> f64 {
    let children =
        std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
    cpu_seconds(pid)
        + children
            .split_whitespace()
            .filter_map(|c| c.parse().ok())
            .map(tree_cpu_seconds)
            .sum::<f64>()
}

/// User + system CPU seconds process `pid` (and its threads) used so far.
pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command (which may hold spaces) start after its ')'.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or("", |(_, r)| r)
        .split_whitespace()
        .collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime are fields 14 and 15 (11 and 12 after the state field).
    (ticks(11) + ticks(12)) / clock_ticks()
}

/// Clock ticks per second (`getconf CLK_TCK`).
fn clock_ticks() -> f64 {
    #[allow(unsafe_code)]
    // SAFETY: sysconf reads a constant.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}
