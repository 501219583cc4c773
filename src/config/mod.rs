//! The daemon's configuration: one TOML file plus `PYIPCD__…` environment
//! overrides, deserialised into typed structs that reject unknown keys, then
//! validated as a whole so every problem is reported at once with its dotted key.
//!
//! Relative paths (`python.paths`) are resolved against the folder of the
//! config file, never against the working directory, so a config behaves the
//! same whoever starts the daemon and from wherever.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use bytesize::ByteSize;
use serde::Deserialize;

use crate::py::target::Target;

mod parse;
mod placement;
mod roles;
mod targets;

pub use placement::{MAX_PROCESSES, Placement, WORKER_PLACEHOLDER, WorkerShare};
pub use roles::*;
pub use targets::{Passes, TargetUse};

/// Environment variable prefix; `PYIPCD__PYTHON__WORKERS=4` sets `python.workers`.
pub const ENV_PREFIX: &str = "PYIPCD";

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Logging settings.
    pub log: LogConfig,
    /// Daemon-wide settings (shutdown).
    pub daemon: DaemonConfig,
    /// The embedded interpreter, its GIL pool and its tasks.
    pub python: PythonConfig,
    /// TCP server and client roles.
    pub tcp: TcpConfig,
    /// Shared-memory regions.
    pub shm: ShmConfig,
    /// The admin endpoint.
    pub admin: AdminConfig,
    /// Where the file was loaded from (set by [`load`], not read from TOML).
    #[serde(skip)]
    pub source: PathBuf,
    /// The file's text as loaded: a supervisor hands it to every worker it
    /// starts, so that all of them run what it read, whatever the file says
    /// by then.
    #[serde(skip)]
    pub text: String,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            log: LogConfig::default(),
            daemon: DaemonConfig::default(),
            python: PythonConfig::default(),
            tcp: TcpConfig::default(),
            shm: ShmConfig::default(),
            admin: AdminConfig::default(),
            source: PathBuf::from("<defaults>"),
            text: String::new(),
        }
    }
}

/// `[log]`: level and output format.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// A tracing filter directive (`info`, `pyipcd=debug,python=info`); `RUST_LOG` overrides it.
    pub level: String,
    /// Output format.
    pub format: LogFormat,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            level: "info".into(),
            format: LogFormat::Auto,
        }
    }
}

/// Where and how log lines are written.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines on stderr.
    Text,
    /// One JSON object per line on stderr, for log collectors and containers.
    Json,
    /// Structured entries to the systemd journal (text on stderr if there is none).
    Journald,
    /// `journald` when stderr is the journal (systemd's `JOURNAL_STREAM`), else `text`.
    #[default]
    Auto,
}

/// `[daemon]`: process-wide behaviour.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DaemonConfig {
    /// How long SIGTERM/SIGINT waits for in-flight calls and tasks before forcing them.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// On a reload, how long the open connections of a replaced server
    /// instance may go on being served by it before they are closed.
    #[serde(with = "humantime_serde")]
    pub reload_drain: Duration,
    /// Tokio worker threads (the GIL pool has its own threads). Unset: the
    /// cores the GIL pool does not use (at least 1): spinning threads beyond
    /// the core count slow everyone down.
    pub io_threads: Option<usize>,
    /// Worker processes (default 1: this process serves). Above 1, the
    /// process started is a supervisor that binds the servers' sockets and
    /// runs that many workers, each with its own interpreter (docs/processes.md).
    pub processes: usize,
    /// With `processes` > 1: a worker that has answered this many requests
    /// (± `recycle_jitter`) is replaced, rolling; 0: never.
    pub max_requests: u64,
    /// With `processes` > 1: a worker whose resident memory stays above
    /// this for `max_rss_samples` samples in a row (one a second) is replaced.
    pub max_rss: Option<ByteSize>,
    /// How many samples in a row over `max_rss` replace a worker (a spike does not).
    pub max_rss_samples: u32,
    /// With `processes` > 1: a worker older than this (± `recycle_jitter`) is replaced.
    #[serde(with = "humantime_serde")]
    pub lifetime: Option<Duration>,
    /// Each worker's `max_requests` and `lifetime` are drawn within ± this
    /// fraction, so that workers started together are not replaced together.
    pub recycle_jitter: f64,
    /// The time slice the daemon's threads ask the kernel for (Linux 6.12+;
    /// 0: the kernel's default), so that a message wakes them sooner on a
    /// busy host (see `sched_slice`).
    #[serde(with = "humantime_serde")]
    pub sched_slice: Duration,
}

