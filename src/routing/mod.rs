//! Routes: the KV document shape ([`spec`]), its validation into a [`Route`], the lookup
//! table ([`table`]) and the KV watch that keeps the last good document per key ([`kv`]).

pub mod fabio;
pub mod kv;
pub mod spec;
pub mod table;

use std::sync::Arc;

use http::{HeaderName, HeaderValue, Method};

use spec::LbPolicy;
pub use spec::RouteSpec;
pub use table::RouteTable;

#[derive(Debug, thiserror::Error, Clone, PartialEq)]
pub enum RouteError {
    #[error("invalid JSON: {0}")]
    Json(String),
    #[error("field `{field}`: {message}")]
    Field {
        field: &'static str,
        message: String,
    },
}

fn field(field: &'static str, message: impl Into<String>) -> RouteError {
    RouteError::Field {
        field,
        message: message.into(),
    }
}

/// How a route matches the `Host` header.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum HostMatch {
    Any,
    /// Lower-case, without port.
    Exact(String),
    /// `*.example.com` stored as `.example.com`: matches exactly one more label.
    Wildcard(String),
}

/// A validated route, ready for the request path.
#[derive(Debug)]
pub struct Route {
    /// KV key name below `<prefix>routes/` (or a synthetic name for tag routes).
    pub name: String,
    pub spec: Arc<RouteSpec>,
    pub host: HostMatch,
    /// Normalised: starts with `/`, no trailing `/` unless it is `/`.
    pub path_prefix: String,
    /// Empty = any method.
    pub methods: Vec<Method>,
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// Replacement for `path_prefix` when forwarding (`""` for strip_prefix).
    pub rewrite: Option<String>,
    /// Credentials the route demands, compiled from `auth`.
    pub auth: crate::auth::Requirement,
    /// Rate limit, IP rules, CORS, request limits and upstream assertion.
    pub policy: crate::policy::RoutePolicy,
    /// The `consistent_hash` key (`client_ip` when `hash_on` is unset).
    pub hash_on: Option<crate::balance::HashOn>,
    /// Request counters and latency of this route.
    pub metrics: crate::metrics::RouteMetrics,
    /// Header rules for the request that goes upstream, and for every answer.
    pub request_headers: Option<crate::rewrite::HeaderRules>,
    pub response_headers: Option<crate::rewrite::HeaderRules>,
    /// The `Host` sent upstream instead of the client's.
    pub host_rewrite: Option<HeaderValue>,
    /// Answered at the gateway; no upstream is involved.
    pub redirect: Option<crate::rewrite::Redirect>,
    /// The upstream sets the route sends to: one, the shares of a `split`, or none for a
    /// redirect.
    pub backends: Vec<Backend>,
}

/// One upstream set of a route: instances of `service` carrying every tag in `tags`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backend {
    pub service: String,
    /// The route's tags and the split entry's, sorted, without repeats.
    pub tags: Vec<String>,
    /// Relative share of the traffic (1 when the route has no split).
    pub weight: u32,
    /// The route's `datacenters` (failover order); empty: the agent's own.
    pub datacenters: Vec<String>,
}

impl Backend {
    /// The health watches the backend reads, in failover order: one per datacenter
    /// (`service@dc`), or the local service.
    pub fn watch_keys(&self) -> Vec<String> {
        if self.datacenters.is_empty() {
            return vec![self.service.clone()];
        }
        self.datacenters
            .iter()
            .map(|dc| crate::discovery::watch_key(&self.service, Some(dc)))
            .collect()
    }
}

