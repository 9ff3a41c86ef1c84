//! The data plane end to end: a Consul (dev registry, or a real agent with
//! `CONSUL_HTTP_ADDR`), real upstream servers and the gateway on loopback ports, driven
//! over real sockets.

mod support;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use support::upstream::Upstream;
use support::{eventually, json_of, route, unique, Env, Svc, DEADLINE};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// An env with `n` upstreams and the default config.
async fn env(n: usize) -> Env {
    Env::start("proxy", n, |_| {}).await
}

#[tokio::test]
async fn a_request_is_forwarded_with_proxy_headers_and_without_hop_by_hop_ones() {
    let env = env(1).await;
    env.route("api", "/api", json!({"strip_prefix": true}))
        .await;
    let resp = env
        .http
        .get(env.url("/api/users/7?q=1&b=%20x"))
        .header("connection", "x-drop-me")
        .header("x-drop-me", "secret")
        .header("x-request-id", "client-id-1")
        .header("x-forwarded-for", "6.6.6.6")
        .header("x-forwarded-proto", "https")
        .header("x-forwarded-host", "forged.example")
        .header("via", "1.0 client-side-proxy")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-request-id"], "client-id-1");
    assert!(resp.headers()["via"]
        .to_str()
        .unwrap()
        .contains("switchyard"));
    let seen = json_of(resp).await;
    assert_eq!(
        seen["path"], "/users/7?q=1&b=%20x",
        "prefix stripped, query kept"
    );
    let h = &seen["headers"];
    assert_eq!(
        h["x-forwarded-for"], "127.0.0.1",
        "untrusted client XFF replaced"
    );
    assert_eq!(h["x-forwarded-proto"], "http", "the client's copy replaced");
    assert_eq!(
        h["x-forwarded-host"], "127.0.0.1",
        "the client's copy replaced"
    );
    assert_eq!(h["x-request-id"], "client-id-1");
    assert_eq!(
        h["via"], "1.0 client-side-proxy, 1.1 switchyard",
        "the gateway appends to Via"
    );
    assert!(
        h.get("x-drop-me").is_none(),
        "Connection-listed header removed"
    );

    let resp = env.get("/api/x").await;
    let id = resp.headers()["x-request-id"].to_str().unwrap().to_string();
    assert_eq!(id.len(), 32, "generated request id");
    let seen = json_of(resp).await;
    assert_eq!(seen["headers"]["x-request-id"], id.as_str());

    // An instance's own request id gives way to the gateway's; its Via is kept.
    let resp = env.get("/api/x?own_id=1").await;
    let ids: Vec<_> = resp.headers().get_all("x-request-id").iter().collect();
    assert_eq!(ids.len(), 1, "one request id: {ids:?}");
    assert_eq!(ids[0].len(), 32);
    let via: Vec<_> = resp.headers().get_all("via").iter().collect();
    assert_eq!(via, ["1.1 inner-proxy", "1.1 switchyard"]);
    env.stop().await;
}

#[tokio::test]
async fn prefixes_match_on_segment_boundaries_and_paths_are_normalised() {
    let env = env(1).await;
    env.route("public", "/public", json!({})).await;
    // The admin route demands an API key: reaching it through /public/.. must still ask.
    env.route("admin", "/admin", json!({"auth": {"api_key": true}}))
        .await;
    assert_eq!(env.get("/public").await.status(), 200);
    assert_eq!(env.get("/public/x").await.status(), 200);
    let resp = env.get("/publicx").await;
    assert_eq!(resp.status(), 404);
    let body = json_of(resp).await;
    assert_eq!(body["error"], "no_route");
    assert!(body["request_id"].as_str().is_some_and(|s| !s.is_empty()));
    let before = env.upstreams[0].hits();
    for sneaky in [
        "/public/../admin",
        "/public/%2e%2e/admin",
        "/public/.%2E/admin/",
        "//admin",
        "/public/./../admin",
    ] {
        // Raw request: HTTP clients would normalise these themselves.
        let (status, _) = raw_get(&env, sneaky).await;
        assert_eq!(status, 401, "{sneaky} must land on the admin route");
    }
    assert_eq!(
        env.upstreams[0].hits(),
        before,
        "nothing reached the upstream"
    );
    let (status, body) = raw_get(&env, "/public/%zz").await;
    assert_eq!(status, 400, "{body}");
    // What the instance is sent: a normal path as it came, query and all; a normalised one
    // rebuilt with the query kept; an absolute-form target as its path and query.
    for (sent, forwarded) in [
        ("/public/x?a=1&b=%20", "/public/x?a=1&b=%20"),
        ("/public/./y/../x?a=1", "/public/x?a=1"),
        ("/public/x/", "/public/x/"),
        ("http://t/public/x?a=1", "/public/x?a=1"),
    ] {
        let (status, text) = raw_get(&env, sent).await;
        assert_eq!(status, 200, "{sent}: {text}");
        assert!(
            text.contains(&format!("\"path\":\"{forwarded}\"")),
            "{sent} must reach the instance as {forwarded}: {text}"
        );
    }
    env.stop().await;
}

