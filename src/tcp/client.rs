//! `[[tcp.client]]`: connects out over TCP or a Unix socket (with
//! `connect_timeout`), reconnects with
//! exponential backoff, and sends, in order: the scripted `send` list
//! (`repeat` times, `interval` apart), messages yielded by a Python
//! `producer` generator, and messages from `pyipcd.send(role, data)`. Each
//! reply goes to the `on_reply` handler (or the log).
//!
//! # Delivery
//! All messages pass through one bounded outbox (`outbox`), so producers wait
//! rather than grow memory. A message leaves the outbox when the kernel
//! accepted all of its bytes; if that write fails, the same message is sent
//! first on the next connection. A message the kernel accepted just before the
//! connection broke may be lost (TCP gives no receipt): delivery is
//! at-least-once for failed writes and at-most-once for accepted ones; order
//! is kept. When a reload replaces the role, messages the old instance did
//! not send go to the new one; at shutdown they are dropped (logged).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use pyo3::prelude::*;
use tokio::sync::mpsc;
use tokio_util::codec::{FramedRead, FramedWrite};
use tokio_util::sync::CancellationToken;

use super::endpoint::Connect;
use super::framing::FrameCodec;
use super::stream::{Connected, Duplex, connect};
use crate::config::TcpClientConfig;
use crate::py::handler::{Handler, Runs, format_exception};
use crate::py::pool::GilPool;
use crate::py::target::{ResolveError, resolve_callable};
use crate::registry::{Generation, RouteGuard, registry};
use crate::role::Context;
use crate::sync::lock;

/// What a client instance resolved in Python: kept by a replacement whose
/// targets did not change.
#[derive(Clone, Default)]
pub struct ClientParts {
    on_reply: Option<Arc<Handler>>,
    producer: Option<Arc<Py<PyAny>>>,
}

impl ClientParts {
    /// Resolves `on_reply` and `producer` of `cfg`, taking from `old` each one
    /// whose target is unchanged (`same(field)` says which). Takes the GIL.
    ///
    /// # Errors
    /// [`ResolveError`] for the first target that cannot be resolved.
    pub fn resolve(
        py: Python<'_>,
        cfg: &TcpClientConfig,
        old: Option<&ClientParts>,
        same: impl Fn(&str) -> bool,
    ) -> Result<Self, ResolveError> {
        let key = |field: &str| format!("tcp.client `{}` {field}", cfg.name);
        let on_reply = match (&cfg.on_reply, old.and_then(|o| o.on_reply.as_ref())) {
            (None, _) => None,
            (Some(_), Some(h)) if same("on_reply") => Some(h.clone()),
            (Some(spec), _) => Some(Arc::new(Handler::resolve(
                py,
                &cfg.name,
                &key("on_reply"),
                spec,
                Runs::OnPool,
            )?)),
        };
        let producer = match (&cfg.producer, old.and_then(|o| o.producer.as_ref())) {
            (None, _) => None,
            (Some(_), Some(p)) if same("producer") => Some(p.clone()),
            (Some(spec), _) => Some(Arc::new(
                resolve_callable(py, &key("producer"), spec)?.unbind(),
            )),
        };
        Ok(Self { on_reply, producer })
    }
}

/// A client instance, ready to [`TcpClient::run`].
pub struct TcpClient {
    config: TcpClientConfig,
    parts: ClientParts,
    outbox: Outbox,
    route: Option<RouteGuard>,
}

/// A client role's outbox. It outlives instances: a replacement (with the
/// same `outbox` size) takes it over once the old instance has stopped, with
/// the message that instance was sending, so a reload loses and reorders
/// nothing, and `pyipcd.send` never sees the role missing meanwhile.
#[derive(Clone)]
pub struct Outbox {
    tx: mpsc::Sender<Bytes>,
    /// The receiving end and the message in progress, while no instance runs.
    idle: Arc<Mutex<Option<Parked>>>,
}

/// An outbox between instances: its receiver and the message that was being sent.
type Parked = (mpsc::Receiver<Bytes>, Option<Bytes>);

impl Outbox {
    /// An empty outbox of `capacity` messages.
    pub fn new(capacity: usize) -> Self {
        let (tx, rx) = mpsc::channel(capacity);
        Self {
            tx,
            idle: Arc::new(Mutex::new(Some((rx, None)))),
        }
    }
}

