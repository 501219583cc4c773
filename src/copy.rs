//! Payload copies that step around a `memcpy` cliff.
//!
//! glibc (before 2.39) copies 2,112 bytes or more (its default threshold)
//! with `rep movsb` on CPUs that advertise fast string moves, and on AMD Zen
//! 3/4 `rep movsb` runs about 25x slower when the destination lies 1 to 15
//! bytes past the source modulo 4 KiB (glibc bug 30994): a 16 KiB copy on
//! this project's VM (an AMD EPYC, glibc 2.36) takes 4.7-9.8 µs instead of
//! 0.26-0.44 µs. Which copies hit it depends on where the allocators placed
//! the two buffers, so a process can be stuck with it for its life: pyipcd's
//! 16 KiB echo ran at half speed in such processes, the request's copy into
//! Python's `bytes` taking a third of the I/O thread (see
//! docs/PERFORMANCE.md, "A `memcpy` cliff").
//!
//! Copies of a payload into or out of Python, into a connection's write
//! buffer and into a shared-memory ring go through here: when the two
//! addresses are in that window, the copy is made in pieces too short for
//! `rep movsb`. Copies outside the window are single `memcpy`s as before.

use bytes::{Bytes, BytesMut};
use pyo3::prelude::*;
use pyo3::types::PyBytes;

/// Copies no longer than this do not take the `rep movsb` path (glibc's
/// default threshold on x86-64 is 2 KiB or more; `GLIBC_TUNABLES` can lower it).
const PIECE: usize = 1024;

/// Whether copying from `src` to `dst` would fall into the slow window:
/// `dst` 1 to 63 bytes past `src` modulo 4 KiB (measured: 1 to 15; the
/// rest of a cache line is margin for other parts).
fn aliased(dst: usize, src: usize) -> bool {
    (1..64).contains(&(dst.wrapping_sub(src) & 4095))
}

/// How long each piece of a copy of `src` to address `dst` should be: all
/// of it, unless the copy would fall into the slow window. Never 0 (a
/// `chunks` size).
fn piece_len(dst: usize, src: &[u8]) -> usize {
    if src.len() > PIECE && aliased(dst, src.as_ptr() as usize) {
        PIECE
    } else {
        src.len().max(1)
    }
}

/// Appends `src` to `dst`.
pub(crate) fn extend(dst: &mut BytesMut, src: &[u8]) {
    dst.reserve(src.len());
    let n = piece_len(dst.as_ptr() as usize + dst.len(), src);
    for piece in src.chunks(n) {
        dst.extend_from_slice(piece);
    }
}

/// Copies `src` to `dst`, in pieces when in the slow window.
///
/// # Safety
/// `dst` must be valid for writes of `src.len()` bytes and not overlap `src`.
#[allow(unsafe_code)]
pub(crate) unsafe fn copy_to(dst: *mut u8, src: &[u8]) {
    let n = piece_len(dst as usize, src);
    for (i, piece) in src.chunks(n).enumerate() {
        // SAFETY: `i * n + piece.len() <= src.len()`, within what the caller vouches for.
        unsafe { std::ptr::copy_nonoverlapping(piece.as_ptr(), dst.add(i * n), piece.len()) }
    }
}

/// `src` as owned [`Bytes`].
pub(crate) fn to_bytes(src: &[u8]) -> Bytes {
    if src.len() <= PIECE {
        return Bytes::copy_from_slice(src);
    }
    let mut b = BytesMut::with_capacity(src.len());
    extend(&mut b, src);
    b.freeze()
}

/// `src` as a new Python `bytes`.
pub(crate) fn py_bytes<'py>(py: Python<'py>, src: &[u8]) -> Bound<'py, PyBytes> {
    if src.len() <= PIECE {
        return PyBytes::new(py, src);
    }
    new_py_bytes(py, src)
}

