use super::*;
use crate::auth::api_key::mint;
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::json;

const SECRET: &str = "0123456789abcdef0123456789abcdef-authn";
const ENV: &str = "SWITCHYARD_TEST_AUTHENTICATOR_SECRET";
const ISS: &str = "https://id.example.com";

fn kv(key: &str, value: &serde_json::Value) -> KvPair {
    serde_json::from_value(json!({
        "Key": key,
        "Value": base64::Engine::encode(&base64::engine::general_purpose::STANDARD, value.to_string()),
    }))
    .unwrap()
}

fn provider_doc(extra: serde_json::Value) -> serde_json::Value {
    let mut doc = json!({"issuer": ISS, "audiences": ["api"], "algorithms": ["HS256"],
        "keys": [{"kid": "k", "secret_env": ENV}]});
    for (k, v) in extra.as_object().unwrap() {
        doc[k] = v.clone();
    }
    doc
}

fn authenticator(config: BTreeMap<String, serde_json::Value>) -> Authenticator {
    // Every test sets the same value, so parallel tests agree.
    std::env::set_var(ENV, SECRET);
    Authenticator::new(AuthSettings::default(), "sy/", &config).unwrap()
}

fn token(claims: serde_json::Value) -> String {
    let now = crate::auth::jwt::unix_now();
    let mut c = json!({"iss": ISS, "aud": "api", "sub": "alice", "exp": now + 600});
    for (k, v) in claims.as_object().unwrap() {
        c[k] = v.clone();
    }
    let mut h = Header::new(Algorithm::HS256);
    h.kid = Some("k".into());
    encode(&h, &c, &EncodingKey::from_secret(SECRET.as_bytes())).unwrap()
}

fn req(providers: &[&str], api_key: bool, scopes: &[&str], redirect: Option<&str>) -> Requirement {
    Requirement::new(
        providers.iter().map(|s| s.to_string()).collect(),
        api_key,
        scopes.iter().map(|s| s.to_string()).collect(),
        redirect.map(str::to_string),
    )
    .unwrap()
}

fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in pairs {
        h.append(
            HeaderName::from_bytes(k.as_bytes()).unwrap(),
            v.parse().unwrap(),
        );
    }
    h
}

fn uri() -> Uri {
    "/orders?x=1".parse().unwrap()
}

const LOCAL: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

impl Authenticator {
    async fn admit_local(
        &self,
        requirement: &Requirement,
        uri: &Uri,
        headers: &mut HeaderMap,
    ) -> Result<Option<Arc<Identity>>, AuthRejection> {
        self.admit(requirement, LOCAL, uri, headers).await
    }
}

#[tokio::test]
async fn an_open_route_still_loses_forged_identity_headers() {
    let a = authenticator(BTreeMap::from([("main".into(), provider_doc(json!({})))]));
    let mut h = headers(&[
        ("x-user-id", "root"),
        ("x-consumer", "billing"),
        ("x-ok", "1"),
    ]);
    let out = a
        .admit_local(&Requirement::open(), &uri(), &mut h)
        .await
        .unwrap();
    assert!(out.is_none());
    assert!(!h.contains_key("x-user-id") && !h.contains_key("x-consumer"));
    assert_eq!(h["x-ok"], "1");
}

#[tokio::test]
async fn a_valid_token_replaces_forged_headers_with_verified_ones() {
    let a = authenticator(BTreeMap::from([("main".into(), provider_doc(json!({})))]));
    let t = format!("Bearer {}", token(json!({"scope": "orders:read"})));
    let mut h = headers(&[
        ("authorization", &t),
        ("x-user-id", "root"),
        ("connection", "X-User-Id, keep-alive"),
    ]);
    let id = a
        .admit_local(
            &req(&["main"], false, &["orders:read"], None),
            &uri(),
            &mut h,
        )
        .await
        .unwrap()
        .unwrap();
    assert_eq!(id.subject.as_deref(), Some("alice"));
    assert_eq!(h.get_all("x-user-id").iter().collect::<Vec<_>>(), ["alice"]);
    assert_eq!(
        h["connection"], "keep-alive",
        "Connection cannot name X-User-Id"
    );
    assert!(
        h.contains_key("authorization"),
        "kept unless remove_authorization"
    );
}

