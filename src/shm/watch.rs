//! `mode = "watch"`: the classic shared-memory demo, from config. A poller (a
//! tokio task) compares the region with what it saw last every `poll` and
//! hands each change to the `on_change` Python handler on the GIL pool; bytes
//! the handler returns are written back at offset 0. A scripted writer puts
//! each `write` value in turn into the region, `write_interval` apart, and
//! `pyipcd.send(name, data)` from Python writes `data` the same way.
//!
//! Nothing synchronises the writers (the classic demo's known flaw, kept on
//! purpose): a change made and undone between two polls is not seen, and a
//! poll may see a write half done. The `channel` mode is the synchronised one.

use std::sync::Arc;

use bytes::Bytes;
use pyo3::prelude::*;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::region::{ShmError, ShmRegion};
use crate::config::ShmRegionConfig;
use crate::py::handler::{Handler, Runs};
use crate::py::target::ResolveError;
use crate::registry::{Generation, RouteGuard, registry};
use crate::role::Context;

/// Regions larger than this are copied off the tokio workers.
const INLINE_COPY_MAX: usize = 64 * 1024;

/// What a watch instance resolved in Python: kept by a replacement whose
/// `on_change` did not change.
#[derive(Clone, Default)]
pub struct WatchParts {
    on_change: Option<Arc<Handler>>,
}

impl WatchParts {
    /// Resolves `on_change` of `cfg`, or takes `old`'s when `same` says it is unchanged.
    ///
    /// # Errors
    /// [`ResolveError`] if it cannot be resolved.
    pub fn resolve(
        py: Python<'_>,
        cfg: &ShmRegionConfig,
        old: Option<&WatchParts>,
        same: impl Fn(&str) -> bool,
    ) -> Result<Self, ResolveError> {
        if let Some(o) = old.filter(|_| same("on_change")) {
            return Ok(o.clone());
        }
        let key = format!("shm.region `{}` on_change", cfg.name);
        let on_change = cfg
            .on_change
            .as_deref()
            .map(|spec| Handler::resolve(py, &cfg.name, &key, spec, Runs::OnPool).map(Arc::new))
            .transpose()?;
        Ok(Self { on_change })
    }
}

/// A watched region, opened, with its handler resolved.
pub struct ShmWatcher {
    config: ShmRegionConfig,
    region: Arc<ShmRegion>,
    parts: WatchParts,
    inbox: (mpsc::Sender<Bytes>, mpsc::Receiver<Bytes>),
    _route: Option<RouteGuard>,
}

/// Messages from `pyipcd.send` that may wait for the poller.
const INBOX: usize = 64;

impl ShmWatcher {
    /// Opens the region's file (creating it if configured).
    ///
    /// # Errors
    /// [`ShmError`] naming the file.
    pub fn open(config: &ShmRegionConfig, parts: WatchParts) -> Result<Self, ShmError> {
        let size = config.size.map_or(0, |s| s.as_u64());
        let len = usize::try_from(size).unwrap_or(usize::MAX);
        let region = Arc::new(ShmRegion::open(&config.path, len, config.create)?);
        Ok(Self {
            config: config.clone(),
            region,
            parts,
            inbox: mpsc::channel(INBOX),
            _route: None,
        })
    }

    /// From now on `pyipcd.send(name, data)` writes `data` into the region
    /// (zeroed, then `data` at offset 0, as the scripted writer does), as
    /// instance `generation`.
    pub fn publish(&mut self, generation: Generation) {
        let route = registry().route(&self.config.name, generation, self.inbox.0.clone());
        self._route = Some(route);
    }

    /// The resolved Python parts, for a replacement instance.
    pub fn parts(&self) -> &WatchParts {
        &self.parts
    }

