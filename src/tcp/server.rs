//! `[[tcp.server]]`: accepts connections (at most `max_connections`; more are
//! refused), decodes messages with the role's framing and hands each to the
//! Python handler: on the GIL pool (`dispatch = "pool"`), or directly on the
//! role's own interpreter thread (`dispatch = "inline"`, see [`super::inline`]).
//! Up to `pipeline` requests per connection are handled at once; replies are
//! written in request order, and reading goes on while earlier replies are pending.
//!
//! Errors never stop the server: an over-size or malformed message closes
//! its connection; a handler exception (logged with its traceback) means no
//! reply for that message and the connection stays open, for every framing.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::future::Either;
use futures::stream::FuturesOrdered;
use futures::{FutureExt, SinkExt, StreamExt};
use pyo3::prelude::*;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::codec::{FramedRead, FramedWrite};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use super::framing::FrameCodec;
use crate::config::{Dispatch, TcpServerConfig};
use crate::py::handler::{CallContext, Handler, format_exception};
use crate::py::pool::{CallError, GilPool, Watched};
use crate::py::target::Target;

/// Initial read buffer per connection: a typical message (and several
/// pipelined ones) arrives in one read instead of several.
const READ_BUFFER: usize = 32 * 1024;

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
                    serve(&server, stream, &ctx, &calls, &token).await;
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

async fn serve(
    server: &TcpServer,
    stream: TcpStream,
    ctx: &Arc<CallContext>,
    calls: &Calls,
    token: &CancellationToken,
) {
    let cfg = &server.config;
    let max = usize::try_from(cfg.max_message.as_u64()).unwrap_or(usize::MAX);
    let (r, w) = stream.into_split();
    let mut reader = FramedRead::with_capacity(r, FrameCodec::new(cfg.framing, max), READ_BUFFER);
    let mut writer = FramedWrite::new(w, FrameCodec::new(cfg.framing, max));
    let mut inline_codec = FrameCodec::new(cfg.framing, max);
    let m = ConnMetrics::new(&cfg.name);
    let mut in_flight = FuturesOrdered::new();
    let mut pending_msgs = 0usize;
    let mut reading = true;
    // Created once: re-creating these per message costs a waiter-list lock
    // and a timer-wheel update each time. The idle timer is pushed back
    // lazily, only when it fires early.
    let cancelled = token.cancelled();
    tokio::pin!(cancelled);
    let idle = tokio::time::sleep(cfg.idle_timeout);
    tokio::pin!(idle);
    let mut last_read = tokio::time::Instant::now();
    tracing::debug!("connection opened");
    loop {
        if !reading && in_flight.is_empty() {
            break;
        }
        tokio::select! {
            biased;
            Some(replies) = in_flight.next(), if !in_flight.is_empty() => {
                let replies: Replies = replies;
                pending_msgs -= replies.len();
                if let Err(e) = write_replies(&mut writer, replies, in_flight.is_empty(), &m).await {
                    tracing::info!("write failed, closing: {e}");
                    break;
                }
            }
            _ = &mut cancelled, if reading => {
                reading = false;
            }
            () = &mut idle, if reading => {
                let deadline = last_read + cfg.idle_timeout;
                if tokio::time::Instant::now() >= deadline && in_flight.is_empty() {
                    tracing::info!("idle for {:?}, closing", cfg.idle_timeout);
                    reading = false;
                } else {
                    idle.as_mut().reset(deadline.max(tokio::time::Instant::now() + Duration::from_millis(1)));
                }
            }
            frame = reader.next(), if reading && pending_msgs < cfg.pipeline => {
                last_read = tokio::time::Instant::now();
                match frame {
                    None => reading = false,
                    Some(Ok(msg)) => {
                        super::framing::keep_room(reader.read_buffer_mut(), msg.len() + 4);
                        // Take every message already decoded or readable without
                        // waiting: pipelined requests cross to the pool together.
                        let mut batch = Vec::new();
                        while pending_msgs + 1 + batch.len() < cfg.pipeline {
                            match reader.next().now_or_never() {
                                Some(Some(Ok(m))) => batch.push(m),
                                Some(Some(Err(e))) => {
                                    tracing::warn!("closing connection: {e}");
                                    reading = false;
                                    break;
                                }
                                Some(None) => {
                                    reading = false;
                                    break;
                                }
                                None => break,
                            }
                        }
                        let (handler, ctx) = (server.handler.clone(), ctx.clone());
                        let (latency, started) = (m.latency.clone(), m.timed.then(Instant::now));
                        match calls {
                            Calls::Inline(watched) => {
                                // Nothing is ever in flight here: calls finish
                                // before the next read, so replies go straight
                                // into the write buffer, in order.
                                batch.insert(0, msg);
                                m.received(batch.len(), batch.iter().map(Bytes::len).sum());
                                let answered = answer_inline(
                                    watched, &handler, &batch, &ctx,
                                    &mut inline_codec, writer.write_buffer_mut(), &m,
                                );
                                record(&latency, started);
                                let written = match answered {
                                    Ok(()) => writer.flush().await,
                                    Err(e) => Err(e),
                                };
                                if let Err(e) = written {
                                    tracing::info!("write failed, closing: {e}");
                                    break;
                                }
                            }
                            Calls::Pool(pool) if batch.is_empty() => {
                                let pool = pool.clone();
                                pending_msgs += 1;
                                m.received(1, msg.len());
                                in_flight.push_back(Either::Left(async move {
                                    let r = pool.call_with(&handler, msg, Some(ctx)).await;
                                    record(&latency, started);
                                    Replies::One(r)
                                }));
                            }
                            Calls::Pool(pool) => {
                                let pool = pool.clone();
                                batch.insert(0, msg);
                                pending_msgs += batch.len();
                                m.received(batch.len(), batch.iter().map(Bytes::len).sum());
                                in_flight.push_back(Either::Right(async move {
                                    let r = pool.call_batch(&handler, batch, Some(ctx)).await;
                                    record(&latency, started);
                                    Replies::Many(r)
                                }));
                            }
                        }
                    }
                    Some(Err(e)) => {
                        tracing::warn!("closing connection: {e}");
                        reading = false;
                    }
                }
            }
        }
    }
    if let Err(e) = writer.flush().await {
        tracing::debug!("final flush failed: {e}");
    }
    tracing::debug!("connection closed");
}

