//! Shared memory: memory-mapped files shared with other processes.
//!
//! - [`region`]: open or create (mode 0600) and map a file; the only `unsafe`
//!   code in the crate, each block with its `// SAFETY:` argument.
//! - [`watch`]: `mode = "watch"`, the classic demo: a poller that hands every
//!   change to Python and a scripted writer.

pub mod channel;
pub mod client;
pub mod region;
pub mod ring;
pub mod watch;
