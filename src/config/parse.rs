//! From the merged file-and-environment value to a [`Config`], reporting
//! every schema problem in one pass.
//!
//! serde stops at the first error, so the value is deserialised piece by
//! piece (`[log]`, `[daemon]`, `[python]`, each `[[python.task]]`,
//! `[[tcp.server]]`, `[[tcp.client]]`, `[[shm.region]]`, `[admin]`), and
//! within a piece a key that fails is noted and taken out before trying
//! again (a default then applies, or the piece's next problem shows). Each
//! problem names its full dotted key, says what would be valid, and says
//! when the value came from a `PYIPCD__…` environment variable.

use std::collections::BTreeSet;

use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use super::{Config, ENV_PREFIX};

/// Keys whose values are durations, and sizes: a bad one gets a hint.
const SIZE_KEYS: &[&str] = &["max_message", "ring_size", "size", "max_output_line"];

/// The top-level tables and, for those holding arrays of roles, their keys.
const TOP: &[&str] = &["log", "daemon", "python", "tcp", "shm", "admin"];

/// What [`config`] made of the value.
pub(super) struct Parsed {
    /// The configuration: faulty keys left at their defaults, faulty array
    /// elements left out.
    pub config: Config,
    /// Every problem found, one line each, starting with its key.
    pub problems: Vec<String>,
    /// No array element was left out (so the whole-config checks, which
    /// name elements by index, can run too).
    pub complete: bool,
}

/// Deserialises `value` (the file with the environment merged in);
/// `from_env` holds the dotted keys the environment set.
pub(super) fn config(value: Value, from_env: &BTreeSet<String>) -> Parsed {
    let mut p = Problems {
        lines: Vec::new(),
        from_env,
    };
    let Value::Object(mut top) = value else {
        return Parsed {
            config: Config::default(),
            problems: vec!["the file is not a TOML table".into()],
            complete: false,
        };
    };
    for key in top.keys() {
        if !TOP.contains(&key.as_str()) {
            p.push(
                &bare_or_quoted(key),
                &format!("unknown table; valid ones: {}", TOP.join(", ")),
            );
        }
    }
    let mut take = |name: &str| top.remove(name).unwrap_or(Value::Object(Map::new()));
    let (log, daemon, admin) = (take("log"), take("daemon"), take("admin"));
    let mut python = take("python");
    let (tcp, shm) = (take("tcp"), take("shm"));

    let tasks = take_array(&mut python, "task", "python", &mut p);
    let mut cfg = Config {
        log: p.piece(log, "log").unwrap_or_default(),
        daemon: p.piece(daemon, "daemon").unwrap_or_default(),
        python: p.piece(python, "python").unwrap_or_default(),
        admin: p.piece(admin, "admin").unwrap_or_default(),
        ..Config::default()
    };
    let tasks_given = tasks.len();
    cfg.python.task = p.elements(tasks, "python.task");
    let (mut tcp, mut shm) = (tcp, shm);
    let servers = take_array(&mut tcp, "server", "tcp", &mut p);
    let clients = take_array(&mut tcp, "client", "tcp", &mut p);
    p.no_other_keys(&tcp, "tcp", &["server", "client"]);
    let regions = take_array(&mut shm, "region", "shm", &mut p);
    p.no_other_keys(&shm, "shm", &["region"]);
    let given = tasks_given + servers.len() + clients.len() + regions.len();
    cfg.tcp.server = p.elements(servers, "tcp.server");
    cfg.tcp.client = p.elements(clients, "tcp.client");
    cfg.shm.region = p.elements(regions, "shm.region");
    let read =
        cfg.python.task.len() + cfg.tcp.server.len() + cfg.tcp.client.len() + cfg.shm.region.len();
    Parsed {
        config: cfg,
        problems: p.lines,
        complete: read == given,
    }
}

/// Removes `table.key` (an array of tables) from `table`; a non-array is a problem.
fn take_array(table: &mut Value, key: &str, at: &str, p: &mut Problems<'_>) -> Vec<Value> {
    match table.as_object_mut().and_then(|t| t.remove(key)) {
        None => Vec::new(),
        Some(Value::Array(items)) => items,
        Some(other) => {
            p.push(
                &format!("{at}.{key}"),
                &format!(
                    "expected an array of tables ([[{at}.{key}]]), found {}",
                    kind(&other)
                ),
            );
            Vec::new()
        }
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "nothing",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "a table",
    }
}

struct Problems<'a> {
    lines: Vec<String>,
    from_env: &'a BTreeSet<String>,
}