impl Route {
    /// Validates the routing part of a document. Other concerns (auth, policy, balancing)
    /// validate their own fields through their modules' compile functions.
    pub fn compile(name: &str, spec: RouteSpec) -> Result<Route, RouteError> {
        let backends = backends(&spec)?;
        let path_prefix =
            normalize_prefix(&spec.path_prefix).map_err(|m| field("path_prefix", m))?;
        let host = match spec.host.as_deref().map(str::trim) {
            None | Some("") => HostMatch::Any,
            Some(h) => parse_host(h).map_err(|m| field("host", m))?,
        };
        let mut methods = Vec::with_capacity(spec.methods.len());
        for m in &spec.methods {
            let method = Method::from_bytes(m.to_ascii_uppercase().as_bytes())
                .map_err(|_| field("methods", format!("`{m}` is not an HTTP method")))?;
            methods.push(method);
        }
        let mut headers = Vec::with_capacity(spec.headers.len());
        for (k, v) in &spec.headers {
            let name = HeaderName::from_bytes(k.as_bytes())
                .map_err(|_| field("headers", format!("`{k}` is not a header name")))?;
            let value = HeaderValue::from_str(v)
                .map_err(|_| field("headers", format!("value of `{k}` is not a header value")))?;
            headers.push((name, value));
        }
        let rewrite = match (&spec.rewrite_prefix, spec.strip_prefix) {
            (Some(_), true) => {
                return Err(field(
                    "rewrite_prefix",
                    "strip_prefix and rewrite_prefix exclude each other",
                ))
            }
            (Some(r), false) => {
                if !r.starts_with('/') {
                    return Err(field("rewrite_prefix", "must start with '/'"));
                }
                Some(r.trim_end_matches('/').to_string())
            }
            (None, true) => Some(String::new()),
            (None, false) => None,
        };
        let hash_on = match (spec.lb, spec.hash_on.as_deref()) {
            (_, Some(h)) => {
                Some(crate::balance::HashOn::parse(h).map_err(|m| field("hash_on", m))?)
            }
            (LbPolicy::ConsistentHash, None) => Some(crate::balance::HashOn::ClientIp),
            _ => None,
        };
        check_failover(&spec)?;
        let auth = crate::auth::Requirement::new(
            spec.auth.jwt.clone(),
            spec.auth.api_key,
            spec.auth.scopes.clone(),
            spec.auth.on_unauthenticated_redirect.clone(),
        )
        .map_err(|e| field("auth", e.to_string()))?;
        let policy = crate::policy::RoutePolicy::compile(&spec.policy_fields(name)).map_err(
            |e| match e {
                crate::policy::PolicyError::Field { field, message } => {
                    RouteError::Field { field, message }
                }
            },
        )?;
        let writes = crate::rewrite::RouteWrites {
            assertion_header: policy.assertion.as_ref().map(|a| &a.header),
            cors: policy.cors.is_some(),
            rate_limit: policy.rate_limit.is_some(),
        };
        let no_rules = crate::rewrite::HeaderRulesSpec::default();
        let request_headers = crate::rewrite::HeaderRules::for_requests(
            spec.request_headers.as_ref().unwrap_or(&no_rules),
            writes,
        )
        .map_err(|e| field("request_headers", e.to_string()))?;
        let response_headers = crate::rewrite::HeaderRules::for_responses(
            spec.response_headers.as_ref().unwrap_or(&no_rules),
            writes,
        )
        .map_err(|e| field("response_headers", e.to_string()))?;
        let host_rewrite = spec
            .host_rewrite
            .as_deref()
            .map(crate::rewrite::compile_host)
            .transpose()
            .map_err(|e| field("host_rewrite", e.to_string()))?;
        let redirect = spec
            .redirect
            .as_ref()
            .map(crate::rewrite::Redirect::compile)
            .transpose()
            .map_err(|e| field("redirect", e.to_string()))?;
        let metrics = crate::metrics::RouteMetrics::new(
            name,
            backends.first().map_or("", |b| b.service.as_str()),
        );
        Ok(Route {
            backends,
            request_headers,
            response_headers,
            host_rewrite,
            redirect,
            metrics,
            policy,
            hash_on,
            name: name.to_string(),
            auth,
            spec: Arc::new(spec),
            host,
            path_prefix,
            methods,
            headers,
            rewrite,
        })
    }

    /// The Consul service the route is known by (its first backend's); `None` for a
    /// redirect.
    pub fn service(&self) -> Option<&str> {
        self.backends.first().map(|b| b.service.as_str())
    }

    /// Every Consul service the route sends traffic to.
    pub fn services(&self) -> impl Iterator<Item = &str> {
        self.backends.iter().map(|b| b.service.as_str())
    }

