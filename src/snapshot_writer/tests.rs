//! The writer driven through its channels, as the watches drive it, on paused time: grace
//! periods and boot waits pass without waiting, and no test touches the network.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::*;
use crate::control::DataSource;
use crate::discovery::watcher::sync_running;
use crate::discovery::InstanceHealth;

/// Stands in for the Consul watches: statuses that never fail, health watches that only
/// remember which services they were asked for.
struct FakeWatches {
    routes: Arc<WatchStatus>,
    tags: Option<Arc<WatchStatus>>,
    health: BTreeMap<String, Arc<WatchStatus>>,
}

impl WriterWatches for FakeWatches {
    fn routes(&self) -> &Arc<WatchStatus> {
        &self.routes
    }

    fn tags(&self) -> Option<&Arc<WatchStatus>> {
        self.tags.as_ref()
    }

    fn sync_health(&mut self, wanted: &BTreeSet<String>) -> SyncReport {
        sync_running(&mut self.health, wanted, |service| {
            Arc::new(WatchStatus::new(format!("health:{service}")))
        })
    }

    fn health(&self) -> Box<dyn Iterator<Item = (&str, &Arc<WatchStatus>)> + '_> {
        Box::new(self.health.iter().map(|(k, s)| (k.as_str(), s)))
    }

    fn health_count(&self) -> usize {
        self.health.len()
    }
}

const USERS: &str = r#"{"service":"users","path_prefix":"/users"}"#;
const PEOPLE: &str = r#"{"service":"users","path_prefix":"/people"}"#;
const ORDERS: &str = r#"{"service":"orders","path_prefix":"/orders"}"#;
const BROKEN: &str = r#"{"service":"users","path_prefix":"#;

/// A running writer and the ends of its channels a test holds.
struct Harness {
    senders: WriterSenders,
    state: Arc<State>,
    control: Arc<Control>,
    first_snapshot: watch::Receiver<bool>,
    shutdown: Shutdown,
    task: JoinHandle<()>,
}

impl Harness {
    fn start(fabio: bool, state_file: Option<PathBuf>) -> Harness {
        let (senders, inbox) = channels();
        let state = Arc::new(State::default());
        let control = Arc::new(Control::new("127.0.0.1:8500", None));
        let (first_tx, first_snapshot) = watch::channel(false);
        let watches = FakeWatches {
            routes: Arc::new(WatchStatus::new("routes")),
            tags: fabio.then(|| Arc::new(WatchStatus::new("catalog:services"))),
            health: BTreeMap::new(),
        };
        let writer = SnapshotWriter::new(
            WriterSettings {
                consul_address: "127.0.0.1:8500".into(),
                kv_prefix: "sy/".into(),
                state_file,
                fabio,
                shared_limits: false,
            },
            state.clone(),
            control.clone(),
            Box::new(watches),
            first_tx,
        );
        let shutdown = Shutdown::new();
        let task = tokio::spawn(writer.run(inbox, shutdown.clone()));
        Harness {
            senders,
            state,
            control,
            first_snapshot,
            shutdown,
            task,
        }
    }

    /// The KV watch delivers a complete listing of `sy/routes/`: (name, document, index).
    fn routes(&self, docs: &[(&str, &str, u64)]) {
        let pairs = docs
            .iter()
            .map(|(name, doc, index)| KvPair {
                key: format!("sy/routes/{name}"),
                value: Some(doc.as_bytes().to_vec()),
                flags: 0,
                create_index: 1,
                modify_index: *index,
                lock_index: 0,
                session: None,
            })
            .collect();
        self.senders.routes.send(Arc::new(pairs)).unwrap();
    }

    /// A health watch delivers the serving instances of `service`, one per port.
    fn instances(&self, service: &str, ports: &[u16]) {
        self.instances_of(
            service,
            ports.iter().map(|p| instance(service, *p)).collect(),
        );
    }

    fn instances_of(&self, service: &str, instances: Vec<Instance>) {
        self.senders
            .services
            .send(ServiceUpdate {
                service: service.into(),
                instances: Arc::new(instances),
                out_of_service: Arc::default(),
            })
            .unwrap();
    }

