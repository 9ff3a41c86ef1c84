//! Weighted splits (`split` in a route document): which share of a route's traffic goes
//! to which upstream set, for canaries (tags `v1`/`v2` of one service) and blue/green
//! (two services).
//!
//! A share with no instance to serve gives its weight to the others, so a canary that
//! dies never turns into errors. Without stickiness the shares are dealt exactly: a
//! counter walks the total weight with a stride coprime to it (about 0.618 of it), so each
//! run of `total` requests holds every share exactly, well mixed rather than in blocks.
//! With a hash (the route's `hash_on`) a client keeps its share for as long as the set of
//! shares that can serve does not change.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::discovery::UpstreamSet;

/// One share of a split, in the order of the route document.
#[derive(Debug)]
pub struct SplitShare {
    pub set: Arc<UpstreamSet>,
    pub weight: u32,
}

/// The shares of one split route, built with each snapshot.
#[derive(Debug)]
pub struct WeightedSets {
    shares: Vec<SplitShare>,
    next: AtomicU64,
}

impl WeightedSets {
    pub fn new(shares: Vec<SplitShare>) -> WeightedSets {
        WeightedSets {
            shares,
            next: AtomicU64::new(0),
        }
    }

    pub fn shares(&self) -> &[SplitShare] {
        &self.shares
    }

    /// The share of the traffic each entry gets now, in per mille of the whole (entries
    /// without instances get 0).
    pub fn effective_per_mille(&self) -> Vec<u32> {
        let total = self.serving_weight();
        self.shares
            .iter()
            .map(|s| match total {
                0 => 0,
                t if serves(s) => (u64::from(s.weight) * 1000 / t) as u32,
                _ => 0,
            })
            .collect()
    }

    fn serving_weight(&self) -> u64 {
        self.shares
            .iter()
            .filter(|s| serves(s))
            .map(|s| u64::from(s.weight))
            .sum()
    }

    /// The set for one request; `None` when no share has an instance. `sticky` is the
    /// client's hash when the route keeps clients on one share.
    pub fn choose(&self, sticky: Option<u64>) -> Option<&Arc<UpstreamSet>> {
        let total = self.serving_weight();
        if total == 0 {
            return None;
        }
        let point = match sticky {
            Some(hash) => hash % total,
            None => {
                let n = self.next.fetch_add(1, Ordering::Relaxed);
                (n % total).wrapping_mul(stride(total)) % total
            }
        };
        let mut below = 0u64;
        for share in self.shares.iter().filter(|s| serves(s)) {
            below += u64::from(share.weight);
            if point < below {
                return Some(&share.set);
            }
        }
        None
    }
}

fn serves(share: &SplitShare) -> bool {
    share.weight > 0 && !share.set.is_empty()
}

/// A step through `0..total` that visits every point once per `total` steps: coprime to
/// `total`, near its golden-ratio fraction so consecutive requests land far apart.
pub(crate) fn stride(total: u64) -> u64 {
    if total <= 2 {
        return 1;
    }
    let mut s = ((total as f64) * 0.618_033_988_7) as u64;
    s = s.clamp(1, total - 1);
    while gcd(s, total) != 1 {
        s += 1;
    }
    s
}

fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::discovery::{Instance, InstanceHealth};

    fn set(service: &str, n: usize) -> Arc<UpstreamSet> {
        let instances = (0..n)
            .map(|i| Instance {
                id: format!("node/{service}-{i}"),
                node: "node".into(),
                service_id: format!("{service}-{i}"),
                address: "127.0.0.1".into(),
                port: 8000 + i as u16,
                tags: Vec::new(),
                meta: Default::default(),
                health: InstanceHealth::Passing,
                weight: 1,
            })
            .collect();
        Arc::new(UpstreamSet::build(service, instances, &HashMap::new()))
    }

    fn counts(
        split: &WeightedSets,
        n: u64,
        sticky: impl Fn(u64) -> Option<u64>,
    ) -> HashMap<String, u64> {
        let mut counts = HashMap::new();
        for i in 0..n {
            let chosen = split.choose(sticky(i)).unwrap();
            *counts.entry(chosen.service.clone()).or_insert(0) += 1;
        }
        counts
    }

    #[test]
    fn shares_are_dealt_exactly_and_mixed() {
        let split = WeightedSets::new(vec![
            SplitShare {
                set: set("v1", 2),
                weight: 90,
            },
            SplitShare {
                set: set("v2", 1),
                weight: 10,
            },
        ]);
        let c = counts(&split, 10_000, |_| None);
        assert_eq!((c["v1"], c["v2"]), (9_000, 1_000));
        // Mixed: no run of 20 requests goes to v1 only.
        let firsts: Vec<bool> = (0..100)
            .map(|_| split.choose(None).unwrap().service == "v2")
            .collect();
        assert!(firsts.windows(20).all(|w| w.contains(&true)), "{firsts:?}");
    }

    #[test]
    fn odd_weights_are_exact_over_a_cycle() {
        let split = WeightedSets::new(vec![
            SplitShare {
                set: set("a", 1),
                weight: 7,
            },
            SplitShare {
                set: set("b", 1),
                weight: 5,
            },
            SplitShare {
                set: set("c", 1),
                weight: 3,
            },
        ]);
        let c = counts(&split, 15 * 40, |_| None);
        assert_eq!((c["a"], c["b"], c["c"]), (280, 200, 120));
    }

    #[test]
    fn a_share_without_instances_gives_its_weight_to_the_others() {
        let split = WeightedSets::new(vec![
            SplitShare {
                set: set("v1", 1),
                weight: 90,
            },
            SplitShare {
                set: set("v2", 0),
                weight: 10,
            },
        ]);
        let c = counts(&split, 1_000, |_| None);
        assert_eq!(c["v1"], 1_000);
        assert_eq!(split.effective_per_mille(), vec![1000, 0]);
        let none = WeightedSets::new(vec![SplitShare {
            set: set("v1", 0),
            weight: 1,
        }]);
        assert!(none.choose(None).is_none());
    }

    #[test]
    fn a_sticky_client_keeps_its_share_and_clients_spread_by_weight() {
        let split = WeightedSets::new(vec![
            SplitShare {
                set: set("v1", 1),
                weight: 75,
            },
            SplitShare {
                set: set("v2", 1),
                weight: 25,
            },
        ]);
        let client = crate::balance::hash_bytes(b"user-17");
        let first = split.choose(Some(client)).unwrap().service.clone();
        for _ in 0..50 {
            assert_eq!(split.choose(Some(client)).unwrap().service, first);
        }
        let c = counts(&split, 4_000, |i| {
            Some(crate::balance::hash_bytes(&i.to_le_bytes()))
        });
        let v2 = c["v2"] as f64 / 4_000.0;
        assert!((0.20..0.30).contains(&v2), "{c:?}");
    }

    #[test]
    fn strides_are_coprime_to_their_total() {
        for total in 1..500u64 {
            let s = stride(total);
            assert_eq!(gcd(s, total.max(1)), 1, "{total}");
        }
    }
}
