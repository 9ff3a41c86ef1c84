//! Consul resilience end to end, on the dev registry (these need to kill, restart and
//! reconfigure it, so they skip themselves against a real agent): a registry restarted with
//! a fresh index, several agent addresses with failover and failback, consistency modes,
//! and ACL token problems told apart from outages.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::{json, Value};
use support::upstream::Upstream;
use support::{eventually, route, unique, Gateway, DEADLINE};
use switchyard::config::{ConsulSection, FileConfig};
use switchyard::devregistry::{CheckStatus, Registry, RegistryOptions};
use tokio::time::Instant;

/// Skips (saying why) when the suite runs against a real agent: these tests start, kill
/// and reconfigure their own registries.
fn against_real_agent(test: &str) -> bool {
    match std::env::var("CONSUL_HTTP_ADDR") {
        Ok(addr) if !addr.is_empty() => {
            support::note(&format!(
                "{test}: skipped: needs registries it can kill and restart, not the real agent at {addr}"
            ));
            true
        }
        _ => false,
    }
}

fn registry_on(addr: SocketAddr, options: RegistryOptions) -> Registry {
    Registry::start(addr, options).expect("the dev registry starts")
}

/// Registers instance `id` of `service` at `upstream` with a passing TTL check, and the
/// route `/r` → `service` under `prefix`, straight into `registry` (no HTTP: nothing can
/// read the registry in between when called without an `.await`).
fn seed(registry: &Registry, prefix: &str, service: &str, instances: &[(&str, &Upstream)]) {
    for (id, upstream) in instances {
        registry
            .register_service(service, id, "127.0.0.1", upstream.port())
            .expect("registers");
    }
    registry
        .kv_put(
            &format!("{prefix}routes/r"),
            route(service, "/r", json!({})),
        )
        .expect("route stored");
}

/// The name of the upstream that answered `GET /r`, or `None` if the request failed.
async fn who_answers(http: &reqwest::Client, gw: &Gateway) -> Option<String> {
    let resp = http
        .get(format!("http://{}/r", gw.app.proxy_addr()))
        .send()
        .await
        .ok()?;
    if resp.status() != 200 {
        return None;
    }
    let body: Value = resp.json().await.ok()?;
    body["server"].as_str().map(str::to_string)
}

/// Sends `GET /r` until `gone` has not answered for `settle` answers in a row (bounded by
/// `limit`), and returns how long after `since` its last answer came, and how many requests
/// failed.
async fn time_until_traffic_leaves(
    gw: &Gateway,
    gone: &str,
    since: Instant,
    limit: Duration,
) -> (Duration, u64) {
    let http = support::client();
    let mut last_seen = Duration::ZERO;
    let mut in_a_row = 0;
    let mut failed = 0;
    while in_a_row < 30 {
        assert!(
            since.elapsed() < limit,
            "{gone} still gets traffic {:?} after its check failed",
            since.elapsed()
        );
        match who_answers(&http, gw).await {
            Some(name) if name == gone => {
                last_seen = since.elapsed();
                in_a_row = 0;
            }
            Some(_) => in_a_row += 1,
            None => failed += 1,
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    (last_seen, failed)
}

#[tokio::test]
async fn after_a_registry_restart_with_a_fresh_index_a_failing_check_moves_traffic_within_a_second()
{
    if against_real_agent(
        "after_a_registry_restart_with_a_fresh_index_a_failing_check_moves_traffic_within_a_second",
    ) {
        return;
    }
    let (a, b) = (Upstream::start("a").await, Upstream::start("b").await);
    let service = unique("restart");
    let prefix = format!("{}/", unique("sy"));
    let old = registry_on("127.0.0.1:0".parse().unwrap(), RegistryOptions::for_tests());
    let addr = old.addr();
    seed(&old, &prefix, &service, &[("a", &a), ("b", &b)]);
    // A busy cluster's index: far above what a fresh registry starts from (health
    // indices follow the service and check tables, so churn those).
    for i in 0..100 {
        let id = format!("noise-{i}");
        old.register_service(&service, &id, "127.0.0.1", 9).unwrap();
        old.deregister_service(&id);
    }
    let mut file = support::test_config(&old.url(), &prefix);
    // Blocking queries as long as in production: a query stuck on the old index would
    // hold the failure back for the whole wait.
    file.consul.wait_s = 60;
    let gw = Gateway::start_with(file).await;
    gw.wait_ready().await;
    gw.wait_upstreams("/r", &["a", "b"]).await;

    old.stop().await;
    drop(old);
    // The same address, the same services, an index starting over.
    let fresh = registry_on(addr, RegistryOptions::for_tests());
    seed(&fresh, &prefix, &service, &[("a", &a), ("b", &b)]);
    fresh
        .set_check_status("service:a", CheckStatus::Critical)
        .unwrap();
    let failed_at = Instant::now();
    assert!(fresh.index() < 100, "a fresh index: {}", fresh.index());

    let (left_after, failed) =
        time_until_traffic_leaves(&gw, "a", failed_at, Duration::from_secs(10)).await;
    support::note(&format!(
        "traffic left the critical instance {left_after:?} after its check failed"
    ));
    assert!(
        left_after < Duration::from_secs(1),
        "traffic left only after {left_after:?}"
    );
    assert_eq!(failed, 0, "requests failed meanwhile");
    gw.stop().await;
}

/// The `/consul` admin view of `gw`.
async fn consul_view(gw: &Gateway) -> Value {
    let (status, body) = gw.admin("/consul").await;
    assert_eq!(status, 200, "/consul: {body}");
    body
}

/// The watch named `name` in the `/consul` view.
fn watch_named<'a>(view: &'a Value, name: &str) -> Option<&'a Value> {
    view["watches"]
        .as_array()?
        .iter()
        .find(|w| w["name"] == name)
}

