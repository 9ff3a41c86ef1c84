//! Budgets of failed token verifications: one per client address, and one for the whole
//! gateway.
//!
//! A token the gateway has not verified before costs a signature check (tens of
//! microseconds for RSA or ECDSA); a token with a bad signature is never cached, so a client
//! sending a stream of distinct bad tokens would make every request cost that. Each
//! verification that ran the crypto and failed (bad signature, or good signature but
//! expired, wrong issuer...) spends one unit of the client's budget; once it is spent, that
//! client's tokens are refused (429) without any crypto until the budget refills. Tokens
//! already in the verified-token cache are still accepted, so a healthy client behind the
//! same address keeps working; other addresses are not affected at all.
//!
//! A flood that brings a new address with every bad token never spends any address's budget,
//! so every failure also spends one unit of a gateway-wide budget; once that is spent, no
//! token outside the cache is verified (429) until it refills. Genuine tokens the gateway has
//! not seen yet are refused too while it lasts: the price of keeping the CPU for the clients
//! it already knows. Both are GCRA buckets (a theoretical arrival time per key); the
//! gateway-wide one is a single atomic word.
//!
//! Memory is bounded: a key is the hash of the address (IPv6 by its /64, the block one
//! subscriber usually gets, so rotating addresses inside it buys nothing) and its
//! theoretical arrival time (GCRA), 16 bytes each, at most `max_clients` of them. A full
//! shard first drops keys whose budget has refilled (indistinguishable from unseen keys),
//! then evicts a random batch (each evicted key starts again with a full budget).

use std::hash::{BuildHasher, Hasher};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

const MAX_SHARDS: usize = 64;
const KEYS_PER_SHARD: usize = 4096;

/// The budget's settings (`[auth.failure_budget]`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FailureBudgetSettings {
    /// Failed verifications a client may cause in a row; 0 turns the budget off.
    pub burst: u32,
    /// Failed verifications a client regains per second.
    pub per_second: f64,
    /// Client addresses tracked at most.
    pub max_clients: usize,
    /// Failed verifications the whole gateway may see in a row; 0 turns that budget off.
    pub global_burst: u32,
    /// Failed verifications the whole gateway regains per second.
    pub global_per_second: f64,
    /// How long a refusal for a spent budget is held before it is sent (zero: not held).
    pub refusal_delay: Duration,
    /// Refusals held at once at most; beyond it they are sent at once.
    pub max_delayed_refusals: usize,
}

/// Which budget is spent, and how long until one more verification may run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpentBudget {
    /// This client address's.
    Address(Duration),
    /// The gateway-wide one.
    Gateway(Duration),
}

impl SpentBudget {
    pub fn wait(&self) -> Duration {
        match *self {
            SpentBudget::Address(w) | SpentBudget::Gateway(w) => w,
        }
    }
}

impl Default for FailureBudgetSettings {
    /// The defaults of `[auth.failure_budget]`.
    fn default() -> Self {
        FailureBudgetSettings::from(&crate::config::FailureBudgetSection::default())
    }
}

impl From<&crate::config::FailureBudgetSection> for FailureBudgetSettings {
    fn from(section: &crate::config::FailureBudgetSection) -> Self {
        FailureBudgetSettings {
            burst: section.burst,
            per_second: section.per_second,
            max_clients: section.max_clients,
            global_burst: section.global_burst,
            global_per_second: section.global_per_second,
            refusal_delay: Duration::from_millis(section.refusal_delay_ms),
            max_delayed_refusals: section.max_delayed_refusals,
        }
    }
}

/// GCRA over failures: `burst` in a row, then one per `1 / per_second`. A key's state is its
/// theoretical arrival time (ns since the budget's epoch; 0 for a key never charged).
#[derive(Debug, Clone, Copy)]
struct Gcra {
    /// Time one unit takes to come back, in nanoseconds.
    interval_ns: u64,
    /// `interval_ns * burst`: how far ahead of now an arrival time may run; 0 when off.
    tolerance_ns: u64,
}

impl Gcra {
    /// Settings out of range (the config file's validation refuses them) are clamped.
    fn new(burst: u32, per_second: f64) -> Gcra {
        let interval_ns = if burst == 0 {
            0
        } else {
            ((1e9 / per_second.clamp(0.001, 1_000_000.0)).round() as u64).max(1)
        };
        Gcra {
            interval_ns,
            tolerance_ns: interval_ns.saturating_mul(u64::from(burst)),
        }
    }

    fn is_off(&self) -> bool {
        self.tolerance_ns == 0
    }

