//! The HTTP API: routing, ACL, consistency and blocking parameters, and the handlers for
//! agent, catalog, health, KV and status endpoints. Errors are plain text, as Consul's are.

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue, ALLOW, AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};

use super::agent::{Agent, AgentError};
use super::faults::Faults;
use super::params::{self, parse_go_bool, Blocking, Consistency, Query};
use super::store::{IndexedAnswer, RegistryState, Status, Store, StoreError};
use super::watch::WatchKey;
use super::wire;

/// Consul's default `kv_max_value_size`.
pub const KV_MAX_VALUE_SIZE: u64 = 512 * 1024;
/// Cap for JSON request bodies (Consul has none; this keeps a runaway client bounded).
const JSON_BODY_MAX: usize = 8 * 1024 * 1024;
const NO_LEADER: &str = "rpc error making call: No cluster leader";

pub type Resp = Response<Full<Bytes>>;

/// An error answer: status and plain-text body (plus `Allow` for 405).
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    body: String,
    allow: Option<&'static str>,
}

impl ApiError {
    pub fn new(status: StatusCode, body: impl Into<String>) -> ApiError {
        ApiError {
            status,
            body: body.into(),
            allow: None,
        }
    }
    pub fn bad_request(body: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, body)
    }
    fn internal(body: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, body)
    }

    fn into_response(self) -> Resp {
        let has_body = !self.body.is_empty();
        let mut r = Response::new(Full::new(Bytes::from(self.body)));
        *r.status_mut() = self.status;
        if let Some(allow) = self.allow {
            r.headers_mut()
                .insert(ALLOW, HeaderValue::from_static(allow));
        }
        if has_body {
            r.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("text/plain; charset=utf-8"),
            );
        }
        r
    }
}