#[tokio::test]
async fn with_two_agents_reads_move_to_the_second_when_the_first_dies_and_back_when_it_returns() {
    if against_real_agent(
        "with_two_agents_reads_move_to_the_second_when_the_first_dies_and_back_when_it_returns",
    ) {
        return;
    }
    let (a, b) = (Upstream::start("a").await, Upstream::start("b").await);
    let service = unique("agents");
    let prefix = format!("{}/", unique("sy"));
    let local = registry_on("127.0.0.1:0".parse().unwrap(), RegistryOptions::for_tests());
    let remote = registry_on("127.0.0.1:0".parse().unwrap(), RegistryOptions::for_tests());
    for registry in [&local, &remote] {
        seed(registry, &prefix, &service, &[("a", &a), ("b", &b)]);
    }
    // The CONSUL_HTTP_ADDR-style comma list, local agent first.
    let mut file = support::test_config(&format!("{}, {}", local.url(), remote.url()), &prefix);
    file.consul.failback_s = 1;
    let gw = Gateway::start_with(file).await;
    gw.wait_ready().await;
    gw.wait_upstreams("/r", &["a", "b"]).await;
    let view = consul_view(&gw).await;
    assert_eq!(view["client"]["agents"]["active"], local.url(), "{view}");
    let active = |address: String| {
        let gw = &gw;
        async move {
            gw.metric(
                "switchyard_consul_agent_active",
                &[("address", address.as_str())],
            )
            .await
        }
    };
    assert_eq!(active(local.url()).await, 1.0);
    assert_eq!(active(remote.url()).await, 0.0);

    // The local agent dies: reads move to the remote one.
    local.stop().await;
    let died = Instant::now();
    eventually(DEADLINE, "reads move to the remote agent", || async {
        let view = consul_view(&gw).await;
        (view["client"]["agents"]["active"] == remote.url()).then_some(())
    })
    .await;
    support::note(&format!(
        "reads moved to the remote agent {:?} after the local one died",
        died.elapsed()
    ));
    assert_eq!(active(local.url()).await, 0.0);
    assert_eq!(active(remote.url()).await, 1.0);
    let changes = gw
        .metric(
            "switchyard_consul_agent_changes_total",
            &[("from", &local.url()), ("to", &remote.url())],
        )
        .await;
    assert_eq!(changes, 1.0);
    remote
        .set_check_status("service:a", CheckStatus::Critical)
        .unwrap();
    let (left_after, failed) =
        time_until_traffic_leaves(&gw, "a", Instant::now(), Duration::from_secs(10)).await;
    support::note(&format!(
        "with the local agent down, traffic left a failing instance {left_after:?} after the remote agent saw it"
    ));
    assert!(left_after < Duration::from_secs(1), "{left_after:?}");
    assert_eq!(failed, 0);
    let view = consul_view(&gw).await;
    let health = watch_named(&view, &format!("health:{service}")).expect("a health watch");
    assert_eq!(health["last_answer"]["agent"], remote.url(), "{view}");
    assert!(view["data_age_s"].as_f64().is_some(), "{view}");

    // The local agent returns (with the cluster's state): reads come back to it.
    local
        .set_check_status("service:a", CheckStatus::Critical)
        .unwrap();
    local.restart().await.unwrap();
    let back = Instant::now();
    eventually(DEADLINE, "reads come back to the local agent", || async {
        let view = consul_view(&gw).await;
        (view["client"]["agents"]["active"] == local.url()).then_some(())
    })
    .await;
    support::note(&format!(
        "reads came back to the local agent {:?} after it returned (failback_s = 1)",
        back.elapsed()
    ));
    local
        .set_check_status("service:a", CheckStatus::Passing)
        .unwrap();
    gw.wait_upstreams("/r", &["a", "b"]).await;
    let view = consul_view(&gw).await;
    assert_eq!(view["client"]["agents"]["changes_total"], 2, "{view}");
    let health = watch_named(&view, &format!("health:{service}")).unwrap();
    assert_eq!(health["last_answer"]["agent"], local.url(), "{view}");
    gw.stop().await;
}

