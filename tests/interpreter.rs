//! Which Python the real binary embeds, where users run it: under systemd's
//! default `PATH`, behind a decoy `python3` that comes first on `PATH`, in a
//! virtualenv with a C-extension package from PyPI, and the bad `home` and
//! `venv` settings that must stop it with exit 78. Every daemon here starts
//! with a near-empty environment: only `PATH` (and the variable under test).

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{Daemon, SYSTEMD_PATH, Scenario, make_venv, run_to_end};
use pyipcd::py::interpreter::built;

/// msgpack ships a C extension (`msgpack._cmsgpack`) in its cp311 wheels.
const MSGPACK: &str = "msgpack==1.1.2";

/// A handler that reports the interpreter it runs in, one line, `|`-separated.
const REPORT: &str = r#"
import sys

def report(data):
    return "|".join([sys.prefix, sys.base_prefix, sys.executable, ":".join(sys.path)]).encode() + b"\n"
"#;

/// Writes `h.py` with `handlers` and a config serving `h:{handler}` on a line-framed port.
fn serving(s: &Scenario, handlers: &str, handler: &str, python: &str) -> PathBuf {
    s.write("h.py", handlers);
    s.config(&format!(
        "[python]\npaths = [\".\"]\n{python}\n[[tcp.server]]\nname = \"srv\"\n\
         listen = \"127.0.0.1:0\"\nframing = \"line\"\nhandler = \"h:{handler}\"\n"
    ))
}

/// Runs the daemon on `cfg` with exactly `env`, sends one line, returns the reply and the log.
fn ask(cfg: &Path, env: &[(&str, &str)], line: &str) -> (String, String) {
    let mut d = Daemon::start(cfg, env);
    d.wait_ready();
    let port = d.listening_port("srv");
    let mut conn = TcpStream::connect(("127.0.0.1", port)).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    conn.write_all(format!("{line}\n").as_bytes()).unwrap();
    let mut reply = String::new();
    BufReader::new(&conn).read_line(&mut reply).unwrap();
    d.signal("TERM");
    assert!(d.wait_exit(Duration::from_secs(10)).success());
    (reply.trim_end().to_string(), d.lines.text())
}

/// `pyipcd check` with exactly `env`: exit code, stdout, stderr.
fn check(cfg: &Path, env: &[(&str, &str)]) -> (i32, String, String) {
    run_to_end(&["check", "-c", cfg.to_str().unwrap()], env)
}

/// The interpreter line `check` and the startup log print for the build Python.
fn built_line() -> String {
    format!(
        "Python {}, executable {}, base prefix {}, venv none",
        built::VERSION,
        built::EXECUTABLE,
        built::PREFIX
    )
}

#[test]
fn systemd_default_path_uses_the_build_python() {
    let s = Scenario::new();
    let cfg = serving(&s, REPORT, "report", "");
    let env = [("PATH", SYSTEMD_PATH)];
    let (code, out, err) = check(&cfg, &env);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.starts_with("OK ") && out.contains(&built_line()),
        "{out}"
    );

    let (reply, log) = ask(&cfg, &env, "hi");
    let [prefix, base, executable, _] = reply.split('|').collect::<Vec<_>>()[..] else {
        panic!("{reply}");
    };
    assert_eq!(
        (prefix, base, executable),
        (built::PREFIX, built::PREFIX, built::EXECUTABLE)
    );
    assert!(log.contains(&format!("embedded {}", built_line())), "{log}");
}

#[test]
fn a_decoy_python3_first_on_path_and_pythonhome_are_ignored() {
    // A python3 from another prefix whose stdlib cannot even be imported:
    // if CPython took it, the daemon could not start.
    let s = Scenario::new();
    let decoy = s.path("decoy");
    s.write("decoy/bin/python3", "#!/bin/sh\nexit 1\n");
    std::fs::set_permissions(
        decoy.join("bin/python3"),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let stdlib = format!("decoy/{}/python{}", built::PLATLIBDIR, built::MINOR);
    for module in ["os.py", "encodings/__init__.py", "site.py"] {
        s.write(
            &format!("{stdlib}/{module}"),
            "raise SystemExit('decoy stdlib imported')\n",
        );
    }
    let path = format!("{}:{SYSTEMD_PATH}", decoy.join("bin").display());
    let env = [("PATH", path.as_str())];
    let cfg = serving(&s, REPORT, "report", "");
    let (code, out, err) = check(&cfg, &env);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains(&built_line()), "{out}");
    let (reply, _) = ask(&cfg, &env, "hi");
    assert!(reply.starts_with(&format!("{}|", built::PREFIX)), "{reply}");
    assert!(!reply.contains("decoy"), "{reply}");

    // Nor does a PYTHONHOME in the environment redirect it, with or without a venv.
    let decoy_home = decoy.to_str().unwrap();
    let env = [("PATH", path.as_str()), ("PYTHONHOME", decoy_home)];
    let (reply, _) = ask(&cfg, &env, "hi");
    assert!(reply.starts_with(&format!("{}|", built::PREFIX)), "{reply}");
    let venv = make_venv(built::EXECUTABLE, &s.path("venv"), &["--without-pip"]);
    let cfg = serving(&s, REPORT, "report", "venv = \"venv\"");
    let (reply, _) = ask(&cfg, &env, "hi");
    let venv_text = venv.canonicalize().unwrap().display().to_string();
    assert!(
        reply.starts_with(&format!("{venv_text}|{}|", built::PREFIX)),
        "{reply}"
    );
    assert!(!reply.contains("decoy"), "{reply}");
}

