//! Signals, handled in tokio only: SIGINT/SIGTERM begin a graceful stop, a
//! second one exits at once; SIGHUP asks for a configuration reload.

use tokio::signal::unix::{Signal, SignalKind, signal};

/// What a signal asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignalEvent {
    /// Stop (signal name and number).
    Stop(&'static str, i32),
    /// Reload the configuration (SIGHUP).
    Reload,
}

/// The process's signal streams, registered at start-up (before the
/// interpreter, so Python never installs its own SIGINT handler).
pub struct Signals {
    int: Signal,
    term: Signal,
    hup: Signal,
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
        })
    }

    /// Waits for the next signal.
    pub async fn next(&mut self) -> SignalEvent {
        tokio::select! {
            _ = self.int.recv() => SignalEvent::Stop("SIGINT", 2),
            _ = self.term.recv() => SignalEvent::Stop("SIGTERM", 15),
            _ = self.hup.recv() => SignalEvent::Reload,
        }
    }

    /// Waits for SIGINT or SIGTERM and returns its name and number (SIGHUP is ignored here).
    pub async fn stop_requested(&mut self) -> (&'static str, i32) {
        loop {
            if let SignalEvent::Stop(name, num) = self.next().await {
                return (name, num);
            }
        }
    }

    /// After the first stop signal: a second one ends the process at once
    /// with exit status 128 + signal number.
    pub fn exit_on_second(mut self) {
        tokio::spawn(async move {
            let (name, num) = self.stop_requested().await;
            tracing::error!("{name} received again: exiting immediately");
            std::process::exit(128 + num);
        });
    }
}