#[tokio::test]
async fn stale_reads_go_on_without_a_leader_while_default_and_consistent_ones_wait() {
    if against_real_agent(
        "stale_reads_go_on_without_a_leader_while_default_and_consistent_ones_wait",
    ) {
        return;
    }
    let (a, b) = (Upstream::start("a").await, Upstream::start("b").await);
    let service = unique("modes");
    let prefix = format!("{}/", unique("sy"));
    let registry = registry_on("127.0.0.1:0".parse().unwrap(), RegistryOptions::for_tests());
    seed(&registry, &prefix, &service, &[("a", &a), ("b", &b)]);
    let mut gateways = Vec::new();
    for (mode, effective) in [
        ("stale", "stale"),
        ("consistent", "consistent"),
        ("default", "leader"),
    ] {
        // As an operator writes it, through the file parser.
        let mut file = FileConfig::parse(&format!("[consul]\nconsistency = \"{mode}\"\n")).unwrap();
        let base = support::test_config(&registry.url(), &prefix);
        file.consul = ConsulSection {
            consistency: file.consul.consistency,
            max_stale_s: if mode == "stale" { 30 } else { 0 },
            ..base.consul.clone()
        };
        file.proxy = base.proxy;
        file.admin = base.admin;
        file.registration = base.registration;
        let gw = Gateway::start_with(file).await;
        gw.wait_ready().await;
        gw.wait_upstreams("/r", &["a", "b"]).await;
        let view = consul_view(&gw).await;
        assert_eq!(view["client"]["consistency"], mode, "{view}");
        let routes = watch_named(&view, "routes").expect("the routes watch");
        assert_eq!(
            routes["last_answer"]["effective_consistency"], effective,
            "{mode}: {view}"
        );
        assert_eq!(routes["last_answer"]["known_leader"], true, "{view}");
        gateways.push(gw);
    }
    let [stale, consistent, default] = &gateways[..] else {
        unreachable!()
    };

    registry.faults().set_no_leader(true);
    for gw in [consistent, default] {
        eventually(DEADLINE, "the leaderless reads fail", || async {
            let view = consul_view(gw).await;
            let health = watch_named(&view, &format!("health:{service}"))?.clone();
            health["last_error"]
                .as_str()?
                .contains("No cluster leader")
                .then_some(())
        })
        .await;
    }
    registry
        .set_check_status("service:a", CheckStatus::Critical)
        .unwrap();
    stale.wait_upstreams("/r", &["b"]).await;
    let view = consul_view(stale).await;
    let health = watch_named(&view, &format!("health:{service}")).unwrap();
    assert_eq!(health["last_answer"]["known_leader"], false, "{view}");
    assert_eq!(
        stale
            .metric(
                "switchyard_consul_known_leader",
                &[("agent", &registry.url())]
            )
            .await,
        0.0
    );
    for gw in [consistent, default] {
        assert_eq!(
            gw.upstreams_for("/r").unwrap(),
            ["a", "b"],
            "the last good state serves"
        );
    }
    registry.faults().set_no_leader(false);
    for gw in [consistent, default] {
        gw.wait_upstreams("/r", &["b"]).await;
    }
    for gw in gateways {
        gw.stop().await;
    }
}

