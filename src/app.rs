//! Wiring: starts the Consul watches, the admin and proxy listeners, and the single writer
//! that turns route documents and health answers into published [`Snapshot`]s; shuts down
//! in order.
//!
//! The writer is one task that owns all control-plane state; watches only send it
//! messages. It publishes a new snapshot (version + 1) only when the serving routes or the
//! instances of a routed service really changed, coalescing bursts of updates into one
//! publish. Until Consul answers it publishes nothing (not ready), unless a state file lets
//! it warm-start.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::admin::{self, Admin};
use crate::auth::{AuthSettings, Authenticator};
use crate::config::Config;
use crate::consul::watch::{self as consul_watch, CatalogServices};
use crate::consul::{ClientSettings, ConsulClient, ConsulError, KvPair, WatchHandle, WatchOptions};
use crate::control::{Control, ControlView, DataSource, WarmStart};
use crate::discovery::watcher::{HealthWatcher, ServiceUpdate};
use crate::discovery::Instance;
use crate::policy::Edge;
use crate::proxy::{self, Gateway};
use crate::registration::{self, Registered};
use crate::routing::fabio;
use crate::routing::kv::{self, RouteDocs, RouteRejection};
use crate::routing::Route;
use crate::shutdown::Shutdown;
use crate::state::{Snapshot, State};
use crate::state_file::{self, PersistedState};
use crate::tls::Tls;
use crate::upstream_tls::UpstreamTls;

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
/// Time given to tasks to finish after shutdown.
const STOP_TIMEOUT: Duration = Duration::from_secs(35);

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("listener: {0}")]
    Listener(std::io::Error),
    #[error(transparent)]
    Consul(#[from] ConsulError),
    #[error(transparent)]
    Assertion(#[from] crate::assertion::AssertionError),
    #[error("auth: {0}")]
    Auth(String),
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    #[error(transparent)]
    UpstreamTls(#[from] crate::upstream_tls::UpstreamTlsError),
    #[error("the configuration has a [tls] section but no TLS listener was given")]
    MissingTlsListener,
}

/// The listeners the gateway serves on, bound by the caller (tests bind `127.0.0.1:0`).
pub struct Listeners {
    pub proxy: TcpListener,
    pub admin: TcpListener,
    /// HTTPS listener, served when the configuration has a `[tls]` section.
    pub tls: Option<TcpListener>,
    /// Plain listener that redirects everything to HTTPS (`tls.redirect_http_listen`).
    pub redirect: Option<TcpListener>,
}

impl Listeners {
    /// Plain proxy and admin listeners, no TLS.
    pub fn new(proxy: TcpListener, admin: TcpListener) -> Listeners {
        Listeners {
            proxy,
            admin,
            tls: None,
            redirect: None,
        }
    }
}

/// A started gateway.
pub struct AppHandle {
    state: Arc<State>,
    control: Arc<Control>,
    proxy_addr: SocketAddr,
    admin_addr: SocketAddr,
    shutdown: Shutdown,
    first_snapshot: watch::Receiver<bool>,
    tasks: Vec<JoinHandle<()>>,
    /// The gateway's own Consul registration (`[registration]`), undone first on shutdown.
    registration: Option<Registered>,
}

impl AppHandle {
    /// The snapshot holder the proxy reads.
    pub fn state(&self) -> &Arc<State> {
        &self.state
    }

    /// Watch freshness, rejected documents, instances, readiness.
    pub fn control(&self) -> &Arc<Control> {
        &self.control
    }

    /// The readiness policy's verdict right now (what `/ready` answers).
    pub fn ready(&self) -> bool {
        self.control.readiness(self.state.load().version).ready
    }

    pub fn proxy_addr(&self) -> SocketAddr {
        self.proxy_addr
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// The self-registration, when enabled.
    pub fn registration(&self) -> Option<&Registered> {
        self.registration.as_ref()
    }

    /// Waits up to `timeout` for the first snapshot; true when it is published.
    pub async fn first_snapshot(&self, timeout: Duration) -> bool {
        let mut rx = self.first_snapshot.clone();
        let result = tokio::time::timeout(timeout, rx.wait_for(|v| *v)).await;
        matches!(result, Ok(Ok(_)))
    }

    /// Trips shutdown and waits for every task to finish.
    pub async fn stop(self) {
        self.shutdown.trigger();
        self.wait().await;
    }

    /// Waits until shutdown has been triggered (by anyone) and every task has finished.
    pub async fn wait(self) {
        self.shutdown.wait().await;
        // Leave Consul before waiting for the watches and the drain.
        if let Some(registration) = self.registration {
            registration.deregister().await;
        }
        for task in self.tasks {
            match tokio::time::timeout(STOP_TIMEOUT, task).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) if e.is_cancelled() => {}
                Ok(Err(e)) => tracing::error!(error = %e, "a gateway task failed"),
                Err(_) => tracing::warn!("a gateway task did not stop in time"),
            }
        }
    }
}

/// The Consul client settings of a configuration (TLS paths fall back to the CLI's env).
pub fn client_settings(cfg: &Config) -> ClientSettings {
    let c = &cfg.file.consul;
    ClientSettings {
        address: cfg.consul_address.clone(),
        token: cfg.consul_token.clone(),
        datacenter: c.datacenter.clone(),
        stale: c.stale,
        wait: cfg.wait,
        ca_cert: c.ca_cert.clone(),
        client_cert: c.client_cert.clone(),
        client_key: c.client_key.clone(),
    }
    .with_tls_env()
}

/// Starts the gateway on the given listeners and returns once everything is running (not
/// once it is ready: see [`AppHandle::first_snapshot`] and [`AppHandle::ready`]).
pub async fn start(
    cfg: Config,
    listeners: Listeners,
    shutdown: Shutdown,
) -> Result<AppHandle, AppError> {
    // Installed before anything records, so every counter lands in `/metrics`.
    crate::metrics::handle();
    let client = ConsulClient::new(&client_settings(&cfg))?;
    let self_client = client.clone();
    let proxy_addr = listeners.proxy.local_addr().map_err(AppError::Listener)?;
    let admin_addr = listeners.admin.local_addr().map_err(AppError::Listener)?;
    let max_age = match cfg.file.readiness.max_data_age_s {
        0 => None,
        s => Some(Duration::from_secs(s)),
    };
    let state = Arc::new(State::default());
    let control = Arc::new(Control::new(client.address(), max_age));
    let (first_tx, first_rx) = watch::channel(false);
    let mut tasks = Vec::new();
    let edge = Arc::new(Edge::from_config(&cfg.file)?);
    tasks.push(edge.spawn_sweeper(shutdown.clone()));

    let options = WatchOptions::for_client(
        "routes",
        &client,
        Duration::from_secs(cfg.file.consul.max_backoff_s),
    );
    let auth = authenticator(&cfg, &client, &options, &shutdown, &mut tasks)?;

    let admin = Arc::new(Admin {
        state: state.clone(),
        control: control.clone(),
        token: cfg.file.admin.token.clone(),
        jwks: edge.jwks(),
        auth: Some(auth.clone()),
    });
    tasks.push(tokio::spawn(admin::serve(
        listeners.admin,
        admin,
        shutdown.clone(),
    )));

    let gateway = data_plane(&cfg, state.clone(), auth, edge)?;
    tasks.push(tokio::spawn(proxy::serve(
        listeners.proxy,
        gateway.clone(),
        shutdown.clone(),
    )));
    match (&cfg.file.tls, listeners.tls) {
        (Some(section), Some(listener)) => {
            let tls = Arc::new(Tls::load(section)?);
            tasks.push(tls.spawn_reloader(shutdown.clone()));
            let https_port = listener.local_addr().map_err(AppError::Listener)?.port();
            tasks.push(tokio::spawn(proxy::serve_tls(
                listener,
                gateway.clone(),
                tls,
                shutdown.clone(),
            )));
            if let Some(redirect) = listeners.redirect {
                tasks.push(tokio::spawn(crate::tls::serve_redirect(
                    redirect,
                    https_port,
                    shutdown.clone(),
                )));
            }
        }
        (Some(_), None) => return Err(AppError::MissingTlsListener),
        (None, _) => {}
    }

    let (kv_tx, kv_rx) = mpsc::unbounded_channel();
    let (svc_tx, svc_rx) = mpsc::unbounded_channel();
    let routes_watch = kv::watch(&client, &cfg.file.consul.kv_prefix, options.clone(), kv_tx);
    let (tags_tx, tags_rx) = mpsc::unbounded_channel();
    let fabio = cfg.file.fabio.enabled.then(|| FabioRoutes {
        watch: consul_watch::spawn(
            CatalogServices::new(&client),
            options.named("catalog:services"),
            move |services| {
                let _ = tags_tx.send(services);
            },
        ),
        routes: Vec::new(),
        errors: Vec::new(),
        tags: BTreeMap::new(),
        seen: false,
    });
    let persist = cfg.file.consul.state_file.clone().map(|path| {
        let (tx, rx) = watch::channel(None);
        tasks.push(tokio::spawn(persist_loop(path, rx)));
        tx
    });
    let writer = Writer {
        consul_address: client.address().to_string(),
        state_file: cfg.file.consul.state_file.clone(),
        state: state.clone(),
        control: control.clone(),
        docs: RouteDocs::new(&cfg.file.consul.kv_prefix),
        routes_watch,
        fabio,
        health: HealthWatcher::new(client, options, svc_tx),
        services: BTreeMap::new(),
        build_input: HashMap::new(),
        wanted_since: HashMap::new(),
        held_back: BTreeSet::new(),
        routes_seen: false,
        warm: None,
        warm_tried: false,
        published: false,
        dirty: false,
        view_dirty: true,
        persist,
        first_tx,
        last_waiting_log: Instant::now(),
    };
    tracing::info!(routes = %writer.docs.prefix(), consul = %writer.consul_address,
        %proxy_addr, %admin_addr, "switchyard starting");
    let registration = cfg.file.registration.enabled.then(|| {
        let me = registration::registration(&cfg.file.registration, proxy_addr, admin_addr);
        let recheck = Duration::from_secs(cfg.file.registration.check_interval_s.max(1));
        registration::spawn(self_client, me, recheck, shutdown.clone())
    });
    tasks.push(tokio::spawn(writer.run(
        kv_rx,
        svc_rx,
        tags_rx,
        shutdown.clone(),
    )));

    Ok(AppHandle {
        state,
        control,
        proxy_addr,
        admin_addr,
        shutdown,
        first_snapshot: first_rx,
        tasks,
        registration,
    })
}

/// `switchyard run`: binds the configured listeners, runs until SIGTERM/SIGINT.
pub async fn run_until_signal(cfg: Config) -> Result<(), AppError> {
    let listeners = bind_listeners(&cfg).await?;
    let shutdown = Shutdown::new();
    shutdown.trigger_on_signals();
    let handle = start(cfg, listeners, shutdown).await?;
    handle.wait().await;
    tracing::info!("switchyard stopped");
    Ok(())
}

/// Binds every listener the configuration names (proxy, admin, and TLS when configured).
pub async fn bind_listeners(cfg: &Config) -> Result<Listeners, AppError> {
    let mut listeners = Listeners::new(bind(cfg.listen).await?, bind(cfg.admin_listen).await?);
    if let Some(addr) = cfg.tls_listen {
        listeners.tls = Some(bind(addr).await?);
    }
    if let Some(addr) = cfg.redirect_listen {
        listeners.redirect = Some(bind(addr).await?);
    }
    Ok(listeners)
}

async fn bind(addr: SocketAddr) -> Result<TcpListener, AppError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| AppError::Bind { addr, source })
}

