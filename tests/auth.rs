//! Edge auth end to end through the proxy port: every attack of issue 5 is refused with
//! the right status and nothing reaches the upstream (its hit counter does not move);
//! identity headers cannot be forged; API keys and JWT providers come from KV; JWKS keys
//! rotate, survive a broken endpoint, and random kids cannot cause a fetch storm.

mod support;

use serde_json::{json, Value};
use support::tokens::{self, claims, JwksServer, AUDIENCE, ISSUER, RSA_PUBLIC, SECRET};
use support::{eventually, seen_headers, unique, DEADLINE};
use switchyard::config::FileConfig;

/// The shared env plus the temp dir holding the HMAC secret of the config-file provider.
struct Env {
    env: support::Env,
    _dir: tempfile::TempDir,
}

impl std::ops::Deref for Env {
    type Target = support::Env;
    fn deref(&self) -> &support::Env {
        &self.env
    }
}

/// The config-file provider `cfg`: HS256 (kid `h`, secret from a file) and RS256 (kid `r`),
/// both algorithms allowed, so that key confusion is really attempted.
fn config_provider(secret_file: &std::path::Path) -> Value {
    json!({
        "issuer": ISSUER,
        "audiences": [AUDIENCE],
        "algorithms": ["HS256", "RS256"],
        "keys": [
            {"kid": "h", "secret_file": secret_file},
            {"kid": "r", "pem": RSA_PUBLIC},
        ],
        "max_token_bytes": 2048,
    })
}

impl Env {
    async fn start() -> Env {
        Env::start_with(|_| {}).await
    }

    async fn start_with(tweak: impl FnOnce(&mut FileConfig)) -> Env {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("hs256.secret");
        std::fs::write(&secret, format!("{SECRET}\n")).unwrap();
        let provider = config_provider(&secret);
        let env = support::Env::start("auth", 1, |f| {
            f.jwt_providers.insert("cfg".into(), provider);
            tweak(f);
        })
        .await;
        Env { env, _dir: dir }
    }

    async fn put(&self, folder: &str, name: &str, doc: &Value) {
        self.consul
            .put_kv(
                &format!("{}{folder}/{name}", self.gw.kv_prefix),
                &doc.to_string(),
            )
            .await;
    }

    fn bearer(&self, path: &str, token: &str) -> reqwest::RequestBuilder {
        self.get_with(path, "authorization", &format!("Bearer {token}"))
    }

    /// Polls until `token` gets through on `path` (providers and keys load from KV).
    async fn wait_accepted(&self, path: &str, header: (&str, &str)) {
        eventually(DEADLINE, &format!("{path} accepts the credential"), || {
            let req = self.get_with(path, header.0, header.1);
            async move {
                let resp = req.send().await.ok()?;
                (resp.status() == 200).then_some(())
            }
        })
        .await;
    }

    async fn stop(self) {
        self.env.stop().await;
    }
}

fn challenge(resp: &reqwest::Response) -> String {
    resp.headers()
        .get_all("www-authenticate")
        .iter()
        .map(|v| v.to_str().unwrap().to_string())
        .collect::<Vec<_>>()
        .join(" | ")
}

