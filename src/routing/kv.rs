//! Routes from KV: every key under `<kv-prefix>routes/` holds one JSON [`RouteSpec`].
//! [`RouteDocs`] keeps, per key, the last document that compiled. A bad document is
//! rejected alone (logged, counted, listed by the admin API) and that key's last good
//! version keeps serving; the other keys still update; a deleted key removes its route.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::Serialize;
use tokio::sync::mpsc;

use crate::consul::watch::{self, KvPrefix};
use crate::consul::{ConsulClient, KvPair, WatchHandle, WatchOptions};

use super::{Route, RouteError, RouteSpec};
use crate::policy::RateLimitScope;

/// The folder under the KV prefix that holds route documents.
pub const ROUTES_DIR: &str = "routes/";

/// A document that did not compile.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RouteRejection {
    /// Route name: the key below `<kv-prefix>routes/`.
    pub name: String,
    /// The full KV key.
    pub key: String,
    pub error: String,
    /// `ModifyIndex` of the rejected value (0 when unknown).
    pub modify_index: u64,
    /// Whether an earlier good version of this key is still serving.
    pub serving_last_good: bool,
    /// `ModifyIndex` of that good version (absent when unknown, e.g. from the state file).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_good_modify_index: Option<u64>,
}

#[derive(Debug, Default)]
struct Doc {
    /// The value last seen in KV, to skip keys that did not change.
    seen: Option<Vec<u8>>,
    /// The last value that compiled, and its route.
    good: Option<(String, Arc<Route>)>,
    /// `ModifyIndex` of the good value (0: unknown).
    good_index: u64,
    rejection: Option<RouteRejection>,
}

/// What one KV listing changed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Applied {
    /// The serving routes differ (added, removed or replaced).
    pub routes_changed: bool,
    /// The list of rejected documents differs.
    pub rejections_changed: bool,
}

/// The route documents of one KV prefix, last good version per key.
#[derive(Debug)]
pub struct RouteDocs {
    prefix: String,
    docs: BTreeMap<String, Doc>,
    /// The gateway has a shared rate-limit store; without one, `rate_limit.scope =
    /// "cluster"` is a rejected document (it cannot be honoured here).
    shared_limits: bool,
}

impl RouteDocs {
    /// Documents under `<kv_prefix>routes/`.
    pub fn new(kv_prefix: &str) -> RouteDocs {
        RouteDocs {
            prefix: format!("{kv_prefix}{ROUTES_DIR}"),
            docs: BTreeMap::new(),
            shared_limits: false,
        }
    }

    /// Whether `rate_limit.scope = "cluster"` can be served (`[rate_limit]` names a Redis).
    pub fn with_shared_limits(mut self, available: bool) -> RouteDocs {
        self.shared_limits = available;
        self
    }

    /// The KV prefix watched, e.g. `switchyard/routes/`.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Takes documents known good before (warm start from the state file) as the last good
    /// versions. Returns the names of those that no longer compile (they are skipped).
    pub fn seed(&mut self, documents: &BTreeMap<String, String>) -> Vec<(String, RouteError)> {
        let mut failed = Vec::new();
        for (name, text) in documents {
            match compile(name, text.as_bytes(), self.shared_limits) {
                Ok(route) => {
                    self.docs.entry(name.clone()).or_default().good = Some((text.clone(), route));
                }
                Err(e) => failed.push((name.clone(), e)),
            }
        }
        failed
    }

