//! Recycling: a worker is replaced, rolling (its replacement starts, and it
//! retires only once the replacement is ready), when it has answered
//! `max_requests` requests (it says so: `X_PYIPCD_RECYCLE=max_requests`),
//! when it is older than `lifetime`, or when its resident memory stayed
//! above `max_rss` for `max_rss_samples` samples in a row (one a second, so
//! a spike does not). The first two are drawn within ± `recycle_jitter` per
//! worker, so workers started together are not replaced together.
//! Replacements are counted by reason (`pyipcd_worker_respawns_total`).

use std::hash::{BuildHasher, Hasher};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use super::fleet::{Fleet, Part};

/// How long a worker whose replacement failed to start is left alone.
const RETRY_AFTER: Duration = Duration::from_secs(30);

/// `base` × (1 ± up to `fraction`), drawn per `serial`.
pub(super) fn jittered(base: f64, fraction: f64, serial: u64) -> f64 {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(serial);
    // A uniform draw in [-1, 1].
    let unit = (h.finish() >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0;
    base * (1.0 + fraction * unit)
}

/// Resident memory of process `pid`, in bytes (`/proc/PID/statm`).
fn rss(pid: u32) -> Option<u64> {
    let statm = std::fs::read_to_string(format!("/proc/{pid}/statm")).ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

impl Fleet {
    /// The per-worker limits for a worker about to start as `serial`:
    /// its `max_requests`, and when its lifetime ends.
    pub(super) fn limits(&self, serial: u64) -> (Option<u64>, Option<Instant>) {
        let d = &self.config.daemon;
        let requests = (d.max_requests > 0).then(|| {
            jittered(d.max_requests as f64, d.recycle_jitter, serial)
                .round()
                .max(1.0) as u64
        });
        let deadline = d.lifetime.map(|l| {
            Instant::now()
                + Duration::from_secs_f64(jittered(l.as_secs_f64(), d.recycle_jitter, serial))
        });
        (requests, deadline)
    }

    /// Starts a replacement for serving worker `old`, for `reason`.
    pub(super) fn replace(&mut self, old: u64, reason: &'static str) {
        let busy = self.reload.is_some()
            || self
                .procs
                .values()
                .any(|p| p.part == Part::Replacement(Some(old)));
        let Some(proc) = self.procs.get_mut(&old).filter(|p| p.part == Part::Serving) else {
            return;
        };
        if busy || proc.child.recycle_after.is_some_and(|t| Instant::now() < t) {
            // Asked again once a second (`recycle_tick`) until it can be.
            proc.child.wanted = Some(reason);
            return;
        }
        proc.child.wanted = None;
        let (index, pid) = (proc.child.index, proc.child.pid);
        tracing::info!(
            worker = index,
            pid,
            "replacing worker {index} (pid {pid}): {reason}"
        );
        *self.respawns.entry(reason).or_insert(0) += 1;
        if let Err(e) = self.start(index, Part::Replacement(Some(old)), index == 0, None) {
            tracing::error!(
                worker = index,
                "cannot start a replacement for worker {index}: {e}"
            );
        }
    }

    /// A replacement is ready: the worker it replaces retires.
    pub(super) fn replacement_ready(&mut self, new: u64, old: Option<u64>) {
        if let Some(p) = self.procs.get_mut(&new) {
            p.part = Part::Serving;
        }
        if let Some(p) = old
            .and_then(|o| self.procs.get_mut(&o))
            .filter(|p| p.part == Part::Serving)
        {
            p.part = Part::Retiring(Instant::now());
            p.child.signal(Signal::SIGUSR2);
        }
        // A new worker 0 started deferred (`singletons_for`): it gets the
        // roles once the worker it replaces has released them.
        self.hand_singletons();
    }

    /// A replacement exited before it was ready: the old worker goes on.
    /// Returns true when there is no old worker any more (it exited
    /// meanwhile): the caller starts that worker again.
    pub(super) fn replacement_failed(&mut self, old: Option<u64>) -> bool {
        let Some(p) = old.and_then(|o| self.procs.get_mut(&o)) else {
            return true;
        };
        p.child.recycle_after = Some(Instant::now() + RETRY_AFTER);
        tracing::error!(
            worker = p.child.index,
            pid = p.child.pid,
            "its replacement exited before it was ready: worker {} goes on serving (tried again in {RETRY_AFTER:?} at the earliest)",
            p.child.index
        );
        false
    }

    /// Once a second: lifetimes over, memory over `max_rss`.
    pub(super) fn recycle_tick(&mut self) {
        let now = Instant::now();
        let d = &self.config.daemon;
        let (limit, samples) = (d.max_rss.map(|b| b.as_u64()), d.max_rss_samples);
        let mut due = Vec::new();
        for (serial, p) in &mut self.procs {
            if p.part != Part::Serving || p.child.ready.is_none() {
                continue;
            }
            if let Some(reason) = p.child.wanted {
                due.push((*serial, reason));
                continue;
            }
            if p.child.deadline.is_some_and(|t| now >= t) {
                due.push((*serial, "lifetime"));
                continue;
            }
            if let (Some(limit), Some(rss)) = (limit, rss(p.child.pid)) {
                if rss > limit {
                    p.child.over_rss += 1;
                    if p.child.over_rss >= samples {
                        tracing::warn!(
                            worker = p.child.index,
                            pid = p.child.pid,
                            "worker {} uses {} MiB, over max_rss for {samples} samples in a row",
                            p.child.index,
                            rss >> 20
                        );
                        due.push((*serial, "max_rss"));
                    }
                } else {
                    p.child.over_rss = 0;
                }
            }
        }
        for (serial, reason) in due {
            self.replace(serial, reason);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_stays_within_its_fraction_and_varies() {
        let draws: Vec<f64> = (0..200).map(|s| jittered(1000.0, 0.1, s)).collect();
        assert!(draws.iter().all(|d| (900.0..=1100.0).contains(d)));
        let (lo, hi) = draws
            .iter()
            .fold((f64::MAX, f64::MIN), |(a, b), d| (a.min(*d), b.max(*d)));
        assert!(hi - lo > 100.0, "{lo}..{hi}");
        assert_eq!(jittered(1000.0, 0.0, 7), 1000.0);
    }
}
