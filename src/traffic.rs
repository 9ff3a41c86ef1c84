//! Recent traffic per route, for the dashboard and `switchyard status`: no external
//! time-series store, just a bounded ring the gateway keeps itself.
//!
//! The request path only adds to cumulative counters ([`TrafficCounters`]: a latency
//! histogram whose buckets also count the requests, and three error classes), one or two
//! relaxed atomic adds per request and no clock read of its own. Once a second a sampler
//! (`admin::dashboard::keep_traffic_history`) reads every live route's counters, keeps the difference from its last read
//! as one second of traffic (60 of them), and folds those into 10-second buckets (60 of
//! them: 10 minutes). Rates and p50/p99 are computed from the rings when someone asks.
//! The history is kept by route name, so a route whose document changed (new counters)
//! keeps its chart; a route leaves the history when it leaves the table.

use std::any::Any;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;

/// Latency buckets: below 64 µs, then two per power of two (×1, ×1.5) up to 2^25 µs
/// (33.5 s) and above. Estimates are within a bucket's width (±25%).
pub const LATENCY_BUCKETS: usize = 40;
/// Seconds kept one by one.
const SECONDS_KEPT: usize = 60;
/// Ten-second buckets kept (10 minutes).
const TENS_KEPT: usize = 60;
/// How often the history is sampled.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(1);

/// The bucket of a latency in microseconds.
#[inline]
pub fn bucket_of(micros: u64) -> usize {
    if micros < 64 {
        return 0;
    }
    let msb = 63 - micros.leading_zeros() as usize;
    let half = ((micros >> (msb - 1)) & 1) as usize;
    (1 + 2 * (msb - 6) + half).min(LATENCY_BUCKETS - 1)
}

/// Lower and upper bound (µs) of a bucket; the last one's upper bound is a guess.
fn bucket_bounds(i: usize) -> (f64, f64) {
    if i == 0 {
        return (0.0, 64.0);
    }
    let k = i - 1;
    let base = (1u64 << (6 + k / 2)) as f64;
    if k % 2 == 0 {
        (base, base * 1.5)
    } else {
        (base * 1.5, base * 2.0)
    }
}

/// The cumulative counters of one route, written on the request path.
#[derive(Debug)]
pub struct TrafficCounters {
    /// Every answered request lands in one bucket: their sum is the request count.
    latency: [AtomicU64; LATENCY_BUCKETS],
    client_errors: AtomicU64,
    server_errors: AtomicU64,
    gateway_errors: AtomicU64,
}

impl Default for TrafficCounters {
    fn default() -> Self {
        TrafficCounters {
            latency: std::array::from_fn(|_| AtomicU64::new(0)),
            client_errors: AtomicU64::new(0),
            server_errors: AtomicU64::new(0),
            gateway_errors: AtomicU64::new(0),
        }
    }
}

impl TrafficCounters {
    /// One answered request: the status the client got, how long it took, and whether the
    /// gateway made the answer itself (a refusal, no instance, an upstream failure).
    #[inline]
    pub fn record(&self, status: u16, micros: u64, by_gateway: bool) {
        self.latency[bucket_of(micros)].fetch_add(1, Ordering::Relaxed);
        match status {
            400..=499 => {
                self.client_errors.fetch_add(1, Ordering::Relaxed);
            }
            500..=599 => {
                self.server_errors.fetch_add(1, Ordering::Relaxed);
            }
            _ => {}
        }
        if by_gateway {
            self.gateway_errors.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn read(&self) -> Counts {
        Counts {
            latency: std::array::from_fn(|i| self.latency[i].load(Ordering::Relaxed)),
            client_errors: self.client_errors.load(Ordering::Relaxed),
            server_errors: self.server_errors.load(Ordering::Relaxed),
            gateway_errors: self.gateway_errors.load(Ordering::Relaxed),
        }
    }
}

/// Counts over some span (cumulative, or the difference of two reads).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Counts {
    latency: [u64; LATENCY_BUCKETS],
    client_errors: u64,
    server_errors: u64,
    gateway_errors: u64,
}

impl Default for Counts {
    fn default() -> Self {
        Counts {
            latency: [0; LATENCY_BUCKETS],
            client_errors: 0,
            server_errors: 0,
            gateway_errors: 0,
        }
    }
}

impl Counts {
    fn requests(&self) -> u64 {
        self.latency.iter().sum()
    }

