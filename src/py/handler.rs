//! Handlers: Python callables resolved once per role instance
//! ([`Handler::resolve`]) and called with `bytes`, returning `bytes | None`,
//! on a GIL pool thread (`Handler::invoke`, which schedules an `async def`
//! on the asyncio loop) or on a role's own thread (`Handler::call_here`).
//! Converts between Rust [`Bytes`] and Python objects and turns a Python
//! exception into a [`HandlerError`] carrying the formatted traceback.
//!
//! One handler (and, for `module:Class.method`, one class instance) serves a
//! role from several pool threads at once.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use pyo3::prelude::*;
use pyo3::types::{PyByteArray, PyBytes, PyMemoryView, PyString};
use pyo3_async_runtimes::TaskLocals;

use super::pool::{CallSpeed, Quota};
use super::target::{ResolveError, resolve_callable};

/// Why an `async def` cannot be the handler of a role that [`Runs::OnOwnThread`].
pub(crate) const ASYNC_ON_OWN_THREAD: &str = "is an async def, but this role calls its handler \
    on its own thread, which runs no asyncio loop: plain def handlers only (or \
    dispatch = \"pool\" for a tcp server)";

/// Where a role calls its handler, which decides what kind it may be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Runs {
    /// On the GIL pool: plain `def` and `async def` (on the asyncio loop).
    OnPool,
    /// On the role's own thread (inline TCP, shm channels): plain `def` only.
    OnOwnThread,
}

/// A resolved Python handler, shared by every caller of one role.
pub struct Handler {
    role: Arc<str>,
    target: String,
    callable: Py<PyAny>,
    is_async: bool,
    wants_peer: bool,
    wants_conn_id: bool,
    /// Whether its calls are fast enough to run on an I/O thread.
    pub(crate) speed: CallSpeed,
    /// Its role's share of the pool's threads (looked up on first pool call).
    pub(crate) quota: std::sync::OnceLock<Arc<Quota>>,
}

/// Where a message came from, passed to handlers that declare a `peer` or
/// `conn_id` parameter.
#[derive(Debug, Clone)]
pub struct CallContext {
    /// Connection number, unique per role for the daemon's life.
    pub conn_id: u64,
    /// The peer's address, `host:port`.
    pub peer: String,
}

/// What a handler returned or raised; `Ok(None)` means "no reply".
pub type HandlerResult = Result<Option<Bytes>, HandlerError>;

/// A Python exception (or an unusable return value) from a handler.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{role}: handler {target} failed: {summary}")]
pub struct HandlerError {
    /// The role whose handler failed.
    pub role: Arc<str>,
    /// The handler target (`module:function`).
    pub target: String,
    /// The last line of the traceback, e.g. `ValueError: bad input`.
    pub summary: String,
    /// The full formatted traceback.
    pub traceback: String,
}

/// A running `async def` handler: the pyo3-async-runtimes future plus the
/// handle that cancels its asyncio task.
pub(crate) struct PendingCall {
    pub(crate) future: Pin<Box<dyn Future<Output = PyResult<Py<PyAny>>> + Send>>,
    pub(crate) cancel: Py<PyAny>,
}

/// The immediate outcome of invoking a handler on a pool thread.
pub(crate) enum Invoked {
    /// A plain function returned (or raised).
    Done(HandlerResult),
    /// A coroutine was scheduled on the asyncio loop thread.
    Pending(PendingCall),
}

impl Handler {
    /// Resolves `spec`, named by setting `key`, as the handler of `role`
    /// (importing its module, instantiating `Class()` for `Class.method`).
    /// The one way every role gets its handler.
    ///
    /// # Errors
    /// [`ResolveError`]: a malformed or missing target, a Python exception
    /// while importing it, or an `async def` for a role that [`Runs::OnOwnThread`].
    pub fn resolve(
        py: Python<'_>,
        role: &str,
        key: &str,
        spec: &str,
        runs: Runs,
    ) -> Result<Self, ResolveError> {
        let callable = resolve_callable(py, key, spec)?;
        let handler = Self::from_callable(py, role, spec, callable)
            .map_err(|e| ResolveError::new(key, spec, format_exception(py, &e).trim_end()))?;
        if runs == Runs::OnOwnThread && handler.is_async {
            return Err(ResolveError::new(key, spec, ASYNC_ON_OWN_THREAD));
        }
        Ok(handler)
    }

