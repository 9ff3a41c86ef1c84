//! Discovery end to end: Consul state (dev registry, or a real agent with
//! `CONSUL_HTTP_ADDR`) → route documents and health → the published snapshot and the admin
//! API, through Consul's misbehaviours. Fault-injection tests skip themselves against a
//! real agent, saying why.

mod support;

use std::time::Duration;

use serde_json::{json, Value};
use support::{eventually, route, unique, Consul, Gateway, Svc, DEADLINE};
use switchyard::devregistry::RegistryOptions;

fn skip_without_faults(consul: &Consul, test: &str) -> bool {
    if consul.faults().is_none() {
        support::note(&format!(
            "{test}: skipped: needs fault injection, which only the dev registry offers \
             (running against the real agent at {})",
            consul.url
        ));
        return true;
    }
    false
}

/// A gateway on its own KV prefix, with `routes` (name → document) stored first.
async fn gateway_with_routes(consul: &Consul, routes: &[(&str, String)]) -> Gateway {
    let prefix = format!("{}/", unique("sy"));
    for (name, doc) in routes {
        consul.put_kv(&format!("{prefix}routes/{name}"), doc).await;
    }
    let gw = Gateway::start(consul, &prefix, |_| {}).await;
    gw.wait_ready().await;
    gw
}

/// A Consul address on a loopback port nothing listens on.
fn dead_url() -> String {
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    format!("http://{}", dead.local_addr().unwrap())
}

/// Waits until the file at `path` contains each of `needles`.
async fn wait_file_holds(path: &std::path::Path, needles: &[&str]) {
    eventually(DEADLINE, &format!("{path:?} holds {needles:?}"), || {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let ok = needles.iter().all(|n| text.contains(n));
        async move { ok.then_some(()) }
    })
    .await;
}

/// Registers instance `id` of `name` on `port` with `tags`, and returns it.
async fn register_tagged(
    consul: &Consul,
    name: &str,
    id: &str,
    port: u16,
    tags: Vec<String>,
) -> Svc {
    let mut svc = Svc::new(name, id, port);
    svc.tags = tags;
    consul.register(&svc).await;
    svc
}

/// A ready gateway with fabio tags on, on its own KV prefix.
async fn fabio_gateway(consul: &Consul) -> Gateway {
    let gw = Gateway::start(consul, &format!("{}/", unique("sy")), |f| {
        f.fabio.enabled = true
    })
    .await;
    gw.wait_ready().await;
    gw
}

#[tokio::test]
async fn a_registered_service_with_a_route_becomes_routable() {
    let consul = Consul::start().await;
    let users = unique("users");
    consul
        .register(&Svc::new(&users, &format!("{users}-1"), 9001))
        .await;
    let gw = gateway_with_routes(
        &consul,
        &[(
            "users",
            route(&users, "/users", json!({"methods": ["GET"]})),
        )],
    )
    .await;
    gw.wait_upstreams("/users/42", &[&format!("{users}-1")])
        .await;
    assert!(gw.app.ready());

    let (status, ready) = gw.admin("/ready").await;
    assert_eq!(status, 200, "{ready}");
    let (_, routes) = gw.admin("/routes").await;
    let r = &routes["routes"][0];
    assert_eq!(r["name"], "users");
    assert_eq!(r["service"], users.as_str());
    assert_eq!(r["path_prefix"], "/users");
    assert_eq!(r["upstreams"], 1);
    let (_, ups) = gw.admin("/upstreams").await;
    let svc = &ups["services"][0];
    assert_eq!(svc["service"], users.as_str());
    assert_eq!(svc["instances"][0]["port"], 9001);
    assert_eq!(svc["instances"][0]["health"], "passing");
    assert!(svc["watch"]["data_age_s"].as_f64().unwrap() < 5.0);
    gw.stop().await;
    consul.cleanup().await;
}

#[tokio::test]
async fn a_route_put_in_kv_goes_live_and_a_deleted_one_disappears() {
    let consul = Consul::start().await;
    let orders = unique("orders");
    consul
        .register(&Svc::new(&orders, &format!("{orders}-1"), 9002))
        .await;
    let gw = gateway_with_routes(&consul, &[]).await;
    assert_eq!(gw.snapshot().table.len(), 0, "ready with an empty table");
    let v0 = gw.snapshot().version;

    consul
        .put_kv(
            &gw.route_key("orders"),
            &route(&orders, "/orders", json!({})),
        )
        .await;
    gw.wait_upstreams("/orders", &[&format!("{orders}-1")])
        .await;
    assert!(gw.snapshot().version > v0);

    consul.delete_kv(&gw.route_key("orders")).await;
    gw.wait_no_route("/orders").await;
    gw.stop().await;
    consul.cleanup().await;
}

