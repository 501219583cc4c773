//! One `[[tcp.server]]` connection: decode requests with the role's framing,
//! submit them to the role's [`Dispatch`], and write the replies in request
//! order while reading goes on (up to `pipeline` requests at once).

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures::stream::FuturesOrdered;
use futures::{FutureExt, SinkExt, StreamExt};
use tokio_util::codec::{FramedRead, FramedWrite};
use tokio_util::sync::CancellationToken;

use super::dispatch::{Batch, Dispatch, Replies, Reply, Submitted};
use super::framing::{FrameCodec, FrameError};
use super::stream::Duplex;
use crate::admin::series::MessageSeries;
use crate::config::TcpServerConfig;
use crate::py::handler::CallContext;
use crate::py::pool::CallError;

/// Read buffer taken when data arrives: a typical message (and several
/// pipelined ones) arrives in one read instead of several.
const READ_BUFFER: usize = 32 * 1024;

/// Replies buffered before they are written out even if more are coming.
const WRITE_BATCH: usize = 8 * 1024;

/// A connection that has read nothing for this long, with nothing in
/// flight, gives its buffers back: ten thousand idle connections cost their
/// sockets and tasks, not their buffers.
const QUIET: Duration = Duration::from_secs(1);

/// What one read step brought.
enum Read {
    /// Requests to answer.
    Batch(Batch),
    /// The peer closed, or the stream is unusable (already logged).
    End,
}

