//! Traffic management end to end: header rules, host rewrites and redirects, through the
//! dev registry (or a real agent with `CONSUL_HTTP_ADDR`), real upstreams and the gateway
//! on loopback ports.

mod support;

use futures_util::{stream, StreamExt};
use serde_json::{json, Value};
use support::upstream::Upstream;
use support::{
    eventually, json_of, route, seen_headers, unique, Consul, Env, Gateway, Svc, DEADLINE,
};

/// Sends `n` GETs to `url`, `width` at a time; the statuses that were not 200.
async fn hammer(http: &reqwest::Client, url: &str, n: usize, width: usize) -> Vec<u16> {
    stream::iter(0..n)
        .map(|_| async move {
            match http.get(url).send().await {
                Ok(r) => r.status().as_u16(),
                Err(_) => 0,
            }
        })
        .buffer_unordered(width)
        .filter(|s| std::future::ready(*s != 200))
        .collect()
        .await
}

/// A field of route `name` in `/routes` (a JSON pointer below the route), once `ready`
/// holds for it.
async fn route_field_when(
    gw: &Gateway,
    name: &str,
    pointer: &str,
    ready: impl Fn(&Value) -> bool,
) -> Value {
    eventually(DEADLINE, &format!("{pointer} of route {name}"), || async {
        let (_, v) = gw.admin("/routes").await;
        let routes = v["routes"].as_array().cloned().unwrap_or_default();
        let field = routes
            .iter()
            .find(|r| r["name"] == name)
            .and_then(|r| r.pointer(pointer).cloned())?;
        ready(&field).then_some(field)
    })
    .await
}

/// Route `name`'s split in `/routes`, once `ready` holds for its shares.
async fn split_when(gw: &Gateway, name: &str, ready: impl Fn(&[Value]) -> bool) -> Vec<Value> {
    let split = route_field_when(gw, name, "/split", |v| {
        v.as_array().is_some_and(|shares| ready(shares))
    })
    .await;
    split.as_array().cloned().unwrap_or_default()
}

fn instances(split: &[Value]) -> Vec<u64> {
    split
        .iter()
        .map(|s| s["instances"].as_u64().unwrap_or(99))
        .collect()
}

fn shares(split: &[Value]) -> Vec<u64> {
    split
        .iter()
        .map(|s| s["share_per_mille"].as_u64().unwrap_or(9999))
        .collect()
}

#[tokio::test]
async fn a_canary_split_deals_ten_thousand_requests_by_weight_and_a_dead_canary_gives_up_its_share()
{
    let consul = Consul::start().await;
    let gw = Gateway::start(&consul, &format!("{}/", unique("split")), |_| {}).await;
    let service = unique("shop");
    let (stable, canary) = (Upstream::start("v1").await, Upstream::start("v2").await);
    let mut v1 = Svc::new(&service, &format!("{service}-v1"), stable.port());
    v1.tags = vec!["v1".into()];
    let mut v2 = Svc::new(&service, &format!("{service}-v2"), canary.port());
    v2.tags = vec!["v2".into()];
    consul.register(&v1).await;
    consul.register(&v2).await;
    let split = json!({"split": [{"tags": ["v1"], "weight": 90}, {"tags": ["v2"], "weight": 10}]});
    consul
        .put_kv(&gw.route_key("shop"), &route(&service, "/shop", split))
        .await;
    split_when(&gw, "shop", |s| instances(s) == [1, 1]).await;

    let http = support::client();
    let url = format!("http://{}/shop/item", gw.app.proxy_addr());
    let failed = hammer(&http, &url, 10_000, 32).await;
    assert!(
        failed.is_empty(),
        "{} failed: {:?}",
        failed.len(),
        &failed[..failed.len().min(10)]
    );
    let (a, b) = (stable.hits(), canary.hits());
    assert_eq!(a + b, 10_000);
    let canary_share = b as f64 / 10_000.0;
    support::note(&format!("split 90/10 over 10,000 requests: {a} / {b}"));
    assert!(
        (canary_share - 0.10).abs() <= 0.01,
        "canary got {canary_share}"
    );

    // The canary's check fails: its share goes to the stable version, no request fails.
    consul.check(&v2.check_id(), "fail", "canary broke").await;
    let now = split_when(&gw, "shop", |s| instances(s) == [1, 0]).await;
    assert_eq!(shares(&now), [1000, 0]);
    let before = canary.hits();
    let failed = hammer(&http, &url, 1_000, 16).await;
    assert!(failed.is_empty(), "{failed:?}");
    assert_eq!(canary.hits(), before, "no request went to the dead canary");

    consul.check(&v2.check_id(), "pass", "fixed").await;
    let now = split_when(&gw, "shop", |s| instances(s) == [1, 1]).await;
    assert_eq!(shares(&now), [900, 100]);
    let before = canary.hits();
    assert!(hammer(&http, &url, 100, 8).await.is_empty());
    let back = canary.hits() - before;
    assert!(
        (8..=12).contains(&back),
        "the canary has its share back: {back} of 100"
    );
    gw.stop().await;
    consul.cleanup().await;
}

