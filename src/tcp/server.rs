//! `[[tcp.server]]`: accepts connections (at most `max_connections`; more are
//! refused), decodes messages with the role's framing and hands each to the
//! Python handler: on the GIL pool (`dispatch = "pool"`), or directly on the
//! role's own interpreter thread (`dispatch = "inline"`, see `tcp::inline`).
//! Each connection is served by `tcp::connection`: up to `pipeline`
//! requests at once, replies in request order, reading while replies are pending.
//!
//! Errors never stop the server: an over-size or malformed message closes
//! its connection; a handler exception (logged with its traceback) means no
//! reply for that message and the connection stays open, for every framing.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use pyo3::prelude::*;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::config::{Dispatch, TcpServerConfig};
use crate::py::handler::{CallContext, Handler, format_exception};
use crate::py::pool::{GilPool, Watched};
use crate::py::target::Target;

/// How a server's connections reach Python.
#[derive(Clone)]
pub enum Calls {
    /// Each message (or pipelined batch) is handed to the GIL pool.
    Pool(Arc<GilPool>),
    /// Handlers are called on the current thread, a dedicated interpreter
    /// thread watched by the stuck-call monitor.
    Inline(Arc<Watched>),
}

/// A Python callable run for connection events: `f(conn_id, peer)`.
#[derive(Debug, Clone)]
pub struct Hook {
    label: String,
    callable: Arc<Py<PyAny>>,
}

impl Hook {
    /// Resolves `spec` (`module:function`).
    ///
    /// # Errors
    /// The Python error raised while importing or looking it up.
    pub fn resolve(py: Python<'_>, spec: &str) -> PyResult<Self> {
        let target = Target::parse(spec)
            .map_err(|e| pyo3::exceptions::PyValueError::new_err(e.to_string()))?;
        let callable = target.resolve(py)?.ok_or_else(|| {
            pyo3::exceptions::PyTypeError::new_err("a hook must be module:function")
        })?;
        Ok(Self {
            label: spec.to_string(),
            callable: Arc::new(callable.unbind()),
        })
    }

    async fn fire(&self, calls: &Calls, role: &str, ctx: &CallContext) {
        let call = {
            let (callable, ctx) = (self.callable.clone(), ctx.clone());
            move |py: Python<'_>| {
                callable
                    .bind(py)
                    .call1((ctx.conn_id, ctx.peer.as_str()))
                    .map(|_| ())
                    .map_err(|e| format_exception(py, &e))
            }
        };
        let result = match calls {
            Calls::Pool(pool) => {
                let role: Arc<str> = Arc::from(role);
                pool.run(move |py| {
                    crate::py::output::set_thread_role(Some(&role));
                    call(py)
                })
                .await
            }
            Calls::Inline(watched) => Ok(Python::attach(|py| watched.call(|| call(py)))),
        };
        match result {
            Ok(Ok(())) => {}
            Ok(Err(tb)) => {
                tracing::error!(role, hook = %self.label, "hook raised\n{}", tb.trim_end())
            }
            Err(e) => tracing::warn!(role, hook = %self.label, "hook not run: {e}"),
        }
    }
}

/// A configured server role, resolved but not yet listening.
pub struct TcpServer {
    config: TcpServerConfig,
    handler: Arc<Handler>,
    on_connect: Option<Hook>,
    on_close: Option<Hook>,
}

/// A bound server, ready to [`ListeningServer::run`].
pub struct ListeningServer {
    server: Arc<TcpServer>,
    listener: TcpListener,
}

impl TcpServer {
    /// Resolves the role's handler and hooks (takes the GIL: call at start-up).
    ///
    /// # Errors
    /// The Python error from resolving a target.
    pub fn resolve(py: Python<'_>, config: &TcpServerConfig) -> PyResult<Self> {
        let target = Target::parse(&config.handler)
            .map_err(|e| pyo3::exceptions::PyValueError::new_err(e.to_string()))?;
        let handler = Handler::resolve(py, &config.name, &target)?;
        if config.dispatch == Dispatch::Inline && handler.is_async() {
            return Err(pyo3::exceptions::PyTypeError::new_err(format!(
                "`{target}` is an async def; dispatch = \"inline\" calls plain def handlers only (use dispatch = \"pool\")"
            )));
        }
        Ok(Self {
            handler: Arc::new(handler),
            on_connect: config
                .on_connect
                .as_deref()
                .map(|s| Hook::resolve(py, s))
                .transpose()?,
            on_close: config
                .on_close
                .as_deref()
                .map(|s| Hook::resolve(py, s))
                .transpose()?,
            config: config.clone(),
        })
    }

