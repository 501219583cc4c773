//! The stuck-call monitor. It owns the record of every thread that runs
//! Python calls for roles, the GIL pool's workers and the dedicated threads
//! of inline TCP roles and shm channels alike: a `WorkerSlot` each, where
//! the thread publishes the call it is running. A low-frequency thread
//! notices calls running past `python.call_timeout` and logs the Python
//! stack of the thread running them (once per call). A role served by one
//! dedicated thread answers nobody meanwhile, so it is marked down through
//! its `HealthLatch` until the call returns.
//!
//! The thread holds only a weak reference and ends when the last
//! [`Monitor`] handle is dropped.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use crossbeam_utils::CachePadded;
use pyo3::prelude::*;

use crate::registry::HealthLatch;
use crate::sync::lock;

/// What the monitor knows about one thread that runs Python calls.
pub(crate) struct WorkerSlot {
    /// The OS thread's name, as logs show it.
    pub(crate) thread: String,
    /// The running call's sequence number (unique per thread, never 0); 0
    /// when idle. The monitor times calls by watching it: the hot path reads
    /// no clock. Written per call, so on a cache line of its own.
    pub(crate) current: CachePadded<AtomicU64>,
    /// `threading.get_ident()` of the thread.
    pub(crate) py_ident: AtomicU64,
    /// Role of the current or last call.
    pub(crate) role: Mutex<Option<Arc<str>>>,
    /// For a role's own thread: its health, down while a call is stuck.
    health: Option<HealthLatch>,
}

impl WorkerSlot {
    /// Runs `f` as call number `seq` (never 0), visible to the monitor meanwhile.
    pub(crate) fn timed<R>(&self, seq: u64, f: impl FnOnce() -> R) -> R {
        self.current.store(seq, Ordering::Release);
        let r = f();
        self.current.store(0, Ordering::Release);
        r
    }
}

struct State {
    call_timeout: Duration,
    /// Every watched thread; a slot goes when its owner drops it.
    slots: Mutex<Vec<Weak<WorkerSlot>>>,
    stuck_reports: AtomicU64,
}

/// A handle on the monitor: cheap to clone; the monitor thread ends when
/// the last handle is dropped.
#[derive(Clone)]
pub struct Monitor {
    state: Arc<State>,
}

impl Monitor {
    /// Starts the monitor thread for calls that should end within `call_timeout`.
    ///
    /// # Errors
    /// If the thread cannot be spawned.
    pub fn start(call_timeout: Duration) -> std::io::Result<Self> {
        let state = Arc::new(State {
            call_timeout,
            slots: Mutex::new(Vec::new()),
            stuck_reports: AtomicU64::new(0),
        });
        let weak = Arc::downgrade(&state);
        std::thread::Builder::new()
            .name("py-monitor".into())
            .spawn(move || run(&weak))?;
        Ok(Self { state })
    }

    /// A new slot for a GIL pool worker named `thread`.
    pub(crate) fn pool_slot(&self, thread: String) -> Arc<WorkerSlot> {
        self.register(WorkerSlot {
            thread,
            current: CachePadded::new(AtomicU64::new(0)),
            py_ident: AtomicU64::new(0),
            role: Mutex::new(None),
            health: None,
        })
    }

    /// A new slot for the calling I/O thread, `thread`, which runs pool
    /// calls itself when a hand-off would not pay (several roles' calls).
    pub(crate) fn io_slot(&self, py: Python<'_>, thread: String) -> Arc<WorkerSlot> {
        self.register(WorkerSlot {
            thread,
            current: CachePadded::new(AtomicU64::new(0)),
            py_ident: AtomicU64::new(crate::py::thread_ident(py).unwrap_or(0)),
            role: Mutex::new(None),
            health: None,
        })
    }

    /// Registers the calling thread, `thread`, as the one thread that serves
    /// the role whose health is `health`; calls made through the returned
    /// [`Watched`] are timed like pool calls.
    pub fn watch(&self, py: Python<'_>, thread: &str, health: HealthLatch) -> Watched {
        let role = Arc::from(health.role());
        let slot = self.register(WorkerSlot {
            thread: thread.to_string(),
            current: CachePadded::new(AtomicU64::new(0)),
            py_ident: AtomicU64::new(crate::py::thread_ident(py).unwrap_or(0)),
            role: Mutex::new(Some(role)),
            health: Some(health),
        });
        Watched {
            slot,
            seq: AtomicU64::new(0),
        }
    }

