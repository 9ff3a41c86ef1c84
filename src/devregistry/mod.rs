//! An embedded Consul-compatible registry for tests, the quick start and fault injection.
//!
//! It speaks the part of Consul's HTTP API Switchyard and its users touch (agent, catalog,
//! health, KV, status), down to the index rules of blocking queries, following
//! `shared/consul-api.md`. It imports nothing from the gateway, so a shared mistake cannot hide.
//!
//! Parts: `store` (state, indices, blocking reads), `watch` (per-key wake-ups), `agent`
//! (local services/checks, maintenance, reaper), `checks` (TTL/HTTP/TCP runners), `api`
//! (routing, then one handler module per endpoint family), `error` (the plain-text error
//! answer), `params` (query parsing), `wire` (JSON shapes), `faults`, `server`, `linger`
//! (closing without a reset), and `demo` (echo upstreams for `switchyard dev`).
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use switchyard::devregistry::{Registry, RegistryOptions};
//! let reg = Registry::start("127.0.0.1:0".parse()?, RegistryOptions::for_tests())?;
//! let base = reg.url(); // "http://127.0.0.1:PORT"
//! reg.kv_put("switchyard/routes/web", r#"{"path":"/"}"#)?;
//! reg.register_service_json(serde_json::json!({
//!     "Name": "web", "ID": "web-1", "Address": "127.0.0.1", "Port": 8080,
//!     "Check": {"TTL": "10s", "Status": "passing"}
//! }))?;
//! reg.faults().set_no_leader(true);      // 500 No cluster leader (except ?stale reads)
//! reg.faults().restore_snapshot(2);      // indices go backwards, blocked queries return
//! reg.stop().await;                      // listener and connections closed, state kept
//! reg.restart().await?;                  // same port
//! # let _ = base; Ok(()) }
//! ```

mod agent;
mod api;
mod checks;
pub mod demo;
mod error;
mod faults;
mod linger;
mod params;
mod server;
mod store;
mod watch;
mod wire;

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::task::AbortHandle;

