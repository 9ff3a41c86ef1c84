//! The data plane's counters asserted end to end: real requests through the proxy port,
//! then `/metrics` scraped from the admin listener, parsed as Prometheus text, and each
//! counter compared before and after with the exact number of events the test caused
//! (retries, ejections, auth failures, rate-limit and IP refusals, CORS preflights, JWKS
//! fetches). TLS reloads are asserted in `proxy_tls.rs`, retry-budget refusals in
//! `balance.rs`, requests, snapshots and watch errors in `ops.rs`.
//!
//! The recorder is process-wide and some counters carry no label a test can make its own
//! (`reason`, `result`), so the tests of this file run one at a time.

mod support;

use serde_json::{json, Value};
use support::tokens::{self, claims, JwksServer, AUDIENCE, ISSUER};
use support::{eventually, unique, Env, DEADLINE};
use tokio::sync::Mutex;

static ONE_AT_A_TIME: Mutex<()> = Mutex::const_new(());

async fn env(upstreams: usize) -> Env {
    Env::start("metrics", upstreams, |_| {}).await
}

/// The samples of metric `name` labelled `key="value"`, summed, from `/metrics`.
async fn metric(env: &Env, name: &str, key: &str, value: &str) -> f64 {
    env.gw.metric(name, &[(key, value)]).await
}

#[tokio::test]
async fn each_retry_sent_is_counted_once_for_its_route() {
    let _one = ONE_AT_A_TIME.lock().await;
    let env = env(2).await;
    let name = unique("retried");
    env.route(
        &name,
        "/api",
        json!({"retry": {"attempts": 1, "on_status": [503]}, "outlier": {"consecutive_failures": 0}}),
    )
    .await;
    let retries = || metric(&env, "switchyard_retries_total", "route", &name);
    let before = retries().await;
    env.upstreams[0].set_failing(true);
    for _ in 0..10 {
        assert_eq!(env.get("/api/x").await.status(), 200);
    }
    // Every try at the failing instance was a first try answered 503 and retried on the
    // healthy one, which answered all ten.
    let failed_first_tries = env.upstreams[0].hits();
    assert!(
        failed_first_tries >= 1,
        "round robin reached the failing instance"
    );
    assert_eq!(env.upstreams[1].hits(), 10);
    assert_eq!(retries().await - before, failed_first_tries as f64);

    env.stop().await;
}

#[tokio::test]
async fn an_ejection_is_counted_once_for_the_instances_service() {
    let _one = ONE_AT_A_TIME.lock().await;
    let env = env(2).await;
    env.route(
        "api",
        "/api",
        json!({"retry": {"attempts": 1, "on_status": [503]},
               "outlier": {"consecutive_failures": 2, "base_ejection_ms": 120_000, "max_ejected_percent": 50}}),
    )
    .await;
    let ejections = || metric(&env, "switchyard_ejections_total", "service", &env.service);
    assert_eq!(ejections().await, 0.0);
    let ids = env.ids();
    env.upstreams[0].set_failing(true);
    eventually(DEADLINE, "the failing instance is ejected", || async {
        assert_eq!(env.get("/api/x").await.status(), 200);
        env.gw.is_ejected(&env.service, &ids[0]).await.then_some(())
    })
    .await;
    assert_eq!(ejections().await, 1.0);
    // Ejected for two minutes: no traffic, so no second ejection.
    for _ in 0..10 {
        assert_eq!(env.get("/api/x").await.status(), 200);
    }
    assert_eq!(ejections().await, 1.0);
    assert!(!env.gw.is_ejected(&env.service, &ids[1]).await);
    env.stop().await;
}

