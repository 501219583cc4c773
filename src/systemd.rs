//! systemd integration through sd-notify: readiness, status and stopping
//! notices, the watchdog, and the listening sockets of socket activation
//! (`LISTEN_FDS`). The notices are no-ops without `NOTIFY_SOCKET`.
//!
//! The watchdog pings (`WATCHDOG=1`) only while the GIL pool answers a probe
//! in time, so a wedged interpreter stops the pings and systemd restarts the
//! service (`WatchdogSec=`).

use std::collections::BTreeMap;
use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use sd_notify::NotifyState;
use tokio_util::sync::CancellationToken;

use crate::py::pool::GilPool;

/// Notices waiting for the notifier thread; more are dropped (logged).
const PENDING: usize = 64;

/// What the notifier thread is given.
enum Notice {
    /// One datagram: state lines.
    Send(String),
    /// Answer once everything before it was sent.
    Flush(std::sync::mpsc::SyncSender<()>),
}

/// The notifier thread's queue; `None` without `NOTIFY_SOCKET`.
static NOTIFIER: OnceLock<Option<std::sync::mpsc::SyncSender<Notice>>> = OnceLock::new();

/// Sends `states` to the service manager, in order, without ever blocking
/// the caller: a thread of its own (`pyipcd-notify`) does the sending. The
/// notify socket is a datagram socket with a short queue, and a manager that
/// stops reading it (hung, or a test harness that does not read) would
/// otherwise block the I/O thread in `send` — every role with it. Failures
/// are logged, never fatal; with [`PENDING`] notices waiting, newer ones are
/// dropped (logged).
pub fn notify(states: &[NotifyState<'_>]) {
    let Some(queue) = NOTIFIER.get_or_init(start_notifier) else {
        return;
    };
    let text = states
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("\n");
    if let Err(std::sync::mpsc::TrySendError::Full(_)) = queue.try_send(Notice::Send(text)) {
        tracing::warn!(
            "the service manager is not reading notifications ({PENDING} waiting): dropped {states:?}"
        );
    }
}

/// `RELOADING=1` with the `MONOTONIC_USEC=` systemd requires beside it
/// (`Type=notify-reload`), or a `STATUS=` line if the clock cannot be read.
pub fn notify_reloading() {
    notify(&[
        NotifyState::Reloading,
        NotifyState::monotonic_usec_now().unwrap_or(NotifyState::Status("reloading")),
    ]);
}

/// Waits (up to `timeout`) until every notice given so far was sent: the
/// last ones (STOPPING=1) before the process exits.
pub fn flush(timeout: Duration) {
    let Some(Some(queue)) = NOTIFIER.get() else {
        return;
    };
    let (done, sent) = std::sync::mpsc::sync_channel(1);
    if queue.try_send(Notice::Flush(done)).is_ok() && sent.recv_timeout(timeout).is_err() {
        tracing::warn!(
            "the service manager did not take the last notifications within {timeout:?}"
        );
    }
}

fn start_notifier() -> Option<std::sync::mpsc::SyncSender<Notice>> {
    std::env::var_os("NOTIFY_SOCKET")?;
    let (queue, notices) = std::sync::mpsc::sync_channel::<Notice>(PENDING);
    let spawned = std::thread::Builder::new()
        .name("pyipcd-notify".into())
        .spawn(move || {
            for notice in notices {
                match notice {
                    Notice::Send(text) => {
                        if let Err(e) = sd_notify::notify(&[NotifyState::Custom(&text)]) {
                            tracing::warn!("sd_notify failed: {e}");
                        }
                    }
                    Notice::Flush(done) => {
                        let _ = done.send(());
                    }
                }
            }
        });
    match spawned {
        Ok(_) => Some(queue),
        Err(e) => {
            tracing::warn!("no notifier thread ({e}): systemd will not hear from this daemon");
            None
        }
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

/// The listening sockets systemd passed (`LISTEN_FDS`), by their
/// `FileDescriptorName=`; taken once, at start. Each stays open for the life
/// of the daemon: roles serve on duplicates, so a reload never closes one.
static ACTIVATED: OnceLock<BTreeMap<String, Vec<OwnedFd>>> = OnceLock::new();

/// Takes the sockets systemd passed to this process (`LISTEN_PID` matches)
/// and unsets `LISTEN_PID`, `LISTEN_FDS` and `LISTEN_FDNAMES`, so Python's
/// children do not inherit them. Returns how many there were. Only the
/// first call takes anything.
///
/// # Errors
/// If the variables are malformed (`LISTEN_FDNAMES` not matching `LISTEN_FDS`).
///
/// # Safety
/// Call it while the process has one thread (it changes the environment),
/// and only if nothing else has taken ownership of descriptors 3 and up
/// that `LISTEN_FDS` names (it wraps them in `OwnedFd`s).
#[allow(unsafe_code)]
pub unsafe fn take_activated_sockets() -> Result<usize, String> {
    if ACTIVATED.get().is_some() {
        return Ok(0);
    }
    // SAFETY: the caller runs us single-threaded (see `# Safety`).
    let fds = unsafe { sd_notify::listen_fds_with_names_and_unset_env() }
        .map_err(|e| format!("sockets passed by systemd (LISTEN_FDS, LISTEN_FDNAMES): {e}"))?;
    let mut by_name: BTreeMap<String, Vec<OwnedFd>> = BTreeMap::new();
    let mut n = 0;
    for (fd, name) in fds {
        // SAFETY: LISTEN_PID named this process, so descriptors 3 to
        // 3 + LISTEN_FDS - 1 were passed to it; the caller guarantees nothing
        // else owns them, and the guard above wraps each only once.
        by_name
            .entry(name)
            .or_default()
            .push(unsafe { OwnedFd::from_raw_fd(fd) });
        n += 1;
    }
    let _ = ACTIVATED.set(by_name);
    Ok(n)
}

/// The names of the sockets systemd passed, with how many of each.
pub fn activated_names() -> Vec<(String, usize)> {
    ACTIVATED.get().map_or_else(Vec::new, |m| {
        m.iter().map(|(k, v)| (k.clone(), v.len())).collect()
    })
}

/// A duplicate of the socket systemd passed as `name`.
///
/// # Errors
/// If none (or several) has that name, or it cannot be duplicated.
pub fn activated(name: &str) -> Result<OwnedFd, String> {
    let passed = activated_names();
    let list = || {
        if passed.is_empty() {
            "systemd passed no sockets (is the .socket unit active, and LISTEN_FDS set?)"
                .to_string()
        } else {
            let names: Vec<&str> = passed.iter().map(|(n, _)| n.as_str()).collect();
            format!("systemd passed: {}", names.join(", "))
        }
    };
    match ACTIVATED.get().and_then(|m| m.get(name)).map(Vec::as_slice) {
        Some([fd]) => fd
            .try_clone()
            .map_err(|e| format!("cannot duplicate the socket systemd passed as `{name}`: {e}")),
        Some(several) => Err(format!(
            "systemd passed {} sockets named `{name}`; a role serves one: give each ListenStream= its own .socket unit and FileDescriptorName=",
            several.len()
        )),
        None => Err(format!("no socket named `{name}`: {}", list())),
    }
}
