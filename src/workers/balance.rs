//! Accept balancing between the workers that share one listening socket.
//! With one accept queue, a burst of connects is taken by whichever worker
//! is in `accept` first, and a worker holding fewer connections idles while
//! another is behind (docs/PERFORMANCE.md, "Worker processes"). So each
//! worker counts its open connections in its slot of a small shared mapping
//! (a memfd the supervisor creates for each generation and passes with the
//! sockets, as `pyipcd-balance`); a worker holding more than the fewest
//! plus [`SLACK`] lets the others take the next connection: when one
//! arrives it waits [`STEP`], and takes it only if it is still in the queue
//! (a worker that is stuck or gone cannot make the others refuse work).
//! The wait starts when the connection arrives, not before: a worker that
//! slept first and then waited in `accept` raced the others for every
//! connection that came more than [`STEP`] after the last.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::Duration;

/// The name under which the supervisor passes the mapping.
pub const FD_NAME: &str = "pyipcd-balance";
/// Set when the worker takes the place of one that died: the count it left
/// in the slot is void.
pub const RESET_ENV: &str = "PYIPCD_BALANCE_RESET";
/// Bytes of the mapping: one counter per possible worker.
pub const BYTES: usize = crate::config::MAX_PROCESSES * 8;
/// Connections a worker may hold beyond the fewest before it steps back.
const SLACK: i64 = 1;
/// How long a worker over its share waits before accepting anyway.
pub const STEP: Duration = Duration::from_millis(2);

struct Shared {
    map: memmap2::MmapMut,
    index: usize,
    workers: usize,
    /// This worker's own open connections (its slot minus nothing, kept
    /// apart so that it can take them out when it retires).
    mine: AtomicI64,
    left: AtomicBool,
}

impl Shared {
    fn slots(&self) -> &[AtomicI64] {
        // SAFETY: the mapping is page-aligned, BYTES long, shared with the
        // other workers, and only ever accessed as atomics.
        #[allow(unsafe_code)]
        unsafe {
            std::slice::from_raw_parts(
                self.map.as_ptr().cast::<AtomicI64>(),
                crate::config::MAX_PROCESSES,
            )
        }
    }
}

static SHARED: OnceLock<Option<Shared>> = OnceLock::new();

fn shared() -> Option<&'static Shared> {
    SHARED
        .get_or_init(|| {
            let worker = super::this_worker()?;
            let fd = crate::systemd::activated(FD_NAME).ok()?;
            let file = std::fs::File::from(fd);
            // SAFETY: a memfd of BYTES bytes that only workers map, each
            // writing its own slot through atomics.
            #[allow(unsafe_code)]
            let map = unsafe { memmap2::MmapMut::map_mut(&file) }.ok()?;
            let shared = (map.len() >= BYTES).then_some(Shared {
                map,
                index: worker.index,
                workers: worker.workers,
                mine: AtomicI64::new(0),
                left: AtomicBool::new(false),
            })?;
            if std::env::var_os(RESET_ENV).is_some() {
                shared.slots()[shared.index].store(0, Ordering::Relaxed);
            }
            Some(shared)
        })
        .as_ref()
}

/// A connection was accepted.
pub fn opened() {
    if let Some(s) = shared().filter(|s| !s.left.load(Ordering::Relaxed)) {
        s.mine.fetch_add(1, Ordering::Relaxed);
        s.slots()[s.index].fetch_add(1, Ordering::Relaxed);
    }
}

/// A connection ended.
pub fn closed() {
    if let Some(s) = shared().filter(|s| !s.left.load(Ordering::Relaxed)) {
        s.mine.fetch_sub(1, Ordering::Relaxed);
        s.slots()[s.index].fetch_sub(1, Ordering::Relaxed);
    }
}

/// This worker retires: its connections no longer count against the
/// worker that takes its place.
pub fn leave() {
    if let Some(s) = shared()
        && !s.left.swap(true, Ordering::Relaxed)
    {
        s.slots()[s.index].fetch_sub(s.mine.load(Ordering::Relaxed), Ordering::Relaxed);
    }
}

/// Whether this process balances its accepts (a worker with the mapping).
pub fn active() -> bool {
    shared().is_some()
}

/// Whether this worker holds more than the fewest plus [`SLACK`].
pub fn over_share() -> bool {
    shared().is_some_and(|s| over(s.slots(), s.index, s.workers))
}

/// Whether worker `index` of `workers` holds more than the fewest plus [`SLACK`].
fn over(slots: &[AtomicI64], index: usize, workers: usize) -> bool {
    let mine = slots[index].load(Ordering::Relaxed);
    let fewest = slots[..workers.min(slots.len())]
        .iter()
        .map(|s| s.load(Ordering::Relaxed))
        .min()
        .unwrap_or(0);
    mine > fewest + SLACK
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slots(counts: &[i64]) -> Vec<AtomicI64> {
        counts.iter().map(|&c| AtomicI64::new(c)).collect()
    }

    #[test]
    fn a_worker_steps_back_only_beyond_the_slack() {
        let s = slots(&[3, 2, 9]);
        assert!(!over(&s, 0, 2), "3 vs fewest 2: within the slack");
        let s = slots(&[4, 2]);
        assert!(over(&s, 0, 2));
        assert!(!over(&s, 1, 2), "the fewest never steps back");
        // Slots past the generation's workers do not count.
        let s = slots(&[4, 3, 0]);
        assert!(!over(&s, 0, 2));
    }
}
