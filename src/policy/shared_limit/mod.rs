//! Cluster-scope rate limits: one bucket per route and caller in Redis, shared by every
//! gateway configured with the same `[rate_limit]` store, so N gateways admit what one would.
//!
//! - [`redis_store`]: the connection and the atomic GCRA script (one call per decision).
//! - [`lease`]: tokens a gateway takes ahead (`[rate_limit] lease`) and refusals it
//!   remembers, answered without a round trip; the overshoot bound is stated there.
//! - [`health`]: up/down; while down, decisions fall back (`on_store_error`) at once.
//!
//! A request never waits on Redis longer than `budget_ms` and never fails because of it:
//! past the budget, or on any error, it is decided by the fallback and the store is marked
//! down until the probe ([`SharedLimits::spawn_probe`]) hears from Redis within the budget.

pub mod health;
pub mod lease;
pub mod redis_store;

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use tokio::task::JoinHandle;

use crate::config::{RateLimitSection, RedisTarget, StoreErrorPolicy};
use crate::shutdown::Shutdown;
use health::{HealthView, StoreHealth};
use lease::{Begin, LeaseTable};
use redis_store::{BucketParams, Grant, RedisStore, StoreError};

use super::ratelimit::{Decision, LimitKey, Limiters, RateRule};

/// One route's leases, for the rule they were taken under.
#[derive(Debug)]
struct RouteLeases {
    rule: RateRule,
    params: BucketParams,
    table: LeaseTable,
}

/// The gateway's shared store and its leases, by route.
#[derive(Debug)]
pub struct SharedLimits {
    store: RedisStore,
    health: StoreHealth,
    budget: Duration,
    on_error: StoreErrorPolicy,
    lease: u32,
    key_prefix: String,
    probe_every: Duration,
    routes: ArcSwap<HashMap<String, Arc<RouteLeases>>>,
    write: Mutex<()>,
}

impl SharedLimits {
    /// Prepares the store; connecting is left to the probe (a gateway starts, and serves
    /// with the fallback, while Redis is away).
    pub fn new(
        target: &RedisTarget,
        section: &RateLimitSection,
    ) -> Result<SharedLimits, StoreError> {
        Ok(SharedLimits {
            store: RedisStore::new(target)?,
            health: StoreHealth::new(Instant::now()),
            budget: Duration::from_millis(section.budget_ms),
            on_error: section.on_store_error,
            lease: section.lease,
            key_prefix: section.key_prefix.clone(),
            probe_every: Duration::from_millis(section.probe_interval_ms),
            routes: ArcSwap::default(),
            write: Mutex::new(()),
        })
    }

    pub fn is_up(&self) -> bool {
        self.health.is_up()
    }

    /// Counts one request of `route` for `key` in the shared bucket. `None`: no verdict to
    /// report (Redis unavailable and `on_store_error = "allow"`); the request goes on.
    pub async fn check(
        self: &Arc<Self>,
        route: &str,
        rule: &RateRule,
        key: LimitKey<'_>,
        local: &Limiters,
    ) -> Option<Decision> {
        let leases = self.leases(route, rule);
        let digest = digest(route, key);
        let now = Instant::now();
        let (want, refill) = match leases.table.begin(digest, now) {
            Begin::Leased {
                remaining,
                reset,
                prefetch,
            } => {
                if let Some(want) = prefetch {
                    self.spawn_refill(leases, digest, want);
                }
                return Some(allowed(rule, remaining, reset));
            }
            Begin::Refused { retry_after, reset } => {
                return Some(refused(rule, retry_after, reset));
            }
            Begin::Ask { want, refill } => (want, refill),
        };
        if !self.health.is_up() {
            leases.table.abandon(digest, refill);
            return self.fall_back(route, rule, key, local);
        }
        match self.take(&leases, digest, want).await {
            Ok(grant) => {
                leases
                    .table
                    .finish(digest, &grant, refill, true, Instant::now());
                Some(match grant.granted {
                    0 => refused(rule, grant.retry_after, grant.reset),
                    n => allowed(rule, grant.remaining.saturating_add(n - 1), grant.reset),
                })
            }
            Err(e) => {
                leases.table.abandon(digest, refill);
                self.store_failed(&e);
                self.fall_back(route, rule, key, local)
            }
        }
    }

    /// One script call, bounded by the budget.
    async fn take(
        &self,
        leases: &RouteLeases,
        digest: u128,
        want: u32,
    ) -> Result<Grant, StoreError> {
        let key = redis_store::bucket_key(&self.key_prefix, &digest.to_be_bytes());
        tokio::time::timeout(self.budget, self.store.take(&key, leases.params, want))
            .await
            .unwrap_or(Err(StoreError::OverBudget(self.budget.as_millis() as u64)))
    }

