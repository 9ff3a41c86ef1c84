//! Every metric name, described in one place, and the Prometheus renderer behind `/metrics`.
//!
//! Modules record through the `metrics` macros with the names below; the recorder is
//! process-global (installed once), so several gateways in one test process share it.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use metrics::Counter;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

pub const REQUESTS: &str = "switchyard_requests_total";
pub const REQUEST_DURATION: &str = "switchyard_request_duration_seconds";
pub const UPSTREAM_ERRORS: &str = "switchyard_upstream_errors_total";
pub const UPSTREAM_CONNECTS: &str = "switchyard_upstream_connections_opened_total";
pub const RETRIES: &str = "switchyard_retries_total";
pub const EJECTIONS: &str = "switchyard_ejections_total";
pub const WATCH_ERRORS: &str = "switchyard_consul_watch_errors_total";
pub const DATA_AGE: &str = "switchyard_consul_data_age_seconds";
pub const CONSUL_AGENT_ACTIVE: &str = "switchyard_consul_agent_active";
pub const CONSUL_AGENT_CHANGES: &str = "switchyard_consul_agent_changes_total";
pub const CONSUL_KNOWN_LEADER: &str = "switchyard_consul_known_leader";
pub const CONSUL_LAST_CONTACT: &str = "switchyard_consul_last_contact_seconds";
pub const CONSUL_STALE_REREADS: &str = "switchyard_consul_stale_rereads_total";
pub const CONSUL_TOKEN_REFUSED: &str = "switchyard_consul_token_refused";
pub const CONSUL_ACL_REFUSALS: &str = "switchyard_consul_acl_refusals_total";
pub const SNAPSHOTS: &str = "switchyard_snapshots_published_total";
pub const ROUTES: &str = "switchyard_routes";
pub const ROUTE_REJECTED: &str = "switchyard_route_rejected_total";
pub const AUTH_FAILURES: &str = "switchyard_auth_failures_total";
pub const AUTH_FAILURE_BUDGET_EVICTIONS: &str = "switchyard_auth_failure_budget_evictions_total";
pub const AUTH_REFUSALS_HELD: &str = "switchyard_auth_refusals_held";
pub const RATE_LIMITED: &str = "switchyard_rate_limited_total";
pub const IP_DENIED: &str = "switchyard_ip_denied_total";
pub const CORS_PREFLIGHTS: &str = "switchyard_cors_preflights_total";
pub const RATE_LIMIT_KEYS: &str = "switchyard_rate_limit_keys";
pub const RATE_LIMIT_EVICTIONS: &str = "switchyard_rate_limit_evictions_total";
pub const RATE_LIMIT_STORE_UP: &str = "switchyard_rate_limit_store_up";
pub const RATE_LIMIT_STORE_FALLBACKS: &str = "switchyard_rate_limit_store_fallbacks_total";
pub const TLS_RELOADS: &str = "switchyard_tls_reloads_total";
pub const JWKS_FETCHES: &str = "switchyard_jwks_fetches_total";
pub const CONNECTIONS: &str = "switchyard_connections_open";
pub const RETRY_BUDGET_EXHAUSTED: &str = "switchyard_retry_budget_exhausted_total";
pub const CIRCUIT_BREAKER_REFUSED: &str = "switchyard_circuit_breaker_refused_total";
pub const MIRROR_REQUESTS: &str = "switchyard_mirror_requests_total";
pub const ACCESS_LOG_DROPPED: &str = "switchyard_access_log_dropped_total";
pub const OTLP_SPANS_EXPORTED: &str = "switchyard_otlp_spans_exported_total";
pub const OTLP_SPANS_DROPPED: &str = "switchyard_otlp_spans_dropped_total";

/// Statuses with their own label value; others are counted by class (`2xx`, ...).
const STATUS_LABELS: [(u16, &str); 17] = [
    (101, "101"),
    (200, "200"),
    (201, "201"),
    (204, "204"),
    (301, "301"),
    (302, "302"),
    (304, "304"),
    (400, "400"),
    (401, "401"),
    (403, "403"),
    (404, "404"),
    (413, "413"),
    (429, "429"),
    (500, "500"),
    (502, "502"),
    (503, "503"),
    (504, "504"),
];
const CLASS_LABELS: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// The request counters and latency histogram of one route, registered on first use
/// and then reached without a registry lookup: the request path only indexes an array.
pub struct RouteMetrics {
    route: String,
    service: String,
    requests: [OnceLock<Counter>; STATUS_LABELS.len() + CLASS_LABELS.len()],
    duration: Arc<DurationHistogram>,
    /// The recent-traffic counters the dashboard's per-route rates and charts come from.
    pub traffic: crate::traffic::TrafficCounters,
}

