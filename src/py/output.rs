//! Python output in the daemon's log: which role a line belongs to, and the
//! tracing events that `print`, `sys.stderr` and `logging` become.
//!
//! The role is the innermost of: the asyncio context variable set for an async
//! handler, the role of the pool call running on this thread, or the task that
//! owns this thread.

use std::cell::RefCell;
use std::sync::Arc;

thread_local! {
    static THREAD_ROLE: RefCell<Option<Arc<str>>> = const { RefCell::new(None) };
}

/// Sets the role that output from this thread is tagged with.
pub fn set_thread_role(role: Option<&Arc<str>>) {
    THREAD_ROLE.with(|r| {
        let mut r = r.borrow_mut();
        let same = match (r.as_ref(), role) {
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            (None, None) => true,
            _ => false,
        };
        if !same {
            *r = role.cloned();
        }
    });
}

/// Whether this thread's role is already `role` (pointer comparison).
pub fn thread_role_is(role: &Arc<str>) -> bool {
    THREAD_ROLE.with(|r| r.borrow().as_ref().is_some_and(|r| Arc::ptr_eq(r, role)))
}

/// The role output from this thread is currently tagged with.
pub fn thread_role() -> Option<Arc<str>> {
    THREAD_ROLE.with(|r| r.borrow().clone())
}

fn role_name(ctx_role: Option<&str>) -> String {
    match ctx_role {
        Some(r) => r.to_string(),
        None => thread_role().map_or_else(|| "python".to_string(), |r| r.to_string()),
    }
}

/// Emits one line of Python output (`origin` is `stdout`, `stderr` or a logger name).
pub fn emit(levelno: u32, origin: &str, ctx_role: Option<&str>, line: &str) {
    let role = role_name(ctx_role);
    match levelno {
        40.. => tracing::error!(target: "python", role = %role, origin, "{line}"),
        30..=39 => tracing::warn!(target: "python", role = %role, origin, "{line}"),
        20..=29 => tracing::info!(target: "python", role = %role, origin, "{line}"),
        10..=19 => tracing::debug!(target: "python", role = %role, origin, "{line}"),
        _ => tracing::trace!(target: "python", role = %role, origin, "{line}"),
    }
}
