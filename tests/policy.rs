//! Edge policy end to end through the proxy port, over real sockets on 127.0.0.1: rate
//! limits, client IP and `X-Forwarded-For`, IP rules, CORS, request limits, the upstream
//! assertion verified by a backend with the published JWKS, and mTLS to upstreams. Every
//! refusal also checks that nothing reached the upstream.

mod support;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{decode, decode_header, DecodingKey, Validation};
use serde_json::{json, Value};
use support::tokens::{self, claims, ISSUER, RSA_PUBLIC};
use support::{eventually, route, seen_headers, unique, Consul, Env, Gateway, Svc, DEADLINE};

/// Writes the test Ed25519 key and returns an `[assertion]` section using it.
fn assertion_section(dir: &tempfile::TempDir) -> switchyard::config::AssertionSection {
    let path: PathBuf = dir.path().join("assertion.pem");
    std::fs::write(&path, include_str!("fixtures/ed-private.pem")).unwrap();
    switchyard::config::AssertionSection {
        key_file: path,
        kid: "gw-test".into(),
        issuer: "switchyard-test".into(),
    }
}

/// What a backend does: fetch the gateway's JWKS and verify an assertion for `audience`.
async fn verify_with_jwks(
    admin: std::net::SocketAddr,
    token: &str,
    audience: &str,
) -> serde_json::Map<String, serde_json::Value> {
    let jwks: JwkSet = reqwest::get(format!("http://{admin}/jwks.json"))
        .await
        .expect("admin answers")
        .error_for_status()
        .expect("jwks published")
        .json()
        .await
        .expect("jwks is JSON");
    let header = decode_header(token).expect("a JWT");
    let kid = header.kid.expect("a kid");
    let jwk = jwks.find(&kid).expect("the kid is published");
    let key = DecodingKey::from_jwk(jwk).expect("usable key");
    let mut v = Validation::new(header.alg);
    v.set_audience(&[audience]);
    v.set_issuer(&["switchyard-test"]);
    decode(token, &key, &v).expect("verifies").claims
}

#[tokio::test]
async fn the_admin_listener_publishes_the_assertion_jwks_without_a_token() {
    let consul = Consul::start().await;
    let dir = tempfile::tempdir().unwrap();
    let section = assertion_section(&dir);
    let gw = Gateway::start(&consul, "jwks/", |f| {
        f.assertion = Some(section.clone());
        f.admin.token = Some("admin-secret".into());
    })
    .await;
    // A token signed with the same key file verifies with what the admin listener serves.
    let signer = switchyard::assertion::Signer::load(&section).unwrap();
    let token = signer
        .sign("orders", 30, Default::default(), "req-1")
        .unwrap();
    let claims = verify_with_jwks(gw.admin_addr(), &token, "orders").await;
    assert_eq!(claims["rid"], "req-1");
    gw.stop().await;
}

fn header<'a>(resp: &'a reqwest::Response, name: &str) -> &'a str {
    resp.headers()
        .get(name)
        .unwrap_or_else(|| panic!("no {name} in {:?}", resp.headers()))
        .to_str()
        .unwrap()
}

#[tokio::test]
async fn a_burst_over_the_rate_limit_gets_429_and_recovers() {
    let env = Env::start("policy", 1, |_| {}).await;
    env.route(
        "limited",
        "/limited",
        json!({"rate_limit": {"per_second": 0.5, "burst": 3}}),
    )
    .await;
    let before = env.hits();
    for i in 0..3 {
        let resp = env.http.get(env.url("/limited/x")).send().await.unwrap();
        assert_eq!(resp.status(), 200, "request {i} is within the burst");
        assert_eq!(header(&resp, "ratelimit-limit"), "3");
    }
    let resp = env
        .refused("over the burst", env.http.get(env.url("/limited/x")), 429)
        .await;
    assert_eq!(header(&resp, "ratelimit-remaining"), "0");
    assert_eq!(header(&resp, "ratelimit-limit"), "3");
    let retry: u64 = header(&resp, "retry-after").parse().unwrap();
    assert!((1..=2).contains(&retry), "Retry-After {retry}");
    assert!(header(&resp, "ratelimit-policy").starts_with("3;w="));
    assert_eq!(env.hits(), before + 3);
    // One token every 2 s (slow enough that a loaded machine cannot refill the bucket
    // during the burst): it refills and requests get through again.
    eventually(DEADLINE, "the limit recovers", || {
        let req = env.http.get(env.url("/limited/x"));
        async move { (req.send().await.ok()?.status() == 200).then_some(()) }
    })
    .await;
    env.stop().await;
}

