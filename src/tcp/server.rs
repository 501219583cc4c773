//! `[[tcp.server]]`: accepts connections (at most `max_connections`; more are
//! refused), and serves each with `tcp::connection` through the role's
//! `tcp::dispatch` (the GIL pool, or for `dispatch = "inline"` the role's
//! own interpreter thread, see `tcp::inline`).
//!
//! Errors never stop the server: an over-size or malformed message closes
//! its connection; a handler exception (logged with its traceback) means no
//! reply for that message and the connection stays open, for every framing.
//!
//! It listens on TCP, on a Unix socket (file or abstract name; peers are
//! then known by their credentials and may be limited with `allow_uids` /
//! `allow_gids`), or on a socket systemd passed (`tcp::listener`).
//!
//! On a reload the listening socket is handed to the replacement instance
//! (a duplicate of the same socket, so no connect is refused), and the
//! retired instance's open connections finish on its handler.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use pyo3::prelude::*;
use tokio::sync::Semaphore;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use super::dispatch::{Dispatch, Hook};
use super::listener::{Accepted, ListenError, ListenSocket, Listener};
use super::stream::{Duplex, Peer};
use crate::admin::series::ServerSeries;
use crate::config::{Dispatch as Mode, TcpServerConfig};
use crate::py::handler::{CallContext, Handler, Runs};
use crate::py::target::ResolveError;
use crate::role::Context;

/// What a server instance resolved in Python: kept by a replacement whose
/// targets did not change (a class handler keeps its instance and its state).
#[derive(Clone)]
pub struct ServerParts {
    handler: Arc<Handler>,
    on_connect: Option<Arc<Hook>>,
    on_close: Option<Arc<Hook>>,
}

impl ServerParts {
    /// Resolves the handler and hooks of `cfg`, taking from `old` each one
    /// whose target is unchanged (`same(field)` says which). Takes the GIL.
    ///
    /// # Errors
    /// [`ResolveError`] for the first target that cannot be resolved.
    pub fn resolve(
        py: Python<'_>,
        cfg: &TcpServerConfig,
        old: Option<&ServerParts>,
        same: impl Fn(&str) -> bool,
    ) -> Result<Self, ResolveError> {
        let key = |field: &str| format!("tcp.server `{}` {field}", cfg.name);
        let runs = match cfg.dispatch {
            Mode::Pool => Runs::OnPool,
            Mode::Inline => Runs::OnOwnThread,
        };
        let handler = match old {
            Some(o) if same("handler") && (runs == Runs::OnPool || !o.handler.is_async()) => {
                o.handler.clone()
            }
            _ => Arc::new(Handler::resolve(
                py,
                &cfg.name,
                &key("handler"),
                &cfg.handler,
                runs,
            )?),
        };
        let hook = |field: &str, spec: &Option<String>, kept: Option<&Arc<Hook>>| match (spec, kept)
        {
            (None, _) => Ok(None),
            (Some(_), Some(h)) if same(field) => Ok(Some(h.clone())),
            (Some(s), _) => Hook::resolve(py, &key(field), s).map(|h| Some(Arc::new(h))),
        };
        Ok(Self {
            on_connect: hook(
                "on_connect",
                &cfg.on_connect,
                old.and_then(|o| o.on_connect.as_ref()),
            )?,
            on_close: hook(
                "on_close",
                &cfg.on_close,
                old.and_then(|o| o.on_close.as_ref()),
            )?,
            handler,
        })
    }
}

/// A server instance, listening, ready to [`TcpServer::serve`].
pub struct TcpServer {
    config: TcpServerConfig,
    parts: ServerParts,
    socket: ListenSocket,
}

impl TcpServer {
    /// Listens on `cfg.listen` with `cfg.backlog`: on `handover` (the socket
    /// of the instance this one replaces) when given, else on a socket bound
    /// (or taken from systemd) now.
    ///
    /// # Errors
    /// [`ListenError`]: an invalid or taken address, a live socket file, a
    /// socket systemd did not pass.
    pub(crate) fn listen(
        cfg: &TcpServerConfig,
        parts: ServerParts,
        handover: Option<ListenSocket>,
    ) -> Result<Self, ListenError> {
        Ok(Self {
            config: cfg.clone(),
            socket: ListenSocket::open(cfg, handover)?,
            parts,
        })
    }