    /// `Some(wait)` when one more failure would not fit.
    fn wait(&self, tat: u64, now_ns: u64) -> Option<Duration> {
        let next = tat.max(now_ns) + self.interval_ns;
        (next - now_ns > self.tolerance_ns)
            .then(|| Duration::from_nanos(next - self.tolerance_ns - now_ns))
    }

    /// The arrival time after one more failure. Capped: failures while spent (raced past
    /// the check) do not extend the wait.
    fn charged(&self, tat: u64, now_ns: u64) -> u64 {
        (tat.max(now_ns) + self.interval_ns).min(now_ns + self.tolerance_ns + self.interval_ns)
    }
}

type Shard = crate::prehashed::ArrivalTimes;

/// One place among the refusals held at once; given back when dropped.
struct HeldRefusal<'a>(&'a AtomicUsize);

impl<'a> HeldRefusal<'a> {
    fn take(held: &'a AtomicUsize, max: usize) -> Option<HeldRefusal<'a>> {
        held.fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| {
            (n < max).then_some(n + 1)
        })
        .ok()?;
        metrics::gauge!(crate::metrics::AUTH_REFUSALS_HELD).increment(1.0);
        Some(HeldRefusal(held))
    }
}

impl Drop for HeldRefusal<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
        metrics::gauge!(crate::metrics::AUTH_REFUSALS_HELD).decrement(1.0);
    }
}

pub struct FailureBudget {
    settings: FailureBudgetSettings,
    per_address: Gcra,
    gateway: Gcra,
    /// The gateway-wide budget's arrival time.
    gateway_tat: AtomicU64,
    epoch: Instant,
    seed: std::collections::hash_map::RandomState,
    shards: Box<[Mutex<Shard>]>,
    per_shard: usize,
    /// Refusals being held now.
    held: AtomicUsize,
}

impl std::fmt::Debug for FailureBudget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FailureBudget")
            .field("settings", &self.settings)
            .finish()
    }
}

impl FailureBudget {
    /// Settings out of range (the config file's validation refuses them) are clamped.
    pub fn new(settings: FailureBudgetSettings) -> FailureBudget {
        let max_clients = settings.max_clients.max(1);
        let shards = (max_clients / KEYS_PER_SHARD)
            .clamp(1, MAX_SHARDS)
            .next_power_of_two()
            .min(MAX_SHARDS);
        FailureBudget {
            per_address: Gcra::new(settings.burst, settings.per_second),
            gateway: Gcra::new(settings.global_burst, settings.global_per_second),
            gateway_tat: AtomicU64::new(0),
            settings,
            epoch: Instant::now(),
            seed: Default::default(),
            shards: (0..shards).map(|_| Mutex::new(Shard::default())).collect(),
            per_shard: max_clients.div_ceil(shards),
            held: AtomicUsize::new(0),
        }
    }

    /// Holds a refusal for a spent budget for about `refusal_delay` (between half and one
    /// and a half of it) before it is sent, unless `max_delayed_refusals` are held already.
    /// The refusal costs the gateway nothing while held (a timer), and a flooding
    /// connection, which sends its next request only after the answer, gets one refusal per
    /// delay instead of thousands a second: the worker's time stays with the other clients.
    /// The spread keeps the held connections from coming back all at once, each with a
    /// token to verify on a budget that refilled meanwhile. A client that gives up (drops
    /// the request) frees its place at once.
    pub async fn hold_refusal(&self) {
        let delay = self.settings.refusal_delay;
        if delay.is_zero() {
            return;
        }
        let slot = HeldRefusal::take(&self.held, self.settings.max_delayed_refusals);
        if slot.is_some() {
            let spread = rand::Rng::random_range(&mut rand::rng(), 0.5..1.5);
            tokio::time::sleep(delay.mul_f64(spread)).await;
        }
    }

    /// Refusals being held now.
    pub fn held_refusals(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }

    pub fn settings(&self) -> &FailureBudgetSettings {
        &self.settings
    }

    /// `Some` when `client`'s budget or the gateway's is spent: which, and how long until
    /// a token from `client` may be verified again.
    pub fn spent(&self, client: IpAddr) -> Option<SpentBudget> {
        self.spent_at(client, self.now_ns())
    }

    /// Spends one unit of `client`'s budget and of the gateway's (a verification that
    /// failed).
    pub fn charge(&self, client: IpAddr) {
        self.charge_at(client, self.now_ns())
    }

    pub fn spent_at(&self, client: IpAddr, now_ns: u64) -> Option<SpentBudget> {
        if !self.per_address.is_off() {
            let hash = self.hash(client);
            let tat = self.shard(hash).get(&hash).copied();
            if let Some(wait) = tat.and_then(|tat| self.per_address.wait(tat, now_ns)) {
                return Some(SpentBudget::Address(wait));
            }
        }
        if self.gateway.is_off() {
            return None;
        }
        self.gateway
            .wait(self.gateway_tat.load(Ordering::Relaxed), now_ns)
            .map(SpentBudget::Gateway)
    }