impl From<AgentError> for ApiError {
    fn from(e: AgentError) -> ApiError {
        let status = match &e {
            AgentError::MissingServiceName
            | AgentError::InvalidCheck(_)
            | AgentError::UnknownService(_)
            | AgentError::Store(_) => StatusCode::BAD_REQUEST,
            AgentError::NoSuchService(_) | AgentError::UnknownCheck(_) => StatusCode::NOT_FOUND,
            AgentError::NotTtl(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError::new(status, e.to_string())
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> ApiError {
        ApiError::bad_request(e.to_string())
    }
}

/// Settings the handlers need.
#[derive(Clone, Debug)]
pub struct ApiSettings {
    pub token: Option<String>,
    pub datacenter: String,
    pub jitter: bool,
}

/// Everything a request handler touches.
pub struct Ctx {
    pub store: Arc<Store>,
    pub agent: Arc<Agent>,
    pub faults: Faults,
    pub settings: ApiSettings,
}

/// The routes, each with its allowed methods.
#[derive(Debug)]
enum Endpoint {
    Kv(String),
    CatalogRegister,
    CatalogDeregister,
    CatalogServices,
    CatalogService(String),
    CatalogNodes,
    CatalogDatacenters,
    HealthService(String),
    HealthState(String),
    HealthChecks(String),
    HealthNode(String),
    AgentServiceRegister,
    AgentServiceDeregister(String),
    AgentServiceMaintenance(String),
    AgentMaintenance,
    AgentServices,
    AgentService(String),
    AgentChecks,
    AgentCheckRegister,
    AgentCheckDeregister(String),
    AgentCheckTtl(Status, String),
    AgentCheckUpdate(String),
    AgentSelf,
    AgentMembers,
    StatusLeader,
    StatusPeers,
}

impl Endpoint {
    fn parse(path: &str) -> Option<Endpoint> {
        use Endpoint::*;
        let rest = path.strip_prefix("/v1/")?;
        let tail = |prefix: &str| rest.strip_prefix(prefix).map(str::to_string);
        Some(match rest {
            "catalog/register" => CatalogRegister,
            "catalog/deregister" => CatalogDeregister,
            "catalog/services" => CatalogServices,
            "catalog/nodes" => CatalogNodes,
            "catalog/datacenters" => CatalogDatacenters,
            "agent/service/register" => AgentServiceRegister,
            "agent/maintenance" => AgentMaintenance,
            "agent/services" => AgentServices,
            "agent/checks" => AgentChecks,
            "agent/check/register" => AgentCheckRegister,
            "agent/self" => AgentSelf,
            "agent/members" => AgentMembers,
            "status/leader" => StatusLeader,
            "status/peers" => StatusPeers,
            _ => {
                if let Some(k) = tail("kv/") {
                    Kv(k)
                } else if let Some(n) = tail("catalog/service/") {
                    CatalogService(n)
                } else if let Some(n) = tail("health/service/") {
                    HealthService(n)
                } else if let Some(n) = tail("health/state/") {
                    HealthState(n)
                } else if let Some(n) = tail("health/checks/") {
                    HealthChecks(n)
                } else if let Some(n) = tail("health/node/") {
                    HealthNode(n)
                } else if let Some(n) = tail("agent/service/deregister/") {
                    AgentServiceDeregister(n)
                } else if let Some(n) = tail("agent/service/maintenance/") {
                    AgentServiceMaintenance(n)
                } else if let Some(n) = tail("agent/service/") {
                    AgentService(n)
                } else if let Some(n) = tail("agent/check/deregister/") {
                    AgentCheckDeregister(n)
                } else if let Some(n) = tail("agent/check/pass/") {
                    AgentCheckTtl(Status::Passing, n)
                } else if let Some(n) = tail("agent/check/warn/") {
                    AgentCheckTtl(Status::Warning, n)
                } else if let Some(n) = tail("agent/check/fail/") {
                    AgentCheckTtl(Status::Critical, n)
                } else if let Some(n) = tail("agent/check/update/") {
                    AgentCheckUpdate(n)
                } else {
                    return None;
                }
            }
        })
    }

    fn methods(&self) -> &'static str {
        use Endpoint::*;
        match self {
            Kv(_) => "GET,PUT,DELETE,OPTIONS",
            CatalogRegister
            | CatalogDeregister
            | AgentServiceRegister
            | AgentServiceDeregister(_)
            | AgentServiceMaintenance(_)
            | AgentMaintenance
            | AgentCheckRegister
            | AgentCheckDeregister(_)
            | AgentCheckTtl(..)
            | AgentCheckUpdate(_) => "PUT,OPTIONS",
            _ => "GET,OPTIONS",
        }
    }

    /// Endpoints that need no token (Consul's status endpoints take no ACL).
    fn needs_acl(&self) -> bool {
        !matches!(self, Endpoint::StatusLeader | Endpoint::StatusPeers)
    }
}

fn header(name: &'static str, value: &str) -> (HeaderName, HeaderValue) {
    (
        HeaderName::from_static(name),
        HeaderValue::from_str(value).unwrap_or_else(|_| HeaderValue::from_static("")),
    )
}

/// Token precedence: `?token=`, then `X-Consul-Token`, then `Authorization: Bearer`.
fn request_token<'a>(q: &'a Query, req: &'a Request<Incoming>) -> Option<&'a str> {
    if let Some(t) = q.get("token").filter(|t| !t.is_empty()) {
        return Some(t);
    }
    if let Some(t) = req
        .headers()
        .get("x-consul-token")
        .and_then(|v| v.to_str().ok())
        .filter(|t| !t.is_empty())
    {
        return Some(t);
    }
    let auth = req.headers().get(AUTHORIZATION)?.to_str().ok()?;
    let mut words = auth.split_whitespace();
    let scheme = words.next()?;
    if scheme.eq_ignore_ascii_case("bearer") {
        words.next()
    } else {
        None
    }
}

/// Serves one request (after connection-level faults were applied).
pub async fn handle(ctx: Arc<Ctx>, req: Request<Incoming>) -> Resp {
    let latency = ctx.faults.latency_for(req.uri().path());
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    if ctx.faults.stall() {
        std::future::pending::<()>().await;
    }
    let mut resp = if ctx.faults.rate_limited() {
        ApiError::new(StatusCode::TOO_MANY_REQUESTS, "rate limit exceeded").into_response()
    } else {
        match route(&ctx, req).await {
            Ok(r) => r,
            Err(e) => e.into_response(),
        }
    };
    let policy = if ctx.settings.token.is_some() {
        "deny"
    } else {
        "allow"
    };
    let (k, v) = header("x-consul-default-acl-policy", policy);
    resp.headers_mut().insert(k, v);
    resp
}

async fn route(ctx: &Ctx, req: Request<Incoming>) -> Result<Resp, ApiError> {
    let raw_path = req.uri().path();
    let path = percent_encoding::percent_decode_str(raw_path)
        .decode_utf8()
        .map_err(|_| ApiError::bad_request("Bad request: path is not valid UTF-8"))?
        .into_owned();
    if path.chars().any(|c| c.is_control()) {
        return Err(ApiError::bad_request(format!(
            "Bad request: URL contains non-printable characters: {raw_path:?}"
        )));
    }
    let Some(ep) = Endpoint::parse(&path) else {
        return Err(ApiError::new(StatusCode::NOT_FOUND, ""));
    };
    let method = req.method().clone();
    let allowed = ep.methods();
    if method == Method::OPTIONS {
        let mut r = Response::new(Full::new(Bytes::new()));
        r.headers_mut()
            .insert(ALLOW, HeaderValue::from_static(allowed));
        return Ok(r);
    }
    if !allowed.split(',').any(|m| m == method.as_str()) {
        let mut e = ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("method {method} not allowed"),
        );
        e.allow = Some(allowed);
        return Err(e);
    }
    let q = Query::parse(req.uri().query());
    if let Some(expected) = &ctx.settings.token {
        if ep.needs_acl() {
            match request_token(&q, &req) {
                None => return Err(ApiError::new(StatusCode::FORBIDDEN, "Permission denied")),
                Some(t) if t != expected => {
                    return Err(ApiError::new(StatusCode::FORBIDDEN, "ACL not found"))
                }
                Some(_) => {}
            }
        }
    }
    if let Some(dc) = q.get("dc").filter(|d| !d.is_empty()) {
        if dc != ctx.settings.datacenter {
            return Err(ApiError::internal("No path to datacenter"));
        }
    }
    if q.has("filter") {
        return Err(ApiError::bad_request(
            "Failed to create boolean expression evaluator: ?filter is not supported by the dev registry",
        ));
    }
    // Writes ignore blocking and consistency parameters, as Consul's do.
    let r = if method == Method::GET {
        Reader::new(ctx, &q)?
    } else {
        Reader::for_write(ctx, &q)
    };
    use Endpoint::*;
    match ep {
        Kv(key) => match method {
            Method::GET => kv_get(&r, &key).await,
            Method::PUT => kv_put(ctx, &q, &key, req).await,
            _ => kv_delete(ctx, &q, &key),
        },
        CatalogRegister => catalog_register(ctx, req).await,
        CatalogDeregister => catalog_deregister(ctx, req).await,
        CatalogServices => catalog_services(&r).await,
        CatalogService(name) => catalog_service(&r, &name).await,
        CatalogNodes => catalog_nodes(&r).await,
        CatalogDatacenters => Ok(r.plain_json(json!([ctx.settings.datacenter]))),
        HealthService(name) => health_service(&r, &name).await,
        HealthState(state) => health_state(&r, &state).await,
        HealthChecks(name) => health_checks(&r, &name).await,
        HealthNode(node) => health_node(&r, &node).await,
        AgentServiceRegister => {
            let body = read_json_body(req).await?;
            let svc: wire::ServiceIn = wire::decode(&body).map_err(ApiError::bad_request)?;
            let (svc, checks) = svc.into_service().map_err(ApiError::bad_request)?;
            ctx.agent
                .register_service(svc, checks, q.has("replace-existing-checks"))?;
            Ok(empty_ok())
        }
        AgentServiceDeregister(id) => {
            ctx.agent.deregister_service(&id);
            Ok(empty_ok())
        }
        AgentServiceMaintenance(id) => {
            if id.is_empty() {
                return Err(ApiError::bad_request("Missing service ID"));
            }
            let enable = maintenance_flag(&q)?;
            ctx.agent
                .service_maintenance(&id, enable, q.get("reason").unwrap_or(""))?;
            Ok(empty_ok())
        }
        AgentMaintenance => {
            let enable = maintenance_flag(&q)?;
            ctx.agent
                .node_maintenance(enable, q.get("reason").unwrap_or(""))?;
            Ok(empty_ok())
        }
        AgentServices => Ok(r.plain_json(agent_services(ctx))),
        AgentService(id) => agent_service(&r, &id).await,
        AgentChecks => Ok(r.plain_json(agent_checks(ctx))),
        AgentCheckRegister => {
            let body = read_json_body(req).await?;
            let c: wire::CheckIn = wire::decode(&body).map_err(ApiError::bad_request)?;
            let spec = c.into_spec().map_err(ApiError::bad_request)?;
            ctx.agent.register_check(spec)?;
            Ok(empty_ok())
        }
        AgentCheckDeregister(id) => {
            ctx.agent.deregister_check(&id)?;
            Ok(empty_ok())
        }
        AgentCheckTtl(status, id) => {
            ctx.agent
                .update_ttl(&id, status, q.get("note").unwrap_or(""))?;
            Ok(empty_ok())
        }
        AgentCheckUpdate(id) => {
            let body = read_json_body(req).await?;
            let u: wire::CheckUpdateIn = wire::decode(&body).map_err(ApiError::bad_request)?;
            let status = Status::parse(&u.status).ok_or_else(|| {
                ApiError::bad_request(format!("Invalid check status: '{}'", u.status))
            })?;
            ctx.agent.update_ttl(&id, status, &u.output)?;
            Ok(empty_ok())
        }
        AgentSelf => Ok(r.plain_json(agent_self(ctx))),
        AgentMembers => Ok(r.plain_json(json!([member(ctx)]))),
        StatusLeader => {
            let leader = if ctx.faults.no_leader() {
                String::new()
            } else {
                format!("{}:8300", ctx.agent.identity.address)
            };
            Ok(r.plain_json(json!(leader)))
        }
        StatusPeers => Ok(r.plain_json(json!([format!("{}:8300", ctx.agent.identity.address)]))),
    }
}

fn empty_ok() -> Resp {
    Response::new(Full::new(Bytes::new()))
}

fn bool_ok(b: bool) -> Resp {
    let mut r = Response::new(Full::new(Bytes::from(if b { "true" } else { "false" })));
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

fn maintenance_flag(q: &Query) -> Result<bool, ApiError> {
    let Some(v) = q.get("enable") else {
        return Err(ApiError::bad_request("Missing value for enable"));
    };
    parse_go_bool(v)
        .ok_or_else(|| ApiError::bad_request(format!("Invalid value for enable: {v:?}")))
}

async fn read_json_body(req: Request<Incoming>) -> Result<Bytes, ApiError> {
    match Limited::new(req.into_body(), JSON_BODY_MAX).collect().await {
        Ok(b) => Ok(b.to_bytes()),
        Err(e) => Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("Request body too large or unreadable: {e}"),
        )),
    }
}

