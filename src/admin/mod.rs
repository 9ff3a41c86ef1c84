//! The admin listener: the dashboard (`/`, its assets and `/dashboard.json`, in
//! [`dashboard`]), read-only JSON views of what the gateway believes (`/ready`, `/routes`,
//! `/upstreams`, `/auth`, `/consul`, `/rate_limits`) and its Prometheus metrics (`/metrics`). Every
//! endpoint is one arm of the match in [`respond`]; each view reads the current snapshot
//! and the control-plane view once, never waits on Consul. No view shows a secret (key,
//! hash, token, password): `tests/dashboard.rs` checks every endpoint for the secrets of
//! a test configuration.

pub mod dashboard;
mod token;

pub use token::{AdminToken, TokenFileError};

use std::collections::BTreeSet;
use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use serde_json::{json, Value};
use tokio::net::TcpListener;

use crate::auth::Authenticator;
use crate::consul::{ConsulClient, WatchStatus};
use crate::control::Control;
use crate::discovery;
use crate::policy::Edge;
use crate::routing::HostMatch;
use crate::shutdown::Shutdown;
use crate::state::State;
use crate::traffic::TrafficHistory;

/// Time open admin connections get to finish after shutdown.
const DRAIN: Duration = Duration::from_secs(2);

/// Consul data older than this is shown as stale when `readiness.max_data_age_s` is unset.
pub const DEFAULT_STALE_AFTER: Duration = Duration::from_secs(10);

/// What the admin endpoints read.
#[derive(Debug)]
pub struct Admin {
    pub state: Arc<State>,
    pub control: Arc<Control>,
    /// When set, every endpoint but `/healthz`, `/ready`, `/jwks.json` and the
    /// dashboard's static files (which hold no data) needs `Authorization: Bearer <token>`.
    pub token: Option<AdminToken>,
    /// The public keys of upstream assertions (`[assertion]`), served at `/jwks.json` to
    /// backends without a token: they are public.
    pub jwks: Option<Value>,
    /// Serving JWT providers, API keys and rejected auth documents, for `/auth`.
    pub auth: Option<Arc<Authenticator>>,
    /// The Consul client (agents, consistency, token state), for `/consul`.
    pub consul: Option<ConsulClient>,
    /// Recent traffic per route, for the dashboard.
    pub traffic: Arc<TrafficHistory>,
    /// Consul data older than this is stale (the dashboard's alarm).
    pub stale_after: Duration,
    /// The listener is on a loopback address: without a token, requests must name it by a
    /// loopback IP or `localhost` (see [`host_allowed`]).
    pub loopback_only: bool,
    /// Rate-limit state (the shared store, local buckets), for `/rate_limits`.
    pub edge: Option<Arc<Edge>>,
}

/// Serves the admin API on `listener` until `shutdown` trips.
pub async fn serve(listener: TcpListener, admin: Arc<Admin>, shutdown: Shutdown) {
    let graceful = GracefulShutdown::new();
    let builder = auto::Builder::new(TokioExecutor::new());
    loop {
        let Some((stream, _)) = shutdown.accept(&listener, "admin").await else {
            break;
        };
        let admin = admin.clone();
        let service = service_fn(move |req| {
            let admin = admin.clone();
            async move { Ok::<_, Infallible>(respond(&admin, &req)) }
        });
        let conn = builder
            .serve_connection(TokioIo::new(stream), service)
            .into_owned();
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "admin connection ended with an error");
            }
        });
    }
    drop(listener);
    let _ = tokio::time::timeout(DRAIN, graceful.shutdown()).await;
}

