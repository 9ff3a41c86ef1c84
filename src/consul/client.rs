//! The reqwest wrapper: one pooled client per gateway, shared by every clone: the agent
//! addresses ([`AgentPool`]), the ACL token ([`AclToken`]), the consistency mode of reads,
//! TLS set up the way the Consul CLI does it, and read timeouts that outlast a blocking query.
//!
//! Reads go to the active agent; a read that cannot reach it moves the pool to the next
//! address. Agent endpoints (the gateway's own registration) always go to the first
//! address, the local agent: registering on another node would leave a stray instance
//! there. [`ConsulClient::upkeep`] re-reads the token file, notices a refused token that
//! works again, checks the active agent is alive and moves back to a preferred one.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, StatusCode};
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use serde::Serialize;
use tokio::sync::watch;
use tokio::time::Instant;

use super::agents::{AgentChoice, AgentPool, AgentsReport};
use super::token::{AclToken, TokenReport};
use super::{ConsulError, Index, ServiceRegistration};

/// Slack on top of `wait + wait/16` (the server's jitter) before a read counts as stalled.
const READ_SLACK: Duration = Duration::from_secs(5);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Timeout of agent calls (registration): unlike watch reads, they never block server-side.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest error body kept in an error message.
const MAX_ERROR_BODY: usize = 512;
/// Tick of [`ConsulClient::upkeep`]: token file re-read, refused-token retry.
const UPKEEP_TICK: Duration = Duration::from_secs(1);
/// How often the active agent is asked whether it is alive, and how long it has to answer.
const LIVENESS_EVERY: Duration = Duration::from_secs(2);
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// The liveness probe's timeout when there is a single agent.
const SINGLE_AGENT_PROBE_TIMEOUT: Duration = Duration::from_millis(500);
/// Probes of the only agent after it missed one: short, and one every 100 ms.
const RECOVERY_PROBE_TIMEOUT: Duration = Duration::from_millis(250);
const RECOVERY_PROBE_EVERY: Duration = Duration::from_millis(100);
/// Refused reads the upkeep retries per tick (the rest wait for their own watch's retry).
const REFUSED_RETRIES_PER_TICK: usize = 4;

/// Who reads: a watch (its refusals keep a refused read on record), or the upkeep retrying
/// a refused read (which must not keep alive a read whose watch has stopped).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Asker {
    Watch,
    Upkeep,
}

/// How reads may be served (Consul's consistency modes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Consistency {
    /// No parameter: Consul's default for the agent (the leader answers, unless the
    /// operator set `discovery_max_stale`, which makes catalog and health reads stale).
    #[default]
    Default,
    /// `?leader`: the default mode even where the agent's `discovery_max_stale` applies.
    Leader,
    /// `?stale`: any server answers, also without a leader. With `max_stale`, an answer from
    /// a server that last heard from the leader longer ago is read again from the leader.
    Stale { max_stale: Option<Duration> },
    /// `?consistent`: the leader confirms its leadership with a quorum first.
    Consistent,
}

impl Consistency {
    pub fn name(self) -> &'static str {
        match self {
            Consistency::Default => "default",
            Consistency::Leader => "leader",
            Consistency::Stale { .. } => "stale",
            Consistency::Consistent => "consistent",
        }
    }

    /// The query parameters of the mode, spelled as the Go client sends them.
    fn params(self) -> Vec<(&'static str, String)> {
        match self {
            Consistency::Default => Vec::new(),
            Consistency::Leader => vec![("leader", String::new())],
            Consistency::Stale { max_stale: None } => vec![("stale", String::new())],
            Consistency::Stale {
                max_stale: Some(max),
            } => vec![("stale", String::new()), ("max_stale", go_duration(max))],
            Consistency::Consistent => vec![("consistent", String::new())],
        }
    }
}

/// What a [`ConsulClient`] needs. Built by the application from its configuration.
#[derive(Debug, Clone)]
pub struct ClientSettings {
    /// Base URLs, `http(s)://host:port` without a trailing slash, in order of preference
    /// (the local agent first). At least one.
    pub addresses: Vec<String>,
    pub token: Option<String>,
    /// A file holding the token, read again while running (wins over `token`).
    pub token_file: Option<PathBuf>,
    pub datacenter: Option<String>,
    pub consistency: Consistency,
    /// The `wait` of every blocking query.
    pub wait: Duration,
    /// With several addresses: how often an earlier one is tried while a later one is
    /// active (`None`: stay on the one that works).
    pub failback: Option<Duration>,
    /// PEM CA bundle that the agent's certificate must chain to.
    pub ca_cert: Option<PathBuf>,
    /// PEM client certificate and key, for agents with `verify_incoming`.
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
}

