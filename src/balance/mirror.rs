//! Which requests a route copies to its mirror service (`mirror` in a route document):
//! exactly `percent` of them over every 10,000, spread out rather than in runs (the same
//! coprime stride as [`super::split`]).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::discovery::UpstreamSet;

/// Per ten thousand requests, the finest share a mirror takes.
pub const MIRROR_SCALE: u64 = 10_000;

/// A route's mirror: the set copies go to, and the share of requests copied.
#[derive(Debug)]
pub struct MirrorTarget {
    pub set: Arc<UpstreamSet>,
    per_scale: u64,
    next: AtomicU64,
}

impl MirrorTarget {
    /// `percent` of requests (0.01 to 100) go to `set` too.
    pub fn new(set: Arc<UpstreamSet>, percent: f64) -> MirrorTarget {
        let per_scale = (percent * (MIRROR_SCALE as f64) / 100.0).round() as u64;
        MirrorTarget {
            set,
            per_scale: per_scale.min(MIRROR_SCALE),
            next: AtomicU64::new(0),
        }
    }

    /// Whether this request is one to copy.
    pub fn sample(&self) -> bool {
        if self.per_scale >= MIRROR_SCALE {
            return true;
        }
        let n = self.next.fetch_add(1, Ordering::Relaxed) % MIRROR_SCALE;
        n.wrapping_mul(super::split::stride(MIRROR_SCALE)) % MIRROR_SCALE < self.per_scale
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn target(percent: f64) -> MirrorTarget {
        MirrorTarget::new(
            Arc::new(UpstreamSet::build("shadow", Vec::new(), &HashMap::new())),
            percent,
        )
    }

    #[test]
    fn exactly_the_share_asked_for_is_copied_and_spread_out() {
        for (percent, copies) in [(5.0, 500), (0.01, 1), (33.33, 3333), (100.0, 10_000)] {
            let t = target(percent);
            let picked: Vec<bool> = (0..10_000).map(|_| t.sample()).collect();
            assert_eq!(picked.iter().filter(|p| **p).count(), copies, "{percent}");
        }
        let t = target(10.0);
        let first: Vec<bool> = (0..200).map(|_| t.sample()).collect();
        assert!(
            first.windows(40).all(|w| w.contains(&true)),
            "no long runs without a copy"
        );
    }
}