/// Sends `GET <path>` exactly as written and returns the status and body.
async fn raw_get(env: &Env, path: &str) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(env.gw.app.proxy_addr())
        .await
        .unwrap();
    let req = format!("GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(DEADLINE, s.read_to_end(&mut out))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&out).to_string();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, text)
}

#[tokio::test]
async fn hosts_methods_and_rewrites_pick_the_route() {
    let env = env(1).await;
    env.consul
        .put_kv(
            &env.gw.route_key("exact"),
            &route(
                &env.service,
                "/",
                json!({"host": "api.example.com", "rewrite_prefix": "/exact"}),
            ),
        )
        .await;
    env.consul
        .put_kv(
            &env.gw.route_key("wild"),
            &route(
                &env.service,
                "/",
                json!({"host": "*.example.com", "rewrite_prefix": "/wild", "methods": ["GET"]}),
            ),
        )
        .await;
    let path_for = |host: &'static str, method: reqwest::Method| {
        let env = &env;
        async move {
            let resp = env
                .http
                .request(method, env.url("/p"))
                .header("host", host)
                .send()
                .await
                .unwrap();
            if resp.status() != 200 {
                return resp.status().to_string();
            }
            json_of(resp).await["path"].as_str().unwrap().to_string()
        }
    };
    eventually(DEADLINE, "both routes live", || async {
        (path_for("x.example.com", reqwest::Method::GET).await == "/wild/p"
            && path_for("api.example.com", reqwest::Method::GET).await == "/exact/p")
            .then_some(())
    })
    .await;
    assert_eq!(
        path_for("API.example.com:8080", reqwest::Method::GET).await,
        "/exact/p"
    );
    assert_eq!(
        path_for("a.b.example.com", reqwest::Method::GET).await,
        "404 Not Found"
    );
    assert_eq!(
        path_for("x.example.com", reqwest::Method::DELETE).await,
        "404 Not Found"
    );
    env.stop().await;
}

#[tokio::test]
async fn a_header_route_wins_at_its_prefix_only_with_that_exact_header_value() {
    let env = env(1).await;
    let canary_service = unique("canary");
    let canary = Upstream::start("canary").await;
    env.consul
        .register(&Svc::new(
            &canary_service,
            &format!("{canary_service}-0"),
            canary.port(),
        ))
        .await;
    // Named to sort after the stable route: the header route must win by being more
    // specific, not by its name.
    env.route("a-stable", "/app", json!({})).await;
    for (name, prefix) in [("z-canary", "/app"), ("z-beta", "/app/beta")] {
        env.consul
            .put_kv(
                &env.gw.route_key(name),
                &route(
                    &canary_service,
                    prefix,
                    json!({"headers": {"X-Canary": "1"}}),
                ),
            )
            .await;
    }
    let served_by = |path: &'static str, canary: Option<&'static str>| {
        let mut req = env.http.get(env.url(path));
        if let Some(value) = canary {
            req = req.header("x-canary", value);
        }
        async move {
            let resp = req.send().await.unwrap();
            assert_eq!(resp.status(), 200, "{path} {canary:?}");
            resp.headers()["x-upstream"].to_str().unwrap().to_string()
        }
    };
    eventually(DEADLINE, "both header routes serve", || async {
        let app = served_by("/app/x", Some("1")).await;
        let beta = served_by("/app/beta/x", Some("1")).await;
        (app == "canary" && beta == "canary").then_some(())
    })
    .await;

    for path in ["/app", "/app/x", "/app/beta", "/app/beta/deep/x"] {
        assert_eq!(served_by(path, Some("1")).await, "canary", "{path}");
        // Any other value, or none, falls through to the route without the condition:
        // at the same prefix, or at the parent prefix for `/app/beta`.
        for other in [None, Some("0"), Some("11"), Some("1 1"), Some("true")] {
            assert_eq!(served_by(path, other).await, "u0", "{path} {other:?}");
        }
    }
    // Header names match in any spelling; the value must be exact.
    let mut raw = Raw::connect(&env).await;
    raw.send("GET /app/x HTTP/1.1\r\nHost: t\r\nX-CANARY: 1\r\n\r\n")
        .await;
    let answer = raw.answer(false).await;
    assert_eq!(answer.status, 200);
    assert_eq!(answer.header("x-upstream"), Some("canary"));
    // The header routes nothing outside the header routes' prefixes.
    let before = canary.hits();
    let resp = env
        .get_with("/other", "x-canary", "1")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
    assert_eq!(canary.hits(), before);
    env.stop().await;
}

