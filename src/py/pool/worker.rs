//! The worker side of the GIL pool: the state shared with callers, how idle
//! workers spin and sleep, and the loop that runs jobs under the GIL.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering, fence};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use crossbeam_queue::ArrayQueue;
use crossbeam_utils::CachePadded;
use pyo3::prelude::*;
use pyo3_async_runtimes::TaskLocals;
use tokio::sync::{Notify, oneshot};

use super::PoolStats;
use super::quota::{Admit, Quota, Quotas};
use crate::py::handler::{CallContext, Handler, Invoked};
use crate::py::monitor::WorkerSlot;
use crate::py::output;
use crate::sync::lock;

/// A closure job; what it returns is run after the worker's books show the
/// job over (see [`Reply`]): its reply, if it has one.
type Closure = Box<dyn FnOnce(Python<'_>) -> Option<Deliver> + Send>;
/// Sends a closure job's reply.
pub(crate) type Deliver = Box<dyn FnOnce() + Send>;

/// One unit of work for a pool thread.
pub(crate) enum Job {
    /// Call a handler with a payload.
    Call {
        handler: Arc<Handler>,
        payload: Bytes,
        ctx: Option<Arc<CallContext>>,
        reply: oneshot::Sender<Invoked>,
    },
    /// Call a handler once per payload, in order, in one hand-off.
    Batch {
        handler: Arc<Handler>,
        payloads: Vec<Bytes>,
        ctx: Option<Arc<CallContext>>,
        reply: oneshot::Sender<Vec<Invoked>>,
    },
    /// Run any closure under the GIL.
    Run(Closure),
}

impl Job {
    /// The handler a call job runs (none for a closure).
    pub(crate) fn handler(&self) -> Option<&Arc<Handler>> {
        match self {
            Job::Call { handler, .. } | Job::Batch { handler, .. } => Some(handler),
            Job::Run(_) => None,
        }
    }

    /// Whether the caller stopped waiting for the reply.
    pub(crate) fn caller_gone(&self) -> bool {
        match self {
            Job::Call { reply, .. } => reply.is_closed(),
            Job::Batch { reply, .. } => reply.is_closed(),
            Job::Run(_) => false,
        }
    }

    /// The handler calls it makes.
    pub(crate) fn calls(&self) -> usize {
        match self {
            Job::Call { .. } | Job::Run(_) => 1,
            Job::Batch { payloads, .. } => payloads.len(),
        }
    }
}

/// Hot fields written by different threads sit on separate cache lines
/// (`CachePadded`): sharing one made throughput swing 3x between runs,
/// depending on where the allocator placed this struct.
pub(crate) struct Shared {
    pub(crate) queue: ArrayQueue<Job>,
    pub(crate) space: Notify,
    pub(crate) space_waiters: CachePadded<AtomicUsize>,
    pub(crate) spinner: CachePadded<AtomicBool>,
    pub(crate) active: CachePadded<AtomicUsize>,
    pub(crate) sleepers: Mutex<usize>,
    pub(crate) wake: Condvar,
    pub(crate) closed: AtomicBool,
    pub(crate) progress: CachePadded<AtomicU64>,
    /// Callers waiting for a reply (handed off, not yet answered).
    pub(crate) waiting: CachePadded<AtomicUsize>,
    /// Each worker's record, owned by the stuck-call monitor.
    pub(crate) slots: Box<[Arc<WorkerSlot>]>,
    pub(crate) call_timeout: Duration,
    pub(crate) caller_spin_polls: u32,
    pub(crate) spin: Duration,
    pub(crate) spin_gate: super::SpinGate,
    pub(crate) stats: CachePadded<PoolStats>,
    /// Each role's share of the threads, and the jobs parked over it.
    pub(crate) quotas: Quotas,
    pub(crate) locals: Option<TaskLocals>,
}

/// Why a waiting worker returns.
pub(crate) enum Wake {
    Work,
    Stop,
}

impl Shared {
    /// After a push: wake a sleeping worker unless one is spinning or one is
    /// draining the queue (it will see the job when its current call returns;
    /// if that call blocks, the waiting caller kicks a sleeper, see `wait_reply`).
    pub(crate) fn notify_workers(&self) {
        fence(Ordering::SeqCst);
        if self.spinner.load(Ordering::SeqCst) || self.active.load(Ordering::SeqCst) > 0 {
            return;
        }
        self.kick();
    }

    pub(crate) fn release_space(&self) {
        fence(Ordering::SeqCst);
        if self.space_waiters.load(Ordering::SeqCst) > 0 {
            self.space.notify_waiters();
        }
    }

    /// The next job to run: a parked one whose role has room again, else
    /// the queue's next that its role has room for (see `quota`).
    fn next_job(&self) -> Option<(Job, Option<Arc<Quota>>)> {
        if let Some((job, quota)) = self.quotas.unpark(&self.stats.skipped) {
            return Some((job, Some(quota)));
        }
        loop {
            let job = self.queue.pop()?;
            self.release_space();
            match self.quotas.admit(job, &self.stats.skipped) {
                Admit::Run(job, quota) => return Some((job, quota)),
                Admit::Next => {
                    // Parked: its role's running call may have returned meanwhile.
                    if let Some((job, quota)) = self.quotas.unpark(&self.stats.skipped) {
                        return Some((job, Some(quota)));
                    }
                }
            }
        }
    }

    /// Wakes one sleeping worker (used by callers whose job sits behind a stalled worker).
    pub(crate) fn kick(&self) {
        let sleepers = lock(&self.sleepers);
        if *sleepers > 0 {
            self.wake.notify_one();
        }
    }

    /// Called detached. Returns when there is work (with `active` already
    /// incremented) or the pool is closed and drained.
    pub(crate) fn wait_for_work(&self) -> Wake {
        // Spin only when nobody else is draining the queue: a second thread
        // taking the GIL from a busy one costs a forced switch, not a speed-up.
        if self.active.load(Ordering::SeqCst) == 0
            && self
                .spin_gate
                .allows(|| !self.spinner.load(Ordering::Relaxed))
            && self
                .spinner
                .compare_exchange(false, true, Ordering::SeqCst, Ordering::SeqCst)
                .is_ok()
        {
            let spinning = self.spin_gate.spinning();
            let woke = self.spin();
            drop(spinning);
            self.spinner.store(false, Ordering::SeqCst);
            // Pairs with the fence in `notify_workers`: either the submitter
            // sees no spinner and wakes a sleeper, or we see its job below.
            fence(Ordering::SeqCst);
            if let Some(w) = woke {
                return w;
            }
        }
        let mut sleepers = lock(&self.sleepers);
        *sleepers += 1;
        loop {
            if !self.queue.is_empty() {
                *sleepers -= 1;
                self.active.fetch_add(1, Ordering::SeqCst);
                return Wake::Work;
            }
            if self.closed.load(Ordering::SeqCst) {
                *sleepers -= 1;
                return Wake::Stop;
            }
            sleepers = self
                .wake
                .wait(sleepers)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
        }
    }

    /// The spinner's loop; `None` means "nothing came, go to sleep".
    fn spin(&self) -> Option<Wake> {
        let start = Instant::now();
        let mut i = 0u32;
        loop {
            if self.active.load(Ordering::SeqCst) > 0 {
                // Another worker is draining (it holds the GIL): leave the
                // queue to it and sleep, rather than ping-pong the GIL.
                return None;
            }
            if !self.queue.is_empty() {
                self.active.fetch_add(1, Ordering::SeqCst);
                return Some(Wake::Work);
            }
            if self.closed.load(Ordering::SeqCst) {
                return Some(Wake::Stop);
            }
            i = i.wrapping_add(1);
            if i < 64 {
                // The next call of a busy caller usually lands within a microsecond.
                std::hint::spin_loop();
                continue;
            }
            if i % 8 == 0 && start.elapsed() > self.spin {
                return None;
            }
            // Then spin politely: give the core to any runnable thread (the
            // I/O thread, on a small host) instead of burning it; this returns
            // at once when nothing else wants the core.
            std::thread::yield_now();
        }
    }
}

pub(crate) fn worker_main(shared: &Shared, idx: usize) {
    let slot = &shared.slots[idx];
    Python::attach(|py| {
        if let Some(ident) = crate::py::thread_ident(py) {
            slot.py_ident.store(ident, Ordering::Relaxed);
        }
        let mut seq = 0u64;
        loop {
            match py.detach(|| shared.wait_for_work()) {
                Wake::Stop => break,
                Wake::Work => {}
            }
            while let Some((job, quota)) = shared.next_job() {
                seq += 1;
                let reply = slot.timed(seq, || run_job(py, shared, slot, job));
                if let Some(q) = quota {
                    q.leave();
                }
                shared.progress.fetch_add(1, Ordering::Release);
                // Only now: a caller that has its reply finds the call over
                // (in `/health`, and in its role's quota for its next call).
                reply.send();
            }
            shared.active.fetch_sub(1, Ordering::SeqCst);
        }
    });
}

/// Tags this thread's Python output and the monitor's slot with the
/// handler's role; a pointer comparison when it has not changed (the usual case).
fn note_role(slot: &WorkerSlot, handler: &Handler) {
    if !output::thread_role_is(handler.role()) {
        output::set_thread_role(Some(handler.role()));
        *lock(&slot.role) = Some(handler.role().clone());
    }
}

/// A finished job's reply, not yet sent.
enum Reply {
    Call(oneshot::Sender<Invoked>, Invoked),
    Batch(oneshot::Sender<Vec<Invoked>>, Vec<Invoked>),
    Run(Deliver),
    None,
}

impl Reply {
    /// Hands the reply to its caller. A caller that gave up dropped its
    /// receiver; the reply is then dropped here, under the GIL.
    fn send(self) {
        match self {
            Reply::Call(to, invoked) => drop(to.send(invoked)),
            Reply::Batch(to, results) => drop(to.send(results)),
            Reply::Run(deliver) => deliver(),
            Reply::None => {}
        }
    }
}

fn run_job(py: Python<'_>, shared: &Shared, slot: &WorkerSlot, job: Job) -> Reply {
    match job {
        Job::Call {
            handler,
            payload,
            ctx,
            reply,
        } => {
            note_role(slot, &handler);
            let timing = handler.speed.learning().then(Instant::now);
            let invoked = handler.speed.watch_sends(|| {
                handler.invoke(py, &payload, ctx.as_deref(), shared.locals.as_ref())
            });
            if let Some(t) = timing {
                handler.speed.record(t.elapsed(), 1);
            }
            shared.stats.add(1, raised(std::slice::from_ref(&invoked)));
            Reply::Call(reply, invoked)
        }
        Job::Batch {
            handler,
            payloads,
            ctx,
            reply,
        } => {
            note_role(slot, &handler);
            let timing = handler.speed.learning().then(Instant::now);
            let results: Vec<Invoked> = handler.speed.watch_sends(|| {
                payloads
                    .iter()
                    .map(|p| handler.invoke(py, p, ctx.as_deref(), shared.locals.as_ref()))
                    .collect()
            });
            if let Some(t) = timing {
                handler.speed.record(t.elapsed(), payloads.len());
            }
            shared.stats.add(results.len(), raised(&results));
            Reply::Batch(reply, results)
        }
        Job::Run(f) => f(py).map_or(Reply::None, Reply::Run),
    }
}

/// How many of `invoked` raised (or returned an unusable value).
pub(crate) fn raised(invoked: &[Invoked]) -> usize {
    invoked
        .iter()
        .filter(|r| matches!(r, Invoked::Done(Err(_))))
        .count()
}
