//! Cluster-scope rate limits against a real `redis-server`: two gateways on one registry
//! share a limit of 20/s with burst 20, exactly without leases and within the documented
//! bound with them; Redis killed under load fails no request (local limits apply) and
//! sharing resumes by itself once it is back on the same port.

mod support;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use support::redis_server::RedisServer;
use support::upstream::Upstream;
use support::{eventually, route, start_upstreams, unique, Consul, Gateway, DEADLINE};

const RATE: f64 = 20.0;
const BURST: f64 = 20.0;
/// Concurrent request loops per gateway.
const LOOPS: usize = 4;
/// Every hammer stops after this many requests per loop, whatever the clock says.
const MAX_PER_LOOP: u64 = 200_000;

struct Cluster {
    consul: Consul,
    gateways: Vec<Gateway>,
    key_prefix: String,
    _upstreams: Vec<Upstream>,
}

impl Cluster {
    /// Two gateways on one registry and KV prefix, both using `redis` with `lease`, and
    /// a cluster-scope route `/shared` of 20/s, burst 20 keyed by client IP.
    async fn start(redis: &RedisServer, lease: u32) -> Cluster {
        let cluster = Cluster::start_without_waiting(redis, lease).await;
        cluster.wait_store("up").await;
        cluster
    }

    /// As [`Cluster::start`], without waiting for Redis to answer.
    async fn start_without_waiting(redis: &RedisServer, lease: u32) -> Cluster {
        let consul = Consul::start().await;
        let prefix = format!("{}/", unique("cluster-limits"));
        // Keys of their own, should another test's server ever take over a killed one's port.
        let key_prefix = format!("{}:", unique("rl"));
        let mut gateways = Vec::new();
        for _ in 0..2 {
            let (url, key_prefix) = (redis.url(), key_prefix.clone());
            gateways.push(
                Gateway::start(&consul, &prefix, move |f| {
                    f.rate_limit.redis_url = Some(url);
                    f.rate_limit.key_prefix = key_prefix;
                    f.rate_limit.lease = lease;
                    // Generous for a loaded test machine: the exactness checks below must
                    // measure Redis, not fallbacks (each run asserts there were none).
                    f.rate_limit.budget_ms = 250;
                    f.rate_limit.probe_interval_ms = 100;
                })
                .await,
            );
        }
        let service = unique("svc");
        let upstreams = start_upstreams(&consul, &service, 1).await;
        let doc = route(
            &service,
            "/shared",
            json!({"rate_limit": {"per_second": RATE, "burst": BURST as u32, "scope": "cluster"}}),
        );
        consul.put_kv(&gateways[0].route_key("shared"), &doc).await;
        let id = format!("{service}-0");
        for gw in &gateways {
            gw.wait_upstreams("/shared", &[id.as_str()]).await;
        }
        Cluster {
            consul,
            gateways,
            key_prefix,
            _upstreams: upstreams,
        }
    }

    /// Waits until every gateway's `/rate_limits` shows the store in `state`.
    async fn wait_store(&self, state: &str) {
        for gw in &self.gateways {
            eventually(DEADLINE, &format!("the store is {state}"), || async {
                let (_, body) = gw.admin("/rate_limits").await;
                (body["store"]["state"] == state).then_some(())
            })
            .await;
        }
    }

    async fn fallbacks(&self) -> u64 {
        let mut n = 0;
        for gw in &self.gateways {
            let (_, body) = gw.admin("/rate_limits").await;
            n += body["store"]["fallback_decisions"].as_u64().unwrap_or(0);
        }
        n
    }

    /// Requests `/shared` through both gateways from `LOOPS` loops each for `run`.
    async fn hammer(&self, run: Duration) -> Tally {
        let tally = Arc::new(Counts::default());
        let started = Instant::now();
        let deadline = started + run;
        let mut loops = Vec::new();
        for gw in &self.gateways {
            let url = format!("http://{}/shared/x", gw.app.proxy_addr());
            for _ in 0..LOOPS {
                let (url, tally) = (url.clone(), tally.clone());
                loops.push(tokio::spawn(async move {
                    let http = support::client();
                    for _ in 0..MAX_PER_LOOP {
                        if Instant::now() >= deadline {
                            break;
                        }
                        match http.get(&url).send().await.map(|r| r.status().as_u16()) {
                            Ok(200) => tally.admitted.fetch_add(1, Ordering::Relaxed),
                            Ok(429) => tally.refused.fetch_add(1, Ordering::Relaxed),
                            _ => tally.failed.fetch_add(1, Ordering::Relaxed),
                        };
                    }
                }));
            }
        }
        for l in loops {
            l.await.unwrap();
        }
        Tally {
            admitted: tally.admitted.load(Ordering::Relaxed),
            refused: tally.refused.load(Ordering::Relaxed),
            failed: tally.failed.load(Ordering::Relaxed),
            elapsed: started.elapsed(),
        }
    }

    async fn stop(self) {
        for gw in self.gateways {
            gw.stop().await;
        }
        self.consul.cleanup().await;
    }
}

#[derive(Default)]
struct Counts {
    admitted: AtomicU64,
    refused: AtomicU64,
    failed: AtomicU64,
}

#[derive(Debug)]
struct Tally {
    admitted: u64,
    refused: u64,
    failed: u64,
    elapsed: Duration,
}

