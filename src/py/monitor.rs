//! The stuck-call monitor: a low-frequency thread that notices pool calls
//! running past `python.call_timeout` and logs the Python stack of the thread
//! running them (once per call). It holds only a weak reference to the pool
//! and ends when the pool is dropped.

use std::sync::Weak;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use pyo3::prelude::*;

use super::pool::Shared;

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
    // Per worker: the call seen running, since when, and whether it was reported.
    let mut seen: Vec<(u64, Instant, bool)> = Vec::new();
    loop {
        std::thread::sleep(interval);
        let Some(shared) = pool.upgrade() else { return };
        let now = Instant::now();
        seen.resize(shared.slots.len(), (0, now, false));
        for (i, slot) in shared.slots.iter().enumerate() {
            let current = slot.current.load(Ordering::Acquire);
            let (seq, since, reported) = &mut seen[i];
            if current != *seq {
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
            let role = slot
                .role
                .lock()
                .ok()
                .and_then(|r| r.clone())
                .unwrap_or_else(|| "-".into());
            let ident = slot.py_ident.load(Ordering::Relaxed);
            // Taking the GIL here waits for the stuck thread's next switch
            // interval; this thread exists so nothing else has to.
            let stack = Python::attach(|py| python_stack(py, ident))
                .unwrap_or_else(|e| format!("<stack unavailable: {e}>"));
            tracing::warn!(
                role = %role,
                thread = format!("py-pool-{i}"),
                "call running for at least {:.1}s (call_timeout {:?}); Python stack:\n{}",
                running.as_secs_f64(),
                shared.call_timeout,
                stack.trim_end()
            );
        }
    }
}

/// The formatted stack of the Python thread `ident`.
pub(crate) fn python_stack(py: Python<'_>, ident: u64) -> PyResult<String> {
    super::module::runtime(py)?
        .call_method1("_stack_of", (ident,))?
        .extract()
}
