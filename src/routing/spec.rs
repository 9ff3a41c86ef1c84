//! The JSON document an operator stores at `<kv-prefix>routes/<name>`: its serde shape only.
//! `routing::compile` turns it into a [`super::Route`]; a document that does not compile
//! is rejected alone, and that key's last good version keeps serving.

use std::collections::BTreeMap;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

// Each concern owns the shape of its part of the document; the route document composes them.
pub use crate::balance::spec::{BreakerSpec, LbPolicy, MirrorSpec, OutlierSpec, SplitEntry};
pub use crate::discovery::HealthPolicy;
pub use crate::policy::spec::{AssertionSpec, CorsSpec, RateLimitSpec};
pub use crate::rewrite::{HeaderRulesSpec, RedirectSpec};

/// One route document. `path_prefix` is required, and `service` unless the route
/// answers with a `redirect`; everything else has a default.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RouteSpec {
    /// Consul service the route sends traffic to.
    #[serde(default)]
    pub service: String,
    /// Matches this path and everything below it, on segment boundaries.
    pub path_prefix: String,
    /// Exact host (`api.example.com`) or one-level wildcard (`*.example.com`); none = any host.
    #[serde(default)]
    pub host: Option<String>,
    /// Allowed methods; empty = all.
    #[serde(default)]
    pub methods: Vec<String>,
    /// Request headers that must be present with exactly these values.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Remove `path_prefix` before forwarding.
    #[serde(default)]
    pub strip_prefix: bool,
    /// Replace `path_prefix` with this before forwarding.
    #[serde(default)]
    pub rewrite_prefix: Option<String>,
    /// Which instances may serve.
    #[serde(default)]
    pub health: HealthPolicy,
    /// Only instances carrying all of these Consul tags.
    #[serde(default)]
    pub tags: Vec<String>,
    #[serde(default)]
    pub lb: LbPolicy,
    /// For `consistent_hash`: `header:<name>`, `cookie:<name>` or `client_ip`.
    #[serde(default)]
    pub hash_on: Option<String>,
    /// Protocol spoken to upstreams.
    #[serde(default)]
    pub upstream_protocol: UpstreamProtocol,
    #[serde(default)]
    pub timeouts: TimeoutSpec,
    #[serde(default)]
    pub retry: RetrySpec,
    #[serde(default)]
    pub outlier: OutlierSpec,
    /// Request body limit in bytes (overrides `proxy.max_body_bytes`).
    #[serde(default)]
    pub max_body_bytes: Option<u64>,
    /// Request header count limit.
    #[serde(default)]
    pub max_headers: Option<usize>,
    /// Request URL (path + query) length limit.
    #[serde(default)]
    pub max_url_bytes: Option<usize>,
    #[serde(default)]
    pub auth: AuthSpec,
    #[serde(default)]
    pub rate_limit: Option<RateLimitSpec>,
    #[serde(default)]
    pub ip_allow: Vec<IpNet>,
    #[serde(default)]
    pub ip_deny: Vec<IpNet>,
    #[serde(default)]
    pub cors: Option<CorsSpec>,
    #[serde(default)]
    pub upstream_assertion: Option<AssertionSpec>,
    /// Present the gateway's client certificate (`[upstream_tls]`) and speak TLS to upstreams.
    #[serde(default)]
    pub upstream_tls: bool,
    /// Paths with an encoded `/` or `\` (`%2F`, `%5C`): refused by default, since an
    /// upstream may decode them into a path other than the one routed.
    #[serde(default)]
    pub escaped_slashes: EscapedSlashes,
    /// Headers set, added or removed on the request that goes upstream.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_headers: Option<HeaderRulesSpec>,
    /// Headers set, added or removed on every answer the route gives.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_headers: Option<HeaderRulesSpec>,
    /// The `Host` sent upstream (`X-Forwarded-Host` keeps the client's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_rewrite: Option<String>,
    /// Weighted shares of the traffic across tags or services (canary, blue/green).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub split: Vec<SplitEntry>,
    /// Limits on requests in flight to the upstream service (Envoy's circuit breaker).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub circuit_breaker: Option<BreakerSpec>,
    /// Consul datacenters in failover order (`?dc=`): instances of the first one that has
    /// any that may serve. Empty: the agent's own datacenter.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub datacenters: Vec<String>,
    /// Copy a share of the requests to another service, its answers thrown away.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mirror: Option<MirrorSpec>,
    /// Answer with a redirect at the gateway instead of going upstream.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redirect: Option<RedirectSpec>,
}

