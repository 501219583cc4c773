//! Stream roles, over TCP or Unix sockets. `endpoint` parses where a role
//! listens or connects; `listener` binds (or takes from systemd) a server's
//! socket, `socket_file` guards a Unix socket's file, `stream` puts both
//! stream kinds behind one trait. `server` accepts; `connection` serves each connection
//! (decode, submit, reply in request order) through `dispatch`, the one
//! place that knows whether calls go to the GIL pool or run inline on the
//! role's own interpreter thread (`inline`). `client` connects out with
//! reconnect, sends scripted, produced or `pyipcd.send` messages and hands
//! replies to Python. `framing` owns the wire formats. Only `framing` (for
//! the fuzz targets), [`parse_listen`] and [`check_binds`] are public: the
//! roles are started by the supervisor.

pub(crate) mod client;
mod connection;
mod dispatch;
pub mod endpoint;
pub mod framing;
mod inline;
pub(crate) mod listener;
pub(crate) mod server;
pub mod socket_file;
pub(crate) mod stream;

use std::net::SocketAddr;

/// Parses `host:port`, `:port` or `port`; the host defaults to 127.0.0.1.
///
/// # Errors
/// A message saying what is wrong with `s`.
pub fn parse_listen(s: &str) -> Result<SocketAddr, String> {
    let full = if let Ok(port) = s.parse::<u16>() {
        format!("127.0.0.1:{port}")
    } else if let Some(port) = s.strip_prefix(':') {
        format!("127.0.0.1:{port}")
    } else {
        s.to_string()
    };
    full.parse()
        .map_err(|_| format!("`{s}` is not an address like 127.0.0.1:50007, :50007 or [::1]:50007"))
}

/// Binds (and at once releases) every address the config listens on (TCP
/// servers and the admin endpoint), as `run` will; one problem per address
/// that cannot be bound (in use, not local, not permitted). A Unix socket
/// path is only looked at (live, or not a socket, or no such directory); a
/// socket systemd will pass is not checked.
pub fn check_binds(cfg: &crate::config::Config) -> Vec<String> {
    use endpoint::{Listen, UnixAddr};
    let servers = cfg.tcp.server.iter().enumerate().map(|(i, s)| {
        (
            format!("tcp.server[{i}].listen (role {})", s.name),
            Listen::parse(&s.listen),
        )
    });
    let admin = cfg
        .admin
        .listen
        .iter()
        .map(|l| ("admin.listen".to_string(), parse_listen(l).map(Listen::Tcp)));
    servers
        .chain(admin)
        .filter_map(|(key, listen)| match listen.ok()? {
            Listen::Tcp(addr) => std::net::TcpListener::bind(addr)
                .err()
                .map(|e| format!("{key}: cannot listen on {addr}: {e}")),
            Listen::Unix(ref addr @ UnixAddr::Path(ref p)) => match p.parent() {
                Some(dir) if !dir.is_dir() => {
                    let missing = std::io::ErrorKind::NotFound.into();
                    Some(format!(
                        "{key}: {}",
                        listener::unix_bind_error(addr, missing)
                    ))
                }
                _ => socket_file::inspect(p).err().map(|e| format!("{key}: {e}")),
            },
            Listen::Unix(addr @ UnixAddr::Abstract(_)) => {
                let bound =
                    socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::STREAM, None)
                        .and_then(|s| s.bind(&addr.sock_addr()?));
                bound
                    .err()
                    .map(|e| format!("{key}: {}", listener::unix_bind_error(&addr, e)))
            }
            Listen::Activated(_) => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::parse_listen;

    #[test]
    fn listen_defaults_to_loopback() {
        assert_eq!(
            parse_listen("50007").unwrap().to_string(),
            "127.0.0.1:50007"
        );
        assert_eq!(parse_listen(":1").unwrap().to_string(), "127.0.0.1:1");
        assert_eq!(parse_listen("0.0.0.0:9").unwrap().to_string(), "0.0.0.0:9");
        assert!(parse_listen("localhost").is_err());
    }
}
