//! The one snapshot the request path reads: routes and the upstream set each route uses,
//! swapped atomically by a single writer. A request takes `load()` once (an `Arc`, no lock)
//! and keeps that snapshot to its end, so a Consul change never tears a request.

use std::collections::HashMap;
use std::sync::Arc;

use arc_swap::ArcSwap;
use http::{HeaderMap, Method};

use crate::balance::breaker::ServiceLoad;
use crate::balance::mirror::MirrorTarget;
use crate::balance::split::{SplitShare, WeightedSets};
use crate::discovery::{self, EndpointStats, HealthPolicy, Instance, UpstreamSet};
use crate::routing::{Route, RouteTable};

/// Endpoint stats of one service, by instance id.
pub type ServiceStats = HashMap<String, Arc<EndpointStats>>;

/// Everything one request needs to know about the world.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// Bumped on every publish; visible in `/routes` and logs.
    pub version: u64,
    pub table: RouteTable,
    /// The upstream set of each route, by route id in `table` (a split route's first
    /// share; an empty set for a redirect).
    pub upstreams: Vec<Arc<UpstreamSet>>,
    /// The shares of each split route, by route id.
    pub splits: Vec<Option<Arc<WeightedSets>>>,
    /// Where each mirroring route copies requests to, by route id.
    pub mirrors: Vec<Option<Arc<MirrorTarget>>>,
    /// Every set built, by what it selects: the next snapshot reuses those whose members
    /// did not change.
    sets: HashMap<SetKey, Arc<UpstreamSet>>,
    /// Endpoint stats by service, then instance id: shared by every set containing the
    /// instance and carried into the next snapshot.
    pub stats: HashMap<String, Arc<ServiceStats>>,
    /// Requests in flight to each routed service, for circuit breaking; carried across
    /// snapshots by service name.
    pub loads: Arc<HashMap<String, Arc<ServiceLoad>>>,
    /// The instances (passing or warning) of each routed service the sets were built from.
    pub instances: HashMap<String, Arc<Vec<Instance>>>,
}

/// A matched route and the instances it may use.
pub struct Match<'a> {
    pub route: &'a Arc<Route>,
    pub upstreams: &'a Arc<UpstreamSet>,
    /// The shares, when the route splits its traffic.
    pub split: Option<&'a Arc<WeightedSets>>,
    /// Where copies go, when the route mirrors.
    pub mirror: Option<&'a Arc<MirrorTarget>>,
}

/// Routes that share service (watch key), health policy and (sorted) tags share one
/// upstream set.
type SetKey = (String, HealthPolicy, Vec<String>);

/// Builds the sets of one snapshot, reusing `previous`'s where their members did not
/// change, and the service-wide maps that go with them.
struct SetBuilder<'a> {
    services: &'a HashMap<String, Arc<Vec<Instance>>>,
    previous: Option<&'a Snapshot>,
    empty: Arc<Vec<Instance>>,
    stats: HashMap<String, Arc<ServiceStats>>,
    instances: HashMap<String, Arc<Vec<Instance>>>,
    loads: HashMap<String, Arc<ServiceLoad>>,
    built: HashMap<SetKey, Arc<UpstreamSet>>,
}

impl SetBuilder<'_> {
    fn get(&mut self, key: SetKey) -> Arc<UpstreamSet> {
        if let Some(set) = self.built.get(&key) {
            return set.clone();
        }
        let previous = self.previous;
        let (service, health, tags) = &key;
        let list = self.services.get(service).unwrap_or(&self.empty).clone();
        let unchanged = previous
            .and_then(|p| p.instances.get(service))
            .is_some_and(|prev| Arc::ptr_eq(prev, &list));
        self.instances
            .entry(service.clone())
            .or_insert_with(|| list.clone());
        self.loads.entry(service.clone()).or_insert_with(|| {
            previous
                .and_then(|p| p.loads.get(service).cloned())
                .unwrap_or_default()
        });
        let service_stats = self
            .stats
            .entry(service.clone())
            .or_insert_with(|| {
                let prev = previous.and_then(|p| p.stats.get(service));
                match prev {
                    Some(prev) if unchanged => prev.clone(),
                    _ => carry_stats(&list, prev),
                }
            })
            .clone();
        let chosen = || {
            list.iter()
                .filter(move |i| discovery::selected(i, *health, tags))
        };
        let set = match previous.and_then(|p| p.sets.get(&key)) {
            Some(prev) if unchanged => prev.clone(),
            Some(prev) if same_members(prev, chosen(), &service_stats) => prev.clone(),
            _ => Arc::new(UpstreamSet::build(
                service,
                chosen().cloned().collect(),
                &service_stats,
            )),
        };
        self.built.insert(key, set.clone());
        set
    }
}