/// What a route does with paths that hold `%2F` or `%5C` (Envoy's
/// `path_with_escaped_slashes_action`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EscapedSlashes {
    /// 400.
    #[default]
    Reject,
    /// Routed and forwarded as sent, still encoded (for upstreams that never decode them).
    Keep,
    /// Decoded into separators; the decoded path is routed again and forwarded.
    Decode,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum UpstreamProtocol {
    #[default]
    Http1,
    /// HTTP/2 with prior knowledge (h2c), e.g. for gRPC.
    Http2,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct TimeoutSpec {
    pub connect_ms: u64,
    /// Time to response headers for one try.
    pub per_try_ms: u64,
    /// Time to response headers for the whole request, retries included.
    pub total_ms: u64,
}

impl Default for TimeoutSpec {
    fn default() -> Self {
        Self {
            connect_ms: 2_000,
            per_try_ms: 15_000,
            total_ms: 30_000,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetrySpec {
    /// Further tries after the first, each on a different instance when one exists.
    pub attempts: u32,
    /// Upstream statuses that count as a failed try (connect errors, resets and
    /// per-try timeouts always do).
    pub on_status: Vec<u16>,
    /// Retry methods that are not idempotent (POST, PATCH) too.
    pub non_idempotent: bool,
}

impl Default for RetrySpec {
    fn default() -> Self {
        Self {
            attempts: 2,
            on_status: Vec::new(),
            non_idempotent: false,
        }
    }
}

/// `"auth": "none"`, absent, or `{"jwt": [...], "api_key": true, "scopes": [...]}`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AuthSpec {
    /// Providers any of which may vouch for a bearer token.
    pub jwt: Vec<String>,
    /// Accept an API key (either this or a JWT when both are set).
    pub api_key: bool,
    /// Scopes the credential must carry, all of them.
    pub scopes: Vec<String>,
    /// For browsers (`Accept: text/html`) without credentials: 302 here instead of 401.
    pub on_unauthenticated_redirect: Option<String>,
}

/// Written in the shape it is read in (`on_unauthenticated: {redirect}`), so a serialised
/// route document is a document the gateway accepts.
impl Serialize for AuthSpec {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        struct Unauthenticated<'a> {
            redirect: &'a str,
        }
        #[derive(Serialize)]
        struct Full<'a> {
            jwt: &'a [String],
            api_key: bool,
            scopes: &'a [String],
            #[serde(skip_serializing_if = "Option::is_none")]
            on_unauthenticated: Option<Unauthenticated<'a>>,
        }
        Full {
            jwt: &self.jwt,
            api_key: self.api_key,
            scopes: &self.scopes,
            on_unauthenticated: self
                .on_unauthenticated_redirect
                .as_deref()
                .map(|redirect| Unauthenticated { redirect }),
        }
        .serialize(s)
    }
}

impl<'de> Deserialize<'de> for AuthSpec {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Unauthenticated {
            redirect: String,
        }
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Full {
            #[serde(default)]
            jwt: Vec<String>,
            #[serde(default)]
            api_key: bool,
            #[serde(default)]
            scopes: Vec<String>,
            #[serde(default)]
            on_unauthenticated: Option<Unauthenticated>,
        }
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Either {
            Word(String),
            Full(Full),
        }
        match Either::deserialize(d)? {
            Either::Word(w) if w == "none" => Ok(AuthSpec::default()),
            Either::Word(w) => Err(serde::de::Error::custom(format!(
                "auth must be \"none\" or an object, not \"{w}\""
            ))),
            Either::Full(f) => Ok(AuthSpec {
                jwt: f.jwt,
                api_key: f.api_key,
                scopes: f.scopes,
                on_unauthenticated_redirect: f.on_unauthenticated.map(|u| u.redirect),
            }),
        }
    }
}

impl RouteSpec {
    /// What edge policy reads of the document.
    pub fn policy_fields<'a>(&'a self, route: &'a str) -> crate::policy::spec::PolicyFields<'a> {
        crate::policy::spec::PolicyFields {
            route,
            service: &self.service,
            path_prefix: &self.path_prefix,
            methods: &self.methods,
            ip_allow: &self.ip_allow,
            ip_deny: &self.ip_deny,
            cors: self.cors.as_ref(),
            max_headers: self.max_headers,
            max_url_bytes: self.max_url_bytes,
            max_body_bytes: self.max_body_bytes,
            rate_limit: self.rate_limit.as_ref(),
            upstream_assertion: self.upstream_assertion.as_ref(),
            upstream_tls: self.upstream_tls,
        }
    }

