//! The one snapshot the request path reads: routes and the upstream set each route uses,
//! swapped atomically by a single writer. A request takes `load()` once (an `Arc`, no lock)
//! and keeps that snapshot to its end, so a Consul change never tears a request.

use std::collections::HashMap;
use std::sync::Arc;

use arc_swap::ArcSwap;
use http::{HeaderMap, Method};

use crate::discovery::{self, EndpointStats, HealthPolicy, Instance, UpstreamSet};
use crate::routing::{Route, RouteTable};

/// Everything one request needs to know about the world.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// Bumped on every publish; visible in `/routes` and logs.
    pub version: u64,
    pub table: RouteTable,
    /// The upstream set of each route, by route id in `table`.
    pub upstreams: Vec<Arc<UpstreamSet>>,
    /// Endpoint stats by service, then instance id: shared by every set containing the
    /// instance and carried into the next snapshot.
    pub stats: HashMap<String, HashMap<String, Arc<EndpointStats>>>,
}

/// A matched route and the instances it may use.
pub struct Match<'a> {
    pub route: &'a Arc<Route>,
    pub upstreams: &'a Arc<UpstreamSet>,
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
        let table = RouteTable::build(routes);
        let mut stats: HashMap<String, HashMap<String, Arc<EndpointStats>>> = HashMap::new();
        let mut sets: HashMap<(String, HealthPolicy, Vec<String>), Arc<UpstreamSet>> =
            HashMap::new();
        let empty = Vec::new();
        let no_stats = HashMap::new();
        let mut upstreams = Vec::with_capacity(table.len());
        for route in table.routes() {
            let spec = &route.spec;
            let mut tags = spec.tags.clone();
            tags.sort();
            let key = (spec.service.clone(), spec.health, tags);
            let set = sets
                .entry(key)
                .or_insert_with_key(|(service, health, tags)| {
                    let instances = services.get(service).unwrap_or(&empty);
                    let service_stats = stats.entry(service.clone()).or_insert_with(|| {
                        let prev = previous
                            .and_then(|p| p.stats.get(service))
                            .unwrap_or(&no_stats);
                        instances
                            .iter()
                            .map(|i| {
                                let s = prev.get(&i.id).cloned().unwrap_or_default();
                                (i.id.clone(), s)
                            })
                            .collect()
                    });
                    let chosen = discovery::select(instances, *health, tags);
                    Arc::new(UpstreamSet::build(service, chosen, service_stats))
                })
                .clone();
            upstreams.push(set);
        }
        Snapshot {
            version,
            table,
            upstreams,
            stats,
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
        })
    }
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