impl Snapshot {
    /// Builds a snapshot from validated routes and each service's instances.
    /// Routes that share service, health policy and tags share one [`UpstreamSet`]; stats
    /// are taken over from `previous` by instance id.
    pub fn build(
        version: u64,
        routes: Vec<Arc<Route>>,
        services: &HashMap<String, Vec<Instance>>,
        previous: Option<&Snapshot>,
    ) -> Snapshot {
        let shared = services
            .iter()
            .map(|(k, v)| (k.clone(), Arc::new(v.clone())))
            .collect();
        Self::build_shared(version, routes, &shared, previous)
    }

    /// [`Snapshot::build`] for a writer that keeps each service's instances in an `Arc`:
    /// a service whose `Arc` is the one `previous` was built from keeps its sets and stats
    /// as they are, and one whose members did not change keeps them after a comparison, so
    /// a change to one service costs little more than that service.
    pub fn build_shared(
        version: u64,
        routes: Vec<Arc<Route>>,
        services: &HashMap<String, Arc<Vec<Instance>>>,
        previous: Option<&Snapshot>,
    ) -> Snapshot {
        let table = RouteTable::build(routes);
        let mut sets = SetBuilder {
            services,
            previous,
            empty: Arc::new(Vec::new()),
            stats: HashMap::new(),
            instances: HashMap::new(),
            loads: HashMap::new(),
            built: HashMap::new(),
        };
        let no_set = Arc::new(UpstreamSet::build("", Vec::new(), &ServiceStats::new()));
        let mut upstreams = Vec::with_capacity(table.len());
        let mut splits = Vec::with_capacity(table.len());
        let mut mirrors = Vec::with_capacity(table.len());
        for route in table.routes() {
            // Each backend's set: the first of its datacenters with an instance that may
            // serve (the first one when none has).
            let route_sets: Vec<Arc<UpstreamSet>> = route
                .backends
                .iter()
                .map(|b| {
                    let candidates: Vec<Arc<UpstreamSet>> = b
                        .watch_keys()
                        .into_iter()
                        .map(|key| sets.get((key, route.spec.health, b.tags.clone())))
                        .collect();
                    let first = candidates
                        .first()
                        .cloned()
                        .unwrap_or_else(|| no_set.clone());
                    candidates
                        .into_iter()
                        .find(|s| !s.is_empty())
                        .unwrap_or(first)
                })
                .collect();
            mirrors.push(route.spec.mirror.as_ref().map(|m| {
                let key = (m.service.clone(), route.spec.health, Vec::new());
                Arc::new(MirrorTarget::new(sets.get(key), m.percent))
            }));
            // A redirect has no set; its routes still get an (empty) one to keep ids aligned.
            upstreams.push(route_sets.first().unwrap_or(&no_set).clone());
            splits.push(route.is_split().then(|| {
                let shares = route_sets
                    .into_iter()
                    .zip(&route.backends)
                    .map(|(set, b)| SplitShare {
                        set,
                        weight: b.weight,
                    })
                    .collect();
                Arc::new(WeightedSets::new(shares))
            }));
        }
        Snapshot {
            version,
            table,
            upstreams,
            splits,
            mirrors,
            loads: Arc::new(sets.loads),
            stats: sets.stats,
            instances: sets.instances,
            sets: sets.built,
        }
    }