#[tokio::test]
async fn deregistered_and_critical_instances_leave_the_pool() {
    let consul = Consul::start().await;
    let name = unique("pool");
    let (a, b) = (format!("{name}-a"), format!("{name}-b"));
    let svc_a = Svc::new(&name, &a, 9101);
    consul.register(&svc_a).await;
    consul.register(&Svc::new(&name, &b, 9102)).await;
    let gw = gateway_with_routes(&consul, &[("pool", route(&name, "/pool", json!({})))]).await;
    gw.wait_upstreams("/pool", &[&a, &b]).await;

    consul.check(&svc_a.check_id(), "fail", "down").await;
    gw.wait_upstreams("/pool", &[&b]).await;

    consul.deregister(&b).await;
    gw.wait_upstreams("/pool", &[]).await;

    consul.check(&svc_a.check_id(), "pass", "back").await;
    gw.wait_upstreams("/pool", &[&a]).await;
    gw.stop().await;
    consul.cleanup().await;
}

#[tokio::test]
async fn service_maintenance_takes_an_instance_out_and_back() {
    let consul = Consul::start().await;
    let name = unique("maint");
    let (a, b) = (format!("{name}-a"), format!("{name}-b"));
    consul.register(&Svc::new(&name, &a, 9201)).await;
    consul.register(&Svc::new(&name, &b, 9202)).await;
    let gw = gateway_with_routes(
        &consul,
        &[(
            "m",
            route(&name, "/m", json!({"health": "passing_or_warning"})),
        )],
    )
    .await;
    gw.wait_upstreams("/m", &[&a, &b]).await;
    consul.service_maintenance(&a, true).await;
    gw.wait_upstreams("/m", &[&b]).await;
    consul.service_maintenance(&a, false).await;
    gw.wait_upstreams("/m", &[&a, &b]).await;
    gw.stop().await;
    consul.cleanup().await;
}

#[tokio::test]
async fn warning_instances_serve_only_routes_that_accept_them_with_the_warning_weight() {
    let consul = Consul::start().await;
    let name = unique("warn");
    let (a, b) = (format!("{name}-a"), format!("{name}-b"));
    let mut svc_a = Svc::new(&name, &a, 9301);
    svc_a.weights = Some((10, 1));
    let mut svc_b = svc_a.clone();
    svc_b.id = b.clone();
    svc_b.port = 9302;
    svc_b.status = "warning";
    consul.register(&svc_a).await;
    consul.register(&svc_b).await;
    let gw = gateway_with_routes(
        &consul,
        &[
            ("strict", route(&name, "/strict", json!({}))),
            (
                "lenient",
                route(&name, "/lenient", json!({"health": "passing_or_warning"})),
            ),
        ],
    )
    .await;
    gw.wait_upstreams("/strict", &[&a]).await;
    gw.wait_upstreams("/lenient", &[&a, &b]).await;
    let snap = gw.snapshot();
    let m = snap
        .lookup("", "/lenient", &http::Method::GET, &http::HeaderMap::new())
        .unwrap();
    let weights: Vec<u32> = m
        .upstreams
        .endpoints
        .iter()
        .map(|e| e.instance.weight)
        .collect();
    assert_eq!(weights, [10, 1], "warning takes Weights.Warning");

    // Back to passing: both routes use it, with the passing weight.
    consul.check(&svc_b.check_id(), "pass", "ok").await;
    gw.wait_upstreams("/strict", &[&a, &b]).await;
    gw.stop().await;
    consul.cleanup().await;
}

#[tokio::test]
async fn a_check_output_change_alone_publishes_nothing() {
    let consul = Consul::start().await;
    let name = unique("chatty");
    let svc = Svc::new(&name, &format!("{name}-1"), 9401);
    consul.register(&svc).await;
    let gw = gateway_with_routes(&consul, &[("c", route(&name, "/c", json!({})))]).await;
    gw.wait_upstreams("/c", &[&svc.id]).await;
    let version = gw.snapshot().version;
    for i in 0..5 {
        consul
            .check(&svc.check_id(), "pass", &format!("ok in {i} ms"))
            .await;
    }
    // Give the watch time to see every write (wait_s = 1), then compare.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(gw.snapshot().version, version);
    // A real change still goes through.
    consul.check(&svc.check_id(), "fail", "down").await;
    gw.wait_upstreams("/c", &[]).await;
    assert_eq!(gw.snapshot().version, version + 1);
    gw.stop().await;
    consul.cleanup().await;
}