    /// The health watches the route's backends read ([`Backend::watch_keys`]).
    pub fn backend_watch_keys(&self) -> impl Iterator<Item = String> + '_ {
        self.backends.iter().flat_map(Backend::watch_keys)
    }

    /// Every health watch the gateway must run for the route: its backends' and its
    /// mirror's.
    pub fn watched_services(&self) -> impl Iterator<Item = String> + '_ {
        self.backend_watch_keys()
            .chain(self.spec.mirror.as_ref().map(|m| m.service.clone()))
    }

    /// Whether the route deals its traffic out by weight.
    pub fn is_split(&self) -> bool {
        !self.spec.split.is_empty()
    }

    /// Does the request (path already normalised) match everything but the prefix?
    pub fn matches_request(&self, method: &Method, headers: &http::HeaderMap) -> bool {
        (self.methods.is_empty() || self.methods.contains(method))
            && self
                .headers
                .iter()
                .all(|(k, v)| headers.get_all(k).iter().any(|have| have == v))
    }

    /// The upstream path for a matched request path (prefix rewritten, never empty).
    pub fn upstream_path<'a>(&self, path: &'a str) -> std::borrow::Cow<'a, str> {
        let Some(replacement) = &self.rewrite else {
            return std::borrow::Cow::Borrowed(path);
        };
        let rest = if self.path_prefix == "/" {
            path
        } else {
            &path[self.path_prefix.len().min(path.len())..]
        };
        let joined = format!("{replacement}{rest}");
        if joined.is_empty() {
            std::borrow::Cow::Owned("/".into())
        } else if !joined.starts_with('/') {
            std::borrow::Cow::Owned(format!("/{joined}"))
        } else {
            std::borrow::Cow::Owned(joined)
        }
    }
}

/// Most shares a split may have.
const MAX_SPLIT_ENTRIES: usize = 32;
const MAX_SPLIT_WEIGHT: u32 = 1_000_000;

/// The route's upstream sets: its `service` and `tags`, or one per `split` entry.
fn backends(spec: &RouteSpec) -> Result<Vec<Backend>, RouteError> {
    let datacenters = datacenter_list(&spec.datacenters)?;
    let service_name = |name: &str, f: &'static str| -> Result<(), RouteError> {
        if name.contains(['/', '@']) || name.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(field(f, format!("`{name}` is not a Consul service name")));
        }
        Ok(())
    };
    let own = spec.service.trim();
    if !own.is_empty() {
        service_name(&spec.service, "service")?;
    }
    let tags_with = |extra: &[String]| {
        let mut tags: Vec<String> = spec.tags.iter().chain(extra).cloned().collect();
        tags.sort();
        tags.dedup();
        tags
    };
    if spec.redirect.is_some() {
        if !spec.split.is_empty() {
            return Err(field("split", "a redirect route sends nothing upstream"));
        }
        return Ok(Vec::new());
    }
    if spec.split.is_empty() {
        if own.is_empty() {
            return Err(field(
                "service",
                "must not be empty (only a redirect, or a split whose entries all name a \
                 service, may go without)",
            ));
        }
        return Ok(vec![Backend {
            service: spec.service.clone(),
            tags: tags_with(&[]),
            weight: 1,
            datacenters: datacenters.clone(),
        }]);
    }
    if spec.split.len() > MAX_SPLIT_ENTRIES {
        return Err(field(
            "split",
            format!("at most {MAX_SPLIT_ENTRIES} entries"),
        ));
    }
    let mut backends: Vec<Backend> = Vec::with_capacity(spec.split.len());
    for (i, entry) in spec.split.iter().enumerate() {
        let service = match entry.service.as_deref().map(str::trim) {
            Some("") => return Err(field("split", format!("entry {i}: empty service"))),
            Some(s) => {
                service_name(s, "split")?;
                s.to_string()
            }
            None if own.is_empty() => {
                return Err(field(
                    "split",
                    format!("entry {i} names no service and the route has none"),
                ))
            }
            None => spec.service.clone(),
        };
        if entry.weight > MAX_SPLIT_WEIGHT {
            return Err(field(
                "split",
                format!("entry {i}: weight must be at most {MAX_SPLIT_WEIGHT}"),
            ));
        }
        let backend = Backend {
            service,
            tags: tags_with(&entry.tags),
            weight: entry.weight,
            datacenters: datacenters.clone(),
        };
        if backends
            .iter()
            .any(|b| b.service == backend.service && b.tags == backend.tags)
        {
            return Err(field(
                "split",
                format!("entry {i} selects the same instances as an earlier one"),
            ));
        }
        backends.push(backend);
    }
    if backends.iter().all(|b| b.weight == 0) {
        return Err(field("split", "at least one entry needs a weight above 0"));
    }
    Ok(backends)
}

