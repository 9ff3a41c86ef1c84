use super::*;
use jsonwebtoken::{encode, EncodingKey, Header};
use serde_json::json;

pub(crate) const SECRET: &str = "0123456789abcdef0123456789abcdef-test";
const RSA_PRIVATE: &str = include_str!("../../../tests/fixtures/rsa-private.pem");
const RSA_PUBLIC: &str = include_str!("../../../tests/fixtures/rsa-public.pem");
const RSA2_PRIVATE: &str = include_str!("../../../tests/fixtures/rsa2-private.pem");
const EC_PRIVATE: &str = include_str!("../../../tests/fixtures/ec-private.pem");
const EC_PUBLIC: &str = include_str!("../../../tests/fixtures/ec-public.pem");
const ED_PRIVATE: &str = include_str!("../../../tests/fixtures/ed-private.pem");
const ED_PUBLIC: &str = include_str!("../../../tests/fixtures/ed-public.pem");
const ISS: &str = "https://id.example.com";

fn secret_file() -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("secret");
    std::fs::write(&path, format!("{SECRET}\n")).unwrap();
    (dir, path)
}

fn provider(doc: serde_json::Value) -> Provider {
    Provider::build("main", &doc, &reqwest::Client::new(), None).unwrap()
}

/// A provider accepting HS256 (kid `h`), RS256 (kid `r`), ES256 (kid `e`) and EdDSA (kid `d`).
fn all_families() -> (tempfile::TempDir, Provider) {
    let (dir, path) = secret_file();
    let p = provider(json!({
        "issuer": ISS,
        "audiences": ["api", "other"],
        "algorithms": ["HS256", "RS256", "PS256", "ES256", "EdDSA"],
        "keys": [
            {"kid": "h", "secret_file": path},
            {"kid": "r", "pem": RSA_PUBLIC},
            {"kid": "e", "pem": EC_PUBLIC},
            {"kid": "d", "pem": ED_PUBLIC},
        ],
        "claims_to_headers": {"sub": "X-User-Id", "groups": "X-Groups", "level": "X-Level"},
        "payload_header": "X-Jwt-Payload",
    }));
    (dir, p)
}

fn claims(extra: serde_json::Value) -> serde_json::Value {
    let now = unix_now();
    let mut c = json!({"iss": ISS, "aud": "api", "sub": "alice", "exp": now + 600, "iat": now});
    for (k, v) in extra.as_object().unwrap() {
        if v.is_null() {
            c.as_object_mut().unwrap().remove(k);
        } else {
            c[k] = v.clone();
        }
    }
    c
}

fn hs256(kid: Option<&str>, claims: &serde_json::Value) -> String {
    let mut h = Header::new(Algorithm::HS256);
    h.kid = kid.map(str::to_string);
    encode(&h, claims, &EncodingKey::from_secret(SECRET.as_bytes())).unwrap()
}

fn signed(alg: Algorithm, kid: &str, claims: &serde_json::Value) -> String {
    let key = match alg {
        Algorithm::RS256 | Algorithm::PS256 | Algorithm::RS384 => {
            EncodingKey::from_rsa_pem(RSA_PRIVATE.as_bytes()).unwrap()
        }
        Algorithm::ES256 => EncodingKey::from_ec_pem(EC_PRIVATE.as_bytes()).unwrap(),
        Algorithm::EdDSA => EncodingKey::from_ed_pem(ED_PRIVATE.as_bytes()).unwrap(),
        _ => EncodingKey::from_secret(SECRET.as_bytes()),
    };
    let mut h = Header::new(alg);
    h.kid = Some(kid.to_string());
    encode(&h, claims, &key).unwrap()
}

fn b64(v: &serde_json::Value) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
}

#[tokio::test]
async fn every_allowed_family_verifies_with_its_own_key() {
    let (_d, p) = all_families();
    for (alg, kid) in [
        (Algorithm::HS256, "h"),
        (Algorithm::RS256, "r"),
        (Algorithm::PS256, "r"),
        (Algorithm::ES256, "e"),
        (Algorithm::EdDSA, "d"),
    ] {
        let id = p
            .verify(&signed(alg, kid, &claims(json!({"scope": "orders:read"}))))
            .await
            .unwrap_or_else(|e| panic!("{alg:?}: {e}"));
        assert_eq!(id.subject.as_deref(), Some("alice"));
        assert_eq!(id.scopes, ["orders:read"]);
        assert_eq!(id.source, "main");
        assert_eq!(id.method, AuthMethod::Jwt);
    }
}