#[tokio::test]
async fn every_attack_in_the_table_is_refused_before_the_upstream() {
    let env = Env::start().await;
    env.route("api", "/api", json!({"auth": {"jwt": ["cfg"]}}))
        .await;
    env.route(
        "orders",
        "/orders",
        json!({"auth": {"jwt": ["cfg"], "scopes": ["orders:write"]}}),
    )
    .await;

    let now = tokens::now();
    let good = claims("alice", json!({}));
    let valid_rs = tokens::rs256("r", &good);
    let valid_hs = tokens::hs256("h", &good);
    // The test can fail: good tokens do get through, and reach the upstream.
    for token in [&valid_rs, &valid_hs] {
        let before = env.hits();
        let resp = env.bearer("/api/x", token).send().await.unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(env.hits(), before + 1);
    }

    let big = claims("alice", json!({"pad": "x".repeat(4096)}));
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "expired (beyond the 60 s leeway)",
            tokens::rs256("r", &claims("alice", json!({"exp": now - 3600}))),
            "/api/x",
        ),
        (
            "nbf in the future",
            tokens::rs256("r", &claims("alice", json!({"nbf": now + 3600}))),
            "/api/x",
        ),
        (
            "wrong iss",
            tokens::rs256(
                "r",
                &claims("alice", json!({"iss": "https://evil.example"})),
            ),
            "/api/x",
        ),
        (
            "wrong aud",
            tokens::rs256("r", &claims("alice", json!({"aud": "someone-else"}))),
            "/api/x",
        ),
        (
            "exp missing",
            tokens::rs256("r", &claims("alice", json!({"exp": null}))),
            "/api/x",
        ),
        ("alg none", tokens::unsigned(&good), "/api/x"),
        (
            "HS256 signed with the RSA public key (key confusion), kid of the RSA key",
            tokens::sign_hmac("r", &good, RSA_PUBLIC.as_bytes()),
            "/api/x",
        ),
        (
            "HS256 signed with the RSA public key, kid of the HMAC key",
            tokens::sign_hmac("h", &good, RSA_PUBLIC.as_bytes()),
            "/api/x",
        ),
        (
            "tampered payload (sub changed, signature kept)",
            tokens::tampered(&valid_rs, &claims("admin", json!({}))),
            "/api/x",
        ),
        (
            "tampered payload of an HMAC token",
            tokens::tampered(
                &valid_hs,
                &claims("alice", json!({"scope": "orders:write"})),
            ),
            "/orders/x",
        ),
        ("unknown kid", tokens::rs256("nope", &good), "/api/x"),
        (
            "kid path trick ../../etc/passwd",
            tokens::sign_hmac("../../etc/passwd", &good, b""),
            "/api/x",
        ),
        (
            "kid path trick /dev/null",
            tokens::sign_hmac("/dev/null", &good, b""),
            "/api/x",
        ),
        (
            "RS256 by another key, right kid",
            tokens::rs256_with(tokens::RSA2_PRIVATE, "r", &good),
            "/api/x",
        ),
        ("oversized token", tokens::rs256("r", &big), "/api/x"),
        ("garbage", "not.a.jwt".into(), "/api/x"),
    ];
    for (what, token, path) in &cases {
        let resp = env.refused(what, env.bearer(path, token), 401).await;
        let c = challenge(&resp);
        assert!(c.starts_with("Bearer realm="), "{what}: challenge {c}");
    }

    let resp = env
        .refused("missing token", env.http.get(env.url("/api/x")), 401)
        .await;
    let c = challenge(&resp);
    assert!(
        c.starts_with("Bearer realm=") && !c.contains("error="),
        "{c}"
    );
    env.refused(
        "token in the query when the provider reads only the header",
        env.http
            .get(env.url(&format!("/api/x?access_token={valid_rs}"))),
        401,
    )
    .await;
    env.refused(
        "token in a cookie when the provider reads only the header",
        env.get_with("/api/x", "cookie", &format!("access_token={valid_rs}")),
        401,
    )
    .await;
    env.refused(
        "two Authorization headers",
        env.bearer("/api/x", &valid_rs)
            .header("authorization", format!("Bearer {valid_hs}")),
        401,
    )
    .await;

    let resp = env
        .refused(
            "insufficient scope",
            env.bearer(
                "/orders/x",
                &tokens::rs256("r", &claims("alice", json!({"scope": "orders:read"}))),
            ),
            403,
        )
        .await;
    let c = challenge(&resp);
    assert!(
        c.contains("error=\"insufficient_scope\"") && c.contains("scope=\"orders:write\""),
        "{c}"
    );
    let scoped = tokens::rs256(
        "r",
        &claims("alice", json!({"scp": ["orders:read", "orders:write"]})),
    );
    let resp = env.bearer("/orders/x", &scoped).send().await.unwrap();
    assert_eq!(resp.status(), 200, "scp array carries the scope");
    env.stop().await;
}

