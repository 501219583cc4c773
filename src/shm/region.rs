//! A file shared with other processes, the watch mode's region.
//!
//! It is read and written with `pread` / `pwrite`, not through a mapping of
//! our own: they see the same page cache as every other process's mapping
//! of the file, and a file that another process truncates (`open(path,
//! "wb")`) gives a short read instead of the `SIGBUS` a mapping past the end
//! of its file raises. A reader may see a write half done; the watch mode
//! accepts that (as the classic demo does) and reports whatever the next
//! poll sees.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

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

/// A shared file, of which the first `len` bytes are the region.
#[derive(Debug)]
pub struct ShmRegion {
    file: File,
    len: usize,
    path: PathBuf,
}

impl ShmRegion {
    /// Opens `path` read-write for a region of `len` bytes. With `create`,
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
        Ok(Self {
            file,
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

    /// Copies the whole region into `out` (resized to fit); returns how many
    /// of its bytes the file holds now. Bytes past the end of a file that was
    /// truncated read as zeros.
    ///
    /// # Errors
    /// What `pread` said.
    pub fn read_into(&self, out: &mut Vec<u8>) -> io::Result<usize> {
        out.resize(self.len, 0);
        let mut got = 0;
        while got < self.len {
            match self.file.read_at(&mut out[got..], got as u64) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        out[got..].fill(0);
        Ok(got)
    }

    /// Zeroes the region, then writes `value` at offset 0 (truncated to fit).
    /// A file that was truncated grows back to the region's size.
    ///
    /// # Errors
    /// What `pwrite` said.
    pub fn replace(&self, value: &[u8]) -> io::Result<()> {
        let mut whole = vec![0u8; self.len];
        let n = value.len().min(self.len);
        whole[..n].copy_from_slice(&value[..n]);
        self.file.write_all_at(&whole, 0)
    }

    /// Writes `value` at offset 0 without touching the bytes after it
    /// (truncated to the region).
    ///
    /// # Errors
    /// What `pwrite` said.
    pub fn write_at_start(&self, value: &[u8]) -> io::Result<()> {
        self.file
            .write_all_at(&value[..value.len().min(self.len)], 0)
    }
}