impl std::fmt::Debug for RouteMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RouteMetrics")
            .field("route", &self.route)
            .finish_non_exhaustive()
    }
}

impl RouteMetrics {
    pub fn new(route: &str, service: &str) -> RouteMetrics {
        RouteMetrics {
            route: route.to_string(),
            service: service.to_string(),
            requests: Default::default(),
            duration: duration_histogram(route),
            traffic: Default::default(),
        }
    }

    /// Counts one answered request and its duration; `by_gateway`: the gateway answered
    /// itself with an error (refusal, no instance, upstream failure or timeout).
    pub fn record(&self, status: u16, elapsed: std::time::Duration, by_gateway: bool) {
        // In u64 (as_micros is u128 arithmetic): this runs once per request.
        let micros = elapsed
            .as_secs()
            .saturating_mul(1_000_000)
            .saturating_add(u64::from(elapsed.subsec_micros()));
        self.traffic.record(status, micros, by_gateway);
        let slot = STATUS_LABELS
            .iter()
            .position(|(s, _)| *s == status)
            .unwrap_or_else(|| STATUS_LABELS.len() + (status / 100).clamp(1, 5) as usize - 1);
        let label = STATUS_LABELS
            .get(slot)
            .map(|(_, l)| *l)
            .unwrap_or_else(|| CLASS_LABELS[slot - STATUS_LABELS.len()]);
        self.requests[slot]
            .get_or_init(|| {
                metrics::counter!(REQUESTS, "route" => self.route.clone(),
                    "status" => label, "service" => self.service.clone())
            })
            .increment(1);
        self.duration.record(micros);
    }
}

/// Latency buckets: sub-millisecond loopback up to slow upstreams, in microseconds and as
/// the `le` labels (seconds) they are rendered with.
const LATENCY_BOUNDS_MICROS: [u64; 15] = [
    500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000,
    2_500_000, 5_000_000, 10_000_000, 30_000_000,
];
const LATENCY_LE: [&str; 15] = [
    "0.0005", "0.001", "0.0025", "0.005", "0.01", "0.025", "0.05", "0.1", "0.25", "0.5", "1",
    "2.5", "5", "10", "30",
];

/// A route's request-duration histogram, kept here rather than by the recorder, which
/// buffers every sample until upkeep folds it in (about 240 instructions a request, a
/// hundredth of all the gateway does for one); here a sample is a bucket search and two
/// relaxed adds. Rendered after the recorder's metrics, in the same exposition format.
/// One per route name for the life of the process, as the recorder kept its series.
#[derive(Debug)]
pub struct DurationHistogram {
    /// Samples per bucket (not cumulative); the last one is above every bound.
    buckets: [AtomicU64; LATENCY_BOUNDS_MICROS.len() + 1],
    sum_micros: AtomicU64,
}

impl DurationHistogram {
    fn new() -> DurationHistogram {
        DurationHistogram {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            sum_micros: AtomicU64::new(0),
        }
    }

    #[inline]
    fn record(&self, micros: u64) {
        let i = LATENCY_BOUNDS_MICROS
            .iter()
            .position(|&bound| micros <= bound)
            .unwrap_or(LATENCY_BOUNDS_MICROS.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum_micros.fetch_add(micros, Ordering::Relaxed);
    }

    /// Appends the `_bucket`, `_sum` and `_count` lines of one route; nothing before its
    /// first sample.
    fn render_into(&self, route: &str, out: &mut String) {
        let counts: Vec<u64> = self
            .buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect();
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return;
        }
        let route = escape_label(route);
        let mut cumulative = 0;
        for (i, count) in counts.iter().enumerate() {
            cumulative += count;
            let le = LATENCY_LE.get(i).copied().unwrap_or("+Inf");
            let _ = writeln!(
                out,
                "{REQUEST_DURATION}_bucket{{route=\"{route}\",le=\"{le}\"}} {cumulative}"
            );
        }
        let sum = self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{REQUEST_DURATION}_sum{{route=\"{route}\"}} {sum}");
        let _ = writeln!(out, "{REQUEST_DURATION}_count{{route=\"{route}\"}} {total}");
    }
}

/// Every route's duration histogram, by route name.
fn durations() -> &'static Mutex<BTreeMap<String, Arc<DurationHistogram>>> {
    static DURATIONS: OnceLock<Mutex<BTreeMap<String, Arc<DurationHistogram>>>> = OnceLock::new();
    DURATIONS.get_or_init(Mutex::default)
}

/// The histogram of `route`, the same one for every snapshot that has the route.
fn duration_histogram(route: &str) -> Arc<DurationHistogram> {
    let mut all = durations().lock().unwrap_or_else(PoisonError::into_inner);
    all.entry(route.to_string())
        .or_insert_with(|| Arc::new(DurationHistogram::new()))
        .clone()
}

