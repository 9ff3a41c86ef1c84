//! `/v1/health/*`: `service/:name` (node, service and checks per instance; `passing`,
//! `tag`, `node-meta`), `state/:state`, `checks/:service` and `node/:node`, all blocking.

use serde_json::{json, Value};

use super::reply::{Reader, Resp};
use super::select::{missing_name, node_matches, node_meta_filter};
use crate::devregistry::error::ApiError;
use crate::devregistry::params::parse_go_bool;
use crate::devregistry::store::{IndexedAnswer, Status};
use crate::devregistry::watch::WatchKey;
use crate::devregistry::wire;

pub async fn service(r: &Reader<'_>, name: &str) -> Result<Resp, ApiError> {
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

pub async fn state(r: &Reader<'_>, state: &str) -> Result<Resp, ApiError> {
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

pub async fn checks(r: &Reader<'_>, name: &str) -> Result<Resp, ApiError> {
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

pub async fn node(r: &Reader<'_>, node: &str) -> Result<Resp, ApiError> {
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
