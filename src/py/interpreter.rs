//! Which Python installation the daemon embeds, and starting it.
//!
//! CPython finds its standard library from `sys.executable`; an embedding
//! program that names none gets the first `python3` on `PATH`, which under
//! systemd (or with pyenv, conda, uv) is often another installation whose
//! stdlib does not match the linked libpython. So the choice is explicit and
//! goes through CPython's initialisation config (`PyConfig`), never through
//! environment variables that user code would inherit:
//!
//! - by default, the installation pyipcd was built against (recorded by
//!   `build.rs`): its executable and its prefix as `PyConfig.home`;
//! - `python.home`: the prefix of another installation of the same minor
//!   (like mod_wsgi's `python-home`);
//! - `python.venv`: a virtualenv, set up exactly as `venv/bin/python` does:
//!   `home` is the base installation its `pyvenv.cfg` names and
//!   `sys.executable` the venv's interpreter, so `site` reads that
//!   `pyvenv.cfg`, makes `sys.prefix` the venv and puts its site-packages
//!   (with `.pth` files) ahead of the base ones.

use std::fmt;
use std::path::{Path, PathBuf};

use pyo3::prelude::*;

/// The Python installation pyipcd was built against (from `build.rs`).
pub mod built {
    /// Its base executable (`sys._base_executable` at build time).
    pub const EXECUTABLE: &str = env!("PYIPCD_BUILD_PYTHON_EXECUTABLE");
    /// Its `sys.base_prefix`.
    pub const PREFIX: &str = env!("PYIPCD_BUILD_PYTHON_PREFIX");
    /// Its `sys.base_exec_prefix`.
    pub const EXEC_PREFIX: &str = env!("PYIPCD_BUILD_PYTHON_EXEC_PREFIX");
    /// Its `sys.platlibdir` (`lib`, or `lib64` on some distributions).
    pub const PLATLIBDIR: &str = env!("PYIPCD_BUILD_PYTHON_PLATLIBDIR");
    /// Its full version (`3.11.7`).
    pub const VERSION: &str = env!("PYIPCD_BUILD_PYTHON_VERSION");
    /// The linked libpython's `major.minor`: every installation or venv used
    /// at run time must be this minor.
    pub const MINOR: &str = env!("PYIPCD_BUILD_PYTHON_MINOR");
}

/// How the interpreter is to be set up: the `PyConfig` fields pyipcd sets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interpreter {
    /// `PyConfig.executable`: what `sys.executable` will be, and where CPython
    /// starts looking for `pyvenv.cfg` and the standard library.
    pub executable: PathBuf,
    /// `PyConfig.home` (`prefix` or `prefix:exec_prefix`): always set, so a
    /// `PYTHONHOME` in the environment cannot redirect the daemon. For a venv
    /// it is the base installation its `pyvenv.cfg` names, found the way
    /// CPython finds it (upwards from `home` to `lib/python3.X/os.py`).
    pub home: String,
    /// The virtualenv in use, if any.
    pub venv: Option<PathBuf>,
}

impl Default for Interpreter {
    /// The installation pyipcd was built against.
    fn default() -> Self {
        let home = if built::PREFIX == built::EXEC_PREFIX {
            built::PREFIX.to_string()
        } else {
            format!("{}:{}", built::PREFIX, built::EXEC_PREFIX)
        };
        Self {
            executable: PathBuf::from(built::EXECUTABLE),
            home,
            venv: None,
        }
    }
}

impl Interpreter {
    /// Chooses the interpreter from `python.home` and `python.venv` (absolute
    /// paths), checking on disk that it can work with the linked libpython.
    ///
    /// # Errors
    /// One line per problem, each starting with its dotted key, saying what
    /// was found and what was expected.
    pub fn choose(home: Option<&Path>, venv: Option<&Path>) -> Result<Self, String> {
        match (home, venv) {
            (Some(_), Some(_)) => Err("python.home and python.venv are exclusive: a virtualenv \
                 names its base installation itself (`home` in its pyvenv.cfg)"
                .into()),
            (Some(home), None) => Self::from_home(home),
            (None, Some(venv)) => Self::from_venv(venv),
            (None, None) => {
                let chosen = Self::default();
                if stdlib_under(Path::new(built::PREFIX)) {
                    Ok(chosen)
                } else {
                    Err(format!(
                        "python: the Python {} pyipcd was built against is not installed here \
                         ({} has no {}); set python.home to a Python {} prefix or python.venv",
                        built::VERSION,
                        built::PREFIX,
                        stdlib_landmark(),
                        built::MINOR
                    ))
                }
            }
        }
    }