#[tokio::test]
async fn client_sent_identity_headers_are_replaced_never_passed() {
    let env = Env::start().await;
    env.route("api", "/api", json!({"auth": {"jwt": ["cfg"]}}))
        .await;
    env.route("open", "/open", json!({})).await;
    let token = tokens::rs256("r", &claims("alice", json!({})));

    let resp = env
        .bearer("/api/x", &token)
        .header("X-User-Id", "root")
        .header("x-user-id", "admin")
        .header("X-Consumer", "billing")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let seen = seen_headers(resp).await;
    assert_eq!(seen["x-user-id"], "alice");
    assert!(!seen.contains_key("x-consumer"), "{seen:?}");

    // An open route forwards no identity at all, forged or not.
    let resp = env
        .http
        .get(env.url("/open/x"))
        .header("X-User-Id", "root")
        .header("X-Consumer", "billing")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let seen = seen_headers(resp).await;
    assert!(
        !seen.contains_key("x-user-id") && !seen.contains_key("x-consumer"),
        "{seen:?}"
    );
    env.stop().await;
}

#[tokio::test]
async fn a_connection_header_cannot_strip_the_identity_the_gateway_sets() {
    let env = Env::start().await;
    env.route("api", "/api", json!({"auth": {"jwt": ["cfg"]}}))
        .await;
    let token = tokens::rs256("r", &claims("alice", json!({})));
    for connection in ["X-User-Id", "keep-alive, x-user-id", "X-USER-ID, X-Other"] {
        let resp = env
            .bearer("/api/x", &token)
            .header("connection", connection)
            .header("x-user-id", "root")
            .header("x-other", "dropped")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let seen = seen_headers(resp).await;
        assert_eq!(seen["x-user-id"], "alice", "Connection: {connection}");
        let named = connection.to_ascii_lowercase().contains("x-other");
        assert_eq!(
            seen.contains_key("x-other"),
            !named,
            "other hop-by-hop names still honoured"
        );
    }
    env.stop().await;
}

#[tokio::test]
async fn api_keys_from_kv_admit_their_consumer_and_disabled_keys_are_refused() {
    let env = Env::start().await;
    env.route("keys", "/keys", json!({"auth": {"api_key": true}}))
        .await;
    env.route(
        "either",
        "/either",
        json!({"auth": {"jwt": ["cfg"], "api_key": true, "scopes": ["reports"]}}),
    )
    .await;
    let good = switchyard::auth::api_key::mint("billing", vec!["reports".into()], None);
    let mut off = switchyard::auth::api_key::mint("mallory", vec!["reports".into()], None);
    off.doc.disabled = true;
    let plain = switchyard::auth::api_key::mint("intern", vec![], None);
    for k in [&good, &off, &plain] {
        env.put("apikeys", &k.id, &serde_json::to_value(&k.doc).unwrap())
            .await;
    }
    env.wait_accepted("/keys/x", ("x-api-key", &good.key)).await;
    env.wait_accepted("/keys/x", ("x-api-key", &plain.key))
        .await;

    let resp = env
        .http
        .get(env.url("/keys/x"))
        .header("x-api-key", &good.key)
        .header("x-consumer", "forged")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let seen = seen_headers(resp).await;
    assert_eq!(seen["x-consumer"], "billing");
    assert!(
        !seen.contains_key("x-api-key"),
        "the key never travels upstream"
    );

    let resp = env
        .refused(
            "disabled key",
            env.get_with("/keys/x", "x-api-key", &off.key),
            401,
        )
        .await;
    assert!(challenge(&resp).starts_with("ApiKey realm="));
    env.refused(
        "unknown key",
        env.get_with("/keys/x", "x-api-key", "sy_not-a-key-anyone-has"),
        401,
    )
    .await;
    env.refused("no key", env.http.get(env.url("/keys/x")), 401)
        .await;
    env.refused(
        "key without the route's scope",
        env.get_with("/either/x", "x-api-key", &plain.key),
        403,
    )
    .await;
    let resp = env
        .get_with("/either/x", "x-api-key", &good.key)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "either credential will do");

    // Disabling a key in KV takes effect live.
    let mut disabled = good.doc.clone();
    disabled.disabled = true;
    env.put(
        "apikeys",
        &good.id,
        &serde_json::to_value(&disabled).unwrap(),
    )
    .await;
    eventually(DEADLINE, "the key is disabled", || {
        let req = env.get_with("/keys/x", "x-api-key", &good.key);
        async move { (req.send().await.ok()?.status() == 401).then_some(()) }
    })
    .await;
    env.stop().await;
}

