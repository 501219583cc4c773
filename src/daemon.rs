//! The daemon's life: start the interpreter, the GIL pool and the tasks from a
//! [`Config`], report readiness, wait for a stop request, then shut down in
//! order within `daemon.shutdown_grace`.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sd_notify::NotifyState;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::config::ShmMode;
use crate::py::pool::{GilPool, PoolConfig};
use crate::py::task::{RunningTask, StopFlag};
use crate::shm::channel::{ChannelError, ShmChannel};
use crate::shm::watch::{ShmWatcher, WatchError};
use crate::systemd::notify;
use crate::tcp::client::TcpClient;
use crate::tcp::server::TcpServer;
use crate::{Error, py};

/// How long tasks get, after `SystemExit` was raised in them, to end.
const FORCED_STOP_WAIT: Duration = Duration::from_secs(1);

/// A started daemon.
pub struct Daemon {
    config: Config,
    pool: Arc<GilPool>,
    tasks: Vec<RunningTask>,
    stop: Arc<StopFlag>,
    servers: Vec<TcpServer>,
    clients: Vec<TcpClient>,
    watchers: Vec<ShmWatcher>,
    channels: Vec<ShmChannel>,
    roles: TaskTracker,
    token: CancellationToken,
}

/// How a shutdown went.
#[derive(Debug, Default)]
pub struct Outcome {
    /// What was still running at the deadline and had to be abandoned.
    pub abandoned: Vec<String>,
}

impl Outcome {
    /// 0 when everything stopped cleanly, 1 when something was abandoned.
    pub fn exit_code(&self) -> i32 {
        if self.abandoned.is_empty() {
            crate::EXIT_OK
        } else {
            crate::EXIT_FAILURE
        }
    }
}

impl Daemon {
    /// Initialises Python (with `python_log_level` as the root logging level),
    /// resolves every role's Python targets and starts the pool (roles and
    /// tasks start in [`Daemon::run_until`]). Call from a plain thread, not a tokio
    /// worker: it takes the GIL.
    ///
    /// # Errors
    /// [`Error::Startup`] if the interpreter, pool or a task thread cannot start.
    pub fn start(config: Config, python_log_level: u32) -> Result<Self, Error> {
        let settings = py::PySettings {
            log_level: python_log_level,
            max_output_line: usize::try_from(config.python.max_output_line.as_u64())
                .unwrap_or(usize::MAX),
        };
        py::init(&config.python.paths, &settings)?;
        let (servers, clients, (watchers, channels)) = resolve_roles(&config)?;
        let mut pool_config = PoolConfig::new(
            config.python.workers,
            config.python.queue,
            config.python.call_timeout,
        );
        pool_config.spin = config.python.spin;
        pool_config.caller_spin_polls = config.python.caller_polls;
        let pool = GilPool::start(&pool_config)?;
        let stop = Arc::new(StopFlag::default());
        let tasks = Vec::new();
        Ok(Self {
            config,
            pool,
            tasks,
            stop,
            servers,
            clients,
            watchers,
            channels,
            roles: TaskTracker::new(),
            token: CancellationToken::new(),
        })
    }