    /// Tops a lease up in the background; the request that noticed it ran low has already
    /// been answered.
    fn spawn_refill(self: &Arc<Self>, leases: Arc<RouteLeases>, digest: u128, want: u32) {
        let this = self.clone();
        tokio::spawn(async move {
            if !this.health.is_up() {
                leases.table.abandon(digest, true);
                return;
            }
            match this.take(&leases, digest, want).await {
                Ok(grant) => leases
                    .table
                    .finish(digest, &grant, true, false, Instant::now()),
                Err(e) => {
                    leases.table.abandon(digest, true);
                    this.store_failed(&e);
                }
            }
        });
    }

    fn store_failed(&self, e: &StoreError) {
        if self.health.failed(Instant::now(), &e.to_string()) {
            self.store.forget_connection();
        }
    }

    fn fall_back(
        &self,
        route: &str,
        rule: &RateRule,
        key: LimitKey<'_>,
        local: &Limiters,
    ) -> Option<Decision> {
        self.health.fell_back(self.on_error.name());
        match self.on_error {
            StoreErrorPolicy::Local => Some(local.get(route, rule).check(key)),
            StoreErrorPolicy::Allow => None,
            StoreErrorPolicy::Deny => Some(refused(
                rule,
                self.probe_every.max(Duration::from_secs(1)),
                rule.tolerance(),
            )),
        }
    }

    /// The leases of `route` under `rule`: kept while the rule is unchanged, else new.
    fn leases(&self, route: &str, rule: &RateRule) -> Arc<RouteLeases> {
        if let Some(l) = self.routes.load().get(route) {
            if l.rule == *rule {
                return l.clone();
            }
        }
        let _w = self.write.lock().unwrap_or_else(|e| e.into_inner());
        let current = self.routes.load_full();
        if let Some(l) = current.get(route) {
            if l.rule == *rule {
                return l.clone();
            }
        }
        let leases = Arc::new(RouteLeases {
            rule: rule.clone(),
            params: BucketParams::new(rule.interval(), rule.tolerance()),
            table: LeaseTable::new(self.lease, rule.max_keys, rule.tolerance()),
        });
        let mut next = (*current).clone();
        next.insert(route.to_string(), leases.clone());
        self.routes.store(Arc::new(next));
        leases
    }

    /// Drops lease entries with nothing to remember, and routes left without any.
    pub fn sweep(&self) -> usize {
        let now = Instant::now();
        let current = self.routes.load_full();
        let mut held = 0;
        let mut empty = Vec::new();
        for (name, l) in current.iter() {
            match l.table.sweep(now) {
                0 => empty.push(name.clone()),
                n => held += n,
            }
        }
        if !empty.is_empty() {
            let _w = self.write.lock().unwrap_or_else(|e| e.into_inner());
            let mut next = (*self.routes.load_full()).clone();
            for name in &empty {
                next.remove(name);
            }
            self.routes.store(Arc::new(next));
        }
        held
    }

    /// Connects when needed and pings every `probe_interval_ms` until shutdown: a ping
    /// within the budget marks the store up, anything else down.
    pub fn spawn_probe(self: &Arc<Self>, shutdown: Shutdown) -> JoinHandle<()> {
        let this = Arc::downgrade(self);
        let every = self.probe_every;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = shutdown.wait() => return,
                    _ = tick.tick() => {}
                }
                let Some(this) = this.upgrade() else { return };
                this.probe().await;
            }
        })
    }

    async fn probe(&self) {
        let result = match self.store.reconnect().await {
            Ok(()) => tokio::time::timeout(self.budget, self.store.ping())
                .await
                .unwrap_or(Err(StoreError::OverBudget(self.budget.as_millis() as u64))),
            Err(e) => Err(e),
        };
        match result {
            Ok(()) => {
                self.health.answered(Instant::now());
            }
            Err(e) => self.store_failed(&e),
        }
    }

    /// The store's settings and state for `/rate_limits` (URLs without credentials).
    pub fn view(&self) -> serde_json::Value {
        let HealthView {
            up,
            since,
            last_error,
            transitions,
            fallbacks,
        } = self.health.view(Instant::now());
        let target = self.store.target();
        serde_json::json!({
            "kind": target.kind(),
            "nodes": target.redacted_urls(),
            "state": if up { "up" } else { "down" },
            "since_s": since.as_secs_f64(),
            "last_error": (!last_error.is_empty()).then_some(last_error),
            "transitions": transitions,
            "fallback_decisions": fallbacks,
            "on_store_error": self.on_error.name(),
            "budget_ms": self.budget.as_millis() as u64,
            "lease": self.lease,
            "routes": self.routes.load().len(),
        })
    }
}

