//! Token buckets per key (GCRA: one "theoretical arrival time" per key), bounded in memory.
//!
//! A key is hashed (random seed per limiter) to 64 bits and only the hash and its arrival
//! time are stored: 16 bytes a key, whatever the key's length. A key whose bucket has
//! refilled is indistinguishable from a key never seen, so dropping it loses nothing; the
//! sweep does that, and a full shard does it before evicting anything else. Only when a
//! shard is full of keys that are all still draining are arbitrary keys evicted (each then
//! starts again with a full bucket), so memory never exceeds `max_keys`.
//!
//! Limiters live in [`Limiters`], keyed by route name and outside the snapshot, so a snapshot
//! rebuild (or a route document change that leaves `rate_limit` as it was) keeps the buckets.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use http::{HeaderMap, HeaderName, HeaderValue};

use super::spec::{RateLimitScope, RateLimitSpec};
use super::PolicyError;

/// Keys a route's limiter may hold when the document does not say.
pub const DEFAULT_MAX_KEYS: usize = 1_000_000;
const MIN_PER_SECOND: f64 = 0.001;
const MAX_PER_SECOND: f64 = 1_000_000.0;
const MAX_BURST: u32 = 1_000_000;
const MAX_SHARDS: usize = 64;
/// Keys per shard below which a shard is never split further.
const KEYS_PER_SHARD: usize = 4096;

/// What identifies a caller's bucket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    ClientIp,
    /// The authenticated identity (JWT `sub` or API-key consumer); anonymous callers fall
    /// back to their client IP.
    Consumer,
    /// A request header's value; requests without it fall back to their client IP.
    Header(HeaderName),
}

/// A route's compiled `rate_limit`.
#[derive(Debug, Clone, PartialEq)]
pub struct RateRule {
    pub per_second: f64,
    pub burst: u32,
    pub key: KeySource,
    pub max_keys: usize,
    /// Whose buckets count: this gateway's, or the cluster's in Redis.
    pub scope: RateLimitScope,
    /// Time one token takes to come back (GCRA emission interval), in nanoseconds.
    interval_ns: u64,
    /// `interval_ns * burst`: how far ahead of now a key's arrival time may run.
    tolerance_ns: u64,
}

impl RateRule {
    pub fn compile(spec: &RateLimitSpec) -> Result<RateRule, PolicyError> {
        let per_second = spec.per_second;
        if !per_second.is_finite() || !(MIN_PER_SECOND..=MAX_PER_SECOND).contains(&per_second) {
            return Err(PolicyError::at(
                "rate_limit.per_second",
                format!("{per_second} is not between {MIN_PER_SECOND} and {MAX_PER_SECOND}"),
            ));
        }
        if spec.burst == 0 || spec.burst > MAX_BURST {
            return Err(PolicyError::at(
                "rate_limit.burst",
                format!("{} is not between 1 and {MAX_BURST}", spec.burst),
            ));
        }
        let key = parse_key(&spec.key)?;
        let max_keys = spec.max_keys.unwrap_or(DEFAULT_MAX_KEYS);
        if max_keys == 0 {
            return Err(PolicyError::at("rate_limit.max_keys", "must be at least 1"));
        }
        let interval_ns = ((1e9 / per_second).round() as u64).max(1);
        Ok(RateRule {
            per_second,
            burst: spec.burst,
            key,
            max_keys,
            scope: spec.scope,
            interval_ns,
            tolerance_ns: interval_ns * u64::from(spec.burst),
        })
    }

    /// GCRA emission interval: the time one token takes to come back.
    pub fn interval(&self) -> Duration {
        Duration::from_nanos(self.interval_ns)
    }

    /// GCRA tolerance: how long a full bucket takes to drain (interval × burst).
    pub fn tolerance(&self) -> Duration {
        Duration::from_nanos(self.tolerance_ns)
    }