impl ClientSettings {
    pub fn new(address: impl Into<String>, wait: Duration) -> ClientSettings {
        ClientSettings {
            addresses: vec![address.into()],
            token: None,
            token_file: None,
            datacenter: None,
            consistency: Consistency::Default,
            wait,
            failback: None,
            ca_cert: None,
            client_cert: None,
            client_key: None,
        }
    }

    /// Fills TLS paths left unset from `CONSUL_CACERT`, `CONSUL_CLIENT_CERT` and
    /// `CONSUL_CLIENT_KEY`, as the Consul CLI reads them (explicit settings win).
    pub fn with_tls_env(mut self) -> ClientSettings {
        let env = |name: &str| {
            std::env::var_os(name)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        };
        if self.ca_cert.is_none() {
            self.ca_cert = env("CONSUL_CACERT");
        }
        if self.client_cert.is_none() && self.client_key.is_none() {
            self.client_cert = env("CONSUL_CLIENT_CERT");
            self.client_key = env("CONSUL_CLIENT_KEY");
        }
        self
    }
}

/// One answer to a read: the body (absent for a KV miss) and the metadata headers.
#[derive(Debug, Clone)]
pub struct QueryAnswer {
    /// `None` when a KV key or prefix does not exist (404 with an index: not an error).
    pub body: Option<Bytes>,
    /// `X-Consul-Index` as sent; the watch applies the reset rules.
    pub index: u64,
    /// `X-Consul-KnownLeader`: `false` when the answering server knows no leader (only a
    /// stale read answers then).
    pub known_leader: bool,
    /// `X-Consul-LastContact`: milliseconds since the answering server heard from the leader.
    pub last_contact_ms: u64,
    /// `X-Consul-Effective-Consistency` (`leader`, `stale`, `consistent`), when sent.
    pub effective_consistency: Option<String>,
    /// The agent that answered.
    pub agent: String,
}

/// Which watches must wake: the pool moved to another agent (queries waiting on the one
/// left are abandoned), or the token changed or works again (retry without waiting out a
/// backoff).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Epoch {
    pub agent: u64,
    pub token: u64,
}

/// The metadata of the last answer any watch got.
#[derive(Debug, Clone)]
struct LastAnswer {
    at: Instant,
    agent: String,
    known_leader: bool,
    last_contact_ms: u64,
    effective_consistency: Option<String>,
}

/// What the admin API shows about the client.
#[derive(Debug, Clone, Serialize)]
pub struct ClientReport {
    pub agents: AgentsReport,
    pub consistency: &'static str,
    pub max_stale_s: Option<f64>,
    pub token: TokenReport,
    /// The last answer to any read: who gave it, how long ago, and its leader headers.
    pub last_answer: Option<LastAnswerReport>,
}

#[derive(Debug, Clone, Serialize)]
pub struct LastAnswerReport {
    pub agent: String,
    pub age_s: f64,
    pub known_leader: bool,
    pub last_contact_ms: u64,
    pub effective_consistency: Option<String>,
}

/// What every clone of a client shares.
#[derive(Debug)]
struct Shared {
    agents: AgentPool,
    token: AclToken,
    datacenter: Option<String>,
    consistency: Consistency,
    wait: Duration,
    epochs: watch::Sender<Epoch>,
    last_answer: Mutex<Option<LastAnswer>>,
}

/// A cheap-to-clone Consul HTTP client.
#[derive(Debug, Clone)]
pub struct ConsulClient {
    http: reqwest::Client,
    shared: Arc<Shared>,
}

/// Characters escaped in one path segment (a service name).
const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');
/// Characters escaped in a KV key: `/` separates levels and stays.
const KV_KEY: &AsciiSet = &SEGMENT.remove(b'/');

