//! Everything that touches the embedded CPython interpreter.
//!
//! (`src/py/` is the Rust side; the top-level `python/` folder holds the
//! project's Python modules. The different names keep the two apart.)
//!
//! - [`init`]: start the interpreter once (the installation or venv that
//!   [`interpreter`] chose), prepend `python.paths` to `sys.path`, install the
//!   `pyipcd` module and redirect Python output into the log.
//! - [`interpreter`]: which Python installation is embedded, set through `PyConfig`.
//! - [`pool`]: the GIL pool that runs handler calls for tokio tasks.
//! - [`handler`]: handlers, bytes conversion, exceptions as values.
//! - `asyncio`: the event loop thread for `async def` handlers.
//! - `task`: long-running tasks on their own threads.
//! - `module`: the embedded `pyipcd` module.
//! - [`monitor`]: the stuck-call monitor and the threads it watches.
//! - `lent`: memory lent to a handler for one call (zero-copy channel requests).

pub(crate) mod asyncio;
mod check;
pub mod handler;
pub mod interpreter;
pub(crate) mod lent;
pub(crate) mod module;
pub mod monitor;
pub(crate) mod output;
pub mod pool;
pub mod target;
pub(crate) mod task;

pub use check::check_targets;

use std::path::PathBuf;
use std::sync::OnceLock;

use pyo3::prelude::*;
use pyo3::types::PyList;

use interpreter::{InUse, Interpreter};

/// Interpreter-wide settings applied once by [`init`].
#[derive(Debug, Clone)]
pub struct PySettings {
    /// Which installation (or venv) to embed.
    pub interpreter: Interpreter,
    /// Root `logging` level (e.g. 20 for INFO).
    pub log_level: u32,
    /// Longest line of `print` output logged whole.
    pub max_output_line: usize,
}

impl Default for PySettings {
    fn default() -> Self {
        Self {
            interpreter: Interpreter::default(),
            log_level: 20,
            max_output_line: 64 * 1024,
        }
    }
}

static STARTED: OnceLock<Result<(), String>> = OnceLock::new();
static INSTALLED: OnceLock<Result<(), String>> = OnceLock::new();

/// Starts the interpreter (once per process), prepends `paths` to `sys.path`
/// (as `str`: Python ignores `pathlib` entries) and installs the `pyipcd`
/// module and log redirection. Calling it again only adds missing paths.
/// Returns what the running interpreter reports about itself.
///
/// The settings apply to the first call only.
///
/// # Errors
/// CPython's message if it cannot initialise; a Python error while setting up.
pub fn init(paths: &[PathBuf], settings: &PySettings) -> Result<InUse, crate::Error> {
    STARTED
        .get_or_init(|| settings.interpreter.start())
        .clone()
        .map_err(|e| {
            crate::Error::Interpreter(format!(
                "cannot start Python from {}: {e}",
                settings.interpreter
            ))
        })?;
    // Installed once, outside any GIL hold: a thread waiting here must not
    // hold the GIL that the installing thread needs.
    INSTALLED
        .get_or_init(|| {
            Python::attach(|py| module::install(py, settings)).map_err(|e| e.to_string())
        })
        .clone()
        .map_err(|e| crate::Error::Startup(format!("cannot set up the interpreter: {e}")))?;
    Python::attach(|py| -> PyResult<InUse> {
        let sys_path = py.import("sys")?.getattr("path")?;
        let sys_path = sys_path.cast::<PyList>()?;
        for p in paths.iter().rev() {
            let p = p.to_string_lossy();
            if !sys_path.contains(p.as_ref())? {
                sys_path.insert(0, p.as_ref())?;
            }
        }
        InUse::read(py)
    })
    .map_err(|e| crate::Error::Startup(format!("cannot set up sys.path: {e}")))
}

/// `threading.get_ident()` of the calling thread (for stack dumps and
/// `SystemExit` injection), if Python can tell.
pub(crate) fn thread_ident(py: Python<'_>) -> Option<u64> {
    py.import("threading")
        .and_then(|t| t.call_method0("get_ident"))
        .and_then(|i| i.extract::<u64>())
        .ok()
}