    /// A route with only the required fields set and every other field at its default.
    pub fn minimal(service: &str, path_prefix: &str) -> Self {
        RouteSpec {
            service: service.to_string(),
            path_prefix: path_prefix.to_string(),
            host: None,
            methods: Vec::new(),
            headers: BTreeMap::new(),
            strip_prefix: false,
            rewrite_prefix: None,
            health: HealthPolicy::default(),
            tags: Vec::new(),
            lb: LbPolicy::default(),
            hash_on: None,
            upstream_protocol: UpstreamProtocol::default(),
            timeouts: TimeoutSpec::default(),
            retry: RetrySpec::default(),
            outlier: OutlierSpec::default(),
            max_body_bytes: None,
            max_headers: None,
            max_url_bytes: None,
            auth: AuthSpec::default(),
            rate_limit: None,
            ip_allow: Vec::new(),
            ip_deny: Vec::new(),
            cors: None,
            upstream_assertion: None,
            upstream_tls: false,
            escaped_slashes: EscapedSlashes::default(),
            request_headers: None,
            response_headers: None,
            host_rewrite: None,
            split: Vec::new(),
            circuit_breaker: None,
            datacenters: Vec::new(),
            mirror: None,
            redirect: None,
        }
    }

    /// Parses a KV value; the error says what is wrong and where.
    pub fn from_json(bytes: &[u8]) -> Result<Self, String> {
        serde_json::from_slice(bytes).map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minimal_document_takes_defaults() {
        let r = RouteSpec::from_json(br#"{"service":"users","path_prefix":"/users"}"#).unwrap();
        assert_eq!(r.service, "users");
        assert_eq!(r.health, HealthPolicy::Passing);
        assert_eq!(r.lb, LbPolicy::RoundRobin);
        assert_eq!(r.auth, AuthSpec::default());
    }

    #[test]
    fn minimal_equals_the_parsed_minimal_document() {
        let parsed = RouteSpec::from_json(br#"{"service":"s","path_prefix":"/p"}"#).unwrap();
        assert_eq!(RouteSpec::minimal("s", "/p"), parsed);
    }

    #[test]
    fn auth_accepts_none_and_objects() {
        let r = RouteSpec::from_json(
            br#"{"service":"a","path_prefix":"/","auth":{"jwt":["main"],"scopes":["x"],"on_unauthenticated":{"redirect":"https://login"}}}"#,
        )
        .unwrap();
        assert_eq!(r.auth.jwt, vec!["main"]);
        assert_eq!(
            r.auth.on_unauthenticated_redirect.as_deref(),
            Some("https://login")
        );
        let r =
            RouteSpec::from_json(br#"{"service":"a","path_prefix":"/","auth":"none"}"#).unwrap();
        assert_eq!(r.auth, AuthSpec::default());
        assert!(
            RouteSpec::from_json(br#"{"service":"a","path_prefix":"/","auth":"jwt"}"#).is_err()
        );
    }

    #[test]
    fn typos_are_rejected_by_name() {
        let err = RouteSpec::from_json(br#"{"service":"a","path_prefix":"/","strip_prefx":true}"#)
            .unwrap_err();
        assert!(err.contains("strip_prefx"), "{err}");
        let err = RouteSpec::from_json(br#"{"service":"a"}"#).unwrap_err();
        assert!(err.contains("path_prefix"), "{err}");
    }

    #[test]
    fn a_serialised_document_parses_back_to_the_same_route() {
        for doc in [
            r#"{"service":"a","path_prefix":"/"}"#,
            r#"{"service":"a","path_prefix":"/","auth":{"jwt":["main"],"api_key":true,"scopes":["x"],"on_unauthenticated":{"redirect":"https://login"}}}"#,
            r#"{"service":"a","path_prefix":"/","request_headers":{"set":{"x-a":"${route}"},"remove":["cookie"]},"response_headers":{"add":{"x-b":"1"}},"host_rewrite":"b.internal"}"#,
            r#"{"path_prefix":"/old","redirect":{"to":"https://new.example.com","status":308,"keep_path":true}}"#,
            r#"{"service":"a","path_prefix":"/","split":[{"tags":["v1"],"weight":90},{"service":"b","weight":10}]}"#,
            r#"{"service":"a","path_prefix":"/","circuit_breaker":{"max_requests":100,"max_pending":10}}"#,
            r#"{"service":"a","path_prefix":"/","mirror":{"service":"shadow","percent":5}}"#,
            r#"{"service":"a","path_prefix":"/","datacenters":["dc1","dc2"]}"#,
        ] {
            let spec = RouteSpec::from_json(doc.as_bytes()).unwrap();
            let text = serde_json::to_vec(&spec).unwrap();
            assert_eq!(RouteSpec::from_json(&text), Ok(spec), "{doc}");
        }
    }
}