#[tokio::test]
async fn browsers_without_credentials_are_sent_to_the_login_page() {
    let env = Env::start().await;
    env.route(
        "app",
        "/app",
        json!({"auth": {"jwt": ["cfg"], "on_unauthenticated": {"redirect": "https://login.example.com/?from=gw"}}}),
    )
    .await;
    let resp = env
        .refused(
            "browser",
            env.get_with(
                "/app/page",
                "accept",
                "text/html,application/xhtml+xml;q=0.9",
            ),
            302,
        )
        .await;
    assert_eq!(
        resp.headers()["location"],
        "https://login.example.com/?from=gw"
    );
    let resp = env
        .refused(
            "API client",
            env.get_with("/app/page", "accept", "application/json"),
            401,
        )
        .await;
    assert!(challenge(&resp).starts_with("Bearer"));
    let token = tokens::rs256("r", &claims("alice", json!({})));
    let resp = env
        .bearer("/app/page", &token)
        .header("accept", "text/html")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    env.stop().await;
}

#[tokio::test]
async fn providers_in_kv_serve_and_can_read_tokens_from_the_query() {
    let env = Env::start().await;
    env.put(
        "jwt",
        "kvmain",
        &json!({
            "issuer": ISSUER,
            "audiences": [AUDIENCE],
            "algorithms": ["RS256"],
            "keys": [{"kid": "k1", "jwk": tokens::rsa_jwk(true, "k1")}],
            "from_query": "access_token",
            "claims_to_headers": {"sub": "X-Subject", "tenant": "X-Tenant"},
            "remove_authorization": true,
        }),
    )
    .await;
    env.route("kv", "/kv", json!({"auth": {"jwt": ["kvmain"]}}))
        .await;
    let token = tokens::rs256("k1", &claims("bob", json!({"tenant": "acme"})));
    env.wait_accepted("/kv/x", ("authorization", &format!("Bearer {token}")))
        .await;

    let resp = env
        .bearer("/kv/x", &token)
        .header("x-tenant", "forged")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let seen = seen_headers(resp).await;
    assert_eq!(seen["x-subject"], "bob");
    assert_eq!(seen["x-tenant"], "acme");
    assert!(!seen.contains_key("authorization"), "remove_authorization");

    let resp = env
        .http
        .get(env.url(&format!("/kv/x?access_token={token}")))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "query token allowed by this provider");
    // Headers of KV providers are stripped on every route, even ones using another provider.
    env.route("api", "/api", json!({"auth": {"jwt": ["cfg"]}}))
        .await;
    let resp = env
        .bearer("/api/x", &tokens::hs256("h", &claims("carol", json!({}))))
        .header("x-tenant", "forged")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(!seen_headers(resp).await.contains_key("x-tenant"));
    env.stop().await;
}

