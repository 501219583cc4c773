//! Shared memory: memory-mapped files shared with other processes.
//!
//! - [`ring`]: the channel's binary layout and its two single-producer rings.
//! - [`doorbell`]: how a ring's consumer sleeps until the producer rings (a
//!   process-shared futex), after an adaptive spin.
//! - `channel`: `mode = "channel"`, the daemon's side; [`client`]: the Rust client.
//! - `region`: open or create (mode 0600) and map a file. This module holds
//!   the crate's `unsafe` code (mapped words, futex calls), each block with
//!   its `// SAFETY:` argument.
//! - `watch`: `mode = "watch"`, the classic demo: a poller that hands every
//!   change to Python and a scripted writer.

pub(crate) mod channel;
pub mod client;
pub mod doorbell;
pub(crate) mod region;
pub mod ring;
pub(crate) mod watch;
