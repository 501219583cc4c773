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
            let check = || run_to_end(&["check", "-c", path.to_str().unwrap()], env);
            let (mut code, mut out, mut err) = check();
            // The shipped ports (50008…) lie in Linux's ephemeral range: a
            // connection of another test may hold one for a moment.
            for _ in 0..3 {
                if code == 0 || !err.contains("Address already in use") {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(500));
                (code, out, err) = check();
            }
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

#[test]
fn check_names_every_schema_problem_at_once_with_dotted_keys_and_hints() {
    let s = Scenario::new();
    let cfg = s.config(
        "[python]\nworkers = \"many\"\ncall_timeout = 5\n\
         [[tcp.server]]\nname = \"a\"\nlisten = \"127.0.0.1:0\"\nhandler = \"h:f\"\nframing = \"jsonish\"\nmax_message = \"lots\"\n\
         [[tcp.client]]\nname = \"c\"\nconnect = \"127.0.0.1:1\"\nretry_forever = true\n\
         [[tcp.client]]\nconnect = \"127.0.0.1:1\"\n\
         [bogus]\nx = 1\n[\"../odd name\"]\ny = 2\n",
    );
    // A typo and a bad value in environment overrides are named as such.
    let env = [
        ("PYIPCD__PYTHON__QUEUEE", "8"),
        ("PYIPCD__DAEMON__IO_THREADS", "lots"),
    ];
    let (code, out, err) = run_to_end(&["check", "-c", cfg.to_str().unwrap()], &env);
    assert_eq!(code, 78, "{out}{err}");
    for expected in [
        "python.workers: invalid type: string \"many\", expected a whole number",
        "python.call_timeout: invalid type: integer `5`, expected a duration (a duration is a string with a unit, e.g. \"5s\"",
        "tcp.server[0].framing: `jsonish` is not one of: raw, line, len32",
        "tcp.server[0].max_message: ",
        "(a size is a number of bytes or a string with a unit, e.g. \"64KiB\", \"1MiB\")",
        "tcp.client[0].retry_forever: unknown key; valid keys here: name, connect, framing,",
        "tcp.client[1].name: required key missing",
        "bogus: unknown table; valid ones: log, daemon, python, tcp, shm, admin",
        // A key TOML has to quote is quoted (found by the config fuzz target).
        "\"../odd name\": unknown table",
        "python.queuee (set by environment variable PYIPCD__PYTHON__QUEUEE): unknown key",
        "daemon.io_threads (set by environment variable PYIPCD__DAEMON__IO_THREADS): invalid type",
    ] {
        assert!(err.contains(expected), "missing `{expected}` in:\n{err}");
    }
    // `run` refuses the same file with the same lines.
    let (code, _, run_err) = run_to_end(&["run", "-c", cfg.to_str().unwrap()], &env);
    assert_eq!(code, 78, "{run_err}");
    assert!(
        run_err.contains("tcp.client[0].retry_forever: unknown key"),
        "{run_err}"
    );
}

#[test]
fn schema_and_cross_role_problems_show_together_when_every_role_was_read() {
    let s = Scenario::new();
    // A bad value (left at its default) and two roles with one name.
    let cfg = s.config(
        "[python]\nqueue = \"big\"\n\
         [[python.task]]\nname = \"a\"\nrun = \"m:f\"\n\
         [[tcp.server]]\nname = \"a\"\nlisten = \"127.0.0.1:0\"\nhandler = \"h:f\"\n\
         [[tcp.server]]\nname = \"a\"\nlisten = \"127.0.0.1:0\"\nhandler = \"h:f\"\n",
    );
    let (code, _, err) = run_to_end(&["check", "-c", cfg.to_str().unwrap()], &[]);
    assert_eq!(code, 78, "{err}");
    assert!(err.contains("python.queue: invalid type"), "{err}");
    assert!(err.contains("`a` is empty or used twice"), "{err}");
    assert!(
        err.contains("python.task[0].name `a`: a role has the same name"),
        "{err}"
    );
}