    fn from_home(home: &Path) -> Result<Self, String> {
        let expected = format!(
            "expected the prefix of a Python {} installation, the folder that holds {}",
            built::MINOR,
            stdlib_landmark()
        );
        if !home.is_dir() {
            return Err(format!(
                "python.home: {} is not a directory ({expected})",
                home.display()
            ));
        }
        if !stdlib_under(home) {
            let hint = if home.join("pyvenv.cfg").is_file() {
                "; it is a virtualenv: use python.venv for it".to_string()
            } else {
                found_stdlibs(home)
            };
            return Err(format!(
                "python.home: {} has no {} ({expected}){hint}",
                home.display(),
                stdlib_landmark()
            ));
        }
        let bin = home.join("bin");
        let executable = [format!("python{}", built::MINOR), "python3".into()]
            .iter()
            .map(|name| bin.join(name))
            .find(|p| p.is_file())
            .unwrap_or_else(|| bin.join(format!("python{}", built::MINOR)));
        Ok(Self {
            executable,
            home: home.to_string_lossy().into_owned(),
            venv: None,
        })
    }

    fn from_venv(venv: &Path) -> Result<Self, String> {
        let shown = venv.display();
        let make = format!("python{} -m venv {shown}", built::MINOR);
        if !venv.is_dir() {
            return Err(format!(
                "python.venv: {shown} is not a directory (expected a virtualenv made by \
                 Python {}: `{make}`)",
                built::MINOR
            ));
        }
        let cfg_path = venv.join("pyvenv.cfg");
        let Ok(text) = std::fs::read_to_string(&cfg_path) else {
            return Err(format!(
                "python.venv: {shown} has no readable pyvenv.cfg, so it is not a virtualenv \
                 (expected one made by Python {}: `{make}`)",
                built::MINOR
            ));
        };
        let cfg = PyvenvCfg::parse(&text);
        match cfg.version() {
            Some(version) if minor_of(version) != built::MINOR => {
                return Err(format!(
                    "python.venv: {shown} was made by Python {version} (pyvenv.cfg), but pyipcd \
                     is linked against libpython {}: recreate it with `{make}`",
                    built::MINOR
                ));
            }
            Some(_) => {}
            None if !venv.join(stdlib_subdir()).is_dir() => {
                return Err(format!(
                    "python.venv: {shown} has no {} and its pyvenv.cfg names no version \
                     (expected a virtualenv made by Python {}: `{make}`){}",
                    stdlib_subdir(),
                    built::MINOR,
                    found_stdlibs(venv)
                ));
            }
            None => {}
        }
        let Some(base) = cfg.get("home") else {
            return Err(format!(
                "python.venv: {} has no `home = ...` line naming the venv's base interpreter",
                cfg_path.display()
            ));
        };
        if !Path::new(base).is_dir() {
            return Err(format!(
                "python.venv: its base interpreter folder {base} (`home` in {}) does not exist; \
                 was that Python removed or moved? Recreate the venv with `{make}`",
                cfg_path.display()
            ));
        }
        let Some(base_prefix) = Path::new(base).ancestors().find(|p| stdlib_under(p)) else {
            return Err(format!(
                "python.venv: its base interpreter folder {base} (`home` in {}) has no Python {} \
                 standard library above it (looked for {})",
                cfg_path.display(),
                built::MINOR,
                stdlib_landmark()
            ));
        };
        let bin = venv.join("bin");
        let executable = ["python", "python3"]
            .iter()
            .map(|name| bin.join(name))
            .find(|p| p.exists())
            .unwrap_or_else(|| bin.join("python"));
        Ok(Self {
            executable,
            home: base_prefix.to_string_lossy().into_owned(),
            venv: Some(venv.to_path_buf()),
        })
    }