    /// Binds every server role and spawns all roles. Called by [`Daemon::run_until`]
    /// before readiness is reported.
    ///
    /// # Errors
    /// [`Error::Startup`] naming the role whose address cannot be bound.
    pub async fn start_roles(&mut self) -> Result<Vec<(String, std::net::SocketAddr)>, Error> {
        let mut bound = Vec::new();
        for server in std::mem::take(&mut self.servers) {
            let name = server.name().to_string();
            let listening = server
                .bind()
                .await
                .map_err(|e| Error::Startup(format!("tcp server `{name}` cannot listen: {e}")))?;
            bound.push((name, listening.local_addr()?));
            self.roles.spawn(crate::admin::tracked(
                name_of(&bound),
                listening.run(self.pool.clone(), self.token.child_token()),
            ));
        }
        for client in std::mem::take(&mut self.clients) {
            client.register_route();
            // Down until connected: the client marks itself up and down.
            crate::admin::health().set(client.name(), false);
            self.roles
                .spawn(client.run(self.pool.clone(), self.token.child_token()));
        }
        for channel in std::mem::take(&mut self.channels) {
            let name = channel.name().to_string();
            self.roles.spawn(crate::admin::tracked(
                name,
                channel.run(self.token.child_token()),
            ));
        }
        for watcher in std::mem::take(&mut self.watchers) {
            watcher.register_route();
            let name = watcher.name().to_string();
            self.roles.spawn(crate::admin::tracked(
                name,
                watcher.run(self.pool.clone(), self.token.child_token()),
            ));
        }
        if let Some(listen) = &self.config.admin.listen {
            let addr = crate::tcp::parse_listen(listen).map_err(Error::Startup)?;
            let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| {
                Error::Startup(format!("admin endpoint cannot listen on {addr}: {e}"))
            })?;
            crate::admin::metrics_handle();
            self.roles.spawn(crate::admin::serve(
                listener,
                self.pool.clone(),
                self.token.child_token(),
            ));
        }
        // Tasks last, so `pyipcd.send` finds every role from their first line on.
        for t in &self.config.python.task {
            self.tasks.push(RunningTask::spawn(t, self.stop.clone())?);
        }
        Ok(bound)
    }

    /// The GIL pool.
    pub fn pool(&self) -> &Arc<GilPool> {
        &self.pool
    }

    /// Starts the roles, reports readiness, waits for `shutdown`, then stops everything.
    ///
    /// # Errors
    /// If a role cannot start (nothing is left running then).
    pub async fn run_until(mut self, shutdown: impl Future<Output = ()>) -> Result<Outcome, Error> {
        if let Err(e) = self.start_roles().await {
            self.token.cancel();
            self.stop.set();
            let _ = self.shutdown().await;
            return Err(e);
        }
        let status = format!(
            "running: {} task(s), {} TCP role(s), {} shm region(s), {} GIL pool thread(s)",
            self.tasks.len(),
            self.config.tcp.server.len() + self.config.tcp.client.len(),
            self.config.shm.region.len(),
            self.config.python.workers
        );
        tracing::info!(config = %self.config.source.display(), "pyipcd {} ready; {status}", env!("CARGO_PKG_VERSION"));
        if let Some(period) = crate::systemd::watchdog_period() {
            self.roles.spawn(crate::systemd::watchdog(
                self.pool.clone(),
                period,
                self.token.child_token(),
            ));
        }
        notify(&[NotifyState::Ready, NotifyState::Status(&status)]);
        shutdown.await;
        Ok(self.shutdown().await)
    }

    async fn shutdown(&mut self) -> Outcome {
        let grace = self.config.daemon.shutdown_grace;
        notify(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
        tracing::info!("stopping: waiting up to {grace:?} for tasks and in-flight calls");
        py::module::set_stopping();
        self.stop.set();
        let deadline = Instant::now() + grace;
        // Roles first: they stop reading and finish their in-flight calls.
        self.token.cancel();
        self.roles.close();
        if tokio::time::timeout_at(deadline.into(), self.roles.wait())
            .await
            .is_err()
        {
            tracing::warn!("roles still finishing in-flight calls at the deadline");
        }
        let wait_tasks = async {
            let _ = tokio::time::timeout_at(
                deadline.into(),
                futures_join(self.tasks.iter_mut().map(RunningTask::wait)),
            )
            .await;
        };
        let (_, stuck_workers) = tokio::join!(wait_tasks, self.pool.close(deadline));
        let mut outcome = Outcome::default();
        let late: Vec<&RunningTask> = self.tasks.iter().filter(|t| !t.is_done()).collect();
        if !late.is_empty() {
            for t in &late {
                tracing::warn!(task = %t.name, "task still running after {grace:?}; raising SystemExit in it");
                t.raise_system_exit();
            }
            let forced = Instant::now() + FORCED_STOP_WAIT;
            while Instant::now() < forced && self.tasks.iter().any(|t| !t.is_done()) {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            for t in self.tasks.iter().filter(|t| !t.is_done()) {
                outcome.abandoned.push(format!("task {}", t.name));
            }
        }
        if stuck_workers > 0 {
            outcome.abandoned.push(format!(
                "{stuck_workers} GIL pool thread(s) stuck in a Python call"
            ));
        }
        if outcome.abandoned.is_empty() {
            tracing::info!("stopped cleanly");
        } else {
            tracing::error!(
                "stopped, abandoning: {} (blocked in code that never returned to Python)",
                outcome.abandoned.join(", ")
            );
        }
        outcome
    }
}

fn name_of(bound: &[(String, std::net::SocketAddr)]) -> String {
    bound.last().map(|(n, _)| n.clone()).unwrap_or_default()
}

/// Awaits every future (they are few; no extra dependency needed).
async fn futures_join<F: Future<Output = ()>>(futs: impl Iterator<Item = F>) {
    for f in futs {
        f.await;
    }
}

type Roles = (
    Vec<TcpServer>,
    Vec<TcpClient>,
    (Vec<ShmWatcher>, Vec<ShmChannel>),
);

fn resolve_roles(config: &Config) -> Result<Roles, Error> {
    pyo3::Python::attach(|py| {
        let servers = resolve_all(
            py,
            "tcp server",
            &config.tcp.server,
            |c| &c.name,
            TcpServer::resolve,
        )?;
        let clients = resolve_all(
            py,
            "tcp client",
            &config.tcp.client,
            |c| &c.name,
            TcpClient::resolve,
        )?;
        let mut watchers = Vec::new();
        let mut channels = Vec::new();
        for r in &config.shm.region {
            let named = |e: String| format!("shm region `{}`: {}", r.name, e.trim_end());
            match r.mode {
                ShmMode::Watch => watchers.push(ShmWatcher::open(py, r).map_err(|e| match e {
                    WatchError::Shm(e) => Error::Startup(named(e.to_string())),
                    WatchError::Handler(tb) => Error::Target(named(tb)),
                })?),
                ShmMode::Channel => {
                    channels.push(ShmChannel::open(py, r).map_err(|e| match e {
                        ChannelError::Handler(tb) => Error::Target(named(tb)),
                        e => Error::Startup(named(e.to_string())),
                    })?)
                }
            }
        }
        Ok((servers, clients, (watchers, channels)))
    })
}

/// Resolves every role of one kind; the first failure names the role and
/// carries the Python traceback.
fn resolve_all<'py, C, R>(
    py: pyo3::Python<'py>,
    kind: &str,
    configs: &[C],
    name: impl Fn(&C) -> &str,
    resolve: impl Fn(pyo3::Python<'py>, &C) -> pyo3::PyResult<R>,
) -> Result<Vec<R>, Error> {
    configs
        .iter()
        .map(|c| {
            resolve(py, c).map_err(|e| {
                let tb = py::handler::format_exception(py, &e);
                Error::Target(format!("{kind} `{}`: {}", name(c), tb.trim_end()))
            })
        })
        .collect()
}

/// Runs the daemon for `config` on a runtime of its own until SIGINT/SIGTERM,
/// and returns the process exit code. Signals are registered before the
/// interpreter starts.
///
/// # Errors
/// [`Error`] if start-up fails.
pub fn run(config: Config, python_log_level: u32) -> Result<i32, Error> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(config.io_threads())
        .thread_name("pyipcd-io")
        .enable_all()
        .build()?;
    let mut signals = runtime.block_on(async { crate::shutdown::Signals::register() })?;
    let daemon = Daemon::start(config, python_log_level)?;
    let outcome = runtime.block_on(daemon.run_until(async move {
        let (name, _) = signals.stop_requested().await;
        tracing::info!("{name} received");
        signals.exit_on_second();
    }))?;
    Ok(outcome.exit_code())
}