/// The one place that maps a request to a view.
pub fn respond<B>(admin: &Admin, req: &Request<B>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return error(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "the admin API is read-only: use GET",
        );
    }
    if !host_allowed(admin, req) {
        return error(
            StatusCode::FORBIDDEN,
            "forbidden_host",
            "this admin listener answers only requests addressed to a loopback IP or localhost; set admin.token to reach it by another name",
        );
    }
    let path = req.uri().path();
    if let Some(page) = dashboard::asset(path) {
        return page;
    }
    let open = matches!(path, "/healthz" | "/ready" | "/jwks.json");
    if !open && !authorized(admin, req) {
        let mut resp = error(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "admin token required: Authorization: Bearer <token>",
        );
        resp.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            http::HeaderValue::from_static("Bearer realm=\"switchyard-admin\""),
        );
        return resp;
    }
    match path {
        "/dashboard.json" => match dashboard::series_of(req.uri().query()) {
            Some(series) => compact_json(&dashboard::data(admin, series)),
            None => error(
                StatusCode::BAD_REQUEST,
                "bad_request",
                "the query may only be series=1s, series=10s or series=none",
            ),
        },
        "/healthz" => json_response(StatusCode::OK, &json!({"status": "ok"})),
        "/ready" => ready(admin),
        "/routes" => json_response(StatusCode::OK, &routes(admin)),
        "/upstreams" => json_response(StatusCode::OK, &upstreams(admin)),
        "/metrics" => metrics_response(),
        "/auth" => json_response(StatusCode::OK, &auth(admin)),
        "/consul" => json_response(StatusCode::OK, &consul(admin)),
        "/rate_limits" => json_response(StatusCode::OK, &rate_limits(admin)),
        "/jwks.json" => match &admin.jwks {
            Some(jwks) => json_response(StatusCode::OK, jwks),
            None => error(
                StatusCode::NOT_FOUND,
                "not_found",
                "no [assertion] key configured",
            ),
        },
        _ => error(StatusCode::NOT_FOUND, "not_found", "no such admin endpoint"),
    }
}

