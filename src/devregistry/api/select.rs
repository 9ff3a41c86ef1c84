//! What catalog and health reads select by: the service name they require and the nodes
//! `node-meta=k:v` admits.

use crate::devregistry::error::ApiError;
use crate::devregistry::params::Query;
use crate::devregistry::store::RegistryState;

/// `node-meta=k:v` (repeatable): the node must carry every pair.
pub fn node_meta_filter(q: &Query) -> Vec<(String, String)> {
    q.all("node-meta")
        .into_iter()
        .map(|p| match p.split_once(':') {
            Some((k, v)) => (k.to_string(), v.to_string()),
            None => (p.to_string(), String::new()),
        })
        .collect()
}

pub fn missing_name(name: &str) -> Result<(), ApiError> {
    if name.is_empty() {
        return Err(ApiError::bad_request("Missing service name"));
    }
    Ok(())
}

pub fn node_matches(s: &RegistryState, node: &str, meta: &[(String, String)]) -> bool {
    meta.is_empty()
        || s.nodes
            .get(node)
            .is_some_and(|n| meta.iter().all(|(k, v)| n.meta.get(k) == Some(v)))
}