#[tokio::test]
async fn a_refused_token_keeps_the_last_state_and_a_rewritten_token_file_is_picked_up() {
    if against_real_agent(
        "a_refused_token_keeps_the_last_state_and_a_rewritten_token_file_is_picked_up",
    ) {
        return;
    }
    let with_token = |token: &str| RegistryOptions {
        token: Some(token.into()),
        ..RegistryOptions::for_tests()
    };
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("consul-token");
    std::fs::write(&token_file, "first-token\n").unwrap();
    let (a, b) = (Upstream::start("a").await, Upstream::start("b").await);
    let service = unique("acl");
    let prefix = format!("{}/", unique("sy"));
    let old = registry_on("127.0.0.1:0".parse().unwrap(), with_token("first-token"));
    let addr = old.addr();
    seed(&old, &prefix, &service, &[("a", &a), ("b", &b)]);
    let mut file = support::test_config(&old.url(), &prefix);
    file.consul.token_file = Some(token_file.clone());
    let gw = Gateway::start_with(file).await;
    gw.wait_ready().await;
    gw.wait_upstreams("/r", &["a", "b"]).await;

    // The token is revoked: the registry now knows another one only.
    old.stop().await;
    drop(old);
    let registry = registry_on(addr, with_token("second-token"));
    seed(&registry, &prefix, &service, &[("a", &a), ("b", &b)]);
    registry
        .set_check_status("service:b", CheckStatus::Critical)
        .unwrap();
    let health_path = format!("/v1/health/service/{service}");
    let view = eventually(DEADLINE, "the refused health read is shown", || async {
        let view = consul_view(&gw).await;
        let token = &view["client"]["token"];
        let listed = token["refused_paths"]
            .as_array()
            .is_some_and(|paths| paths.iter().any(|p| *p == health_path.as_str()));
        (token["refused_for_s"].is_number() && listed).then_some(view)
    })
    .await;
    let token = &view["client"]["token"];
    assert!(
        token["refused_message"]
            .as_str()
            .unwrap()
            .contains("ACL not found"),
        "{view}"
    );
    assert!(
        token["origin"].as_str().unwrap().contains("consul-token"),
        "names the file: {view}"
    );
    assert!(
        !view.to_string().contains("first-token"),
        "never the token itself: {view}"
    );
    assert_eq!(
        view["client"]["agents"]["changes_total"], 0,
        "not an outage"
    );
    assert_eq!(gw.metric("switchyard_consul_token_refused", &[]).await, 1.0);
    let health_watch = format!("health:{service}");
    eventually(DEADLINE, "refusals are counted per watch", || async {
        let n = gw
            .metric(
                "switchyard_consul_acl_refusals_total",
                &[("watch", &health_watch)],
            )
            .await;
        (n >= 1.0).then_some(())
    })
    .await;
    assert_eq!(
        gw.upstreams_for("/r").unwrap(),
        ["a", "b"],
        "the last good state serves"
    );
    assert!(gw.app.ready(), "a refused token is not an outage");

    // The operator writes the new token: it is read and used without a restart.
    std::fs::write(&token_file, "second-token\n").unwrap();
    let written = Instant::now();
    gw.wait_upstreams("/r", &["a"]).await;
    support::note(&format!(
        "the new token was in use {:?} after the file was written",
        written.elapsed()
    ));
    let view = consul_view(&gw).await;
    assert!(view["client"]["token"]["refused_for_s"].is_null(), "{view}");
    assert_eq!(gw.metric("switchyard_consul_token_refused", &[]).await, 0.0);
    gw.stop().await;
}