#[tokio::test]
async fn auth_failures_are_counted_by_reason_and_successes_not_at_all() {
    let _one = ONE_AT_A_TIME.lock().await;
    let env = env(1).await;
    env.route("keys", "/keys", json!({"auth": {"api_key": true}}))
        .await;
    let good = switchyard::auth::api_key::mint("billing", vec![], None);
    let mut off = switchyard::auth::api_key::mint("mallory", vec![], None);
    off.doc.disabled = true;
    // The disabled key first: once the good one is in, both are.
    for k in [&off, &good] {
        env.consul
            .put_kv(
                &format!("{}apikeys/{}", env.gw.kv_prefix, k.id),
                &serde_json::to_string(&k.doc).unwrap(),
            )
            .await;
    }
    eventually(DEADLINE, "the API keys are loaded", || {
        let req = env.get_with("/keys/x", "x-api-key", &good.key);
        async move { (req.send().await.ok()?.status() == 200).then_some(()) }
    })
    .await;

    let failures = |reason: &'static str| {
        let with: Vec<(&str, &str)> = if reason.is_empty() {
            vec![]
        } else {
            vec![("reason", reason)]
        };
        let gw = &env.gw;
        async move { gw.metric("switchyard_auth_failures_total", &with).await }
    };
    let reasons = ["missing", "unknown_api_key", "disabled_api_key", ""];
    let mut before = Vec::new();
    for r in reasons {
        before.push(failures(r).await);
    }
    for _ in 0..2 {
        env.refused("no key", env.http.get(env.url("/keys/x")), 401)
            .await;
    }
    for _ in 0..3 {
        env.refused(
            "unknown key",
            env.get_with("/keys/x", "x-api-key", "sy_not-a-key-anyone-has"),
            401,
        )
        .await;
    }
    env.refused(
        "disabled key",
        env.get_with("/keys/x", "x-api-key", &off.key),
        401,
    )
    .await;
    for _ in 0..2 {
        let resp = env
            .get_with("/keys/x", "x-api-key", &good.key)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
    }
    let mut moved = Vec::new();
    for (r, b) in reasons.iter().zip(&before) {
        moved.push((*r, failures(r).await - b));
    }
    assert_eq!(
        moved,
        [
            ("missing", 2.0),
            ("unknown_api_key", 3.0),
            ("disabled_api_key", 1.0),
            ("", 6.0)
        ],
        "by reason, then all reasons"
    );
    env.stop().await;
}

#[tokio::test]
async fn rate_limit_refusals_are_counted_for_their_route() {
    let _one = ONE_AT_A_TIME.lock().await;
    let env = env(1).await;
    let name = unique("limited");
    env.route(
        &name,
        "/limited",
        json!({"rate_limit": {"per_second": 0.5, "burst": 3}}),
    )
    .await;
    let limited = || metric(&env, "switchyard_rate_limited_total", "route", &name);
    let before = limited().await;
    let mut refused = 0;
    for _ in 0..8 {
        match env.get("/limited/x").await.status().as_u16() {
            200 => {}
            429 => refused += 1,
            other => panic!("status {other}"),
        }
    }
    // A burst of 3 and one token per 2 s: most of the eight are refused.
    assert!(refused >= 1, "none of 8 refused");
    assert_eq!(env.hits(), 8 - refused);
    assert_eq!(limited().await - before, refused as f64);
    env.stop().await;
}

#[tokio::test]
async fn ip_denials_are_counted_for_their_route() {
    let _one = ONE_AT_A_TIME.lock().await;
    let env = env(1).await;
    let (denied, open) = (unique("denied"), unique("open"));
    env.route(&denied, "/denied", json!({"ip_deny": ["127.0.0.0/8"]}))
        .await;
    env.route(&open, "/open", json!({"ip_allow": ["127.0.0.1/32"]}))
        .await;
    let count = |route| metric(&env, "switchyard_ip_denied_total", "route", route);
    let before = count(&denied).await;
    for _ in 0..3 {
        env.refused("deny list", env.http.get(env.url("/denied/x")), 403)
            .await;
        assert_eq!(env.get("/open/x").await.status(), 200);
    }
    assert_eq!(count(&denied).await - before, 3.0);
    assert_eq!(count(&open).await, 0.0, "an allowed client is not counted");
    env.stop().await;
}

#[tokio::test]
async fn cors_preflights_are_counted_as_allowed_or_refused() {
    let _one = ONE_AT_A_TIME.lock().await;
    let env = env(1).await;
    env.route(
        "app",
        "/app",
        json!({"cors": {"origins": ["https://app.example.com"], "methods": ["GET", "PUT"]}}),
    )
    .await;
    let preflight = |origin: &str, method: &str| {
        env.http
            .request(reqwest::Method::OPTIONS, env.url("/app/x"))
            .header("origin", origin.to_string())
            .header("access-control-request-method", method.to_string())
    };
    let count = |result| metric(&env, "switchyard_cors_preflights_total", "result", result);
    let (allowed, refused) = (count("allowed").await, count("refused").await);
    for method in ["GET", "PUT"] {
        env.refused("allowed", preflight("https://app.example.com", method), 204)
            .await;
    }
    env.refused(
        "unknown origin",
        preflight("https://evil.example.net", "GET"),
        403,
    )
    .await;
    env.refused(
        "method outside the policy",
        preflight("https://app.example.com", "DELETE"),
        403,
    )
    .await;
    // A request from an allowed origin that is not a preflight is proxied, not counted.
    let resp = env
        .get_with("/app/x", "origin", "https://app.example.com")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(count("allowed").await - allowed, 2.0);
    assert_eq!(count("refused").await - refused, 2.0);
    env.stop().await;
}