impl TcpClient {
    /// A client instance using `outbox` (a new one, or its predecessor's).
    pub fn new(cfg: &TcpClientConfig, parts: ClientParts, outbox: Outbox) -> Self {
        Self {
            config: cfg.clone(),
            parts,
            outbox,
            route: None,
        }
    }

    /// Makes `pyipcd.send(name, data)` reach this instance's outbox from now
    /// on, as instance `generation`.
    pub fn publish(&mut self, generation: Generation) {
        let route = registry().route(&self.config.name, generation, self.outbox.tx.clone());
        self.route = Some(route);
    }

    /// Its outbox, for a replacement instance.
    pub fn outbox(&self) -> &Outbox {
        &self.outbox
    }

    /// The resolved Python parts, for a replacement instance.
    pub fn parts(&self) -> &ClientParts {
        &self.parts
    }

    /// Runs until `ctx.stop` is cancelled. Messages not sent by then stay in
    /// the outbox for the instance that replaced this one, if any; else they
    /// are dropped, logged.
    pub async fn run(self, ctx: Context) {
        let (pool, token) = (&ctx.pool, &ctx.stop);
        let cfg = &self.config;
        pool.set_max_in_flight(&ctx.name, cfg.max_in_flight);
        // The previous instance (if any) gave the outbox back when it stopped.
        let Some((mut outbox, mut pending)) = lock(&self.outbox.idle).take() else {
            tracing::error!(role = %cfg.name, "the outbox is still in use by another instance; not started");
            return;
        };
        let tx = self.outbox.tx.clone();
        let feeders = tokio_util::task::TaskTracker::new();
        feeders.spawn(script(cfg.clone(), tx.clone(), token.clone()));
        if let Some(producer) = self.parts.producer.clone() {
            feeders.spawn(produce(
                cfg.clone(),
                producer,
                pool.clone(),
                tx.clone(),
                token.clone(),
            ));
        }
        drop(tx);
        let mut delay = cfg.backoff_min;
        let to = match Connect::parse(&cfg.connect) {
            Ok(to) => to,
            Err(e) => {
                tracing::error!(role = %cfg.name, "not started: connect: {e}");
                return;
            }
        };
        while !token.is_cancelled() {
            let stream = tokio::select! {
                _ = token.cancelled() => break,
                s = tokio::time::timeout(cfg.connect_timeout, connect(&to)) => s,
            };
            let stream = match stream {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    ctx.health
                        .down(&format!("connect to {} failed: {e}", cfg.connect));
                    tracing::warn!(role = %cfg.name, "connect to {} failed: {e}; retrying in {delay:?}", cfg.connect);
                    backoff(&mut delay, cfg.backoff_max, token).await;
                    continue;
                }
                Err(_) => {
                    ctx.health
                        .down(&format!("connect to {} timed out", cfg.connect));
                    tracing::warn!(role = %cfg.name, "connect to {} timed out after {:?}; retrying in {delay:?}", cfg.connect, cfg.connect_timeout);
                    backoff(&mut delay, cfg.backoff_max, token).await;
                    continue;
                }
            };
            delay = cfg.backoff_min;
            tracing::info!(role = %cfg.name, "connected to {}", cfg.connect);
            ctx.health.up();
            let why = match stream {
                Connected::Tcp(s) => {
                    self.session(s, &mut outbox, &mut pending, pool, token)
                        .await
                }
                Connected::Unix(s) => {
                    self.session(s, &mut outbox, &mut pending, pool, token)
                        .await
                }
            };
            ctx.health
                .down(&format!("connection to {} lost: {why}", cfg.connect));
            if !token.is_cancelled() {
                tracing::warn!(role = %cfg.name, "connection to {} lost ({why}); reconnecting in {delay:?}", cfg.connect);
                backoff(&mut delay, cfg.backoff_max, token).await;
            }
        }
        feeders.close();
        feeders.wait().await;
        match registry().successor(&cfg.name, ctx.generation) {
            Some(next) if next.same_channel(&self.outbox.tx) => {
                *lock(&self.outbox.idle) = Some((outbox, pending));
            }
            next => {
                outbox.close();
                let mut unsent: Vec<Bytes> = pending.into_iter().collect();
                while let Ok(msg) = outbox.try_recv() {
                    unsent.push(msg);
                }
                hand_over(&cfg.name, next, unsent).await;
            }
        }
        drop(self.route);
    }

    /// One connection: returns why it ended.
    async fn session<S: Duplex>(
        &self,
        stream: S,
        outbox: &mut mpsc::Receiver<Bytes>,
        pending: &mut Option<Bytes>,
        pool: &Arc<GilPool>,
        token: &CancellationToken,
    ) -> String {
        let cfg = &self.config;
        let max = usize::try_from(cfg.max_message.as_u64()).unwrap_or(usize::MAX);
        let (r, w) = stream.split();
        let mut reader = FramedRead::new(r, FrameCodec::new(cfg.framing, max));
        let mut writer = FramedWrite::new(w, FrameCodec::new(cfg.framing, max));
        if let Some(msg) = pending.take()
            && let Err(e) = writer.send(msg.clone()).await
        {
            *pending = Some(msg);
            return format!("write failed: {e}");
        }
        loop {
            tokio::select! {
                _ = token.cancelled() => return "stopping".into(),
                msg = outbox.recv() => {
                    let Some(msg) = msg else {
                        // Every feeder is done and no route is left: keep reading replies.
                        std::future::pending::<()>().await;
                        unreachable!();
                    };
                    if let Err(e) = writer.send(msg.clone()).await {
                        *pending = Some(msg);
                        return format!("write failed: {e}");
                    }
                }
                frame = reader.next() => match frame {
                    None => return "closed by the server".into(),
                    Some(Err(e)) => return e.to_string(),
                    Some(Ok(reply)) => self.reply(reply, pool).await,
                },
            }
        }
    }

    async fn reply(&self, reply: Bytes, pool: &Arc<GilPool>) {
        match &self.parts.on_reply {
            Some(h) => {
                // Errors are logged by the pool; a reply handler's return value is ignored.
                let _ = pool.call(h, reply).await;
            }
            None => {
                tracing::info!(role = %self.config.name, "reply: {}", String::from_utf8_lossy(&reply))
            }
        }
    }
}