impl Default for DaemonConfig {
    fn default() -> Self {
        Self {
            shutdown_grace: Duration::from_secs(5),
            reload_drain: Duration::from_secs(30),
            io_threads: None,
            processes: 1,
            max_requests: 0,
            max_rss: None,
            max_rss_samples: 3,
            lifetime: None,
            recycle_jitter: 0.1,
            sched_slice: Duration::from_micros(100),
        }
    }
}

/// `[python]`: interpreter, GIL pool and tasks.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct PythonConfig {
    /// The prefix of the Python installation to embed (relative to the config
    /// file); default: the one pyipcd was built against.
    pub home: Option<PathBuf>,
    /// A virtualenv whose packages handlers import (relative to the config file).
    pub venv: Option<PathBuf>,
    /// Folders prepended to `sys.path`, relative to the config file.
    pub paths: Vec<PathBuf>,
    /// GIL pool threads.
    pub workers: usize,
    /// Calls that may wait in the pool's queue before callers must wait.
    pub queue: usize,
    /// A call running longer is reported as stuck (with its Python stack) and its caller gets an error.
    #[serde(with = "humantime_serde")]
    pub call_timeout: Duration,
    /// How long an idle pool thread spins for new work before sleeping
    /// (0 = sleep at once: lowest CPU, a wake-up per call when traffic is sparse).
    #[serde(with = "humantime_serde")]
    pub spin: Duration,
    /// How many times a waiting caller re-polls for its reply (yielding to other
    /// tasks) before parking; 0 = park at once.
    pub caller_polls: u32,
    /// Longest line of Python output kept whole; a longer partial line is
    /// logged in pieces of this size (bounds memory per thread).
    pub max_output_line: ByteSize,
    /// Long-running Python tasks, each on its own interpreter thread.
    pub task: Vec<TaskConfig>,
}

impl PythonConfig {
    /// The interpreter `home` and `venv` choose, checked on disk.
    ///
    /// # Errors
    /// What was found and what was expected, prefixed by the dotted key.
    pub fn interpreter(&self) -> Result<crate::py::interpreter::Interpreter, String> {
        crate::py::interpreter::Interpreter::choose(self.home.as_deref(), self.venv.as_deref())
    }
}

impl Default for PythonConfig {
    fn default() -> Self {
        Self {
            home: None,
            venv: None,
            paths: Vec::new(),
            workers: 2,
            queue: 1024,
            call_timeout: Duration::from_secs(10),
            max_output_line: ByteSize::kib(64),
            spin: crate::py::pool::SPIN_FOR,
            caller_polls: crate::py::pool::CALLER_SPIN_POLLS,
            task: Vec::new(),
        }
    }
}

/// `[[python.task]]`: a module, function or method run on a thread of its own.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TaskConfig {
    /// Unique name; log lines from the task carry it.
    pub name: String,
    /// `module`, `module:function` or `module:Class.method`.
    pub run: String,
    /// What to do when the task ends.
    #[serde(default)]
    pub restart: RestartPolicy,
    /// First restart delay; doubles after each quick failure.
    #[serde(default = "default_backoff_min", with = "humantime_serde")]
    pub backoff_min: Duration,
    /// Upper bound of the restart delay.
    #[serde(default = "default_backoff_max", with = "humantime_serde")]
    pub backoff_max: Duration,
    /// With `daemon.processes` > 1: run in worker 0 only (`"one"`) or in every worker (`"all"`).
    #[serde(default)]
    pub processes: Placement,
}

fn default_backoff_min() -> Duration {
    Duration::from_secs(1)
}

pub(crate) fn default_backoff_max() -> Duration {
    Duration::from_secs(30)
}

