//! The configuration file: its TOML shape, defaults, and one `validate()` into the runtime
//! [`Config`]. Command-line flags are applied on top by the binary before validation.
//!
//! Everything that changes at run time (routes, JWT providers in KV, API keys) lives in
//! Consul KV instead; this file holds what a gateway needs before it can reach Consul.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use serde::Deserialize;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid setting `{field}`: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
}

fn invalid(field: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field,
        message: message.into(),
    }
}

/// The whole file. Every section is optional.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FileConfig {
    pub consul: ConsulSection,
    pub proxy: ProxySection,
    pub tls: Option<TlsSection>,
    pub admin: AdminSection,
    pub readiness: ReadinessSection,
    pub log: LogSection,
    pub registration: RegistrationSection,
    pub fabio: FabioSection,
    /// JWT providers by name; providers in KV under `<kv_prefix>jwt/<name>` are merged in
    /// and win on a name clash, so a cluster can rotate them without a restart.
    pub jwt_providers: BTreeMap<String, serde_json::Value>,
    pub upstream_tls: Option<UpstreamTlsSection>,
    pub assertion: Option<AssertionSection>,
    pub auth: AuthSection,
    pub tracing: TracingSection,
    pub rate_limit: RateLimitSection,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ConsulSection {
    /// `http://host:port`, `https://host:port` or bare `host:port` (like `CONSUL_HTTP_ADDR`);
    /// a comma-separated list names several agents, in order of preference. Unset (and no
    /// `addresses`): `http://127.0.0.1:8500`.
    pub address: Option<String>,
    /// Several agents, in order of preference (the local agent first); or `address`.
    pub addresses: Vec<String>,
    /// With several addresses: how often (seconds) an earlier one is tried again while a
    /// later one is active; 0 stays on whichever works.
    pub failback_s: u64,
    pub token: Option<String>,
    /// A file holding the token (like `CONSUL_HTTP_TOKEN_FILE`), read again every second.
    pub token_file: Option<PathBuf>,
    pub datacenter: Option<String>,
    /// Prefix in KV under which `routes/`, `jwt/` and `apikeys/` live.
    pub kv_prefix: String,
    /// The `wait` of each blocking query, in seconds (Consul caps it at 600).
    pub wait_s: u64,
    /// Consul's consistency mode for reads: `default`, `leader`, `stale` or `consistent`.
    pub consistency: Option<ConsulConsistency>,
    /// With `consistency = "stale"`: an answer from a server that last heard from the leader
    /// longer ago than this (seconds) is read again from the leader. 0: no bound.
    pub max_stale_s: u64,
    /// Older spelling of `consistency = "stale"`.
    pub stale: bool,
    pub ca_cert: Option<PathBuf>,
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
    /// Upper bound of the retry backoff after Consul errors, in seconds.
    pub max_backoff_s: u64,
    /// A snapshot of the last known state, written after each change and read at boot
    /// when Consul cannot be reached (warm start).
    pub state_file: Option<PathBuf>,
}

/// Consul's read consistency modes (its "Consistency Modes" API documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ConsulConsistency {
    /// No parameter: the agent's default (the leader answers, unless the agent's
    /// `discovery_max_stale` makes catalog and health reads stale).
    Default,
    /// `?leader`: the default mode even where the agent's `discovery_max_stale` applies.
    Leader,
    /// `?stale`: any server answers, also without a leader; spreads watch load over servers.
    Stale,
    /// `?consistent`: the leader checks with a quorum before answering.
    Consistent,
}

impl ConsulConsistency {
    pub fn name(self) -> &'static str {
        match self {
            ConsulConsistency::Default => "default",
            ConsulConsistency::Leader => "leader",
            ConsulConsistency::Stale => "stale",
            ConsulConsistency::Consistent => "consistent",
        }
    }
}

/// The agent of `switchyard run` without any address setting.
pub const DEFAULT_CONSUL_ADDRESS: &str = "http://127.0.0.1:8500";