    pub fn charge_at(&self, client: IpAddr, now_ns: u64) {
        if !self.gateway.is_off() {
            // The closure cannot fail: `fetch_update` only retries on a concurrent change.
            let _ = self
                .gateway_tat
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |tat| {
                    Some(self.gateway.charged(tat, now_ns))
                });
        }
        if self.per_address.is_off() {
            return;
        }
        let hash = self.hash(client);
        let mut shard = self.shard(hash);
        let stored = shard.get(&hash).copied();
        if stored.is_none() && shard.len() >= self.per_shard {
            self.make_room(&mut shard, now_ns);
        }
        shard.insert(hash, self.per_address.charged(stored.unwrap_or(0), now_ns));
    }

    /// Client addresses tracked right now.
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| lock(s).len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn make_room(&self, shard: &mut Shard, now_ns: u64) {
        shard.retain(|_, tat| *tat > now_ns);
        if shard.len() < self.per_shard {
            return;
        }
        // A batch, so a flood of new addresses pays one scan per batch. The seed is random:
        // which keys go is not something a client can steer.
        let batch = (self.per_shard / 16).max(1);
        let victims: Vec<u64> = shard.keys().take(batch).copied().collect();
        for k in &victims {
            shard.remove(k);
        }
        metrics::counter!(crate::metrics::AUTH_FAILURE_BUDGET_EVICTIONS)
            .increment(victims.len() as u64);
    }

    fn hash(&self, client: IpAddr) -> u64 {
        let mut h = self.seed.build_hasher();
        match client {
            IpAddr::V4(v4) => h.write(&v4.octets()),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => h.write(&v4.octets()),
                None => h.write(&v6.octets()[..8]),
            },
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
    // Held for one map operation; a panic cannot leave it half-updated in a way that matters.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    fn budget(burst: u32, per_second: f64, max_clients: usize) -> FailureBudget {
        FailureBudget::new(FailureBudgetSettings {
            burst,
            per_second,
            max_clients,
            global_burst: 0,
            global_per_second: 0.0,
            refusal_delay: Duration::ZERO,
            max_delayed_refusals: 0,
        })
    }

    #[tokio::test(start_paused = true)]
    async fn refusals_are_held_for_the_delay_up_to_the_cap_and_then_sent_at_once() {
        let b = std::sync::Arc::new(FailureBudget::new(FailureBudgetSettings {
            refusal_delay: Duration::from_secs(2),
            max_delayed_refusals: 2,
            ..FailureBudgetSettings::default()
        }));
        let start = tokio::time::Instant::now();
        let held: Vec<_> = (0..2)
            .map(|_| {
                let b = b.clone();
                tokio::spawn(async move { b.hold_refusal().await })
            })
            .collect();
        tokio::task::yield_now().await;
        assert_eq!(b.held_refusals(), 2);
        // The cap is reached: the third is not held.
        b.hold_refusal().await;
        assert_eq!(start.elapsed(), Duration::ZERO);
        for h in held {
            h.await.unwrap();
        }
        let waited = start.elapsed();
        assert!(
            (Duration::from_secs(1)..Duration::from_secs(3)).contains(&waited),
            "{waited:?}"
        );
        assert_eq!(b.held_refusals(), 0);
        // A refusal whose client gave up frees its place.
        let gone = tokio::time::timeout(Duration::from_millis(10), b.hold_refusal()).await;
        assert!(gone.is_err());
        assert_eq!(b.held_refusals(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_zero_delay_holds_nothing() {
        let b = budget(1, 1.0, 10);
        let start = tokio::time::Instant::now();
        b.hold_refusal().await;
        assert_eq!(start.elapsed(), Duration::ZERO);
    }

    #[test]
    fn a_client_is_refused_after_its_burst_and_regains_one_try_per_interval() {
        let b = budget(3, 2.0, 100);
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let t = 10 * S;
        for _ in 0..3 {
            assert_eq!(b.spent_at(ip, t), None);
            b.charge_at(ip, t);
        }
        let wait = b.spent_at(ip, t).expect("spent after 3 failures");
        assert_eq!(wait, SpentBudget::Address(Duration::from_millis(500)));
        assert!(b.spent_at(ip, t + S / 2 - 1).is_some());
        assert_eq!(b.spent_at(ip, t + S / 2), None);
        // More failures while spent do not push the wait further out.
        for _ in 0..100 {
            b.charge_at(ip, t);
        }
        assert!(b.spent_at(ip, t + S / 2 + S / 2).is_none());
        assert!(b.spent_at(ip, t + 2 * S).is_none());
    }

    #[test]
    fn other_clients_keep_their_own_budget() {
        let b = budget(1, 1.0, 100);
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let c: IpAddr = "192.0.2.2".parse().unwrap();
        b.charge_at(a, S);
        assert!(b.spent_at(a, S).is_some());
        assert_eq!(b.spent_at(c, S), None);
    }

    #[test]
    fn ipv6_clients_share_a_budget_per_64_and_mapped_v4_is_v4() {
        let b = budget(1, 1.0, 100);
        let one: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let same64: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let other64: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        b.charge_at(one, S);
        assert!(b.spent_at(same64, S).is_some());
        assert_eq!(b.spent_at(other64, S), None);
        let v4: IpAddr = "198.51.100.7".parse().unwrap();
        let mapped: IpAddr = "::ffff:198.51.100.7".parse().unwrap();
        b.charge_at(mapped, S);
        assert!(b.spent_at(v4, S).is_some());
    }

    #[test]
    fn memory_stays_bounded_under_a_flood_of_addresses() {
        let b = budget(2, 1.0, 1000);
        for i in 0..50_000u32 {
            b.charge_at(IpAddr::from(i.to_be_bytes()), S);
        }
        assert!(b.len() <= 1000, "{} keys", b.len());
        // Refilled keys are dropped before anything else is evicted.
        let later = 100 * S;
        b.charge_at("203.0.113.1".parse().unwrap(), later);
        assert!(b.len() <= 1000);
    }

    #[test]
    fn a_zero_burst_turns_the_budget_off() {
        let b = budget(0, 0.0, 1);
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        for _ in 0..10 {
            b.charge_at(ip, S);
        }
        assert_eq!(b.spent_at(ip, S), None);
        assert!(b.is_empty());
    }

    #[test]
    fn failures_from_ever_new_addresses_spend_the_gateway_wide_budget() {
        let b = FailureBudget::new(FailureBudgetSettings {
            burst: 20,
            per_second: 1.0,
            max_clients: 1000,
            global_burst: 5,
            global_per_second: 10.0,
            ..FailureBudgetSettings::default()
        });
        let t = 10 * S;
        for i in 0..5u32 {
            let ip = IpAddr::from((0x0a00_0000 + i).to_be_bytes());
            assert_eq!(b.spent_at(ip, t), None, "failure {i} fits");
            b.charge_at(ip, t);
        }
        // No address has spent its own budget, but any address is now refused...
        let new: IpAddr = "192.0.2.200".parse().unwrap();
        assert_eq!(
            b.spent_at(new, t),
            Some(SpentBudget::Gateway(Duration::from_millis(100)))
        );
        // ...more failures racing past the check do not push the wait further out...
        for i in 0..50u32 {
            b.charge_at(IpAddr::from((0x0b00_0000 + i).to_be_bytes()), t);
        }
        assert!(b.spent_at(new, t + S / 10 - 1).is_some());
        // ...and one try comes back every 1/10 s.
        assert_eq!(b.spent_at(new, t + 2 * S / 10), None);
        b.charge_at(new, t + 2 * S / 10);
        assert!(b.spent_at(new, t + 2 * S / 10).is_some());
        assert_eq!(b.spent_at(new, t + 10 * S), None);
    }

    #[test]
    fn an_address_that_spent_its_own_budget_hears_about_its_own_first() {
        let b = FailureBudget::new(FailureBudgetSettings {
            burst: 1,
            per_second: 1.0,
            max_clients: 100,
            global_burst: 1,
            global_per_second: 0.5,
            ..FailureBudgetSettings::default()
        });
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        b.charge_at(ip, S);
        assert_eq!(
            b.spent_at(ip, S),
            Some(SpentBudget::Address(Duration::from_secs(1)))
        );
        assert_eq!(
            b.spent_at("192.0.2.2".parse().unwrap(), S),
            Some(SpentBudget::Gateway(Duration::from_secs(2)))
        );
    }

    #[test]
    fn a_zero_global_burst_turns_only_the_gateway_wide_budget_off() {
        let b = FailureBudget::new(FailureBudgetSettings {
            burst: 1,
            per_second: 1.0,
            max_clients: 100_000,
            global_burst: 0,
            global_per_second: 0.0,
            ..FailureBudgetSettings::default()
        });
        for i in 0..10_000u32 {
            let ip = IpAddr::from(i.to_be_bytes());
            assert_eq!(b.spent_at(ip, S), None);
            b.charge_at(ip, S);
        }
        assert!(b.spent_at(IpAddr::from(7u32.to_be_bytes()), S).is_some());
    }
}
