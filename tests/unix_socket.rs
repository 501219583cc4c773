//! `[[tcp.server]]` and `[[tcp.client]]` over Unix stream sockets, through
//! the real binary: a C client built by gcc and a Python client, every
//! framing and both dispatch modes with pipelining, limits and hooks, 200
//! concurrent connections byte for byte, peer credentials and the uids and
//! gids allowed, the socket file's mode and its stale, live and foreign
//! occupants, abstract names, a client role, and a path moved by a reload.

mod common;

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::wire::{assert_closed, frame, read_frame, read_line};
use common::{Daemon, Scenario};

const T: Duration = Duration::from_secs(15);

const HANDLERS: &str = r#"
def echo(data):
    return data

def whoami(data, peer, conn_id):
    return f"{conn_id}@{peer}:".encode() + data

def opened(conn_id, peer):
    print(f"hook open {conn_id} {peer}")

def closed(conn_id, peer):
    print(f"hook close {conn_id} {peer}")

def upper(data):
    if data == b"boom":
        raise ValueError("handler exploded")
    return data.upper()
"#;

fn start(s: &Scenario, body: &str) -> Daemon {
    s.write("h.py", HANDLERS);
    let cfg = s.config(&format!("[python]\npaths = [\".\"]\nworkers = 2\n{body}"));
    let mut d = Daemon::start(&cfg, &[]);
    d.wait_ready();
    d
}

fn server(name: &str, listen: &str, framing: &str, handler: &str, extra: &str) -> String {
    format!(
        "[[tcp.server]]\nname = \"{name}\"\nlisten = \"{listen}\"\nframing = \"{framing}\"\nhandler = \"h:{handler}\"\n{extra}\n"
    )
}

fn connect(path: &Path) -> UnixStream {
    let s = UnixStream::connect(path).unwrap();
    s.set_read_timeout(Some(T)).unwrap();
    s
}

fn connect_abstract(name: &str) -> UnixStream {
    use std::os::linux::net::SocketAddrExt;
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name).unwrap();
    let s = UnixStream::connect_addr(&addr).unwrap();
    s.set_read_timeout(Some(T)).unwrap();
    s
}

/// An abstract socket name unique to this test process (abstract names are
/// shared by everything in the network namespace).
fn name(what: &str) -> String {
    format!("pyipcd-test-{}-{what}", std::process::id())
}

fn ids() -> (u32, u32) {
    let meta = std::fs::metadata("/proc/self").unwrap();
    use std::os::unix::fs::MetadataExt;
    (meta.uid(), meta.gid())
}