    /// Starts the interpreter from this choice (once per process; pyo3's own
    /// `Python::initialize` then finds it running and does nothing) and
    /// releases the GIL, as pyo3 would.
    ///
    /// # Errors
    /// CPython's own message if it cannot initialise.
    #[allow(unsafe_code)]
    pub(crate) fn start(&self) -> Result<(), String> {
        use pyo3::ffi;
        use std::mem::MaybeUninit;

        let executable = c_path(&self.executable)?;
        let home = c_string(&self.home)?;
        // SAFETY: the pre-config and config are initialised by CPython's own
        // Init functions before any field is read or written; strings are
        // copied by PyConfig_SetBytesString from NUL-terminated buffers that
        // outlive the calls; the config is cleared once, after use. The
        // caller guarantees this runs once; an interpreter someone else
        // started is left as it is.
        unsafe {
            if ffi::Py_IsInitialized() != 0 {
                return Ok(());
            }
            let mut pre = MaybeUninit::<ffi::PyPreConfig>::uninit();
            ffi::PyPreConfig_InitPythonConfig(pre.as_mut_ptr());
            let pre = pre.as_mut_ptr();
            // Read the locale but never rewrite LC_CTYPE in the process
            // environment: tokio threads are already running.
            (*pre).coerce_c_locale = 0;
            (*pre).coerce_c_locale_warn = 0;
            (*pre).parse_argv = 0;
            status(ffi::Py_PreInitialize(pre))?;

            let mut config = MaybeUninit::<ffi::PyConfig>::uninit();
            ffi::PyConfig_InitPythonConfig(config.as_mut_ptr());
            let config = config.as_mut_ptr();
            (*config).parse_argv = 0;
            (*config).install_signal_handlers = 0; // tokio owns the signals
            (*config).configure_c_stdio = 0;
            let result = status(ffi::PyConfig_SetBytesString(
                config,
                &raw mut (*config).executable,
                executable.as_ptr(),
            ))
            .and_then(|()| {
                status(ffi::PyConfig_SetBytesString(
                    config,
                    &raw mut (*config).home,
                    home.as_ptr(),
                ))
            })
            .and_then(|()| status(ffi::Py_InitializeFromConfig(config)));
            ffi::PyConfig_Clear(config);
            result?;
            ffi::PyEval_SaveThread();
        }
        Ok(())
    }
}

impl fmt::Display for Interpreter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "executable {}, home {}",
            self.executable.display(),
            self.home
        )
    }
}

/// What the running interpreter reports about itself (for the startup log
/// line and `pyipcd check`).
#[derive(Debug, Clone)]
pub struct InUse {
    /// `sys.version`, first word.
    pub version: String,
    /// `sys.executable`.
    pub executable: String,
    /// `sys.base_prefix`: the installation whose stdlib is in use.
    pub prefix: String,
    /// `sys.prefix` when it differs from `sys.base_prefix` (a venv).
    pub venv: Option<String>,
}

impl InUse {
    /// Reads them from `sys`.
    ///
    /// # Errors
    /// A Python error reading `sys`.
    pub fn read(py: Python<'_>) -> PyResult<Self> {
        let sys = py.import("sys")?;
        let get = |name: &str| -> PyResult<String> { sys.getattr(name)?.extract() };
        let version = get("version")?
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .to_string();
        let prefix = get("base_prefix")?;
        let venv = Some(get("prefix")?).filter(|p| *p != prefix);
        Ok(Self {
            version,
            executable: get("executable")?,
            prefix,
            venv,
        })
    }
}

impl fmt::Display for InUse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Python {}, executable {}, prefix {}, venv {}",
            self.version,
            self.executable,
            self.prefix,
            self.venv.as_deref().unwrap_or("none")
        )
    }
}

/// `pyvenv.cfg`: `key = value` lines, keys case-insensitive.
struct PyvenvCfg(Vec<(String, String)>);

impl PyvenvCfg {
    fn parse(text: &str) -> Self {
        Self(
            text.lines()
                .filter_map(|l| l.split_once('='))
                .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
                .collect(),
        )
    }

    fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// `version` (venv) or `version_info` (virtualenv, uv).
    fn version(&self) -> Option<&str> {
        self.get("version").or_else(|| self.get("version_info"))
    }
}

/// `3.12.1` and `3.12.1.final.0` → `3.12`.
fn minor_of(version: &str) -> String {
    version.split('.').take(2).collect::<Vec<_>>().join(".")
}

/// `lib/python3.11` (with the build's platlibdir).
fn stdlib_subdir() -> String {
    format!("{}/python{}", built::PLATLIBDIR, built::MINOR)
}

