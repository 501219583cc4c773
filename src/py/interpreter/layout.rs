//! The on-disk layout of Python installations and virtualenvs, as CPython
//! reads it: `lib/python3.X/os.py` landmarks, `lib-dynload`, `pyvenv.cfg`.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use super::built;

/// `pyvenv.cfg`: `key = value` lines, keys case-insensitive.
pub(super) struct PyvenvCfg(Vec<(String, String)>);

impl PyvenvCfg {
    pub(super) fn parse(text: &str) -> Self {
        Self(
            text.lines()
                .filter_map(|l| l.split_once('='))
                .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
                .collect(),
        )
    }

    pub(super) fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// `version` (venv) or `version_info` (virtualenv, uv).
    pub(super) fn version(&self) -> Option<&str> {
        self.get("version").or_else(|| self.get("version_info"))
    }
}

/// `3.12.1` and `3.12.1.final.0` → `3.12`.
pub(super) fn minor_of(version: &str) -> String {
    version.split('.').take(2).collect::<Vec<_>>().join(".")
}

/// `lib/python3.11` (with the build's platlibdir).
pub(super) fn stdlib_subdir() -> String {
    format!("{}/python{}", built::PLATLIBDIR, built::MINOR)
}

/// `lib/python3.11/os.py`: CPython's own landmark for a prefix's stdlib.
pub(super) fn stdlib_landmark() -> String {
    format!("{}/os.py", stdlib_subdir())
}

pub(super) fn stdlib_under(prefix: &Path) -> bool {
    prefix.join(stdlib_landmark()).is_file()
}

/// `"; found lib/python3.9"` for the Python folders under `prefix`, if any.
pub(super) fn found_stdlibs(prefix: &Path) -> String {
    let lib = prefix.join(built::PLATLIBDIR);
    let mut found: Vec<String> = std::fs::read_dir(&lib)
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("python"))
        .map(|n| format!("{}/{n}", built::PLATLIBDIR))
        .collect();
    found.sort();
    if found.is_empty() {
        String::new()
    } else {
        format!("; found {}", found.join(", "))
    }
}

/// The interpreter in an installation's `bin` folder: `python3.X`, else
/// `python3`, else `python` (the first name when none exists: CPython only
/// needs the folder then).
pub(super) fn interpreter_in(bin: &Path) -> PathBuf {
    let names = [
        format!("python{}", built::MINOR),
        "python3".into(),
        "python".into(),
    ];
    names
        .iter()
        .map(|name| bin.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| bin.join(&names[0]))
}

/// Module names of the extension files in `dir` (`_socket.cpython-311-….so` → `_socket`).
pub(super) fn module_files(dir: &Path) -> HashSet<String> {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.ends_with(".so")
                .then(|| name.split('.').next().unwrap_or_default().to_string())
        })
        .collect()
}

/// CPython reads `home` as `prefix:exec_prefix`: a `:` in a path would split it.
pub(super) fn refuse_colon(key: &str, path: &Path) -> Result<(), String> {
    if path.as_os_str().as_encoded_bytes().contains(&b':') {
        Err(format!(
            "{key}: {} contains a `:`, which CPython would read as prefix:exec_prefix; \
             use a path without one",
            path.display()
        ))
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn venv_version_keys_of_venv_virtualenv_and_uv_are_read() {
        for (line, version) in [
            ("version = 3.12.1", "3.12.1"),
            ("version_info = 3.12.1.final.0", "3.12.1.final.0"),
        ] {
            let cfg = PyvenvCfg::parse(&format!("home = /usr/bin\n{line}\n"));
            assert_eq!(cfg.version(), Some(version));
            assert_eq!(minor_of(version), "3.12");
        }
    }
}
