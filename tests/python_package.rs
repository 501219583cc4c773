//! The Python side as users install it: `pip install ./python` into a fresh
//! venv gives `pyipcd_shm` and the typed `pyipcd` stand-in; mypy --strict
//! accepts the shipped handlers against it; handler code runs in a unit test
//! outside the daemon; and the stand-in shows exactly the names and
//! signatures of the module the daemon embeds.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{Daemon, Scenario};
use pyipcd::py::interpreter::built;

const MYPY: &str = "mypy==1.19.1";
const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// Runs `program args` in `dir`; panics with its output unless it succeeds.
fn run_ok(program: &Path, args: &[&str], dir: &Path) -> String {
    let out = Command::new(program)
        .args(args)
        .current_dir(dir)
        .env_remove("PYTHONPATH")
        .output()
        .unwrap_or_else(|e| panic!("{}: {e}", program.display()));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "{} {args:?}:\n{text}",
        program.display()
    );
    text
}

/// `__all__`, then each public function's parameters as (name, kind, default).
const SIGNATURES: &str = "import inspect, pyipcd\n\
    print(sorted(pyipcd.__all__))\n\
    for name in sorted(pyipcd.__all__):\n    \
        ps = inspect.signature(getattr(pyipcd, name)).parameters.values()\n    \
        print(name, [(p.name, p.kind.name, repr(p.default)) for p in ps])\n";

#[test]
fn pip_install_gives_typed_stand_ins_that_match_the_embedded_module() {
    let s = Scenario::new();
    let venv = s.path("venv");
    common::make_venv(built::EXECUTABLE, &venv, &[]);
    let python = venv.join("bin/python");
    let package = format!("{ROOT}/python");
    run_ok(
        &python,
        &[
            "-m",
            "pip",
            "install",
            "-q",
            "--disable-pip-version-check",
            &package,
            MYPY,
        ],
        s.dir.path(),
    );

    // Outside the repository, so imports resolve to what pip installed.
    let work = s.path("work");
    std::fs::create_dir(&work).unwrap();
    for module in ["handlers.py", "demo.py"] {
        std::fs::copy(format!("{package}/{module}"), work.join(module)).unwrap();
    }
    let located = run_ok(
        &python,
        &[
            "-c",
            "import pyipcd, pyipcd_shm; print(pyipcd.__file__); print(pyipcd_shm.__file__)",
        ],
        &work,
    );
    assert!(
        located
            .lines()
            .all(|l| l.starts_with(venv.to_str().unwrap())),
        "{located}"
    );

    let mypy = run_ok(
        &venv.join("bin/mypy"),
        &["--strict", "handlers.py", "demo.py"],
        &work,
    );
    assert!(
        mypy.contains("Success: no issues found in 2 source files"),
        "{mypy}"
    );

    // A unit test of handler code with the stand-in.
    let unit = "import logging, pyipcd, pyipcd.testing as t, handlers\n\
        logging.basicConfig(level=logging.INFO, format='%(name)s %(levelname)s %(message)s')\n\
        assert handlers.forward(b'x') == b'queued'\n\
        assert t.sent == [('ticker', b'x')], t.sent\n\
        assert pyipcd.stopping() is False\n\
        t.set_stopping()\n\
        assert pyipcd.stopping() is True\n\
        t.roles = {'other'}\n\
        try:\n    handlers.forward(b'y')\nexcept KeyError as e:\n    print('KeyError', e)\n\
        try:\n    pyipcd.send('other', 'text')\nexcept TypeError as e:\n    print('TypeError', e)\n\
        try:\n    pyipcd.log('x', level='loud')\nexcept ValueError as e:\n    print('ValueError', e)\n\
        pyipcd.log('one', 2, level='warning')\n\
        t.reset()\n\
        assert t.sent == [] and not pyipcd.stopping() and t.roles is None\n\
        print('unit ok')\n";
    let out = run_ok(&python, &["-c", unit], &work);
    for part in [
        "KeyError \"no role named 'ticker' accepts pyipcd.send",
        "TypeError send() data must be bytes, not str",
        "ValueError unknown level 'loud'",
        "pyipcd.log WARNING one 2",
        "unit ok",
    ] {
        assert!(out.contains(part), "no {part:?} in:\n{out}");
    }

    let stand_in = run_ok(&python, &["-c", SIGNATURES], &work);
    let embedded = embedded_signatures(&s);
    let (public, embedded) = embedded.split_once('\n').unwrap();
    // The embedded module shows nothing but its API (the runtime is `_pyipcd`).
    assert_eq!(public, "['log', 'send', 'stopping']");
    assert_eq!(embedded, stand_in.trim_end());
    assert!(
        embedded.starts_with("['log', 'send', 'stopping']\nlog [('args', 'VAR_POSITIONAL'"),
        "{embedded}"
    );
}

/// Inside the daemon (a task writes it to a file): the module's non-dunder
/// names, then what `SIGNATURES` prints.
fn embedded_signatures(s: &Scenario) -> String {
    let out = s.path("embedded.txt");
    s.write(
        "sig.py",
        &format!(
            "import contextlib, io\n\ndef run():\n    buf = io.StringIO()\n    \
             with contextlib.redirect_stdout(buf):\n        \
             import pyipcd\n        print([n for n in dir(pyipcd) if not n.startswith('__')])\n        \
             exec({SIGNATURES:?})\n    \
             open({:?}, 'w').write(buf.getvalue())\n",
            out.display()
        ),
    );
    let cfg =
        s.config("[python]\npaths = [\".\"]\n[[python.task]]\nname = \"sig\"\nrun = \"sig:run\"\n");
    let mut d = Daemon::start(&cfg, &[("PATH", "/usr/bin:/bin")]);
    d.wait_ready();
    d.lines
        .wait_for(&["task=sig", "task ended"], Duration::from_secs(15));
    d.signal("TERM");
    d.wait_exit(Duration::from_secs(10));
    std::fs::read_to_string(out)
        .expect("the task wrote its report")
        .trim_end()
        .to_string()
}

#[test]
fn the_python_package_versions_follow_the_crate() {
    let pyproject = std::fs::read_to_string(format!("{ROOT}/python/pyproject.toml")).unwrap();
    let init = std::fs::read_to_string(format!("{ROOT}/python/pyipcd/__init__.py")).unwrap();
    let version = env!("CARGO_PKG_VERSION");
    assert!(
        pyproject.contains(&format!("\nversion = \"{version}\"\n")),
        "pyproject.toml"
    );
    assert!(
        init.contains(&format!("\n__version__ = \"{version}\"\n")),
        "pyipcd/__init__.py"
    );
}