impl ConsulClient {
    pub fn new(settings: &ClientSettings) -> Result<ConsulClient, ConsulError> {
        let mut addresses = Vec::with_capacity(settings.addresses.len());
        for address in &settings.addresses {
            let base = address.trim_end_matches('/').to_string();
            if !(base.starts_with("http://") || base.starts_with("https://")) {
                return Err(ConsulError::Setup(format!(
                    "address `{base}` must start with http:// or https://"
                )));
            }
            addresses.push(base);
        }
        if addresses.is_empty() {
            return Err(ConsulError::Setup("no consul address".into()));
        }
        let mut builder = reqwest::Client::builder()
            .use_rustls_tls()
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_nodelay(true)
            .pool_idle_timeout(Duration::from_secs(90));
        if let Some(ca) = &settings.ca_cert {
            let pem = read(ca, "CA certificate")?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem)
                .map_err(|e| ConsulError::Setup(format!("CA certificate {}: {e}", ca.display())))?;
            if certs.is_empty() {
                return Err(ConsulError::Setup(format!(
                    "CA certificate {}: no certificate found",
                    ca.display()
                )));
            }
            builder = builder.tls_built_in_root_certs(false);
            for cert in certs {
                builder = builder.add_root_certificate(cert);
            }
        }
        match (&settings.client_cert, &settings.client_key) {
            (Some(cert), Some(key)) => {
                let mut pem = read(cert, "client certificate")?;
                pem.push(b'\n');
                pem.extend(read(key, "client key")?);
                let identity = reqwest::Identity::from_pem(&pem).map_err(|e| {
                    ConsulError::Setup(format!(
                        "client certificate {} / key {}: {e}",
                        cert.display(),
                        key.display()
                    ))
                })?;
                builder = builder.identity(identity);
            }
            (None, None) => {}
            _ => {
                return Err(ConsulError::Setup(
                    "a client certificate needs its key and the other way round".into(),
                ))
            }
        }
        let http = builder
            .build()
            .map_err(|e| ConsulError::Setup(e.to_string()))?;
        let token = AclToken::new(settings.token.clone(), settings.token_file.clone())?;
        Ok(ConsulClient {
            http,
            shared: Arc::new(Shared {
                agents: AgentPool::new(addresses, settings.failback),
                token,
                datacenter: settings.datacenter.clone(),
                consistency: settings.consistency,
                wait: settings.wait,
                epochs: watch::channel(Epoch::default()).0,
                last_answer: Mutex::new(None),
            }),
        })
    }

    /// The first (preferred) address: the local agent.
    pub fn address(&self) -> &str {
        self.shared.agents.address(0)
    }

    /// Every address, in order of preference.
    pub fn addresses(&self) -> &[String] {
        self.shared.agents.addresses()
    }

    /// The address reads go to now.
    pub fn active_address(&self) -> &str {
        self.shared
            .agents
            .address(self.shared.agents.current().index)
    }

    pub fn wait(&self) -> Duration {
        self.shared.wait
    }

    pub fn consistency(&self) -> Consistency {
        self.shared.consistency
    }

    /// The longest a blocking read may take before the client gives up on it:
    /// the server may hold it for `wait + wait/16`.
    pub fn read_timeout(&self) -> Duration {
        self.shared.wait + self.shared.wait / 16 + READ_SLACK
    }

    /// Changes every watch of this client must react to (see [`Epoch`]).
    pub fn epochs(&self) -> watch::Receiver<Epoch> {
        self.shared.epochs.subscribe()
    }

    /// Agents, consistency, token state and the last answer, for the admin API.
    pub fn report(&self) -> ClientReport {
        let last = self
            .shared
            .last_answer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        ClientReport {
            agents: self.shared.agents.report(),
            consistency: self.shared.consistency.name(),
            max_stale_s: match self.shared.consistency {
                Consistency::Stale { max_stale } => max_stale.map(|d| d.as_secs_f64()),
                _ => None,
            },
            token: self.shared.token.report(),
            last_answer: last.map(|a| LastAnswerReport {
                agent: a.agent,
                age_s: a.at.elapsed().as_secs_f64(),
                known_leader: a.known_leader,
                last_contact_ms: a.last_contact_ms,
                effective_consistency: a.effective_consistency,
            }),
        }
    }

    /// A read of `path` (e.g. `/v1/health/service/web`) that blocks until Consul's index
    /// passes `index` or `wait` elapses; `Index::ZERO` answers at once. `query` holds extra
    /// parameters such as `("recurse", "")`. Under `/v1/kv/` a 404 is the normal answer for
    /// a missing key and comes back as `body: None` with its index.
    ///
    /// In stale mode with `max_stale`, an answer whose server lags the leader by more than
    /// that is read again once from the leader, as Consul's own agents do.
    pub async fn blocking_get(
        &self,
        path: &str,
        query: &[(&str, &str)],
        index: Index,
    ) -> Result<QueryAnswer, ConsulError> {
        let consistency = self.shared.consistency;
        let answer = self
            .read(path, query, index, consistency, Asker::Watch)
            .await?;
        if let Consistency::Stale {
            max_stale: Some(max),
        } = consistency
        {
            if Duration::from_millis(answer.last_contact_ms) > max {
                tracing::debug!(
                    path,
                    last_contact_ms = answer.last_contact_ms,
                    max_stale_ms = max.as_millis() as u64,
                    "stale answer too old; reading from the leader"
                );
                metrics::counter!(crate::metrics::CONSUL_STALE_REREADS).increment(1);
                return self
                    .read(path, query, index, Consistency::Leader, Asker::Watch)
                    .await;
            }
        }
        Ok(answer)
    }

    /// One read from the active agent; reports what it learnt to the pool and the token.
    async fn read(
        &self,
        path: &str,
        query: &[(&str, &str)],
        index: Index,
        consistency: Consistency,
        asker: Asker,
    ) -> Result<QueryAnswer, ConsulError> {
        let choice = self.shared.agents.current();
        let base = self.shared.agents.address(choice.index);
        let result = self.send_read(base, path, query, index, consistency).await;
        match &result {
            Ok(answer) => {
                if self.shared.token.accepted(path) {
                    self.publish_epoch();
                }
                metrics::gauge!(crate::metrics::CONSUL_KNOWN_LEADER, "agent" => base.to_string())
                    .set(if answer.known_leader { 1.0 } else { 0.0 });
                metrics::gauge!(crate::metrics::CONSUL_LAST_CONTACT, "agent" => base.to_string())
                    .set(answer.last_contact_ms as f64 / 1000.0);
                *self
                    .shared
                    .last_answer
                    .lock()
                    .unwrap_or_else(|p| p.into_inner()) = Some(LastAnswer {
                    at: Instant::now(),
                    agent: answer.agent.clone(),
                    known_leader: answer.known_leader,
                    last_contact_ms: answer.last_contact_ms,
                    effective_consistency: answer.effective_consistency.clone(),
                });
            }
            Err(ConsulError::Transport(why)) => self.unreachable(choice, why),
            Err(ConsulError::Refused { message }) => match asker {
                Asker::Watch => self.shared.token.refused(path, message),
                Asker::Upkeep => self.shared.token.still_refused(path, message),
            },
            Err(_) => {}
        }
        result
    }

    async fn send_read(
        &self,
        base: &str,
        path: &str,
        query: &[(&str, &str)],
        index: Index,
        consistency: Consistency,
    ) -> Result<QueryAnswer, ConsulError> {
        let url = format!("{base}{path}");
        let wait = go_duration(self.shared.wait);
        let index_s = index.get().to_string();
        let consistency_params = consistency.params();
        let mut params: Vec<(&str, &str)> = query.to_vec();
        if index != Index::ZERO {
            params.push(("index", &index_s));
            params.push(("wait", &wait));
        }
        params.extend(consistency_params.iter().map(|(k, v)| (*k, v.as_str())));
        // A query naming its own datacenter (a failover watch) keeps it.
        if let Some(dc) = &self.shared.datacenter {
            if !query.iter().any(|(k, _)| *k == "dc") {
                params.push(("dc", dc));
            }
        }
        let mut req = self
            .http
            .get(&url)
            .query(&params)
            .timeout(self.read_timeout());
        if let Some(t) = self.shared.token.header() {
            req = req.header("X-Consul-Token", t);
        }
        let resp = req.send().await.map_err(transport)?;
        let status = resp.status();
        let headers = resp.headers().clone();
        let body = resp.bytes().await.map_err(transport)?;
        let absent = status == StatusCode::NOT_FOUND && path.starts_with("/v1/kv/");
        if !status.is_success() && !absent {
            return Err(status_error(status, &body));
        }
        let index = header_u64(&headers, "x-consul-index").ok_or(ConsulError::NoIndex)?;
        Ok(QueryAnswer {
            body: if absent { None } else { Some(body) },
            index,
            known_leader: headers
                .get("x-consul-knownleader")
                .is_some_and(|v| v.as_bytes() == b"true"),
            last_contact_ms: header_u64(&headers, "x-consul-lastcontact").unwrap_or(0),
            effective_consistency: headers
                .get("x-consul-effective-consistency")
                .and_then(|v| v.to_str().ok())
                .filter(|v| matches!(*v, "leader" | "stale" | "consistent"))
                .map(str::to_string),
            agent: base.to_string(),
        })
    }

    fn unreachable(&self, choice: AgentChoice, why: &str) {
        if self.shared.agents.unreachable(choice, why) {
            self.publish_epoch();
        }
    }

    fn publish_epoch(&self) {
        let epoch = Epoch {
            agent: self.shared.agents.current().generation,
            token: self.shared.token.generation(),
        };
        self.shared.epochs.send_if_modified(|e| {
            let changed = *e != epoch;
            *e = epoch;
            changed
        });
    }

    /// Background care until `until` completes: re-reads the token file every second;
    /// while Consul refuses the token, retries refused reads every second so a token that
    /// works again is noticed at once; checks the active agent is alive (with a single
    /// address, asks every waiting query again once it answers after missing a probe);
    /// with several addresses, moves back to a preferred one that answers again. Run it
    /// once per client (its clones share what it maintains).
    pub async fn upkeep(&self, until: impl Future<Output = ()>) {
        tokio::pin!(until);
        let mut tick = tokio::time::interval(UPKEEP_TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_liveness = Instant::now();
        loop {
            tokio::select! {
                _ = &mut until => return,
                _ = tick.tick() => {}
            }
            let work = async {
                if self.shared.token.reload() {
                    self.publish_epoch();
                }
                for path in self.shared.token.refused_paths(REFUSED_RETRIES_PER_TICK) {
                    let _ = self
                        .read(
                            &path,
                            &[],
                            Index::ZERO,
                            self.shared.consistency,
                            Asker::Upkeep,
                        )
                        .await;
                }
                if self.shared.agents.len() == 1 && self.shared.agents.missed_a_probe() {
                    self.until_the_only_agent_answers().await;
                } else if last_liveness.elapsed() >= LIVENESS_EVERY {
                    last_liveness = Instant::now();
                    // With one agent a missed probe moves nothing; waiting long for it
                    // would only delay noticing that the agent answers again.
                    let timeout = match self.shared.agents.len() {
                        1 => SINGLE_AGENT_PROBE_TIMEOUT,
                        _ => PROBE_TIMEOUT,
                    };
                    self.check_liveness(timeout).await;
                }
                if self.shared.agents.len() > 1 {
                    self.try_failback().await;
                }
            };
            tokio::select! {
                _ = &mut until => return,
                _ = work => {}
            }
        }
    }

    /// Asks the active agent whether it is alive (any HTTP answer will do).
    async fn check_liveness(&self, timeout: Duration) {
        let choice = self.shared.agents.current();
        let answered = self
            .probe(self.shared.agents.address(choice.index), timeout)
            .await
            .map(|_| ());
        if self.shared.agents.probed(choice, answered) {
            self.publish_epoch();
        }
    }

    /// The only agent missed a probe: probes it in quick succession for up to a tick, so
    /// that once it has missed two, the queries it took while it did not answer are asked
    /// again (see [`AgentPool::probed`]) within moments of it answering, not after a whole
    /// blocking wait.
    async fn until_the_only_agent_answers(&self) {
        let end = Instant::now() + UPKEEP_TICK;
        while self.shared.agents.missed_a_probe() && Instant::now() < end {
            let started = Instant::now();
            self.check_liveness(RECOVERY_PROBE_TIMEOUT).await;
            tokio::time::sleep_until(started + RECOVERY_PROBE_EVERY).await;
        }
    }

    /// Moves back to the best earlier address that answers `200` again.
    async fn try_failback(&self) {
        let (choice, candidates) = self.shared.agents.failback_candidates();
        for index in candidates {
            let address = self.shared.agents.address(index);
            if let Ok(StatusCode::OK) = self.probe(address, PROBE_TIMEOUT).await {
                if self.shared.agents.move_from(choice, index, "answers again") {
                    self.publish_epoch();
                }
                return;
            }
        }
    }

    /// `GET /v1/status/leader` (no ACL, never blocks): the status, or why there is none.
    async fn probe(&self, base: &str, timeout: Duration) -> Result<StatusCode, String> {
        let mut req = self
            .http
            .get(format!("{base}/v1/status/leader"))
            .timeout(timeout);
        if let Some(dc) = &self.shared.datacenter {
            req = req.query(&[("dc", dc)]);
        }
        match req.send().await {
            Ok(resp) => Ok(resp.status()),
            Err(e) => Err(transport_message(&e)),
        }
    }
}

