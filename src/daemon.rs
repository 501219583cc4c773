//! The daemon's life: start the interpreter, the GIL pool, the roles and the
//! tasks from a [`Config`], report readiness, reload on request, then shut
//! down in order within `daemon.shutdown_grace`.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sd_notify::NotifyState;
use tokio::sync::mpsc;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::py::pool::{GilPool, PoolConfig};
use crate::py::task::{RunningTask, StopFlag};
use crate::shutdown::SignalEvent;
use crate::supervisor::{self, Supervisor};
use crate::systemd::notify;
use crate::{Error, py};

/// How long tasks get, after `SystemExit` was raised in them, to end.
const FORCED_STOP_WAIT: Duration = Duration::from_secs(1);

/// What the daemon is asked to do while it runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    /// Re-read the config file and restart the roles that changed.
    Reload,
    /// Stop (gracefully).
    Stop,
    /// A worker of a supervisor: start the roles left to worker 0 (deferred
    /// while the worker 0 this one replaces still ran them).
    TakeSingletons,
    /// A worker of a supervisor: stop accepting, stop the other roles, serve
    /// the open connections until they close (or `reload_drain`), then stop.
    Retire,
}

/// A started daemon.
pub struct Daemon {
    config: Config,
    pool: Arc<GilPool>,
    tasks: Vec<RunningTask>,
    stop: Arc<StopFlag>,
    supervisor: Supervisor,
    roles: TaskTracker,
    token: CancellationToken,
    /// Worker-0 roles and tasks not started yet (a rolling reload's new worker 0).
    deferred: bool,
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
    /// Initialises Python (with `python_log_level` as the root logging level)
    /// and starts the pool (roles, whose Python targets are resolved then,
    /// and tasks start in [`Daemon::run_until`]). Call from a plain thread,
    /// not a tokio worker: it takes the GIL.
    ///
    /// # Errors
    /// [`Error::Startup`] if the interpreter, pool or a task thread cannot start.
    pub fn start(config: Config, python_log_level: u32) -> Result<Self, Error> {
        let settings = py::PySettings {
            interpreter: config.python.interpreter().map_err(Error::Interpreter)?,
            log_level: python_log_level,
            max_output_line: usize::try_from(config.python.max_output_line.as_u64())
                .unwrap_or(usize::MAX),
        };
        let python = py::init(&config.python.paths, &settings)?;
        tracing::info!("embedded {python}");
        for note in &settings.interpreter.notes {
            tracing::warn!("{note}");
        }
        let mut pool_config = PoolConfig::new(
            config.python.workers,
            config.python.queue,
            config.python.call_timeout,
        );
        pool_config.spin = config.python.spin;
        pool_config.caller_spin_polls = config.python.caller_polls;
        pool_config.io_threads = config.io_threads();
        let pool = GilPool::start(&pool_config)?;
        let stop = Arc::new(StopFlag::default());
        let (roles, token) = (TaskTracker::new(), CancellationToken::new());
        let supervisor = Supervisor::new(
            pool.clone(),
            token.clone(),
            roles.clone(),
            config.daemon.reload_drain,
        );
        Ok(Self {
            config,
            pool,
            tasks: Vec::new(),
            stop,
            supervisor,
            roles,
            token,
            deferred: crate::workers::this_worker().is_some_and(|w| w.defer_singletons),
        })
    }

