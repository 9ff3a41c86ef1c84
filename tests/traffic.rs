//! Traffic management end to end: header rules, host rewrites and redirects, through the
//! dev registry (or a real agent with `CONSUL_HTTP_ADDR`), real upstreams and the gateway
//! on loopback ports.

mod support;

use serde_json::json;
use support::{eventually, route, seen_headers, Env, DEADLINE};

#[tokio::test]
async fn header_rules_and_host_rewrite_shape_what_the_upstream_sees_and_what_the_client_gets() {
    let env = Env::start("traffic", 1, |_| {}).await;
    env.route(
        "rules",
        "/rules",
        json!({
            "request_headers": {
                "set": {"X-Team": "payments", "X-Seen-By": "${route} for ${client_ip} at ${host}"},
                "add": {"X-Tag": "gw-${request_id}"},
                "remove": ["cookie", "x-debug"]
            },
            "response_headers": {
                "set": {"Strict-Transport-Security": "max-age=63072000"},
                "add": {"X-Served-Route": "${route}"},
                "remove": ["x-powered-by"]
            },
            "host_rewrite": "backend.internal:8080"
        }),
    )
    .await;
    let resp = env
        .http
        .get(env.url("/rules/a"))
        .header("host", "API.Example.com")
        .header("x-request-id", "req-42")
        .header("x-team", "forged-by-client")
        .header("x-tag", "from-client")
        .header("cookie", "session=1")
        .header("x-debug", "1")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers()["strict-transport-security"],
        "max-age=63072000"
    );
    assert_eq!(resp.headers()["x-served-route"], "rules");
    let seen = seen_headers(resp).await;
    assert_eq!(
        seen["x-team"], "payments",
        "the rule replaces the client's copy"
    );
    assert_eq!(seen["x-seen-by"], "rules for 127.0.0.1 at api.example.com");
    assert_eq!(seen["x-tag"], "from-client, gw-req-42");
    assert!(
        seen.get("cookie").is_none() && seen.get("x-debug").is_none(),
        "{seen:?}"
    );
    assert_eq!(seen["host"], "backend.internal:8080");
    assert_eq!(
        seen["x-forwarded-host"], "api.example.com",
        "keeps the client's host"
    );

    // The gateway's own answers on the route carry the answer rules too.
    env.upstreams[0].kill();
    let resp = env.get("/rules/a").await;
    assert!(resp.status().is_server_error(), "{}", resp.status());
    assert_eq!(resp.headers()["x-served-route"], "rules");
    env.stop().await;
}

#[tokio::test]
async fn a_rule_on_a_gateway_owned_header_rejects_the_document_and_the_last_good_one_serves() {
    let env = Env::start("traffic", 1, |_| {}).await;
    env.route(
        "owned",
        "/owned",
        json!({"request_headers": {"set": {"x-team": "a"}}}),
    )
    .await;
    for (rules, field) in [
        (
            json!({"request_headers": {"set": {"X-User-Id": "admin"}}}),
            "request_headers",
        ),
        (
            json!({"request_headers": {"set": {"x_forwarded_for": "1.2.3.4"}}}),
            "request_headers",
        ),
        (
            json!({"request_headers": {"remove": ["x-gateway-assertion"]}}),
            "request_headers",
        ),
        (
            json!({"response_headers": {"set": {"content-length": "0"}}}),
            "response_headers",
        ),
        (
            json!({"request_headers": {"set": {"host": "evil"}}}),
            "request_headers",
        ),
    ] {
        env.consul
            .put_kv(
                &env.gw.route_key("owned"),
                &route(&env.service, "/owned", rules.clone()),
            )
            .await;
        let listed = eventually(DEADLINE, "the rejection in /routes", || async {
            let (_, v) = env.gw.admin("/routes").await;
            let rejected = v["rejected"].as_array().cloned().unwrap_or_default();
            rejected.into_iter().find(|r| {
                r["name"] == "owned" && r["error"].as_str().is_some_and(|e| e.contains(field))
            })
        })
        .await;
        assert_eq!(listed["serving_last_good"], true, "{rules}");
        assert!(
            listed["error"]
                .as_str()
                .unwrap()
                .contains("cannot be changed"),
            "{listed}"
        );
        let seen = seen_headers(env.get("/owned").await).await;
        assert_eq!(
            seen["x-team"], "a",
            "{rules}: the last good rules still apply"
        );
        // Clear the rejection so the next loop waits for its own.
        env.consul
            .put_kv(
                &env.gw.route_key("owned"),
                &route(
                    &env.service,
                    "/owned",
                    json!({"request_headers": {"set": {"x-team": "a"}}}),
                ),
            )
            .await;
        eventually(DEADLINE, "the rejection cleared", || async {
            let (_, v) = env.gw.admin("/routes").await;
            v["rejected"]
                .as_array()
                .is_some_and(Vec::is_empty)
                .then_some(())
        })
        .await;
    }
    env.stop().await;
}

#[tokio::test]
async fn a_redirect_route_answers_at_the_gateway_without_a_service() {
    let env = Env::start("traffic", 1, |_| {}).await;
    let keep = json!({
        "path_prefix": "/old",
        "rewrite_prefix": "/v2",
        "redirect": {"to": "https://new.example.com/", "status": 308, "keep_path": true}
    });
    env.consul
        .put_kv(&env.gw.route_key("moved"), &keep.to_string())
        .await;
    let fixed = json!({"path_prefix": "/gone", "redirect": {"to": "/"}});
    env.consul
        .put_kv(&env.gw.route_key("gone"), &fixed.to_string())
        .await;
    env.gw.wait_upstreams("/old", &[]).await;
    env.gw.wait_upstreams("/gone", &[]).await;
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let before = env.hits();
    let resp = http
        .post(env.url("/old/a/b?x=1&y"))
        .body("kept for the new place")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 308);
    assert_eq!(
        resp.headers()["location"],
        "https://new.example.com/v2/a/b?x=1&y"
    );
    assert!(resp.headers().contains_key("x-request-id"));
    let resp = http.get(env.url("/gone/x?q")).send().await.unwrap();
    assert_eq!(resp.status(), 301);
    assert_eq!(resp.headers()["location"], "/");
    assert_eq!(env.hits(), before, "no upstream is involved");
    let (_, upstreams) = env.gw.admin("/upstreams").await;
    let services = upstreams["services"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(
        services.iter().all(|s| s["service"] != ""),
        "no service without a name is watched: {upstreams}"
    );
    env.stop().await;
}