#[tokio::test]
async fn missing_scope_is_403_with_the_scope_in_the_challenge() {
    let a = authenticator(BTreeMap::from([("main".into(), provider_doc(json!({})))]));
    let t = format!("Bearer {}", token(json!({"scope": "orders:read"})));
    let mut h = headers(&[("authorization", &t)]);
    let r = a
        .admit_local(
            &req(&["main"], false, &["orders:write"], None),
            &uri(),
            &mut h,
        )
        .await
        .unwrap_err();
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    let challenge = r.headers[WWW_AUTHENTICATE].to_str().unwrap();
    assert!(
        challenge.contains("error=\"insufficient_scope\""),
        "{challenge}"
    );
    assert!(challenge.contains("scope=\"orders:write\""), "{challenge}");
}

#[tokio::test]
async fn failures_are_401_with_a_bearer_challenge() {
    let a = authenticator(BTreeMap::from([("main".into(), provider_doc(json!({})))]));
    let r = a
        .admit_local(
            &req(&["main"], false, &[], None),
            &uri(),
            &mut HeaderMap::new(),
        )
        .await
        .unwrap_err();
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert_eq!(r.error, AuthError::Missing);
    assert_eq!(r.headers[WWW_AUTHENTICATE], "Bearer realm=\"switchyard\"");
    let t = format!("Bearer {}", token(json!({"aud": "web"})));
    let r = a
        .admit_local(
            &req(&["main"], false, &[], None),
            &uri(),
            &mut headers(&[("authorization", &t)]),
        )
        .await
        .unwrap_err();
    let challenge = r.headers[WWW_AUTHENTICATE].to_str().unwrap();
    assert!(challenge.contains("error=\"invalid_token\""), "{challenge}");
    let said = r.error.to_string();
    assert!(said.contains("wrong audience"), "{said}");
    assert!(!said.contains(&t[7..]), "the token is never echoed");
    assert!(!challenge.contains(&t[7..]), "the token is never echoed");
}

#[tokio::test]
async fn browsers_are_sent_to_the_login_page() {
    let a = authenticator(BTreeMap::from([("main".into(), provider_doc(json!({})))]));
    let route = req(&["main"], false, &[], Some("https://login.example.com/"));
    let mut h = headers(&[("accept", "text/html,application/xhtml+xml")]);
    let r = a.admit_local(&route, &uri(), &mut h).await.unwrap_err();
    assert_eq!(r.status, StatusCode::FOUND);
    assert_eq!(r.headers[LOCATION], "https://login.example.com/");
    let r = a
        .admit_local(
            &route,
            &uri(),
            &mut headers(&[("accept", "application/json")]),
        )
        .await
        .unwrap_err();
    assert_eq!(r.status, StatusCode::UNAUTHORIZED, "APIs get a 401");
}

