//! Each role's share of the pool's threads (`max_in_flight`), and calls
//! whose caller has gone.
//!
//! A worker takes jobs from the shared queue in order. A role's call is
//! started only while fewer than its `max_in_flight` calls run on pool
//! threads; otherwise the job is *parked* and the worker takes the next one,
//! so a role whose handlers block holds at most that many threads and the
//! other roles (and `/health`'s probe) keep the rest. A worker that finishes
//! a role's call looks at the parked jobs before the queue, so a parked job
//! waits only for its own role. The default share, `workers - 1` (at least
//! 1), always leaves one thread to everybody else.
//!
//! A call whose caller stopped waiting (its `call_timeout` passed, or its
//! connection closed) before a worker took it is never started: its side
//! effects would be for nobody. Counted in `PoolStats::skipped`.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use super::worker::Job;
use crate::py::handler::Handler;
use crate::sync::lock;

/// One role's running calls and its cap.
#[derive(Debug)]
pub(crate) struct Quota {
    running: AtomicUsize,
    cap: AtomicUsize,
}

impl Quota {
    /// Takes a place if the role is under its cap.
    fn try_enter(&self) -> bool {
        let cap = self.cap.load(Ordering::Relaxed);
        self.running
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < cap).then_some(n + 1)
            })
            .is_ok()
    }

    /// Gives the place back when the call returns.
    pub(crate) fn leave(&self) {
        self.running.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Every role's quota and the parked jobs.
pub(crate) struct Quotas {
    by_role: Mutex<HashMap<Arc<str>, Arc<Quota>>>,
    default_cap: usize,
    parked: Mutex<VecDeque<Job>>,
    /// `parked.len()`, readable without the lock on the hot path.
    parked_len: AtomicUsize,
}

/// What the queue gave a worker.
pub(crate) enum Admit {
    /// Run it; leave the quota (if any) when it returns.
    Run(Job, Option<Arc<Quota>>),
    /// Parked or skipped: take the next one.
    Next,
}

impl Quotas {
    /// Quotas for a pool of `workers` threads.
    pub(crate) fn new(workers: usize) -> Self {
        Self {
            by_role: Mutex::new(HashMap::new()),
            default_cap: workers.saturating_sub(1).max(1),
            parked: Mutex::new(VecDeque::new()),
            parked_len: AtomicUsize::new(0),
        }
    }

    /// The quota of `role` (created with the default cap on first use).
    pub(crate) fn of(&self, role: &Arc<str>) -> Arc<Quota> {
        lock(&self.by_role)
            .entry(role.clone())
            .or_insert_with(|| {
                Arc::new(Quota {
                    running: AtomicUsize::new(0),
                    cap: AtomicUsize::new(self.default_cap),
                })
            })
            .clone()
    }

    /// `handler`'s role's quota, looked up once per handler.
    fn quota_of(&self, handler: &Handler) -> Arc<Quota> {
        handler
            .quota
            .get_or_init(|| self.of(handler.role()))
            .clone()
    }

    /// Sets `role`'s cap (`None`: the default).
    pub(crate) fn set_cap(&self, role: &Arc<str>, cap: Option<usize>) {
        let cap = cap.unwrap_or(self.default_cap).max(1);
        self.of(role).cap.store(cap, Ordering::Relaxed);
    }

    /// The default cap: `workers - 1`, at least 1.
    pub(crate) fn default_cap(&self) -> usize {
        self.default_cap
    }

    /// Jobs parked per role (for `/health`).
    pub(crate) fn parked_by_role(&self) -> Vec<(Arc<str>, usize)> {
        let mut out: Vec<(Arc<str>, usize)> = Vec::new();
        for job in lock(&self.parked).iter() {
            if let Some(h) = job.handler() {
                match out.iter_mut().find(|(r, _)| r == h.role()) {
                    Some((_, n)) => *n += 1,
                    None => out.push((h.role().clone(), 1)),
                }
            }
        }
        out
    }

    /// Decides what to do with `job`, just taken from the queue: skip it
    /// (its caller is gone; counted in `skipped`), park it (its role is at
    /// its cap), or run it.
    pub(crate) fn admit(&self, job: Job, skipped: &AtomicU64) -> Admit {
        let Some(handler) = job.handler() else {
            return Admit::Run(job, None);
        };
        if job.caller_gone() {
            skipped.fetch_add(job.calls() as u64, Ordering::Relaxed);
            return Admit::Next;
        }
        let quota = self.quota_of(handler);
        if quota.try_enter() {
            return Admit::Run(job, Some(quota));
        }
        let mut parked = lock(&self.parked);
        parked.push_back(job);
        self.parked_len.store(parked.len(), Ordering::SeqCst);
        Admit::Next
    }

    /// A parked job whose role is now under its cap, if any (callers gone
    /// are dropped and counted on the way). Called before the queue is.
    pub(crate) fn unpark(&self, skipped: &AtomicU64) -> Option<(Job, Arc<Quota>)> {
        if self.parked_len.load(Ordering::SeqCst) == 0 {
            return None;
        }
        let mut parked = lock(&self.parked);
        let mut found = None;
        let mut i = 0;
        while i < parked.len() {
            let job = &parked[i];
            if job.caller_gone() {
                skipped.fetch_add(job.calls() as u64, Ordering::Relaxed);
                parked.remove(i);
                continue;
            }
            let handler = job.handler().expect("only calls are parked");
            let quota = self.quota_of(handler);
            if quota.try_enter() {
                found = parked.remove(i).map(|j| (j, quota));
                break;
            }
            i += 1;
        }
        self.parked_len.store(parked.len(), Ordering::SeqCst);
        found
    }
}