    fn minus(&self, earlier: &Counts) -> Counts {
        Counts {
            latency: std::array::from_fn(|i| self.latency[i].saturating_sub(earlier.latency[i])),
            client_errors: self.client_errors.saturating_sub(earlier.client_errors),
            server_errors: self.server_errors.saturating_sub(earlier.server_errors),
            gateway_errors: self.gateway_errors.saturating_sub(earlier.gateway_errors),
        }
    }

    fn add(&mut self, other: &Counts) {
        for (a, b) in self.latency.iter_mut().zip(other.latency) {
            *a += b;
        }
        self.client_errors += other.client_errors;
        self.server_errors += other.server_errors;
        self.gateway_errors += other.gateway_errors;
    }

    /// The latency (ms) below which a share `q` of the requests fell, interpolated within
    /// its bucket; `None` without requests.
    fn quantile_ms(&self, q: f64) -> Option<f64> {
        let total = self.requests();
        if total == 0 {
            return None;
        }
        let rank = (q * total as f64).ceil().max(1.0);
        let mut below = 0u64;
        for (i, n) in self.latency.iter().enumerate() {
            if *n == 0 {
                continue;
            }
            if (below + n) as f64 >= rank {
                let (lo, hi) = bucket_bounds(i);
                let within = (rank - below as f64) / *n as f64;
                return Some((lo + (hi - lo) * within) / 1000.0);
            }
            below += n;
        }
        None
    }
}

/// One span of a route's traffic as the dashboard draws it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct TrafficPoint {
    /// When the span ended.
    pub at_unix_ms: u64,
    pub span_s: f64,
    pub requests: u64,
    /// Answers with a 4xx / 5xx status, whoever made them.
    pub client_errors: u64,
    pub server_errors: u64,
    /// Errors the gateway answered itself (also counted in their status class).
    pub gateway_errors: u64,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
}

impl TrafficPoint {
    fn of(at_unix_ms: u64, span: Duration, c: &Counts) -> TrafficPoint {
        TrafficPoint {
            at_unix_ms,
            span_s: span.as_secs_f64(),
            requests: c.requests(),
            client_errors: c.client_errors,
            server_errors: c.server_errors,
            gateway_errors: c.gateway_errors,
            p50_ms: c.quantile_ms(0.5),
            p99_ms: c.quantile_ms(0.99),
        }
    }
}

/// Which ring a reader wants drawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeriesSpan {
    /// The last minute, one point a second.
    PerSecond,
    /// The last 10 minutes, one point per 10 s (the bucket still filling left out).
    PerTenSeconds,
    /// No series: the last minute's summary only.
    None,
}

/// A ring as columns, oldest first (one array per field keeps the answer small).
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct TrafficSeries {
    /// Nominal seconds per point (the `span_s` of each point says what it really was).
    pub step_s: u32,
    pub at_unix_ms: Vec<u64>,
    pub span_s: Vec<f64>,
    pub requests: Vec<u64>,
    pub client_errors: Vec<u64>,
    pub server_errors: Vec<u64>,
    pub gateway_errors: Vec<u64>,
    pub p50_ms: Vec<Option<f64>>,
    pub p99_ms: Vec<Option<f64>>,
}

impl TrafficSeries {
    fn of(step_s: u32, points: impl Iterator<Item = TrafficPoint>) -> TrafficSeries {
        let mut s = TrafficSeries {
            step_s,
            ..TrafficSeries::default()
        };
        for p in points {
            s.at_unix_ms.push(p.at_unix_ms);
            s.span_s.push(p.span_s);
            s.requests.push(p.requests);
            s.client_errors.push(p.client_errors);
            s.server_errors.push(p.server_errors);
            s.gateway_errors.push(p.gateway_errors);
            s.p50_ms.push(p.p50_ms);
            s.p99_ms.push(p.p99_ms);
        }
        s
    }
}

/// A route's recent traffic: the last minute summed, and the ring asked for.
#[derive(Debug, Clone, Serialize)]
pub struct RouteTraffic {
    /// The last minute (or as much of it as was sampled).
    pub last_minute: TrafficPoint,
    pub requests_per_s: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub series: Option<TrafficSeries>,
}

struct Second {
    at_unix_ms: u64,
    span: Duration,
    counts: Counts,
}