#[tokio::test]
async fn rate_limits_keyed_by_consumer_or_header_count_each_key_apart() {
    let env = Env::start("policy", 1, |_| {}).await;
    env.route(
        "by-consumer",
        "/by-consumer",
        json!({"auth": {"api_key": true}, "rate_limit": {"per_second": 0.01, "burst": 2, "key": "consumer"}}),
    )
    .await;
    env.route(
        "by-tenant",
        "/by-tenant",
        json!({"rate_limit": {"per_second": 0.01, "burst": 2, "key": "header:X-Tenant"}}),
    )
    .await;
    let a = switchyard::auth::api_key::mint("team-a", vec![], None);
    let b = switchyard::auth::api_key::mint("team-b", vec![], None);
    for k in [&a, &b] {
        env.consul
            .put_kv(
                &format!("{}apikeys/{}", env.gw.kv_prefix, k.id),
                &serde_json::to_string(&k.doc).unwrap(),
            )
            .await;
    }
    let with_key = |k: &str| {
        env.http
            .get(env.url("/by-consumer/x"))
            .header("x-api-key", k.to_string())
    };
    // team-a uses up its burst (the first 200 also waits for the keys to load from KV).
    eventually(DEADLINE, "team-a is admitted", || {
        let req = with_key(&a.key);
        async move { (req.send().await.ok()?.status() == 200).then_some(()) }
    })
    .await;
    assert_eq!(with_key(&a.key).send().await.unwrap().status(), 200);
    env.refused("team-a over its limit", with_key(&a.key), 429)
        .await;
    eventually(DEADLINE, "team-b is admitted", || {
        let req = with_key(&b.key);
        async move { (req.send().await.ok()?.status() == 200).then_some(()) }
    })
    .await;

    let tenant = |t: &str| {
        env.http
            .get(env.url("/by-tenant/x"))
            .header("x-tenant", t.to_string())
    };
    for _ in 0..2 {
        assert_eq!(tenant("acme").send().await.unwrap().status(), 200);
    }
    env.refused("acme over its limit", tenant("acme"), 429)
        .await;
    assert_eq!(tenant("globex").send().await.unwrap().status(), 200);
    env.stop().await;
}

#[tokio::test]
async fn a_spoofed_forwarded_for_from_an_untrusted_peer_is_ignored() {
    let env = Env::start("policy", 1, |_| {}).await;
    env.route("inner", "/inner", json!({"ip_allow": ["10.1.2.3/32"]}))
        .await;
    env.route("echo", "/echo", json!({})).await;
    env.refused(
        "X-Forwarded-For claiming an allowed address",
        env.http
            .get(env.url("/inner/x"))
            .header("x-forwarded-for", "10.1.2.3"),
        403,
    )
    .await;
    let resp = env
        .http
        .get(env.url("/echo/x"))
        .header("x-forwarded-for", "10.1.2.3, 6.6.6.6")
        .send()
        .await
        .unwrap();
    let seen = seen_headers(resp).await;
    assert_eq!(
        seen["x-forwarded-for"], "127.0.0.1",
        "client's chain dropped"
    );
    env.stop().await;
}

