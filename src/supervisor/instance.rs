//! One role instance through its life: its Python parts resolved (on a
//! blocking thread, with the GIL), its resources taken (a socket bound or
//! handed over, a file mapped), launched as a tracked task with its own
//! health latch and stop tokens, and at last retired.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::FutureExt;
use futures::future::{BoxFuture, Shared};
use pyo3::Python;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::plan::{Keep, RoleConfig};
use crate::admin::series;
use crate::config::{ShmMode, ShmRegionConfig};
use crate::py::monitor::Monitor;
use crate::py::pool::GilPool;
use crate::py::target::ResolveError;
use crate::registry::{Generation, HealthLatch, registry};
use crate::role::Context;
use crate::shm::channel::{ChannelParts, ShmChannel, Take};
use crate::shm::watch::{ShmWatcher, WatchParts};
use crate::sync::lock;
use crate::tcp::client::{ClientParts, Outbox, TcpClient};
use crate::tcp::listener::ListenSocket;
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

/// A value the instance's task may set or clear while the supervisor holds it.
type Slot<T> = Arc<Mutex<Option<T>>>;

/// A running role instance, as the supervisor keeps it.
pub(crate) struct Instance {
    /// The config it runs.
    pub(crate) config: RoleConfig,
    /// What it resolved in Python.
    pub(crate) parts: Parts,
    /// Its listening socket (a duplicate) while it serves, for a replacement
    /// on the same address. Cleared when its task ends, so a server that
    /// died does not keep its port bound.
    socket: Slot<ListenSocket>,
    /// The address it listens on, for servers.
    pub(crate) addr: Option<SocketAddr>,
    /// A client's outbox, for a replacement to take over.
    pub(crate) outbox: Option<Outbox>,
    /// Its health entry, once claimed (at launch, or when the instance it
    /// waits for has ended).
    health: Slot<HealthLatch>,
    intake: CancellationToken,
    stop: CancellationToken,
    /// Set before `stop` when a replacement adopts its shm file.
    handover: Arc<AtomicBool>,
    /// Resolves when its task has ended.
    pub(crate) done: Done,
}

/// Everything an instance needs from the daemon to start.
pub(crate) struct Launcher<'a> {
    pub(crate) pool: &'a Arc<GilPool>,
    pub(crate) monitor: &'a Monitor,
    pub(crate) root: &'a CancellationToken,
    pub(crate) tracker: &'a TaskTracker,
}

/// What a new instance takes over from retiring ones (see [`Keep`]).
pub(crate) struct Takeover {
    /// A duplicate of the listening socket on the same address.
    pub(crate) socket: Option<ListenSocket>,
    /// The old user of the same shm file (start once it ended), and how to take the file.
    pub(crate) file: Option<(Done, Take)>,
    /// The old client's outbox (take it once that instance ended).
    pub(crate) outbox: Option<(Outbox, Done)>,
}

/// A resolved role holding its resources, ready to launch. Preparing has
/// no effect outside it: dropping it (a reload that fails elsewhere) leaves
/// the running instances as they were.
pub(crate) enum Ready {
    Server(TcpServer),
    /// A client, which runs once `after` (the old instance, whose outbox it
    /// takes over) has ended.
    Client {
        client: TcpClient,
        after: Option<Done>,
    },
    /// A watcher, which polls once `after` (the old watcher of its file) has ended.
    Watch {
        watcher: ShmWatcher,
        after: Option<Done>,
    },
    /// A channel with its file open (fresh, or attached to adopt it from
    /// `after`, which it waits for).
    Channel {
        channel: ShmChannel,
        parts: ChannelParts,
        after: Option<Done>,
    },
    /// A channel that re-initialises its file once `after` (the old
    /// instance using it, with another layout) has ended.
    ChannelAfter {
        cfg: Box<ShmRegionConfig>,
        parts: ChannelParts,
        after: Done,
    },
}

