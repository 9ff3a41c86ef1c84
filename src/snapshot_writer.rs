//! The single writer: the one task that owns all control-plane state (route documents,
//! fabio tag routes, the instances of every routed service, which health watches run) and
//! turns what the Consul watches send it into published [`Snapshot`]s. Watches only send it
//! messages ([`WriterInbox`]); the proxy only reads what it publishes ([`State`]).
//!
//! It publishes a new snapshot (version + 1) only when the serving routes or the instances
//! of a routed service really changed, coalescing bursts of updates into one publish. Until
//! Consul answers it publishes nothing (not ready), unless a state file lets it warm-start;
//! only data Consul confirmed is written back to that file.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use crate::consul::{KvPair, WatchHandle, WatchStatus};
use crate::control::{Control, ControlView, DataSource, WarmStart};
use crate::discovery::watcher::{HealthWatcher, ServiceUpdate, SyncReport};
use crate::discovery::{Instance, OutOfService};
use crate::routing::fabio;
use crate::routing::kv::{RouteDocs, RouteRejection};
use crate::routing::Route;
use crate::shutdown::Shutdown;
use crate::state::{Snapshot, State};
use crate::state_file::{self, PersistedState};

/// How long a newly routed service may take to answer its first health query before its
/// routes go live without instances (and, at boot, before the first snapshot goes out anyway).
const SERVICE_GRACE: Duration = Duration::from_secs(5);
/// How long boot waits for Consul before warm-starting from the state file (an error
/// from Consul warm-starts at once).
const BOOT_WAIT: Duration = Duration::from_secs(3);
/// Interval of the "waiting for Consul" log line.
const WAITING_LOG_EVERY: Duration = Duration::from_secs(5);
/// Housekeeping tick of the writer (grace expiries, warm start, logs).
const TICK: Duration = Duration::from_millis(250);
/// Interval of the data-age gauges.
const GAUGE_EVERY: Duration = Duration::from_secs(1);
/// The state file is rewritten at most this often (bursts of changes coalesce).
const PERSIST_EVERY: Duration = Duration::from_millis(500);

/// Service tags as the `catalog/services` watch delivers them.
pub type ServiceTags = Arc<BTreeMap<String, Vec<String>>>;

/// Where the watches send what Consul answered: the sending side of the writer's channels.
pub struct WriterSenders {
    /// Complete listings of the route documents' KV prefix.
    pub routes: mpsc::UnboundedSender<Arc<Vec<KvPair>>>,
    /// The serving instances of one routed service.
    pub services: mpsc::UnboundedSender<ServiceUpdate>,
    /// Every service's tags (fabio routing only).
    pub tags: mpsc::UnboundedSender<ServiceTags>,
}

/// The receiving side of the writer's channels.
pub struct WriterInbox {
    routes: mpsc::UnboundedReceiver<Arc<Vec<KvPair>>>,
    services: mpsc::UnboundedReceiver<ServiceUpdate>,
    tags: mpsc::UnboundedReceiver<ServiceTags>,
}

/// The writer's channels: give the senders to the watches, the inbox to [`SnapshotWriter::run`].
pub fn channels() -> (WriterSenders, WriterInbox) {
    let (routes_tx, routes) = mpsc::unbounded_channel();
    let (services_tx, services) = mpsc::unbounded_channel();
    let (tags_tx, tags) = mpsc::unbounded_channel();
    (
        WriterSenders {
            routes: routes_tx,
            services: services_tx,
            tags: tags_tx,
        },
        WriterInbox {
            routes,
            services,
            tags,
        },
    )
}

/// The Consul watches behind the writer's messages, as far as the writer needs them: their
/// status (admin view, data-age gauges, the warm-start decision), and the health watches it
/// starts and stops as routes name services.
pub trait WriterWatches: Send + 'static {
    /// The watch on the route documents' KV prefix.
    fn routes(&self) -> &Arc<WatchStatus>;
    /// The `catalog/services` watch behind fabio tag routes, when enabled.
    fn tags(&self) -> Option<&Arc<WatchStatus>>;
    /// Runs one health watch per wanted service: starts the missing, stops the others.
    fn sync_health(&mut self, wanted: &BTreeSet<String>) -> SyncReport;
    /// Every running health watch, by service name.
    fn health(&self) -> Box<dyn Iterator<Item = (&str, &Arc<WatchStatus>)> + '_>;
    /// How many health watches run.
    fn health_count(&self) -> usize;
}