#[tokio::test]
async fn killing_an_instance_during_two_thousand_gets_fails_none() {
    let env = env(3).await;
    env.route(
        "api",
        "/api",
        json!({"retry": {"attempts": 2}, "outlier": {"consecutive_failures": 2, "base_ejection_ms": 5000},
               "timeouts": {"connect_ms": 500, "per_try_ms": 2000, "total_ms": 5000}}),
    )
    .await;
    let failed = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicU64::new(0));
    let mut workers = Vec::new();
    for w in 0..20 {
        let (http, url, failed, done) = (
            env.http.clone(),
            env.url("/api/slow?ms=2"),
            failed.clone(),
            done.clone(),
        );
        workers.push(tokio::spawn(async move {
            for _ in 0..100 {
                match http.get(&url).send().await {
                    Ok(r) if r.status() == 200 => {}
                    Ok(r) => {
                        eprintln!("worker {w}: status {}", r.status());
                        failed.fetch_add(1, Ordering::SeqCst);
                    }
                    Err(e) => {
                        eprintln!("worker {w}: {e}");
                        failed.fetch_add(1, Ordering::SeqCst);
                    }
                }
                done.fetch_add(1, Ordering::SeqCst);
            }
        }));
    }
    eventually(DEADLINE, "a quarter of the requests done", || {
        let n = done.load(Ordering::SeqCst);
        async move { (n >= 500).then_some(()) }
    })
    .await;
    env.upstreams[1].kill();
    for w in workers {
        tokio::time::timeout(Duration::from_secs(60), w)
            .await
            .unwrap()
            .unwrap();
    }
    assert_eq!(done.load(Ordering::SeqCst), 2000);
    assert_eq!(failed.load(Ordering::SeqCst), 0, "no request may fail");
    assert!(env.upstreams[0].hits() > 500 && env.upstreams[2].hits() > 500);
    env.stop().await;
}

#[tokio::test]
async fn a_post_is_not_retried_but_a_get_is() {
    let env = env(3).await;
    env.route(
        "api",
        "/api",
        json!({"retry": {"attempts": 2}, "outlier": {"consecutive_failures": 0}}),
    )
    .await;
    let total = |env: &Env| env.upstreams.iter().map(|u| u.hits()).sum::<u64>();
    let resp = env
        .http
        .post(env.url("/api/die"))
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 502);
    assert_eq!(json_of(resp).await["error"], "upstream_error");
    assert_eq!(total(&env), 1, "the POST reached one instance once");
    let resp = env.get("/api/die").await;
    assert_eq!(resp.status(), 502);
    assert_eq!(total(&env), 4, "the GET was tried on all three instances");
    assert!(
        env.upstreams.iter().all(|u| u.hits() >= 1),
        "each instance tried once"
    );
    env.stop().await;
}

#[tokio::test]
async fn a_post_answered_with_a_retry_status_is_not_sent_again() {
    let env = env(2).await;
    let retry = |non_idempotent: bool| {
        json!({"retry": {"attempts": 1, "on_status": [503], "non_idempotent": non_idempotent},
               "outlier": {"consecutive_failures": 0}})
    };
    env.route("once", "/once", retry(false)).await;
    env.route("again", "/again", retry(true)).await;
    for u in &env.upstreams {
        u.set_failing(true);
    }
    let post = |path: &str| env.http.post(env.url(path)).body("x").send();
    let resp = post("/once/x").await.unwrap();
    assert_eq!(resp.status(), 503, "the instance's answer is passed on");
    assert_eq!(env.hits(), 1, "the POST reached one instance once");
    let resp = post("/again/x").await.unwrap();
    assert_eq!(resp.status(), 503);
    assert_eq!(env.hits(), 3, "with non_idempotent the POST is tried twice");
    env.stop().await;
}

#[tokio::test]
async fn a_slow_upstream_gets_a_504_and_a_failing_one_is_retried_on_configured_statuses() {
    let env = env(2).await;
    env.route(
        "api",
        "/api",
        json!({"timeouts": {"per_try_ms": 200, "total_ms": 500}, "retry": {"attempts": 1, "on_status": [503]},
               "outlier": {"consecutive_failures": 0}}),
    )
    .await;
    let start = Instant::now();
    let resp = env.get("/api/slow?ms=3000").await;
    assert_eq!(resp.status(), 504);
    assert_eq!(json_of(resp).await["error"], "upstream_timeout");
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "gave up before the upstream answered"
    );
    env.upstreams[0].set_failing(true);
    for _ in 0..20 {
        let resp = env.get("/api/ok").await;
        assert_eq!(resp.status(), 200, "503 retried on the healthy instance");
    }
    env.upstreams[1].set_failing(true);
    assert_eq!(
        env.get("/api/ok").await.status(),
        503,
        "the last answer is passed on"
    );
    env.stop().await;
}

#[tokio::test]
async fn a_failing_instance_is_ejected_and_comes_back() {
    let env = env(2).await;
    // The ejection lasts long enough that the 20 requests below cannot outlive it on a
    // loaded machine (checked below), and short enough to wait out.
    env.route(
        "api",
        "/api",
        json!({"retry": {"attempts": 1, "on_status": [503]},
               "outlier": {"consecutive_failures": 3, "base_ejection_ms": 2000, "max_ejected_percent": 50}}),
    )
    .await;
    let ids = env.ids();
    let (bad, good) = (ids[0].as_str(), ids[1].as_str());
    assert!(!env.gw.is_ejected(&env.service, bad).await);
    env.upstreams[0].set_failing(true);
    // Every answer is a 200 (the 503 is retried on the healthy instance) until the
    // failing instance has failed three times in a row and is ejected.
    eventually(DEADLINE, "the failing instance is ejected", || async {
        assert_eq!(env.get("/api/x").await.status(), 200);
        env.gw.is_ejected(&env.service, bad).await.then_some(())
    })
    .await;
    assert!(
        !env.gw.is_ejected(&env.service, good).await,
        "only the failing instance is ejected"
    );
    let bad_before = env.upstreams[0].hits();
    for _ in 0..20 {
        assert_eq!(env.get("/api/x").await.status(), 200);
    }
    assert!(
        env.gw.is_ejected(&env.service, bad).await,
        "still ejected after the 20 requests, so it was out for all of them"
    );
    assert_eq!(env.upstreams[0].hits(), bad_before, "ejected: no traffic");
    env.upstreams[0].set_failing(false);
    eventually(DEADLINE, "the ejection time runs out", || async {
        (!env.gw.is_ejected(&env.service, bad).await).then_some(())
    })
    .await;
    for _ in 0..10 {
        assert_eq!(env.get("/api/x").await.status(), 200);
    }
    assert!(
        env.upstreams[0].hits() > bad_before,
        "back in rotation after the ejection time"
    );
    env.stop().await;
}

