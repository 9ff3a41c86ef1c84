//! The balancing part of a route document: how an instance is picked, and when one is
//! ejected for failing.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LbPolicy {
    #[default]
    RoundRobin,
    Random,
    LeastRequest,
    ConsistentHash,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct OutlierSpec {
    /// Consecutive failures that eject an instance (0 = never eject).
    pub consecutive_failures: u32,
    /// First ejection time; doubles with each repeated ejection.
    pub base_ejection_ms: u64,
    pub max_ejection_ms: u64,
    /// At most this share of a pool is ejected at once.
    pub max_ejected_percent: u32,
    /// Below this share of usable instances, use all of them (panic mode).
    pub panic_threshold_percent: u32,
}
impl Default for OutlierSpec {
    fn default() -> Self {
        Self {
            consecutive_failures: 5,
            base_ejection_ms: 30_000,
            max_ejection_ms: 300_000,
            max_ejected_percent: 50,
            panic_threshold_percent: 50,
        }
    }
}

/// One share of a `split` route: instances of `service` (the route's when absent)
/// carrying `tags` (besides the route's own), taking `weight` of the traffic relative to
/// the other entries.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SplitEntry {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    #[serde(default)]
    pub tags: Vec<String>,
    pub weight: u32,
}

/// `circuit_breaker`: Envoy's thresholds for one upstream service, counted by this gateway
/// across every route that sends to the service.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BreakerSpec {
    /// Requests in flight to the service (from sending to the end of the answer's body).
    pub max_requests: u32,
    /// Requests allowed to wait for a slot when `max_requests` are in flight; they wait
    /// until one frees or the route's `timeouts.total_ms` passes. 0: refuse at once.
    #[serde(default)]
    pub max_pending: u32,
}

/// `mirror`: a copy of a share of the route's requests goes to another service, whose
/// answers are thrown away.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MirrorSpec {
    pub service: String,
    /// Share of requests copied, 0.01 to 100.
    pub percent: f64,
}