/// The real watches, started by the caller with the senders of [`channels`].
pub struct ConsulWatches {
    pub routes: WatchHandle,
    /// `Some` when fabio routing is enabled.
    pub tags: Option<WatchHandle>,
    pub health: HealthWatcher,
}

impl WriterWatches for ConsulWatches {
    fn routes(&self) -> &Arc<WatchStatus> {
        self.routes.status()
    }

    fn tags(&self) -> Option<&Arc<WatchStatus>> {
        self.tags.as_ref().map(WatchHandle::status)
    }

    fn sync_health(&mut self, wanted: &BTreeSet<String>) -> SyncReport {
        self.health.sync(wanted)
    }

    fn health(&self) -> Box<dyn Iterator<Item = (&str, &Arc<WatchStatus>)> + '_> {
        Box::new(self.health.statuses())
    }

    fn health_count(&self) -> usize {
        self.health.len()
    }
}

/// What the writer is told at start.
pub struct WriterSettings {
    /// Shown in logs and the admin view.
    pub consul_address: String,
    /// The KV prefix of the gateway (route documents live under `<prefix>routes/`).
    pub kv_prefix: String,
    /// Warm-start file: read at boot when Consul does not answer, rewritten after changes.
    pub state_file: Option<PathBuf>,
    /// Routes from fabio's `urlprefix-` tags (`[fabio] enabled`); the watches then have a
    /// tags watch.
    pub fabio: bool,
    /// `[rate_limit]` names a shared store: `rate_limit.scope = "cluster"` can be served.
    pub shared_limits: bool,
}

/// Writes the latest state to `path`, at most once per [`PERSIST_EVERY`].
async fn persist_loop(path: PathBuf, mut rx: watch::Receiver<Option<Arc<PersistedState>>>) {
    while rx.changed().await.is_ok() {
        let Some(state) = rx.borrow_and_update().clone() else {
            continue;
        };
        let p = path.clone();
        match tokio::task::spawn_blocking(move || state_file::write_atomic(&p, &state)).await {
            Ok(Ok(())) => tracing::debug!(path = %path.display(), "state file written"),
            Ok(Err(e)) => tracing::warn!(error = %e, "cannot write the state file"),
            Err(e) => tracing::warn!(error = %e, "state file writer failed"),
        }
        tokio::time::sleep(PERSIST_EVERY).await;
    }
}

/// The same route as far as serving goes (tag routes are recompiled on every catalog answer).
fn same_route(a: &Arc<Route>, b: &Arc<Route>) -> bool {
    Arc::ptr_eq(a, b) || (a.name == b.name && a.spec == b.spec)
}

/// Routes made from fabio's `urlprefix-` tags, from the `catalog/services` watch.
#[derive(Default)]
struct FabioRoutes {
    routes: Vec<Arc<Route>>,
    errors: Vec<fabio::TagError>,
    /// The tags of the services that carry `urlprefix-` tags (kept in the state file).
    tags: BTreeMap<String, Vec<String>>,
    /// Consul has answered the watch at least once (the first snapshot waits for it, so
    /// a gateway never goes ready without its tag routes).
    seen: bool,
}

