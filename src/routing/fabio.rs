//! fabio migration: services tagged `urlprefix-<host><path> [strip=<path>]` are routed as
//! fabio routes them, so a fleet can move without re-tagging. KV route documents win over
//! tag routes on the same host and prefix.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use super::spec::RouteSpec;
use super::{HostMatch, Route};

/// Prefix of the synthetic route names, so `/routes` shows where a route came from.
pub const NAME_PREFIX: &str = "fabio:";

/// A tag that could not be turned into a route, with the reason.
#[derive(Debug, Clone, PartialEq)]
pub struct TagError {
    pub service: String,
    pub tag: String,
    pub message: String,
}

/// Route documents for every `urlprefix-` tag in a `catalog/services` answer
/// (service → union of its instances' tags). Each route keeps only the instances that
/// carry its tag, as fabio does.
pub fn routes_from_tags(
    services: &BTreeMap<String, Vec<String>>,
) -> (Vec<(String, RouteSpec)>, Vec<TagError>) {
    let mut routes = Vec::new();
    let mut errors = Vec::new();
    for (service, tags) in services {
        for tag in tags {
            let Some(rest) = tag.strip_prefix("urlprefix-") else {
                continue;
            };
            match parse(service, tag, rest) {
                Ok(Some(spec)) => routes.push((format!("{NAME_PREFIX}{service}:{rest}"), spec)),
                Ok(None) => {}
                Err(message) => errors.push(TagError {
                    service: service.clone(),
                    tag: tag.clone(),
                    message,
                }),
            }
        }
    }
    (routes, errors)
}

fn parse(service: &str, tag: &str, rest: &str) -> Result<Option<RouteSpec>, String> {
    let mut parts = rest.split_whitespace();
    let target = parts.next().ok_or("empty urlprefix tag")?;
    if target.starts_with(':') {
        // TCP proxy routes (`urlprefix-:3306 proto=tcp`) are not HTTP routes.
        return Ok(None);
    }
    let (host, path) = match target.find('/') {
        Some(0) => (None, target),
        Some(i) => (Some(&target[..i]), &target[i..]),
        None => return Err(format!("`{target}` has no path")),
    };
    let mut strip: Option<&str> = None;
    for opt in parts {
        match opt.split_once('=') {
            Some(("strip", v)) => strip = Some(v),
            Some(("proto", "http")) => {}
            Some((k, _)) => return Err(format!("option `{k}` is not supported")),
            None => return Err(format!("option `{opt}` is not key=value")),
        }
    }
    let prefix = path.trim_end_matches('/');
    let prefix = if prefix.is_empty() { "/" } else { prefix };
    let rewrite_prefix = match strip {
        None => None,
        Some(s) => {
            let s = s.trim_end_matches('/');
            let rest = prefix
                .strip_prefix(s)
                .filter(|r| r.is_empty() || r.starts_with('/'))
                .ok_or_else(|| format!("strip=`{s}` is not a prefix of `{prefix}`"))?;
            Some(if rest.is_empty() {
                "/".to_string()
            } else {
                rest.to_string()
            })
        }
    };
    let (strip_prefix, rewrite_prefix) = match rewrite_prefix.as_deref() {
        Some("/") => (true, None),
        _ => (false, rewrite_prefix),
    };
    Ok(Some(RouteSpec {
        host: host.map(str::to_string),
        tags: vec![tag.to_string()],
        strip_prefix,
        rewrite_prefix,
        ..RouteSpec::minimal(service, prefix)
    }))
}

/// The services of a `catalog/services` answer that carry at least one `urlprefix-` tag
/// (all that tag routes need; what the state file keeps).
pub fn tagged_services(services: &BTreeMap<String, Vec<String>>) -> BTreeMap<String, Vec<String>> {
    services
        .iter()
        .filter(|(_, tags)| tags.iter().any(|t| t.starts_with("urlprefix-")))
        .map(|(s, tags)| (s.clone(), tags.clone()))
        .collect()
}

