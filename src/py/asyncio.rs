//! The one asyncio event loop that runs every `async def` handler, on a
//! dedicated interpreter thread. Rust awaits coroutines scheduled on it through
//! pyo3-async-runtimes ([`pyo3_async_runtimes::into_future_with_locals`]).

use std::sync::mpsc;
use std::thread::JoinHandle;

use pyo3::prelude::*;
use pyo3_async_runtimes::TaskLocals;

/// The loop thread and a reference to its loop.
pub struct AsyncioLoop {
    event_loop: Py<PyAny>,
    _thread: JoinHandle<()>,
}

impl AsyncioLoop {
    /// Creates a new event loop on a thread named `py-asyncio` and runs it forever.
    ///
    /// # Errors
    /// If the thread cannot be spawned or `asyncio.new_event_loop()` fails.
    pub fn start() -> Result<Self, crate::Error> {
        let (tx, rx) = mpsc::channel::<PyResult<Py<PyAny>>>();
        let thread = std::thread::Builder::new()
            .name("py-asyncio".into())
            .spawn(move || {
                Python::attach(|py| {
                    let created = py.import("asyncio").and_then(|asyncio| {
                        let lp = asyncio.call_method0("new_event_loop")?;
                        asyncio.call_method1("set_event_loop", (&lp,))?;
                        Ok(lp)
                    });
                    match created {
                        Ok(lp) => {
                            let _ = tx.send(Ok(lp.clone().unbind()));
                            // Releases the GIL while it waits in select().
                            if let Err(e) = lp.call_method0("run_forever") {
                                tracing::error!("asyncio loop stopped with an error: {e}");
                            }
                            let _ = lp.call_method0("close");
                        }
                        Err(e) => {
                            let _ = tx.send(Err(e));
                        }
                    }
                })
            })?;
        let event_loop = rx
            .recv()
            .map_err(|_| crate::Error::Startup("asyncio loop thread died".into()))?
            .map_err(|e| crate::Error::Startup(format!("cannot create asyncio loop: {e}")))?;
        Ok(Self {
            event_loop,
            _thread: thread,
        })
    }

    /// Task locals for pyo3-async-runtimes (the loop plus a fresh context).
    pub fn locals(&self, py: Python<'_>) -> TaskLocals {
        TaskLocals::new(self.event_loop.bind(py).clone())
    }

    /// Asks the loop to stop; pending handler tasks are abandoned.
    pub fn stop(self) {
        let Self { event_loop, .. } = self;
        // Stopping needs the GIL; do it from a short-lived thread so a caller on
        // a tokio worker never takes it. The loop thread itself is not joined:
        // it ends when the loop stops.
        let stopper = std::thread::Builder::new()
            .name("py-asyncio-stop".into())
            .spawn(move || {
                Python::attach(|py| {
                    let lp = event_loop.bind(py);
                    if let Ok(stop) = lp.getattr("stop") {
                        let _ = lp.call_method1("call_soon_threadsafe", (stop,));
                    }
                })
            });
        if stopper.is_err() {
            tracing::warn!("could not stop the asyncio loop thread");
        }
    }
}
