//! Whether spinning pays. The pool spins (a worker polling for work, callers
//! re-polling for their reply) to save futex wake-ups, which only wins while
//! a core is free for the spinning thread. Three signals say none is:
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
//!   the spinners) and opens again below `cores − ¾` (a core is free);
//! - the I/O threads have no time to spare (tokio's count of the time they
//!   spend running tasks, over 90% since the last sample, smoothed; a
//!   caller re-polling for its reply keeps its thread from parking, so
//!   that counts as busy too, while the gate is open) and the
//!   count is above `cores − ¼`: then every thread besides the spinner
//!   (the I/O thread and, on a test host, the clients) takes a core of its
//!   own, and a spinning worker only takes time from them. A lone caller's
//!   I/O thread waits for its client between messages, so this signal
//!   leaves it alone; with the clients on other hosts the count stays
//!   lower, so a saturated I/O thread still hands work off to a free core.
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
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// How often the runnable count is sampled while calls flow.
pub(crate) const SAMPLE_EVERY: Duration = Duration::from_millis(5);
/// A thread reads the clock (to see whether a sample is due) on one
/// [`SpinGate::allows`] call in this many.
pub(crate) const CHECK_EVERY: u32 = 32;
/// Fixed-point scale of the smoothed runnable count.
const SCALE: u32 = 256;
/// The I/O threads' busy share (times [`SCALE`]) from which they count as saturated: 90%.
const SATURATED: u32 = SCALE * 9 / 10;

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
    /// The I/O runtime, whose threads' busy time says whether they are saturated.
    io: OnceLock<tokio::runtime::RuntimeMetrics>,
    /// The I/O threads' busy nanoseconds, and when, at the last sample.
    io_busy_total: AtomicU64,
    io_busy_at: AtomicU64,
    /// Smoothed share of their time the I/O threads were busy, times [`SCALE`].
    io_busy: AtomicU32,
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
            io: OnceLock::new(),
            io_busy_total: AtomicU64::new(0),
            io_busy_at: AtomicU64::new(0),
            io_busy: AtomicU32::new(0),
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

    /// Watches the I/O runtime whose threads make the pool's calls (see the
    /// module docs); without it only the runnable count and the thread
    /// count apply. The first runtime given stays.
    pub(crate) fn watch_io(&self, metrics: tokio::runtime::RuntimeMetrics) {
        let _ = self.io.set(metrics);
    }

    /// The I/O threads' smoothed busy share, in percent.
    pub(crate) fn io_busy_percent(&self) -> u32 {
        self.io_busy.load(Ordering::Relaxed) * 100 / SCALE
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
            && let Some((runnable, io_busy)) = self.sample()
        {
            let spinning = self.spinners.load(Ordering::Relaxed) + usize::from(about_to_spin());
            let own = u32::try_from(spinning).unwrap_or(u32::MAX);
            if let Some(busy) = io_busy {
                self.observe_io(busy);
            }
            self.observe(runnable.saturating_sub(own));
        }
    }

    /// Counts the calling thread as spinning until the guard drops.
    pub(crate) fn spinning(&self) -> Counted<'_> {
        Counted::new(&self.spinners)
    }

    /// The I/O threads' busy share (times [`SCALE`]) since the last call;
    /// `None` on the first call or unwatched. Tokio adds a thread's busy
    /// time when it finishes a batch of tasks, so one share may run over
    /// [`SCALE`] (a batch from before this span) or under it (one still
    /// running): it is kept up to twice [`SCALE`] and only the average is
    /// clamped. Callers serialise (see [`SpinGate::sample`]).
    fn io_busy_since_last(&self) -> Option<u32> {
        let m = self.io.get()?;
        let threads = m.num_workers();
        let busy: u64 = (0..threads)
            .map(|w| nanos(m.worker_total_busy_duration(w)))
            .sum();
        let at = nanos(self.epoch.elapsed()).max(1);
        let before = self.io_busy_total.swap(busy, Ordering::Relaxed);
        let then = self.io_busy_at.swap(at, Ordering::Relaxed);
        let span = at.checked_sub(then).filter(|d| then > 0 && *d > 0)?;
        let share = busy.saturating_sub(before).saturating_mul(u64::from(SCALE))
            / span.saturating_mul(threads.max(1) as u64);
        Some(u32::try_from(share).unwrap_or(u32::MAX).min(2 * SCALE))
    }

    /// Folds one busy share of the I/O threads (times [`SCALE`]) into the
    /// state: an average over about eight samples, rounded, at most [`SCALE`].
    fn observe_io(&self, share: u32) {
        let old = self.io_busy.load(Ordering::Relaxed);
        let avg = (old * 7 + share + 4) / 8;
        self.io_busy.store(avg.min(SCALE), Ordering::Relaxed);
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
        let saturated = self.io_busy.load(Ordering::Relaxed) >= SATURATED;
        if !shut && (avg > cores + SCALE / 4 || (saturated && avg > cores - SCALE / 4)) {
            self.shut.store(true, Ordering::Relaxed);
            self.shuts.fetch_add(1, Ordering::Relaxed);
        } else if shut && avg < cores - SCALE * 3 / 4 {
            self.shut.store(false, Ordering::Relaxed);
        }
    }

    /// Runnable threads on the host now (`/proc/loadavg`, fourth field,
    /// before the `/`), and the I/O threads' busy share since the last
    /// sample, read under the same lock so two samplers never interleave.
    fn sample(&self) -> Option<(u32, Option<u32>)> {
        let guard = self.loadavg.try_lock().ok()?;
        let file = guard.as_ref()?;
        let mut buf = [0u8; 128];
        let n = file.read_at(&mut buf, 0).ok()?;
        let runnable = parse_runnable(&buf[..n])?;
        Some((runnable, self.io_busy_since_last()))
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
    fn saturated_io_threads_shut_it_a_quarter_below_the_cores() {
        let g = gate(2);
        for _ in 0..32 {
            g.observe_io(SCALE / 2);
            g.observe(2);
        }
        assert!(!g.shut.load(Ordering::Relaxed), "I/O half busy: open");
        for _ in 0..32 {
            g.observe_io(SCALE);
            g.observe(1);
        }
        assert!(
            !g.shut.load(Ordering::Relaxed),
            "saturated, but a core free for the spinner: open"
        );
        for _ in 0..32 {
            g.observe_io(SCALE);
            g.observe(2);
        }
        assert!(
            g.shut.load(Ordering::Relaxed),
            "saturated, no core free: shut"
        );
    }

    #[test]
    fn the_io_busy_share_comes_from_the_runtime() {
        let g = gate(2);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        g.watch_io(rt.metrics());
        assert_eq!(g.io_busy_since_last(), None, "no earlier sample");
        let start = Instant::now();
        rt.block_on(async {
            // Busy: a task that runs for 30 ms (as a call made here does).
            tokio::spawn(async move {
                while start.elapsed() < Duration::from_millis(30) {
                    std::hint::spin_loop();
                }
            })
            .await
            .unwrap();
            // Idle: parked in the driver.
            tokio::time::sleep(Duration::from_millis(30)).await;
        });
        let share = g.io_busy_since_last().expect("a second sample");
        assert!(
            share > SCALE / 8 && share < SCALE * 7 / 8,
            "about half busy: {share}/{SCALE}"
        );
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
