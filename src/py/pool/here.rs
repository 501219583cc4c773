//! Caller runs: when a hand-off to the pool would cost more than the call,
//! the calling I/O thread makes the call itself.
//!
//! A hand-off pays when a pool worker takes the job without a wake-up (it is
//! draining the queue, or spinning for work) and the caller can re-poll for
//! the reply. When the pool does not spin (more threads than cores, or a
//! host busy with other processes: see `spin_gate`), every hand-off costs two
//! wake-ups, each waiting for a time slice on a busy host, so a fast handler
//! runs here instead, on the tokio thread, as `dispatch = "inline"` does.
//!
//! Only handlers known to be fast run here, so the I/O thread is not held
//! by a slow one: a plain `def` that has made [`PROVEN_AFTER`] fast calls on
//! the pool and never called `pyipcd.send` (which may wait for a queue that
//! a task on this very thread drains; a first send from here that finds the
//! queue full is handed to a task instead of waiting). Calls are timed from
//! before the GIL is taken. A call (or pipelined batch) longer than
//! [`SLOW_OUT`], or [`STRIKES`] calls over [`SLOW_CALL`] within
//! [`STRIKE_WINDOW`] calls, keep the handler on the pool for good (logged
//! once). Strikes, not one slow call, because on a busy host a fast call is
//! sometimes preempted for a time slice or two; and once a handler has a
//! strike, its calls here are measured ([`ThreadUsage`]: the thread's CPU
//! clock and its voluntary context switches) until the strikes are
//! forgotten, so that time spent waiting for a core (preemption, no
//! voluntary context switch) does not count: only the call's CPU time, or
//! its whole duration when it blocked. A handler that is fast for a
//! while and then blocks holds this I/O thread (and every connection it
//! serves) for that call, as an inline role would, and its caller gets no
//! `call_timeout` error: the reply is sent when the call returns.
//! Calls here are watched by the stuck-call monitor (a call past
//! `call_timeout` has its Python stack logged).

use std::cell::{Cell, RefCell};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, Instant};

use pyo3::prelude::*;

use super::GilPool;
use crate::py::handler::Handler;
use crate::py::monitor::WorkerSlot;
use crate::py::output;
use crate::sync::lock;

/// Calls a handler must make on the pool, all fast, before it may run on an I/O thread.
pub const PROVEN_AFTER: u32 = 16;
/// A call longer than this (GIL waits inside it included) is a strike.
pub const SLOW_CALL: Duration = Duration::from_millis(2);
/// A call longer than this keeps its handler off the I/O threads at once.
pub const SLOW_OUT: Duration = Duration::from_millis(50);
/// Strikes within [`STRIKE_WINDOW`] calls that keep a handler off the I/O threads.
pub const STRIKES: u32 = 4;
/// Calls without a strike after which strikes are forgotten.
pub const STRIKE_WINDOW: u32 = 256;

/// How long a handler's calls take, as far as running it on an I/O thread is concerned.
#[derive(Debug, Default)]
pub(crate) struct CallSpeed {
    /// It called `pyipcd.send`, which may wait for a queue that a task on
    /// the I/O thread drains: never on an I/O thread.
    sends: AtomicBool,
    /// Fast calls seen, saturating at [`PROVEN_AFTER`].
    fast: AtomicU32,
    /// Recent strikes, and calls since the last one.
    strikes: AtomicU32,
    since_strike: AtomicU32,
    /// Kept off the I/O threads for good.
    slow: AtomicBool,
}

impl CallSpeed {
    /// Enough fast calls, not slow, and no `pyipcd.send`.
    pub(crate) fn proven(&self) -> bool {
        self.fast.load(Ordering::Relaxed) >= PROVEN_AFTER
            && !self.slow.load(Ordering::Relaxed)
            && !self.sends.load(Ordering::Relaxed)
    }

    /// Runs `f` (calls of this handler) noting whether they used `pyipcd.send`.
    pub(crate) fn watch_sends<R>(&self, f: impl FnOnce() -> R) -> R {
        SENT.set(false);
        let r = f();
        if SENT.get() {
            self.sends.store(true, Ordering::Relaxed);
        }
        r
    }