    /// The catalog watch delivers every service's tags.
    fn tags(&self, services: &[(&str, &[&str])]) {
        let tags = services
            .iter()
            .map(|(s, t)| (s.to_string(), t.iter().map(|t| t.to_string()).collect()))
            .collect();
        self.senders.tags.send(Arc::new(tags)).unwrap();
    }

    fn version(&self) -> u64 {
        self.state.load().version
    }

    /// Route name → number of instances in its upstream set, as the proxy would see them.
    fn serving(&self) -> BTreeMap<String, usize> {
        let snapshot = self.state.load();
        snapshot
            .table
            .routes()
            .iter()
            .zip(&snapshot.upstreams)
            .map(|(route, set)| (route.name.clone(), set.len()))
            .collect()
    }

    fn health_watches(&self) -> Vec<String> {
        self.control.view().health_watches.keys().cloned().collect()
    }

    async fn stop(self) {
        self.shutdown.trigger();
        self.task.await.unwrap();
    }
}

fn instance(service: &str, port: u16) -> Instance {
    Instance {
        id: format!("n1/{service}-{port}"),
        node: "n1".into(),
        service_id: format!("{service}-{port}"),
        address: "10.0.0.1".into(),
        port,
        tags: vec![],
        meta: BTreeMap::new(),
        health: InstanceHealth::Passing,
        weight: 1,
    }
}

/// Lets the writer handle everything queued (time stands still while it works). A health
/// answer is only taken from a watch the writer started, so a test lets the writer see a
/// route before it sends the health of the route's service, as Consul would.
async fn handled() {
    tokio::time::sleep(Duration::from_millis(1)).await;
}

/// A writer that has published version 1 with `users` (/users, two instances).
async fn serving_users() -> Harness {
    let h = Harness::start(false, None);
    h.routes(&[("users", USERS, 10)]);
    handled().await;
    h.instances("users", &[8001, 8002]);
    handled().await;
    assert_eq!(h.version(), 1);
    assert_eq!(h.serving(), BTreeMap::from([("users".into(), 2)]));
    h
}