/// `datacenters`: Consul's datacenter names (`[a-z0-9_-]`, as Consul keeps them), each
/// once, at most 8.
fn datacenter_list(names: &[String]) -> Result<Vec<String>, RouteError> {
    if names.len() > 8 {
        return Err(field("datacenters", "at most 8 datacenters"));
    }
    let mut out: Vec<String> = Vec::with_capacity(names.len());
    for name in names {
        let ok = !name.is_empty()
            && name.len() <= 64
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
        if !ok {
            return Err(field(
                "datacenters",
                format!("`{name}` is not a Consul datacenter name (lower case a-z, 0-9, - and _)"),
            ));
        }
        if out.contains(name) {
            return Err(field("datacenters", format!("`{name}` is named twice")));
        }
        out.push(name.clone());
    }
    Ok(out)
}

/// Timeouts, retries and outlier detection must make sense together.
fn check_failover(spec: &RouteSpec) -> Result<(), RouteError> {
    let t = &spec.timeouts;
    if t.connect_ms == 0 || t.per_try_ms == 0 || t.total_ms == 0 {
        return Err(field("timeouts", "every timeout must be above 0 ms"));
    }
    if t.per_try_ms > t.total_ms {
        return Err(field("timeouts", "per_try_ms must not exceed total_ms"));
    }
    if spec.retry.attempts > 10 {
        return Err(field("retry", "attempts must be at most 10"));
    }
    if let Some(s) = spec
        .retry
        .on_status
        .iter()
        .find(|s| !(500..=599).contains(*s))
    {
        return Err(field(
            "retry",
            format!("on_status {s}: only 5xx statuses can be retried"),
        ));
    }
    if let Some(m) = &spec.mirror {
        if spec.redirect.is_some() {
            return Err(field("mirror", "a redirect route sends nothing upstream"));
        }
        let name = m.service.trim();
        if name.is_empty()
            || name.contains(['/', '@'])
            || name.chars().any(|c| c.is_whitespace() || c.is_control())
        {
            return Err(field("mirror", "service must be a Consul service name"));
        }
        if !(m.percent.is_finite() && (0.01..=100.0).contains(&m.percent)) {
            return Err(field("mirror", "percent must be 0.01 to 100"));
        }
    }
    if let Some(b) = &spec.circuit_breaker {
        if !(1..=1_000_000).contains(&b.max_requests) || b.max_pending > 1_000_000 {
            return Err(field(
                "circuit_breaker",
                "max_requests must be 1 to 1,000,000 and max_pending at most 1,000,000",
            ));
        }
    }
    let o = &spec.outlier;
    if o.max_ejected_percent > 100 || o.panic_threshold_percent > 100 {
        return Err(field("outlier", "percentages must be between 0 and 100"));
    }
    if o.consecutive_failures > 0 && o.base_ejection_ms == 0 {
        return Err(field("outlier", "base_ejection_ms must be above 0"));
    }
    Ok(())
}

fn normalize_prefix(p: &str) -> Result<String, String> {
    if !p.starts_with('/') {
        return Err("must start with '/'".into());
    }
    if p.contains(['?', '#', '%', ' ']) {
        return Err("must be a plain path (no query, fragment, escapes or spaces)".into());
    }
    if p.split('/').any(|s| s == "." || s == "..") {
        return Err("must not contain '.' or '..' segments".into());
    }
    let trimmed = p.trim_end_matches('/');
    Ok(if trimmed.is_empty() {
        "/".into()
    } else {
        trimmed.to_string()
    })
}

