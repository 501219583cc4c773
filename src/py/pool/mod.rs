//! The GIL pool: dedicated OS threads, each attached to the interpreter for its
//! whole life, that run Python calls submitted by tokio tasks.
//!
//! # Hand-off
//! Callers push a `Job` into a bounded lock-free queue and await a oneshot.
//! A worker drains every queued job per GIL acquisition and detaches only to
//! wait for more. Waiting is tiered because a futex wake-up costs tens of
//! microseconds on small VMs:
//! - one worker at a time (the *spinner*) spins briefly, detached, for new work;
//! - the others sleep on a condvar; a submitter pays for a wake-up only when
//!   no worker is spinning and one is asleep;
//! - on the caller side, the awaiting task first re-polls its oneshot by
//!   yielding to the scheduler (other tasks still run), then parks;
//! - neither spins when no core is free for it (`spin_gate`: more threads
//!   than cores, or more runnable threads on the host than cores); then a
//!   proven-fast handler runs on the calling I/O thread instead of being
//!   handed off (`here`), since every hand-off would cost two wake-ups.
//!
//! While one worker drains the queue the others sleep (taking the GIL from a
//! busy thread costs a forced switch, not a speed-up). If that worker makes no
//! progress for [`RESCUE_AFTER`] while jobs wait, a handler is blocking: a
//! waiting caller wakes an idle worker, which takes the GIL as soon as the
//! blocked handler releases it (sleep, I/O).
//!
//! # Limits
//! The queue is bounded (`python.queue`): a full queue makes callers wait
//! (counted in [`PoolStats::queue_full_waits`]). Calls have a timeout: the
//! caller stops waiting and the stuck-call monitor logs the stuck
//! thread's Python stack; the thread itself stays busy until Python returns.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use crossbeam_queue::ArrayQueue;
use crossbeam_utils::CachePadded;
use pyo3::prelude::*;
use tokio::sync::{Notify, oneshot};

mod here;
mod quota;
mod spin_gate;
mod worker;

pub(crate) use here::{CallSpeed, sending_from_io_thread};
pub use here::{PROVEN_AFTER, SLOW_CALL};
pub(crate) use quota::Quota;
use spin_gate::SpinGate;

use worker::worker_main;
pub(crate) use worker::{Job, Shared};

use super::asyncio::AsyncioLoop;
use super::handler::{CallContext, Handler, HandlerError, HandlerResult, Invoked, PendingCall};
use super::monitor::Monitor;
use crate::sync::lock;

/// Default for [`PoolConfig::spin`]: how long the spinner polls for work before it sleeps.
pub const SPIN_FOR: Duration = Duration::from_micros(50);
/// How long queued work may sit behind a busy worker that completes nothing
/// before a waiting caller wakes an idle worker to take it.
pub const RESCUE_AFTER: Duration = Duration::from_millis(1);
/// Default for [`PoolConfig::caller_spin_polls`].
pub const CALLER_SPIN_POLLS: u32 = 128;

/// Pool settings (from `[python]`).
#[derive(Debug, Clone)]
pub struct PoolConfig {
    /// Worker threads.
    pub workers: usize,
    /// Queue capacity.
    pub queue: usize,
    /// Per-call timeout.
    pub call_timeout: Duration,
    /// How many times a caller re-polls its reply (yielding to other tasks in
    /// between, a few microseconds in all) before parking; 0 parks at once.
    pub caller_spin_polls: u32,
    /// How long an idle worker spins before sleeping.
    pub spin: Duration,
    /// OS threads that submit calls (the tokio workers): with the pool's,
    /// more than the cores means no spinning (see `spin_gate`).
    pub io_threads: usize,
}

impl PoolConfig {
    /// A config with the default spin.
    pub fn new(workers: usize, queue: usize, call_timeout: Duration) -> Self {
        Self {
            workers,
            queue,
            call_timeout,
            caller_spin_polls: CALLER_SPIN_POLLS,
            spin: SPIN_FOR,
            io_threads: 1,
        }
    }
}

/// How long a pool thread that is not in a call may take to exit once the
/// pool closes, even past the shutdown deadline.
const EXIT_MOMENT: Duration = Duration::from_millis(200);
/// How long shutdown waits for the GIL to read a stuck thread's stack (a
/// thread spinning in C code while holding the GIL never lets go).
const STACK_WAIT: Duration = Duration::from_secs(1);

