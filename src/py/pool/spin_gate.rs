//! Whether spinning pays. The pool spins (a worker polling for work, callers
//! re-polling for their reply) to save futex wake-ups, which only wins while
//! a core is free for the spinning thread. Two signals say none is:
//! - more pool and I/O threads than cores: the spinning threads would take
//!   the cores from the threads doing the work, so such a pool never spins;
//! - no core free for a spinner, right now: the kernel's count of runnable
//!   threads (`/proc/loadavg`, fourth field), minus this pool's spinning
//!   worker (and the asking caller when it is the only one waiting for a
//!   reply, so its thread would only poll), exceeds the core count: other
//!   processes (a busy host), or the clients and the I/O thread on a small
//!   one, keep every core busy. It is sampled at most every
//!   [`SAMPLE_EVERY`] while calls flow (never when idle; the clock is read
//!   on one call in [`CHECK_EVERY`]) and smoothed; the
//!   gate shuts above `cores + ¼` (a thread waits for a core even without
//!   the spinners) and opens again below `cores − ¾` (a core is free).
//!
//! The host-wide count means nothing to a process held to fewer CPUs than
//! the host has (affinity, a cgroup quota, a container): there only the
//! first signal applies (logged at start).
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
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// How often the runnable count is sampled while calls flow.
pub(crate) const SAMPLE_EVERY: Duration = Duration::from_millis(5);
/// A thread reads the clock (to see whether a sample is due) on one
/// [`SpinGate::allows`] call in this many.
pub(crate) const CHECK_EVERY: u32 = 32;
/// Fixed-point scale of the smoothed runnable count.
const SCALE: u32 = 256;

thread_local! {
    /// This thread's calls to [`SpinGate::allows`], for [`CHECK_EVERY`].
    static TICKS: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
}

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
    /// Smoothed threads doing work on the host, times [`SCALE`].
    working: AtomicU32,
    /// No core free: nobody spins.
    shut: AtomicBool,
    /// Pool workers spinning for work now. (Callers re-polling for a reply
    /// are not subtracted: their thread, the I/O thread, does real work for
    /// other connections between polls.)
    spinners: AtomicUsize,
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
        // The runnable count is the whole host's: it says nothing about a
        // process held to fewer CPUs (affinity, a cgroup quota, a container).
        let host_wide = cores == online_cpus();
        if !host_wide {
            tracing::info!(
                "{cores} of the host's {} CPUs for this process: the GIL pool's spin gate ignores the host's load",
                online_cpus()
            );
        }
        let cores = u32::try_from(cores).unwrap_or(u32::MAX);
        Self {
            oversubscribed,
            cores,
            epoch: Instant::now(),
            next_sample: AtomicU64::new(0),
            loadavg: Mutex::new(
                host_wide
                    .then(|| File::open("/proc/loadavg").ok())
                    .flatten(),
            ),
            working: AtomicU32::new(0),
            shut: AtomicBool::new(false),
            spinners: AtomicUsize::new(0),
            shuts: AtomicU64::new(0),
        }
    }

    /// Whether to spin; `about_to_spin` says whether the asking thread would
    /// only spin or poll (then it is not counted as work). Cheap: the clock
    /// is read on one call in [`CHECK_EVERY`] per thread.
    pub(crate) fn allows(&self, about_to_spin: impl FnOnce() -> bool) -> bool {
        if self.oversubscribed {
            return false;
        }
        let tick = TICKS.get().wrapping_add(1);
        TICKS.set(tick);
        if tick % CHECK_EVERY == 0 {
            self.maybe_sample(about_to_spin);
        }
        !self.shut.load(Ordering::Relaxed)
    }

    /// Samples the runnable count if the last sample is [`SAMPLE_EVERY`] old.
    fn maybe_sample(&self, about_to_spin: impl FnOnce() -> bool) {
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
            let spinning = self.spinners.load(Ordering::Relaxed) + usize::from(about_to_spin());
            let own = u32::try_from(spinning).unwrap_or(u32::MAX);
            self.observe(runnable.saturating_sub(own));
        }
    }

    /// Counts the calling thread as spinning until the guard drops.
    pub(crate) fn spinning(&self) -> Counted<'_> {
        Counted::new(&self.spinners)
    }

    /// Folds one count of threads doing work (runnable, less this pool's
    /// spinning workers) into the state.
    fn observe(&self, working: u32) {
        let old = self.working.load(Ordering::Relaxed);
        // An exponential average over about eight samples (40 ms).
        let avg = (old * 7 + working.saturating_mul(SCALE)) / 8;
        self.working.store(avg, Ordering::Relaxed);
        let shut = self.shut.load(Ordering::Relaxed);
        let cores = self.cores * SCALE;
        if !shut && avg > cores + SCALE / 4 {
            self.shut.store(true, Ordering::Relaxed);
            self.shuts.fetch_add(1, Ordering::Relaxed);
        } else if shut && avg < cores - SCALE * 3 / 4 {
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

/// One more in a counter for as long as it lives (a spinning worker, a
/// waiting caller), counted down however its owner ends.
pub(crate) struct Counted<'a>(&'a AtomicUsize);

impl<'a> Counted<'a> {
    /// Counts one more in `counter`.
    pub(crate) fn new(counter: &'a AtomicUsize) -> Self {
        counter.fetch_add(1, Ordering::Relaxed);
        Self(counter)
    }
}

impl Drop for Counted<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The runnable count in a `/proc/loadavg` line: `0.50 0.40 0.30 3/250 12345` → 3.
fn parse_runnable(line: &[u8]) -> Option<u32> {
    let field = line.split(|b| *b == b' ').nth(3)?;
    let running = field.split(|b| *b == b'/').next()?;
    std::str::from_utf8(running).ok()?.parse().ok()
}

/// CPUs online on the host.
#[allow(unsafe_code)]
fn online_cpus() -> usize {
    // SAFETY: sysconf only reads a system value.
    let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    usize::try_from(n).unwrap_or(0)
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
        let host_wide = std::thread::available_parallelism().unwrap().get() == online_cpus();
        assert_eq!(
            SpinGate::new(1).sample().is_some(),
            host_wide,
            "/proc/loadavg read exactly when this process may use every CPU"
        );
    }

    #[test]
    fn shuts_when_threads_wait_for_cores_and_reopens_with_one_free() {
        let g = gate(2);
        for _ in 0..32 {
            g.observe(2);
        }
        assert!(
            !g.shut.load(Ordering::Relaxed),
            "2 working on 2 cores: open"
        );
        for _ in 0..32 {
            g.observe(3);
        }
        assert!(g.shut.load(Ordering::Relaxed), "3 working on 2 cores: shut");
        for _ in 0..32 {
            g.observe(2);
        }
        assert!(
            g.shut.load(Ordering::Relaxed),
            "no core free yet: stays shut"
        );
        for _ in 0..32 {
            g.observe(1);
        }
        assert!(!g.shut.load(Ordering::Relaxed), "a core free again: open");
        assert_eq!(g.shuts.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn one_busy_sample_does_not_shut_it() {
        let g = gate(2);
        for _ in 0..32 {
            g.observe(0);
        }
        g.observe(4);
        assert!(!g.shut.load(Ordering::Relaxed));
    }

    #[test]
    fn a_spinning_worker_is_not_counted_as_work() {
        let g = gate(2);
        let spinning = g.spinning();
        assert_eq!(g.spinners.load(Ordering::Relaxed), 1);
        drop(spinning);
        assert_eq!(g.spinners.load(Ordering::Relaxed), 0);
    }
}
