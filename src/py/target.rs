//! Python targets named in the config: `module`, `module:function` and
//! `module:Class.method`, parsed without the interpreter and resolved with
//! it ([`resolve_callable`], the one way every role looks up what it calls).

use std::fmt;

use pyo3::prelude::*;
use pyo3::types::PyModule;

/// A parsed Python target string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// Dotted module name.
    pub module: String,
    /// What to call inside the module.
    pub attr: TargetAttr,
}

/// The callable part of a [`Target`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetAttr {
    /// Bare module: importing it is the work (its top-level code runs).
    None,
    /// `module:function`.
    Function(String),
    /// `module:Class.method`: `Class()` is instantiated once, then `method` is bound.
    Method {
        /// The class name.
        class: String,
        /// The method name.
        method: String,
    },
}

/// Why a target string is malformed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not `module`, `module:function` or `module:Class.method`")]
pub struct TargetSyntaxError(pub String);

fn is_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c == '_' || c.is_alphabetic())
        && chars.all(|c| c == '_' || c.is_alphanumeric())
}

impl Target {
    /// Parses `module`, `module:function` or `module:Class.method`.
    ///
    /// # Errors
    /// [`TargetSyntaxError`] when a part is empty or not an identifier.
    pub fn parse(s: &str) -> Result<Self, TargetSyntaxError> {
        let bad = || TargetSyntaxError(s.to_string());
        let (module, attr) = match s.split_once(':') {
            None => (s, None),
            Some((m, a)) => (m, Some(a)),
        };
        if !module.split('.').all(is_identifier) {
            return Err(bad());
        }
        let attr = match attr {
            None => TargetAttr::None,
            Some(a) => match a.split('.').collect::<Vec<_>>().as_slice() {
                [f] if is_identifier(f) => TargetAttr::Function(f.to_string()),
                [c, m] if is_identifier(c) && is_identifier(m) => TargetAttr::Method {
                    class: c.to_string(),
                    method: m.to_string(),
                },
                _ => return Err(bad()),
            },
        };
        Ok(Self {
            module: module.to_string(),
            attr,
        })
    }

    /// Imports the module and returns the callable (a bound method for
    /// `Class.method`, after one `Class()`). A bare module has no callable:
    /// this only checks that it can be found, without running it.
    ///
    /// # Errors
    /// The Python exception raised by the import, the lookup or the constructor.
    pub fn resolve<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyAny>>> {
        if self.attr == TargetAttr::None {
            let spec = py
                .import("importlib.util")?
                .call_method1("find_spec", (&self.module,))?;
            if spec.is_none() {
                return Err(pyo3::exceptions::PyModuleNotFoundError::new_err(format!(
                    "No module named '{}'",
                    self.module
                )));
            }
            return Ok(None);
        }
        let module = PyModule::import(py, self.module.as_str())?;
        let callable = match &self.attr {
            TargetAttr::None => unreachable!("handled above"),
            TargetAttr::Function(f) => module.getattr(f.as_str())?,
            TargetAttr::Method { class, method } => module
                .getattr(class.as_str())?
                .call0()?
                .getattr(method.as_str())?,
        };
        if !callable.is_callable() {
            return Err(pyo3::exceptions::PyTypeError::new_err(format!(
                "{self} is not callable"
            )));
        }
        Ok(Some(callable))
    }
}

/// Why a configured target could not be resolved: the config key that named
/// it, the target, and Python's reason (its traceback).
#[derive(Debug, Clone, thiserror::Error)]
#[error("{key} `{spec}`: {reason}")]
pub struct ResolveError {
    /// Which setting named it, e.g. ``tcp.server `echo` handler``.
    pub key: String,
    /// The target as written.
    pub spec: String,
    /// Python's formatted exception, or what is wrong with the target.
    pub reason: String,
    /// The target's module had been imported before this attempt: a fix to
    /// its code on disk is not seen until the daemon restarts.
    pub module_was_loaded: bool,
}

impl ResolveError {
    /// Builds an error for `key`/`spec` with a reason that is not a Python exception.
    pub fn new(key: &str, spec: &str, reason: impl Into<String>) -> Self {
        Self {
            key: key.to_string(),
            spec: spec.to_string(),
            reason: reason.into(),
            module_was_loaded: false,
        }
    }

    /// What to tell a user whose reload failed: the error, and when the module
    /// was already imported, that Python code is not re-imported.
    pub fn with_reload_hint(&self) -> String {
        let module = self.spec.split(':').next().unwrap_or_default();
        if self.module_was_loaded {
            format!(
                "{} (module `{module}` was imported before this reload and Python code is \
                 never re-imported: a change to its code needs a restart)",
                self.to_string().trim_end()
            )
        } else {
            self.to_string()
        }
    }
}

/// Parses and resolves `spec`, named by setting `key`, to the callable it
/// names (instantiating `Class()` once for `Class.method`).
///
/// # Errors
/// [`ResolveError`] for a malformed target, a bare module (nothing to call),
/// or any Python exception raised while importing or looking it up.
pub fn resolve_callable<'py>(
    py: Python<'py>,
    key: &str,
    spec: &str,
) -> Result<Bound<'py, PyAny>, ResolveError> {
    let target = Target::parse(spec).map_err(|e| ResolveError::new(key, spec, e.to_string()))?;
    let module_was_loaded = py
        .import("sys")
        .and_then(|sys| sys.getattr("modules")?.contains(target.module.as_str()))
        .unwrap_or(false);
    let python_error = |e: &PyErr| ResolveError {
        module_was_loaded,
        ..ResolveError::new(
            key,
            spec,
            super::handler::format_exception(py, e).trim_end(),
        )
    };
    match target.resolve(py) {
        Ok(Some(callable)) => Ok(callable),
        Ok(None) => Err(ResolveError::new(
            key,
            spec,
            "names a module; use module:function",
        )),
        Err(e) => Err(python_error(&e)),
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.attr {
            TargetAttr::None => write!(f, "{}", self.module),
            TargetAttr::Function(func) => write!(f, "{}:{func}", self.module),
            TargetAttr::Method { class, method } => {
                write!(f, "{}:{class}.{method}", self.module)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_three_forms() {
        assert_eq!(Target::parse("a.b").unwrap().attr, TargetAttr::None);
        assert_eq!(
            Target::parse("m:f").unwrap().attr,
            TargetAttr::Function("f".into())
        );
        assert_eq!(
            Target::parse("py_mmap:MMAPShmem.run").unwrap().to_string(),
            "py_mmap:MMAPShmem.run"
        );
        for bad in ["", "m:", ":f", "m:a.b.c", "m-x", "m:1f", "a..b"] {
            assert!(Target::parse(bad).is_err(), "{bad}");
        }
    }
}