#[tokio::test]
async fn the_attack_table_is_refused_with_the_right_reason() {
    let (_d, p) = all_families();
    let now = unix_now();
    let good = claims(json!({}));
    let tampered = {
        let t = hs256(Some("h"), &good);
        let parts: Vec<&str> = t.split('.').collect();
        let evil = b64(&claims(json!({"sub": "root"})));
        format!("{}.{}.{}", parts[0], evil, parts[2])
    };
    let none_header = b64(&json!({"alg": "none", "typ": "JWT"}));
    let key_confusion = {
        // HS256 "signed" with the RSA public key PEM, kid pointing at the RSA key.
        let mut h = Header::new(Algorithm::HS256);
        h.kid = Some("r".into());
        encode(&h, &good, &EncodingKey::from_secret(RSA_PUBLIC.as_bytes())).unwrap()
    };
    let embedded_jwk = {
        // Signed with an attacker's key that the header carries as `jwk` and `jku`.
        let header = b64(
            &json!({"alg": "RS256", "jku": "http://127.0.0.1:1/jwks", "x5u": "http://127.0.0.1:1/x",
            "jwk": {"kty": "RSA", "n": "AQAB", "e": "AQAB"}}),
        );
        let payload = b64(&good);
        let message = format!("{header}.{payload}");
        let sig = jsonwebtoken::crypto::sign(
            message.as_bytes(),
            &EncodingKey::from_rsa_pem(RSA2_PRIVATE.as_bytes()).unwrap(),
            Algorithm::RS256,
        )
        .unwrap();
        format!("{message}.{sig}")
    };
    let crit = {
        let header = b64(&json!({"alg": "HS256", "kid": "h", "crit": ["exp"]}));
        let message = format!("{header}.{}", b64(&good));
        let sig = jsonwebtoken::crypto::sign(
            message.as_bytes(),
            &EncodingKey::from_secret(SECRET.as_bytes()),
            Algorithm::HS256,
        )
        .unwrap();
        format!("{message}.{sig}")
    };
    let cases: Vec<(&str, String, AuthError)> = vec![
        (
            "expired beyond the leeway",
            hs256(Some("h"), &claims(json!({"exp": now - 120}))),
            AuthError::Expired,
        ),
        (
            "nbf in the future",
            hs256(Some("h"), &claims(json!({"nbf": now + 120}))),
            AuthError::NotYetValid,
        ),
        (
            "wrong issuer",
            hs256(Some("h"), &claims(json!({"iss": "https://evil"}))),
            AuthError::Issuer,
        ),
        (
            "no issuer",
            hs256(Some("h"), &claims(json!({"iss": null}))),
            AuthError::MissingClaim("iss".into()),
        ),
        (
            "wrong audience",
            hs256(Some("h"), &claims(json!({"aud": "web"}))),
            AuthError::Audience,
        ),
        (
            "no audience",
            hs256(Some("h"), &claims(json!({"aud": null}))),
            AuthError::MissingClaim("aud".into()),
        ),
        (
            "no exp",
            hs256(Some("h"), &claims(json!({"exp": null}))),
            AuthError::MissingClaim("exp".into()),
        ),
        (
            "alg none, empty signature",
            format!("{none_header}.{}.", b64(&good)),
            AuthError::Malformed("empty token part"),
        ),
        (
            "alg none, any signature",
            format!("{none_header}.{}.x", b64(&good)),
            AuthError::Algorithm,
        ),
        (
            "alg outside the allow-list",
            signed(Algorithm::RS384, "r", &good),
            AuthError::Algorithm,
        ),
        (
            "HS256 with the RSA public key",
            key_confusion,
            AuthError::UnknownKey,
        ),
        ("tampered payload", tampered, AuthError::Signature),
        (
            "unknown kid",
            hs256(Some("nope"), &good),
            AuthError::UnknownKey,
        ),
        (
            "kid path trick",
            hs256(Some("../../etc/passwd"), &good),
            AuthError::UnknownKey,
        ),
        (
            "kid pointing at /dev/null",
            hs256(Some("/dev/null"), &good),
            AuthError::UnknownKey,
        ),
        (
            "key carried by the token",
            embedded_jwk,
            AuthError::Signature,
        ),
        (
            "crit header",
            crit,
            AuthError::Malformed("critical header extensions are not supported"),
        ),
        (
            "oversized",
            hs256(Some("h"), &claims(json!({"pad": "x".repeat(9000)}))),
            AuthError::TooLarge { max: 8192 },
        ),
        (
            "two parts",
            "a.b".into(),
            AuthError::Malformed("not a compact JWS"),
        ),
        (
            "garbage header",
            "!!!.e30.c2ln".into(),
            AuthError::Malformed("header is not base64url"),
        ),
    ];
    for (name, token, want) in cases {
        let got = p.verify(&token).await.err();
        assert_eq!(got.as_ref(), Some(&want), "{name}");
    }
}