/// Per-request read context: consistency, blocking parameters and the answer formatter.
struct Reader<'a> {
    ctx: &'a Ctx,
    q: &'a Query,
    consistency: Consistency,
    blocking: Blocking,
}

impl<'a> Reader<'a> {
    fn new(ctx: &'a Ctx, q: &'a Query) -> Result<Reader<'a>, ApiError> {
        Ok(Reader {
            ctx,
            q,
            consistency: params::consistency(q)?,
            blocking: params::blocking(q, ctx.settings.jitter)?,
        })
    }

    fn for_write(ctx: &'a Ctx, q: &'a Query) -> Reader<'a> {
        Reader {
            ctx,
            q,
            consistency: Consistency::Leader,
            blocking: Blocking {
                min_index: 0,
                timeout: params::DEFAULT_WAIT,
            },
        }
    }

    /// Reads served by the servers fail without a leader unless `?stale`.
    fn require_leader(&self) -> Result<(), ApiError> {
        if self.ctx.faults.no_leader() && self.consistency != Consistency::Stale {
            return Err(ApiError::internal(NO_LEADER));
        }
        Ok(())
    }

    async fn run<T>(
        &self,
        query: impl Fn(&RegistryState) -> IndexedAnswer<T>,
    ) -> Result<(T, u64), ApiError> {
        self.require_leader()?;
        let r = self
            .ctx
            .store
            .block(self.blocking.min_index, self.blocking.timeout, query)
            .await;
        Ok((r.value, r.index))
    }

    fn body(&self, v: &Value) -> Bytes {
        let mut s = if self.q.has("pretty") {
            serde_json::to_vec_pretty(v).unwrap_or_default()
        } else {
            serde_json::to_vec(v).unwrap_or_default()
        };
        if self.ctx.faults.bad_json() {
            s.truncate(s.len() / 2);
            s.extend_from_slice(b"\x00{garbage");
        }
        Bytes::from(s)
    }

    /// A JSON answer without index headers (agent and status endpoints).
    fn plain_json(&self, v: Value) -> Resp {
        let mut r = Response::new(Full::new(self.body(&v)));
        r.headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        r
    }

    /// Index, leader and consistency headers of a catalog/health/KV read.
    fn meta(&self, r: &mut Resp, index: u64) {
        let index = if self.ctx.faults.zero_index() {
            0
        } else {
            index.max(1)
        };
        let known_leader = if self.ctx.faults.no_leader() {
            "false"
        } else {
            "true"
        };
        let h = r.headers_mut();
        for (k, v) in [
            header("x-consul-index", &index.to_string()),
            header("x-consul-knownleader", known_leader),
            header("x-consul-lastcontact", "0"),
            header("x-consul-effective-consistency", self.consistency.as_str()),
        ] {
            h.insert(k, v);
        }
        if self.q.has("cached") {
            let (k, v) = header("x-cache", "MISS");
            h.insert(k, v);
        }
    }

    fn indexed_json(&self, v: Value, index: u64) -> Resp {
        let mut r = self.plain_json(v);
        self.meta(&mut r, index);
        r
    }

    fn not_found(&self, index: u64) -> Resp {
        let mut r = Response::new(Full::new(Bytes::new()));
        *r.status_mut() = StatusCode::NOT_FOUND;
        self.meta(&mut r, index);
        r
    }
}

