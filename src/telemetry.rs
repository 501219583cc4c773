//! Logging: tracing to stderr as text or JSON, or to the systemd journal.
//! `RUST_LOG` overrides `log.level`. Python output arrives here too, as events
//! with target `python` and a `role` field (journald: `F_ROLE`).

use std::os::unix::fs::MetadataExt;

use tracing::level_filters::LevelFilter;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use crate::config::{LogConfig, LogFormat};

/// Installs the global subscriber (once; later calls are ignored) and returns
/// the most verbose level it lets through, as a Python `logging` level number.
pub fn init(cfg: &LogConfig) -> u32 {
    // tracing-subscriber's directive parser panics on some non-ASCII input
    // (found by the `config` fuzz target): such a filter counts as none.
    let lossy = |text: &str| {
        let builder = EnvFilter::builder().with_default_directive(LevelFilter::INFO.into());
        if text.is_ascii() {
            builder.parse_lossy(text)
        } else {
            builder.parse_lossy("")
        }
    };
    let filter = || match std::env::var("RUST_LOG") {
        Ok(v) if !v.is_empty() => lossy(&v),
        _ => lossy(&cfg.level),
    };
    let python_level = python_level(filter().max_level_hint());
    let format = match cfg.format {
        LogFormat::Auto if stderr_is_journal() => LogFormat::Journald,
        LogFormat::Auto => LogFormat::Text,
        f => f,
    };
    if format == LogFormat::Journald {
        match tracing_journald::layer() {
            Ok(layer) => {
                let layer = layer.with_syslog_identifier("pyipcd".into());
                let _ = tracing_subscriber::registry()
                    .with(filter())
                    .with(layer)
                    .try_init();
                return python_level;
            }
            Err(e) => {
                init_stderr(LogFormat::Text, filter());
                tracing::warn!(
                    "log.format = journald but the journal is not reachable ({e}); logging text to stderr"
                );
                return python_level;
            }
        }
    }
    init_stderr(format, filter());
    python_level
}

fn init_stderr(format: LogFormat, filter: EnvFilter) {
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_thread_names(true);
    let _ = match format {
        LogFormat::Json => builder.json().with_current_span(false).try_init(),
        _ => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .try_init(),
    };
}

/// Whether stderr is the journal stream systemd set up (`JOURNAL_STREAM=dev:ino`).
fn stderr_is_journal() -> bool {
    let Ok(stream) = std::env::var("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = stream.split_once(':') else {
        return false;
    };
    let Ok(meta) = std::fs::metadata("/proc/self/fd/2") else {
        return false;
    };
    dev.parse() == Ok(meta.dev()) && ino.parse() == Ok(meta.ino())
}

fn python_level(max: Option<LevelFilter>) -> u32 {
    match max {
        Some(LevelFilter::OFF) => 50,
        Some(LevelFilter::ERROR) => 40,
        Some(LevelFilter::WARN) => 30,
        Some(LevelFilter::INFO) => 20,
        Some(LevelFilter::DEBUG) => 10,
        _ => 1,
    }
}