/// Compiles the tag routes of a `catalog/services` answer; a tag that does not make a
/// valid route is reported with its service and reason.
pub fn compile(services: &BTreeMap<String, Vec<String>>) -> (Vec<Arc<Route>>, Vec<TagError>) {
    let (specs, mut errors) = routes_from_tags(services);
    let mut routes = Vec::with_capacity(specs.len());
    for (name, spec) in specs {
        let service = spec.service.clone();
        let tag = spec.tags.first().cloned().unwrap_or_default();
        match Route::compile(&name, spec) {
            Ok(r) => routes.push(Arc::new(r)),
            Err(e) => errors.push(TagError {
                service,
                tag,
                message: e.to_string(),
            }),
        }
    }
    (routes, errors)
}

/// Where a route came from, for `/routes`: `kv`, or the fabio tag that made it.
pub fn source_of(route: &Route) -> String {
    match route.name.strip_prefix(NAME_PREFIX) {
        Some(_) => format!(
            "fabio tag `{}` on service {}",
            route.spec.tags.first().map(String::as_str).unwrap_or(""),
            route.spec.service
        ),
        None => "kv".into(),
    }
}

/// Drops tag routes that collide with a KV route on host and prefix: KV wins.
pub fn without_kv_conflicts<'a>(
    kv: impl IntoIterator<Item = &'a Route>,
    tag_routes: &[Arc<Route>],
) -> Vec<Arc<Route>> {
    let taken: HashSet<(HostMatch, String)> = kv
        .into_iter()
        .map(|r| (r.host.clone(), r.path_prefix.clone()))
        .collect();
    tag_routes
        .iter()
        .filter(|r| !taken.contains(&(r.host.clone(), r.path_prefix.clone())))
        .cloned()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tags(service: &str, t: &[&str]) -> BTreeMap<String, Vec<String>> {
        let mut m = BTreeMap::new();
        m.insert(
            service.to_string(),
            t.iter().map(|s| s.to_string()).collect(),
        );
        m
    }

    #[test]
    fn host_and_path_tags_become_routes_limited_to_tagged_instances() {
        let (routes, errors) = routes_from_tags(&tags(
            "users",
            &[
                "v1",
                "urlprefix-api.example.com/users",
                "urlprefix-/u strip=/u",
            ],
        ));
        assert!(errors.is_empty());
        assert_eq!(routes.len(), 2);
        let (name, spec) = &routes[0];
        assert_eq!(name, "fabio:users:api.example.com/users");
        assert_eq!(spec.host.as_deref(), Some("api.example.com"));
        assert_eq!(spec.path_prefix, "/users");
        assert_eq!(spec.tags, vec!["urlprefix-api.example.com/users"]);
        assert!(!spec.strip_prefix);
        assert!(routes[1].1.strip_prefix);
    }

    #[test]
    fn strip_of_a_shorter_prefix_becomes_a_rewrite() {
        let (routes, _) = routes_from_tags(&tags("s", &["urlprefix-/foo/bar strip=/foo"]));
        assert_eq!(routes[0].1.rewrite_prefix.as_deref(), Some("/bar"));
    }

    #[test]
    fn tcp_routes_are_skipped_and_bad_tags_reported() {
        let (routes, errors) = routes_from_tags(&tags(
            "s",
            &[
                "urlprefix-:3306 proto=tcp",
                "urlprefix-host-only",
                "urlprefix-/x strip=/y",
            ],
        ));
        assert!(routes.is_empty());
        assert_eq!(errors.len(), 2);
    }

    #[test]
    fn only_services_with_urlprefix_tags_are_kept() {
        let mut services = tags("web", &["urlprefix-/web", "v1"]);
        services.insert("db".into(), vec!["primary".into()]);
        services.insert("bare".into(), vec![]);
        let kept = tagged_services(&services);
        assert_eq!(kept.keys().collect::<Vec<_>>(), ["web"]);
        assert_eq!(kept["web"], ["urlprefix-/web", "v1"]);
    }

    #[test]
    fn kv_routes_win_on_the_same_host_and_prefix() {
        let kv = Route::compile("users", RouteSpec::minimal("users-v2", "/users")).unwrap();
        let (specs, _) = routes_from_tags(&tags("users", &["urlprefix-/users", "urlprefix-/u"]));
        let tag_routes: Vec<Arc<Route>> = specs
            .into_iter()
            .map(|(n, s)| Arc::new(Route::compile(&n, s).unwrap()))
            .collect();
        let kept = without_kv_conflicts([&kv], &tag_routes);
        assert_eq!(kept.len(), 1);
        assert_eq!(kept[0].path_prefix, "/u");
    }
}
