//! Logging: tracing to stderr as text or JSON, or to the systemd journal.
//! `RUST_LOG` overrides `log.level`. Python output arrives here too, as events
//! with target `python` and a `role` field (journald: `F_ROLE`). A worker
//! process (`daemon.processes` > 1) tags every line with its index: text
//! lines start `[worker N]`, JSON objects get `"worker": N`, journal entries
//! `PYIPCD_WORKER=N`.

use std::os::unix::fs::MetadataExt;

use tracing::level_filters::LevelFilter;
use tracing::{Event, Subscriber};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::format::{self, FormatEvent, FormatFields, JsonFields, Writer};
use tracing_subscriber::fmt::{FmtContext, FormattedFields};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;

use crate::config::{LogConfig, LogFormat};

/// Installs the global subscriber (once; later calls are ignored) and returns
/// the most verbose level it lets through, as a Python `logging` level number.
/// `worker` is this process's index when it is a supervisor's worker.
pub fn init(cfg: &LogConfig, worker: Option<usize>) -> u32 {
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
                let tag = worker.map(|w| ("PYIPCD_WORKER", w.to_string()));
                let layer = layer
                    .with_syslog_identifier("pyipcd".into())
                    .with_custom_fields(tag);
                let _ = tracing_subscriber::registry()
                    .with(filter())
                    .with(layer)
                    .try_init();
                return python_level;
            }
            Err(e) => {
                init_stderr(LogFormat::Text, filter(), worker);
                tracing::warn!(
                    "log.format = journald but the journal is not reachable ({e}); logging text to stderr"
                );
                return python_level;
            }
        }
    }
    init_stderr(format, filter(), worker);
    python_level
}

fn init_stderr(format: LogFormat, filter: EnvFilter, worker: Option<usize>) {
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Json => builder
            .fmt_fields(JsonFields::new())
            .event_format(WorkerTag {
                inner: format::format()
                    .json()
                    .with_current_span(false)
                    .with_thread_names(true),
                worker,
                json: true,
            })
            .try_init(),
        _ => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .event_format(WorkerTag {
                inner: format::format().with_thread_names(true),
                worker,
                json: false,
            })
            .try_init(),
    };
}

/// An event format that tags a worker process's lines with its index
/// (and leaves a single process's lines as they are).
struct WorkerTag<F> {
    inner: F,
    worker: Option<usize>,
    /// The inner format writes one JSON object per event.
    json: bool,
}

impl<S, N, F> FormatEvent<S, N> for WorkerTag<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
    FormattedFields<N>: 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> std::fmt::Result {
        let Some(worker) = self.worker else {
            return self.inner.format_event(ctx, writer, event);
        };
        if !self.json {
            write!(writer, "[worker {worker}] ")?;
            return self.inner.format_event(ctx, writer, event);
        }
        let mut line = String::new();
        self.inner
            .format_event(ctx, Writer::new(&mut line), event)?;
        match line.strip_prefix('{') {
            Some(rest) => write!(writer, "{{\"worker\":{worker},{rest}"),
            None => writer.write_str(&line),
        }
    }
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