/// When a finished task is started again.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum RestartPolicy {
    /// Never.
    #[default]
    No,
    /// Only after it raised an exception.
    OnFailure,
    /// Whenever it ends, until the daemon stops.
    Always,
}

/// Everything that can be wrong with a configuration. Each message names the file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read or parsed, or a value has the wrong type.
    #[error("{path}: {message}")]
    Load {
        /// The config file.
        path: PathBuf,
        /// The parser's message (it names the dotted key).
        message: String,
    },
    /// The file parsed but some values are not acceptable.
    #[error("{path}: {}", .problems.join("; "))]
    Invalid {
        /// The config file.
        path: PathBuf,
        /// One line per problem, each starting with its dotted key.
        problems: Vec<String>,
    },
}

impl ConfigError {
    /// Every problem as its own line (for `pyipcd check`).
    pub fn problems(&self) -> Vec<String> {
        match self {
            ConfigError::Load { message, .. } => vec![message.clone()],
            ConfigError::Invalid { problems, .. } => problems.clone(),
        }
    }
}

/// Loads `path`, applies overrides from the process environment and validates.
///
/// # Errors
/// [`ConfigError`] naming the file and the faulty key.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    load_with_env(path, None)
}

/// Like [`load`], but takes environment overrides from `env` instead of the
/// process environment when given (tests use this; they never mutate the environment).
///
/// # Errors
/// [`ConfigError`] naming the file and the faulty key.
pub fn load_with_env(
    path: &Path,
    env: Option<BTreeMap<String, String>>,
) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Load {
        path: path.to_path_buf(),
        message: format!("cannot read: {e}"),
    })?;
    from_str_with_env(&text, path, env)
}

/// Like [`load_with_env`], with the file's text given (`path` names it and
/// anchors its relative paths). The fuzz target `config` calls this.
///
/// # Errors
/// [`ConfigError`] naming the file and the faulty key.
pub fn from_str_with_env(
    text: &str,
    path: &Path,
    env: Option<BTreeMap<String, String>>,
) -> Result<Config, ConfigError> {
    let load_err = |message: String| ConfigError::Load {
        path: path.to_path_buf(),
        message,
    };
    let mut environment = config::Environment::with_prefix(ENV_PREFIX)
        .prefix_separator("__")
        .separator("__")
        .try_parsing(true);
    if let Some(map) = env {
        environment = environment.source(Some(map.into_iter().collect()));
    }
    let from_env: BTreeSet<String> = config::Source::collect(&environment)
        .map_err(|e| load_err(format!("environment variables {ENV_PREFIX}__…: {e}")))?
        .into_keys()
        .collect();
    let raw = config::Config::builder()
        .add_source(config::File::from_str(text, config::FileFormat::Toml))
        .add_source(environment)
        .build()
        .map_err(|e| load_err(e.to_string()))?;
    let merged: serde_json::Value = raw.try_deserialize().map_err(|e| load_err(e.to_string()))?;
    let parse::Parsed {
        config: mut cfg,
        mut problems,
        complete,
    } = parse::config(merged, &from_env);
    cfg.source = path.to_path_buf();
    cfg.text = text.to_string();
    let base = path.parent().unwrap_or(Path::new("."));
    cfg.python.paths = cfg.python.paths.iter().map(|p| resolve(base, p)).collect();
    if let Some(home) = &mut cfg.python.home {
        *home = resolve(base, home);
    }
    // Absolute but not canonical: a venv reached through a symlink keeps that
    // path as sys.prefix, as its bin/python would.
    if let Some(venv) = &mut cfg.python.venv {
        let joined = base.join(&*venv);
        *venv = std::path::absolute(&joined).unwrap_or(joined);
    }
    for region in &mut cfg.shm.region {
        region.path = resolve(base, &region.path);
    }
    for server in &mut cfg.tcp.server {
        server.listen = crate::tcp::endpoint::anchor(&server.listen, base);
    }
    for client in &mut cfg.tcp.client {
        client.connect = crate::tcp::endpoint::anchor(&client.connect, base);
    }
    // The whole-config checks name array elements by index: they run when
    // every element was read (faulty keys are at their defaults then).
    if complete {
        problems.extend(cfg.validate());
    } else {
        problems.push("(the checks across roles run once the problems above are fixed)".into());
    }
    if problems.is_empty() {
        Ok(cfg)
    } else {
        Err(ConfigError::Invalid {
            path: path.to_path_buf(),
            problems,
        })
    }
}

