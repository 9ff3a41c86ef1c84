//! Gateway → backend trust: short-lived JWTs the gateway signs with its own key (Ed25519 or
//! P-256, PKCS#8 PEM from `[assertion] key_file`), carrying who called and which request
//! this is, and the JWKS (`/jwks.json` on the admin listener) backends verify them with.
//! A backend that accepts only requests bearing a valid assertion for its audience is
//! reachable only through the gateway.
//!
//! Plain data in, token out: nothing here knows routes or requests.

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::Serialize;
use serde_json::{json, Value};

use crate::config::AssertionSection;

#[derive(Debug, thiserror::Error)]
pub enum AssertionError {
    #[error("cannot read assertion key {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("assertion key {path}: {message}")]
    Key { path: PathBuf, message: String },
    #[error("`[assertion] {field}`: {message}")]
    Setting {
        field: &'static str,
        message: &'static str,
    },
    #[error("signing an assertion failed: {0}")]
    Sign(String),
}

/// Who called, as auth verified it. Anonymous callers have neither subject nor consumer.
#[derive(Debug, Clone, Copy, Default)]
pub struct Caller<'a> {
    /// JWT `sub`, or the API key's consumer.
    pub subject: Option<&'a str>,
    /// The API key's consumer (`None` for tokens).
    pub consumer: Option<&'a str>,
    pub scopes: &'a [String],
}

impl<'a> From<&'a crate::auth::Identity> for Caller<'a> {
    fn from(id: &'a crate::auth::Identity) -> Caller<'a> {
        Caller {
            subject: id.subject.as_deref(),
            consumer: id.consumer.as_deref(),
            scopes: &id.scopes,
        }
    }
}

/// The claims of one assertion.
#[derive(Debug, Serialize)]
pub struct Claims<'a> {
    pub iss: &'a str,
    pub aud: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sub: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub consumer: Option<&'a str>,
    /// Space-delimited, like OAuth 2 `scope`.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub scope: String,
    /// The request id (the one in `X-Request-Id` and the access log).
    pub rid: &'a str,
    /// Unique per assertion, for backends that want replay detection.
    pub jti: String,
    pub iat: u64,
    pub exp: u64,
}

/// The gateway's signing key and its public half.
pub struct Signer {
    issuer: String,
    kid: String,
    alg: Algorithm,
    key: EncodingKey,
    jwk: Value,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("Signer")
            .field("issuer", &self.issuer)
            .field("kid", &self.kid)
            .field("alg", &self.alg)
            .finish()
    }
}

impl Signer {
    pub fn load(section: &AssertionSection) -> Result<Signer, AssertionError> {
        let pem =
            std::fs::read_to_string(&section.key_file).map_err(|source| AssertionError::Read {
                path: section.key_file.clone(),
                source,
            })?;
        Signer::from_pem(&pem, &section.key_file, &section.kid, &section.issuer)
    }

    /// A PKCS#8 PEM private key: Ed25519 (signs `EdDSA`) or P-256 (signs `ES256`).
    pub fn from_pem(
        pem: &str,
        path: &Path,
        kid: &str,
        issuer: &str,
    ) -> Result<Signer, AssertionError> {
        if kid.trim().is_empty() {
            return Err(AssertionError::Setting {
                field: "kid",
                message: "must not be empty",
            });
        }
        if issuer.trim().is_empty() {
            return Err(AssertionError::Setting {
                field: "issuer",
                message: "must not be empty",
            });
        }
        let key_err = |message: String| AssertionError::Key {
            path: path.to_path_buf(),
            message,
        };
        let (alg, key, mut jwk) = {
            use ed25519_dalek::pkcs8::DecodePrivateKey as _;
            if let Ok(sk) = ed25519_dalek::SigningKey::from_pkcs8_pem(pem) {
                let x = URL_SAFE_NO_PAD.encode(sk.verifying_key().as_bytes());
                let key =
                    EncodingKey::from_ed_pem(pem.as_bytes()).map_err(|e| key_err(e.to_string()))?;
                let jwk = json!({"kty": "OKP", "crv": "Ed25519", "x": x, "alg": "EdDSA"});
                (Algorithm::EdDSA, key, jwk)
            } else if let Ok(sk) = {
                use p256::pkcs8::DecodePrivateKey as _;
                p256::SecretKey::from_pkcs8_pem(pem)
            } {
                use p256::elliptic_curve::sec1::ToEncodedPoint as _;
                let point = sk.public_key().to_encoded_point(false);
                let (Some(x), Some(y)) = (point.x(), point.y()) else {
                    return Err(key_err("P-256 public key has no coordinates".into()));
                };
                let key =
                    EncodingKey::from_ec_pem(pem.as_bytes()).map_err(|e| key_err(e.to_string()))?;
                let jwk = json!({"kty": "EC", "crv": "P-256", "x": URL_SAFE_NO_PAD.encode(x),
                    "y": URL_SAFE_NO_PAD.encode(y), "alg": "ES256"});
                (Algorithm::ES256, key, jwk)
            } else {
                return Err(key_err(
                    "not a PKCS#8 PEM Ed25519 or P-256 private key (`-----BEGIN PRIVATE KEY-----`)"
                        .into(),
                ));
            }
        };
        jwk["kid"] = Value::String(kid.to_string());
        jwk["use"] = Value::String("sig".into());
        Ok(Signer {
            issuer: issuer.to_string(),
            kid: kid.to_string(),
            alg,
            key,
            jwk,
        })
    }

