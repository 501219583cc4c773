//! pyipcd: a tokio daemon that embeds CPython and connects Python handlers and
//! tasks to IPC (TCP and shared memory), configured by one TOML file.
//!
//! # Layout
//! - [`config`]: the TOML file (+ `PYIPCD__…` env overrides) as typed, validated structs.
//! - [`cli`]: command-line arguments.
//! - [`telemetry`]: tracing set-up; Python output joins the same log.
//! - `shutdown`: signal handling (tokio only).
//! - [`admin`]: `/health` and `/metrics`.
//! - `systemd`: readiness, status, stopping and watchdog notices; the
//!   sockets of socket activation.
//! - [`daemon`]: start-up, readiness, reload, ordered shutdown.
//! - [`workers`]: `daemon.processes` > 1: the supervisor of worker
//!   processes (sockets bound once, restarts, rolling reload), and a worker's
//!   view of itself.
//! - `supervisor`: roles built from the config, started, and replaced
//!   transactionally on reload (the diff is a pure function, `supervisor::plan`).
//! - `role`: what every role instance gets from the supervisor.
//! - `registry`: (a leaf) role health and `pyipcd.send` routes, each entry
//!   owned by one role instance.
//! - `sync`: the one mutex-poison policy.
//! - `copy`: payload copies that step around a `memcpy` cliff.
//! - [`tcp`]: stream server and client roles, over TCP or Unix sockets.
//! - [`shm`]: shared-memory regions (the `unsafe` code, with two more
//!   places: `systemd`'s taking of the descriptors systemd passed, and
//!   `copy`'s raw-pointer copy and filling of a new Python `bytes`).
//! - [`py`]: the embedded interpreter: GIL pool, handlers, asyncio loop, tasks,
//!   the `pyipcd` Python module.
//!
//! No tokio worker ever takes the GIL: Python runs on the pool's threads, on
//! task threads, and on the asyncio loop thread.

#![deny(rust_2018_idioms)]
#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod admin;
pub mod cli;
pub mod config;
mod copy;
pub mod daemon;
mod error;
mod memory;
pub mod py;
pub(crate) mod registry;
pub(crate) mod role;
pub mod sched_slice;
#[allow(unsafe_code)]
pub mod shm;
pub(crate) mod shutdown;
pub(crate) mod supervisor;
mod sync;
pub(crate) mod systemd;
pub mod tcp;
pub mod telemetry;
#[cfg(test)]
mod test_rng;
pub mod workers;

pub use error::Error;
pub use systemd::{activated_names, take_activated_sockets};

/// Exit status: success.
pub const EXIT_OK: i32 = 0;
/// Exit status: runtime failure (or something abandoned at shutdown).
pub const EXIT_FAILURE: i32 = 1;
/// Exit status: configuration error (sysexits `EX_CONFIG`).
pub const EXIT_CONFIG: i32 = 78;