// === KV ===

enum KvRead {
    Entries(Vec<Value>),
    Keys(Vec<String>),
    Raw(Bytes),
    Missing,
}

async fn kv_get(r: &Reader<'_>, key: &str) -> Result<Resp, ApiError> {
    let q = r.q;
    let keys = q.has("keys");
    let recurse = q.has("recurse");
    if key.is_empty() && !keys && !recurse {
        return Err(ApiError::bad_request("Missing key name"));
    }
    let separator = q
        .get("separator")
        .or(q.get("seperator"))
        .unwrap_or("")
        .to_string();
    let raw = q.has("raw");
    let prefix_watch = |s: &RegistryState| {
        let mut w = vec![WatchKey::KvPrefix(key.to_string())];
        if s.kv_under(key).next().is_none() {
            w.push(WatchKey::KvTable);
        }
        w
    };
    let (value, index) = r
        .run(|s| {
            if keys {
                let mut out: Vec<String> = Vec::new();
                for e in s.kv_under(key) {
                    let rest = &e.key[key.len()..];
                    let k = match (separator.is_empty(), rest.find(separator.as_str())) {
                        (false, Some(i)) => format!("{key}{}", &rest[..i + separator.len()]),
                        _ => e.key.clone(),
                    };
                    if out.last() != Some(&k) {
                        out.push(k);
                    }
                }
                let v = if out.is_empty() && !key.is_empty() {
                    KvRead::Missing
                } else {
                    KvRead::Keys(out)
                };
                IndexedAnswer {
                    value: v,
                    index: s.kv_prefix_index(key),
                    watch: prefix_watch(s),
                }
            } else if recurse {
                let entries: Vec<Value> = s.kv_under(key).map(wire::kv_json).collect();
                let v = if entries.is_empty() {
                    KvRead::Missing
                } else {
                    KvRead::Entries(entries)
                };
                IndexedAnswer {
                    value: v,
                    index: s.kv_prefix_index(key),
                    watch: prefix_watch(s),
                }
            } else {
                match s.kv.get(key) {
                    Some(e) => IndexedAnswer {
                        value: if raw {
                            KvRead::Raw(e.value.clone())
                        } else {
                            KvRead::Entries(vec![wire::kv_json(e)])
                        },
                        index: e.modify_index,
                        watch: vec![WatchKey::KvKey(key.to_string())],
                    },
                    None => IndexedAnswer {
                        value: KvRead::Missing,
                        index: s.kv_index,
                        watch: vec![WatchKey::KvTable],
                    },
                }
            }
        })
        .await?;
    Ok(match value {
        KvRead::Missing => r.not_found(index),
        KvRead::Entries(e) => r.indexed_json(Value::Array(e), index),
        KvRead::Keys(k) => r.indexed_json(json!(k), index),
        KvRead::Raw(bytes) => {
            let mut resp = Response::new(Full::new(bytes));
            r.meta(&mut resp, index);
            let h = resp.headers_mut();
            h.insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
            for (k, v) in [
                header("x-content-type-options", "nosniff"),
                header("content-security-policy", "sandbox"),
            ] {
                h.insert(k, v);
            }
            resp
        }
    })
}

