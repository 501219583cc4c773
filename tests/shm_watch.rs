//! `[[shm.region]] mode = "watch"` through the real binary: file creation
//! (0600), the scripted writer, changes made by another process, write-back,
//! bad files, and the classic demo from `config/mmap.toml`.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use common::{Daemon, Scenario, run_to_end};

const T: Duration = Duration::from_secs(15);

const HANDLERS: &str = r#"
def seen(contents):
    print("handler saw", repr(contents.split(b"\0", 1)[0].decode()))

def stamp(contents):
    if contents.startswith(b"external"):
        return b"ACK"
"#;

fn region(s: &Scenario, extra: &str) -> std::path::PathBuf {
    s.write("h.py", HANDLERS);
    s.config(&format!(
        "[python]\npaths = [\".\"]\n[[shm.region]]\nname = \"r\"\npath = \"region.dat\"\nsize = \"256B\"\n\
         create = true\npoll = \"10ms\"\n{extra}\n"
    ))
}

#[test]
fn creates_the_file_0600_and_reports_every_scripted_write_in_order() {
    let s = Scenario::new();
    let cfg = region(
        &s,
        "on_change = \"h:seen\"\nwrite = [\"alpha\", \"beta\\u0000x\", \"gamma\"]\nwrite_interval = \"100ms\"",
    );
    let mut d = Daemon::start(&cfg, &[]);
    d.wait_ready();
    d.lines.wait_for(&["writer finished (3 values)"], T);
    for word in ["alpha", "beta", "gamma"] {
        d.lines
            .wait_for(&[&format!("handler saw '{word}'"), "role=r"], T);
    }
    let text = d.lines.text();
    let (a, b, c) = (
        text.find("handler saw 'alpha'").unwrap(),
        text.find("handler saw 'beta'").unwrap(),
        text.find("handler saw 'gamma'").unwrap(),
    );
    assert!(a < b && b < c, "out of order:\n{text}");
    let meta = std::fs::metadata(s.path("region.dat")).unwrap();
    assert_eq!(meta.len(), 256);
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    // The last write cleared what "beta\0x" left behind.
    let bytes = std::fs::read(s.path("region.dat")).unwrap();
    assert_eq!(&bytes[..6], b"gamma\0");
    assert!(bytes[6..].iter().all(|&b| b == 0));
    d.signal("TERM");
    assert_eq!(d.wait_exit(T).code(), Some(0));
}

#[test]
fn a_write_by_another_process_is_seen_and_the_reply_written_back() {
    let s = Scenario::new();
    let cfg = region(&s, "on_change = \"h:stamp\"");
    let mut d = Daemon::start(&cfg, &[]);
    d.wait_ready();
    d.lines.wait_for(&["watching every 10ms", "role=r"], T);
    let path = s.path("region.dat");
    let script = format!(
        "import mmap\nf = open({:?}, 'r+b')\nm = mmap.mmap(f.fileno(), 256)\nm[0:11] = b'external!!!'\nm.close()\n",
        path.to_str().unwrap()
    );
    common::run_python(&script);
    d.lines.wait_for(&["changed: external!!!", "role=r"], T);
    // The handler's reply lands at offset 0, leaving the rest.
    let deadline = std::time::Instant::now() + T;
    loop {
        let bytes = std::fs::read(&path).unwrap();
        if &bytes[..11] == b"ACKernal!!!" {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no write-back: {:?}",
            &bytes[..11]
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    // Its own write-back is not reported as a change.
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(
        d.lines.count(&["changed: ACKernal"]),
        0,
        "{}",
        d.lines.text()
    );
}

#[test]
fn pyipcd_send_from_a_task_writes_into_the_region() {
    let s = Scenario::new();
    s.write(
        "sender.py",
        "import pyipcd\n\ndef run():\n    pyipcd.send('r', b'sent from python')\n",
    );
    let cfg = region(
        &s,
        "on_change = \"h:seen\"\n[[python.task]]\nname = \"sender\"\nrun = \"sender:run\"",
    );
    let mut d = Daemon::start(&cfg, &[]);
    d.wait_ready();
    d.lines
        .wait_for(&["pyipcd.send wrote sent from python", "role=r"], T);
    d.lines
        .wait_for(&["handler saw 'sent from python'", "role=r"], T);
    let bytes = std::fs::read(s.path("region.dat")).unwrap();
    assert_eq!(&bytes[..17], b"sent from python\0");
    d.signal("TERM");
    assert_eq!(d.wait_exit(T).code(), Some(0));
}

#[test]
fn a_missing_file_without_create_is_a_config_error() {
    let s = Scenario::new();
    let cfg = s.config("[[shm.region]]\nname = \"r\"\npath = \"absent.dat\"\nsize = \"1KiB\"\n");
    let (code, _, err) = run_to_end(&["run", "-c", cfg.to_str().unwrap()], &[]);
    assert_eq!(code, 78, "{err}");
    assert!(
        err.contains("shm.region[0].path") && err.contains("create = true"),
        "{err}"
    );
}

#[test]
fn a_file_shorter_than_the_region_is_refused_at_start() {
    let s = Scenario::new();
    s.write("short.dat", "tiny");
    let cfg = s.config("[[shm.region]]\nname = \"r\"\npath = \"short.dat\"\nsize = \"1KiB\"\n");
    let (code, _, err) = run_to_end(&["run", "-c", cfg.to_str().unwrap()], &[]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("the file has 4 bytes, the region needs 1024"),
        "{err}"
    );
}

#[test]
fn the_classic_mmap_demo_interleaves_both_sides() {
    let s = Scenario::new();
    let shipped = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config/mmap.toml"))
        .unwrap()
        .replace("../python", concat!(env!("CARGO_MANIFEST_DIR"), "/python"))
        .replace("../input.dat", "input.dat")
        .replace("write_interval = \"1s\"", "write_interval = \"150ms\"");
    let cfg = s.write("mmap.toml", &shipped);
    let data = s.path("input.dat");
    let mut d = Daemon::start(
        &cfg,
        &[
            ("PY_MMAP_FILE", data.to_str().unwrap()),
            ("PY_MMAP_ROUNDS", "6"),
            ("PY_MMAP_PAUSE", "0.15"),
        ],
    );
    d.wait_ready();
    d.lines
        .wait_for(&["task ended", "task=py_mmap", "Finished"], T);
    d.lines
        .wait_for(&["writer finished (10 values)", "role=input"], T);
    // The Python side read both its own "567" and the writer's digits ...
    d.lines.wait_for(&["Python read: 567", "role=py_mmap"], T);
    assert!(
        d.lines.all().iter().any(|l| l.contains("role=py_mmap")
            && l.contains("Python read:")
            && !l.contains("567")),
        "the Python side never saw the writer:\n{}",
        d.lines.text()
    );
    // ... and the poller saw changes from both sides.
    d.lines.wait_for(&["changed: 567\\n", "role=input"], T);
    d.lines.wait_for(&["region now holds '9'", "role=input"], T);
    d.signal("TERM");
    assert_eq!(d.wait_exit(T).code(), Some(0));
}
