//! `[daemon] processes = N`: which worker process runs which role. TCP
//! servers run in every worker (they share the listening sockets); tasks,
//! TCP clients and shm regions run in worker 0 unless they say
//! `processes = "all"`, so nothing runs twice by accident.

use serde::Deserialize;

use super::Config;

/// Where a task, TCP client or shm region runs when `daemon.processes` > 1.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Placement {
    /// In worker 0 only (the default).
    #[default]
    One,
    /// In every worker (a shm region's `path` then names `{worker}`).
    All,
}

/// Replaced by the worker's index in an shm region's `path`.
pub const WORKER_PLACEHOLDER: &str = "{worker}";

/// The most worker processes a config may ask for.
pub const MAX_PROCESSES: usize = 256;

/// What one worker runs: its config, and the roles it leaves to worker 0.
#[derive(Debug, Clone)]
pub struct WorkerShare {
    /// The config with only this worker's roles (and `{worker}` filled in).
    pub config: Config,
    /// Roles (and tasks) that run in worker 0 only, absent from this one.
    pub elsewhere: Vec<String>,
}

impl Config {
    /// Problems with `processes` and role placement.
    pub(super) fn validate_placement(&self, problems: &mut Vec<String>) {
        let n = self.daemon.processes;
        if n == 0 || n > MAX_PROCESSES {
            problems.push(format!(
                "daemon.processes must be between 1 and {MAX_PROCESSES} (got {n})"
            ));
        }
        let d = &self.daemon;
        let recycles = [
            ("max_requests", d.max_requests > 0),
            ("max_rss", d.max_rss.is_some()),
            ("lifetime", d.lifetime.is_some()),
        ];
        for (key, set) in recycles {
            if set && n == 1 {
                problems.push(format!(
                    "daemon.{key}: replacing workers needs daemon.processes > 1 (a supervisor)"
                ));
            }
        }
        if !(0.0..=0.5).contains(&d.recycle_jitter) {
            problems.push(format!(
                "daemon.recycle_jitter must be between 0 and 0.5 (got {})",
                d.recycle_jitter
            ));
        }
        let slices = std::time::Duration::from_micros(100)..=std::time::Duration::from_millis(100);
        if !d.sched_slice.is_zero() && !slices.contains(&d.sched_slice) {
            problems.push(format!(
                "daemon.sched_slice must be 0 (the kernel's default) or between 100us and 100ms (got {:?})",
                d.sched_slice
            ));
        }
        if d.max_rss_samples == 0 {
            problems.push("daemon.max_rss_samples must be at least 1".into());
        }
        if d.lifetime
            .is_some_and(|l| l < std::time::Duration::from_secs(1))
        {
            problems.push("daemon.lifetime must be at least 1s".into());
        }
        for (i, r) in self.shm.region.iter().enumerate() {
            let named = r.path.to_string_lossy().contains(WORKER_PLACEHOLDER);
            match r.processes {
                Placement::All if n > 1 && !named => problems.push(format!(
                    "shm.region[{i}].path: with processes = \"all\" every worker maps its own file: put `{WORKER_PLACEHOLDER}` in the path"
                )),
                Placement::One if named => problems.push(format!(
                    "shm.region[{i}].path: `{WORKER_PLACEHOLDER}` is only for processes = \"all\""
                )),
                _ => {}
            }
        }
    }

    /// What worker `index` runs: every TCP server, and the tasks, clients
    /// and shm regions placed in it (`processes = "all"`, or any when it is
    /// worker 0), with `{worker}` replaced by `index`.
    pub fn for_worker(&self, index: usize) -> WorkerShare {
        let here = |p: Placement| p == Placement::All || index == 0;
        let mut config = self.clone();
        let mut elsewhere = Vec::new();
        let mut keep = |name: &str, p: Placement| {
            if !here(p) {
                elsewhere.push(name.to_string());
            }
            here(p)
        };
        config.python.task.retain(|t| keep(&t.name, t.processes));
        config.tcp.client.retain(|c| keep(&c.name, c.processes));
        config.shm.region.retain(|r| keep(&r.name, r.processes));
        for r in &mut config.shm.region {
            let path = r.path.to_string_lossy();
            if path.contains(WORKER_PLACEHOLDER) {
                r.path = path.replace(WORKER_PLACEHOLDER, &index.to_string()).into();
            }
        }
        WorkerShare { config, elsewhere }
    }
}
