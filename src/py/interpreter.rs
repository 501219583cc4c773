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
//!   `build.rs`): its executable, and its prefix as `PyConfig.home`;
//! - `python.home`: that same installation at another path (like mod_wsgi's
//!   `python-home`). Another build of the same minor is refused: builds
//!   differ in what they compile into libpython, so another build's stdlib
//!   does not fit (Debian's lacks `lib-dynload/_socket*.so`, which a
//!   python.org build's libpython needs);
//! - `python.venv`: a virtualenv's packages on top, set up as its
//!   `bin/python` would be: `sys.executable` is the venv's interpreter, so
//!   `site` reads its `pyvenv.cfg`, makes `sys.prefix` the venv and puts its
//!   site-packages (with `.pth` files) ahead of the base ones. The stdlib
//!   stays the embedded installation's, whichever Python made the venv.

use std::collections::HashSet;
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
    /// The extension modules its `lib-dynload` holds (comma-separated): the
    /// ones libpython does not have built in.
    pub const DYNLOAD: &str = env!("PYIPCD_BUILD_PYTHON_DYNLOAD");
}

/// How the interpreter is to be set up: the `PyConfig` fields pyipcd sets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interpreter {
    /// `PyConfig.executable`: what `sys.executable` will be (for a venv, its
    /// `bin/python`, where `site` looks for `pyvenv.cfg`).
    pub executable: PathBuf,
    /// `PyConfig.base_executable`: `sys._base_executable`, the installation's
    /// own interpreter (the same as `executable` outside a venv).
    pub base_executable: PathBuf,
    /// `PyConfig.home`: the installation whose standard library is used
    /// (`prefix`, or `prefix:exec_prefix`): the build one or `python.home`,
    /// never the one a venv was made by. Always set, so a `PYTHONHOME` in
    /// the environment cannot redirect the daemon.
    pub home: PathBuf,
    /// The virtualenv in use, if any.
    pub venv: Option<PathBuf>,
    /// Things worth a warning that do not stop the daemon.
    pub notes: Vec<String>,
}

impl Default for Interpreter {
    /// The installation pyipcd was built against.
    fn default() -> Self {
        Self {
            executable: PathBuf::from(built::EXECUTABLE),
            base_executable: PathBuf::from(built::EXECUTABLE),
            home: PathBuf::from(build_home()),
            venv: None,
            notes: Vec::new(),
        }
    }
}

/// `PyConfig.home` for the build installation.
fn build_home() -> String {
    if built::PREFIX == built::EXEC_PREFIX {
        built::PREFIX.to_string()
    } else {
        format!("{}:{}", built::PREFIX, built::EXEC_PREFIX)
    }
}

impl Interpreter {
    /// Chooses the interpreter from `python.home` and `python.venv` (absolute
    /// paths), checking on disk that it can work with the linked libpython:
    /// the installation (the build one, or `home`) provides the standard
    /// library that matches libpython; the venv adds its packages.
    ///
    /// # Errors
    /// The problem, starting with its dotted key, saying what was found and
    /// what was expected.
    pub fn choose(home: Option<&Path>, venv: Option<&Path>) -> Result<Self, String> {
        let mut chosen = match home {
            Some(home) => Self::from_home(home)?,
            None if stdlib_under(Path::new(built::PREFIX)) => Self::default(),
            None => {
                return Err(format!(
                    "python: the Python {} pyipcd was built against is not installed here \
                     ({} has no {}); set python.home to the prefix of that build",
                    built::VERSION,
                    built::PREFIX,
                    stdlib_landmark(),
                ));
            }
        };
        if let Some(venv) = venv {
            chosen.add_venv(venv)?;
        }
        Ok(chosen)
    }

