//! Signals, handled in tokio: SIGINT/SIGTERM begin a graceful stop, a
//! second one exits at once; SIGHUP asks for a configuration reload;
//! SIGUSR1/SIGUSR2 are a worker supervisor's (`workers`) requests. The
//! second stop signal is also caught outside tokio ([`exit_on_second_signal`]),
//! so it works even when every I/O thread is held by a call that never returns.

use std::sync::atomic::{AtomicU32, Ordering};

use tokio::signal::unix::{Signal, SignalKind, signal};

/// Stop signals received so far (counted in the signal handler).
static STOP_SIGNALS: AtomicU32 = AtomicU32::new(0);

/// Ends the process at the second SIGINT/SIGTERM from inside the signal
/// handler itself (only async-signal-safe calls: an atomic, `write`,
/// `_exit`), with exit status 128 + signal number. The tokio handlers still
/// see every signal; this is the path that needs no thread to be free.
///
/// # Errors
/// If the handler cannot be installed.
#[allow(unsafe_code)]
pub fn exit_on_second_signal() -> std::io::Result<()> {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the action only touches an atomic and calls write(2) and
        // _exit(2), which are async-signal-safe.
        unsafe {
            signal_hook_registry::register(sig, move || {
                if STOP_SIGNALS.fetch_add(1, Ordering::SeqCst) >= 1 {
                    let msg: &[u8] = if sig == libc::SIGINT {
                        b"pyipcd: SIGINT received again: exiting immediately\n"
                    } else {
                        b"pyipcd: SIGTERM received again: exiting immediately\n"
                    };
                    let _ = libc::write(2, msg.as_ptr().cast(), msg.len());
                    libc::_exit(128 + sig);
                }
            })?;
        }
    }
    Ok(())
}

/// What a signal asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignalEvent {
    /// Stop (signal name and number).
    Stop(&'static str, i32),
    /// Reload the configuration (SIGHUP).
    Reload,
    /// A worker's supervisor: start the roles left to worker 0 (SIGUSR1).
    TakeSingletons,
    /// A worker's supervisor: stop accepting, finish the open connections, exit (SIGUSR2).
    Retire,
}

/// The process's signal streams, registered at start-up (before the
/// interpreter, so Python never installs its own SIGINT handler).
pub struct Signals {
    int: Signal,
    term: Signal,
    hup: Signal,
    usr1: Signal,
    usr2: Signal,
}

impl Signals {
    /// Registers the handlers. Must run inside the tokio runtime.
    ///
    /// # Errors
    /// If the OS refuses a signal handler.
    pub fn register() -> std::io::Result<Self> {
        Ok(Self {
            int: signal(SignalKind::interrupt())?,
            term: signal(SignalKind::terminate())?,
            hup: signal(SignalKind::hangup())?,
            usr1: signal(SignalKind::user_defined1())?,
            usr2: signal(SignalKind::user_defined2())?,
        })
    }

    /// Waits for the next signal.
    pub async fn next(&mut self) -> SignalEvent {
        tokio::select! {
            _ = self.int.recv() => SignalEvent::Stop("SIGINT", 2),
            _ = self.term.recv() => SignalEvent::Stop("SIGTERM", 15),
            _ = self.hup.recv() => SignalEvent::Reload,
            _ = self.usr1.recv() => SignalEvent::TakeSingletons,
            _ = self.usr2.recv() => SignalEvent::Retire,
        }
    }
}
