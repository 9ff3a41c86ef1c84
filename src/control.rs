//! What the control plane knows beyond the snapshot: how fresh each Consul watch is, which
//! route documents were rejected, the instances of every watched service, and whether the
//! gateway is ready. Written by the single writer (`snapshot_writer`), read by `admin` (and by anyone
//! who needs the readiness policy). Nothing here is on the request path.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use serde::Serialize;
use tokio::time::Instant;

use crate::consul::WatchStatus;
use crate::discovery::{Instance, OutOfService};
use crate::routing::kv::RouteRejection;

/// Where the serving state came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DataSource {
    /// Nothing published yet.
    None,
    /// Read from Consul.
    Consul,
    /// Loaded from the state file because Consul could not be reached at boot.
    StateFile,
}

/// A warm start: the file read and how old its data was when it was written.
#[derive(Debug, Clone, Serialize)]
pub struct WarmStart {
    pub path: PathBuf,
    /// Unix time (ms) at which the file's data was last confirmed by Consul.
    pub written_at_unix_ms: u64,
    /// Age of the file's data at boot.
    #[serde(skip)]
    pub age_at_boot: Duration,
}

/// Everything but the snapshot that the admin API shows. Replaced whole on change.
#[derive(Debug)]
pub struct ControlView {
    pub consul_address: String,
    pub source: DataSource,
    pub rejected: Vec<RouteRejection>,
    pub routes_watch: Option<Arc<WatchStatus>>,
    /// The `catalog/services` watch behind fabio tag routes (`[fabio] enabled`).
    pub tags_watch: Option<Arc<WatchStatus>>,
    /// One health watch per routed service.
    pub health_watches: BTreeMap<String, Arc<WatchStatus>>,
    /// Serving-capable (passing or warning) instances of each routed service, as Consul
    /// last reported them; routes then filter by their health policy and tags.
    pub services: BTreeMap<String, Arc<Vec<Instance>>>,
    /// Instances Consul lists that may not serve (critical, maintenance), by service.
    pub out_of_service: BTreeMap<String, Arc<Vec<OutOfService>>>,
    pub warm_start: Option<WarmStart>,
}

impl ControlView {
    pub fn empty(consul_address: &str) -> ControlView {
        ControlView {
            consul_address: consul_address.to_string(),
            source: DataSource::None,
            rejected: Vec::new(),
            routes_watch: None,
            tags_watch: None,
            health_watches: BTreeMap::new(),
            services: BTreeMap::new(),
            out_of_service: BTreeMap::new(),
            warm_start: None,
        }
    }
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The verdict of the readiness policy.
#[derive(Debug, Clone, Serialize)]
pub struct Readiness {
    pub ready: bool,
    pub reason: String,
    pub snapshot_version: u64,
    /// Age of the stalest Consul data behind the snapshot, seconds.
    pub data_age_s: Option<f64>,
}

/// Shared control-plane state. Cheap to read from any thread.
#[derive(Debug)]
pub struct Control {
    started: Instant,
    max_data_age: Option<Duration>,
    /// Version of the first published snapshot (0 = none yet).
    first_version: AtomicU64,
    /// Unix time (ms) of the last publish, and the version it published.
    last_publish_unix_ms: AtomicU64,
    last_version: AtomicU64,
    view: ArcSwap<ControlView>,
}

impl Control {
    /// `max_data_age`: not ready while data is older (`None` = age never matters).
    pub fn new(consul_address: &str, max_data_age: Option<Duration>) -> Control {
        Control {
            started: Instant::now(),
            max_data_age,
            first_version: AtomicU64::new(0),
            last_publish_unix_ms: AtomicU64::new(0),
            last_version: AtomicU64::new(0),
            view: ArcSwap::from_pointee(ControlView::empty(consul_address)),
        }
    }

    pub fn view(&self) -> Arc<ControlView> {
        self.view.load_full()
    }

    pub fn set_view(&self, view: ControlView) {
        self.view.store(Arc::new(view));
    }

    /// Called by the writer after each publish.
    pub fn published(&self, version: u64) {
        let _ =
            self.first_version
                .compare_exchange(0, version, Ordering::AcqRel, Ordering::Relaxed);
        self.last_publish_unix_ms
            .store(unix_ms(), Ordering::Relaxed);
        self.last_version.store(version, Ordering::Relaxed);
    }

