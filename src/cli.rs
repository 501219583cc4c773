//! Command-line interface (clap derive).

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// The default configuration file, relative to the working directory.
pub const DEFAULT_CONFIG: &str = "config/pyipcd.toml";

/// pyipcd: host Python handlers and tasks behind TCP and shared-memory IPC.
#[derive(Debug, Parser)]
#[command(name = "pyipcd", version, about, long_about = None)]
pub struct Cli {
    /// What to do (default: run).
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Options for the default `run` command.
    #[command(flatten)]
    pub run: ConfigArg,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon until SIGINT/SIGTERM.
    Run(ConfigArg),
    /// Load and validate a config, resolve every Python target it names as
    /// `run` would, try its listen addresses; print OK or every problem.
    Check(CheckArgs),
    /// Ask a running daemon's admin endpoint (`[admin] listen`) for /health; exit 0 when healthy.
    Health(ConfigArg),
}

/// The `-c/--config` option shared by every command.
#[derive(Debug, Args, Clone)]
pub struct ConfigArg {
    /// Configuration file.
    #[arg(short, long, value_name = "FILE", default_value = DEFAULT_CONFIG)]
    pub config: PathBuf,
}

/// `pyipcd check` options.
#[derive(Debug, Args, Clone)]
pub struct CheckArgs {
    /// The configuration file.
    #[command(flatten)]
    pub config: ConfigArg,
    /// Do not try to bind the listen addresses (when checking the next
    /// configuration of a daemon that is running and holds them).
    #[arg(long)]
    pub no_bind: bool,
}