    pub fn algorithm(&self) -> Algorithm {
        self.alg
    }

    pub fn kid(&self) -> &str {
        &self.kid
    }

    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    /// `{"keys": [<public JWK>]}`.
    pub fn jwks(&self) -> Value {
        json!({"keys": [self.jwk.clone()]})
    }

    /// Signs an assertion for `audience`, valid for `ttl_s` seconds from now.
    pub fn sign(
        &self,
        audience: &str,
        ttl_s: u64,
        caller: Caller<'_>,
        request_id: &str,
    ) -> Result<String, AssertionError> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let claims = Claims {
            iss: &self.issuer,
            aud: audience,
            sub: caller.subject,
            consumer: caller.consumer,
            scope: caller.scopes.join(" "),
            rid: request_id,
            jti: uuid::Uuid::new_v4().simple().to_string(),
            iat: now,
            exp: now + ttl_s,
        };
        let mut header = Header::new(self.alg);
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&header, &claims, &self.key)
            .map_err(|e| AssertionError::Sign(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::jwk::JwkSet;
    use jsonwebtoken::{decode, DecodingKey, Validation};

    const ED: &str = include_str!("../tests/fixtures/ed-private.pem");
    const EC: &str = include_str!("../tests/fixtures/ec-private.pem");
    const RSA: &str = include_str!("../tests/fixtures/rsa-private.pem");

    fn signer(pem: &str) -> Signer {
        Signer::from_pem(pem, Path::new("k.pem"), "gw-1", "switchyard").unwrap()
    }

    fn verify(s: &Signer, token: &str, aud: &str) -> serde_json::Map<String, Value> {
        let set: JwkSet = serde_json::from_value(s.jwks()).unwrap();
        let jwk = set.find("gw-1").unwrap();
        let key = DecodingKey::from_jwk(jwk).unwrap();
        let mut v = Validation::new(s.algorithm());
        v.set_audience(&[aud]);
        v.set_issuer(&["switchyard"]);
        decode(token, &key, &v).unwrap().claims
    }

    #[test]
    fn both_key_types_sign_what_their_jwks_verifies() {
        for (pem, alg, kty) in [(ED, Algorithm::EdDSA, "OKP"), (EC, Algorithm::ES256, "EC")] {
            let s = signer(pem);
            assert_eq!(s.algorithm(), alg);
            let jwks = s.jwks();
            assert_eq!(jwks["keys"][0]["kty"], kty);
            assert_eq!(jwks["keys"][0]["kid"], "gw-1");
            assert_eq!(jwks["keys"][0]["use"], "sig");
            assert!(jwks["keys"][0].get("d").is_none(), "no private part");
            let scopes = vec!["a".to_string(), "b".to_string()];
            let caller = Caller {
                subject: Some("alice"),
                consumer: None,
                scopes: &scopes,
            };
            let token = s.sign("orders", 30, caller, "req-1").unwrap();
            let claims = verify(&s, &token, "orders");
            assert_eq!(claims["sub"], "alice");
            assert_eq!(claims["scope"], "a b");
            assert_eq!(claims["rid"], "req-1");
            assert!(claims.get("consumer").is_none());
            let (iat, exp) = (
                claims["iat"].as_u64().unwrap(),
                claims["exp"].as_u64().unwrap(),
            );
            assert_eq!(exp - iat, 30);
        }
    }

    #[test]
    fn anonymous_callers_get_no_subject_and_each_token_is_unique() {
        let s = signer(ED);
        let a = s.sign("svc", 5, Caller::default(), "r").unwrap();
        let b = s.sign("svc", 5, Caller::default(), "r").unwrap();
        let (ca, cb) = (verify(&s, &a, "svc"), verify(&s, &b, "svc"));
        assert!(ca.get("sub").is_none());
        assert!(ca.get("scope").is_none());
        assert_ne!(ca["jti"], cb["jti"]);
    }

    #[test]
    fn other_keys_and_settings_are_refused_clearly() {
        let err = Signer::from_pem(RSA, Path::new("rsa.pem"), "k", "i").unwrap_err();
        assert!(err.to_string().contains("rsa.pem"), "{err}");
        assert!(err.to_string().contains("PKCS#8"), "{err}");
        let err = Signer::from_pem(ED, Path::new("k"), " ", "i").unwrap_err();
        assert!(err.to_string().contains("kid"), "{err}");
        let err = Signer::load(&AssertionSection {
            key_file: "/nonexistent/key.pem".into(),
            kid: "k".into(),
            issuer: "i".into(),
        })
        .unwrap_err();
        assert!(err.to_string().contains("/nonexistent/key.pem"), "{err}");
    }
}