    /// Wraps an already resolved callable; `label` is shown in logs.
    ///
    /// # Errors
    /// Only if `inspect` cannot be imported.
    pub fn from_callable(
        py: Python<'_>,
        role: &str,
        label: &str,
        callable: Bound<'_, PyAny>,
    ) -> PyResult<Self> {
        let is_async = is_async_def(&callable)?;
        let (wants_peer, wants_conn_id): (bool, bool) = super::module::runtime(py)?
            .call_method1("_wants_context", (&callable,))?
            .extract()?;
        Ok(Self {
            role: Arc::from(role),
            target: label.to_string(),
            callable: callable.unbind(),
            is_async,
            wants_peer,
            wants_conn_id,
            speed: CallSpeed::default(),
            quota: std::sync::OnceLock::new(),
        })
    }

    /// The role this handler serves.
    pub fn role(&self) -> &Arc<str> {
        &self.role
    }

    /// The target it was resolved from.
    pub fn target(&self) -> &str {
        &self.target
    }

    /// Whether it is an `async def`.
    pub fn is_async(&self) -> bool {
        self.is_async
    }

    /// Calls the handler with `payload` as `bytes`. A coroutine is handed to
    /// the asyncio loop described by `locals`.
    pub(crate) fn invoke(
        &self,
        py: Python<'_>,
        payload: &[u8],
        ctx: Option<&CallContext>,
        locals: Option<&TaskLocals>,
    ) -> Invoked {
        let result = match self.call_raw(py, crate::copy::py_bytes(py, payload).into_any(), ctx) {
            Ok(r) => r,
            Err(e) => return Invoked::Done(Err(self.error(py, &e))),
        };
        if !self.is_async {
            return Invoked::Done(self.reply(py, &result));
        }
        match locals.map(|l| schedule(py, l, &self.role, result)) {
            Some(Ok(pending)) => Invoked::Pending(pending),
            Some(Err(e)) => Invoked::Done(Err(self.error(py, &e))),
            None => Invoked::Done(Err(self.failure(
                "RuntimeError: no asyncio loop is running for async handlers".into(),
            ))),
        }
    }

    /// Calls a plain `def` handler right here, on the calling thread, with
    /// `arg` and hands its reply's bytes to `use_reply` while they are still
    /// Python's (no copy). An `async def` handler is an error: there is no
    /// asyncio loop here.
    pub(crate) fn call_here<'py, R>(
        &self,
        py: Python<'py>,
        arg: Bound<'py, PyAny>,
        ctx: Option<&CallContext>,
        use_reply: impl FnOnce(&[u8]) -> R,
    ) -> Result<Option<R>, HandlerError> {
        let obj = self.call_with(py, arg, ctx)?;
        with_reply_bytes(&obj, use_reply).map_err(|e| self.error(py, &e))
    }

    /// Calls a plain `def` handler right here with `arg` (not necessarily
    /// `bytes`), returning what it returned.
    pub(crate) fn call_with<'py>(
        &self,
        py: Python<'py>,
        arg: Bound<'py, PyAny>,
        ctx: Option<&CallContext>,
    ) -> Result<Bound<'py, PyAny>, HandlerError> {
        if self.is_async {
            return Err(
                self.failure("RuntimeError: an async handler cannot run on this thread".into())
            );
        }
        self.call_raw(py, arg, ctx).map_err(|e| self.error(py, &e))
    }

    /// `handler(payload)`, with `peer`/`conn_id` keywords if it declares them.
    fn call_raw<'py>(
        &self,
        py: Python<'py>,
        arg: Bound<'py, PyAny>,
        ctx: Option<&CallContext>,
    ) -> PyResult<Bound<'py, PyAny>> {
        match ctx {
            Some(ctx) if self.wants_peer || self.wants_conn_id => {
                self.call_with_context(py, arg, ctx)
            }
            _ => self.callable.bind(py).call1((arg,)),
        }
    }

    fn call_with_context<'py>(
        &self,
        py: Python<'py>,
        arg: Bound<'py, PyAny>,
        ctx: &CallContext,
    ) -> PyResult<Bound<'py, PyAny>> {
        let kwargs = pyo3::types::PyDict::new(py);
        if self.wants_peer {
            kwargs.set_item("peer", &ctx.peer)?;
        }
        if self.wants_conn_id {
            kwargs.set_item("conn_id", ctx.conn_id)?;
        }
        self.callable.bind(py).call((arg,), Some(&kwargs))
    }

    /// Converts a return value into a reply, or an error for unusable types.
    pub(crate) fn reply(&self, py: Python<'_>, obj: &Bound<'_, PyAny>) -> HandlerResult {
        to_bytes(obj).map_err(|e| self.error(py, &e))
    }

    /// Formats `err` (with traceback) as this handler's error and logs it once.
    pub(crate) fn error(&self, py: Python<'_>, err: &PyErr) -> HandlerError {
        let traceback = format_exception(py, err);
        let summary = traceback
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("exception")
            .to_string();
        tracing::error!(role = %self.role, handler = %self.target, "handler raised {summary}\n{}", traceback.trim_end());
        HandlerError {
            role: self.role.clone(),
            target: self.target.clone(),
            summary,
            traceback,
        }
    }

    fn failure(&self, summary: String) -> HandlerError {
        tracing::error!(role = %self.role, handler = %self.target, "{summary}");
        HandlerError {
            role: self.role.clone(),
            target: self.target.clone(),
            traceback: summary.clone(),
            summary,
        }
    }
}

