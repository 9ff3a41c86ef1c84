//! Fault injection for tests: a cheap, cloneable handle whose switches the server consults
//! on every connection and request. Stop/restart live on [`super::Registry`].

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::store::Store;

#[derive(Default)]
struct Switches {
    latency_ms: AtomicU64,
    no_leader: AtomicBool,
    drop_connections: AtomicBool,
    stall: AtomicBool,
    bad_json: AtomicBool,
    zero_index: AtomicBool,
    rate_limited: AtomicBool,
    /// Extra delay for requests whose path starts with the prefix.
    path_latency: Mutex<Option<(String, Duration)>>,
}

/// Switches for misbehaviour; every switch starts off. Clone freely: clones share state.
#[derive(Clone)]
pub struct Faults {
    switches: Arc<Switches>,
    store: Arc<Store>,
}

impl Faults {
    pub(crate) fn new(store: Arc<Store>) -> Faults {
        Faults {
            switches: Arc::default(),
            store,
        }
    }

    /// Delays every answer by this much (zero turns it off).
    pub fn set_latency(&self, latency: Duration) {
        self.switches
            .latency_ms
            .store(latency.as_millis().min(u64::MAX as u128) as u64, Relaxed);
    }

    /// Delays answers to requests whose path starts with `prefix` (e.g. `/v1/catalog/`) by
    /// `latency`, on top of [`Faults::set_latency`]; a zero latency turns it off.
    pub fn set_path_latency(&self, prefix: &str, latency: Duration) {
        let value = (!latency.is_zero()).then(|| (prefix.to_string(), latency));
        *self
            .switches
            .path_latency
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = value;
    }

    /// Without a leader, writes and default/consistent reads answer
    /// `500 rpc error making call: No cluster leader`; `?stale` reads still work
    /// (with `X-Consul-KnownLeader: false`), and `status/leader` answers `""`.
    pub fn set_no_leader(&self, on: bool) {
        self.switches.no_leader.store(on, Relaxed);
    }

    /// Accepts connections and closes them at once, without answering.
    pub fn set_drop_connections(&self, on: bool) {
        self.switches.drop_connections.store(on, Relaxed);
    }

    /// Accepts requests and never answers them; they hang until the client gives up or
    /// the registry stops (requests arriving after the switch is turned off are answered).
    pub fn set_stall(&self, on: bool) {
        self.switches.stall.store(on, Relaxed);
    }

    /// JSON reads answer 200 with a truncated, unparseable body (headers intact).
    pub fn set_bad_json(&self, on: bool) {
        self.switches.bad_json.store(on, Relaxed);
    }

    /// Reads send `X-Consul-Index: 0`, which a real agent never does (exercises client clamps).
    pub fn set_zero_index(&self, on: bool) {
        self.switches.zero_index.store(on, Relaxed);
    }

    /// Every request answers `429 rate limit exceeded`.
    pub fn set_rate_limited(&self, on: bool) {
        self.switches.rate_limited.store(on, Relaxed);
    }

    /// A snapshot restore to older data: all indices above `to` drop to `to`, the global
    /// index continues from there, and every blocked query returns at once with the lower index.
    pub fn restore_snapshot(&self, to: u64) {
        self.store.rewind(to);
    }

    /// Turns every switch off (does not undo a restore).
    pub fn clear(&self) {
        self.set_latency(Duration::ZERO);
        self.set_path_latency("", Duration::ZERO);
        for s in [
            &self.switches.no_leader,
            &self.switches.drop_connections,
            &self.switches.stall,
            &self.switches.bad_json,
            &self.switches.zero_index,
            &self.switches.rate_limited,
        ] {
            s.store(false, Relaxed);
        }
    }

    pub(crate) fn latency(&self) -> Duration {
        Duration::from_millis(self.switches.latency_ms.load(Relaxed))
    }
    /// The delay of a request to `path` (global latency plus a matching path latency).
    pub(crate) fn latency_for(&self, path: &str) -> Duration {
        let extra = match &*self
            .switches
            .path_latency
            .lock()
            .unwrap_or_else(|e| e.into_inner())
        {
            Some((prefix, d)) if path.starts_with(prefix.as_str()) => *d,
            _ => Duration::ZERO,
        };
        self.latency() + extra
    }
    pub(crate) fn no_leader(&self) -> bool {
        self.switches.no_leader.load(Relaxed)
    }
    pub(crate) fn drop_connections(&self) -> bool {
        self.switches.drop_connections.load(Relaxed)
    }
    pub(crate) fn stall(&self) -> bool {
        self.switches.stall.load(Relaxed)
    }
    pub(crate) fn bad_json(&self) -> bool {
        self.switches.bad_json.load(Relaxed)
    }
    pub(crate) fn zero_index(&self) -> bool {
        self.switches.zero_index.load(Relaxed)
    }
    pub(crate) fn rate_limited(&self) -> bool {
        self.switches.rate_limited.load(Relaxed)
    }
}