    /// The role's name.
    pub fn name(&self) -> &str {
        &self.config.name
    }

    /// Binds the listening socket.
    ///
    /// # Errors
    /// If the address is invalid or cannot be bound (in use, no permission).
    pub async fn bind(self) -> std::io::Result<ListeningServer> {
        let addr = super::parse_listen(&self.config.listen).map_err(std::io::Error::other)?;
        let listener = TcpListener::bind(addr).await?;
        Ok(ListeningServer {
            server: Arc::new(self),
            listener,
        })
    }
}

impl ListeningServer {
    /// The bound address (useful with port 0).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves as the role's `dispatch` says: [`ListeningServer::run`] with the
    /// pool, or on a dedicated interpreter thread of its own.
    pub async fn serve(self, pool: Arc<GilPool>, token: CancellationToken) {
        match self.server.config.dispatch {
            Dispatch::Pool => self.run(Calls::Pool(pool), token).await,
            Dispatch::Inline => {
                let ListeningServer { server, listener } = self;
                let name = server.config.name.clone();
                let listener = match listener.into_std() {
                    Ok(l) => l,
                    Err(e) => {
                        tracing::error!(role = %name, "cannot hand the listener to its thread: {e}");
                        return;
                    }
                };
                super::inline::on_own_thread(&name, pool, move |watched| async move {
                    match TcpListener::from_std(listener) {
                        Ok(listener) => {
                            ListeningServer { server, listener }
                                .run(Calls::Inline(watched), token)
                                .await;
                        }
                        Err(e) => tracing::error!(role = %server.config.name, "cannot listen: {e}"),
                    }
                })
                .await;
            }
        }
    }

    /// Accepts until `token` is cancelled, then lets open connections finish
    /// their in-flight requests (they stop reading at once).
    pub async fn run(self, calls: Calls, token: CancellationToken) {
        let ListeningServer { server, listener } = self;
        let cfg = &server.config;
        let limit = Arc::new(Semaphore::new(cfg.max_connections));
        let connections = TaskTracker::new();
        let ids = AtomicU64::new(0);
        tracing::info!(role = %cfg.name, addr = %listener.local_addr().map_or_else(|_| "?".into(), |a| a.to_string()), framing = ?cfg.framing, handler = %cfg.handler, "listening");
        loop {
            let accepted = tokio::select! {
                _ = token.cancelled() => break,
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
                metrics::counter!("pyipcd_connections_refused_total", "role" => cfg.name.clone())
                    .increment(1);
                tracing::warn!(role = %cfg.name, %peer, "refusing connection: max_connections ({}) reached", cfg.max_connections);
                drop(stream);
                continue;
            };
            let conn_id = ids.fetch_add(1, Ordering::Relaxed) + 1;
            metrics::gauge!("pyipcd_connections", "role" => cfg.name.clone()).increment(1.0);
            let ctx = Arc::new(CallContext {
                conn_id,
                peer: peer.to_string(),
            });
            let span = tracing::info_span!("conn", role = %cfg.name, conn_id, %peer);
            let (server, calls, token) = (server.clone(), calls.clone(), token.clone());
            connections.spawn(
                async move {
                    let _ = stream.set_nodelay(true);
                    if let Some(h) = &server.on_connect {
                        h.fire(&calls, &server.config.name, &ctx).await;
                    }
                    super::connection::serve(
                        &server.config,
                        &server.handler,
                        stream,
                        &ctx,
                        &calls,
                        &token,
                    )
                    .await;
                    if let Some(h) = &server.on_close {
                        h.fire(&calls, &server.config.name, &ctx).await;
                    }
                    drop(permit);
                    metrics::gauge!("pyipcd_connections", "role" => server.config.name.clone())
                        .decrement(1.0);
                }
                .instrument(span),
            );
        }
        // Free the port now: a replacement (reload) may bind it while these
        // connections finish.
        drop(listener);
        connections.close();
        connections.wait().await;
        tracing::info!(role = %cfg.name, "stopped listening");
    }
}
