//! Configuration errors and `pyipcd check`, through the real binary.

mod common;

use common::{Scenario, run_to_end};

#[test]
fn every_shipped_config_passes_check() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/config");
    // config/container.toml names the image's /opt/venv: stand in a venv
    // made here, through the environment override.
    let venv = tempfile::tempdir().unwrap();
    common::make_venv(
        pyipcd::py::interpreter::built::EXECUTABLE,
        venv.path(),
        &["--without-pip"],
    );
    let venv_env = [("PYIPCD__PYTHON__VENV", venv.path().to_str().unwrap())];
    let mut checked = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            let text = std::fs::read_to_string(&path).unwrap();
            let env: &[(&str, &str)] = if text.contains("\nvenv = ") {
                &venv_env
            } else {
                &[]
            };
            let (code, out, err) = run_to_end(&["check", "-c", path.to_str().unwrap()], env);
            assert_eq!(code, 0, "{}: {out}{err}", path.display());
            assert!(out.starts_with("OK "), "{out}");
            checked += 1;
        }
    }
    assert!(checked >= 1);
}

#[test]
fn unknown_key_exits_78_naming_the_key() {
    let s = Scenario::new();
    let cfg = s.config("[python]\nworkrs = 2\n");
    for cmd in ["run", "check"] {
        let (code, _, err) = run_to_end(&[cmd, "-c", cfg.to_str().unwrap()], &[]);
        assert_eq!(code, 78, "{cmd}: {err}");
        assert!(
            err.contains("workrs") && err.contains("pyipcd.toml"),
            "{cmd}: {err}"
        );
    }
}

#[test]
fn wrong_type_exits_78_naming_the_dotted_key() {
    let s = Scenario::new();
    let cfg = s.config("[python]\nworkers = \"many\"\n");
    let (code, _, err) = run_to_end(&["run", "-c", cfg.to_str().unwrap()], &[]);
    assert_eq!(code, 78, "{err}");
    assert!(err.contains("python.workers"), "{err}");
}

#[test]
fn bad_duration_and_restart_policy_are_named() {
    let s = Scenario::new();
    let cfg = s.config("[python]\ncall_timeout = \"10 parsecs\"\n");
    let (code, _, err) = run_to_end(&["check", "-c", cfg.to_str().unwrap()], &[]);
    assert_eq!(code, 78, "{err}");
    assert!(err.contains("python.call_timeout"), "{err}");
    let cfg = s.config("[[python.task]]\nname = \"t\"\nrun = \"m:f\"\nrestart = \"sometimes\"\n");
    let (code, _, err) = run_to_end(&["check", "-c", cfg.to_str().unwrap()], &[]);
    assert_eq!(code, 78, "{err}");
    assert!(err.contains("sometimes"), "{err}");
}

#[test]
fn missing_file_exits_78() {
    let (code, _, err) = run_to_end(&["run", "-c", "/nonexistent/pyipcd.toml"], &[]);
    assert_eq!(code, 78, "{err}");
    assert!(err.contains("/nonexistent/pyipcd.toml"), "{err}");
}

#[test]
fn environment_overrides_are_applied_and_validated() {
    let s = Scenario::new();
    let cfg = s.config("[python]\nworkers = 2\n");
    let (code, _, err) = run_to_end(
        &["check", "-c", cfg.to_str().unwrap()],
        &[("PYIPCD__PYTHON__WORKERS", "0")],
    );
    assert_eq!(code, 78, "{err}");
    assert!(err.contains("python.workers must be at least 1"), "{err}");
}

#[test]
fn check_reports_every_unimportable_target() {
    let s = Scenario::new();
    s.write(
        "present.py",
        "class Reader:\n    def run(self):\n        pass\n\ndef main():\n    pass\n",
    );
    let cfg = s.config(
        "[python]\npaths = [\".\"]\n\
         [[python.task]]\nname = \"a\"\nrun = \"present:main\"\n\
         [[python.task]]\nname = \"b\"\nrun = \"present:Reader.run\"\n\
         [[python.task]]\nname = \"c\"\nrun = \"absent_module\"\n\
         [[python.task]]\nname = \"d\"\nrun = \"present:nope\"\n\
         [[python.task]]\nname = \"e\"\nrun = \"present:Reader.nope\"\n",
    );
    let (code, out, err) = run_to_end(&["check", "-c", cfg.to_str().unwrap()], &[]);
    assert_eq!(code, 78, "{out}{err}");
    assert!(err.contains("3 problem(s)"), "{err}");
    for key in ["python.task[2]", "python.task[3]", "python.task[4]"] {
        assert!(err.contains(key), "{key} missing: {err}");
    }
    assert!(
        !err.contains("python.task[0]") && !err.contains("python.task[1]"),
        "{err}"
    );
}

#[test]
fn check_does_not_run_bare_module_tasks() {
    let s = Scenario::new();
    let marker = s.path("ran");
    s.write(
        "sideeffect.py",
        &format!("open({:?}, 'w').write('ran')\n", marker.to_str().unwrap()),
    );
    let cfg = s
        .config("[python]\npaths = [\".\"]\n[[python.task]]\nname = \"s\"\nrun = \"sideeffect\"\n");
    let (code, out, err) = run_to_end(&["check", "-c", cfg.to_str().unwrap()], &[]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(!marker.exists(), "check executed the task module");
}

#[test]
fn version_and_help() {
    let (code, out, _) = run_to_end(&["--version"], &[]);
    assert_eq!(code, 0);
    assert!(out.contains(env!("CARGO_PKG_VERSION")));
    let (code, out, _) = run_to_end(&["--help"], &[]);
    assert_eq!(code, 0);
    assert!(out.contains("check"));
}
