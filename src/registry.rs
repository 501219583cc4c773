//! What running role instances publish to the rest of the daemon: whether
//! each role is up (read by `/health` and the systemd status) and where
//! `pyipcd.send(role, data)` delivers. A leaf module: it knows nothing of
//! roles, Python or the admin endpoint.
//!
//! # Ownership
//! Entries are keyed by role name, but each is *owned* by one instance
//! generation (linkerd2-proxy's readiness latch is the model): an instance
//! claims its entry with a [`HealthLatch`] or a [`RouteGuard`], only that
//! guard can change it, and dropping the guard removes the entry only if no
//! newer instance has claimed the name since. So during a reload the old
//! instance finishing late can never mark its successor down or take its
//! route away.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use bytes::Bytes;
use tokio::sync::mpsc;

use crate::sync::lock;

/// A role instance's number, unique for the daemon's life; a replacement
/// always has a higher one than the instance it replaces.
pub type Generation = u64;

/// A new, never used [`Generation`].
pub fn next_generation() -> Generation {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// One role's health as an instance reported it.
#[derive(Debug, Clone)]
struct HealthEntry {
    generation: Generation,
    up: bool,
    why: String,
}

/// One role's `pyipcd.send` destination.
#[derive(Debug, Clone)]
struct RouteEntry {
    generation: Generation,
    sender: mpsc::Sender<Bytes>,
}

/// The tables. One per daemon ([`registry`]); tests make their own.
#[derive(Debug, Default)]
pub struct Registry {
    health: Mutex<BTreeMap<String, HealthEntry>>,
    routes: Mutex<BTreeMap<String, RouteEntry>>,
    notes: Mutex<Vec<String>>,
}

/// The process-wide registry.
pub fn registry() -> &'static Arc<Registry> {
    static REGISTRY: OnceLock<Arc<Registry>> = OnceLock::new();
    REGISTRY.get_or_init(Arc::default)
}

impl Registry {
    /// Claims the health entry of `role` for instance `generation`, initially
    /// `up` (or down, with `why`). Replaces whatever an older instance set.
    pub fn claim(
        self: &Arc<Self>,
        role: &str,
        generation: Generation,
        up: bool,
        why: &str,
    ) -> HealthLatch {
        lock(&self.health).insert(
            role.to_string(),
            HealthEntry {
                generation,
                up,
                why: why.to_string(),
            },
        );
        HealthLatch(Arc::new(Latch {
            registry: self.clone(),
            role: role.to_string(),
            generation,
        }))
    }

    /// Claims the entry of `role` for `generation` as the instance before it
    /// left it (a client taking over from a connected one stays up), or
    /// down with `why` when there was none or it was down.
    pub fn claim_like_predecessor(
        self: &Arc<Self>,
        role: &str,
        generation: Generation,
        why: &str,
    ) -> HealthLatch {
        let up = lock(&self.health).get(role).is_some_and(|e| e.up);
        self.claim(role, generation, up, if up { "" } else { why })
    }

    /// Roles that are down, with the reason their instance gave.
    pub fn down(&self) -> Vec<(String, String)> {
        lock(&self.health)
            .iter()
            .filter(|(_, e)| !e.up)
            .map(|(name, e)| (name.clone(), e.why.clone()))
            .collect()
    }

    /// Every role with an entry: whether it is up.
    pub fn roles(&self) -> Vec<(String, bool)> {
        lock(&self.health)
            .iter()
            .map(|(name, e)| (name.clone(), e.up))
            .collect()
    }

    /// Whether `role` has an entry and it is up.
    #[cfg(test)]
    fn is_up(&self, role: &str) -> Option<bool> {
        lock(&self.health).get(role).map(|e| e.up)
    }

    /// Makes `pyipcd.send(role, …)` deliver to `sender` until the guard is
    /// dropped or a newer instance registers the same name.
    pub fn route(
        self: &Arc<Self>,
        role: &str,
        generation: Generation,
        sender: mpsc::Sender<Bytes>,
    ) -> RouteGuard {
        lock(&self.routes).insert(role.to_string(), RouteEntry { generation, sender });
        RouteGuard {
            registry: self.clone(),
            role: role.to_string(),
            generation,
        }
    }

