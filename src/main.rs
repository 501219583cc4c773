//! The `pyipcd` binary: parses the command line, dispatches, maps errors to exit codes.

use clap::Parser;

/// Buffers cross threads on every message (decoded on the I/O thread, freed
/// after the reply is written; replies built on a GIL thread): glibc malloc's
/// arena locks showed up in profiles, mimalloc frees cross-thread cheaply.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
use pyipcd::cli::{CheckArgs, Cli, Command, ConfigArg};
use pyipcd::tcp::endpoint::Listen;
use pyipcd::{EXIT_CONFIG, EXIT_FAILURE, EXIT_OK, config, daemon, py, telemetry, workers};

fn main() {
    let cli = Cli::parse();
    let code = match cli.command {
        None => run(&cli.run),
        Some(Command::Run(args)) => run(&args),
        Some(Command::Check(args)) => check(&args),
        Some(Command::Health(args)) => health(&args),
    };
    // Exit without finalising Python: threads stuck in C code must not hang us.
    std::process::exit(code);
}

/// The config (from `text` when given, its relative paths anchored at the
/// file's folder), or (having said why) the exit code for a bad one.
fn load(args: &ConfigArg, text: Option<&str>) -> Result<config::Config, i32> {
    match text {
        Some(text) => config::from_str_with_env(text, &args.config, None),
        None => config::load(&args.config),
    }
    .map_err(|e| {
        eprintln!("pyipcd: configuration error: {e}");
        EXIT_CONFIG
    })
}

fn run(args: &ConfigArg) -> i32 {
    let worker = workers::this_worker();
    // A worker runs the config text its supervisor loaded, not the file as
    // it may read now (taken from the environment before any thread starts).
    let snapshot = worker.and_then(|_| std::env::var(workers::identity::CONFIG_ENV).ok());
    if worker.is_some() {
        // SAFETY: no thread has started yet.
        #[allow(unsafe_code)]
        unsafe {
            std::env::remove_var(workers::identity::CONFIG_ENV);
        }
        // The supervisor passed the listening sockets the way systemd does,
        // but could not know this process's pid before starting it.
        // SAFETY: no thread has started yet.
        #[allow(unsafe_code)]
        unsafe {
            std::env::set_var("LISTEN_PID", std::process::id().to_string());
        }
    }
    // SAFETY: no thread has started yet (only the command line was parsed),
    // and nothing else in this process touches descriptors 3 and up.
    #[allow(unsafe_code)]
    let activated = unsafe { pyipcd::take_activated_sockets() };
    let mut cfg = match load(args, snapshot.as_deref()) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let python_level = telemetry::init(&cfg.log, worker.as_ref().map(|w| w.index));
    // Before any thread starts: they all inherit it.
    pyipcd::sched_slice::request_and_log(cfg.daemon.sched_slice);
    if let Err(e) = activated {
        tracing::error!("{e}");
        return EXIT_CONFIG;
    }
    if let Some(worker) = worker {
        let share = cfg.for_worker(worker.index);
        workers::set_elsewhere(share.elsewhere);
        cfg = share.config;
        // The supervisor serves the admin endpoint, asking each worker's
        // own on a loopback port the worker reports.
        if cfg.admin.listen.is_some() {
            cfg.admin.listen = Some("127.0.0.1:0".into());
        }
    } else if cfg.daemon.processes > 1 {
        return match workers::supervise(cfg) {
            Ok(code) => code,
            Err(e) => {
                tracing::error!("{e}");
                e.exit_code()
            }
        };
    }
    for (name, n) in pyipcd::activated_names()
        .into_iter()
        .filter(|_| worker.is_none())
    {
        let used = cfg
            .tcp
            .server
            .iter()
            .any(|s| Listen::parse(&s.listen) == Ok(Listen::Activated(name.clone())));
        if used {
            tracing::info!("systemd passed {n} socket(s) named `{name}`");
        } else {
            tracing::warn!(
                "systemd passed {n} socket(s) named `{name}`, which no role listens on (listen = \"systemd:{name}\")"
            );
        }
    }
    match daemon::run(cfg, python_level) {
        Ok(code) => code,
        Err(e) => {
            tracing::error!("{e}");
            e.exit_code()
        }
    }
}

fn check(check: &CheckArgs) -> i32 {
    let args = &check.config;
    let path = args.config.display();
    let cfg = match config::load(&args.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{path}: configuration error");
            for p in e.problems() {
                eprintln!("  {p}");
            }
            return EXIT_CONFIG;
        }
    };
    let _ = telemetry::init(&cfg.log, None);
    let interpreter = match cfg.python.interpreter() {
        Ok(i) => i,
        Err(e) => {
            eprintln!("{path}: {e}");
            return EXIT_CONFIG;
        }
    };
    for note in &interpreter.notes {
        eprintln!("{path}: warning: {note}");
    }
    let settings = py::PySettings {
        interpreter,
        log_level: 30,
        ..Default::default()
    };
    let python = match py::init(&cfg.python.paths, &settings) {
        Ok(python) => python,
        Err(e) => {
            eprintln!("{path}: {e}");
            return e.exit_code();
        }
    };
    let mut problems = py::check_targets(&cfg.python_targets());
    if !check.no_bind {
        problems.extend(pyipcd::tcp::check_binds(&cfg));
    }
    if problems.is_empty() {
        println!("OK {path}");
        println!("{python}");
        EXIT_OK
    } else {
        eprintln!("{path}: {} problem(s)", problems.len());
        for p in &problems {
            eprintln!("  {p}");
        }
        EXIT_CONFIG
    }
}

fn health(args: &ConfigArg) -> i32 {
    let cfg = match load(args, None) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let Some(listen) = cfg.admin.listen.as_deref() else {
        eprintln!(
            "{}: [admin] listen is not set; no endpoint to ask",
            args.config.display()
        );
        return EXIT_CONFIG;
    };
    let addr = match pyipcd::tcp::parse_listen(listen) {
        Ok(a) => a.to_string(),
        Err(e) => {
            eprintln!("admin.listen: {e}");
            return EXIT_CONFIG;
        }
    };
    match pyipcd::admin::probe(&addr) {
        Ok((true, body)) => {
            println!("{body}");
            EXIT_OK
        }
        Ok((false, body)) => {
            eprintln!("{body}");
            EXIT_FAILURE
        }
        Err(e) => {
            eprintln!("cannot reach {addr}: {e}");
            EXIT_FAILURE
        }
    }
}