#[tokio::test(start_paused = true)]
async fn nothing_is_published_until_consul_first_answers() {
    let h = Harness::start(false, None);
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert_eq!(h.version(), 0);
    assert!(!*h.first_snapshot.borrow());
    assert!(!h.control.has_snapshot());
    assert_eq!(h.control.view().source, DataSource::None);
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn the_first_snapshot_waits_for_the_health_of_every_routed_service() {
    let h = Harness::start(false, None);
    h.routes(&[("users", USERS, 10), ("orders", ORDERS, 11)]);
    handled().await;
    assert_eq!(h.health_watches(), ["orders", "users"]);
    h.instances("users", &[8001]);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(h.version(), 0, "orders has not answered yet");

    h.instances("orders", &[9001, 9002]);
    handled().await;
    assert_eq!(h.version(), 1);
    assert!(*h.first_snapshot.borrow());
    assert_eq!(
        h.serving(),
        BTreeMap::from([("orders".into(), 2), ("users".into(), 1)])
    );
    let view = h.control.view();
    assert_eq!(view.source, DataSource::Consul);
    assert_eq!(view.services["orders"].len(), 2);
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_service_that_never_answers_holds_the_first_snapshot_only_for_its_grace() {
    let h = Harness::start(false, None);
    h.routes(&[("users", USERS, 10)]);
    tokio::time::sleep(SERVICE_GRACE - Duration::from_secs(1)).await;
    assert_eq!(h.version(), 0);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(h.version(), 1);
    assert_eq!(h.serving(), BTreeMap::from([("users".into(), 0)]));
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn consul_answering_with_no_routes_is_a_first_snapshot() {
    let h = Harness::start(false, None);
    h.routes(&[]);
    handled().await;
    assert_eq!(h.version(), 1);
    assert!(h.serving().is_empty());
    assert_eq!(h.control.view().source, DataSource::Consul);
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn answers_that_change_nothing_publish_nothing() {
    let h = serving_users().await;
    // The same listing again, and the same instances in a new allocation.
    h.routes(&[("users", USERS, 10)]);
    h.instances("users", &[8001, 8002]);
    // A document rewritten with the same content under a new index.
    h.routes(&[("users", USERS, 12)]);
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert_eq!(h.version(), 1);
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_changed_instance_list_is_one_new_version() {
    let h = serving_users().await;
    h.instances("users", &[8001]);
    handled().await;
    assert_eq!(h.version(), 2);
    assert_eq!(h.serving(), BTreeMap::from([("users".into(), 1)]));
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_burst_of_changes_goes_out_as_one_snapshot() {
    let h = serving_users().await;
    h.instances("users", &[8001]);
    h.instances("users", &[8001, 8002, 8003]);
    h.routes(&[("users", USERS, 10), ("people", PEOPLE, 13)]);
    h.instances("users", &[8001, 8002, 8003, 8004]);
    handled().await;
    assert_eq!(h.version(), 2);
    assert_eq!(
        h.serving(),
        BTreeMap::from([("people".into(), 4), ("users".into(), 4)])
    );
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_rejected_route_document_keeps_its_last_good_version_serving() {
    let h = serving_users().await;
    h.routes(&[("users", BROKEN, 11)]);
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(h.version(), 1, "the serving routes did not change");
    let snapshot = h.state.load();
    assert_eq!(snapshot.table.routes()[0].path_prefix, "/users");
    let view = h.control.view();
    assert_eq!(view.rejected.len(), 1);
    let rejected = &view.rejected[0];
    assert_eq!(
        (rejected.name.as_str(), rejected.modify_index),
        ("users", 11)
    );
    assert!(rejected.serving_last_good);

    // Fixed: the new version serves and the rejection is gone.
    h.routes(&[("users", PEOPLE, 12)]);
    handled().await;
    assert_eq!(h.version(), 2);
    assert_eq!(h.state.load().table.routes()[0].path_prefix, "/people");
    assert!(h.control.view().rejected.is_empty());
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_service_no_longer_routed_is_dropped_with_its_watch() {
    let h = Harness::start(false, None);
    h.routes(&[("users", USERS, 10), ("orders", ORDERS, 11)]);
    handled().await;
    h.instances("users", &[8001]);
    h.instances("orders", &[9001]);
    handled().await;
    assert_eq!(h.version(), 1);

    h.routes(&[("users", USERS, 10)]);
    handled().await;
    assert_eq!(h.version(), 2);
    assert_eq!(h.serving(), BTreeMap::from([("users".into(), 1)]));
    assert_eq!(h.health_watches(), ["users"]);
    assert!(!h.state.load().instances.contains_key("orders"));
    assert!(!h.control.view().services.contains_key("orders"));

    // A late answer of the stopped watch changes nothing.
    h.instances("orders", &[9001, 9002]);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(h.version(), 2);
    assert!(!h.control.view().services.contains_key("orders"));
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_new_route_waits_for_its_service_then_goes_live() {
    let h = serving_users().await;
    h.routes(&[("users", USERS, 10), ("orders", ORDERS, 11)]);
    handled().await;
    assert_eq!(h.health_watches(), ["orders", "users"]);
    assert_eq!(h.version(), 1, "nothing serves differently yet");
    assert_eq!(h.serving(), BTreeMap::from([("users".into(), 2)]));

    h.instances("orders", &[9001]);
    handled().await;
    assert_eq!(h.version(), 2);
    assert_eq!(
        h.serving(),
        BTreeMap::from([("orders".into(), 1), ("users".into(), 2)])
    );
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_new_route_whose_service_stays_silent_goes_live_empty_after_its_grace() {
    let h = serving_users().await;
    h.routes(&[("users", USERS, 10), ("orders", ORDERS, 11)]);
    tokio::time::sleep(SERVICE_GRACE - Duration::from_secs(1)).await;
    assert!(!h.serving().contains_key("orders"));
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(h.version(), 2);
    assert_eq!(
        h.serving(),
        BTreeMap::from([("orders".into(), 0), ("users".into(), 2)])
    );
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn an_outage_keeps_the_last_snapshot_serving() {
    let h = serving_users().await;
    // The watches retry in silence: nothing arrives for ten minutes.
    tokio::time::sleep(Duration::from_secs(600)).await;
    assert_eq!(h.version(), 1);
    assert_eq!(h.serving(), BTreeMap::from([("users".into(), 2)]));
    assert_eq!(h.control.view().source, DataSource::Consul);
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn tag_routes_wait_for_the_catalog_and_kv_routes_shadow_them() {
    let h = Harness::start(true, None);
    h.routes(&[("users", USERS, 10)]);
    handled().await;
    h.instances("users", &[8001]);
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(h.version(), 0, "the catalog has not answered");

    h.tags(&[
        ("billing", &["urlprefix-/billing"]),
        ("legacy", &["urlprefix-/users"]),
        ("plain", &["v1"]),
    ]);
    handled().await;
    // A tag route serves the instances that carry its tag, as fabio does.
    let mut billing = instance("billing", 7001);
    billing.tags = vec!["urlprefix-/billing".into()];
    h.instances_of("billing", vec![billing, instance("billing", 7002)]);
    h.instances("legacy", &[6001]);
    handled().await;
    assert_eq!(h.version(), 1);
    assert_eq!(
        h.serving(),
        BTreeMap::from([("fabio:billing:/billing".into(), 1), ("users".into(), 1)])
    );
    assert_eq!(h.health_watches(), ["billing", "users"]);
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_warm_start_serves_the_state_file_until_consul_answers() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.json");
    let saved = PersistedState::new(
        BTreeMap::from([("users".to_string(), USERS.to_string())]),
        BTreeMap::from([("users".to_string(), Arc::new(vec![instance("users", 8001)]))]),
    );
    state_file::write_atomic(&path, &saved).unwrap();

    let h = Harness::start(false, Some(path.clone()));
    tokio::time::sleep(BOOT_WAIT - Duration::from_millis(500)).await;
    assert_eq!(h.version(), 0, "consul still has time to answer");
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(h.version(), 1);
    assert_eq!(h.serving(), BTreeMap::from([("users".into(), 1)]));
    let view = h.control.view();
    assert_eq!(view.source, DataSource::StateFile);
    assert_eq!(view.warm_start.as_ref().unwrap().path, path);
    // Nothing Consul did not confirm is written back.
    tokio::time::sleep(PERSIST_EVERY * 4).await;
    assert_eq!(state_file::load(&path).unwrap().unwrap(), saved);

    // Consul answers: `users` is gone, `orders` is new and waits for its service.
    h.routes(&[("orders", ORDERS, 20)]);
    handled().await;
    assert_eq!(h.version(), 2);
    assert!(h.serving().is_empty());
    assert_eq!(h.control.view().source, DataSource::Consul);
    h.instances("orders", &[9001]);
    handled().await;
    assert_eq!(h.version(), 3);
    assert_eq!(h.serving(), BTreeMap::from([("orders".into(), 1)]));
    h.stop().await;

    let written = state_file::load(&path).unwrap().unwrap();
    assert_eq!(
        written.routes,
        BTreeMap::from([("orders".to_string(), ORDERS.to_string())])
    );
    assert_eq!(
        written.services["orders"].as_slice(),
        [instance("orders", 9001)]
    );
}

#[tokio::test(start_paused = true)]
async fn without_a_state_file_boot_keeps_waiting_for_consul() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("missing.json");
    let h = Harness::start(false, Some(path.clone()));
    tokio::time::sleep(BOOT_WAIT * 10).await;
    assert_eq!(h.version(), 0);
    assert!(h.control.view().warm_start.is_none());
    h.stop().await;
    assert!(!path.exists());
}

#[tokio::test(start_paused = true)]
async fn what_consul_confirmed_is_in_the_state_file_when_the_writer_stops() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.json");
    let h = Harness::start(false, Some(path.clone()));
    h.routes(&[("users", USERS, 10), ("bad", BROKEN, 11)]);
    handled().await;
    h.instances("users", &[8001]);
    handled().await;
    h.instances("users", &[8001, 8002]);
    handled().await;
    assert_eq!(h.version(), 2);
    h.stop().await;

    let written = state_file::load(&path).unwrap().unwrap();
    assert_eq!(
        written.routes,
        BTreeMap::from([("users".to_string(), USERS.to_string())]),
        "a rejected document is not kept"
    );
    assert_eq!(written.services["users"].len(), 2);
}
