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

mod layout;
mod startup;

use std::collections::HashSet;
use std::fmt;
use std::path::{Path, PathBuf};

use pyo3::prelude::*;

use layout::{
    PyvenvCfg, found_stdlibs, interpreter_in, minor_of, module_files, refuse_colon,
    stdlib_landmark, stdlib_subdir, stdlib_under,
};

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
                 Python {}: `{} -m venv DIR`)",
                built::MINOR,
                self.base_executable.display()
            ));
        }
        let cfg_path = venv.join("pyvenv.cfg");
        let Ok(text) = std::fs::read_to_string(&cfg_path) else {
            return Err(format!(
                "python.venv: {shown} has no readable pyvenv.cfg, so it is not a virtualenv \
                 (python.venv names the venv's own folder, the one holding pyvenv.cfg and \
                 bin/python, made by Python {}: `{} -m venv DIR`)",
                built::MINOR,
                self.base_executable.display()
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
            "Python {}, executable {}, base prefix {}, venv {}",
            self.version,
            self.executable,
            self.prefix,
            self.venv.as_deref().unwrap_or("none")
        )
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
