//! The Python servers the benches compare against: `benches/asyncio_echo.py`
//! (a len32 `Protocol` calling the same Python echo), on asyncio or uvloop.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};

/// A free loopback port.
///
/// # Panics
/// If no port can be bound.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Starts `asyncio_echo.py` (on uvloop when asked) with listen `backlog`,
/// waits until it accepts; `None` (said on stderr) when uvloop is asked for
/// and cannot be imported.
///
/// # Panics
/// If `python3` cannot be started or never listens.
pub fn spawn_python_echo(uvloop: bool, backlog: u32) -> Option<(Child, SocketAddr)> {
    let port = free_port();
    let child = spawn_python_echo_on(port, uvloop, backlog, &[])?;
    Some((child, SocketAddr::from(([127, 0, 0, 1], port))))
}

/// Like [`spawn_python_echo`], on `port`, with more arguments for the script
/// (`--reuseport`, `--handler-dir DIR`).
///
/// # Panics
/// If `python3` cannot be started or never listens.
pub fn spawn_python_echo_on(
    port: u16,
    uvloop: bool,
    backlog: u32,
    extra: &[&str],
) -> Option<Child> {
    if uvloop
        && !Command::new("python3")
            .args(["-c", "import uvloop"])
            .status()
            .is_ok_and(|s| s.success())
    {
        eprintln!("uvloop not importable: skipping (pip install uvloop)");
        return None;
    }
    let mut cmd = Command::new("python3");
    cmd.arg(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/benches/asyncio_echo.py"
    ))
    .arg(port.to_string())
    .args(["--backlog", &backlog.to_string()])
    .args(extra)
    .stdout(Stdio::null());
    if uvloop {
        cmd.arg("--uvloop");
    }
    let child = cmd.spawn().unwrap();
    super::daemon::wait_listening(SocketAddr::from(([127, 0, 0, 1], port)));
    Some(child)
}