fn resolve(base: &Path, p: &Path) -> PathBuf {
    let joined = if p.is_absolute() {
        p.to_path_buf()
    } else {
        base.join(p)
    };
    // Canonical when it exists (clean log lines); otherwise as written so the
    // "does not exist" problem shows what the user asked for.
    joined.canonicalize().unwrap_or(joined)
}

impl Config {
    /// `daemon.io_threads`, or the cores left after the GIL pool (at least 1).
    pub fn io_threads(&self) -> usize {
        self.daemon.io_threads.unwrap_or_else(|| {
            let cores = std::thread::available_parallelism().map_or(1, usize::from);
            cores.saturating_sub(self.python.workers).max(1)
        })
    }

    /// Every problem with the values, each prefixed by its dotted key.
    pub fn validate(&self) -> Vec<String> {
        let mut problems = Vec::new();
        let py = &self.python;
        // Checked for ASCII first: tracing-subscriber's parser panics on some
        // other input (found by the `config` fuzz target).
        if !self.log.level.is_ascii() {
            problems.push(format!(
                "log.level: `{}` is not a valid filter (ASCII only)",
                self.log.level
            ));
        } else if tracing_subscriber::EnvFilter::builder()
            .parse(&self.log.level)
            .is_err()
        {
            problems.push(format!(
                "log.level: `{}` is not a valid filter",
                self.log.level
            ));
        }
        if self.daemon.io_threads == Some(0) {
            problems.push("daemon.io_threads must be at least 1".into());
        }
        if py.workers == 0 {
            problems.push("python.workers must be at least 1".into());
        }
        if py.queue == 0 {
            problems.push("python.queue must be at least 1".into());
        }
        if py.max_output_line.as_u64() < 80 {
            problems.push("python.max_output_line must be at least 80 B".into());
        }
        if py.call_timeout.is_zero() {
            problems.push("python.call_timeout must be greater than 0".into());
        }
        if let Err(e) = py.interpreter() {
            problems.push(e);
        }
        for (i, p) in py.paths.iter().enumerate() {
            if !p.is_dir() {
                problems.push(format!(
                    "python.paths[{i}]: {} is not a directory",
                    p.display()
                ));
            }
        }
        let mut names = HashSet::new();
        for (i, t) in py.task.iter().enumerate() {
            let key = format!("python.task[{i}]");
            if t.name.trim().is_empty() {
                problems.push(format!("{key}.name must not be empty"));
            } else if !names.insert(t.name.as_str()) {
                problems.push(format!("{key}.name `{}` is used twice", t.name));
            }
            if let Err(e) = Target::parse(&t.run) {
                problems.push(format!("{key}.run: {e}"));
            }
            if t.backoff_min.is_zero() || t.backoff_max < t.backoff_min {
                problems.push(format!("{key}: need 0 < backoff_min <= backoff_max"));
            }
        }
        self.validate_role_names(&mut problems);
        self.validate_max_in_flight(&mut problems);
        self.validate_tcp(&mut problems);
        self.validate_shm(&mut problems);
        self.validate_placement(&mut problems);
        if let Some(listen) = &self.admin.listen
            && let Err(e) = crate::tcp::parse_listen(listen)
        {
            problems.push(format!("admin.listen: {e}"));
        }
        problems
    }
}