/// The request-duration histograms in Prometheus text.
fn render_durations(out: &mut String) {
    let all = durations().lock().unwrap_or_else(PoisonError::into_inner);
    let start = out.len();
    for (route, histogram) in all.iter() {
        histogram.render_into(route, out);
    }
    if out.len() > start {
        let mut head = String::new();
        let _ = writeln!(
            head,
            "# HELP {REQUEST_DURATION} Time from request head to the end of the response body, by route.\n# TYPE {REQUEST_DURATION} histogram"
        );
        out.insert_str(start, &head);
    }
}

/// A label value as the exposition format quotes it.
fn escape_label(value: &str) -> std::borrow::Cow<'_, str> {
    if !value.contains(['\\', '"', '\n']) {
        return value.into();
    }
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
        .into()
}

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Installs the global recorder on first use and returns the handle that renders it.
/// `None` when another recorder was installed first (metrics then go there).
pub fn handle() -> Option<&'static PrometheusHandle> {
    HANDLE
        .get_or_init(|| match PrometheusBuilder::new().install_recorder() {
            Ok(h) => {
                describe();
                start_upkeep(h.clone());
                Some(h)
            }
            Err(e) => {
                tracing::warn!(error = %e, "metrics recorder not installed");
                None
            }
        })
        .as_ref()
}

/// How often recorded histogram samples are folded into their buckets.
const UPKEEP: std::time::Duration = std::time::Duration::from_secs(1);

/// The recorder buffers every histogram sample until upkeep folds it into the buckets;
/// left to `/metrics` scrapes alone, that buffer grows by ~16 bytes per request for as
/// long as nobody scrapes (22 MB in 30 s of benchmark load). A thread of its own, since
/// the recorder is process-wide and outlives any runtime.
fn start_upkeep(handle: PrometheusHandle) {
    let spawned = std::thread::Builder::new()
        .name("metrics-upkeep".into())
        .spawn(move || loop {
            std::thread::sleep(UPKEEP);
            handle.run_upkeep();
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "metrics upkeep thread not started; histograms grow until scraped");
    }
}

