//! The file of a Unix socket a server binds: cleared before the bind (a
//! stale file a dead daemon left is removed; a live socket or a file that is
//! not a socket is refused), given its `mode`, `owner` and `group` before the
//! socket listens (so no one connects through looser permissions), and
//! removed when the last instance serving on it is gone.

use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::config::{Principal, TcpServerConfig};

/// Permissions of a socket file when `mode` is not set.
pub const DEFAULT_MODE: u32 = 0o600;

/// Why a socket path cannot be used as it is.
#[derive(Debug, thiserror::Error)]
pub enum PathTaken {
    /// Something accepts connections there.
    #[error(
        "{0} is a live socket: something accepts connections on it (another pyipcd?); stop it or choose another path"
    )]
    Live(PathBuf),
    /// A file that is not a socket.
    #[error("{0} exists and is not a socket ({1}); refusing to replace it")]
    NotASocket(PathBuf, &'static str),
    /// The check itself failed.
    #[error("{0}: {1}")]
    Io(PathBuf, io::Error),
}

/// What is at a socket path before a bind.
#[derive(Debug, PartialEq, Eq)]
pub enum Found {
    /// Nothing.
    Nothing,
    /// A socket file nothing accepts on (left by a dead process), with the
    /// device and inode it was found with.
    Stale {
        /// Device of the file probed.
        dev: u64,
        /// Inode of the file probed.
        ino: u64,
    },
}

/// Looks at `path` without changing anything.
///
/// # Errors
/// [`PathTaken`] when a bind there must be refused.
pub fn inspect(path: &Path) -> Result<Found, PathTaken> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Found::Nothing),
        Err(e) => return Err(PathTaken::Io(path.to_path_buf(), e)),
    };
    let kind = meta.file_type();
    if !kind.is_socket() {
        let what = if kind.is_dir() {
            "a directory"
        } else if kind.is_symlink() {
            "a symbolic link"
        } else if kind.is_file() {
            "a regular file"
        } else {
            "a special file"
        };
        return Err(PathTaken::NotASocket(path.to_path_buf(), what));
    }
    // A non-blocking connect: a live listener with a full backlog answers
    // EAGAIN at once instead of making us wait.
    let probe = socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::STREAM.cloexec(), None)
        .and_then(|s| {
            s.set_nonblocking(true)?;
            s.connect(&socket2::SockAddr::unix(path)?)
        });
    match probe {
        Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => Ok(Found::Stale {
            dev: meta.dev(),
            ino: meta.ino(),
        }),
        Ok(()) => Err(PathTaken::Live(path.to_path_buf())),
        Err(e) if matches!(e.raw_os_error(), Some(libc::EAGAIN | libc::EINPROGRESS)) => {
            Err(PathTaken::Live(path.to_path_buf()))
        }
        Err(e) => Err(PathTaken::Io(path.to_path_buf(), e)),
    }
}

/// Makes `path` free for a bind: removes a stale socket file (logged).
///
/// # Errors
/// [`PathTaken`] when the path is live, not a socket, or cannot be checked.
pub fn clear(path: &Path, role: &str) -> Result<(), PathTaken> {
    if let Found::Stale { dev, ino } = inspect(path)? {
        // The file probed, not one another process put there since.
        let now = std::fs::symlink_metadata(path)
            .ok()
            .map(|m| (m.dev(), m.ino()));
        if now != Some((dev, ino)) {
            return Err(PathTaken::Io(
                path.to_path_buf(),
                io::Error::other("replaced by another process while it was checked; try again"),
            ));
        }
        std::fs::remove_file(path).map_err(|e| PathTaken::Io(path.to_path_buf(), e))?;
        tracing::info!(role, path = %path.display(), "removed a stale socket file (nothing accepted on it)");
    }
    Ok(())
}

/// Numeric id of a user or group given by name or number.
///
/// # Errors
/// A message naming what is unknown.
pub fn resolve_id(p: &Principal, group: bool) -> Result<u32, String> {
    let name = match p {
        Principal::Id(id) => return Ok(*id),
        Principal::Name(n) => n,
    };
    let found = if group {
        nix::unistd::Group::from_name(name).map(|g| g.map(|g| g.gid.as_raw()))
    } else {
        nix::unistd::User::from_name(name).map(|u| u.map(|u| u.uid.as_raw()))
    };
    let kind = if group { "group" } else { "user" };
    match found {
        Ok(Some(id)) => Ok(id),
        Ok(None) => Err(format!("no {kind} named `{name}` on this host")),
        Err(e) => Err(format!("cannot look up {kind} `{name}`: {e}")),
    }
}

/// Gives the socket file its `mode` (default 0600), `owner` and `group`.
///
/// # Errors
/// If a name is unknown or the change is not permitted.
pub fn set_access(path: &Path, cfg: &TcpServerConfig) -> Result<(), String> {
    let mode = cfg.mode.map_or(DEFAULT_MODE, |m| m.0);
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| format!("cannot set mode {mode:04o} on {}: {e}", path.display()))?;
    if cfg.owner.is_some() || cfg.group.is_some() {
        let uid = cfg
            .owner
            .as_ref()
            .map(|o| resolve_id(o, false))
            .transpose()?;
        let gid = cfg
            .group
            .as_ref()
            .map(|g| resolve_id(g, true))
            .transpose()?;
        std::os::unix::fs::chown(path, uid, gid)
            .map_err(|e| format!("cannot change owner/group of {}: {e}", path.display()))?;
    }
    Ok(())
}

/// A bound socket file: removed on drop if it is still the one bound (a
/// file another process put at the path since is left alone). Shared by the
/// instances serving on it, so a reload that hands the socket over keeps it.
#[derive(Debug)]
pub struct SocketFile {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

impl SocketFile {
    /// Remembers the file just bound at `path`.
    ///
    /// # Errors
    /// If it cannot be read back.
    pub fn bound(path: &Path) -> io::Result<Self> {
        let meta = std::fs::symlink_metadata(path)?;
        Ok(Self {
            path: path.to_path_buf(),
            dev: meta.dev(),
            ino: meta.ino(),
        })
    }
}

impl SocketFile {
    /// Whether the file at its path is still the one bound.
    pub fn in_place(&self) -> bool {
        std::fs::symlink_metadata(&self.path)
            .is_ok_and(|m| m.dev() == self.dev && m.ino() == self.ino)
    }
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        if self.in_place()
            && let Err(e) = std::fs::remove_file(&self.path)
        {
            tracing::warn!(path = %self.path.display(), "cannot remove socket file: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_live_and_foreign_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        assert_eq!(inspect(&path).unwrap(), Found::Nothing);
        let live = std::os::unix::net::UnixListener::bind(&path).unwrap();
        assert!(matches!(inspect(&path), Err(PathTaken::Live(_))));
        drop(live); // the file stays: stale
        assert!(matches!(inspect(&path).unwrap(), Found::Stale { .. }));
        clear(&path, "t").unwrap();
        assert!(!path.exists());
        std::fs::write(&path, b"data").unwrap();
        assert!(matches!(
            inspect(&path),
            Err(PathTaken::NotASocket(_, "a regular file"))
        ));
    }

    #[test]
    fn removed_on_drop_only_if_still_ours() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let l = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let file = SocketFile::bound(&path).unwrap();
        drop(file);
        assert!(!path.exists());
        drop(l);
        let _l = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let file = SocketFile::bound(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        std::fs::write(&path, b"someone else's").unwrap();
        drop(file);
        assert!(path.exists());
    }
}
