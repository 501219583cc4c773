//! The supervisor's state: the servers' sockets, the worker processes (the
//! generation serving, a new one starting during a rolling reload, old ones
//! retiring), and the loop that answers their notices and exits, the
//! signals, and the clock.

use std::collections::BTreeMap;
use std::os::fd::{AsFd, BorrowedFd};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use sd_notify::NotifyState;
use tokio::sync::mpsc;

use super::admin;
use super::child::{Child, Event, RunDir, Spec};
use super::identity::socket_name;
use super::reload::Reload;
use super::{CRASH_LOOP, EARLY};
use crate::config::Config;
use crate::shutdown::{SignalEvent, Signals};
use crate::systemd::notify;
use crate::tcp::listener::ListenSocket;
use crate::{EXIT_CONFIG, EXIT_FAILURE, Error};

/// First restart delay after an early death; doubles with each one in a row.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
/// Longest restart delay.
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// How long a new worker may take to say `READY=1`.
pub(super) const START_TIMEOUT: Duration = Duration::from_secs(60);
/// Beyond `shutdown_grace` (and `reload_drain` for a retiring worker), how
/// long a worker gets before SIGKILL.
pub(super) const KILL_MARGIN: Duration = Duration::from_secs(5);

/// What a worker process is there for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Part {
    /// The generation serving.
    Serving,
    /// A new generation starting (rolling reload), not serving yet.
    Incoming,
    /// An old generation finishing its connections; told at this instant.
    Retiring(Instant),
    /// Starting to replace the serving worker with this serial (recycling;
    /// `None` once that one is gone).
    Replacement(Option<u64>),
}

/// A worker process and its part.
#[derive(Debug)]
pub(super) struct Proc {
    pub(super) child: Child,
    pub(super) part: Part,
}

/// A server's listening socket, bound once by the supervisor.
#[derive(Debug)]
pub(super) struct Bound {
    /// The server role.
    pub(super) role: String,
    /// Its `listen` value, which a reload may keep (same socket) or change.
    pub(super) listen: String,
    pub(super) socket: ListenSocket,
}

/// The supervisor.
pub(super) struct Fleet {
    pub(super) config: Config,
    exe: PathBuf,
    run_dir: RunDir,
    pub(super) sockets: Vec<Bound>,
    /// The serving generation's accept-balance mapping (`balance`).
    pub(super) balance: std::os::fd::OwnedFd,
    pub(super) procs: BTreeMap<u64, Proc>,
    next_serial: u64,
    /// Early deaths in a row, per worker index.
    early: BTreeMap<usize, u32>,
    /// Worker indexes waiting to be started again, and when.
    restarts: Vec<(usize, Instant)>,
    events: mpsc::Sender<Event>,
    pub(super) inbox: mpsc::Receiver<Event>,
    watchdog: Option<Duration>,
    /// When `WATCHDOG=1` last went to systemd.
    pinged: Instant,
    /// `READY=1` sent to systemd.
    announced: bool,
    pub(super) reload: Option<Reload>,
    /// The process running the worker-0 roles (tasks, clients, shm
    /// regions); at most one at any time.
    pub(super) holder: Option<u64>,
    /// A worker 0 started without them, waiting for the holder to let go.
    pub(super) singletons_for: Option<u64>,
    /// Workers started again, by why.
    pub(super) respawns: BTreeMap<&'static str, u64>,
    /// When lifetimes and memory were last checked.
    recycle_checked: Instant,
    /// The admin endpoint's socket, until it serves.
    admin: Option<std::net::TcpListener>,
    /// What the admin endpoint shows.
    view: admin::Shared,
}

/// What the loop does next.
enum Next {
    Continue,
    /// Stop every worker; exit with this status (or the workers' own).
    Stop(Option<i32>),
}