/// A pool thread still inside a Python call when the pool closed.
#[derive(Debug, Clone)]
pub struct StuckCall {
    /// The thread's name (`py-pool-N`).
    pub thread: String,
    /// The role whose call it runs.
    pub role: String,
    /// Its Python stack, or why it could not be read.
    pub stack: String,
}

/// The Python stacks of threads `idents`, read on a thread of its own so a
/// GIL that never comes back costs at most `wait`.
async fn stacks_within(idents: Vec<u64>, wait: Duration) -> Vec<String> {
    let n = idents.len();
    let (tx, rx) = oneshot::channel();
    let spawned = std::thread::Builder::new()
        .name("py-stacks".into())
        .spawn(move || {
            let stacks = Python::attach(|py| {
                idents
                    .iter()
                    .map(|&i| {
                        super::monitor::python_stack(py, i)
                            .unwrap_or_else(|e| format!("<stack unavailable: {e}>"))
                    })
                    .collect::<Vec<_>>()
            });
            let _ = tx.send(stacks);
        });
    let unavailable = |why: &str| vec![format!("<stack unavailable: {why}>"); n];
    if spawned.is_err() {
        return unavailable("no thread to read it");
    }
    match tokio::time::timeout(wait, rx).await {
        Ok(Ok(stacks)) => stacks,
        _ => unavailable(&format!(
            "the GIL was not free within {wait:?} (a thread holds it in C code)"
        )),
    }
}

/// Why a call produced no handler result.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CallError {
    /// The handler raised; its traceback has been logged.
    #[error(transparent)]
    Handler(#[from] HandlerError),
    /// The call ran past `python.call_timeout`; the caller stopped waiting.
    #[error("call did not finish within {0:?}")]
    Timeout(Duration),
    /// The pool is shutting down.
    #[error("the GIL pool is closed")]
    Closed,
}

/// Counters, readable at any time without the GIL.
#[derive(Debug, Default)]
pub struct PoolStats {
    /// Handler calls completed (including those that raised).
    pub calls: AtomicU64,
    /// Handler calls that raised or returned an unusable value.
    pub errors: AtomicU64,
    /// Submissions that found the queue full and had to wait.
    pub queue_full_waits: AtomicU64,
    /// Calls whose caller gave up after `call_timeout`.
    pub timeouts: AtomicU64,
    /// Of `calls`, those the calling I/O thread made itself (see `here`).
    pub calls_here: AtomicU64,
    /// Calls never started because their caller had stopped waiting (see `quota`).
    pub skipped: AtomicU64,
}

impl PoolStats {
    /// Counts `calls` completed calls, `raised` of which raised.
    pub(crate) fn add(&self, calls: usize, raised: usize) {
        if calls > 0 {
            self.calls.fetch_add(calls as u64, Ordering::Relaxed);
        }
        if raised > 0 {
            self.errors.fetch_add(raised as u64, Ordering::Relaxed);
        }
    }
}

/// The pool. Cheap to share behind an `Arc`; [`GilPool::close`] stops it.
pub struct GilPool {
    shared: Arc<Shared>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    asyncio: Mutex<Option<AsyncioLoop>>,
    monitor: Monitor,
}

impl GilPool {
    /// Starts the worker threads, the asyncio loop thread and the stuck-call monitor.
    /// The interpreter must be initialised ([`crate::py::init`]).
    ///
    /// # Errors
    /// If a thread cannot be spawned or the asyncio loop cannot be created.
    pub fn start(config: &PoolConfig) -> Result<Arc<Self>, crate::Error> {
        let asyncio = AsyncioLoop::start()?;
        let locals = Python::attach(|py| asyncio.locals(py));
        let monitor = Monitor::start(config.call_timeout)?;
        let slots: Box<[_]> = (0..config.workers)
            .map(|idx| monitor.pool_slot(format!("py-pool-{idx}")))
            .collect();
        let shared = Arc::new(Shared {
            queue: ArrayQueue::new(config.queue.max(1)),
            space: Notify::new(),
            space_waiters: CachePadded::new(AtomicUsize::new(0)),
            spinner: CachePadded::new(AtomicBool::new(false)),
            active: CachePadded::new(AtomicUsize::new(0)),
            sleepers: Mutex::new(0),
            wake: Condvar::new(),
            closed: AtomicBool::new(false),
            progress: CachePadded::new(AtomicU64::new(0)),
            waiting: CachePadded::new(AtomicUsize::new(0)),
            slots,
            call_timeout: config.call_timeout,
            caller_spin_polls: config.caller_spin_polls,
            spin: config.spin,
            spin_gate: SpinGate::new(config.workers + config.io_threads),
            stats: CachePadded::new(PoolStats::default()),
            quotas: quota::Quotas::new(config.workers),
            locals: Some(locals),
        });
        let mut threads = Vec::with_capacity(config.workers);
        for idx in 0..config.workers {
            let s = shared.clone();
            threads.push(
                std::thread::Builder::new()
                    .name(shared.slots[idx].thread.clone())
                    .spawn(move || worker_main(&s, idx))?,
            );
        }
        Ok(Arc::new(Self {
            shared,
            threads: Mutex::new(threads),
            asyncio: Mutex::new(Some(asyncio)),
            monitor,
        }))
    }

