//! What Consul says exists and may serve: [`Instance`]s of a service, grouped into immutable
//! [`UpstreamSet`]s that the proxy balances over. Each instance carries an [`EndpointStats`]
//! handle (atomics only) that outlives set rebuilds, so passive-health state survives a
//! Consul change that did not touch that instance.

pub mod passing;
pub mod watcher;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use http::uri::Authority;
use serde::{Deserialize, Serialize};

use crate::http1::pool::PoolSlot;

/// Which instances of a service may serve a route (a route document's `health`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum HealthPolicy {
    /// Every check, node checks included, is passing.
    #[default]
    Passing,
    /// Passing or warning; warning instances take `Weights.Warning`.
    PassingOrWarning,
}

/// Health of an instance that may serve (critical and maintenance never reach a set).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InstanceHealth {
    Passing,
    Warning,
}

/// One service instance as Consul reports it, reduced to what routing needs.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Instance {
    /// `<node>/<service id>`: unique in a datacenter, stable across re-registration.
    pub id: String,
    pub node: String,
    pub service_id: String,
    /// `Service.Address`, else `Node.Address`.
    pub address: String,
    pub port: u16,
    pub tags: Vec<String>,
    pub meta: BTreeMap<String, String>,
    pub health: InstanceHealth,
    /// `Weights.Passing` or `Weights.Warning`, by `health`.
    pub weight: u32,
}

impl Instance {
    /// `host:port` for the upstream URI, IPv6 bracketed.
    pub fn authority(&self) -> Result<Authority, http::uri::InvalidUri> {
        if self.address.contains(':') && !self.address.starts_with('[') {
            format!("[{}]:{}", self.address, self.port).parse()
        } else {
            format!("{}:{}", self.address, self.port).parse()
        }
    }
}

/// An instance Consul lists that may not serve: critical or in maintenance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutOfService {
    /// `<node>/<service id>`, as [`Instance::id`].
    pub id: String,
    pub address: String,
    pub port: u16,
    /// `critical` or `maintenance`.
    pub health: String,
    /// The checks keeping it out, as `name (status)`; never their output.
    pub checks: Vec<String>,
}

/// Milliseconds on the process clock that [`EndpointStats::ejected_until_ms`] is measured
/// on (monotonic; its epoch is the first call). Never 0, so 0 can mean "not ejected".
/// The key of one health watch: a service of the local datacenter (`orders`), or of
/// another one (`orders@dc2`, read with `?dc=dc2`). Service names with `@` are refused
/// by routing, so the two cannot be confused.
pub fn watch_key(service: &str, datacenter: Option<&str>) -> String {
    match datacenter {
        Some(dc) => format!("{service}@{dc}"),
        None => service.to_string(),
    }
}

/// The service and datacenter of a [`watch_key`].
pub fn parse_watch_key(key: &str) -> (&str, Option<&str>) {
    match key.rsplit_once('@') {
        Some((service, dc)) => (service, Some(dc)),
        None => (key, None),
    }
}

pub fn now_ms() -> u64 {
    ms_at(Instant::now())
}

/// [`now_ms`] of an instant already taken.
pub fn ms_at(t: Instant) -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    t.saturating_duration_since(*EPOCH.get_or_init(Instant::now))
        .as_millis() as u64
        + 1
}

/// Live, per-instance counters the data plane updates: in-flight requests, consecutive
/// failures and ejection. Shared by id across snapshots.
#[derive(Debug, Default)]
pub struct EndpointStats {
    pub in_flight: AtomicU64,
    pub consecutive_failures: AtomicU32,
    /// [`now_ms`] until which the endpoint is ejected (0 = not).
    pub ejected_until_ms: AtomicU64,
    /// How many times it has been ejected in a row (drives the growing ejection time).
    pub ejections: AtomicU32,
    pub requests: AtomicU64,
    pub failures: AtomicU64,
}

impl EndpointStats {
    pub fn is_ejected(&self, now_ms: u64) -> bool {
        self.ejected_until_ms.load(Ordering::Relaxed) > now_ms
    }
}

/// An instance ready for the balancer: what it is, where to dial, and its live counters.
#[derive(Debug)]
pub struct Endpoint {
    pub instance: Instance,
    pub authority: Authority,
    pub stats: Arc<EndpointStats>,
    /// The HTTP/1.1 pool's idle list for this address, looked up by its first request
    /// (every later one of this snapshot goes straight to it).
    pub connections: OnceLock<PoolSlot>,
}

/// The instances one route may use: a service filtered by health policy and tags.
/// Immutable; sorted by instance id so equal inputs give equal sets.
#[derive(Debug, Default)]
pub struct UpstreamSet {
    pub service: String,
    pub endpoints: Vec<Endpoint>,
    /// Sum of weights, precomputed for weighted picks.
    pub total_weight: u64,
    /// True when every weight is equal (the balancer can skip weighting).
    pub uniform_weight: bool,
    /// Running sums of weights (`cumulative[i]` = weights of endpoints `0..=i`), for
    /// weighted picks by binary search.
    pub cumulative: Vec<u64>,
    /// Round-robin position; starts again at 0 when the set is rebuilt.
    pub cursor: AtomicUsize,
}