/// What the venv's own interpreter has on `sys.path` (after the script's folder).
fn venv_python_sys_path(venv: &Path) -> String {
    let out = Command::new(venv.join("bin/python"))
        .args(["-c", "import sys; print(':'.join(sys.path[1:]))"])
        .env_clear()
        .env("PATH", SYSTEMD_PATH)
        .output()
        .unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout)
        .unwrap()
        .trim_end()
        .to_string()
}

#[test]
fn a_venv_with_a_c_extension_package_serves_handlers_as_its_python_would() {
    let s = Scenario::new();
    let venv = make_venv(built::EXECUTABLE, &s.path("venv"), &[]);
    let pip = Command::new(venv.join("bin/python"))
        .args([
            "-m",
            "pip",
            "install",
            "-q",
            "--disable-pip-version-check",
            MSGPACK,
        ])
        .output()
        .expect("pip");
    assert!(
        pip.status.success(),
        "pip install {MSGPACK}: {}",
        String::from_utf8_lossy(&pip.stderr)
    );
    // A .pth file in the venv's site-packages must be processed, as site does.
    let site = venv.join(format!("lib/python{}/site-packages", built::MINOR));
    s.write("extra/pth_module.py", "VALUE = 'from a .pth folder'\n");
    std::fs::write(
        site.join("extra.pth"),
        format!("{}\n", s.path("extra").display()),
    )
    .unwrap();
    let handlers = format!(
        "{REPORT}\nimport msgpack, pth_module\nfrom msgpack import _cmsgpack\n\n\
         def pack(data):\n    \
             return msgpack.packb([data, pth_module.VALUE]).hex().encode() + b'|' + _cmsgpack.__file__.encode() + b'\\n'\n"
    );
    let cfg = serving(&s, &handlers, "pack", "venv = \"venv\"");
    let env = [("PATH", SYSTEMD_PATH)];
    let (code, out, err) = check(&cfg, &env);
    assert_eq!(code, 0, "{out}{err}");
    let venv_text = venv.canonicalize().unwrap().display().to_string();
    assert!(out.contains(&format!("venv {venv_text}")), "{out}");

    let (reply, log) = ask(&cfg, &env, "hi");
    let (hex, ext) = reply.split_once('|').expect(&reply);
    // ["hi", "from a .pth folder"] packed by the C extension in the venv.
    let expected: String = [0x92u8, 0xc4, 2, b'h', b'i', 0xb2]
        .iter()
        .chain(b"from a .pth folder")
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(hex, expected);
    assert!(ext.starts_with(&venv_text) && ext.ends_with(".so"), "{ext}");
    assert!(log.contains(&format!("venv {venv_text}")), "{log}");

    // Same config, report handler: sys.prefix is the venv, sys.path is the venv
    // python's own, after the config's python.paths.
    let cfg = serving(&s, &handlers, "report", "venv = \"venv\"");
    let (reply, _) = ask(&cfg, &env, "hi");
    let fields: Vec<&str> = reply.split('|').collect();
    assert_eq!(fields[0], venv_text);
    assert_eq!(fields[1], built::PREFIX);
    let sys_path = fields[3];
    let paths_entry = s.dir.path().canonicalize().unwrap().display().to_string();
    assert_eq!(
        sys_path,
        format!("{paths_entry}:{}", venv_python_sys_path(&venv))
    );
}