/// `lib/python3.11/os.py`: CPython's own landmark for a prefix's stdlib.
fn stdlib_landmark() -> String {
    format!("{}/os.py", stdlib_subdir())
}

fn stdlib_under(prefix: &Path) -> bool {
    prefix.join(stdlib_landmark()).is_file()
}

/// `"; found lib/python3.9"` for the Python folders under `prefix`, if any.
fn found_stdlibs(prefix: &Path) -> String {
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

fn c_string(s: &str) -> Result<std::ffi::CString, String> {
    std::ffi::CString::new(s).map_err(|_| format!("{s:?} contains a NUL byte"))
}

fn c_path(p: &Path) -> Result<std::ffi::CString, String> {
    use std::os::unix::ffi::OsStrExt;
    std::ffi::CString::new(p.as_os_str().as_bytes())
        .map_err(|_| format!("{} contains a NUL byte", p.display()))
}

/// A `PyStatus` as a `Result` carrying CPython's message.
#[allow(unsafe_code)]
fn status(s: pyo3::ffi::PyStatus) -> Result<(), String> {
    // SAFETY: `s` was returned by CPython; err_msg and func are NULL or
    // static NUL-terminated strings.
    unsafe {
        if pyo3::ffi::PyStatus_Exception(s) == 0 {
            return Ok(());
        }
        let text = |p: *const std::ffi::c_char| {
            (!p.is_null()).then(|| std::ffi::CStr::from_ptr(p).to_string_lossy().into_owned())
        };
        Err(match (text(s.func), text(s.err_msg)) {
            (Some(func), Some(msg)) => format!("{func}: {msg}"),
            (None, Some(msg)) => msg,
            _ => format!("Python asked to exit with status {}", s.exitcode),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn venv_with(cfg: &str) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("pyvenv.cfg"), cfg).unwrap();
        dir
    }

    #[test]
    fn the_build_interpreter_is_the_default_and_is_installed_here() {
        let i = Interpreter::choose(None, None).unwrap();
        assert_eq!(i, Interpreter::default());
        assert_eq!(i.executable, Path::new(built::EXECUTABLE));
        assert!(built::VERSION.starts_with(built::MINOR));
    }

    #[test]
    fn home_and_venv_are_exclusive() {
        let e = Interpreter::choose(Some(Path::new("/usr")), Some(Path::new("/v"))).unwrap_err();
        assert!(e.contains("exclusive"), "{e}");
    }

    #[test]
    fn a_home_without_the_linked_stdlib_names_what_it_found() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("lib/python3.9")).unwrap();
        let e = Interpreter::choose(Some(dir.path()), None).unwrap_err();
        assert!(e.starts_with("python.home: "), "{e}");
        assert!(e.contains(&stdlib_landmark()), "{e}");
        assert!(e.contains("found lib/python3.9"), "{e}");
    }

    #[test]
    fn the_build_prefix_is_a_valid_home() {
        let i = Interpreter::choose(Some(Path::new(built::PREFIX)), None).unwrap();
        assert_eq!(i.home, built::PREFIX);
        assert!(i.executable.starts_with(built::PREFIX));
    }

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

    #[test]
    fn a_venv_of_another_minor_is_refused_with_both_versions() {
        let v = venv_with("home = /usr/bin\nversion = 3.9.2\n");
        let e = Interpreter::choose(None, Some(v.path())).unwrap_err();
        assert!(
            e.contains("Python 3.9.2") && e.contains(built::MINOR),
            "{e}"
        );
    }

    #[test]
    fn a_venv_whose_base_is_gone_is_refused() {
        let v = venv_with(&format!(
            "home = /nonexistent/bin\nversion = {}\n",
            built::VERSION
        ));
        let e = Interpreter::choose(None, Some(v.path())).unwrap_err();
        assert!(e.contains("/nonexistent/bin"), "{e}");
    }

    #[test]
    fn a_venv_on_the_build_python_is_accepted() {
        let base_bin = Path::new(built::EXECUTABLE).parent().unwrap();
        let v = venv_with(&format!(
            "home = {}\nversion = {}\n",
            base_bin.display(),
            built::VERSION
        ));
        let i = Interpreter::choose(None, Some(v.path())).unwrap();
        assert_eq!(i.home, built::PREFIX);
        assert_eq!(i.executable, v.path().join("bin/python"));
    }
}