type Reply = Result<Option<Bytes>, CallError>;

/// Calls the handler for each message here, on the role's own thread, and
/// frames each reply straight from Python's bytes into `out`. A handler
/// exception (logged by the handler) skips that reply.
fn answer_inline(
    watched: &Watched,
    handler: &Handler,
    batch: &[Bytes],
    ctx: &CallContext,
    codec: &mut FrameCodec,
    out: &mut bytes::BytesMut,
    m: &ConnMetrics,
) -> Result<(), super::framing::FrameError> {
    Python::attach(|py| {
        watched.call(|| {
            for msg in batch {
                let framed = handler.call_here(py, msg, Some(ctx), |reply| {
                    codec
                        .encode_slice(reply, out)
                        .map(|()| m.bytes_out.increment(reply.len() as u64))
                });
                match framed {
                    Ok(Some(result)) => result?,
                    Ok(None) => {}
                    Err(_) => m.errors.increment(1),
                }
            }
            Ok(())
        })
    })
}

/// The results of one hand-off: a lone message (no allocation) or a batch.
enum Replies {
    One(Reply),
    Many(Vec<Reply>),
}

impl Replies {
    fn len(&self) -> usize {
        match self {
            Replies::One(_) => 1,
            Replies::Many(v) => v.len(),
        }
    }
}

fn record(latency: &metrics::Histogram, started: Option<Instant>) {
    if let Some(t) = started {
        latency.record(t.elapsed());
    }
}

/// Per-connection handles on the role's metrics (labels resolved once).
struct ConnMetrics {
    /// Whether hand-offs are timed (only when a recorder is installed).
    timed: bool,
    messages: metrics::Counter,
    bytes_in: metrics::Counter,
    bytes_out: metrics::Counter,
    errors: metrics::Counter,
    latency: metrics::Histogram,
}

impl ConnMetrics {
    fn new(role: &str) -> Self {
        let role = role.to_string();
        Self {
            timed: crate::admin::metrics_enabled(),
            messages: metrics::counter!("pyipcd_messages_total", "role" => role.clone()),
            bytes_in: metrics::counter!("pyipcd_bytes_total", "role" => role.clone(), "direction" => "in"),
            bytes_out: metrics::counter!("pyipcd_bytes_total", "role" => role.clone(), "direction" => "out"),
            errors: metrics::counter!("pyipcd_errors_total", "role" => role.clone()),
            latency: metrics::histogram!("pyipcd_handler_seconds", "role" => role),
        }
    }

    fn received(&self, messages: usize, bytes: usize) {
        self.messages.increment(messages as u64);
        self.bytes_in.increment(bytes as u64);
    }
}

/// Writes the replies in order (flushing when nothing else is in flight).
async fn write_replies(
    writer: &mut FramedWrite<tokio::net::tcp::OwnedWriteHalf, FrameCodec>,
    replies: Replies,
    flush: bool,
    m: &ConnMetrics,
) -> Result<(), super::framing::FrameError> {
    match replies {
        Replies::One(r) => put(writer, r, m).await?,
        Replies::Many(v) => {
            for r in v {
                put(writer, r, m).await?;
            }
        }
    }
    if flush {
        writer.flush().await?;
    }
    Ok(())
}

/// Queues one reply; a failed call is counted (and has been logged) and sends nothing.
async fn put(
    writer: &mut FramedWrite<tokio::net::tcp::OwnedWriteHalf, FrameCodec>,
    r: Reply,
    m: &ConnMetrics,
) -> Result<(), super::framing::FrameError> {
    match r {
        Ok(Some(reply)) => {
            m.bytes_out.increment(reply.len() as u64);
            writer.feed(reply).await
        }
        Ok(None) => Ok(()),
        Err(CallError::Handler(_)) => {
            m.errors.increment(1); // the pool logged the traceback
            Ok(())
        }
        Err(e) => {
            m.errors.increment(1);
            tracing::warn!("no reply: {e}");
            Ok(())
        }
    }
}