    /// `RateLimit-Policy`'s window: [`RateRule::tolerance`] in whole seconds, rounded up.
    pub fn window_s(&self) -> u64 {
        ceil_secs(self.tolerance())
    }
}

fn parse_key(key: &str) -> Result<KeySource, PolicyError> {
    let bad = |m: String| PolicyError::at("rate_limit.key", m);
    match key.trim() {
        "client_ip" => Ok(KeySource::ClientIp),
        "consumer" => Ok(KeySource::Consumer),
        other => match other.strip_prefix("header:") {
            Some(name) if name.trim().is_empty() => Err(bad(
                "`header:` needs a header name, e.g. `header:X-Tenant`".into(),
            )),
            Some(name) => HeaderName::from_bytes(name.trim().as_bytes())
                .map(KeySource::Header)
                .map_err(|_| bad(format!("`{}` is not a header name", name.trim()))),
            None => Err(bad(format!(
                "`{other}`: use `client_ip`, `consumer` or `header:<name>`"
            ))),
        },
    }
}

/// The key one request is counted under.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitKey<'a> {
    Ip(IpAddr),
    Consumer(&'a str),
    Header(&'a [u8]),
}

impl<'a> LimitKey<'a> {
    /// The key `source` picks for a request; missing consumer or header falls back to the IP.
    pub fn pick(
        source: &KeySource,
        client_ip: IpAddr,
        consumer: Option<&'a str>,
        headers: &'a HeaderMap,
    ) -> LimitKey<'a> {
        match source {
            KeySource::ClientIp => LimitKey::Ip(client_ip),
            KeySource::Consumer => consumer
                .filter(|c| !c.is_empty())
                .map_or(LimitKey::Ip(client_ip), LimitKey::Consumer),
            KeySource::Header(name) => headers
                .get(name)
                .map(HeaderValue::as_bytes)
                .filter(|v| !v.is_empty())
                .map_or(LimitKey::Ip(client_ip), LimitKey::Header),
        }
    }
}

/// The verdict on one request, with what the `RateLimit-*` headers report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    /// The burst: requests a full bucket admits at once.
    pub limit: u32,
    /// Requests this key may still send right now.
    pub remaining: u32,
    /// Time until the bucket is full again.
    pub reset: Duration,
    /// Time until the next request would be admitted (zero when allowed).
    pub retry_after: Duration,
    /// Seconds a full bucket takes to drain at the steady rate (the policy window).
    pub window_s: u64,
}

impl Decision {
    /// `RateLimit-Limit`, `-Remaining`, `-Reset` and `-Policy` (IETF draft names), plus
    /// `Retry-After` on a refusal. Seconds are rounded up.
    pub fn headers(&self) -> impl Iterator<Item = (HeaderName, HeaderValue)> {
        let policy = HeaderValue::from_str(&format!("{};w={}", self.limit, self.window_s))
            .unwrap_or_else(|_| HeaderValue::from_static("0"));
        let retry = (!self.allowed).then(|| {
            (
                http::header::RETRY_AFTER,
                HeaderValue::from(ceil_secs(self.retry_after).max(1)),
            )
        });
        [
            (RATELIMIT_LIMIT.clone(), HeaderValue::from(self.limit)),
            (
                RATELIMIT_REMAINING.clone(),
                HeaderValue::from(self.remaining),
            ),
            (
                RATELIMIT_RESET.clone(),
                HeaderValue::from(ceil_secs(self.reset)),
            ),
            (RATELIMIT_POLICY.clone(), policy),
        ]
        .into_iter()
        .chain(retry)
    }

    /// Writes [`Decision::headers`] into `headers`, replacing any upstream copies.
    pub fn apply(&self, headers: &mut HeaderMap) {
        for (name, value) in self.headers() {
            headers.insert(name, value);
        }
    }
}

pub static RATELIMIT_LIMIT: HeaderName = HeaderName::from_static("ratelimit-limit");
pub static RATELIMIT_REMAINING: HeaderName = HeaderName::from_static("ratelimit-remaining");
pub static RATELIMIT_RESET: HeaderName = HeaderName::from_static("ratelimit-reset");
pub static RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");

