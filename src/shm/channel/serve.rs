//! The channel thread's loop: pops each request, runs the handler on it
//! (copied, or lent as a view of the mapping) and pushes the reply, and
//! sleeps on the doorbell while the ring is empty.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use pyo3::prelude::*;

use super::{Ended, HANDOVER_REPLY_WAIT, STOP_CHECK, ShmChannel};
use crate::admin::series::{self, MessageSeries};
use crate::py::handler::{HandlerError, format_exception, with_reply_bytes};
use crate::py::lent::Returned;
use crate::role::Context;
use crate::shm::doorbell::Spin;
use crate::shm::ring::{Dir, Fault, InPlace, State, flags};

/// What serving one record left to do.
enum Flow {
    /// Go on with the next record.
    Next,
    /// The daemon is stopping.
    Stop,
}

/// The channel's metrics.
struct Counters {
    series: MessageSeries,
    stale: metrics::Counter,
    /// Whether calls are timed (only when a recorder is installed).
    timed: bool,
}

/// Serves `ch` on this thread until `stop` is set or its file is found
/// truncated.
pub(super) fn serve(ch: &ShmChannel, ctx: &Context, stop: &AtomicBool) -> Ended {
    let channel = &ch.channel;
    let role = ch.name.to_string();
    let counters = Counters {
        series: MessageSeries::register(&role),
        stale: series::channel_stale(&role),
        timed: crate::admin::metrics_enabled(),
    };
    Python::attach(|py| {
        let watched = ctx
            .monitor
            .watch(py, &format!("py-shm-{}", ch.name), ctx.health.clone());
        channel.set_state(State::Ready);
        // Logged once clients can attach.
        tracing::info!(
            role = %ch.name,
            generation = channel.generation(),
            ring = channel.ring_size(),
            max_message = channel.max_record(),
            zero_copy = ch.zero_copy,
            "channel ready"
        );
        let mut spin = Spin::default();
        loop {
            // Checked before each request, not only when idle: a busy client
            // must not keep a stopping instance (or its replacement) waiting.
            // What is left in the ring is answered by the replacement, if any.
            if stop.load(Ordering::Relaxed) {
                return Ended::Stopped;
            }
            if ch.truncated() {
                // Nothing more is read or written through this mapping.
                return Ended::Truncated;
            }
            // The request stays in the ring (its space held) until it is
            // answered: zero-copy handlers read it where it lies.
            let served = channel.pop_in_place(Dir::Request, |request| {
                serve_one(py, ch, &request, stop, &counters, |call| watched.call(call))
            });
            match served {
                Some(Flow::Next) => {}
                Some(Flow::Stop) => return Ended::Stopped,
                None => {
                    if stop.load(Ordering::Relaxed) {
                        return Ended::Stopped;
                    }
                    // Without the GIL until the client publishes, a stop or
                    // a truncated file.
                    let news = || {
                        channel.readable(Dir::Request)
                            || stop.load(Ordering::Relaxed)
                            || ch.truncated()
                    };
                    py.detach(|| {
                        let bell = channel.bell(Dir::Request);
                        while !bell.wait(&mut spin, STOP_CHECK, news) {
                            ch.check_length();
                        }
                    });
                }
            }
        }
    })
}