    /// Calls `handler(payload)` on a pool thread and returns its reply.
    /// An `async def` handler runs on the asyncio loop thread; if this future
    /// is dropped or times out, its asyncio task is cancelled.
    ///
    /// # Errors
    /// [`CallError`]: the handler raised, ran past the timeout, or the pool closed.
    pub async fn call(
        &self,
        handler: &Arc<Handler>,
        payload: Bytes,
    ) -> Result<Option<Bytes>, CallError> {
        self.call_with(handler, payload, None).await
    }

    /// Like [`GilPool::call`], passing `ctx` to handlers that declare `peer`/`conn_id`.
    ///
    /// # Errors
    /// [`CallError`]: the handler raised, ran past the timeout, or the pool closed.
    pub async fn call_with(
        &self,
        handler: &Arc<Handler>,
        payload: Bytes,
        ctx: Option<Arc<CallContext>>,
    ) -> Result<Option<Bytes>, CallError> {
        let locals = self.shared.locals.as_ref();
        let here = self.here(handler, 1, |py| {
            handler.invoke(py, &payload, ctx.as_deref(), locals)
        });
        let invoked = if let Some(invoked) = here {
            self.count_raised(worker::raised(std::slice::from_ref(&invoked)));
            invoked
        } else {
            let (tx, rx) = oneshot::channel();
            self.submit(Job::Call {
                handler: handler.clone(),
                payload,
                ctx,
                reply: tx,
            })
            .await?;
            self.wait_reply(rx).await?
        };
        match invoked {
            Invoked::Done(result) => Ok(result?),
            Invoked::Pending(pending) => self.finish_async(handler, pending).await,
        }
    }

    /// Calls `handler` once per payload, in order, with one hand-off to the
    /// pool (a connection's pipelined messages). Results are in payload order.
    ///
    /// # Errors
    /// One [`CallError`] per failed message; [`CallError::Closed`] for all if the pool closed.
    pub async fn call_batch(
        &self,
        handler: &Arc<Handler>,
        payloads: Vec<Bytes>,
        ctx: Option<Arc<CallContext>>,
    ) -> Vec<Result<Option<Bytes>, CallError>> {
        let n = payloads.len();
        let locals = self.shared.locals.as_ref();
        let here = self.here(handler, n as u64, |py| {
            payloads
                .iter()
                .map(|p| handler.invoke(py, p, ctx.as_deref(), locals))
                .collect::<Vec<_>>()
        });
        let invoked = if let Some(invoked) = here {
            self.count_raised(worker::raised(&invoked));
            invoked
        } else {
            let (tx, rx) = oneshot::channel();
            let submitted = self
                .submit(Job::Batch {
                    handler: handler.clone(),
                    payloads,
                    ctx,
                    reply: tx,
                })
                .await;
            let invoked = match submitted {
                Ok(()) => self.wait_reply(rx).await,
                Err(e) => Err(e),
            };
            match invoked {
                Ok(v) => v,
                Err(e) => return vec![Err(e); n],
            }
        };
        let mut out = Vec::with_capacity(n);
        for inv in invoked {
            out.push(match inv {
                Invoked::Done(result) => result.map_err(CallError::from),
                Invoked::Pending(pending) => self.finish_async(handler, pending).await,
            });
        }
        out
    }

