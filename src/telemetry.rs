//! Logging: tracing to stderr as text or JSON. `RUST_LOG` overrides `log.level`.
//! Python output arrives here too, as events with target `python` and a `role` field.

use tracing::level_filters::LevelFilter;
use tracing_subscriber::EnvFilter;

use crate::config::{LogConfig, LogFormat};

/// Installs the global subscriber (once; later calls are ignored) and returns
/// the most verbose level it lets through, as a Python `logging` level number.
pub fn init(cfg: &LogConfig) -> u32 {
    let filter = match std::env::var("RUST_LOG") {
        Ok(v) if !v.is_empty() => EnvFilter::builder()
            .with_default_directive(LevelFilter::INFO.into())
            .parse_lossy(v),
        _ => EnvFilter::builder()
            .with_default_directive(LevelFilter::INFO.into())
            .parse_lossy(&cfg.level),
    };
    let python_level = python_level(filter.max_level_hint());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_thread_names(true);
    let _ = match cfg.format {
        LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .try_init(),
        LogFormat::Json => builder.json().with_current_span(false).try_init(),
    };
    python_level
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
