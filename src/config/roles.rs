//! Role sections of the configuration: `[[tcp.server]]`, `[[tcp.client]]`,
//! `[[shm.region]]` and `[admin]`, with their defaults and validation.

use std::collections::HashSet;
use std::path::PathBuf;
use std::time::Duration;

use bytesize::ByteSize;
use serde::Deserialize;

use super::placement::Placement;
use super::{Config, default_backoff_max};
use crate::py::target::Target;
use crate::tcp::endpoint::{Connect, Listen, UnixAddr};
use crate::tcp::socket_file::resolve_id;

/// `[tcp]`: `[[tcp.server]]` and `[[tcp.client]]` roles.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TcpConfig {
    /// Listening roles.
    pub server: Vec<TcpServerConfig>,
    /// Connecting roles.
    pub client: Vec<TcpClientConfig>,
}

/// How messages are delimited on a TCP stream.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Framing {
    /// Each read is a message and a reply is written as is (classic socket code).
    Raw,
    /// Newline-delimited; the newline is stripped on input and added on output.
    #[default]
    Line,
    /// A 4-byte big-endian length prefix, both ways.
    Len32,
}

/// Where a TCP server role runs its handler calls.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Dispatch {
    /// Connections are served by the tokio I/O threads and each message is
    /// handed to the GIL pool: a handler that blocks holds up only its own
    /// connection's replies, and several pool workers can share the load.
    #[default]
    Pool,
    /// The role gets one dedicated interpreter thread that does its sockets'
    /// I/O and calls the handler itself, with no thread hand-off (the uvloop
    /// model): the most messages per CPU second, but a handler that blocks
    /// stalls every connection of the role. Plain `def` handlers only.
    Inline,
}

/// `[[tcp.server]]`: accept connections and answer each message with a Python handler.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TcpServerConfig {
    /// Unique role name.
    pub name: String,
    /// `host:port`, `:port` or `port` (host defaults to 127.0.0.1),
    /// `unix:/path` or `unix:@abstract-name`, or `systemd:NAME` (a socket
    /// systemd passed; see `tcp::endpoint`).
    pub listen: String,
    /// Message framing.
    #[serde(default)]
    pub framing: Framing,
    /// `module:function` or `module:Class.method`: `handler(data) -> bytes | None`.
    pub handler: String,
    /// Connections beyond this are refused (closed at once, logged).
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Connections the kernel may queue before they are accepted (the
    /// listen backlog); unset: [`DEFAULT_BACKLOG`]. Capped by `net.core.somaxconn`.
    #[serde(default)]
    pub backlog: Option<u32>,
    /// A longer message closes its connection.
    #[serde(default = "default_max_message")]
    pub max_message: ByteSize,
    /// A connection silent this long is closed.
    #[serde(default = "default_idle_timeout", with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Where handler calls run: `pool` (default) or `inline`.
    #[serde(default)]
    pub dispatch: Dispatch,
    /// Requests per connection being handled at once (pipelining depth).
    #[serde(default = "default_pipeline")]
    pub pipeline: usize,
    /// Called as `on_connect(conn_id, peer)` when a connection opens.
    #[serde(default)]
    pub on_connect: Option<String>,
    /// Called as `on_close(conn_id, peer)` when it closes.
    #[serde(default)]
    pub on_close: Option<String>,
    /// Pool threads this role's calls may occupy at once (default
    /// `python.workers - 1`, at least 1): a role whose handlers block cannot
    /// starve the others.
    #[serde(default)]
    pub max_in_flight: Option<usize>,
    /// Permissions of a `unix:/path` socket file (default 0600): an integer
    /// (`0o660`) or an octal string (`"0660"`).
    #[serde(default)]
    pub mode: Option<FileMode>,
    /// Owner of a `unix:/path` socket file: a user name or uid.
    #[serde(default)]
    pub owner: Option<Principal>,
    /// Group of a `unix:/path` socket file: a group name or gid.
    #[serde(default)]
    pub group: Option<Principal>,
    /// Unix sockets only: peers whose uid is listed are served (with
    /// `allow_gids` too: a peer matching either list is).
    #[serde(default)]
    pub allow_uids: Option<Vec<u32>>,
    /// Unix sockets only: peers whose primary gid is listed are served.
    #[serde(default)]
    pub allow_gids: Option<Vec<u32>>,
}

