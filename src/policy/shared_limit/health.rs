//! Whether decisions go to Redis: up until a call fails or overruns its budget, then down
//! (decisions fall back without trying Redis, so no request waits on a dead one) until a
//! probe answers within the budget. Each transition is logged once and counted; the request
//! path only reads an atomic.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The shared store's state, as `/rate_limits` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthView {
    pub up: bool,
    /// Time in the current state.
    pub since: Duration,
    /// Why it last went down (empty before the first failure).
    pub last_error: String,
    /// Up→down and down→up changes since start.
    pub transitions: u64,
    /// Decisions made without Redis since start.
    pub fallbacks: u64,
}

#[derive(Debug)]
struct Detail {
    since: Instant,
    last_error: String,
}

/// The up/down state machine of one store.
#[derive(Debug)]
pub struct StoreHealth {
    up: AtomicBool,
    transitions: AtomicU64,
    fallbacks: AtomicU64,
    /// Only touched on transitions and by the admin view.
    detail: Mutex<Detail>,
}

impl StoreHealth {
    /// A store not yet heard from counts as down: decisions fall back until the first probe
    /// answers (a gateway starts without waiting on Redis).
    pub fn new(now: Instant) -> StoreHealth {
        metrics::gauge!(crate::metrics::RATE_LIMIT_STORE_UP).set(0.0);
        StoreHealth {
            up: AtomicBool::new(false),
            transitions: AtomicU64::new(0),
            fallbacks: AtomicU64::new(0),
            detail: Mutex::new(Detail {
                since: now,
                last_error: String::new(),
            }),
        }
    }

    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Acquire)
    }

    /// A call failed or overran the budget. Returns whether this changed the state.
    pub fn failed(&self, now: Instant, error: &str) -> bool {
        let changed = self.up.swap(false, Ordering::AcqRel);
        let mut detail = self.detail.lock().unwrap_or_else(|e| e.into_inner());
        // Never up and never failed: the first try at start, which is logged too.
        let first = detail.last_error.is_empty() && self.transitions.load(Ordering::Relaxed) == 0;
        if error != detail.last_error {
            detail.last_error = error.to_string();
        }
        if changed {
            detail.since = now;
            self.transitions.fetch_add(1, Ordering::Relaxed);
            metrics::gauge!(crate::metrics::RATE_LIMIT_STORE_UP).set(0.0);
        }
        drop(detail);
        if changed || first {
            tracing::warn!(error,
                "rate-limit store unavailable: cluster-scope limits fall back until Redis answers again");
        }
        changed
    }

    /// A probe (or a call) answered within the budget. Returns whether this changed the
    /// state.
    pub fn answered(&self, now: Instant) -> bool {
        let changed = !self.up.swap(true, Ordering::AcqRel);
        if changed {
            let mut detail = self.detail.lock().unwrap_or_else(|e| e.into_inner());
            let down_for = now.saturating_duration_since(detail.since);
            detail.since = now;
            drop(detail);
            self.transitions.fetch_add(1, Ordering::Relaxed);
            metrics::gauge!(crate::metrics::RATE_LIMIT_STORE_UP).set(1.0);
            tracing::info!(
                down_ms = down_for.as_millis() as u64,
                "rate-limit store answers: cluster-scope limits are shared again"
            );
        }
        changed
    }

    /// One decision made without Redis, by the `on_store_error` named.
    pub fn fell_back(&self, on_store_error: &'static str) {
        self.fallbacks.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(crate::metrics::RATE_LIMIT_STORE_FALLBACKS, "on_store_error" => on_store_error)
            .increment(1);
    }

    pub fn view(&self, now: Instant) -> HealthView {
        let detail = self.detail.lock().unwrap_or_else(|e| e.into_inner());
        HealthView {
            up: self.is_up(),
            since: now.saturating_duration_since(detail.since),
            last_error: detail.last_error.clone(),
            transitions: self.transitions.load(Ordering::Relaxed),
            fallbacks: self.fallbacks.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_transitions_count_and_failures_keep_the_latest_reason() {
        let t0 = Instant::now();
        let h = StoreHealth::new(t0);
        assert!(!h.is_up(), "not heard from yet");
        assert!(h.answered(t0));
        assert!(!h.answered(t0), "already up");
        assert!(h.is_up());
        let t1 = t0 + Duration::from_secs(3);
        assert!(h.failed(t1, "connection refused"));
        assert!(
            !h.failed(t1, "timed out"),
            "already down: no second transition"
        );
        h.fell_back("local");
        h.fell_back("local");
        let v = h.view(t1 + Duration::from_secs(2));
        assert_eq!(
            v,
            HealthView {
                up: false,
                since: Duration::from_secs(2),
                last_error: "timed out".into(),
                transitions: 2,
                fallbacks: 2,
            }
        );
        assert!(h.answered(t1 + Duration::from_secs(5)));
        let v = h.view(t1 + Duration::from_secs(5));
        assert!(v.up);
        assert_eq!(v.since, Duration::ZERO);
        assert_eq!(v.transitions, 3);
    }
}
