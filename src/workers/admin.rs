//! The supervisor's admin endpoint (`[admin] listen`): the daemon's one
//! `/health` and `/metrics`. Each worker serves its own on a loopback port
//! it reports (`X_PYIPCD_ADMIN=`); the supervisor asks every serving worker
//! and answers for all of them, with a `worker` label on each worker's series.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::routing::get;
use tokio::net::TcpListener;

use crate::sync::lock;

/// What the endpoint knows of the workers, kept current by the fleet.
#[derive(Debug, Default, Clone)]
pub(super) struct View {
    /// The serving workers: index → (pid, ready, admin address).
    pub(super) serving: BTreeMap<usize, (u32, bool, Option<String>)>,
    /// How many there should be.
    pub(super) wanted: usize,
    /// Workers started again, by why.
    pub(super) respawns: BTreeMap<&'static str, u64>,
    /// A rolling reload is under way.
    pub(super) reloading: bool,
}

/// The fleet's side: it replaces the view as workers come and go.
pub(super) type Shared = Arc<Mutex<View>>;

/// Serves `/health` and `/metrics` on `listener` (until the runtime ends).
pub(super) async fn serve(listener: TcpListener, view: Shared) {
    let app = Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .with_state(view);
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "admin endpoint listening (/health, /metrics) for every worker");
    }
    if let Err(e) = axum::serve(listener, app).await {
        tracing::warn!("admin endpoint stopped: {e}");
    }
}

/// `GET path` of every serving worker with an admin address, in index order.
async fn ask_workers(
    view: &View,
    path: &'static str,
) -> Vec<(usize, u32, Result<(u16, String), String>)> {
    let mut answers = Vec::new();
    for (index, (pid, _, addr)) in &view.serving {
        let answer = match addr.clone() {
            Some(addr) => tokio::task::spawn_blocking(move || crate::admin::fetch(&addr, path))
                .await
                .map_err(|e| e.to_string())
                .and_then(|r| r.map_err(|e| e.to_string())),
            None => Err("no admin endpoint reported yet".into()),
        };
        answers.push((*index, *pid, answer));
    }
    answers
}

