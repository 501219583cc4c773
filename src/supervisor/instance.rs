//! One role instance through its life: its Python parts resolved (on a
//! blocking thread, with the GIL), its resources taken (a socket bound or
//! handed over, a file mapped), launched as a tracked task with its own
//! health latch and stop tokens, and at last retired.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::FutureExt;
use futures::future::{BoxFuture, Shared};
use pyo3::Python;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::plan::{Keep, RoleConfig};
use crate::config::ShmMode;
use crate::py::monitor::Monitor;
use crate::py::pool::GilPool;
use crate::py::target::ResolveError;
use crate::registry::{Generation, HealthLatch, registry};
use crate::role::Context;
use crate::shm::channel::{ChannelParts, ShmChannel, Take};
use crate::shm::watch::{ShmWatcher, WatchParts};
use crate::tcp::client::{ClientParts, Outbox, TcpClient};
use crate::tcp::server::{ServerParts, TcpServer};

/// What a role resolved in Python, kept for a replacement to reuse.
#[derive(Clone)]
pub(crate) enum Parts {
    Server(ServerParts),
    Client(ClientParts),
    Watch(WatchParts),
    Channel(ChannelParts),
}

/// Resolves the Python targets of `cfg`, reusing those of `old` that `keep`
/// lists. Runs on a blocking thread (imports may take long; no tokio worker
/// ever takes the GIL).
pub(crate) async fn resolve(
    cfg: &RoleConfig,
    old: Option<Parts>,
    keep: &Keep,
) -> Result<Parts, ResolveError> {
    let (cfg, keep) = (cfg.clone(), keep.targets.clone());
    let resolved = tokio::task::spawn_blocking(move || {
        Python::attach(|py| {
            let same = |field: &str| keep.contains(field);
            Ok(match (&cfg, old) {
                (RoleConfig::Server(c), old) => {
                    let old = match old {
                        Some(Parts::Server(p)) => Some(p),
                        _ => None,
                    };
                    Parts::Server(ServerParts::resolve(py, c, old.as_ref(), same)?)
                }
                (RoleConfig::Client(c), old) => {
                    let old = match old {
                        Some(Parts::Client(p)) => Some(p),
                        _ => None,
                    };
                    Parts::Client(ClientParts::resolve(py, c, old.as_ref(), same)?)
                }
                (RoleConfig::Region(r), old) if r.mode == ShmMode::Watch => {
                    let old = match old {
                        Some(Parts::Watch(p)) => Some(p),
                        _ => None,
                    };
                    Parts::Watch(WatchParts::resolve(py, r, old.as_ref(), same)?)
                }
                (RoleConfig::Region(r), old) => {
                    let old = match old {
                        Some(Parts::Channel(p)) => Some(p),
                        _ => None,
                    };
                    Parts::Channel(ChannelParts::resolve(py, r, old.as_ref(), same)?)
                }
            })
        })
    })
    .await;
    resolved.unwrap_or_else(|e| {
        Err(ResolveError::new(
            "role",
            "?",
            format!("resolver panicked: {e}"),
        ))
    })
}

/// Signals that an instance's task has ended.
pub(crate) type Done = Shared<BoxFuture<'static, ()>>;

/// A running role instance, as the supervisor keeps it.
pub(crate) struct Instance {
    /// The config it runs.
    pub(crate) config: RoleConfig,
    /// What it resolved in Python.
    pub(crate) parts: Parts,
    /// Its listening socket (a duplicate), for a replacement on the same address.
    socket: Option<std::net::TcpListener>,
    /// The address it listens on, for servers.
    pub(crate) addr: Option<SocketAddr>,
    /// A client's outbox, for a replacement to take over.
    pub(crate) outbox: Option<Outbox>,
    /// Keeps its health entry while it is the role's instance.
    _health: HealthLatch,
    intake: CancellationToken,
    stop: CancellationToken,
    /// Set before `stop` when a replacement adopts its shm file.
    handover: Arc<AtomicBool>,
    /// Resolves when its task has ended.
    pub(crate) done: Done,
}