    /// Whether calls made here should be measured with [`ThreadUsage`]: the
    /// handler has a recent strike, which may have been a preemption.
    pub(crate) fn suspect(&self) -> bool {
        self.strikes.load(Ordering::Relaxed) > 0
    }

    /// Whether pool calls still need timing (not yet proven, not yet slow).
    pub(crate) fn learning(&self) -> bool {
        self.fast.load(Ordering::Relaxed) < PROVEN_AFTER && !self.slow.load(Ordering::Relaxed)
    }

    /// Records `calls` calls made together in `took`; returns true when
    /// they made the handler slow. Over [`SLOW_OUT`] in all is out at once
    /// (one long call in a pipelined batch is not averaged away); over
    /// [`SLOW_CALL`] per call is a strike.
    pub(crate) fn record(&self, took: Duration, calls: usize) -> bool {
        let per_call = took / u32::try_from(calls.max(1)).unwrap_or(u32::MAX);
        let out = took > SLOW_OUT
            || (per_call > SLOW_CALL && {
                self.since_strike.store(0, Ordering::Relaxed);
                self.strikes.fetch_add(1, Ordering::Relaxed) + 1 >= STRIKES
            });
        if out {
            return !self.slow.swap(true, Ordering::Relaxed);
        }
        if per_call <= SLOW_CALL {
            if self.fast.load(Ordering::Relaxed) < PROVEN_AFTER {
                self.fast.fetch_add(1, Ordering::Relaxed);
            }
            if self.since_strike.fetch_add(1, Ordering::Relaxed) + 1 >= STRIKE_WINDOW {
                self.since_strike.store(0, Ordering::Relaxed);
                self.strikes.store(0, Ordering::Relaxed);
            }
        }
        false
    }
}

/// What the kernel has counted for the calling thread so far.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ThreadUsage {
    cpu: Duration,
    voluntary_switches: i64,
}

impl ThreadUsage {
    /// This thread's CPU time and voluntary context switches (`None` if
    /// the kernel does not say, which Linux does). The CPU time comes from
    /// the thread's CPU clock: `getrusage` reports a running thread's time
    /// as of its last tick (4 ms steps here), too coarse for one call.
    pub(crate) fn now() -> Option<Self> {
        use nix::sys::resource::{UsageWho, getrusage};
        use nix::time::{ClockId, clock_gettime};
        let cpu = clock_gettime(ClockId::CLOCK_THREAD_CPUTIME_ID).ok()?;
        let usage = getrusage(UsageWho::RUSAGE_THREAD).ok()?;
        Some(Self {
            cpu: Duration::from(cpu),
            voluntary_switches: usage.voluntary_context_switches(),
        })
    }

    /// How long a call that took `took` (wall clock) between `self` and
    /// `after` held its thread, as far as the handler is to blame: its CPU
    /// time if the thread never blocked (the rest was waiting for a core),
    /// all of it if the thread blocked (a sleep, I/O, a wait for the GIL).
    pub(crate) fn held(self, after: Self, took: Duration) -> Duration {
        if after.voluntary_switches > self.voluntary_switches {
            took
        } else {
            after.cpu.saturating_sub(self.cpu).min(took)
        }
    }
}

/// This thread's record with the monitor of the pool it last ran calls for.
struct HereThread {
    /// The pool's monitor, by address: a thread serving another pool re-registers.
    pool: usize,
    slot: Arc<WorkerSlot>,
    seq: u64,
}

thread_local! {
    static HERE: RefCell<Option<HereThread>> = const { RefCell::new(None) };
    /// This thread is making a call for the pool (see [`on_io_thread`]).
    static ON_IO: Cell<bool> = const { Cell::new(false) };
    /// The current call used `pyipcd.send`.
    static SENT: Cell<bool> = const { Cell::new(false) };
    /// This thread keeps an interpreter thread state for life (see `keep_thread_state`).
    static KEPT: Cell<bool> = const { Cell::new(false) };
}

/// Called by `pyipcd.send`: notes that the running call sends, and says
/// whether it runs on an I/O thread, where it must not wait for a full
/// queue (the task that drains it may be waiting for this very thread).
pub(crate) fn sending_from_io_thread() -> bool {
    SENT.set(true);
    ON_IO.get()
}

