//! `pyipcd check`, the Python half: every target resolved as `run` resolves
//! it (imported, `Class()` instantiated for `Class.method`), then its
//! signature tried against what its role will pass.

use pyo3::prelude::*;

use super::handler::{self, ASYNC_ON_OWN_THREAD};
use super::target::{Target, TargetAttr, resolve_callable};
use crate::config::TargetUse;

/// One problem per bad target, naming its key and role.
pub fn check_targets(targets: &[TargetUse<'_>]) -> Vec<String> {
    Python::attach(|py| {
        targets
            .iter()
            .filter_map(|t| {
                check_one(py, t)
                    .err()
                    .map(|e| format!("{} (role {}): {}", t.key, t.role, e.trim_end()))
            })
            .collect()
    })
}

fn check_one(py: Python<'_>, t: &TargetUse<'_>) -> Result<(), String> {
    let target = Target::parse(t.spec).map_err(|e| e.to_string())?;
    if t.task && target.attr == TargetAttr::None {
        // Importing such a task is its work: only find the module.
        return match py
            .import("importlib.util")
            .and_then(|u| u.call_method1("find_spec", (target.module.as_str(),)))
        {
            Ok(spec) if !spec.is_none() => Ok(()),
            Ok(_) => Err(format!("`{}`: no module named `{}`", t.spec, target.module)),
            Err(e) => Err(format!(
                "`{}`: {}",
                t.spec,
                handler::format_exception(py, &e).trim_end()
            )),
        };
    }
    // The key in the error is the caller's to add.
    let callable = resolve_callable(py, "", t.spec)
        .map_err(|e| format!("`{}`: {}", t.spec, e.reason.trim_end()))?;
    if !callable.is_callable() {
        return Err(format!("`{}` is not callable", t.spec));
    }
    if t.sync_only && handler::is_async_def(&callable).unwrap_or(false) {
        return Err(format!("`{}` {ASYNC_ON_OWN_THREAD}", t.spec));
    }
    let problem: Option<String> = super::module::runtime(py)
        .and_then(|m| {
            let context = t.passes == crate::config::Passes::MessageAndContext;
            m.call_method1(
                "_signature_problem",
                (&callable, t.passes.positional(), context),
            )
        })
        .and_then(|p| p.extract())
        .map_err(|e| handler::format_exception(py, &e))?;
    match problem {
        Some(p) => Err(format!(
            "`{}` cannot be called as the role calls it, {}: {p}",
            t.spec,
            t.passes.describe()
        )),
        None => Ok(()),
    }
}
