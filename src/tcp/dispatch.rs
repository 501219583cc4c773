//! How a server's connections reach Python, in one type. [`Dispatch`] hands
//! each request (or pipelined batch) to the GIL pool (`dispatch = "pool"`),
//! or, for an inline role, calls the handler right here on the role's own
//! interpreter thread and frames the replies straight from Python's bytes
//! into the connection's write buffer (`dispatch = "inline"`). A connection
//! never asks which: it submits and is told whether the replies are already
//! written or will come later.

use std::future::Future;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use pyo3::prelude::*;

use super::framing::{FrameCodec, FrameError};
use crate::py::handler::{CallContext, Handler, format_exception};
use crate::py::monitor::Watched;
use crate::py::pool::{CallError, GilPool};
use crate::py::target::{ResolveError, resolve_callable};

/// A server role's way to Python: its handler and where it runs.
#[derive(Clone)]
pub(crate) struct Dispatch {
    handler: Arc<Handler>,
    to: To,
}

#[derive(Clone)]
enum To {
    /// A hand-off to the GIL pool per message or batch.
    Pool(Arc<GilPool>),
    /// A direct call on this thread, the role's own, watched by the monitor.
    Inline(Arc<Watched>),
}

/// Requests read together: one (no allocation) or a pipelined batch.
pub(crate) enum Batch {
    /// One request.
    One(Bytes),
    /// Several, answered in order.
    Many(Vec<Bytes>),
}

impl Batch {
    /// Requests in the batch.
    pub(crate) fn len(&self) -> usize {
        match self {
            Batch::One(_) => 1,
            Batch::Many(v) => v.len(),
        }
    }

    /// Payload bytes in the batch.
    pub(crate) fn bytes(&self) -> usize {
        match self {
            Batch::One(b) => b.len(),
            Batch::Many(v) => v.iter().map(Bytes::len).sum(),
        }
    }
}

/// One reply: the handler's bytes, nothing, or why there is none.
pub(crate) type Reply = Result<Option<Bytes>, CallError>;

/// The replies to one batch, in request order.
pub(crate) enum Replies {
    /// The reply to a lone request.
    One(Reply),
    /// The replies to a batch.
    Many(Vec<Reply>),
}

impl Replies {
    /// How many requests these answer.
    pub(crate) fn len(&self) -> usize {
        match self {
            Replies::One(_) => 1,
            Replies::Many(v) => v.len(),
        }
    }
}

/// Replies framed in place: their payload bytes and the calls that raised.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Written {
    /// Reply payload bytes framed.
    pub(crate) bytes: usize,
    /// Calls that raised (logged by the handler), answered with nothing.
    pub(crate) errors: usize,
}

/// What [`Dispatch::submit`] did with a batch.
pub(crate) enum Submitted<F> {
    /// Answered already: the replies are in the write buffer.
    Written(Result<Written, FrameError>),
    /// The replies come when this future resolves.
    Later(F),
}

impl Dispatch {
    /// Calls go to `pool`.
    pub(crate) fn pool(handler: Arc<Handler>, pool: Arc<GilPool>) -> Self {
        Self {
            handler,
            to: To::Pool(pool),
        }
    }

    /// Calls run on the current thread, the role's own, as `watched` calls.
    pub(crate) fn inline(handler: Arc<Handler>, watched: Arc<Watched>) -> Self {
        Self {
            handler,
            to: To::Inline(watched),
        }
    }