/// What owns the counters read last (a route; a changed document brings new counters),
/// held so its address cannot be reused while it is compared.
pub type Owner = Arc<dyn Any + Send + Sync>;

/// One route's counters, as the sampler reads them.
pub struct Sampled<'a> {
    pub name: &'a str,
    pub counters: &'a TrafficCounters,
    pub owner: Owner,
}

fn same_owner(a: &Owner, b: &Owner) -> bool {
    std::ptr::addr_eq(Arc::as_ptr(a), Arc::as_ptr(b))
}

struct RouteHistory {
    owner: Owner,
    last: Counts,
    seconds: VecDeque<Second>,
    tens: VecDeque<TrafficPoint>,
    /// The ten-second bucket filling now: its number (unix seconds / 10), span and counts.
    filling: Option<(u64, Duration, Counts)>,
}

impl RouteHistory {
    fn new(owner: Owner) -> RouteHistory {
        RouteHistory {
            owner,
            last: Counts::default(),
            seconds: VecDeque::with_capacity(SECONDS_KEPT),
            tens: VecDeque::with_capacity(TENS_KEPT),
            filling: None,
        }
    }

    fn push(&mut self, at_unix_ms: u64, span: Duration, counts: Counts) {
        if self.seconds.len() == SECONDS_KEPT {
            self.seconds.pop_front();
        }
        self.seconds.push_back(Second {
            at_unix_ms,
            span,
            counts,
        });
        let bucket = at_unix_ms / 10_000;
        match &mut self.filling {
            Some((b, s, c)) if *b == bucket => {
                *s += span;
                c.add(&counts);
            }
            filling => {
                if let Some((b, s, c)) = filling.take() {
                    if self.tens.len() == TENS_KEPT {
                        self.tens.pop_front();
                    }
                    self.tens
                        .push_back(TrafficPoint::of((b + 1) * 10_000, s, &c));
                }
                *filling = Some((bucket, span, counts));
            }
        }
    }

    fn view(&self, span_wanted: SeriesSpan) -> RouteTraffic {
        let mut minute = Counts::default();
        let mut span = Duration::ZERO;
        for s in &self.seconds {
            minute.add(&s.counts);
            span += s.span;
        }
        let at = self.seconds.back().map_or(0, |s| s.at_unix_ms);
        let last_minute = TrafficPoint::of(at, span, &minute);
        RouteTraffic {
            requests_per_s: if span.is_zero() {
                0.0
            } else {
                last_minute.requests as f64 / span.as_secs_f64()
            },
            last_minute,
            series: match span_wanted {
                SeriesSpan::PerSecond => Some(TrafficSeries::of(
                    1,
                    self.seconds
                        .iter()
                        .map(|s| TrafficPoint::of(s.at_unix_ms, s.span, &s.counts)),
                )),
                SeriesSpan::PerTenSeconds => Some(TrafficSeries::of(10, self.tens.iter().cloned())),
                SeriesSpan::None => None,
            },
        }
    }
}

/// The recent traffic of every live route, filled by [`TrafficHistory::sample`].
#[derive(Default)]
pub struct TrafficHistory {
    routes: Mutex<HashMap<String, RouteHistory>>,
}

impl std::fmt::Debug for TrafficHistory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrafficHistory").finish_non_exhaustive()
    }
}

impl TrafficHistory {
    /// Reads every route's counters once: `span` is the time since the last read.
    pub fn sample(&self, routes: Vec<Sampled<'_>>, at_unix_ms: u64, span: Duration) {
        let mut history = self.routes.lock().unwrap_or_else(|p| p.into_inner());
        history.retain(|name, _| routes.iter().any(|r| r.name == name));
        for route in routes {
            let now = route.counters.read();
            let h = match history.get_mut(route.name) {
                Some(h) => h,
                // No history until the first request: idle routes cost nothing.
                None if now.requests() == 0 => continue,
                None => history
                    .entry(route.name.to_string())
                    .or_insert_with(|| RouteHistory::new(route.owner.clone())),
            };
            if !same_owner(&h.owner, &route.owner) {
                h.owner = route.owner;
                h.last = Counts::default();
            }
            let delta = now.minus(&h.last);
            h.last = now;
            h.push(at_unix_ms, span, delta);
        }
    }