#[test]
fn every_framing_both_dispatch_modes_hooks_peer_credentials_and_limits() {
    let s = Scenario::new();
    let p = |n: &str| s.path(n).display().to_string();
    let hooks = "on_connect = \"h:opened\"\non_close = \"h:closed\"\n";
    let body = [
        server(
            "pl",
            &format!("unix:{}", p("pl.sock")),
            "line",
            "whoami",
            hooks,
        ),
        server(
            "il",
            &format!("unix:{}", p("il.sock")),
            "len32",
            "upper",
            "dispatch = \"inline\"\nmax_message = \"1KiB\"",
        ),
        server(
            "pr",
            &format!("unix:{}", p("pr.sock")),
            "raw",
            "echo",
            "max_connections = 1",
        ),
        server(
            "ir",
            &format!("unix:@{}", name("ir")),
            "line",
            "whoami",
            "dispatch = \"inline\"",
        ),
    ]
    .concat();
    let mut d = start(&s, &body);
    let (uid, gid) = ids();
    let me = std::process::id();

    // Line framing on the pool: the peer is the client's credentials.
    let mut c = connect(&s.path("pl.sock"));
    c.write_all(b"one\ntwo\n").unwrap();
    assert_eq!(
        read_line(&mut c),
        format!("1@pid={me},uid={uid},gid={gid}:one")
    );
    assert_eq!(
        read_line(&mut c),
        format!("1@pid={me},uid={uid},gid={gid}:two")
    );
    drop(c);
    d.lines.wait_for(
        &["hook open 1", &format!("pid={me},uid={uid},gid={gid}")],
        T,
    );
    d.lines.wait_for(&["hook close 1", &format!("pid={me}")], T);

    // len32 inline: 100 pipelined requests in one write, answered in order;
    // an exception means no reply and the connection stays; oversize closes.
    let mut c = connect(&s.path("il.sock"));
    let mut batch = Vec::new();
    for i in 0..100 {
        batch.extend(frame(
            if i == 50 {
                b"boom".to_vec()
            } else {
                format!("m{i}").into_bytes()
            }
            .as_slice(),
        ));
    }
    c.write_all(&batch).unwrap();
    for i in (0..100).filter(|i| *i != 50) {
        assert_eq!(read_frame(&mut c), format!("M{i}").into_bytes());
    }
    c.write_all(&frame(&[b'x'; 2000])).unwrap();
    assert_closed(&mut c);
    d.lines.wait_for(&["handler exploded"], T);

    // Raw on the pool, max_connections = 1: a second connection is refused.
    let mut c = connect(&s.path("pr.sock"));
    c.write_all(b"raw bytes").unwrap();
    let mut buf = [0u8; 64];
    let n = c.read(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"raw bytes");
    let mut second = connect(&s.path("pr.sock"));
    assert_closed(&mut second);
    d.lines.wait_for(
        &[
            "refusing connection: max_connections (1) reached",
            "role=pr",
        ],
        T,
    );

    // An abstract name, inline.
    let mut c = connect_abstract(&name("ir"));
    c.write_all(b"hi\n").unwrap();
    assert_eq!(
        read_line(&mut c),
        format!("1@pid={me},uid={uid},gid={gid}:hi")
    );

    // Socket files are 0600 by default, and gone after a clean stop.
    for f in ["pl.sock", "il.sock", "pr.sock"] {
        let mode = std::fs::metadata(s.path(f)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{f}");
    }
    d.signal("TERM");
    assert_eq!(d.wait_exit(T).code(), Some(0), "{}", d.lines.text());
    for f in ["pl.sock", "il.sock", "pr.sock"] {
        assert!(!s.path(f).exists(), "{f} left behind");
    }
}

#[test]
fn a_c_client_and_a_python_client_talk_over_unix_sockets() {
    let s = Scenario::new();
    let path = s.path("echo.sock");
    let body = server(
        "e",
        &format!("unix:{}", path.display()),
        "len32",
        "echo",
        "",
    ) + &server(
        "a",
        &format!("unix:@{}", name("c")),
        "len32",
        "echo",
        "dispatch = \"inline\"",
    );
    let _d = start(&s, &body);
    let exe = s.path("unix_client");
    common::gcc("tests/fixtures/c/unix_client.c", &exe);
    for target in [path.display().to_string(), format!("@{}", name("c"))] {
        let out = Command::new(&exe).arg(&target).arg("40").output().unwrap();
        assert!(
            out.status.success(),
            "{target}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(String::from_utf8_lossy(&out.stdout), "OK 80\n", "{target}");
    }
    let script = format!(
        "import socket, struct\ns = socket.socket(socket.AF_UNIX)\ns.connect({:?})\n\
         s.sendall(struct.pack('>I', 12) + b'Hello, world')\nn = struct.unpack('>I', s.recv(4))[0]\nprint(s.recv(n))\n",
        path.display().to_string()
    );
    assert_eq!(common::run_python(&script), "b'Hello, world'\n");
}

#[test]
fn two_hundred_concurrent_unix_connections_byte_for_byte() {
    for dispatch in ["pool", "inline"] {
        let s = Scenario::new();
        let path = s.path("e.sock");
        let extra = format!("dispatch = \"{dispatch}\"\nmax_message = \"64KiB\"");
        let _d = start(
            &s,
            &server(
                "e",
                &format!("unix:{}", path.display()),
                "len32",
                "echo",
                &extra,
            ),
        );
        let threads: Vec<_> = (0..200u32)
            .map(|c| {
                let path = path.clone();
                std::thread::spawn(move || {
                    let mut sock = connect(&path);
                    for i in 0..20u32 {
                        let len = ((c * 7919 + i * 104_729) % 20_000) as usize;
                        let msg: Vec<u8> = (0..len).map(|k| (k as u32 ^ c ^ i) as u8).collect();
                        sock.write_all(&frame(&msg)).unwrap();
                        assert_eq!(read_frame(&mut sock), msg, "conn {c} msg {i}");
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().expect("a connection failed");
        }
    }
}

#[test]
fn peers_outside_allow_uids_and_allow_gids_are_refused_logged_and_counted() {
    let s = Scenario::new();
    let (uid, gid) = ids();
    let admin = common::free_port();
    let body = format!("[admin]\nlisten = \"127.0.0.1:{admin}\"\n")
        + &server(
            "other",
            &format!("unix:@{}", name("deny")),
            "line",
            "echo",
            &format!("allow_uids = [{}]", uid + 4242),
        )
        + &server(
            "mine",
            &format!("unix:@{}", name("allow")),
            "line",
            "echo",
            &format!("allow_uids = [{}]\nallow_gids = [{gid}]", uid + 4242),
        );
    let d = start(&s, &body);
    let mut c = connect_abstract(&name("deny"));
    let _ = c.write_all(b"let me in\n");
    assert_closed(&mut c);
    d.lines.wait_for(
        &[
            "refusing connection: peer not in allow_uids/allow_gids",
            "role=other",
            &format!("uid={uid}"),
        ],
        T,
    );
    // Matching the gid list is enough.
    let mut c = connect_abstract(&name("allow"));
    c.write_all(b"in\n").unwrap();
    assert_eq!(read_line(&mut c), "in");
    let (_, body) = common::http_get(admin, "/metrics");
    assert_eq!(
        common::metric(&body, "pyipcd_connections_denied_total{role=\"other\"}"),
        1.0
    );
    assert_eq!(
        common::metric(&body, "pyipcd_connections_denied_total{role=\"mine\"}"),
        0.0
    );

    // Another uid for real, where this test may switch users: root is served,
    // uid 65534 is not (an abstract name has no file permissions in the way).
    if uid == 0 {
        let s2 = Scenario::new();
        let d2 = start(
            &s2,
            &server(
                "root",
                &format!("unix:@{}", name("rootonly")),
                "line",
                "echo",
                "allow_uids = [0]",
            ),
        );
        let probe = format!(
            "import socket\ns = socket.socket(socket.AF_UNIX)\ns.connect('\\0{}')\n\
                     s.settimeout(15)\ntry:\n    s.sendall(b'hi\\n')\n    print(repr(s.recv(16)))\n\
                     except (ConnectionResetError, BrokenPipeError):\n    print('reset')\n",
            name("rootonly")
        );
        let as_user = |u: u32| {
            use std::os::unix::process::CommandExt;
            // The system's own python3: a venv's may be unreadable to uid 65534.
            let out = Command::new("/usr/bin/python3")
                .args(["-c", &probe])
                .uid(u)
                .gid(u)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8_lossy(&out.stdout).trim().to_string()
        };
        assert_eq!(as_user(0), "b'hi\\n'");
        let refused = as_user(65534);
        assert!(refused == "b''" || refused == "reset", "{refused}");
        d2.lines
            .wait_for(&["refusing connection", "uid=65534,gid=65534"], T);
    }
}

#[test]
fn a_socket_file_gets_its_mode_owner_and_group() {
    let s = Scenario::new();
    // Root can give the file away (to nobody/nogroup); others give it to themselves.
    let (uid, gid) = if ids().0 == 0 { (65534, 65534) } else { ids() };
    let path = s.path("m.sock");
    let extra = format!("mode = \"0660\"\nowner = {uid}\ngroup = {gid}");
    let _d = start(
        &s,
        &server(
            "m",
            &format!("unix:{}", path.display()),
            "line",
            "echo",
            &extra,
        ),
    );
    let meta = std::fs::metadata(&path).unwrap();
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o660);
    assert_eq!((meta.uid(), meta.gid()), (uid, gid));
}

#[test]
fn a_stale_socket_file_is_replaced_a_live_one_or_a_regular_file_is_refused_with_78() {
    let s = Scenario::new();
    s.write("h.py", HANDLERS);
    let path = s.path("x.sock");
    let cfg = s.config(&format!(
        "[python]\npaths = [\".\"]\n{}",
        server("x", &format!("unix:{}", path.display()), "line", "echo", "")
    ));
    let cfg_s = cfg.to_str().unwrap();

    // Live: something accepts there.
    let live = std::os::unix::net::UnixListener::bind(&path).unwrap();
    exits_78_saying("run", cfg_s, "is a live socket");
    exits_78_saying("check", cfg_s, "is a live socket");

    // Stale: the listener is gone, its file is not.
    drop(live);
    assert!(path.exists());
    let mut d = Daemon::start(&cfg, &[]);
    d.wait_ready();
    d.lines.wait_for(&["removed a stale socket file"], T);
    let mut c = connect(&path);
    c.write_all(b"fresh\n").unwrap();
    assert_eq!(read_line(&mut c), "fresh");
    d.signal("TERM");
    assert_eq!(d.wait_exit(T).code(), Some(0));

    // Not a socket: never replaced.
    std::fs::write(&path, b"precious").unwrap();
    exits_78_saying("run", cfg_s, "is not a socket (a regular file)");
    assert_eq!(std::fs::read(&path).unwrap(), b"precious");
}

/// `pyipcd <command> -c cfg` must exit 78 with `want` on stderr.
fn exits_78_saying(command: &str, cfg: &str, want: &str) {
    let (code, _, err) = common::run_to_end(&[command, "-c", cfg], &[]);
    assert_eq!(code, 78, "{command}: {err}");
    assert!(err.contains(want), "{command}: {err}");
}

#[test]
fn a_client_role_connects_to_a_unix_socket_path_and_abstract_name() {
    let s = Scenario::new();
    let path = s.path("up.sock");
    let upstream = std::os::unix::net::UnixListener::bind(&path).unwrap();
    use std::os::linux::net::SocketAddrExt;
    let abs = std::os::unix::net::UnixListener::bind_addr(
        &std::os::unix::net::SocketAddr::from_abstract_name(name("up")).unwrap(),
    )
    .unwrap();
    let body = format!(
        "[[tcp.client]]\nname = \"c1\"\nconnect = \"unix:{}\"\nsend = [\"to path\"]\nrepeat = 1\n\
         [[tcp.client]]\nname = \"c2\"\nconnect = \"unix:@{}\"\nsend = [\"to name\"]\nrepeat = 1\n",
        path.display(),
        name("up")
    );
    let _d = start(&s, &body);
    for (l, want) in [(upstream, "to path"), (abs, "to name")] {
        l.set_nonblocking(true).unwrap();
        let deadline = Instant::now() + T;
        let mut conn = loop {
            match l.accept() {
                Ok((c, _)) => break c,
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10))
                }
                Err(e) => panic!("the client role never connected ({want}): {e}"),
            }
        };
        conn.set_nonblocking(false).unwrap();
        conn.set_read_timeout(Some(T)).unwrap();
        assert_eq!(read_line(&mut conn), want);
    }
}

#[test]
fn a_reload_keeps_a_unix_socket_without_a_refused_connect_and_moves_a_changed_path() {
    let s = Scenario::new();
    s.write("h.py", HANDLERS);
    let (a, b) = (s.path("a.sock"), s.path("b.sock"));
    let text = |listen: &Path, pipeline: u32| {
        format!(
            "[daemon]\nshutdown_grace = \"3s\"\n[python]\npaths = [\".\"]\n{}",
            server(
                "r",
                &format!("unix:{}", listen.display()),
                "line",
                "echo",
                &format!("pipeline = {pipeline}")
            )
        )
    };
    let cfg = s.write("pyipcd.toml", &text(&a, 8));
    let mut d = Daemon::start(&cfg, &[]);
    d.wait_ready();
    // A prober connects and asks in a loop across the same-path reload.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let prober = {
        let (a, stop) = (a.clone(), stop.clone());
        std::thread::spawn(move || {
            let (mut ok, mut failed) = (0, 0);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                match UnixStream::connect(&a) {
                    Ok(mut c) => {
                        c.set_read_timeout(Some(T)).unwrap();
                        c.write_all(b"p\n").unwrap();
                        if read_line(&mut c) == "p" {
                            ok += 1
                        } else {
                            failed += 1
                        }
                    }
                    Err(_) => failed += 1,
                }
            }
            (ok, failed)
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    d.reload(
        &cfg,
        &text(&a, 4),
        &["reloaded:", "replaced [\"r\"]", "failed []"],
        T,
    );
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (ok, failed) = prober.join().unwrap();
    assert!(
        ok > 10 && failed == 0,
        "ok {ok} failed {failed}; log:\n{}",
        d.lines.text()
    );

    // A new path: served there; the old file goes when the old instance does.
    d.reload(
        &cfg,
        &text(&b, 4),
        &["reloaded:", "replaced [\"r\"]", "failed []"],
        T,
    );
    let mut c = connect(&b);
    c.write_all(b"moved\n").unwrap();
    assert_eq!(read_line(&mut c), "moved");
    let deadline = Instant::now() + T;
    while a.exists() {
        assert!(Instant::now() < deadline, "old socket file still there");
        std::thread::sleep(Duration::from_millis(20));
    }
}
