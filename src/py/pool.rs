//! The GIL pool: dedicated OS threads, each attached to the interpreter for its
//! whole life, that run Python calls submitted by tokio tasks.
//!
//! # Hand-off
//! Callers push a [`Job`] into a bounded lock-free queue and await a oneshot.
//! A worker drains every queued job per GIL acquisition and detaches only to
//! wait for more. Waiting is tiered because a futex wake-up costs tens of
//! microseconds on small VMs:
//! - one worker at a time (the *spinner*) spins briefly, detached, for new work;
//! - the others sleep on a condvar; a submitter pays for a wake-up only when
//!   no worker is spinning and one is asleep;
//! - on the caller side, the awaiting task first re-polls its oneshot by
//!   yielding to the scheduler (other tasks still run), then parks.
//!
//! While one worker is busy, the spinner leaves queued work to it (taking the
//! GIL from a busy thread costs a forced switch) unless that worker makes no
//! progress for [`RESCUE_AFTER`]: then a handler is blocking and the spinner
//! takes the GIL when it is released.
//!
//! # Limits
//! The queue is bounded (`python.queue`): a full queue makes callers wait
//! (counted in [`PoolStats::queue_full_waits`]). Calls have a timeout: the
//! caller stops waiting and the [`monitor`](super::monitor) logs the stuck
//! thread's Python stack; the thread itself stays busy until Python returns.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering, fence};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use crossbeam_queue::ArrayQueue;
use pyo3::prelude::*;
use pyo3_async_runtimes::TaskLocals;
use tokio::sync::{Notify, oneshot};

use super::asyncio::AsyncioLoop;
use super::handler::{Handler, HandlerError, HandlerResult, Invoked, PendingCall};
use super::output;

/// How long the spinner polls for work before it sleeps.
pub const SPIN_FOR: Duration = Duration::from_micros(50);
/// How long queued work may sit behind a busy worker that completes nothing
/// before an idle worker takes it.
pub const RESCUE_AFTER: Duration = Duration::from_micros(500);
/// How long a caller re-polls its reply (yielding to other tasks) before parking.
const CALLER_SPIN_FOR: Duration = Duration::from_micros(50);

/// Pool settings (from `[python]`).
#[derive(Debug, Clone)]
pub struct PoolConfig {
    /// Worker threads.
    pub workers: usize,
    /// Queue capacity.
    pub queue: usize,
    /// Per-call timeout.
    pub call_timeout: Duration,
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
    /// Calls reported as stuck by the monitor.
    pub stuck_reports: AtomicU64,
}