#[test]
fn the_venv_can_come_from_the_environment_and_system_site_packages_come_after_it() {
    let s = Scenario::new();
    let venv = make_venv(built::EXECUTABLE, &s.path("v"), &["--system-site-packages"]);
    let cfg = serving(&s, REPORT, "report", "");
    let venv_text = venv.canonicalize().unwrap().display().to_string();
    let env = [
        ("PATH", SYSTEMD_PATH),
        ("PYIPCD__PYTHON__VENV", venv_text.as_str()),
    ];
    let (reply, _) = ask(&cfg, &env, "hi");
    let fields: Vec<&str> = reply.split('|').collect();
    assert_eq!(fields[0], venv_text);
    let sys_path: Vec<&str> = fields[3].split(':').collect();
    let at = |suffix: &str| sys_path.iter().position(|p| p.ends_with(suffix));
    let venv_site = at(&format!(
        "{venv_text}/lib/python{}/site-packages",
        built::MINOR
    ))
    .expect("venv site-packages on sys.path");
    // include-system-site-packages = true: the base's own ones follow.
    let base_sites = python_lines(
        built::EXECUTABLE,
        "import site; print(*site.getsitepackages(), sep='\\n')",
    );
    let base_site = base_sites
        .iter()
        .filter_map(|p| sys_path.iter().position(|e| e == p))
        .min()
        .expect("a base site-packages folder on sys.path");
    assert!(venv_site < base_site, "{sys_path:?}");
    assert_eq!(
        fields[3].split_once(':').unwrap().1,
        venv_python_sys_path(&venv)
    );
}

/// What `python -I -c script` prints, line by line.
fn python_lines(python: &str, script: &str) -> Vec<String> {
    let out = Command::new(python)
        .args(["-I", "-c", script])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{python}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect()
}

/// Another installed CPython whose minor differs from the linked one, if this
/// host has one (pyenv versions, distribution packages).
fn other_minor_python() -> Option<PathBuf> {
    let mut candidates: Vec<PathBuf> = std::fs::read_dir(
        std::env::var_os("HOME")
            .map_or(PathBuf::from("/root"), PathBuf::from)
            .join(".pyenv/versions"),
    )
    .into_iter()
    .flatten()
    .filter_map(Result::ok)
    .map(|e| e.path().join("bin/python3"))
    .collect();
    candidates.extend((8..=14).map(|m| PathBuf::from(format!("/usr/bin/python3.{m}"))));
    candidates.into_iter().find(|p| {
        Command::new(p)
            .args([
                "-c",
                "import sys, venv; print('%d.%d' % sys.version_info[:2])",
            ])
            .output()
            .is_ok_and(|o| {
                o.status.success()
                    && !String::from_utf8_lossy(&o.stdout).trim().is_empty()
                    && String::from_utf8_lossy(&o.stdout).trim() != built::MINOR
                    && String::from_utf8_lossy(&o.stdout).starts_with('3')
            })
    })
}

/// Both `check` and `run` exit 78 with stderr containing every one of `parts`.
fn refused(cfg: &Path, env: &[(&str, &str)], parts: &[&str]) {
    for cmd in ["check", "run"] {
        let (code, out, err) = run_to_end(&[cmd, "-c", cfg.to_str().unwrap()], env);
        assert_eq!(code, 78, "{cmd}: {out}{err}");
        for p in parts {
            assert!(err.contains(p), "{cmd}: no {p:?} in: {err}");
        }
    }
}

#[test]
fn bad_venvs_and_a_bad_home_exit_78_saying_what_was_found_and_expected() {
    let s = Scenario::new();
    let env = [("PATH", SYSTEMD_PATH)];
    let expected = format!("Python {}", built::MINOR);

    let cfg = serving(&s, REPORT, "report", "venv = \"missing\"");
    refused(
        &cfg,
        &env,
        &["python.venv", "missing is not a directory", &expected],
    );

    std::fs::create_dir(s.path("plain")).unwrap();
    let cfg = serving(&s, REPORT, "report", "venv = \"plain\"");
    refused(
        &cfg,
        &env,
        &["python.venv", "no readable pyvenv.cfg", &expected],
    );

    // A venv made by another minor: a real one where this host has such a Python.
    let found = match other_minor_python() {
        Some(python) => {
            make_venv(
                python.to_str().unwrap(),
                &s.path("other"),
                &["--without-pip"],
            );
            let text = std::fs::read_to_string(s.path("other/pyvenv.cfg")).unwrap();
            text.lines()
                .find_map(|l| l.strip_prefix("version = "))
                .expect("version in pyvenv.cfg")
                .to_string()
        }
        None => {
            s.write("other/pyvenv.cfg", "home = /usr/bin\nversion = 3.9.2\n");
            "3.9.2".to_string()
        }
    };
    let cfg = serving(&s, REPORT, "report", "venv = \"other\"");
    refused(
        &cfg,
        &env,
        &[
            "python.venv",
            &format!("made by Python {found}"),
            &format!("libpython {}", built::MINOR),
        ],
    );

    let cfg = serving(&s, REPORT, "report", "home = \"plain\"");
    refused(
        &cfg,
        &env,
        &[
            "python.home",
            "plain has no",
            &format!("lib/python{}/os.py", built::MINOR),
        ],
    );

    // Passes every check (stdlib landmark, the build's lib-dynload), but
    // CPython cannot start from it (no encodings package): exit 78 too.
    let stdlib = format!("{}/python{}", built::PLATLIBDIR, built::MINOR);
    s.write(&format!("husk/{stdlib}/os.py"), "");
    std::os::unix::fs::symlink(
        Path::new(built::PREFIX).join(&stdlib).join("lib-dynload"),
        s.path(&format!("husk/{stdlib}/lib-dynload")),
    )
    .unwrap();
    let cfg = serving(&s, REPORT, "report", "home = \"husk\"");
    refused(
        &cfg,
        &env,
        &["cannot start Python from", "husk", "filesystem encoding"],
    );
}

