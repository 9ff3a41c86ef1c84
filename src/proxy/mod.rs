//! The data plane: accepts client connections ([`server`]), runs each request through its
//! phases ([`handler`]) and forwards it over pooled upstream connections ([`upstream`]).
//!
//! It reads the world only through [`State::load`] (one `Arc` per request) and never
//! talks to Consul; passive health goes into the instances' atomic counters.

pub mod body;
pub mod error;
pub mod grpc;
pub mod handler;
pub mod headers;
pub mod mirror;
pub mod path;
pub mod retry;
pub mod server;
pub mod upstream;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;

use crate::access_log::AccessLog;
use crate::auth::Authenticator;
use crate::config::ProxySection;
use crate::otel_export::SpanSink;
use crate::policy::Edge;
use crate::state::State;
use crate::trace_context::{Sampler, TraceContext};
use crate::upstream_tls::UpstreamTls;

pub use error::ProxyError;
pub use handler::ClientConn;
pub use server::{serve, serve_tls};

/// How long idle upstream connections stay pooled.
const UPSTREAM_IDLE: Duration = Duration::from_secs(90);

/// Data-plane settings from `[proxy]` and `[log]`.
#[derive(Debug, Clone)]
pub struct ProxySettings {
    pub max_body_bytes: u64,
    pub max_header_bytes: usize,
    pub header_read_timeout: Duration,
    pub body_read_timeout: Duration,
    pub underscores_in_headers: bool,
    pub idle_timeout: Duration,
    pub drain_timeout: Duration,
}

impl ProxySettings {
    /// What the HTTP/1.1 server needs of them.
    pub fn http1(&self) -> crate::http1::server::ServerSettings {
        crate::http1::server::ServerSettings {
            header_timeout: self.header_read_timeout,
            body_timeout: self.body_read_timeout,
            max_head: self.max_header_bytes,
        }
    }

    pub fn from_config(proxy: &ProxySection) -> ProxySettings {
        ProxySettings {
            max_body_bytes: proxy.max_body_bytes,
            max_header_bytes: proxy.max_header_bytes,
            header_read_timeout: Duration::from_millis(proxy.header_read_timeout_ms),
            body_read_timeout: Duration::from_millis(proxy.body_read_timeout_ms),
            underscores_in_headers: proxy.underscores_in_headers,
            idle_timeout: Duration::from_secs(proxy.idle_timeout_s),
            drain_timeout: Duration::from_secs(proxy.drain_timeout_s),
        }
    }
}

/// Everything the request path shares: the snapshot holder, auth, edge policy, upstream
/// clients, and the gateway-wide connection and retry limits.
pub struct Gateway {
    state: Arc<State>,
    auth: Arc<Authenticator>,
    edge: Arc<Edge>,
    clients: Arc<upstream::Clients>,
    mirrors: mirror::Mirrors,
    settings: ProxySettings,
    access_log: Option<Arc<AccessLog>>,
    budget: retry::RetryBudget,
    connections: Arc<Semaphore>,
    tracing: RequestTracing,
}

/// What the request path does for distributed tracing (`[tracing]`).
pub struct RequestTracing {
    /// Which new traces are sampled (`tracing.sample_ratio`).
    pub sampler: Sampler,
    /// The export queue of sampled requests' spans, when `tracing.otlp_endpoint` is set.
    pub spans: Option<SpanSink>,
}

impl Gateway {
    pub fn new(
        state: Arc<State>,
        auth: Arc<Authenticator>,
        edge: Arc<Edge>,
        upstream_tls: Option<UpstreamTls>,
        proxy: &ProxySection,
        access_log: Option<Arc<AccessLog>>,
        tracing: RequestTracing,
    ) -> Gateway {
        let clients = Arc::new(upstream::Clients::new(
            upstream_tls,
            proxy.pool_max_idle_per_host,
            UPSTREAM_IDLE,
        ));
        Gateway {
            state,
            auth,
            edge,
            mirrors: mirror::Mirrors::new(clients.clone(), proxy.mirror_max_in_flight),
            clients,
            settings: ProxySettings::from_config(proxy),
            access_log,
            budget: retry::RetryBudget::new(proxy.retry_budget_percent),
            connections: Arc::new(Semaphore::new(proxy.max_connections.max(1))),
            tracing,
        }
    }

    /// Whether this request's span is recorded (sampled, and spans are exported).
    fn records(&self, trace: &TraceContext) -> bool {
        trace.sampled && self.tracing.spans.is_some()
    }

    pub fn settings(&self) -> &ProxySettings {
        &self.settings
    }
}