#[tokio::test]
async fn api_keys_come_from_kv_and_never_travel_upstream() {
    let a = authenticator(BTreeMap::new());
    let good = mint("billing", vec!["orders:read".into()], Some("b1".into()));
    let mut off = mint("old", vec![], Some("o1".into()));
    off.doc.disabled = true;
    a.apply_api_key_docs(&[
        kv("sy/apikeys/b1", &serde_json::to_value(&good.doc).unwrap()),
        kv("sy/apikeys/o1", &serde_json::to_value(&off.doc).unwrap()),
        kv("sy/apikeys/bad", &json!({"sha256": "zz", "consumer": "x"})),
    ]);
    assert_eq!(a.api_key_count(), 2);
    assert_eq!(a.rejections().len(), 1);
    let route = req(&[], true, &["orders:read"], None);
    let mut h = headers(&[("x-api-key", &good.key), ("x-consumer", "forged")]);
    let id = a
        .admit_local(&route, &uri(), &mut h)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(id.consumer.as_deref(), Some("billing"));
    assert_eq!(h["x-consumer"], "billing");
    assert!(!h.contains_key("x-api-key"));
    let r = a
        .admit_local(&route, &uri(), &mut headers(&[("x-api-key", &off.key)]))
        .await
        .unwrap_err();
    assert_eq!(
        (r.status, r.error),
        (StatusCode::UNAUTHORIZED, AuthError::DisabledApiKey)
    );
    assert!(r.headers[WWW_AUTHENTICATE]
        .to_str()
        .unwrap()
        .starts_with("ApiKey"));
    let r = a
        .admit_local(&route, &uri(), &mut headers(&[("x-api-key", "sy_guess")]))
        .await
        .unwrap_err();
    assert_eq!(r.error, AuthError::UnknownApiKey);
    a.apply_api_key_docs(&[]);
    assert_eq!(a.api_key_count(), 0, "deleted keys stop working");
}

#[tokio::test]
async fn either_credential_satisfies_a_route_that_takes_both() {
    let a = authenticator(BTreeMap::from([("main".into(), provider_doc(json!({})))]));
    let k = mint("svc", vec![], Some("s1".into()));
    a.apply_api_key_docs(&[kv("sy/apikeys/s1", &serde_json::to_value(&k.doc).unwrap())]);
    let route = req(&["main"], true, &[], None);
    let bad = format!("Bearer {}", token(json!({"iss": "https://evil"})));
    let mut h = headers(&[("authorization", &bad), ("x-api-key", &k.key)]);
    let id = a
        .admit_local(&route, &uri(), &mut h)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(id.consumer.as_deref(), Some("svc"));
    let t = format!("Bearer {}", token(json!({})));
    let id = a
        .admit_local(&route, &uri(), &mut headers(&[("authorization", &t)]))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(id.subject.as_deref(), Some("alice"));
}

#[tokio::test]
async fn kv_providers_override_the_config_and_keep_their_last_good_version() {
    let a = authenticator(BTreeMap::from([("main".into(), provider_doc(json!({})))]));
    let route = req(&["main"], false, &[], None);
    let t = format!("Bearer {}", token(json!({})));
    async fn check(a: &Authenticator, route: &Requirement, t: &str) -> Result<(), AuthError> {
        a.admit_local(route, &uri(), &mut headers(&[("authorization", t)]))
            .await
            .map(|_| ())
            .map_err(|r| r.error)
    }
    let ok = |a| check(a, &route, &t);
    assert_eq!(ok(&a).await, Ok(()));
    a.apply_provider_docs(&[kv(
        "sy/jwt/main",
        &provider_doc(json!({"audiences": ["other"]})),
    )]);
    assert_eq!(ok(&a).await, Err(AuthError::Audience), "KV wins");
    a.apply_provider_docs(&[kv("sy/jwt/main", &json!({"issuer": ISS}))]);
    assert_eq!(
        ok(&a).await,
        Err(AuthError::Audience),
        "bad doc: last good serves"
    );
    let rejections = a.rejections();
    assert_eq!(rejections.len(), 1);
    assert!(rejections[0].serving_last_good && rejections[0].error.contains("algorithms"));
    a.apply_provider_docs(&[]);
    assert_eq!(ok(&a).await, Ok(()), "deleted: the config provider is back");
    assert_eq!(a.provider_names(), ["main"]);
}