#[tokio::test]
async fn blue_green_across_services_keeps_each_user_on_one_colour() {
    let consul = Consul::start().await;
    let gw = Gateway::start(&consul, &format!("{}/", unique("split")), |_| {}).await;
    let (blue, green) = (unique("blue"), unique("green"));
    let (b, g) = (
        Upstream::start("blue").await,
        Upstream::start("green").await,
    );
    consul
        .register(&Svc::new(&blue, &format!("{blue}-0"), b.port()))
        .await;
    consul
        .register(&Svc::new(&green, &format!("{green}-0"), g.port()))
        .await;
    let doc = json!({
        "path_prefix": "/app",
        "hash_on": "header:x-user",
        "split": [{"service": blue, "weight": 50}, {"service": green, "weight": 50}]
    });
    consul.put_kv(&gw.route_key("app"), &doc.to_string()).await;
    split_when(&gw, "app", |s| instances(s) == [1, 1]).await;
    let http = support::client();
    let url = format!("http://{}/app/", gw.app.proxy_addr());
    let mut colours = std::collections::BTreeSet::new();
    for user in 0..40 {
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..5 {
            let resp = http
                .get(&url)
                .header("x-user", format!("user-{user}"))
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status(), 200);
            seen.insert(
                json_of(resp).await["server"]
                    .as_str()
                    .unwrap_or("")
                    .to_string(),
            );
        }
        assert_eq!(seen.len(), 1, "user-{user} moved between colours: {seen:?}");
        colours.extend(seen);
    }
    assert_eq!(
        colours.len(),
        2,
        "both colours serve some users: {colours:?}"
    );
    // Green goes away entirely: everyone is on blue, without errors.
    consul.deregister(&format!("{green}-0")).await;
    split_when(&gw, "app", |s| instances(s) == [1, 0]).await;
    for user in 0..10 {
        let resp = http
            .get(&url)
            .header("x-user", format!("user-{user}"))
            .send()
            .await
            .unwrap();
        assert_eq!(json_of(resp).await["server"], "blue");
    }
    gw.stop().await;
    consul.cleanup().await;
}

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

/// The circuit-breaker state of route `name`'s service in `/routes`, once `ready` holds.
async fn breaker_when(gw: &Gateway, name: &str, ready: impl Fn(&Value) -> bool) -> Value {
    route_field_when(gw, name, "/circuit_breaker/services/0", ready).await
}