/// A user or group, by name or numeric id.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum Principal {
    /// A numeric uid or gid.
    Id(u32),
    /// A name looked up in the host's user or group database.
    Name(String),
}

/// File permission bits, from an integer or an octal string.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileMode(pub u32);

impl<'de> Deserialize<'de> for FileMode {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(u32),
            Text(String),
        }
        let bits = match Raw::deserialize(d)? {
            Raw::Int(i) => i,
            Raw::Text(t) => u32::from_str_radix(t.trim_start_matches("0o"), 8).map_err(|_| {
                serde::de::Error::custom(format!("`{t}` is not an octal mode like \"0660\""))
            })?,
        };
        if bits > 0o777 {
            return Err(serde::de::Error::custom(format!(
                "mode {bits:o} (octal) has bits beyond 0777"
            )));
        }
        Ok(FileMode(bits))
    }
}

/// `[[tcp.client]]`: connect out, send scripted or produced messages, hand replies to Python.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TcpClientConfig {
    /// Unique role name.
    pub name: String,
    /// `host:port`, `unix:/path` or `unix:@abstract-name` to connect to.
    pub connect: String,
    /// Message framing.
    #[serde(default)]
    pub framing: Framing,
    /// Scripted messages (TOML escapes give bytes: `"\u0000"`).
    #[serde(default)]
    pub send: Vec<String>,
    /// Pause between scripted or produced messages.
    #[serde(default = "default_interval", with = "humantime_serde")]
    pub interval: Duration,
    /// How many times the `send` list is sent; 0 = forever.
    #[serde(default = "default_repeat")]
    pub repeat: u64,
    /// A generator function (`module:function`) whose yielded messages are sent.
    #[serde(default)]
    pub producer: Option<String>,
    /// Handler for each reply; without one, replies are logged.
    #[serde(default)]
    pub on_reply: Option<String>,
    /// Give up one connection attempt after this long.
    #[serde(default = "default_connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// First reconnect delay; doubles per failed attempt.
    #[serde(default = "default_reconnect_min", with = "humantime_serde")]
    pub backoff_min: Duration,
    /// Longest reconnect delay.
    #[serde(default = "default_backoff_max", with = "humantime_serde")]
    pub backoff_max: Duration,
    /// A longer reply closes the connection (it is then re-established).
    #[serde(default = "default_max_message")]
    pub max_message: ByteSize,
    /// Messages waiting to be sent (from `pyipcd.send` and the producer) before senders wait.
    #[serde(default = "default_outbox")]
    pub outbox: usize,
    /// With `daemon.processes` > 1: run in worker 0 only (`"one"`) or in every worker (`"all"`).
    #[serde(default)]
    pub processes: Placement,
    /// Pool threads this role's calls may occupy at once (default
    /// `python.workers - 1`, at least 1): a role whose handlers block cannot
    /// starve the others.
    #[serde(default)]
    pub max_in_flight: Option<usize>,
}

fn default_max_connections() -> usize {
    1024
}
/// The listen backlog of a server that sets none: ten thousand clients
/// connecting one after another overflow a queue of 1024 on a 2-core host
/// (each overflow costs a client a SYN retry, a second).
pub const DEFAULT_BACKLOG: u32 = 4096;
fn default_max_message() -> ByteSize {
    ByteSize::mib(1)
}
fn default_idle_timeout() -> Duration {
    Duration::from_secs(300)
}
fn default_pipeline() -> usize {
    64
}
fn default_interval() -> Duration {
    Duration::from_secs(1)
}
fn default_repeat() -> u64 {
    1
}
fn default_connect_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_reconnect_min() -> Duration {
    Duration::from_millis(100)
}
fn default_outbox() -> usize {
    1024
}

