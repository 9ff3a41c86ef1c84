//! Every metric name, described in one place, and the Prometheus renderer behind `/metrics`.
//!
//! Modules record through the `metrics` macros with the names below; the recorder is
//! process-global (installed once), so several gateways in one test process share it.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

pub const REQUESTS: &str = "switchyard_requests_total";
pub const REQUEST_DURATION: &str = "switchyard_request_duration_seconds";
pub const UPSTREAM_ERRORS: &str = "switchyard_upstream_errors_total";
pub const RETRIES: &str = "switchyard_retries_total";
pub const EJECTIONS: &str = "switchyard_ejections_total";
pub const WATCH_ERRORS: &str = "switchyard_consul_watch_errors_total";
pub const DATA_AGE: &str = "switchyard_consul_data_age_seconds";
pub const SNAPSHOTS: &str = "switchyard_snapshots_published_total";
pub const ROUTES: &str = "switchyard_routes";
pub const ROUTE_REJECTED: &str = "switchyard_route_rejected_total";
pub const AUTH_FAILURES: &str = "switchyard_auth_failures_total";
pub const RATE_LIMITED: &str = "switchyard_rate_limited_total";
pub const IP_DENIED: &str = "switchyard_ip_denied_total";
pub const CORS_PREFLIGHTS: &str = "switchyard_cors_preflights_total";
pub const RATE_LIMIT_KEYS: &str = "switchyard_rate_limit_keys";
pub const RATE_LIMIT_EVICTIONS: &str = "switchyard_rate_limit_evictions_total";
pub const TLS_RELOADS: &str = "switchyard_tls_reloads_total";
pub const JWKS_FETCHES: &str = "switchyard_jwks_fetches_total";
pub const CONNECTIONS: &str = "switchyard_connections_open";
pub const RETRY_BUDGET_EXHAUSTED: &str = "switchyard_retry_budget_exhausted_total";

/// Latency buckets in seconds: sub-millisecond loopback up to slow upstreams.
const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Installs the global recorder on first use and returns the handle that renders it.
/// `None` when another recorder was installed first (metrics then go there).
pub fn handle() -> Option<&'static PrometheusHandle> {
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
                .ok()?;
            match builder.install_recorder() {
                Ok(h) => {
                    describe();
                    Some(h)
                }
                Err(e) => {
                    tracing::warn!(error = %e, "metrics recorder not installed");
                    None
                }
            }
        })
        .as_ref()
}

/// The Prometheus text exposition of every metric recorded so far.
pub fn render() -> String {
    match handle() {
        Some(h) => {
            h.run_upkeep();
            h.render()
        }
        None => String::new(),
    }
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(REQUESTS, "Requests answered, by route, status and service.");
    describe_histogram!(
        REQUEST_DURATION,
        Unit::Seconds,
        "Time from request head to the end of the response body, by route."
    );
    describe_counter!(
        UPSTREAM_ERRORS,
        "Failed upstream tries, by service and kind (connect, reset, timeout)."
    );
    describe_counter!(RETRIES, "Retries sent to another instance, by route.");
    describe_counter!(EJECTIONS, "Instances ejected by passive health checking.");
    describe_counter!(WATCH_ERRORS, "Failed Consul blocking queries, by watch.");
    describe_gauge!(
        DATA_AGE,
        Unit::Seconds,
        "Staleness of each Consul watch: 0 while its blocking query is healthy, else seconds since Consul last answered it."
    );
    describe_counter!(SNAPSHOTS, "Routing snapshots published.");
    describe_gauge!(ROUTES, "Routes in the live table.");
    describe_counter!(ROUTE_REJECTED, "Route documents rejected, by key.");
    describe_counter!(AUTH_FAILURES, "Requests refused by edge auth, by reason.");
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
    describe_counter!(TLS_RELOADS, "Certificate reloads, by result.");
    describe_counter!(JWKS_FETCHES, "JWKS fetches, by result.");
    describe_gauge!(CONNECTIONS, "Client connections open.");
    describe_counter!(
        RETRY_BUDGET_EXHAUSTED,
        "Retries not sent because the retry budget was spent."
    );
}

#[cfg(test)]
mod tests {
    use super::*;

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
