//! `/v1/agent/*`: the local agent's services and checks (register, deregister, TTL
//! updates, maintenance), `services`, `service/:id` (hash-blocking), `checks`, `self` and
//! `members`.

use http::{Request, StatusCode};
use hyper::body::Incoming;
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};

use super::context::ApiContext;
use super::reply::{empty_ok, header, read_json_body, Reader, Resp};
use crate::devregistry::error::ApiError;
use crate::devregistry::params::{parse_go_bool, Query};
use crate::devregistry::store::{IndexedAnswer, RegistryState, Status};
use crate::devregistry::watch::WatchKey;
use crate::devregistry::wire;

/// `PUT /v1/agent/service/register[?replace-existing-checks]`.
pub async fn register_service(
    ctx: &ApiContext,
    q: &Query,
    req: Request<Incoming>,
) -> Result<Resp, ApiError> {
    let body = read_json_body(req).await?;
    let svc: wire::ServiceIn = wire::decode(&body).map_err(ApiError::bad_request)?;
    let (svc, checks) = svc.into_service().map_err(ApiError::bad_request)?;
    ctx.agent
        .register_service(svc, checks, q.has("replace-existing-checks"))?;
    Ok(empty_ok())
}

/// `PUT /v1/agent/service/deregister/:id` (an unknown ID is a no-op, as documented).
pub fn deregister_service(ctx: &ApiContext, id: &str) -> Result<Resp, ApiError> {
    ctx.agent.deregister_service(id);
    Ok(empty_ok())
}

fn maintenance_flag(q: &Query) -> Result<bool, ApiError> {
    let Some(v) = q.get("enable") else {
        return Err(ApiError::bad_request("Missing value for enable"));
    };
    parse_go_bool(v)
        .ok_or_else(|| ApiError::bad_request(format!("Invalid value for enable: {v:?}")))
}

/// `PUT /v1/agent/service/maintenance/:id?enable=…&reason=…`.
pub fn service_maintenance(ctx: &ApiContext, q: &Query, id: &str) -> Result<Resp, ApiError> {
    if id.is_empty() {
        return Err(ApiError::bad_request("Missing service ID"));
    }
    let enable = maintenance_flag(q)?;
    ctx.agent
        .service_maintenance(id, enable, q.get("reason").unwrap_or(""))?;
    Ok(empty_ok())
}

/// `PUT /v1/agent/maintenance?enable=…&reason=…`.
pub fn node_maintenance(ctx: &ApiContext, q: &Query) -> Result<Resp, ApiError> {
    let enable = maintenance_flag(q)?;
    ctx.agent
        .node_maintenance(enable, q.get("reason").unwrap_or(""))?;
    Ok(empty_ok())
}

/// `PUT /v1/agent/check/register`.
pub async fn register_check(ctx: &ApiContext, req: Request<Incoming>) -> Result<Resp, ApiError> {
    let body = read_json_body(req).await?;
    let c: wire::CheckIn = wire::decode(&body).map_err(ApiError::bad_request)?;
    let spec = c.into_spec().map_err(ApiError::bad_request)?;
    ctx.agent.register_check(spec)?;
    Ok(empty_ok())
}

/// `PUT /v1/agent/check/deregister/:id`.
pub fn deregister_check(ctx: &ApiContext, id: &str) -> Result<Resp, ApiError> {
    ctx.agent.deregister_check(id)?;
    Ok(empty_ok())
}

/// `PUT /v1/agent/check/pass|warn|fail/:id[?note=…]`.
pub fn check_ttl(ctx: &ApiContext, q: &Query, status: Status, id: &str) -> Result<Resp, ApiError> {
    ctx.agent
        .update_ttl(id, status, q.get("note").unwrap_or(""))?;
    Ok(empty_ok())
}

/// `PUT /v1/agent/check/update/:id` with `{"Status", "Output"}`.
pub async fn check_update(
    ctx: &ApiContext,
    id: &str,
    req: Request<Incoming>,
) -> Result<Resp, ApiError> {
    let body = read_json_body(req).await?;
    let u: wire::CheckUpdateIn = wire::decode(&body).map_err(ApiError::bad_request)?;
    let status = Status::parse(&u.status)
        .ok_or_else(|| ApiError::bad_request(format!("Invalid check status: '{}'", u.status)))?;
    ctx.agent.update_ttl(id, status, &u.output)?;
    Ok(empty_ok())
}

pub fn services(ctx: &ApiContext) -> Value {
    let node = &ctx.agent.identity.node_name;
    ctx.store.read(|s| {
        s.services
            .values()
            .filter(|e| &e.node == node && e.agent_local)
            .map(|e| {
                (
                    e.service.id.clone(),
                    wire::agent_service_json(e, ctx.wan.own()),
                )
            })
            .collect::<Map<_, _>>()
            .into()
    })
}

pub fn checks(ctx: &ApiContext) -> Value {
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
pub async fn service(r: &Reader<'_>, id: &str) -> Result<Resp, ApiError> {
    let ctx = r.ctx;
    let node = ctx.agent.identity.node_name.clone();
    let want = r.q.get("hash").filter(|h| !h.is_empty()).map(String::from);
    let lookup = |s: &RegistryState| {
        s.services
            .get(&(node.clone(), id.to_string()))
            .filter(|e| e.agent_local)
            .map(|e| {
                let v = wire::agent_service_json(e, ctx.wan.own());
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

/// `GET /v1/agent/members`: this agent alone.
pub fn members(ctx: &ApiContext) -> Value {
    json!([member(ctx)])
}

fn member(ctx: &ApiContext) -> Value {
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

/// `GET /v1/agent/self`.
pub fn self_description(ctx: &ApiContext) -> Value {
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
