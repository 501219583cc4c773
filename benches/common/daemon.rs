//! Starting the release binary for the bench binaries.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Starts `target/release/pyipcd run -c config` (or the binary given with
/// `--bin PATH`, to compare builds in one bench run) with an empty environment.
/// Its log goes to the bench's stderr when `BENCH_DAEMON_LOG` is set, else nowhere.
///
/// # Panics
/// If the release binary has not been built.
pub fn spawn_release(config: &Path) -> Child {
    let bin = crate::args::arg_text("--bin").unwrap_or_else(|| {
        concat!(env!("CARGO_MANIFEST_DIR"), "/target/release/pyipcd").to_string()
    });
    spawn_binary(&bin, config)
}

/// Starts `bin run -c config` as [`spawn_release`] does.
///
/// # Panics
/// If `bin` cannot be started.
pub fn spawn_binary(bin: &str, config: &Path) -> Child {
    Command::new(bin)
        .args(["run", "-c"])
        .arg(config)
        .env_clear()
        .stderr(if std::env::var_os("BENCH_DAEMON_LOG").is_some() {
            Stdio::inherit()
        } else {
            Stdio::null()
        })
        .spawn()
        .unwrap_or_else(|e| {
            panic!("cannot start {bin} (build it first: cargo build --release): {e}")
        })
}

/// Waits (up to 20 s) until something accepts connections on `addr`.
///
/// # Panics
/// If nothing does.
pub fn wait_listening(addr: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(Instant::now() < deadline, "server on {addr} never came up");
        std::thread::sleep(Duration::from_millis(20));
    }
}