    /// Runs `f` under the GIL on a pool thread and returns its result.
    ///
    /// # Errors
    /// [`CallError::Closed`] if the pool is closed, [`CallError::Timeout`] past `call_timeout`.
    pub async fn run<R, F>(&self, f: F) -> Result<R, CallError>
    where
        R: Send + 'static,
        F: FnOnce(Python<'_>) -> R + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        self.submit(Job::Run(Box::new(move |py| {
            let r = f(py);
            Some(Box::new(move || drop(tx.send(r))) as worker::Deliver)
        })))
        .await?;
        self.wait_reply(rx).await
    }

    /// Builds an awaitable with `make` on a pool thread and awaits it on the
    /// asyncio loop thread (pyo3-async-runtimes); the outer error is the pool's.
    ///
    /// # Errors
    /// [`CallError`] if the pool is closed or the call times out.
    pub async fn await_python<F>(&self, make: F) -> Result<PyResult<Py<PyAny>>, CallError>
    where
        F: for<'py> FnOnce(Python<'py>) -> PyResult<Bound<'py, PyAny>> + Send + 'static,
    {
        type Awaiting =
            std::pin::Pin<Box<dyn std::future::Future<Output = PyResult<Py<PyAny>>> + Send>>;
        let shared = self.shared.clone();
        let scheduled = self
            .run(move |py| -> PyResult<Awaiting> {
                let awaitable = make(py)?;
                let locals = shared
                    .locals
                    .as_ref()
                    .ok_or_else(|| pyo3::exceptions::PyRuntimeError::new_err("no asyncio loop"))?;
                Ok(Box::pin(pyo3_async_runtimes::into_future_with_locals(
                    locals, awaitable,
                )?))
            })
            .await?;
        match scheduled {
            Ok(fut) => match tokio::time::timeout(self.shared.call_timeout, fut).await {
                Ok(r) => Ok(r),
                Err(_) => Err(CallError::Timeout(self.shared.call_timeout)),
            },
            Err(e) => Ok(Err(e)),
        }
    }

    /// Queues `f` without waiting for it (used for cancellation and shutdown).
    pub(crate) fn run_detached(&self, f: impl FnOnce(Python<'_>) + Send + 'static) {
        let job = Job::Run(Box::new(move |py| {
            f(py);
            None
        }));
        if self.shared.queue.push(job).is_ok() {
            self.shared.notify_workers();
        }
    }

    /// Counts `raised` calls made by the caller itself that raised (the
    /// calls themselves are counted by `here`).
    pub(crate) fn count_raised(&self, raised: usize) {
        self.shared.stats.add(0, raised);
    }

    /// The stuck-call monitor watching this pool's workers (roles with a
    /// thread of their own register there too).
    pub fn monitor(&self) -> &Monitor {
        &self.monitor
    }

    /// The pool's counters.
    pub fn stats(&self) -> &PoolStats {
        &self.shared.stats
    }

    /// Times spinning stopped because no core was free (see `spin_gate`).
    pub fn spin_gate_shuts(&self) -> u64 {
        self.shared.spin_gate.shuts.load(Ordering::Relaxed)
    }

    /// Lets the spin gate watch how busy the I/O runtime that makes this
    /// pool's calls is (see `spin_gate`).
    pub fn watch_io_runtime(&self, metrics: tokio::runtime::RuntimeMetrics) {
        self.shared.spin_gate.watch_io(metrics);
    }

    /// How busy the watched I/O threads were, in percent, as the spin gate
    /// last saw it (0 until sampled; see `spin_gate`).
    pub fn io_busy_percent(&self) -> u32 {
        self.shared.spin_gate.io_busy_percent()
    }

    /// Sets how many pool threads `role`'s calls may occupy at once
    /// (`max_in_flight`; `None`: `workers - 1`, at least 1).
    pub fn set_max_in_flight(&self, role: &str, cap: Option<usize>) {
        self.shared.quotas.set_cap(&Arc::from(role), cap);
    }

    /// The default `max_in_flight`.
    pub fn default_max_in_flight(&self) -> usize {
        self.shared.quotas.default_cap()
    }

    /// Per role: pool threads in one of its calls now, and its calls parked
    /// because it holds its `max_in_flight` already.
    pub fn holders(&self) -> Vec<(Arc<str>, usize, usize)> {
        let mut out: Vec<(Arc<str>, usize, usize)> = Vec::new();
        for slot in self.shared.slots.iter() {
            if slot.current.load(Ordering::Relaxed) == 0 {
                continue;
            }
            let Some(role) = lock(&slot.role).clone() else {
                continue;
            };
            match out.iter_mut().find(|(r, _, _)| *r == role) {
                Some(e) => e.1 += 1,
                None => out.push((role, 1, 0)),
            }
        }
        for (role, n) in self.shared.quotas.parked_by_role() {
            match out.iter_mut().find(|(r, _, _)| *r == role) {
                Some(e) => e.2 += n,
                None => out.push((role, 0, n)),
            }
        }
        out
    }

    /// Worker threads.
    pub fn workers(&self) -> usize {
        self.shared.slots.len()
    }

    /// Jobs waiting in the queue.
    pub fn queued(&self) -> usize {
        self.shared.queue.len()
    }

    /// Workers currently running a call.
    pub fn busy(&self) -> usize {
        self.shared
            .slots
            .iter()
            .filter(|s| s.current.load(Ordering::Relaxed) != 0)
            .count()
    }

    /// Stops intake, lets the workers finish what is queued, stops the
    /// asyncio loop, and waits up to `deadline` for the threads. Returns the
    /// threads still inside a Python call then (wedged in a call that never
    /// returns), with their role and Python stack; a thread that is merely
    /// on its way out at the deadline gets a moment more and is not one.
    pub async fn close(&self, deadline: Instant) -> Vec<StuckCall> {
        if let Some(asyncio) = lock(&self.asyncio).take() {
            asyncio.stop();
        }
        self.shared.closed.store(true, Ordering::SeqCst);
        self.shared.space.notify_waiters();
        {
            let _g = lock(&self.shared.sleepers);
            self.shared.wake.notify_all();
        }
        let on_the_way_out = deadline.max(Instant::now()) + EXIT_MOMENT;
        loop {
            let left = {
                let mut threads = lock(&self.threads);
                threads.retain(|t| !t.is_finished());
                threads.len()
            };
            let now = Instant::now();
            let in_calls = self.busy();
            if left == 0 || (now >= deadline && (left == in_calls || now >= on_the_way_out)) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let stuck: Vec<(String, String, u64)> = self
            .shared
            .slots
            .iter()
            .filter(|s| s.current.load(Ordering::Acquire) != 0)
            .map(|s| {
                let role = lock(&s.role).as_deref().unwrap_or("-").to_string();
                (s.thread.clone(), role, s.py_ident.load(Ordering::Relaxed))
            })
            .collect();
        if stuck.is_empty() {
            return Vec::new();
        }
        let idents: Vec<u64> = stuck.iter().map(|s| s.2).collect();
        let mut stacks = stacks_within(idents, STACK_WAIT).await.into_iter();
        stuck
            .into_iter()
            .map(|(thread, role, _)| StuckCall {
                thread,
                role,
                stack: stacks.next().unwrap_or_default(),
            })
            .collect()
    }

    async fn submit(&self, mut job: Job) -> Result<(), CallError> {
        let shared = &self.shared;
        let mut counted = false;
        loop {
            if shared.closed.load(Ordering::Acquire) {
                return Err(CallError::Closed);
            }
            job = match shared.queue.push(job) {
                Ok(()) => {
                    shared.notify_workers();
                    return Ok(());
                }
                Err(job) => job,
            };
            if !counted {
                counted = true;
                shared
                    .stats
                    .queue_full_waits
                    .fetch_add(1, Ordering::Relaxed);
            }
            let notified = shared.space.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            shared.space_waiters.fetch_add(1, Ordering::SeqCst);
            // Retry after registering, so a pop between the failed push and
            // the registration cannot be missed.
            let retry = shared.queue.push(job);
            match retry {
                Ok(()) => {
                    shared.space_waiters.fetch_sub(1, Ordering::SeqCst);
                    shared.notify_workers();
                    return Ok(());
                }
                Err(j) => job = j,
            }
            notified.await;
            shared.space_waiters.fetch_sub(1, Ordering::SeqCst);
        }
    }

    /// Waits for a reply: re-polls first, then parks until `call_timeout`
    /// (counted from the end of the re-polling, which lasts microseconds).
    async fn wait_reply<T>(&self, rx: oneshot::Receiver<T>) -> Result<T, CallError> {
        // Counted down however this ends (a dropped caller included).
        let _waiting = spin_gate::Counted::new(&self.shared.waiting);
        self.wait_reply_counted(rx).await
    }

    async fn wait_reply_counted<T>(&self, mut rx: oneshot::Receiver<T>) -> Result<T, CallError> {
        // Re-poll without registering a waker first: a reply that lands while
        // we spin costs the worker no futex wake-up, and other tasks on this
        // runtime thread keep running in between.
        // The only caller waiting: its thread has nothing else to do and is
        // about to poll, so it is not counted as work.
        let alone = || self.shared.waiting.load(Ordering::Relaxed) <= 1;
        let polls = if self.shared.spin_gate.allows(alone) {
            self.shared.caller_spin_polls
        } else {
            0
        };
        for i in 0..polls {
            match rx.try_recv() {
                Ok(v) => return Ok(v),
                Err(oneshot::error::TryRecvError::Closed) => return Err(CallError::Closed),
                Err(oneshot::error::TryRecvError::Empty) => {}
            }
            if i < QUICK_POLLS {
                let_others_run().await;
            } else {
                tokio::task::yield_now().await;
            }
        }
        // Park, waking every RESCUE_AFTER: if jobs are queued and no worker
        // completed anything meanwhile, the busy worker is blocked in a
        // handler, so wake an idle one to take the queue.
        let shared = &self.shared;
        let deadline = tokio::time::Instant::now() + shared.call_timeout;
        let mut progress = shared.progress.load(Ordering::SeqCst);
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                shared.stats.timeouts.fetch_add(1, Ordering::Relaxed);
                return Err(CallError::Timeout(shared.call_timeout));
            }
            match tokio::time::timeout(left.min(RESCUE_AFTER), &mut rx).await {
                Ok(Ok(v)) => return Ok(v),
                Ok(Err(_)) => return Err(CallError::Closed),
                Err(_) => {
                    let now = shared.progress.load(Ordering::SeqCst);
                    if now == progress && !shared.queue.is_empty() {
                        shared.kick();
                    }
                    progress = now;
                }
            }
        }
    }

    async fn finish_async(
        &self,
        handler: &Arc<Handler>,
        pending: PendingCall,
    ) -> Result<Option<Bytes>, CallError> {
        let PendingCall { future, cancel } = pending;
        let mut guard = CancelOnDrop {
            pool: self,
            cancel: Some(cancel),
        };
        let outcome = match tokio::time::timeout(self.shared.call_timeout, future).await {
            Ok(outcome) => outcome,
            Err(_) => {
                self.shared.stats.timeouts.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(role = %handler.role(), handler = %handler.target(), "async handler timed out; cancelling its task");
                return Err(CallError::Timeout(self.shared.call_timeout));
            }
        };
        guard.cancel = None;
        let h = handler.clone();
        let result: HandlerResult = self
            .run(move |py| match outcome {
                Ok(obj) => h.reply(py, obj.bind(py)),
                Err(e) => Err(h.error(py, &e)),
            })
            .await?;
        if result.is_err() {
            self.shared.stats.errors.fetch_add(1, Ordering::Relaxed);
        }
        Ok(result?)
    }
}

