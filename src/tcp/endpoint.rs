//! Where a role listens or connects, as written in the config:
//! `host:port` (TCP; `:port` and `port` mean 127.0.0.1), `unix:/path` or
//! `unix:@name` (a Unix stream socket: a file, or a Linux abstract name),
//! and for servers `systemd:NAME` (a listening socket systemd passed, matched
//! by its `FileDescriptorName=`).

use std::fmt;
use std::net::SocketAddr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// Bytes in `sockaddr_un.sun_path`: a path needs one more for its NUL.
const SUN_PATH: usize = 108;

/// A Unix stream socket address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UnixAddr {
    /// A socket file.
    Path(PathBuf),
    /// A Linux abstract name (no file; gone when its last socket closes).
    Abstract(String),
}

/// Where a server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listen {
    /// A TCP address.
    Tcp(SocketAddr),
    /// A Unix stream socket.
    Unix(UnixAddr),
    /// A socket passed by systemd, by its `FileDescriptorName=`.
    Activated(String),
}

/// Where a client connects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Connect {
    /// `host:port` (the host may be a name).
    Tcp(String),
    /// A Unix stream socket.
    Unix(UnixAddr),
}

impl UnixAddr {
    fn parse(rest: &str, whole: &str) -> Result<Self, String> {
        if let Some(name) = rest.strip_prefix('@') {
            if name.is_empty() || name.len() >= SUN_PATH {
                return Err(format!(
                    "`{whole}`: an abstract name needs 1 to {} bytes",
                    SUN_PATH - 1
                ));
            }
            return Ok(UnixAddr::Abstract(name.to_string()));
        }
        if rest.is_empty() {
            return Err(format!(
                "`{whole}`: give a path, like unix:/run/pyipcd/echo.sock"
            ));
        }
        if rest.len() >= SUN_PATH {
            return Err(format!(
                "`{whole}`: a socket path must be shorter than {SUN_PATH} bytes (a kernel limit)"
            ));
        }
        Ok(UnixAddr::Path(PathBuf::from(rest)))
    }

    /// The address as socket2 takes it (an abstract name starts with a NUL).
    ///
    /// # Errors
    /// If it is too long (checked when parsed; a relative path made absolute may grow).
    pub fn sock_addr(&self) -> std::io::Result<socket2::SockAddr> {
        match self {
            UnixAddr::Path(p) => socket2::SockAddr::unix(p),
            UnixAddr::Abstract(name) => {
                let mut bytes = vec![0u8];
                bytes.extend_from_slice(name.as_bytes());
                socket2::SockAddr::unix(std::ffi::OsStr::from_bytes(&bytes))
            }
        }
    }
}

impl fmt::Display for UnixAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UnixAddr::Path(p) => write!(f, "unix:{}", p.display()),
            UnixAddr::Abstract(n) => write!(f, "unix:@{n}"),
        }
    }
}

impl Listen {
    /// Parses a `listen` value.
    ///
    /// # Errors
    /// A message saying what is wrong with `s`.
    pub fn parse(s: &str) -> Result<Self, String> {
        if let Some(rest) = s.strip_prefix("unix:") {
            return UnixAddr::parse(rest, s).map(Listen::Unix);
        }
        if let Some(name) = s.strip_prefix("systemd:") {
            let ok = !name.is_empty()
                && name.len() <= 255
                && name.bytes().all(|b| b.is_ascii_graphic() && b != b':');
            return if ok {
                Ok(Listen::Activated(name.to_string()))
            } else {
                Err(format!(
                    "`{s}`: after systemd: give the socket's FileDescriptorName= (printable ASCII, no `:`)"
                ))
            };
        }
        super::parse_listen(s).map(Listen::Tcp)
    }
}

impl fmt::Display for Listen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Listen::Tcp(a) => write!(f, "{a}"),
            Listen::Unix(u) => write!(f, "{u}"),
            Listen::Activated(n) => write!(f, "systemd:{n}"),
        }
    }
}

impl Connect {
    /// Parses a `connect` value.
    ///
    /// # Errors
    /// A message saying what is wrong with `s`.
    pub fn parse(s: &str) -> Result<Self, String> {
        if let Some(rest) = s.strip_prefix("unix:") {
            return UnixAddr::parse(rest, s).map(Connect::Unix);
        }
        match s.rsplit_once(':') {
            Some((h, p)) if !h.is_empty() && p.parse::<u16>().is_ok() => {
                Ok(Connect::Tcp(s.to_string()))
            }
            _ => Err(format!("`{s}` is not host:port, unix:/path or unix:@name")),
        }
    }
}

impl fmt::Display for Connect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Connect::Tcp(a) => f.write_str(a),
            Connect::Unix(u) => write!(f, "{u}"),
        }
    }
}

/// `value` with a relative `unix:` path made absolute against `base` (the
/// config file's folder, like every other path in it); other values as they are.
pub fn anchor(value: &str, base: &Path) -> String {
    match value.strip_prefix("unix:") {
        Some(rest) if !rest.is_empty() && !rest.starts_with('@') && !rest.starts_with('/') => {
            let joined = base.join(rest);
            format!(
                "unix:{}",
                std::path::absolute(&joined).unwrap_or(joined).display()
            )
        }
        _ => value.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_forms() {
        assert_eq!(
            Listen::parse("unix:/run/x.sock").unwrap(),
            Listen::Unix(UnixAddr::Path("/run/x.sock".into()))
        );
        assert_eq!(
            Listen::parse("unix:@pyipcd").unwrap(),
            Listen::Unix(UnixAddr::Abstract("pyipcd".into()))
        );
        assert_eq!(
            Listen::parse("systemd:echo").unwrap(),
            Listen::Activated("echo".into())
        );
        assert_eq!(Listen::parse("5000").unwrap().to_string(), "127.0.0.1:5000");
        assert_eq!(
            Listen::parse("unix:@a").unwrap().to_string(),
            "unix:@a".to_string()
        );
        for bad in ["unix:", "unix:@", "systemd:", "systemd:a:b", "nope"] {
            assert!(Listen::parse(bad).is_err(), "{bad}");
        }
        let long = format!("unix:/{}", "x".repeat(120));
        assert!(
            Listen::parse(&long)
                .unwrap_err()
                .contains("shorter than 108")
        );
    }

    #[test]
    fn connect_forms() {
        assert_eq!(
            Connect::parse("localhost:80").unwrap(),
            Connect::Tcp("localhost:80".into())
        );
        assert_eq!(
            Connect::parse("unix:@x").unwrap(),
            Connect::Unix(UnixAddr::Abstract("x".into()))
        );
        assert!(Connect::parse("80").is_err());
        assert!(Connect::parse("systemd:x").is_err());
    }

    #[test]
    fn relative_unix_paths_are_anchored() {
        let base = Path::new("/etc/pyipcd");
        assert_eq!(
            anchor("unix:run/e.sock", base),
            "unix:/etc/pyipcd/run/e.sock"
        );
        assert_eq!(anchor("unix:/abs", base), "unix:/abs");
        assert_eq!(anchor("unix:@n", base), "unix:@n");
        assert_eq!(anchor("127.0.0.1:1", base), "127.0.0.1:1");
    }
}
