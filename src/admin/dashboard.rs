//! The dashboard: one page of hand-written HTML, CSS and JS embedded in the binary (no
//! CDN, no build step, works offline), and `/dashboard.json`, everything it shows in one
//! answer that the page polls every second. `switchyard status` reads the same JSON.
//!
//! The static files hold no data and are served without the admin token (a browser
//! cannot send a header on navigation); the page asks for the token when
//! `/dashboard.json` answers 401 and keeps it in `sessionStorage`. The page renders every
//! value from Consul as text (never as HTML): route names and errors come from KV.

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};
use http_body_util::Full;
use serde_json::{json, Value};

use std::sync::Arc;

use super::Admin;
use crate::routing::Route;
use crate::shutdown::Shutdown;
use crate::state::State;
use crate::traffic::{Sampled, SeriesSpan, TrafficHistory, SAMPLE_EVERY};

const INDEX_HTML: &str = include_str!("assets/index.html");
const APP_CSS: &str = include_str!("assets/app.css");
const APP_JS: &str = include_str!("assets/app.js");

/// Only its own scripts, styles and fetches; nothing framed, nothing inline.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
     connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// The page and its files, by path; `None` for every other path.
pub fn asset(path: &str) -> Option<Response<Full<Bytes>>> {
    let (body, content_type) = match path {
        "/" | "/index.html" => (INDEX_HTML, "text/html; charset=utf-8"),
        "/app.css" => (APP_CSS, "text/css; charset=utf-8"),
        "/app.js" => (APP_JS, "text/javascript; charset=utf-8"),
        _ => return None,
    };
    let resp = Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, content_type)
        .header(header::CACHE_CONTROL, "no-store")
        .header(header::CONTENT_SECURITY_POLICY, CSP)
        .header(header::X_CONTENT_TYPE_OPTIONS, "nosniff")
        .header(header::REFERRER_POLICY, "no-referrer")
        .header(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"))
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .unwrap_or_default();
    Some(resp)
}

/// Samples the live table's routes into `history` once a second until `shutdown`.
pub async fn keep_traffic_history(
    state: Arc<State>,
    history: Arc<TrafficHistory>,
    shutdown: Shutdown,
) {
    let mut tick = tokio::time::interval(SAMPLE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last = std::time::Instant::now();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.wait() => return,
        }
        let now = std::time::Instant::now();
        let snapshot = state.load();
        let routes = snapshot
            .table
            .routes()
            .iter()
            .map(|r| Sampled {
                name: &r.name,
                counters: &r.metrics.traffic,
                owner: r.clone(),
            })
            .collect();
        history.sample(routes, crate::traffic::unix_ms(), now - last);
        last = now;
    }
}

/// The ring `/dashboard.json` draws, from its query: none (the last minute, per second),
/// `series=1s`, `series=10s` (the last 10 minutes) or `series=none` (summaries only, as
/// `switchyard status` asks). Anything else is refused.
pub fn series_of(query: Option<&str>) -> Option<SeriesSpan> {
    match query {
        None | Some("series=1s") => Some(SeriesSpan::PerSecond),
        Some("series=10s") => Some(SeriesSpan::PerTenSeconds),
        Some("series=none") => Some(SeriesSpan::None),
        Some(_) => None,
    }
}