async fn health(
    State(view): State<Shared>,
) -> (StatusCode, [(header::HeaderName, &'static str); 1], String) {
    let view = lock(&view).clone();
    let mut reasons = Vec::new();
    if view.serving.len() < view.wanted {
        reasons.push(format!(
            "{} of {} workers running",
            view.serving.len(),
            view.wanted
        ));
    }
    let mut workers = serde_json::Map::new();
    for (index, pid, answer) in ask_workers(&view, "/health").await {
        let body = match answer {
            Ok((status, body)) => {
                if status != 200 {
                    reasons.push(format!("worker {index} (pid {pid}) is unhealthy"));
                }
                serde_json::from_str(&body).unwrap_or(serde_json::Value::String(body))
            }
            Err(e) => {
                reasons.push(format!("worker {index} (pid {pid}): {e}"));
                serde_json::Value::Null
            }
        };
        workers.insert(
            index.to_string(),
            serde_json::json!({ "pid": pid, "health": body }),
        );
    }
    let ok = reasons.is_empty();
    let body = serde_json::json!({
        "status": if ok { "ok" } else { "unhealthy" },
        "reasons": reasons,
        "reloading": view.reloading,
        "workers": workers,
    });
    (
        if ok {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        },
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string() + "\n",
    )
}

async fn metrics(State(view): State<Shared>) -> ([(header::HeaderName, &'static str); 1], String) {
    let view = lock(&view).clone();
    let mut merged = Families::default();
    merged.own(&view);
    for (index, _, answer) in ask_workers(&view, "/metrics").await {
        match answer {
            Ok((200, text)) => merged.add(&text, index),
            Ok((status, _)) => tracing::warn!("worker {index}'s /metrics answered {status}"),
            Err(e) => tracing::warn!("worker {index}'s /metrics: {e}"),
        }
    }
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        merged.render(),
    )
}

/// Prometheus text from several workers, one group per metric family.
#[derive(Default)]
struct Families {
    order: Vec<String>,
    families: BTreeMap<String, (Vec<String>, Vec<String>)>,
}

impl Families {
    fn family(&mut self, name: &str) -> &mut (Vec<String>, Vec<String>) {
        if !self.families.contains_key(name) {
            self.order.push(name.to_string());
        }
        self.families.entry(name.to_string()).or_default()
    }

    /// The supervisor's own series.
    fn own(&mut self, view: &View) {
        let workers = self.family("pyipcd_workers");
        workers.0 = vec![
            "# HELP pyipcd_workers Worker processes serving (daemon.processes > 1).".into(),
            "# TYPE pyipcd_workers gauge".into(),
        ];
        workers
            .1
            .push(format!("pyipcd_workers {}", view.serving.len()));
        let respawns = self.family("pyipcd_worker_respawns_total");
        respawns.0 = vec![
            "# HELP pyipcd_worker_respawns_total Worker processes started again, by reason.".into(),
            "# TYPE pyipcd_worker_respawns_total counter".into(),
        ];
        for reason in ["exit", "max_requests", "max_rss", "lifetime"] {
            let n = view.respawns.get(reason).copied().unwrap_or(0);
            respawns.1.push(format!(
                "pyipcd_worker_respawns_total{{reason=\"{reason}\"}} {n}"
            ));
        }
    }

    /// One worker's exposition, each sample labelled `worker="index"`.
    fn add(&mut self, text: &str, index: usize) {
        let mut current = String::new();
        for line in text.lines() {
            if let Some(rest) = line
                .strip_prefix("# HELP ")
                .or_else(|| line.strip_prefix("# TYPE "))
            {
                current = rest.split(' ').next().unwrap_or_default().to_string();
                let family = self.family(&current);
                if !family.0.iter().any(|l| l == line) {
                    family.0.push(line.to_string());
                }
            } else if !line.is_empty() && !line.starts_with('#') {
                let labelled = with_worker_label(line, index);
                let name = line
                    .split(['{', ' '])
                    .next()
                    .unwrap_or_default()
                    .to_string();
                let key = if current.is_empty() || !name.starts_with(&current) {
                    name
                } else {
                    current.clone()
                };
                self.family(&key).1.push(labelled);
            }
        }
    }

    fn render(&self) -> String {
        let mut out = String::new();
        for name in &self.order {
            let (meta, samples) = &self.families[name];
            for line in meta.iter().chain(samples) {
                out.push_str(line);
                out.push('\n');
            }
        }
        out
    }
}

/// `name{a="b"} 1` → `name{worker="i",a="b"} 1`; `name 1` → `name{worker="i"} 1`.
fn with_worker_label(line: &str, index: usize) -> String {
    match line.find(['{', ' ']) {
        Some(at) if line[at..].starts_with("{}") => {
            format!("{}{{worker=\"{index}\"}}{}", &line[..at], &line[at + 2..])
        }
        Some(at) if line[at..].starts_with('{') => {
            format!("{}{{worker=\"{index}\",{}", &line[..at], &line[at + 1..])
        }
        Some(at) => format!("{}{{worker=\"{index}\"}}{}", &line[..at], &line[at..]),
        None => line.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_get_the_worker_label() {
        assert_eq!(with_worker_label("a 1", 0), "a{worker=\"0\"} 1");
        assert_eq!(
            with_worker_label("a{role=\"x\"} 2", 3),
            "a{worker=\"3\",role=\"x\"} 2"
        );
    }

    #[test]
    fn families_stay_grouped_across_workers() {
        let w = "# HELP c_total C.\n# TYPE c_total counter\nc_total{role=\"r\"} 1\n# HELP h H.\n# TYPE h histogram\nh_bucket{le=\"1\"} 1\nh_sum 1\nh_count 1\n";
        let mut f = Families::default();
        f.add(w, 0);
        f.add(w, 1);
        let out = f.render();
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(
            lines
                .iter()
                .filter(|l| l.starts_with("# TYPE c_total"))
                .count(),
            1
        );
        let c: Vec<usize> = (0..lines.len())
            .filter(|&i| lines[i].starts_with("c_total"))
            .collect();
        assert_eq!(c, vec![2, 3], "{out}");
        assert!(out.contains("h_count{worker=\"1\"} 1"), "{out}");
        let h: Vec<usize> = (0..lines.len())
            .filter(|&i| lines[i].starts_with("h_"))
            .collect();
        assert_eq!(h, (6..12).collect::<Vec<_>>(), "{out}");
    }
}