#[tokio::test]
async fn consistent_hashing_keeps_keys_on_their_instance_under_churn() {
    let env = env(4).await;
    env.route(
        "api",
        "/api",
        json!({"lb": "consistent_hash", "hash_on": "header:x-user"}),
    )
    .await;
    let owner = |user: String| {
        let env = &env;
        async move {
            let resp = env
                .http
                .get(env.url("/api/x"))
                .header("x-user", user)
                .send()
                .await
                .unwrap();
            resp.headers()["x-upstream"].to_str().unwrap().to_string()
        }
    };
    let mut before = Vec::new();
    for u in 0..60 {
        before.push(owner(format!("user-{u}")).await);
    }
    for (u, was) in before.iter().enumerate() {
        assert_eq!(&owner(format!("user-{u}")).await, was, "stable");
    }
    let distinct: std::collections::HashSet<_> = before.iter().collect();
    assert!(distinct.len() >= 3, "keys spread: {distinct:?}");
    env.consul.deregister(&format!("{}-2", env.service)).await;
    let ids = env.ids();
    env.gw
        .wait_upstreams("/api", &[&ids[0], &ids[1], &ids[3]])
        .await;
    for (u, was) in before.iter().enumerate() {
        let now = owner(format!("user-{u}")).await;
        if was != "u2" {
            assert_eq!(&now, was, "user-{u} moved although its instance stayed");
        } else {
            assert_ne!(now, "u2");
        }
    }
    env.stop().await;
}

#[tokio::test]
async fn a_client_that_goes_away_mid_request_is_not_counted_in_flight() {
    let env = env(1).await;
    env.route("api", "/api", json!({"lb": "least_request"}))
        .await;
    let in_flight = || {
        let snap = env.gw.snapshot();
        let m = snap
            .lookup("", "/api", &http::Method::GET, &http::HeaderMap::new())
            .unwrap();
        m.upstreams.endpoints[0]
            .stats
            .in_flight
            .load(Ordering::SeqCst)
    };
    let impatient = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    assert!(impatient
        .get(env.url("/api/slow?ms=3000"))
        .send()
        .await
        .is_err());
    eventually(DEADLINE, "in-flight count back to 0", || {
        let n = in_flight();
        async move { (n == 0).then_some(()) }
    })
    .await;
    assert_eq!(env.get("/api/x").await.status(), 200);
    assert_eq!(
        in_flight(),
        0,
        "a finished response leaves nothing in flight"
    );
    env.stop().await;
}

#[tokio::test]
async fn an_empty_pool_fails_fast_with_503() {
    let env = env(0).await;
    env.consul
        .put_kv(
            &env.gw.route_key("api"),
            &route(&env.service, "/api", json!({})),
        )
        .await;
    env.gw.wait_upstreams("/api", &[]).await;
    let start = Instant::now();
    let resp = env.get("/api").await;
    assert_eq!(resp.status(), 503);
    assert_eq!(json_of(resp).await["error"], "no_instance");
    assert!(start.elapsed() < Duration::from_secs(1));
    env.stop().await;
}

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn a_200_mb_body_streams_both_ways_in_bounded_memory() {
    const MB: u64 = 1024 * 1024;
    let env = env(1).await;
    env.route(
        "big",
        "/big",
        json!({"strip_prefix": true, "max_body_bytes": 300 * MB}),
    )
    .await;
    let rss_before = rss_kib();
    let chunk = bytes::Bytes::from(vec![b'y'; 256 * 1024]);
    let chunks = (200 * MB / chunk.len() as u64) as usize;
    let stream = futures_util::stream::iter(
        (0..chunks).map(move |_| Ok::<_, std::io::Error>(hyper::body::Frame::data(chunk.clone()))),
    );
    let resp = env
        .http
        .post(env.url("/big/count"))
        .body(reqwest::Body::wrap(http_body_util::StreamBody::new(stream)))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.text().await.unwrap(), (200 * MB).to_string());
    let mut resp = env.get(&format!("/big/bytes?n={}", 200 * MB)).await;
    assert_eq!(resp.status(), 200);
    let mut received = 0u64;
    while let Some(chunk) = resp.chunk().await.unwrap() {
        received += chunk.len() as u64;
    }
    assert_eq!(received, 200 * MB);
    let grown = rss_kib().saturating_sub(rss_before);
    assert!(grown < 100 * 1024, "RSS grew by {grown} KiB moving 400 MB");
    env.stop().await;
}