/// `[admin]`: the HTTP endpoint for health checks and metrics.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// `host:port` (or `:port`, host 127.0.0.1) to serve `/health` and `/metrics`; off when unset.
    pub listen: Option<String>,
}

/// `[shm]`: `[[shm.region]]` roles.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ShmConfig {
    /// Memory-mapped files.
    pub region: Vec<ShmRegionConfig>,
}

/// How a region is used.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ShmMode {
    /// Poll the file and hand every change to `on_change` (the classic demo).
    #[default]
    Watch,
    /// A synchronised request/response channel (docs/shm-protocol.md) served by `handler`.
    Channel,
}

/// `[[shm.region]]`: a memory-mapped file watched for changes.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ShmRegionConfig {
    /// Unique role name.
    pub name: String,
    /// The file, relative to the config file's folder.
    pub path: PathBuf,
    /// Watch mode: bytes mapped; the file must be at least this long (or
    /// `create` it). Channel mode derives the size from `ring_size`.
    #[serde(default)]
    pub size: Option<ByteSize>,
    /// Create the file (mode 0600) and size it if missing.
    #[serde(default)]
    pub create: bool,
    /// What the region is for.
    #[serde(default)]
    pub mode: ShmMode,
    /// How often the region is compared with its last contents.
    #[serde(default = "default_poll", with = "humantime_serde")]
    pub poll: Duration,
    /// `module:function` called with the new contents as `bytes` on every
    /// change; bytes it returns are written back at offset 0.
    #[serde(default)]
    pub on_change: Option<String>,
    /// Scripted writer: each value in turn replaces the region's contents
    /// (zeroed, then the value at offset 0). TOML escapes give bytes.
    #[serde(default)]
    pub write: Vec<String>,
    /// Pause between scripted writes.
    #[serde(default = "default_interval", with = "humantime_serde")]
    pub write_interval: Duration,
    /// Channel mode: `module:function` answering each request (`bytes -> bytes | None`).
    #[serde(default)]
    pub handler: Option<String>,
    /// Channel mode: data bytes per ring (a power of two ≥ 4 KiB).
    #[serde(default = "default_ring_size")]
    pub ring_size: ByteSize,
    /// Channel mode: largest request or reply (at most half a ring, minus a
    /// 24 B record header).
    #[serde(default = "default_shm_max_message")]
    pub max_message: ByteSize,
    /// Channel mode: hand the handler a read-only `memoryview` into the
    /// mapping instead of a `bytes` copy, valid for the duration of the call.
    #[serde(default)]
    pub zero_copy: bool,
    /// With `daemon.processes` > 1: run in worker 0 only (`"one"`), or in
    /// every worker (`"all"`, each on its own file: `{worker}` in `path`).
    #[serde(default)]
    pub processes: Placement,
    /// Pool threads this role's calls may occupy at once (default
    /// `python.workers - 1`, at least 1): a role whose handlers block cannot
    /// starve the others.
    #[serde(default)]
    pub max_in_flight: Option<usize>,
}

fn default_ring_size() -> ByteSize {
    ByteSize::mib(1)
}

fn default_shm_max_message() -> ByteSize {
    ByteSize::kib(64)
}

fn default_poll() -> Duration {
    Duration::from_millis(100)
}

/// Largest region a watcher copies per poll.
pub const MAX_WATCH_SIZE: u64 = 16 * 1024 * 1024;

impl Config {
    /// Every role as (its dotted key, its name, its `max_in_flight`).
    fn roles(&self) -> impl Iterator<Item = (String, &String, Option<usize>)> {
        let servers = self
            .tcp
            .server
            .iter()
            .enumerate()
            .map(|(i, s)| (format!("tcp.server[{i}]"), &s.name, s.max_in_flight));
        let clients = self
            .tcp
            .client
            .iter()
            .enumerate()
            .map(|(i, c)| (format!("tcp.client[{i}]"), &c.name, c.max_in_flight));
        let regions = self
            .shm
            .region
            .iter()
            .enumerate()
            .map(|(i, r)| (format!("shm.region[{i}]"), &r.name, r.max_in_flight));
        servers.chain(clients).chain(regions)
    }