/// Everything the dashboard shows, read once from the current snapshot and view.
pub fn data(admin: &Admin, series: SeriesSpan) -> Value {
    let snap = admin.state.load();
    let view = admin.control.view();
    let mut routes = super::routes_of(&snap, &view);
    if let Some(list) = routes["routes"].as_array_mut() {
        for (r, route) in list.iter_mut().zip(snap.table.routes()) {
            r["match_headers"] = json!(route
                .headers
                .iter()
                .map(|(n, _)| n.as_str())
                .collect::<Vec<_>>());
            r["auth"] = auth_of(route);
            r["policies"] = json!(policies_of(route));
            r["traffic"] = json!(admin.traffic.route(&route.name, series));
        }
    }
    let upstreams = super::upstreams_of(admin, &snap, &view);
    let data_age = admin.control.data_age();
    let stale = data_age.is_some_and(|a| a > admin.stale_after) || !admin.control.has_snapshot();
    let watches: Vec<Value> = view
        .routes_watch
        .iter()
        .chain(view.tags_watch.iter())
        .chain(view.health_watches.values())
        .map(|w| {
            json!({
                "name": w.report().name,
                "data_age_s": w.data_age().map(|a| a.as_secs_f64()),
                "last_contact_s": w.last_contact().map(|a| a.as_secs_f64()),
                "consecutive_errors": w.consecutive_errors(),
                "last_error": w.last_error(),
            })
        })
        .collect();
    let last_contact_s = watches
        .iter()
        .filter_map(|w| w["last_contact_s"].as_f64())
        .reduce(f64::min);
    let client = admin.consul.as_ref().map(|c| c.report());
    let (version, published) = admin.control.last_publish().unzip();
    json!({
        "generated_at_unix_ms": crate::traffic::unix_ms(),
        "gateway": {"version": env!("CARGO_PKG_VERSION")},
        "ready": admin.control.readiness(snap.version),
        "snapshot": {
            "version": version.unwrap_or(snap.version),
            "published_at_unix_ms": published,
            "source": view.source,
        },
        "consul": {
            "address": view.consul_address,
            "agents": client.as_ref().map(|c| &c.agents),
            "consistency": client.as_ref().map(|c| c.consistency),
            "token": client.as_ref().map(|c| &c.token),
            "last_contact_s": last_contact_s,
            "data_age_s": data_age.map(|a| a.as_secs_f64()),
            "stale_after_s": admin.stale_after.as_secs_f64(),
            "stale": stale,
            "watches": watches,
        },
        "routes": routes["routes"],
        "rejected": routes["rejected"],
        "conflicts": routes["conflicts"],
        "services": upstreams["services"],
        "auth": super::auth(admin),
    })
}

/// What a route asks of callers: providers, API keys, scopes. Names only.
fn auth_of(route: &Route) -> Value {
    let a = &route.spec.auth;
    if a.jwt.is_empty() && !a.api_key {
        return Value::Null;
    }
    json!({"jwt": a.jwt, "api_key": a.api_key, "scopes": a.scopes})
}

/// One short line per policy the route applies (what an operator scans for).
fn policies_of(route: &Route) -> Vec<String> {
    let s = &route.spec;
    let mut out = Vec::new();
    if let Some(r) = &s.rate_limit {
        out.push(format!(
            "rate limit {}/s burst {} by {}",
            r.per_second, r.burst, r.key
        ));
    }
    if !s.ip_allow.is_empty() {
        out.push(format!("ip allow: {}", join(&s.ip_allow)));
    }
    if !s.ip_deny.is_empty() {
        out.push(format!("ip deny: {}", join(&s.ip_deny)));
    }
    if let Some(c) = &s.cors {
        out.push(format!("cors: {}", c.origins.join(", ")));
    }
    if let Some(a) = &s.upstream_assertion {
        out.push(format!("upstream assertion in {}", a.header));
    }
    if let Some(b) = &s.circuit_breaker {
        out.push(format!(
            "circuit breaker {} requests / {} pending",
            b.max_requests, b.max_pending
        ));
    }
    if let Some(m) = &route.spec.mirror {
        out.push(format!("mirror to {}", m.service));
    }
    if s.max_body_bytes.is_some() || s.max_headers.is_some() || s.max_url_bytes.is_some() {
        out.push("request limits".into());
    }
    if s.upstream_tls {
        out.push("upstream TLS".into());
    }
    out
}

fn join(nets: &[ipnet::IpNet]) -> String {
    nets.iter()
        .map(|n| n.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}
