//! A server's listening socket, of any kind its `listen` names: bound here
//! (TCP, a Unix socket file with its permissions, an abstract name), taken
//! from systemd, or handed over by the instance a reload replaces. Kept as a
//! plain descriptor until it serves, so it can move to the runtime (or the
//! role's own thread) that accepts on it.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;

use futures::FutureExt;
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};

use super::endpoint::{Listen, UnixAddr};
use super::socket_file::{self, PathTaken, SocketFile};
use super::stream::Peer;
use crate::config::{DEFAULT_BACKLOG, TcpServerConfig};

/// Why a server cannot listen.
#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    /// The socket path is live or not a socket (a configuration error).
    #[error(transparent)]
    Taken(#[from] PathTaken),
    /// The socket systemd should have passed is missing or unusable, or the
    /// socket file's owner or group is unknown (a configuration error).
    #[error("{0}")]
    Config(String),
    /// The operating system refused (address in use, no permission…).
    #[error("{0}")]
    Io(#[from] io::Error),
}

impl ListenError {
    /// Whether a corrected config (not a retry) is what fixes it: exit 78.
    pub fn is_config(&self) -> bool {
        !matches!(
            self,
            ListenError::Io(_) | ListenError::Taken(PathTaken::Io(..))
        )
    }

    /// The daemon's error for server `name` that cannot listen on `listen`:
    /// [`crate::Error::Listen`] (exit 78) when the config must change.
    pub(crate) fn for_role(self, name: &str, listen: &str) -> crate::Error {
        let why = format!("tcp server `{name}` cannot listen on {listen}: {self}");
        if self.is_config() {
            crate::Error::Listen(why)
        } else {
            crate::Error::Startup(why)
        }
    }
}

/// A listening socket not yet serving, and its socket file if it has one.
#[derive(Debug)]
pub(crate) struct ListenSocket {
    fd: OwnedFd,
    unix: bool,
    file: Option<Arc<SocketFile>>,
    activated: bool,
}

impl ListenSocket {
    /// Listens as `cfg` says: on `handover` (the socket of the instance this
    /// one replaces) when given, else on a socket bound or taken now.
    ///
    /// # Errors
    /// [`ListenError`]; a socket file already bound is removed again.
    pub(crate) fn open(
        cfg: &TcpServerConfig,
        handover: Option<ListenSocket>,
    ) -> Result<Self, ListenError> {
        let listen = Listen::parse(&cfg.listen).map_err(ListenError::Config)?;
        if handover.is_none() && crate::workers::this_worker().is_some() {
            return Self::from_supervisor(cfg, &listen);
        }
        let backlog = backlog(cfg);
        let (socket, unix, file, activated) = match (handover, &listen) {
            (Some(old), _) => {
                // Only on the file still bound (not one put there since).
                if let (Some(file), Listen::Unix(UnixAddr::Path(p))) = (&old.file, &listen)
                    && file.in_place()
                {
                    socket_file::set_access(p, cfg).map_err(ListenError::Config)?;
                }
                (
                    socket2::Socket::from(old.fd),
                    old.unix,
                    old.file,
                    old.activated,
                )
            }
            (None, Listen::Tcp(addr)) => {
                let socket = socket2::Socket::new(
                    socket2::Domain::for_address(*addr),
                    socket2::Type::STREAM.cloexec(),
                    None,
                )?;
                socket.set_reuse_address(true)?;
                socket.bind(&(*addr).into())?;
                (socket, false, None, false)
            }
            (None, Listen::Unix(addr)) => {
                if let UnixAddr::Path(p) = addr {
                    socket_file::clear(p, &cfg.name)?;
                }
                let socket = socket2::Socket::new(
                    socket2::Domain::UNIX,
                    socket2::Type::STREAM.cloexec(),
                    None,
                )?;
                warn_if_ids_are_remapped(cfg);
                socket
                    .bind(&addr.sock_addr()?)
                    .map_err(|e| unix_bind_error(addr, e))?;
                let file = match addr {
                    UnixAddr::Path(p) => {
                        let file = Arc::new(SocketFile::bound(p)?);
                        // Before `listen`: until then no one can connect.
                        socket_file::set_access(p, cfg).map_err(ListenError::Config)?;
                        Some(file)
                    }
                    UnixAddr::Abstract(_) => None,
                };
                (socket, true, file, false)
            }
            (None, Listen::Activated(name)) => {
                let socket = socket2::Socket::from(
                    crate::systemd::activated(name).map_err(ListenError::Config)?,
                );
                let unix = check_activated(&socket, name, cfg)?;
                if unix {
                    warn_if_ids_are_remapped(cfg);
                }
                (socket, unix, None, true)
            }
        };
        // systemd's own Backlog= stands for an activated socket; on a
        // handed-over one this only sets the (maybe new) backlog.
        if !activated {
            socket.listen(backlog)?;
        }
        socket.set_nonblocking(true)?;
        Ok(Self {
            fd: socket.into(),
            unix,
            file,
            activated,
        })
    }

    /// A worker's socket for `cfg`: the one its supervisor bound (and
    /// keeps, with its socket file), checked against `listen` in case the
    /// config file changed between the supervisor's reading and the worker's.
    fn from_supervisor(cfg: &TcpServerConfig, listen: &Listen) -> Result<Self, ListenError> {
        let name = crate::workers::socket_name(&cfg.name);
        let socket = socket2::Socket::from(crate::systemd::activated(&name).map_err(|e| {
            ListenError::Config(format!("the supervisor passed no socket for it ({e})"))
        })?);
        let local = socket.local_addr()?;
        let same = match listen {
            Listen::Tcp(want) => local.as_socket().is_some_and(|got| {
                got.ip() == want.ip() && (want.port() == 0 || got.port() == want.port())
            }),
            Listen::Unix(UnixAddr::Path(p)) => local.as_pathname() == Some(p.as_path()),
            Listen::Unix(UnixAddr::Abstract(n)) => {
                local.as_abstract_namespace() == Some(n.as_bytes())
            }
            Listen::Activated(_) => true,
        };
        let this = Self {
            fd: socket.into(),
            unix: local.as_socket().is_none(),
            file: None,
            activated: true,
        };
        if !same {
            return Err(ListenError::Config(format!(
                "the supervisor listens on {} for it: the config file changed after the supervisor read it (reload the supervisor instead)",
                this.describe()
            )));
        }
        socket2::SockRef::from(&this.fd.as_fd()).set_nonblocking(true)?;
        Ok(this)
    }

    /// The descriptor, for handing to a worker process.
    pub(crate) fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// A duplicate, for the instance that replaces this one.
    ///
    /// # Errors
    /// If the descriptor cannot be duplicated (out of descriptors).
    pub(crate) fn try_clone(&self) -> io::Result<Self> {
        Ok(Self {
            fd: self.fd.try_clone()?,
            unix: self.unix,
            file: self.file.clone(),
            activated: self.activated,
        })
    }

    /// The TCP address it is bound to (none for a Unix socket).
    pub(crate) fn tcp_addr(&self) -> Option<SocketAddr> {
        if self.unix {
            return None;
        }
        socket2::SockRef::from(&self.fd.as_fd())
            .local_addr()
            .ok()
            .and_then(|a| a.as_socket())
    }

    /// What it listens on, for the log: `127.0.0.1:5000`, `unix:/path`, `unix:@name`.
    pub(crate) fn describe(&self) -> String {
        let Ok(a) = socket2::SockRef::from(&self.fd.as_fd()).local_addr() else {
            return "?".into();
        };
        if let Some(ip) = a.as_socket() {
            ip.to_string()
        } else if let Some(p) = a.as_pathname() {
            format!("unix:{}", p.display())
        } else if let Some(n) = a.as_abstract_namespace() {
            format!("unix:@{}", String::from_utf8_lossy(n))
        } else {
            "unix:?".into()
        }
    }

    /// Registers with the current tokio runtime.
    ///
    /// # Errors
    /// If there is no runtime, or registering fails.
    pub(crate) fn into_listener(self) -> io::Result<Listener> {
        let inner = if self.unix {
            Inner::Unix(UnixListener::from_std(self.fd.into())?)
        } else {
            Inner::Tcp(TcpListener::from_std(self.fd.into())?)
        };
        Ok(Listener {
            inner,
            _file: self.file,
        })
    }
}

/// What a failed bind of `addr` means: a name in use or a missing folder is
/// fixed by the config, not by a retry (exit 78). `pyipcd check` says the same.
pub(crate) fn unix_bind_error(addr: &UnixAddr, e: io::Error) -> ListenError {
    match (e.kind(), addr) {
        (io::ErrorKind::AddrInUse, UnixAddr::Abstract(_)) => ListenError::Config(format!(
            "{addr} is in use: something else listens on that abstract name (another pyipcd?)"
        )),
        (io::ErrorKind::NotFound, UnixAddr::Path(p)) => ListenError::Config(format!(
            "cannot bind {addr}: the folder {} does not exist",
            p.parent().unwrap_or(p).display()
        )),
        _ => ListenError::Io(io::Error::new(e.kind(), format!("cannot bind {addr}: {e}"))),
    }
}

/// Reads what kind an activated socket is, and refuses what cannot serve:
/// not a listening stream socket, or a TCP one with `allow_uids`/`allow_gids`.
fn check_activated(
    socket: &socket2::Socket,
    name: &str,
    cfg: &TcpServerConfig,
) -> Result<bool, ListenError> {
    let bad =
        |why: String| ListenError::Config(format!("the socket systemd passed as `{name}` {why}"));
    let not_socket = |e: io::Error| bad(format!("cannot be used as a socket: {e}"));
    if socket.r#type().map_err(not_socket)? != socket2::Type::STREAM
        || !socket.is_listener().map_err(not_socket)?
    {
        return Err(bad(
            "is not a listening stream socket (use ListenStream= in the .socket unit)".into(),
        ));
    }
    let domain = socket.domain().map_err(not_socket)?;
    let unix = domain == socket2::Domain::UNIX;
    if !unix && domain != socket2::Domain::IPV4 && domain != socket2::Domain::IPV6 {
        return Err(bad(format!(
            "has an address family pyipcd does not serve ({domain:?})"
        )));
    }
    if !unix && (cfg.allow_uids.is_some() || cfg.allow_gids.is_some()) {
        return Err(bad(
            "is a TCP socket: allow_uids/allow_gids need a Unix socket (peer credentials)".into(),
        ));
    }
    Ok(unix)
}

/// Warns when peer uids/gids are seen through a user namespace (systemd's
/// `PrivateUsers=yes`): every peer but root and the daemon's own user then
/// shows as 65534, so `allow_uids`/`allow_gids` and `peer` cannot tell
/// other users apart, and `owner`/`group` cannot be set.
fn warn_if_ids_are_remapped(cfg: &TcpServerConfig) {
    let uses_ids = cfg.allow_uids.is_some()
        || cfg.allow_gids.is_some()
        || cfg.owner.is_some()
        || cfg.group.is_some();
    let identity = std::fs::read_to_string("/proc/self/uid_map")
        .map(|m| m.split_whitespace().collect::<Vec<_>>() == ["0", "0", "4294967295"])
        .unwrap_or(true);
    if uses_ids && !identity {
        tracing::warn!(role = %cfg.name, "running in a user namespace (PrivateUsers=yes?): other users' uids and gids show as 65534, so allow_uids/allow_gids, owner and group cannot name them; set PrivateUsers=no for this service (docs/service.md)");
    }
}

/// The listen backlog for `cfg`: its `backlog`, capped (and logged) by the
/// kernel's `net.core.somaxconn`, which Linux applies silently.
fn backlog(cfg: &TcpServerConfig) -> i32 {
    let set = cfg.backlog.unwrap_or(DEFAULT_BACKLOG);
    let wanted = i32::try_from(set).unwrap_or(i32::MAX);
    let cap = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .ok()
        .and_then(|s| s.trim().parse::<i32>().ok());
    match cap {
        Some(cap) if cap < wanted => {
            let why = format!(
                "backlog {wanted} capped to {cap} by net.core.somaxconn (sysctl -w net.core.somaxconn={wanted} lifts it)"
            );
            if cfg.backlog.is_some() {
                tracing::warn!(role = %cfg.name, "{why}");
            } else {
                tracing::info!(role = %cfg.name, "{why}");
            }
            cap
        }
        _ => wanted,
    }
}

/// A listening socket registered with a runtime.
pub(crate) struct Listener {
    inner: Inner,
    /// Keeps the socket file while this instance accepts on it.
    _file: Option<Arc<SocketFile>>,
}

enum Inner {
    Tcp(TcpListener),
    Unix(UnixListener),
}

/// An accepted connection.
pub(crate) enum Accepted {
    /// Over TCP.
    Tcp(TcpStream, Peer),
    /// Over a Unix socket (its peer's credentials read).
    Unix(UnixStream, Peer),
}

/// A second registration of a listening socket (a duplicate descriptor)
/// that says when connections arrive without taking one: a worker over its
/// share waits for an arrival, leaves it to the others for a moment, and
/// then takes it only if it is still there (`workers::balance`).
pub(crate) struct Arrivals(AsyncFd<OwnedFd>);

impl Arrivals {
    /// Resolves when a connection may be waiting (at once if one arrived
    /// since the last [`Arrivals::clear`]).
    pub(crate) async fn wait(&self) -> io::Result<()> {
        let mut ready = self.0.readable().await?;
        ready.retain_ready();
        Ok(())
    }

    /// Forgets the arrivals seen so far: call it before looking at the
    /// queue, so a connection that arrives afterwards wakes [`Arrivals::wait`].
    pub(crate) fn clear(&self) {
        if let Some(Ok(mut ready)) = self.0.readable().now_or_never() {
            ready.clear_ready();
        }
    }
}

impl Listener {
    /// A registration that sees arrivals without accepting (see [`Arrivals`]).
    ///
    /// # Errors
    /// If the descriptor cannot be duplicated or registered.
    pub(crate) fn arrivals(&self) -> io::Result<Arrivals> {
        let fd = match &self.inner {
            Inner::Tcp(l) => l.as_fd().try_clone_to_owned()?,
            Inner::Unix(l) => l.as_fd().try_clone_to_owned()?,
        };
        // SAFETY: `fd` is an open descriptor the AsyncFd owns for its life.
        #[allow(unsafe_code)]
        let registered = unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) };
        registered.map(Arrivals).map_err(|e| e.into_parts().1)
    }

    /// A connection if one is waiting now; `None` if the queue is empty
    /// (another worker took what arrived).
    pub(crate) fn try_accept(&self) -> Option<io::Result<Accepted>> {
        self.accept().now_or_never()
    }

    /// The next connection.
    ///
    /// # Errors
    /// What `accept` reported (EMFILE…), or a Unix peer whose credentials
    /// cannot be read (it is gone already).
    pub(crate) async fn accept(&self) -> io::Result<Accepted> {
        match &self.inner {
            Inner::Tcp(l) => {
                let (s, a) = l.accept().await?;
                let _ = s.set_nodelay(true);
                Ok(Accepted::Tcp(s, Peer::Tcp(a)))
            }
            Inner::Unix(l) => {
                let (s, _) = l.accept().await?;
                let peer = Peer::of_unix(&s)?;
                Ok(Accepted::Unix(s, peer))
            }
        }
    }
}