type Closure = Box<dyn FnOnce(Python<'_>) + Send>;

/// One unit of work for a pool thread.
pub(crate) enum Job {
    /// Call a handler with a payload.
    Call {
        handler: Arc<Handler>,
        payload: Bytes,
        reply: oneshot::Sender<Invoked>,
    },
    /// Run any closure under the GIL.
    Run(Closure),
}

/// What the monitor needs to know about one worker.
pub(crate) struct WorkerSlot {
    /// Nanoseconds since the pool's epoch when the current call started; 0 when idle.
    pub(crate) busy_since: AtomicU64,
    /// Incremented per call, so a stuck call is reported once.
    pub(crate) call_seq: AtomicU64,
    /// `threading.get_ident()` of the worker.
    pub(crate) py_ident: AtomicU64,
    /// Role of the current or last call.
    pub(crate) role: Mutex<Option<Arc<str>>>,
}

pub(crate) struct Shared {
    queue: ArrayQueue<Job>,
    space: Notify,
    space_waiters: AtomicUsize,
    spinner: AtomicBool,
    active: AtomicUsize,
    sleepers: Mutex<usize>,
    wake: Condvar,
    closed: AtomicBool,
    progress: AtomicU64,
    pub(crate) slots: Box<[WorkerSlot]>,
    pub(crate) epoch: Instant,
    pub(crate) call_timeout: Duration,
    pub(crate) stats: PoolStats,
    locals: Option<TaskLocals>,
}

/// The pool. Cheap to share behind an `Arc`; [`GilPool::close`] stops it.
pub struct GilPool {
    shared: Arc<Shared>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    asyncio: Mutex<Option<AsyncioLoop>>,
}

enum Wake {
    Work,
    Stop,
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
        let slots = (0..config.workers)
            .map(|_| WorkerSlot {
                busy_since: AtomicU64::new(0),
                call_seq: AtomicU64::new(0),
                py_ident: AtomicU64::new(0),
                role: Mutex::new(None),
            })
            .collect();
        let shared = Arc::new(Shared {
            queue: ArrayQueue::new(config.queue.max(1)),
            space: Notify::new(),
            space_waiters: AtomicUsize::new(0),
            spinner: AtomicBool::new(false),
            active: AtomicUsize::new(0),
            sleepers: Mutex::new(0),
            wake: Condvar::new(),
            closed: AtomicBool::new(false),
            progress: AtomicU64::new(0),
            slots,
            epoch: Instant::now(),
            call_timeout: config.call_timeout,
            stats: PoolStats::default(),
            locals: Some(locals),
        });
        let mut threads = Vec::with_capacity(config.workers);
        for idx in 0..config.workers {
            let s = shared.clone();
            threads.push(
                std::thread::Builder::new()
                    .name(format!("py-pool-{idx}"))
                    .spawn(move || worker_main(&s, idx))?,
            );
        }
        super::monitor::spawn(Arc::downgrade(&shared))?;
        Ok(Arc::new(Self {
            shared,
            threads: Mutex::new(threads),
            asyncio: Mutex::new(Some(asyncio)),
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
        let started = Instant::now();
        let (tx, rx) = oneshot::channel();
        self.submit(Job::Call {
            handler: handler.clone(),
            payload,
            reply: tx,
        })
        .await?;
        let invoked = self.wait_reply(rx, started).await?;
        match invoked {
            Invoked::Done(result) => Ok(result?),
            Invoked::Pending(pending) => self.finish_async(handler, pending, started).await,
        }
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
        let started = Instant::now();
        let (tx, rx) = oneshot::channel();
        self.submit(Job::Run(Box::new(move |py| {
            let _ = tx.send(f(py));
        })))
        .await?;
        self.wait_reply(rx, started).await
    }

    /// Queues `f` without waiting for it (used for cancellation and shutdown).
    pub(crate) fn run_detached(&self, f: impl FnOnce(Python<'_>) + Send + 'static) {
        if self.shared.queue.push(Job::Run(Box::new(f))).is_ok() {
            self.shared.notify_workers();
        }
    }

    /// The pool's counters.
    pub fn stats(&self) -> &PoolStats {
        &self.shared.stats
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
            .filter(|s| s.busy_since.load(Ordering::Relaxed) != 0)
            .count()
    }

    /// Stops intake, lets the workers finish what is queued, stops the
    /// asyncio loop, and waits up to `deadline` for the threads.
    /// Returns the number of worker threads still running at the deadline
    /// (wedged in a call that never returns).
    pub async fn close(&self, deadline: Instant) -> usize {
        if let Some(asyncio) = self.asyncio.lock().expect("asyncio lock").take() {
            asyncio.stop();
        }
        self.shared.closed.store(true, Ordering::SeqCst);
        self.shared.space.notify_waiters();
        {
            let _g = self.shared.sleepers.lock().expect("pool lock");
            self.shared.wake.notify_all();
        }
        loop {
            let left = {
                let mut threads = self.threads.lock().expect("threads lock");
                threads.retain(|t| !t.is_finished());
                threads.len()
            };
            if left == 0 || Instant::now() >= deadline {
                return left;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
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

    async fn wait_reply<T>(
        &self,
        mut rx: oneshot::Receiver<T>,
        started: Instant,
    ) -> Result<T, CallError> {
        // Re-poll without registering a waker first: a reply that lands while
        // we spin costs the worker no futex wake-up, and other tasks on this
        // runtime thread keep running in between.
        let mut polls = 0u32;
        loop {
            match rx.try_recv() {
                Ok(v) => return Ok(v),
                Err(oneshot::error::TryRecvError::Closed) => return Err(CallError::Closed),
                Err(oneshot::error::TryRecvError::Empty) => {}
            }
            polls += 1;
            if polls % 16 == 0 && started.elapsed() > CALLER_SPIN_FOR {
                break;
            }
            tokio::task::yield_now().await;
        }
        let left = self.shared.call_timeout.saturating_sub(started.elapsed());
        match tokio::time::timeout(left, rx).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(_)) => Err(CallError::Closed),
            Err(_) => {
                self.shared.stats.timeouts.fetch_add(1, Ordering::Relaxed);
                Err(CallError::Timeout(self.shared.call_timeout))
            }
        }
    }

    async fn finish_async(
        &self,
        handler: &Arc<Handler>,
        pending: PendingCall,
        started: Instant,
    ) -> Result<Option<Bytes>, CallError> {
        let PendingCall { future, cancel } = pending;
        let mut guard = CancelOnDrop {
            pool: self,
            cancel: Some(cancel),
        };
        let left = self.shared.call_timeout.saturating_sub(started.elapsed());
        let outcome = match tokio::time::timeout(left, future).await {
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

impl Shared {
    fn notify_workers(&self) {
        fence(Ordering::SeqCst);
        if self.spinner.load(Ordering::SeqCst) {
            return;
        }
        let sleepers = self.sleepers.lock().expect("pool lock");
        if *sleepers > 0 {
            self.wake.notify_one();
        }
    }

    fn release_space(&self) {
        fence(Ordering::SeqCst);
        if self.space_waiters.load(Ordering::SeqCst) > 0 {
            self.space.notify_waiters();
        }
    }

    /// Called detached. Returns when there is work (with `active` already
    /// incremented) or the pool is closed and drained.
    fn wait_for_work(&self) -> Wake {
        if self
            .spinner
            .compare_exchange(false, true, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
        {
            if let Some(w) = self.spin() {
                return w;
            }
            self.spinner.store(false, Ordering::SeqCst);
        }
        let mut sleepers = self.sleepers.lock().expect("pool lock");
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
            sleepers = self.wake.wait(sleepers).expect("pool lock");
        }
    }

    /// The spinner's loop; `None` means "nothing came, go to sleep".
    fn spin(&self) -> Option<Wake> {
        let start = Instant::now();
        let mut i = 0u32;
        loop {
            if !self.queue.is_empty() {
                if self.active.load(Ordering::SeqCst) == 0 || self.busy_worker_is_stalled() {
                    self.active.fetch_add(1, Ordering::SeqCst);
                    self.spinner.store(false, Ordering::SeqCst);
                    return Some(Wake::Work);
                }
                // Someone is draining: check back later without burning a core.
                std::thread::sleep(Duration::from_micros(100));
                continue;
            }
            if self.closed.load(Ordering::SeqCst) {
                self.spinner.store(false, Ordering::SeqCst);
                return Some(Wake::Stop);
            }
            i = i.wrapping_add(1);
            if i % 64 == 0 && start.elapsed() > SPIN_FOR {
                return None;
            }
            std::hint::spin_loop();
        }
    }

    /// True when queued work has waited on a busy worker that completed nothing for [`RESCUE_AFTER`].
    fn busy_worker_is_stalled(&self) -> bool {
        let before = self.progress.load(Ordering::SeqCst);
        std::thread::sleep(RESCUE_AFTER);
        self.progress.load(Ordering::SeqCst) == before && !self.queue.is_empty()
    }

    fn now_ns(&self) -> u64 {
        // +1 so that 0 always means idle.
        self.epoch.elapsed().as_nanos() as u64 + 1
    }
}

fn worker_main(shared: &Shared, idx: usize) {
    let slot = &shared.slots[idx];
    Python::attach(|py| {
        if let Ok(ident) = py
            .import("threading")
            .and_then(|t| t.call_method0("get_ident"))
            .and_then(|i| i.extract::<u64>())
        {
            slot.py_ident.store(ident, Ordering::Relaxed);
        }
        loop {
            match py.detach(|| shared.wait_for_work()) {
                Wake::Stop => break,
                Wake::Work => {}
            }
            while let Some(job) = shared.queue.pop() {
                shared.release_space();
                run_job(py, shared, slot, job);
                shared.progress.fetch_add(1, Ordering::Release);
            }
            shared.active.fetch_sub(1, Ordering::SeqCst);
        }
    });
}

fn run_job(py: Python<'_>, shared: &Shared, slot: &WorkerSlot, job: Job) {
    slot.call_seq.fetch_add(1, Ordering::Relaxed);
    slot.busy_since.store(shared.now_ns(), Ordering::Release);
    match job {
        Job::Call {
            handler,
            payload,
            reply,
        } => {
            output::set_thread_role(Some(handler.role()));
            {
                let mut role = slot.role.lock().expect("slot lock");
                if !role
                    .as_ref()
                    .is_some_and(|r| Arc::ptr_eq(r, handler.role()))
                {
                    *role = Some(handler.role().clone());
                }
            }
            let invoked = handler.invoke(py, &payload, shared.locals.as_ref());
            if matches!(invoked, Invoked::Done(Err(_))) {
                shared.stats.errors.fetch_add(1, Ordering::Relaxed);
            }
            shared.stats.calls.fetch_add(1, Ordering::Relaxed);
            // A caller that gave up dropped its receiver; the reply is dropped here, under the GIL.
            let _ = reply.send(invoked);
        }
        Job::Run(f) => {
            output::set_thread_role(None);
            f(py);
        }
    }
    slot.busy_since.store(0, Ordering::Release);
}
