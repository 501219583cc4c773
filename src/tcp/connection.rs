//! One `[[tcp.server]]` connection: decode requests with the role's framing,
//! hand them to Python (a pool hand-off per message or pipelined batch, or a
//! direct call on an inline role's own thread), and write the replies in
//! request order while reading goes on.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::future::Either;
use futures::stream::FuturesOrdered;
use futures::{FutureExt, SinkExt, StreamExt};
use pyo3::prelude::*;
use tokio::net::TcpStream;
use tokio_util::codec::{FramedRead, FramedWrite};
use tokio_util::sync::CancellationToken;

use super::framing::FrameCodec;
use super::server::Calls;
use crate::config::TcpServerConfig;
use crate::py::handler::{CallContext, Handler};
use crate::py::pool::{CallError, Watched};

/// Initial read buffer per connection: a typical message (and several
/// pipelined ones) arrives in one read instead of several.
const READ_BUFFER: usize = 32 * 1024;

/// Serves one connection until the peer closes, an error closes it, it idles
/// out, or `token` is cancelled (then in-flight requests are answered first).
pub(crate) async fn serve(
    cfg: &TcpServerConfig,
    handler: &Arc<Handler>,
    stream: TcpStream,
    ctx: &Arc<CallContext>,
    calls: &Calls,
    token: &CancellationToken,
) {
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
                        let (latency, started) = (m.latency.clone(), m.timed.then(Instant::now));
                        match calls {
                            Calls::Inline(watched) => {
                                // Nothing is ever in flight here: calls finish
                                // before the next read, so replies go straight
                                // into the write buffer, in order.
                                batch.insert(0, msg);
                                m.received(batch.len(), batch.iter().map(Bytes::len).sum());
                                let answered = answer_inline(
                                    watched, handler, &batch, ctx,
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
                                let (pool, handler, ctx) = (pool.clone(), handler.clone(), ctx.clone());
                                pending_msgs += 1;
                                m.received(1, msg.len());
                                in_flight.push_back(Either::Left(async move {
                                    let r = pool.call_with(&handler, msg, Some(ctx)).await;
                                    record(&latency, started);
                                    Replies::One(r)
                                }));
                            }
                            Calls::Pool(pool) => {
                                let (pool, handler, ctx) = (pool.clone(), handler.clone(), ctx.clone());
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