impl Fleet {
    /// Binds every server's socket and makes the folder for the workers'
    /// notify sockets.
    ///
    /// # Errors
    /// [`Error::Listen`] or [`Error::Startup`] naming the server that cannot listen.
    pub(super) fn bind(config: Config) -> Result<Self, Error> {
        let sockets = config
            .tcp
            .server
            .iter()
            .map(|s| {
                let socket = ListenSocket::open(s, None).map_err(|e| e.for_role(&s.name, &s.listen))?;
                tracing::info!(role = %s.name, "listening on {} for {} worker(s)", socket.describe(), config.daemon.processes);
                Ok(Bound {
                    role: s.name.clone(),
                    listen: s.listen.clone(),
                    socket,
                })
            })
            .collect::<Result<Vec<_>, Error>>()?;
        let admin = match &config.admin.listen {
            Some(listen) => {
                let addr = crate::tcp::parse_listen(listen).map_err(Error::Startup)?;
                let listener = std::net::TcpListener::bind(addr).map_err(|e| {
                    Error::Startup(format!("admin endpoint cannot listen on {addr}: {e}"))
                })?;
                listener.set_nonblocking(true)?;
                Some(listener)
            }
            None => None,
        };
        let (events, inbox) = mpsc::channel(1024);
        Ok(Self {
            admin,
            view: admin::Shared::default(),
            exe: std::env::current_exe()?,
            run_dir: RunDir::create()?,
            balance: super::child::balance_map()?,
            sockets,
            procs: BTreeMap::new(),
            next_serial: 1,
            early: BTreeMap::new(),
            restarts: Vec::new(),
            events,
            inbox,
            watchdog: crate::systemd::watchdog_period(),
            pinged: Instant::now(),
            announced: false,
            reload: None,
            holder: None,
            singletons_for: None,
            respawns: BTreeMap::new(),
            recycle_checked: Instant::now(),
            config,
        })
    }

