//! Whether spinning pays. The pool spins (a worker polling for work, callers
//! re-polling for their reply) to save futex wake-ups, which only wins while
//! a core is free for the spinning thread. Two signals say none is:
//! - more pool and I/O threads than cores: the spinning threads would take
//!   the cores from the threads doing the work, so such a pool never spins;
//! - more runnable threads on the host than cores, right now: other
//!   processes (a busy host), or the clients on a small one, are waiting
//!   for a core. The kernel's count of runnable threads (`/proc/loadavg`,
//!   fourth field) is sampled at most every [`SAMPLE_EVERY`] while calls
//!   flow (never when idle) and smoothed; the gate shuts above `cores + ½`
//!   and opens again below `cores − ½` (room for one more thread), so the
//!   threads it stops spinning do not reopen it.
//!
//! While the gate is shut, fast handlers run on the calling I/O thread
//! instead of being handed off (`here`).
//!
//! (The kernel's CPU pressure, `/proc/pressure/cpu`, was tried first: on
//! this project's VM its `some avg10` sits at 10–19% with nothing running,
//! so no threshold separated busy from idle. See docs/PERFORMANCE.md.)

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// How often the runnable count is sampled while calls flow.
pub(crate) const SAMPLE_EVERY: Duration = Duration::from_millis(5);
/// Fixed-point scale of the smoothed runnable count.
const SCALE: u32 = 16;

/// The gate, shared by a pool's workers and callers.
#[derive(Debug)]
pub(crate) struct SpinGate {
    /// More threads than cores: never spin.
    oversubscribed: bool,
    cores: u32,
    epoch: Instant,
    /// Nanoseconds since `epoch` of the next sample.
    next_sample: AtomicU64,
    /// `/proc/loadavg`, kept open (re-read from offset 0); `None` if unreadable.
    loadavg: Mutex<Option<File>>,
    /// Smoothed runnable threads on the host, times [`SCALE`].
    runnable: AtomicU32,
    /// No core free: nobody spins.
    shut: AtomicBool,
    /// Times the gate shut, for the stats.
    pub(crate) shuts: AtomicU64,
}

impl SpinGate {
    /// A gate for a pool whose workers and callers run on `threads` OS threads.
    pub(crate) fn new(threads: usize) -> Self {
        let cores = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
        let oversubscribed = threads > cores;
        if oversubscribed {
            tracing::info!(
                "{threads} pool and I/O threads on {cores} core(s): the GIL pool will not spin"
            );
        }
        let cores = u32::try_from(cores).unwrap_or(u32::MAX);
        Self {
            oversubscribed,
            cores,
            epoch: Instant::now(),
            next_sample: AtomicU64::new(0),
            loadavg: Mutex::new(File::open("/proc/loadavg").ok()),
            runnable: AtomicU32::new(0),
            shut: AtomicBool::new(false),
            shuts: AtomicU64::new(0),
        }
    }

    /// Whether to spin.
    pub(crate) fn allows(&self) -> bool {
        if self.oversubscribed {
            return false;
        }
        let now = nanos(self.epoch.elapsed());
        let next = self.next_sample.load(Ordering::Relaxed);
        if now >= next
            && self
                .next_sample
                .compare_exchange(
                    next,
                    now + nanos(SAMPLE_EVERY),
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_ok()
            && let Some(runnable) = self.sample()
        {
            self.observe(runnable);
        }
        !self.shut.load(Ordering::Relaxed)
    }

    /// Folds one count of runnable threads (the sampling thread included) into the state.
    fn observe(&self, runnable: u32) {
        let old = self.runnable.load(Ordering::Relaxed);
        // An exponential average over about four samples.
        let avg = (old * 3 + runnable.saturating_mul(SCALE)) / 4;
        self.runnable.store(avg, Ordering::Relaxed);
        let shut = self.shut.load(Ordering::Relaxed);
        if !shut && avg > self.cores * SCALE + SCALE / 2 {
            self.shut.store(true, Ordering::Relaxed);
            self.shuts.fetch_add(1, Ordering::Relaxed);
        } else if shut && avg + SCALE / 2 < self.cores * SCALE {
            self.shut.store(false, Ordering::Relaxed);
        }
    }

    /// Runnable threads on the host now (`/proc/loadavg`, fourth field, before the `/`).
    fn sample(&self) -> Option<u32> {
        let guard = self.loadavg.try_lock().ok()?;
        let file = guard.as_ref()?;
        let mut buf = [0u8; 128];
        let n = file.read_at(&mut buf, 0).ok()?;
        parse_runnable(&buf[..n])
    }
}

/// The runnable count in a `/proc/loadavg` line: `0.50 0.40 0.30 3/250 12345` → 3.
fn parse_runnable(line: &[u8]) -> Option<u32> {
    let field = line.split(|b| *b == b' ').nth(3)?;
    let running = field.split(|b| *b == b'/').next()?;
    std::str::from_utf8(running).ok()?.parse().ok()
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gate(cores: u32) -> SpinGate {
        let mut g = SpinGate::new(1);
        g.cores = cores;
        g
    }

    #[test]
    fn parses_the_runnable_field() {
        assert_eq!(parse_runnable(b"0.50 0.40 0.30 3/250 12345\n"), Some(3));
        assert_eq!(parse_runnable(b"garbage"), None);
        assert!(
            SpinGate::new(1).sample().is_some(),
            "/proc/loadavg readable"
        );
    }

    #[test]
    fn shuts_when_threads_wait_for_cores_and_reopens_with_room_for_one() {
        let g = gate(2);
        for _ in 0..8 {
            g.observe(2);
        }
        assert!(
            !g.shut.load(Ordering::Relaxed),
            "2 runnable on 2 cores: open"
        );
        for _ in 0..8 {
            g.observe(4);
        }
        assert!(
            g.shut.load(Ordering::Relaxed),
            "4 runnable on 2 cores: shut"
        );
        for _ in 0..8 {
            g.observe(2);
        }
        assert!(
            g.shut.load(Ordering::Relaxed),
            "no room for a spinner yet: stays shut"
        );
        for _ in 0..8 {
            g.observe(1);
        }
        assert!(!g.shut.load(Ordering::Relaxed), "room for one more: open");
        assert_eq!(g.shuts.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn one_busy_sample_does_not_shut_it() {
        let g = gate(2);
        for _ in 0..8 {
            g.observe(1);
        }
        g.observe(4);
        assert!(!g.shut.load(Ordering::Relaxed));
    }
}
