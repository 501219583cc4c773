//! The crate-level error, composed from each module's errors.

use crate::config::ConfigError;
use crate::py::target::ResolveError;

/// Anything that stops the daemon from starting or running.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration is unusable (exit code 78).
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A configured Python target could not be imported or resolved (exit code 78).
    #[error(transparent)]
    Target(#[from] ResolveError),
    /// The configured Python installation or virtualenv cannot be used, or
    /// CPython could not start from it (exit code 78).
    #[error("{0}")]
    Interpreter(String),
    /// A server cannot listen where the config says, and retrying will not
    /// help: a live socket or a non-socket file at its path, a socket
    /// systemd did not pass (exit code 78).
    #[error("{0}")]
    Listen(String),
    /// Something failed while starting up (interpreter, threads, runtime).
    #[error("startup failed: {0}")]
    Startup(String),
    /// An I/O error from the operating system.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

impl Error {
    /// The process exit code for this error: 78 (EX_CONFIG) for configuration
    /// problems, 1 otherwise.
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::Config(_) | Error::Target(_) | Error::Interpreter(_) | Error::Listen(_) => {
                crate::EXIT_CONFIG
            }
            _ => crate::EXIT_FAILURE,
        }
    }
}
