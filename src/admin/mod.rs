//! The admin endpoint (`[admin] listen`, off unless configured):
//! `GET /health` is 200 when every role is up and the GIL pool answers a
//! probe, else 503 with the reasons; either way the JSON lists each role as
//! up or down, and notes (a failed reload) if any; `GET /metrics` is Prometheus text.
//!
//! Roles report up/down into the crate's role registry, which this reads; counters
//! and histograms go through the `metrics` facade into a Prometheus recorder
//! installed once per process.

use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::routing::get;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::py::pool::GilPool;
use crate::registry::registry;

pub mod series;

/// How long `/health` waits for the pool probe.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Whether the Prometheus recorder is installed (`[admin]` is configured):
/// without it, hot paths skip the clock reads that only feed histograms.
pub fn metrics_enabled() -> bool {
    HANDLE.get().is_some()
}

/// The process-wide Prometheus recorder (installed on first use).
pub fn metrics_handle() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            // A real histogram (buckets from 10 µs to 10 s) for hand-off latency.
            let buckets = [
                1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 0.1, 1.0, 10.0,
            ];
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Full("pyipcd_handler_seconds".into()), &buckets)
                .expect("constant, non-empty buckets")
                .build_recorder();
            let handle = recorder.handle();
            if metrics::set_global_recorder(recorder).is_err() {
                tracing::warn!("a metrics recorder was already installed; /metrics may be empty");
            }
            series::describe();
            handle
        })
        .clone()
}

#[derive(Clone)]
struct AdminState {
    pool: Arc<GilPool>,
    metrics: PrometheusHandle,
}

/// Serves `/health` and `/metrics` on `listener` until `token` is cancelled.
pub async fn serve(listener: TcpListener, pool: Arc<GilPool>, token: CancellationToken) {
    let state = AdminState {
        pool,
        metrics: metrics_handle(),
    };
    let app = Router::new()
        .route("/health", get(health_route))
        .route("/metrics", get(metrics_route))
        .with_state(state);
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "admin endpoint listening (/health, /metrics)");
    }
    let served = axum::serve(listener, app)
        .with_graceful_shutdown(async move { token.cancelled().await })
        .await;
    if let Err(e) = served {
        tracing::warn!("admin endpoint stopped: {e}");
    }
}

/// The `/health` answer, fields in this order.
#[derive(serde::Serialize)]
struct HealthBody {
    status: &'static str,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    reasons: Vec<String>,
    roles: BTreeMap<String, &'static str>,
    /// A failed reload whose previous instances still serve: shown, but not
    /// a reason to be unhealthy.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    notes: Vec<String>,
    pool: PoolBody,
}

/// Who holds the GIL pool: per role, threads in one of its calls and calls
/// parked at its `max_in_flight`.
#[derive(serde::Serialize)]
struct PoolBody {
    threads: usize,
    queued: usize,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    busy: BTreeMap<String, usize>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    parked: BTreeMap<String, usize>,
}

impl PoolBody {
    fn of(pool: &GilPool) -> Self {
        let holders = pool.holders();
        let pick = |f: fn(&(Arc<str>, usize, usize)) -> usize| {
            holders
                .iter()
                .filter(|h| f(h) > 0)
                .map(|h| (h.0.to_string(), f(h)))
                .collect()
        };
        Self {
            threads: pool.workers(),
            queued: pool.queued(),
            busy: pick(|h| h.1),
            parked: pick(|h| h.2),
        }
    }

    /// `role 2, other 1`: the roles whose calls occupy the threads.
    fn holders_text(&self) -> String {
        let busy: Vec<String> = self.busy.iter().map(|(r, n)| format!("{r} {n}")).collect();
        if busy.is_empty() {
            "none".into()
        } else {
            busy.join(", ")
        }
    }
}

async fn health_route(
    State(s): State<AdminState>,
) -> (StatusCode, [(header::HeaderName, &'static str); 1], String) {
    let mut reasons = Vec::new();
    let probe = tokio::time::timeout(PROBE_TIMEOUT, s.pool.run(|_py| ())).await;
    let pool = PoolBody::of(&s.pool);
    match probe {
        Ok(Ok(())) => {}
        Ok(Err(e)) => reasons.push(format!("GIL pool: {e}")),
        Err(_) => reasons.push(format!(
            "GIL pool did not answer within {PROBE_TIMEOUT:?}; threads busy with calls of: {}",
            pool.holders_text()
        )),
    }
    for (role, why) in registry().down() {
        reasons.push(format!("role {role} is down: {why}"));
    }
    let code = if reasons.is_empty() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = HealthBody {
        status: if reasons.is_empty() {
            "ok"
        } else {
            "unhealthy"
        },
        reasons,
        roles: registry()
            .roles()
            .into_iter()
            .map(|(name, up)| (name, if up { "up" } else { "down" }))
            .collect(),
        notes: registry().notes(),
        pool,
    };
    let json = serde_json::to_string(&body).unwrap_or_else(|e| format!("{{\"status\":\"{e}\"}}"));
    (
        code,
        [(header::CONTENT_TYPE, "application/json")],
        json + "\n",
    )
}

/// Prometheus text exposition format 0.0.4.
const METRICS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

async fn metrics_route(
    State(s): State<AdminState>,
) -> ([(header::HeaderName, &'static str); 1], String) {
    series::publish_pool(Some(&s.pool));
    (
        [(header::CONTENT_TYPE, METRICS_CONTENT_TYPE)],
        s.metrics.render(),
    )
}

/// `pyipcd health`: GET /health on `addr`; returns (ok, body).
///
/// # Errors
/// If the endpoint cannot be reached.
pub fn probe(addr: &str) -> std::io::Result<(bool, String)> {
    let (status, body) = fetch(addr, "/health")?;
    Ok((status == 200, body.trim().to_string()))
}

/// `GET path` on an admin endpoint at `addr` (3 s timeout); returns the
/// status code and the body.
///
/// # Errors
/// If the endpoint cannot be reached or does not answer in time.
pub fn fetch(addr: &str, path: &str) -> std::io::Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(3)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: pyipcd\r\nConnection: close\r\n\r\n"
    )?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b)
        .unwrap_or_default();
    Ok((status, body.to_string()))
}
