//! Roles as one collection: started from the config, and on reload changed
//! as a transaction per role. The diff is [`plan`]'s pure function; then,
//! for each new or changed role, the new instance is resolved in Python and
//! started first (taking over the old one's listening socket, shm file and
//! unchanged Python objects), and only then is the old instance retired. A
//! role whose new instance cannot start keeps its old one serving; the
//! failure is logged and shown in `/health` and the systemd status.

mod instance;
pub mod plan;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::Error;
use crate::py::pool::GilPool;
use crate::registry::{HealthLatch, next_generation, registry};
use crate::shm::channel::Take;
use instance::{Instance, Launcher, Parts, Takeover};
pub use plan::{Change, Keep, RoleConfig, plan, role_configs};

/// The running role instances and what a reload needs to change them.
pub struct Supervisor {
    pool: Arc<GilPool>,
    root: CancellationToken,
    tracker: TaskTracker,
    drain: Duration,
    running: BTreeMap<String, Instance>,
    /// Roles that failed to start, shown as down until the next reload.
    failed: BTreeMap<String, HealthLatch>,
}

/// What applying a config did.
#[derive(Debug, Default)]
pub struct Applied {
    /// Roles new to the config, now running.
    pub started: Vec<String>,
    /// Changed roles now served by a new instance.
    pub replaced: Vec<String>,
    /// Roles gone from the config, retired.
    pub stopped: Vec<String>,
    /// Roles whose new instance could not start, with why; a changed role
    /// keeps its old instance serving.
    pub failed: Vec<(String, String)>,
}

/// Why a role's new instance did not start.
enum Failure {
    Resolve(crate::py::target::ResolveError),
    Start(String),
}

impl Supervisor {
    /// An empty supervisor: roles run on `tracker` under `root`; a retired
    /// server's connections get `drain` to finish.
    pub fn new(
        pool: Arc<GilPool>,
        root: CancellationToken,
        tracker: TaskTracker,
        drain: Duration,
    ) -> Self {
        Self {
            pool,
            root,
            tracker,
            drain,
            running: BTreeMap::new(),
            failed: BTreeMap::new(),
        }
    }

    /// Starts every role in `wanted` (the daemon's start: any failure is fatal).
    /// Returns the servers' bound addresses.
    ///
    /// # Errors
    /// [`Error::Target`] for a Python target, [`Error::Startup`] for a socket or file.
    pub async fn start(
        &mut self,
        wanted: &BTreeMap<String, RoleConfig>,
    ) -> Result<Vec<(String, SocketAddr)>, Error> {
        for change in plan(&BTreeMap::new(), wanted) {
            let Change::Start { name, keep } = change else {
                continue;
            };
            let parts = instance::resolve(&wanted[&name], None, &keep)
                .await
                .map_err(Error::Target)?;
            let instance = self
                .bring_up(&name, &wanted[&name], parts, &keep, &BTreeMap::new())
                .await
                .map_err(Error::Startup)?;
            self.running.insert(name, instance);
        }
        Ok(self
            .running
            .iter()
            .filter_map(|(name, i)| i.addr.map(|a| (name.clone(), a)))
            .collect())
    }