impl ConsulClient {
    /// `PUT /v1/agent/service/register`: registers (or replaces) a service on the agent.
    pub async fn agent_service_register(
        &self,
        registration: &ServiceRegistration,
    ) -> Result<(), ConsulError> {
        let body =
            serde_json::to_vec(registration).map_err(|e| ConsulError::Decode(e.to_string()))?;
        self.put("/v1/agent/service/register", Some(body)).await
    }

    /// `PUT /v1/agent/service/deregister/<id>`: removes a service and its checks.
    pub async fn agent_service_deregister(&self, id: &str) -> Result<(), ConsulError> {
        let path = format!(
            "/v1/agent/service/deregister/{}",
            utf8_percent_encode(id, SEGMENT)
        );
        self.put(&path, None).await
    }

    /// `GET /v1/agent/service/<id>`: is the service registered on the agent?
    pub async fn agent_service_exists(&self, id: &str) -> Result<bool, ConsulError> {
        let url = format!(
            "{}/v1/agent/service/{}",
            self.address(),
            utf8_percent_encode(id, SEGMENT)
        );
        let mut req = self.http.get(url).timeout(WRITE_TIMEOUT);
        if let Some(t) = self.shared.token.header() {
            req = req.header("X-Consul-Token", t);
        }
        let resp = req.send().await.map_err(transport)?;
        match resp.status() {
            s if s.is_success() => Ok(true),
            StatusCode::NOT_FOUND => Ok(false),
            s => {
                let body = resp.bytes().await.unwrap_or_default();
                Err(status_error(s, &body))
            }
        }
    }