/// The Prometheus text exposition of every metric recorded so far.
pub fn render() -> String {
    match handle() {
        Some(h) => {
            h.run_upkeep();
            let mut text = h.render();
            if !text.is_empty() && !text.ends_with('\n') {
                text.push('\n');
            }
            render_durations(&mut text);
            text
        }
        None => String::new(),
    }
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, Unit};
    describe_counter!(REQUESTS, "Requests answered, by route, status and service.");
    describe_counter!(
        UPSTREAM_ERRORS,
        "Failed upstream tries, by service and kind (connect, reset, timeout)."
    );
    describe_counter!(
        UPSTREAM_CONNECTS,
        "HTTP/1.1 connections opened to instances (a high rate means keep-alive is not working)."
    );
    describe_counter!(RETRIES, "Retries sent to another instance, by route.");
    describe_counter!(EJECTIONS, "Instances ejected by passive health checking.");
    describe_counter!(WATCH_ERRORS, "Failed Consul blocking queries, by watch.");
    describe_gauge!(
        DATA_AGE,
        Unit::Seconds,
        "Staleness of each Consul watch: 0 while its blocking query is healthy, else seconds since Consul last answered it."
    );
    describe_gauge!(
        CONSUL_AGENT_ACTIVE,
        "1 for the Consul agent address reads go to, 0 for the other configured ones."
    );
    describe_counter!(
        CONSUL_AGENT_CHANGES,
        "Moves between Consul agent addresses (failover and failback), by from and to."
    );
    describe_gauge!(
        CONSUL_KNOWN_LEADER,
        "X-Consul-KnownLeader of the last answer from each agent (0: the answering server knew no leader)."
    );
    describe_gauge!(
        CONSUL_LAST_CONTACT,
        Unit::Seconds,
        "X-Consul-LastContact of the last answer from each agent: how long since its server heard from the leader."
    );
    describe_counter!(
        CONSUL_STALE_REREADS,
        "Stale reads answered by a server lagging more than consul.max_stale_s, read again from the leader."
    );
    describe_gauge!(
        CONSUL_TOKEN_REFUSED,
        "1 while Consul refuses the ACL token (403: missing, expired, revoked or lacking a permission)."
    );
    describe_counter!(
        CONSUL_ACL_REFUSALS,
        "Consul reads refused with 403 (ACL token problem, not an outage), by watch."
    );
    describe_counter!(SNAPSHOTS, "Routing snapshots published.");
    describe_gauge!(ROUTES, "Routes in the live table.");
    describe_counter!(ROUTE_REJECTED, "Route documents rejected, by key.");
    describe_counter!(AUTH_FAILURES, "Requests refused by edge auth, by reason.");
    describe_counter!(
        AUTH_FAILURE_BUDGET_EVICTIONS,
        "Client addresses dropped from the failed-verification budget before it refilled (max_clients reached)."
    );
    describe_gauge!(
        AUTH_REFUSALS_HELD,
        "Refusals of a spent failure budget being held before they are sent."
    );
    describe_counter!(RATE_LIMITED, "Requests refused by a rate limit, by route.");
    describe_counter!(IP_DENIED, "Requests refused by IP rules, by route.");
    describe_counter!(
        CORS_PREFLIGHTS,
        "CORS preflights answered at the gateway, by result."
    );
    describe_gauge!(
        RATE_LIMIT_KEYS,
        "Rate-limit keys held (buckets still refilling), all routes."
    );
    describe_counter!(
        RATE_LIMIT_EVICTIONS,
        "Rate-limit keys evicted before refilling because a route reached max_keys."
    );
    describe_gauge!(
        RATE_LIMIT_STORE_UP,
        "1 while the shared rate-limit store (Redis) answers within the budget, 0 while cluster-scope limits fall back."
    );
    describe_counter!(
        RATE_LIMIT_STORE_FALLBACKS,
        "Cluster-scope rate-limit decisions made without Redis (slow or down), by on_store_error."
    );
    describe_counter!(TLS_RELOADS, "Certificate reloads, by result.");
    describe_counter!(JWKS_FETCHES, "JWKS fetches, by result.");
    describe_gauge!(CONNECTIONS, "Client connections open.");
    describe_counter!(
        CIRCUIT_BREAKER_REFUSED,
        "Requests refused by a route's circuit breaker, by service and reason."
    );
    describe_counter!(
        MIRROR_REQUESTS,
        "Mirrored request copies, by mirror service and result."
    );
    describe_counter!(
        ACCESS_LOG_DROPPED,
        "Access-log lines dropped because the log target fell behind (a thread's buffer was full)."
    );
    describe_counter!(
        RETRY_BUDGET_EXHAUSTED,
        "Retries not sent because the retry budget was spent."
    );
    describe_counter!(
        OTLP_SPANS_EXPORTED,
        "Request spans the OTLP collector accepted."
    );
    describe_counter!(
        OTLP_SPANS_DROPPED,
        "Request spans not exported, by reason: queue_full (the export queue was full), \
         export_failed (the collector failed or timed out), rejected (it refused them), \
         shutdown."
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn route_metrics_label_exact_statuses_and_classes() {
        assert!(handle().is_some());
        let m = RouteMetrics::new("rm-test", "svc");
        let ms = std::time::Duration::from_millis;
        m.record(200, ms(1), false);
        m.record(200, ms(2), false);
        m.record(418, ms(1), false);
        m.record(599, ms(1), true);
        let text = render();
        let line = |status: &str| {
            text.lines()
                .find(|l| {
                    l.starts_with("switchyard_requests_total")
                        && l.contains("route=\"rm-test\"")
                        && l.contains(&format!("status=\"{status}\""))
                })
                .map(|l| l.rsplit(' ').next().unwrap_or("").to_string())
        };
        assert_eq!(line("200").as_deref(), Some("2"), "{text}");
        let duration = |suffix: &str, le: Option<&str>| {
            text.lines()
                .find(|l| {
                    l.starts_with(&format!("switchyard_request_duration_seconds_{suffix}{{"))
                        && l.contains("route=\"rm-test\"")
                        && le.is_none_or(|le| l.contains(&format!("le=\"{le}\"")))
                })
                .map(|l| l.rsplit(' ').next().unwrap_or("").to_string())
        };
        assert_eq!(
            duration("bucket", Some("0.0005")).as_deref(),
            Some("0"),
            "{text}"
        );
        assert_eq!(duration("bucket", Some("0.001")).as_deref(), Some("3"));
        assert_eq!(duration("bucket", Some("0.0025")).as_deref(), Some("4"));
        assert_eq!(duration("bucket", Some("+Inf")).as_deref(), Some("4"));
        assert_eq!(duration("count", None).as_deref(), Some("4"));
        assert_eq!(duration("sum", None).as_deref(), Some("0.005"));
        assert_eq!(
            text.matches("# TYPE switchyard_request_duration_seconds histogram")
                .count(),
            1
        );
        assert_eq!(line("4xx").as_deref(), Some("1"));
        assert_eq!(line("5xx").as_deref(), Some("1"));
    }

    #[test]
    fn recorded_counters_render_as_prometheus_text() {
        assert!(handle().is_some());
        metrics::counter!(SNAPSHOTS).increment(3);
        let text = render();
        assert!(
            text.contains("# TYPE switchyard_snapshots_published_total counter"),
            "{text}"
        );
        assert!(text
            .lines()
            .any(|l| l.starts_with("switchyard_snapshots_published_total ")));
    }
}
