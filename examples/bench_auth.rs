//! Cost of edge auth per request: `Authenticator::admit` (strip forged headers, verify,
//! write identity headers) for an open route, API keys, and HS256/RS256 tokens with and
//! without the verified-token cache. Run through `scripts/bench-auth.sh`.
//!
//!   cargo run --release --example bench_auth -- [--iterations N]

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use http::{HeaderMap, HeaderValue, Uri};
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use switchyard::auth::api_key::mint;
use switchyard::auth::{AuthSettings, Authenticator, Requirement};

/// Where the requests come from (the failed-verification budget is per address).
const CLIENT: std::net::IpAddr = std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);
const SECRET_ENV: &str = "SWITCHYARD_BENCH_AUTH_SECRET";
const SECRET: &str = "bench-secret-bench-secret-bench-secret!";
const RSA_PRIVATE: &str = include_str!("../tests/fixtures/rsa-private.pem");
const RSA_PUBLIC: &str = include_str!("../tests/fixtures/rsa-public.pem");

fn provider(alg: &str, cache_entries: usize) -> serde_json::Value {
    let key = if alg == "HS256" {
        serde_json::json!({"kid": "k", "secret_env": SECRET_ENV})
    } else {
        serde_json::json!({"kid": "k", "pem": RSA_PUBLIC})
    };
    serde_json::json!({"issuer": "https://id.bench", "audiences": ["api"], "algorithms": [alg],
        "keys": [key], "cache_entries": cache_entries})
}

fn token(alg: Algorithm) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let claims = serde_json::json!({"iss": "https://id.bench", "aud": "api", "sub": "bench-user",
        "scope": "orders:read orders:write", "exp": now + 3600});
    let key = match alg {
        Algorithm::HS256 => EncodingKey::from_secret(SECRET.as_bytes()),
        _ => EncodingKey::from_rsa_pem(RSA_PRIVATE.as_bytes()).unwrap(),
    };
    let mut h = Header::new(alg);
    h.kid = Some("k".into());
    encode(&h, &claims, &key).unwrap()
}

async fn measure(
    auth: &Authenticator,
    requirement: &Requirement,
    headers: &HeaderMap,
    iterations: u32,
) -> Duration {
    let uri: Uri = "/orders/1".parse().unwrap();
    // Warm up (fills the cache where there is one).
    for _ in 0..(iterations / 10).max(1) {
        let mut h = headers.clone();
        auth.admit(requirement, CLIENT, &uri, &mut h).await.unwrap();
    }
    let start = Instant::now();
    for _ in 0..iterations {
        let mut h = headers.clone();
        auth.admit(requirement, CLIENT, &uri, &mut h).await.unwrap();
    }
    start.elapsed() / iterations
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let mut iterations: u32 = 20_000;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--iterations" => {
                iterations = args
                    .next()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(iterations)
            }
            other => {
                eprintln!("unknown argument {other}");
                std::process::exit(2);
            }
        }
    }
    std::env::set_var(SECRET_ENV, SECRET);
    let providers = BTreeMap::from([
        ("hs".to_string(), provider("HS256", 10_000)),
        ("hs-nocache".to_string(), provider("HS256", 0)),
        ("rs".to_string(), provider("RS256", 10_000)),
        ("rs-nocache".to_string(), provider("RS256", 0)),
    ]);
    let auth = Authenticator::new(AuthSettings::default(), "bench/", &providers).unwrap();
    let key = mint("bench", vec!["orders:read".into()], Some("b".into()));
    let kv = serde_json::json!([{"Key": "bench/apikeys/b", "Value": base64::Engine::encode(
        &base64::engine::general_purpose::STANDARD, serde_json::to_vec(&key.doc).unwrap())}]);
    auth.apply_api_key_docs(&serde_json::from_value::<Vec<_>>(kv).unwrap());

    let mut base = HeaderMap::new();
    base.insert("host", HeaderValue::from_static("api.example.com"));
    base.insert("user-agent", HeaderValue::from_static("bench/1"));
    base.insert("accept", HeaderValue::from_static("application/json"));
    base.insert("x-user-id", HeaderValue::from_static("forged"));
    let with = |name: &'static str, value: String| {
        let mut h = base.clone();
        h.insert(name, HeaderValue::from_str(&value).unwrap());
        h
    };
    let req = |p: &str| {
        Requirement::new(vec![p.into()], false, vec!["orders:read".into()], None).unwrap()
    };
    let hs = format!("Bearer {}", token(Algorithm::HS256));
    let rs = format!("Bearer {}", token(Algorithm::RS256));
    let cases: Vec<(&str, Requirement, HeaderMap, u32)> = vec![
        (
            "open route (strip only)",
            Requirement::open(),
            base.clone(),
            iterations,
        ),
        (
            "API key",
            Requirement::new(vec![], true, vec![], None).unwrap(),
            with("x-api-key", key.key.clone()),
            iterations,
        ),
        (
            "HS256, cached",
            req("hs"),
            with("authorization", hs.clone()),
            iterations,
        ),
        (
            "HS256, no cache",
            req("hs-nocache"),
            with("authorization", hs),
            iterations,
        ),
        (
            "RS256, cached",
            req("rs"),
            with("authorization", rs.clone()),
            iterations,
        ),
        (
            "RS256, no cache",
            req("rs-nocache"),
            with("authorization", rs),
            (iterations / 20).max(50),
        ),
    ];
    println!(
        "{:<26} {:>12} {:>14}",
        "case", "per request", "max req/s/core"
    );
    for (name, requirement, headers, n) in cases {
        let per = measure(&auth, &requirement, &headers, n).await;
        println!(
            "{name:<26} {:>10.2}µs {:>14.0}",
            per.as_secs_f64() * 1e6,
            1.0 / per.as_secs_f64()
        );
    }
}