impl fmt::Display for LogFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
            LogFormat::Journald => "journald",
            LogFormat::Auto => "auto",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::File::create(&p)
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
        p
    }

    #[test]
    fn defaults_and_relative_paths() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("py")).unwrap();
        let p = write(
            dir.path(),
            "a.toml",
            "[python]\npaths = [\"py\"]\nmax_output_line = \"1MiB\"\n",
        );
        let cfg = load_with_env(&p, Some(BTreeMap::new())).unwrap();
        assert_eq!(cfg.python.max_output_line, ByteSize::mib(1));
        assert_eq!(cfg.python.workers, 2);
        assert_eq!(cfg.python.call_timeout, Duration::from_secs(10));
        assert_eq!(
            cfg.python.paths,
            vec![dir.path().join("py").canonicalize().unwrap()]
        );
    }

    #[test]
    fn environment_overrides_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(dir.path(), "a.toml", "[python]\nworkers = 3\n");
        let env = BTreeMap::from([("PYIPCD__PYTHON__WORKERS".to_string(), "4".to_string())]);
        assert_eq!(load_with_env(&p, Some(env)).unwrap().python.workers, 4);
    }

    #[test]
    fn unknown_key_and_wrong_type_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(dir.path(), "a.toml", "[python]\nworkrs = 3\n");
        let e = load_with_env(&p, Some(BTreeMap::new()))
            .unwrap_err()
            .to_string();
        assert!(e.contains("workrs") && e.contains("a.toml"), "{e}");
        let p = write(dir.path(), "b.toml", "[python]\ncall_timeout = \"soon\"\n");
        let e = load_with_env(&p, Some(BTreeMap::new()))
            .unwrap_err()
            .to_string();
        assert!(e.contains("python.call_timeout"), "{e}");
    }

    #[test]
    fn validation_collects_every_problem() {
        let dir = tempfile::tempdir().unwrap();
        let text = "[python]\nworkers = 0\n[[python.task]]\nname = \"a\"\nrun = \"x:\"\n\
                    [[python.task]]\nname = \"a\"\nrun = \"m\"\n";
        let p = write(dir.path(), "a.toml", text);
        let ConfigError::Invalid { problems, .. } =
            load_with_env(&p, Some(BTreeMap::new())).unwrap_err()
        else {
            panic!("expected validation errors")
        };
        assert_eq!(problems.len(), 3, "{problems:?}");
        assert!(problems[0].starts_with("python.workers"));
        assert!(problems[1].starts_with("python.task[0].run"));
        assert!(problems[2].starts_with("python.task[1].name"));
    }

    #[test]
    fn role_names_are_unique_across_kinds_and_tasks() {
        let dir = tempfile::tempdir().unwrap();
        let text = "[[tcp.server]]\nname = \"x\"\nlisten = \"1\"\nhandler = \"m:f\"\n\
                    [[shm.region]]\nname = \"x\"\npath = \"r\"\nsize = \"1KiB\"\ncreate = true\n\
                    [[shm.region]]\nname = \"y\"\npath = \"s\"\nsize = \"1KiB\"\ncreate = true\n\
                    [[python.task]]\nname = \"y\"\nrun = \"m\"\n";
        let p = write(dir.path(), "a.toml", text);
        let ConfigError::Invalid { problems, .. } =
            load_with_env(&p, Some(BTreeMap::new())).unwrap_err()
        else {
            panic!("expected validation errors")
        };
        assert!(
            problems.contains(&"shm.region[0].name `x` is empty or used twice".to_string()),
            "{problems:?}"
        );
        // A task named like a shm region (not only like a TCP role) is caught.
        assert!(
            problems.contains(&"python.task[0].name `y`: a role has the same name".to_string()),
            "{problems:?}"
        );
    }

    #[test]
    fn a_channel_max_message_must_leave_room_for_the_record_header() {
        let dir = tempfile::tempdir().unwrap();
        let channel = |max: u32| {
            format!(
                "[[shm.region]]\nname = \"c\"\nmode = \"channel\"\npath = \"c.shm\"\n\
                 handler = \"m:f\"\nring_size = \"4KiB\"\nmax_message = {max}\n"
            )
        };
        // 24 B header + 2024 B fill half of a 4 KiB ring exactly.
        let p = write(dir.path(), "ok.toml", &channel(2024));
        assert!(load_with_env(&p, Some(BTreeMap::new())).is_ok());
        let p = write(dir.path(), "over.toml", &channel(2032));
        let e = load_with_env(&p, Some(BTreeMap::new())).unwrap_err();
        assert!(e.to_string().contains("minus 24 B"), "{e}");
    }
}
