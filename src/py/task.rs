//! Tasks: long-running Python code, each on its own interpreter thread outside
//! the pool, exactly as classic C hosts run "a thread per module": a bare
//! module is imported (its top-level code is the task), a function is called,
//! a class is instantiated and its method called. A restart policy with
//! exponential backoff decides what happens when it ends.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};

use crate::sync::lock;
use std::time::{Duration, Instant};

use pyo3::exceptions::PySystemExit;
use pyo3::prelude::*;
use tokio::sync::watch;

use super::handler::format_exception;
use super::output;
use super::target::{Target, TargetAttr};
use crate::config::{RestartPolicy, TaskConfig};

/// A blocking-thread view of "the daemon is stopping", with interruptible sleeps.
#[derive(Debug, Default)]
pub struct StopFlag {
    stopped: Mutex<bool>,
    cv: Condvar,
}

impl StopFlag {
    /// Sets the flag and wakes every sleeper.
    pub fn set(&self) {
        *lock(&self.stopped) = true;
        self.cv.notify_all();
    }

    /// Whether the flag is set.
    pub fn is_set(&self) -> bool {
        *lock(&self.stopped)
    }

    /// Sleeps up to `d`; returns `true` if the flag was set meanwhile.
    pub fn sleep(&self, d: Duration) -> bool {
        let guard = lock(&self.stopped);
        let (guard, _) = self
            .cv
            .wait_timeout_while(guard, d, |stopped| !*stopped)
            .unwrap_or_else(PoisonError::into_inner);
        *guard
    }
}

/// How one run of a task ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunEnd {
    /// Returned (or raised `SystemExit` with status 0/None).
    Finished,
    /// Raised; the traceback was logged.
    Failed,
}

/// A task thread as seen by the supervisor.
#[derive(Debug)]
pub struct RunningTask {
    /// The task's name.
    pub name: Arc<str>,
    /// `threading.get_ident()` of its thread (0 until it starts).
    py_ident: Arc<AtomicU64>,
    /// Becomes `true` when the thread has ended for good.
    done: watch::Receiver<bool>,
}

impl RunningTask {
    /// Starts the task's thread.
    ///
    /// # Errors
    /// If the thread cannot be spawned.
    pub fn spawn(cfg: &TaskConfig, stop: Arc<StopFlag>) -> std::io::Result<Self> {
        let name: Arc<str> = Arc::from(cfg.name.as_str());
        let target = Target::parse(&cfg.run).map_err(std::io::Error::other)?;
        let py_ident = Arc::new(AtomicU64::new(0));
        let (done_tx, done) = watch::channel(false);
        let cfg = cfg.clone();
        let (n, ident) = (name.clone(), py_ident.clone());
        // Registered (at zero) now, before readiness is reported.
        drop(crate::admin::series::task_restarts(&name));
        std::thread::Builder::new()
            .name(format!("py-task-{}", cfg.name))
            .spawn(move || {
                output::set_thread_role(Some(&n));
                supervise(&n, &target, &cfg, &stop, &ident);
                let _ = done_tx.send(true);
            })?;
        Ok(Self {
            name,
            py_ident,
            done,
        })
    }

    /// Whether the thread has ended.
    pub fn is_done(&self) -> bool {
        *self.done.borrow()
    }

    /// Waits until the thread has ended.
    pub async fn wait(&mut self) {
        let _ = self.done.wait_for(|d| *d).await;
    }

    /// Raises `SystemExit` in the task's thread at its next Python bytecode
    /// (a thread blocked inside C code sees it only when that call returns).
    pub fn raise_system_exit(&self) {
        let ident = self.py_ident.load(Ordering::SeqCst);
        if ident == 0 || self.is_done() {
            return;
        }
        let name = self.name.clone();
        // Needs the GIL: use a short-lived thread, never a tokio worker.
        let spawned = std::thread::Builder::new()
            .name("py-task-kill".into())
            .spawn(move || {
                Python::attach(|py| {
                    let res = super::module::runtime(py)
                        .and_then(|m| m.call_method1("_raise_in_thread", (ident,)));
                    if let Err(e) = res {
                        tracing::error!(task = %name, "cannot raise SystemExit in task: {e}");
                    }
                })
            });
        if let Err(e) = spawned {
            tracing::error!(task = %self.name, "cannot raise SystemExit in task: {e}");
        }
    }
}

fn supervise(name: &str, target: &Target, cfg: &TaskConfig, stop: &StopFlag, ident: &AtomicU64) {
    let mut delay = cfg.backoff_min;
    let mut runs = 0u64;
    let restarts = crate::admin::series::task_restarts(name);
    loop {
        runs += 1;
        tracing::info!(task = %name, run = runs, "task starting: {target}");
        let started = Instant::now();
        let end = Python::attach(|py| {
            if let Some(id) = super::thread_ident(py) {
                ident.store(id, Ordering::SeqCst);
            }
            let end = match run_once(py, target) {
                Ok(()) => RunEnd::Finished,
                Err(e) if e.is_instance_of::<PySystemExit>(py) && exit_ok(py, &e) => {
                    RunEnd::Finished
                }
                Err(e) => {
                    let tb = format_exception(py, &e);
                    let summary = tb.trim_end().lines().last().unwrap_or("exception");
                    tracing::error!(task = %name, "task raised {summary}\n{}", tb.trim_end());
                    RunEnd::Failed
                }
            };
            flush_output(py);
            end
        });
        let ran = started.elapsed();
        tracing::info!(task = %name, run = runs, outcome = ?end, "task ended after {:.3}s", ran.as_secs_f64());
        if stop.is_set() {
            return;
        }
        let again = match cfg.restart {
            RestartPolicy::No => false,
            RestartPolicy::OnFailure => end == RunEnd::Failed,
            RestartPolicy::Always => true,
        };
        if !again {
            return;
        }
        // A run that lasted well past the longest backoff was healthy: start over.
        if ran > cfg.backoff_max * 2 {
            delay = cfg.backoff_min;
        }
        restarts.increment(1);
        tracing::warn!(
            task = %name,
            "restarting in {delay:?} (restart = {:?})",
            cfg.restart
        );
        if stop.sleep(delay) {
            return;
        }
        delay = (delay * 2).min(cfg.backoff_max);
    }
}

fn run_once(py: Python<'_>, target: &Target) -> PyResult<()> {
    match &target.attr {
        TargetAttr::None => {
            // Importing is the work; drop an earlier import so a restart re-runs it.
            let modules = py.import("sys")?.getattr("modules")?;
            if modules.contains(target.module.as_str())? {
                modules.del_item(target.module.as_str())?;
            }
            py.import("importlib")?
                .call_method1("import_module", (target.module.as_str(),))?;
        }
        TargetAttr::Function(_) | TargetAttr::Method { .. } => {
            if let Some(callable) = target.resolve(py)? {
                callable.call0()?;
            }
        }
    }
    Ok(())
}

fn exit_ok(py: Python<'_>, e: &PyErr) -> bool {
    e.value(py)
        .getattr("code")
        .map(|c| c.is_none() || c.extract::<i64>().is_ok_and(|c| c == 0))
        .unwrap_or(false)
}

fn flush_output(py: Python<'_>) {
    for stream in ["stdout", "stderr"] {
        if let Ok(s) = py.import("sys").and_then(|sys| sys.getattr(stream)) {
            let _ = s.call_method0("flush");
        }
    }
}
