//! Edge policy per route: client IP, IP rules, CORS, request limits, rate limits and the
//! upstream assertion. [`RoutePolicy`] is compiled with the route (a bad policy rejects the
//! route document); [`Edge`] is the process-wide part (trusted proxies, rate-limit buckets,
//! the assertion key), kept outside the snapshot so a route change does not reset it.
//!
//! The proxy handler calls the phases in this order, each a short function:
//! client IP ([`Edge::client_ip`]) → [`Edge::admit`] (IP rules, CORS preflight, request
//! limits) → auth → [`Edge::limit_rate`] → [`Edge::assert_upstream`] → upstream →
//! [`Edge::decorate`] on the response. A phase that stops the request returns a [`PolicyReply`].
//!
//! - [`client_ip`]: `X-Forwarded-For` believed only from trusted proxies.
//! - [`ip_rules`]: allow and deny networks.
//! - [`cors`]: origins, preflights, response headers.
//! - [`limits`]: header count and URL length.
//! - [`ratelimit`]: token buckets per key, bounded in memory.
//! - [`shared_limit`]: cluster-scope buckets in Redis, shared by every gateway.

pub mod client_ip;
pub mod cors;
pub mod ip_rules;
pub mod limits;
pub mod ratelimit;
pub mod shared_limit;
pub mod spec;

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use http::header::{self, HeaderName, HeaderValue};
use http::{HeaderMap, Method, StatusCode, Uri};
use ipnet::IpNet;
use tokio::task::JoinHandle;

use crate::assertion::{AssertionError, Caller, Signer};
use crate::config::FileConfig;
use crate::shutdown::Shutdown;
use spec::{AssertionSpec, PolicyFields};

pub use client_ip::{PeerIp, TrustedProxies};
pub use cors::{Cors, CorsRefusal};
pub use ip_rules::IpRules;
pub use limits::{LimitExceeded, RequestLimits};
pub use ratelimit::{Decision, KeyedLimiter, Limiters, RateRule};
pub use shared_limit::SharedLimits;
pub use spec::RateLimitScope;

/// Header an assertion travels in unless the route names another. Removed from every
/// client request on every route.
pub static DEFAULT_ASSERTION_HEADER: HeaderName = HeaderName::from_static("x-gateway-assertion");
const MAX_ASSERTION_TTL_S: u64 = 3600;
/// How often idle rate-limit keys are dropped.
pub const SWEEP_EVERY: Duration = Duration::from_secs(10);

/// A policy field that does not compile; the route document is rejected with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    #[error("field `{field}`: {message}")]
    Field {
        field: &'static str,
        message: String,
    },
}

impl PolicyError {
    pub fn at(field: &'static str, message: impl Into<String>) -> PolicyError {
        PolicyError::Field {
            field,
            message: message.into(),
        }
    }

    /// The offending field, e.g. `rate_limit.key`.
    pub fn field(&self) -> &'static str {
        match self {
            PolicyError::Field { field, .. } => field,
        }
    }

    pub fn message(&self) -> &str {
        match self {
            PolicyError::Field { message, .. } => message,
        }
    }
}

/// A route's compiled `upstream_assertion`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AssertionRule {
    pub header: HeaderName,
    pub ttl_s: u64,
    /// `aud` of the assertion: the document's `audience`, else the route's service.
    pub audience: String,
}

impl AssertionRule {
    pub fn compile(spec: &AssertionSpec, service: &str) -> Result<AssertionRule, PolicyError> {
        let header = HeaderName::from_bytes(spec.header.trim().as_bytes()).map_err(|_| {
            PolicyError::at(
                "upstream_assertion.header",
                format!("`{}` is not a header name", spec.header),
            )
        })?;
        const RESERVED: [HeaderName; 8] = [
            header::HOST,
            header::CONNECTION,
            header::CONTENT_LENGTH,
            header::TRANSFER_ENCODING,
            header::TE,
            header::UPGRADE,
            header::TRAILER,
            header::COOKIE,
        ];
        if RESERVED.contains(&header) || header.as_str().starts_with("proxy-") {
            return Err(PolicyError::at(
                "upstream_assertion.header",
                format!("`{header}` is reserved; use e.g. `X-Gateway-Assertion`"),
            ));
        }
        if !(1..=MAX_ASSERTION_TTL_S).contains(&spec.ttl_s) {
            return Err(PolicyError::at(
                "upstream_assertion.ttl_s",
                format!("{} is not between 1 and {MAX_ASSERTION_TTL_S}", spec.ttl_s),
            ));
        }
        let audience = match spec.audience.as_deref().map(str::trim) {
            Some("") => {
                return Err(PolicyError::at(
                    "upstream_assertion.audience",
                    "must not be empty (leave it out to use the service name)",
                ))
            }
            Some(a) => a.to_string(),
            None => service.to_string(),
        };
        Ok(AssertionRule {
            header,
            ttl_s: spec.ttl_s,
            audience,
        })
    }
}