    /// The last published snapshot's version and when (unix ms) it was published.
    pub fn last_publish(&self) -> Option<(u64, u64)> {
        let at = self.last_publish_unix_ms.load(Ordering::Relaxed);
        (at != 0).then(|| (self.last_version.load(Ordering::Relaxed), at))
    }

    pub fn has_snapshot(&self) -> bool {
        self.first_version.load(Ordering::Acquire) != 0
    }

    /// Age of the stalest data behind the current state: the oldest last answer among the
    /// watches. A watch that never answered counts from the warm-start data's age, else from
    /// its own start.
    pub fn data_age(&self) -> Option<Duration> {
        let view = self.view();
        let warm_base = view
            .warm_start
            .as_ref()
            .map(|w| w.age_at_boot + self.started.elapsed());
        let age = |s: &WatchStatus| {
            s.data_age()
                .unwrap_or_else(|| warm_base.unwrap_or_else(|| s.since_start()))
        };
        view.routes_watch
            .iter()
            .chain(view.tags_watch.iter())
            .chain(view.health_watches.values())
            .map(|s| age(s))
            .max()
    }

    /// Ready once a first snapshot is published, and (when configured) while the data
    /// behind it is younger than `readiness.max_data_age_s`.
    pub fn readiness(&self, snapshot_version: u64) -> Readiness {
        let age = self.data_age();
        let data_age_s = age.map(|a| a.as_secs_f64());
        if !self.has_snapshot() {
            let view = self.view();
            let why = view
                .routes_watch
                .as_ref()
                .and_then(|s| s.last_error())
                .map(|e| format!(": {e}"))
                .unwrap_or_default();
            return Readiness {
                ready: false,
                reason: format!(
                    "waiting for the first snapshot from consul at {}{why}",
                    view.consul_address
                ),
                snapshot_version,
                data_age_s,
            };
        }
        if let (Some(max), Some(age)) = (self.max_data_age, age) {
            if age > max {
                return Readiness {
                    ready: false,
                    reason: format!(
                        "consul data is {:.0}s old (readiness.max_data_age_s = {})",
                        age.as_secs_f64(),
                        max.as_secs()
                    ),
                    snapshot_version,
                    data_age_s,
                };
            }
        }
        Readiness {
            ready: true,
            reason: "serving".into(),
            snapshot_version,
            data_age_s,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn not_ready_before_the_first_snapshot_then_ready() {
        let c = Control::new("http://127.0.0.1:8500", None);
        let r = c.readiness(0);
        assert!(!r.ready);
        assert!(r.reason.contains("127.0.0.1:8500"), "{}", r.reason);
        c.published(1);
        assert!(c.readiness(1).ready);
    }

    #[test]
    fn stale_data_makes_the_gateway_unready_when_a_limit_is_set() {
        let c = Control::new("http://c", Some(Duration::from_secs(30)));
        let mut view = ControlView::empty("http://c");
        view.routes_watch = Some(Arc::new(WatchStatus::new("routes")));
        view.warm_start = Some(WarmStart {
            path: "/tmp/s.json".into(),
            written_at_unix_ms: 0,
            age_at_boot: Duration::from_secs(60),
        });
        c.set_view(view);
        c.published(1);
        let r = c.readiness(1);
        assert!(!r.ready, "{r:?}");
        assert!(r.reason.contains("max_data_age_s"), "{}", r.reason);
        assert!(r.data_age_s.unwrap() >= 60.0);
    }

    #[test]
    fn the_tag_watch_counts_toward_the_data_age() {
        let c = Control::new("http://c", None);
        let tags = Arc::new(WatchStatus::new("catalog:services"));
        std::thread::sleep(Duration::from_millis(100));
        let routes = Arc::new(WatchStatus::new("routes"));
        let mut view = ControlView::empty("http://c");
        view.routes_watch = Some(routes.clone());
        c.set_view(view);
        let without = c.data_age().unwrap();

        let mut view = ControlView::empty("http://c");
        view.routes_watch = Some(routes);
        view.tags_watch = Some(tags);
        c.set_view(view);
        let with = c.data_age().unwrap();
        assert!(with >= Duration::from_millis(100), "{with:?}");
        assert!(with > without, "the older tag watch is the stalest");
    }
}