/// A KV provider reading keys from `jwks`.
fn jwks_provider(jwks: &JwksServer, refresh_s: u64, min_refetch_s: u64) -> Value {
    json!({
        "issuer": ISSUER,
        "audiences": [AUDIENCE],
        "algorithms": ["RS256"],
        "jwks_url": jwks.url(),
        "jwks_refresh_s": refresh_s,
        "jwks_min_refetch_s": min_refetch_s,
        "jwks_timeout_ms": 1000,
    })
}

/// An env with a route `/idp` for the KV provider `idp` on a JWKS server holding `k1`;
/// returns once a `k1` token (returned too) is accepted.
async fn jwks_env(refresh_s: u64, min_refetch_s: u64) -> (Env, JwksServer, String) {
    let env = Env::start().await;
    let jwks = JwksServer::start(vec![tokens::rsa_jwk(true, "k1")]).await;
    env.put(
        "jwt",
        "idp",
        &jwks_provider(&jwks, refresh_s, min_refetch_s),
    )
    .await;
    env.route("idp", "/idp", json!({"auth": {"jwt": ["idp"]}}))
        .await;
    let token = tokens::rs256("k1", &claims("alice", json!({})));
    env.wait_accepted("/idp/x", ("authorization", &format!("Bearer {token}")))
        .await;
    (env, jwks, token)
}

#[tokio::test]
async fn a_rotated_jwks_key_is_picked_up_and_a_broken_endpoint_keeps_the_last_keys() {
    let (env, jwks, _) = jwks_env(1, 1).await;

    // The issuer rotates to key 2: a token with the new kid makes the gateway refetch.
    jwks.set_keys(vec![tokens::rsa_jwk(false, "k2")]);
    let new = tokens::rs256_with(tokens::RSA2_PRIVATE, "k2", &claims("alice", json!({})));
    env.wait_accepted("/idp/x", ("authorization", &format!("Bearer {new}")))
        .await;
    // The old key is gone from the set: its fresh tokens are refused, nothing upstream.
    let old_fresh = tokens::rs256("k1", &claims("dave", json!({})));
    env.refused("retired kid", env.bearer("/idp/x", &old_fresh), 401)
        .await;

    // The endpoint breaks: routine refreshes fail, the last good keys keep serving.
    jwks.break_down();
    let failed_from = jwks.fetches();
    eventually(DEADLINE, "two failed JWKS fetches", || {
        let n = jwks.fetches();
        async move { (n >= failed_from + 2).then_some(()) }
    })
    .await;
    let uncached = tokens::rs256_with(tokens::RSA2_PRIVATE, "k2", &claims("erin", json!({})));
    let resp = env.bearer("/idp/x", &uncached).send().await.unwrap();
    assert_eq!(
        resp.status(),
        200,
        "last good keys kept through failed fetches"
    );
    env.stop().await;
}

#[tokio::test]
async fn random_kids_do_not_cause_a_jwks_fetch_storm() {
    let (env, jwks, good) = jwks_env(300, 30).await;
    let before = jwks.fetches();

    let mut storm = Vec::new();
    for i in 0..60 {
        let token = tokens::rs256(
            &format!("random-{i}-{}", unique("kid")),
            &claims("x", json!({})),
        );
        storm.push(env.bearer("/idp/x", &token).send());
    }
    let hits = env.hits();
    for resp in futures_util::future::join_all(storm).await {
        assert_eq!(resp.unwrap().status(), 401);
    }
    assert_eq!(env.hits(), hits, "nothing reached the upstream");
    let extra = jwks.fetches() - before;
    assert!(extra <= 1, "{extra} JWKS fetches for 60 random kids");
    // The known kid still works throughout.
    let resp = env.bearer("/idp/x", &good).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    env.stop().await;
}

