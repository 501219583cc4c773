//! The embedded `pyipcd` module. User code never needs it, but may use it:
//! `pyipcd.log(...)`, `pyipcd.stopping()` (so loops can end cleanly) and
//! `pyipcd.send(role, data)` (sends through a named role); that is all it
//! shows (`__all__`), matching the typed stand-in `python/pyipcd/` that users
//! install to test handlers outside the daemon. The Python-side runtime
//! (`runtime.py`: output redirection and helpers) lives in a private module,
//! `_pyipcd`.

use std::ffi::CString;
use std::sync::atomic::{AtomicBool, Ordering};

use pyo3::exceptions::{PyKeyError, PyRuntimeError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyTuple};
use tokio::sync::mpsc;

use super::output;

static STOPPING: AtomicBool = AtomicBool::new(false);

const RUNTIME_SOURCE: &str = include_str!("runtime.py");

/// Marks the daemon as stopping: `pyipcd.stopping()` returns `True` from now on.
pub fn set_stopping() {
    STOPPING.store(true, Ordering::SeqCst);
}

/// Whether shutdown has begun.
pub fn is_stopping() -> bool {
    STOPPING.load(Ordering::SeqCst)
}

/// The private runtime module `_pyipcd` (in `sys.modules` once [`install`] ran).
pub(crate) fn runtime(py: Python<'_>) -> PyResult<Bound<'_, PyModule>> {
    py.import(RUNTIME_MODULE)
}

const RUNTIME_MODULE: &str = "_pyipcd";

/// Creates the public `pyipcd` module and the private runtime module, runs
/// the runtime code, registers both in `sys.modules` (ahead of any installed
/// `pyipcd` stand-in) and redirects Python output into the log.
///
/// # Errors
/// Any Python error while doing so (a bug, not a user error).
pub(crate) fn install(py: Python<'_>, settings: &super::PySettings) -> PyResult<()> {
    let modules = py.import("sys")?.getattr("modules")?;
    let modules = modules.cast::<PyDict>()?;

    let rt = PyModule::new(py, RUNTIME_MODULE)?;
    rt.add_function(wrap_pyfunction!(_emit, &rt)?)?;
    rt.add_function(wrap_pyfunction!(_log_record, &rt)?)?;
    let code = CString::new(RUNTIME_SOURCE).expect("runtime.py has no NUL byte");
    py.run(&code, Some(&rt.dict()), None)?;
    modules.set_item(RUNTIME_MODULE, &rt)?;

    let m = PyModule::new(py, "pyipcd")?;
    m.add(
        "__doc__",
        "The host daemon's API for Python code it runs: log, stopping, send.",
    )?;
    m.add_function(wrap_pyfunction!(log, &m)?)?;
    m.add_function(wrap_pyfunction!(stopping, &m)?)?;
    m.add_function(wrap_pyfunction!(send, &m)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add("__all__", vec!["log", "send", "stopping"])?;
    modules.set_item("pyipcd", &m)?;

    rt.call_method1("_install", (settings.log_level, settings.max_output_line))?;
    Ok(())
}

/// `pyipcd.log(*args, level="info")`: one log line tagged with the caller's role.
#[pyfunction]
#[pyo3(signature = (*args, level = "info"))]
fn log(args: &Bound<'_, PyTuple>, level: &str) -> PyResult<()> {
    let mut line = String::new();
    for (i, a) in args.iter().enumerate() {
        if i > 0 {
            line.push(' ');
        }
        line.push_str(&a.str()?.to_cow()?);
    }
    let levelno = match level.to_ascii_lowercase().as_str() {
        "trace" => 5,
        "debug" => 10,
        "info" => 20,
        "warn" | "warning" => 30,
        "error" | "critical" => 40,
        other => {
            return Err(pyo3::exceptions::PyValueError::new_err(format!(
                "unknown level {other:?}; use debug, info, warning or error"
            )));
        }
    };
    let ctx = context_role(args.py());
    output::emit(levelno, "pyipcd.log", ctx.as_deref(), &line);
    Ok(())
}

/// `pyipcd.stopping()`: `True` once the daemon is shutting down.
#[pyfunction]
fn stopping() -> bool {
    is_stopping()
}

/// `pyipcd.send(role, data)`: queues `data` on the named role. Waits (without
/// holding the GIL) while that role's queue is full.
#[pyfunction]
fn send(py: Python<'_>, role: &str, data: &[u8]) -> PyResult<()> {
    let sender = crate::registry::registry().sender(role).map_err(|known| {
        PyKeyError::new_err(crate::workers::runs_elsewhere(role).unwrap_or_else(|| {
            format!("no role named {role:?} accepts pyipcd.send (roles that do: {known:?})")
        }))
    })?;
    let data = crate::copy::to_bytes(data);
    let on_io_thread = crate::py::pool::sending_from_io_thread();
    let sent = match sender.try_send(data) {
        Ok(()) => Ok(()),
        // A call the pool let an I/O thread make (its handler is never run
        // there again, see `py::pool::here`): waiting here could wait for
        // the very thread that drains the queue, so the message waits in a
        // task of its own instead.
        Err(mpsc::error::TrySendError::Full(data)) if on_io_thread => {
            match tokio::runtime::Handle::try_current() {
                Ok(rt) => {
                    rt.spawn(async move {
                        if sender.send(data).await.is_err() {
                            tracing::warn!(
                                "pyipcd.send: the role stopped before a queued message went out"
                            );
                        }
                    });
                    Ok(())
                }
                Err(_) => Err(()),
            }
        }
        // Not `blocking_send`: it panics on a thread that drives a tokio
        // runtime, which an inline server's own thread does.
        Err(mpsc::error::TrySendError::Full(data)) => py
            .detach(|| futures::executor::block_on(sender.send(data)))
            .map_err(|_| ()),
        Err(mpsc::error::TrySendError::Closed(_)) => Err(()),
    };
    sent.map_err(|()| PyRuntimeError::new_err(format!("role {role:?} has stopped")))
}

#[pyfunction]
#[pyo3(signature = (levelno, origin, role, line))]
fn _emit(levelno: u32, origin: &str, role: Option<&str>, line: &str) {
    output::emit(levelno, origin, role, line);
}

#[pyfunction]
#[pyo3(signature = (levelno, logger, role, msg))]
fn _log_record(levelno: u32, logger: &str, role: Option<&str>, msg: &str) {
    output::emit(levelno, logger, role, msg);
}

fn context_role(py: Python<'_>) -> Option<String> {
    runtime(py)
        .and_then(|m| m.getattr("_ROLE")?.call_method0("get")?.extract())
        .ok()
        .flatten()
}