/// Everything a route's document says about edge policy, validated.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RoutePolicy {
    /// The route's name, for metrics and logs.
    pub route: String,
    pub ip_rules: IpRules,
    pub cors: Option<Cors>,
    pub limits: RequestLimits,
    pub rate_limit: Option<RateRule>,
    pub assertion: Option<AssertionRule>,
    /// Speak TLS to the upstream with the gateway's client certificate.
    pub upstream_tls: bool,
}

impl RoutePolicy {
    pub fn compile(spec: &PolicyFields<'_>) -> Result<RoutePolicy, PolicyError> {
        Ok(RoutePolicy {
            route: spec.route.to_string(),
            ip_rules: IpRules::new(spec.ip_allow, spec.ip_deny),
            cors: spec
                .cors
                .map(|c| Cors::compile(c, spec.methods))
                .transpose()?,
            limits: RequestLimits::compile(spec)?,
            rate_limit: spec.rate_limit.map(RateRule::compile).transpose()?,
            assertion: spec
                .upstream_assertion
                .map(|a| AssertionRule::compile(a, spec.service))
                .transpose()?,
            upstream_tls: spec.upstream_tls,
        })
    }
}

/// The gateway answers itself; the request goes no further.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyReply {
    /// An allowed CORS preflight: 204 with these headers.
    #[error("CORS preflight answered")]
    Preflight(HeaderMap),
    #[error("CORS preflight refused: {0}")]
    PreflightRefused(CorsRefusal),
    #[error("client address not allowed on this route")]
    IpDenied,
    #[error("{0}")]
    TooLarge(LimitExceeded),
    #[error("rate limit exceeded")]
    RateLimited(Decision),
    /// The route wants an assertion the gateway cannot sign (no `[assertion]` key, or
    /// signing failed): fail closed.
    #[error("upstream assertion unavailable: {0}")]
    AssertionUnavailable(String),
}