    /// The bound TCP address (useful with port 0); none for a Unix socket.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.socket.tcp_addr()
    }

    /// A duplicate of the listening socket, for a replacement instance.
    ///
    /// # Errors
    /// If the descriptor cannot be duplicated (out of descriptors).
    pub(crate) fn socket(&self) -> std::io::Result<ListenSocket> {
        self.socket.try_clone()
    }

    /// The resolved Python parts, for a replacement instance.
    pub fn parts(&self) -> &ServerParts {
        &self.parts
    }

    /// Serves as the role's `dispatch` says: with the GIL pool, or on a
    /// dedicated interpreter thread of its own.
    pub async fn serve(self, ctx: Context) {
        ctx.pool
            .set_max_in_flight(&ctx.name, self.config.max_in_flight);
        let Self {
            config,
            parts,
            socket,
        } = self;
        let shown = socket.describe();
        match config.dispatch {
            Mode::Pool => match socket.into_listener() {
                Ok(listener) => {
                    let dispatch = Dispatch::pool(parts.handler.clone(), ctx.pool.clone());
                    accept(config, parts, listener, shown, dispatch, &ctx).await;
                }
                Err(e) => tracing::error!(role = %ctx.name, "cannot listen: {e}"),
            },
            Mode::Inline => {
                super::inline::on_own_thread(ctx, move |watched, ctx| async move {
                    match socket.into_listener() {
                        Ok(listener) => {
                            let dispatch = Dispatch::inline(parts.handler.clone(), watched);
                            accept(config, parts, listener, shown, dispatch, &ctx).await;
                        }
                        Err(e) => tracing::error!(role = %ctx.name, "cannot listen: {e}"),
                    }
                })
                .await;
            }
        }
    }
}

/// Whether `peer` may connect to a server with `cfg`'s `allow_uids` and
/// `allow_gids` (a peer matching either list may; without lists, anyone).
fn allowed(cfg: &TcpServerConfig, peer: &Peer) -> bool {
    let Peer::Unix { uid, gid, .. } = peer else {
        return true;
    };
    match (&cfg.allow_uids, &cfg.allow_gids) {
        (None, None) => true,
        (uids, gids) => {
            uids.as_ref().is_some_and(|l| l.contains(uid))
                || gids.as_ref().is_some_and(|l| l.contains(gid))
        }
    }
}

/// What every connection of one server instance shares.
struct Shared {
    cfg: Arc<TcpServerConfig>,
    parts: Arc<ServerParts>,
    dispatch: Dispatch,
    stop: tokio_util::sync::CancellationToken,
    open: metrics::Gauge,
}

/// Serves one accepted connection: hooks around [`super::connection::serve`].
async fn connection<S: Duplex>(
    shared: Shared,
    stream: S,
    conn: Arc<CallContext>,
    permit: tokio::sync::OwnedSemaphorePermit,
) {
    let Shared {
        cfg,
        parts,
        dispatch,
        stop,
        open,
    } = shared;
    open.increment(1.0);
    if let Some(h) = &parts.on_connect {
        Box::pin(dispatch.fire(h, &conn)).await;
    }
    super::connection::serve(&cfg, &dispatch, stream, &conn, &stop).await;
    if let Some(h) = &parts.on_close {
        Box::pin(dispatch.fire(h, &conn)).await;
    }
    drop(permit);
    open.decrement(1.0);
    crate::workers::balance::closed();
}

