//! The reload diff, a pure function over the running and the wanted role
//! configs (rathole's `calculate_events` is the model): which roles start,
//! stop or are replaced, and what each replacement takes over from the
//! instance it replaces: resolved Python objects whose target did not
//! change, a listening socket on the same address, a shm file on the same path.

use std::collections::{BTreeMap, BTreeSet};

use crate::config::{Config, ShmMode, ShmRegionConfig, TcpClientConfig, TcpServerConfig};
use crate::shm::channel::Take;
use crate::tcp::endpoint::Listen;

/// A role's configuration, compared on reload.
#[derive(Debug, Clone, PartialEq)]
pub enum RoleConfig {
    /// `[[tcp.server]]`.
    Server(TcpServerConfig),
    /// `[[tcp.client]]`.
    Client(TcpClientConfig),
    /// `[[shm.region]]`.
    Region(ShmRegionConfig),
}

/// Every role in `config`, by name.
pub fn role_configs(config: &Config) -> BTreeMap<String, RoleConfig> {
    let mut roles = BTreeMap::new();
    for s in &config.tcp.server {
        roles.insert(s.name.clone(), RoleConfig::Server(s.clone()));
    }
    for c in &config.tcp.client {
        roles.insert(c.name.clone(), RoleConfig::Client(c.clone()));
    }
    for r in &config.shm.region {
        roles.insert(r.name.clone(), RoleConfig::Region(r.clone()));
    }
    roles
}

impl RoleConfig {
    /// The Python targets it names, by setting.
    fn targets(&self) -> Vec<(&'static str, Option<&str>)> {
        match self {
            RoleConfig::Server(s) => vec![
                ("handler", Some(s.handler.as_str())),
                ("on_connect", s.on_connect.as_deref()),
                ("on_close", s.on_close.as_deref()),
            ],
            RoleConfig::Client(c) => vec![
                ("on_reply", c.on_reply.as_deref()),
                ("producer", c.producer.as_deref()),
            ],
            RoleConfig::Region(r) => vec![
                ("handler", r.handler.as_deref()),
                ("on_change", r.on_change.as_deref()),
            ],
        }
    }

    /// The listening address of a server, normalised (`:80` = `127.0.0.1:80`,
    /// `unix:/p`, `unix:@n`); none for port 0 (each bind is another port:
    /// nothing to hand over) and for a socket systemd passed (every instance
    /// takes its own duplicate of it).
    fn listen(&self) -> Option<String> {
        match self {
            RoleConfig::Server(s) => match Listen::parse(&s.listen).ok()? {
                Listen::Tcp(a) if a.port() == 0 => None,
                Listen::Activated(_) => None,
                l => Some(l.to_string()),
            },
            _ => None,
        }
    }

    fn region(&self) -> Option<&ShmRegionConfig> {
        match self {
            RoleConfig::Region(r) => Some(r),
            _ => None,
        }
    }

    fn same_kind(&self, other: &RoleConfig) -> bool {
        match (self, other) {
            (RoleConfig::Server(_), RoleConfig::Server(_))
            | (RoleConfig::Client(_), RoleConfig::Client(_)) => true,
            (RoleConfig::Region(a), RoleConfig::Region(b)) => a.mode == b.mode,
            _ => false,
        }
    }
}

/// What one role does on a reload. Roles whose config is unchanged are not
/// in the plan: they are not touched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// A role new to the config.
    Start {
        /// The role.
        name: String,
        /// What it takes over from a retired role.
        keep: Keep,
    },
    /// A role whose config changed: a new instance starts, then the old one retires.
    Replace {
        /// The role.
        name: String,
        /// What the new instance takes over from the old one.
        keep: Keep,
    },
    /// A role gone from the config.
    Stop {
        /// The role.
        name: String,
    },
}

/// What a new instance takes over from instances being retired.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Keep {
    /// Settings naming a Python target that did not change: the old
    /// instance's resolved object (and its state) carries over.
    pub targets: BTreeSet<&'static str>,
    /// The retired server whose listening socket (same address) this one takes.
    pub socket_from: Option<String>,
    /// The retired region using the same file: wait for it to stop, then
    /// take the file as this says.
    pub file_from: Option<(String, Take)>,
    /// A client whose outbox size is unchanged: take over the old
    /// instance's outbox (with what is queued in it) once it has stopped.
    pub outbox: bool,
}

