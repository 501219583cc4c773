//! Every Python target a configuration names, with what its role will pass
//! to it, so `pyipcd check` can resolve and test each one as `run` would.

use super::{Config, Dispatch, ShmMode};

/// What a role passes when it calls a target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Passes {
    /// Nothing (a task's `run`, a client's `producer`).
    Nothing,
    /// One positional argument: the message (a channel request, a region's
    /// contents, a client's reply).
    Message,
    /// A TCP server's message: `data` positionally, and `peer` and `conn_id`
    /// by keyword when the function declares them.
    MessageAndContext,
    /// `(conn_id, peer)` positionally (`on_connect`, `on_close`).
    ConnIdAndPeer,
}

impl Passes {
    /// How many positional arguments that is.
    pub fn positional(self) -> usize {
        match self {
            Passes::Nothing => 0,
            Passes::Message | Passes::MessageAndContext => 1,
            Passes::ConnIdAndPeer => 2,
        }
    }

    /// The call as the docs write it.
    pub fn describe(self) -> &'static str {
        match self {
            Passes::Nothing => "f() with no arguments",
            Passes::Message => "f(data) with one positional argument",
            Passes::MessageAndContext => {
                "f(data) with one positional argument (and `peer`/`conn_id` by keyword if declared)"
            }
            Passes::ConnIdAndPeer => "f(conn_id, peer)",
        }
    }
}

/// One target: where it is set, for which role, and how it is called.
#[derive(Debug, Clone)]
pub struct TargetUse<'a> {
    /// The dotted key, e.g. `tcp.server[0].handler`.
    pub key: String,
    /// The role (or task) it belongs to.
    pub role: &'a str,
    /// The target as written.
    pub spec: &'a str,
    /// What the role passes.
    pub passes: Passes,
    /// It runs on a role's own thread, without asyncio: a plain `def` only.
    pub sync_only: bool,
    /// A task: `run` only imports a bare module, and calls the rest afresh
    /// each run (a `Class.method` task instantiates its class then).
    pub task: bool,
}

impl Config {
    /// Every Python target the config names.
    pub fn python_targets<'a>(&'a self) -> Vec<TargetUse<'a>> {
        let mut out = Vec::new();
        for (i, t) in self.python.task.iter().enumerate() {
            out.push(TargetUse {
                key: format!("python.task[{i}].run"),
                role: &t.name,
                spec: &t.run,
                passes: Passes::Nothing,
                sync_only: false,
                task: true,
            });
        }
        let role = |key: String, role: &'a str, spec: &'a str, passes, sync_only| TargetUse {
            key,
            role,
            spec,
            passes,
            sync_only,
            task: false,
        };
        for (i, s) in self.tcp.server.iter().enumerate() {
            let inline = s.dispatch == Dispatch::Inline;
            out.push(role(
                format!("tcp.server[{i}].handler"),
                &s.name,
                &s.handler,
                Passes::MessageAndContext,
                inline,
            ));
            for (k, v) in [("on_connect", &s.on_connect), ("on_close", &s.on_close)] {
                if let Some(v) = v {
                    out.push(role(
                        format!("tcp.server[{i}].{k}"),
                        &s.name,
                        v,
                        Passes::ConnIdAndPeer,
                        false,
                    ));
                }
            }
        }
        for (i, c) in self.tcp.client.iter().enumerate() {
            for (k, v, passes) in [
                ("producer", &c.producer, Passes::Nothing),
                ("on_reply", &c.on_reply, Passes::Message),
            ] {
                if let Some(v) = v {
                    out.push(role(
                        format!("tcp.client[{i}].{k}"),
                        &c.name,
                        v,
                        passes,
                        false,
                    ));
                }
            }
        }
        for (i, r) in self.shm.region.iter().enumerate() {
            let channel = r.mode == ShmMode::Channel;
            for (k, v, sync) in [
                ("on_change", &r.on_change, false),
                ("handler", &r.handler, channel),
            ] {
                if let Some(v) = v {
                    out.push(role(
                        format!("shm.region[{i}].{k}"),
                        &r.name,
                        v,
                        Passes::Message,
                        sync,
                    ));
                }
            }
        }
        out
    }
}