pub(super) fn ceil_secs(d: Duration) -> u64 {
    d.as_nanos().div_ceil(1_000_000_000) as u64
}

type Shard = crate::prehashed::ArrivalTimes;

/// One route's buckets.
///
/// Shards are plain `std` mutexes: each is held for one hash-map operation, never across an
/// `.await`, and a request touches one shard, so contention stays per key range.
pub struct KeyedLimiter {
    rule: RateRule,
    epoch: Instant,
    seed: std::collections::hash_map::RandomState,
    shards: Box<[Mutex<Shard>]>,
    per_shard: usize,
    evicted: AtomicU64,
}

impl std::fmt::Debug for KeyedLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyedLimiter")
            .field("rule", &self.rule)
            .field("keys", &self.len())
            .finish()
    }
}

impl KeyedLimiter {
    pub fn new(rule: RateRule) -> KeyedLimiter {
        let shards = (rule.max_keys / KEYS_PER_SHARD)
            .clamp(1, MAX_SHARDS)
            .next_power_of_two()
            .min(MAX_SHARDS);
        KeyedLimiter {
            per_shard: rule.max_keys.div_ceil(shards),
            rule,
            epoch: Instant::now(),
            seed: Default::default(),
            shards: (0..shards).map(|_| Mutex::new(Shard::default())).collect(),
            evicted: AtomicU64::new(0),
        }
    }

    pub fn rule(&self) -> &RateRule {
        &self.rule
    }

    /// Counts one request for `key` now.
    pub fn check(&self, key: LimitKey<'_>) -> Decision {
        self.check_at(key, self.now_ns())
    }

    /// Counts one request for `key` at `now_ns` (nanoseconds since this limiter was made).
    pub fn check_at(&self, key: LimitKey<'_>, now_ns: u64) -> Decision {
        let hash = self.hash(key);
        let (t, tau) = (self.rule.interval_ns, self.rule.tolerance_ns);
        let mut shard = self.shard(hash);
        let stored = shard.get(&hash).copied();
        let tat = stored.unwrap_or(0).max(now_ns);
        let new_tat = tat + t;
        let window_s = ceil_secs(Duration::from_nanos(tau));
        if new_tat - now_ns > tau {
            return Decision {
                allowed: false,
                limit: self.rule.burst,
                remaining: 0,
                reset: Duration::from_nanos(tat - now_ns),
                retry_after: Duration::from_nanos(new_tat - tau - now_ns),
                window_s,
            };
        }
        if stored.is_none() && shard.len() >= self.per_shard {
            self.make_room(&mut shard, now_ns);
        }
        shard.insert(hash, new_tat);
        drop(shard);
        Decision {
            allowed: true,
            limit: self.rule.burst,
            remaining: ((tau - (new_tat - now_ns)) / t) as u32,
            reset: Duration::from_nanos(new_tat - now_ns),
            retry_after: Duration::ZERO,
            window_s,
        }
    }

    /// Drops refilled keys (lossless) and shrinks shards that emptied out. Returns the keys
    /// still held.
    pub fn sweep(&self) -> usize {
        self.sweep_at(self.now_ns())
    }

    pub fn sweep_at(&self, now_ns: u64) -> usize {
        let mut left = 0;
        for shard in self.shards.iter() {
            let mut shard = lock(shard);
            shard.retain(|_, tat| *tat > now_ns);
            if shard.capacity() > 4 * shard.len() + 64 {
                let len = shard.len();
                shard.shrink_to(len * 2);
            }
            left += shard.len();
        }
        left
    }

    /// Keys held right now.
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| lock(s).len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Keys evicted while their buckets were still draining (the key cap was reached).
    pub fn evicted(&self) -> u64 {
        self.evicted.load(Ordering::Relaxed)
    }

