//! Balancing end to end: random and least-request picks, the panic threshold and the
//! gateway-wide retry budget, seen through real upstreams (their hit counters and the
//! `x-upstream` header they answer with) and the admin's per-instance state. The unit
//! tests in `src/balance` and `src/proxy` cover the arithmetic; these prove the gateway
//! wires it to real traffic.

mod support;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use serde_json::json;
use support::{eventually, route, Env, Svc, DEADLINE};

/// The instance (`u0`, `u1`, ...) that answered `GET path`, which must be a 200.
async fn served_by(env: &Env, path: &str) -> String {
    let resp = env.get(path).await;
    assert_eq!(resp.status(), 200, "{path}");
    resp.headers()["x-upstream"].to_str().unwrap().to_string()
}

/// How many of `picks` each instance got.
fn tally(picks: &[String]) -> BTreeMap<&str, usize> {
    let mut counts = BTreeMap::new();
    for p in picks {
        *counts.entry(p.as_str()).or_default() += 1;
    }
    counts
}

#[tokio::test]
async fn random_spreads_requests_over_every_instance_in_no_fixed_order() {
    let env = Env::start("balance", 3, |_| {}).await;
    env.route("api", "/api", json!({"lb": "random"})).await;
    let mut picks = Vec::new();
    for _ in 0..300 {
        picks.push(served_by(&env, "/api/x").await);
    }
    let counts = tally(&picks);
    // 100 expected each, standard deviation about 8: these bounds are six of them.
    for name in ["u0", "u1", "u2"] {
        let n = counts.get(name).copied().unwrap_or(0);
        assert!((50..=150).contains(&n), "{name} got {n}: {counts:?}");
    }
    for (i, u) in env.upstreams.iter().enumerate() {
        assert_eq!(u.hits() as usize, counts[format!("u{i}").as_str()]);
    }
    // Not a rotation in disguise: round robin never picks the same instance twice in a
    // row, a random pick does so about a third of the time (100 of 299, sd about 8).
    let repeats = picks.windows(2).filter(|w| w[0] == w[1]).count();
    assert!(
        (50..=150).contains(&repeats),
        "{repeats} back-to-back repeats in 299 pairs"
    );
    env.stop().await;
}

#[tokio::test]
async fn least_request_sends_new_requests_to_the_instance_with_fewer_in_flight() {
    let env = Env::start("balance", 2, |_| {}).await;
    let ids = env.ids();
    // Instance 0 also carries a tag, so a second route can pile requests onto it alone.
    // In-flight counts belong to the instance, whichever route sent the request.
    env.consul
        .register(&Svc {
            tags: vec!["busy".into()],
            ..Svc::new(&env.service, &ids[0], env.upstreams[0].port())
        })
        .await;
    env.consul
        .put_kv(
            &env.gw.route_key("busy"),
            &route(&env.service, "/busy", json!({"tags": ["busy"]})),
        )
        .await;
    env.gw.wait_upstreams("/busy", &[&ids[0]]).await;
    env.route("api", "/api", json!({"lb": "least_request"}))
        .await;

    const HELD: u64 = 20;
    let held: Vec<_> = (0..HELD)
        .map(|_| {
            let req = env.http.get(env.url("/busy/hold"));
            tokio::spawn(async move { req.send().await.map(|r| r.status()) })
        })
        .collect();
    let in_flight = |id: &str| {
        let (env, id) = (&env, id.to_string());
        async move {
            let instance = env.gw.instance(&env.service, &id).await?;
            instance["in_flight"].as_u64()
        }
    };
    eventually(DEADLINE, "20 requests in flight on instance 0", || async {
        (in_flight(&ids[0]).await == Some(HELD)).then_some(())
    })
    .await;

    let mut picks = Vec::new();
    for _ in 0..200 {
        picks.push(served_by(&env, "/api/x").await);
    }
    let counts = tally(&picks);
    let idle = counts.get("u1").copied().unwrap_or(0);
    // Two random candidates, the less loaded wins: the busy instance wins only when both
    // draws are it (a quarter of the time), so 150 of 200 are expected on the idle one
    // (sd about 6); round robin or random would give about 100.
    assert!(
        idle >= 120,
        "the idle instance got only {idle} of 200: {counts:?}"
    );
    assert_eq!(
        in_flight(&ids[0]).await,
        Some(HELD),
        "the held requests stayed in flight throughout"
    );

    env.upstreams[0].release();
    for h in held {
        let status = tokio::time::timeout(DEADLINE, h).await.unwrap().unwrap();
        assert_eq!(status.unwrap(), 200);
    }
    eventually(DEADLINE, "nothing in flight once answered", || async {
        (in_flight(&ids[0]).await == Some(0)).then_some(())
    })
    .await;
    env.stop().await;
}