    /// `max_in_flight = 0` anywhere.
    pub(super) fn validate_max_in_flight(&self, problems: &mut Vec<String>) {
        for (key, _, cap) in self.roles() {
            if cap == Some(0) {
                problems.push(format!("{key}.max_in_flight must be at least 1"));
            }
        }
    }

    /// Role names are unique across every kind, and no task shares one.
    pub(super) fn validate_role_names(&self, problems: &mut Vec<String>) {
        let mut names: HashSet<&str> = HashSet::new();
        for (key, name, _) in self.roles() {
            if !names.insert(name.as_str()) || name.trim().is_empty() {
                problems.push(format!("{key}.name `{name}` is empty or used twice"));
            }
        }
        for (i, t) in self.python.task.iter().enumerate() {
            if names.contains(t.name.as_str()) {
                problems.push(format!(
                    "python.task[{i}].name `{}`: a role has the same name",
                    t.name
                ));
            }
        }
    }

    pub(super) fn validate_shm(&self, problems: &mut Vec<String>) {
        for (i, r) in self.shm.region.iter().enumerate() {
            let key = format!("shm.region[{i}]");
            let size = r.size.map_or(0, |s| s.as_u64());
            match r.mode {
                ShmMode::Watch => {
                    if size == 0 || size > MAX_WATCH_SIZE {
                        problems.push(format!("{key}.size must be between 1 B and 16 MiB"));
                    }
                    if r.handler.is_some() || r.zero_copy {
                        problems.push(format!(
                            "{key}: handler and zero_copy are for mode = \"channel\"; watch uses on_change"
                        ));
                    }
                }
                ShmMode::Channel => {
                    let ring = r.ring_size.as_u64();
                    if !ring.is_power_of_two() || !(4096..=1 << 30).contains(&ring) {
                        problems.push(format!(
                            "{key}.ring_size must be a power of two between 4 KiB and 1 GiB"
                        ));
                    }
                    let max = r.max_message.as_u64();
                    let header = crate::shm::ring::RECORD_HEADER as u64;
                    if max == 0 || header + max.next_multiple_of(8) > ring / 2 {
                        problems.push(format!("{key}.max_message must be ≥ 1 B and at most half of ring_size minus {header} B"));
                    }
                    if r.handler.is_none() {
                        problems.push(format!("{key}.handler is required in channel mode"));
                    }
                    if r.size.is_some() || r.on_change.is_some() || !r.write.is_empty() {
                        problems.push(format!(
                            "{key}: size, on_change and write are for mode = \"watch\""
                        ));
                    }
                }
            }
            if r.poll.is_zero() || r.write_interval.is_zero() {
                problems.push(format!(
                    "{key}: poll and write_interval must be greater than 0"
                ));
            }
            if let Some(w) = r.write.iter().find(|w| w.len() as u64 > size) {
                problems.push(format!(
                    "{key}.write: `{}` is longer than the region",
                    w.escape_debug()
                ));
            }
            for (k, spec) in [("on_change", &r.on_change), ("handler", &r.handler)] {
                if let Some(spec) = spec
                    && let Err(e) = Target::parse(spec)
                {
                    problems.push(format!("{key}.{k}: {e}"));
                }
            }
            if r.mode == ShmMode::Watch && !r.create && !r.path.exists() {
                problems.push(format!(
                    "{key}.path: {} does not exist (set create = true to create it)",
                    r.path.display()
                ));
            }
        }
    }