impl Problems<'_> {
    /// Notes `problem` at `key`, naming the environment variable that set it.
    fn push(&mut self, key: &str, problem: &str) {
        let plain: String = key
            .split('.')
            .map(|part| part.split('[').next().unwrap_or(part))
            .collect::<Vec<_>>()
            .join(".");
        let line = if self.from_env.contains(&plain) {
            let var = format!("{ENV_PREFIX}__{}", plain.to_uppercase().replace('.', "__"));
            format!("{key} (set by environment variable {var}): {problem}")
        } else {
            format!("{key}: {problem}")
        };
        self.lines.push(line);
    }

    fn no_other_keys(&mut self, table: &Value, at: &str, valid: &[&str]) {
        if let Some(t) = table.as_object() {
            for key in t.keys() {
                self.push(
                    &format!("{at}.{}", bare_or_quoted(key)),
                    &format!("unknown key; valid keys here: {}", valid.join(", ")),
                );
            }
        } else {
            self.push(at, &format!("expected a table, found {}", kind(table)));
        }
    }

    /// Every element of an array of tables, those that deserialise.
    fn elements<T: DeserializeOwned>(&mut self, items: Vec<Value>, at: &str) -> Vec<T> {
        items
            .into_iter()
            .enumerate()
            .filter_map(|(i, v)| self.piece(v, &format!("{at}[{i}]")))
            .collect()
    }

    /// Deserialises one piece, noting each failing key and retrying without
    /// it, until it succeeds or cannot go on (a required key is missing).
    fn piece<T: DeserializeOwned>(&mut self, mut v: Value, at: &str) -> Option<T> {
        // Each round removes a key, so this ends; the bound is a backstop.
        for _ in 0..256 {
            let err = match serde_path_to_error::deserialize::<_, T>(&v) {
                Ok(t) => return Some(t),
                Err(e) => e,
            };
            let mut path: Vec<Seg> = err
                .path()
                .iter()
                .map(|s| match s {
                    serde_path_to_error::Segment::Seq { index } => Seg::Index(*index),
                    serde_path_to_error::Segment::Map { key } => Seg::Key(key.clone()),
                    serde_path_to_error::Segment::Enum { variant } => Seg::Key(variant.clone()),
                    serde_path_to_error::Segment::Unknown => Seg::Key("?".into()),
                })
                .collect();
            let message = err.into_inner().to_string();
            // serde's unknown- and missing-field errors stop at the table
            // holding the key.
            let missing = backticked(&message, "missing field `");
            if let Some(field) = backticked(&message, "unknown field `").or(missing.clone()) {
                let seg = Seg::Key(field);
                if path.last() != Some(&seg) {
                    path.push(seg);
                }
            }
            let shown: String = path.iter().map(Seg::shown).collect();
            let key = format!("{at}{shown}");
            let field = match path.last() {
                Some(Seg::Key(k)) => k.as_str(),
                _ => "",
            };
            self.push(&key, &explain(&message, field));
            if missing.is_some() || !remove(&mut v, &path) {
                return None;
            }
        }
        None
    }
}

/// A key as TOML writes it in a dotted path: bare when it can be, else quoted.
fn bare_or_quoted(key: &str) -> String {
    let bare = !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if bare {
        key.to_string()
    } else {
        format!("{key:?}")
    }
}

/// The text between `start` and the next backtick in `message`.
fn backticked(message: &str, start: &str) -> Option<String> {
    let rest = &message[message.find(start)? + start.len()..];
    Some(rest[..rest.find('`')?].to_string())
}

/// serde's message, reworded where it helps, with a hint for durations and sizes.
fn explain(message: &str, field: &str) -> String {
    let list = |m: &str| {
        m.split(", ")
            .map(|s| s.trim_matches('`'))
            .collect::<Vec<_>>()
            .join(", ")
    };
    if message.starts_with("missing field `") {
        return "required key missing".into();
    }
    if message.starts_with("unknown field `") {
        return match message.split_once("expected one of ") {
            Some((_, valid)) => format!("unknown key; valid keys here: {}", list(valid)),
            None => "unknown key; this table takes no keys".into(),
        };
    }
    if let Some(variant) = backticked(message, "unknown variant `") {
        return match message.split_once("expected one of ") {
            Some((_, valid)) => format!("`{variant}` is not one of: {}", list(valid)),
            None => format!("`{variant}` is not a valid value"),
        };
    }
    if message.contains("duration") {
        return format!(
            "{message} (a duration is a string with a unit, e.g. \"5s\", \"250ms\", \"2m\")"
        );
    }
    if SIZE_KEYS.contains(&field) {
        return format!(
            "{message} (a size is a number of bytes or a string with a unit, e.g. \"64KiB\", \"1MiB\")"
        );
    }
    let mut out = message.to_string();
    for int in ["usize", "u64", "u32", "u16"] {
        out = out.replace(&format!("expected {int}"), "expected a whole number");
    }
    out
}

/// One step of a path into the value.
#[derive(Debug, PartialEq)]
enum Seg {
    Key(String),
    Index(usize),
}

impl Seg {
    /// As the dotted key shows it: `.key`, `."odd key"` or `[i]`.
    fn shown(&self) -> String {
        match self {
            Seg::Key(k) => format!(".{}", bare_or_quoted(k)),
            Seg::Index(i) => format!("[{i}]"),
        }
    }
}

/// Removes the key at `path` from `v`; false when there is nothing to
/// remove (the piece itself is at fault, or a required key is missing).
fn remove(v: &mut Value, path: &[Seg]) -> bool {
    let Some((last, parents)) = path.split_last() else {
        return false;
    };
    let Seg::Key(key) = last else {
        // An element of a list value (`send`, `paths`): drop the whole list.
        return remove(v, parents);
    };
    let mut at = v;
    for seg in parents {
        let next = match seg {
            Seg::Key(k) => at.get_mut(k),
            Seg::Index(i) => at.get_mut(*i),
        };
        match next {
            Some(n) => at = n,
            None => return false,
        }
    }
    at.as_object_mut().and_then(|t| t.remove(key)).is_some()
}