#[tokio::test]
async fn forwarded_for_is_believed_from_a_trusted_proxy() {
    let env = Env::start("policy", 1, |f| {
        f.proxy.trusted_proxies = vec!["127.0.0.1/32".parse().unwrap()];
    })
    .await;
    env.route("inner", "/inner", json!({"ip_allow": ["10.1.2.3/32"]}))
        .await;
    env.route(
        "limited",
        "/limited",
        json!({"rate_limit": {"per_second": 0.01, "burst": 1}}),
    )
    .await;
    let resp = env
        .http
        .get(env.url("/inner/x"))
        .header("x-forwarded-for", "10.1.2.3")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let seen = seen_headers(resp).await;
    assert_eq!(seen["x-forwarded-for"], "10.1.2.3, 127.0.0.1");
    env.refused(
        "another client address",
        env.http
            .get(env.url("/inner/x"))
            .header("x-forwarded-for", "10.1.2.4"),
        403,
    )
    .await;
    // Rate limits key on the forwarded client, not on the proxy in front.
    let from = |ip: &str| {
        env.http
            .get(env.url("/limited/x"))
            .header("x-forwarded-for", ip.to_string())
    };
    assert_eq!(from("192.0.2.1").send().await.unwrap().status(), 200);
    env.refused("192.0.2.1 again", from("192.0.2.1"), 429).await;
    assert_eq!(from("192.0.2.2").send().await.unwrap().status(), 200);
    env.stop().await;
}

