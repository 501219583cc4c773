//! Every `/metrics` family in one place: its name, type and help text, and
//! the series a role owns, registered (at zero) when the role starts, so a
//! scrape shows every documented series before anything has happened.
//!
//! Names follow the Prometheus conventions: counters end in `_total`, times
//! are in seconds, and every family has `# HELP` and `# TYPE` lines.

use metrics::{Counter, Gauge, Histogram, Unit};

use crate::py::pool::GilPool;

/// Messages received (TCP frames, shm requests), by role.
pub const MESSAGES: &str = "pyipcd_messages_total";
/// Bytes read and written, by role and direction.
pub const BYTES: &str = "pyipcd_bytes_total";
/// Calls that raised or failed, by role.
pub const ERRORS: &str = "pyipcd_errors_total";
/// Open connections, by role.
pub const CONNECTIONS: &str = "pyipcd_connections";
/// Connections refused at `max_connections`, by role.
pub const REFUSED: &str = "pyipcd_connections_refused_total";
/// Unix connections refused because the peer is not in `allow_uids`/`allow_gids`, by role.
pub const DENIED: &str = "pyipcd_connections_denied_total";
/// Hand-off to reply, by role.
pub const HANDLER_SECONDS: &str = "pyipcd_handler_seconds";
/// Task restarts, by task.
pub const TASK_RESTARTS: &str = "pyipcd_task_restarts_total";
/// Channel requests and replies dropped because their client had gone.
pub const SHM_STALE: &str = "pyipcd_shm_stale_total";

/// Describes every family (the `# HELP` lines); called once, when the
/// recorder is installed.
pub(super) fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    describe_counter!(MESSAGES, "Messages received, by role.");
    describe_counter!(
        BYTES,
        Unit::Bytes,
        "Bytes read (direction=in) and written (direction=out), by role."
    );
    describe_counter!(
        ERRORS,
        "Messages whose handler raised or failed (nothing was sent back), by role."
    );
    describe_gauge!(CONNECTIONS, "Open connections, by role.");
    describe_counter!(REFUSED, "Connections refused at max_connections, by role.");
    describe_counter!(
        DENIED,
        "Unix connections refused because the peer's uid/gid is not allowed, by role."
    );
    describe_histogram!(
        HANDLER_SECONDS,
        Unit::Seconds,
        "Time from a message's hand-off to its reply, by role."
    );
    describe_counter!(TASK_RESTARTS, "Times a task was restarted, by task.");
    describe_counter!(
        SHM_STALE,
        "Channel requests and replies dropped because their client had gone, by role."
    );
    for (name, help, _) in POOL_COUNTERS {
        describe_counter!(*name, *help);
    }
    for (name, help, _) in POOL_GAUGES {
        describe_gauge!(*name, *help);
    }
    publish_pool(None);
}

fn load(c: &std::sync::atomic::AtomicU64) -> u64 {
    c.load(std::sync::atomic::Ordering::Relaxed)
}

/// The pool's counters: name, help, and how to read one from the pool.
type PoolRead = fn(&GilPool) -> u64;
const POOL_COUNTERS: &[(&str, &str, PoolRead)] = &[
    (
        "pyipcd_pool_calls_total",
        "Python calls the GIL pool made.",
        |p| load(&p.stats().calls),
    ),
    ("pyipcd_pool_errors_total", "Pool calls that raised.", |p| {
        load(&p.stats().errors)
    }),
    (
        "pyipcd_pool_queue_full_waits_total",
        "Submissions that waited because the pool's queue was full.",
        |p| load(&p.stats().queue_full_waits),
    ),
    (
        "pyipcd_pool_timeouts_total",
        "Calls whose caller stopped waiting after python.call_timeout.",
        |p| load(&p.stats().timeouts),
    ),
    (
        "pyipcd_pool_calls_here_total",
        "Of pyipcd_pool_calls_total, those an I/O thread made itself because no core was free for a hand-off.",
        |p| load(&p.stats().calls_here),
    ),
    (
        "pyipcd_pool_skipped_total",
        "Calls never started because their caller had stopped waiting (call_timeout passed, connection closed).",
        |p| load(&p.stats().skipped),
    ),
    (
        "pyipcd_pool_spin_gate_shuts_total",
        "Times the host's load stopped the pool's spinning.",
        |p| p.spin_gate_shuts(),
    ),
];

/// The pool's gauges: name, help, and how to read one from the pool.
const POOL_GAUGES: &[(&str, &str, PoolRead)] = &[
    (
        "pyipcd_pool_queue_depth",
        "Calls queued for the GIL pool.",
        |p| p.queued() as u64,
    ),
    (
        "pyipcd_pool_busy_threads",
        "GIL pool threads in a Python call.",
        |p| p.busy() as u64,
    ),
    (
        "pyipcd_pool_io_busy_percent",
        "How busy the I/O threads were, in percent, as the spin gate last saw it (sampled while calls flow; 0 where the gate never samples: more pool and I/O threads than cores, or fewer CPUs for the process than the host has).",
        |p| u64::from(p.io_busy_percent()),
    ),
];

/// Sets the pool's series from `pool` (at zero without one).
pub(super) fn publish_pool(pool: Option<&GilPool>) {
    for (name, _, read) in POOL_COUNTERS {
        metrics::counter!(*name).absolute(pool.map_or(0, read));
    }
    for (name, _, read) in POOL_GAUGES {
        metrics::gauge!(*name).set(pool.map_or(0, read) as f64);
    }
}

/// A TCP server role's series, registered at zero.
pub struct ServerSeries {
    /// Connections refused at `max_connections`.
    pub refused: Counter,
    /// Connections refused by `allow_uids`/`allow_gids`.
    pub denied: Counter,
    /// Open connections.
    pub open: Gauge,
}

impl ServerSeries {
    /// Registers the role's server and message series.
    pub fn register(role: &str) -> Self {
        let _ = MessageSeries::register(role);
        Self {
            refused: metrics::counter!(REFUSED, "role" => role.to_string()),
            denied: metrics::counter!(DENIED, "role" => role.to_string()),
            open: metrics::gauge!(CONNECTIONS, "role" => role.to_string()),
        }
    }
}

/// The per-message series of a role that answers messages (TCP server, shm
/// channel), labels resolved once.
pub struct MessageSeries {
    /// Messages received.
    pub messages: Counter,
    /// Bytes read.
    pub bytes_in: Counter,
    /// Bytes written.
    pub bytes_out: Counter,
    /// Messages whose handler failed.
    pub errors: Counter,
    /// Hand-off to reply.
    pub latency: Histogram,
}

impl MessageSeries {
    /// Registers (or looks up) the series of `role`.
    pub fn register(role: &str) -> Self {
        let role = role.to_string();
        Self {
            messages: metrics::counter!(MESSAGES, "role" => role.clone()),
            bytes_in: metrics::counter!(BYTES, "role" => role.clone(), "direction" => "in"),
            bytes_out: metrics::counter!(BYTES, "role" => role.clone(), "direction" => "out"),
            errors: metrics::counter!(ERRORS, "role" => role.clone()),
            latency: metrics::histogram!(HANDLER_SECONDS, "role" => role),
        }
    }
}

/// A channel role's series: its messages and its stale drops.
pub fn channel_stale(role: &str) -> Counter {
    metrics::counter!(SHM_STALE, "role" => role.to_string())
}

/// A task's restart counter.
pub fn task_restarts(task: &str) -> Counter {
    metrics::counter!(TASK_RESTARTS, "task" => task.to_string())
}