#[tokio::test]
async fn leeway_tolerates_small_clock_skew() {
    let (_d, p) = all_families();
    let now = unix_now();
    let t = hs256(
        Some("h"),
        &claims(json!({"exp": now - 20, "nbf": now + 20})),
    );
    assert!(p.verify(&t).await.is_ok());
}

#[tokio::test]
async fn a_kidless_token_tries_each_key_of_its_family() {
    let (_d, p) = all_families();
    assert!(p.verify(&hs256(None, &claims(json!({})))).await.is_ok());
    let mut h = Header::new(Algorithm::RS256);
    h.kid = None;
    let t = encode(
        &h,
        &claims(json!({})),
        &EncodingKey::from_rsa_pem(RSA_PRIVATE.as_bytes()).unwrap(),
    )
    .unwrap();
    assert!(p.verify(&t).await.is_ok());
}

#[tokio::test]
async fn verified_tokens_come_from_the_cache() {
    let (_d, p) = all_families();
    let t = signed(Algorithm::RS256, "r", &claims(json!({})));
    let a = p.verify(&t).await.unwrap();
    let b = p.verify(&t).await.unwrap();
    assert!(Arc::ptr_eq(&a, &b));
    assert_eq!(p.cache.len(), 1);
    let bad = hs256(Some("h"), &claims(json!({"iss": "x"})));
    let _ = p.verify(&bad).await;
    assert_eq!(p.cache.len(), 1, "failures are not cached");
}

#[tokio::test]
async fn claims_become_headers() {
    let (_d, p) = all_families();
    let c = claims(json!({"groups": ["a", "b"], "level": 3, "evil": "x"}));
    let t = hs256(Some("h"), &c);
    let id = p.verify(&t).await.unwrap();
    let get = |name: &str| {
        id.headers
            .iter()
            .find(|(h, _)| h == name)
            .map(|(_, v)| v.to_str().unwrap().to_string())
    };
    assert_eq!(get("x-user-id").as_deref(), Some("alice"));
    assert_eq!(get("x-groups").as_deref(), Some("a,b"));
    assert_eq!(get("x-level").as_deref(), Some("3"));
    assert_eq!(
        get("x-jwt-payload").as_deref(),
        Some(t.split('.').nth(1).unwrap())
    );
    let names: Vec<&HeaderName> = p.identity_headers().collect();
    assert_eq!(names.len(), 4);
    let bad = hs256(Some("h"), &claims(json!({"sub": "a\r\nX-Admin: 1"})));
    let id = p.verify(&bad).await.unwrap();
    assert!(
        id.headers.iter().all(|(h, _)| h != "x-user-id"),
        "an unsafe value is dropped"
    );
}

#[test]
fn tokens_are_found_where_the_provider_says() {
    let (_d, path) = secret_file();
    let p = provider(
        json!({"issuer": ISS, "algorithms": ["HS256"], "keys": [{"secret_file": path}],
        "from_cookie": "session"}),
    );
    let uri: Uri = "/x?access_token=q".parse().unwrap();
    let mut h = HeaderMap::new();
    assert_eq!(p.extract(&uri, &h).unwrap(), None, "query not enabled");
    h.insert("authorization", "bEaReR  abc ".parse().unwrap());
    assert_eq!(
        p.extract(&uri, &h).unwrap(),
        Some(("abc".into(), TokenSource::Bearer))
    );
    h.append("authorization", "Bearer def".parse().unwrap());
    assert!(p.extract(&uri, &h).is_err(), "two Authorization headers");
    h.clear();
    h.insert("authorization", "Basic Zm9vOmJhcg==".parse().unwrap());
    h.insert("cookie", "a=1; session=tok; b=2".parse().unwrap());
    assert_eq!(
        p.extract(&uri, &h).unwrap(),
        Some(("tok".into(), TokenSource::Cookie))
    );
    let q = provider(
        json!({"issuer": ISS, "algorithms": ["HS256"], "keys": [{"secret_file": path}],
        "from_bearer": false, "from_query": "access_token"}),
    );
    assert_eq!(
        q.extract(&uri, &HeaderMap::new()).unwrap(),
        Some(("q".into(), TokenSource::Query))
    );
}