#[tokio::test]
async fn allow_and_deny_lists_refuse_with_403_before_the_upstream() {
    let env = Env::start("policy", 1, |_| {}).await;
    env.route("denied", "/denied", json!({"ip_deny": ["127.0.0.0/8"]}))
        .await;
    env.route(
        "elsewhere",
        "/elsewhere",
        json!({"ip_allow": ["10.0.0.0/8", "::1/128"]}),
    )
    .await;
    env.route(
        "local",
        "/local",
        json!({"ip_allow": ["127.0.0.1/32"], "ip_deny": ["10.0.0.0/8"]}),
    )
    .await;
    let resp = env
        .refused("deny list", env.http.get(env.url("/denied/x")), 403)
        .await;
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"], "ip_denied");
    env.refused(
        "not on the allow list",
        env.http.get(env.url("/elsewhere/x")),
        403,
    )
    .await;
    let resp = env.http.get(env.url("/local/x")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    env.stop().await;
}

#[tokio::test]
async fn cors_preflights_are_answered_at_the_gateway_and_responses_carry_cors_headers() {
    let env = Env::start("policy", 1, |f| {
        f.jwt_providers.insert(
            "main".into(),
            json!({"issuer": ISSUER, "algorithms": ["RS256"], "keys": [{"kid": "r", "pem": RSA_PUBLIC}]}),
        );
    })
    .await;
    env.route(
        "app",
        "/app",
        json!({
            "auth": {"jwt": ["main"]},
            "cors": {
                "origins": ["https://app.example.com", "https://*.example.org"],
                "methods": ["GET", "PUT"],
                "headers": ["Authorization", "X-Custom"],
                "expose_headers": ["X-Upstream"],
                "credentials": true,
                "max_age_s": 600
            }
        }),
    )
    .await;
    let preflight = |origin: &str, method: &str| {
        env.http
            .request(reqwest::Method::OPTIONS, env.url("/app/items/1"))
            .header("origin", origin.to_string())
            .header("access-control-request-method", method.to_string())
            .header("access-control-request-headers", "authorization, x-custom")
    };
    // Answered without a token (browsers send none on preflights) and without the upstream.
    let resp = env
        .refused(
            "allowed preflight",
            preflight("https://app.example.com", "PUT"),
            204,
        )
        .await;
    assert_eq!(
        header(&resp, "access-control-allow-origin"),
        "https://app.example.com"
    );
    assert_eq!(header(&resp, "access-control-allow-credentials"), "true");
    assert_eq!(header(&resp, "access-control-max-age"), "600");
    assert!(header(&resp, "access-control-allow-methods").contains("PUT"));
    let allowed_headers = header(&resp, "access-control-allow-headers").to_ascii_lowercase();
    assert!(allowed_headers.contains("x-custom"), "{allowed_headers}");
    env.refused(
        "wildcard subdomain origin",
        preflight("https://shop.example.org", "GET"),
        204,
    )
    .await;
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

    // A normal request from an allowed origin gets the CORS headers on its response.
    let token = tokens::rs256("r", &claims("alice", json!({"aud": null})));
    let resp = env
        .http
        .get(env.url("/app/items/1"))
        .header("origin", "https://app.example.com")
        .header("authorization", format!("Bearer {token}"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        header(&resp, "access-control-allow-origin"),
        "https://app.example.com"
    );
    assert_eq!(header(&resp, "access-control-allow-credentials"), "true");
    assert!(header(&resp, "access-control-expose-headers")
        .to_ascii_lowercase()
        .contains("x-upstream"));
    assert!(header(&resp, "vary")
        .to_ascii_lowercase()
        .contains("origin"));
    // The gateway's own refusals carry them too, so the page can read the 401.
    let resp = env
        .refused(
            "no token",
            env.http
                .get(env.url("/app/items/1"))
                .header("origin", "https://app.example.com"),
            401,
        )
        .await;
    assert_eq!(
        header(&resp, "access-control-allow-origin"),
        "https://app.example.com"
    );
    // Another origin gets no CORS headers.
    let resp = env
        .http
        .get(env.url("/app/items/1"))
        .header("origin", "https://evil.example.net")
        .header("authorization", format!("Bearer {token}"))
        .send()
        .await
        .unwrap();
    assert!(resp.headers().get("access-control-allow-origin").is_none());
    env.stop().await;
}

#[tokio::test]
async fn request_limits_refuse_too_many_headers_long_urls_large_bodies_and_other_methods() {
    let env = Env::start("policy", 1, |_| {}).await;
    env.route(
        "small",
        "/small",
        json!({"max_headers": 12, "max_url_bytes": 64, "max_body_bytes": 100, "methods": ["GET", "POST"]}),
    )
    .await;
    let ok = env.http.get(env.url("/small/x?a=1")).send().await.unwrap();
    assert_eq!(ok.status(), 200);
    let mut many = env.http.get(env.url("/small/x"));
    for i in 0..20 {
        many = many.header(format!("x-extra-{i}"), "1");
    }
    let resp = env.refused("20 extra headers", many, 431).await;
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"], "too_many_headers");
    env.refused(
        "long URL",
        env.http
            .get(env.url(&format!("/small/x?q={}", "a".repeat(100)))),
        414,
    )
    .await;
    env.refused(
        "large body",
        env.http
            .post(env.url("/small/count"))
            .body(vec![b'x'; 1000]),
        413,
    )
    .await;
    let resp = env
        .http
        .post(env.url("/small/count"))
        .body(vec![b'x'; 50])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.text().await.unwrap(), "50");
    let before = env.hits();
    let resp = env.http.delete(env.url("/small/x")).send().await.unwrap();
    assert!(resp.status().is_client_error(), "{}", resp.status());
    assert_eq!(env.hits(), before, "a method outside the list");
    env.stop().await;
}

#[tokio::test]
async fn a_backend_verifies_the_upstream_assertion_with_the_published_jwks() {
    let dir = tempfile::tempdir().unwrap();
    let section = assertion_section(&dir);
    let env = Env::start("policy", 1, |f| {
        f.assertion = Some(section.clone());
        f.jwt_providers.insert(
            "main".into(),
            json!({"issuer": ISSUER, "algorithms": ["RS256"], "keys": [{"kid": "r", "pem": RSA_PUBLIC}]}),
        );
    })
    .await;
    env.route(
        "asserted",
        "/asserted",
        json!({"auth": {"jwt": ["main"]}, "upstream_assertion": {"header": "X-Gateway-Assertion", "ttl_s": 30}}),
    )
    .await;
    env.route("plain", "/plain", json!({})).await;
    let token = tokens::rs256("r", &claims("alice", json!({"aud": null, "scope": "a b"})));
    let resp = env
        .http
        .get(env.url("/asserted/x"))
        .header("authorization", format!("Bearer {token}"))
        .header("x-request-id", "rid-e2e-1")
        .header("x-gateway-assertion", "forged")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let seen = seen_headers(resp).await;
    assert_eq!(seen["x-request-id"], "rid-e2e-1");
    let assertion = seen["x-gateway-assertion"].as_str().unwrap();
    assert_ne!(assertion, "forged");
    let claims = verify_with_jwks(env.gw.admin_addr(), assertion, &env.service).await;
    assert_eq!(claims["iss"], "switchyard-test");
    assert_eq!(claims["aud"], env.service.as_str());
    assert_eq!(claims["sub"], "alice");
    assert_eq!(claims["rid"], "rid-e2e-1");
    assert_eq!(claims["scope"], "a b");
    let ttl = claims["exp"].as_u64().unwrap() - claims["iat"].as_u64().unwrap();
    assert_eq!(ttl, 30);

    // Without a client request id, `rid` is the one the gateway made and forwarded.
    let resp = env
        .http
        .get(env.url("/asserted/y"))
        .header("authorization", format!("Bearer {token}"))
        .send()
        .await
        .unwrap();
    let returned = header(&resp, "x-request-id").to_string();
    let seen = seen_headers(resp).await;
    let rid = seen["x-request-id"].as_str().unwrap();
    assert!(!rid.is_empty());
    assert_eq!(rid, returned, "the client sees the id the upstream saw");
    let assertion = seen["x-gateway-assertion"].as_str().unwrap();
    let claims = verify_with_jwks(env.gw.admin_addr(), assertion, &env.service).await;
    assert_eq!(claims["rid"], rid);

    // A route without an assertion never forwards a client's copy of the header.
    let resp = env
        .http
        .get(env.url("/plain/x"))
        .header("x-gateway-assertion", "forged")
        .send()
        .await
        .unwrap();
    assert!(!seen_headers(resp).await.contains_key("x-gateway-assertion"));
    env.stop().await;
}

/// An HTTPS upstream that requires a client certificate signed by the test CA, counting
/// requests and echoing the subject of the client certificate it saw.
struct MtlsUpstream {
    addr: std::net::SocketAddr,
    hits: Arc<AtomicU64>,
    accept: tokio::task::JoinHandle<()>,
}

impl MtlsUpstream {
    async fn start(server: Arc<rustls::ServerConfig>) -> MtlsUpstream {
        use hyper_util::rt::{TokioExecutor, TokioIo};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let hits = Arc::new(AtomicU64::new(0));
        let acceptor = tokio_rustls::TlsAcceptor::from(server);
        let counter = hits.clone();
        let accept = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (acceptor, hits) = (acceptor.clone(), counter.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(stream).await else {
                        return;
                    };
                    let certs = tls.get_ref().1.peer_certificates().map_or(0, |c| c.len());
                    let service = hyper::service::service_fn(move |_req| {
                        hits.fetch_add(1, Ordering::SeqCst);
                        let body = json!({"client_certs": certs}).to_string();
                        async move {
                            Ok::<_, std::convert::Infallible>(http::Response::new(
                                http_body_util::Full::new(bytes::Bytes::from(body)),
                            ))
                        }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tls), service)
                        .await;
                });
            }
        });
        MtlsUpstream { addr, hits, accept }
    }
}

