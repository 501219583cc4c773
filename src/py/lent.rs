//! Memory lent to Python for the duration of one call, without a copy.
//!
//! The handler gets a read-only `memoryview` whose exporter is a [`Lent`]:
//! every buffer taken from it is counted. When the call is over the view is
//! released (using it then raises `ValueError`), the exporter refuses new
//! views (`BufferError`), and if the handler kept a derived view (a slice,
//! `numpy.frombuffer`, …), the lender waits until that is dropped before it
//! lets the memory be reused: a kept reference never reads reused memory.

use std::ffi::{c_int, c_void};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use pyo3::exceptions::PyBufferError;
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::types::PyMemoryView;

/// A read-only buffer over memory owned elsewhere, valid while `live`.
#[pyclass(module = "pyipcd", name = "LentBytes", frozen)]
pub(crate) struct Lent {
    ptr: usize,
    len: usize,
    live: AtomicBool,
    exports: AtomicUsize,
}

#[pymethods]
impl Lent {
    #[allow(unsafe_code)]
    unsafe fn __getbuffer__(
        slf: Bound<'_, Self>,
        view: *mut ffi::Py_buffer,
        flags: c_int,
    ) -> PyResult<()> {
        let this = slf.get();
        if !this.live.load(Ordering::Acquire) {
            // SAFETY: the caller's buffer struct; CPython wants obj NULL on failure.
            unsafe { (*view).obj = std::ptr::null_mut() };
            return Err(PyBufferError::new_err(
                "this memory was lent to the handler only for the duration of its call",
            ));
        }
        // SAFETY: `view` is the caller's buffer struct; ptr/len describe
        // memory that stays valid and unchanged while any export is counted
        // (the lender waits for the count to reach zero before reuse).
        // PyBuffer_FillInfo refuses writable requests (readonly = 1) and takes
        // a new reference to the exporter.
        let rc = unsafe {
            ffi::PyBuffer_FillInfo(
                view,
                slf.as_ptr(),
                this.ptr as *mut c_void,
                this.len as ffi::Py_ssize_t,
                1,
                flags,
            )
        };
        if rc != 0 {
            // SAFETY: as above.
            unsafe { (*view).obj = std::ptr::null_mut() };
            return Err(PyErr::fetch(slf.py()));
        }
        this.exports.fetch_add(1, Ordering::AcqRel);
        Ok(())
    }

    #[allow(unsafe_code)]
    unsafe fn __releasebuffer__(&self, _view: *mut ffi::Py_buffer) {
        self.exports.fetch_sub(1, Ordering::AcqRel);
    }
}

/// How a loan ended.
pub(crate) enum Returned<R> {
    /// Every view is gone: the memory may be reused.
    Free(R),
    /// `stop` was set while Python still held a view: the memory must stay
    /// mapped (the caller leaks it) for as long as the process lives.
    StillHeld(R),
}

/// Lends `bytes` to `call` as a read-only `memoryview`; when `call` returns
/// (or panics), revokes the loan and, if Python still holds a view of the
/// memory, waits (GIL released, with a warning) until it lets go or `stop`
/// is set.
///
/// # Errors
/// A Python error creating the view.
pub(crate) fn lend<'py, R>(
    py: Python<'py>,
    bytes: &[u8],
    role: &str,
    stop: &AtomicBool,
    call: impl FnOnce(&Bound<'py, PyAny>) -> R,
) -> PyResult<Returned<R>> {
    /// Revokes the loan however `call` ends, a panic included.
    struct Revoke<'a>(&'a AtomicBool);
    impl Drop for Revoke<'_> {
        fn drop(&mut self) {
            self.0.store(false, Ordering::Release);
        }
    }
    let lent = Bound::new(
        py,
        Lent {
            ptr: bytes.as_ptr() as usize,
            len: bytes.len(),
            live: AtomicBool::new(true),
            exports: AtomicUsize::new(0),
        },
    )?;
    let revoke = Revoke(&lent.get().live);
    let view = PyMemoryView::from(lent.as_any())?.into_any();
    let out = call(&view);
    drop(revoke);
    // A buffer taken from the view itself (numpy) makes release() fail;
    // the count below still sees it.
    let _ = view.call_method0("release");
    drop(view);
    let exports = || lent.get().exports.load(Ordering::Acquire);
    if exports() > 0 {
        tracing::warn!(
            role,
            "the handler kept a view of the request's memory past its call; \
             the channel waits until it is released (copy with bytes(data) to keep data)"
        );
        while exports() > 0 {
            if stop.load(Ordering::Relaxed) {
                return Ok(Returned::StillHeld(out));
            }
            py.detach(|| std::thread::sleep(Duration::from_millis(1)));
        }
    }
    Ok(Returned::Free(out))
}