    /// The route for a request (path already normalised) and its upstream set.
    pub fn lookup(
        &self,
        host: &str,
        path: &str,
        method: &Method,
        headers: &HeaderMap,
    ) -> Option<Match<'_>> {
        let id = self.table.lookup(host, path, method, headers)?;
        Some(Match {
            route: self.table.get(id)?,
            upstreams: self.upstreams.get(id)?,
            split: self.splits.get(id).and_then(Option::as_ref),
            mirror: self.mirrors.get(id).and_then(Option::as_ref),
        })
    }
}

/// The stats map of a service: the previous one if it holds exactly these instances,
/// else a new one that takes over the previous stats by instance id.
fn carry_stats(instances: &[Instance], previous: Option<&Arc<ServiceStats>>) -> Arc<ServiceStats> {
    if let Some(prev) = previous {
        if prev.len() == instances.len() && instances.iter().all(|i| prev.contains_key(&i.id)) {
            return prev.clone();
        }
    }
    let map = instances
        .iter()
        .map(|i| {
            let s = previous
                .and_then(|p| p.get(&i.id))
                .cloned()
                .unwrap_or_default();
            (i.id.clone(), s)
        })
        .collect();
    Arc::new(map)
}

/// Would a set built from `chosen` equal `set`: same instances, in order, with the same
/// stats handles? (Instances are sorted by id upstream; any difference just rebuilds.)
fn same_members<'a>(
    set: &UpstreamSet,
    mut chosen: impl Iterator<Item = &'a Instance>,
    stats: &ServiceStats,
) -> bool {
    for endpoint in &set.endpoints {
        match chosen.next() {
            Some(i)
                if *i == endpoint.instance
                    && stats
                        .get(&i.id)
                        .is_some_and(|s| Arc::ptr_eq(s, &endpoint.stats)) => {}
            _ => return false,
        }
    }
    chosen.next().is_none()
}

/// The holder of the current snapshot. Readers call [`State::load`]; one writer publishes.
#[derive(Debug)]
pub struct State {
    current: ArcSwap<Snapshot>,
}

impl Default for State {
    fn default() -> Self {
        Self::new(Snapshot::default())
    }
}

impl State {
    pub fn new(snapshot: Snapshot) -> State {
        State {
            current: ArcSwap::from_pointee(snapshot),
        }
    }