/// Go's `strconv.ParseUint` error, which Consul returns unwrapped with a 500.
fn parse_u64(q: &Query, name: &str) -> Result<Option<u64>, ApiError> {
    match q.get(name) {
        None => Ok(None),
        Some(v) => v.parse::<u64>().map(Some).map_err(|_| {
            ApiError::internal(format!("strconv.ParseUint: parsing {v:?}: invalid syntax"))
        }),
    }
}

fn conflicting(q: &Query, flags: &[&str]) -> Result<(), ApiError> {
    if flags.iter().filter(|f| q.has(f)).count() > 1 {
        return Err(ApiError::bad_request(format!(
            "Conflicting flags: {}",
            q.encode_sorted()
        )));
    }
    Ok(())
}

async fn kv_put(ctx: &Ctx, q: &Query, key: &str, req: Request<Incoming>) -> Result<Resp, ApiError> {
    if key.is_empty() {
        return Err(ApiError::bad_request("Missing key name"));
    }
    conflicting(q, &["cas", "acquire", "release"])?;
    let flags = parse_u64(q, "flags")?.unwrap_or(0);
    let cas = parse_u64(q, "cas")?;
    let too_large = |n: u64| {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "Request body({n} bytes) too large, max size: {KV_MAX_VALUE_SIZE} bytes. See https://developer.hashicorp.com/docs/agent/config/config-files#kv_max_value_size."
            ),
        )
    };
    let declared = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if let Some(n) = declared {
        if n > KV_MAX_VALUE_SIZE {
            return Err(too_large(n));
        }
    }
    let body = match Limited::new(req.into_body(), KV_MAX_VALUE_SIZE as usize)
        .collect()
        .await
    {
        Ok(b) => b.to_bytes(),
        Err(_) => return Err(too_large(KV_MAX_VALUE_SIZE + 1)),
    };
    if ctx.faults.no_leader() {
        return Err(ApiError::internal(NO_LEADER));
    }
    for lock in ["acquire", "release"] {
        if let Some(session) = q.get(lock) {
            // No session endpoints exist here, so no session is ever valid.
            return Err(ApiError::internal(format!("invalid session {session:?}")));
        }
    }
    Ok(bool_ok(ctx.store.kv_put(key, body, flags, cas)))
}