    /// Where `pyipcd.send(role, …)` goes now.
    ///
    /// # Errors
    /// The names that do accept `pyipcd.send`, when `role` is not one.
    pub fn sender(&self, role: &str) -> Result<mpsc::Sender<Bytes>, Vec<String>> {
        let routes = lock(&self.routes);
        routes
            .get(role)
            .map(|r| r.sender.clone())
            .ok_or_else(|| routes.keys().cloned().collect())
    }

    /// The route of `role` if an instance other than `generation` owns it
    /// (an instance being retired hands its unsent messages to its successor).
    pub fn successor(&self, role: &str, generation: Generation) -> Option<mpsc::Sender<Bytes>> {
        lock(&self.routes)
            .get(role)
            .filter(|r| r.generation != generation)
            .map(|r| r.sender.clone())
    }

    /// Replaces the notes shown beside the health (the last reload's problems).
    pub fn set_notes(&self, notes: Vec<String>) {
        *lock(&self.notes) = notes;
    }

    /// The notes.
    pub fn notes(&self) -> Vec<String> {
        lock(&self.notes).clone()
    }
}

/// An instance's hold on its role's health entry. Clones share it; the entry
/// goes when the last clone drops, unless a newer instance claimed it first.
#[derive(Debug, Clone)]
pub struct HealthLatch(Arc<Latch>);

#[derive(Debug)]
struct Latch {
    registry: Arc<Registry>,
    role: String,
    generation: Generation,
}

impl HealthLatch {
    /// Marks the role up (if this instance still owns the entry).
    pub fn up(&self) {
        self.set(true, "");
    }

    /// Marks the role down, saying why (if this instance still owns the entry).
    pub fn down(&self, why: &str) {
        self.set(false, why);
    }

    fn set(&self, up: bool, why: &str) {
        let l = &self.0;
        if let Some(e) = lock(&l.registry.health).get_mut(&l.role)
            && e.generation == l.generation
        {
            e.up = up;
            e.why = why.to_string();
        }
    }

    /// The role's name.
    pub fn role(&self) -> &str {
        &self.0.role
    }
}

impl Drop for Latch {
    fn drop(&mut self) {
        let mut health = lock(&self.registry.health);
        if health
            .get(&self.role)
            .is_some_and(|e| e.generation == self.generation)
        {
            health.remove(&self.role);
        }
    }
}

/// An instance's hold on its role's `pyipcd.send` route (see [`Registry::route`]).
#[derive(Debug)]
pub struct RouteGuard {
    registry: Arc<Registry>,
    role: String,
    generation: Generation,
}

impl Drop for RouteGuard {
    fn drop(&mut self) {
        let mut routes = lock(&self.registry.routes);
        if routes
            .get(&self.role)
            .is_some_and(|r| r.generation == self.generation)
        {
            routes.remove(&self.role);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_old_instance_cannot_touch_its_successors_entry() {
        let r = Arc::new(Registry::default());
        let old = r.claim("a", 1, true, "");
        let new = r.claim("a", 2, false, "connecting");
        old.down("stopped");
        assert_eq!(r.down(), [("a".to_string(), "connecting".to_string())]);
        new.up();
        old.down("late");
        drop(old);
        assert_eq!(
            r.is_up("a"),
            Some(true),
            "the old latch's drop kept the entry"
        );
        drop(new);
        assert_eq!(r.is_up("a"), None, "the owner's drop removes it");
    }

    #[test]
    fn the_entry_lives_while_any_clone_does() {
        let r = Arc::new(Registry::default());
        let latch = r.claim("a", 1, true, "");
        let watcher = latch.clone();
        drop(latch);
        watcher.down("stuck");
        assert_eq!(r.down().len(), 1);
        drop(watcher);
        assert!(r.down().is_empty());
    }

    #[test]
    fn routes_follow_the_newest_instance() {
        let r = Arc::new(Registry::default());
        let (tx1, _rx1) = mpsc::channel(1);
        let (tx2, mut rx2) = mpsc::channel(1);
        let old = r.route("c", 1, tx1);
        assert!(r.successor("c", 1).is_none());
        let new = r.route("c", 2, tx2);
        r.successor("c", 1)
            .unwrap()
            .try_send(Bytes::from_static(b"x"))
            .unwrap();
        assert_eq!(rx2.try_recv().unwrap(), "x");
        drop(old);
        assert!(
            r.sender("c").is_ok(),
            "the old guard left the new route alone"
        );
        drop(new);
        assert_eq!(r.sender("c").unwrap_err(), Vec::<String>::new());
    }
}