/// DNS rebinding: a web page whose own name is made to resolve to 127.0.0.1 could read an
/// open loopback admin listener from the operator's browser, as its own origin. Such a
/// request still names the page's domain in `Host`, so a loopback listener without a token
/// answers only requests that name a loopback IP or `localhost` (what SSH tunnels, curl
/// and health checkers send). With a token, the token guards it instead.
fn host_allowed<B>(admin: &Admin, req: &Request<B>) -> bool {
    if !admin.loopback_only || admin.token.is_some() {
        return true;
    }
    let authority = req
        .uri()
        .authority()
        .map(|a| a.host().to_string())
        .or_else(|| {
            req.headers()
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .and_then(|h| h.parse::<http::uri::Authority>().ok())
                .map(|a| a.host().to_string())
        });
    let Some(host) = authority else {
        // HTTP/1.0 without Host: not a browser.
        return req.headers().get(header::HOST).is_none();
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

fn authorized<B>(admin: &Admin, req: &Request<B>) -> bool {
    let Some(token) = &admin.token else {
        return true;
    };
    req.headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|given| token.matches(given))
}

/// An admin error in the project's one shape, `{error, message, request_id}`.
fn error(status: StatusCode, code: &str, message: &str) -> Response<Full<Bytes>> {
    json_response(
        status,
        &json!({
            "error": code,
            "message": message,
            "request_id": uuid::Uuid::new_v4().simple().to_string(),
        }),
    )
}

/// JSON without indentation, for what a page polls every second.
fn compact_json(body: &Value) -> Response<Full<Bytes>> {
    let bytes = serde_json::to_vec(body).unwrap_or_default();
    answer(StatusCode::OK, "application/json", Bytes::from(bytes))
}

/// Serving JWT providers (names only), the API-key count, and every rejected `jwt/` or
/// `apikeys/` document with its error. Never a key, secret or hash.
pub fn auth(admin: &Admin) -> Value {
    match &admin.auth {
        Some(a) => json!({
            "providers": a.provider_names(),
            "api_keys": a.api_key_count(),
            "rejected": a.rejections(),
        }),
        None => json!({"providers": [], "api_keys": 0, "rejected": []}),
    }
}

/// The shared rate-limit store (kind, nodes without credentials, up or down, fallbacks) and
/// the local buckets; `store` is null without `[rate_limit]` Redis settings.
pub fn rate_limits(admin: &Admin) -> Value {
    match &admin.edge {
        Some(edge) => edge.rate_limit_view(),
        None => json!({"store": null}),
    }
}

/// The Consul side: the agents and which one is active, the consistency mode, the token's
/// state (never the token), the age of the stalest data, and every watch with the leader
/// headers of its last answer.
pub fn consul(admin: &Admin) -> Value {
    let view = admin.control.view();
    let watches: Vec<Value> = view
        .routes_watch
        .iter()
        .chain(view.tags_watch.iter())
        .chain(view.health_watches.values())
        .map(|w| serde_json::to_value(w.report()).unwrap_or(Value::Null))
        .collect();
    json!({
        "client": admin.consul.as_ref().map(|c| c.report()),
        "data_age_s": admin.control.data_age().map(|a| a.as_secs_f64()),
        "watches": watches,
    })
}

fn ready(admin: &Admin) -> Response<Full<Bytes>> {
    let r = admin.control.readiness(admin.state.load().version);
    let status = if r.ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    json_response(status, &serde_json::to_value(&r).unwrap_or(Value::Null))
}

/// The live table, every rejected document with its error, and shadowed routes.
pub fn routes(admin: &Admin) -> Value {
    routes_of(&admin.state.load(), &admin.control.view())
}

/// [`routes`] of one snapshot and view; `routes` is in the table's order.
fn routes_of(snap: &crate::state::Snapshot, view: &crate::control::ControlView) -> Value {
    let routes: Vec<Value> = snap
        .table
        .routes()
        .iter()
        .zip(&snap.upstreams)
        .zip(&snap.splits)
        .map(|((r, set), split)| {
            let host = match &r.host {
                HostMatch::Any => None,
                HostMatch::Exact(h) => Some(h.clone()),
                HostMatch::Wildcard(suffix) => Some(format!("*{suffix}")),
            };
            json!({
                "name": r.name,
                "source": crate::routing::fabio::source_of(r),
                "service": r.spec.service,
                "host": host,
                "path_prefix": r.path_prefix,
                "methods": r.methods.iter().map(|m| m.as_str()).collect::<Vec<_>>(),
                "health": r.spec.health,
                "tags": r.spec.tags,
                "upstreams": set.len(),
                "split": split.as_ref().map(|w| split_view(r, w)),
                "redirect": r.spec.redirect,
                "datacenters": (!r.spec.datacenters.is_empty()).then(|| {
                    json!({
                        "failover_order": r.spec.datacenters,
                        "in_use": datacenters_in_use(set, split.as_deref()),
                    })
                }),
                "circuit_breaker": r.spec.circuit_breaker.as_ref().map(|limits| {
                    let services: Vec<Value> = r
                        .services()
                        .map(|service| {
                            let load = snap.loads.get(service);
                            json!({
                                "service": service,
                                "active": load.map(|l| l.active()),
                                "pending": load.map(|l| l.pending()),
                                "refused": load.map(|l| l.refused()),
                            })
                        })
                        .collect();
                    json!({
                        "max_requests": limits.max_requests,
                        "max_pending": limits.max_pending,
                        "services": services,
                    })
                }),
            })
        })
        .collect();
    json!({
        "version": snap.version,
        "source": view.source,
        "routes": routes,
        "rejected": view.rejected,
        "conflicts": snap.table.conflicts(),
    })
}

/// The datacenter each backend of a failover route reads its instances from now.
fn datacenters_in_use(
    set: &crate::discovery::UpstreamSet,
    split: Option<&crate::balance::split::WeightedSets>,
) -> Vec<Option<String>> {
    let dc = |s: &crate::discovery::UpstreamSet| {
        crate::discovery::parse_watch_key(&s.service)
            .1
            .map(str::to_string)
    };
    match split {
        Some(w) => w.shares().iter().map(|s| dc(&s.set)).collect(),
        None => vec![dc(set)],
    }
}

/// A split route's shares: what each selects, its weight, how many instances it has now,
/// and the share of traffic it gets now (per mille; a share without instances gets 0).
fn split_view(route: &crate::routing::Route, split: &crate::balance::split::WeightedSets) -> Value {
    let now = split.effective_per_mille();
    route
        .backends
        .iter()
        .zip(split.shares())
        .zip(now)
        .map(|((b, share), per_mille)| {
            json!({
                "service": b.service,
                "tags": b.tags,
                "weight": b.weight,
                "instances": share.set.len(),
                "share_per_mille": per_mille,
            })
        })
        .collect()
}

/// Per routed service: its instances with health, weight and passive-health state, and
/// how fresh its Consul watch is.
pub fn upstreams(admin: &Admin) -> Value {
    upstreams_of(admin, &admin.state.load(), &admin.control.view())
}

fn upstreams_of(
    admin: &Admin,
    snap: &crate::state::Snapshot,
    view: &crate::control::ControlView,
) -> Value {
    let now = discovery::now_ms();
    let names: BTreeSet<&String> = view
        .services
        .keys()
        .chain(view.health_watches.keys())
        .collect();
    let services: Vec<Value> = names
        .into_iter()
        .map(|service| {
            let stats = snap.stats.get(service);
            let instances: Vec<Value> = view
                .services
                .get(service)
                .map(|list| list.as_slice())
                .unwrap_or_default()
                .iter()
                .map(|i| {
                    let s = stats.and_then(|m| m.get(&i.id));
                    let ejected_for_ms = s
                        .map(|s| s.ejected_until_ms.load(Ordering::Relaxed).saturating_sub(now))
                        .unwrap_or(0);
                    json!({
                        "id": i.id,
                        "address": i.address,
                        "port": i.port,
                        "health": i.health,
                        "weight": i.weight,
                        "tags": i.tags,
                        "ejected": ejected_for_ms > 0,
                        "ejected_for_ms": ejected_for_ms,
                        "consecutive_failures": s.map(|s| s.consecutive_failures.load(Ordering::Relaxed)),
                        "ejections_in_a_row": s.map(|s| s.ejections.load(Ordering::Relaxed)),
                        "in_flight": s.map(|s| s.in_flight.load(Ordering::Relaxed)),
                        "requests_total": s.map(|s| s.requests.load(Ordering::Relaxed)),
                        "failures_total": s.map(|s| s.failures.load(Ordering::Relaxed)),
                    })
                })
                .collect();
            json!({
                "service": service,
                "instances": instances,
                "out_of_service": view.out_of_service.get(service).map(|l| l.as_slice()).unwrap_or_default(),
                "watch": view.health_watches.get(service).map(|w| watch_view(w)),
            })
        })
        .collect();
    json!({
        "version": snap.version,
        "source": view.source,
        "data_age_s": admin.control.data_age().map(|a| a.as_secs_f64()),
        "routes_watch": view.routes_watch.as_deref().map(watch_view),
        "tags_watch": view.tags_watch.as_deref().map(watch_view),
        "services": services,
    })
}

/// How fresh one Consul watch is, and its errors.
fn watch_view(w: &WatchStatus) -> Value {
    json!({
        "data_age_s": w.data_age().map(|a| a.as_secs_f64()),
        "last_contact_s": w.last_contact().map(|a| a.as_secs_f64()),
        "index": w.index(),
        "errors_total": w.errors_total(),
        "consecutive_errors": w.consecutive_errors(),
        "last_error": w.last_error(),
    })
}

fn json_response(status: StatusCode, body: &Value) -> Response<Full<Bytes>> {
    let mut bytes = serde_json::to_vec_pretty(body).unwrap_or_default();
    bytes.push(b'\n');
    answer(status, "application/json", Bytes::from(bytes))
}

/// The Prometheus text exposition format, version 0.0.4.
const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

fn metrics_response() -> Response<Full<Bytes>> {
    answer(
        StatusCode::OK,
        PROMETHEUS_TEXT,
        Bytes::from(crate::metrics::render()),
    )
}

/// Every admin answer: what it shows is true now only, so nothing may cache it.
fn answer(status: StatusCode, content_type: &'static str, body: Bytes) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, content_type)
        .header(header::CACHE_CONTROL, "no-store")
        .body(Full::new(body))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::{Route, RouteSpec};
    use crate::state::Snapshot;
    use std::collections::HashMap;

    fn admin(token: Option<&str>) -> Admin {
        let route = Route::compile(
            "users",
            RouteSpec::from_json(
                br#"{"service":"users","path_prefix":"/users","methods":["GET"]}"#,
            )
            .unwrap(),
        )
        .unwrap();
        let snap = Snapshot::build(4, vec![Arc::new(route)], &HashMap::new(), None);
        let control = Control::new("http://c", None);
        control.published(4);
        Admin {
            state: Arc::new(State::new(snap)),
            control: Arc::new(control),
            token: token.map(AdminToken::fixed),
            jwks: None,
            auth: None,
            consul: None,
            traffic: Arc::default(),
            stale_after: DEFAULT_STALE_AFTER,
            loopback_only: false,
            edge: Some(Arc::new(Edge::default())),
        }
    }

    #[test]
    fn auth_lists_rejected_documents_without_their_secrets() {
        let auth = Authenticator::new(
            crate::auth::AuthSettings::default(),
            "sy/",
            &std::collections::BTreeMap::new(),
        )
        .unwrap();
        let kv = |key: &str, value: &str| -> crate::consul::KvPair {
            serde_json::from_value(json!({
                "Key": key,
                "Value": base64::Engine::encode(&base64::engine::general_purpose::STANDARD, value),
            }))
            .unwrap()
        };
        let good = crate::auth::api_key::mint("billing", vec![], Some("billing-1".into()));
        auth.apply_api_key_docs(&[
            kv(
                "sy/apikeys/billing-1",
                &serde_json::to_string(&good.doc).unwrap(),
            ),
            kv(
                "sy/apikeys/broken",
                r#"{"sha256": "zz-secret-zz", "consumer": "x"}"#,
            ),
        ]);
        let mut a = admin(Some("t"));
        a.auth = Some(Arc::new(auth));
        let req = Request::get("/auth")
            .header("authorization", "Bearer t")
            .body(())
            .unwrap();
        assert_eq!(respond(&a, &req).status(), 200);
        assert_eq!(
            respond(&a, &get("/auth")).status(),
            401,
            "behind the admin token"
        );
        let v = super::auth(&a);
        assert_eq!(v["api_keys"], 1);
        assert_eq!(v["rejected"][0]["key"], "sy/apikeys/broken");
        assert!(v["rejected"][0]["error"]
            .as_str()
            .unwrap()
            .contains("sha256"));
        let text = v.to_string();
        assert!(
            !text.contains("zz-secret-zz") && !text.contains(&good.doc.sha256),
            "{text}"
        );
    }

    fn get(path: &str) -> Request<()> {
        Request::get(path).body(()).unwrap()
    }

    #[test]
    fn routes_lists_the_live_table() {
        let v = routes(&admin(None));
        assert_eq!(v["version"], 4);
        assert_eq!(v["routes"][0]["name"], "users");
        assert_eq!(v["routes"][0]["methods"][0], "GET");
        assert_eq!(v["routes"][0]["upstreams"], 0);
        assert!(v["rejected"].as_array().unwrap().is_empty());
    }

    #[test]
    fn a_token_protects_everything_but_health_and_readiness() {
        let a = admin(Some("s3cret"));
        assert_eq!(respond(&a, &get("/routes")).status(), 401);
        assert_eq!(respond(&a, &get("/ready")).status(), 200);
        assert_eq!(respond(&a, &get("/healthz")).status(), 200);
        let req = Request::get("/routes")
            .header("authorization", "Bearer s3cret")
            .body(())
            .unwrap();
        assert_eq!(respond(&a, &req).status(), 200);
        assert_eq!(respond(&a, &get("/metrics")).status(), 401);
        assert_eq!(respond(&a, &get("/rate_limits")).status(), 401);
    }

    #[test]
    fn rate_limits_show_no_store_without_redis_settings() {
        let v = rate_limits(&admin(None));
        assert_eq!(v["store"], Value::Null);
        assert_eq!(v["local"]["limiters"], 0);
    }

    #[test]
    fn metrics_are_prometheus_text() {
        crate::metrics::handle();
        metrics::counter!(crate::metrics::SNAPSHOTS).increment(1);
        let resp = respond(&admin(None), &get("/metrics"));
        assert_eq!(resp.status(), 200);
        assert!(resp.headers()[header::CONTENT_TYPE]
            .to_str()
            .unwrap()
            .starts_with("text/plain; version=0.0.4"));
    }

    #[test]
    fn jwks_is_public_when_configured() {
        let mut a = admin(Some("s3cret"));
        assert_eq!(respond(&a, &get("/jwks.json")).status(), 404);
        a.jwks = Some(json!({"keys": [{"kty": "OKP", "kid": "gw"}]}));
        let resp = respond(&a, &get("/jwks.json"));
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()[header::CONTENT_TYPE], "application/json");
    }

    #[test]
    fn an_open_loopback_listener_answers_only_loopback_names() {
        fn with_host(a: &Admin, host: &str) -> StatusCode {
            let req = Request::get("/dashboard.json")
                .header("host", host)
                .body(())
                .unwrap();
            respond(a, &req).status()
        }
        let mut a = admin(None);
        a.loopback_only = true;
        for ok in [
            "127.0.0.1:9901",
            "localhost:9901",
            "LOCALHOST",
            "[::1]:9901",
            "127.8.9.10",
        ] {
            assert_eq!(with_host(&a, ok), 200, "{ok}");
        }
        for bad in [
            "evil.example:9901",
            "localhost.evil.example",
            "10.0.0.1:9901",
            "",
            "a b",
        ] {
            assert_eq!(with_host(&a, bad), 403, "{bad}");
        }
        let absolute = Request::get("http://evil.example:9901/routes")
            .body(())
            .unwrap();
        assert_eq!(
            respond(&a, &absolute).status(),
            403,
            "the URI's authority counts"
        );
        assert_eq!(
            respond(&a, &get("/routes")).status(),
            200,
            "no Host: not a browser"
        );
        a.token = Some(AdminToken::fixed("t"));
        let req = Request::get("/routes")
            .header("host", "gw.example:9901")
            .header("authorization", "Bearer t")
            .body(())
            .unwrap();
        assert_eq!(respond(&a, &req).status(), 200, "with a token, any name");
        a.token = None;
        a.loopback_only = false;
        assert_eq!(
            with_host(&a, "gw.example:9901"),
            200,
            "a listener on the network"
        );
    }

    #[test]
    fn the_dashboard_data_takes_only_a_known_series() {
        let a = admin(None);
        let get_json = |path: &str| {
            let resp = respond(&a, &get(path));
            assert_eq!(resp.headers()[header::CONTENT_TYPE], "application/json");
            resp.status()
        };
        for ok in [
            "/dashboard.json",
            "/dashboard.json?series=1s",
            "/dashboard.json?series=10s",
            "/dashboard.json?series=none",
        ] {
            assert_eq!(get_json(ok), 200, "{ok}");
        }
        for bad in [
            "/dashboard.json?series=2s",
            "/dashboard.json?series=1s&x=1",
            "/dashboard.json?",
        ] {
            assert_eq!(get_json(bad), 400, "{bad}");
        }
        let v = super::dashboard::data(&a, crate::traffic::SeriesSpan::None);
        assert_eq!(v["routes"][0]["name"], "users");
        assert_eq!(v["snapshot"]["version"], 4);
        assert_eq!(v["consul"]["stale"], false);
        let page = respond(&a, &get("/"));
        assert_eq!(page.status(), 200);
        assert!(page.headers()[header::CONTENT_SECURITY_POLICY]
            .to_str()
            .unwrap()
            .contains("script-src 'self'"));
    }

    #[test]
    fn writes_and_unknown_paths_are_refused() {
        let a = admin(None);
        let post = Request::post("/routes").body(()).unwrap();
        assert_eq!(respond(&a, &post).status(), 405);
        assert_eq!(respond(&a, &get("/nope")).status(), 404);
    }
}