#[tokio::test]
async fn a_full_circuit_breaker_answers_503_at_once_and_other_services_still_serve() {
    let env = Env::start("traffic", 1, |_| {}).await;
    env.route(
        "slow",
        "/slow",
        json!({"circuit_breaker": {"max_requests": 2, "max_pending": 1}, "retry": {"attempts": 0}}),
    )
    .await;
    let other = unique("other");
    let fast = Upstream::start("fast").await;
    env.consul
        .register(&Svc::new(&other, &format!("{other}-0"), fast.port()))
        .await;
    env.consul
        .put_kv(
            &env.gw.route_key("fast"),
            &route(&other, "/fast", json!({})),
        )
        .await;
    env.gw
        .wait_upstreams("/fast", &[&format!("{other}-0")])
        .await;

    // Two requests hold the slots, a third waits for one.
    let held: Vec<_> = (0..2)
        .map(|_| tokio::spawn(env.http.get(env.url("/slow/hold")).send()))
        .collect();
    breaker_when(&env.gw, "slow", |b| b["active"] == 2).await;
    let waiting = tokio::spawn(env.http.get(env.url("/slow/hold")).send());
    breaker_when(&env.gw, "slow", |b| b["pending"] == 1).await;

    // A fourth is refused at once, without reaching the upstream.
    let before = env.hits();
    let started = std::time::Instant::now();
    let resp = env.get("/slow/hold").await;
    assert_eq!(resp.status(), 503);
    assert!(
        started.elapsed() < std::time::Duration::from_secs(2),
        "refused at once"
    );
    let body = json_of(resp).await;
    assert_eq!(body["error"], "circuit_open");
    assert!(
        body["message"].as_str().unwrap().contains("max_pending"),
        "{body}"
    );
    assert_eq!(env.hits(), before);
    let refused = env
        .gw
        .metric(
            "switchyard_circuit_breaker_refused_total",
            &[("service", &env.service), ("reason", "max_pending")],
        )
        .await;
    assert_eq!(refused, 1.0);

    // Another service is not held up by the slow one.
    assert_eq!(
        env.http
            .get(env.url("/fast/x"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );

    env.upstreams[0].release();
    for h in held {
        assert_eq!(h.await.unwrap().unwrap().status(), 200);
    }
    assert_eq!(
        waiting.await.unwrap().unwrap().status(),
        200,
        "the waiter got a slot"
    );
    let idle = breaker_when(&env.gw, "slow", |b| b["active"] == 0).await;
    assert_eq!(
        (idle["pending"].as_u64(), idle["refused"].as_u64()),
        (Some(0), Some(1))
    );
    env.stop().await;
}

#[tokio::test]
async fn a_mirror_gets_exactly_its_share_of_copies_marked_as_shadow_traffic() {
    let env = Env::start("traffic", 1, |_| {}).await;
    let shadow = unique("shadow");
    let copies = Upstream::start("shadow").await;
    env.consul
        .register(&Svc::new(&shadow, &format!("{shadow}-0"), copies.port()))
        .await;
    env.route(
        "mirrored",
        "/m",
        json!({"mirror": {"service": shadow, "percent": 10}}),
    )
    .await;
    // The mirror's set is watched and filled like any other.
    eventually(DEADLINE, "the shadow instance is known", || async {
        let (_, v) = env.gw.admin("/upstreams").await;
        v.to_string().contains(&format!("{shadow}-0")).then_some(())
    })
    .await;
    let url = env.url("/m/item");
    let failed = hammer(&env.http, &url, 1_000, 16).await;
    assert!(failed.is_empty(), "{failed:?}");
    assert_eq!(env.upstreams[0].hits(), 1_000);
    eventually(DEADLINE, "100 copies", || async {
        (copies.hits() >= 100).then_some(())
    })
    .await;
    let mirrored = env
        .gw
        .metric(
            "switchyard_mirror_requests_total",
            &[("service", &shadow), ("result", "answered")],
        )
        .await;
    assert_eq!((copies.hits(), mirrored), (100, 100.0));

    // A POST body goes with the copy; its Host says it is a copy.
    env.route(
        "all",
        "/all",
        json!({"mirror": {"service": shadow, "percent": 100}}),
    )
    .await;
    let before = copies.hits();
    let resp = env
        .http
        .post(env.url("/all/count"))
        .header("host", "shop.example.com")
        .body("twelve bytes")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.text().await.unwrap(), "12");
    eventually(DEADLINE, "the POST copy", || async {
        (copies.hits() == before + 1).then_some(())
    })
    .await;
    let resp = env
        .http
        .get(env.url("/all/echo"))
        .header("host", "shop.example.com")
        .send()
        .await
        .unwrap();
    assert_eq!(json_of(resp).await["server"], "u0");
    eventually(DEADLINE, "the echo copy", || async {
        (copies.hits() == before + 2).then_some(())
    })
    .await;
    env.stop().await;
}

#[tokio::test]
async fn a_mirror_that_never_answers_neither_slows_nor_fails_the_real_requests() {
    let env = Env::start("traffic", 1, |c| c.proxy.mirror_max_in_flight = 4).await;
    // A shadow that accepts connections and never answers.
    let hole = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = hole.local_addr().unwrap().port();
    let holder = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = hole.accept().await {
            held.push(socket);
        }
    });
    let shadow = unique("hole");
    env.consul
        .register(&Svc::new(&shadow, &format!("{shadow}-0"), port))
        .await;
    env.route(
        "mirrored",
        "/m",
        json!({"mirror": {"service": shadow, "percent": 100}, "timeouts": {"per_try_ms": 5000, "total_ms": 5000}}),
    )
    .await;
    eventually(DEADLINE, "the shadow instance is known", || async {
        let (_, v) = env.gw.admin("/upstreams").await;
        v.to_string().contains(&format!("{shadow}-0")).then_some(())
    })
    .await;
    let started = std::time::Instant::now();
    for _ in 0..40 {
        assert_eq!(env.get("/m/x").await.status(), 200);
    }
    // Blocked on the shadow, 40 requests would take 40 × 5 s.
    assert!(
        started.elapsed() < std::time::Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );
    let busy = env
        .gw
        .metric(
            "switchyard_mirror_requests_total",
            &[("service", &shadow), ("result", "busy")],
        )
        .await;
    // At most 4 copies in flight: 36 skipped, fewer only if a copy's 5 s ran out meanwhile.
    assert!((20.0..=36.0).contains(&busy), "skipped as busy: {busy}");
    holder.abort();
    env.stop().await;
}

