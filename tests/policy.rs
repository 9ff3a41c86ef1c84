//! Edge policy end to end, over real sockets on 127.0.0.1.

mod support;

use std::path::PathBuf;

use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{decode, decode_header, DecodingKey, Validation};
use support::{Consul, Gateway};

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