    /// Resolves and starts every role (servers bind), the admin endpoint and
    /// the tasks. Called by [`Daemon::run_until`] before readiness is reported.
    ///
    /// # Errors
    /// [`Error::Target`] or [`Error::Startup`] naming the role that cannot start.
    pub async fn start_roles(&mut self) -> Result<Vec<(String, std::net::SocketAddr)>, Error> {
        // The admin socket and the metrics recorder come first: a role's
        // series are registered (at zero) as it starts, and registrations
        // made before the recorder exists would go nowhere.
        let admin = match &self.config.admin.listen {
            Some(listen) => {
                let addr = crate::tcp::parse_listen(listen).map_err(Error::Startup)?;
                let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| {
                    Error::Startup(format!("admin endpoint cannot listen on {addr}: {e}"))
                })?;
                crate::admin::metrics_handle();
                Some(listener)
            }
            None => None,
        };
        let mut roles = supervisor::role_configs(&self.config);
        if self.deferred {
            roles.retain(|_, r| matches!(r, supervisor::RoleConfig::Server(_)));
            tracing::info!(
                "worker-0 roles and tasks wait until the worker this one replaces has stopped them"
            );
        }
        let bound = self.supervisor.start(&roles).await?;
        if let Some(listener) = admin {
            if crate::workers::this_worker().is_some()
                && let Ok(addr) = listener.local_addr()
            {
                notify(&[NotifyState::Custom(&format!("X_PYIPCD_ADMIN={addr}"))]);
            }
            self.roles.spawn(crate::admin::serve(
                listener,
                self.pool.clone(),
                self.token.child_token(),
            ));
        }
        if !self.deferred {
            self.start_tasks()?;
        }
        Ok(bound)
    }

    /// Starts the tasks: last, so `pyipcd.send` finds every role from their first line on.
    fn start_tasks(&mut self) -> Result<(), Error> {
        for t in &self.config.python.task {
            self.tasks.push(RunningTask::spawn(t, self.stop.clone())?);
        }
        Ok(())
    }

    /// Starts the roles and tasks held back by a deferred start.
    async fn take_singletons(&mut self) {
        if !std::mem::take(&mut self.deferred) {
            return;
        }
        let applied = self
            .supervisor
            .apply(&supervisor::role_configs(&self.config))
            .await;
        for (name, why) in &applied.failed {
            tracing::error!(role = %name, "cannot start: {why}");
        }
        if let Err(e) = self.start_tasks() {
            tracing::error!("{e}");
        }
        tracing::info!(started = ?applied.started, "took over the worker-0 roles and tasks");
    }

    /// Leaves a rolling reload (see [`Control::Retire`]): returns when every
    /// role has ended, or at a stop request.
    async fn retire(&mut self, control: &mut mpsc::Receiver<Control>) {
        tracing::info!(
            "retiring: no new connections; serving the open ones for up to {:?}",
            self.config.daemon.reload_drain
        );
        let (others, all) = self.supervisor.retire_all();
        crate::workers::balance::leave();
        py::module::set_stopping();
        self.stop.set();
        let grace = self.config.daemon.shutdown_grace;
        let tasks = &mut self.tasks;
        let tasks_and_others = async {
            others.await;
            for name in end_tasks(tasks, Instant::now() + grace).await {
                tracing::warn!(task = %name, "task still running; the next worker 0 starts its own");
            }
        };
        tokio::select! {
            () = tasks_and_others => {}
            Some(Control::Stop) = control.recv() => return,
        }
        // The replacement worker 0 may start them now.
        notify(&[NotifyState::Custom("X_PYIPCD_SINGLETONS=released")]);
        tokio::select! {
            () = all => {}
            Some(Control::Stop) = control.recv() => {}
        }
    }

    /// The GIL pool.
    pub fn pool(&self) -> &Arc<GilPool> {
        &self.pool
    }

    /// Starts the roles, reports readiness, waits for `shutdown`, then stops everything.
    ///
    /// # Errors
    /// If a role cannot start (nothing is left running then).
    pub async fn run_until(
        mut self,
        mut control: mpsc::Receiver<Control>,
    ) -> Result<Outcome, Error> {
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
        let worker = crate::workers::this_worker().is_some();
        if let Some(limit) = crate::workers::identity::max_requests() {
            self.roles.spawn(crate::workers::ask_for_replacement_after(
                limit,
                self.token.child_token(),
            ));
        }
        while let Some(request) = control.recv().await {
            match request {
                Control::Reload if worker => {
                    tracing::warn!(
                        "SIGHUP ignored: a worker is reloaded by its supervisor (send SIGHUP to the supervisor)"
                    );
                }
                Control::Reload => self.reload().await,
                Control::TakeSingletons => self.take_singletons().await,
                Control::Retire => {
                    self.retire(&mut control).await;
                    break;
                }
                Control::Stop => break,
            }
        }
        Ok(self.shutdown().await)
    }

    /// Re-reads the config file. On an error the running config stays and the
    /// reason is logged; otherwise only roles whose configuration changed are
    /// replaced, each as a transaction (see docs/configuration.md). Python
    /// settings, tasks, logging and the admin endpoint need a restart (a
    /// warning says so).
    pub async fn reload(&mut self) {
        crate::systemd::notify_reloading();
        let path = self.config.source.clone();
        tracing::info!(config = %path.display(), "SIGHUP: reloading");
        let new = match crate::config::load(&path) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!("reload failed; still serving the previous configuration: {e}");
                notify(&[
                    NotifyState::Ready,
                    NotifyState::Status("reload failed; previous configuration kept"),
                ]);
                return;
            }
        };
        if new.python != self.config.python
            || new.log != self.config.log
            || new.daemon != self.config.daemon
            || new.admin != self.config.admin
        {
            tracing::warn!(
                "reload: [python], [log], [daemon] and [admin] changes need a restart; keeping the running values"
            );
        }
        let applied = self.supervisor.apply(&supervisor::role_configs(&new)).await;
        self.config.tcp = new.tcp;
        self.config.shm = new.shm;
        let names = |v: &[(String, String)]| v.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>();
        let status = format!(
            "reloaded: started {:?}, replaced {:?}, stopped {:?}, failed {:?}",
            applied.started,
            applied.replaced,
            applied.stopped,
            names(&applied.failed)
        );
        if applied.failed.is_empty() {
            tracing::info!("{status}");
        } else {
            tracing::error!("{status}");
        }
        notify(&[NotifyState::Ready, NotifyState::Status(&status)]);
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
        let (late_tasks, stuck_calls) = tokio::join!(
            end_tasks(&mut self.tasks, deadline),
            self.pool.close(deadline)
        );
        let mut outcome = Outcome::default();
        for name in late_tasks {
            outcome.abandoned.push(format!("task {name}"));
        }
        for stuck in &stuck_calls {
            tracing::error!(
                role = %stuck.role,
                thread = %stuck.thread,
                "still in a call of role {} after {grace:?}; Python stack:\n{}",
                stuck.role,
                stuck.stack.trim_end()
            );
            outcome.abandoned.push(format!(
                "GIL pool thread {} (in a call of role {})",
                stuck.thread, stuck.role
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
        // STOPPING=1 (and anything before it) out before the process exits.
        crate::systemd::flush(Duration::from_millis(500));
        outcome
    }
}

/// Waits for `tasks` until `deadline`, then raises `SystemExit` in those
/// still running and gives them [`FORCED_STOP_WAIT`]; returns the names of
/// those that did not end even then.
async fn end_tasks(tasks: &mut [RunningTask], deadline: Instant) -> Vec<String> {
    let _ = tokio::time::timeout_at(
        deadline.into(),
        futures_join(tasks.iter_mut().map(RunningTask::wait)),
    )
    .await;
    let late: Vec<&RunningTask> = tasks.iter().filter(|t| !t.is_done()).collect();
    if late.is_empty() {
        return Vec::new();
    }
    for t in &late {
        tracing::warn!(task = %t.name, "task still running at the deadline; raising SystemExit in it");
        t.raise_system_exit();
    }
    let forced = Instant::now() + FORCED_STOP_WAIT;
    while Instant::now() < forced && tasks.iter().any(|t| !t.is_done()) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tasks
        .iter()
        .filter(|t| !t.is_done())
        .map(|t| t.name.to_string())
        .collect()
}

/// Awaits every future (they are few; no extra dependency needed).
async fn futures_join<F: Future<Output = ()>>(futs: impl Iterator<Item = F>) {
    for f in futs {
        f.await;
    }
}

/// The I/O runtime. One I/O thread gets a current-thread runtime, whose run
/// queue is FIFO and unbounded, so every connection gets its turn: a
/// one-worker multi-thread runtime overflows its 256-task local queue into a
/// global queue polled only every 61 tasks, which starved some of 1000 busy
/// connections (C=1000 p99 145 ms, now 75: docs/PERFORMANCE.md, issue 13).
pub fn io_runtime(threads: usize) -> std::io::Result<tokio::runtime::Runtime> {
    let mut builder = if threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(threads);
        b
    };
    builder.thread_name("pyipcd-io").enable_all().build()
}