/// Gives messages a retired instance did not send to the instance that
/// replaced it with an outbox of its own (a new `outbox` size): they queue
/// behind what was sent to it meanwhile. Without one (shutdown, role
/// removed) they are dropped, logged.
async fn hand_over(role: &str, successor: Option<mpsc::Sender<Bytes>>, unsent: Vec<Bytes>) {
    if unsent.is_empty() {
        return;
    }
    let n = unsent.len();
    if let Some(successor) = successor {
        let mut handed = 0;
        for msg in unsent {
            match tokio::time::timeout(HAND_OVER_WAIT, successor.send(msg)).await {
                Ok(Ok(())) => handed += 1,
                _ => break,
            }
        }
        tracing::info!(
            role,
            "handed {handed} unsent message(s) to the instance that replaced this one"
        );
        if handed < n {
            tracing::warn!(
                role,
                "dropping {} unsent message(s): the new instance's outbox stayed full",
                n - handed
            );
        }
    } else {
        tracing::warn!(role, "dropping {n} unsent message(s): the role stopped");
    }
}

/// How long a retired client waits for room in its successor's outbox.
const HAND_OVER_WAIT: Duration = Duration::from_secs(1);

async fn backoff(delay: &mut Duration, max: Duration, token: &CancellationToken) {
    tokio::select! {
        _ = token.cancelled() => {}
        _ = tokio::time::sleep(*delay) => {}
    }
    *delay = (*delay * 2).min(max);
}

/// Feeds the scripted `send` list into the outbox.
async fn script(cfg: TcpClientConfig, tx: mpsc::Sender<Bytes>, token: CancellationToken) {
    if cfg.send.is_empty() {
        return;
    }
    let mut round = 0u64;
    while cfg.repeat == 0 || round < cfg.repeat {
        round += 1;
        for msg in &cfg.send {
            tokio::select! {
                _ = token.cancelled() => return,
                sent = tx.send(Bytes::copy_from_slice(msg.as_bytes())) => if sent.is_err() { return },
            }
            tokio::select! {
                _ = token.cancelled() => return,
                _ = tokio::time::sleep(cfg.interval) => {}
            }
        }
    }
}

