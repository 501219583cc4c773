//! A busy host for the benches: `--busy N` starts N CPU-bound processes that
//! run beside the bench until it ends (the clients this daemon serves share
//! their host).

use std::process::{Child, Command};

/// A process killed when dropped.
pub struct Kill(pub Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `n` CPU-bound shell loops, running until the returned handles drop.
///
/// # Panics
/// If `sh` cannot be started.
pub fn busy_host(n: usize) -> Vec<Kill> {
    (0..n)
        .map(|_| {
            Kill(
                Command::new("sh")
                    .args(["-c", "while :; do :; done"])
                    .spawn()
                    .expect("sh"),
            )
        })
        .collect()
}
