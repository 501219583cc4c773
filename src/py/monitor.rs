//! The stuck-call monitor: a low-frequency thread that notices pool calls
//! running past `python.call_timeout` and logs the Python stack of the thread
//! running them (once per call). It holds only a weak reference to the pool
//! and ends when the pool is dropped.

use std::sync::Weak;
use std::sync::atomic::Ordering;
use std::time::Duration;

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
    let mut reported: Vec<u64> = Vec::new();
    loop {
        std::thread::sleep(interval);
        let Some(shared) = pool.upgrade() else { return };
        reported.resize(shared.slots.len(), 0);
        let now = shared.epoch.elapsed().as_nanos() as u64 + 1;
        for (i, slot) in shared.slots.iter().enumerate() {
            let since = slot.busy_since.load(Ordering::Acquire);
            let seq = slot.call_seq.load(Ordering::Relaxed);
            if since == 0 || reported[i] == seq {
                continue;
            }
            let running = Duration::from_nanos(now.saturating_sub(since));
            if running < shared.call_timeout {
                continue;
            }
            reported[i] = seq;
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
                "call running for {:.1}s (call_timeout {:?}); Python stack:\n{}",
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
