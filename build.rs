//! Embeds an rpath to the libpython that pyo3 linked against, so the built
//! binary starts with an empty environment (no LD_LIBRARY_PATH needed), and
//! records which installation that libpython belongs to (its executable,
//! prefix and version) so the daemon embeds that one by default instead of
//! whatever `python3` comes first on `PATH` (see `src/py/interpreter.rs`).

use std::process::Command;

/// Asks the build interpreter about its base installation (not a venv it may be in).
const PROBE: &str = "import sys
print(getattr(sys, '_base_executable', None) or sys.executable)
print(sys.base_prefix)
print(sys.base_exec_prefix)
print(getattr(sys, 'platlibdir', 'lib'))
print('%d.%d.%d' % sys.version_info[:3])
import os, sysconfig
d = sysconfig.get_config_var('DESTSHARED') or ''
names = os.listdir(d) if os.path.isdir(d) else []
print(','.join(sorted({n.split('.')[0] for n in names if n.endswith('.so')})))";

fn main() {
    pyo3_build_config::add_libpython_rpath_link_args();
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=PYO3_PYTHON");
    let config = pyo3_build_config::get();
    let python = config.executable().expect(
        "pyo3 found no Python executable: set PYO3_PYTHON to a CPython with a shared libpython",
    );
    let out = Command::new(python)
        .args(["-I", "-c", PROBE])
        .output()
        .unwrap_or_else(|e| panic!("cannot run {python}: {e}"));
    assert!(
        out.status.success(),
        "{python} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).expect("UTF-8 paths from the build Python");
    let fields: Vec<&str> = text.lines().collect();
    let [
        executable,
        prefix,
        exec_prefix,
        platlibdir,
        version,
        dynload,
    ] = fields[..]
    else {
        panic!("unexpected answer from {python}: {text:?}");
    };
    let minor = format!("{}.{}", config.version().major, config.version().minor);
    assert!(
        version.starts_with(&format!("{minor}.")),
        "{python} is Python {version}, but pyo3 links libpython {minor}"
    );
    for (key, value) in [
        ("EXECUTABLE", executable),
        ("PREFIX", prefix),
        ("EXEC_PREFIX", exec_prefix),
        ("PLATLIBDIR", platlibdir),
        ("VERSION", version),
        ("MINOR", minor.as_str()),
        ("DYNLOAD", dynload),
    ] {
        println!("cargo:rustc-env=PYIPCD_BUILD_PYTHON_{key}={value}");
    }
}
