//! A memory-mapped file shared with other processes.
//!
//! Another process may write the mapping at any time, so Rust never holds a
//! reference (`&[u8]`) into it: every access is a volatile copy through a raw
//! pointer ([`memmap2::MmapRaw`]). A reader may see a write half done; the
//! watch mode accepts that (as the classic demo does) and reports whatever
//! the next poll sees.

use std::fs::OpenOptions;
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use memmap2::MmapRaw;

/// Why a region cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ShmError {
    /// The file could not be opened, created, sized or mapped.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        source: io::Error,
    },
    /// The file is shorter than the configured size (and `create` is off).
    #[error("{path}: the file has {actual} bytes, the region needs {wanted}")]
    TooSmall {
        /// The file.
        path: PathBuf,
        /// Its length.
        actual: u64,
        /// The configured size.
        wanted: u64,
    },
}

/// A mapped file of a fixed size.
#[derive(Debug)]
pub struct ShmRegion {
    map: MmapRaw,
    len: usize,
    path: PathBuf,
}

impl ShmRegion {
    /// Opens `path` read-write and maps its first `len` bytes. With `create`,
    /// a missing file is created with mode 0600 and sized to `len` (zeros);
    /// an existing file shorter than `len` is an error either way.
    ///
    /// # Errors
    /// [`ShmError`] naming the file.
    pub fn open(path: &Path, len: usize, create: bool) -> Result<Self, ShmError> {
        let io_err = |source| ShmError::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(create)
            .mode(0o600)
            .open(path)
            .map_err(io_err)?;
        let actual = file.metadata().map_err(io_err)?.len();
        if actual == 0 && create {
            file.set_len(len as u64).map_err(io_err)?;
        } else if actual < len as u64 {
            return Err(ShmError::TooSmall {
                path: path.to_path_buf(),
                actual,
                wanted: len as u64,
            });
        }
        let map = memmap2::MmapOptions::new()
            .len(len)
            .map_raw(&file)
            .map_err(io_err)?;
        Ok(Self {
            map,
            len,
            path: path.to_path_buf(),
        })
    }

    /// The mapped length.
    pub fn len(&self) -> usize {
        self.len
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Copies the whole region into `out` (resized to fit).
    pub fn read_into(&self, out: &mut Vec<u8>) {
        out.resize(self.len, 0);
        let src = self.map.as_ptr();
        for (i, byte) in out.iter_mut().enumerate() {
            // SAFETY: `i < self.len`, and the mapping of `self.len` bytes lives
            // as long as `self`. The read is volatile because another process
            // may write the byte concurrently; a byte read cannot tear.
            *byte = unsafe { src.add(i).read_volatile() };
        }
    }

    /// Zeroes the region, then writes `value` at offset 0 (truncated to fit).
    pub fn replace(&self, value: &[u8]) {
        let dst = self.map.as_mut_ptr();
        for i in 0..self.len {
            let b = value.get(i).copied().unwrap_or(0);
            // SAFETY: `i < self.len` within the live mapping; volatile because
            // other processes read it concurrently.
            unsafe { dst.add(i).write_volatile(b) };
        }
    }

    /// Writes `value` at offset 0 without touching the bytes after it
    /// (truncated to the region).
    pub fn write_at_start(&self, value: &[u8]) {
        let dst = self.map.as_mut_ptr();
        for (i, b) in value.iter().take(self.len).enumerate() {
            // SAFETY: `i < self.len` within the live mapping; volatile because
            // other processes read it concurrently.
            unsafe { dst.add(i).write_volatile(*b) };
        }
    }
}