#[tokio::test]
async fn a_bad_route_document_keeps_the_last_good_version_and_shows_the_error() {
    let consul = Consul::start().await;
    let name = unique("docs");
    let (a, b) = (format!("{name}-a"), format!("{name}-b"));
    consul.register(&Svc::new(&name, &a, 9501)).await;
    let mut v2 = Svc::new(&name, &b, 9502);
    v2.tags = vec!["v2".into()];
    consul.register(&v2).await;
    let gw = gateway_with_routes(
        &consul,
        &[
            ("good", route(&name, "/good", json!({}))),
            ("other", route(&name, "/other", json!({}))),
        ],
    )
    .await;
    gw.wait_upstreams("/good", &[&a, &b]).await;

    // Broken JSON for one key, a valid change for another, and a brand-new invalid key.
    consul
        .put_kv(&gw.route_key("good"), r#"{"service": "x", "path_prefix": "#)
        .await;
    consul
        .put_kv(
            &gw.route_key("other"),
            &route(&name, "/other", json!({"tags": ["v2"]})),
        )
        .await;
    consul
        .put_kv(
            &gw.route_key("typo"),
            &route(&name, "/typo", json!({"strip_prefx": true})),
        )
        .await;
    gw.wait_upstreams("/other", &[&b]).await;
    let routes = eventually(DEADLINE, "two rejections in /routes", || async {
        let (_, v) = gw.admin("/routes").await;
        (v["rejected"].as_array().map(Vec::len) == Some(2)).then_some(v)
    })
    .await;
    let rejected = routes["rejected"].as_array().unwrap();
    let good = rejected.iter().find(|r| r["name"] == "good").unwrap();
    assert!(
        good["error"].as_str().unwrap().contains("invalid JSON"),
        "{good}"
    );
    assert_eq!(good["serving_last_good"], true);
    let typo = rejected.iter().find(|r| r["name"] == "typo").unwrap();
    assert!(
        typo["error"].as_str().unwrap().contains("strip_prefx"),
        "{typo}"
    );
    assert_eq!(typo["serving_last_good"], false);
    // The last good version of "good" still routes.
    assert_eq!(gw.upstreams_for("/good").map(|v| v.len()), Some(2));
    assert!(gw.upstreams_for("/typo").is_none());

    // Fixing the document clears the error.
    consul
        .put_kv(&gw.route_key("good"), &route(&name, "/fixed", json!({})))
        .await;
    gw.wait_upstreams("/fixed", &[&a, &b]).await;
    eventually(DEADLINE, "one rejection left", || async {
        let (_, v) = gw.admin("/routes").await;
        (v["rejected"].as_array().map(Vec::len) == Some(1)).then_some(())
    })
    .await;
    gw.stop().await;
    consul.cleanup().await;
}

#[tokio::test]
async fn conflicting_routes_resolve_by_name_and_are_reported() {
    let consul = Consul::start().await;
    let (one, two) = (unique("one"), unique("two"));
    consul
        .register(&Svc::new(&one, &format!("{one}-1"), 9601))
        .await;
    consul
        .register(&Svc::new(&two, &format!("{two}-1"), 9602))
        .await;
    let gw = gateway_with_routes(
        &consul,
        &[
            ("b-late", route(&two, "/same", json!({}))),
            ("a-first", route(&one, "/same", json!({}))),
        ],
    )
    .await;
    gw.wait_upstreams("/same", &[&format!("{one}-1")]).await;
    let (_, v) = gw.admin("/routes").await;
    assert_eq!(
        v["conflicts"],
        json!([{"route": "b-late", "shadowed_by": "a-first"}])
    );
    gw.stop().await;
    consul.cleanup().await;
}

#[tokio::test]
async fn a_gateway_warm_starts_from_its_state_file_when_consul_is_down() {
    let consul = Consul::start().await;
    let name = unique("warm");
    consul
        .register(&Svc::new(&name, &format!("{name}-1"), 9701))
        .await;
    let dir = tempfile::tempdir().unwrap();
    let state_file = dir.path().join("state.json");
    let prefix = format!("{}/", unique("sy"));
    consul
        .put_kv(&format!("{prefix}routes/w"), &route(&name, "/w", json!({})))
        .await;
    let sf = state_file.clone();
    let gw = Gateway::start(&consul, &prefix, |f| f.consul.state_file = Some(sf)).await;
    gw.wait_upstreams("/w", &[&format!("{name}-1")]).await;
    wait_file_holds(&state_file, &[&name, "9701"]).await;
    gw.stop().await;

    // Consul unreachable (nothing listens there): the file is served.
    let dead_url = dead_url();
    let mut file = support::test_config(&dead_url, &prefix);
    file.consul.state_file = Some(state_file.clone());
    let warm = Gateway::start_with(file).await;
    warm.wait_ready().await;
    assert_eq!(
        warm.upstreams_for("/w"),
        Some(vec![format!("{name}-1")]),
        "routes and instances come from the file"
    );
    let (status, ready) = warm.admin("/ready").await;
    assert_eq!(status, 200, "{ready}");
    let (_, routes) = warm.admin("/routes").await;
    assert_eq!(routes["source"], "state_file");
    warm.stop().await;
    consul.cleanup().await;
}

#[tokio::test]
async fn without_consul_or_state_file_the_gateway_waits_unready_without_crashing() {
    let dead_url = dead_url();
    let gw = Gateway::start_with(support::test_config(&dead_url, "sy/")).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(!gw.app.ready());
    let (status, body) = gw.admin("/ready").await;
    assert_eq!(status, 503);
    let reason = body["reason"].as_str().unwrap();
    assert!(reason.contains(&dead_url), "{reason}");
    assert!(reason.contains("cannot reach consul"), "{reason}");
    let (status, _) = gw.admin("/healthz").await;
    assert_eq!(status, 200, "alive while waiting");
    gw.stop().await;
}

#[tokio::test]
async fn a_thousand_routed_services_are_all_watched() {
    let consul = Consul::start().await;
    if consul.is_real() {
        support::note(
            "a_thousand_routed_services_are_all_watched: the agent must allow more than 1000 \
             connections per client (limits.http_max_conns_per_client, default 200)",
        );
    }
    let base = unique("many");
    let prefix = format!("{}/", unique("sy"));
    let n = 1000;
    // Register and store routes with a few requests in flight at a time.
    let names: Vec<String> = (0..n).map(|i| format!("{base}-{i}")).collect();
    for chunk in names.chunks(50) {
        let futs = chunk.iter().map(|s| {
            let consul = &consul;
            let prefix = &prefix;
            async move {
                consul
                    .register(&Svc::new(s, &format!("{s}-1"), 10_000))
                    .await;
                consul
                    .put_kv(
                        &format!("{prefix}routes/{s}"),
                        &route(s, &format!("/{s}"), json!({})),
                    )
                    .await;
            }
        });
        futures_util::future::join_all(futs).await;
    }
    let gw = Gateway::start(&consul, &prefix, |f| f.consul.wait_s = 30).await;
    gw.wait_ready().await;
    eventually(
        Duration::from_secs(60),
        "1000 routes with one instance each",
        || {
            let snap = gw.snapshot();
            let ok = snap.table.len() == n && snap.upstreams.iter().all(|u| u.len() == 1);
            async move { ok.then_some(()) }
        },
    )
    .await;
    // A change to one of them still propagates.
    consul.deregister(&format!("{}-1", names[500])).await;
    gw.wait_upstreams(&format!("/{}", names[500]), &[]).await;
    let (_, ups) = gw.admin("/upstreams").await;
    assert_eq!(ups["services"].as_array().unwrap().len(), n);
    gw.stop().await;
    consul.cleanup().await;
    consul.delete_prefix(&prefix).await;
}

// ---- Fault injection (dev registry only) ----

/// A gateway on the dev registry with one service `name` (instances a, b) routed at `/f`;
/// `None` (after saying why) against a real agent.
async fn faulty_setup(test: &str, service: &str) -> Option<(Consul, Gateway, String, String)> {
    let consul = Consul::start().await;
    if skip_without_faults(&consul, test) {
        return None;
    }
    let name = &unique(service);
    let (a, b) = (format!("{name}-a"), format!("{name}-b"));
    consul.register(&Svc::new(name, &a, 9801)).await;
    consul.register(&Svc::new(name, &b, 9802)).await;
    let gw = gateway_with_routes(&consul, &[("f", route(name, "/f", json!({})))]).await;
    gw.wait_upstreams("/f", &[&a, &b]).await;
    Some((consul, gw, a, b))
}

async fn watch_errors(gw: &Gateway) -> u64 {
    let (_, v) = gw.admin("/upstreams").await;
    let mut n = v["routes_watch"]["errors_total"].as_u64().unwrap_or(0);
    for s in v["services"].as_array().into_iter().flatten() {
        n += s["watch"]["errors_total"].as_u64().unwrap_or(0);
    }
    n
}

#[tokio::test]
async fn consul_errors_keep_the_last_state_serving_until_consul_recovers() {
    let Some((consul, gw, a, b)) = faulty_setup(
        "consul_errors_keep_the_last_state_serving_until_consul_recovers",
        "leaderless",
    )
    .await
    else {
        return;
    };
    let faults = consul.faults().unwrap();
    let version = gw.snapshot().version;
    faults.set_no_leader(true);
    eventually(DEADLINE, "watch errors are counted", || async {
        (watch_errors(&gw).await >= 2).then_some(())
    })
    .await;
    assert_eq!(
        gw.snapshot().version,
        version,
        "nothing published meanwhile"
    );
    assert_eq!(gw.upstreams_for("/f").unwrap().len(), 2);
    assert!(gw.app.ready(), "still ready: serving the last known state");
    let (_, v) = gw.admin("/upstreams").await;
    assert!(
        v["services"][0]["watch"]["last_error"]
            .as_str()
            .unwrap_or_default()
            .contains("No cluster leader"),
        "{v}"
    );
    faults.set_no_leader(false);
    consul.deregister(&a).await;
    gw.wait_upstreams("/f", &[&b]).await;
    gw.stop().await;
}

#[tokio::test]
async fn slow_answers_and_dropped_connections_are_survived() {
    let Some((consul, gw, a, b)) =
        faulty_setup("slow_answers_and_dropped_connections_are_survived", "flaky").await
    else {
        return;
    };
    let faults = consul.faults().unwrap();
    faults.set_latency(Duration::from_millis(300));
    consul.check(&format!("service:{a}"), "fail", "down").await;
    gw.wait_upstreams("/f", &[&b]).await;
    faults.set_latency(Duration::ZERO);

    // Open blocking queries keep their connections: close them, then refuse new ones.
    let registry = consul.registry().unwrap();
    registry.stop().await;
    faults.set_drop_connections(true);
    registry.restart().await.unwrap();
    eventually(DEADLINE, "dropped connections are counted", || async {
        (watch_errors(&gw).await >= 1).then_some(())
    })
    .await;
    assert_eq!(gw.upstreams_for("/f").unwrap(), vec![b.clone()]);
    faults.set_drop_connections(false);
    consul.check(&format!("service:{a}"), "pass", "up").await;
    gw.wait_upstreams("/f", &[&a, &b]).await;
    gw.stop().await;
}

#[tokio::test]
async fn an_index_reset_is_followed_by_a_fresh_read() {
    let Some((consul, gw, a, b)) =
        faulty_setup("an_index_reset_is_followed_by_a_fresh_read", "reset").await
    else {
        return;
    };
    let faults = consul.faults().unwrap();
    faults.restore_snapshot(2);
    consul.deregister(&a).await;
    gw.wait_upstreams("/f", &[&b]).await;
    consul
        .put_kv(
            &gw.route_key("g"),
            &route(&gw_service(&gw), "/g", json!({})),
        )
        .await;
    gw.wait_upstreams("/g", &[&b]).await;
    gw.stop().await;
}

fn gw_service(gw: &Gateway) -> String {
    let snap = gw.snapshot();
    snap.table.routes()[0].spec.service.clone()
}

#[tokio::test]
async fn bad_json_from_consul_is_an_error_not_an_empty_pool() {
    let Some((consul, gw, a, b)) = faulty_setup(
        "bad_json_from_consul_is_an_error_not_an_empty_pool",
        "garbled",
    )
    .await
    else {
        return;
    };
    let faults = consul.faults().unwrap();
    faults.set_bad_json(true);
    consul.check(&format!("service:{a}"), "warn", "meh").await;
    eventually(DEADLINE, "decode errors are counted", || async {
        (watch_errors(&gw).await >= 1).then_some(())
    })
    .await;
    assert_eq!(gw.upstreams_for("/f").map(|v| v.len()), Some(2));
    faults.set_bad_json(false);
    gw.wait_upstreams("/f", &[&b]).await;
    gw.stop().await;
}

#[tokio::test]
async fn consul_down_for_a_while_then_back() {
    let Some((consul, gw, a, b)) =
        faulty_setup("consul_down_for_a_while_then_back", "outage").await
    else {
        return;
    };
    let registry = consul.registry().unwrap();
    let version = gw.snapshot().version;
    registry.stop().await;
    eventually(DEADLINE, "the outage is noticed", || async {
        (watch_errors(&gw).await >= 2).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(gw.snapshot().version, version);
    assert_eq!(
        gw.upstreams_for("/f").unwrap().len(),
        2,
        "last state serves"
    );
    let (status, _) = gw.admin("/ready").await;
    assert_eq!(status, 200);
    let (_, v) = gw.admin("/upstreams").await;
    assert!(v["data_age_s"].as_f64().unwrap() >= 1.0, "{v}");

    registry
        .restart()
        .await
        .expect("registry restarts on its port");
    consul.deregister(&a).await;
    gw.wait_upstreams("/f", &[&b]).await;
    gw.stop().await;
}

#[tokio::test]
async fn stale_data_makes_the_gateway_unready_when_a_limit_is_set() {
    let consul = Consul::start().await;
    if skip_without_faults(
        &consul,
        "stale_data_makes_the_gateway_unready_when_a_limit_is_set",
    ) {
        return;
    }
    let name = unique("stale");
    consul
        .register(&Svc::new(&name, &format!("{name}-1"), 9901))
        .await;
    let prefix = format!("{}/", unique("sy"));
    consul
        .put_kv(&format!("{prefix}routes/s"), &route(&name, "/s", json!({})))
        .await;
    let gw = Gateway::start(&consul, &prefix, |f| f.readiness.max_data_age_s = 2).await;
    gw.wait_ready().await;
    assert_eq!(gw.admin("/ready").await.0, 200);
    consul.registry().unwrap().stop().await;
    let body: Value = eventually(DEADLINE, "unready on stale data", || async {
        let (status, body) = gw.admin("/ready").await;
        (status == 503).then_some(body)
    })
    .await;
    assert!(
        body["reason"].as_str().unwrap().contains("max_data_age_s"),
        "{body}"
    );
    assert_eq!(
        gw.upstreams_for("/s").map(|v| v.len()),
        Some(1),
        "still serving"
    );
    consul.registry().unwrap().restart().await.unwrap();
    eventually(DEADLINE, "ready again", || async {
        (gw.admin("/ready").await.0 == 200).then_some(())
    })
    .await;
    gw.stop().await;
}

// ---- Access to Consul: ACL token and TLS (dev registry only) ----

fn real_agent_configured(test: &str) -> bool {
    match std::env::var("CONSUL_HTTP_ADDR") {
        Ok(addr) if !addr.is_empty() => {
            support::note(&format!(
                "{test}: skipped: needs a specially set up registry, not the real agent at {addr}"
            ));
            true
        }
        _ => false,
    }
}

#[tokio::test]
async fn the_acl_token_goes_with_every_request() {
    if real_agent_configured("the_acl_token_goes_with_every_request") {
        return;
    }
    let options = RegistryOptions {
        token: Some("s3cret".into()),
        ..RegistryOptions::for_tests()
    };
    let consul = Consul::custom(options, reqwest::Client::new()).await;
    let name = unique("acl");
    consul
        .register(&Svc::new(&name, &format!("{name}-1"), 9911))
        .await;
    let gw = gateway_with_routes(&consul, &[("a", route(&name, "/a", json!({})))]).await;
    gw.wait_upstreams("/a", &[&format!("{name}-1")]).await;
    gw.stop().await;

    // A secret the agent does not know: `403 ACL not found`.
    let mut file = support::test_config(&consul.url, "sy/");
    file.consul.token = Some("wrong".into());
    let denied = Gateway::start_with(file).await;
    let body: Value = eventually(DEADLINE, "the refusal is visible in /ready", || async {
        let (status, body) = denied.admin("/ready").await;
        let reason = body["reason"].as_str().unwrap_or_default().to_string();
        (status == 503 && reason.contains("ACL not found")).then_some(body)
    })
    .await;
    assert!(body["reason"].as_str().unwrap().contains("403"), "{body}");
    denied.stop().await;

    // No token at all: the anonymous token lacks the right, `403 Permission denied`.
    let anonymous = Gateway::start_with(support::test_config(&consul.url, "sy/")).await;
    eventually(
        DEADLINE,
        "the anonymous refusal is visible in /ready",
        || async {
            let (status, body) = anonymous.admin("/ready").await;
            let reason = body["reason"].as_str().unwrap_or_default().to_string();
            (status == 503 && reason.contains("Permission denied")).then_some(())
        },
    )
    .await;
    anonymous.stop().await;
}

#[tokio::test]
async fn consul_over_https_with_a_client_certificate() {
    if real_agent_configured("consul_over_https_with_a_client_certificate") {
        return;
    }
    let pki = support::pki();
    let options = RegistryOptions {
        tls: Some(pki.server.clone()),
        ..RegistryOptions::for_tests()
    };
    let consul = Consul::custom(options, pki.http.clone()).await;
    assert!(consul.url.starts_with("https://"));
    let name = unique("tls");
    consul
        .register(&Svc::new(&name, &format!("{name}-1"), 9912))
        .await;
    let prefix = format!("{}/", unique("sy"));
    consul
        .put_kv(&format!("{prefix}routes/t"), &route(&name, "/t", json!({})))
        .await;
    let (ca, cert, key) = (
        pki.ca.clone(),
        pki.client_cert.clone(),
        pki.client_key.clone(),
    );
    let gw = Gateway::start(&consul, &prefix, |f| {
        f.consul.ca_cert = Some(ca);
        f.consul.client_cert = Some(cert);
        f.consul.client_key = Some(key);
    })
    .await;
    gw.wait_ready().await;
    gw.wait_upstreams("/t", &[&format!("{name}-1")]).await;
    gw.stop().await;

    // Without the client certificate the agent refuses the handshake: not ready.
    let ca = pki.ca.clone();
    let refused = Gateway::start(&consul, &prefix, |f| f.consul.ca_cert = Some(ca)).await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let (status, body) = refused.admin("/ready").await;
    assert_eq!(status, 503, "{body}");
    refused.stop().await;
}

// ---- fabio migration: routes from `urlprefix-` tags ----

#[tokio::test]
async fn fabio_tags_route_until_a_kv_document_takes_the_prefix_or_the_tag_goes() {
    let consul = Consul::start().await;
    let upstream = support::upstream::Upstream::start("tagged").await;
    let name = unique("fab");
    let id = format!("{name}-1");
    let prefix = format!("/{name}");
    let tags = vec![format!("urlprefix-{prefix} strip={prefix}"), "other".into()];
    let mut svc = register_tagged(&consul, &name, &id, upstream.port(), tags).await;
    let gw = fabio_gateway(&consul).await;
    gw.wait_upstreams(&prefix, &[&id]).await;

    let (_, routes) = gw.admin("/routes").await;
    let tag_route = routes["routes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["path_prefix"] == prefix.as_str())
        .cloned()
        .unwrap_or_else(|| panic!("{routes}"));
    assert!(
        tag_route["source"].as_str().unwrap().contains("fabio tag"),
        "{tag_route}"
    );
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let url = format!("http://{}{prefix}/hello?x=1", gw.app.proxy_addr());
    let seen: Value = http.get(&url).send().await.unwrap().json().await.unwrap();
    assert_eq!(seen["path"], "/hello?x=1", "strip= removed the prefix");

    // A KV document on the same prefix wins over the tag.
    let other = unique("kvsvc");
    consul
        .register(&Svc::new(&other, &format!("{other}-1"), 9))
        .await;
    consul
        .put_kv(&gw.route_key("kv"), &route(&other, &prefix, json!({})))
        .await;
    gw.wait_upstreams(&prefix, &[&format!("{other}-1")]).await;
    consul.delete_kv(&gw.route_key("kv")).await;
    gw.wait_upstreams(&prefix, &[&id]).await;

    // Without the tag, the route goes.
    svc.tags = vec!["other".into()];
    consul.register(&svc).await;
    gw.wait_no_route(&prefix).await;
    gw.stop().await;
    consul.cleanup().await;
}

#[tokio::test]
async fn a_tag_that_makes_no_route_is_reported_and_tags_are_ignored_when_fabio_is_off() {
    let consul = Consul::start().await;
    let name = unique("badtag");
    let tags = vec!["urlprefix-/x strip=/y".into(), format!("urlprefix-/{name}")];
    register_tagged(&consul, &name, &format!("{name}-1"), 9, tags).await;
    let gw = fabio_gateway(&consul).await;
    gw.wait_upstreams(&format!("/{name}"), &[&format!("{name}-1")])
        .await;
    let rejected = eventually(DEADLINE, "the bad tag is listed", || async {
        let (_, v) = gw.admin("/routes").await;
        let found = v["rejected"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|r| r["key"].as_str().unwrap_or("").contains("urlprefix-/x"))
            .cloned();
        found
    })
    .await;
    assert!(
        rejected["error"].as_str().unwrap().contains("strip"),
        "{rejected}"
    );
    gw.stop().await;

    let off = gateway_with_routes(&consul, &[("kv", route(&name, "/kv", json!({})))]).await;
    off.wait_upstreams("/kv", &[&format!("{name}-1")]).await;
    assert!(
        off.upstreams_for(&format!("/{name}")).is_none(),
        "tags mean nothing with fabio off"
    );
    off.stop().await;
    consul.cleanup().await;
}

#[tokio::test]
async fn with_fabio_on_the_first_snapshot_already_holds_the_tag_routes() {
    let consul = Consul::start().await;
    let name = unique("fabboot");
    let id = format!("{name}-1");
    register_tagged(&consul, &name, &id, 9, vec![format!("urlprefix-/{name}")]).await;
    // The catalog answers after the KV prefix: KV alone must not make the gateway ready.
    if let Some(faults) = consul.faults() {
        faults.set_path_latency("/v1/catalog/", Duration::from_millis(400));
    }
    let gw = fabio_gateway(&consul).await;
    assert_eq!(
        gw.upstreams_for(&format!("/{name}")),
        Some(vec![id.clone()]),
        "ready means the tag route is in"
    );
    if let Some(faults) = consul.faults() {
        faults.clear();
    }
    let (_, ups) = gw.admin("/upstreams").await;
    let tags_watch = &ups["tags_watch"];
    assert!(tags_watch["index"].as_u64().unwrap() > 0, "{ups}");
    assert_eq!(tags_watch["errors_total"], 0, "{ups}");
    gw.stop().await;
    consul.cleanup().await;
}

#[tokio::test]
async fn fabio_tag_routes_warm_start_from_the_state_file() {
    let consul = Consul::start().await;
    let name = unique("fabwarm");
    let id = format!("{name}-1");
    let tags = vec![format!("urlprefix-/{name} strip=/{name}")];
    register_tagged(&consul, &name, &id, 9702, tags).await;
    let dir = tempfile::tempdir().unwrap();
    let state_file = dir.path().join("state.json");
    let prefix = format!("{}/", unique("sy"));
    let sf = state_file.clone();
    let gw = Gateway::start(&consul, &prefix, |f| {
        f.fabio.enabled = true;
        f.consul.state_file = Some(sf);
    })
    .await;
    gw.wait_upstreams(&format!("/{name}"), &[&id]).await;
    wait_file_holds(&state_file, &["fabio_tags", "9702"]).await;
    gw.stop().await;

    let dead_url = dead_url();
    let mut file = support::test_config(&dead_url, &prefix);
    file.consul.state_file = Some(state_file.clone());
    file.fabio.enabled = true;
    let warm = Gateway::start_with(file).await;
    warm.wait_ready().await;
    assert_eq!(
        warm.upstreams_for(&format!("/{name}/x")),
        Some(vec![id.clone()]),
        "the tag route and its instance come from the file"
    );
    let (_, routes) = warm.admin("/routes").await;
    assert_eq!(routes["source"], "state_file");
    warm.stop().await;
    consul.cleanup().await;
}

#[tokio::test]
async fn a_tag_route_uses_only_the_instances_that_carry_the_tag() {
    let consul = Consul::start().await;
    let name = unique("fabmix");
    let (tagged, plain) = (format!("{name}-tagged"), format!("{name}-plain"));
    let a = register_tagged(
        &consul,
        &name,
        &tagged,
        9801,
        vec![format!("urlprefix-/{name}")],
    )
    .await;
    consul.register(&Svc::new(&name, &plain, 9802)).await;
    let gw = fabio_gateway(&consul).await;
    gw.wait_upstreams(&format!("/{name}"), &[&tagged]).await;

    // Tagging the second instance adds it; failing the first takes it out.
    register_tagged(&consul, &name, &plain, 9802, a.tags.clone()).await;
    gw.wait_upstreams(&format!("/{name}"), &[&plain, &tagged])
        .await;
    consul.check(&a.check_id(), "fail", "down").await;
    gw.wait_upstreams(&format!("/{name}"), &[&plain]).await;
    gw.stop().await;
    consul.cleanup().await;
}
