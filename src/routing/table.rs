//! The route table: built once per snapshot, then read-only. A lookup walks the request
//! path's ancestors (`/a/b/c`, `/a/b`, `/a`, `/`) through hash maps, so its cost grows with
//! the path's depth, not with the number of routes.

use std::collections::HashMap;
use std::sync::Arc;

use http::{HeaderMap, Method};
use serde::Serialize;

use super::{HostMatch, Route};

/// Two routes with the same host, prefix, methods and headers: the one whose name sorts
/// first wins, deterministically on every gateway; the other is reported here.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Conflict {
    pub route: String,
    pub shadowed_by: String,
}

/// Keys are the operator's hosts and prefixes, looked up once or more per request: a fast
/// hash rather than SipHash (a client's path only probes, it never inserts).
type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

#[derive(Debug, Default)]
struct PrefixMap {
    /// Candidates per prefix, most specific first (method/header constraints before none).
    by_prefix: FastMap<String, Vec<usize>>,
}

impl PrefixMap {
    fn lookup(
        &self,
        routes: &[Arc<Route>],
        path: &str,
        method: &Method,
        headers: &HeaderMap,
    ) -> Option<usize> {
        if self.by_prefix.is_empty() {
            return None;
        }
        let mut candidate = path;
        loop {
            if let Some(ids) = self.by_prefix.get(candidate) {
                if let Some(&id) = ids
                    .iter()
                    .find(|&&id| routes[id].matches_request(method, headers))
                {
                    return Some(id);
                }
            }
            if candidate == "/" || candidate.is_empty() {
                return None;
            }
            candidate = match candidate.rfind('/') {
                Some(0) => "/",
                Some(i) => &candidate[..i],
                None => return None,
            };
        }
    }
}

#[derive(Debug, Default)]
pub struct RouteTable {
    routes: Vec<Arc<Route>>,
    exact: FastMap<String, PrefixMap>,
    wildcard: FastMap<String, PrefixMap>,
    any: PrefixMap,
    conflicts: Vec<Conflict>,
}

impl RouteTable {
    /// Builds the table; routes are ordered by name first so conflicts resolve the same way
    /// on every gateway whatever order KV returned them in.
    pub fn build(mut routes: Vec<Arc<Route>>) -> RouteTable {
        routes.sort_by(|a, b| a.name.cmp(&b.name));
        let mut table = RouteTable::default();
        let mut seen: HashMap<(HostMatch, String, Vec<String>, Vec<String>), String> =
            HashMap::new();
        for route in routes {
            let mut methods: Vec<String> = route
                .methods
                .iter()
                .map(|m| m.as_str().to_string())
                .collect();
            methods.sort();
            let mut headers: Vec<String> = route
                .headers
                .iter()
                .map(|(k, v)| format!("{k}={}", String::from_utf8_lossy(v.as_bytes())))
                .collect();
            headers.sort();
            let key = (
                route.host.clone(),
                route.path_prefix.clone(),
                methods,
                headers,
            );
            if let Some(winner) = seen.get(&key) {
                table.conflicts.push(Conflict {
                    route: route.name.clone(),
                    shadowed_by: winner.clone(),
                });
                continue;
            }
            seen.insert(key, route.name.clone());
            let id = table.routes.len();
            let map = match &route.host {
                HostMatch::Any => &mut table.any,
                HostMatch::Exact(h) => table.exact.entry(h.clone()).or_default(),
                HostMatch::Wildcard(suffix) => table.wildcard.entry(suffix.clone()).or_default(),
            };
            map.by_prefix
                .entry(route.path_prefix.clone())
                .or_default()
                .push(id);
            table.routes.push(route);
        }
        let routes = &table.routes;
        let specificity = |id: &usize| {
            let r = &routes[*id];
            std::cmp::Reverse((r.headers.len(), !r.methods.is_empty() as usize))
        };
        for map in table
            .exact
            .values_mut()
            .chain(table.wildcard.values_mut())
            .chain(std::iter::once(&mut table.any))
        {
            for ids in map.by_prefix.values_mut() {
                ids.sort_by_key(specificity);
            }
        }
        table
    }