/// The single writer: owns route documents, instances and watches; publishes snapshots.
pub struct SnapshotWriter {
    consul_address: String,
    state_file: Option<PathBuf>,
    state: Arc<State>,
    control: Arc<Control>,
    docs: RouteDocs,
    watches: Box<dyn WriterWatches>,
    /// Routes from `urlprefix-` tags (`[fabio] enabled`).
    fabio: Option<FabioRoutes>,
    /// Serving-capable instances of each routed service that has answered (or was loaded
    /// from the state file).
    services: BTreeMap<String, Arc<Vec<Instance>>>,
    /// Instances of each routed service that Consul lists but that may not serve.
    out_of_service: BTreeMap<String, Arc<Vec<OutOfService>>>,
    /// The same `Arc`s by service, the shape `Snapshot::build_shared` takes: a service
    /// whose `Arc` did not change since the last publish is reused without a look.
    build_input: HashMap<String, Arc<Vec<Instance>>>,
    /// When each routed service's watch started (for [`SERVICE_GRACE`]).
    wanted_since: HashMap<String, Instant>,
    /// Routes left out of the last snapshot because their service had not answered yet.
    held_back: BTreeSet<String>,
    /// The routes of the last published snapshot.
    last_routes: Vec<Arc<Route>>,
    /// `build_input` changed since the last published snapshot.
    instances_changed: bool,
    /// Consul has answered the route watch at least once.
    routes_seen: bool,
    warm: Option<WarmStart>,
    warm_tried: bool,
    published: bool,
    /// Routes or instances changed since the last publish.
    dirty: bool,
    /// Something the admin view shows changed.
    view_dirty: bool,
    persist: Option<watch::Sender<Option<Arc<PersistedState>>>>,
    first_snapshot: watch::Sender<bool>,
    last_waiting_log: Instant,
}

impl SnapshotWriter {
    /// A writer that publishes into `state` and `control`, and sends `true` to
    /// `first_snapshot` with its first publish.
    pub fn new(
        settings: WriterSettings,
        state: Arc<State>,
        control: Arc<Control>,
        watches: Box<dyn WriterWatches>,
        first_snapshot: watch::Sender<bool>,
    ) -> SnapshotWriter {
        SnapshotWriter {
            consul_address: settings.consul_address,
            state_file: settings.state_file,
            state,
            control,
            docs: RouteDocs::new(&settings.kv_prefix).with_shared_limits(settings.shared_limits),
            watches,
            fabio: settings.fabio.then(FabioRoutes::default),
            services: BTreeMap::new(),
            out_of_service: BTreeMap::new(),
            build_input: HashMap::new(),
            wanted_since: HashMap::new(),
            held_back: BTreeSet::new(),
            last_routes: Vec::new(),
            instances_changed: false,
            routes_seen: false,
            warm: None,
            warm_tried: false,
            published: false,
            dirty: false,
            view_dirty: true,
            persist: None,
            first_snapshot,
            last_waiting_log: Instant::now(),
        }
    }

