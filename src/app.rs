//! Wiring: starts the Consul watches and the single writer that turns their answers into
//! snapshots (`snapshot_writer`), the admin and proxy listeners, and shuts down in order.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::access_log::{AccessLog, AccessLogSettings, LineFormat};
use crate::admin::{self, Admin, AdminToken};
use crate::auth::{AuthSettings, Authenticator};
use crate::config::{Config, ConsulConsistency, LogFormat, LogSection};
use crate::consul::watch::{self as consul_watch, CatalogServices};
use crate::consul::{ClientSettings, Consistency, ConsulClient, ConsulError, WatchOptions};
use crate::control::Control;
use crate::discovery::watcher::HealthWatcher;
use crate::policy::{Edge, SharedLimits};
use crate::proxy::{self, Gateway};
use crate::registration::{self, Registered};
use crate::routing::kv;
use crate::shutdown::Shutdown;
use crate::snapshot_writer::{self, ConsulWatches, SnapshotWriter, WriterSettings};
use crate::state::State;
use crate::tls::Tls;
use crate::traffic::TrafficHistory;
use crate::upstream_tls::UpstreamTls;

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
    #[error("rate_limit: {0}")]
    RateLimitStore(String),
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    #[error(transparent)]
    UpstreamTls(#[from] crate::upstream_tls::UpstreamTlsError),
    #[error("admin.token_file: {0}")]
    AdminToken(#[from] crate::admin::TokenFileError),
    #[error(transparent)]
    Export(#[from] crate::otel_export::ExportError),
    #[error("the configuration has a [tls] section but no TLS listener was given")]
    MissingTlsListener,
    #[error(transparent)]
    AccessLog(#[from] crate::access_log::AccessLogError),
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
    let consistency = match cfg.consul_consistency {
        ConsulConsistency::Default => Consistency::Default,
        ConsulConsistency::Leader => Consistency::Leader,
        ConsulConsistency::Stale => Consistency::Stale {
            max_stale: cfg.consul_max_stale,
        },
        ConsulConsistency::Consistent => Consistency::Consistent,
    };
    ClientSettings {
        addresses: cfg.consul_addresses.clone(),
        token: cfg.consul_token.clone(),
        token_file: c.token_file.clone(),
        datacenter: c.datacenter.clone(),
        consistency,
        wait: cfg.wait,
        failback: (c.failback_s > 0).then(|| Duration::from_secs(c.failback_s)),
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
    let control = Arc::new(Control::new(&client.addresses().join(", "), max_age));
    let (first_tx, first_rx) = watch::channel(false);
    let mut tasks = Vec::new();
    tasks.push(tokio::spawn({
        let (client, shutdown) = (client.clone(), shutdown.clone());
        async move { client.upkeep(shutdown.wait()).await }
    }));
    let mut edge = Edge::from_config(&cfg.file)?;
    if let Some(target) = &cfg.redis {
        edge = edge.with_shared_limits(
            SharedLimits::new(target, &cfg.file.rate_limit)
                .map_err(|e| AppError::RateLimitStore(e.to_string()))?,
        );
    }
    let edge = Arc::new(edge);
    tasks.push(edge.spawn_sweeper(shutdown.clone()));
    tasks.extend(edge.spawn_store_probe(shutdown.clone()));

    let options = WatchOptions::for_client(
        "routes",
        &client,
        Duration::from_secs(cfg.file.consul.max_backoff_s),
    );
    let auth = authenticator(&cfg, &client, &options, &shutdown, &mut tasks)?;

    let token = match (&cfg.file.admin.token, &cfg.file.admin.token_file) {
        (Some(t), _) => Some(AdminToken::fixed(t)),
        (None, Some(path)) => Some(AdminToken::from_file(path)?),
        (None, None) => None,
    };
    let traffic = Arc::new(TrafficHistory::default());
    tasks.push(tokio::spawn(admin::dashboard::keep_traffic_history(
        state.clone(),
        traffic.clone(),
        shutdown.clone(),
    )));
    let admin = Arc::new(Admin {
        state: state.clone(),
        control: control.clone(),
        token,
        jwks: edge.jwks(),
        auth: Some(auth.clone()),
        consul: Some(client.clone()),
        traffic,
        stale_after: match cfg.file.readiness.max_data_age_s {
            0 => admin::DEFAULT_STALE_AFTER,
            s => Duration::from_secs(s),
        },
        loopback_only: admin_addr.ip().is_loopback(),
        edge: Some(edge.clone()),
    });
    tasks.push(tokio::spawn(admin::serve(
        listeners.admin,
        admin,
        shutdown.clone(),
    )));

    let spans = match crate::otel_export::ExportSettings::from_config(&cfg.file.tracing) {
        Some(settings) => {
            let (sink, task) = crate::otel_export::start(settings, shutdown.clone())?;
            tasks.push(task);
            Some(sink)
        }
        None => None,
    };
    let gateway = data_plane(&cfg, state.clone(), auth, edge, spans)?;
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

    let (senders, inbox) = snapshot_writer::channels();
    let tags_tx = senders.tags;
    let watches = ConsulWatches {
        routes: kv::watch(
            &client,
            &cfg.file.consul.kv_prefix,
            options.clone(),
            senders.routes,
        ),
        tags: cfg.file.fabio.enabled.then(|| {
            consul_watch::spawn(
                CatalogServices::new(&client),
                options.named("catalog:services"),
                move |services| {
                    let _ = tags_tx.send(services);
                },
            )
        }),
        health: HealthWatcher::new(client.clone(), options, senders.services),
    };
    let writer = SnapshotWriter::new(
        WriterSettings {
            consul_address: client.addresses().join(", "),
            kv_prefix: cfg.file.consul.kv_prefix.clone(),
            state_file: cfg.file.consul.state_file.clone(),
            fabio: cfg.file.fabio.enabled,
            shared_limits: cfg.redis.is_some(),
        },
        state.clone(),
        control.clone(),
        Box::new(watches),
        first_tx,
    );
    tracing::info!(routes = %format!("{}{}", cfg.file.consul.kv_prefix, kv::ROUTES_DIR),
        consul = %client.addresses().join(", "), %proxy_addr, %admin_addr, "switchyard starting");
    let registration = cfg.file.registration.enabled.then(|| {
        let me = registration::registration(&cfg.file.registration, proxy_addr, admin_addr);
        let recheck = Duration::from_secs(cfg.file.registration.check_interval_s.max(1));
        registration::spawn(self_client, me, recheck, shutdown.clone())
    });
    tasks.push(tokio::spawn(writer.run(inbox, shutdown.clone())));

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

/// The access log, when `log.access_log` is on and the log filter lets target `access`
/// through (`RUST_LOG=info,access=off` turns it off, as it did when lines were events).
fn access_log(log: &LogSection) -> Result<Option<Arc<AccessLog>>, AppError> {
    // Without a subscriber (the gateway embedded in a test, say) the setting alone decides.
    let enabled = !tracing::dispatcher::has_been_set()
        || tracing::enabled!(target: crate::telemetry::ACCESS_TARGET, tracing::Level::INFO);
    if !log.access_log || !enabled {
        return Ok(None);
    }
    let settings = AccessLogSettings {
        format: match log.format {
            LogFormat::Text => LineFormat::Text,
            LogFormat::Json => LineFormat::Json,
        },
        path: (!log.access_log_path.is_empty()).then(|| log.access_log_path.clone().into()),
        buffer_bytes: log.access_log_buffer_kib * 1024,
        flush_interval: Duration::from_millis(log.access_log_flush_ms),
    };
    Ok(Some(Arc::new(AccessLog::start(settings)?)))
}

/// Builds the request path: upstream clients and the gateway.
fn data_plane(
    cfg: &Config,
    state: Arc<State>,
    auth: Arc<Authenticator>,
    edge: Arc<Edge>,
    spans: Option<crate::otel_export::SpanSink>,
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
        access_log(&cfg.file.log)?,
        proxy::RequestTracing {
            sampler: crate::trace_context::Sampler::new(cfg.file.tracing.sample_ratio),
            spans,
        },
    )))
}