    /// Applies a complete listing of the prefix (as `?recurse` returns it).
    pub fn apply(&mut self, pairs: &[KvPair]) -> Applied {
        let mut applied = Applied::default();
        let mut present = std::collections::HashSet::with_capacity(pairs.len());
        for pair in pairs {
            let Some(name) = pair.key.strip_prefix(&self.prefix) else {
                continue;
            };
            // Folder markers (`routes/`, `routes/team/`) are not documents.
            if name.is_empty() || name.ends_with('/') {
                continue;
            }
            present.insert(name);
            let value = pair.value.as_deref().unwrap_or_default();
            let doc = self.docs.entry(name.to_string()).or_default();
            if doc.seen.as_deref() == Some(value) {
                continue;
            }
            doc.seen = Some(value.to_vec());
            match std::str::from_utf8(value)
                .map_err(|_| RouteError::Json("the value is not UTF-8 text".into()))
                .and_then(|text| compile(name, value, self.shared_limits).map(|r| (text, r)))
            {
                Ok((text, route)) => {
                    let same = doc.good.as_ref().is_some_and(|(t, _)| t == text);
                    if !same {
                        doc.good = Some((text.to_string(), route));
                        doc.good_index = pair.modify_index;
                        applied.routes_changed = true;
                        tracing::info!(route = name, key = %pair.key, "route document accepted");
                    }
                    if doc.rejection.take().is_some() {
                        applied.rejections_changed = true;
                    }
                }
                Err(e) => {
                    let serving_last_good = doc.good.is_some();
                    tracing::warn!(route = name, key = %pair.key, error = %e, serving_last_good,
                        "route document rejected");
                    metrics::counter!(crate::metrics::ROUTE_REJECTED, "key" => pair.key.clone())
                        .increment(1);
                    doc.rejection = Some(RouteRejection {
                        name: name.to_string(),
                        key: pair.key.clone(),
                        error: e.to_string(),
                        modify_index: pair.modify_index,
                        serving_last_good,
                        last_good_modify_index: (serving_last_good && doc.good_index != 0)
                            .then_some(doc.good_index),
                    });
                    applied.rejections_changed = true;
                }
            }
        }
        self.docs.retain(|name, doc| {
            if present.contains(name.as_str()) {
                return true;
            }
            if doc.good.is_some() {
                tracing::info!(route = %name, "route document deleted");
                applied.routes_changed = true;
            }
            if doc.rejection.is_some() {
                applied.rejections_changed = true;
            }
            false
        });
        applied
    }

    /// The serving routes: the last good version of every present key.
    pub fn routes(&self) -> Vec<Arc<Route>> {
        self.docs
            .values()
            .filter_map(|d| d.good.as_ref().map(|(_, r)| r.clone()))
            .collect()
    }

    /// Every key whose current value is rejected, by name.
    pub fn rejections(&self) -> Vec<RouteRejection> {
        self.docs
            .values()
            .filter_map(|d| d.rejection.clone())
            .collect()
    }

    /// The serving documents as text, by name (what the state file keeps).
    pub fn good_documents(&self) -> BTreeMap<String, String> {
        self.docs
            .iter()
            .filter_map(|(n, d)| d.good.as_ref().map(|(t, _)| (n.clone(), t.clone())))
            .collect()
    }
}

fn compile(name: &str, value: &[u8], shared_limits: bool) -> Result<Arc<Route>, RouteError> {
    if value.iter().all(u8::is_ascii_whitespace) {
        return Err(RouteError::Json("the value is empty".into()));
    }
    let spec = RouteSpec::from_json(value).map_err(RouteError::Json)?;
    let route = Route::compile(name, spec)?;
    let cluster = route
        .policy
        .rate_limit
        .as_ref()
        .is_some_and(|r| r.scope == RateLimitScope::Cluster);
    if cluster && !shared_limits {
        return Err(RouteError::Field {
            field: "rate_limit.scope",
            message: "`cluster` needs a shared store: set [rate_limit] redis_url (or \
                      redis_cluster_nodes, redis_sentinel_nodes) in this gateway's configuration"
                .into(),
        });
    }
    Ok(Arc::new(route))
}

