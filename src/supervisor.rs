//! Roles as one collection: built from the config (resolving their Python
//! targets), started (servers bind first), and on reload compared by name so
//! that only roles whose configuration changed are stopped and started again.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use pyo3::Python;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::Error;
use crate::config::{Config, ShmMode, ShmRegionConfig, TcpClientConfig, TcpServerConfig};
use crate::py::handler::format_exception;
use crate::py::pool::GilPool;
use crate::shm::channel::{ChannelError, ShmChannel};
use crate::shm::watch::{ShmWatcher, WatchError};
use crate::tcp::client::TcpClient;
use crate::tcp::server::TcpServer;

/// A role's configuration, compared on reload.
#[derive(Debug, Clone, PartialEq)]
pub enum RoleConfig {
    /// `[[tcp.server]]`.
    Server(TcpServerConfig),
    /// `[[tcp.client]]`.
    Client(TcpClientConfig),
    /// `[[shm.region]]`.
    Region(ShmRegionConfig),
}

/// A resolved role, ready to start.
pub enum Role {
    /// A TCP server.
    Server(TcpServer),
    /// A TCP client.
    Client(TcpClient),
    /// A watched region.
    Watcher(ShmWatcher),
    /// A channel region.
    Channel(ShmChannel),
}

/// A started role.
pub struct Running {
    config: RoleConfig,
    token: CancellationToken,
    handle: JoinHandle<()>,
}

/// Every role in `config`, by name.
pub fn role_configs(config: &Config) -> BTreeMap<String, RoleConfig> {
    let mut roles = BTreeMap::new();
    for s in &config.tcp.server {
        roles.insert(s.name.clone(), RoleConfig::Server(s.clone()));
    }
    for c in &config.tcp.client {
        roles.insert(c.name.clone(), RoleConfig::Client(c.clone()));
    }
    for r in &config.shm.region {
        roles.insert(r.name.clone(), RoleConfig::Region(r.clone()));
    }
    roles
}

/// Resolves one role's Python targets (and maps its region). Takes the GIL.
///
/// # Errors
/// [`Error::Target`] for Python problems, [`Error::Startup`] for files.
pub fn resolve(py: Python<'_>, name: &str, config: &RoleConfig) -> Result<Role, Error> {
    let target =
        |kind: &str, e: String| Error::Target(format!("{kind} `{name}`: {}", e.trim_end()));
    Ok(match config {
        RoleConfig::Server(c) => Role::Server(
            TcpServer::resolve(py, c)
                .map_err(|e| target("tcp server", format_exception(py, &e)))?,
        ),
        RoleConfig::Client(c) => Role::Client(
            TcpClient::resolve(py, c)
                .map_err(|e| target("tcp client", format_exception(py, &e)))?,
        ),
        RoleConfig::Region(r) if r.mode == ShmMode::Watch => {
            Role::Watcher(ShmWatcher::open(py, r).map_err(|e| match e {
                WatchError::Shm(e) => Error::Startup(format!("shm region `{name}`: {e}")),
                WatchError::Handler(tb) => target("shm region", tb),
            })?)
        }
        RoleConfig::Region(r) => Role::Channel(ShmChannel::open(py, r).map_err(|e| match e {
            ChannelError::Handler(tb) => target("shm region", tb),
            e => Error::Startup(format!("shm region `{name}`: {e}")),
        })?),
    })
}

/// Starts a resolved role under `parent` (servers bind first); returns its
/// handle and, for a server, the bound address.
///
/// # Errors
/// [`Error::Startup`] if a server cannot bind.
pub async fn start(
    role: Role,
    config: RoleConfig,
    pool: &Arc<GilPool>,
    parent: &CancellationToken,
    tracker: &TaskTracker,
) -> Result<(Running, Option<std::net::SocketAddr>), Error> {
    let token = parent.child_token();
    let mut addr = None;
    let handle = match role {
        Role::Server(server) => {
            let name = server.name().to_string();
            let listening = server
                .bind()
                .await
                .map_err(|e| Error::Startup(format!("tcp server `{name}` cannot listen: {e}")))?;
            addr = Some(listening.local_addr()?);
            tracker.spawn(crate::admin::tracked(
                name,
                listening.serve(pool.clone(), token.clone()),
            ))
        }
        Role::Client(client) => {
            client.register_route();
            // Down until connected: the client marks itself up and down.
            crate::admin::health().set(client.name(), false);
            tracker.spawn(client.run(pool.clone(), token.clone()))
        }
        Role::Watcher(watcher) => {
            watcher.register_route();
            let name = watcher.name().to_string();
            tracker.spawn(crate::admin::tracked(
                name,
                watcher.run(pool.clone(), token.clone()),
            ))
        }
        Role::Channel(channel) => {
            let name = channel.name().to_string();
            tracker.spawn(crate::admin::tracked(
                name,
                channel.run(pool.clone(), token.clone()),
            ))
        }
    };
    Ok((
        Running {
            config,
            token,
            handle,
        },
        addr,
    ))
}

/// Applies a new set of role configs to the running ones: stops roles that
/// were removed or changed (waiting up to `grace` for each), then resolves
/// (on the GIL pool) and starts the changed and new ones. Unchanged roles are
/// not touched. A role that fails to start is reported down by `/health`.
/// Returns the names started, stopped and failed.
pub async fn apply(
    running: &mut BTreeMap<String, Running>,
    wanted: BTreeMap<String, RoleConfig>,
    pool: &Arc<GilPool>,
    parent: &CancellationToken,
    tracker: &TaskTracker,
    grace: Duration,
) -> (Vec<String>, Vec<String>, Vec<String>) {
    let (mut started, mut stopped, mut failed) = (Vec::new(), Vec::new(), Vec::new());
    // Roles gone from the config (including ones that failed to start earlier)
    // no longer count for /health.
    crate::admin::health().retain(|name| wanted.contains_key(name));
    let stale: Vec<String> = running
        .iter()
        .filter(|(name, r)| wanted.get(*name) != Some(&r.config))
        .map(|(name, _)| name.clone())
        .collect();
    for name in stale {
        if let Some(r) = running.remove(&name) {
            r.token.cancel();
            if tokio::time::timeout(grace, r.handle).await.is_err() {
                tracing::warn!(role = %name, "still finishing in-flight work after {grace:?}; starting its replacement anyway");
            }
            crate::py::module::unregister_route(&name);
            crate::admin::health().remove(&name);
            stopped.push(name);
        }
    }
    for (name, config) in wanted {
        if running.contains_key(&name) {
            continue;
        }
        let (n, c) = (name.clone(), config.clone());
        let resolved = pool.run(move |py| resolve(py, &n, &c)).await;
        let role = match resolved {
            Ok(Ok(role)) => role,
            Ok(Err(e)) => {
                tracing::error!(role = %name, "not started: {e}");
                crate::admin::health().set(&name, false);
                failed.push(name);
                continue;
            }
            Err(e) => {
                tracing::error!(role = %name, "not started: {e}");
                crate::admin::health().set(&name, false);
                failed.push(name);
                continue;
            }
        };
        match start(role, config, pool, parent, tracker).await {
            Ok((r, _)) => {
                running.insert(name.clone(), r);
                started.push(name);
            }
            Err(e) => {
                tracing::error!(role = %name, "not started: {e}");
                crate::admin::health().set(&name, false);
                failed.push(name);
            }
        }
    }
    (started, stopped, failed)
}