    /// Finds the route for a request. `host` may carry a port; `path` must already be
    /// normalised. Exact hosts are tried first, then wildcards, then host-less routes.
    pub fn lookup(
        &self,
        host: &str,
        path: &str,
        method: &Method,
        headers: &HeaderMap,
    ) -> Option<usize> {
        let host = strip_port(host);
        let lowered;
        let host = if host.bytes().any(|b| b.is_ascii_uppercase()) {
            lowered = host.to_ascii_lowercase();
            lowered.as_str()
        } else {
            host
        };
        if !host.is_empty() {
            if let Some(map) = self.exact.get(host) {
                if let Some(id) = map.lookup(&self.routes, path, method, headers) {
                    return Some(id);
                }
            }
            if !self.wildcard.is_empty() {
                if let Some(dot) = host.find('.') {
                    if let Some(map) = self.wildcard.get(&host[dot..]) {
                        if let Some(id) = map.lookup(&self.routes, path, method, headers) {
                            return Some(id);
                        }
                    }
                }
            }
        }
        self.any.lookup(&self.routes, path, method, headers)
    }

    pub fn routes(&self) -> &[Arc<Route>] {
        &self.routes
    }

    pub fn get(&self, id: usize) -> Option<&Arc<Route>> {
        self.routes.get(id)
    }

    pub fn conflicts(&self) -> &[Conflict] {
        &self.conflicts
    }

    pub fn len(&self) -> usize {
        self.routes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }
}

fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        return match host.find(']') {
            Some(i) => &host[..=i],
            None => host,
        };
    }
    match host.rfind(':') {
        Some(i) => &host[..i],
        None => host,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::RouteSpec;

    fn route(name: &str, json: &str) -> Arc<Route> {
        Arc::new(Route::compile(name, RouteSpec::from_json(json.as_bytes()).unwrap()).unwrap())
    }

    fn find(t: &RouteTable, host: &str, path: &str, method: Method) -> Option<String> {
        t.lookup(host, path, &method, &HeaderMap::new())
            .map(|id| t.get(id).unwrap().name.clone())
    }

    #[test]
    fn longest_prefix_on_segment_boundaries() {
        let t = RouteTable::build(vec![
            route("root", r#"{"service":"a","path_prefix":"/"}"#),
            route("api", r#"{"service":"a","path_prefix":"/api"}"#),
            route("apiv2", r#"{"service":"a","path_prefix":"/api/v2"}"#),
        ]);
        assert_eq!(find(&t, "x", "/api", Method::GET).unwrap(), "api");
        assert_eq!(find(&t, "x", "/api/x", Method::GET).unwrap(), "api");
        assert_eq!(find(&t, "x", "/apix", Method::GET).unwrap(), "root");
        assert_eq!(
            find(&t, "x", "/api/v2/users", Method::GET).unwrap(),
            "apiv2"
        );
        assert_eq!(find(&t, "x", "/api/v2x", Method::GET).unwrap(), "api");
    }

    #[test]
    fn hosts_exact_then_wildcard_then_any() {
        let t = RouteTable::build(vec![
            route("any", r#"{"service":"a","path_prefix":"/"}"#),
            route(
                "wild",
                r#"{"service":"a","path_prefix":"/","host":"*.example.com"}"#,
            ),
            route(
                "exact",
                r#"{"service":"a","path_prefix":"/","host":"api.example.com"}"#,
            ),
        ]);
        assert_eq!(
            find(&t, "API.example.com:443", "/", Method::GET).unwrap(),
            "exact"
        );
        assert_eq!(
            find(&t, "www.example.com", "/", Method::GET).unwrap(),
            "wild"
        );
        assert_eq!(
            find(&t, "a.b.example.com", "/", Method::GET).unwrap(),
            "any"
        );
        assert_eq!(find(&t, "example.com", "/", Method::GET).unwrap(), "any");
    }

    #[test]
    fn methods_constrain_and_duplicates_are_reported() {
        let t = RouteTable::build(vec![
            route(
                "b-dup",
                r#"{"service":"a","path_prefix":"/w","methods":["POST"]}"#,
            ),
            route(
                "a-post",
                r#"{"service":"a","path_prefix":"/w","methods":["post"]}"#,
            ),
            route("get", r#"{"service":"a","path_prefix":"/w"}"#),
        ]);
        assert_eq!(find(&t, "", "/w", Method::POST).unwrap(), "a-post");
        assert_eq!(find(&t, "", "/w", Method::GET).unwrap(), "get");
        assert_eq!(
            t.conflicts(),
            &[Conflict {
                route: "b-dup".into(),
                shadowed_by: "a-post".into()
            }]
        );
    }

    #[test]
    fn no_match_without_root_route() {
        let t = RouteTable::build(vec![route(
            "api",
            r#"{"service":"a","path_prefix":"/api"}"#,
        )]);
        assert!(find(&t, "", "/", Method::GET).is_none());
        assert!(find(&t, "", "/other", Method::GET).is_none());
    }
}