/// Watches `<kv_prefix>routes/` and sends every changed listing to `listings`.
pub fn watch(
    client: &ConsulClient,
    kv_prefix: &str,
    options: WatchOptions,
    listings: mpsc::UnboundedSender<Arc<Vec<KvPair>>>,
) -> WatchHandle {
    let prefix = format!("{kv_prefix}{ROUTES_DIR}");
    watch::spawn(KvPrefix::new(client, &prefix), options, move |pairs| {
        let _ = listings.send(pairs);
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(name: &str, value: &str, modify_index: u64) -> KvPair {
        KvPair {
            key: format!("sy/routes/{name}"),
            value: Some(value.as_bytes().to_vec()),
            flags: 0,
            create_index: 1,
            modify_index,
            lock_index: 0,
            session: None,
        }
    }

    fn names(docs: &RouteDocs) -> Vec<String> {
        docs.routes().iter().map(|r| r.name.clone()).collect()
    }

    const USERS: &str = r#"{"service":"users","path_prefix":"/users"}"#;
    const USERS_V2: &str = r#"{"service":"users","path_prefix":"/users","tags":["v2"]}"#;
    const ORDERS: &str = r#"{"service":"orders","path_prefix":"/orders"}"#;

    #[test]
    fn cluster_scope_is_rejected_without_a_shared_store_and_the_last_good_serves() {
        const LOCAL: &str = r#"{"service":"users","path_prefix":"/users","rate_limit":{"per_second":20,"burst":20}}"#;
        const CLUSTER: &str = r#"{"service":"users","path_prefix":"/users","rate_limit":{"per_second":20,"burst":20,"scope":"cluster"}}"#;
        let mut docs = RouteDocs::new("sy/");
        docs.apply(&[pair("users", LOCAL, 1)]);
        let a = docs.apply(&[pair("users", CLUSTER, 2)]);
        assert!(a.rejections_changed && !a.routes_changed);
        let rejected = docs.rejections();
        assert!(
            rejected[0].error.contains("rate_limit.scope"),
            "{rejected:?}"
        );
        assert!(rejected[0].error.contains("redis_url"), "{rejected:?}");
        assert!(rejected[0].serving_last_good);
        assert_eq!(names(&docs), ["users"]);

        let mut docs = RouteDocs::new("sy/").with_shared_limits(true);
        docs.apply(&[pair("users", CLUSTER, 1)]);
        assert!(docs.rejections().is_empty());
        let rule = docs.routes()[0].policy.rate_limit.clone().unwrap();
        assert_eq!(rule.scope, RateLimitScope::Cluster);
        let mut bad = RouteDocs::new("sy/").with_shared_limits(true);
        bad.apply(&[pair("users", &CLUSTER.replace("cluster", "global"), 1)]);
        assert!(
            bad.rejections()[0]
                .error
                .contains("expected `local` or `cluster`"),
            "{:?}",
            bad.rejections()
        );
    }

    #[test]
    fn every_good_key_becomes_a_route() {
        let mut docs = RouteDocs::new("sy/");
        let a = docs.apply(&[pair("users", USERS, 1), pair("orders", ORDERS, 2)]);
        assert!(a.routes_changed && !a.rejections_changed);
        assert_eq!(names(&docs), ["orders", "users"]);
    }

    #[test]
    fn a_bad_document_keeps_the_last_good_version_and_is_reported() {
        let mut docs = RouteDocs::new("sy/");
        docs.apply(&[pair("users", USERS, 1), pair("orders", ORDERS, 2)]);
        let a = docs.apply(&[
            pair("users", r#"{"service":"users","path_prefix":"/users""#, 3),
            pair(
                "orders",
                r#"{"service":"orders","path_prefix":"/orders2"}"#,
                4,
            ),
        ]);
        assert_eq!(
            a,
            Applied {
                routes_changed: true,
                rejections_changed: true
            }
        );
        let routes = docs.routes();
        let users = routes.iter().find(|r| r.name == "users").unwrap();
        assert_eq!(users.path_prefix, "/users");
        let orders = routes.iter().find(|r| r.name == "orders").unwrap();
        assert_eq!(orders.path_prefix, "/orders2", "the rest still updates");
        let rej = docs.rejections();
        assert_eq!(rej.len(), 1);
        assert_eq!(rej[0].key, "sy/routes/users");
        assert_eq!(rej[0].modify_index, 3);
        assert!(rej[0].serving_last_good);
        assert!(rej[0].error.contains("invalid JSON"), "{}", rej[0].error);
    }

    #[test]
    fn a_document_that_fails_validation_names_the_field() {
        let mut docs = RouteDocs::new("sy/");
        docs.apply(&[pair("bad", r#"{"service":"a","path_prefix":"nope"}"#, 1)]);
        let rej = docs.rejections();
        assert!(rej[0].error.contains("path_prefix"), "{}", rej[0].error);
        assert!(!rej[0].serving_last_good);
        assert!(docs.routes().is_empty());
    }

    #[test]
    fn fixing_a_rejected_document_clears_its_error() {
        let mut docs = RouteDocs::new("sy/");
        docs.apply(&[pair("users", USERS, 1)]);
        docs.apply(&[pair("users", "{", 2)]);
        let a = docs.apply(&[pair("users", USERS_V2, 3)]);
        assert!(a.routes_changed && a.rejections_changed);
        assert!(docs.rejections().is_empty());
        assert_eq!(docs.routes()[0].spec.tags, ["v2"]);
    }

    #[test]
    fn reverting_to_the_serving_version_changes_no_route() {
        let mut docs = RouteDocs::new("sy/");
        docs.apply(&[pair("users", USERS, 1)]);
        docs.apply(&[pair("users", "{", 2)]);
        let a = docs.apply(&[pair("users", USERS, 3)]);
        assert_eq!(
            a,
            Applied {
                routes_changed: false,
                rejections_changed: true
            }
        );
    }

    #[test]
    fn an_unchanged_listing_changes_nothing() {
        let mut docs = RouteDocs::new("sy/");
        docs.apply(&[pair("users", USERS, 1), pair("bad", "x", 2)]);
        assert_eq!(
            docs.apply(&[pair("users", USERS, 1), pair("bad", "x", 2)]),
            Applied::default()
        );
    }

    #[test]
    fn a_deleted_key_removes_its_route_and_its_rejection() {
        let mut docs = RouteDocs::new("sy/");
        docs.apply(&[pair("users", USERS, 1), pair("bad", "x", 2)]);
        let a = docs.apply(&[]);
        assert!(a.routes_changed && a.rejections_changed);
        assert!(docs.routes().is_empty());
        assert!(docs.rejections().is_empty());
    }

    #[test]
    fn folders_empty_values_and_foreign_keys_are_handled() {
        let mut docs = RouteDocs::new("sy/");
        let mut folder = pair("team/", "", 1);
        folder.value = None;
        let mut foreign = pair("x", USERS, 1);
        foreign.key = "other/routes/x".into();
        let mut empty = pair("empty", "", 1);
        empty.value = None;
        docs.apply(&[folder, foreign, empty, pair("team/users", USERS, 2)]);
        assert_eq!(names(&docs), ["team/users"]);
        let rej = docs.rejections();
        assert_eq!(rej.len(), 1);
        assert_eq!(rej[0].name, "empty");
        assert!(rej[0].error.contains("empty"));
    }

    #[test]
    fn every_example_route_in_config_compiles() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/routes");
        let mut seen = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "json") {
                let name = path.file_stem().unwrap().to_string_lossy().into_owned();
                let bytes = std::fs::read(&path).unwrap();
                if let Err(e) = compile(&name, &bytes, true) {
                    panic!("{}: {e}", path.display());
                }
                seen += 1;
            }
        }
        assert!(seen >= 2, "examples expected in {}", dir.display());
    }

    #[test]
    fn seeded_documents_serve_until_consul_says_otherwise() {
        let mut docs = RouteDocs::new("sy/");
        let mut seed = BTreeMap::new();
        seed.insert("users".to_string(), USERS.to_string());
        seed.insert("broken".to_string(), "{".to_string());
        let failed = docs.seed(&seed);
        assert_eq!(failed.len(), 1);
        assert_eq!(names(&docs), ["users"]);
        // Consul now holds a bad version: the seeded one keeps serving.
        docs.apply(&[pair("users", "{", 9)]);
        assert_eq!(names(&docs), ["users"]);
        assert_eq!(docs.good_documents()["users"], USERS);
    }
}