fn kv_delete(ctx: &Ctx, q: &Query, key: &str) -> Result<Resp, ApiError> {
    conflicting(q, &["recurse", "cas"])?;
    let recurse = q.has("recurse");
    if key.is_empty() && !recurse {
        return Err(ApiError::bad_request("Missing key name"));
    }
    let cas = parse_u64(q, "cas")?;
    if ctx.faults.no_leader() {
        return Err(ApiError::internal(NO_LEADER));
    }
    Ok(bool_ok(ctx.store.kv_delete(key, recurse, cas)))
}

// === catalog ===

async fn catalog_register(ctx: &Ctx, req: Request<Incoming>) -> Result<Resp, ApiError> {
    let body = read_json_body(req).await?;
    let reg: wire::CatalogRegisterIn = wire::decode(&body).map_err(ApiError::bad_request)?;
    if reg
        .datacenter()
        .is_some_and(|d| d != ctx.settings.datacenter)
    {
        return Err(ApiError::internal("No path to datacenter"));
    }
    let reg = reg
        .into_registration(&ctx.settings.datacenter)
        .map_err(ApiError::bad_request)?;
    if ctx.faults.no_leader() {
        return Err(ApiError::internal(NO_LEADER));
    }
    ctx.store.register(&reg)?;
    Ok(bool_ok(true))
}

async fn catalog_deregister(ctx: &Ctx, req: Request<Incoming>) -> Result<Resp, ApiError> {
    let body = read_json_body(req).await?;
    let d: wire::CatalogDeregisterIn = wire::decode(&body).map_err(ApiError::bad_request)?;
    let node = d.node.unwrap_or_default();
    if node.is_empty() {
        return Err(ApiError::bad_request("Missing node name"));
    }
    if d.datacenter
        .as_deref()
        .is_some_and(|dc| !dc.is_empty() && dc != ctx.settings.datacenter)
    {
        return Err(ApiError::internal("No path to datacenter"));
    }
    if ctx.faults.no_leader() {
        return Err(ApiError::internal(NO_LEADER));
    }
    match (
        d.service_id.filter(|s| !s.is_empty()),
        d.check_id.filter(|c| !c.is_empty()),
    ) {
        (Some(s), _) => {
            ctx.store.deregister_service(&node, &s);
        }
        (None, Some(c)) => {
            ctx.store.deregister_check(&node, &c);
        }
        (None, None) => ctx.store.deregister_node(&node),
    }
    Ok(bool_ok(true))
}

async fn catalog_services(r: &Reader<'_>) -> Result<Resp, ApiError> {
    let (v, index) = r
        .run(|s| {
            let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
            for e in s.services.values() {
                let tags = out.entry(e.service.name.clone()).or_default();
                for t in &e.service.tags {
                    if !tags.contains(t) {
                        tags.push(t.clone());
                    }
                }
            }
            IndexedAnswer {
                value: json!(out),
                index: s.services_index,
                watch: vec![WatchKey::Services],
            }
        })
        .await?;
    Ok(r.indexed_json(v, index))
}

/// `node-meta=k:v` (repeatable): the node must carry every pair.
fn node_meta_filter(q: &Query) -> Vec<(String, String)> {
    q.all("node-meta")
        .into_iter()
        .map(|p| match p.split_once(':') {
            Some((k, v)) => (k.to_string(), v.to_string()),
            None => (p.to_string(), String::new()),
        })
        .collect()
}

fn missing_name(name: &str) -> Result<(), ApiError> {
    if name.is_empty() {
        return Err(ApiError::bad_request("Missing service name"));
    }
    Ok(())
}