impl PolicyReply {
    pub fn status(&self) -> StatusCode {
        match self {
            PolicyReply::Preflight(_) => StatusCode::NO_CONTENT,
            PolicyReply::PreflightRefused(_) | PolicyReply::IpDenied => StatusCode::FORBIDDEN,
            PolicyReply::TooLarge(LimitExceeded::Headers { .. }) => {
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
            }
            PolicyReply::TooLarge(LimitExceeded::Url { .. }) => StatusCode::URI_TOO_LONG,
            PolicyReply::RateLimited(_) => StatusCode::TOO_MANY_REQUESTS,
            PolicyReply::AssertionUnavailable(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// A short machine-readable reason, as in the JSON body's `error`.
    pub fn reason(&self) -> &'static str {
        match self {
            PolicyReply::Preflight(_) => "preflight",
            PolicyReply::PreflightRefused(_) => "cors_refused",
            PolicyReply::IpDenied => "ip_denied",
            PolicyReply::TooLarge(LimitExceeded::Headers { .. }) => "too_many_headers",
            PolicyReply::TooLarge(LimitExceeded::Url { .. }) => "url_too_long",
            PolicyReply::RateLimited(_) => "rate_limited",
            PolicyReply::AssertionUnavailable(_) => "internal",
        }
    }

    /// What the client is told (the internal detail of an assertion failure is logged,
    /// never sent).
    pub fn description(&self) -> String {
        match self {
            PolicyReply::AssertionUnavailable(_) => {
                "the gateway cannot serve this route".to_string()
            }
            other => other.to_string(),
        }
    }

    /// The headers the answer carries: a preflight's CORS headers, a refusal's
    /// `Retry-After` and `RateLimit-*`.
    pub fn add_headers(&self, headers: &mut HeaderMap) {
        match self {
            PolicyReply::Preflight(h) => headers.extend(h.clone()),
            PolicyReply::RateLimited(d) => d.apply(headers),
            _ => {}
        }
    }
}

/// What the request phases learned, for the response phase.
#[derive(Debug, Clone, Default)]
pub struct Admission {
    pub client_ip: Option<IpAddr>,
    /// The request's `Origin`, when the route has a CORS policy.
    pub origin: Option<HeaderValue>,
    /// The rate-limit verdict, reported in `RateLimit-*` response headers.
    pub rate: Option<Decision>,
}

/// The process-wide half of edge policy.
#[derive(Debug, Default)]
pub struct Edge {
    trusted: TrustedProxies,
    limiters: Limiters,
    /// Buckets of `scope = "cluster"` routes (`[rate_limit]` names a Redis).
    shared: Option<Arc<SharedLimits>>,
    signer: Option<Arc<Signer>>,
}

impl Edge {
    pub fn new(trusted_proxies: &[IpNet], signer: Option<Signer>) -> Edge {
        Edge {
            trusted: TrustedProxies::new(trusted_proxies),
            limiters: Limiters::default(),
            shared: None,
            signer: signer.map(Arc::new),
        }
    }

    /// Cluster-scope routes count in `shared` (without it they count locally; route
    /// documents asking for it are rejected before they get here, see
    /// `routing::kv::RouteDocs::with_shared_limits`).
    pub fn with_shared_limits(mut self, shared: SharedLimits) -> Edge {
        self.shared = Some(Arc::new(shared));
        self
    }

    pub fn shared_limits(&self) -> Option<&Arc<SharedLimits>> {
        self.shared.as_ref()
    }

    /// From the configuration file: trusted proxies, and the assertion key when
    /// `[assertion]` is set (an unreadable key is an error at start, not per request).
    pub fn from_config(file: &FileConfig) -> Result<Edge, AssertionError> {
        let signer = file.assertion.as_ref().map(Signer::load).transpose()?;
        Ok(Edge::new(&file.proxy.trusted_proxies, signer))
    }

    pub fn trusted_proxies(&self) -> &TrustedProxies {
        &self.trusted
    }

    pub fn limiters(&self) -> &Limiters {
        &self.limiters
    }

    pub fn signer(&self) -> Option<&Arc<Signer>> {
        self.signer.as_ref()
    }

    /// The public keys for `/jwks.json` (`None` without `[assertion]`).
    pub fn jwks(&self) -> Option<serde_json::Value> {
        self.signer.as_ref().map(|s| s.jwks())
    }

    /// Phase 1: the client's address (see [`client_ip`]).
    pub fn client_ip(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        self.trusted.client_ip(peer, headers)
    }

    /// Phase 2, before auth: IP rules (403), a CORS preflight answered here (204, or 403
    /// when outside the policy), then request limits (431, 414). Route the request with
    /// [`cors::routing_method`] so preflights find their route.
    pub fn admit(
        &self,
        policy: &RoutePolicy,
        client_ip: IpAddr,
        method: &Method,
        uri: &Uri,
        headers: &HeaderMap,
    ) -> Result<Admission, PolicyReply> {
        if !policy.ip_rules.is_empty() && !policy.ip_rules.permits(client_ip) {
            metrics::counter!(crate::metrics::IP_DENIED, "route" => policy.route.clone())
                .increment(1);
            return Err(PolicyReply::IpDenied);
        }
        let mut admission = Admission {
            client_ip: Some(client_ip),
            ..Admission::default()
        };
        if let Some(cors) = &policy.cors {
            if cors::is_preflight(method, headers) {
                let answer = cors.preflight(headers);
                let result = if answer.is_ok() { "allowed" } else { "refused" };
                metrics::counter!(crate::metrics::CORS_PREFLIGHTS, "result" => result).increment(1);
                return Err(match answer {
                    Ok(h) => PolicyReply::Preflight(h),
                    Err(e) => PolicyReply::PreflightRefused(e),
                });
            }
            admission.origin = headers.get(header::ORIGIN).cloned();
        }
        policy
            .limits
            .check(uri, headers)
            .map_err(PolicyReply::TooLarge)?;
        Ok(admission)
    }

    /// Phase 3, after auth: the route's rate limit, keyed by `consumer` (JWT `sub` or
    /// API-key consumer), client IP or a header. 429 with `Retry-After` when exceeded.
    /// A cluster-scope limit may ask Redis, never longer than `[rate_limit] budget_ms`.
    pub async fn limit_rate(
        &self,
        policy: &RoutePolicy,
        admission: &mut Admission,
        consumer: Option<&str>,
        headers: &HeaderMap,
    ) -> Result<(), PolicyReply> {
        let Some(rule) = &policy.rate_limit else {
            return Ok(());
        };
        let ip = admission
            .client_ip
            .unwrap_or(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED));
        let key = ratelimit::LimitKey::pick(&rule.key, ip, consumer, headers);
        let decision = match (&self.shared, rule.scope) {
            (Some(shared), RateLimitScope::Cluster) => {
                match shared.check(&policy.route, rule, key, &self.limiters).await {
                    Some(d) => d,
                    // Redis unavailable and `on_store_error = "allow"`: nothing to report.
                    None => return Ok(()),
                }
            }
            _ => self.limiters.get(&policy.route, rule).check(key),
        };
        admission.rate = Some(decision);
        if decision.allowed {
            return Ok(());
        }
        metrics::counter!(crate::metrics::RATE_LIMITED, "route" => policy.route.clone())
            .increment(1);
        Err(PolicyReply::RateLimited(decision))
    }

    /// Phase 4, on the request about to go upstream: removes any client-sent assertion
    /// header (the default name, and the route's), then adds a fresh one when the route
    /// asks for it. Call on every route.
    pub fn assert_upstream(
        &self,
        policy: &RoutePolicy,
        caller: Caller<'_>,
        request_id: &str,
        headers: &mut HeaderMap,
    ) -> Result<(), PolicyReply> {
        let rule = policy.assertion.as_ref();
        match rule {
            Some(r) if r.header != DEFAULT_ASSERTION_HEADER => {
                crate::auth::identity_headers::strip_forged(
                    headers,
                    &[DEFAULT_ASSERTION_HEADER.clone(), r.header.clone()],
                )
            }
            _ => crate::auth::identity_headers::strip_forged(
                headers,
                std::slice::from_ref(&DEFAULT_ASSERTION_HEADER),
            ),
        }
        let Some(rule) = rule else {
            return Ok(());
        };
        let Some(signer) = &self.signer else {
            tracing::error!(route = %policy.route,
                "route has upstream_assertion but the gateway has no [assertion] key; refusing");
            return Err(PolicyReply::AssertionUnavailable(
                "no [assertion] key".into(),
            ));
        };
        let token = signer
            .sign(&rule.audience, rule.ttl_s, caller, request_id)
            .map_err(|e| {
                tracing::error!(route = %policy.route, error = %e, "cannot sign an upstream assertion");
                PolicyReply::AssertionUnavailable(e.to_string())
            })?;
        let value = HeaderValue::from_str(&token)
            .map_err(|e| PolicyReply::AssertionUnavailable(e.to_string()))?;
        headers.insert(rule.header.clone(), value);
        Ok(())
    }

    /// Response phase: CORS headers and `Vary: Origin` (routes with `cors`), and the
    /// `RateLimit-*` headers (routes with `rate_limit`). Call on every response of an
    /// admitted request, the gateway's own refusals included, so browsers can read them.
    pub fn decorate(&self, policy: &RoutePolicy, admission: &Admission, response: &mut HeaderMap) {
        if let Some(cors) = &policy.cors {
            cors.decorate(admission.origin.as_ref(), response);
        }
        if let Some(d) = &admission.rate {
            d.apply(response);
        }
    }

    /// Drops idle rate-limit keys everywhere (see [`ratelimit`]).
    pub fn sweep(&self) {
        let (limiters, keys) = self.limiters.sweep();
        if let Some(shared) = &self.shared {
            shared.sweep();
        }
        metrics::gauge!(crate::metrics::RATE_LIMIT_KEYS).set(keys as f64);
        tracing::trace!(limiters, keys, "rate-limit keys swept");
    }

    /// `/rate_limits`: the shared store (see [`SharedLimits::view`]; null without one) and
    /// the local limiters.
    pub fn rate_limit_view(&self) -> serde_json::Value {
        serde_json::json!({
            "store": self.shared.as_ref().map(|s| s.view()),
            "local": {"limiters": self.limiters.len()},
        })
    }

    /// The shared store's probe (connects, then pings; see [`shared_limit`]), when
    /// `[rate_limit]` names one.
    pub fn spawn_store_probe(&self, shutdown: Shutdown) -> Option<JoinHandle<()>> {
        self.shared.as_ref().map(|s| s.spawn_probe(shutdown))
    }

    /// Sweeps every [`SWEEP_EVERY`] until shutdown.
    pub fn spawn_sweeper(self: &Arc<Self>, shutdown: Shutdown) -> JoinHandle<()> {
        let edge = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(SWEEP_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = shutdown.wait() => return,
                    _ = tick.tick() => {}
                }
                match edge.upgrade() {
                    Some(e) => e.sweep(),
                    None => return,
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::{Route, RouteSpec};

    fn route(json: &str) -> Route {
        Route::compile("r", RouteSpec::from_json(json.as_bytes()).unwrap()).unwrap()
    }

    fn compile(json: &str) -> Result<RoutePolicy, PolicyError> {
        RoutePolicy::compile(
            &RouteSpec::from_json(json.as_bytes())
                .unwrap()
                .policy_fields("r"),
        )
    }

    const LOCAL: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

    #[test]
    fn a_bad_policy_rejects_the_route_naming_the_field() {
        let cases = [
            (
                r#""rate_limit":{"per_second":0,"burst":1}"#,
                "rate_limit.per_second",
            ),
            (
                r#""rate_limit":{"per_second":1,"burst":1,"key":"header:"}"#,
                "rate_limit.key",
            ),
            (
                r#""cors":{"origins":["*"],"credentials":true}"#,
                "cors.origins",
            ),
            (
                r#""upstream_assertion":{"ttl_s":0}"#,
                "upstream_assertion.ttl_s",
            ),
            (
                r#""upstream_assertion":{"header":"Host"}"#,
                "upstream_assertion.header",
            ),
            (
                r#""upstream_assertion":{"audience":""}"#,
                "upstream_assertion.audience",
            ),
            (r#""max_headers":0"#, "max_headers"),
        ];
        for (field_json, field) in cases {
            let json = format!(r#"{{"service":"a","path_prefix":"/",{field_json}}}"#);
            let err = compile(&json).unwrap_err();
            assert_eq!(err.field(), field, "{json}: {err}");
            let route_err =
                Route::compile("r", RouteSpec::from_json(json.as_bytes()).unwrap()).unwrap_err();
            assert!(route_err.to_string().contains(field), "{route_err}");
        }
    }

    #[test]
    fn a_route_without_policy_compiles_to_nothing_to_do() {
        let p = compile(r#"{"service":"a","path_prefix":"/"}"#).unwrap();
        assert_eq!(
            p,
            RoutePolicy {
                route: "r".into(),
                ..RoutePolicy::default()
            }
        );
        let a = compile(r#"{"service":"orders","path_prefix":"/","upstream_assertion":{}}"#)
            .unwrap()
            .assertion
            .unwrap();
        assert_eq!(a.audience, "orders");
        assert_eq!(a.header, DEFAULT_ASSERTION_HEADER);
        assert_eq!(a.ttl_s, 30);
    }

    #[test]
    fn admit_applies_ip_rules_then_preflight_then_limits() {
        let edge = Edge::default();
        let r = route(
            r#"{"service":"a","path_prefix":"/","ip_deny":["10.0.0.0/8"],"max_url_bytes":8,
                "cors":{"origins":["https://app.test"],"methods":["PUT"]}}"#,
        );
        let uri: Uri = "/x".parse().unwrap();
        let long: Uri = "/xxxxxxxxxx".parse().unwrap();
        let mut pre = HeaderMap::new();
        pre.insert(header::ORIGIN, HeaderValue::from_static("https://app.test"));
        pre.insert(
            header::ACCESS_CONTROL_REQUEST_METHOD,
            HeaderValue::from_static("PUT"),
        );
        let denied = "10.1.1.1".parse().unwrap();
        assert_eq!(
            edge.admit(&r.policy, denied, &Method::OPTIONS, &uri, &pre)
                .unwrap_err(),
            PolicyReply::IpDenied
        );
        let reply = edge
            .admit(&r.policy, LOCAL, &Method::OPTIONS, &long, &pre)
            .unwrap_err();
        assert_eq!(reply.status(), StatusCode::NO_CONTENT);
        let reply = edge
            .admit(&r.policy, LOCAL, &Method::GET, &long, &HeaderMap::new())
            .unwrap_err();
        assert_eq!(reply.status(), StatusCode::URI_TOO_LONG);
        let admitted = edge
            .admit(&r.policy, LOCAL, &Method::PUT, &uri, &pre)
            .unwrap();
        assert_eq!(admitted.origin.unwrap(), "https://app.test");
    }

    #[tokio::test]
    async fn rate_limits_refuse_with_429_and_report_headers() {
        let edge = Edge::default();
        let r = route(
            r#"{"service":"a","path_prefix":"/","rate_limit":{"per_second":0.01,"burst":2,"key":"consumer"}}"#,
        );
        let h = HeaderMap::new();
        let mut adm = edge
            .admit(&r.policy, LOCAL, &Method::GET, &"/".parse().unwrap(), &h)
            .unwrap();
        assert!(edge
            .limit_rate(&r.policy, &mut adm, Some("alice"), &h)
            .await
            .is_ok());
        assert!(edge
            .limit_rate(&r.policy, &mut adm, Some("alice"), &h)
            .await
            .is_ok());
        let reply = edge
            .limit_rate(&r.policy, &mut adm, Some("alice"), &h)
            .await
            .unwrap_err();
        let mut headers = HeaderMap::new();
        reply.add_headers(&mut headers);
        assert_eq!(reply.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(headers["retry-after"], "100");
        assert_eq!(headers["ratelimit-remaining"], "0");
        assert_eq!(reply.reason(), "rate_limited");
        // Another consumer has its own bucket; the response carries its headers.
        assert!(edge
            .limit_rate(&r.policy, &mut adm, Some("bob"), &h)
            .await
            .is_ok());
        let mut out = HeaderMap::new();
        edge.decorate(&r.policy, &adm, &mut out);
        assert_eq!(out["ratelimit-remaining"], "1");
        assert!(!out.contains_key("retry-after"));
    }

    #[test]
    fn forged_assertions_are_always_removed_and_missing_keys_fail_closed() {
        let edge = Edge::default();
        let plain = route(r#"{"service":"a","path_prefix":"/"}"#);
        let mut h = HeaderMap::new();
        h.insert("x-gateway-assertion", HeaderValue::from_static("forged"));
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("x-gateway-assertion"),
        );
        edge.assert_upstream(&plain.policy, Caller::default(), "r1", &mut h)
            .unwrap();
        assert!(h.is_empty(), "{h:?}");

        let wants = route(
            r#"{"service":"a","path_prefix":"/","upstream_assertion":{"header":"X-Internal"}}"#,
        );
        let mut h = HeaderMap::new();
        h.insert("x-internal", HeaderValue::from_static("forged"));
        let reply = edge
            .assert_upstream(&wants.policy, Caller::default(), "r1", &mut h)
            .unwrap_err();
        assert_eq!(reply.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert!(!reply.description().contains("[assertion]"));
        assert!(h.is_empty());

        let pem = include_str!("../../tests/fixtures/ed-private.pem");
        let signer = Signer::from_pem(pem, std::path::Path::new("k"), "gw", "switchyard").unwrap();
        let edge = Edge::new(&[], Some(signer));
        let mut h = HeaderMap::new();
        h.insert("x-internal", HeaderValue::from_static("forged"));
        edge.assert_upstream(&wants.policy, Caller::default(), "r1", &mut h)
            .unwrap();
        assert_ne!(h["x-internal"], "forged");
        assert_eq!(h["x-internal"].to_str().unwrap().split('.').count(), 3);
        assert!(edge.jwks().is_some());
    }
}