#[test]
fn bad_documents_say_what_is_wrong() {
    let (_d, path) = secret_file();
    let build = |doc: serde_json::Value| {
        Provider::build("main", &doc, &reqwest::Client::new(), None)
            .unwrap_err()
            .to_string()
    };
    let cases = [
        (
            json!({"issuer": ISS, "algorithms": ["HS256"], "keys": [{"secret_file": path}], "isuer": 1}),
            "isuer",
        ),
        (
            json!({"issuer": ISS, "algorithms": ["none"], "keys": [{"secret_file": path}]}),
            "never accepted",
        ),
        (json!({"issuer": ISS, "algorithms": ["HS256"]}), "no keys"),
        (
            json!({"issuer": "", "algorithms": ["HS256"], "keys": [{"secret_file": path}]}),
            "issuer",
        ),
        (
            json!({"issuer": ISS, "algorithms": [], "keys": [{"secret_file": path}]}),
            "algorithms",
        ),
        (
            json!({"issuer": ISS, "algorithms": ["RS256"], "keys": [{"secret_file": path}]}),
            "fits none",
        ),
        (
            json!({"issuer": ISS, "algorithms": ["HS256"], "keys": [{"secret_file": path}],
            "claims_to_headers": {"sub": "Authorization"}}),
            "cannot carry identity",
        ),
        (
            json!({"issuer": ISS, "algorithms": ["HS256"], "keys": [{"secret_file": path}],
            "claims_to_headers": {"sub": "bad header"}}),
            "not a header name",
        ),
        (
            json!({"issuer": ISS, "algorithms": ["RS256"], "jwks_url": "file:///etc/passwd"}),
            "http(s)",
        ),
        (
            json!({"issuer": ISS, "algorithms": ["HS256"], "keys": [{"secret_file": path}], "from_bearer": false}),
            "no token source",
        ),
    ];
    for (doc, want) in cases {
        let err = build(doc.clone());
        assert!(err.contains(want), "{doc}: {err}");
        assert!(!err.contains(SECRET), "secret echoed: {err}");
    }
    let err = Provider::build("../x", &json!({}), &reqwest::Client::new(), None).unwrap_err();
    assert!(err.to_string().contains("name"));
}

#[test]
fn debug_output_never_shows_a_secret() {
    let (_d, p) = all_families();
    let debug = format!("{p:?}");
    assert!(!debug.contains(SECRET), "{debug}");
    assert!(!debug.contains("0123456789abcdef"), "{debug}");
}

#[tokio::test]
async fn exp_can_be_made_optional() {
    let (_d, path) = secret_file();
    let p = provider(
        json!({"issuer": ISS, "algorithms": ["HS256"], "keys": [{"secret_file": path}],
        "require_exp": false}),
    );
    let t = hs256(None, &claims(json!({"exp": null, "aud": null})));
    assert!(p.verify(&t).await.is_ok());
}

#[test]
fn check_validates_without_starting_a_jwks_fetch() {
    let doc =
        json!({"issuer": ISS, "algorithms": ["RS256"], "jwks_url": "https://id.example.com/jwks"});
    // No Tokio runtime here: starting a fetch would panic.
    Provider::check("main", &doc).unwrap();
    let bad = json!({"issuer": ISS, "algorithms": ["RS256"], "jwks_url": "ftp://x"});
    assert!(Provider::check("main", &bad).is_err());
}

#[test]
fn a_bearer_credential_is_exactly_one_token() {
    let with = |v: &str| {
        let mut h = HeaderMap::new();
        h.insert(
            http::header::AUTHORIZATION,
            HeaderValue::from_str(v).unwrap(),
        );
        bearer_token(&h).map(|t| t.map(str::to_string))
    };
    assert_eq!(with("bearer  abc.def.ghi "), Ok(Some("abc.def.ghi".into())));
    assert_eq!(with("BEARER abc"), Ok(Some("abc".into())));
    assert_eq!(with("Basic abc"), Ok(None));
    for bad in ["Bearer a b", "Bearer a\tb", "Bearer ", "Bearer"] {
        assert!(
            matches!(with(bad), Err(AuthError::Malformed(_))),
            "{bad:?}: {:?}",
            with(bad)
        );
    }
}