#[tokio::test]
async fn below_the_panic_threshold_ejected_instances_serve_again() {
    let env = Env::start("balance", 3, |_| {}).await;
    let ids = env.ids();
    // Both routes use the same instances, so they see the same ejections; they differ
    // only in the panic threshold. One failure ejects, for longer than the test.
    let doc = |panic_threshold: u32| {
        json!({
            "retry": {"attempts": 0},
            "outlier": {"consecutive_failures": 1, "base_ejection_ms": 120_000,
                        "max_ejected_percent": 100, "panic_threshold_percent": panic_threshold},
        })
    };
    env.route("strict", "/strict", doc(0)).await;
    env.route("panic", "/panic", doc(50)).await;

    env.upstreams[0].set_failing(true);
    env.upstreams[1].set_failing(true);
    eventually(DEADLINE, "instances 0 and 1 ejected", || async {
        let _ = env.get("/strict/x").await;
        let both = env.gw.is_ejected(&env.service, &ids[0]).await
            && env.gw.is_ejected(&env.service, &ids[1]).await;
        both.then_some(())
    })
    .await;
    assert!(!env.gw.is_ejected(&env.service, &ids[2]).await);
    env.upstreams[0].set_failing(false);
    env.upstreams[1].set_failing(false);

    // Two of three ejected: one usable instance is under 50 %.
    let hits = |env: &Env| env.upstreams.iter().map(|u| u.hits()).collect::<Vec<_>>();
    let before = hits(&env);
    for _ in 0..30 {
        assert_eq!(served_by(&env, "/strict/x").await, "u2");
    }
    assert_eq!(
        hits(&env)[..2],
        before[..2],
        "without a panic threshold ejected instances get nothing"
    );
    let picks: Vec<String> = {
        let mut picks = Vec::new();
        for _ in 0..30 {
            picks.push(served_by(&env, "/panic/x").await);
        }
        picks
    };
    let counts = tally(&picks);
    for name in ["u0", "u1", "u2"] {
        let n = counts.get(name).copied().unwrap_or(0);
        assert!(n >= 5, "panic mode uses every instance: {counts:?}");
    }
    for id in &ids[..2] {
        assert!(
            env.gw.is_ejected(&env.service, id).await,
            "{id} served while still ejected"
        );
    }
    env.stop().await;
}

#[tokio::test]
async fn a_burst_of_failing_requests_gets_no_more_retries_than_the_budget() {
    // Retries in flight are capped at 10 % of the requests in flight, and at least 10:
    // with 40 requests, 10 retries may be out at once.
    let env = Env::start("balance", 2, |f| f.proxy.retry_budget_percent = 10).await;
    env.route(
        "api",
        "/api",
        json!({"retry": {"attempts": 3}, "outlier": {"consecutive_failures": 0},
               "timeouts": {"per_try_ms": 2000, "total_ms": 20000}}),
    )
    .await;
    let exhausted = || {
        env.gw
            .metric("switchyard_retry_budget_exhausted_total", &[])
    };
    let exhausted_before = exhausted().await;

    // Neither instance answers `/hold` until released: every first try times out after
    // 2 s and asks for a retry on the other instance.
    const CLIENTS: u64 = 40;
    let finished = Arc::new(AtomicU64::new(0));
    let requests: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let req = env.http.get(env.url("/api/hold"));
            let finished = finished.clone();
            tokio::spawn(async move {
                let status = req.send().await.map(|r| r.status());
                finished.fetch_add(1, Ordering::SeqCst);
                status
            })
        })
        .collect();
    eventually(DEADLINE, "every first try at an instance", || {
        let n = env.hits();
        async move { (n >= CLIENTS).then_some(()) }
    })
    .await;
    // None had timed out yet: the first tries were all out together, so all 40 ask for
    // their retry while no granted retry has given its share back.
    assert_eq!(
        finished.load(Ordering::SeqCst),
        0,
        "the machine was too slow to overlap the requests; the budget was not tested"
    );
    // Each request has either sent its retry (an extra try at an instance) or been
    // answered because the budget refused it.
    eventually(DEADLINE, "every request retried or refused", || {
        let retried = env.hits().saturating_sub(CLIENTS);
        let refused = finished.load(Ordering::SeqCst);
        async move { (retried + refused == CLIENTS).then_some(()) }
    })
    .await;
    // Without a budget all 40 would be retried at once (and again, up to 160 tries).
    assert_eq!(env.hits(), CLIENTS + 10, "tries the instances saw");
    assert_eq!(
        finished.load(Ordering::SeqCst),
        30,
        "requests refused a retry"
    );
    assert_eq!(exhausted().await - exhausted_before, 30.0);
    // The 10 retries are still waiting at the instances: answered now, they succeed.
    for u in &env.upstreams {
        u.release();
    }
    let mut statuses = BTreeMap::new();
    for r in requests {
        let status = tokio::time::timeout(DEADLINE, r).await.unwrap().unwrap();
        *statuses.entry(status.unwrap().as_u16()).or_insert(0) += 1;
    }
    assert_eq!(statuses, BTreeMap::from([(200, 10), (504, 30)]));
    assert_eq!(env.hits(), CLIENTS + 10, "no try after the release");
    env.stop().await;
}
