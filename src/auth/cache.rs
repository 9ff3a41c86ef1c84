//! Verified tokens by SHA-256 of the token, so a busy client's signature is checked once,
//! not on every request. Bounded (sharded maps with a per-shard cap) and honest about time:
//! an entry dies when its token expires (plus the provider's leeway), and entries made
//! under an older key set (a JWKS rotation that removed keys) are ignored.
//!
//! Only successes are cached, so invalid tokens cannot fill it. Each shard lock is held for
//! one map operation, never across an `.await`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use sha2::{Digest, Sha256};

use super::Identity;

const SHARDS: usize = 16;

/// A token's cache key.
pub type TokenDigest = [u8; 32];

pub fn digest(token: &str) -> TokenDigest {
    Sha256::digest(token.as_bytes()).into()
}

#[derive(Debug)]
struct Entry {
    identity: Arc<Identity>,
    /// Unix seconds after which the entry is dead.
    valid_until: u64,
    /// The key-set generation the token was verified under.
    generation: u64,
}

#[derive(Debug)]
pub struct TokenCache {
    shards: Box<[Mutex<HashMap<TokenDigest, Entry>>]>,
    per_shard: usize,
}

impl TokenCache {
    /// A cache holding about `capacity` tokens (0 disables it).
    pub fn new(capacity: usize) -> TokenCache {
        let per_shard = capacity.div_ceil(SHARDS);
        TokenCache {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            per_shard,
        }
    }

    fn shard(&self, key: &TokenDigest) -> std::sync::MutexGuard<'_, HashMap<TokenDigest, Entry>> {
        // Entries are inserted whole: a poisoned shard still holds consistent data.
        self.shards[key[0] as usize % SHARDS]
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// The identity of a token verified before, if still valid at `now` under `generation`.
    pub fn get(&self, key: &TokenDigest, now: u64, generation: u64) -> Option<Arc<Identity>> {
        if self.per_shard == 0 {
            return None;
        }
        let mut shard = self.shard(key);
        match shard.get(key) {
            Some(e) if e.valid_until > now && e.generation == generation => {
                Some(e.identity.clone())
            }
            Some(_) => {
                shard.remove(key);
                None
            }
            None => None,
        }
    }

    pub fn insert(
        &self,
        key: TokenDigest,
        identity: Arc<Identity>,
        valid_until: u64,
        now: u64,
        generation: u64,
    ) {
        if self.per_shard == 0 || valid_until <= now {
            return;
        }
        let mut shard = self.shard(&key);
        if shard.len() >= self.per_shard && !shard.contains_key(&key) {
            shard.retain(|_, e| e.valid_until > now && e.generation == generation);
            if shard.len() >= self.per_shard {
                // Still full of live entries: drop one. Keys are hashes, so which one is
                // arbitrary and not something a client can steer.
                if let Some(victim) = shard.keys().next().copied() {
                    shard.remove(&victim);
                }
            }
        }
        shard.insert(
            key,
            Entry {
                identity,
                valid_until,
                generation,
            },
        );
    }

    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|p| p.into_inner()).len())
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::AuthMethod;

    fn identity(sub: &str) -> Arc<Identity> {
        Arc::new(Identity {
            method: AuthMethod::Jwt,
            subject: Some(sub.into()),
            consumer: None,
            scopes: vec![],
            claims: Arc::default(),
            source: "p".into(),
            expires_at: None,
            headers: vec![],
        })
    }

    #[test]
    fn entries_live_until_their_deadline_and_generation() {
        let c = TokenCache::new(100);
        let k = digest("t1");
        c.insert(k, identity("a"), 110, 100, 1);
        assert_eq!(c.get(&k, 109, 1).unwrap().subject.as_deref(), Some("a"));
        assert!(c.get(&k, 109, 2).is_none(), "a newer key set ignores it");
        assert!(c.get(&k, 110, 1).is_none(), "dead at its deadline");
        assert!(c.is_empty(), "dead entries are removed when seen");
        c.insert(k, identity("a"), 100, 100, 1);
        assert!(c.is_empty(), "an already expired token is not cached");
    }

    #[test]
    fn the_cache_stays_within_its_bound() {
        let c = TokenCache::new(32);
        for i in 0..10_000 {
            c.insert(digest(&format!("t{i}")), identity("x"), 1_000, 1, 1);
        }
        assert!(c.len() <= 32, "{}", c.len());
        assert!(c.len() >= 16);
    }

    #[test]
    fn a_zero_capacity_cache_holds_nothing() {
        let c = TokenCache::new(0);
        c.insert(digest("t"), identity("x"), 1_000, 1, 1);
        assert!(c.get(&digest("t"), 2, 1).is_none());
    }
}