    fn make_room(&self, shard: &mut Shard, now_ns: u64) {
        shard.retain(|_, tat| *tat > now_ns);
        if shard.len() < self.per_shard {
            return;
        }
        // Evict a batch so a flood of new keys pays for one scan per batch, not per key.
        // The seed is random, so which keys go is not something a caller can steer.
        let batch = (self.per_shard / 16).max(1);
        let victims: Vec<u64> = shard.keys().take(batch).copied().collect();
        for k in &victims {
            shard.remove(k);
        }
        self.evicted
            .fetch_add(victims.len() as u64, Ordering::Relaxed);
        metrics::counter!(crate::metrics::RATE_LIMIT_EVICTIONS).increment(victims.len() as u64);
    }

    fn hash(&self, key: LimitKey<'_>) -> u64 {
        let mut h = self.seed.build_hasher();
        match key {
            LimitKey::Ip(ip) => {
                h.write_u8(0);
                match super::client_ip::canonical(ip) {
                    IpAddr::V4(v4) => h.write(&v4.octets()),
                    IpAddr::V6(v6) => h.write(&v6.octets()),
                }
            }
            LimitKey::Consumer(c) => {
                h.write_u8(1);
                h.write(c.as_bytes());
            }
            LimitKey::Header(v) => {
                h.write_u8(2);
                h.write(v);
            }
        }
        h.finish()
    }

    fn shard(&self, hash: u64) -> MutexGuard<'_, Shard> {
        // Middle bits: the map itself uses the low bits (bucket) and the top 7 (tag).
        lock(&self.shards[(hash >> 40) as usize & (self.shards.len() - 1)])
    }

    fn now_ns(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }
}

fn lock(m: &Mutex<Shard>) -> MutexGuard<'_, Shard> {
    // A panic cannot leave a map half-updated in a way that matters here.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Every route's limiter, by route name. Read without locking (an `ArcSwap` of the map);
/// the mutex only orders writers: a route's first request after its `rate_limit` changed,
/// and the sweep.
#[derive(Debug, Default)]
pub struct Limiters {
    map: ArcSwap<HashMap<String, Arc<KeyedLimiter>>>,
    write: Mutex<()>,
}

impl Limiters {
    /// The limiter of `route` for `rule`: the existing one while the rule is unchanged,
    /// otherwise a fresh one (full buckets) replacing it.
    pub fn get(&self, route: &str, rule: &RateRule) -> Arc<KeyedLimiter> {
        if let Some(l) = self.map.load().get(route) {
            if l.rule == *rule {
                return l.clone();
            }
        }
        let _w = self.write.lock().unwrap_or_else(|e| e.into_inner());
        let current = self.map.load_full();
        if let Some(l) = current.get(route) {
            if l.rule == *rule {
                return l.clone();
            }
        }
        let limiter = Arc::new(KeyedLimiter::new(rule.clone()));
        let mut next = (*current).clone();
        next.insert(route.to_string(), limiter.clone());
        self.map.store(Arc::new(next));
        limiter
    }

    /// Sweeps every limiter; drops limiters left without keys (a route deleted or changed
    /// leaves one behind; a live route that lost its empty limiter gets a new, identical
    /// one on its next request). Returns (limiters, keys) still held.
    pub fn sweep(&self) -> (usize, usize) {
        let current = self.map.load_full();
        let mut keys = 0;
        let mut empty = Vec::new();
        for (name, l) in current.iter() {
            match l.sweep() {
                0 => empty.push(name.clone()),
                n => keys += n,
            }
        }
        if !empty.is_empty() {
            let _w = self.write.lock().unwrap_or_else(|e| e.into_inner());
            let mut next = (*self.map.load_full()).clone();
            for name in &empty {
                if next.get(name).is_some_and(|l| l.is_empty()) {
                    next.remove(name);
                }
            }
            self.map.store(Arc::new(next));
        }
        (current.len() - empty.len(), keys)
    }