#[tokio::test]
async fn a_bad_provider_document_is_listed_and_its_last_good_version_keeps_serving() {
    let env = Env::start().await;
    let good = json!({
        "issuer": ISSUER,
        "algorithms": ["RS256"],
        "keys": [{"kid": "k1", "pem": RSA_PUBLIC}],
    });
    env.put("jwt", "kvmain", &good).await;
    env.route("kv", "/kv", json!({"auth": {"jwt": ["kvmain"]}}))
        .await;
    let token = tokens::rs256("k1", &claims("bob", json!({})));
    env.wait_accepted("/kv/x", ("authorization", &format!("Bearer {token}")))
        .await;

    env.put(
        "jwt",
        "kvmain",
        &json!({"issuer": ISSUER, "algorithms": ["none"], "keys": [{"kid": "k1", "pem": RSA_PUBLIC}]}),
    )
    .await;
    env.consul
        .put_kv(&format!("{}apikeys/broken", env.gw.kv_prefix), "{not json")
        .await;
    let listed = eventually(DEADLINE, "both rejections listed at /auth", || async {
        let (status, v) = env.gw.admin("/auth").await;
        let rejected = v["rejected"].as_array().cloned().unwrap_or_default();
        (status == 200 && rejected.len() == 2).then_some(v)
    })
    .await;
    let provider = listed["rejected"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == "kvmain")
        .expect("the provider is listed")
        .clone();
    assert_eq!(provider["serving_last_good"], true);
    assert!(
        provider["error"].as_str().unwrap().contains("none"),
        "{provider}"
    );
    assert!(listed["providers"]
        .as_array()
        .unwrap()
        .iter()
        .any(|p| p == "kvmain"));
    let resp = env
        .bearer("/kv/x", &tokens::rs256("k1", &claims("carol", json!({}))))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "the last good provider serves");
    env.stop().await;
}

#[tokio::test]
async fn the_bearer_scheme_is_case_insensitive_and_cookies_work_where_enabled() {
    let env = Env::start_with(|f| {
        f.jwt_providers.insert(
            "web".into(),
            json!({
                "issuer": ISSUER,
                "algorithms": ["RS256"],
                "keys": [{"kid": "r", "pem": RSA_PUBLIC}],
                "from_bearer": false,
                "from_cookie": "session",
            }),
        );
    })
    .await;
    env.route("api", "/api", json!({"auth": {"jwt": ["cfg"]}}))
        .await;
    env.route("web", "/web", json!({"auth": {"jwt": ["web"]}}))
        .await;
    let token = tokens::rs256("r", &claims("alice", json!({})));
    for scheme in ["bearer", "BEARER", "Bearer"] {
        let resp = env
            .get_with("/api/x", "authorization", &format!("{scheme} {token}"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "scheme {scheme}");
    }
    env.refused(
        "Basic is not Bearer",
        env.get_with("/api/x", "authorization", &format!("Basic {token}")),
        401,
    )
    .await;
    let resp = env
        .get_with("/web/x", "cookie", &format!("theme=dark; session={token}"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "token from the cookie");
    env.refused(
        "a bearer token where only the cookie is read",
        env.bearer("/web/x", &token),
        401,
    )
    .await;

    // HTTP/2 (h2c) requests are held to the same rules.
    let h2 = support::h2c_client();
    let resp = h2
        .get(env.url("/api/x"))
        .header("authorization", format!("Bearer {token}"))
        .header("x-user-id", "root")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.version(), reqwest::Version::HTTP_2);
    assert_eq!(resp.status(), 200);
    assert_eq!(seen_headers(resp).await["x-user-id"], "alice");
    let before = env.hits();
    let resp = h2.get(env.url("/api/x")).send().await.unwrap();
    assert_eq!(resp.status(), 401);
    assert_eq!(env.hits(), before);
    env.stop().await;
}

/// A refusal without verification: 429, a `Retry-After` within the budgets' refill, and
/// error `too_many_invalid_tokens`.
async fn assert_refused_by_a_failure_budget(resp: reqwest::Response, what: &str) {
    assert_eq!(resp.status(), 429, "{what} is refused unverified");
    let retry: u64 = resp.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=100).contains(&retry), "{what}: Retry-After {retry}");
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"], "too_many_invalid_tokens", "{what}");
}

