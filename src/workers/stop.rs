//! Stopping the workers: SIGTERM to each, which stops like a single daemon
//! (within `shutdown_grace`); SIGKILL for those still running after
//! `shutdown_grace` + [`KILL_MARGIN`], or at a second SIGTERM/SIGINT.

use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use sd_notify::NotifyState;

use super::child::Event;
use super::fleet::{Fleet, KILL_MARGIN};
use crate::shutdown::{SignalEvent, Signals};
use crate::systemd::notify;
use crate::{EXIT_FAILURE, EXIT_OK};

impl Fleet {
    /// Stops every worker (SIGTERM; SIGKILL at the deadline or a second
    /// signal) and returns `code`, or 0 when every worker stopped cleanly.
    pub(super) async fn stop(&mut self, signals: &mut Signals, code: Option<i32>) -> i32 {
        notify(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
        let mut clean = true;
        for proc in self.procs.values() {
            proc.child.signal(Signal::SIGTERM);
        }
        let deadline = Instant::now() + self.config.daemon.shutdown_grace + KILL_MARGIN;
        let mut killed = false;
        while !self.procs.is_empty() {
            tokio::select! {
                Some(event) = self.inbox.recv() => {
                    if let Event::Exited { serial, status } = event
                        && let Some(proc) = self.procs.remove(&serial)
                    {
                        let (index, pid) = (proc.child.index, proc.child.pid);
                        // One still starting may not have its handler yet:
                        // SIGTERM's default action ends it, which is a stop too.
                        let starting = proc.child.ready.is_none()
                            && std::os::unix::process::ExitStatusExt::signal(&status)
                                == Some(libc::SIGTERM);
                        if status.success() || starting {
                            tracing::info!(worker = index, pid, "worker {index} stopped");
                        } else {
                            clean = false;
                            tracing::warn!(worker = index, pid, "worker {index} stopped: {status}");
                        }
                    }
                }
                signal = signals.next(), if !killed => {
                    if let SignalEvent::Stop(name, _) = signal {
                        tracing::warn!("{name} received again: killing the workers");
                        self.kill_all();
                        killed = true;
                    }
                }
                () = tokio::time::sleep_until(deadline.into()), if !killed => {
                    tracing::warn!("workers still running after shutdown_grace: killing them");
                    self.kill_all();
                    killed = true;
                }
            }
        }
        let code = code.unwrap_or(if clean && !killed {
            EXIT_OK
        } else {
            EXIT_FAILURE
        });
        tracing::info!("supervisor stopped (exit status {code})");
        crate::systemd::flush(Duration::from_millis(500));
        code
    }

    fn kill_all(&self) {
        for proc in self.procs.values() {
            proc.child.signal(Signal::SIGKILL);
        }
    }
}