    pub fn len(&self) -> usize {
        self.map.load().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn rule(per_second: f64, burst: u32, key: &str) -> RateRule {
        RateRule::compile(&RateLimitSpec {
            per_second,
            burst,
            key: key.into(),
            max_keys: None,
            scope: RateLimitScope::Local,
        })
        .unwrap()
    }

    const SEC: u64 = 1_000_000_000;
    const IP: LimitKey<'static> = LimitKey::Ip(IpAddr::V4(Ipv4Addr::LOCALHOST));

    #[test]
    fn specs_are_checked_with_the_field_named() {
        let cases: &[(f64, u32, &str, &str)] = &[
            (0.0, 1, "client_ip", "rate_limit.per_second"),
            (f64::NAN, 1, "client_ip", "rate_limit.per_second"),
            (-1.0, 1, "client_ip", "rate_limit.per_second"),
            (1e9, 1, "client_ip", "rate_limit.per_second"),
            (1.0, 0, "client_ip", "rate_limit.burst"),
            (1.0, 1, "header:", "rate_limit.key"),
            (1.0, 1, "header:  ", "rate_limit.key"),
            (1.0, 1, "header:X Bad", "rate_limit.key"),
            (1.0, 1, "ip", "rate_limit.key"),
        ];
        for &(per_second, burst, key, field) in cases {
            let err = RateRule::compile(&RateLimitSpec {
                per_second,
                burst,
                key: key.into(),
                max_keys: None,
                scope: RateLimitScope::Local,
            })
            .unwrap_err();
            assert_eq!(err.field(), field, "{per_second} {burst} {key}: {err}");
        }
        assert_eq!(
            rule(1.0, 1, "header:X-Tenant").key,
            KeySource::Header(HeaderName::from_static("x-tenant"))
        );
        assert_eq!(rule(1.0, 1, "consumer").key, KeySource::Consumer);
    }

    #[test]
    fn a_burst_is_admitted_then_refused_then_refills_at_the_rate() {
        let l = KeyedLimiter::new(rule(2.0, 3, "client_ip"));
        let now = 10 * SEC;
        let remaining: Vec<u32> = (0..3).map(|_| l.check_at(IP, now).remaining).collect();
        assert_eq!(remaining, [2, 1, 0]);
        let refused = l.check_at(IP, now);
        assert!(!refused.allowed);
        assert_eq!(refused.retry_after, Duration::from_millis(500));
        assert_eq!(refused.reset, Duration::from_millis(1500));
        // Half a second later exactly one token is back.
        let later = now + SEC / 2;
        assert!(l.check_at(IP, later).allowed);
        assert!(!l.check_at(IP, later).allowed);
        // After the whole window the bucket is full again.
        let full = l.check_at(IP, later + 2 * SEC);
        assert!(full.allowed);
        assert_eq!(full.remaining, 2);
    }

    #[test]
    fn keys_are_independent_and_kinds_do_not_collide() {
        let l = KeyedLimiter::new(rule(1.0, 1, "client_ip"));
        let now = SEC;
        assert!(l.check_at(IP, now).allowed);
        assert!(!l.check_at(IP, now).allowed);
        assert!(l.check_at(LimitKey::Consumer("127.0.0.1"), now).allowed);
        assert!(l.check_at(LimitKey::Header(b"127.0.0.1"), now).allowed);
        let mapped: IpAddr = "::ffff:127.0.0.1".parse().unwrap();
        assert!(
            !l.check_at(LimitKey::Ip(mapped), now).allowed,
            "an IPv4-mapped address is the same client"
        );
    }

    #[test]
    fn missing_consumer_or_header_falls_back_to_the_client_ip() {
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let mut headers = HeaderMap::new();
        let tenant = KeySource::Header(HeaderName::from_static("x-tenant"));
        assert_eq!(
            LimitKey::pick(&tenant, ip, None, &headers),
            LimitKey::Ip(ip)
        );
        headers.insert("x-tenant", HeaderValue::from_static("acme"));
        assert_eq!(
            LimitKey::pick(&tenant, ip, None, &headers),
            LimitKey::Header(b"acme")
        );
        assert_eq!(
            LimitKey::pick(&KeySource::Consumer, ip, None, &headers),
            LimitKey::Ip(ip)
        );
        assert_eq!(
            LimitKey::pick(&KeySource::Consumer, ip, Some("alice"), &headers),
            LimitKey::Consumer("alice")
        );
    }

    #[test]
    fn headers_follow_the_ietf_draft_and_round_seconds_up() {
        let l = KeyedLimiter::new(rule(0.5, 2, "client_ip"));
        let ok = l.check_at(IP, SEC);
        let h: HashMap<String, String> = ok
            .headers()
            .map(|(k, v)| (k.to_string(), v.to_str().unwrap().to_string()))
            .collect();
        assert_eq!(h["ratelimit-limit"], "2");
        assert_eq!(h["ratelimit-remaining"], "1");
        assert_eq!(h["ratelimit-reset"], "2");
        assert_eq!(h["ratelimit-policy"], "2;w=4");
        assert!(!h.contains_key("retry-after"));
        l.check_at(IP, SEC);
        let refused = l.check_at(IP, SEC + 1);
        let mut map = HeaderMap::new();
        refused.apply(&mut map);
        assert_eq!(map["retry-after"], "2");
        assert_eq!(map["ratelimit-remaining"], "0");
    }

    #[test]
    fn refilled_keys_are_swept_and_the_cap_holds_under_a_flood() {
        let mut r = rule(1.0, 5, "header:x-k");
        r.max_keys = 100;
        let l = KeyedLimiter::new(r);
        for i in 0..1000u32 {
            let k = i.to_string();
            assert!(l.check_at(LimitKey::Header(k.as_bytes()), SEC).allowed);
            assert!(l.len() <= 100);
        }
        assert!(l.evicted() >= 900);
        // Each key spent one token, back after a second: half-way, still held.
        assert!(l.sweep_at(SEC + SEC / 2) > 0);
        // Then every bucket is full again: all dropped, nothing lost.
        assert_eq!(l.sweep_at(2 * SEC), 0);
        assert!(l.is_empty());
    }

    #[test]
    fn a_full_shard_drops_refilled_keys_before_draining_ones() {
        let mut r = rule(1.0, 1, "header:x-k");
        r.max_keys = 4;
        let l = KeyedLimiter::new(r);
        for k in [b"a", b"b", b"c"] {
            l.check_at(LimitKey::Header(k), SEC);
        }
        // "d" is hit at 10s: a, b, c have refilled and make room without an eviction.
        l.check_at(LimitKey::Header(b"d"), 10 * SEC);
        l.check_at(LimitKey::Header(b"d"), 10 * SEC);
        for k in [b"e", b"f", b"g"] {
            l.check_at(LimitKey::Header(k), 10 * SEC);
        }
        assert_eq!(l.evicted(), 0);
        assert_eq!(l.len(), 4);
    }

    #[test]
    fn limiters_survive_while_the_rule_is_unchanged() {
        let reg = Limiters::default();
        let a = reg.get("r", &rule(1.0, 1, "client_ip"));
        assert!(a.check(IP).allowed);
        let again = reg.get("r", &rule(1.0, 1, "client_ip"));
        assert!(Arc::ptr_eq(&a, &again));
        assert!(!again.check(IP).allowed);
        let changed = reg.get("r", &rule(1.0, 2, "client_ip"));
        assert!(!Arc::ptr_eq(&a, &changed));
        assert!(changed.check(IP).allowed);
        reg.get("other", &rule(1.0, 1, "client_ip"));
        assert_eq!(reg.len(), 2);
        // "other" has no keys: swept away; "r" still drains.
        assert_eq!(reg.sweep(), (1, 1));
        assert_eq!(reg.len(), 1);
    }
}