    /// Runs until shutdown; with a state file, also writes it (and has written the last
    /// state handed to it when this returns).
    pub async fn run(mut self, mut inbox: WriterInbox, shutdown: Shutdown) {
        let persist_task = self.state_file.clone().map(|path| {
            let (tx, rx) = watch::channel(None);
            self.persist = Some(tx);
            tokio::spawn(persist_loop(path, rx))
        });
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut gauges = tokio::time::interval(GAUGE_EVERY);
        gauges.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            tokio::select! {
                _ = shutdown.wait() => break,
                Some(pairs) = inbox.routes.recv() => self.on_routes(&pairs),
                Some(update) = inbox.services.recv() => self.on_service(update),
                Some(services) = inbox.tags.recv() => self.on_tags(&services),
                _ = tick.tick() => self.on_tick(),
                _ = gauges.tick() => self.export_gauges(),
            }
            // Coalesce whatever else is already queued into the same publish.
            while let Ok(pairs) = inbox.routes.try_recv() {
                self.on_routes(&pairs);
            }
            while let Ok(update) = inbox.services.try_recv() {
                self.on_service(update);
            }
            self.settle();
        }
        drop(self.persist.take());
        if let Some(task) = persist_task {
            if let Err(e) = task.await {
                tracing::warn!(error = %e, "state file writer failed");
            }
        }
        tracing::debug!("snapshot writer stopped");
    }

    fn on_routes(&mut self, pairs: &[KvPair]) {
        let applied = self.docs.apply(pairs);
        if !self.routes_seen {
            self.routes_seen = true;
            self.dirty = true;
            self.view_dirty = true;
            tracing::info!(keys = pairs.len(), "route documents read from consul");
        }
        if applied.routes_changed {
            self.dirty = true;
        }
        if applied.rejections_changed {
            self.view_dirty = true;
        }
        self.sync_watches();
    }

    fn on_tags(&mut self, services: &BTreeMap<String, Vec<String>>) {
        let Some(fabio) = self.fabio.as_mut() else {
            return;
        };
        if !fabio.seen {
            fabio.seen = true;
            self.dirty = true;
            tracing::info!(services = services.len(), "service tags read from consul");
        }
        fabio.tags = fabio::tagged_services(services);
        self.apply_tags();
    }

    /// Rebuilds the tag routes from the current tags; publishes when they changed.
    fn apply_tags(&mut self) {
        let Some(fabio) = self.fabio.as_mut() else {
            return;
        };
        let (routes, errors) = fabio::compile(&fabio.tags);
        let same = routes.len() == fabio.routes.len()
            && routes
                .iter()
                .zip(&fabio.routes)
                .all(|(a, b)| a.name == b.name && a.spec == b.spec);
        if errors != fabio.errors {
            for e in &errors {
                tracing::warn!(service = %e.service, tag = %e.tag, error = %e.message,
                    "fabio tag ignored");
            }
            fabio.errors = errors;
            self.view_dirty = true;
        }
        if !same {
            tracing::info!(routes = routes.len(), "fabio tag routes changed");
            fabio.routes = routes;
            self.dirty = true;
            self.view_dirty = true;
            self.sync_watches();
        }
    }

    /// KV routes, plus tag routes that no KV route shadows (same host and prefix).
    fn all_routes(&self) -> Vec<Arc<Route>> {
        let mut routes = self.docs.routes();
        if let Some(fabio) = &self.fabio {
            let tagged = fabio::without_kv_conflicts(routes.iter().map(|r| &**r), &fabio.routes);
            routes.extend(tagged);
        }
        routes
    }

    /// Rejected KV documents and, with fabio routing, tags that make no valid route.
    fn rejections(&self) -> Vec<RouteRejection> {
        let mut rejected = self.docs.rejections();
        if let Some(fabio) = &self.fabio {
            rejected.extend(fabio.errors.iter().map(|e| RouteRejection {
                name: format!("{}{}", fabio::NAME_PREFIX, e.service),
                key: format!("tag `{}` on service {}", e.tag, e.service),
                error: e.message.clone(),
                modify_index: 0,
                serving_last_good: false,
                last_good_modify_index: None,
            }));
        }
        rejected
    }

    fn on_service(&mut self, update: ServiceUpdate) {
        // A late answer from a watch stopped meanwhile.
        if !self.wanted_since.contains_key(&update.service) {
            return;
        }
        let out = &update.out_of_service;
        if self.out_of_service.get(&update.service) != Some(out) {
            if out.is_empty() {
                self.out_of_service.remove(&update.service);
            } else {
                self.out_of_service
                    .insert(update.service.clone(), out.clone());
            }
            self.view_dirty = true;
        }
        if self
            .services
            .get(&update.service)
            .is_some_and(|have| have == &update.instances)
        {
            return;
        }
        tracing::debug!(service = %update.service, instances = update.instances.len(),
            "instances changed");
        self.build_input
            .insert(update.service.clone(), update.instances.clone());
        self.services.insert(update.service, update.instances);
        self.instances_changed = true;
        self.dirty = true;
    }

    /// One health watch per service some route names.
    fn sync_watches(&mut self) {
        let wanted: BTreeSet<String> = self
            .all_routes()
            .iter()
            .flat_map(|r| r.watched_services().collect::<Vec<_>>())
            .collect();
        let report = self.watches.sync_health(&wanted);
        let now = Instant::now();
        for s in &report.started {
            self.wanted_since.insert(s.clone(), now);
        }
        for s in &report.stopped {
            self.wanted_since.remove(s);
            self.services.remove(s);
            self.out_of_service.remove(s);
            self.build_input.remove(s);
            self.instances_changed = true;
            self.dirty = true;
        }
        if !report.started.is_empty() || !report.stopped.is_empty() {
            tracing::debug!(started = ?report.started, stopped = ?report.stopped,
                watches = self.watches.health_count(), "health watches changed");
            self.view_dirty = true;
        }
    }

    fn on_tick(&mut self) {
        if self.published {
            // A held-back route whose service's grace ran out goes live without instances.
            if !self.held_back.is_empty() && self.effective_routes().1 != self.held_back {
                self.dirty = true;
            }
            return;
        }
        if !self.routes_seen && !self.warm_tried {
            self.maybe_warm_start();
        }
        if self.last_waiting_log.elapsed() >= WAITING_LOG_EVERY {
            self.last_waiting_log = Instant::now();
            let status = self.watches.routes();
            if !self.routes_seen {
                tracing::warn!(consul = %self.consul_address,
                    error = status.last_error().as_deref().unwrap_or("no answer yet"),
                    "waiting for consul; not ready");
            } else if self.fabio.as_ref().is_some_and(|f| !f.seen) {
                let error = self.watches.tags().and_then(|s| s.last_error());
                tracing::warn!(consul = %self.consul_address,
                    error = error.as_deref().unwrap_or("no answer yet"),
                    "waiting for consul's service tags (fabio); not ready");
            } else {
                let waiting: Vec<&String> = self
                    .wanted_since
                    .keys()
                    .filter(|s| !self.services.contains_key(*s))
                    .take(10)
                    .collect();
                tracing::warn!(
                    ?waiting,
                    "waiting for the health of routed services; not ready"
                );
            }
        }
        self.dirty |= self.routes_seen;
    }

    fn maybe_warm_start(&mut self) {
        let Some(path) = self.state_file.clone() else {
            return;
        };
        let status = self.watches.routes().clone();
        if status.errors_total() == 0 && status.since_start() < BOOT_WAIT {
            return;
        }
        self.warm_tried = true;
        let loaded = match state_file::load(&path) {
            Ok(Some(s)) => s,
            Ok(None) => {
                tracing::info!(path = %path.display(), "no state file yet; waiting for consul");
                return;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot warm-start; waiting for consul");
                return;
            }
        };
        for (name, e) in self.docs.seed(&loaded.routes) {
            tracing::warn!(route = %name, error = %e, "state file route no longer valid; skipped");
        }
        if let Some(fabio) = self.fabio.as_mut() {
            fabio.tags = loaded.fabio_tags.clone();
            self.apply_tags();
        }
        let age_ms = state_file::unix_ms().saturating_sub(loaded.written_at_unix_ms);
        self.sync_watches();
        for (service, instances) in loaded.services {
            if self.wanted_since.contains_key(&service) {
                self.build_input.insert(service.clone(), instances.clone());
                self.services.insert(service, instances);
            }
        }
        tracing::warn!(path = %path.display(), routes = loaded.routes.len(),
            age_s = age_ms / 1000, consul = %self.consul_address,
            error = status.last_error().as_deref().unwrap_or("no answer"),
            "consul unreachable at boot; serving the last known state from the state file");
        self.warm = Some(WarmStart {
            path,
            written_at_unix_ms: loaded.written_at_unix_ms,
            age_at_boot: Duration::from_millis(age_ms),
        });
        self.dirty = true;
        self.view_dirty = true;
    }

    /// At boot: is there enough to publish a first snapshot?
    fn first_snapshot_due(&self) -> bool {
        if self.warm.is_some() {
            return true;
        }
        if !self.routes_seen || self.fabio.as_ref().is_some_and(|f| !f.seen) {
            return false;
        }
        let now = Instant::now();
        self.wanted_since.iter().all(|(s, since)| {
            self.services.contains_key(s) || now.duration_since(*since) >= SERVICE_GRACE
        })
    }

    /// The routes to serve, and the names of those held back because their service is
    /// new and has not answered yet (within its grace).
    fn effective_routes(&self) -> (Vec<Arc<Route>>, BTreeSet<String>) {
        let now = Instant::now();
        let mut held = BTreeSet::new();
        let routes = self
            .all_routes()
            .into_iter()
            .filter(|r| {
                let pending = r.backend_watch_keys().any(|s| {
                    !self.services.contains_key(&s)
                        && self
                            .wanted_since
                            .get(&s)
                            .is_some_and(|t| now.duration_since(*t) < SERVICE_GRACE)
                });
                if pending && self.published {
                    held.insert(r.name.clone());
                }
                !(pending && self.published)
            })
            .collect();
        (routes, held)
    }

    fn settle(&mut self) {
        if self.dirty && (self.published || self.first_snapshot_due()) {
            self.publish();
        }
        if self.view_dirty {
            self.view_dirty = false;
            self.control.set_view(ControlView {
                consul_address: self.consul_address.clone(),
                source: if !self.published {
                    DataSource::None
                } else if self.routes_seen {
                    DataSource::Consul
                } else {
                    DataSource::StateFile
                },
                rejected: self.rejections(),
                routes_watch: Some(self.watches.routes().clone()),
                tags_watch: self.watches.tags().cloned(),
                health_watches: self
                    .watches
                    .health()
                    .map(|(k, s)| (k.to_string(), s.clone()))
                    .collect(),
                services: self.services.clone(),
                out_of_service: self.out_of_service.clone(),
                warm_start: self.warm.clone(),
            });
        }
    }

    fn publish(&mut self) {
        let started = std::time::Instant::now();
        self.dirty = false;
        self.view_dirty = true;
        let (routes, held) = self.effective_routes();
        if held != self.held_back && !held.is_empty() {
            tracing::debug!(?held, "routes held back until their service answers");
        }
        self.held_back = held;
        // E.g. a new route held back until its service answers: nothing serves differently.
        let unchanged = self.published
            && !self.instances_changed
            && routes.len() == self.last_routes.len()
            && routes
                .iter()
                .zip(&self.last_routes)
                .all(|(a, b)| same_route(a, b));
        if !unchanged {
            self.instances_changed = false;
            self.last_routes = routes.clone();
            self.publish_snapshot(routes, started);
        }
        self.persist();
    }

    fn publish_snapshot(&mut self, routes: Vec<Arc<Route>>, started: std::time::Instant) {
        let previous = self.state.load();
        let version = previous.version + 1;
        let t_build = std::time::Instant::now();
        let snapshot = Snapshot::build_shared(version, routes, &self.build_input, Some(&previous));
        let build_us = t_build.elapsed().as_micros() as u64;
        if snapshot.table.conflicts() != previous.table.conflicts() {
            for c in snapshot.table.conflicts() {
                tracing::warn!(route = %c.route, shadowed_by = %c.shadowed_by,
                    "route conflicts with another; the one whose name sorts first wins");
            }
        }
        let routes_n = snapshot.table.len();
        let empty_sets = snapshot.upstreams.iter().filter(|u| u.is_empty()).count();
        self.state.publish(snapshot);
        self.control.published(version);
        metrics::counter!(crate::metrics::SNAPSHOTS).increment(1);
        metrics::gauge!(crate::metrics::ROUTES).set(routes_n as f64);
        if !self.published {
            self.published = true;
            tracing::info!(
                version,
                routes = routes_n,
                services = self.services.len(),
                "first snapshot published; ready"
            );
            let _ = self.first_snapshot.send(true);
        } else {
            tracing::debug!(
                version,
                routes = routes_n,
                empty_sets,
                build_us,
                total_us = started.elapsed().as_micros() as u64,
                "snapshot published"
            );
        }
    }

    /// Hands the state to the state-file writer; only data Consul confirmed goes there.
    fn persist(&self) {
        if let (Some(tx), true) = (&self.persist, self.routes_seen) {
            let mut persisted =
                PersistedState::new(self.docs.good_documents(), self.services.clone());
            if let Some(fabio) = self.fabio.as_ref().filter(|f| f.seen) {
                persisted = persisted.with_fabio_tags(fabio.tags.clone());
            }
            let _ = tx.send(Some(Arc::new(persisted)));
        }
    }

    fn export_gauges(&self) {
        let age = |s: &WatchStatus| {
            s.data_age()
                .unwrap_or_else(|| s.since_start())
                .as_secs_f64()
        };
        let routes = self.watches.routes();
        metrics::gauge!(crate::metrics::DATA_AGE, "watch" => routes.name().to_string())
            .set(age(routes));
        for (_, s) in self.watches.health() {
            metrics::gauge!(crate::metrics::DATA_AGE, "watch" => s.name().to_string()).set(age(s));
        }
        if let Some(s) = self.watches.tags() {
            metrics::gauge!(crate::metrics::DATA_AGE, "watch" => s.name().to_string()).set(age(s));
        }
    }
}

#[cfg(test)]
mod tests;
