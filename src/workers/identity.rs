//! This process as one of a supervisor's workers: which one it is, which
//! roles it leaves to another worker, and the names under which the
//! supervisor passes the servers' listening sockets.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

/// The worker's index (0 to `daemon.processes` − 1), set by the supervisor
/// and left in the environment for Python code (`os.environ`).
pub const WORKER_ENV: &str = "PYIPCD_WORKER";
/// How many workers the generation has.
pub const WORKERS_ENV: &str = "PYIPCD_WORKERS";
/// The supervisor's serial number for this worker process (unique per start).
pub const SERIAL_ENV: &str = "PYIPCD_WORKER_SERIAL";
/// The config text the supervisor loaded (the worker reads it instead of
/// the file, and anchors relative paths at the file's folder as usual).
pub const CONFIG_ENV: &str = "PYIPCD_CONFIG_TEXT";
/// The number of requests after which the worker asks to be replaced.
pub const MAX_REQUESTS_ENV: &str = "PYIPCD_MAX_REQUESTS";
/// Set (to `1`) when the worker must not start its worker-0 roles until
/// told (SIGUSR1): the worker 0 it replaces still runs them.
pub const DEFER_ENV: &str = "PYIPCD_DEFER_SINGLETONS";

/// A worker process's identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Worker {
    /// Its index, 0 to `daemon.processes` − 1.
    pub index: usize,
    /// The supervisor's serial number for this process.
    pub serial: u64,
    /// Whether its worker-0 roles wait for SIGUSR1 (a rolling reload).
    pub defer_singletons: bool,
    /// How many workers its generation has.
    pub workers: usize,
}

static WORKER: OnceLock<Option<Worker>> = OnceLock::new();
static REQUESTS: AtomicU64 = AtomicU64::new(0);

/// Counts `n` requests answered (TCP messages, shm channel requests), for `max_requests`.
pub fn note_requests(n: u64) {
    REQUESTS.fetch_add(n, Ordering::Relaxed);
}

/// Requests answered so far by this process.
pub fn requests() -> u64 {
    REQUESTS.load(Ordering::Relaxed)
}

/// The `max_requests` (jitter applied) the supervisor gave this worker.
pub fn max_requests() -> Option<u64> {
    this_worker()?;
    std::env::var(MAX_REQUESTS_ENV)
        .ok()?
        .parse()
        .ok()
        .filter(|n| *n > 0)
}
static ELSEWHERE: OnceLock<Vec<String>> = OnceLock::new();

/// This process as a worker; `None` for a daemon started by hand (or the
/// supervisor itself). Read from the environment once.
pub fn this_worker() -> Option<&'static Worker> {
    WORKER
        .get_or_init(|| {
            let index = std::env::var(WORKER_ENV).ok()?.parse().ok()?;
            let serial = std::env::var(SERIAL_ENV).ok()?.parse().ok()?;
            Some(Worker {
                index,
                serial,
                defer_singletons: std::env::var_os(DEFER_ENV).is_some(),
                workers: std::env::var(WORKERS_ENV)
                    .ok()
                    .and_then(|n| n.parse().ok())
                    .unwrap_or(1),
            })
        })
        .as_ref()
}

/// Records the roles that run in worker 0, not here (`pyipcd.send` names them).
pub fn set_elsewhere(roles: Vec<String>) {
    let _ = ELSEWHERE.set(roles);
}

/// Why `pyipcd.send(role, …)` cannot reach `role` from this worker, if it
/// runs in worker 0 instead.
pub fn runs_elsewhere(role: &str) -> Option<String> {
    let worker = this_worker()?;
    ELSEWHERE
        .get()
        .is_some_and(|e| e.iter().any(|r| r == role))
        .then(|| {
            format!(
                "role {role:?} runs in worker 0, and this is worker {}: pyipcd.send reaches roles of its own process (set processes = \"all\" on the role to run it in every worker)",
                worker.index
            )
        })
}

/// The name (`LISTEN_FDNAMES`) under which the supervisor passes the
/// listening socket of server role `role`: hex, since role names may hold
/// the `:` that separates names.
pub fn socket_name(role: &str) -> String {
    let mut name = String::from("pyipcd-");
    for b in role.bytes() {
        name.push_str(&format!("{b:02x}"));
    }
    name
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_names_carry_no_separator() {
        assert_eq!(socket_name("a:b"), "pyipcd-613a62");
        assert_ne!(socket_name("ab"), socket_name("a b"));
    }
}