/// Gives the calling thread an interpreter thread state that outlives each
/// call: without one, every `Python::attach` here would create and destroy
/// a `PyThreadState` (about 3x the cost of the call itself).
#[allow(unsafe_code)]
fn keep_thread_state() {
    if KEPT.get() {
        return;
    }
    // SAFETY: the interpreter is initialised (a pool exists) and this thread
    // holds no GIL (checked by the caller). Ensure creates the thread state
    // and takes the GIL; SaveThread releases the GIL and keeps the state,
    // with the GILState counter at 1, so later `Python::attach` calls on
    // this thread reuse it. It lives as long as the thread.
    unsafe {
        let _ = pyo3::ffi::PyGILState_Ensure();
        let _ = pyo3::ffi::PyEval_SaveThread();
    }
    KEPT.set(true);
}

/// Whether this thread holds the GIL already (a call from inside Python).
#[allow(unsafe_code)]
fn holds_gil() -> bool {
    // SAFETY: a plain query of this thread's state, valid once Python is up.
    unsafe { pyo3::ffi::PyGILState_Check() != 0 }
}

impl GilPool {
    /// Whether a call to `handler` should run on the calling thread rather
    /// than be handed off (see the module docs).
    pub(crate) fn runs_here(&self, handler: &Handler) -> bool {
        let shared = &self.shared;
        !handler.is_async()
            && handler.speed.proven()
            // Whatever is queued: a worker still draining finishes what it
            // has (this thread waits for the GIL meanwhile, once), and with
            // nothing more handed off the queue empties for good.
            && !shared.spin_gate.allows(|| false)
            && !shared.closed.load(Ordering::Relaxed)
            && !holds_gil()
    }