impl Drop for MtlsUpstream {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

#[tokio::test]
async fn upstreams_that_require_a_client_certificate_get_the_gateways() {
    let pki = support::pki();
    let upstream = MtlsUpstream::start(pki.server.clone()).await;
    // The upstream really refuses clients without a certificate.
    let anonymous = reqwest::Client::builder()
        .no_proxy()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(
            reqwest::Certificate::from_pem(&std::fs::read(&pki.ca).unwrap()).unwrap(),
        )
        .build()
        .unwrap()
        .get(format!("https://{}/x", upstream.addr))
        .send()
        .await;
    assert!(anonymous.is_err(), "{anonymous:?}");

    let section = switchyard::config::UpstreamTlsSection {
        client_cert: pki.client_cert.clone(),
        client_key: pki.client_key.clone(),
        ca: Some(pki.ca.clone()),
        server_name: None,
    };
    let env = Env::start("policy", 1, |f| f.upstream_tls = Some(section)).await;
    let service = unique("secure");
    env.consul
        .register(&Svc::new(
            &service,
            &format!("{service}-0"),
            upstream.addr.port(),
        ))
        .await;
    for (name, prefix, tls) in [("tls", "/tls", true), ("notls", "/notls", false)] {
        env.consul
            .put_kv(
                &env.gw.route_key(name),
                &route(
                    &service,
                    prefix,
                    json!({"upstream_tls": tls, "retry": {"attempts": 0}}),
                ),
            )
            .await;
        env.gw
            .wait_upstreams(prefix, &[format!("{service}-0").as_str()])
            .await;
    }
    let resp = env.http.get(env.url("/tls/x")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(
        body["client_certs"], 1,
        "the gateway presented its certificate"
    );
    assert_eq!(upstream.hits.load(Ordering::SeqCst), 1);
    // Plain HTTP to the TLS upstream fails at the gateway: 502, nothing served.
    let resp = env.http.get(env.url("/notls/x")).send().await.unwrap();
    assert_eq!(resp.status(), 502);
    assert_eq!(upstream.hits.load(Ordering::SeqCst), 1);
    env.stop().await;
}

#[tokio::test]
async fn preflights_find_method_specific_routes_and_refusals_stay_readable_by_the_page() {
    let env = Env::start("policy", 1, |_| {}).await;
    env.route("no-cors", "/plain", json!({})).await;
    // A PUT-only route (the helper's wait looks up GET, so wait on the preflight instead).
    env.consul
        .put_kv(
            &env.gw.route_key("put-only"),
            &route(
                &env.service,
                "/items",
                json!({
                    "methods": ["PUT"],
                    "rate_limit": {"per_second": 0.01, "burst": 1},
                    "cors": {"origins": ["https://app.example.com"]}
                }),
            ),
        )
        .await;
    let origin = "https://app.example.com";
    let preflight = || {
        env.http
            .request(reqwest::Method::OPTIONS, env.url("/items/1"))
            .header("origin", origin)
            .header("access-control-request-method", "PUT")
    };
    eventually(DEADLINE, "the PUT-only route serves", || {
        let req = preflight();
        async move { (req.send().await.ok()?.status() != 404).then_some(()) }
    })
    .await;
    let resp = env
        .refused("preflight of a PUT-only route", preflight(), 204)
        .await;
    assert_eq!(header(&resp, "access-control-allow-origin"), origin);
    let put = || {
        env.http
            .put(env.url("/items/1"))
            .header("origin", origin)
            .body("x")
    };
    assert_eq!(put().send().await.unwrap().status(), 200);
    let resp = env.refused("over the limit", put(), 429).await;
    assert_eq!(header(&resp, "access-control-allow-origin"), origin);
    assert!(resp.headers().contains_key("retry-after"));

    // Without a CORS policy, OPTIONS is an ordinary request for the upstream.
    let before = env.hits();
    let resp = env
        .http
        .request(reqwest::Method::OPTIONS, env.url("/plain/x"))
        .header("origin", origin)
        .header("access-control-request-method", "GET")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(env.hits(), before + 1);
    env.stop().await;
}
