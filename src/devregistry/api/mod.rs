//! The HTTP API's front: which endpoint a path names and the methods it takes, then the
//! checks every request meets in Consul's order (405, ACL token, `dc`, `filter`, blocking
//! and consistency parameters) before the handler of its family runs. Handlers live by
//! endpoint family (`kv`, `catalog`, `health`, `agent`, `status`); a request for another
//! datacenter goes to its WAN peer (`wan`); answers are shaped in `reply`; errors are
//! `error::ApiError`, plain text as Consul's are.

mod agent;
mod body;
mod catalog;
mod context;
mod health;
mod kv;
mod reply;
mod select;
mod status;
mod wan;

use std::sync::Arc;

use bytes::Bytes;
use http::header::{HeaderValue, ALLOW, AUTHORIZATION};
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;

pub use context::{ApiContext, ApiSettings};
pub use kv::KV_MAX_VALUE_SIZE;
pub use reply::Resp;
pub use wan::{parse_wan_flag, WanConfigError, WanPeers};

use super::error::ApiError;
use super::params::Query;
use super::store::Status;
use reply::{error_response, header, read_json_body, Reader};
use wan::{DatacenterRoute, RequestHead};

/// The routes, each with its allowed methods.
#[derive(Debug)]
enum ApiEndpoint {
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

impl ApiEndpoint {
    fn parse(path: &str) -> Option<ApiEndpoint> {
        use ApiEndpoint::*;
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
        use ApiEndpoint::*;
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

    /// Whether `?dc=` picks the datacenter that answers: the endpoints Consul serves
    /// through its servers' RPC. Agent endpoints are this agent's own and ignore it, as
    /// does `catalog/datacenters`; catalog register/deregister read it from their body.
    fn takes_dc_param(&self) -> bool {
        use ApiEndpoint::*;
        matches!(
            self,
            Kv(_)
                | CatalogServices
                | CatalogService(_)
                | CatalogNodes
                | HealthService(_)
                | HealthState(_)
                | HealthChecks(_)
                | HealthNode(_)
                | StatusLeader
                | StatusPeers
        )
    }

    /// Endpoints that need no token (Consul's status endpoints take no ACL).
    fn needs_acl(&self) -> bool {
        !matches!(self, ApiEndpoint::StatusLeader | ApiEndpoint::StatusPeers)
    }
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
pub async fn handle(ctx: Arc<ApiContext>, req: Request<Incoming>) -> Resp {
    let latency = ctx.faults.latency_for(req.uri().path());
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    if ctx.faults.stall() {
        std::future::pending::<()>().await;
    }
    let mut resp = if ctx.faults.rate_limited() {
        error_response(ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate limit exceeded",
        ))
    } else {
        match route(&ctx, req).await {
            Ok(r) => r,
            Err(e) => error_response(e),
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

async fn route(ctx: &ApiContext, req: Request<Incoming>) -> Result<Resp, ApiError> {
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
    let Some(ep) = ApiEndpoint::parse(&path) else {
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
        return Err(ApiError::method_not_allowed(&method, allowed));
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
    if let Some(dc) = q.get("dc").filter(|d| !d.is_empty() && ep.takes_dc_param()) {
        let head = RequestHead::of(&req);
        match ctx.wan.route(dc, &head) {
            DatacenterRoute::Local => {}
            DatacenterRoute::Peer(base) => {
                let body = read_json_body(req).await?;
                return ctx.wan.forward(&base, &head, body).await;
            }
            DatacenterRoute::Unknown => return Err(ApiError::internal(wan::NO_PATH)),
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
    use ApiEndpoint::*;
    match ep {
        Kv(key) => match method {
            Method::GET => kv::get(&r, &key).await,
            Method::PUT => kv::put(ctx, &q, &key, req).await,
            _ => kv::delete(ctx, &q, &key),
        },
        CatalogRegister => catalog::register(ctx, req).await,
        CatalogDeregister => catalog::deregister(ctx, req).await,
        CatalogServices => catalog::services(&r).await,
        CatalogService(name) => catalog::service(&r, &name).await,
        CatalogNodes => catalog::nodes(&r).await,
        CatalogDatacenters => Ok(r.plain_json(catalog::datacenters(ctx))),
        HealthService(name) => health::service(&r, &name).await,
        HealthState(state) => health::state(&r, &state).await,
        HealthChecks(name) => health::checks(&r, &name).await,
        HealthNode(node) => health::node(&r, &node).await,
        AgentServiceRegister => agent::register_service(ctx, &q, req).await,
        AgentServiceDeregister(id) => agent::deregister_service(ctx, &id),
        AgentServiceMaintenance(id) => agent::service_maintenance(ctx, &q, &id),
        AgentMaintenance => agent::node_maintenance(ctx, &q),
        AgentServices => Ok(r.plain_json(agent::services(ctx))),
        AgentService(id) => agent::service(&r, &id).await,
        AgentChecks => Ok(r.plain_json(agent::checks(ctx))),
        AgentCheckRegister => agent::register_check(ctx, req).await,
        AgentCheckDeregister(id) => agent::deregister_check(ctx, &id),
        AgentCheckTtl(status, id) => agent::check_ttl(ctx, &q, status, &id),
        AgentCheckUpdate(id) => agent::check_update(ctx, &id, req).await,
        AgentSelf => Ok(r.plain_json(agent::self_description(ctx))),
        AgentMembers => Ok(r.plain_json(agent::members(ctx))),
        StatusLeader => Ok(r.plain_json(status::leader(ctx))),
        StatusPeers => Ok(r.plain_json(status::peers(ctx))),
    }
}