/// The digest of route and caller, as every gateway computes it.
fn digest(route: &str, key: LimitKey<'_>) -> u128 {
    let d = match key {
        LimitKey::Ip(ip) => match super::client_ip::canonical(ip) {
            IpAddr::V4(v4) => redis_store::bucket_digest(route, 0, &v4.octets()),
            IpAddr::V6(v6) => redis_store::bucket_digest(route, 0, &v6.octets()),
        },
        LimitKey::Consumer(c) => redis_store::bucket_digest(route, 1, c.as_bytes()),
        LimitKey::Header(v) => redis_store::bucket_digest(route, 2, v),
    };
    u128::from_be_bytes(d)
}

fn allowed(rule: &RateRule, remaining: u32, reset: Duration) -> Decision {
    Decision {
        allowed: true,
        limit: rule.burst,
        remaining: remaining.min(rule.burst),
        reset,
        retry_after: Duration::ZERO,
        window_s: rule.window_s(),
    }
}

fn refused(rule: &RateRule, retry_after: Duration, reset: Duration) -> Decision {
    Decision {
        allowed: false,
        limit: rule.burst,
        remaining: 0,
        reset,
        retry_after,
        window_s: rule.window_s(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::spec::{RateLimitScope, RateLimitSpec};

    fn rule() -> RateRule {
        RateRule::compile(&RateLimitSpec {
            per_second: 20.0,
            burst: 20,
            key: "client_ip".into(),
            max_keys: None,
            scope: RateLimitScope::Cluster,
        })
        .unwrap()
    }

    fn shared(on_store_error: &str) -> Arc<SharedLimits> {
        // Nothing listens on port 1 of loopback: the store never comes up.
        let section: RateLimitSection = toml::from_str(&format!(
            "redis_url = \"redis://127.0.0.1:1\"\non_store_error = \"{on_store_error}\"\n"
        ))
        .unwrap();
        let target = section.redis_target().unwrap().unwrap();
        Arc::new(SharedLimits::new(&target, &section).unwrap())
    }

    const IP: LimitKey<'static> = LimitKey::Ip(IpAddr::V4(std::net::Ipv4Addr::LOCALHOST));

    #[tokio::test]
    async fn a_store_never_heard_from_falls_back_at_once_as_configured() {
        let local = Limiters::default();
        let s = shared("local");
        let rule = rule();
        let started = Instant::now();
        let verdicts: Vec<bool> =
            futures_util::future::join_all((0..25).map(|_| s.check("r", &rule, IP, &local)))
                .await
                .into_iter()
                .map(|d| d.unwrap().allowed)
                .collect();
        assert!(started.elapsed() < Duration::from_secs(1));
        assert_eq!(
            verdicts.iter().filter(|a| **a).count(),
            20,
            "the local burst"
        );
        assert_eq!(s.health.view(Instant::now()).fallbacks, 25);

        assert_eq!(shared("allow").check("r", &rule, IP, &local).await, None);
        let denied = shared("deny").check("r", &rule, IP, &local).await.unwrap();
        assert!(!denied.allowed);
        assert!(denied.retry_after >= Duration::from_secs(1));
    }

    #[tokio::test]
    async fn a_dead_store_is_probed_down_and_its_view_keeps_the_password_out() {
        let section: RateLimitSection =
            toml::from_str("redis_url = \"redis://:s3cret@127.0.0.1:1\"\nbudget_ms = 50\n")
                .unwrap();
        let target = section.redis_target().unwrap().unwrap();
        let s = SharedLimits::new(&target, &section).unwrap();
        s.probe().await;
        assert!(!s.is_up());
        let view = s.view().to_string();
        assert!(!view.contains("s3cret"), "{view}");
        assert!(view.contains("\"state\":\"down\""), "{view}");
        assert!(view.contains("127.0.0.1:1"), "{view}");
    }

    #[test]
    fn callers_digest_apart_and_mapped_addresses_are_one_client() {
        let mapped: IpAddr = "::ffff:127.0.0.1".parse().unwrap();
        assert_eq!(digest("r", IP), digest("r", LimitKey::Ip(mapped)));
        assert_ne!(digest("r", IP), digest("r2", IP));
        assert_ne!(
            digest("r", LimitKey::Consumer("a")),
            digest("r", LimitKey::Header(b"a"))
        );
    }
}
