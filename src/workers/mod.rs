//! `[daemon] processes = N` (N > 1): the process `pyipcd run` starts is a
//! supervisor that never starts Python. It binds every server's socket once,
//! starts N workers (fresh processes of this binary, see `child`), and is
//! the daemon's one face to systemd:
//!
//! - `READY=1` once every worker said it was ready; `WATCHDOG=1` only while
//!   every worker pings (each is given the watchdog period);
//! - a worker that dies is restarted, with backoff when it dies early
//!   (before ready, or within [`EARLY`] of it); [`CRASH_LOOP`] early deaths
//!   in a row of one worker stop the daemon with exit status 1 (a worker's
//!   configuration error, exit 78, before the first ready: exit 78);
//! - SIGHUP is a rolling reload (`reload`): a new generation of workers on
//!   the re-read config, and once all of them are ready the old ones retire
//!   (stop accepting, serve their open connections until those close or
//!   `reload_drain`); worker-0 roles move over once the old worker 0 has
//!   stopped them, so they never run twice;
//! - workers are recycled (`recycle`): replaced, rolling, after
//!   `max_requests`, past `lifetime`, or over `max_rss`;
//! - SIGTERM/SIGINT stop every worker within `shutdown_grace` (a second
//!   signal kills them at once).
//!
//! Connections are spread by the kernel: every worker accepts on the same
//! listening socket (one accept queue), so a worker that is busy accepts
//! less, and a worker leaving never drops a queued connection.

mod admin;
pub mod balance;
mod child;
mod fleet;
pub mod identity;
mod recycle;
mod reload;
mod stop;

pub use identity::{Worker, runs_elsewhere, set_elsewhere, socket_name, this_worker};

use std::time::Duration;

use crate::Error;
use crate::config::Config;

/// A worker that exits before it is ready, or within this long after, died early.
pub const EARLY: Duration = Duration::from_secs(10);
/// Early deaths in a row of one worker that make a crash loop.
pub const CRASH_LOOP: u32 = 5;

/// Runs the supervisor for `config` until it is stopped; returns the exit
/// status (0 when every worker stopped cleanly).
///
/// # Errors
/// If the runtime, a server's socket or the first workers cannot start.
pub fn supervise(config: Config) -> Result<i32, Error> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let signals = crate::shutdown::Signals::register()?;
        let mut fleet = fleet::Fleet::bind(config)?;
        Ok(fleet.run(signals).await)
    })
}

/// A worker's side of `max_requests`: once this process has answered
/// `limit` requests, asks its supervisor (once) for a replacement.
pub async fn ask_for_replacement_after(limit: u64, token: tokio_util::sync::CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    loop {
        tokio::select! {
            () = token.cancelled() => return,
            _ = tick.tick() => {}
        }
        if identity::requests() >= limit {
            tracing::info!("{limit} requests answered (max_requests): asking for a replacement");
            crate::systemd::notify(&[sd_notify::NotifyState::Custom(
                "X_PYIPCD_RECYCLE=max_requests",
            )]);
            return;
        }
    }
}
