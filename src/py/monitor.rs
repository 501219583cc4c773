//! The stuck-call monitor: a low-frequency thread that notices calls on pool
//! threads and on watched dedicated threads ([`super::pool::GilPool::watch`])
//! running past `python.call_timeout` and logs the Python stack of the thread
//! running them (once per call). A role served by a dedicated thread is
//! reported down in `/health` until its stuck call returns. The monitor holds
//! only a weak reference to the pool and ends when the pool is dropped.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use pyo3::prelude::*;

use super::pool::{Shared, WorkerSlot};

/// Starts the monitor thread.
///
/// # Errors
/// If the thread cannot be spawned.
pub(crate) fn spawn(pool: Weak<Shared>) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("py-monitor".into())
        .spawn(move || monitor(pool))
        .map(|_| ())
}

fn monitor(pool: Weak<Shared>) {
    let Some(interval) = pool
        .upgrade()
        .map(|p| (p.call_timeout / 4).clamp(Duration::from_millis(50), Duration::from_secs(1)))
    else {
        return;
    };
    // Per watched thread (keyed by its slot's address): the call seen
    // running, since when, and whether it was reported.
    let mut seen: HashMap<usize, (u64, Instant, bool)> = HashMap::new();
    loop {
        std::thread::sleep(interval);
        let Some(shared) = pool.upgrade() else { return };
        let now = Instant::now();
        let dedicated: Vec<Arc<WorkerSlot>> = {
            let mut list = shared.dedicated.lock().expect("monitor lock");
            list.retain(|slot| slot.strong_count() > 0);
            list.iter().filter_map(std::sync::Weak::upgrade).collect()
        };
        // (slot, whether it is a role's own thread rather than a pool worker)
        let watched: Vec<(&WorkerSlot, bool)> = (shared.slots.iter().map(|s| (&**s, false)))
            .chain(dedicated.iter().map(|s| (&**s, true)))
            .collect();
        seen.retain(|key, _| {
            watched
                .iter()
                .any(|(s, _)| std::ptr::addr_of!(**s) as usize == *key)
        });
        for (slot, own_thread) in watched {
            let thread = slot.thread.as_str();
            let current = slot.current.load(Ordering::Acquire);
            let (seq, since, reported) = seen
                .entry(std::ptr::addr_of!(*slot) as usize)
                .or_insert((0, now, false));
            if current != *seq {
                if *reported && own_thread {
                    // The stuck call returned: its role serves again.
                    let role = role_of(slot);
                    crate::admin::health().set(&role, true);
                    tracing::info!(role = %role, thread, "stuck call returned after {:.1}s; role up again", (now - *since).as_secs_f64());
                }
                // A new call (or idle): it started at most one interval ago.
                *seq = current;
                *since = now;
                *reported = false;
                continue;
            }
            if current == 0 || *reported || now - *since < shared.call_timeout {
                continue;
            }
            *reported = true;
            let running = now - *since;
            shared.stats.stuck_reports.fetch_add(1, Ordering::Relaxed);
            let role = role_of(slot);
            if own_thread {
                // A role served by this one thread answers nobody meanwhile.
                crate::admin::health().set(&role, false);
            }
            let ident = slot.py_ident.load(Ordering::Relaxed);
            // Taking the GIL here waits for the stuck thread's next switch
            // interval; this thread exists so nothing else has to.
            let stack = Python::attach(|py| python_stack(py, ident))
                .unwrap_or_else(|e| format!("<stack unavailable: {e}>"));
            tracing::warn!(
                role = %role,
                thread,
                "call running for at least {:.1}s (call_timeout {:?}); Python stack:\n{}",
                running.as_secs_f64(),
                shared.call_timeout,
                stack.trim_end()
            );
        }
    }
}

fn role_of(slot: &WorkerSlot) -> Arc<str> {
    slot.role
        .lock()
        .ok()
        .and_then(|r| r.clone())
        .unwrap_or_else(|| "-".into())
}

/// The formatted stack of the Python thread `ident`.
pub(crate) fn python_stack(py: Python<'_>, ident: u64) -> PyResult<String> {
    super::module::runtime(py)?
        .call_method1("_stack_of", (ident,))?
        .extract()
}