/// Waits until each backend of route `name` reads from the datacenters `want`.
async fn datacenters_in_use(gw: &Gateway, name: &str, want: &[&str]) {
    route_field_when(gw, name, "/datacenters/in_use", |v| *v == json!(want)).await;
}

#[tokio::test]
async fn a_route_fails_over_to_the_next_datacenter_within_a_second_and_comes_back() {
    use switchyard::devregistry::RegistryOptions;
    if std::env::var("CONSUL_HTTP_ADDR").is_ok_and(|a| !a.is_empty()) {
        support::note("skipped: needs two federated dev registries");
        return;
    }
    let dc1 = Consul::custom(RegistryOptions::default(), support::client()).await;
    let dc2 = Consul::custom(
        RegistryOptions {
            datacenter: "dc2".into(),
            wan_peers: vec![("dc1".into(), dc1.url.clone())],
            ..RegistryOptions::default()
        },
        support::client(),
    )
    .await;
    dc1.registry().unwrap().join_wan("dc2", &dc2.url).unwrap();
    let service = unique("api");
    let (local, remote) = (
        Upstream::start("dc1-api").await,
        Upstream::start("dc2-api").await,
    );
    let here = Svc::new(&service, &format!("{service}-dc1"), local.port());
    dc1.register(&here).await;
    dc2.register(&Svc::new(
        &service,
        &format!("{service}-dc2"),
        remote.port(),
    ))
    .await;
    let gw = Gateway::start(&dc1, &format!("{}/", unique("dc")), |_| {}).await;
    dc1.put_kv(
        &gw.route_key("api"),
        &route(&service, "/api", json!({"datacenters": ["dc1", "dc2"]})),
    )
    .await;
    datacenters_in_use(&gw, "api", &["dc1"]).await;

    // Clients keep calling throughout; none of their (idempotent) requests may fail.
    let url = format!("http://{}/api/x", gw.app.proxy_addr());
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let caller = {
        let (url, stop) = (url.clone(), stop.clone());
        tokio::spawn(async move {
            let http = support::client();
            let (mut ok, mut failed) = (0u64, Vec::new());
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
            while !stop.load(std::sync::atomic::Ordering::SeqCst)
                && std::time::Instant::now() < deadline
            {
                match http.get(&url).send().await {
                    Ok(r) if r.status() == 200 => ok += 1,
                    Ok(r) => failed.push(r.status().as_u16()),
                    Err(e) => failed.push(e.status().map_or(0, |s| s.as_u16())),
                }
            }
            (ok, failed)
        })
    };
    let served_by = |name: &'static str| {
        let url = url.clone();
        async move {
            let resp = support::client().get(&url).send().await.ok()?;
            (json_of(resp).await["server"] == name).then_some(())
        }
    };
    eventually(DEADLINE, "served in dc1", || served_by("dc1-api")).await;

    // Every healthy instance of dc1 goes: traffic moves to dc2.
    let failed_at = std::time::Instant::now();
    dc1.check(&here.check_id(), "fail", "dc1 instance down")
        .await;
    eventually(DEADLINE, "served in dc2", || served_by("dc2-api")).await;
    let moved = failed_at.elapsed();
    support::note(&format!(
        "traffic moved to dc2 {moved:?} after dc1's last check failed"
    ));
    assert!(moved < std::time::Duration::from_secs(1), "{moved:?}");
    datacenters_in_use(&gw, "api", &["dc2"]).await;

    // dc1 recovers: traffic comes home.
    dc1.check(&here.check_id(), "pass", "back").await;
    eventually(DEADLINE, "served in dc1 again", || served_by("dc1-api")).await;
    datacenters_in_use(&gw, "api", &["dc1"]).await;

    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let (ok, failed) = caller.await.unwrap();
    support::note(&format!(
        "{ok} requests during the failover and back, {} failed",
        failed.len()
    ));
    assert!(ok > 0 && failed.is_empty(), "{failed:?}");
    assert!(remote.hits() > 0 && local.hits() > 0);
    gw.stop().await;
}