impl Default for ConsulSection {
    fn default() -> Self {
        Self {
            address: None,
            addresses: Vec::new(),
            failback_s: 10,
            token: None,
            token_file: None,
            datacenter: None,
            kv_prefix: "switchyard/".into(),
            wait_s: 300,
            consistency: None,
            max_stale_s: 0,
            stale: false,
            ca_cert: None,
            client_cert: None,
            client_key: None,
            max_backoff_s: 60,
            state_file: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProxySection {
    /// Plain-HTTP listener (HTTP/1.1 and h2c).
    pub listen: String,
    pub max_connections: usize,
    /// Time a client has to send a complete request head (slowloris guard).
    pub header_read_timeout_ms: u64,
    /// Longest pause allowed between bytes of a request body (a slow-body client holds a
    /// connection and a request); the request then ends with 408.
    pub body_read_timeout_ms: u64,
    /// Forward request headers whose names contain `_` (nginx's
    /// `underscores_in_headers`). Off: they are dropped, since many backends read
    /// `X_User_Id` as `X-User-Id`. On, those that fold into a header the gateway sets
    /// or strips are still dropped.
    pub underscores_in_headers: bool,
    /// Largest request head accepted; larger gets 431.
    pub max_header_bytes: usize,
    /// Default request body limit; a route may lower or raise it.
    pub max_body_bytes: u64,
    /// HTTP/2 client connections with no stream open and no byte either way for this long
    /// are closed (GOAWAY; between one and two of it after the last byte). (Idle HTTP/1.1
    /// connections close after `header_read_timeout_ms` without a new request.)
    pub idle_timeout_s: u64,
    /// Time in-flight requests get to finish after SIGTERM.
    pub drain_timeout_s: u64,
    /// Tokio worker threads (0 = one per core).
    pub worker_threads: usize,
    /// Peers whose `X-Forwarded-For` is believed.
    pub trusted_proxies: Vec<IpNet>,
    /// Idle keep-alive connections kept per upstream instance.
    pub pool_max_idle_per_host: usize,
    /// Retries allowed, as a share of requests in flight (budget), in percent.
    pub retry_budget_percent: u32,
    /// Mirrored request copies in flight at once, gateway-wide; beyond, copies are skipped.
    pub mirror_max_in_flight: usize,
}

impl Default for ProxySection {
    fn default() -> Self {
        Self {
            listen: "0.0.0.0:8080".into(),
            max_connections: 10_000,
            header_read_timeout_ms: 10_000,
            body_read_timeout_ms: 30_000,
            underscores_in_headers: false,
            max_header_bytes: 64 * 1024,
            max_body_bytes: 10 * 1024 * 1024,
            idle_timeout_s: 60,
            drain_timeout_s: 30,
            worker_threads: 0,
            trusted_proxies: Vec::new(),
            pool_max_idle_per_host: 256,
            retry_budget_percent: 20,
            mirror_max_in_flight: 256,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSection {
    pub listen: String,
    /// Certificates chosen by SNI; the first one is the default.
    pub certificates: Vec<CertificateSection>,
    /// When set, clients must present a certificate signed by this CA bundle.
    #[serde(default)]
    pub client_ca: Option<PathBuf>,
    /// A plain listener that answers everything with a redirect to HTTPS.
    #[serde(default)]
    pub redirect_http_listen: Option<String>,
    /// How often certificate files are checked for changes, in seconds.
    #[serde(default = "default_reload_s")]
    pub reload_interval_s: u64,
    /// Session tickets (TLS 1.3 and 1.2): a returning client resumes without a signature,
    /// and without the gateway keeping anything per client.
    #[serde(default = "default_session_tickets")]
    pub session_tickets: bool,
    /// Sessions kept in memory for TLS 1.2 clients that take no ticket (0: none).
    #[serde(default = "default_session_cache_entries")]
    pub session_cache_entries: usize,
}

fn default_reload_s() -> u64 {
    5
}

fn default_session_tickets() -> bool {
    true
}

fn default_session_cache_entries() -> usize {
    4096
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertificateSection {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Gateway-wide edge-auth settings (providers are in `jwt_providers` and KV).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthSection {
    /// `realm` of the `WWW-Authenticate` challenges.
    pub realm: String,
    /// Request header an API key is read from (removed before forwarding).
    pub api_key_header: String,
    /// Header that tells upstreams which API key consumer called.
    pub consumer_header: String,
    /// Client-sent headers always removed before auth, on every route. Headers written by
    /// JWT providers (`claims_to_headers`, `payload_header`) are removed too, automatically.
    pub strip_headers: Vec<String>,
    /// Failed token verifications a client address may cause before its tokens are refused
    /// (429) without verification, until the budget refills.
    pub failure_budget: FailureBudgetSection,
}

impl Default for AuthSection {
    fn default() -> Self {
        Self {
            realm: "switchyard".into(),
            api_key_header: "X-API-Key".into(),
            consumer_header: "X-Consumer".into(),
            strip_headers: vec!["X-User-Id".into()],
            failure_budget: FailureBudgetSection::default(),
        }
    }
}

/// `[auth.failure_budget]`: see `auth::failure_budget`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FailureBudgetSection {
    /// Failed verifications in a row before a client is refused; 0 turns the budget off.
    pub burst: u32,
    /// Failed verifications a client regains per second.
    pub per_second: f64,
    /// Client addresses tracked at most (16 bytes each, plus the map's overhead).
    pub max_clients: usize,
    /// Failed verifications in a row from all addresses together before every token the
    /// cache does not know is refused; 0 turns this budget off.
    pub global_burst: u32,
    /// Failed verifications the gateway regains per second.
    pub global_per_second: f64,
    /// How long a refusal for a spent budget (429) is held before it is sent, in
    /// milliseconds (spread over half to one and a half of it); 0 sends it at once. A flooding connection then gets one refusal per
    /// hold instead of as many as it can send (HAProxy's tarpit).
    pub refusal_delay_ms: u64,
    /// Refusals held at once, gateway-wide; beyond it they are sent at once.
    pub max_delayed_refusals: usize,
}

impl Default for FailureBudgetSection {
    fn default() -> Self {
        Self {
            burst: 20,
            per_second: 1.0,
            max_clients: 65_536,
            // A few percent of one core at most: a failed RS256/PS256 check costs ~30 µs,
            // ES256/EdDSA ~60-90 µs, so 200 a second is 0.6-1.8% of a core and a burst of
            // 1000 is 30-90 ms of it; far above the failures genuine clients cause
            // (expired tokens before a refresh).
            global_burst: 1000,
            global_per_second: 200.0,
            refusal_delay_ms: 1000,
            // A held refusal is a parked request (a few KiB): tens of MiB at most.
            max_delayed_refusals: 10_000,
        }
    }
}

impl FailureBudgetSection {
    /// Why these settings cannot work, if they cannot (a zero `burst` turns the budget off).
    fn problem(&self) -> Option<&'static str> {
        let rate_ok = |r: f64| r.is_finite() && (0.001..=1_000_000.0).contains(&r);
        if self.refusal_delay_ms > 60_000 {
            return Some("`refusal_delay_ms` must be at most 60000");
        }
        if self.global_burst != 0 {
            if !rate_ok(self.global_per_second) {
                return Some("`global_per_second` must be between 0.001 and 1000000");
            }
            if self.global_burst > 1_000_000 {
                return Some("`global_burst` must be at most 1000000");
            }
        }
        if self.burst == 0 {
            return None;
        }
        if !rate_ok(self.per_second) {
            return Some("`per_second` must be between 0.001 and 1000000");
        }
        if self.burst > 1_000_000 {
            return Some("`burst` must be at most 1000000");
        }
        if self.max_clients == 0 {
            return Some("`max_clients` must be at least 1");
        }
        None
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdminSection {
    pub listen: String,
    /// When set, the dashboard's data and every admin endpoint but `/healthz`, `/ready` and
    /// `/jwks.json` need `Authorization: Bearer <token>`.
    pub token: Option<String>,
    /// The same token read from a file, and read again when the file changes.
    pub token_file: Option<PathBuf>,
}

impl Default for AdminSection {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:9901".into(),
            token: None,
            token_file: None,
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ReadinessSection {
    /// Not ready when the oldest Consul data is older than this many seconds (0 = never).
    pub max_data_age_s: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogSection {
    /// A `tracing` filter such as `info` or `switchyard=debug` (env `RUST_LOG` wins).
    pub level: String,
    pub format: LogFormat,
    pub access_log: bool,
    /// A file for the access log (appended to, reopened after rotation); empty: stderr.
    pub access_log_path: String,
    /// What each thread may hold for the access-log writer before lines are dropped.
    pub access_log_buffer_kib: usize,
    /// The longest an access-log line waits before it is written.
    pub access_log_flush_ms: u64,
}

impl Default for LogSection {
    fn default() -> Self {
        Self {
            level: "info".into(),
            format: LogFormat::Text,
            access_log: true,
            access_log_path: String::new(),
            access_log_buffer_kib: 1024,
            access_log_flush_ms: 200,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RegistrationSection {
    pub enabled: bool,
    pub service_name: String,
    /// Address advertised to Consul; empty means the agent's address.
    pub address: String,
    pub tags: Vec<String>,
    pub check_interval_s: u64,
}

impl Default for RegistrationSection {
    fn default() -> Self {
        Self {
            enabled: true,
            service_name: "switchyard".into(),
            address: String::new(),
            tags: Vec::new(),
            check_interval_s: 10,
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FabioSection {
    /// Route services tagged `urlprefix-host/path` as fabio would.
    pub enabled: bool,
}

/// Distributed tracing: W3C trace context is always propagated; spans are exported over
/// OTLP only when `otlp_endpoint` is set.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TracingSection {
    /// Where spans go: for `http/protobuf` a URL (`/v1/traces` is added when it has no
    /// path), for `grpc` the collector's `http://host:port`. Unset: nothing is exported.
    pub otlp_endpoint: Option<String>,
    pub otlp_protocol: OtlpProtocol,
    /// Share of new traces sampled (0..=1); a continued trace follows its parent's flag.
    pub sample_ratio: f64,
    /// `service.name` of the exported spans.
    pub service_name: String,
    /// Finished spans waiting for export; beyond, spans are dropped and counted.
    pub queue_size: usize,
    /// Most spans in one export request.
    pub batch_size: usize,
    /// Longest a finished span waits for a batch to fill before it is sent.
    pub export_interval_ms: u64,
    /// One export request's time limit.
    pub export_timeout_ms: u64,
    /// Extra headers on export requests (a collector's API key, say).
    pub headers: BTreeMap<String, String>,
}

impl Default for TracingSection {
    fn default() -> Self {
        Self {
            otlp_endpoint: None,
            otlp_protocol: OtlpProtocol::HttpProtobuf,
            sample_ratio: 1.0,
            service_name: "switchyard".into(),
            queue_size: 4096,
            batch_size: 512,
            export_interval_ms: 1000,
            export_timeout_ms: 5000,
            headers: BTreeMap::new(),
        }
    }
}

/// OTLP transports (the names of `OTEL_EXPORTER_OTLP_PROTOCOL`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum OtlpProtocol {
    #[serde(rename = "http/protobuf")]
    HttpProtobuf,
    #[serde(rename = "grpc")]
    Grpc,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamTlsSection {
    /// Client certificate presented to upstreams that require mTLS.
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    /// CA bundle that upstream certificates must chain to (public web roots when unset).
    pub ca: Option<PathBuf>,
    /// Name upstream certificates must carry; `{service}` is replaced by the route's
    /// service (e.g. `{service}.service.consul`). Unset: the address dialled.
    #[serde(default)]
    pub server_name: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AssertionSection {
    /// PKCS#8 PEM private key (Ed25519 or P-256) used to sign upstream assertions.
    pub key_file: PathBuf,
    /// Key id published in `/jwks.json`.
    pub kid: String,
    /// `iss` of the assertions.
    #[serde(default = "default_assertion_issuer")]
    pub issuer: String,
}

fn default_assertion_issuer() -> String {
    "switchyard".into()
}

/// Where cluster-scope rate limits keep their buckets, and what happens when it fails.
/// Routes with `rate_limit.scope = "cluster"` need one of `redis_url`, `redis_cluster_nodes`
/// or `redis_sentinel_nodes`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RateLimitSection {
    /// One Redis server: `redis://[user:password@]host:port[/db]`, or `rediss://` for TLS.
    pub redis_url: Option<String>,
    /// Seed nodes of a Redis Cluster (`redis://` or `rediss://` URLs).
    pub redis_cluster_nodes: Vec<String>,
    /// Sentinels that name the master of `redis_sentinel_master`.
    pub redis_sentinel_nodes: Vec<String>,
    pub redis_sentinel_master: Option<String>,
    /// Longest a decision waits on Redis before it falls back, in milliseconds.
    pub budget_ms: u64,
    /// What decides while Redis is slow or down: `local` (this gateway's own bucket),
    /// `allow` or `deny`.
    pub on_store_error: StoreErrorPolicy,
    /// Tokens a gateway may take from a key's shared allowance at once and spend without
    /// asking Redis (0: ask Redis for every request).
    pub lease: u32,
    /// Prefix of every Redis key the gateway writes.
    pub key_prefix: String,
    /// How often Redis is pinged to learn it answers again (and that it still does).
    pub probe_interval_ms: u64,
}

impl Default for RateLimitSection {
    fn default() -> Self {
        Self {
            redis_url: None,
            redis_cluster_nodes: Vec::new(),
            redis_sentinel_nodes: Vec::new(),
            redis_sentinel_master: None,
            budget_ms: 5,
            on_store_error: StoreErrorPolicy::Local,
            lease: 0,
            key_prefix: "switchyard:rl:".into(),
            probe_interval_ms: 500,
        }
    }
}

/// `[rate_limit] on_store_error`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreErrorPolicy {
    Local,
    Allow,
    Deny,
}

impl StoreErrorPolicy {
    pub fn name(self) -> &'static str {
        match self {
            StoreErrorPolicy::Local => "local",
            StoreErrorPolicy::Allow => "allow",
            StoreErrorPolicy::Deny => "deny",
        }
    }
}

/// The Redis deployment `[rate_limit]` names, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RedisTarget {
    Single(String),
    Cluster(Vec<String>),
    Sentinel { nodes: Vec<String>, master: String },
}

impl RedisTarget {
    /// `single`, `cluster` or `sentinel`.
    pub fn kind(&self) -> &'static str {
        match self {
            RedisTarget::Single(_) => "single",
            RedisTarget::Cluster(_) => "cluster",
            RedisTarget::Sentinel { .. } => "sentinel",
        }
    }

    /// The URLs, each without user name or password (for logs and the admin view).
    pub fn redacted_urls(&self) -> Vec<String> {
        let urls: &[String] = match self {
            RedisTarget::Single(u) => std::slice::from_ref(u),
            RedisTarget::Cluster(n) | RedisTarget::Sentinel { nodes: n, .. } => n,
        };
        urls.iter().map(|u| redact_url(u)).collect()
    }
}

/// `url` without its user name and password.
pub fn redact_url(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) => {
            let _ = u.set_username("");
            let _ = u.set_password(None);
            u.to_string()
        }
        Err(_) => "<not a URL>".into(),
    }
}

/// Largest `[rate_limit] lease`; beyond, the overshoot bound stops meaning much.
pub const MAX_LEASE: u32 = 10_000;

impl RateLimitSection {
    /// The Redis deployment named, if any; exactly one of the three kinds may be set.
    pub fn redis_target(&self) -> Result<Option<RedisTarget>, ConfigError> {
        let sentinel_set =
            !self.redis_sentinel_nodes.is_empty() || self.redis_sentinel_master.is_some();
        let set = [
            self.redis_url.is_some(),
            !self.redis_cluster_nodes.is_empty(),
            sentinel_set,
        ];
        if set.iter().filter(|s| **s).count() > 1 {
            return Err(invalid(
                "rate_limit.redis_url",
                "set one of redis_url, redis_cluster_nodes or redis_sentinel_nodes",
            ));
        }
        if let Some(u) = &self.redis_url {
            return Ok(Some(RedisTarget::Single(redis_url(
                "rate_limit.redis_url",
                u,
            )?)));
        }
        if !self.redis_cluster_nodes.is_empty() {
            let nodes = redis_urls("rate_limit.redis_cluster_nodes", &self.redis_cluster_nodes)?;
            return Ok(Some(RedisTarget::Cluster(nodes)));
        }
        if sentinel_set {
            if self.redis_sentinel_nodes.is_empty() {
                return Err(invalid(
                    "rate_limit.redis_sentinel_nodes",
                    "redis_sentinel_master needs the sentinels that know it",
                ));
            }
            let nodes = redis_urls(
                "rate_limit.redis_sentinel_nodes",
                &self.redis_sentinel_nodes,
            )?;
            let master = match self.redis_sentinel_master.as_deref().map(str::trim) {
                Some(m) if !m.is_empty() && !m.chars().any(|c| c.is_whitespace()) => m.to_string(),
                _ => {
                    return Err(invalid(
                        "rate_limit.redis_sentinel_master",
                        "the sentinels need the master's name (e.g. `mymaster`)",
                    ))
                }
            };
            return Ok(Some(RedisTarget::Sentinel { nodes, master }));
        }
        Ok(None)
    }

    fn check(&self) -> Result<Option<RedisTarget>, ConfigError> {
        let target = self.redis_target()?;
        if !(1..=1000).contains(&self.budget_ms) {
            return Err(invalid(
                "rate_limit.budget_ms",
                "must be between 1 and 1000",
            ));
        }
        if !(10..=60_000).contains(&self.probe_interval_ms) {
            return Err(invalid(
                "rate_limit.probe_interval_ms",
                "must be between 10 and 60000",
            ));
        }
        if self.lease > MAX_LEASE {
            return Err(invalid(
                "rate_limit.lease",
                format!("must be at most {MAX_LEASE}"),
            ));
        }
        let p = &self.key_prefix;
        if p.is_empty()
            || p.len() > 64
            || p.contains(['{', '}'])
            || p.chars().any(|c| c.is_control() || c.is_whitespace())
        {
            return Err(invalid(
                "rate_limit.key_prefix",
                "1 to 64 printable characters without spaces, `{` or `}` (the gateway adds the hash tag)",
            ));
        }
        Ok(target)
    }
}

fn redis_urls(field: &'static str, list: &[String]) -> Result<Vec<String>, ConfigError> {
    let mut out: Vec<String> = Vec::with_capacity(list.len());
    for u in list {
        let u = redis_url(field, u)?;
        if out.contains(&u) {
            return Err(invalid(
                field,
                format!("`{}` is listed twice", redact_url(&u)),
            ));
        }
        out.push(u);
    }
    Ok(out)
}

/// A `redis://` or `rediss://` URL with a host; errors never echo the password.
fn redis_url(field: &'static str, value: &str) -> Result<String, ConfigError> {
    let value = value.trim();
    let url = url::Url::parse(value)
        .map_err(|e| invalid(field, format!("not a URL ({e}); use redis://host:port")))?;
    match url.scheme() {
        "redis" | "rediss" => {}
        other => {
            return Err(invalid(
                field,
                format!("unsupported scheme `{other}`; use redis:// or rediss:// (TLS)"),
            ))
        }
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(invalid(
            field,
            format!("`{}` has no host", redact_url(value)),
        ));
    }
    let path = url.path().trim_start_matches('/');
    if !path.is_empty() && path.parse::<u16>().is_err() {
        return Err(invalid(
            field,
            format!(
                "`{}`: the path must be a database number",
                redact_url(value)
            ),
        ));
    }
    Ok(value.to_string())
}

/// The validated runtime configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub file: FileConfig,
    /// The first (preferred) Consul agent.
    pub consul_address: String,
    /// Every Consul agent, in order of preference (`consul_address` first).
    pub consul_addresses: Vec<String>,
    pub consul_consistency: ConsulConsistency,
    /// The bound on stale answers (`consul.max_stale_s`), stale mode only.
    pub consul_max_stale: Option<Duration>,
    pub consul_token: Option<String>,
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    pub tls_listen: Option<SocketAddr>,
    pub redirect_listen: Option<SocketAddr>,
    pub wait: Duration,
    /// Where cluster-scope rate limits live (`[rate_limit]`); `None`: only local scope.
    pub redis: Option<RedisTarget>,
}

impl FileConfig {
    /// Reads and parses a TOML file; errors carry the path, line and field.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text).map_err(|message| ConfigError::Parse {
            path: path.to_path_buf(),
            message,
        })
    }

    pub fn parse(text: &str) -> Result<Self, String> {
        toml::from_str(text).map_err(|e| e.to_string())
    }

    /// Checks every setting and resolves what the gateway needs at run time.
    pub fn validate(self) -> Result<Config, ConfigError> {
        let consul_addresses = consul_addresses(&self.consul)?;
        let consul_address = consul_addresses[0].clone();
        let consul_consistency = match (self.consul.consistency, self.consul.stale) {
            (None, false) => ConsulConsistency::Default,
            (None, true) => ConsulConsistency::Stale,
            (Some(c), false) => c,
            (Some(ConsulConsistency::Stale), true) => ConsulConsistency::Stale,
            (Some(c), true) => {
                return Err(invalid(
                    "consul.stale",
                    format!(
                        "stale = true contradicts consistency = \"{}\"; set consistency alone",
                        c.name()
                    ),
                ))
            }
        };
        let consul_max_stale = match self.consul.max_stale_s {
            0 => None,
            _ if consul_consistency != ConsulConsistency::Stale => {
                return Err(invalid(
                    "consul.max_stale_s",
                    "bounds stale reads: it needs consistency = \"stale\"",
                ))
            }
            s => Some(Duration::from_secs(s)),
        };
        if !(4..=1 << 20).contains(&self.log.access_log_buffer_kib) {
            return Err(invalid(
                "log.access_log_buffer_kib",
                "must be between 4 and 1048576",
            ));
        }
        if !(1..=60_000).contains(&self.log.access_log_flush_ms) {
            return Err(invalid(
                "log.access_log_flush_ms",
                "must be between 1 and 60000",
            ));
        }
        if !(1..=600).contains(&self.consul.wait_s) {
            return Err(invalid("consul.wait_s", "must be between 1 and 600"));
        }
        if self.consul.max_backoff_s == 0 {
            return Err(invalid("consul.max_backoff_s", "must be at least 1"));
        }
        if !self.consul.kv_prefix.is_empty() && !self.consul.kv_prefix.ends_with('/') {
            return Err(invalid("consul.kv_prefix", "must end with '/'"));
        }
        if self.consul.kv_prefix.starts_with('/') {
            return Err(invalid("consul.kv_prefix", "must not start with '/'"));
        }
        match (&self.consul.client_cert, &self.consul.client_key) {
            (Some(_), None) | (None, Some(_)) => {
                return Err(invalid(
                    "consul.client_cert",
                    "client_cert and client_key go together",
                ))
            }
            _ => {}
        }
        match (&self.admin.token, &self.admin.token_file) {
            (Some(_), Some(_)) => {
                return Err(invalid("admin.token", "set token or token_file, not both"))
            }
            (Some(t), None) if t.trim().is_empty() => {
                return Err(invalid("admin.token", "must not be empty"))
            }
            (None, Some(path)) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| invalid("admin.token_file", format!("{}: {e}", path.display())))?;
                if text.trim().is_empty() {
                    return Err(invalid(
                        "admin.token_file",
                        format!("{}: the file holds no token", path.display()),
                    ));
                }
            }
            _ => {}
        }
        let consul_token = match (&self.consul.token, &self.consul.token_file) {
            (Some(_), Some(_)) => {
                return Err(invalid("consul.token", "set token or token_file, not both"))
            }
            (Some(t), None) => Some(t.clone()),
            (None, Some(path)) => Some(
                std::fs::read_to_string(path)
                    .map_err(|e| invalid("consul.token_file", format!("{}: {e}", path.display())))?
                    .trim()
                    .to_string(),
            ),
            (None, None) => None,
        }
        .filter(|t| !t.is_empty());

        let listen = parse_addr("proxy.listen", &self.proxy.listen)?;
        let admin_listen = parse_addr("admin.listen", &self.admin.listen)?;
        if self.proxy.max_connections == 0 {
            return Err(invalid("proxy.max_connections", "must be at least 1"));
        }
        if self.proxy.max_header_bytes < 1024 {
            return Err(invalid("proxy.max_header_bytes", "must be at least 1024"));
        }
        if self.proxy.header_read_timeout_ms == 0 {
            return Err(invalid("proxy.header_read_timeout_ms", "must be positive"));
        }
        if self.proxy.body_read_timeout_ms == 0 {
            return Err(invalid("proxy.body_read_timeout_ms", "must be positive"));
        }
        if self.proxy.retry_budget_percent > 100 {
            return Err(invalid("proxy.retry_budget_percent", "must be 0..=100"));
        }
        let (tls_listen, redirect_listen) = match &self.tls {
            None => (None, None),
            Some(tls) => {
                if tls.certificates.is_empty() {
                    return Err(invalid("tls.certificates", "at least one certificate"));
                }
                let redirect = tls
                    .redirect_http_listen
                    .as_deref()
                    .map(|a| parse_addr("tls.redirect_http_listen", a))
                    .transpose()?;
                (Some(parse_addr("tls.listen", &tls.listen)?), redirect)
            }
        };
        if self.registration.enabled && self.registration.service_name.trim().is_empty() {
            return Err(invalid("registration.service_name", "must not be empty"));
        }
        if self.auth.realm.is_empty()
            || self.auth.realm.contains(['"', '\\'])
            || self.auth.realm.chars().any(|c| c.is_control())
        {
            return Err(invalid(
                "auth.realm",
                "must be non-empty text without quotes",
            ));
        }
        if let Some(problem) = self.auth.failure_budget.problem() {
            return Err(invalid("auth.failure_budget", problem));
        }
        for (field, name) in [
            ("auth.api_key_header", &self.auth.api_key_header),
            ("auth.consumer_header", &self.auth.consumer_header),
        ]
        .into_iter()
        .chain(
            self.auth
                .strip_headers
                .iter()
                .map(|h| ("auth.strip_headers", h)),
        ) {
            if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
                return Err(invalid(field, format!("`{name}` is not a header name")));
            }
        }
        validate_tracing(&self.tracing)?;
        if self.log.level.trim().is_empty() {
            return Err(invalid("log.level", "must not be empty"));
        }
        let redis = self.rate_limit.check()?;
        let wait = Duration::from_secs(self.consul.wait_s);
        Ok(Config {
            file: self,
            consul_address,
            consul_addresses,
            consul_consistency,
            consul_max_stale,
            consul_token,
            listen,
            admin_listen,
            tls_listen,
            redirect_listen,
            wait,
            redis,
        })
    }
}

fn validate_tracing(t: &TracingSection) -> Result<(), ConfigError> {
    if !(0.0..=1.0).contains(&t.sample_ratio) {
        return Err(invalid("tracing.sample_ratio", "must be between 0 and 1"));
    }
    if t.service_name.trim().is_empty() {
        return Err(invalid("tracing.service_name", "must not be empty"));
    }
    if t.queue_size == 0 {
        return Err(invalid("tracing.queue_size", "must be at least 1"));
    }
    if t.batch_size == 0 || t.batch_size > t.queue_size {
        return Err(invalid(
            "tracing.batch_size",
            "must be between 1 and tracing.queue_size",
        ));
    }
    if t.export_interval_ms == 0 {
        return Err(invalid("tracing.export_interval_ms", "must be positive"));
    }
    if t.export_timeout_ms == 0 {
        return Err(invalid("tracing.export_timeout_ms", "must be positive"));
    }
    for (name, value) in &t.headers {
        if http::HeaderName::from_bytes(name.as_bytes()).is_err()
            || http::HeaderValue::from_str(value).is_err()
        {
            return Err(invalid(
                "tracing.headers",
                format!("`{name}` is not a header name with a valid value"),
            ));
        }
    }
    if let Some(endpoint) = &t.otlp_endpoint {
        let url = url::Url::parse(endpoint)
            .map_err(|e| invalid("tracing.otlp_endpoint", format!("`{endpoint}`: {e}")))?;
        let scheme_ok = match t.otlp_protocol {
            OtlpProtocol::HttpProtobuf => matches!(url.scheme(), "http" | "https"),
            OtlpProtocol::Grpc => url.scheme() == "http",
        };
        if !scheme_ok || url.host_str().is_none() {
            return Err(invalid(
                "tracing.otlp_endpoint",
                "must be an http:// or https:// URL with a host (grpc: http:// only)",
            ));
        }
    }
    Ok(())
}

fn parse_addr(field: &'static str, value: &str) -> Result<SocketAddr, ConfigError> {
    value
        .parse()
        .map_err(|e| invalid(field, format!("`{value}` is not an ip:port address: {e}")))
}

/// The agents of `[consul]`, normalized, in order: `addresses`, or `address` split at
/// commas, or the default. Empty entries, duplicates and both settings at once are refused.
fn consul_addresses(section: &ConsulSection) -> Result<Vec<String>, ConfigError> {
    let (field, listed): (&'static str, Vec<&str>) = match (&section.address, &section.addresses) {
        (Some(_), list) if !list.is_empty() => {
            return Err(invalid(
                "consul.addresses",
                "set address or addresses, not both",
            ))
        }
        (Some(a), _) => ("consul.address", a.split(',').collect()),
        (None, list) if !list.is_empty() => (
            "consul.addresses",
            list.iter().map(String::as_str).collect(),
        ),
        (None, _) => ("consul.address", vec![DEFAULT_CONSUL_ADDRESS]),
    };
    let mut out: Vec<String> = Vec::with_capacity(listed.len());
    for entry in listed {
        let url = normalize_consul_address(entry).map_err(|m| invalid(field, m))?;
        if out.contains(&url) {
            return Err(invalid(field, format!("`{url}` is listed twice")));
        }
        out.push(url);
    }
    Ok(out)
}

/// Accepts what the Consul CLI accepts in `CONSUL_HTTP_ADDR`: a URL, or `host:port`
/// meaning `http://host:port`. Returns the base URL without a trailing slash.
pub fn normalize_consul_address(addr: &str) -> Result<String, String> {
    let addr = addr.trim().trim_end_matches('/');
    if addr.is_empty() {
        return Err("empty address".into());
    }
    let with_scheme = if addr.contains("://") {
        addr.to_string()
    } else {
        format!("http://{addr}")
    };
    let url = url::Url::parse(&with_scheme).map_err(|e| format!("`{addr}`: {e}"))?;
    match url.scheme() {
        "http" | "https" => {}
        other => return Err(format!("unsupported scheme `{other}`")),
    }
    if url.host_str().is_none() {
        return Err(format!("`{addr}` has no host"));
    }
    Ok(with_scheme)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consul_address_accepts_host_port_like_the_cli() {
        assert_eq!(
            normalize_consul_address("127.0.0.1:8500").unwrap(),
            "http://127.0.0.1:8500"
        );
        assert_eq!(
            normalize_consul_address("https://consul.local:8501/").unwrap(),
            "https://consul.local:8501"
        );
        assert!(normalize_consul_address("ftp://x").is_err());
        assert!(normalize_consul_address("").is_err());
    }

    #[test]
    fn several_consul_addresses_come_as_a_list_or_a_comma_separated_address() {
        let parse = |text: &str| FileConfig::parse(text).unwrap().validate();
        let cfg = parse("[consul]\naddress = \"127.0.0.1:8500, https://c2:8501\"\n").unwrap();
        assert_eq!(
            cfg.consul_addresses,
            ["http://127.0.0.1:8500", "https://c2:8501"]
        );
        assert_eq!(cfg.consul_address, "http://127.0.0.1:8500");
        let cfg = parse("[consul]\naddresses = [\"a:1\", \"b:2\"]\n").unwrap();
        assert_eq!(cfg.consul_addresses, ["http://a:1", "http://b:2"]);
        let cfg = parse("").unwrap();
        assert_eq!(cfg.consul_addresses, [DEFAULT_CONSUL_ADDRESS]);
        for (bad, field) in [
            (
                "address = \"a:1\"\naddresses = [\"b:2\"]",
                "consul.addresses",
            ),
            ("address = \"a:1,,b:2\"", "consul.address"),
            ("address = \"a:1,\"", "consul.address"),
            ("addresses = [\"a:1\", \"http://a:1\"]", "consul.addresses"),
            ("addresses = [\"ftp://a:1\"]", "consul.addresses"),
        ] {
            let err = parse(&format!("[consul]\n{bad}\n"))
                .unwrap_err()
                .to_string();
            assert!(err.contains(field), "{bad}: {err}");
        }
    }

    #[test]
    fn consistency_modes_and_their_bounds_are_checked() {
        let parse = |text: &str| FileConfig::parse(text).unwrap().validate();
        assert_eq!(
            parse("").unwrap().consul_consistency,
            ConsulConsistency::Default
        );
        assert_eq!(
            parse("[consul]\nstale = true\n")
                .unwrap()
                .consul_consistency,
            ConsulConsistency::Stale
        );
        let cfg = parse("[consul]\nconsistency = \"stale\"\nmax_stale_s = 5\n").unwrap();
        assert_eq!(cfg.consul_max_stale, Some(Duration::from_secs(5)));
        for mode in ["default", "leader", "consistent"] {
            let cfg = parse(&format!("[consul]\nconsistency = \"{mode}\"\n")).unwrap();
            assert_eq!(cfg.consul_consistency.name(), mode);
            let err = parse(&format!(
                "[consul]\nconsistency = \"{mode}\"\nmax_stale_s = 5\n"
            ))
            .unwrap_err();
            assert!(err.to_string().contains("consul.max_stale_s"), "{err}");
        }
        let err = parse("[consul]\nconsistency = \"consistent\"\nstale = true\n").unwrap_err();
        assert!(err.to_string().contains("consul.stale"), "{err}");
        assert!(FileConfig::parse("[consul]\nconsistency = \"eventual\"\n").is_err());
    }

    #[test]
    fn empty_file_gives_defaults() {
        let cfg = FileConfig::parse("").unwrap().validate().unwrap();
        assert_eq!(cfg.listen, "0.0.0.0:8080".parse().unwrap());
        assert_eq!(cfg.admin_listen, "127.0.0.1:9901".parse().unwrap());
        assert_eq!(cfg.file.consul.kv_prefix, "switchyard/");
    }

    #[test]
    fn unknown_field_is_named_with_its_line() {
        let err = FileConfig::parse("[proxy]\nlisten = \"127.0.0.1:1\"\nlisen = 3\n").unwrap_err();
        assert!(err.contains("lisen"), "{err}");
        assert!(err.contains("line 3"), "{err}");
    }

    #[test]
    fn bad_values_name_the_field() {
        let err = FileConfig::parse("[consul]\nwait_s = 0\n")
            .unwrap()
            .validate()
            .unwrap_err();
        assert!(err.to_string().contains("consul.wait_s"));
        let err = FileConfig::parse("[proxy]\nlisten = \"nope\"\n")
            .unwrap()
            .validate()
            .unwrap_err();
        assert!(err.to_string().contains("proxy.listen"));
    }

    #[test]
    fn auth_settings_are_checked() {
        let cfg = FileConfig::parse("").unwrap().validate().unwrap();
        assert_eq!(cfg.file.auth.api_key_header, "X-API-Key");
        let err = FileConfig::parse("[auth]\napi_key_header = \"bad header\"\n")
            .unwrap()
            .validate()
            .unwrap_err();
        assert!(err.to_string().contains("auth.api_key_header"), "{err}");
        let err = FileConfig::parse("[auth]\nrealm = 'a\"b'\n")
            .unwrap()
            .validate()
            .unwrap_err();
        assert!(err.to_string().contains("auth.realm"), "{err}");
        assert_eq!(cfg.file.auth.failure_budget.burst, 20);
        assert_eq!(cfg.file.auth.failure_budget.global_burst, 1000);
        assert_eq!(cfg.file.auth.failure_budget.refusal_delay_ms, 1000);
        for bad in [
            "per_second = 0.0",
            "per_second = nan",
            "max_clients = 0",
            "global_per_second = 0.0",
            "global_per_second = inf",
            "global_burst = 1000001",
            "refusal_delay_ms = 60001",
        ] {
            let err = FileConfig::parse(&format!("[auth.failure_budget]\n{bad}\n"))
                .unwrap()
                .validate()
                .unwrap_err();
            assert!(
                err.to_string().contains("auth.failure_budget"),
                "{bad}: {err}"
            );
        }
        let off = "[auth.failure_budget]\nburst = 0\nper_second = 0.0\n";
        FileConfig::parse(off).unwrap().validate().unwrap();
        let off = "[auth.failure_budget]\nglobal_burst = 0\nglobal_per_second = 0.0\n";
        FileConfig::parse(off).unwrap().validate().unwrap();
        let err = FileConfig::parse("[auth.failure_budget]\nglobal_per_second = -1.0\n")
            .unwrap()
            .validate()
            .unwrap_err();
        assert!(err.to_string().contains("global_per_second"), "{err}");
    }

    #[test]
    fn rate_limit_stores_are_checked_and_never_echo_a_password() {
        let parse = |text: &str| FileConfig::parse(text).unwrap().validate();
        let cfg = parse("").unwrap();
        assert_eq!(cfg.redis, None);
        assert_eq!(cfg.file.rate_limit.budget_ms, 5);
        assert_eq!(cfg.file.rate_limit.lease, 0);
        assert_eq!(cfg.file.rate_limit.on_store_error, StoreErrorPolicy::Local);
        let cfg =
            parse("[rate_limit]\nredis_url = \"rediss://:s3cret@r.internal:6380/2\"\n").unwrap();
        let target = cfg.redis.unwrap();
        assert_eq!(target.kind(), "single");
        assert_eq!(target.redacted_urls(), ["rediss://r.internal:6380/2"]);
        let cfg = parse(
            "[rate_limit]\nredis_cluster_nodes = [\"redis://a:7000\", \"redis://b:7001\"]\non_store_error = \"deny\"\nlease = 10\n",
        )
        .unwrap();
        assert_eq!(
            cfg.redis,
            Some(RedisTarget::Cluster(vec![
                "redis://a:7000".into(),
                "redis://b:7001".into()
            ]))
        );
        let cfg = parse(
            "[rate_limit]\nredis_sentinel_nodes = [\"redis://s1:26379\"]\nredis_sentinel_master = \"mymaster\"\n",
        )
        .unwrap();
        assert_eq!(cfg.redis.unwrap().kind(), "sentinel");
        for (bad, field) in [
            (
                "redis_url = \"http://u:s3cret@a:1\"",
                "rate_limit.redis_url",
            ),
            (
                "redis_url = \"redis://:s3cret@a:1/x\"",
                "rate_limit.redis_url",
            ),
            ("redis_url = \"nope\"", "rate_limit.redis_url"),
            (
                "redis_url = \"redis://a:1\"\nredis_cluster_nodes = [\"redis://b:2\"]",
                "rate_limit.redis_url",
            ),
            (
                "redis_cluster_nodes = [\"redis://:s3cret@b:2\", \"redis://:s3cret@b:2\"]",
                "rate_limit.redis_cluster_nodes",
            ),
            (
                "redis_sentinel_master = \"m\"",
                "rate_limit.redis_sentinel_nodes",
            ),
            (
                "redis_sentinel_nodes = [\"redis://s:26379\"]",
                "rate_limit.redis_sentinel_master",
            ),
            ("budget_ms = 0", "rate_limit.budget_ms"),
            ("probe_interval_ms = 1", "rate_limit.probe_interval_ms"),
            ("lease = 100000", "rate_limit.lease"),
            ("key_prefix = \"a{b\"", "rate_limit.key_prefix"),
            ("key_prefix = \"\"", "rate_limit.key_prefix"),
        ] {
            let err = parse(&format!("[rate_limit]\n{bad}\n"))
                .unwrap_err()
                .to_string();
            assert!(err.contains(field), "{bad}: {err}");
            assert!(!err.contains("s3cret"), "{bad}: {err}");
        }
        assert!(FileConfig::parse("[rate_limit]\non_store_error = \"maybe\"\n").is_err());
    }

    #[test]
    fn example_config_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/switchyard.toml");
        FileConfig::load(&path).unwrap().validate().unwrap();
    }
}
