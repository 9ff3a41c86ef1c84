//! Maps keyed by a `u64` that was already hashed (with a per-map random seed): the map's
//! own hasher passes it through instead of hashing it again. Shared by the rate limiter's
//! and the failure budget's per-client tables.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

/// Passes an already-hashed `u64` through.
#[derive(Default)]
pub struct Prehashed(u64);

impl Hasher for Prehashed {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

/// Key hash → theoretical arrival time (ns since the owner's epoch), the table a GCRA
/// keeps per client.
pub type ArrivalTimes = HashMap<u64, u64, BuildHasherDefault<Prehashed>>;