impl fmt::Debug for Handler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Handler")
            .field("role", &self.role)
            .field("target", &self.target)
            .field("is_async", &self.is_async)
            .finish()
    }
}

/// `bytes`, `bytearray`, `memoryview` and `str` (UTF-8) become a reply; `None` is no reply.
/// Whether `obj` is an `async def` (calling it returns a coroutine).
///
/// # Errors
/// Only if `inspect` cannot be imported.
pub(crate) fn is_async_def(obj: &Bound<'_, PyAny>) -> PyResult<bool> {
    obj.py()
        .import("inspect")?
        .call_method1("iscoroutinefunction", (obj,))?
        .is_truthy()
}

pub(crate) fn to_bytes(obj: &Bound<'_, PyAny>) -> PyResult<Option<Bytes>> {
    with_reply_bytes(obj, crate::copy::to_bytes)
}

/// Hands the bytes of a handler's return value to `f` (`None` for `None`);
/// `bytes` and `str` are lent without a copy.
///
/// # Errors
/// A `TypeError` for any other type.
pub(crate) fn with_reply_bytes<R>(
    obj: &Bound<'_, PyAny>,
    f: impl FnOnce(&[u8]) -> R,
) -> PyResult<Option<R>> {
    if obj.is_none() {
        Ok(None)
    } else if let Ok(b) = obj.cast::<PyBytes>() {
        Ok(Some(f(b.as_bytes())))
    } else if let Ok(b) = obj.cast::<PyByteArray>() {
        Ok(Some(f(&b.to_vec())))
    } else if let Ok(s) = obj.cast::<PyString>() {
        Ok(Some(f(s.to_str()?.as_bytes())))
    } else if obj.cast::<PyMemoryView>().is_ok() {
        let b = obj.call_method0("tobytes")?;
        Ok(Some(f(b.cast::<PyBytes>()?.as_bytes())))
    } else {
        Err(pyo3::exceptions::PyTypeError::new_err(format!(
            "handler must return bytes, bytearray, memoryview, str or None, not {}",
            obj.get_type().name()?
        )))
    }
}

/// The traceback of `err` as Python prints it.
pub(crate) fn format_exception(py: Python<'_>, err: &PyErr) -> String {
    let formatted = py.import("traceback").and_then(|tb| {
        let lines = tb.call_method1(
            "format_exception",
            (err.get_type(py), err.value(py), err.traceback(py)),
        )?;
        PyString::new(py, "")
            .call_method1("join", (lines,))?
            .extract::<String>()
    });
    formatted.unwrap_or_else(|_| err.to_string())
}

/// Wraps the coroutine so it runs tagged with its role and can be cancelled,
/// then schedules it on the loop through pyo3-async-runtimes.
fn schedule(
    py: Python<'_>,
    locals: &TaskLocals,
    role: &str,
    coro: Bound<'_, PyAny>,
) -> PyResult<PendingCall> {
    let runtime = super::module::runtime(py)?;
    let cancel = runtime.getattr("_CancelHandle")?.call0()?;
    let wrapped = runtime.call_method1("_run_as", (role, coro, &cancel))?;
    let future = pyo3_async_runtimes::into_future_with_locals(locals, wrapped)?;
    Ok(PendingCall {
        future: Box::pin(future),
        cancel: cancel.unbind(),
    })
}