    fn register(&self, slot: WorkerSlot) -> Arc<WorkerSlot> {
        let slot = Arc::new(slot);
        let mut slots = lock(&self.state.slots);
        slots.retain(|s| s.strong_count() > 0);
        slots.push(Arc::downgrade(&slot));
        slot
    }

    /// Calls reported as stuck so far.
    pub fn stuck_reports(&self) -> u64 {
        self.state.stuck_reports.load(Ordering::Relaxed)
    }
}

/// A dedicated thread's handle on the monitor (from [`Monitor::watch`]); it
/// unregisters when dropped.
pub struct Watched {
    slot: Arc<WorkerSlot>,
    seq: AtomicU64,
}

impl Watched {
    /// Runs `f` (one Python call or a batch of them) as a watched call.
    pub fn call<R>(&self, f: impl FnOnce() -> R) -> R {
        // Only the owning thread counts; atomics just make this `Sync`.
        let seq = self.seq.fetch_add(1, Ordering::Relaxed) + 1;
        self.slot.timed(seq, f)
    }
}

/// Per watched thread: the call seen running, since when, and whether it was reported.
struct Seen {
    seq: u64,
    since: Instant,
    reported: bool,
}

fn run(state: &Weak<State>) {
    let Some(interval) = state
        .upgrade()
        .map(|s| (s.call_timeout / 4).clamp(Duration::from_millis(50), Duration::from_secs(1)))
    else {
        return;
    };
    let mut seen: HashMap<usize, Seen> = HashMap::new();
    loop {
        std::thread::sleep(interval);
        let Some(state) = state.upgrade() else { return };
        let slots: Vec<Arc<WorkerSlot>> = lock(&state.slots)
            .iter()
            .filter_map(Weak::upgrade)
            .collect();
        let key = |s: &Arc<WorkerSlot>| Arc::as_ptr(s) as usize;
        seen.retain(|k, _| slots.iter().any(|s| key(s) == *k));
        let now = Instant::now();
        for slot in &slots {
            let current = slot.current.load(Ordering::Acquire);
            let s = seen.entry(key(slot)).or_insert(Seen {
                seq: 0,
                since: now,
                reported: false,
            });
            if current != s.seq {
                if s.reported
                    && let Some(health) = &slot.health
                {
                    health.up();
                    tracing::info!(role = %health.role(), thread = %slot.thread, "stuck call returned after {:.1}s; role up again", (now - s.since).as_secs_f64());
                }
                // A new call (or idle): it started at most one interval ago.
                *s = Seen {
                    seq: current,
                    since: now,
                    reported: false,
                };
                continue;
            }
            if current == 0 || s.reported || now - s.since < state.call_timeout {
                continue;
            }
            s.reported = true;
            report(&state, slot, now - s.since);
        }
    }
}

fn report(state: &State, slot: &WorkerSlot, running: Duration) {
    state.stuck_reports.fetch_add(1, Ordering::Relaxed);
    let role = lock(&slot.role).clone().unwrap_or_else(|| "-".into());
    if let Some(health) = &slot.health {
        health.down(&format!(
            "its thread {} is stuck in a call for {:.0}s",
            slot.thread,
            running.as_secs_f64()
        ));
    }
    let ident = slot.py_ident.load(Ordering::Relaxed);
    // Taking the GIL here waits for the stuck thread's next switch interval;
    // this thread exists so nothing else has to.
    let stack = Python::attach(|py| python_stack(py, ident))
        .unwrap_or_else(|e| format!("<stack unavailable: {e}>"));
    tracing::warn!(
        role = %role,
        thread = %slot.thread,
        "call running for at least {:.1}s (call_timeout {:?}); Python stack:\n{}",
        running.as_secs_f64(),
        state.call_timeout,
        stack.trim_end()
    );
}

/// The formatted stack of the Python thread `ident`.
pub(crate) fn python_stack(py: Python<'_>, ident: u64) -> PyResult<String> {
    super::module::runtime(py)?
        .call_method1("_stack_of", (ident,))?
        .extract()
}