    /// A write to the local agent, the first address whatever the active one (agent
    /// endpoints act on the agent's own node, and take no `dc`).
    async fn put(&self, path: &str, body: Option<Vec<u8>>) -> Result<(), ConsulError> {
        let mut req = self
            .http
            .put(format!("{}{}", self.address(), path))
            .timeout(WRITE_TIMEOUT);
        if let Some(t) = self.shared.token.header() {
            req = req.header("X-Consul-Token", t);
        }
        if let Some(b) = body {
            req = req
                .header(http::header::CONTENT_TYPE, "application/json")
                .body(b);
        }
        let resp = req.send().await.map_err(transport)?;
        let status = resp.status();
        if status.is_success() {
            return Ok(());
        }
        let body = resp.bytes().await.unwrap_or_default();
        Err(status_error(status, &body))
    }
}

/// `/v1/health/service/<name>` with the name escaped.
pub fn health_service_path(service: &str) -> String {
    format!(
        "/v1/health/service/{}",
        utf8_percent_encode(service, SEGMENT)
    )
}

/// `/v1/kv/<key>` with the key escaped level by level.
pub fn kv_path(key: &str) -> String {
    format!("/v1/kv/{}", utf8_percent_encode(key, KV_KEY))
}

fn header_u64(headers: &HeaderMap, name: &str) -> Option<u64> {
    headers.get(name)?.to_str().ok()?.trim().parse().ok()
}

