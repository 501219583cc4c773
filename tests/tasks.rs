//! Tasks through the real binary: each kind, output capture, exceptions, restarts.

mod common;

use std::time::Duration;

use common::{Daemon, Scenario};

const T: Duration = Duration::from_secs(15);

#[test]
fn the_three_task_kinds_run_and_their_output_is_tagged() {
    let s = Scenario::new();
    s.write(
        "kinds.py",
        r#"
import logging, sys

def function_task():
    print("hello from a function")

class Worker:
    def __init__(self):
        self.greeting = "hello from a method"

    def run(self):
        print(self.greeting, end="")
        print("!")
        sys.stderr.write("to stderr\n")
        logging.getLogger("kinds").warning("via logging %d", 42)
"#,
    );
    s.write("toplevel.py", "print('hello from module top level')\n");
    let cfg = s.config(
        r#"
[python]
paths = ["."]
[[python.task]]
name = "fn"
run = "kinds:function_task"
[[python.task]]
name = "meth"
run = "kinds:Worker.run"
[[python.task]]
name = "mod"
run = "toplevel"
"#,
    );
    let mut d = Daemon::start(&cfg, &[]);
    d.wait_ready();
    let l = &d.lines;
    l.wait_for(&["hello from a function", "role=fn", "INFO"], T);
    l.wait_for(&["hello from a method!", "role=meth"], T);
    l.wait_for(&["to stderr", "role=meth", "WARN"], T);
    l.wait_for(
        &["via logging 42", "role=meth", "WARN", "origin=\"kinds\""],
        T,
    );
    l.wait_for(&["hello from module top level", "role=mod"], T);
    for task in ["fn", "meth", "mod"] {
        l.wait_for(&["task ended", &format!("task={task}"), "Finished"], T);
    }
    d.signal("TERM");
    assert_eq!(d.wait_exit(T).code(), Some(0), "{}", d.lines.text());
}

#[test]
fn a_raising_task_logs_its_traceback_and_the_daemon_goes_on() {
    let s = Scenario::new();
    s.write(
        "bad.py",
        "def explode():\n    raise ValueError('boom in task')\n",
    );
    s.write(
        "good.py",
        "import pyipcd, time\n\ndef run():\n    while not pyipcd.stopping():\n        time.sleep(0.02)\n    print('good task saw stopping')\n",
    );
    let cfg = s.config(
        r#"
[python]
paths = ["."]
[[python.task]]
name = "bad"
run = "bad:explode"
[[python.task]]
name = "good"
run = "good:run"
"#,
    );
    let mut d = Daemon::start(&cfg, &[]);
    d.wait_ready();
    d.lines
        .wait_for(&["task raised ValueError: boom in task"], T);
    d.lines.wait_for(&["ValueError: boom in task task=bad"], T);
    d.lines
        .wait_for(&["File", "bad.py", "line 2, in explode"], T);
    d.lines.wait_for(&["task ended", "task=bad", "Failed"], T);
    d.assert_running();
    d.signal("TERM");
    assert_eq!(d.wait_exit(T).code(), Some(0));
    d.lines
        .wait_for(&["good task saw stopping", "role=good"], T);
}

#[test]
fn on_failure_restarts_with_backoff_until_success() {
    let s = Scenario::new();
    let counter = s.path("count");
    s.write(
        "flaky.py",
        &format!(
            r#"
import os
PATH = {counter:?}

def run():
    n = int(open(PATH).read()) if os.path.exists(PATH) else 0
    open(PATH, "w").write(str(n + 1))
    if n < 2:
        raise RuntimeError(f"attempt {{n}} fails")
    print(f"attempt {{n}} succeeds")
"#,
            counter = counter.to_str().unwrap()
        ),
    );
    let cfg = s.config(
        r#"
[python]
paths = ["."]
[[python.task]]
name = "flaky"
run = "flaky:run"
restart = "on-failure"
backoff_min = "50ms"
backoff_max = "200ms"
"#,
    );
    let mut d = Daemon::start(&cfg, &[]);
    d.wait_ready();
    d.lines.wait_for(&["attempt 2 succeeds", "role=flaky"], T);
    d.lines.wait_for(&["task ended", "run=3", "Finished"], T);
    assert_eq!(
        d.lines.count(&["restarting in 50ms"]),
        1,
        "{}",
        d.lines.text()
    );
    assert_eq!(
        d.lines.count(&["restarting in 100ms"]),
        1,
        "{}",
        d.lines.text()
    );
    // A success ends an on-failure task for good.
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(d.lines.count(&["task starting", "task=flaky"]), 3);
    d.signal("TERM");
    assert_eq!(d.wait_exit(T).code(), Some(0));
}

#[test]
fn always_restarts_a_finished_bare_module_by_reimporting_it() {
    let s = Scenario::new();
    s.write("once.py", "import pyipcd\npyipcd.log('module body ran')\n");
    let cfg = s.config(
        r#"
[python]
paths = ["."]
[[python.task]]
name = "again"
run = "once"
restart = "always"
backoff_min = "20ms"
backoff_max = "20ms"
"#,
    );
    let mut d = Daemon::start(&cfg, &[]);
    d.wait_ready();
    d.lines.wait_count(&["module body ran", "role=again"], 3, T);
    d.signal("TERM");
    assert_eq!(d.wait_exit(T).code(), Some(0));
}