    /// Another path to the installation libpython belongs to (moved, or
    /// unpacked elsewhere): it must hold the stdlib of the linked minor and
    /// every extension module the build installation had in `lib-dynload`
    /// (installations differ in what they compile into libpython: Debian's
    /// has `_socket` built in, a python.org build loads it from a file).
    fn from_home(home: &Path) -> Result<Self, String> {
        let expected = format!(
            "expected the prefix of the Python {} installation pyipcd was built against, \
             the folder that holds {}",
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
        let dynload = home.join(format!("{}/lib-dynload", stdlib_subdir()));
        let present: HashSet<String> = module_files(&dynload);
        let missing: Vec<&str> = built::DYNLOAD
            .split(',')
            .filter(|m| !m.is_empty() && !present.contains(*m))
            .collect();
        if !missing.is_empty() {
            return Err(format!(
                "python.home: {} lacks extension modules the linked libpython {} loads from \
                 files ({} missing in {}: {}): it is another build of Python {}; use the \
                 installation pyipcd was built against ({}), or rebuild pyipcd with \
                 PYO3_PYTHON set to this one's python",
                home.display(),
                built::VERSION,
                missing.len(),
                dynload.display(),
                missing
                    .iter()
                    .take(5)
                    .copied()
                    .collect::<Vec<_>>()
                    .join(", "),
                built::MINOR,
                built::PREFIX
            ));
        }
        refuse_colon("python.home", home)?;
        let executable = interpreter_in(&home.join("bin"));
        Ok(Self {
            base_executable: executable.clone(),
            executable,
            home: home.to_path_buf(),
            venv: None,
            notes: Vec::new(),
        })
    }

    /// Layers a virtualenv on the chosen installation: `sys.executable`
    /// becomes its `bin/python`, so `site` reads its `pyvenv.cfg`, makes
    /// `sys.prefix` the venv and puts its site-packages first.
    fn add_venv(&mut self, venv: &Path) -> Result<(), String> {
        let shown = venv.display();
        let make = format!("{} -m venv {shown}", self.base_executable.display());
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
        // The venv's own base only matters for a warning: the stdlib must be
        // the one that matches libpython, whichever Python made the venv.
        let base_prefix = cfg
            .get("home")
            .map(Path::new)
            .filter(|base| base.is_absolute())
            .and_then(|base| base.ancestors().find(|p| stdlib_under(p)));
        let same = |p: &Path| p.canonicalize().ok() == Path::new(&self.home).canonicalize().ok();
        if !base_prefix.is_some_and(same) {
            self.notes.push(format!(
                "python.venv: {shown} was made by the Python in {} (pyvenv.cfg `home`), not by \
                 the installation pyipcd embeds ({}): its packages are used with the latter's \
                 standard library; recreate it with `{make}` if a package misbehaves",
                cfg.get("home").unwrap_or("an unnamed folder"),
                self.home.display()
            ));
        }
        self.executable = ["python", "python3"]
            .iter()
            .map(|name| venv.join("bin").join(name))
            .find(|p| p.exists())
            .unwrap_or_else(|| venv.join("bin/python"));
        self.venv = Some(venv.to_path_buf());
        Ok(())
    }

    /// Whether the standard library is the build installation's, so the
    /// copies of `os`, `site` and friends frozen into libpython match it.
    /// For any other installation they are imported from its own files
    /// (a distribution's `site.py` may be patched, e.g. for dist-packages).
    pub fn uses_build_stdlib(&self) -> bool {
        self.home.as_os_str() == build_home().as_str()
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

        let strings = [
            c_path(&self.executable)?,
            c_path(&self.base_executable)?,
            c_path(&self.home)?,
            c_path(Path::new(built::PLATLIBDIR))?,
        ];
        // SAFETY: the pre-config and config are initialised by CPython's own
        // Init functions before any field is read or written; strings are
        // copied by PyConfig_SetBytesString from NUL-terminated buffers that
        // outlive the calls; the config is cleared once, after use. The
        // caller guarantees this runs once; an interpreter someone else
        // started (a program embedding the library) is left as it is.
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
            (*config).use_frozen_modules = i32::from(self.uses_build_stdlib());
            let fields = [
                &raw mut (*config).executable,
                &raw mut (*config).base_executable,
                &raw mut (*config).home,
                &raw mut (*config).platlibdir, // not PYTHONPLATLIBDIR
            ];
            let result = fields
                .into_iter()
                .zip(&strings)
                .try_for_each(|(field, value)| {
                    status(ffi::PyConfig_SetBytesString(config, field, value.as_ptr()))
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
            self.home.display()
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

/// The interpreter in an installation's `bin` folder: `python3.X`, else
/// `python3`, else `python` (the first name when none exists: CPython only
/// needs the folder then).
fn interpreter_in(bin: &Path) -> PathBuf {
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
fn module_files(dir: &Path) -> HashSet<String> {
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
fn refuse_colon(key: &str, path: &Path) -> Result<(), String> {
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
        assert_eq!(i.home, Path::new(built::PREFIX));
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
    fn a_venv_whose_base_is_gone_still_works_on_the_linked_installation_with_a_note() {
        let v = venv_with(&format!(
            "home = /nonexistent/bin\nversion = {}\n",
            built::VERSION
        ));
        let i = Interpreter::choose(None, Some(v.path())).unwrap();
        assert_eq!(i.home, Path::new(built::PREFIX));
        assert_eq!(i.notes.len(), 1);
        assert!(i.notes[0].contains("/nonexistent/bin"), "{:?}", i.notes);
    }

    #[test]
    fn another_build_of_the_same_minor_is_refused_as_home() {
        // A prefix with the stdlib landmark but an empty lib-dynload.
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join(format!("{}/lib-dynload", stdlib_subdir())))
            .unwrap();
        std::fs::write(dir.path().join(stdlib_landmark()), "").unwrap();
        let r = Interpreter::choose(Some(dir.path()), None);
        if built::DYNLOAD.is_empty() {
            assert!(r.is_ok());
        } else {
            let e = r.unwrap_err();
            assert!(
                e.contains("lacks extension modules") && e.contains(built::PREFIX),
                "{e}"
            );
        }
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
        assert_eq!(i.home, Path::new(built::PREFIX));
        assert!(i.uses_build_stdlib());
        assert!(i.notes.is_empty(), "{:?}", i.notes);
        assert_eq!(i.executable, v.path().join("bin/python"));
    }
}
