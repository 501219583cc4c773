//! `[[tcp.server]]`: accepts connections (at most `max_connections`; more are
//! refused), and serves each with `tcp::connection` through the role's
//! `tcp::dispatch` (the GIL pool, or for `dispatch = "inline"` the role's
//! own interpreter thread, see `tcp::inline`).
//!
//! Errors never stop the server: an over-size or malformed message closes
//! its connection; a handler exception (logged with its traceback) means no
//! reply for that message and the connection stays open, for every framing.
//!
//! On a reload the listening socket is handed to the replacement instance
//! (a duplicate of the same socket, so no connect is refused), and the
//! retired instance's open connections finish on its handler.

use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use pyo3::prelude::*;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use super::dispatch::{Dispatch, Hook};
use crate::admin::series::ServerSeries;
use crate::config::{DEFAULT_BACKLOG, Dispatch as Mode, TcpServerConfig};
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

/// The listen backlog for `cfg`: its `backlog`, capped (and logged) by the
/// kernel's `net.core.somaxconn`, which Linux applies silently.
fn backlog(cfg: &TcpServerConfig) -> i32 {
    let set = cfg.backlog.unwrap_or(DEFAULT_BACKLOG);
    let wanted = i32::try_from(set).unwrap_or(i32::MAX);
    let cap = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .ok()
        .and_then(|s| s.trim().parse::<i32>().ok());
    match cap {
        Some(cap) if cap < wanted => {
            let why = format!(
                "backlog {wanted} capped to {cap} by net.core.somaxconn (sysctl -w net.core.somaxconn={wanted} lifts it)"
            );
            if cfg.backlog.is_some() {
                tracing::warn!(role = %cfg.name, "{why}");
            } else {
                tracing::info!(role = %cfg.name, "{why}");
            }
            cap
        }
        _ => wanted,
    }
}

/// A server instance, listening, ready to [`TcpServer::serve`].
pub struct TcpServer {
    config: TcpServerConfig,
    parts: ServerParts,
    listener: TcpListener,
}

impl TcpServer {
    /// Listens on `cfg.listen` with `cfg.backlog`: on `handover` (the socket
    /// of the instance this one replaces) when given, else on a newly bound
    /// socket.
    ///
    /// # Errors
    /// If the address is invalid or cannot be bound (in use, no permission).
    pub fn listen(
        cfg: &TcpServerConfig,
        parts: ServerParts,
        handover: Option<std::net::TcpListener>,
    ) -> std::io::Result<Self> {
        let backlog = backlog(cfg);
        let socket = match handover {
            Some(socket) => socket2::Socket::from(std::os::fd::OwnedFd::from(socket)),
            None => {
                let addr = super::parse_listen(&cfg.listen).map_err(std::io::Error::other)?;
                let socket = socket2::Socket::new(
                    socket2::Domain::for_address(addr),
                    socket2::Type::STREAM.cloexec(),
                    None,
                )?;
                socket.set_reuse_address(true)?;
                socket.bind(&addr.into())?;
                socket
            }
        };
        // On a handed-over socket this only sets the (maybe new) backlog.
        socket.listen(backlog)?;
        socket.set_nonblocking(true)?;
        let listener = TcpListener::from_std(std::net::TcpListener::from(socket))?;
        Ok(Self {
            config: cfg.clone(),
            parts,
            listener,
        })
    }

    /// The bound address (useful with port 0).
    ///
    /// # Errors
    /// If the OS cannot tell.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// A duplicate of the listening socket, for a replacement instance.
    ///
    /// # Errors
    /// If the descriptor cannot be duplicated (out of descriptors).
    pub fn socket(&self) -> std::io::Result<std::net::TcpListener> {
        Ok(self.listener.as_fd().try_clone_to_owned()?.into())
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
        match self.config.dispatch {
            Mode::Pool => {
                let dispatch = Dispatch::pool(self.parts.handler.clone(), ctx.pool.clone());
                self.accept(dispatch, &ctx).await;
            }
            Mode::Inline => {
                let listener = match self.listener.into_std() {
                    Ok(l) => l,
                    Err(e) => {
                        tracing::error!(role = %ctx.name, "cannot hand the listener to its thread: {e}");
                        return;
                    }
                };
                let (config, parts) = (self.config, self.parts);
                super::inline::on_own_thread(ctx, move |watched, ctx| async move {
                    match TcpListener::from_std(listener) {
                        Ok(listener) => {
                            let dispatch = Dispatch::inline(parts.handler.clone(), watched);
                            let server = TcpServer {
                                config,
                                parts,
                                listener,
                            };
                            server.accept(dispatch, &ctx).await;
                        }
                        Err(e) => tracing::error!(role = %ctx.name, "cannot listen: {e}"),
                    }
                })
                .await;
            }
        }
    }

    /// Accepts until `ctx.intake` is cancelled, then lets open connections
    /// finish (until they close, or `ctx.stop`: then they stop reading and
    /// answer what is in flight).
    async fn accept(self, dispatch: Dispatch, ctx: &Context) {
        let Self {
            config: cfg,
            parts,
            listener,
        } = self;
        let (cfg, parts) = (Arc::new(cfg), Arc::new(parts));
        let limit = Arc::new(Semaphore::new(cfg.max_connections));
        let connections = TaskTracker::new();
        let ids = AtomicU64::new(0);
        let series = ServerSeries::register(&cfg.name);
        tracing::info!(role = %cfg.name, addr = %listener.local_addr().map_or_else(|_| "?".into(), |a| a.to_string()), framing = ?cfg.framing, handler = %cfg.handler, "listening");
        loop {
            let accepted = tokio::select! {
                _ = ctx.intake.cancelled() => break,
                a = listener.accept() => a,
            };
            let (stream, peer) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(role = %cfg.name, "accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Ok(permit) = limit.clone().try_acquire_owned() else {
                series.refused.increment(1);
                tracing::warn!(role = %cfg.name, %peer, "refusing connection: max_connections ({}) reached", cfg.max_connections);
                continue;
            };
            let conn_id = ids.fetch_add(1, Ordering::Relaxed) + 1;
            let span = tracing::info_span!("conn", role = %cfg.name, conn_id, %peer);
            let conn = Arc::new(CallContext {
                conn_id,
                peer: peer.to_string(),
            });
            let (cfg, parts, dispatch, stop, open) = (
                cfg.clone(),
                parts.clone(),
                dispatch.clone(),
                ctx.stop.clone(),
                series.open.clone(),
            );
            connections.spawn(
                async move {
                    open.increment(1.0);
                    let _ = stream.set_nodelay(true);
                    if let Some(h) = &parts.on_connect {
                        Box::pin(dispatch.fire(h, &conn)).await;
                    }
                    super::connection::serve(&cfg, &dispatch, stream, &conn, &stop).await;
                    if let Some(h) = &parts.on_close {
                        Box::pin(dispatch.fire(h, &conn)).await;
                    }
                    drop(permit);
                    open.decrement(1.0);
                }
                .instrument(span),
            );
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
}