fn transport(e: reqwest::Error) -> ConsulError {
    ConsulError::Transport(transport_message(&e))
}

/// reqwest's Display hides the cause ("error sending request"): keep the chain.
fn transport_message(e: &reqwest::Error) -> String {
    let mut msg = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        source = s.source();
    }
    msg
}

/// A non-success answer: 403 is the token's problem, anything else a status error.
fn status_error(status: StatusCode, body: &[u8]) -> ConsulError {
    let text = String::from_utf8_lossy(&body[..body.len().min(MAX_ERROR_BODY)])
        .trim()
        .to_string();
    if status == StatusCode::FORBIDDEN {
        return ConsulError::Refused { message: text };
    }
    ConsulError::Status {
        status: status.as_u16(),
        body: text,
    }
}

/// A duration as Go's `time.ParseDuration` reads it, in milliseconds as the Go client
/// sends `wait` (never `0ms` for a positive duration, which would mean "default").
fn go_duration(d: Duration) -> String {
    format!("{}ms", d.as_millis().max(1))
}

fn read(path: &Path, what: &str) -> Result<Vec<u8>, ConsulError> {
    std::fs::read(path).map_err(|e| ConsulError::Setup(format!("{what} {}: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_escape_what_consul_would_misread() {
        assert_eq!(health_service_path("web"), "/v1/health/service/web");
        assert_eq!(health_service_path("a b/c"), "/v1/health/service/a%20b%2Fc");
        assert_eq!(
            kv_path("switchyard/routes/a b"),
            "/v1/kv/switchyard/routes/a%20b"
        );
    }

    #[test]
    fn the_read_timeout_outlasts_the_server_jitter() {
        let c = ConsulClient::new(&ClientSettings::new(
            "http://127.0.0.1:8500",
            Duration::from_secs(160),
        ))
        .unwrap();
        assert!(c.read_timeout() >= Duration::from_secs(170));
    }

    #[test]
    fn an_address_without_scheme_is_refused() {
        let err = ConsulClient::new(&ClientSettings::new(
            "127.0.0.1:8500",
            Duration::from_secs(1),
        ))
        .unwrap_err();
        assert!(err.to_string().contains("http://"), "{err}");
    }

    #[test]
    fn a_missing_ca_file_is_named() {
        let mut s = ClientSettings::new("https://127.0.0.1:8501", Duration::from_secs(1));
        s.ca_cert = Some("/nonexistent/ca.pem".into());
        let err = ConsulClient::new(&s).unwrap_err().to_string();
        assert!(err.contains("/nonexistent/ca.pem"), "{err}");
    }

    /// A scripted agent on a loopback port: records each request target and answers with
    /// what `reply` gives for it (status, extra headers), index 7, body `[]`.
    struct FakeAgent {
        url: String,
        seen: Arc<Mutex<Vec<String>>>,
        task: tokio::task::JoinHandle<()>,
    }

    impl Drop for FakeAgent {
        fn drop(&mut self) {
            self.task.abort();
        }
    }

    /// A status and extra headers for a request target.
    type Reply = fn(&str) -> (u16, Vec<(&'static str, String)>);

    async fn fake_agent(reply: Reply) -> FakeAgent {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match conn.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let text = String::from_utf8_lossy(&head).into_owned();
                let target = text.split(' ').nth(1).unwrap_or_default().to_string();
                log.lock().unwrap().push(target.clone());
                let (status, headers) = reply(&target);
                let mut out = format!(
                    "HTTP/1.1 {status} X\r\ncontent-length: 2\r\nconnection: close\r\nx-consul-index: 7\r\n"
                );
                for (k, v) in headers {
                    out.push_str(&format!("{k}: {v}\r\n"));
                }
                out.push_str("\r\n[]");
                let _ = conn.write_all(out.as_bytes()).await;
            }
        });
        FakeAgent { url, seen, task }
    }

    fn client_for(addresses: Vec<String>, consistency: Consistency) -> ConsulClient {
        let mut s = ClientSettings::new("http://unused", Duration::from_secs(2));
        s.addresses = addresses;
        s.consistency = consistency;
        ConsulClient::new(&s).unwrap()
    }

    #[tokio::test]
    async fn each_consistency_mode_sends_its_query_parameter() {
        let agent = fake_agent(|_| (200, vec![])).await;
        for (mode, expect) in [
            (Consistency::Default, "/v1/kv/k?index=3&wait=2000ms"),
            (Consistency::Leader, "/v1/kv/k?index=3&wait=2000ms&leader="),
            (
                Consistency::Stale { max_stale: None },
                "/v1/kv/k?index=3&wait=2000ms&stale=",
            ),
            (
                Consistency::Stale {
                    max_stale: Some(Duration::from_secs(5)),
                },
                "/v1/kv/k?index=3&wait=2000ms&stale=&max_stale=5000ms",
            ),
            (
                Consistency::Consistent,
                "/v1/kv/k?index=3&wait=2000ms&consistent=",
            ),
        ] {
            let client = client_for(vec![agent.url.clone()], mode);
            client
                .blocking_get("/v1/kv/k", &[], Index::new(3))
                .await
                .unwrap();
            assert_eq!(
                agent.seen.lock().unwrap().pop().as_deref(),
                Some(expect),
                "{mode:?}"
            );
        }
    }

    #[tokio::test]
    async fn a_stale_answer_older_than_max_stale_is_read_again_from_the_leader() {
        let agent = fake_agent(|target| {
            if target.contains("stale") {
                (
                    200,
                    vec![
                        ("x-consul-lastcontact", "9000".into()),
                        ("x-consul-knownleader", "true".into()),
                        ("x-consul-effective-consistency", "stale".into()),
                    ],
                )
            } else {
                (
                    200,
                    vec![
                        ("x-consul-lastcontact", "0".into()),
                        ("x-consul-knownleader", "true".into()),
                        ("x-consul-effective-consistency", "leader".into()),
                    ],
                )
            }
        })
        .await;
        let bounded = client_for(
            vec![agent.url.clone()],
            Consistency::Stale {
                max_stale: Some(Duration::from_secs(5)),
            },
        );
        let answer = bounded
            .blocking_get("/v1/kv/k", &[], Index::ZERO)
            .await
            .unwrap();
        assert_eq!(answer.last_contact_ms, 0);
        assert_eq!(answer.effective_consistency.as_deref(), Some("leader"));
        assert_eq!(
            *agent.seen.lock().unwrap(),
            ["/v1/kv/k?stale=&max_stale=5000ms", "/v1/kv/k?leader="]
        );
        let report = bounded.report().last_answer.unwrap();
        assert_eq!(report.effective_consistency.as_deref(), Some("leader"));

        agent.seen.lock().unwrap().clear();
        let unbounded = client_for(
            vec![agent.url.clone()],
            Consistency::Stale { max_stale: None },
        );
        let answer = unbounded
            .blocking_get("/v1/kv/k", &[], Index::ZERO)
            .await
            .unwrap();
        assert_eq!(
            answer.last_contact_ms, 9000,
            "no bound: the stale answer stands"
        );
        assert_eq!(agent.seen.lock().unwrap().len(), 1);
    }

    #[tokio::test]
    async fn an_unreachable_agent_moves_reads_to_the_next_but_agent_writes_stay_local() {
        let dead = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            format!("http://{}", l.local_addr().unwrap())
        };
        let agent = fake_agent(|_| (200, vec![])).await;
        let client = client_for(vec![dead.clone(), agent.url.clone()], Consistency::Default);
        let mut epochs = client.epochs();
        let err = client
            .blocking_get("/v1/kv/k", &[], Index::ZERO)
            .await
            .unwrap_err();
        assert!(matches!(err, ConsulError::Transport(_)), "{err}");
        assert_eq!(client.active_address(), agent.url);
        assert!(epochs.has_changed().unwrap(), "watches are told");
        assert_eq!(epochs.borrow_and_update().agent, 1);
        let answer = client
            .blocking_get("/v1/kv/k", &[], Index::ZERO)
            .await
            .unwrap();
        assert_eq!(answer.agent, agent.url);
        assert_eq!(client.report().agents.changes_total, 1);
        // The gateway's own registration belongs to the local agent, down or not.
        assert!(client.agent_service_exists("me").await.is_err());
        assert_eq!(agent.seen.lock().unwrap().len(), 1);
    }

    #[tokio::test]
    async fn a_403_is_a_refused_token_not_an_outage() {
        let agent = fake_agent(|_| (403, vec![])).await;
        let client = client_for(vec![agent.url.clone()], Consistency::Default);
        let err = client
            .blocking_get("/v1/health/service/web", &[], Index::ZERO)
            .await
            .unwrap_err();
        assert!(matches!(err, ConsulError::Refused { .. }), "{err}");
        assert!(!err.is_transient());
        let report = client.report();
        assert!(report.token.refused_for_s.is_some());
        assert_eq!(
            report.agents.changes_total, 0,
            "the agent answered: no move"
        );
    }

    #[tokio::test]
    async fn the_upkeep_notices_a_refused_token_that_works_again_and_wakes_the_watches() {
        static REFUSE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);
        let agent = fake_agent(|_| {
            if REFUSE.load(std::sync::atomic::Ordering::SeqCst) {
                (403, vec![])
            } else {
                (200, vec![])
            }
        })
        .await;
        let client = client_for(vec![agent.url.clone()], Consistency::Default);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let upkeep = tokio::spawn({
            let client = client.clone();
            async move {
                client
                    .upkeep(async {
                        let _ = stopped.await;
                    })
                    .await
            }
        });
        let mut epochs = client.epochs();
        let refused = client
            .blocking_get("/v1/health/service/web", &[], Index::ZERO)
            .await;
        assert!(matches!(refused, Err(ConsulError::Refused { .. })));
        // The token is granted again in Consul: no file changed, no watch asked yet.
        REFUSE.store(false, std::sync::atomic::Ordering::SeqCst);
        tokio::time::timeout(Duration::from_secs(5), epochs.wait_for(|e| e.token == 1))
            .await
            .expect("the watches are woken within a few upkeep ticks")
            .unwrap();
        assert!(client.report().token.refused_for_s.is_none());
        assert!(
            agent
                .seen
                .lock()
                .unwrap()
                .iter()
                .all(|t| t.starts_with("/v1/health/service/web")),
            "the upkeep retried the refused read"
        );
        let _ = stop.send(());
        upkeep.await.unwrap();
    }
}