/// What a new instance takes over from retiring ones (see [`super::Keep`]).
#[derive(Default)]
pub(crate) struct Takeover {
    /// A duplicate of the listening socket on the same address.
    pub(crate) socket: Option<std::net::TcpListener>,
    /// The old user of the same shm file (start once it ended), and how to take the file.
    pub(crate) file: Option<(Done, Take)>,
    /// The old client's outbox (take it once that instance ended).
    pub(crate) outbox: Option<(Outbox, Done)>,
}

/// Everything an instance needs from the daemon to start.
pub(crate) struct Launcher<'a> {
    pub(crate) pool: &'a Arc<GilPool>,
    pub(crate) monitor: &'a Monitor,
    pub(crate) root: &'a CancellationToken,
    pub(crate) tracker: &'a TaskTracker,
}

/// A resolved role, its socket taken, ready to launch.
pub(crate) enum Ready {
    Server(TcpServer),
    /// A client runs once `after` (the old instance, whose outbox it takes
    /// over) has ended.
    Client {
        client: TcpClient,
        after: Option<Done>,
    },
    /// A watcher polls once `after` (the old watcher of its file) has ended.
    Watch {
        watcher: ShmWatcher,
        after: Option<Done>,
    },
    /// A channel, its file open.
    Channel {
        channel: ShmChannel,
        parts: ChannelParts,
    },
    /// A channel that takes its file as `take` says once `after` (the old
    /// instance using the same file) has ended.
    ChannelAfter {
        parts: ChannelParts,
        take: Take,
        after: Done,
    },
}