/// Answers one request: its fault, or the handler's reply, pushed straight
/// from Python's bytes into the response ring. `watch` runs the handler call
/// under the stuck-call monitor.
fn serve_one<'py>(
    py: Python<'py>,
    ch: &ShmChannel,
    request: &InPlace<'_>,
    stop: &AtomicBool,
    counters: &Counters,
    watch: impl FnOnce(
        &mut dyn FnMut() -> Result<Bound<'py, PyAny>, HandlerError>,
    ) -> Result<Bound<'py, PyAny>, HandlerError>,
) -> Flow {
    let channel = &ch.channel;
    if ch.truncated() {
        // Read from zero pages, maybe: the serving loop ends at once.
        return Flow::Next;
    }
    // A framing fault has no trustworthy epoch: it concerns whoever is
    // attached now.
    let epoch = match request.fault {
        Some(Fault::Framing { .. }) => channel.epoch(),
        _ => request.epoch,
    };
    if epoch != channel.epoch() {
        // Sent by a client that has gone: its side effects would be for
        // nobody, and its reply must not reach the next client.
        counters.stale.increment(1);
        tracing::debug!(role = %ch.name, seq = request.seq, epoch, "dropped a request of a client that has gone");
        return Flow::Next;
    }
    let started = counters.timed.then(Instant::now);
    let push = |fl: u32, reply: &[u8]| {
        if fl >= flags::ERROR {
            counters.series.errors.increment(1);
        }
        if let Some(t) = started {
            counters.series.latency.record(t.elapsed());
        }
        push_reply(py, ch, request.seq, fl, epoch, reply, stop, counters)
    };
    counters.series.messages.increment(1);
    crate::workers::identity::note_requests(1);
    counters
        .series
        .bytes_in
        .increment(request.payload.len() as u64);
    if let Some((fl, text)) = fault_reply(ch, request) {
        return push(fl, &text);
    }
    let max = channel.max_record();
    let answer = |called: Result<Bound<'py, PyAny>, HandlerError>,
                  view: Option<&Bound<'py, PyAny>>| {
        let obj = match called {
            Ok(obj) => obj,
            Err(e) => return push(flags::ERROR, e.summary.as_bytes()),
        };
        if view.is_some_and(|v| obj.is(v)) {
            // Echoing the lent view: the bytes are right there.
            return push(flags::OK, request.payload);
        }
        let pushed = with_reply_bytes(&obj, |reply| {
            if reply.len() <= max {
                push(flags::OK, reply)
            } else {
                tracing::warn!(role = %ch.name, "reply of {} bytes is over max_message ({max})", reply.len());
                push(
                    flags::ERROR,
                    format!("reply over max_message ({max} bytes)").as_bytes(),
                )
            }
        });
        match pushed {
            Ok(Some(flow)) => flow,
            Ok(None) => push(flags::NO_REPLY, &[]),
            Err(e) => {
                let e = ch.handler.error(py, &e);
                push(flags::ERROR, e.summary.as_bytes())
            }
        }
    };
    if ch.zero_copy {
        // A view read while the file is truncated shows zeros; the reply to
        // it is then dropped (`push_reply`).
        let lent = crate::py::lent::lend(py, request.payload, &ch.name, stop, |view| {
            let called = watch(&mut || ch.handler.call_with(py, view.clone(), None));
            answer(called, Some(view))
        });
        match lent {
            Ok(Returned::Free(flow)) => flow,
            Ok(Returned::StillHeld(_)) => {
                // Stopping with a view of the mapping still alive in Python:
                // the mapping must outlive it (see ShmChannel::run).
                ch.view_held_at_stop.store(true, Ordering::SeqCst);
                Flow::Stop
            }
            Err(e) => push(flags::ERROR, format_exception(py, &e).as_bytes()),
        }
    } else {
        let copy = crate::copy::py_bytes(py, request.payload).into_any();
        if ch.truncated() {
            // The copy may hold zeros that passed the checksum: not a request.
            return Flow::Next;
        }
        let called = watch(&mut || ch.handler.call_with(py, copy.clone(), None));
        answer(called, None)
    }
}

/// The error reply a faulty request record gets, if it is one.
fn fault_reply(ch: &ShmChannel, request: &InPlace<'_>) -> Option<(u32, Vec<u8>)> {
    let max = ch.channel.max_record();
    let (fl, text) = match request.fault? {
        Fault::Checksum => (
            flags::ERROR,
            format!("request {} failed its checksum", request.seq),
        ),
        Fault::OverMax { len } => (flags::ERROR, format!("length {len} over max {max}")),
        Fault::Framing { len, dropped } => (
            flags::RESET,
            format!(
                "framing lost: a record claims length {len}, which cannot fit; dropped \
                 {dropped} bytes of requests, none sent before this reply will be answered"
            ),
        ),
    };
    tracing::warn!(role = %ch.name, seq = request.seq, "bad request record: {text}");
    Some((fl, text.into_bytes()))
}

/// Pushes a reply, waiting (GIL released) while the client is not reading
/// its replies; never overwrites. A new client attaching ends the wait and
/// drops the reply (it was for the client that has gone).
#[allow(clippy::too_many_arguments)]
fn push_reply(
    py: Python<'_>,
    ch: &ShmChannel,
    seq: u32,
    fl: u32,
    epoch: u64,
    reply: &[u8],
    stop: &AtomicBool,
    counters: &Counters,
) -> Flow {
    let channel = &ch.channel;
    // Error texts (a traceback line, CPython's message) are cut to fit.
    let reply = &reply[..reply.len().min(channel.max_record())];
    let mut handing_over = None;
    while channel.epoch() == epoch && !ch.truncated() {
        if channel.try_push(Dir::Response, seq, fl, epoch, reply) {
            counters.series.bytes_out.increment(reply.len() as u64);
            return Flow::Next;
        }
        if stop.load(Ordering::Relaxed) {
            if !ch.handover.load(Ordering::SeqCst) {
                return Flow::Stop;
            }
            // Handing the file over: this request was taken from the ring,
            // so only this instance can answer it. Wait for the client to
            // make room, for a while.
            let since = *handing_over.get_or_insert_with(Instant::now);
            if since.elapsed() > HANDOVER_REPLY_WAIT {
                tracing::warn!(role = %ch.name, seq, "handing the channel over: the client read no reply for {HANDOVER_REPLY_WAIT:?}; its reply to request {seq} is lost");
                return Flow::Stop;
            }
        }
        py.detach(|| std::thread::sleep(Duration::from_micros(100)));
    }
    counters.stale.increment(1);
    tracing::debug!(role = %ch.name, seq, epoch, "dropped a reply: its client has gone");
    Flow::Next
}