/// Runs the daemon for `config` on a runtime of its own until SIGINT/SIGTERM,
/// and returns the process exit code. Signals are registered before the
/// interpreter starts.
///
/// # Errors
/// [`Error`] if start-up fails.
pub fn run(config: Config, python_log_level: u32) -> Result<i32, Error> {
    let runtime = io_runtime(config.io_threads())?;
    let mut signals = runtime.block_on(async { crate::shutdown::Signals::register() })?;
    crate::shutdown::exit_on_second_signal()?;
    let daemon = Daemon::start(config, python_log_level)?;
    daemon.pool().watch_io_runtime(runtime.metrics());
    // The runtime is driven from a thread named like the I/O threads (with
    // one I/O thread it is the I/O thread), not Python's main thread.
    let io = std::thread::Builder::new()
        .name("pyipcd-io".into())
        .spawn(move || {
            let outcome = runtime.block_on(async move {
                let (tx, rx) = mpsc::channel(4);
                tokio::spawn(async move {
                    loop {
                        match signals.next().await {
                            SignalEvent::Reload => {
                                let _ = tx.send(Control::Reload).await;
                            }
                            SignalEvent::TakeSingletons | SignalEvent::Retire
                                if crate::workers::this_worker().is_none() =>
                            {
                                tracing::warn!(
                                    "SIGUSR1/SIGUSR2 ignored: they are for worker processes"
                                );
                            }
                            SignalEvent::TakeSingletons => {
                                let _ = tx.send(Control::TakeSingletons).await;
                            }
                            SignalEvent::Retire => {
                                let _ = tx.send(Control::Retire).await;
                            }
                            SignalEvent::Stop(name, _) => {
                                tracing::info!("{name} received");
                                // A second one ends the process in the signal
                                // handler (`shutdown::exit_on_second_signal`).
                                let _ = tx.send(Control::Stop).await;
                                return;
                            }
                        }
                    }
                });
                daemon.run_until(rx).await
            });
            // A worker thread held by a call that never returns must not
            // hold the exit up (the stuck call was reported).
            runtime.shutdown_timeout(Duration::from_secs(1));
            outcome
        })?;
    let outcome = io
        .join()
        .map_err(|_| Error::Startup("the I/O thread panicked (logged above)".into()))??;
    Ok(outcome.exit_code())
}
