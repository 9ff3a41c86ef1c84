//! `/v1/catalog/*`: register and deregister (catalog data only, nothing executed; a body
//! naming a peer's datacenter goes to that peer), the blocking reads `services`,
//! `service/:name` and `nodes`, and `datacenters`.

use std::collections::BTreeMap;

use bytes::Bytes;
use http::Request;
use hyper::body::Incoming;
use serde_json::{json, Value};

use super::context::ApiContext;
use super::reply::{bool_ok, read_json_body, Reader, Resp};
use super::select::{missing_name, node_matches, node_meta_filter};
use super::wan::{DatacenterRoute, RequestHead, NO_PATH};
use crate::devregistry::error::ApiError;
use crate::devregistry::store::IndexedAnswer;
use crate::devregistry::watch::WatchKey;
use crate::devregistry::wire;

/// A write whose body names another datacenter goes to it (Consul ignores `?dc=` here).
async fn elsewhere(
    ctx: &ApiContext,
    dc: Option<&str>,
    head: &RequestHead,
    body: &Bytes,
) -> Option<Result<Resp, ApiError>> {
    match ctx.wan.route(dc.filter(|d| !d.is_empty())?, head) {
        DatacenterRoute::Local => None,
        DatacenterRoute::Peer(base) => Some(ctx.wan.forward(&base, head, body.clone()).await),
        DatacenterRoute::Unknown => Some(Err(ApiError::internal(NO_PATH))),
    }
}

pub async fn register(ctx: &ApiContext, req: Request<Incoming>) -> Result<Resp, ApiError> {
    let head = RequestHead::of(&req);
    let body = read_json_body(req).await?;
    let reg: wire::CatalogRegisterIn = wire::decode(&body).map_err(ApiError::bad_request)?;
    if let Some(answer) = elsewhere(ctx, reg.datacenter(), &head, &body).await {
        return answer;
    }
    let reg = reg
        .into_registration(ctx.wan.own())
        .map_err(ApiError::bad_request)?;
    if ctx.faults.no_leader() {
        return Err(ApiError::no_leader());
    }
    ctx.store.register(&reg)?;
    Ok(bool_ok(true))
}

pub async fn deregister(ctx: &ApiContext, req: Request<Incoming>) -> Result<Resp, ApiError> {
    let head = RequestHead::of(&req);
    let body = read_json_body(req).await?;
    let d: wire::CatalogDeregisterIn = wire::decode(&body).map_err(ApiError::bad_request)?;
    if let Some(answer) = elsewhere(ctx, d.datacenter.as_deref(), &head, &body).await {
        return answer;
    }
    let node = d.node.unwrap_or_default();
    if node.is_empty() {
        return Err(ApiError::bad_request("Missing node name"));
    }
    if ctx.faults.no_leader() {
        return Err(ApiError::no_leader());
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

pub async fn services(r: &Reader<'_>) -> Result<Resp, ApiError> {
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

pub async fn service(r: &Reader<'_>, name: &str) -> Result<Resp, ApiError> {
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

pub async fn nodes(r: &Reader<'_>) -> Result<Resp, ApiError> {
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

/// `GET /v1/catalog/datacenters`: the datacenters this server knows.
pub fn datacenters(ctx: &ApiContext) -> Value {
    json!(ctx.wan.datacenters())
}