/// A KV provider on `jwks`: no routine refresh during the test, early fetches for
/// unknown kids at most once a second.
fn jwks_provider(jwks: &JwksServer) -> Value {
    json!({
        "issuer": ISSUER,
        "audiences": [AUDIENCE],
        "algorithms": ["RS256"],
        "jwks_url": jwks.url(),
        "jwks_refresh_s": 300,
        "jwks_min_refetch_s": 1,
        "jwks_timeout_ms": 1000,
    })
}

#[tokio::test]
async fn jwks_fetches_are_counted_as_the_endpoint_answered_them() {
    let _one = ONE_AT_A_TIME.lock().await;
    let env = env(1).await;
    let fetched = |result| metric(&env, "switchyard_jwks_fetches_total", "result", result);
    let (ok0, err0) = (fetched("ok").await, fetched("error").await);
    let jwks = JwksServer::start(vec![tokens::rsa_jwk(true, "k1")]).await;
    env.consul
        .put_kv(
            &format!("{}jwt/idp", env.gw.kv_prefix),
            &jwks_provider(&jwks).to_string(),
        )
        .await;
    env.route("idp", "/idp", json!({"auth": {"jwt": ["idp"]}}))
        .await;
    let bearer = |kid: &str, key: &str| {
        let token = tokens::rs256_with(key, kid, &claims("alice", json!({})));
        env.get_with("/idp/x", "authorization", &format!("Bearer {token}"))
    };
    eventually(DEADLINE, "a k1 token is accepted", || {
        let req = bearer("k1", tokens::RSA_PRIVATE);
        async move { (req.send().await.ok()?.status() == 200).then_some(()) }
    })
    .await;
    // Every fetch the endpoint served so far was good, and counted so.
    eventually(DEADLINE, "the first fetch counted ok", || async {
        let served = jwks.fetches() as f64;
        let ok = fetched("ok").await - ok0;
        let err = fetched("error").await - err0;
        (served >= 1.0 && ok == served && err == 0.0).then_some(())
    })
    .await;

    // The issuer rotates to k2: a k2 token makes the gateway fetch early, and succeed.
    let ok_before_rotation = fetched("ok").await - ok0;
    jwks.set_keys(vec![tokens::rsa_jwk(false, "k2")]);
    let resp = bearer("k2", tokens::RSA2_PRIVATE).send().await.unwrap();
    assert_eq!(resp.status(), 200, "the early fetch found k2");
    assert_eq!(fetched("ok").await - ok0, ok_before_rotation + 1.0);
    assert_eq!(jwks.fetches() as f64, ok_before_rotation + 1.0);

    // The endpoint breaks: an unknown kid asks for a fetch (once the second since the last
    // one is over), which fails, and the gateway keeps retrying on its own; every one of
    // those fetches is an error, none an ok.
    jwks.break_down();
    let (ok_at_break, served_at_break) = (fetched("ok").await - ok0, jwks.fetches());
    eventually(DEADLINE, "a failed fetch counted", || async {
        let resp = bearer("k3", tokens::RSA2_PRIVATE).send().await.ok()?;
        assert_eq!(resp.status(), 401, "k3 is nobody's key");
        (fetched("error").await - err0 >= 1.0).then_some(())
    })
    .await;
    eventually(
        DEADLINE,
        "every failed fetch counted as an error",
        || async {
            let failed = (jwks.fetches() - served_at_break) as f64;
            let ok = fetched("ok").await - ok0;
            let err = fetched("error").await - err0;
            (failed >= 1.0 && err == failed && ok == ok_at_break).then_some(())
        },
    )
    .await;
    let resp = bearer("k2", tokens::RSA2_PRIVATE).send().await.unwrap();
    assert_eq!(resp.status(), 200, "the last good keys keep serving");
    env.stop().await;
}
