//! The two stream kinds a role talks over, TCP and Unix, behind one trait:
//! connections and client sessions are generic over it (monomorphised, so
//! the TCP path pays nothing for the Unix one), and [`Peer`] says who is at
//! the other end.

use std::future::Future;
use std::io;
use std::os::fd::AsRawFd;

use tokio::io::{AsyncRead, AsyncWrite, Interest};
use tokio::net::{TcpStream, UnixStream, tcp, unix};

use super::endpoint::Connect;

/// A connected byte stream that splits into owned halves.
pub(crate) trait Duplex: Send + 'static {
    /// The read half.
    type Read: AsyncRead + Unpin + Send + 'static;
    /// The write half.
    type Write: AsyncWrite + Unpin + Send + 'static;

    /// Splits into halves that can be used from one task at once.
    fn split(self) -> (Self::Read, Self::Write);

    /// Waits until a byte (or the end of the stream) can be read, without
    /// reading it: a connection takes its read buffer only then.
    fn wait_data(read: &mut Self::Read) -> impl Future<Output = io::Result<()>> + Send + '_;
}

impl Duplex for TcpStream {
    type Read = tcp::OwnedReadHalf;
    type Write = tcp::OwnedWriteHalf;

    fn split(self) -> (Self::Read, Self::Write) {
        self.into_split()
    }

    async fn wait_data(read: &mut Self::Read) -> io::Result<()> {
        read.peek(&mut [0u8; 1]).await.map(drop)
    }
}

impl Duplex for UnixStream {
    type Read = unix::OwnedReadHalf;
    type Write = unix::OwnedWriteHalf;

    fn split(self) -> (Self::Read, Self::Write) {
        self.into_split()
    }

    async fn wait_data(read: &mut Self::Read) -> io::Result<()> {
        // Readiness alone can be reported with nothing to read yet: peek.
        let stream: &UnixStream = read.as_ref();
        loop {
            stream.readable().await?;
            let peeked = stream.try_io(Interest::READABLE, || {
                nix::sys::socket::recv(
                    stream.as_raw_fd(),
                    &mut [0u8; 1],
                    nix::sys::socket::MsgFlags::MSG_PEEK | nix::sys::socket::MsgFlags::MSG_DONTWAIT,
                )
                .map_err(io::Error::from)
            });
            match peeked {
                Ok(_) => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
    }
}

/// The other end of an accepted connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Peer {
    /// A TCP peer's address.
    Tcp(std::net::SocketAddr),
    /// A Unix peer's credentials (`SO_PEERCRED`, taken when it connected).
    Unix {
        /// Process id (none if the kernel could not say).
        pid: Option<i32>,
        /// User id.
        uid: u32,
        /// Primary group id.
        gid: u32,
    },
}

impl Peer {
    /// The credentials of a Unix peer.
    ///
    /// # Errors
    /// If the kernel cannot say (the peer is gone).
    pub(crate) fn of_unix(stream: &UnixStream) -> io::Result<Self> {
        let cred = stream.peer_cred()?;
        Ok(Peer::Unix {
            pid: cred.pid(),
            uid: cred.uid(),
            gid: cred.gid(),
        })
    }
}

impl std::fmt::Display for Peer {
    /// What handlers get as `peer`: `host:port`, or `pid=…,uid=…,gid=…`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Peer::Tcp(a) => write!(f, "{a}"),
            Peer::Unix { pid, uid, gid } => match pid {
                Some(pid) => write!(f, "pid={pid},uid={uid},gid={gid}"),
                None => write!(f, "pid=?,uid={uid},gid={gid}"),
            },
        }
    }
}

/// A client's connection, of the kind its `connect` names.
pub(crate) enum Connected {
    /// Over TCP (`TCP_NODELAY` set).
    Tcp(TcpStream),
    /// Over a Unix socket.
    Unix(UnixStream),
}

/// Connects to `to`.
///
/// # Errors
/// What the connect reported (refused, no such file, a full backlog as
/// `EAGAIN`…).
pub(crate) async fn connect(to: &Connect) -> io::Result<Connected> {
    match to {
        Connect::Tcp(addr) => {
            let s = TcpStream::connect(addr).await?;
            let _ = s.set_nodelay(true);
            Ok(Connected::Tcp(s))
        }
        Connect::Unix(addr) => {
            // socket2, as tokio's own connect takes paths but not abstract names.
            let socket =
                socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::STREAM.cloexec(), None)?;
            socket.set_nonblocking(true)?;
            match socket.connect(&addr.sock_addr()?) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
                Err(e) => return Err(e),
            }
            let stream = UnixStream::from_std(std::os::fd::OwnedFd::from(socket).into())?;
            stream.writable().await?;
            match stream.take_error()? {
                Some(e) => Err(e),
                None => Ok(Connected::Unix(stream)),
            }
        }
    }
}