#[tokio::test]
async fn bodies_over_the_limit_get_413_even_without_a_content_length() {
    let env = env(1).await;
    env.route(
        "small",
        "/small",
        json!({"strip_prefix": true, "max_body_bytes": 1000}),
    )
    .await;
    let resp = env
        .http
        .post(env.url("/small/count"))
        .body(vec![0u8; 2000])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 413);
    let hits = env.upstreams[0].hits();
    assert_eq!(hits, 0, "refused on Content-Length before the upstream");
    let stream = futures_util::stream::iter((0..10).map(|_| {
        Ok::<_, std::io::Error>(hyper::body::Frame::data(bytes::Bytes::from(vec![0u8; 500])))
    }));
    let resp = env
        .http
        .post(env.url("/small/count"))
        .body(reqwest::Body::wrap(http_body_util::StreamBody::new(stream)))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 413, "chunked body cut at the limit");
    let resp = env
        .http
        .post(env.url("/small/count"))
        .body(vec![0u8; 900])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.text().await.unwrap(), "900");
    env.stop().await;
}

#[tokio::test]
async fn websockets_are_proxied() {
    let env = env(1).await;
    env.route("ws", "/ws", json!({})).await;
    let url = format!("ws://{}/ws", env.gw.app.proxy_addr());
    let (mut ws, resp) = tokio_tungstenite::connect_async(url).await.unwrap();
    assert_eq!(resp.status(), 101);
    for i in 0..5 {
        ws.send(tokio_tungstenite::tungstenite::Message::text(format!(
            "hello {i}"
        )))
        .await
        .unwrap();
        let echo = tokio::time::timeout(DEADLINE, ws.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(echo.into_text().unwrap().as_str(), format!("hello {i}"));
    }
    ws.close(None).await.unwrap();
    env.stop().await;
}

#[tokio::test]
async fn h2c_clients_and_http2_upstreams_work() {
    let env = env(1).await;
    env.route("h2", "/h2", json!({"upstream_protocol": "http2"}))
        .await;
    env.consul
        .put_kv(
            &env.gw.route_key("h1"),
            &route(&env.service, "/h1", json!({})),
        )
        .await;
    let h2 = support::h2c_client();
    let resp = h2
        .get(env.url("/h2/x?own_id=1"))
        .header("x-forwarded-host", "forged.example")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.version(), reqwest::Version::HTTP_2);
    assert_eq!(resp.status(), 200);
    let id = resp.headers()["x-request-id"].to_str().unwrap().to_string();
    assert_eq!(id.len(), 32, "the gateway's id, not the instance's");
    let via: Vec<_> = resp.headers().get_all("via").iter().collect();
    assert_eq!(via, ["1.1 inner-proxy", "1.1 switchyard"]);
    let seen = json_of(resp).await;
    assert_eq!(seen["version"], "HTTP/2.0", "h2c to the upstream");
    let h = &seen["headers"];
    assert_eq!(h["x-forwarded-for"], "127.0.0.1");
    assert_eq!(h["x-forwarded-proto"], "http");
    assert_eq!(h["x-forwarded-host"], "127.0.0.1");
    assert_eq!(h["x-request-id"], id.as_str());
    assert_eq!(h["via"], "1.1 switchyard");
    let body = eventually(DEADLINE, "h1 route", || {
        let h2 = h2.clone();
        let url = env.url("/h1/x");
        async move {
            let r = h2.get(url).send().await.ok()?;
            (r.status() == 200).then_some(r)
        }
    })
    .await;
    assert_eq!(
        json_of(body).await["version"],
        "HTTP/1.1",
        "HTTP/1.1 to the upstream"
    );
    env.stop().await;
}

