//! Starting CPython from an [`Interpreter`] choice through `PyConfig`: the
//! only unsafe code of the interpreter's set-up.

use std::path::Path;

use super::{Interpreter, built};

impl Interpreter {
    /// Starts the interpreter from this choice (once per process; pyo3's own
    /// `Python::initialize` then finds it running and does nothing) and
    /// releases the GIL, as pyo3 would.
    ///
    /// # Errors
    /// CPython's own message if it cannot initialise.
    #[allow(unsafe_code)]
    pub(crate) fn start(&self) -> Result<(), String> {
        use pyo3::ffi;
        use std::mem::MaybeUninit;

        let strings = [
            c_path(&self.executable)?,
            c_path(&self.base_executable)?,
            c_path(&self.home)?,
            c_path(Path::new(built::PLATLIBDIR))?,
        ];
        // SAFETY: the pre-config and config are initialised by CPython's own
        // Init functions before any field is read or written; strings are
        // copied by PyConfig_SetBytesString from NUL-terminated buffers that
        // outlive the calls; the config is cleared once, after use. The
        // caller guarantees this runs once; an interpreter someone else
        // started (a program embedding the library) is left as it is.
        unsafe {
            if ffi::Py_IsInitialized() != 0 {
                return Ok(());
            }
            let mut pre = MaybeUninit::<ffi::PyPreConfig>::uninit();
            ffi::PyPreConfig_InitPythonConfig(pre.as_mut_ptr());
            let pre = pre.as_mut_ptr();
            // Read the locale but never rewrite LC_CTYPE in the process
            // environment: tokio threads are already running.
            (*pre).coerce_c_locale = 0;
            (*pre).coerce_c_locale_warn = 0;
            (*pre).parse_argv = 0;
            status(ffi::Py_PreInitialize(pre))?;

            let mut config = MaybeUninit::<ffi::PyConfig>::uninit();
            ffi::PyConfig_InitPythonConfig(config.as_mut_ptr());
            let config = config.as_mut_ptr();
            (*config).parse_argv = 0;
            (*config).install_signal_handlers = 0; // tokio owns the signals
            (*config).configure_c_stdio = 0;
            (*config).use_frozen_modules = i32::from(self.uses_build_stdlib());
            let fields = [
                &raw mut (*config).executable,
                &raw mut (*config).base_executable,
                &raw mut (*config).home,
                &raw mut (*config).platlibdir, // not PYTHONPLATLIBDIR
            ];
            let result = fields
                .into_iter()
                .zip(&strings)
                .try_for_each(|(field, value)| {
                    status(ffi::PyConfig_SetBytesString(config, field, value.as_ptr()))
                })
                .and_then(|()| status(ffi::Py_InitializeFromConfig(config)));
            ffi::PyConfig_Clear(config);
            result?;
            ffi::PyEval_SaveThread();
        }
        Ok(())
    }
}

fn c_path(p: &Path) -> Result<std::ffi::CString, String> {
    use std::os::unix::ffi::OsStrExt;
    std::ffi::CString::new(p.as_os_str().as_bytes())
        .map_err(|_| format!("{} contains a NUL byte", p.display()))
}

/// A `PyStatus` as a `Result` carrying CPython's message.
#[allow(unsafe_code)]
fn status(s: pyo3::ffi::PyStatus) -> Result<(), String> {
    // SAFETY: `s` was returned by CPython; err_msg and func are NULL or
    // static NUL-terminated strings.
    unsafe {
        if pyo3::ffi::PyStatus_Exception(s) == 0 {
            return Ok(());
        }
        let text = |p: *const std::ffi::c_char| {
            (!p.is_null()).then(|| std::ffi::CStr::from_ptr(p).to_string_lossy().into_owned())
        };
        Err(match (text(s.func), text(s.err_msg)) {
            (Some(func), Some(msg)) => format!("{func}: {msg}"),
            (None, Some(msg)) => msg,
            _ => format!("Python asked to exit with status {}", s.exitcode),
        })
    }
}