    pub(super) fn validate_tcp(&self, problems: &mut Vec<String>) {
        let max_message = |problems: &mut Vec<String>, key: &str, size: ByteSize| {
            if size.as_u64() == 0 || size.as_u64() > u64::from(u32::MAX) {
                problems.push(format!("{key}.max_message must be between 1 B and 4 GiB"));
            }
        };
        let target = |problems: &mut Vec<String>, key: String, spec: &str| match Target::parse(spec)
        {
            Ok(t) if t.attr == crate::py::target::TargetAttr::None => problems.push(format!(
                "{key}: `{spec}` names a module; use module:function"
            )),
            Ok(_) => {}
            Err(e) => problems.push(format!("{key}: {e}")),
        };
        let mut places: HashSet<String> = HashSet::new();
        for (i, s) in self.tcp.server.iter().enumerate() {
            let key = format!("tcp.server[{i}]");
            let listen = validate_listen(problems, &key, s);
            // Two roles on one socket file, abstract name or systemd socket.
            if let Some(l @ (Listen::Unix(_) | Listen::Activated(_))) = listen
                && !places.insert(l.to_string())
            {
                problems.push(format!("{key}.listen: `{l}` is used by another role"));
            }
            target(problems, format!("{key}.handler"), &s.handler);
            for (k, v) in [("on_connect", &s.on_connect), ("on_close", &s.on_close)] {
                if let Some(v) = v {
                    target(problems, format!("{key}.{k}"), v);
                }
            }
            if s.max_connections == 0 || s.pipeline == 0 || s.backlog == Some(0) {
                problems.push(format!(
                    "{key}: max_connections, pipeline and backlog must be at least 1"
                ));
            }
            max_message(problems, &key, s.max_message);
        }
        for (i, c) in self.tcp.client.iter().enumerate() {
            let key = format!("tcp.client[{i}]");
            if let Err(e) = Connect::parse(&c.connect) {
                problems.push(format!("{key}.connect: {e}"));
            }
            for (k, v) in [("producer", &c.producer), ("on_reply", &c.on_reply)] {
                if let Some(v) = v {
                    target(problems, format!("{key}.{k}"), v);
                }
            }
            if c.backoff_min.is_zero() || c.backoff_max < c.backoff_min {
                problems.push(format!("{key}: need 0 < backoff_min <= backoff_max"));
            }
            if c.outbox == 0 {
                problems.push(format!("{key}.outbox must be at least 1"));
            }
            max_message(problems, &key, c.max_message);
        }
    }
}

/// The `listen` value of server `key` and the options that go with its kind:
/// `mode`/`owner`/`group` need a socket file, `allow_uids`/`allow_gids` a
/// Unix socket (an activated socket's kind is checked when it is taken).
/// Returns the parsed `listen`, if it parses.
fn validate_listen(problems: &mut Vec<String>, key: &str, s: &TcpServerConfig) -> Option<Listen> {
    let listen = match Listen::parse(&s.listen) {
        Ok(l) => l,
        Err(e) => {
            problems.push(format!("{key}.listen: {e}"));
            return None;
        }
    };
    let file = matches!(listen, Listen::Unix(UnixAddr::Path(_)));
    for (opt, set) in [
        ("mode", s.mode.is_some()),
        ("owner", s.owner.is_some()),
        ("group", s.group.is_some()),
    ] {
        if set && !file {
            problems.push(format!(
                "{key}.{opt}: only for a socket file (listen = \"unix:/path\"), not `{}`",
                s.listen
            ));
        }
    }
    if file {
        for (opt, who, group) in [("owner", &s.owner, false), ("group", &s.group, true)] {
            if let Some(Err(e)) = who.as_ref().map(|p| resolve_id(p, group)) {
                problems.push(format!("{key}.{opt}: {e}"));
            }
        }
    }
    let unix = matches!(listen, Listen::Unix(_) | Listen::Activated(_));
    for (opt, list) in [("allow_uids", &s.allow_uids), ("allow_gids", &s.allow_gids)] {
        match list {
            Some(_) if !unix => problems.push(format!(
                "{key}.{opt}: peer credentials exist only on Unix sockets (listen = \"unix:…\"), not `{}`",
                s.listen
            )),
            Some(l) if l.is_empty() && s.allow_uids.iter().chain(&s.allow_gids).all(Vec::is_empty) => {
                problems.push(format!("{key}.{opt}: an empty list would refuse every peer"));
            }
            _ => {}
        }
    }
    Some(listen)
}
