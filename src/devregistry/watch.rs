//! Wake-ups for blocked queries: one `Notify` per watched key, so a write wakes only the
//! queries whose result it can change, and thousands of idle watchers cost nothing.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use tokio::sync::futures::OwnedNotified;
use tokio::sync::Notify;

/// What a read depends on, and what a write touched.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum WatchKey {
    /// The nodes table (catalog/nodes).
    Nodes,
    /// The services table (catalog/services).
    Services,
    /// The checks table (health/state).
    Checks,
    /// Everything about one service name: its instances, their checks and nodes.
    Service(String),
    /// Any KV write (the index of a missing key or empty prefix is the KV table's).
    KvTable,
    /// One KV key. Writers touch keys; readers of a prefix use [`WatchKey::KvPrefix`].
    KvKey(String),
    /// Every key starting with this prefix (only ever subscribed, never touched directly).
    KvPrefix(String),
}

/// A wake-up a blocked query waits on; enabled at creation, so no write can slip between the
/// read and the wait.
pub type Wakeup = Pin<Box<OwnedNotified>>;

/// Subscriptions, guarded by the store's lock (writers notify while holding it).
#[derive(Default)]
pub struct Watchers {
    exact: HashMap<WatchKey, Arc<Notify>>,
    prefixes: BTreeMap<String, Arc<Notify>>,
    /// Woken by every write that rewrites history (snapshot restore) and by shutdown.
    all: Arc<Notify>,
    subscribed_since_sweep: usize,
}

fn enabled(n: &Arc<Notify>) -> Wakeup {
    let mut fut = Box::pin(n.clone().notified_owned());
    fut.as_mut().enable();
    fut
}

impl Watchers {
    /// Wake-ups for these keys plus the global one. Call with the store lock held.
    pub fn subscribe(&mut self, keys: &[WatchKey]) -> Vec<Wakeup> {
        self.subscribed_since_sweep += 1;
        if self.subscribed_since_sweep > 1024 {
            self.sweep();
        }
        let mut out = Vec::with_capacity(keys.len() + 1);
        out.push(enabled(&self.all));
        for key in keys {
            let n = match key {
                WatchKey::KvPrefix(p) => self.prefixes.entry(p.clone()).or_default(),
                k => self.exact.entry(k.clone()).or_default(),
            };
            out.push(enabled(n));
        }
        out
    }

    /// Wakes the subscribers of what a write touched. Call with the store lock held.
    pub fn notify(&mut self, touched: &[WatchKey]) {
        for key in touched {
            if let Some(n) = self.exact.get(key) {
                n.notify_waiters();
            }
            if let WatchKey::KvKey(k) = key {
                for (p, n) in self.prefixes.range::<String, _>(..=k.clone()) {
                    if k.starts_with(p.as_str()) {
                        n.notify_waiters();
                    }
                }
            }
        }
    }

    pub fn notify_all(&self) {
        self.all.notify_waiters();
    }

    /// Drops entries nobody waits on any more (the map holds the only reference).
    fn sweep(&mut self) {
        self.subscribed_since_sweep = 0;
        self.exact.retain(|_, n| Arc::strong_count(n) > 1);
        self.prefixes.retain(|_, n| Arc::strong_count(n) > 1);
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.exact.len() + self.prefixes.len()
    }
}

/// Resolves when any of the wake-ups fires.
pub async fn any(wakeups: Vec<Wakeup>) {
    if wakeups.is_empty() {
        return std::future::pending().await;
    }
    futures_util::future::select_all(
        wakeups
            .into_iter()
            .map(|w| w as Pin<Box<dyn Future<Output = ()> + Send>>),
    )
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn a_write_under_a_watched_prefix_wakes_the_prefix_watcher() {
        let mut w = Watchers::default();
        let wake = w.subscribe(&[WatchKey::KvPrefix("app/".into())]);
        w.notify(&[WatchKey::KvKey("app/web".into())]);
        tokio::time::timeout(Duration::from_secs(1), any(wake))
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn a_write_elsewhere_does_not_wake_the_prefix_watcher() {
        let mut w = Watchers::default();
        let wake = w.subscribe(&[WatchKey::KvPrefix("app/".into())]);
        w.notify(&[
            WatchKey::KvKey("apq".into()),
            WatchKey::Service("web".into()),
        ]);
        assert!(tokio::time::timeout(Duration::from_millis(50), any(wake))
            .await
            .is_err());
    }

    #[test]
    fn entries_without_waiters_are_swept() {
        let mut w = Watchers::default();
        drop(w.subscribe(&[WatchKey::Service("a".into())]));
        let _keep = w.subscribe(&[WatchKey::Service("b".into())]);
        w.sweep();
        assert_eq!(w.len(), 1);
    }
}