#[test]
fn check_catches_what_run_would_hit() {
    let s = Scenario::new();
    s.write(
        "h.py",
        "class Counter:\n    def __init__(self, start):\n        self.n = start\n    def hit(self, data):\n        return data\n\n\
         def noargs():\n    return b''\n\ndef two(data, other):\n    return data\n\n\
         def fine(data, peer=None, conn_id=None):\n    return data\n\ndef hook(conn_id, peer):\n    pass\n\n\
         def produce():\n    yield b'x'\n",
    );
    // Something else holds a port a role wants.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let cfg = s.config(&format!(
        "[python]\npaths = [\".\"]\n\
         [[tcp.server]]\nname = \"ctor\"\nlisten = \"127.0.0.1:0\"\nhandler = \"h:Counter.hit\"\n\
         [[tcp.server]]\nname = \"none\"\nlisten = \"127.0.0.1:0\"\nhandler = \"h:noargs\"\non_connect = \"h:hook\"\non_close = \"h:noargs\"\n\
         [[tcp.server]]\nname = \"extra\"\nlisten = \"127.0.0.1:{port}\"\nhandler = \"h:two\"\n\
         [[tcp.server]]\nname = \"good\"\nlisten = \"127.0.0.1:0\"\nhandler = \"h:fine\"\n\
         [[tcp.client]]\nname = \"cl\"\nconnect = \"127.0.0.1:1\"\nproducer = \"h:produce\"\non_reply = \"h:fine\"\n"
    ));
    let (code, out, err) = run_to_end(&["check", "-c", cfg.to_str().unwrap()], &[]);
    assert_eq!(code, 78, "{out}{err}");
    for expected in [
        "tcp.server[0].handler (role ctor): `h:Counter.hit`: TypeError: Counter.__init__() missing 1 required positional argument: 'start'",
        "tcp.server[1].handler (role none): `h:noargs` cannot be called as the role calls it, f(data)",
        "too many positional arguments",
        "tcp.server[1].on_close (role none): `h:noargs` cannot be called as the role calls it, f(conn_id, peer)",
        "tcp.server[2].handler (role extra): `h:two` cannot be called as the role calls it",
        "missing a required argument: 'other'",
        &format!(
            "tcp.server[2].listen (role extra): cannot listen on 127.0.0.1:{port}: Address already in use"
        ),
        "5 problem(s)",
    ] {
        assert!(err.contains(expected), "missing `{expected}` in:\n{err}");
    }
    assert!(
        !err.contains("role good") && !err.contains("role cl"),
        "{err}"
    );
    // --no-bind (checking a running daemon's next config) skips the bind.
    let (code, _, err) = run_to_end(&["check", "--no-bind", "-c", cfg.to_str().unwrap()], &[]);
    assert_eq!(code, 78);
    assert!(
        err.contains("4 problem(s)") && !err.contains("cannot listen"),
        "{err}"
    );
    drop(taken);
}

#[test]
fn unix_socket_options_are_checked_against_the_listen_kind() {
    let s = Scenario::new();
    s.write("h.py", "def echo(data):\n    return data\n");
    let cfg = s.config(
        "[python]\npaths = [\".\"]\n\
         [[tcp.server]]\nname = \"t\"\nlisten = \"127.0.0.1:0\"\nhandler = \"h:echo\"\nmode = \"0660\"\nallow_uids = [0]\n\
         [[tcp.server]]\nname = \"a\"\nlisten = \"unix:@pyipcd-test-cfg\"\nhandler = \"h:echo\"\nowner = \"root\"\n\
         [[tcp.server]]\nname = \"u\"\nlisten = \"unix:u.sock\"\nhandler = \"h:echo\"\nowner = \"no-such-user-pyipcd\"\nallow_uids = []\n\
         [[tcp.server]]\nname = \"m\"\nlisten = \"unix:m.sock\"\nhandler = \"h:echo\"\nmode = \"0999\"\n\
         [[tcp.server]]\nname = \"s\"\nlisten = \"systemd:\"\nhandler = \"h:echo\"\n\
         [[tcp.client]]\nname = \"c\"\nconnect = \"unix:\"\n",
    );
    let (code, _, err) = run_to_end(&["check", "-c", cfg.to_str().unwrap()], &[]);
    assert_eq!(code, 78, "{err}");
    for want in [
        "tcp.server[0].mode: only for a socket file (listen = \"unix:/path\"), not `127.0.0.1:0`",
        "tcp.server[0].allow_uids: peer credentials exist only on Unix sockets",
        "tcp.server[1].owner: only for a socket file",
        "tcp.server[2].owner: no user named `no-such-user-pyipcd` on this host",
        "tcp.server[2].allow_uids: an empty list would refuse every peer",
        "tcp.server[3].mode: `0999` is not an octal mode",
        "tcp.server[4].listen: `systemd:`: after systemd: give the socket's FileDescriptorName=",
        "tcp.client[0].connect: `unix:`: give a path",
    ] {
        assert!(err.contains(want), "missing `{want}` in:\n{err}");
    }
}