#[tokio::test]
async fn an_agent_that_accepts_but_never_answers_is_left_within_seconds() {
    if against_real_agent("an_agent_that_accepts_but_never_answers_is_left_within_seconds") {
        return;
    }
    let (a, b) = (Upstream::start("a").await, Upstream::start("b").await);
    let service = unique("hung");
    let prefix = format!("{}/", unique("sy"));
    let local = registry_on("127.0.0.1:0".parse().unwrap(), RegistryOptions::for_tests());
    let remote = registry_on("127.0.0.1:0".parse().unwrap(), RegistryOptions::for_tests());
    for registry in [&local, &remote] {
        seed(registry, &prefix, &service, &[("a", &a), ("b", &b)]);
    }
    let mut file = support::test_config(&local.url(), &prefix);
    file.consul.address = None;
    file.consul.addresses = vec![local.url(), remote.url()];
    // Blocking queries as long as in production: waiting for them to time out would
    // leave the gateway deaf for a minute.
    file.consul.wait_s = 60;
    file.consul.failback_s = 0;
    let gw = Gateway::start_with(file).await;
    gw.wait_ready().await;
    gw.wait_upstreams("/r", &["a", "b"]).await;

    local.faults().set_stall(true);
    let hung = Instant::now();
    eventually(
        Duration::from_secs(20),
        "reads leave the hung agent",
        || async {
            let view = consul_view(&gw).await;
            (view["client"]["agents"]["active"] == remote.url()).then_some(())
        },
    )
    .await;
    let moved_after = hung.elapsed();
    support::note(&format!(
        "reads left an agent that stopped answering {moved_after:?} after it hung"
    ));
    assert!(moved_after < Duration::from_secs(10), "{moved_after:?}");
    let view = consul_view(&gw).await;
    assert!(
        view["client"]["agents"]["last_change_reason"]
            .as_str()
            .unwrap()
            .contains("liveness"),
        "{view}"
    );
    remote
        .set_check_status("service:a", CheckStatus::Critical)
        .unwrap();
    let (left_after, failed) =
        time_until_traffic_leaves(&gw, "a", Instant::now(), Duration::from_secs(10)).await;
    assert!(left_after < Duration::from_secs(1), "{left_after:?}");
    assert_eq!(failed, 0);
    assert_eq!(
        consul_view(&gw).await["client"]["agents"]["active"],
        remote.url(),
        "failback_s = 0 stays"
    );
    local.faults().set_stall(false);
    gw.stop().await;
}

#[tokio::test]
async fn a_single_agent_that_hung_and_answers_again_is_read_again_within_a_second() {
    if against_real_agent(
        "a_single_agent_that_hung_and_answers_again_is_read_again_within_a_second",
    ) {
        return;
    }
    let (a, b) = (Upstream::start("a").await, Upstream::start("b").await);
    let service = unique("hung1");
    let prefix = format!("{}/", unique("sy"));
    let registry = registry_on("127.0.0.1:0".parse().unwrap(), RegistryOptions::for_tests());
    seed(&registry, &prefix, &service, &[("a", &a), ("b", &b)]);
    let mut file = support::test_config(&registry.url(), &prefix);
    // As long as in production: a query the hung agent took would hold the watch for
    // the whole read timeout (68.75 s).
    file.consul.wait_s = 60;
    let gw = Gateway::start_with(file).await;
    gw.wait_ready().await;
    gw.wait_upstreams("/r", &["a", "b"]).await;

    registry.faults().set_stall(true);
    // Changes that move no traffic, so that every watch's query returns and is sent again
    // into the hung agent; long enough for the liveness probe to go unanswered.
    let hung = Instant::now();
    let mut odd = false;
    while hung.elapsed() < Duration::from_secs(3) {
        odd = !odd;
        seed(&registry, &prefix, &service, &[]);
        if odd {
            registry
                .register_service_json(json!({"Name": service, "ID": "spare", "Port": 9,
                    "Check": {"TTL": "1h", "Status": "critical"}}))
                .unwrap();
        } else {
            registry.deregister_service("spare");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    registry.faults().set_stall(false);
    registry
        .set_check_status("service:a", CheckStatus::Critical)
        .unwrap();
    let (left_after, failed) =
        time_until_traffic_leaves(&gw, "a", Instant::now(), Duration::from_secs(10)).await;
    support::note(&format!(
        "traffic left the critical instance {left_after:?} after the hung agent answered again"
    ));
    assert!(left_after < Duration::from_secs(1), "{left_after:?}");
    assert_eq!(failed, 0);
    gw.stop().await;
}