/// A gateway whose `/api` route needs a JWT, with a per-address failure budget of `burst`
/// (regained at 0.01 a second) whose refusals are held `refusal_delay_ms`; loopback is the
/// trusted proxy, so `X-Forwarded-For` names each test client.
async fn env_with_failure_budget(burst: u32, refusal_delay_ms: u64) -> Env {
    let env = Env::start_with(|f| {
        f.proxy.trusted_proxies = vec!["127.0.0.1/32".parse().unwrap()];
        f.auth.failure_budget.burst = burst;
        f.auth.failure_budget.per_second = 0.01;
        f.auth.failure_budget.refusal_delay_ms = refusal_delay_ms;
    })
    .await;
    env.route("api", "/api", json!({"auth": {"jwt": ["cfg"]}}))
        .await;
    env
}

#[tokio::test]
async fn a_flood_of_bad_signatures_spends_only_its_senders_budget() {
    let env = env_with_failure_budget(3, 20).await;
    let from = |ip: &str, token: &str| {
        env.bearer("/api/x", token)
            .header("x-forwarded-for", ip.to_string())
    };
    let refusals = || {
        env.gw.metric(
            "switchyard_auth_failures_total",
            &[("reason", "failure_budget")],
        )
    };
    let refused_before = refusals().await;
    let valid = tokens::rs256("r", &claims("alice", json!({})));
    let resp = from("10.9.9.9", &valid).send().await.unwrap();
    assert_eq!(
        resp.status(),
        200,
        "the attacker's address had a good token verified"
    );

    // Distinct well-formed tokens whose signatures are wrong: the budget is 3 of them.
    let bad = |i: u64| tokens::tampered(&valid, &claims("mallory", json!({"n": i})));
    let before = env.hits();
    for i in 0..3 {
        let resp = from("10.9.9.9", &bad(i)).send().await.unwrap();
        assert_eq!(
            resp.status(),
            401,
            "bad signature {i} is verified and refused"
        );
        assert!(
            challenge(&resp).contains("invalid signature"),
            "{}",
            challenge(&resp)
        );
    }
    for i in 3..10 {
        let resp = from("10.9.9.9", &bad(i)).send().await.unwrap();
        assert_refused_by_a_failure_budget(resp, &format!("bad signature {i}")).await;
    }
    assert_eq!(env.hits(), before, "nothing reached the upstream");
    assert!(refusals().await >= refused_before + 7.0);

    // The spent address: a token it never showed is refused, the one verified before is not.
    let fresh = tokens::rs256("r", &claims("alice", json!({"n": "fresh"})));
    let resp = from("10.9.9.9", &fresh).send().await.unwrap();
    assert_eq!(resp.status(), 429);
    let resp = from("10.9.9.9", &valid).send().await.unwrap();
    assert_eq!(resp.status(), 200, "a cached token still passes");
    // Another address is not affected: its good tokens pass and its bad ones are verified.
    let resp = from("10.1.1.1", &fresh).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let resp = from("10.1.1.1", &bad(99)).send().await.unwrap();
    assert_eq!(resp.status(), 401);
    env.stop().await;
}

#[tokio::test]
async fn a_refusal_for_a_spent_budget_is_held_while_other_clients_are_served() {
    // Held between 750 and 2250 ms.
    let env = env_with_failure_budget(1, 1500).await;
    let from = |ip: &str, token: &str| {
        env.bearer("/api/x", token)
            .header("x-forwarded-for", ip.to_string())
    };
    let valid = tokens::rs256("r", &claims("alice", json!({})));
    let bad = |i: u64| tokens::tampered(&valid, &claims("mallory", json!({"n": i})));
    let resp = from("10.9.9.9", &bad(0)).send().await.unwrap();
    assert_eq!(resp.status(), 401, "the first bad signature is verified");

    // The budget is spent: the next refusal is held for the delay...
    let held = tokio::spawn(from("10.9.9.9", &bad(1)).send());
    let started = std::time::Instant::now();
    // ...and while it is, another client is served (the worker is not blocked).
    let resp = from("10.1.1.1", &valid).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert!(!held.is_finished(), "the refusal is still held");
    assert!(
        env.gw.metric("switchyard_auth_refusals_held", &[]).await >= 1.0,
        "the held refusal is counted"
    );
    let resp = held.await.unwrap().unwrap();
    assert!(
        started.elapsed() >= std::time::Duration::from_millis(700),
        "answered after {:?}",
        started.elapsed()
    );
    assert_refused_by_a_failure_budget(resp, "the held refusal").await;
    env.stop().await;
}