#[tokio::test]
async fn grpc_trailers_pass_through_over_http2() {
    use http_body_util::BodyExt;
    let env = env(1).await;
    env.route("grpc", "/pkg.Svc", json!({"upstream_protocol": "http2"}))
        .await;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build_http::<http_body_util::Full<bytes::Bytes>>();
    let req = http::Request::post(env.url("/pkg.Svc/grpc"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(http_body_util::Full::new(bytes::Bytes::from_static(
            b"\0\0\0\0\0",
        )))
        .unwrap();
    let resp = tokio::time::timeout(DEADLINE, client.request(req))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(resp.status(), 200);
    let collected = resp.into_body().collect().await.unwrap();
    let trailers = collected.trailers().cloned().expect("trailers arrive");
    assert_eq!(trailers["grpc-status"], "0");
    assert_eq!(&collected.to_bytes()[..], b"\0\0\0\0\x02hi");
    env.stop().await;
}

/// An HTTP/2 connection (hyper's client, h2c) to the gateway: its request sender, and a
/// task that ends when the gateway closes the connection.
async fn h2c_connection(
    env: &Env,
) -> (
    hyper::client::conn::http2::SendRequest<http_body_util::Empty<bytes::Bytes>>,
    tokio::task::JoinHandle<()>,
) {
    let tcp = tokio::net::TcpStream::connect(env.gw.app.proxy_addr())
        .await
        .unwrap();
    let (sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .unwrap();
    (sender, tokio::spawn(async move { drop(conn.await) }))
}

async fn h2c_get(
    sender: &mut hyper::client::conn::http2::SendRequest<http_body_util::Empty<bytes::Bytes>>,
    path: &str,
) -> u16 {
    let req = http::Request::get(format!("http://t{path}"))
        .body(http_body_util::Empty::new())
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    let status = resp.status().as_u16();
    http_body_util::BodyExt::collect(resp.into_body())
        .await
        .unwrap();
    status
}

#[tokio::test]
async fn an_idle_http2_connection_is_closed_but_not_one_with_a_request_in_flight() {
    let env = Env::start("proxy", 1, |f| f.proxy.idle_timeout_s = 1).await;
    env.route("api", "/api", json!({})).await;

    // Idle after one answer: closed (GOAWAY) one to two timeouts later.
    let (mut sender, closed) = h2c_connection(&env).await;
    assert_eq!(h2c_get(&mut sender, "/api/x").await, 200);
    let started = Instant::now();
    tokio::time::timeout(Duration::from_secs(5), closed)
        .await
        .expect("an idle HTTP/2 connection is closed")
        .unwrap();
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "closed after {:?}, before the idle timeout",
        started.elapsed()
    );

    // A request whose answer takes three timeouts, no byte moving meanwhile: the
    // connection stays until it is answered.
    let (mut sender, closed) = h2c_connection(&env).await;
    assert_eq!(h2c_get(&mut sender, "/api/slow?ms=3000").await, 200);
    assert!(!closed.is_finished(), "closed under a request in flight");
    env.stop().await;
}

#[tokio::test]
async fn oversized_heads_get_431_and_slow_heads_are_cut_off() {
    let env = Env::start("proxy", 1, |f| {
        f.proxy.max_header_bytes = 8192;
        f.proxy.header_read_timeout_ms = 300;
    })
    .await;
    env.route("api", "/api", json!({})).await;
    let resp = env
        .http
        .get(env.url("/api"))
        .header("x-big", "a".repeat(20_000))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 431);
    let mut s = tokio::net::TcpStream::connect(env.gw.app.proxy_addr())
        .await
        .unwrap();
    s.write_all(b"GET /api HTTP/1.1\r\nHost: t\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await;
    assert!(closed.is_ok(), "a head that never ends is cut off");
    env.stop().await;
}

#[tokio::test]
async fn shutdown_drains_in_flight_requests() {
    let env = env(1).await;
    env.route("api", "/api", json!({})).await;
    // Held at the instance until the test releases it: in flight for as long as needed.
    let url = env.url("/api/hold");
    let http = env.http.clone();
    let held = tokio::spawn(async move { http.get(url).send().await.map(|r| r.status()) });
    // A keep-alive connection with nothing in flight.
    let mut idle = Raw::connect(&env).await;
    idle.send("GET /api/x HTTP/1.1\r\nHost: t\r\n\r\n").await;
    assert_eq!(idle.answer(false).await.status, 200);
    eventually(DEADLINE, "the held request reaches the instance", || {
        let n = env.upstreams[0].hits();
        async move { (n == 2).then_some(()) }
    })
    .await;
    let addr = env.gw.app.proxy_addr();
    let Env {
        gw,
        consul,
        upstreams,
        ..
    } = env;
    let stop = tokio::spawn(gw.stop());
    assert!(idle.closed().await, "an idle connection is closed at once");
    eventually(DEADLINE, "the listener closes while draining", || async {
        tokio::net::TcpStream::connect(addr)
            .await
            .is_err()
            .then_some(())
    })
    .await;
    // Both happened while the held request was unanswered: nothing waited for the drain.
    assert!(!held.is_finished(), "the held request was cut off");
    // And the drain waits for the request: the gateway does not stop while it is held.
    // (A negative needs a window; half a second is plenty for everything else to stop,
    // and a slow machine can only make this pass more easily, never fail.)
    let mut stop = stop;
    assert!(
        tokio::time::timeout(Duration::from_millis(500), &mut stop)
            .await
            .is_err(),
        "the gateway stopped with a request in flight"
    );
    assert!(!held.is_finished(), "the held request was cut off");
    upstreams[0].release();
    let status = tokio::time::timeout(DEADLINE, held).await.unwrap().unwrap();
    assert_eq!(status.unwrap(), 200, "in-flight request finished");
    tokio::time::timeout(DEADLINE, stop).await.unwrap().unwrap();
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "no longer accepting"
    );
    consul.cleanup().await;
}

/// An instance that answers each request as soon as its head is in, and after answering a
/// POST keeps reading that connection without answering again (it is still taking the
/// body). Returns its port and the connections it accepted.
async fn early_answering_upstream() -> (u16, Arc<AtomicU64>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let accepted = Arc::new(AtomicU64::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 * 1024];
                let mut pending = Vec::new();
                loop {
                    let Ok(n) = s.read(&mut buf).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    pending.extend_from_slice(&buf[..n]);
                    let Some(end) = pending.windows(4).position(|w| w == b"\r\n\r\n") else {
                        continue;
                    };
                    let post = pending.starts_with(b"POST");
                    pending.drain(..end + 4);
                    let reply = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                    if s.write_all(reply).await.is_err() {
                        return;
                    }
                    if post {
                        while matches!(s.read(&mut buf).await, Ok(n) if n > 0) {}
                        return;
                    }
                }
            });
        }
    });
    (port, accepted)
}