impl Keep {
    /// The other roles whose resources this takes (their change must succeed for this one's to).
    pub fn sources<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        let socket = self.socket_from.as_deref();
        let file = self.file_from.as_ref().map(|(from, _)| from.as_str());
        socket
            .into_iter()
            .chain(file)
            .filter(move |from| *from != name)
    }
}

/// The changes that turn the `running` roles into the `wanted` ones, in
/// the order to apply them: new instances (starts and replacements) before
/// the retirement of roles that are gone, so that sockets and files can be
/// handed over.
pub fn plan(
    running: &BTreeMap<String, RoleConfig>,
    wanted: &BTreeMap<String, RoleConfig>,
) -> Vec<Change> {
    // Old instances that will retire: changed or removed roles.
    let retiring: BTreeMap<&String, &RoleConfig> = running
        .iter()
        .filter(|(name, cfg)| wanted.get(*name) != Some(*cfg))
        .collect();
    let mut sockets: BTreeMap<String, &String> = retiring
        .iter()
        .filter_map(|(name, cfg)| cfg.listen().map(|addr| (addr, *name)))
        .collect();
    let mut files: BTreeMap<&std::path::Path, (&String, &ShmRegionConfig)> = retiring
        .iter()
        .filter_map(|(name, cfg)| cfg.region().map(|r| (r.path.as_path(), (*name, r))))
        .collect();
    let mut changes = Vec::new();
    for (name, cfg) in wanted {
        let old = running.get(name);
        if old == Some(cfg) {
            continue;
        }
        let mut keep = Keep::default();
        if let Some(old) = old.filter(|o| o.same_kind(cfg)) {
            let before: BTreeMap<_, _> = old.targets().into_iter().collect();
            keep.targets = cfg
                .targets()
                .into_iter()
                .filter(|(field, spec)| spec.is_some() && before.get(field) == Some(spec))
                .map(|(field, _)| field)
                .collect();
        }
        if let (Some(RoleConfig::Client(was)), RoleConfig::Client(now)) = (old, cfg) {
            keep.outbox = was.outbox == now.outbox;
        }
        if let Some(addr) = cfg.listen() {
            keep.socket_from = sockets.remove(&addr).cloned();
        }
        if let Some(r) = cfg.region()
            && let Some((from, was)) = files.remove(r.path.as_path())
        {
            let same_layout = from == name
                && was.mode == ShmMode::Channel
                && r.mode == ShmMode::Channel
                && was.ring_size == r.ring_size
                && was.max_message == r.max_message;
            let take = if same_layout {
                Take::Adopt
            } else {
                Take::Fresh
            };
            keep.file_from = Some((from.clone(), take));
        }
        let name = name.clone();
        changes.push(match old {
            Some(_) => Change::Replace { name, keep },
            None => Change::Start { name, keep },
        });
    }
    changes.extend(
        running
            .keys()
            .filter(|name| !wanted.contains_key(*name))
            .map(|name| Change::Stop { name: name.clone() }),
    );
    changes
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roles(toml: &str) -> BTreeMap<String, RoleConfig> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.toml");
        std::fs::write(&path, toml).unwrap();
        role_configs(&crate::config::load(&path).unwrap())
    }

    fn server(name: &str, listen: &str, extra: &str) -> String {
        format!(
            "[[tcp.server]]\nname = \"{name}\"\nlisten = \"{listen}\"\nhandler = \"h:echo\"\n{extra}\n"
        )
    }

    fn targets(t: &[&'static str]) -> BTreeSet<&'static str> {
        t.iter().copied().collect()
    }

    #[test]
    fn unchanged_roles_are_not_in_the_plan() {
        let a = roles(&(server("a", "1", "") + &server("b", "2", "")));
        assert_eq!(plan(&a, &a), []);
    }

    #[test]
    fn a_pipeline_change_keeps_the_handler_and_the_socket() {
        let old = roles(&server("a", "127.0.0.1:1", "on_connect = \"h:hi\""));
        let new = roles(&server("a", ":1", "on_connect = \"h:hello\"\npipeline = 4"));
        assert_eq!(
            plan(&old, &new),
            [Change::Replace {
                name: "a".into(),
                keep: Keep {
                    targets: targets(&["handler"]),
                    socket_from: Some("a".into()),
                    ..Keep::default()
                },
            }]
        );
    }

    #[test]
    fn a_moved_server_binds_anew_and_a_freed_port_is_handed_to_a_new_role() {
        let old = roles(&server("a", "1", ""));
        let new = roles(&(server("a", "2", "") + &server("b", "1", "")));
        assert_eq!(
            plan(&old, &new),
            [
                Change::Replace {
                    name: "a".into(),
                    keep: Keep {
                        targets: targets(&["handler"]),
                        ..Keep::default()
                    },
                },
                Change::Start {
                    name: "b".into(),
                    keep: Keep {
                        socket_from: Some("a".into()),
                        ..Keep::default()
                    },
                },
            ]
        );
    }

    #[test]
    fn removed_roles_stop_after_the_new_ones_start() {
        let old = roles(&(server("a", "1", "") + &server("z", "3", "")));
        let new = roles(&(server("a", "1", "") + &server("b", "2", "")));
        let p = plan(&old, &new);
        assert!(
            matches!(&p[0], Change::Start { name, .. } if name == "b"),
            "{p:?}"
        );
        assert_eq!(p[1], Change::Stop { name: "z".into() });
    }

    #[test]
    fn a_kind_change_keeps_nothing() {
        let old = roles(&server("a", "1", ""));
        let new = roles(
            "[[tcp.client]]\nname = \"a\"\nconnect = \"127.0.0.1:1\"\non_reply = \"h:echo\"\n",
        );
        assert_eq!(
            plan(&old, &new),
            [Change::Replace {
                name: "a".into(),
                keep: Keep::default(),
            }]
        );
    }

    fn channel(path: &str, handler: &str, ring: &str) -> String {
        format!(
            "[[shm.region]]\nname = \"c\"\npath = \"{path}\"\nmode = \"channel\"\n\
             handler = \"{handler}\"\nring_size = \"{ring}\"\nmax_message = \"1KiB\"\n"
        )
    }

    #[test]
    fn a_channel_adopts_its_file_unless_its_layout_or_path_changed() {
        let old = roles(&channel("/tmp/x", "h:a", "64KiB"));
        let keep = |new: &str| match plan(&old, &roles(new)).as_slice() {
            [Change::Replace { keep, .. }] => keep.clone(),
            p => panic!("{p:?}"),
        };
        let k = keep(&channel("/tmp/x", "h:b", "64KiB"));
        assert_eq!(k.file_from, Some(("c".into(), Take::Adopt)));
        assert!(k.targets.is_empty());
        let k = keep(&channel("/tmp/x", "h:a", "128KiB"));
        assert_eq!(k.file_from, Some(("c".into(), Take::Fresh)));
        assert_eq!(k.targets, targets(&["handler"]));
        assert_eq!(keep(&channel("/tmp/y", "h:a", "64KiB")).file_from, None);
    }

    #[test]
    fn a_client_keeps_unchanged_targets_only() {
        let client = |reply: &str| {
            format!(
                "[[tcp.client]]\nname = \"c\"\nconnect = \"127.0.0.1:1\"\non_reply = \"{reply}\"\n\
                 producer = \"h:gen\"\n"
            )
        };
        let p = plan(&roles(&client("h:a")), &roles(&client("h:b")));
        assert!(
            matches!(&p[..], [Change::Replace { keep, .. }]
                if keep.targets == targets(&["producer"]) && keep.outbox),
            "{p:?}"
        );
        let bigger = client("h:a") + "outbox = 4096\n";
        let p = plan(&roles(&client("h:a")), &roles(&bigger));
        assert!(
            matches!(&p[..], [Change::Replace { keep, .. }] if !keep.outbox),
            "{p:?}"
        );
    }
}