async fn catalog_service(r: &Reader<'_>, name: &str) -> Result<Resp, ApiError> {
    missing_name(name)?;
    let tags: Vec<String> = r.q.all("tag").into_iter().map(String::from).collect();
    let meta = node_meta_filter(r.q);
    let (v, index) = r
        .run(|s| {
            let out: Vec<Value> = s
                .instances_of(name)
                .filter(|e| tags.iter().all(|t| e.service.tags.contains(t)))
                .filter(|e| node_matches(s, &e.node, &meta))
                .map(|e| wire::catalog_service_json(s.nodes.get(&e.node), e))
                .collect();
            IndexedAnswer {
                value: Value::Array(out),
                index: s.service_index_of(name),
                watch: vec![WatchKey::Service(name.to_string())],
            }
        })
        .await?;
    Ok(r.indexed_json(v, index))
}

fn node_matches(s: &RegistryState, node: &str, meta: &[(String, String)]) -> bool {
    meta.is_empty()
        || s.nodes
            .get(node)
            .is_some_and(|n| meta.iter().all(|(k, v)| n.meta.get(k) == Some(v)))
}

async fn catalog_nodes(r: &Reader<'_>) -> Result<Resp, ApiError> {
    let meta = node_meta_filter(r.q);
    let (v, index) = r
        .run(|s| IndexedAnswer {
            value: Value::Array(
                s.nodes
                    .values()
                    .filter(|n| node_matches(s, &n.name, &meta))
                    .map(wire::node_json)
                    .collect(),
            ),
            index: s.nodes_index,
            watch: vec![WatchKey::Nodes],
        })
        .await?;
    Ok(r.indexed_json(v, index))
}

// === health ===

async fn health_service(r: &Reader<'_>, name: &str) -> Result<Resp, ApiError> {
    missing_name(name)?;
    let passing = match r.q.get("passing") {
        None => false,
        Some("") => true,
        Some(v) => {
            parse_go_bool(v).ok_or_else(|| ApiError::bad_request("Invalid value for ?passing"))?
        }
    };
    let tags: Vec<String> = r.q.all("tag").into_iter().map(String::from).collect();
    let meta = node_meta_filter(r.q);
    let (entries, index) = r
        .run(|s| {
            let out: Vec<(bool, Value)> = s
                .instances_of(name)
                .filter(|e| tags.iter().all(|t| e.service.tags.contains(t)))
                .filter(|e| node_matches(s, &e.node, &meta))
                .map(|e| {
                    let checks: Vec<_> = s.checks_for(&e.node, Some(&e.service.id)).collect();
                    let all_passing = checks.iter().all(|c| c.check.status == Status::Passing);
                    let node = s.nodes.get(&e.node).map(wire::node_json).unwrap_or(Value::Null);
                    let checks: Vec<Value> = checks.into_iter().map(|c| wire::check_json(s, c)).collect();
                    (
                        all_passing,
                        json!({"Node": node, "Service": wire::node_service_json(e), "Checks": checks}),
                    )
                })
                .collect();
            IndexedAnswer {
                value: out,
                index: s.service_index_of(name),
                watch: vec![WatchKey::Service(name.to_string())],
            }
        })
        .await?;
    let v: Vec<Value> = entries
        .into_iter()
        .filter(|(ok, _)| !passing || *ok)
        .map(|(_, v)| v)
        .collect();
    Ok(r.indexed_json(Value::Array(v), index))
}

async fn health_state(r: &Reader<'_>, state: &str) -> Result<Resp, ApiError> {
    if state.is_empty() {
        return Err(ApiError::bad_request("Missing check state"));
    }
    let want = match state {
        "any" => None,
        s => Some(
            Status::parse(s)
                .ok_or_else(|| ApiError::bad_request(format!("Invalid check state: {s:?}")))?,
        ),
    };
    let (v, index) = r
        .run(|s| IndexedAnswer {
            value: Value::Array(
                s.checks
                    .values()
                    .filter(|c| want.is_none_or(|w| c.check.status == w))
                    .map(|c| wire::check_json(s, c))
                    .collect(),
            ),
            index: s.checks_index,
            watch: vec![WatchKey::Checks],
        })
        .await?;
    Ok(r.indexed_json(v, index))
}

async fn health_checks(r: &Reader<'_>, name: &str) -> Result<Resp, ApiError> {
    missing_name(name)?;
    let (v, index) = r
        .run(|s| IndexedAnswer {
            value: Value::Array(
                s.checks
                    .values()
                    .filter(|c| c.check.service_name == name)
                    .map(|c| wire::check_json(s, c))
                    .collect(),
            ),
            index: s.checks_index,
            watch: vec![WatchKey::Checks],
        })
        .await?;
    Ok(r.indexed_json(v, index))
}

