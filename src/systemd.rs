//! systemd integration through sd-notify: readiness, status and stopping
//! notices, and the watchdog. Every call is a no-op without `NOTIFY_SOCKET`.
//!
//! The watchdog pings (`WATCHDOG=1`) only while the GIL pool answers a probe
//! in time, so a wedged interpreter stops the pings and systemd restarts the
//! service (`WatchdogSec=`).

use std::sync::Arc;
use std::time::Duration;

use sd_notify::NotifyState;
use tokio_util::sync::CancellationToken;

use crate::py::pool::GilPool;

/// Sends `states` to the service manager; failures are logged, never fatal.
pub fn notify(states: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!("sd_notify failed: {e}");
    }
}

/// The watchdog period requested by the service manager (`WATCHDOG_USEC`), if any.
pub fn watchdog_period() -> Option<Duration> {
    sd_notify::watchdog_enabled().filter(|d| !d.is_zero())
}

/// Pings every half `period` while a no-op call through the pool completes
/// within that half period; stops at `token`.
pub async fn watchdog(pool: Arc<GilPool>, period: Duration, token: CancellationToken) {
    let half = period / 2;
    tracing::info!(
        "watchdog enabled: {period:?}; pinging while the GIL pool answers within {half:?}"
    );
    let mut tick = tokio::time::interval(half);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut healthy = true;
    loop {
        tokio::select! {
            _ = token.cancelled() => return,
            _ = tick.tick() => {}
        }
        let probe = tokio::time::timeout(half, pool.run(|_py| ())).await;
        match probe {
            Ok(Ok(())) => {
                if !healthy {
                    tracing::info!("GIL pool answers again; watchdog pings resume");
                }
                healthy = true;
                notify(&[NotifyState::Watchdog]);
            }
            _ => {
                if healthy {
                    tracing::warn!(
                        "GIL pool did not answer the watchdog probe within {half:?}; withholding WATCHDOG=1"
                    );
                }
                healthy = false;
            }
        }
    }
}