#[tokio::test]
async fn a_connection_still_sending_a_request_body_is_not_lent_to_the_next_request() {
    // The instance answers a large POST before its body is in; the client is slow to send
    // the rest. That upstream connection is busy until the body is through, so the next
    // request must get another connection instead of waiting behind the upload.
    let env = env(0).await;
    let (port, accepted) = early_answering_upstream().await;
    let id = format!("{}-early", env.service);
    env.consul
        .register(&support::Svc::new(&env.service, &id, port))
        .await;
    env.consul
        .put_kv(
            &env.gw.route_key("early"),
            &route(
                &env.service,
                "/early",
                json!({"timeouts": {"per_try_ms": 20000, "total_ms": 20000}}),
            ),
        )
        .await;
    env.gw.wait_upstreams("/early", &[id.as_str()]).await;

    let mut upload = tokio::net::TcpStream::connect(env.gw.app.proxy_addr())
        .await
        .unwrap();
    let head = "POST /early/upload HTTP/1.1\r\nHost: t\r\nContent-Length: 1000000\r\n\r\n";
    upload.write_all(head.as_bytes()).await.unwrap();
    upload.write_all(&[b'x'; 1000]).await.unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !got.ends_with(b"\r\n\r\nok") {
        let n = tokio::time::timeout(DEADLINE, upload.read(&mut buf))
            .await
            .expect("the early answer reaches the client")
            .unwrap();
        assert!(
            n > 0,
            "gateway closed the upload: {}",
            String::from_utf8_lossy(&got)
        );
        got.extend_from_slice(&buf[..n]);
    }
    assert!(
        got.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&got)
    );

    let next = tokio::time::timeout(Duration::from_secs(5), env.get("/early/next"))
        .await
        .expect("the next request is not queued behind the upload");
    assert_eq!(next.status(), 200);
    assert_eq!(next.text().await.unwrap(), "ok");
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        2,
        "a second connection served it"
    );
    drop(upload);
    env.stop().await;
}

/// A client connection that writes bytes exactly as given and reads answers one by one.
struct Raw {
    s: tokio::net::TcpStream,
    buf: Vec<u8>,
}

/// One answer read off a [`Raw`] connection.
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

impl Raw {
    async fn connect(env: &Env) -> Raw {
        let s = tokio::net::TcpStream::connect(env.gw.app.proxy_addr())
            .await
            .unwrap();
        Raw { s, buf: Vec::new() }
    }

    async fn send(&mut self, bytes: &str) {
        self.s.write_all(bytes.as_bytes()).await.unwrap();
    }

    /// Reads more; false at the end of the stream.
    async fn fill(&mut self) -> bool {
        let mut chunk = [0u8; 16 * 1024];
        let n = tokio::time::timeout(DEADLINE, self.s.read(&mut chunk))
            .await
            .expect("answer in time")
            .unwrap_or(0);
        self.buf.extend_from_slice(&chunk[..n]);
        n > 0
    }

    async fn line(&mut self) -> String {
        loop {
            if let Some(end) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let line = String::from_utf8_lossy(&self.buf[..end]).into_owned();
                self.buf.drain(..end + 2);
                return line;
            }
            assert!(self.fill().await, "connection closed mid-line");
        }
    }

    async fn take(&mut self, n: usize) -> Vec<u8> {
        while self.buf.len() < n {
            assert!(self.fill().await, "connection closed mid-body");
        }
        self.buf.drain(..n).collect()
    }

    /// The next answer; `head_request` when it answers a HEAD (no body follows).
    async fn answer(&mut self, head_request: bool) -> Answer {
        let status_line = self.line().await;
        let status = status_line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("status line: {status_line:?}"));
        let mut headers = Vec::new();
        loop {
            let line = self.line().await;
            if line.is_empty() {
                break;
            }
            let (name, value) = line.split_once(':').expect("header line");
            headers.push((name.to_ascii_lowercase(), value.trim().to_string()));
        }
        let mut answer = Answer {
            status,
            headers,
            body: Vec::new(),
        };
        if head_request || status == 100 || status == 204 || status == 304 {
            return answer;
        }
        if answer.header("transfer-encoding") == Some("chunked") {
            loop {
                let size = usize::from_str_radix(&self.line().await, 16).expect("chunk size");
                if size == 0 {
                    assert_eq!(self.line().await, "", "no trailers expected");
                    break;
                }
                let data = self.take(size).await;
                answer.body.extend(data);
                assert_eq!(self.take(2).await, b"\r\n");
            }
        } else if let Some(n) = answer.header("content-length") {
            let n = n.parse().expect("content-length");
            answer.body = self.take(n).await;
        } else {
            while self.fill().await {}
            answer.body = std::mem::take(&mut self.buf);
        }
        answer
    }

    /// Whether the gateway closes the connection with nothing more to read.
    async fn closed(&mut self) -> bool {
        !self.fill().await && self.buf.is_empty()
    }
}

