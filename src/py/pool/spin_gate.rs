//! Whether spinning pays. The pool spins (a worker polling for work, callers
//! re-polling for their reply) to save futex wake-ups, which only wins while
//! a core is free for the spinning thread. With more pool and I/O threads
//! than cores it never is: the spinning threads would take the cores from
//! the threads doing the work, so such a pool does not spin at all.
//!
//! (The kernel's CPU pressure, `/proc/pressure/cpu`, was tried as a signal
//! for a host busy with other processes: on this project's VM its `some
//! avg10` sits at 10–19% with nothing running, so no threshold separated
//! busy from idle. See docs/PERFORMANCE.md.)

/// The gate, shared by a pool's workers and callers.
#[derive(Debug)]
pub(crate) struct SpinGate {
    /// More threads than cores: never spin.
    oversubscribed: bool,
}

impl SpinGate {
    /// A gate for a pool whose workers and callers run on `threads` OS threads.
    pub(crate) fn new(threads: usize) -> Self {
        let cores = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
        let oversubscribed = threads > cores;
        if oversubscribed {
            tracing::info!(
                "{threads} pool and I/O threads on {cores} core(s): the GIL pool will not spin"
            );
        }
        Self { oversubscribed }
    }

    /// Whether to spin.
    pub(crate) fn allows(&self) -> bool {
        !self.oversubscribed
    }
}
