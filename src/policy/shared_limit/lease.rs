//! What one gateway holds of each shared bucket: tokens leased from Redis and not yet spent,
//! and refusals Redis gave ("nothing before t"), so both are answered without a round trip.
//!
//! Bounds: a key's leased tokens never exceed the lease size — one refill per key is in
//! flight at a time and asks only for what tops the holding up to the lease; requests that
//! find the holding empty while it is in flight take exactly one token each, spent at once.
//! So N gateways hold at most N × lease tokens of a key that Redis has already counted:
//! that is the most a key can get beyond its limit in any window (over a long run, less:
//! leased tokens are counted when taken, and an unspent lease is lost, not returned).
//! A cached refusal is exact: GCRA arrival times only move forward, so no token appears
//! before the time Redis named.
//!
//! Memory is bounded by the route's `max_keys`; a key that finds its shard full gets no
//! entry and asks Redis for every request (still exact).

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::redis_store::Grant;

const MAX_SHARDS: usize = 64;
const KEYS_PER_SHARD: usize = 4096;

/// How a request is answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Begin {
    /// A leased token was spent. `prefetch`: this request started the key's refill (ask
    /// Redis for that many in the background, then [`LeaseTable::finish`] with
    /// `spent_one = false`).
    Leased {
        remaining: u32,
        reset: Duration,
        prefetch: Option<u32>,
    },
    /// Redis said no token before `retry_after` from now.
    Refused {
        retry_after: Duration,
        reset: Duration,
    },
    /// Ask Redis for `want` tokens (the request spends one of them). `refill`: this request
    /// holds the key's refill (finish or abandon it).
    Ask { want: u32, refill: bool },
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    /// Tokens Redis granted this gateway and no request has spent.
    tokens: u32,
    /// A call for more tokens is in flight.
    refilling: bool,
    /// Redis refused; no token before this.
    refused_until: Option<Instant>,
    /// The shared bucket's remaining tokens and full-again time at the last answer.
    shared_remaining: u32,
    full_at: Instant,
    /// Last time the entry changed, to drop leases of keys gone quiet.
    touched: Instant,
}

impl Entry {
    fn new(now: Instant) -> Entry {
        Entry {
            tokens: 0,
            refilling: false,
            refused_until: None,
            shared_remaining: 0,
            full_at: now,
            touched: now,
        }
    }

    fn idle(&self, now: Instant, max_idle: Duration) -> bool {
        !self.refilling
            && self.refused_until.is_none_or(|t| t <= now)
            && (self.tokens == 0 || now.saturating_duration_since(self.touched) > max_idle)
    }
}

/// Passes the low 64 bits of an already-random digest through.
#[derive(Default)]
struct Digested(u64);

impl Hasher for Digested {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }
    fn write_u128(&mut self, n: u128) {
        self.0 = n as u64;
    }
}

type Shard = HashMap<u128, Entry, BuildHasherDefault<Digested>>;

/// One route's leases, by bucket digest. Shards are `std` mutexes held for one map
/// operation, never across an `.await`.
#[derive(Debug)]
pub struct LeaseTable {
    lease: u32,
    /// An unspent lease older than this is dropped (the shared bucket has refilled by then).
    max_idle: Duration,
    shards: Box<[Mutex<Shard>]>,
    per_shard: usize,
}

impl LeaseTable {
    /// `lease` 0 or 1: every admitted request is one call to Redis (refusals still cached).
    pub fn new(lease: u32, max_keys: usize, max_idle: Duration) -> LeaseTable {
        let shards = (max_keys / KEYS_PER_SHARD)
            .clamp(1, MAX_SHARDS)
            .next_power_of_two()
            .min(MAX_SHARDS);
        LeaseTable {
            lease,
            max_idle,
            per_shard: max_keys.div_ceil(shards),
            shards: (0..shards).map(|_| Mutex::new(Shard::default())).collect(),
        }
    }

    pub fn begin(&self, digest: u128, now: Instant) -> Begin {
        let mut shard = self.shard(digest);
        let leasing = self.lease > 1;
        let room = shard.len() < self.per_shard;
        let entry = match shard.get_mut(&digest) {
            Some(e) => e,
            None if room => shard.entry(digest).or_insert(Entry::new(now)),
            None => {
                return Begin::Ask {
                    want: 1,
                    refill: false,
                }
            }
        };
        if entry.tokens > 0 {
            entry.tokens -= 1;
            entry.touched = now;
            let prefetch =
                (leasing && !entry.refilling && entry.tokens <= self.lease / 2).then(|| {
                    entry.refilling = true;
                    self.lease - entry.tokens
                });
            return Begin::Leased {
                remaining: entry.tokens.saturating_add(entry.shared_remaining),
                reset: entry.full_at.saturating_duration_since(now),
                prefetch,
            };
        }
        if let Some(until) = entry.refused_until {
            if until > now {
                return Begin::Refused {
                    retry_after: until - now,
                    reset: entry.full_at.saturating_duration_since(now),
                };
            }
            entry.refused_until = None;
        }
        if leasing && !entry.refilling {
            entry.refilling = true;
            return Begin::Ask {
                want: self.lease,
                refill: true,
            };
        }
        Begin::Ask {
            want: 1,
            refill: false,
        }
    }

    /// Records Redis's answer. `spent_one`: a request takes one of the granted tokens.
    pub fn finish(&self, digest: u128, grant: &Grant, refill: bool, spent_one: bool, now: Instant) {
        let mut shard = self.shard(digest);
        let room = shard.len() < self.per_shard;
        let entry = match shard.get_mut(&digest) {
            Some(e) => e,
            None if room => shard.entry(digest).or_insert(Entry::new(now)),
            None => return,
        };
        if refill {
            entry.refilling = false;
        }
        entry.touched = now;
        entry.shared_remaining = grant.remaining;
        entry.full_at = now + grant.reset;
        if grant.granted == 0 {
            entry.refused_until = Some(now + grant.retry_after);
        } else {
            entry.refused_until = None;
            entry.tokens += grant.granted - u32::from(spent_one);
        }
    }