    /// Polls (and runs the scripted writer) until `ctx.stop` is cancelled.
    pub async fn run(mut self, ctx: Context) {
        let (pool, token) = (&ctx.pool, &ctx.stop);
        let (tx, rx) = mpsc::channel(1);
        let (_, mut inbox) = std::mem::replace(&mut self.inbox, (tx, rx));
        let cfg = &self.config;
        pool.set_max_in_flight(&ctx.name, cfg.max_in_flight);
        tracing::info!(
            role = %cfg.name,
            path = %self.region.path().display(),
            size = self.region.len(),
            "watching every {:?}",
            cfg.poll
        );
        let writer = (!cfg.write.is_empty())
            .then(|| tokio::spawn(script(cfg.clone(), self.region.clone(), token.clone())));
        let mut length = Length::default();
        let mut seen = length
            .note(cfg, snapshot(&self.region).await)
            .unwrap_or_else(|| vec![0; self.region.len()]);
        let mut tick = tokio::time::interval(cfg.poll);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = token.cancelled() => break,
                _ = tick.tick() => {}
                Some(data) = inbox.recv() => {
                    match self.region.replace(&data) {
                        Ok(()) => tracing::info!(role = %cfg.name, "pyipcd.send wrote {}", preview(&data)),
                        Err(e) => tracing::error!(role = %cfg.name, "pyipcd.send: cannot write the region: {e}"),
                    }
                    continue;
                }
            }
            let Some(now) = length.note(cfg, snapshot(&self.region).await) else {
                continue;
            };
            if now == seen {
                continue;
            }
            tracing::info!(role = %cfg.name, "changed: {}", preview(&now));
            seen = now;
            if let Some(h) = &self.parts.on_change {
                match pool.call(h, Bytes::copy_from_slice(&seen)).await {
                    Ok(Some(back)) => {
                        if let Err(e) = self.region.write_at_start(&back) {
                            tracing::error!(role = %cfg.name, "cannot write on_change's reply back: {e}");
                        }
                        // Our own write-back is not a change to report.
                        if let Some(now) = length.note(cfg, snapshot(&self.region).await) {
                            seen = now;
                        }
                    }
                    Ok(None) => {}
                    Err(e) => tracing::warn!(role = %cfg.name, "on_change failed: {e}"),
                }
            }
        }
        if let Some(w) = writer {
            let _ = w.await;
        }
    }
}

/// Whether the file was last seen shorter than the region, so that a
/// truncation is logged once when it starts and once when it ends.
#[derive(Default)]
struct Length {
    short: bool,
    failing: bool,
}

impl Length {
    /// The region's bytes from a snapshot (`None` when it failed), logging
    /// when the file becomes shorter than the region or a read fails, and
    /// when that ends.
    fn note(
        &mut self,
        cfg: &ShmRegionConfig,
        taken: std::io::Result<(Vec<u8>, usize)>,
    ) -> Option<Vec<u8>> {
        let (bytes, had) = match taken {
            Ok(s) => s,
            Err(e) => {
                if !std::mem::replace(&mut self.failing, true) {
                    tracing::error!(role = %cfg.name, path = %cfg.path.display(), "cannot read the region: {e}");
                }
                return None;
            }
        };
        if std::mem::replace(&mut self.failing, false) {
            tracing::info!(role = %cfg.name, "the region reads again");
        }
        let short = had < bytes.len();
        if short && !self.short {
            tracing::warn!(
                role = %cfg.name,
                path = %cfg.path.display(),
                "the file has {had} bytes, the region {}: was it truncated? The missing bytes read as zeros",
                bytes.len()
            );
        } else if !short && self.short {
            tracing::info!(role = %cfg.name, "the file has the region's {} bytes again", bytes.len());
        }
        self.short = short;
        Some(bytes)
    }
}

/// A copy of the region and how many of its bytes the file holds, taken off
/// the tokio workers when it is large.
async fn snapshot(region: &Arc<ShmRegion>) -> std::io::Result<(Vec<u8>, usize)> {
    let take = |r: &ShmRegion| {
        let mut v = Vec::new();
        r.read_into(&mut v).map(|had| (v, had))
    };
    if region.len() <= INLINE_COPY_MAX {
        return take(region);
    }
    let r = region.clone();
    tokio::task::spawn_blocking(move || take(&r))
        .await
        .map_err(std::io::Error::other)?
}

/// The contents up to the first NUL, escaped, at most 80 characters.
fn preview(bytes: &[u8]) -> String {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    let text = bytes[..end].escape_ascii().to_string();
    if text.len() > 80 {
        format!("{}…", &text[..80])
    } else {
        text
    }
}

/// The scripted writer: each value in turn, `write_interval` apart.
async fn script(cfg: ShmRegionConfig, region: Arc<ShmRegion>, token: CancellationToken) {
    for (i, value) in cfg.write.iter().enumerate() {
        if i > 0 {
            tokio::select! {
                _ = token.cancelled() => return,
                _ = tokio::time::sleep(cfg.write_interval) => {}
            }
        }
        match region.replace(value.as_bytes()) {
            Ok(()) => {
                tracing::info!(role = %cfg.name, "writer wrote {}", preview(value.as_bytes()))
            }
            Err(e) => tracing::error!(role = %cfg.name, "writer: cannot write the region: {e}"),
        }
    }
    tracing::info!(role = %cfg.name, "writer finished ({} values)", cfg.write.len());
}
