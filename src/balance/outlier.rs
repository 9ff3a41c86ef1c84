//! Passive health: instances that fail in flight are ejected for a while, longer each
//! time they are ejected again, without waiting for Consul's checks. State lives in the
//! instances' [`EndpointStats`] (atomics), so it survives snapshot rebuilds.

use std::sync::atomic::Ordering;

use super::spec::OutlierSpec;
use crate::discovery::{EndpointStats, UpstreamSet};

/// Records a successful try: the failure streak ends, and an instance that has served
/// well for a base ejection time since its last ejection starts from the base time again.
/// `now_ms` is asked only when the instance has a history of ejections.
pub fn record_success(stats: &EndpointStats, spec: &OutlierSpec, now_ms: impl FnOnce() -> u64) {
    if stats.consecutive_failures.load(Ordering::Relaxed) != 0 {
        stats.consecutive_failures.store(0, Ordering::Relaxed);
    }
    if stats.ejections.load(Ordering::Relaxed) != 0 {
        let until = stats.ejected_until_ms.load(Ordering::Relaxed);
        if now_ms() > until.saturating_add(spec.base_ejection_ms) {
            stats.ejections.store(0, Ordering::Relaxed);
        }
    }
}

/// Records a failed try of `set.endpoints[index]`; true when this failure ejected it.
/// At most `max_ejected_percent` of the set is ejected at once.
pub fn record_failure(set: &UpstreamSet, index: usize, spec: &OutlierSpec, now_ms: u64) -> bool {
    let Some(endpoint) = set.endpoints.get(index) else {
        return false;
    };
    let stats = &endpoint.stats;
    stats.failures.fetch_add(1, Ordering::Relaxed);
    let streak = stats.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
    if spec.consecutive_failures == 0
        || streak < spec.consecutive_failures
        || stats.is_ejected(now_ms)
    {
        return false;
    }
    let ejected = set
        .endpoints
        .iter()
        .filter(|e| e.stats.is_ejected(now_ms))
        .count();
    if (ejected + 1) * 100 > set.endpoints.len() * spec.max_ejected_percent as usize {
        return false;
    }
    let times = stats.ejections.fetch_add(1, Ordering::Relaxed);
    let duration = spec
        .base_ejection_ms
        .saturating_mul(1u64 << times.min(20))
        .min(spec.max_ejection_ms.max(spec.base_ejection_ms));
    stats
        .ejected_until_ms
        .store(now_ms + duration, Ordering::Relaxed);
    stats.consecutive_failures.store(0, Ordering::Relaxed);
    metrics::counter!(crate::metrics::EJECTIONS, "service" => set.service.clone()).increment(1);
    tracing::warn!(service = %set.service, instance = %endpoint.instance.id,
        ejected_ms = duration, times = times + 1, "instance ejected after consecutive failures");
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(n: usize) -> UpstreamSet {
        crate::balance::test_set(&vec![1; n])
    }

    fn spec() -> OutlierSpec {
        OutlierSpec {
            consecutive_failures: 3,
            base_ejection_ms: 100,
            max_ejection_ms: 250,
            max_ejected_percent: 50,
            panic_threshold_percent: 50,
        }
    }

    #[test]
    fn consecutive_failures_eject_for_a_growing_capped_time() {
        let s = set(2);
        let spec = spec();
        assert!(!record_failure(&s, 0, &spec, 10));
        assert!(!record_failure(&s, 0, &spec, 10));
        assert!(record_failure(&s, 0, &spec, 10));
        assert_eq!(
            s.endpoints[0]
                .stats
                .ejected_until_ms
                .load(Ordering::Relaxed),
            110
        );
        for _ in 0..3 {
            record_failure(&s, 0, &spec, 200);
        }
        assert_eq!(
            s.endpoints[0]
                .stats
                .ejected_until_ms
                .load(Ordering::Relaxed),
            400
        );
        for _ in 0..3 {
            record_failure(&s, 0, &spec, 500);
        }
        assert_eq!(
            s.endpoints[0]
                .stats
                .ejected_until_ms
                .load(Ordering::Relaxed),
            750,
            "capped"
        );
    }

    #[test]
    fn a_success_breaks_the_streak_and_a_good_spell_resets_the_multiplier() {
        let s = set(2);
        let spec = spec();
        record_failure(&s, 0, &spec, 10);
        record_failure(&s, 0, &spec, 10);
        record_success(&s.endpoints[0].stats, &spec, || 10);
        assert!(!record_failure(&s, 0, &spec, 10));
        for _ in 0..2 {
            record_failure(&s, 0, &spec, 10);
        }
        assert_eq!(s.endpoints[0].stats.ejections.load(Ordering::Relaxed), 1);
        record_success(&s.endpoints[0].stats, &spec, || 150);
        assert_eq!(
            s.endpoints[0].stats.ejections.load(Ordering::Relaxed),
            1,
            "too soon"
        );
        record_success(&s.endpoints[0].stats, &spec, || 300);
        assert_eq!(s.endpoints[0].stats.ejections.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn no_more_than_the_allowed_share_is_ejected() {
        let s = set(2);
        let spec = spec();
        for _ in 0..3 {
            record_failure(&s, 0, &spec, 10);
        }
        for _ in 0..6 {
            assert!(!record_failure(&s, 1, &spec, 10));
        }
        assert!(!s.endpoints[1].stats.is_ejected(10));
        let never = OutlierSpec {
            consecutive_failures: 0,
            ..spec
        };
        let s = set(4);
        for _ in 0..10 {
            assert!(!record_failure(&s, 0, &never, 10));
        }
    }
}