#[test]
fn worker_placement_is_checked() {
    let s = Scenario::new();
    s.write("h.py", "def f(data):\n    return data\n");
    let cfg = s.config(
        "processes = 2\n[python]\npaths = [\".\"]\n\
         [[shm.region]]\nname = \"shared\"\npath = \"a.shm\"\nsize = \"4KiB\"\ncreate = true\non_change = \"h:f\"\nprocesses = \"all\"\n\
         [[shm.region]]\nname = \"once\"\npath = \"b-{worker}.shm\"\nsize = \"4KiB\"\ncreate = true\non_change = \"h:f\"\n\
         [[python.task]]\nname = \"t\"\nrun = \"h:f\"\nprocesses = \"some\"\n",
    );
    let (code, _, err) = run_to_end(&["check", "-c", cfg.to_str().unwrap()], &[]);
    assert_eq!(code, 78, "{err}");
    for want in [
        "shm.region[0].path: with processes = \"all\" every worker maps its own file: put `{worker}` in the path",
        "shm.region[1].path: `{worker}` is only for processes = \"all\"",
        "python.task[0].processes",
    ] {
        assert!(err.contains(want), "missing `{want}` in:\n{err}");
    }
    let cfg = s.config("processes = 0\n");
    let (code, _, err) = run_to_end(&["check", "-c", cfg.to_str().unwrap()], &[]);
    assert_eq!(code, 78, "{err}");
    assert!(
        err.contains("daemon.processes must be between 1 and 256 (got 0)"),
        "{err}"
    );
}

#[test]
fn a_time_slice_outside_the_kernels_range_is_refused() {
    let s = Scenario::new();
    for (slice, ok) in [("50us", false), ("1s", false), ("0s", true), ("2ms", true)] {
        let cfg = s.config(&format!("sched_slice = \"{slice}\"\n"));
        let (code, _, err) = run_to_end(&["check", "-c", cfg.to_str().unwrap()], &[]);
        if ok {
            assert_eq!(code, 0, "{slice}: {err}");
        } else {
            assert_eq!(code, 78, "{slice}: {err}");
            assert!(err.contains("daemon.sched_slice must be 0"), "{err}");
        }
    }
}

#[test]
fn a_non_ascii_log_filter_is_a_config_error_not_a_panic() {
    // Found by the `config` fuzz target: tracing-subscriber's filter parser
    // panicked on this (fuzz/corpus/config/regression-non-ascii-log-level).
    let s = Scenario::new();
    let cfg = s.write(
        "pyipcd.toml",
        "[log]\nlevel = \" ioc\u{fffd}\u{fffd}\u{fffd}\u{fffd}\u{fffd}\u{fffd}\u{fffd}\u{fffd}=[infng o\"\n",
    );
    let (code, _, err) = run_to_end(&["check", "-c", cfg.to_str().unwrap()], &[]);
    assert_eq!(code, 78, "{err}");
    assert!(
        err.contains("log.level:") && err.contains("(ASCII only)"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}