    /// Hands `batch` to the handler. Inline, the replies are framed with
    /// `codec` into `out` before this returns; on the pool, a future brings
    /// them, unless the pool lets this thread make the call, which it may
    /// only when the connection has no earlier request in flight
    /// (`nothing_in_flight`): replies go out in request order.
    pub(crate) fn submit(
        &self,
        batch: Batch,
        ctx: &Arc<CallContext>,
        nothing_in_flight: bool,
        codec: &mut FrameCodec,
        out: &mut BytesMut,
    ) -> Submitted<impl Future<Output = Replies> + Send + 'static + use<>> {
        match &self.to {
            To::Inline(watched) => {
                Submitted::Written(self.answer_here(watched, batch, ctx, codec, out))
            }
            To::Pool(pool) => {
                // When a hand-off would not pay, the pool lets this I/O thread
                // make the call itself (see `py::pool::here`).
                let here = nothing_in_flight
                    .then(|| {
                        pool.here(&self.handler, batch.len() as u64, |py| {
                            self.frame_replies(py, &batch, ctx, codec, out)
                        })
                    })
                    .flatten();
                if let Some(written) = here {
                    if let Ok(w) = &written {
                        pool.count_raised(w.errors);
                    }
                    return Submitted::Written(written);
                }
                let (pool, handler, ctx) = (pool.clone(), self.handler.clone(), ctx.clone());
                Submitted::Later(async move {
                    match batch {
                        Batch::One(msg) => {
                            Replies::One(pool.call_with(&handler, msg, Some(ctx)).await)
                        }
                        Batch::Many(msgs) => {
                            Replies::Many(pool.call_batch(&handler, msgs, Some(ctx)).await)
                        }
                    }
                })
            }
        }
    }

    /// Calls the handler for each request on this thread and frames each
    /// reply straight from Python's bytes into `out`.
    fn answer_here(
        &self,
        watched: &Watched,
        batch: Batch,
        ctx: &CallContext,
        codec: &mut FrameCodec,
        out: &mut BytesMut,
    ) -> Result<Written, FrameError> {
        Python::attach(|py| watched.call(|| self.frame_replies(py, &batch, ctx, codec, out)))
    }

    /// The handler's replies to `batch`, called here and framed into `out`.
    fn frame_replies(
        &self,
        py: Python<'_>,
        batch: &Batch,
        ctx: &CallContext,
        codec: &mut FrameCodec,
        out: &mut BytesMut,
    ) -> Result<Written, FrameError> {
        let mut written = Written::default();
        let msgs = match batch {
            Batch::One(m) => std::slice::from_ref(m),
            Batch::Many(v) => &v[..],
        };
        for msg in msgs {
            let arg = crate::copy::py_bytes(py, msg).into_any();
            let framed = self.handler.call_here(py, arg, Some(ctx), |reply| {
                written.bytes += reply.len();
                codec.encode_slice(reply, out)
            });
            match framed {
                Ok(Some(result)) => result?,
                Ok(None) => {}
                Err(_) => written.errors += 1,
            }
        }
        Ok(written)
    }

    /// Runs `hook(conn_id, peer)` where this role's calls run; a failure is logged.
    pub(crate) async fn fire(&self, hook: &Hook, ctx: &CallContext) {
        let role = self.handler.role().clone();
        let call = {
            let (callable, ctx) = (hook.callable.clone(), ctx.clone());
            move |py: Python<'_>| {
                callable
                    .bind(py)
                    .call1((ctx.conn_id, ctx.peer.as_str()))
                    .map(|_| ())
                    .map_err(|e| format_exception(py, &e))
            }
        };
        let result = match &self.to {
            To::Pool(pool) => {
                let role = role.clone();
                pool.run(move |py| {
                    crate::py::output::set_thread_role(Some(&role));
                    call(py)
                })
                .await
            }
            To::Inline(watched) => Ok(Python::attach(|py| watched.call(|| call(py)))),
        };
        match result {
            Ok(Ok(())) => {}
            Ok(Err(tb)) => {
                tracing::error!(role = %role, hook = %hook.spec, "hook raised\n{}", tb.trim_end());
            }
            Err(e) => tracing::warn!(role = %role, hook = %hook.spec, "hook not run: {e}"),
        }
    }
}

/// A Python callable run for connection events: `f(conn_id, peer)`.
#[derive(Debug)]
pub struct Hook {
    spec: String,
    callable: Arc<Py<PyAny>>,
}

impl Hook {
    /// Resolves `spec` (`module:function`), named by setting `key`.
    ///
    /// # Errors
    /// [`ResolveError`] with Python's reason.
    pub fn resolve(py: Python<'_>, key: &str, spec: &str) -> Result<Self, ResolveError> {
        Ok(Self {
            spec: spec.to_string(),
            callable: Arc::new(resolve_callable(py, key, spec)?.unbind()),
        })
    }
}