    /// Starts the workers and supervises them until a stop; returns the exit status.
    pub(super) async fn run(&mut self, mut signals: Signals) -> i32 {
        if let Some(listener) = self.admin.take() {
            match tokio::net::TcpListener::from_std(listener) {
                Ok(listener) => {
                    tokio::spawn(admin::serve(listener, self.view.clone()));
                }
                Err(e) => tracing::error!("admin endpoint: {e}"),
            }
        }
        for index in 0..self.config.daemon.processes {
            if let Err(e) = self.start(index, Part::Serving, false, None) {
                tracing::error!("cannot start worker {index}: {e}");
                return self.stop(&mut signals, Some(EXIT_FAILURE)).await;
            }
        }
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            // Restarts wait while a rolling reload is under way (its new
            // generation takes their place).
            let due = (self.reload.is_none())
                .then(|| self.restarts.iter().map(|(_, at)| *at).min())
                .flatten();
            let next = tokio::select! {
                Some(event) = self.inbox.recv() => self.on_event(event),
                signal = signals.next() => match signal {
                    SignalEvent::Stop(name, _) => {
                        tracing::info!("{name} received: stopping {} worker(s)", self.procs.len());
                        Next::Stop(None)
                    }
                    SignalEvent::Reload => {
                        self.begin_reload();
                        Next::Continue
                    }
                    SignalEvent::TakeSingletons | SignalEvent::Retire => {
                        tracing::warn!("SIGUSR1/SIGUSR2 ignored: they are for worker processes");
                        Next::Continue
                    }
                },
                () = sleep_until(due), if due.is_some() => self.restart_due(),
                _ = tick.tick() => self.on_tick(),
            };
            if let Next::Stop(code) = next {
                return self.stop(&mut signals, code).await;
            }
            self.publish();
        }
    }

    /// Shows the workers as they are now on the admin endpoint.
    fn publish(&self) {
        let view = admin::View {
            serving: self
                .serving()
                .map(|p| {
                    let c = &p.child;
                    (c.index, (c.pid, c.ready.is_some(), c.admin.clone()))
                })
                .collect(),
            wanted: self.config.daemon.processes,
            respawns: self.respawns.clone(),
            reloading: self.reload.is_some(),
        };
        *crate::sync::lock(&self.view) = view;
    }

    /// Starts worker `index` (on `sockets`, or the current ones).
    ///
    /// # Errors
    /// If its notify socket or the process cannot be made.
    pub(super) fn start(
        &mut self,
        index: usize,
        part: Part,
        defer_singletons: bool,
        generation: Option<(&[Bound], BorrowedFd<'_>, usize)>,
    ) -> std::io::Result<u64> {
        let serial = self.next_serial;
        self.next_serial += 1;
        let (sockets, balance, workers) = generation.unwrap_or((
            &self.sockets,
            self.balance.as_fd(),
            self.config.daemon.processes,
        ));
        let mut named: Vec<(String, BorrowedFd<'_>)> = sockets
            .iter()
            .map(|b| (socket_name(&b.role), b.socket.as_fd()))
            .collect();
        named.push((super::balance::FD_NAME.to_string(), balance));
        let (max_requests, deadline) = self.limits(serial);
        let spec = Spec {
            max_requests,
            // A serving start is the first (a fresh map) or a restart after
            // a death: either way its slot starts at zero.
            after_death: part == Part::Serving,
            exe: &self.exe,
            config: &self.config.source,
            config_text: &self.config.text,
            index,
            workers,
            serial,
            sockets: &named,
            run_dir: self.run_dir.path(),
            defer_singletons,
            watchdog: self.watchdog,
        };
        let mut child = Child::spawn(&spec, &self.events)?;
        child.deadline = deadline;
        if index == 0 {
            if defer_singletons {
                self.singletons_for = Some(serial);
            } else {
                self.holder = Some(serial);
            }
        }
        tracing::info!(
            worker = index,
            pid = child.pid,
            "worker {index} started (pid {})",
            child.pid
        );
        self.procs.insert(serial, Proc { child, part });
        Ok(serial)
    }

    fn on_event(&mut self, event: Event) -> Next {
        match event {
            Event::Notice { serial, text } => {
                for line in text.lines() {
                    self.on_notice(serial, line);
                }
                Next::Continue
            }
            Event::Exited { serial, status } => match self.procs.remove(&serial) {
                Some(proc) => self.on_exit(serial, proc, status),
                None => Next::Continue,
            },
        }
    }

    fn on_notice(&mut self, serial: u64, line: &str) {
        let Some(proc) = self.procs.get_mut(&serial) else {
            return;
        };
        let (index, pid) = (proc.child.index, proc.child.pid);
        match line {
            "READY=1" if proc.child.ready.is_none() => {
                proc.child.ready = Some(Instant::now());
                tracing::info!(worker = index, pid, "worker {index} ready");
                match proc.part {
                    Part::Serving => self.announce_if_ready(),
                    Part::Incoming => self.finish_reload_if_ready(),
                    Part::Replacement(old) => self.replacement_ready(serial, old),
                    Part::Retiring(_) => {}
                }
                // A worker 0 waiting for the roles can be given them now.
                self.hand_singletons();
            }
            "WATCHDOG=1" => proc.child.pinged = Instant::now(),
            _ if line.starts_with("X_PYIPCD_ADMIN=") => {
                proc.child.admin = Some(line["X_PYIPCD_ADMIN=".len()..].to_string());
            }
            "X_PYIPCD_RECYCLE=max_requests" => self.replace(serial, "max_requests"),
            // Only the process that holds them can let them go.
            "X_PYIPCD_SINGLETONS=released" if self.holder == Some(serial) => {
                tracing::info!(
                    worker = index,
                    pid,
                    "worker {index} (pid {pid}) stopped its worker-0 roles"
                );
                self.holder = None;
                self.hand_singletons();
            }
            _ => {}
        }
    }

    /// `READY=1` to systemd once every serving worker is ready.
    fn announce_if_ready(&mut self) {
        let serving: Vec<&Proc> = self.serving().collect();
        if self.announced
            || serving.len() < self.config.daemon.processes
            || serving.iter().any(|p| p.child.ready.is_none())
        {
            return;
        }
        self.announced = true;
        let status = self.status();
        tracing::info!("pyipcd {} ready; {status}", env!("CARGO_PKG_VERSION"));
        notify(&[NotifyState::Ready, NotifyState::Status(&status)]);
    }

    /// A line for `STATUS=` and the log.
    pub(super) fn status(&self) -> String {
        let pids: Vec<String> = self.serving().map(|p| p.child.pid.to_string()).collect();
        format!(
            "supervising {} worker process(es) (pids {})",
            pids.len(),
            pids.join(", ")
        )
    }

    pub(super) fn serving(&self) -> impl Iterator<Item = &Proc> {
        self.procs.values().filter(|p| p.part == Part::Serving)
    }

    fn on_exit(&mut self, proc_serial: u64, proc: Proc, status: std::process::ExitStatus) -> Next {
        // The worker-0 roles are free once their process is gone.
        if self.holder == Some(proc_serial) {
            self.holder = None;
        }
        if self.singletons_for == Some(proc_serial) {
            self.singletons_for = None;
        }
        let next = self.after_exit(proc_serial, proc, status);
        self.hand_singletons();
        next
    }

    fn after_exit(
        &mut self,
        proc_serial: u64,
        proc: Proc,
        status: std::process::ExitStatus,
    ) -> Next {
        let (index, pid) = (proc.child.index, proc.child.pid);
        match proc.part {
            Part::Retiring(_) => {
                tracing::info!(
                    worker = index,
                    pid,
                    "previous worker {index} (pid {pid}) exited: {status}"
                );
                Next::Continue
            }
            Part::Replacement(old) => {
                tracing::error!(
                    worker = index,
                    pid,
                    "replacement worker {index} (pid {pid}) exited before it was ready: {status}"
                );
                if self.replacement_failed(old) {
                    // The worker it replaced is gone too: start one again.
                    self.restarts.push((index, Instant::now() + BACKOFF_MIN));
                }
                Next::Continue
            }
            Part::Incoming => {
                tracing::error!(
                    worker = index,
                    pid,
                    "new worker {index} (pid {pid}) exited before it was ready: {status}"
                );
                self.abort_reload("a new worker exited before it was ready");
                Next::Continue
            }
            Part::Serving => {
                let serial = proc_serial;
                if let Some(r) = self
                    .procs
                    .values_mut()
                    .find(|p| p.part == Part::Replacement(Some(serial)))
                {
                    // Its replacement is on the way: it takes the place.
                    r.part = Part::Replacement(None);
                    tracing::warn!(
                        worker = index,
                        pid,
                        "worker {index} (pid {pid}) exited while being replaced: {status}"
                    );
                    return Next::Continue;
                }
                if !self.announced && status.code() == Some(EXIT_CONFIG) {
                    tracing::error!(
                        worker = index,
                        pid,
                        "worker {index} exited with status 78: the configuration cannot run (its log says why)"
                    );
                    return Next::Stop(Some(EXIT_CONFIG));
                }
                let early = proc.child.ready.is_none_or(|ready| ready.elapsed() < EARLY);
                let deaths = self.early.entry(index).or_insert(0);
                *deaths = if early { *deaths + 1 } else { 0 };
                if *deaths >= CRASH_LOOP {
                    tracing::error!(
                        worker = index,
                        "crash loop: worker {index} exited {deaths} times in a row within {EARLY:?} of starting (last: {status}); stopping the daemon"
                    );
                    return Next::Stop(Some(EXIT_FAILURE));
                }
                let delay = if early {
                    (BACKOFF_MIN * 2u32.pow(deaths.saturating_sub(1))).min(BACKOFF_MAX)
                } else {
                    BACKOFF_MIN
                };
                tracing::warn!(
                    worker = index,
                    pid,
                    "worker {index} (pid {pid}) exited: {status}; starting it again in {delay:?}"
                );
                *self.respawns.entry("exit").or_insert(0) += 1;
                self.restarts.push((index, Instant::now() + delay));
                Next::Continue
            }
        }
    }

    fn restart_due(&mut self) -> Next {
        let now = Instant::now();
        let (due, later): (Vec<_>, Vec<_>) =
            self.restarts.drain(..).partition(|(_, at)| *at <= now);
        self.restarts = later;
        for (index, _) in due {
            // A worker 0 waits for the roles while another process holds them.
            let defer = index == 0 && self.holder.is_some();
            if let Err(e) = self.start(index, Part::Serving, defer, None) {
                tracing::error!("cannot start worker {index} again: {e}");
                return Next::Stop(Some(EXIT_FAILURE));
            }
        }
        Next::Continue
    }

    fn on_tick(&mut self) -> Next {
        let now = Instant::now();
        for proc in self.procs.values() {
            if proc.part == Part::Serving && proc.child.ready.is_some_and(|r| now - r >= EARLY) {
                self.early.remove(&proc.child.index);
            }
            if proc.child.ready.is_none()
                && matches!(proc.part, Part::Serving | Part::Replacement(_))
                && now - proc.child.started > START_TIMEOUT
            {
                tracing::error!(
                    worker = proc.child.index,
                    pid = proc.child.pid,
                    "worker {} not ready within {START_TIMEOUT:?}: killing it",
                    proc.child.index
                );
                proc.child.signal(Signal::SIGKILL);
            }
            if let Part::Retiring(since) = proc.part
                && now - since
                    > self.config.daemon.reload_drain
                        + self.config.daemon.shutdown_grace
                        + KILL_MARGIN
            {
                tracing::warn!(
                    worker = proc.child.index,
                    pid = proc.child.pid,
                    "previous worker still running after reload_drain + shutdown_grace: killing it"
                );
                proc.child.signal(Signal::SIGKILL);
            }
        }
        if self
            .reload
            .as_ref()
            .is_some_and(|r| now - r.started > START_TIMEOUT)
        {
            self.abort_reload(&format!(
                "the new workers were not ready within {START_TIMEOUT:?}"
            ));
        }
        if now - self.recycle_checked >= Duration::from_secs(1) {
            self.recycle_checked = now;
            self.recycle_tick();
        }
        if let Some(period) = self.watchdog
            && self.announced
            && now - self.pinged >= period / 2
            // A worker still starting pings only once ready (the start
            // timeout covers it).
            && self
                .serving()
                .filter(|p| p.child.ready.is_some())
                .all(|p| now - p.child.pinged < period)
        {
            self.pinged = now;
            notify(&[NotifyState::Watchdog]);
        }
        Next::Continue
    }

    /// Forgets the workers waiting to be started again (a new generation replaced them).
    pub(super) fn restarts_clear(&mut self) {
        self.restarts.clear();
        self.early.clear();
    }
}

/// Sleeps until `at` (the `select!` arm is off when there is none).
async fn sleep_until(at: Option<Instant>) {
    if let Some(at) = at {
        tokio::time::sleep_until(at.into()).await;
    }
}