fn parse_host(h: &str) -> Result<HostMatch, String> {
    let h = h.to_ascii_lowercase();
    if h.contains(':') || h.contains('/') {
        return Err("a host name without port or path".into());
    }
    if let Some(rest) = h.strip_prefix("*.") {
        if rest.is_empty() || rest.contains('*') {
            return Err("wildcard must look like *.example.com".into());
        }
        return Ok(HostMatch::Wildcard(format!(".{rest}")));
    }
    if h.contains('*') {
        return Err("only a leading `*.` wildcard is allowed".into());
    }
    Ok(HostMatch::Exact(h))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(json: &str) -> RouteSpec {
        RouteSpec::from_json(json.as_bytes()).unwrap()
    }

    #[test]
    fn prefix_is_normalised_and_checked() {
        let r = Route::compile("r", spec(r#"{"service":"a","path_prefix":"/api/"}"#)).unwrap();
        assert_eq!(r.path_prefix, "/api");
        for bad in ["api", "/a/../b", "/a?x", "/%2e"] {
            let s = spec(&format!(r#"{{"service":"a","path_prefix":"{bad}"}}"#));
            assert!(Route::compile("r", s).is_err(), "{bad}");
        }
    }

    #[test]
    fn strip_and_rewrite_build_the_upstream_path() {
        let r = Route::compile(
            "r",
            spec(r#"{"service":"a","path_prefix":"/api","strip_prefix":true}"#),
        )
        .unwrap();
        assert_eq!(r.upstream_path("/api"), "/");
        assert_eq!(r.upstream_path("/api/x/y"), "/x/y");
        let r = Route::compile(
            "r",
            spec(r#"{"service":"a","path_prefix":"/old","rewrite_prefix":"/new/"}"#),
        )
        .unwrap();
        assert_eq!(r.upstream_path("/old/x"), "/new/x");
        let r = Route::compile("r", spec(r#"{"service":"a","path_prefix":"/k"}"#)).unwrap();
        assert_eq!(r.upstream_path("/k/x"), "/k/x");
    }

    #[test]
    fn the_auth_section_compiles_into_a_requirement() {
        let r = Route::compile(
            "r",
            spec(r#"{"service":"a","path_prefix":"/","auth":{"jwt":["main"],"scopes":["b","a"]}}"#),
        )
        .unwrap();
        assert_eq!(r.auth.providers, ["main"]);
        assert_eq!(r.auth.scopes, ["a", "b"]);
        assert!(
            Route::compile("r", spec(r#"{"service":"a","path_prefix":"/"}"#))
                .unwrap()
                .auth
                .is_open()
        );
        let err = Route::compile(
            "r",
            spec(r#"{"service":"a","path_prefix":"/","auth":{"scopes":["x"]}}"#),
        )
        .unwrap_err();
        assert!(err.to_string().contains("auth"), "{err}");
        let err = Route::compile(
            "r",
            spec(r#"{"service":"a","path_prefix":"/","auth":{"api_key":true,"on_unauthenticated":{"redirect":"javascript:x"}}}"#),
        )
        .unwrap_err();
        assert!(err.to_string().contains("redirect"), "{err}");
    }

    #[test]
    fn balancing_and_failover_fields_are_checked() {
        let r = Route::compile(
            "r",
            spec(r#"{"service":"a","path_prefix":"/","lb":"consistent_hash"}"#),
        )
        .unwrap();
        assert_eq!(r.hash_on, Some(crate::balance::HashOn::ClientIp));
        for (bad, what) in [
            (r#""hash_on":"path""#, "hash_on"),
            (r#""timeouts":{"per_try_ms":0}"#, "timeouts"),
            (
                r#""timeouts":{"per_try_ms":5000,"total_ms":1000}"#,
                "timeouts",
            ),
            (r#""retry":{"on_status":[404]}"#, "retry"),
            (r#""outlier":{"max_ejected_percent":150}"#, "outlier"),
            (
                r#""request_headers":{"set":{"x-forwarded-for":"1"}}"#,
                "request_headers",
            ),
            (
                r#""response_headers":{"remove":["content-length"]}"#,
                "response_headers",
            ),
            (
                r#""cors":{"origins":["https://a"]},"response_headers":{"set":{"access-control-allow-origin":"*"}}"#,
                "response_headers",
            ),
            (
                r#""upstream_assertion":{"header":"x-proof"},"request_headers":{"remove":["x-proof"]}"#,
                "request_headers",
            ),
            (r#""host_rewrite":"a b""#, "host_rewrite"),
            (r#""redirect":{"to":"//evil"}"#, "redirect"),
            (r#""split":[{"weight":0}]"#, "split"),
            (r#""circuit_breaker":{"max_requests":0}"#, "circuit_breaker"),
            (r#""mirror":{"service":"s","percent":0}"#, "mirror"),
            (r#""datacenters":["DC1"]"#, "datacenters"),
            (r#""datacenters":["dc1","dc1"]"#, "datacenters"),
            (r#""datacenters":["dc 1"]"#, "datacenters"),
            (r#""mirror":{"service":"s","percent":101}"#, "mirror"),
            (r#""mirror":{"service":"","percent":1}"#, "mirror"),
            (
                r#""circuit_breaker":{"max_requests":1,"max_pending":2000000}"#,
                "circuit_breaker",
            ),
            (r#""split":[{"weight":1},{"tags":[],"weight":2}]"#, "split"),
            (r#""split":[{"service":"a b","weight":1}]"#, "split"),
            (r#""split":[{"weight":2000000}]"#, "split"),
            (r#""split":[{"weight":1}],"redirect":{"to":"/x"}"#, "split"),
        ] {
            let s = spec(&format!(r#"{{"service":"a","path_prefix":"/",{bad}}}"#));
            let err = Route::compile("r", s).unwrap_err().to_string();
            assert!(err.contains(what), "{bad}: {err}");
        }
    }

    #[test]
    fn only_a_redirect_route_may_name_no_service() {
        let err = Route::compile("r", spec(r#"{"path_prefix":"/"}"#))
            .unwrap_err()
            .to_string();
        assert!(err.contains("service"), "{err}");
        let r = Route::compile(
            "r",
            spec(r#"{"path_prefix":"/old","redirect":{"to":"/new","keep_path":true}}"#),
        )
        .unwrap();
        assert_eq!(r.service(), None);
        assert!(r.redirect.is_some());
        let r = Route::compile("r", spec(r#"{"service":"a","path_prefix":"/"}"#)).unwrap();
        assert_eq!(r.service(), Some("a"));
    }

    #[test]
    fn a_split_has_one_backend_per_entry_with_the_route_tags_added() {
        let r = Route::compile(
            "r",
            spec(r#"{"service":"a","path_prefix":"/","tags":["eu"],"split":[{"tags":["v1"],"weight":90},{"service":"b","tags":["eu"],"weight":10}]}"#),
        )
        .unwrap();
        let got: Vec<(&str, Vec<&str>, u32)> = r
            .backends
            .iter()
            .map(|b| {
                (
                    b.service.as_str(),
                    b.tags.iter().map(String::as_str).collect(),
                    b.weight,
                )
            })
            .collect();
        assert_eq!(
            got,
            vec![("a", vec!["eu", "v1"], 90), ("b", vec!["eu"], 10)]
        );
        assert_eq!(r.services().collect::<Vec<_>>(), ["a", "b"]);
        // Blue/green across services needs no route-level service.
        let r = Route::compile(
            "r",
            spec(r#"{"path_prefix":"/","split":[{"service":"blue","weight":1},{"service":"green","weight":0}]}"#),
        )
        .unwrap();
        assert_eq!(r.service(), Some("blue"));
        let err = Route::compile("r", spec(r#"{"path_prefix":"/","split":[{"weight":1}]}"#))
            .unwrap_err()
            .to_string();
        assert!(err.contains("names no service"), "{err}");
    }

    #[test]
    fn hosts_parse() {
        assert_eq!(
            parse_host("API.example.com").unwrap(),
            HostMatch::Exact("api.example.com".into())
        );
        assert_eq!(
            parse_host("*.example.com").unwrap(),
            HostMatch::Wildcard(".example.com".into())
        );
        assert!(parse_host("a.*.com").is_err());
        assert!(parse_host("a.com:80").is_err());
    }
}