/// Of a caller's re-polls, how many come back without the runtime looking
/// for I/O in between (see [`let_others_run`]): a trivial handler's reply
/// lands within them.
const QUICK_POLLS: u32 = 16;

/// Lets the runtime's other ready tasks run once, then comes back.
///
/// Unlike `tokio::task::yield_now`, it does not make the runtime poll its
/// I/O driver first (an `epoll_wait` and a pass over the timers, about as
/// long as a trivial call's whole hand-off) when this is the only ready
/// task; the runtime still polls it every `event_interval` tasks.
async fn let_others_run() {
    let mut woken = false;
    std::future::poll_fn(|cx| {
        if woken {
            return std::task::Poll::Ready(());
        }
        woken = true;
        cx.waker().wake_by_ref();
        std::task::Poll::Pending
    })
    .await;
}

/// Cancels an async handler's asyncio task if its caller stops waiting.
struct CancelOnDrop<'a> {
    pool: &'a GilPool,
    cancel: Option<Py<PyAny>>,
}

impl Drop for CancelOnDrop<'_> {
    fn drop(&mut self) {
        if let Some(handle) = self.cancel.take() {
            self.pool.run_detached(move |py| {
                if let Err(e) = handle.bind(py).call_method0("cancel") {
                    tracing::warn!("could not cancel an async handler: {e}");
                }
            });
        }
    }
}
