//! The GIL pool through the library with the real embedded interpreter:
//! sync and async handlers, exceptions as values, backpressure, timeouts,
//! stuck-call stacks, cancellation, and a blocked worker not stalling others.

use std::io::Write;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use pyipcd::py::handler::{Handler, Runs};
use pyipcd::py::pool::{CallError, GilPool, PoolConfig};
use pyo3::prelude::*;

/// Log output of this test process (one global subscriber; tests use unique markers).
fn log() -> &'static Mutex<Vec<u8>> {
    static LOG: OnceLock<&'static Mutex<Vec<u8>>> = OnceLock::new();
    LOG.get_or_init(|| {
        let buf: &'static Mutex<Vec<u8>> = Box::leak(Box::new(Mutex::new(Vec::new())));
        tracing_subscriber::fmt()
            .with_writer(move || LogWriter(buf))
            .with_ansi(false)
            .init();
        buf
    })
}

struct LogWriter(&'static Mutex<Vec<u8>>);

impl Write for LogWriter {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn log_text() -> String {
    String::from_utf8_lossy(&log().lock().unwrap()).into_owned()
}

async fn wait_log(parts: &[&str]) -> String {
    for _ in 0..500 {
        if let Some(l) = log_text()
            .lines()
            .find(|l| parts.iter().all(|p| l.contains(p)))
        {
            return l.to_string();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("no log line with {parts:?}:\n{}", log_text());
}

/// Writes `module.py` into a fresh folder on sys.path and returns the pool.
fn setup(module: &str, source: &str, config: PoolConfig) -> Arc<GilPool> {
    log();
    let dir = tempfile::tempdir().unwrap().keep();
    std::fs::write(dir.join(format!("{module}.py")), source).unwrap();
    pyipcd::py::init(&[dir], &Default::default()).unwrap();
    GilPool::start(&config).unwrap()
}

/// Sets `module.gate` (a threading.Event) from a fresh thread: the pool's
/// workers may all be blocked on it.
fn open_gate(module: &'static str) {
    std::thread::spawn(move || {
        Python::attach(|py| {
            py.import(module)?
                .getattr("gate")?
                .call_method0("set")
                .map(|_| ())
        })
    })
    .join()
    .unwrap()
    .unwrap();
}

fn handler(role: &str, target: &str) -> Arc<Handler> {
    Arc::new(
        Python::attach(|py| Handler::resolve(py, role, "test handler", target, Runs::OnPool))
            .unwrap(),
    )
}

fn cfg(workers: usize, queue: usize, timeout_ms: u64) -> PoolConfig {
    PoolConfig::new(workers, queue, Duration::from_millis(timeout_ms))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_handler_round_trips_bytes_and_concurrent_calls() {
    let pool = setup(
        "gp_sync",
        "def rev(b):\n    return bytes(reversed(b))\n\ndef none(b):\n    return None\n\ndef text(b):\n    return b.decode() + '!'\n",
        cfg(2, 64, 5000),
    );
    let rev = handler("rev-role", "gp_sync:rev");
    assert_eq!(
        pool.call(&rev, Bytes::from_static(b"abc")).await.unwrap(),
        Some(Bytes::from_static(b"cba"))
    );
    assert_eq!(
        pool.call(&handler("n", "gp_sync:none"), Bytes::new())
            .await
            .unwrap(),
        None
    );
    assert_eq!(
        pool.call(&handler("t", "gp_sync:text"), Bytes::from_static(b"hi"))
            .await
            .unwrap(),
        Some(Bytes::from_static(b"hi!"))
    );
    let mut joins = Vec::new();
    for i in 0..200u32 {
        let (pool, rev) = (pool.clone(), rev.clone());
        joins.push(tokio::spawn(async move {
            let msg = Bytes::from(format!("message-{i}").into_bytes());
            let mut want = msg.to_vec();
            want.reverse();
            assert_eq!(pool.call(&rev, msg).await.unwrap().unwrap(), want);
        }));
    }
    for j in joins {
        j.await.unwrap();
    }
    assert!(pool.stats().calls.load(Ordering::Relaxed) >= 203);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exception_becomes_an_error_value_logged_once_with_the_role() {
    let pool = setup(
        "gp_raise",
        "def bad(b):\n    raise KeyError('gp-raise-marker')\n\ndef wrong_type(b):\n    return 42\n\ndef ok(b):\n    return b\n",
        cfg(1, 16, 5000),
    );
    let err = pool
        .call(&handler("raiser", "gp_raise:bad"), Bytes::from_static(b"x"))
        .await
        .unwrap_err();
    let CallError::Handler(e) = err else {
        panic!("{err:?}")
    };
    assert_eq!(&*e.role, "raiser");
    assert!(
        e.summary.contains("KeyError: 'gp-raise-marker'"),
        "{}",
        e.summary
    );
    assert!(e.traceback.contains("line 2, in bad"), "{}", e.traceback);
    wait_log(&["handler raised KeyError: 'gp-raise-marker'"]).await;
    assert_eq!(
        log_text()
            .matches("handler raised KeyError: 'gp-raise-marker'")
            .count(),
        1
    );
    wait_log(&["role=raiser", "handler=gp_raise:bad"]).await;

    let err = pool
        .call(&handler("typed", "gp_raise:wrong_type"), Bytes::new())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("must return bytes"), "{err}");
    // The pool goes on.
    let ok = handler("ok", "gp_raise:ok");
    assert_eq!(
        pool.call(&ok, Bytes::from_static(b"y"))
            .await
            .unwrap()
            .unwrap(),
        &b"y"[..]
    );
    assert_eq!(pool.stats().errors.load(Ordering::Relaxed), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn print_in_a_handler_is_logged_with_its_role() {
    let pool = setup(
        "gp_print",
        "def talk(b):\n    print('gp-print-marker', b.decode())\n    return b\n",
        cfg(1, 16, 5000),
    );
    pool.call(
        &handler("talker", "gp_print:talk"),
        Bytes::from_static(b"xyz"),
    )
    .await
    .unwrap();
    wait_log(&["gp-print-marker xyz", "role=talker", "origin=\"stdout\""]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn async_handlers_run_on_the_asyncio_loop_and_are_awaited() {
    let pool = setup(
        "gp_async",
        r#"
import asyncio, threading

async def slow_upper(b):
    await asyncio.sleep(0.01)
    print("gp-async-marker on", threading.current_thread().name)
    return b.upper()

async def fails(b):
    await asyncio.sleep(0)
    raise RuntimeError("gp-async-fail")
"#,
        cfg(2, 64, 5000),
    );
    let h = handler("aio", "gp_async:slow_upper");
    assert!(h.is_async());
    // Many at once: they overlap on the loop, none occupies a pool thread while sleeping.
    let mut joins = Vec::new();
    for i in 0..50 {
        let (pool, h) = (pool.clone(), h.clone());
        joins.push(tokio::spawn(async move {
            let out = pool
                .call(&h, Bytes::from(format!("m{i}")))
                .await
                .unwrap()
                .unwrap();
            assert_eq!(out, format!("M{i}").as_bytes());
        }));
    }
    for j in joins {
        j.await.unwrap();
    }
    wait_log(&["gp-async-marker on", "role=aio"]).await;
    let err = pool
        .call(&handler("aiofail", "gp_async:fails"), Bytes::new())
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("RuntimeError: gp-async-fail"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_async_handler_past_the_timeout_is_cancelled() {
    let pool = setup(
        "gp_cancel",
        r#"
import asyncio
state = {"cancelled": False}

async def forever(b):
    try:
        await asyncio.sleep(3600)
    except asyncio.CancelledError:
        state["cancelled"] = True
        raise

def was_cancelled(b):
    return b"yes" if state["cancelled"] else b"no"
"#,
        cfg(1, 16, 200),
    );
    let err = pool
        .call(&handler("slow", "gp_cancel:forever"), Bytes::new())
        .await
        .unwrap_err();
    assert!(matches!(err, CallError::Timeout(_)), "{err:?}");
    let probe = handler("probe", "gp_cancel:was_cancelled");
    for _ in 0..100 {
        if pool.call(&probe, Bytes::new()).await.unwrap().unwrap() == b"yes"[..] {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the asyncio task was not cancelled");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_makes_callers_wait_and_loses_nothing() {
    let pool = setup(
        "gp_backpressure",
        "import threading\ngate = threading.Event()\n\ndef held(b):\n    gate.wait()\n    return b\n\ndef release(b):\n    gate.set()\n",
        cfg(1, 4, 20_000),
    );
    let held = handler("held", "gp_backpressure:held");
    let mut joins = Vec::new();
    for i in 0..40u32 {
        let (pool, held) = (pool.clone(), held.clone());
        joins.push(tokio::spawn(async move {
            pool.call(&held, Bytes::from(i.to_be_bytes().to_vec()))
                .await
        }));
    }
    // The single worker is held; 4 calls fit in the queue, the rest must wait.
    for _ in 0..500 {
        if pool.stats().queue_full_waits.load(Ordering::Relaxed) >= 30 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        pool.queued() <= 4,
        "queue grew past its bound: {}",
        pool.queued()
    );
    assert!(pool.stats().queue_full_waits.load(Ordering::Relaxed) >= 30);
    // Release the gate from outside the pool (its only worker is blocked).
    open_gate("gp_backpressure");
    for (i, j) in joins.into_iter().enumerate() {
        let out = j.await.unwrap().unwrap().unwrap();
        assert_eq!(out, (i as u32).to_be_bytes().to_vec());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_call_times_out_and_its_python_stack_is_logged() {
    let pool = setup(
        "gp_stuck",
        "import time\n\ndef gp_stuck_sleeper(b):\n    time.sleep(1.0)\n    return b\n",
        cfg(1, 16, 200),
    );
    let h = handler("stuck-role", "gp_stuck:gp_stuck_sleeper");
    let err = pool.call(&h, Bytes::new()).await.unwrap_err();
    assert!(matches!(err, CallError::Timeout(_)), "{err:?}");
    assert_eq!(pool.stats().timeouts.load(Ordering::Relaxed), 1);
    wait_log(&["call running for at least"]).await;
    // The event spans lines: the stack follows, then the fields.
    let text = log_text();
    let event = &text[text.find("call running for at least").unwrap()..];
    assert!(event.contains("in gp_stuck_sleeper"), "{event}");
    assert!(event.contains("role=stuck-role"), "{event}");
    assert!(pool.monitor().stuck_reports() >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blocked_worker_does_not_stall_calls_behind_it() {
    let pool = setup(
        "gp_rescue",
        "import threading\ngate = threading.Event()\n\ndef block(b):\n    gate.wait()\n    return b'blocked'\n\ndef quick(b):\n    return b'quick'\n",
        cfg(2, 16, 20_000),
    );
    let (block, quick) = (
        handler("block", "gp_rescue:block"),
        handler("quick", "gp_rescue:quick"),
    );
    let p = pool.clone();
    let blocked = tokio::spawn(async move { p.call(&block, Bytes::new()).await });
    while pool.busy() == 0 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    // The first worker is inside `block` (which released the GIL in wait()):
    // the second must take these although the first never finishes.
    for _ in 0..20 {
        assert_eq!(
            pool.call(&quick, Bytes::new()).await.unwrap().unwrap(),
            &b"quick"[..]
        );
    }
    assert!(!blocked.is_finished());
    open_gate("gp_rescue");
    assert_eq!(blocked.await.unwrap().unwrap().unwrap(), &b"blocked"[..]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_refuses_new_calls_and_reports_wedged_workers() {
    let pool = setup(
        "gp_close",
        "import time\n\ndef nap(b):\n    time.sleep(0.6)\n    return b\n",
        cfg(1, 16, 20_000),
    );
    let h = handler("nap", "gp_close:nap");
    let p = pool.clone();
    let hh = h.clone();
    let in_flight = tokio::spawn(async move { p.call(&hh, Bytes::from_static(b"z")).await });
    while pool.busy() == 0 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let wedged = pool
        .close(std::time::Instant::now() + Duration::from_millis(50))
        .await;
    assert_eq!(wedged.len(), 1, "the napping worker is still inside Python");
    assert_eq!(wedged[0].role, "nap");
    assert!(wedged[0].stack.contains("in nap"), "{}", wedged[0].stack);
    assert!(matches!(
        pool.call(&h, Bytes::new()).await,
        Err(CallError::Closed)
    ));
    // The in-flight call still completes.
    assert_eq!(in_flight.await.unwrap().unwrap().unwrap(), &b"z"[..]);
}