/// The authenticator: config-file providers, and KV watches on `jwt/` and `apikeys/` that
/// stop at shutdown.
fn authenticator(
    cfg: &Config,
    client: &ConsulClient,
    options: &WatchOptions,
    shutdown: &Shutdown,
    tasks: &mut Vec<JoinHandle<()>>,
) -> Result<Arc<Authenticator>, AppError> {
    let settings = AuthSettings::from_config(&cfg.file.auth).map_err(AppError::Auth)?;
    let auth = Authenticator::new(
        settings,
        &cfg.file.consul.kv_prefix,
        &cfg.file.jwt_providers,
    )
    .map_err(|e| AppError::Auth(e.to_string()))?;
    let auth = Arc::new(auth);
    let watches = auth.watch_kv(client, options);
    let until = shutdown.clone();
    tasks.push(tokio::spawn(async move {
        until.wait().await;
        drop(watches);
    }));
    Ok(auth)
}

/// Builds the request path: upstream clients and the gateway.
fn data_plane(
    cfg: &Config,
    state: Arc<State>,
    auth: Arc<Authenticator>,
    edge: Arc<Edge>,
) -> Result<Arc<Gateway>, AppError> {
    let upstream_tls = cfg
        .file
        .upstream_tls
        .as_ref()
        .map(UpstreamTls::load)
        .transpose()?;
    Ok(Arc::new(Gateway::new(
        state,
        auth,
        edge,
        upstream_tls,
        &cfg.file.proxy,
        cfg.file.log.access_log,
    )))
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

/// Routes made from fabio's `urlprefix-` tags, from a `catalog/services` watch.
struct FabioRoutes {
    watch: WatchHandle,
    routes: Vec<Arc<Route>>,
    errors: Vec<fabio::TagError>,
    /// The tags of the services that carry `urlprefix-` tags (kept in the state file).
    tags: BTreeMap<String, Vec<String>>,
    /// Consul has answered the watch at least once (the first snapshot waits for it, so
    /// a gateway never goes ready without its tag routes).
    seen: bool,
}

/// The single writer: owns route documents, instances and watches; publishes snapshots.
struct Writer {
    consul_address: String,
    state_file: Option<PathBuf>,
    state: Arc<State>,
    control: Arc<Control>,
    docs: RouteDocs,
    routes_watch: WatchHandle,
    /// Routes from `urlprefix-` tags (`[fabio] enabled`).
    fabio: Option<FabioRoutes>,
    health: HealthWatcher,
    /// Serving-capable instances of each routed service that has answered (or was loaded
    /// from the state file).
    services: BTreeMap<String, Arc<Vec<Instance>>>,
    /// The same `Arc`s by service, the shape `Snapshot::build_shared` takes: a service
    /// whose `Arc` did not change since the last publish is reused without a look.
    build_input: HashMap<String, Arc<Vec<Instance>>>,
    /// When each routed service's watch started (for [`SERVICE_GRACE`]).
    wanted_since: HashMap<String, Instant>,
    /// Routes left out of the last snapshot because their service had not answered yet.
    held_back: BTreeSet<String>,
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
    first_tx: watch::Sender<bool>,
    last_waiting_log: Instant,
}

impl Writer {
    async fn run(
        mut self,
        mut kv_rx: mpsc::UnboundedReceiver<Arc<Vec<KvPair>>>,
        mut svc_rx: mpsc::UnboundedReceiver<ServiceUpdate>,
        mut tags_rx: mpsc::UnboundedReceiver<Arc<BTreeMap<String, Vec<String>>>>,
        shutdown: Shutdown,
    ) {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut gauges = tokio::time::interval(GAUGE_EVERY);
        gauges.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            tokio::select! {
                _ = shutdown.wait() => break,
                Some(pairs) = kv_rx.recv() => self.on_routes(&pairs),
                Some(update) = svc_rx.recv() => self.on_service(update),
                Some(services) = tags_rx.recv() => self.on_tags(&services),
                _ = tick.tick() => self.on_tick(),
                _ = gauges.tick() => self.export_gauges(),
            }
            // Coalesce whatever else is already queued into the same publish.
            while let Ok(pairs) = kv_rx.try_recv() {
                self.on_routes(&pairs);
            }
            while let Ok(update) = svc_rx.try_recv() {
                self.on_service(update);
            }
            self.settle();
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
            }));
        }
        rejected
    }

    fn on_service(&mut self, update: ServiceUpdate) {
        // A late answer from a watch stopped meanwhile.
        if !self.wanted_since.contains_key(&update.service) {
            return;
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
        self.dirty = true;
    }

    /// One health watch per service some route names.
    fn sync_watches(&mut self) {
        let wanted: BTreeSet<String> = self
            .all_routes()
            .iter()
            .filter_map(|r| r.service().map(str::to_string))
            .collect();
        let report = self.health.sync(&wanted);
        let now = Instant::now();
        for s in &report.started {
            self.wanted_since.insert(s.clone(), now);
        }
        for s in &report.stopped {
            self.wanted_since.remove(s);
            self.services.remove(s);
            self.build_input.remove(s);
            self.dirty = true;
        }
        if !report.started.is_empty() || !report.stopped.is_empty() {
            tracing::debug!(started = ?report.started, stopped = ?report.stopped,
                watches = self.health.len(), "health watches changed");
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
            let status = self.routes_watch.status();
            if !self.routes_seen {
                tracing::warn!(consul = %self.consul_address,
                    error = status.last_error().as_deref().unwrap_or("no answer yet"),
                    "waiting for consul; not ready");
            } else if let Some(f) = self.fabio.as_ref().filter(|f| !f.seen) {
                tracing::warn!(consul = %self.consul_address,
                    error = f.watch.status().last_error().as_deref().unwrap_or("no answer yet"),
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
        let status = self.routes_watch.status().clone();
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
                let Some(s) = r.service() else {
                    return true;
                };
                let pending = !self.services.contains_key(s)
                    && self
                        .wanted_since
                        .get(s)
                        .is_some_and(|t| now.duration_since(*t) < SERVICE_GRACE);
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
                routes_watch: Some(self.routes_watch.status().clone()),
                tags_watch: self.fabio.as_ref().map(|f| f.watch.status().clone()),
                health_watches: self
                    .health
                    .statuses()
                    .map(|(k, s)| (k.to_string(), s.clone()))
                    .collect(),
                services: self.services.clone(),
                warm_start: self.warm.clone(),
            });
        }
    }

    fn publish(&mut self) {
        let started = std::time::Instant::now();
        self.dirty = false;
        self.view_dirty = true;
        let (routes, held) = self.effective_routes();
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
        if held != self.held_back && !held.is_empty() {
            tracing::debug!(?held, "routes held back until their service answers");
        }
        self.held_back = held;
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
            let _ = self.first_tx.send(true);
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
        // Only data Consul confirmed goes to the state file.
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
        let age = |s: &crate::consul::WatchStatus| {
            s.data_age()
                .unwrap_or_else(|| s.since_start())
                .as_secs_f64()
        };
        let routes = self.routes_watch.status();
        metrics::gauge!(crate::metrics::DATA_AGE, "watch" => routes.name().to_string())
            .set(age(routes));
        for (_, s) in self.health.statuses() {
            metrics::gauge!(crate::metrics::DATA_AGE, "watch" => s.name().to_string()).set(age(s));
        }
        if let Some(fabio) = &self.fabio {
            let s = fabio.watch.status();
            metrics::gauge!(crate::metrics::DATA_AGE, "watch" => s.name().to_string()).set(age(s));
        }
    }
}