#[tokio::test]
async fn the_http1_server_keeps_pipelining_bodies_expectations_and_keep_alive() {
    let env = env(1).await;
    env.route("p", "/p", json!({})).await;
    let mut c = Raw::connect(&env).await;

    // Two requests in one write: answered in order on the same connection.
    c.send("GET /p/a HTTP/1.1\r\nHost: t\r\n\r\nGET /p/b?x=1 HTTP/1.1\r\nHost: t\r\n\r\n")
        .await;
    let first = c.answer(false).await;
    let second = c.answer(false).await;
    assert_eq!((first.status, second.status), (200, 200));
    assert!(
        first.text().contains("\"path\":\"/p/a\""),
        "{}",
        first.text()
    );
    assert!(
        second.text().contains("\"path\":\"/p/b?x=1\""),
        "{}",
        second.text()
    );
    assert!(first.header("date").is_some() && first.header("x-request-id").is_some());

    // A chunked upload reaches the instance whole, and the connection goes on after it.
    c.send("POST /p/count HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
        .await;
    let counted = c.answer(false).await;
    assert_eq!((counted.status, counted.text().as_str()), (200, "11"));

    // `Expect: 100-continue`: the gateway asks for the body, then forwards it.
    c.send(
        "POST /p/count HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n",
    )
    .await;
    assert_eq!(c.answer(false).await.status, 100);
    c.send("hello").await;
    let counted = c.answer(false).await;
    assert_eq!((counted.status, counted.text().as_str()), (200, "5"));

    // HEAD: the length of what GET would send, and no body (the next answer parses).
    c.send("HEAD /p/a HTTP/1.1\r\nHost: t\r\n\r\n").await;
    let head = c.answer(true).await;
    assert_eq!(head.status, 200);
    assert!(head.header("content-length").is_some_and(|n| n != "0"));

    // A small body the gateway answers without reading is read and dropped; the
    // connection carries the next request.
    c.send("POST /nowhere HTTP/1.1\r\nHost: t\r\nContent-Length: 10\r\n\r\n0123456789")
        .await;
    let lost = c.answer(false).await;
    assert_eq!(lost.status, 404);
    assert_eq!(lost.header("connection"), None);
    c.send("GET /p/c HTTP/1.1\r\nHost: t\r\n\r\n").await;
    assert_eq!(c.answer(false).await.status, 200);

    // A large unread body cannot be skipped: the answer says the connection closes.
    c.send("POST /nowhere HTTP/1.1\r\nHost: t\r\nContent-Length: 100000000\r\n\r\n")
        .await;
    let lost = c.answer(false).await;
    assert_eq!(
        (lost.status, lost.header("connection")),
        (404, Some("close"))
    );
    assert!(c.closed().await);
    env.stop().await;
}

#[tokio::test]
async fn the_http1_server_refuses_ambiguous_framing_and_serves_http10() {
    let env = env(1).await;
    env.route("p", "/p", json!({})).await;
    let before = env.upstreams[0].hits();
    for (what, request) in [
        (
            "both framings",
            "POST /p/count HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n",
        ),
        (
            "two lengths",
            "POST /p/count HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
        ),
        ("not HTTP", "HELLO\r\n\r\n"),
    ] {
        let mut c = Raw::connect(&env).await;
        c.send(request).await;
        let refused = c.answer(false).await;
        assert_eq!(refused.status, 400, "{what}");
        assert_eq!(refused.header("connection"), Some("close"), "{what}");
        assert!(refused.text().contains("bad_request"), "{what}");
        assert!(c.closed().await, "{what}: connection closed");
    }
    assert_eq!(
        env.upstreams[0].hits(),
        before,
        "nothing reached the upstream"
    );

    // HTTP/1.0 with keep-alive asked: kept, and said so.
    let mut c = Raw::connect(&env).await;
    c.send("GET /p/a HTTP/1.0\r\nHost: t\r\nConnection: keep-alive\r\n\r\n")
        .await;
    let kept = c.answer(false).await;
    assert_eq!(
        (kept.status, kept.header("connection")),
        (200, Some("keep-alive"))
    );
    // Without it, a body of unknown length (streamed by the instance) runs to the close.
    c.send("GET /p/bytes?n=100000 HTTP/1.0\r\nHost: t\r\n\r\n")
        .await;
    let streamed = c.answer(false).await;
    assert_eq!(streamed.status, 200);
    assert_eq!(streamed.header("transfer-encoding"), None);
    assert_eq!(streamed.header("content-length"), None);
    assert_eq!(streamed.body.len(), 100_000);
    assert!(c.closed().await);

    // HTTP/1.1 gets the same body chunked.
    let mut c = Raw::connect(&env).await;
    c.send("GET /p/bytes?n=100000 HTTP/1.1\r\nHost: t\r\n\r\n")
        .await;
    let chunked = c.answer(false).await;
    assert_eq!(chunked.header("transfer-encoding"), Some("chunked"));
    assert_eq!(chunked.body.len(), 100_000);
    env.stop().await;
}