    /// The recent traffic of a route, with the ring asked for; `None` before its first
    /// request.
    pub fn route(&self, name: &str, series: SeriesSpan) -> Option<RouteTraffic> {
        let history = self.routes.lock().unwrap_or_else(|p| p.into_inner());
        history.get(name).map(|h| h.view(series))
    }
}

pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counters() -> Arc<TrafficCounters> {
        Arc::new(TrafficCounters::default())
    }

    fn read<'a>(name: &'a str, c: &'a Arc<TrafficCounters>) -> Vec<Sampled<'a>> {
        vec![Sampled {
            name,
            counters: c,
            owner: c.clone(),
        }]
    }

    #[test]
    fn buckets_cover_every_latency_in_order() {
        assert_eq!(bucket_of(0), 0);
        assert_eq!(bucket_of(63), 0);
        assert_eq!(bucket_of(64), 1);
        assert_eq!(bucket_of(96), 2);
        assert_eq!(bucket_of(128), 3);
        assert_eq!(bucket_of(u64::MAX), LATENCY_BUCKETS - 1);
        let mut last = 0;
        for us in [1u64, 100, 1_000, 10_000, 100_000, 1_000_000, 30_000_000] {
            let b = bucket_of(us);
            assert!(b >= last);
            let (lo, hi) = bucket_bounds(b);
            assert!((us as f64) >= lo && ((us as f64) < hi || b == LATENCY_BUCKETS - 1));
            last = b;
        }
    }

    #[test]
    fn quantiles_are_estimated_within_a_bucket() {
        let c = TrafficCounters::default();
        for _ in 0..98 {
            c.record(200, 1_000, false);
        }
        c.record(503, 200_000, true);
        c.record(404, 200_000, false);
        let counts = c.read();
        assert_eq!(counts.requests(), 100);
        let p50 = counts.quantile_ms(0.5).unwrap();
        assert!((0.75..=1.5).contains(&p50), "{p50}");
        let p99 = counts.quantile_ms(0.99).unwrap();
        assert!((130.0..=270.0).contains(&p99), "{p99}");
        assert_eq!(
            (
                counts.client_errors,
                counts.server_errors,
                counts.gateway_errors
            ),
            (1, 1, 1)
        );
        assert_eq!(Counts::default().quantile_ms(0.5), None);
    }

    #[test]
    fn the_rings_stay_bounded_and_follow_a_changed_route() {
        let history = TrafficHistory::default();
        let r = counters();
        history.sample(read("r", &r), 1_000, SAMPLE_EVERY);
        assert!(
            history.route("r", SeriesSpan::None).is_none(),
            "idle routes have no history"
        );
        for i in 0..200u64 {
            r.record(200, 500, false);
            r.record(500, 500, false);
            history.sample(read("r", &r), 2_000 + i * 1_000, SAMPLE_EVERY);
        }
        let t = history.route("r", SeriesSpan::PerSecond).unwrap();
        let per_second = t.series.unwrap();
        assert_eq!(per_second.requests.len(), SECONDS_KEPT);
        assert_eq!(per_second.step_s, 1);
        assert_eq!(t.last_minute.requests, 120);
        assert_eq!(t.last_minute.server_errors, 60);
        assert!((t.requests_per_s - 2.0).abs() < 1e-9);
        let tens = history
            .route("r", SeriesSpan::PerTenSeconds)
            .unwrap()
            .series
            .unwrap();
        assert_eq!(tens.requests.len(), 20, "complete ten-second buckets only");
        assert_eq!(tens.requests[0], 16);
        assert!(tens.requests.iter().skip(1).all(|n| *n == 20));
        assert!(tens.span_s.iter().skip(1).all(|s| (*s - 10.0).abs() < 1e-9));
        assert!(history
            .route("r", SeriesSpan::None)
            .unwrap()
            .series
            .is_none());

        // A new version of the document brings new counters: no negative or lost second.
        let r2 = counters();
        r2.record(200, 500, false);
        history.sample(read("r", &r2), 300_000, SAMPLE_EVERY);
        let after = history.route("r", SeriesSpan::PerSecond).unwrap();
        assert_eq!(after.series.unwrap().requests.last(), Some(&1));
        history.sample(Vec::new(), 301_000, SAMPLE_EVERY);
        assert!(
            history.route("r", SeriesSpan::None).is_none(),
            "gone with its route"
        );
    }
}