#[test]
fn python_home_is_honoured_and_its_own_stdlib_files_are_used() {
    // An installation at another path: the build one seen through symlinks.
    let s = Scenario::new();
    let alt = s.path("alt");
    std::fs::create_dir(&alt).unwrap();
    for dir in [built::PLATLIBDIR, "bin"] {
        std::os::unix::fs::symlink(Path::new(built::PREFIX).join(dir), alt.join(dir)).unwrap();
    }
    let alt = alt.display().to_string();
    let handlers = format!(
        "{REPORT}\nimport os\n\ndef os_file(data):\n    return os.__file__.encode() + b'\\n'\n"
    );
    let cfg = serving(&s, &handlers, "report", "home = \"alt\"");
    let env = [("PATH", SYSTEMD_PATH)];
    let (code, out, err) = check(&cfg, &env);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains(&format!("base prefix {alt}, venv none")),
        "{out}"
    );
    let (reply, _) = ask(&cfg, &env, "hi");
    assert!(
        reply.starts_with(&format!("{alt}|{alt}|{alt}/bin/python")),
        "{reply}"
    );
    // Not the copy frozen into libpython: the file under the chosen home.
    let cfg = serving(&s, &handlers, "os_file", "home = \"alt\"");
    let (reply, _) = ask(&cfg, &env, "hi");
    assert_eq!(
        reply,
        format!("{alt}/{}/python{}/os.py", built::PLATLIBDIR, built::MINOR)
    );
    // home and venv together: the venv's packages on that installation.
    let venv = make_venv(built::EXECUTABLE, &s.path("venv"), &["--without-pip"]);
    let venv_text = venv.display().to_string();
    let cfg = serving(&s, &handlers, "report", "home = \"alt\"\nvenv = \"venv\"");
    let (reply, _) = ask(&cfg, &env, "hi");
    assert!(
        reply.starts_with(&format!("{venv_text}|{alt}|{venv_text}/bin/python|")),
        "{reply}"
    );
}

/// Debian's python3 when it is another installation of the linked minor.
fn distribution_python() -> Option<&'static str> {
    let python = "/usr/bin/python3";
    if built::PREFIX == "/usr" || !Path::new(python).exists() {
        return None;
    }
    let minor = python_lines(python, "import sys; print('%d.%d' % sys.version_info[:2])");
    (minor.first().map(String::as_str) == Some(built::MINOR)).then_some(python)
}

#[test]
fn another_build_of_the_same_minor_is_refused_as_home_but_its_venvs_work() {
    let Some(python) = distribution_python() else {
        eprintln!(
            "skipped: no second Python {} installation in /usr here",
            built::MINOR
        );
        return;
    };
    let s = Scenario::new();
    let env = [("PATH", SYSTEMD_PATH)];
    // Its stdlib does not fit this libpython (Debian compiles _socket and
    // others into its own libpython; they are not in its lib-dynload).
    let cfg = serving(&s, REPORT, "report", "home = \"/usr\"");
    refused(
        &cfg,
        &env,
        &["python.home: /usr lacks extension modules", built::PREFIX],
    );
    // A venv it made: its packages, on the stdlib that fits libpython, with a warning.
    let venv = make_venv(python, &s.path("venv"), &["--without-pip"]);
    let venv_text = venv.display().to_string();
    let handlers = format!("{REPORT}\nimport ssl, _socket, json\n");
    let cfg = serving(&s, &handlers, "report", "venv = \"venv\"");
    let (code, out, err) = check(&cfg, &env);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        err.contains("warning: python.venv") && err.contains("made by the Python in /usr/bin"),
        "{err}"
    );
    let (reply, log) = ask(&cfg, &env, "hi");
    assert!(
        reply.starts_with(&format!(
            "{venv_text}|{}|{venv_text}/bin/python|",
            built::PREFIX
        )),
        "{reply}"
    );
    assert!(
        log.contains("WARN") && log.contains("made by the Python in /usr/bin"),
        "{log}"
    );
}