#[tokio::test]
async fn bad_signatures_from_ever_new_addresses_spend_the_gateway_wide_budget_and_known_clients_still_pass(
) {
    let env = Env::start_with(|f| {
        // Loopback is the trusted proxy, so X-Forwarded-For names each test client.
        f.proxy.trusted_proxies = vec!["127.0.0.1/32".parse().unwrap()];
        f.auth.failure_budget.burst = 3;
        f.auth.failure_budget.per_second = 0.01;
        f.auth.failure_budget.global_burst = 5;
        f.auth.failure_budget.global_per_second = 0.01;
        f.auth.failure_budget.refusal_delay_ms = 20;
    })
    .await;
    env.route("api", "/api", json!({"auth": {"jwt": ["cfg"]}}))
        .await;
    env.route("keys", "/keys", json!({"auth": {"api_key": true}}))
        .await;
    let key = switchyard::auth::api_key::mint("billing", vec![], None);
    env.put("apikeys", &key.id, &serde_json::to_value(&key.doc).unwrap())
        .await;
    env.wait_accepted("/keys/x", ("x-api-key", &key.key)).await;
    let from = |ip: String, token: &str| env.bearer("/api/x", token).header("x-forwarded-for", ip);
    let refusals = || {
        env.gw.metric(
            "switchyard_auth_failures_total",
            &[("reason", "failure_budget_global")],
        )
    };
    let refused_before = refusals().await;
    // A healthy client whose token the gateway has verified.
    let healthy = tokens::rs256("r", &claims("alice", json!({})));
    let resp = from("10.1.1.1".into(), &healthy).send().await.unwrap();
    assert_eq!(resp.status(), 200);

    // Distinct bad signatures, each from a new address: no address ever spends its own
    // budget (3), but the gateway's (5) is spent after the fifth.
    let bad = |i: u64| tokens::tampered(&healthy, &claims("mallory", json!({"n": i})));
    let attacker = |i: u64| format!("10.66.{}.{}", i / 256, i % 256);
    let before = env.hits();
    for i in 0..5 {
        let resp = from(attacker(i), &bad(i)).send().await.unwrap();
        assert_eq!(resp.status(), 401, "bad signature {i} is verified");
        assert!(
            challenge(&resp).contains("invalid signature"),
            "{}",
            challenge(&resp)
        );
    }
    for i in 5..15 {
        let resp = from(attacker(i), &bad(i)).send().await.unwrap();
        assert_refused_by_a_failure_budget(resp, &format!("bad signature {i} from a new address"))
            .await;
    }
    assert_eq!(env.hits(), before, "nothing reached the upstream");
    assert!(refusals().await >= refused_before + 10.0);

    // A good token the gateway never verified is not verified either while the budget is
    // spent (the trade-off); one it verified before, and API keys, still pass.
    let fresh = tokens::rs256("r", &claims("bob", json!({})));
    let resp = from("10.2.2.2".into(), &fresh).send().await.unwrap();
    assert_eq!(resp.status(), 429);
    let resp = from("10.1.1.1".into(), &healthy).send().await.unwrap();
    assert_eq!(resp.status(), 200, "a cached token still passes");
    let resp = env
        .get_with("/keys/x", "x-api-key", &key.key)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "API keys are not affected");
    env.stop().await;
}
