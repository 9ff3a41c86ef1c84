//! Choosing the instance for one try. A pick reads the route's immutable [`UpstreamSet`]
//! and the instances' atomic counters, nothing else: no lock, no allocation.
//!
//! Every policy honours Consul `Weights`, skips instances ejected by [`outlier`] and, on a
//! retry, instances already tried. When too few instances are usable (below the route's
//! panic threshold) ejections are ignored: spreading load over suspect instances beats
//! failing every request.

pub mod breaker;
pub mod mirror;
pub mod outlier;
pub mod spec;
pub mod split;

use std::net::IpAddr;
use std::sync::atomic::Ordering;

use http::{HeaderMap, HeaderName};
use rand::Rng;

use crate::discovery::UpstreamSet;
pub use spec::{BreakerSpec, LbPolicy, MirrorSpec, OutlierSpec, SplitEntry};

/// What a `consistent_hash` route hashes on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HashOn {
    Header(HeaderName),
    Cookie(String),
    ClientIp,
}

impl HashOn {
    /// Parses `header:<name>`, `cookie:<name>` or `client_ip`.
    pub fn parse(text: &str) -> Result<HashOn, String> {
        if text == "client_ip" {
            return Ok(HashOn::ClientIp);
        }
        if let Some(name) = text.strip_prefix("header:") {
            return HeaderName::from_bytes(name.trim().as_bytes())
                .map(HashOn::Header)
                .map_err(|_| format!("`{name}` is not a header name"));
        }
        if let Some(name) = text.strip_prefix("cookie:") {
            let name = name.trim();
            if name.is_empty() || name.contains([';', '=', ' ']) {
                return Err(format!("`{name}` is not a cookie name"));
            }
            return Ok(HashOn::Cookie(name.to_string()));
        }
        Err(format!(
            "`{text}`: expected `header:<name>`, `cookie:<name>` or `client_ip`"
        ))
    }

    /// The header hashed on, if that is what is hashed on.
    pub fn header(&self) -> Option<&HeaderName> {
        match self {
            HashOn::Header(name) => Some(name),
            _ => None,
        }
    }

    /// The request's hash key; `None` when the header or cookie is absent (the pick then
    /// falls back to round robin).
    pub fn key(&self, headers: &HeaderMap, client_ip: IpAddr) -> Option<u64> {
        match self {
            HashOn::ClientIp => Some(match client_ip {
                IpAddr::V4(v4) => hash_bytes(&v4.octets()),
                IpAddr::V6(v6) => hash_bytes(&v6.octets()),
            }),
            HashOn::Header(name) => headers.get(name).map(|v| hash_bytes(v.as_bytes())),
            HashOn::Cookie(name) => headers
                .get_all(http::header::COOKIE)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(';'))
                .find_map(|pair| {
                    let (k, v) = pair.trim().split_once('=')?;
                    (k == name).then(|| hash_bytes(v.as_bytes()))
                }),
        }
    }
}

/// FNV-1a, finalised with a SplitMix64 mix: stable across processes and releases, so every
/// gateway of a cluster sends a key to the same instance.
pub fn hash_bytes(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= *b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    mix(h)
}

fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Instances a pick must avoid: those already tried for this request (a small bit set;
/// beyond 128 instances a retry may land on one already tried).
#[derive(Debug, Clone, Copy, Default)]
pub struct Tried(u128);

impl Tried {
    pub fn insert(&mut self, index: usize) {
        if index < 128 {
            self.0 |= 1 << index;
        }
    }

    pub fn contains(&self, index: usize) -> bool {
        index < 128 && self.0 & (1 << index) != 0
    }

    pub fn count(&self) -> u32 {
        self.0.count_ones()
    }
}

/// Picks an endpoint index of `set`, or `None` when the set is empty.
pub fn pick(
    set: &UpstreamSet,
    lb: LbPolicy,
    hash: Option<u64>,
    tried: Tried,
    outlier: &OutlierSpec,
    now_ms: u64,
) -> Option<usize> {
    let n = set.endpoints.len();
    if n == 0 {
        return None;
    }
    if n == 1 {
        return Some(0);
    }
    let ejected = |i: usize| set.endpoints[i].stats.is_ejected(now_ms);
    let healthy = (0..n).filter(|&i| !ejected(i)).count();
    let panic = healthy * 100 < n * outlier.panic_threshold_percent as usize;
    // Untried and not ejected; else untried; else anything (every instance was tried).
    let untried_left = (tried.count() as usize) < n;
    let allow_ejected = panic || none_usable(set, tried, now_ms);
    let usable = |i: usize| (!untried_left || !tried.contains(i)) && (allow_ejected || !ejected(i));
    match (lb, hash) {
        (LbPolicy::ConsistentHash, Some(key)) => rendezvous(set, key, usable),
        (LbPolicy::Random, _) => {
            let start = rand::rng().random_range(0..set.total_weight.max(1));
            probe(set, weighted_index(set, start), usable)
        }
        (LbPolicy::LeastRequest, _) => least_request(set, usable),
        _ => {
            let turn = set.cursor.fetch_add(1, Ordering::Relaxed);
            let start = if set.uniform_weight {
                turn % n
            } else {
                weighted_index(set, turn as u64 % set.total_weight.max(1))
            };
            probe(set, start, usable)
        }
    }
}

/// True when every untried instance is ejected (then ejected ones may serve a retry).
fn none_usable(set: &UpstreamSet, tried: Tried, now_ms: u64) -> bool {
    let n = set.endpoints.len();
    let untried_left = (tried.count() as usize) < n;
    !(0..n).any(|i| {
        (!untried_left || !tried.contains(i)) && !set.endpoints[i].stats.is_ejected(now_ms)
    })
}

/// The endpoint whose weight range holds `point` (0 ≤ point < total weight).
fn weighted_index(set: &UpstreamSet, point: u64) -> usize {
    if set.uniform_weight {
        let n = set.endpoints.len() as u64;
        let per = (set.total_weight / n).max(1);
        return ((point / per) as usize).min(set.endpoints.len() - 1);
    }
    set.cumulative
        .partition_point(|&c| c <= point)
        .min(set.endpoints.len() - 1)
}

/// The first usable endpoint at or after `start`, wrapping around.
fn probe(set: &UpstreamSet, start: usize, usable: impl Fn(usize) -> bool) -> Option<usize> {
    let n = set.endpoints.len();
    (0..n).map(|k| (start + k) % n).find(|&i| usable(i))
}

/// Power of two choices: two random usable endpoints, the one with fewer requests in
/// flight per unit of weight wins.
fn least_request(set: &UpstreamSet, usable: impl Fn(usize) -> bool) -> Option<usize> {
    let n = set.endpoints.len();
    let mut rng = rand::rng();
    let a = probe(set, rng.random_range(0..n), &usable)?;
    let b = probe(set, rng.random_range(0..n), &usable).unwrap_or(a);
    let load = |i: usize| {
        let e = &set.endpoints[i];
        (
            e.stats.in_flight.load(Ordering::Relaxed) as u128,
            e.instance.weight.max(1) as u128,
        )
    };
    let ((la, wa), (lb, wb)) = (load(a), load(b));
    Some(if la * wb <= lb * wa { a } else { b })
}

/// Weighted rendezvous hashing: each endpoint scores the key by its own id; the highest
/// score wins. Removing an instance moves only the keys it owned.
fn rendezvous(set: &UpstreamSet, key: u64, usable: impl Fn(usize) -> bool) -> Option<usize> {
    let mut best: Option<(f64, usize)> = None;
    for (i, e) in set.endpoints.iter().enumerate() {
        if !usable(i) {
            continue;
        }
        let h = mix(key ^ hash_bytes(e.instance.id.as_bytes()));
        // A uniform draw in (0, 1) from the hash, turned into an exponential race.
        let u = ((h >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
        let score = e.instance.weight.max(1) as f64 / -u.ln();
        if best.is_none_or(|(s, _)| score > s) {
            best = Some((score, i));
        }
    }
    best.map(|(_, i)| i)
}

/// A set of instances `n/i0`, `n/i1`, ... with these weights, for tests.
#[cfg(test)]
pub(crate) fn test_set(weights: &[u32]) -> UpstreamSet {
    use crate::discovery::{Instance, InstanceHealth};
    let instances = weights
        .iter()
        .enumerate()
        .map(|(i, w)| Instance {
            id: format!("n/i{i}"),
            node: "n".into(),
            service_id: format!("i{i}"),
            address: "127.0.0.1".into(),
            port: 1000 + i as u16,
            tags: vec![],
            meta: Default::default(),
            health: InstanceHealth::Passing,
            weight: *w,
        })
        .collect();
    UpstreamSet::build("s", instances, &std::collections::HashMap::new())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    use super::test_set as set;

    fn counts(set: &UpstreamSet, lb: LbPolicy, rounds: usize) -> Vec<usize> {
        let mut c = vec![0; set.len()];
        for _ in 0..rounds {
            let i = pick(set, lb, None, Tried::default(), &OutlierSpec::default(), 1).unwrap();
            c[i] += 1;
        }
        c
    }

    #[test]
    fn round_robin_visits_every_instance_in_turn() {
        let s = set(&[1, 1, 1]);
        assert_eq!(counts(&s, LbPolicy::RoundRobin, 300), [100, 100, 100]);
    }

    #[test]
    fn weights_shape_round_robin_and_random() {
        let s = set(&[1, 3]);
        assert_eq!(counts(&s, LbPolicy::RoundRobin, 400), [100, 300]);
        let r = counts(&s, LbPolicy::Random, 4000);
        assert!(r[1] > 2 * r[0], "{r:?}");
    }

    #[test]
    fn least_request_prefers_the_idle_instance() {
        let s = set(&[1, 1]);
        s.endpoints[0].stats.in_flight.store(50, Ordering::Relaxed);
        let c = counts(&s, LbPolicy::LeastRequest, 200);
        assert!(c[1] > c[0] * 2, "{c:?}");
    }

    #[test]
    fn ejected_and_tried_instances_are_skipped() {
        let s = set(&[1, 1, 1, 1]);
        s.endpoints[1]
            .stats
            .ejected_until_ms
            .store(1_000, Ordering::Relaxed);
        let c = counts(&s, LbPolicy::RoundRobin, 300);
        assert_eq!(c[1], 0, "{c:?}");
        let mut tried = Tried::default();
        tried.insert(0);
        tried.insert(2);
        for _ in 0..10 {
            let i = pick(
                &s,
                LbPolicy::RoundRobin,
                None,
                tried,
                &OutlierSpec::default(),
                1,
            );
            assert_eq!(i, Some(3));
        }
    }

    #[test]
    fn below_the_panic_threshold_ejected_instances_serve_again() {
        let s = set(&[1, 1, 1]);
        for i in 0..2 {
            s.endpoints[i]
                .stats
                .ejected_until_ms
                .store(1_000, Ordering::Relaxed);
        }
        let c = counts(&s, LbPolicy::RoundRobin, 300);
        assert!(c.iter().all(|&n| n > 0), "panic mode uses all: {c:?}");
        let strict = OutlierSpec {
            panic_threshold_percent: 0,
            ..OutlierSpec::default()
        };
        for _ in 0..10 {
            let i = pick(&s, LbPolicy::RoundRobin, None, Tried::default(), &strict, 1);
            assert_eq!(i, Some(2));
        }
    }

    #[test]
    fn consistent_hash_moves_only_the_keys_of_a_removed_instance() {
        let full = set(&[1, 1, 1, 1, 1]);
        let owner = |s: &UpstreamSet, key: u64| {
            let i = pick(
                s,
                LbPolicy::ConsistentHash,
                Some(key),
                Tried::default(),
                &OutlierSpec::default(),
                1,
            )
            .unwrap();
            s.endpoints[i].instance.id.clone()
        };
        let before: Vec<String> = (0..1000u64)
            .map(|k| owner(&full, hash_bytes(&k.to_le_bytes())))
            .collect();
        let mut without = full
            .endpoints
            .iter()
            .map(|e| e.instance.clone())
            .collect::<Vec<_>>();
        without.retain(|i| i.id != "n/i2");
        let smaller = UpstreamSet::build("s", without, &HashMap::new());
        let mut moved = 0;
        for (k, was) in before.iter().enumerate() {
            let now = owner(&smaller, hash_bytes(&(k as u64).to_le_bytes()));
            if was != "n/i2" {
                assert_eq!(&now, was, "key {k} moved although its owner stayed");
            } else {
                moved += 1;
            }
        }
        assert!(
            (120..280).contains(&moved),
            "about a fifth of keys were on i2: {moved}"
        );
    }

    #[test]
    fn hash_on_parses_and_reads_keys() {
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        let mut h = HeaderMap::new();
        h.insert("cookie", "a=1; session=abc".parse().unwrap());
        h.insert("x-user", "u1".parse().unwrap());
        let cookie = HashOn::parse("cookie:session").unwrap();
        assert_eq!(cookie.key(&h, ip), Some(hash_bytes(b"abc")));
        let header = HashOn::parse("header:X-User").unwrap();
        assert_eq!(header.key(&h, ip), Some(hash_bytes(b"u1")));
        assert!(HashOn::parse("cookie:missing")
            .unwrap()
            .key(&h, ip)
            .is_none());
        assert!(HashOn::parse("client_ip").unwrap().key(&h, ip).is_some());
        assert!(HashOn::parse("path").is_err());
        assert!(HashOn::parse("header:bad header").is_err());
    }
}