/// Serves one connection until the peer closes, an error closes it, it idles
/// out, or `stop` is cancelled (then in-flight requests are answered first).
pub(crate) async fn serve<S: Duplex>(
    cfg: &TcpServerConfig,
    dispatch: &Dispatch,
    stream: S,
    ctx: &Arc<CallContext>,
    stop: &CancellationToken,
) {
    let max = usize::try_from(cfg.max_message.as_u64()).unwrap_or(usize::MAX);
    let (r, w) = stream.split();
    // No buffers until there is traffic (see `next_frame`).
    let mut reader = FramedRead::with_capacity(r, FrameCodec::new(cfg.framing, max), 0);
    let mut writer = FramedWrite::with_capacity(w, FrameCodec::new(cfg.framing, max), 0);
    writer.set_backpressure_boundary(WRITE_BATCH);
    let mut reply_codec = FrameCodec::new(cfg.framing, max);
    let m = ConnMetrics::new(&cfg.name);
    let mut in_flight = FuturesOrdered::new();
    let mut pending = 0usize;
    let mut reading = true;
    // Created once: re-creating these per message costs a waiter-list lock
    // and a timer-wheel update each time. The idle timer is pushed back
    // lazily, only when it fires early.
    let cancelled = stop.cancelled();
    tokio::pin!(cancelled);
    let idle = tokio::time::sleep(cfg.idle_timeout);
    tokio::pin!(idle);
    let quiet = tokio::time::sleep(QUIET);
    tokio::pin!(quiet);
    let mut holding_buffers = false;
    // When to come back to purge freed memory (see `crate::memory`).
    let mut purge_at = None;
    let mut last_read = tokio::time::Instant::now();
    tracing::debug!("connection opened");
    while reading || !in_flight.is_empty() {
        tokio::select! {
            biased;
            Some(replies) = in_flight.next(), if !in_flight.is_empty() => {
                let replies: Replies = replies;
                pending -= replies.len();
                // Framed synchronously, then one flush: no per-reply future
                // in this task's state, which every idle connection pays for.
                let written = match put_replies(&mut reply_codec, writer.write_buffer_mut(), replies, &m) {
                    Ok(()) if in_flight.is_empty() || writer.write_buffer().len() >= WRITE_BATCH => {
                        writer.flush().await
                    }
                    other => other,
                };
                if let Err(e) = written {
                    tracing::info!("write failed, closing: {e}");
                    break;
                }
            }
            _ = &mut cancelled, if reading => reading = false,
            () = &mut idle, if reading => {
                let deadline = last_read + cfg.idle_timeout;
                if tokio::time::Instant::now() >= deadline && in_flight.is_empty() {
                    tracing::info!("idle for {:?}, closing", cfg.idle_timeout);
                    reading = false;
                } else {
                    idle.as_mut().reset(deadline.max(tokio::time::Instant::now() + Duration::from_millis(1)));
                }
            }
            () = &mut quiet, if reading && (holding_buffers || purge_at.is_some()) => {
                if holding_buffers {
                    let deadline = last_read + QUIET;
                    if tokio::time::Instant::now() >= deadline && in_flight.is_empty()
                        && release_buffers(&mut reader, &mut writer)
                    {
                        holding_buffers = false;
                        purge_at = crate::memory::freed();
                    } else {
                        quiet.as_mut().reset(deadline.max(tokio::time::Instant::now() + Duration::from_millis(1)));
                    }
                } else {
                    // Back for a purge that was too soon when our buffers went.
                    purge_at = crate::memory::freed();
                }
                if let (false, Some(at)) = (holding_buffers, purge_at) {
                    quiet.as_mut().reset(tokio::time::Instant::from_std(at));
                }
            }
            frame = next_frame::<S>(&mut reader), if reading && pending < cfg.pipeline => {
                last_read = tokio::time::Instant::now();
                if !holding_buffers {
                    holding_buffers = true;
                    purge_at = None;
                    quiet.as_mut().reset(last_read + QUIET);
                }
                let batch = match read_batch(frame, &mut reader, cfg.pipeline - pending, &mut reading) {
                    Read::Batch(b) => b,
                    Read::End => continue,
                };
                let n = batch.len();
                m.received(n, batch.bytes());
                let started = m.timed.then(Instant::now);
                // The submission is settled before any await, so its future
                // (a pool call's whole state) is never part of this task's.
                let written = match dispatch.submit(batch, ctx, in_flight.is_empty(), &mut reply_codec, writer.write_buffer_mut()) {
                    Submitted::Written(written) => Some(written),
                    Submitted::Later(replies) => {
                        pending += n;
                        let latency = m.series.latency.clone();
                        in_flight.push_back(replies.map(move |r| {
                            if let Some(t) = started {
                                latency.record(t.elapsed());
                            }
                            r
                        }));
                        None
                    }
                };
                if let Some(written) = written {
                    m.record(started);
                    let flushed = match written {
                        Ok(w) => {
                            m.series.bytes_out.increment(w.bytes as u64);
                            m.series.errors.increment(w.errors as u64);
                            writer.flush().await
                        }
                        Err(e) => Err(e),
                    };
                    if let Err(e) = flushed {
                        tracing::info!("write failed, closing: {e}");
                        break;
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

/// The next frame. A connection without a read buffer (new, or quiet for a
/// while) waits for the socket to be readable before it takes one, so an
/// idle connection holds none.
async fn next_frame<S: Duplex>(
    reader: &mut FramedRead<S::Read, FrameCodec>,
) -> Option<Result<Bytes, FrameError>> {
    if reader.read_buffer().capacity() == 0 {
        if let Err(e) = S::wait_data(reader.get_mut()).await {
            return Some(Err(e.into()));
        }
        super::framing::grow_read_buffer(reader.read_buffer_mut(), READ_BUFFER);
    }
    reader.next().await
}

/// Gives back the buffers of a quiet connection if they hold nothing;
/// returns whether both were released.
fn release_buffers<R, W>(
    reader: &mut FramedRead<R, FrameCodec>,
    writer: &mut FramedWrite<W, FrameCodec>,
) -> bool {
    let mut released = true;
    if reader.read_buffer().is_empty() {
        *reader.read_buffer_mut() = BytesMut::new();
    } else {
        released = false;
    }
    if writer.write_buffer().is_empty() {
        *writer.write_buffer_mut() = BytesMut::new();
    } else {
        released = false;
    }
    released
}

/// Takes `first` and every further message already decoded or readable
/// without waiting, up to `room`: pipelined requests cross to Python together.
fn read_batch<R: tokio::io::AsyncRead + Unpin>(
    first: Option<Result<Bytes, FrameError>>,
    reader: &mut FramedRead<R, FrameCodec>,
    room: usize,
    reading: &mut bool,
) -> Read {
    let first = match first {
        Some(Ok(msg)) => msg,
        None => {
            *reading = false;
            return Read::End;
        }
        Some(Err(e)) => {
            tracing::warn!("closing connection: {e}");
            *reading = false;
            return Read::End;
        }
    };
    let mut more = Vec::new();
    while 1 + more.len() < room {
        match reader.next().now_or_never() {
            Some(Some(Ok(m))) => more.push(m),
            Some(Some(Err(e))) => {
                tracing::warn!("closing connection: {e}");
                *reading = false;
                break;
            }
            Some(None) => {
                *reading = false;
                break;
            }
            None => break,
        }
    }
    if more.is_empty() {
        Read::Batch(Batch::One(first))
    } else {
        more.insert(0, first);
        Read::Batch(Batch::Many(more))
    }
}

/// Per-connection handles on the role's metrics (labels resolved once).
struct ConnMetrics {
    /// Whether hand-offs are timed (only when a recorder is installed).
    timed: bool,
    series: MessageSeries,
}

impl ConnMetrics {
    fn new(role: &str) -> Self {
        Self {
            timed: crate::admin::metrics_enabled(),
            series: MessageSeries::register(role),
        }
    }

    fn received(&self, messages: usize, bytes: usize) {
        self.series.messages.increment(messages as u64);
        crate::workers::identity::note_requests(messages as u64);
        self.series.bytes_in.increment(bytes as u64);
    }

    fn record(&self, started: Option<Instant>) {
        if let Some(t) = started {
            self.series.latency.record(t.elapsed());
        }
    }
}

/// Frames the replies into `out` in order; a failed call is counted (and
/// has been logged) and sends nothing.
fn put_replies(
    codec: &mut FrameCodec,
    out: &mut BytesMut,
    replies: Replies,
    m: &ConnMetrics,
) -> Result<(), FrameError> {
    match replies {
        Replies::One(r) => put(codec, out, r, m),
        Replies::Many(v) => v.into_iter().try_for_each(|r| put(codec, out, r, m)),
    }
}

fn put(
    codec: &mut FrameCodec,
    out: &mut BytesMut,
    r: Reply,
    m: &ConnMetrics,
) -> Result<(), FrameError> {
    match r {
        Ok(Some(reply)) => {
            m.series.bytes_out.increment(reply.len() as u64);
            codec.encode_slice(&reply, out)
        }
        Ok(None) => Ok(()),
        Err(CallError::Handler(_)) => {
            m.series.errors.increment(1); // the handler logged the traceback
            Ok(())
        }
        Err(e) => {
            m.series.errors.increment(1);
            tracing::warn!("no reply: {e}");
            Ok(())
        }
    }
}
