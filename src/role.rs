//! What the supervisor hands every role instance it starts: the ways to
//! Python (the GIL pool, the stuck-call monitor), the instance's own health
//! entry and generation, and its two stop signals.
//!
//! `intake` ends the intake of new work (a server stops accepting, a region
//! stops reading requests); `stop` ends everything, open connections
//! included, after their in-flight requests. On shutdown both fire at once;
//! on a reload a retired server instance gets `intake` first and `stop` when
//! its connections have closed or `daemon.reload_drain` has passed.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::py::monitor::Monitor;
use crate::py::pool::GilPool;
use crate::registry::{Generation, HealthLatch};

/// A role instance's share of the daemon.
#[derive(Clone)]
pub struct Context {
    /// The role's name.
    pub name: Arc<str>,
    /// This instance's number (see [`crate::registry`]).
    pub generation: Generation,
    /// The GIL pool, for calls that do not run on the role's own thread.
    pub pool: Arc<GilPool>,
    /// Where a role with a thread of its own registers it.
    pub monitor: Monitor,
    /// The role's health entry, owned by this instance.
    pub health: HealthLatch,
    /// Stop taking new work.
    pub intake: CancellationToken,
    /// Stop everything (implies `intake`).
    pub stop: CancellationToken,
}

impl Context {
    /// Marks the role down with `why` and waits for the stop: a role that
    /// cannot go on stays down (not "stopped by itself") until a reload or
    /// shutdown replaces it.
    pub async fn down_until_stopped(&self, why: &str) {
        self.health.down(why);
        self.stop.cancelled().await;
    }
}
