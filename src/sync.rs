//! The crate's one mutex-poison policy. Every critical section in the
//! daemon leaves its data consistent (an insert, a remove, a counter, a
//! flag), so a lock poisoned by a panicking thread is taken over rather than
//! spreading the panic to every later user of the lock (a stuck-call monitor
//! or a health probe must not die because a handler thread panicked).

use std::sync::{Mutex, MutexGuard, PoisonError};

/// Locks `m`, taking it over if a panicking thread poisoned it.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}