impl Launcher<'_> {
    /// Takes the resources of a resolved role: binds a server (or takes
    /// `socket`), maps a watched region. A region whose file `after` (an
    /// instance being retired) uses starts serving once that one has ended;
    /// so does a client that takes over `outbox` from it.
    ///
    /// # Errors
    /// What went wrong, ready for the log.
    pub(crate) async fn prepare(
        &self,
        name: &str,
        cfg: &RoleConfig,
        parts: Parts,
        generation: Generation,
        takeover: Takeover,
    ) -> Result<Ready, String> {
        let Takeover {
            socket,
            file: after,
            outbox,
        } = takeover;
        Ok(match (cfg, parts) {
            (RoleConfig::Server(c), Parts::Server(p)) => {
                Ready::Server(TcpServer::listen(c, p, socket).await.map_err(|e| {
                    format!("tcp server `{name}` cannot listen on {}: {e}", c.listen)
                })?)
            }
            (RoleConfig::Client(c), Parts::Client(p)) => {
                let (outbox, after) = match outbox {
                    Some((outbox, done)) => (outbox, Some(done)),
                    None => (Outbox::new(c.outbox), None),
                };
                Ready::Client {
                    client: TcpClient::new(c, p, generation, outbox),
                    after,
                }
            }
            (RoleConfig::Region(r), Parts::Watch(p)) => Ready::Watch {
                watcher: ShmWatcher::open(r, p, generation)
                    .map_err(|e| format!("shm region `{name}`: {e}"))?,
                after: after.map(|(done, _)| done),
            },
            (RoleConfig::Region(r), Parts::Channel(parts)) => match after {
                // Its file is free: open it now, so a failure is this role's.
                None => Ready::Channel {
                    channel: ShmChannel::open(r, parts.clone(), Take::Fresh)
                        .map_err(|e| format!("shm region `{name}`: {e}"))?,
                    parts,
                },
                Some((after, take)) => Ready::ChannelAfter { parts, take, after },
            },
            _ => {
                return Err(format!(
                    "role `{name}`: resolved parts do not match its kind"
                ));
            }
        })
    }

    /// Starts `ready` as instance `generation` of `name`.
    pub(crate) fn launch(
        &self,
        name: &str,
        cfg: RoleConfig,
        ready: Ready,
        generation: Generation,
    ) -> Instance {
        let stop = self.root.child_token();
        let intake = stop.child_token();
        let handover = Arc::new(AtomicBool::new(false));
        let (up, why) = match &ready {
            Ready::Client { .. } => (false, "not connected yet"),
            _ => (true, ""),
        };
        let health = registry().claim(name, generation, up, why);
        let ctx = Context {
            name: Arc::from(name),
            generation,
            pool: self.pool.clone(),
            monitor: self.monitor.clone(),
            health: health.clone(),
            intake: intake.clone(),
            stop: stop.clone(),
        };
        let (mut socket, mut addr, mut outbox) = (None, None, None);
        let (parts, run): (Parts, BoxFuture<'static, ()>) = match ready {
            Ready::Server(server) => {
                socket = server.socket().ok();
                addr = server.local_addr().ok();
                (
                    Parts::Server(server.parts().clone()),
                    server.serve(ctx.clone()).boxed(),
                )
            }
            Ready::Client { client, after } => {
                outbox = Some(client.outbox().clone());
                let parts = Parts::Client(client.parts().clone());
                let ctx = ctx.clone();
                let run = async move {
                    if let Some(done) = after {
                        done.await;
                    }
                    client.run(ctx).await;
                };
                (parts, run.boxed())
            }
            Ready::Watch { watcher, after } => {
                let parts = Parts::Watch(watcher.parts().clone());
                let ctx = ctx.clone();
                let run = async move {
                    if let Some(done) = after {
                        // The old watcher writes the same file: let it finish.
                        done.await;
                    }
                    watcher.run(ctx).await;
                };
                (parts, run.boxed())
            }
            Ready::Channel { channel, parts } => {
                let handover = handover.clone();
                (
                    Parts::Channel(parts),
                    channel.run(ctx.clone(), handover).boxed(),
                )
            }
            Ready::ChannelAfter {
                parts: channel_parts,
                take,
                after,
            } => {
                let RoleConfig::Region(r) = &cfg else {
                    unreachable!("a channel's config is a region")
                };
                let (r, p, ctx, handover) = (
                    r.clone(),
                    channel_parts.clone(),
                    ctx.clone(),
                    handover.clone(),
                );
                let run = async move {
                    after.await;
                    match ShmChannel::open(&r, p, take) {
                        Ok(channel) => channel.run(ctx, handover).await,
                        Err(e) => {
                            tracing::error!(role = %ctx.name, "not started: {e}");
                            ctx.health.down(&format!("not started: {e}"));
                            // Stay (down) until stopped, so the role is not seen as ended.
                            ctx.stop.cancelled().await;
                        }
                    }
                };
                (Parts::Channel(channel_parts), run.boxed())
            }
        };
        // A retired instance ends after `intake` (a child of `stop`) fired.
        let (task_health, task_intake) = (health.clone(), intake.clone());
        let role = name.to_string();
        let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
        self.tracker.spawn(async move {
            run.await;
            if !task_intake.is_cancelled() {
                tracing::error!(role = %role, "stopped by itself; the role is down until the next reload");
                task_health.down("stopped by itself");
            }
            let _ = done_tx.send(());
        });
        Instance {
            config: cfg,
            parts,
            socket,
            addr,
            outbox,
            _health: health,
            intake,
            stop,
            handover,
            done: done_rx.map(|_| ()).boxed().shared(),
        }
    }
}

impl Instance {
    /// A duplicate of its listening socket, for a replacement.
    pub(crate) fn socket(&self) -> Option<std::net::TcpListener> {
        self.socket.as_ref().and_then(|s| s.try_clone().ok())
    }

    /// Ends the instance: a server stops accepting and its open connections
    /// finish on it for up to `drain`; other roles stop at once (a channel
    /// leaves its file ready when `file_adopted`). Tracked, so shutdown waits.
    pub(crate) fn retire(
        self,
        name: &str,
        drain: Duration,
        file_adopted: bool,
        tracker: &TaskTracker,
    ) {
        let name = name.to_string();
        if file_adopted {
            self.handover.store(true, Ordering::SeqCst);
        }
        let Instance {
            socket,
            intake,
            stop,
            done,
            _health: health,
            config,
            ..
        } = self;
        drop(socket);
        if matches!(config, RoleConfig::Server(_)) {
            intake.cancel();
        } else {
            stop.cancel();
        }
        tracker.spawn(async move {
            tokio::select! {
                () = done.clone() => {}
                () = tokio::time::sleep(drain) => {
                    tracing::warn!(role = %name, "reload_drain ({drain:?}) passed: closing the previous instance's connections");
                    stop.cancel();
                    done.await;
                }
            }
            stop.cancel();
            drop(health);
        });
    }
}