impl Ready {
    /// The instance it must wait for before it serves.
    fn after(&self) -> Option<&Done> {
        match self {
            Ready::Server(_) => None,
            Ready::Client { after, .. }
            | Ready::Watch { after, .. }
            | Ready::Channel { after, .. } => after.as_ref(),
            Ready::ChannelAfter { after, .. } => Some(after),
        }
    }
}

impl Launcher<'_> {
    /// Takes the resources of a resolved role: binds a server (or takes the
    /// old socket), maps a watched region, opens a channel's file (or
    /// attaches to the old instance's to adopt it). Nothing starts yet.
    ///
    /// # Errors
    /// What went wrong, ready for the log.
    pub(crate) fn prepare(
        &self,
        name: &str,
        cfg: &RoleConfig,
        parts: Parts,
        takeover: Takeover,
    ) -> Result<Ready, crate::Error> {
        let Takeover {
            socket,
            file,
            outbox,
        } = takeover;
        let region_err =
            |e: &dyn std::fmt::Display| crate::Error::Startup(format!("shm region `{name}`: {e}"));
        Ok(match (cfg, parts) {
            (RoleConfig::Server(c), Parts::Server(p)) => Ready::Server(
                TcpServer::listen(c, p, socket).map_err(|e| e.for_role(name, &c.listen))?,
            ),
            (RoleConfig::Client(c), Parts::Client(p)) => {
                let (outbox, after) = match outbox {
                    Some((outbox, done)) => (outbox, Some(done)),
                    None => (Outbox::new(c.outbox), None),
                };
                Ready::Client {
                    client: TcpClient::new(c, p, outbox),
                    after,
                }
            }
            (RoleConfig::Region(r), Parts::Watch(p)) => Ready::Watch {
                watcher: ShmWatcher::open(r, p).map_err(|e| region_err(&e))?,
                after: file.map(|(done, _)| done),
            },
            (RoleConfig::Region(r), Parts::Channel(parts)) => match file {
                None => Ready::Channel {
                    channel: ShmChannel::open(r, parts.clone(), Take::Fresh)
                        .map_err(|e| region_err(&e))?,
                    parts,
                    after: None,
                },
                // Attaching only reads: the old instance serves on meanwhile.
                Some((after, Take::Adopt)) => Ready::Channel {
                    channel: ShmChannel::open(r, parts.clone(), Take::Adopt)
                        .map_err(|e| region_err(&e))?,
                    parts,
                    after: Some(after),
                },
                Some((after, Take::Fresh)) => Ready::ChannelAfter {
                    cfg: Box::new(r.clone()),
                    parts,
                    after,
                },
            },
            _ => {
                return Err(crate::Error::Startup(format!(
                    "role `{name}`: resolved parts do not match its kind"
                )));
            }
        })
    }

    /// Starts `ready` as instance `generation` of `name`: it claims its
    /// health entry (when the instance it waits for has ended, if any) and
    /// its `pyipcd.send` route (at once).
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
        let is_client = matches!(ready, Ready::Client { .. });
        let after = ready.after().cloned();
        let health: Slot<HealthLatch> = Arc::default();
        let socket: Slot<ListenSocket> = Arc::default();
        let (mut addr, mut outbox) = (None, None);
        // The role's /metrics series exist (at zero) before readiness is
        // reported, not from whenever its task or thread first runs.
        match &ready {
            Ready::Server(_) => drop(series::ServerSeries::register(name)),
            Ready::Channel { .. } | Ready::ChannelAfter { .. } => {
                drop(series::MessageSeries::register(name));
                drop(series::channel_stale(name));
            }
            Ready::Client { .. } | Ready::Watch { .. } => {}
        }
        let (parts, body): (Parts, Body) = match ready {
            Ready::Server(server) => {
                *lock(&socket) = server.socket().ok();
                addr = server.local_addr();
                (
                    Parts::Server(server.parts().clone()),
                    Box::new(move |ctx| server.serve(ctx).boxed()),
                )
            }
            Ready::Client { mut client, .. } => {
                client.publish(generation);
                outbox = Some(client.outbox().clone());
                (
                    Parts::Client(client.parts().clone()),
                    Box::new(move |ctx| client.run(ctx).boxed()),
                )
            }
            Ready::Watch { mut watcher, .. } => {
                watcher.publish(generation);
                (
                    Parts::Watch(watcher.parts().clone()),
                    Box::new(move |ctx| watcher.run(ctx).boxed()),
                )
            }
            Ready::Channel { channel, parts, .. } => {
                let handover = handover.clone();
                (
                    Parts::Channel(parts),
                    Box::new(move |ctx| channel.run(ctx, handover).boxed()),
                )
            }
            Ready::ChannelAfter { cfg: r, parts, .. } => {
                let (p, handover) = (parts.clone(), handover.clone());
                let body: Body = Box::new(move |ctx: Context| {
                    async move {
                        match ShmChannel::open(&r, p, Take::Fresh) {
                            Ok(channel) => channel.run(ctx, handover).await,
                            Err(e) => {
                                tracing::error!(role = %ctx.name, "not started: {e}");
                                ctx.down_until_stopped(&format!("not started: {e}")).await;
                            }
                        }
                    }
                    .boxed()
                });
                (Parts::Channel(parts), body)
            }
        };
        // A client is up once connected; one that takes over from a
        // connected predecessor stays up meanwhile.
        let claim = {
            let (role, health) = (name.to_string(), health.clone());
            move || {
                let latch = if is_client {
                    registry().claim_like_predecessor(&role, generation, "not connected yet")
                } else {
                    registry().claim(&role, generation, true, "")
                };
                *lock(&health) = Some(latch.clone());
                latch
            }
        };
        let claimed = after.is_none().then(&claim);
        let (role, pool, monitor) = (Arc::from(name), self.pool.clone(), self.monitor.clone());
        let (task_intake, task_stop, task_socket) = (intake.clone(), stop.clone(), socket.clone());
        let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
        self.tracker.spawn(async move {
            let health = match claimed {
                Some(h) => h,
                None => {
                    if let Some(after) = after {
                        after.await;
                    }
                    claim()
                }
            };
            let ctx = Context {
                name: role,
                generation,
                pool,
                monitor,
                health: health.clone(),
                intake: task_intake.clone(),
                stop: task_stop,
            };
            body(ctx).await;
            // A retired instance ends after `intake` (a child of `stop`) fired.
            if !task_intake.is_cancelled() {
                tracing::error!(role = %health.role(), "stopped by itself; the next reload starts it again");
                health.down("stopped by itself");
            }
            *lock(&task_socket) = None;
            let _ = done_tx.send(());
        });
        Instance {
            config: cfg,
            parts,
            socket,
            addr,
            outbox,
            health,
            intake,
            stop,
            handover,
            done: done_rx.map(|_| ()).boxed().shared(),
        }
    }
}

/// What runs a launched instance, given its context.
type Body = Box<dyn FnOnce(Context) -> BoxFuture<'static, ()> + Send>;

impl Instance {
    /// A duplicate of its listening socket, for a replacement.
    pub(crate) fn socket(&self) -> Option<ListenSocket> {
        lock(&self.socket).as_ref().and_then(|s| s.try_clone().ok())
    }

    /// Whether its task has ended (by itself, when it was not retired).
    pub(crate) fn has_ended(&self) -> bool {
        self.done.peek().is_some()
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
            health,
            config,
            ..
        } = self;
        lock(&socket).take();
        let is_server = matches!(config, RoleConfig::Server(_));
        if is_server {
            intake.cancel();
        } else {
            stop.cancel();
        }
        tracker.spawn(async move {
            tokio::select! {
                () = done.clone() => {}
                () = tokio::time::sleep(drain), if is_server => {
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
