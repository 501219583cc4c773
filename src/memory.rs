//! Giving freed memory back to the OS. The daemon allocates with mimalloc,
//! which keeps pages a thread freed until that thread allocates again; an
//! I/O thread whose connections all went quiet allocates nothing, so the
//! buffers they gave back would stay in the process's RSS (13–17 KiB per
//! quiet connection measured, against 3.3 KiB after a purge). A thread that
//! has just released buffers asks mimalloc for a forced collection, at most
//! once per [`PURGE_EVERY`] (about 1 ms with 10,000 connections; a plain
//! collection purged nothing); when it is too soon, one caller is told to
//! come back, so the last of many releases is purged too.

use std::cell::Cell;
use std::time::{Duration, Instant};

/// The least time between two purges on one thread.
pub(crate) const PURGE_EVERY: Duration = Duration::from_secs(1);

thread_local! {
    static LAST_PURGE: Cell<Option<Instant>> = const { Cell::new(None) };
    /// When a caller promised to come back for a purge skipped as too soon.
    static OWED_AT: Cell<Option<Instant>> = const { Cell::new(None) };
}

/// Called after freeing buffers. Purges this thread's free pages, or, when
/// the last purge was too recent, returns when to call again (to one caller
/// only; `None` to the others: someone else will).
pub(crate) fn freed() -> Option<Instant> {
    let now = Instant::now();
    let due = LAST_PURGE.get().map(|last| last + PURGE_EVERY);
    match due {
        Some(due) if now < due => {
            if OWED_AT.get() == Some(due) {
                None // promised for this period already
            } else {
                OWED_AT.set(Some(due));
                Some(due)
            }
        }
        _ => {
            purge();
            LAST_PURGE.set(Some(now));
            OWED_AT.set(None);
            None
        }
    }
}

#[allow(unsafe_code)]
fn purge() {
    // SAFETY: mimalloc's documented API, callable from any thread at any
    // time; it only touches mimalloc's own heaps (none when another
    // allocator is the global one, as in the tests).
    unsafe { libmimalloc_sys::mi_collect(true) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_too_soon_caller_is_told_to_come_back_and_the_others_are_not() {
        std::thread::spawn(|| {
            assert_eq!(freed(), None, "first: purged at once");
            let back = freed().expect("too soon: come back");
            assert!(back > Instant::now());
            assert_eq!(freed(), None, "someone else is coming back");
            std::thread::sleep(back - Instant::now());
            assert_eq!(freed(), None, "due: purged");
            assert!(freed().is_some(), "a new promise after that purge");
        })
        .join()
        .unwrap();
    }
}