async fn health_node(r: &Reader<'_>, node: &str) -> Result<Resp, ApiError> {
    if node.is_empty() {
        return Err(ApiError::bad_request("Missing node name"));
    }
    let (v, index) = r
        .run(|s| IndexedAnswer {
            value: Value::Array(
                s.checks
                    .values()
                    .filter(|c| c.check.node == node)
                    .map(|c| wire::check_json(s, c))
                    .collect(),
            ),
            index: s.checks_index,
            watch: vec![WatchKey::Checks],
        })
        .await?;
    Ok(r.indexed_json(v, index))
}

// === agent ===

fn agent_services(ctx: &Ctx) -> Value {
    let node = &ctx.agent.identity.node_name;
    ctx.store.read(|s| {
        s.services
            .values()
            .filter(|e| &e.node == node && e.agent_local)
            .map(|e| {
                (
                    e.service.id.clone(),
                    wire::agent_service_json(e, &ctx.settings.datacenter),
                )
            })
            .collect::<Map<_, _>>()
            .into()
    })
}

fn agent_checks(ctx: &Ctx) -> Value {
    let node = &ctx.agent.identity.node_name;
    ctx.store.read(|s| {
        s.checks_on(node)
            .filter(|c| c.check.agent_local)
            .map(|c| (c.check.id.clone(), wire::check_json(s, c)))
            .collect::<Map<_, _>>()
            .into()
    })
}

fn content_hash(v: &Value) -> String {
    let digest = Sha256::digest(serde_json::to_vec(v).unwrap_or_default());
    hex::encode(&digest[..8])
}

/// `GET /v1/agent/service/:id`, hash-blocking on `?hash=`.
async fn agent_service(r: &Reader<'_>, id: &str) -> Result<Resp, ApiError> {
    let ctx = r.ctx;
    let node = ctx.agent.identity.node_name.clone();
    let want = r.q.get("hash").filter(|h| !h.is_empty()).map(String::from);
    let lookup = |s: &RegistryState| {
        s.services
            .get(&(node.clone(), id.to_string()))
            .filter(|e| e.agent_local)
            .map(|e| {
                let v = wire::agent_service_json(e, &ctx.settings.datacenter);
                let h = content_hash(&v);
                (v, h)
            })
    };
    // Hash blocking expressed as index blocking: 1 while the hash equals `want`, 2 once it differs.
    let found = ctx
        .store
        .block(
            if want.is_some() { 1 } else { 0 },
            r.blocking.timeout,
            |s| {
                let found = lookup(s);
                let same = matches!((&found, &want), (Some((_, h)), Some(w)) if h == w);
                IndexedAnswer {
                    value: found,
                    index: if same { 1 } else { 2 },
                    watch: vec![WatchKey::Services],
                }
            },
        )
        .await
        .value;
    let Some((mut v, hash)) = found else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("unknown service ID: {id}"),
        ));
    };
    v["ContentHash"] = json!(hash);
    let mut resp = r.plain_json(v);
    let (k, val) = header("x-consul-contenthash", &hash);
    resp.headers_mut().insert(k, val);
    Ok(resp)
}

fn member(ctx: &Ctx) -> Value {
    let id = &ctx.agent.identity;
    json!({
        "Name": id.node_name,
        "Addr": id.address,
        "Port": 8301,
        "Tags": {"dc": id.datacenter, "role": "consul", "id": id.node_id, "build": "1.17.0:switchyard-dev", "vsn": "2", "port": "8300"},
        "Status": 1,
        "ProtocolMin": 1,
        "ProtocolMax": 5,
        "ProtocolCur": 2,
        "DelegateMin": 2,
        "DelegateMax": 5,
        "DelegateCur": 4,
    })
}

fn agent_self(ctx: &Ctx) -> Value {
    let id = &ctx.agent.identity;
    json!({
        "Config": {
            "Datacenter": id.datacenter,
            "PrimaryDatacenter": id.datacenter,
            "NodeName": id.node_name,
            "NodeID": id.node_id,
            "Server": true,
            "Revision": "switchyard-dev",
            "Version": "1.17.0",
            "BuildDate": "2024-01-01T00:00:00Z",
        },
        "DebugConfig": {},
        "Coord": {"Adjustment": 0.0, "Error": 1.5, "Height": 1e-5, "Vec": [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]},
        "Member": member(ctx),
        "Stats": {},
        "Meta": {"consul-network-segment": ""},
    })
}