    /// Runs `f` (`calls` handler calls) on this thread for `handler`, as a
    /// call the monitor watches, if [`GilPool::runs_here`] says so; `None`
    /// means "hand it off".
    pub(crate) fn here<R>(
        &self,
        handler: &Handler,
        calls: u64,
        f: impl FnOnce(Python<'_>) -> R,
    ) -> Option<R> {
        if !self.runs_here(handler) {
            return None;
        }
        keep_thread_state();
        let pool = std::ptr::from_ref(self) as usize;
        // Timed from before the GIL is taken: waiting for it holds this
        // thread's connections up just as a slow call does.
        let usage = handler.speed.suspect().then(ThreadUsage::now).flatten();
        let started = Instant::now();
        let r = Python::attach(|py| {
            // The slot is cloned out so that `f` may call into the pool again.
            let (slot, seq, fresh) = HERE.with_borrow_mut(|here| {
                let fresh = here.as_ref().is_none_or(|h| h.pool != pool);
                if fresh {
                    let name = std::thread::current().name().unwrap_or("io").to_string();
                    let slot = self.monitor.io_slot(py, name);
                    *here = Some(HereThread { pool, slot, seq: 0 });
                }
                let h = here.as_mut().expect("set above");
                h.seq += 1;
                (h.slot.clone(), h.seq, fresh)
            });
            if fresh || !output::thread_role_is(handler.role()) {
                output::set_thread_role(Some(handler.role()));
                *lock(&slot.role) = Some(handler.role().clone());
            }
            ON_IO.set(true);
            let r = handler.speed.watch_sends(|| slot.timed(seq, || f(py)));
            ON_IO.set(false);
            r
        });
        let mut took = started.elapsed();
        if let Some(before) = usage
            && let Some(after) = ThreadUsage::now()
        {
            took = before.held(after, took);
        }
        if handler
            .speed
            .record(took, usize::try_from(calls).unwrap_or(usize::MAX))
        {
            tracing::info!(
                role = %handler.role(),
                handler = %handler.target(),
                "{} call(s) took {:.1} ms on an I/O thread: this handler's calls stay on the GIL pool from now on",
                calls,
                took.as_secs_f64() * 1e3
            );
        }
        let stats = &self.shared.stats;
        stats.add(usize::try_from(calls).unwrap_or(usize::MAX), 0);
        stats.calls_here.fetch_add(calls, Ordering::Relaxed);
        Some(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FAST: Duration = Duration::from_micros(5);

    /// A record of a handler proven fast.
    fn proven() -> CallSpeed {
        let speed = CallSpeed::default();
        for _ in 0..PROVEN_AFTER {
            speed.record(FAST, 1);
        }
        assert!(speed.proven());
        speed
    }

    #[test]
    fn proven_after_enough_fast_calls() {
        let speed = CallSpeed::default();
        for _ in 1..PROVEN_AFTER {
            assert!(!speed.record(FAST, 1));
        }
        assert!(!speed.proven() && speed.learning());
        speed.record(FAST, 1);
        assert!(speed.proven() && !speed.learning());
    }

    #[test]
    fn one_very_slow_call_is_enough() {
        let speed = proven();
        assert!(speed.record(SLOW_OUT * 2, 1), "reported once");
        assert!(!speed.proven());
        assert!(!speed.record(SLOW_OUT * 2, 1), "not reported again");
    }

    #[test]
    fn strikes_add_up_within_the_window_only() {
        let speed = proven();
        let strike = SLOW_CALL * 2;
        for _ in 1..STRIKES {
            assert!(!speed.record(strike, 1));
        }
        for _ in 0..STRIKE_WINDOW {
            speed.record(FAST, 1);
        }
        for _ in 1..STRIKES {
            assert!(!speed.record(strike, 1), "strikes were forgotten");
        }
        assert!(speed.proven());
        assert!(speed.record(strike, 1));
        assert!(!speed.proven());
    }

    #[test]
    fn one_long_call_in_a_batch_is_not_averaged_away() {
        let speed = proven();
        // 64 calls in 64 ms: 1 ms each on average, yet the batch held the thread 64 ms.
        assert!(speed.record(Duration::from_millis(64), 64));
        assert!(!speed.proven());
    }

    #[test]
    fn a_strike_makes_the_handler_suspect_until_forgotten() {
        let speed = proven();
        assert!(!speed.suspect(), "no strike, no measuring");
        speed.record(SLOW_CALL * 2, 1);
        assert!(speed.suspect() && speed.proven());
        for _ in 0..STRIKE_WINDOW {
            speed.record(FAST, 1);
        }
        assert!(!speed.suspect());
    }

    /// Usage at `cpu_us` of CPU with `switches` voluntary context switches.
    fn usage(cpu_us: u64, switches: i64) -> ThreadUsage {
        ThreadUsage {
            cpu: Duration::from_micros(cpu_us),
            voluntary_switches: switches,
        }
    }

    #[test]
    fn waiting_for_a_core_is_not_held_but_blocking_is() {
        let took = Duration::from_millis(6);
        // Preempted: 50 µs of CPU in 6 ms, never blocked.
        assert_eq!(
            usage(1000, 3).held(usage(1050, 3), took),
            Duration::from_micros(50)
        );
        // Blocked (a sleep, I/O, the GIL): the whole call.
        assert_eq!(usage(1000, 3).held(usage(1050, 4), took), took);
        // CPU-bound: its CPU time, never more than the wall clock.
        assert_eq!(usage(0, 0).held(usage(9000, 0), took), took);
    }

    #[test]
    fn thread_usage_sees_this_threads_cpu_and_sleeps() {
        let before = ThreadUsage::now().expect("getrusage");
        let spin = Instant::now();
        while spin.elapsed() < Duration::from_millis(20) {
            std::hint::black_box(0);
        }
        let spun = ThreadUsage::now().expect("getrusage");
        assert!(
            spun.cpu - before.cpu >= Duration::from_millis(10),
            "{before:?} {spun:?}"
        );
        std::thread::sleep(Duration::from_millis(5));
        let slept = ThreadUsage::now().expect("getrusage");
        assert!(slept.voluntary_switches > spun.voluntary_switches);
        assert!(slept.cpu - spun.cpu < Duration::from_millis(5));
    }

    #[test]
    fn a_handler_that_sends_is_never_proven() {
        let speed = proven();
        speed.watch_sends(|| assert!(!sending_from_io_thread()));
        assert!(!speed.proven());
    }
}