impl Tally {
    /// What one bucket of 20/s, burst 20, admits over this run (full at the start).
    fn one_bucket(&self) -> f64 {
        BURST + RATE * self.elapsed.as_secs_f64()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_gateways_without_leases_admit_what_one_bucket_would() {
    let redis = RedisServer::start();
    let cluster = Cluster::start(&redis, 0).await;
    let t = cluster.hammer(Duration::from_secs(5)).await;
    support::note(&format!(
        "no lease: {t:?}, one bucket {:.0}",
        t.one_bucket()
    ));
    assert_eq!(t.failed, 0, "{t:?}");
    assert!(t.refused > t.admitted, "the limit was reached: {t:?}");
    let expected = t.one_bucket();
    let admitted = t.admitted as f64;
    assert!(
        (admitted - expected).abs() <= 0.1 * expected,
        "admitted {admitted}, one bucket admits {expected:.0} (two apart would be {:.0}): {t:?}",
        2.0 * expected
    );
    assert_eq!(
        cluster.fallbacks().await,
        0,
        "every decision came from Redis"
    );
    // One key in Redis for the one client, hash-tagged, expiring once its bucket refills.
    let names = redis.key_names();
    assert_eq!(names.len(), 1, "{names:?}");
    let tagged = names[0].strip_prefix(&cluster.key_prefix);
    assert!(
        tagged.is_some_and(|t| t.starts_with('{') && t.ends_with('}') && t.len() == 34),
        "{names:?}"
    );
    let ttl = redis.ttls()[0];
    assert!(
        (1..=1000).contains(&ttl),
        "PTTL {ttl} ms (a full bucket refills in 1 s)"
    );
    eventually(DEADLINE, "the idle key expires", || {
        let keys = redis.keys();
        async move { (keys == 0).then_some(()) }
    })
    .await;
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_leases_two_gateways_stay_within_the_overshoot_bound() {
    const LEASE: u32 = 5;
    let redis = RedisServer::start();
    let cluster = Cluster::start(&redis, LEASE).await;
    let t = cluster.hammer(Duration::from_secs(5)).await;
    support::note(&format!(
        "lease {LEASE}: {t:?}, one bucket {:.0}",
        t.one_bucket()
    ));
    assert_eq!(t.failed, 0, "{t:?}");
    // The documented bound: at most N gateways × lease beyond the exact figure (and, since
    // unspent leases are lost rather than returned, at most as many below it).
    let slack = f64::from(2 * LEASE);
    let expected = t.one_bucket();
    let admitted = t.admitted as f64;
    assert!(
        admitted <= 1.1 * expected + slack && admitted >= 0.9 * expected - slack,
        "admitted {admitted}, one bucket admits {expected:.0} ± {slack} leased: {t:?}"
    );
    assert_eq!(cluster.fallbacks().await, 0, "every grant came from Redis");
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_killed_under_load_fails_no_request_and_sharing_resumes_after_a_restart() {
    let mut redis = RedisServer::start();
    let cluster = Cluster::start(&redis, 0).await;

    // Redis dies 0.5 s into a 4 s run: every request still gets 200 or 429.
    let load = cluster.hammer(Duration::from_secs(4));
    let kill = async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        redis.kill();
    };
    let (down, ()) = tokio::join!(load, kill);
    support::note(&format!("Redis killed mid-run: {down:?}"));
    assert_eq!(
        down.failed, 0,
        "no request fails because Redis died: {down:?}"
    );
    // Each gateway's own bucket (full: never used while Redis answered) decides for the
    // last 3.5 s: two buckets' worth, far more than the shared one could give.
    let local_only = 2.0 * (BURST + RATE * 3.5);
    let shared_at_most = BURST + RATE * down.elapsed.as_secs_f64();
    assert!(
        down.admitted as f64 >= 0.85 * local_only && (down.admitted as f64) > shared_at_most,
        "local limits apply while Redis is down: {down:?}"
    );
    assert!(
        (down.admitted as f64) <= local_only + shared_at_most,
        "still limited: {down:?}"
    );
    cluster.wait_store("down").await;
    assert!(cluster.fallbacks().await > 0);
    let (_, body) = cluster.gateways[0].admin("/rate_limits").await;
    assert!(body["store"]["last_error"].is_string(), "{body}");
    assert_eq!(body["store"]["on_store_error"], "local");

    // Back on the same port (empty): both gateways return to it by themselves.
    redis.restart();
    cluster.wait_store("up").await;
    let before = cluster.fallbacks().await;
    let shared = cluster.hammer(Duration::from_secs(3)).await;
    support::note(&format!("Redis restarted: {shared:?}"));
    assert_eq!(shared.failed, 0, "{shared:?}");
    let expected = shared.one_bucket();
    assert!(
        (shared.admitted as f64 - expected).abs() <= 0.1 * expected,
        "shared again: {shared:?}, one bucket admits {expected:.0}"
    );
    assert_eq!(cluster.fallbacks().await, before, "Redis decided again");
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn gateways_started_before_redis_serve_with_local_limits_then_share_once_it_answers() {
    let mut redis = RedisServer::start();
    redis.kill();
    let cluster = Cluster::start_without_waiting(&redis, 0).await;
    cluster.wait_store("down").await;
    let early = cluster.hammer(Duration::from_secs(1)).await;
    support::note(&format!("before Redis: {early:?}"));
    assert_eq!(early.failed, 0, "{early:?}");
    assert!(
        early.admitted as f64 >= 2.0 * BURST,
        "each gateway's own bucket decides: {early:?}"
    );

    redis.restart();
    cluster.wait_store("up").await;
    let shared = cluster.hammer(Duration::from_secs(2)).await;
    support::note(&format!("after Redis started: {shared:?}"));
    assert_eq!(shared.failed, 0, "{shared:?}");
    let expected = shared.one_bucket();
    assert!(
        (shared.admitted as f64 - expected).abs() <= 0.1 * expected,
        "shared once Redis answers: {shared:?}, one bucket admits {expected:.0}"
    );
    cluster.stop().await;
}