/// A new Python `bytes` holding `src` (longer than one byte), copied in
/// pieces when in the slow window: unlike `PyBytes::new_with`, its memory is
/// not zeroed first (a 16 KiB `memset` per message).
#[allow(unsafe_code)]
fn new_py_bytes<'py>(py: Python<'py>, src: &[u8]) -> Bound<'py, PyBytes> {
    assert!(src.len() > 1, "CPython shares its empty and one-byte bytes");
    let size = pyo3::ffi::Py_ssize_t::try_from(src.len()).expect("payload fits in Py_ssize_t");
    // SAFETY: with a null source CPython allocates a new bytes object of
    // `size` bytes (not a shared one: `size` > 1), uninitialised and seen by
    // no one else yet; we hold the GIL (`py`) and own the new reference. A
    // null return (out of memory) panics like pyo3's own constructors, via
    // `from_owned_ptr`. Every byte is written, through raw pointers only,
    // before the object is handed out: `data` holds `size` bytes.
    unsafe {
        let obj = pyo3::ffi::PyBytes_FromStringAndSize(std::ptr::null(), size);
        let obj = Bound::from_owned_ptr(py, obj).cast_into_unchecked::<PyBytes>();
        let data = pyo3::ffi::PyBytes_AsString(obj.as_ptr()).cast::<u8>();
        debug_assert!(!data.is_null());
        copy_to(data, src);
        obj
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A source of `len` bytes and 8 KiB to spare, and where in it a page starts.
    fn source(len: usize) -> (Vec<u8>, usize) {
        let src: Vec<u8> = (0..len + 8192).map(|i| (i * 7 + 3) as u8).collect();
        let s = 4096 - (src.as_ptr() as usize & 4095);
        (src, s)
    }

    #[test]
    fn the_window_is_one_to_sixty_three_bytes_past_the_source_in_its_page() {
        assert!(!aliased(8192, 8192));
        assert!(aliased(8193, 8192) && aliased(4096 + 63, 8192));
        assert!(!aliased(8192 + 64, 8192) && !aliased(8191, 8192));
        let src = vec![0u8; 4 * PIECE];
        let at = src.as_ptr() as usize;
        assert_eq!(piece_len(at + 4096 + 1, &src), PIECE, "in pieces");
        assert_eq!(piece_len(at + 4096 + 64, &src), src.len(), "in one");
        assert_eq!(
            piece_len(at + 1, &src[..PIECE - 1]),
            PIECE - 1,
            "short: in one"
        );
        assert_eq!(piece_len(at + 1, &[]), 1, "empty: a valid chunk size");
    }

    #[test]
    fn copies_are_exact_in_and_out_of_the_window() {
        for gap in [0, 1, 15, 63, 64, 2048] {
            for len in [0, 1, PIECE, PIECE + 1, 16 * 1024 + 5] {
                let (src, s) = source(len);
                // The buffer's end `gap` bytes past the source modulo 4 KiB.
                let mut buf = BytesMut::with_capacity(len + 8);
                buf.extend_from_slice(b"head");
                let end = buf.as_ptr() as usize + buf.len();
                let from = s
                    + (end
                        .wrapping_sub(gap)
                        .wrapping_sub(src.as_ptr() as usize + s)
                        & 4095);
                extend(&mut buf, &src[from..from + len]);
                assert_eq!(&buf[..4], b"head");
                assert_eq!(
                    buf[4..],
                    src[from..from + len],
                    "extend: gap {gap}, len {len}"
                );
                assert_eq!(to_bytes(&src[s..s + len])[..], src[s..s + len]);
            }
        }
    }

    #[test]
    fn python_bytes_hold_the_payload() {
        crate::py::init(&[], &Default::default()).unwrap();
        Python::attach(|py| {
            for len in [0, 5, PIECE + 1, 64 * 1024] {
                let src: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
                assert_eq!(py_bytes(py, &src).as_bytes(), &src[..], "len {len}");
            }
        });
    }
}