/// Feeds messages yielded by the producer generator into the outbox.
async fn produce(
    cfg: TcpClientConfig,
    producer: Arc<Py<PyAny>>,
    pool: Arc<GilPool>,
    tx: mpsc::Sender<Bytes>,
    token: CancellationToken,
) {
    let role: Arc<str> = Arc::from(cfg.name.as_str());
    let r = role.clone();
    let generator = pool
        .run(move |py| {
            crate::py::output::set_thread_role(Some(&r));
            producer
                .bind(py)
                .call0()
                .map(Bound::unbind)
                .map_err(|e| format_exception(py, &e))
        })
        .await;
    let generator = match generator {
        Ok(Ok(g)) => Arc::new(g),
        Ok(Err(tb)) => return tracing::error!(role = %role, "producer raised\n{}", tb.trim_end()),
        Err(e) => return tracing::warn!(role = %role, "producer not started: {e}"),
    };
    let is_async = generator_is_async(&pool, &generator).await;
    loop {
        // Room in the outbox first, then the next message: once the
        // generator has given a message up it goes straight in, so a stop (a
        // reload replacing the role) between the two cannot drop it.
        let permit = tokio::select! {
            _ = token.cancelled() => return,
            permit = tx.reserve() => match permit {
                Ok(p) => p,
                Err(_) => return,
            },
        };
        let next = next_item(&pool, &generator, &role, is_async).await;
        let msg = match next {
            Ok(Ok(Some(m))) => m,
            Ok(Ok(None)) => continue,
            Ok(Err(tb)) if tb.is_empty() => {
                return tracing::info!(role = %role, "producer finished");
            }
            Ok(Err(tb)) => {
                return tracing::error!(role = %role, "producer raised\n{}", tb.trim_end());
            }
            Err(e) => return tracing::warn!(role = %role, "producer stopped: {e}"),
        };
        permit.send(msg);
        tokio::select! {
            _ = token.cancelled() => return,
            _ = tokio::time::sleep(cfg.interval) => {}
        }
    }
}

/// Whether the producer returned an async generator.
async fn generator_is_async(pool: &GilPool, generator: &Arc<Py<PyAny>>) -> bool {
    let g = generator.clone();
    pool.run(move |py| g.bind(py).hasattr("__anext__").unwrap_or(false))
        .await
        .unwrap_or(false)
}

/// The generator's next message: `Ok(None)` to skip (it yielded `None`),
/// `Err("")` when it is exhausted, `Err(traceback)` when it raised.
async fn next_item(
    pool: &GilPool,
    generator: &Arc<Py<PyAny>>,
    role: &Arc<str>,
    is_async: bool,
) -> Result<Result<Option<Bytes>, String>, crate::py::pool::CallError> {
    let (g, r) = (generator.clone(), role.clone());
    let convert = move |py: Python<'_>, item: PyResult<Bound<'_, PyAny>>| match item {
        Ok(item) => crate::py::handler::to_bytes(&item).map_err(|e| format_exception(py, &e)),
        Err(e)
            if e.is_instance_of::<pyo3::exceptions::PyStopIteration>(py)
                || e.is_instance_of::<pyo3::exceptions::PyStopAsyncIteration>(py) =>
        {
            Err(String::new())
        }
        Err(e) => Err(format_exception(py, &e)),
    };
    if !is_async {
        return pool
            .run(move |py| {
                crate::py::output::set_thread_role(Some(&r));
                convert(py, g.bind(py).call_method0("__next__"))
            })
            .await;
    }
    // An async generator steps on the asyncio loop, tagged with the role.
    let awaited = pool
        .await_python(move |py| {
            let runtime = crate::py::module::runtime(py)?;
            let step = g.bind(py).call_method0("__anext__")?;
            let handle = runtime.getattr("_CancelHandle")?.call0()?;
            runtime.call_method1("_run_as", (&*r, step, handle))
        })
        .await?;
    pool.run(move |py| convert(py, awaited.map(|o| o.into_bound(py))))
        .await
}
