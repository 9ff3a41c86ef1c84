//! The edge-policy part of a route document: rate limit, CORS and the upstream assertion
//! (IP lists and request limits are plain fields of the route).

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

/// The fields of a route document that edge policy reads (the route composes them).
#[derive(Debug, Clone, Copy)]
pub struct PolicyFields<'a> {
    /// The route's name, for metrics and logs.
    pub route: &'a str,
    pub service: &'a str,
    pub path_prefix: &'a str,
    pub methods: &'a [String],
    pub ip_allow: &'a [IpNet],
    pub ip_deny: &'a [IpNet],
    pub cors: Option<&'a CorsSpec>,
    pub max_headers: Option<usize>,
    pub max_url_bytes: Option<usize>,
    pub max_body_bytes: Option<u64>,
    pub rate_limit: Option<&'a RateLimitSpec>,
    pub upstream_assertion: Option<&'a AssertionSpec>,
    pub upstream_tls: bool,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitSpec {
    pub per_second: f64,
    pub burst: u32,
    /// `client_ip` (default), `consumer`, or `header:<name>`.
    #[serde(default = "default_rate_key")]
    pub key: String,
    /// Distinct keys remembered at most (default 1,000,000, about 40 MB at worst).
    #[serde(default)]
    pub max_keys: Option<usize>,
    /// `local` (default): each gateway counts alone; `cluster`: every gateway sharing the
    /// `[rate_limit]` Redis counts together.
    #[serde(default)]
    pub scope: RateLimitScope,
}

/// Who shares a route's buckets.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RateLimitScope {
    /// This gateway's own buckets.
    #[default]
    Local,
    /// Buckets in Redis, shared by every gateway of the cluster.
    Cluster,
}

fn default_rate_key() -> String {
    "client_ip".into()
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CorsSpec {
    /// Exact origins or `https://*.example.com`; `*` allows any (not with credentials).
    pub origins: Vec<String>,
    #[serde(default)]
    pub methods: Vec<String>,
    #[serde(default)]
    pub headers: Vec<String>,
    #[serde(default)]
    pub expose_headers: Vec<String>,
    #[serde(default)]
    pub credentials: bool,
    #[serde(default)]
    pub max_age_s: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AssertionSpec {
    #[serde(default = "default_assertion_header")]
    pub header: String,
    #[serde(default = "default_assertion_ttl")]
    pub ttl_s: u64,
    /// `aud` of the assertion; defaults to the route's service name.
    #[serde(default)]
    pub audience: Option<String>,
}

fn default_assertion_header() -> String {
    "X-Gateway-Assertion".into()
}

fn default_assertion_ttl() -> u64 {
    30
}