    /// Changes the running roles into `wanted` (a reload), role by role:
    /// new instances first, then the retirement of the ones they replace.
    pub async fn apply(&mut self, wanted: &BTreeMap<String, RoleConfig>) -> Applied {
        let running: BTreeMap<String, RoleConfig> = self
            .running
            .iter()
            .map(|(n, i)| (n.clone(), i.config.clone()))
            .collect();
        let changes = plan(&running, wanted);
        // Python first, for every role: a role whose replacement cannot be
        // resolved keeps its instance, and nothing is handed over from it.
        let mut resolved = BTreeMap::new();
        let mut failures: BTreeMap<String, Failure> = BTreeMap::new();
        for change in &changes {
            let (Change::Start { name, keep } | Change::Replace { name, keep }) = change else {
                continue;
            };
            let old = self.running.get(name).map(|i| i.parts.clone());
            match instance::resolve(&wanted[name], old, keep).await {
                Ok(parts) => {
                    resolved.insert(name.clone(), parts);
                }
                Err(e) => {
                    failures.insert(name.clone(), Failure::Resolve(e));
                }
            }
        }
        let mut applied = Applied::default();
        let mut retiring: BTreeMap<String, (Instance, bool)> = BTreeMap::new();
        for change in changes {
            match change {
                Change::Start { name, keep } | Change::Replace { name, keep } => {
                    let Some(parts) = resolved.remove(&name) else {
                        continue;
                    };
                    // Hand-overs come only from instances that are retiring.
                    let mut sources: BTreeMap<&str, &Instance> = BTreeMap::new();
                    let own = keep.outbox.then_some(&name);
                    let named = keep
                        .socket_from
                        .iter()
                        .chain(keep.file_from.iter().map(|f| &f.0));
                    for from in named.chain(own) {
                        if failures.contains_key(from) {
                            continue;
                        }
                        if let Some(i) = self.running.get(from).or(retiring.get(from).map(|r| &r.0))
                        {
                            sources.insert(from.as_str(), i);
                        }
                    }
                    let brought = self
                        .bring_up(&name, &wanted[&name], parts, &keep, &sources)
                        .await;
                    let instance = match brought {
                        Ok(i) => i,
                        Err(e) => {
                            failures.insert(name, Failure::Start(e));
                            continue;
                        }
                    };
                    let adopted = keep.file_from.as_ref() == Some(&(name.clone(), Take::Adopt));
                    if let Some(old) = self.running.insert(name.clone(), instance) {
                        retiring.insert(name.clone(), (old, adopted));
                        applied.replaced.push(name);
                    } else {
                        applied.started.push(name);
                    }
                }
                Change::Stop { name } => {
                    if let Some(old) = self.running.remove(&name) {
                        retiring.insert(name.clone(), (old, false));
                        applied.stopped.push(name);
                    }
                }
            }
        }
        for (name, (old, adopted)) in retiring {
            old.retire(&name, self.drain, adopted, &self.tracker);
        }
        self.record_failures(failures, &mut applied);
        applied
    }

    /// Logs the failures, shows new roles that failed as down, and notes the
    /// changed roles whose old instance still serves.
    fn record_failures(&mut self, failures: BTreeMap<String, Failure>, applied: &mut Applied) {
        let mut failed = BTreeMap::new();
        let mut notes = Vec::new();
        for (name, failure) in failures {
            let why = match failure {
                Failure::Resolve(e) => e.with_reload_hint(),
                Failure::Start(e) => e,
            };
            if self.running.contains_key(&name) {
                tracing::error!(role = %name, "reload failed; the previous instance keeps serving: {why}");
                notes.push(format!(
                    "role {name}: reload failed, previous configuration still serving: {why}"
                ));
            } else {
                tracing::error!(role = %name, "not started: {why}");
                failed.insert(
                    name.clone(),
                    registry().claim(
                        &name,
                        next_generation(),
                        false,
                        &format!("not started: {why}"),
                    ),
                );
            }
            applied.failed.push((name, why));
        }
        // Older failure entries go only now, after any newer claim.
        self.failed = failed;
        registry().set_notes(notes);
    }

    /// Takes a resolved role's resources (from `sources`, the retiring
    /// instances that `keep` names, where it says so) and launches it.
    async fn bring_up(
        &self,
        name: &str,
        cfg: &RoleConfig,
        parts: Parts,
        keep: &Keep,
        sources: &BTreeMap<&str, &Instance>,
    ) -> Result<Instance, String> {
        let launcher = Launcher {
            pool: &self.pool,
            monitor: self.pool.monitor(),
            root: &self.root,
            tracker: &self.tracker,
        };
        let takeover = Takeover {
            socket: keep
                .socket_from
                .as_deref()
                .and_then(|from| sources.get(from))
                .and_then(|i| i.socket()),
            file: keep.file_from.as_ref().and_then(|(from, take)| {
                sources.get(from.as_str()).map(|i| (i.done.clone(), *take))
            }),
            outbox: sources
                .get(name)
                .filter(|_| keep.outbox)
                .and_then(|i| Some((i.outbox.clone()?, i.done.clone()))),
        };
        let generation = next_generation();
        let ready = launcher
            .prepare(name, cfg, parts, generation, takeover)
            .await?;
        Ok(launcher.launch(name, cfg.clone(), ready, generation))
    }
}