/// Accepts until `ctx.intake` is cancelled, then lets open connections
/// finish (until they close, or `ctx.stop`: then they stop reading and
/// answer what is in flight).
async fn accept(
    cfg: TcpServerConfig,
    parts: ServerParts,
    listener: Listener,
    shown: String,
    dispatch: Dispatch,
    ctx: &Context,
) {
    let (cfg, parts) = (Arc::new(cfg), Arc::new(parts));
    let limit = Arc::new(Semaphore::new(cfg.max_connections));
    let connections = TaskTracker::new();
    let ids = AtomicU64::new(0);
    let series = ServerSeries::register(&cfg.name);
    tracing::info!(role = %cfg.name, addr = %shown, framing = ?cfg.framing, handler = %cfg.handler, "listening");
    // With worker processes, a worker holding more than its share lets a
    // connection that arrives wait a moment for the others (`workers::balance`).
    let mut arrivals = crate::workers::balance::active()
        .then(|| listener.arrivals())
        .and_then(|a| {
            a.inspect_err(|e| tracing::warn!(role = %cfg.name, "no accept balancing: {e}"))
                .ok()
        });
    // The last look at the queue took a connection: there may be more,
    // whose arrival was already seen.
    let mut maybe_more = false;
    loop {
        let accepted = match &arrivals {
            Some(seen) if crate::workers::balance::over_share() => {
                tokio::select! {
                    _ = ctx.intake.cancelled() => break,
                    r = async {
                        if !maybe_more {
                            seen.wait().await?;
                        }
                        tokio::time::sleep(crate::workers::balance::STEP).await;
                        std::io::Result::Ok(())
                    } => if let Err(e) = r {
                        // Not again on every connection: plain accepts from now on.
                        tracing::warn!(role = %cfg.name, "no accept balancing from now on: {e}");
                        arrivals = None;
                        continue;
                    },
                }
                seen.clear();
                let Some(accepted) = listener.try_accept() else {
                    maybe_more = false;
                    continue;
                };
                maybe_more = true;
                accepted
            }
            _ => tokio::select! {
                _ = ctx.intake.cancelled() => break,
                a = listener.accept() => a,
            },
        };
        let accepted = match accepted {
            Ok(a) => a,
            Err(e) if e.kind() == std::io::ErrorKind::NotConnected => {
                // A Unix peer gone before its credentials were read.
                tracing::debug!(role = %cfg.name, "peer left before it was served: {e}");
                continue;
            }
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(role = %cfg.name, "accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let peer = match &accepted {
            Accepted::Tcp(_, p) | Accepted::Unix(_, p) => *p,
        };
        if !allowed(&cfg, &peer) {
            series.denied.increment(1);
            tracing::warn!(role = %cfg.name, %peer, "refusing connection: peer not in allow_uids/allow_gids");
            continue;
        }
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            series.refused.increment(1);
            tracing::warn!(role = %cfg.name, %peer, "refusing connection: max_connections ({}) reached", cfg.max_connections);
            continue;
        };
        // Counted now, not when its task first runs: a burst of accepts
        // must see its own size (`workers::balance`).
        crate::workers::balance::opened();
        let conn_id = ids.fetch_add(1, Ordering::Relaxed) + 1;
        let span = tracing::info_span!("conn", role = %cfg.name, conn_id, %peer);
        let conn = Arc::new(CallContext {
            conn_id,
            peer: peer.to_string(),
        });
        let shared = Shared {
            cfg: cfg.clone(),
            parts: parts.clone(),
            dispatch: dispatch.clone(),
            stop: ctx.stop.clone(),
            open: series.open.clone(),
        };
        match accepted {
            Accepted::Tcp(stream, _) => {
                connections.spawn(connection(shared, stream, conn, permit).instrument(span));
            }
            Accepted::Unix(stream, _) => {
                connections.spawn(connection(shared, stream, conn, permit).instrument(span));
            }
        }
    }
    // Free this instance's hold on the socket now (a replacement holds
    // its own) while the connections finish.
    drop(listener);
    connections.close();
    if !connections.is_empty() && !ctx.stop.is_cancelled() {
        tracing::info!(role = %cfg.name, "stopped accepting; {} open connection(s) finish on this instance", connections.len());
    }
    tokio::select! {
        () = connections.wait() => {}
        () = ctx.stop.cancelled() => {
            if !connections.is_empty() {
                tracing::info!(role = %cfg.name, "closing {} open connection(s) once their in-flight requests are answered", connections.len());
            }
            connections.wait().await;
        }
    }
    tracing::info!(role = %cfg.name, "stopped listening");
}