    /// The call for `digest` gave no answer: release its refill.
    pub fn abandon(&self, digest: u128, refill: bool) {
        if !refill {
            return;
        }
        if let Some(e) = self.shard(digest).get_mut(&digest) {
            e.refilling = false;
        }
    }

    /// Drops entries with nothing to remember. Returns the entries left.
    pub fn sweep(&self, now: Instant) -> usize {
        let mut left = 0;
        for shard in self.shards.iter() {
            let mut shard = lock(shard);
            shard.retain(|_, e| !e.idle(now, self.max_idle));
            left += shard.len();
        }
        left
    }

    /// Tokens this gateway holds for `digest` (tests and the admin view).
    pub fn held(&self, digest: u128) -> u32 {
        self.shard(digest).get(&digest).map_or(0, |e| e.tokens)
    }

    fn shard(&self, digest: u128) -> MutexGuard<'_, Shard> {
        lock(&self.shards[(digest >> 64) as usize & (self.shards.len() - 1)])
    }
}

fn lock(m: &Mutex<Shard>) -> MutexGuard<'_, Shard> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grant(granted: u32, remaining: u32) -> Grant {
        Grant {
            granted,
            remaining,
            reset: Duration::from_secs(1),
            retry_after: if granted == 0 {
                Duration::from_millis(50)
            } else {
                Duration::ZERO
            },
        }
    }

    const K: u128 = 0xfeed;

    #[test]
    fn without_a_lease_every_request_asks_and_refusals_are_cached_until_retry() {
        let t = LeaseTable::new(0, 100, Duration::from_secs(1));
        let now = Instant::now();
        assert_eq!(
            t.begin(K, now),
            Begin::Ask {
                want: 1,
                refill: false
            }
        );
        t.finish(K, &grant(1, 5), false, true, now);
        assert_eq!(t.held(K), 0);
        assert_eq!(
            t.begin(K, now),
            Begin::Ask {
                want: 1,
                refill: false
            }
        );
        t.finish(K, &grant(0, 0), false, true, now);
        assert!(matches!(t.begin(K, now), Begin::Refused { retry_after, .. }
            if retry_after == Duration::from_millis(50)));
        let later = now + Duration::from_millis(50);
        assert_eq!(
            t.begin(K, later),
            Begin::Ask {
                want: 1,
                refill: false
            }
        );
    }

    #[test]
    fn a_lease_is_spent_locally_and_refilled_once_half_gone_never_above_its_size() {
        let t = LeaseTable::new(4, 100, Duration::from_secs(1));
        let now = Instant::now();
        // The first request holds the refill and asks for the whole lease.
        assert_eq!(
            t.begin(K, now),
            Begin::Ask {
                want: 4,
                refill: true
            }
        );
        // Meanwhile another request asks for exactly one token.
        assert_eq!(
            t.begin(K, now),
            Begin::Ask {
                want: 1,
                refill: false
            }
        );
        t.finish(K, &grant(1, 9), false, true, now);
        t.finish(K, &grant(4, 5), true, true, now);
        assert_eq!(t.held(K), 3);
        // 3 → 2 left: half the lease, the spender starts a refill for 2 more.
        assert_eq!(
            t.begin(K, now),
            Begin::Leased {
                remaining: 7,
                reset: Duration::from_secs(1),
                prefetch: Some(2)
            }
        );
        // Spent down to 0 while the refill is in flight: no second refill, then one each.
        assert!(matches!(
            t.begin(K, now),
            Begin::Leased { prefetch: None, .. }
        ));
        assert!(matches!(
            t.begin(K, now),
            Begin::Leased { prefetch: None, .. }
        ));
        assert_eq!(
            t.begin(K, now),
            Begin::Ask {
                want: 1,
                refill: false
            }
        );
        // The refill lands: the holding never went above the lease size.
        t.finish(K, &grant(2, 3), true, false, now);
        assert_eq!(t.held(K), 2);
        assert!(t.held(K) <= 4);
    }

    #[test]
    fn an_unanswered_refill_is_released_and_partial_grants_count() {
        let t = LeaseTable::new(10, 100, Duration::from_secs(1));
        let now = Instant::now();
        assert_eq!(
            t.begin(K, now),
            Begin::Ask {
                want: 10,
                refill: true
            }
        );
        t.abandon(K, true);
        assert_eq!(
            t.begin(K, now),
            Begin::Ask {
                want: 10,
                refill: true
            }
        );
        // Only three tokens were left in the shared bucket.
        t.finish(K, &grant(3, 0), true, true, now);
        assert_eq!(t.held(K), 2);
    }

    #[test]
    fn idle_entries_are_swept_and_the_key_cap_holds() {
        let t = LeaseTable::new(4, 2, Duration::from_secs(1));
        let now = Instant::now();
        for k in 0..5u128 {
            let b = t.begin(k, now);
            let refill = matches!(b, Begin::Ask { refill: true, .. });
            t.finish(k, &grant(4, 0), refill, true, now);
        }
        // Only two keys got an entry; the others ask Redis each time.
        let held: u32 = (0..5u128).map(|k| t.held(k)).sum();
        assert_eq!(held, 6);
        assert_eq!(t.sweep(now), 2, "leases still held");
        assert_eq!(
            t.sweep(now + Duration::from_secs(2)),
            0,
            "quiet leases dropped"
        );
    }
}
