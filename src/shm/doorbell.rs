//! The doorbell: how a ring's consumer waits for data without polling.
//!
//! Each ring's control page holds two `u32` words on a cache line of their
//! own: `bell`, a futex word the producer bumps, and `sleeping`, which the
//! consumer sets while it sleeps on the bell. The consumer spins briefly
//! (an adaptive budget: longer while spinning finds work, shorter while it
//! does not), then announces itself and sleeps in the kernel on a
//! process-shared futex. The producer, after publishing a record, checks
//! `sleeping` and only then pays for a wake-up syscall. Both sides put a
//! sequentially consistent fence between their store and their load (the
//! classic Dekker pattern), so either the consumer sees the record or the
//! producer sees the sleeper: a wake-up is never lost. Sleeps are cut into
//! slices so the caller can check for shutdown or a timeout.

use std::sync::atomic::{AtomicU32, Ordering, fence};
use std::time::{Duration, Instant};

/// Spin budgets: never below the first, never above the second.
const MIN_SPIN: Duration = Duration::from_micros(2);
const MAX_SPIN: Duration = Duration::from_micros(50);

/// A ring's two doorbell words.
#[derive(Clone, Copy)]
pub struct Bell<'a> {
    /// Bumped by the producer to wake the consumer (the futex word).
    pub bell: &'a AtomicU32,
    /// Non-zero while the consumer sleeps (or is about to) on `bell`.
    pub sleeping: &'a AtomicU32,
}

impl Bell<'_> {
    /// Producer side, after publishing: wakes the consumer if it sleeps.
    #[inline]
    pub fn ring(&self) {
        fence(Ordering::SeqCst);
        if self.sleeping.load(Ordering::Relaxed) != 0 {
            self.wake();
        }
    }

    /// Wakes the consumer whether or not it sleeps (shutdown).
    pub fn wake(&self) {
        self.bell.fetch_add(1, Ordering::Release);
        futex_wake(self.bell);
    }

    /// Consumer side: spins on `ready()` for the spin budget, then sleeps
    /// on the bell for at most `slice` (woken at once by a producer's ring).
    /// Returns whether `ready()` holds; on `false` the caller checks its
    /// own conditions (shutdown, timeout) and calls again.
    pub fn wait(&self, spin: &mut Spin, slice: Duration, ready: impl Fn() -> bool) -> bool {
        if spin.run(&ready) {
            return true;
        }
        let seen = self.bell.load(Ordering::Acquire);
        self.sleeping.store(1, Ordering::SeqCst);
        fence(Ordering::SeqCst);
        if !ready() {
            futex_wait(self.bell, seen, slice);
        }
        self.sleeping.store(0, Ordering::Relaxed);
        ready()
    }
}

/// An adaptive spin budget: doubles when a spin found work, halves when it
/// did not (so a partner that is not running, as on a busy host, soon costs
/// no more than `MIN_SPIN` per wait).
#[derive(Debug, Clone, Copy)]
pub struct Spin {
    budget: Duration,
}

impl Default for Spin {
    fn default() -> Self {
        Self {
            budget: Duration::from_micros(20),
        }
    }
}

impl Spin {
    /// Polls `ready` for up to the budget; adapts the budget.
    pub fn run(&mut self, ready: impl Fn() -> bool) -> bool {
        let start = Instant::now();
        loop {
            for _ in 0..32 {
                if ready() {
                    self.budget = (self.budget * 2).min(MAX_SPIN);
                    return true;
                }
                std::hint::spin_loop();
            }
            if start.elapsed() >= self.budget {
                self.budget = (self.budget / 2).max(MIN_SPIN);
                return false;
            }
        }
    }
}

/// `FUTEX_WAIT` on a word of a shared mapping (not the private variant: the
/// other side is another process), for at most `timeout`.
#[allow(unsafe_code)]
fn futex_wait(word: &AtomicU32, expected: u32, timeout: Duration) {
    let ts = libc::timespec {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    // SAFETY: `word` is a live, aligned u32 in a shared mapping; the kernel
    // only reads it. EAGAIN (the bell moved), EINTR and ETIMEDOUT all mean
    // "look again", which every caller does.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAIT,
            expected,
            &ts as *const libc::timespec,
            std::ptr::null::<u32>(),
            0u32,
        );
    }
}

#[allow(unsafe_code)]
fn futex_wake(word: &AtomicU32) {
    // SAFETY: as above; FUTEX_WAKE only uses the address as a key.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAKE,
            i32::MAX,
            std::ptr::null::<libc::timespec>(),
            std::ptr::null::<u32>(),
            0u32,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::AtomicBool;

    #[test]
    fn a_sleeping_consumer_is_woken_by_the_producer_and_never_misses_a_ring() {
        let words = Arc::new((AtomicU32::new(0), AtomicU32::new(0), AtomicBool::new(false)));
        for i in 0..2000 {
            words.2.store(false, Ordering::SeqCst);
            let w = words.clone();
            let consumer = std::thread::spawn(move || {
                let bell = Bell {
                    bell: &w.0,
                    sleeping: &w.1,
                };
                let mut spin = Spin { budget: MIN_SPIN };
                // A long slice: a lost wake-up would show as a timeout.
                bell.wait(&mut spin, Duration::from_secs(5), || {
                    w.2.load(Ordering::SeqCst)
                })
            });
            if i % 2 == 0 {
                // Late enough that the consumer is asleep in the kernel.
                std::thread::sleep(Duration::from_micros(200));
            }
            words.2.store(true, Ordering::SeqCst);
            Bell {
                bell: &words.0,
                sleeping: &words.1,
            }
            .ring();
            let start = Instant::now();
            assert!(consumer.join().unwrap());
            assert!(
                start.elapsed() < Duration::from_secs(1),
                "a wake-up was lost"
            );
        }
    }
}
