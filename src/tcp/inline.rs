//! `dispatch = "inline"`: a TCP server role served by one dedicated
//! interpreter thread that runs a current-thread tokio runtime for the role's
//! sockets and calls the handler itself, between reads and writes, with no
//! hand-off to another thread (the uvloop model, with Rust doing the I/O and
//! framing). The thread keeps its interpreter state for life and holds the
//! GIL only while Python runs; its calls are watched by the stuck-call monitor
//! (through the role's [`Context`], not the pool).

use std::future::Future;
use std::sync::Arc;

use pyo3::prelude::*;

use crate::py::monitor::Watched;
use crate::role::Context;

/// Runs `serve` on a new thread `py-tcp-<role>` (attached to the interpreter,
/// inside a current-thread runtime, registered with the stuck-call monitor)
/// and resolves when it returns.
pub(crate) async fn on_own_thread<F, Fut>(ctx: Context, serve: F)
where
    F: FnOnce(Arc<Watched>, Context) -> Fut + Send + 'static,
    Fut: Future<Output = ()>,
{
    let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
    let role = ctx.name.clone();
    let thread = format!("py-tcp-{role}");
    let (name, role2) = (thread.clone(), role.clone());
    let spawned = std::thread::Builder::new().name(thread).spawn(move || {
        let runtime = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => rt,
            Err(e) => {
                tracing::error!(role = %role2, "cannot start the role's runtime: {e}");
                return;
            }
        };
        Python::attach(|py| {
            crate::py::output::set_thread_role(Some(&role2));
            let watched = Arc::new(ctx.monitor.watch(py, &name, ctx.health.clone()));
            // Detached while the runtime waits for sockets; each handler call
            // re-attaches (cheap: this thread's interpreter state persists).
            py.detach(|| runtime.block_on(serve(watched, ctx)));
        });
        let _ = done_tx.send(());
    });
    if let Err(e) = spawned {
        tracing::error!(role = %role, "cannot start the role's thread: {e}");
        return;
    }
    if done_rx.await.is_err() {
        tracing::error!(role = %role, "the role's thread died (a panic, logged above); the role is down");
    }
}
