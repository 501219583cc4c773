//! The rolling reload (SIGHUP to the supervisor): the config is read again,
//! sockets are kept for the servers whose `listen` did not change and bound
//! for the others, and a new generation of workers starts on them. Only when
//! every new worker is ready do the old ones retire (SIGUSR2: stop
//! accepting, serve the open connections until they close or
//! `reload_drain`, exit), so a connection is never refused and a request
//! never lost. The new worker 0 starts its worker-0 roles (tasks, clients,
//! shm regions) only once the old worker 0 has stopped them (SIGUSR1), so
//! they never run twice. If a new worker fails, the new generation is
//! stopped and the old one goes on serving.

use std::os::fd::AsFd;
use std::time::Instant;

use nix::sys::signal::Signal;
use sd_notify::NotifyState;

use super::fleet::{Bound, Fleet, Part};
use crate::config::Config;
use crate::systemd::notify;
use crate::tcp::listener::ListenSocket;

/// A rolling reload under way.
#[derive(Debug)]
pub(super) struct Reload {
    /// When the new generation was started.
    pub(super) started: Instant,
    /// The config it runs.
    config: Config,
    /// Its sockets (kept or new).
    sockets: Vec<Bound>,
    /// Its accept-balance mapping.
    balance: std::os::fd::OwnedFd,
}

impl Fleet {
    /// SIGHUP: reads the config and starts a new generation on it.
    pub(super) fn begin_reload(&mut self) {
        if self.reload.is_some() {
            tracing::warn!("SIGHUP ignored: a rolling reload is already under way");
            return;
        }
        crate::systemd::notify_reloading();
        let path = self.config.source.clone();
        tracing::info!(config = %path.display(), "SIGHUP: rolling reload");
        let config = match crate::config::load(&path) {
            Ok(c) => c,
            Err(e) => {
                self.reload_failed(&format!("the configuration cannot be used: {e}"));
                return;
            }
        };
        let sockets = match self.sockets_for(&config) {
            Ok(s) => s,
            Err(e) => {
                self.reload_failed(&e);
                return;
            }
        };
        let balance = match super::child::balance_map() {
            Ok(b) => b,
            Err(e) => {
                self.reload_failed(&format!("cannot make the accept-balance map: {e}"));
                return;
            }
        };
        // The new worker 0 waits for the old one's worker-0 roles.
        let mut started = Vec::new();
        let workers = config.daemon.processes;
        for index in 0..workers {
            let generation = Some((sockets.as_slice(), balance.as_fd(), workers));
            match self.start(index, Part::Incoming, index == 0, generation) {
                Ok(serial) => started.push(serial),
                Err(e) => {
                    for serial in started {
                        if let Some(p) = self.procs.get_mut(&serial) {
                            p.part = Part::Retiring(Instant::now());
                            p.child.signal(Signal::SIGTERM);
                        }
                    }
                    self.reload_failed(&format!("cannot start new worker {index}: {e}"));
                    return;
                }
            }
        }
        self.reload = Some(Reload {
            started: Instant::now(),
            config,
            sockets,
            balance,
        });
    }

    /// The sockets `config`'s servers listen on: the current one for an
    /// unchanged `listen`, else bound now.
    fn sockets_for(&self, config: &Config) -> Result<Vec<Bound>, String> {
        config
            .tcp
            .server
            .iter()
            .map(|s| {
                let kept = self
                    .sockets
                    .iter()
                    .find(|b| b.listen == s.listen)
                    .map(|b| b.socket.try_clone())
                    .transpose()
                    .map_err(|e| format!("cannot duplicate a listening socket: {e}"))?;
                let socket = match kept {
                    Some(socket) => socket,
                    None => ListenSocket::open(s, None)
                        .map_err(|e| e.for_role(&s.name, &s.listen).to_string())?,
                };
                Ok(Bound {
                    role: s.name.clone(),
                    listen: s.listen.clone(),
                    socket,
                })
            })
            .collect()
    }

    fn reload_failed(&self, why: &str) {
        tracing::error!("reload failed; the running workers go on serving: {why}");
        notify(&[
            NotifyState::Ready,
            NotifyState::Status("reload failed; previous configuration kept"),
        ]);
    }

    /// Every new worker is ready: the old generation retires.
    pub(super) fn finish_reload_if_ready(&mut self) {
        let Some(reload) = &self.reload else {
            return;
        };
        let incoming: Vec<_> = self
            .procs
            .values()
            .filter(|p| p.part == Part::Incoming)
            .collect();
        if incoming.len() < reload.config.daemon.processes
            || incoming.iter().any(|p| p.child.ready.is_none())
        {
            return;
        }
        let Some(reload) = self.reload.take() else {
            return;
        };
        let now = Instant::now();
        for proc in self.procs.values_mut() {
            match proc.part {
                Part::Serving => {
                    proc.part = Part::Retiring(now);
                    proc.child.signal(Signal::SIGUSR2);
                }
                Part::Incoming => proc.part = Part::Serving,
                // A recycling replacement of the old generation.
                Part::Replacement(_) => {
                    proc.part = Part::Retiring(now);
                    proc.child.signal(Signal::SIGTERM);
                }
                Part::Retiring(_) => {}
            }
        }
        self.sockets = reload.sockets;
        self.balance = reload.balance;
        self.config = reload.config;
        // Workers waiting to be started again belonged to the old generation.
        self.restarts_clear();
        // The new worker 0 waits (`singletons_for`) until the holder lets go.
        self.hand_singletons();
        let status = format!("reloaded: {}", self.status());
        tracing::info!("{status}; the previous workers finish their connections");
        notify(&[NotifyState::Ready, NotifyState::Status(&status)]);
    }

    /// Gives the worker-0 roles to the worker 0 waiting for them, once no
    /// process holds them (the holder said it released them, or exited).
    pub(super) fn hand_singletons(&mut self) {
        if self.holder.is_some() {
            return;
        }
        // The one waiting, else the serving worker 0 (one whose wait was cut
        // short by an aborted reload; for any other this is a no-op).
        let next = self.singletons_for.or_else(|| {
            self.procs
                .iter()
                .find(|(_, p)| p.part == Part::Serving && p.child.index == 0)
                .map(|(serial, _)| *serial)
        });
        let Some((serial, proc)) = next.and_then(|s| Some((s, self.procs.get(&s)?))) else {
            return;
        };
        // Not before it is ready: until then SIGUSR1 would kill it (its
        // handler is installed during start-up); READY=1 calls this again.
        if proc.child.ready.is_none() {
            return;
        }
        tracing::info!(
            worker = 0,
            pid = proc.child.pid,
            "worker 0 (pid {}) takes the worker-0 roles",
            proc.child.pid
        );
        proc.child.signal(Signal::SIGUSR1);
        self.singletons_for = None;
        self.holder = Some(serial);
    }

    /// Stops the new generation; the serving one stays.
    pub(super) fn abort_reload(&mut self, why: &str) {
        if self.reload.take().is_none() {
            return;
        }
        for proc in self.procs.values_mut() {
            if proc.part == Part::Incoming {
                proc.part = Part::Retiring(Instant::now());
                proc.child.signal(Signal::SIGTERM);
            }
        }
        self.reload_failed(why);
    }
}
