//! Shared memory: files shared with other processes (mapped for channels).
//!
//! - [`ring`]: the channel's binary layout and its two single-producer rings.
//! - [`doorbell`]: how a ring's consumer sleeps until the producer rings (a
//!   process-shared futex), after an adaptive spin.
//! - `channel`: `mode = "channel"`, the daemon's side; [`client`]: the Rust client.
//! - `region`: open or create (mode 0600) a watched file, read and written
//!   with `pread` / `pwrite`.
//! - `sigbus`: keeps a channel file truncated under its mapping from killing
//!   the daemon.
//! - `watch`: `mode = "watch"`, the classic demo: a poller that hands every
//!   change to Python and a scripted writer.
//!
//! This module holds the crate's `unsafe` code (mapped words, futex calls,
//! the `SIGBUS` handler), each block with its `// SAFETY:` argument.

pub(crate) mod channel;
pub mod client;
pub mod doorbell;
pub(crate) mod region;
pub mod ring;
pub(crate) mod sigbus;
pub(crate) mod watch;