pub use agent::AgentError;
pub use api::{parse_wan_flag, WanConfigError, KV_MAX_VALUE_SIZE};
pub use faults::Faults;
pub use store::Status as CheckStatus;

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: io::Error },
    #[error("{0}")]
    Rejected(String),
    #[error(transparent)]
    Agent(#[from] AgentError),
    #[error(transparent)]
    Wan(#[from] WanConfigError),
}

/// How the registry presents itself and how fast its background work runs.
#[derive(Clone, Debug)]
pub struct RegistryOptions {
    /// With a token, every request (except `status/*`) must carry it, else 403.
    pub token: Option<String>,
    pub node_name: String,
    /// This registry's datacenter (Consul's rule: lower-cased, then only `[a-z0-9-_]`).
    pub datacenter: String,
    /// WAN peers, datacenter name → `http://HOST:PORT` of a registry (or Consul server
    /// agent) of that datacenter: `?dc=NAME` is forwarded there. More can join later
    /// ([`Registry::join_wan`]).
    pub wan_peers: Vec<(String, String)>,
    /// The agent node's address (also the default address of its services).
    pub node_address: String,
    /// Add Consul's random wait/16 to blocking timeouts; turn off for exact test timings.
    pub jitter: bool,
    /// How often critical services are considered for `DeregisterCriticalServiceAfter` (Consul: 30 s).
    pub reap_interval: Duration,
    /// The smallest effective `DeregisterCriticalServiceAfter` (Consul: 1 min).
    pub deregister_critical_min: Duration,
    /// Serve HTTPS with this configuration (e.g. one requiring client certificates, like
    /// an agent with `verify_incoming`); plain HTTP when unset.
    pub tls: Option<Arc<rustls::ServerConfig>>,
}

impl Default for RegistryOptions {
    fn default() -> Self {
        RegistryOptions {
            token: None,
            node_name: "switchyard-dev".into(),
            datacenter: "dc1".into(),
            wan_peers: Vec::new(),
            node_address: "127.0.0.1".into(),
            jitter: true,
            reap_interval: Duration::from_secs(30),
            deregister_critical_min: Duration::from_secs(60),
            tls: None,
        }
    }
}

impl RegistryOptions {
    /// Defaults tuned for tests: no jitter, reaper every 100 ms, no reap minimum.
    pub fn for_tests() -> Self {
        RegistryOptions {
            jitter: false,
            reap_interval: Duration::from_millis(100),
            deregister_critical_min: Duration::ZERO,
            ..RegistryOptions::default()
        }
    }
}

/// A running registry. Dropping it stops everything (listener, connections, check tasks).
pub struct Registry {
    addr: SocketAddr,
    ctx: Arc<api::ApiContext>,
    server: tokio::sync::Mutex<Option<server::Server>>,
    tls: Option<tokio_rustls::TlsAcceptor>,
    reaper: AbortHandle,
}

impl Registry {
    /// Binds `addr` (use port 0 for an ephemeral port), spawns the server and returns at once.
    /// Must be called inside a Tokio runtime. A bad datacenter name or WAN peer is an
    /// `InvalidInput` error.
    pub fn start(addr: SocketAddr, opts: RegistryOptions) -> io::Result<Registry> {
        let wan = api::WanPeers::new(&opts.datacenter, &opts.wan_peers)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let listener = server::bind(addr)?;
        let addr = listener.local_addr()?;
        let store = Arc::new(store::Store::new());
        let identity = agent::AgentIdentity {
            node_name: opts.node_name.clone(),
            node_id: uuid::Uuid::new_v4().to_string(),
            address: opts.node_address.clone(),
            datacenter: wan.own().to_string(),
        };
        let agent = Arc::new(agent::Agent::new(
            identity,
            store.clone(),
            agent::ReapSettings {
                interval: opts.reap_interval,
                min_after: opts.deregister_critical_min,
            },
        ));
        let reaper = tokio::spawn(agent.clone().run_reaper()).abort_handle();
        let ctx = Arc::new(api::ApiContext {
            faults: Faults::new(store.clone()),
            store,
            agent,
            settings: api::ApiSettings {
                token: opts.token,
                jitter: opts.jitter,
            },
            wan,
        });
        let tls = opts.tls.map(tokio_rustls::TlsAcceptor::from);
        let server = server::Server::spawn(listener, ctx.clone(), tls.clone());
        Ok(Registry {
            addr,
            ctx,
            server: tokio::sync::Mutex::new(Some(server)),
            tls,
            reaper,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT` (`https://` with TLS), ready to hand to a Consul client.
    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    /// Fault switches (cloneable; all off at start).
    pub fn faults(&self) -> &Faults {
        &self.ctx.faults
    }

    /// Closes the listener and every open connection (blocked queries included). State,
    /// indices and check tasks are kept; [`Registry::restart`] serves them again.
    pub async fn stop(&self) {
        if let Some(s) = self.server.lock().await.take() {
            s.stop().await;
        }
    }

    /// Listens again on the same port (a no-op if running).
    pub async fn restart(&self) -> io::Result<()> {
        let mut guard = self.server.lock().await;
        if guard.is_none() {
            let listener = server::bind(self.addr)?;
            *guard = Some(server::Server::spawn(
                listener,
                self.ctx.clone(),
                self.tls.clone(),
            ));
        }
        Ok(())
    }

    /// This registry's datacenter name.
    pub fn datacenter(&self) -> &str {
        self.ctx.wan.own()
    }

    /// Adds a WAN peer at run time (as `consul join -wan`), or points a known one at a new
    /// URL: `?dc=NAME` then goes to `url`.
    pub fn join_wan(&self, name: &str, url: &str) -> Result<(), RegistryError> {
        self.ctx.wan.join(name, url, true)?;
        Ok(())
    }

    /// The current global index.
    pub fn index(&self) -> u64 {
        self.ctx.store.current_index()
    }

    /// The agent's node name.
    pub fn node_name(&self) -> &str {
        &self.ctx.agent.identity.node_name
    }

    /// Registers a service through the agent, with the exact JSON `PUT /v1/agent/service/register` takes.
    pub fn register_service_json(&self, body: serde_json::Value) -> Result<(), RegistryError> {
        let bytes =
            serde_json::to_vec(&body).map_err(|e| RegistryError::Rejected(e.to_string()))?;
        let svc: wire::ServiceIn = wire::decode(&bytes).map_err(RegistryError::Rejected)?;
        let (svc, checks) = svc.into_service().map_err(RegistryError::Rejected)?;
        self.ctx.agent.register_service(svc, checks, false)?;
        Ok(())
    }

    /// Registers `id` of service `name` at `address:port` with a passing TTL check
    /// `service:<id>` (TTL 1 h), so it is healthy until told otherwise.
    pub fn register_service(
        &self,
        name: &str,
        id: &str,
        address: &str,
        port: u16,
    ) -> Result<(), RegistryError> {
        self.register_service_json(serde_json::json!({
            "Name": name, "ID": id, "Address": address, "Port": port,
            "Check": {"TTL": "1h", "Status": "passing"},
        }))
    }

    pub fn deregister_service(&self, id: &str) {
        self.ctx.agent.deregister_service(id);
    }

    /// Sets an agent check's status (any kind; a TTL clock restarts).
    pub fn set_check_status(
        &self,
        check_id: &str,
        status: CheckStatus,
    ) -> Result<(), RegistryError> {
        self.ctx.agent.set_check_status(check_id, status, "")?;
        Ok(())
    }

    /// The status of a check on the agent's node.
    pub fn check_status(&self, check_id: &str) -> Option<CheckStatus> {
        self.ctx
            .store
            .check(&self.ctx.agent.identity.node_name, check_id)
            .map(|c| c.status)
    }

    /// Node maintenance on or off (`_node_maintenance`).
    pub fn set_node_maintenance(&self, enable: bool, reason: &str) -> Result<(), RegistryError> {
        self.ctx.agent.node_maintenance(enable, reason)?;
        Ok(())
    }

    pub fn kv_put(&self, key: &str, value: impl Into<Bytes>) -> Result<(), RegistryError> {
        let value = value.into();
        if key.is_empty() {
            return Err(RegistryError::Rejected("Missing key name".into()));
        }
        if value.len() as u64 > KV_MAX_VALUE_SIZE {
            return Err(RegistryError::Rejected(format!(
                "value of {} bytes is over the {KV_MAX_VALUE_SIZE}-byte limit",
                value.len()
            )));
        }
        self.ctx.store.kv_put(key, value, 0, None);
        Ok(())
    }

    pub fn kv_get(&self, key: &str) -> Option<Bytes> {
        self.ctx
            .store
            .read(|s| s.kv.get(key).map(|e| e.value.clone()))
    }

    pub fn kv_delete(&self, key: &str) {
        self.ctx.store.kv_delete(key, false, None);
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.reaper.abort();
        self.ctx.agent.abort_all();
        if let Ok(mut g) = self.server.try_lock() {
            if let Some(s) = g.take() {
                s.abort();
            }
        }
        self.ctx.store.wake_all();
    }
}

/// `switchyard registry`: serves on `addr` until SIGINT or SIGTERM.
pub async fn serve_until_signal(
    addr: SocketAddr,
    opts: RegistryOptions,
) -> Result<(), RegistryError> {
    // Checked first, so a bad name or peer is told as such, not as a failure to listen.
    api::WanPeers::new(&opts.datacenter, &opts.wan_peers)?;
    let peers: Vec<String> = opts
        .wan_peers
        .iter()
        .map(|(name, url)| format!("{name}={url}"))
        .collect();
    let reg = Registry::start(addr, opts).map_err(|source| RegistryError::Bind { addr, source })?;
    tracing::info!(
        addr = %reg.addr(),
        url = %reg.url(),
        datacenter = reg.datacenter(),
        wan = %peers.join(","),
        "dev registry listening"
    );
    wait_for_signal().await;
    tracing::info!("dev registry stopping");
    reg.stop().await;
    Ok(())
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}
