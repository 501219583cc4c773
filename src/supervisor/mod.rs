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

use futures::future::BoxFuture;
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
            let ready = self.prepare(&name, &wanted[&name], parts, &keep)?;
            let instance =
                self.launcher()
                    .launch(&name, wanted[&name].clone(), ready, next_generation());
            self.running.insert(name, instance);
        }
        Ok(self
            .running
            .iter()
            .filter_map(|(name, i)| i.addr.map(|a| (name.clone(), a)))
            .collect())
    }

    /// Changes the running roles into `wanted` (a reload), as a transaction
    /// per role: every new instance is resolved in Python and given its
    /// resources first; then those whose sources all succeeded are launched;
    /// then the instances they replace and the roles that are gone retire.
    pub async fn apply(&mut self, wanted: &BTreeMap<String, RoleConfig>) -> Applied {
        // An instance that ended by itself counts as absent: it starts again.
        let running: BTreeMap<String, RoleConfig> = self
            .running
            .iter()
            .filter(|(_, i)| !i.has_ended())
            .map(|(n, i)| (n.clone(), i.config.clone()))
            .collect();
        let changes = plan(&running, wanted);
        let mut failures: BTreeMap<String, Failure> = BTreeMap::new();
        // 1. Python, for every new or changed role.
        let mut resolved = BTreeMap::new();
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
        // 2. Resources. Nothing new runs yet, so every source a `Keep`
        // names is still the old instance.
        let mut prepared = Vec::new();
        for change in &changes {
            let (Change::Start { name, keep } | Change::Replace { name, keep }) = change else {
                continue;
            };
            let Some(parts) = resolved.remove(name) else {
                continue;
            };
            match self.prepare(name, &wanted[name], parts, keep) {
                Ok(ready) => prepared.push((name.clone(), keep.clone(), ready)),
                Err(Error::Startup(why) | Error::Listen(why)) => {
                    failures.insert(name.clone(), Failure::Start(why));
                }
                Err(e) => {
                    failures.insert(name.clone(), Failure::Start(e.to_string()));
                }
            }
        }
        // 3. A role whose change failed keeps its old instance, and with it
        // its socket and file: whatever was to take them fails too.
        loop {
            let before = failures.len();
            prepared.retain(|(name, keep, _)| {
                let blocked = keep.sources(name).find(|from| failures.contains_key(*from));
                if let Some(from) = blocked {
                    failures.insert(
                        name.clone(),
                        Failure::Start(format!(
                            "it takes over the socket or file of role `{from}`, whose reload failed"
                        )),
                    );
                }
                blocked.is_none()
            });
            if failures.len() == before {
                break;
            }
        }
        // 4. Launch, then retire what they replace and the roles that are gone.
        let mut applied = Applied::default();
        let mut retiring = Vec::new();
        for (name, keep, ready) in prepared {
            let instance =
                self.launcher()
                    .launch(&name, wanted[&name].clone(), ready, next_generation());
            let adopted = keep.file_from.as_ref() == Some(&(name.clone(), Take::Adopt));
            if let Some(old) = self.running.insert(name.clone(), instance) {
                retiring.push((name.clone(), old, adopted));
                applied.replaced.push(name);
            } else {
                applied.started.push(name);
            }
        }
        for change in &changes {
            if let Change::Stop { name } = change
                && let Some(old) = self.running.remove(name)
            {
                retiring.push((name.clone(), old, false));
                applied.stopped.push(name.clone());
            }
        }
        for (name, old, adopted) in retiring {
            old.retire(&name, self.drain, adopted, &self.tracker);
        }
        self.record_failures(failures, &mut applied);
        applied
    }

    /// Retires every role (a worker leaving after a rolling reload): servers
    /// stop accepting and serve their open connections until those close or
    /// the drain passes; the other roles stop at once. Returns two futures:
    /// the non-server roles have ended, and every role has.
    pub fn retire_all(&mut self) -> (BoxFuture<'static, ()>, BoxFuture<'static, ()>) {
        let mut others = Vec::new();
        let mut all = Vec::new();
        for (name, instance) in std::mem::take(&mut self.running) {
            if !matches!(instance.config, RoleConfig::Server(_)) {
                others.push(instance.done.clone());
            }
            all.push(instance.done.clone());
            instance.retire(&name, self.drain, false, &self.tracker);
        }
        let join = |done: Vec<instance::Done>| -> BoxFuture<'static, ()> {
            Box::pin(async move {
                for d in done {
                    d.await;
                }
            })
        };
        (join(others), join(all))
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

    /// Takes a resolved role's resources, from the running (old) instances
    /// that `keep` names where it says so.
    fn prepare(
        &self,
        name: &str,
        cfg: &RoleConfig,
        parts: Parts,
        keep: &Keep,
    ) -> Result<instance::Ready, Error> {
        let old = |from: &str| self.running.get(from);
        let takeover = Takeover {
            socket: keep
                .socket_from
                .as_deref()
                .and_then(old)
                .and_then(Instance::socket),
            file: keep
                .file_from
                .as_ref()
                .and_then(|(from, take)| old(from).map(|i| (i.done.clone(), *take))),
            outbox: old(name)
                .filter(|_| keep.outbox)
                .and_then(|i| Some((i.outbox.clone()?, i.done.clone()))),
        };
        self.launcher().prepare(name, cfg, parts, takeover)
    }

    fn launcher(&self) -> Launcher<'_> {
        Launcher {
            pool: &self.pool,
            monitor: self.pool.monitor(),
            root: &self.root,
            tracker: &self.tracker,
        }
    }
}