#[tokio::test]
async fn provider_headers_are_stripped_on_every_route_and_authorization_can_be_removed() {
    let a = authenticator(BTreeMap::new());
    a.apply_provider_docs(&[kv(
        "sy/jwt/p",
        &provider_doc(
            json!({"claims_to_headers": {"sub": "X-Sub", "email": "X-Email"},
            "remove_authorization": true}),
        ),
    )]);
    let mut h = headers(&[("x-email", "ceo@example.com"), ("x-user-id", "x")]);
    a.admit_local(&Requirement::open(), &uri(), &mut h)
        .await
        .unwrap();
    assert!(h.is_empty(), "{h:?}");
    let t = format!("Bearer {}", token(json!({})));
    let mut h = headers(&[("authorization", &t)]);
    a.admit_local(&req(&["p"], false, &[], None), &uri(), &mut h)
        .await
        .unwrap();
    assert_eq!(h["x-sub"], "alice");
    assert!(!h.contains_key("authorization"));
}

#[tokio::test]
async fn a_route_naming_only_unknown_providers_fails_closed() {
    let a = authenticator(BTreeMap::new());
    let t = format!("Bearer {}", token(json!({})));
    let r = a
        .admit_local(
            &req(&["ghost"], false, &[], None),
            &uri(),
            &mut headers(&[("authorization", &t)]),
        )
        .await
        .unwrap_err();
    assert_eq!(r.error, AuthError::UnknownProvider);
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn a_client_that_spends_its_failure_budget_is_refused_unverified_and_others_are_not() {
    std::env::set_var(ENV, SECRET);
    let settings = AuthSettings {
        failure_budget: FailureBudgetSettings {
            burst: 2,
            per_second: 0.01,
            max_clients: 100,
            global_burst: 0,
            global_per_second: 0.0,
            refusal_delay: std::time::Duration::ZERO,
            max_delayed_refusals: 0,
        },
        ..AuthSettings::default()
    };
    let config = BTreeMap::from([("main".into(), provider_doc(json!({})))]);
    let a = Authenticator::new(settings, "sy/", &config).unwrap();
    let route = req(&["main"], false, &[], None);
    let attacker: IpAddr = "192.0.2.66".parse().unwrap();
    let healthy: IpAddr = "192.0.2.7".parse().unwrap();
    let bearer = |t: &str| headers(&[("authorization", &format!("Bearer {t}"))]);
    let cached = token(json!({"sub": "cached"}));
    a.admit(&route, attacker, &uri(), &mut bearer(&cached))
        .await
        .unwrap();
    let good = token(json!({}));
    let (head, sig) = good.rsplit_once('.').unwrap();
    // Distinct tokens, each with a bad signature (its first character changed).
    let forged = |i: usize| {
        let other: Vec<char> = "ABCDEFGH"
            .chars()
            .filter(|c| !sig.starts_with(*c))
            .collect();
        format!("{head}.{}{}", other[i], &sig[1..])
    };
    for i in 0..2 {
        let r = a
            .admit(&route, attacker, &uri(), &mut bearer(&forged(i)))
            .await
            .unwrap_err();
        assert_eq!(r.error, AuthError::Signature);
    }
    let r = a
        .admit(&route, attacker, &uri(), &mut bearer(&forged(2)))
        .await
        .unwrap_err();
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(r.code(), "too_many_invalid_tokens");
    assert!(matches!(r.error, AuthError::TooManyFailures { retry_after_s } if retry_after_s >= 99));
    assert_eq!(r.headers[RETRY_AFTER], "100");
    assert!(!r.headers.contains_key(WWW_AUTHENTICATE));
    // Even a good token is not verified for this address now...
    let r = a
        .admit(&route, attacker, &uri(), &mut bearer(&good))
        .await
        .unwrap_err();
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
    // ...but one it already verified still passes, and other addresses are unaffected.
    a.admit(&route, attacker, &uri(), &mut bearer(&cached))
        .await
        .unwrap();
    a.admit(&route, healthy, &uri(), &mut bearer(&good))
        .await
        .unwrap();
    let r = a
        .admit(&route, healthy, &uri(), &mut bearer(&forged(3)))
        .await
        .unwrap_err();
    assert_eq!(r.error, AuthError::Signature);
}