    /// The current snapshot; cheap, lock-free, safe to hold across `.await`.
    pub fn load(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    pub fn publish(&self, snapshot: Snapshot) {
        self.current.store(Arc::new(snapshot));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::discovery::InstanceHealth;
    use crate::routing::RouteSpec;
    use std::sync::atomic::Ordering;

    fn route(name: &str, json: &str) -> Arc<Route> {
        Arc::new(Route::compile(name, RouteSpec::from_json(json.as_bytes()).unwrap()).unwrap())
    }

    fn inst(id: &str, health: InstanceHealth) -> Instance {
        Instance {
            id: id.into(),
            node: "n".into(),
            service_id: id.into(),
            address: "127.0.0.1".into(),
            port: 1,
            tags: vec![],
            meta: Default::default(),
            health,
            weight: 1,
        }
    }

    #[test]
    fn split_shares_and_service_loads_survive_a_new_snapshot() {
        let routes = || {
            vec![
                route(
                    "s",
                    r#"{"service":"a","path_prefix":"/s","split":[{"weight":3},{"service":"b","weight":1}],"circuit_breaker":{"max_requests":1}}"#,
                ),
                route("a", r#"{"service":"a","path_prefix":"/a"}"#),
                route("r", r#"{"path_prefix":"/r","redirect":{"to":"/x"}}"#),
            ]
        };
        let mut services = HashMap::new();
        services.insert("a".to_string(), vec![inst("a1", InstanceHealth::Passing)]);
        services.insert("b".to_string(), vec![inst("b1", InstanceHealth::Passing)]);
        let first = Snapshot::build(1, routes(), &services, None);
        let m = first
            .lookup("", "/s", &Method::GET, &HeaderMap::new())
            .unwrap();
        let split = m.split.unwrap();
        let sets: Vec<&str> = split
            .shares()
            .iter()
            .map(|s| s.set.service.as_str())
            .collect();
        assert_eq!(sets, ["a", "b"]);
        // The split's share of `a` is the set route `a` uses too.
        let a = first
            .lookup("", "/a", &Method::GET, &HeaderMap::new())
            .unwrap();
        assert!(a.split.is_none());
        assert!(Arc::ptr_eq(&split.shares()[0].set, a.upstreams));
        let r = first
            .lookup("", "/r", &Method::GET, &HeaderMap::new())
            .unwrap();
        assert!(r.upstreams.is_empty());
        assert!(!first.loads.contains_key(""), "a redirect has no service");
        let second = Snapshot::build(2, routes(), &services, Some(&first));
        for service in ["a", "b"] {
            assert!(
                Arc::ptr_eq(&first.loads[service], &second.loads[service]),
                "{service}"
            );
        }
    }

    #[test]
    fn a_change_to_one_service_reuses_the_other_sets() {
        let routes = || {
            vec![
                route("a", r#"{"service":"a","path_prefix":"/a"}"#),
                route("b", r#"{"service":"b","path_prefix":"/b"}"#),
            ]
        };
        let mut services = HashMap::new();
        services.insert("a".to_string(), vec![inst("a1", InstanceHealth::Passing)]);
        services.insert("b".to_string(), vec![inst("b1", InstanceHealth::Passing)]);
        let first = Snapshot::build(1, routes(), &services, None);
        services.insert(
            "b".to_string(),
            vec![
                inst("b1", InstanceHealth::Passing),
                inst("b2", InstanceHealth::Passing),
            ],
        );
        let second = Snapshot::build(2, routes(), &services, Some(&first));
        assert!(
            Arc::ptr_eq(&first.upstreams[0], &second.upstreams[0]),
            "a reused"
        );
        assert!(Arc::ptr_eq(&first.stats["a"], &second.stats["a"]));
        assert!(
            !Arc::ptr_eq(&first.upstreams[1], &second.upstreams[1]),
            "b rebuilt"
        );
        assert_eq!(second.upstreams[1].len(), 2);
        assert!(Arc::ptr_eq(
            &first.upstreams[1].endpoints[0].stats,
            &second.upstreams[1].endpoints[0].stats
        ));
        // A health change with the same ids rebuilds the set but keeps the stats map.
        services.insert("a".to_string(), vec![inst("a1", InstanceHealth::Warning)]);
        let third = Snapshot::build(3, routes(), &services, Some(&second));
        assert!(third.upstreams[0].is_empty());
        assert!(Arc::ptr_eq(&second.stats["a"], &third.stats["a"]));
    }

    #[test]
    fn routes_get_their_filtered_sets_and_stats_survive() {
        let routes = || {
            vec![
                route("p", r#"{"service":"s","path_prefix":"/p"}"#),
                route(
                    "w",
                    r#"{"service":"s","path_prefix":"/w","health":"passing_or_warning"}"#,
                ),
            ]
        };
        let mut services = HashMap::new();
        services.insert(
            "s".to_string(),
            vec![
                inst("a", InstanceHealth::Passing),
                inst("b", InstanceHealth::Warning),
            ],
        );
        let first = Snapshot::build(1, routes(), &services, None);
        let m = first
            .lookup("h", "/p/x", &Method::GET, &HeaderMap::new())
            .unwrap();
        assert_eq!(m.upstreams.len(), 1);
        let m = first
            .lookup("h", "/w", &Method::GET, &HeaderMap::new())
            .unwrap();
        assert_eq!(m.upstreams.len(), 2);
        m.upstreams.endpoints[0]
            .stats
            .consecutive_failures
            .store(2, Ordering::Relaxed);

        let second = Snapshot::build(2, routes(), &services, Some(&first));
        let m = second
            .lookup("h", "/p", &Method::GET, &HeaderMap::new())
            .unwrap();
        assert_eq!(
            m.upstreams.endpoints[0]
                .stats
                .consecutive_failures
                .load(Ordering::Relaxed),
            2,
            "stats shared across routes and carried over"
        );
    }
}