impl UpstreamSet {
    /// Builds a set, reusing stats of instances known in `previous` (by id). Instances
    /// whose address does not form a valid authority are skipped.
    pub fn build(
        service: &str,
        mut instances: Vec<Instance>,
        previous: &HashMap<String, Arc<EndpointStats>>,
    ) -> Self {
        instances.sort_by(|a, b| a.id.cmp(&b.id));
        instances.dedup_by(|a, b| a.id == b.id);
        let endpoints: Vec<Endpoint> = instances
            .into_iter()
            .filter_map(|instance| {
                let authority = instance.authority().ok()?;
                let stats = previous.get(&instance.id).cloned().unwrap_or_default();
                Some(Endpoint {
                    instance,
                    authority,
                    stats,
                    connections: OnceLock::new(),
                })
            })
            .collect();
        let cumulative: Vec<u64> = endpoints
            .iter()
            .scan(0u64, |sum, e| {
                *sum += e.instance.weight as u64;
                Some(*sum)
            })
            .collect();
        let total_weight = cumulative.last().copied().unwrap_or(0);
        let uniform_weight = endpoints
            .windows(2)
            .all(|w| w[0].instance.weight == w[1].instance.weight);
        Self {
            service: service.to_string(),
            endpoints,
            total_weight,
            uniform_weight,
            cumulative,
            cursor: AtomicUsize::new(0),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.endpoints.is_empty()
    }

    pub fn len(&self) -> usize {
        self.endpoints.len()
    }

    /// Same instances with the same health and weight (stats are not compared).
    pub fn same_members(&self, other: &UpstreamSet) -> bool {
        self.endpoints.len() == other.endpoints.len()
            && self
                .endpoints
                .iter()
                .zip(&other.endpoints)
                .all(|(a, b)| a.instance == b.instance)
    }

    pub fn stats_by_id(&self) -> HashMap<String, Arc<EndpointStats>> {
        self.endpoints
            .iter()
            .map(|e| (e.instance.id.clone(), e.stats.clone()))
            .collect()
    }
}

/// Filters a service's instances for one route: health policy and required tags.
pub fn select(instances: &[Instance], policy: HealthPolicy, tags: &[String]) -> Vec<Instance> {
    instances
        .iter()
        .filter(|i| selected(i, policy, tags))
        .cloned()
        .collect()
}

/// Does one instance serve a route with this health policy and these required tags?
pub fn selected(instance: &Instance, policy: HealthPolicy, tags: &[String]) -> bool {
    let healthy = match policy {
        HealthPolicy::Passing => instance.health == InstanceHealth::Passing,
        HealthPolicy::PassingOrWarning => true,
    };
    healthy && instance.weight > 0 && tags.iter().all(|t| instance.tags.contains(t))
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn inst(id: &str, health: InstanceHealth, tags: &[&str]) -> Instance {
        Instance {
            id: id.into(),
            node: "n1".into(),
            service_id: id.into(),
            address: "127.0.0.1".into(),
            port: 8080,
            tags: tags.iter().map(|t| t.to_string()).collect(),
            meta: BTreeMap::new(),
            health,
            weight: 1,
        }
    }

    #[test]
    fn select_applies_health_policy_and_tags() {
        let all = vec![
            inst("a", InstanceHealth::Passing, &["v1"]),
            inst("b", InstanceHealth::Warning, &["v1", "v2"]),
            inst("c", InstanceHealth::Passing, &["v2"]),
        ];
        let ids = |v: Vec<Instance>| v.into_iter().map(|i| i.id).collect::<Vec<_>>();
        assert_eq!(ids(select(&all, HealthPolicy::Passing, &[])), ["a", "c"]);
        assert_eq!(
            ids(select(&all, HealthPolicy::PassingOrWarning, &["v2".into()])),
            ["b", "c"]
        );
    }

    #[test]
    fn rebuild_keeps_stats_by_id() {
        let first = UpstreamSet::build(
            "s",
            vec![inst("a", InstanceHealth::Passing, &[])],
            &HashMap::new(),
        );
        first.endpoints[0]
            .stats
            .consecutive_failures
            .store(3, Ordering::Relaxed);
        let second = UpstreamSet::build(
            "s",
            vec![
                inst("b", InstanceHealth::Passing, &[]),
                inst("a", InstanceHealth::Passing, &[]),
            ],
            &first.stats_by_id(),
        );
        assert_eq!(second.endpoints[0].instance.id, "a");
        assert_eq!(
            second.endpoints[0]
                .stats
                .consecutive_failures
                .load(Ordering::Relaxed),
            3
        );
    }

    #[test]
    fn ipv6_authority_is_bracketed() {
        let mut i = inst("a", InstanceHealth::Passing, &[]);
        i.address = "::1".into();
        assert_eq!(i.authority().unwrap().as_str(), "[::1]:8080");
    }
}
