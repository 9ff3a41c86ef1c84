//! Verification keys: where they come from (PEM, JWK, an HMAC secret by reference, a JWKS
//! document) and the [`KeySet`] a provider looks them up in. A key knows its algorithm
//! family, so a token can only ever be checked with a key of the family its `alg` names:
//! an HS256 token is never verified with an RSA or EC public key.
//!
//! Secrets never leave this module in printable form: [`Key`]'s `Debug` shows the kid and
//! family only.

use std::collections::HashMap;
use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk};
use jsonwebtoken::{Algorithm, DecodingKey, DecodingKeyKind};
use serde::Deserialize;

/// HMAC secrets shorter than this are refused (RFC 7518 §3.2: at least the hash size; 32
/// bytes is the size for HS256, larger variants are checked against their own size).
pub const MIN_SECRET_BYTES: usize = 32;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("key {0}: give exactly one of `pem`, `jwk`, `secret_file`, `secret_env`")]
    Source(String),
    #[error("key {key}: {message}")]
    Invalid { key: String, message: String },
}

fn invalid(key: &str, message: impl Into<String>) -> KeyError {
    KeyError::Invalid {
        key: key.to_string(),
        message: message.into(),
    }
}

/// One entry of a provider's `keys` list, as written in the document.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeySpec {
    /// Matched exactly against the token's `kid` header (a lookup key, nothing more).
    #[serde(default)]
    pub kid: Option<String>,
    /// Restricts the key to one algorithm (it is always restricted to its family).
    #[serde(default)]
    pub alg: Option<String>,
    /// A public key (`PUBLIC KEY`, `RSA PUBLIC KEY`); private keys are refused.
    #[serde(default)]
    pub pem: Option<String>,
    /// A public JWK (RSA, EC P-256/P-384, OKP Ed25519); symmetric `oct` JWKs are refused
    /// so that secrets are never stored in a document: use `secret_file`/`secret_env`.
    #[serde(default)]
    pub jwk: Option<serde_json::Value>,
    /// File holding an HMAC secret (trailing newline ignored).
    #[serde(default)]
    pub secret_file: Option<PathBuf>,
    /// Environment variable holding an HMAC secret.
    #[serde(default)]
    pub secret_env: Option<String>,
}

/// A verification key, ready to use.
pub struct Key {
    pub kid: Option<String>,
    /// When set, the only algorithm this key verifies.
    pub alg: Option<Algorithm>,
    family: Family,
    /// Length of an HMAC secret (0 for public keys), checked against the hash size.
    secret_len: usize,
    decoding: DecodingKey,
}

/// The algorithm family of a key (mirrors `jsonwebtoken::AlgorithmFamily`, which is not
/// `Hash`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Family {
    Hmac,
    Rsa,
    Ec,
    Ed,
}

impl Family {
    pub fn of(alg: Algorithm) -> Family {
        match alg {
            Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512 => Family::Hmac,
            Algorithm::RS256
            | Algorithm::RS384
            | Algorithm::RS512
            | Algorithm::PS256
            | Algorithm::PS384
            | Algorithm::PS512 => Family::Rsa,
            Algorithm::ES256 | Algorithm::ES384 => Family::Ec,
            Algorithm::EdDSA => Family::Ed,
        }
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Key")
            .field("kid", &self.kid)
            .field("alg", &self.alg)
            .field("family", &self.family)
            .finish_non_exhaustive()
    }
}

impl Key {
    pub fn family(&self) -> Family {
        self.family
    }

    /// May this key verify a token whose header says `alg`?
    pub fn allows(&self, alg: Algorithm) -> bool {
        if Family::of(alg) != self.family || self.alg.is_some_and(|a| a != alg) {
            return false;
        }
        match alg {
            Algorithm::HS384 => self.secret_len >= 48,
            Algorithm::HS512 => self.secret_len >= 64,
            _ => true,
        }
    }

    pub(crate) fn decoding(&self) -> &DecodingKey {
        &self.decoding
    }

    /// Builds the key a provider document describes, reading secrets from files or the
    /// environment. `label` names the key in errors (its kid or its position).
    pub fn from_spec(spec: &KeySpec, label: &str) -> Result<Key, KeyError> {
        let alg = spec
            .alg
            .as_deref()
            .map(|a| parse_algorithm(a).map_err(|m| invalid(label, m)))
            .transpose()?;
        let sources = [
            spec.pem.is_some(),
            spec.jwk.is_some(),
            spec.secret_file.is_some(),
            spec.secret_env.is_some(),
        ];
        if sources.iter().filter(|s| **s).count() != 1 {
            return Err(KeyError::Source(label.to_string()));
        }
        let mut key = if let Some(pem) = &spec.pem {
            from_pem(pem, alg, label)?
        } else if let Some(jwk) = &spec.jwk {
            let key = from_jwk(jwk, label)?;
            if let (Some(kid), Some(inner)) = (&spec.kid, &key.kid) {
                if kid != inner {
                    return Err(invalid(
                        label,
                        format!("kid `{kid}` differs from the JWK's kid `{inner}`"),
                    ));
                }
            }
            key
        } else if let Some(path) = &spec.secret_file {
            let bytes = std::fs::read(path)
                .map_err(|e| invalid(label, format!("secret_file {}: {e}", path.display())))?;
            from_secret(trim_newline(&bytes), label)?
        } else if let Some(name) = &spec.secret_env {
            let value = std::env::var_os(name)
                .ok_or_else(|| invalid(label, format!("environment variable {name} is not set")))?;
            from_secret(value.as_encoded_bytes(), label)?
        } else {
            return Err(KeyError::Source(label.to_string()));
        };
        if let Some(a) = alg {
            if Family::of(a) != key.family {
                return Err(invalid(
                    label,
                    format!("alg {a:?} does not fit a {:?} key", key.family),
                ));
            }
            if let Some(inner) = key.alg {
                if inner != a {
                    return Err(invalid(
                        label,
                        format!("alg {a:?} differs from the JWK's alg {inner:?}"),
                    ));
                }
            }
            key.alg = Some(a);
        }
        if spec.kid.is_some() {
            key.kid = spec.kid.clone();
        }
        if key.kid.as_deref() == Some("") {
            return Err(invalid(label, "kid must not be empty"));
        }
        Ok(key)
    }

    /// One key of a JWKS document. Keys for encryption, symmetric keys and unsupported
    /// curves are refused.
    pub fn from_jwk_value(value: &serde_json::Value) -> Result<Key, KeyError> {
        let label = value
            .get("kid")
            .and_then(|k| k.as_str())
            .unwrap_or("(no kid)")
            .to_string();
        from_jwk(value, &label)
    }
}

/// Parses an algorithm name from a document; `none` and unknown names are errors.
pub fn parse_algorithm(name: &str) -> Result<Algorithm, String> {
    if name.eq_ignore_ascii_case("none") {
        return Err("algorithm `none` is never accepted".into());
    }
    Algorithm::from_str(name).map_err(|_| {
        format!("unknown algorithm `{name}` (HS256/384/512, RS256/384/512, PS256/384/512, ES256/384, EdDSA)")
    })
}

fn trim_newline(bytes: &[u8]) -> &[u8] {
    let bytes = bytes.strip_suffix(b"\n").unwrap_or(bytes);
    bytes.strip_suffix(b"\r").unwrap_or(bytes)
}

fn from_secret(secret: &[u8], label: &str) -> Result<Key, KeyError> {
    if secret.len() < MIN_SECRET_BYTES {
        return Err(invalid(
            label,
            format!(
                "HMAC secret is {} bytes; at least {MIN_SECRET_BYTES} are required",
                secret.len()
            ),
        ));
    }
    Ok(Key {
        kid: None,
        alg: None,
        family: Family::Hmac,
        secret_len: secret.len(),
        decoding: DecodingKey::from_secret(secret),
    })
}

fn from_pem(pem: &str, alg: Option<Algorithm>, label: &str) -> Result<Key, KeyError> {
    let trimmed = pem.trim_start();
    let Some(rest) = trimmed.strip_prefix("-----BEGIN ") else {
        return Err(invalid(label, "pem must start with -----BEGIN"));
    };
    let tag = rest.split("-----").next().unwrap_or_default();
    if tag.contains("PRIVATE") {
        return Err(invalid(
            label,
            "pem holds a private key; give the public key",
        ));
    }
    let bytes = pem.as_bytes();
    let families = match alg.map(Family::of) {
        Some(f) => vec![f],
        None => vec![Family::Rsa, Family::Ec, Family::Ed],
    };
    for family in families {
        let decoding = match family {
            Family::Rsa => DecodingKey::from_rsa_pem(bytes),
            Family::Ec => DecodingKey::from_ec_pem(bytes),
            Family::Ed => DecodingKey::from_ed_pem(bytes),
            Family::Hmac => {
                return Err(invalid(
                    label,
                    "HMAC keys are secrets: use secret_file or secret_env",
                ))
            }
        };
        if let Ok(decoding) = decoding {
            if family == Family::Rsa {
                check_rsa_size(&decoding, label)?;
            }
            return Ok(Key {
                kid: None,
                alg: None,
                family,
                secret_len: 0,
                decoding,
            });
        }
    }
    Err(invalid(
        label,
        "pem is not an RSA, EC or Ed25519 public key",
    ))
}

fn from_jwk(value: &serde_json::Value, label: &str) -> Result<Key, KeyError> {
    let field = |name: &str| value.get(name).and_then(|v| v.as_str());
    if let Some(usage) = field("use") {
        if usage != "sig" {
            return Err(invalid(label, format!("JWK use is `{usage}`, not `sig`")));
        }
    }
    let alg = field("alg")
        .map(|a| parse_algorithm(a).map_err(|m| invalid(label, m)))
        .transpose()?;
    if field("kty") == Some("oct") {
        return Err(invalid(
            label,
            "symmetric (oct) JWKs are refused: give HMAC secrets by secret_file or secret_env",
        ));
    }
    let jwk: Jwk = serde_json::from_value(value.clone())
        .map_err(|e| invalid(label, format!("not a usable JWK: {e}")))?;
    let (family, implied) = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => (Family::Rsa, None),
        AlgorithmParameters::EllipticCurve(p) => match p.curve {
            EllipticCurve::P256 => (Family::Ec, Some(Algorithm::ES256)),
            EllipticCurve::P384 => (Family::Ec, Some(Algorithm::ES384)),
            ref other => {
                return Err(invalid(label, format!("unsupported EC curve {other:?}")));
            }
        },
        AlgorithmParameters::OctetKeyPair(p) => match p.curve {
            EllipticCurve::Ed25519 => (Family::Ed, Some(Algorithm::EdDSA)),
            ref other => {
                return Err(invalid(label, format!("unsupported OKP curve {other:?}")));
            }
        },
        AlgorithmParameters::OctetKey(_) => {
            return Err(invalid(label, "symmetric (oct) JWKs are refused"));
        }
    };
    if let Some(a) = alg {
        if Family::of(a) != family || implied.is_some_and(|i| i != a) {
            return Err(invalid(
                label,
                format!("JWK alg {a:?} does not fit its key type"),
            ));
        }
    }
    let decoding = DecodingKey::from_jwk(&jwk)
        .map_err(|e| invalid(label, format!("not a usable JWK: {e}")))?;
    if family == Family::Rsa {
        check_rsa_size(&decoding, label)?;
    }
    Ok(Key {
        kid: jwk.common.key_id.clone().filter(|k| !k.is_empty()),
        alg: alg.or(implied),
        family,
        secret_len: 0,
        decoding,
    })
}

/// RSA public keys must be 2048 to 8192 bits (what the verifier accepts): a shorter key is
/// an error here, where the operator sees it, not a stream of "invalid signature" later.
fn check_rsa_size(key: &DecodingKey, label: &str) -> Result<(), KeyError> {
    let n = match key.kind() {
        DecodingKeyKind::SecretOrDer(der) => {
            // PKCS#1 RSAPublicKey DER: the verifier's parser checks the encoding.
            aws_lc_rs::signature::ParsedPublicKey::new(
                &aws_lc_rs::signature::RSA_PKCS1_2048_8192_SHA256,
                der,
            )
            .map_err(|e| invalid(label, format!("RSA key refused: {e}")))?;
            pkcs1_modulus(der).ok_or_else(|| invalid(label, "RSA key refused: bad DER"))?
        }
        DecodingKeyKind::RsaModulusExponent { n, .. } => n.as_slice(),
    };
    let n = &n[n.iter().take_while(|b| **b == 0).count()..];
    let bits = n.first().map_or(0, |top| {
        (n.len() - 1) * 8 + (8 - top.leading_zeros() as usize)
    });
    if (2048..=8192).contains(&bits) {
        Ok(())
    } else {
        Err(invalid(
            label,
            format!("RSA key of {bits} bits: 2048 to 8192 bits are accepted"),
        ))
    }
}

/// The modulus of a PKCS#1 `RSAPublicKey ::= SEQUENCE { modulus INTEGER, ... }`.
fn pkcs1_modulus(der: &[u8]) -> Option<&[u8]> {
    // One DER element at the start of `input`: (tag, contents, rest).
    fn element(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
        let (&tag, input) = input.split_first()?;
        let (&first, input) = input.split_first()?;
        let (len, input) = match first {
            0..=0x7f => (usize::from(first), input),
            0x81..=0x82 => {
                let (bytes, input) = input.split_at_checked(usize::from(first & 0x7f))?;
                (bytes.iter().fold(0, |n, b| n << 8 | usize::from(*b)), input)
            }
            _ => return None,
        };
        let (contents, rest) = input.split_at_checked(len)?;
        Some((tag, contents, rest))
    }
    let (0x30, sequence, _) = element(der)? else {
        return None;
    };
    let (0x02, modulus, _) = element(sequence)? else {
        return None;
    };
    Some(modulus)
}

/// Keys by kid, plus those without one. Immutable once built; JWKS refreshes build a new
/// set and swap it in.
#[derive(Debug, Default)]
pub struct KeySet {
    by_kid: HashMap<String, Arc<Key>>,
    /// Every key, in document order (kid-less tokens try each key that fits the algorithm).
    all: Vec<Arc<Key>>,
}

impl KeySet {
    /// Builds a set; a duplicate kid is an error (the caller decides whether to skip).
    pub fn build(keys: Vec<Key>) -> Result<KeySet, KeyError> {
        let mut set = KeySet::default();
        for key in keys {
            set.insert(key)?;
        }
        Ok(set)
    }

    /// Adds a key; refuses a kid already present.
    pub fn insert(&mut self, key: Key) -> Result<(), KeyError> {
        let key = Arc::new(key);
        if let Some(kid) = &key.kid {
            if self.by_kid.contains_key(kid) {
                return Err(invalid(kid, "duplicate kid"));
            }
            self.by_kid.insert(kid.clone(), key.clone());
        }
        self.all.push(key);
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.all.len()
    }

    pub fn is_empty(&self) -> bool {
        self.all.is_empty()
    }

    pub fn contains_kid(&self, kid: &str) -> bool {
        self.by_kid.contains_key(kid)
    }

    /// The keys that may verify a token with this `kid` header and `alg`: the key with
    /// exactly that kid, or (no kid) every key of the algorithm's family.
    pub fn candidates<'a>(
        &'a self,
        kid: Option<&'a str>,
        alg: Algorithm,
    ) -> impl Iterator<Item = &'a Arc<Key>> + 'a {
        let named = kid.and_then(|k| self.by_kid.get(k)).into_iter();
        let unnamed = self.all.iter().filter(move |_| kid.is_none());
        named.chain(unnamed).filter(move |k| k.allows(alg))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) const RSA_PUBLIC: &str = include_str!("../../tests/fixtures/rsa-public.pem");
    const EC_PUBLIC: &str = include_str!("../../tests/fixtures/ec-public.pem");

    fn spec(json: serde_json::Value) -> KeySpec {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn a_pem_key_is_typed_by_its_content() {
        let k = Key::from_spec(
            &spec(serde_json::json!({"kid": "r", "pem": RSA_PUBLIC})),
            "r",
        )
        .unwrap();
        assert_eq!(k.family(), Family::Rsa);
        assert!(k.allows(Algorithm::RS256) && k.allows(Algorithm::PS512));
        assert!(
            !k.allows(Algorithm::HS256),
            "an RSA key never verifies HMAC"
        );
        let k = Key::from_spec(&spec(serde_json::json!({"pem": EC_PUBLIC})), "e").unwrap();
        assert_eq!(k.family(), Family::Ec);
        assert!(!k.allows(Algorithm::HS256));
    }

    #[test]
    fn rsa_keys_under_2048_bits_are_refused_when_loaded() {
        const RSA_1024: &str = "-----BEGIN PUBLIC KEY-----\nMIGfMA0GCSqGSIb3DQEBAQUAA4GNADCBiQKBgQCzSOPTe26wQRieu2Flk1kiZ3xW\nWuCmaiqPCcrpYvN8Krfo/ySDoeMUoUahladbyLM4pvb8vrVYN3aP8jNqzC4mpbhG\nylpfefPFW98iX2ZGmZF5ZXQ76mVC9HF+9AGwXfRJRzBpxveZbhN8wN4JNRO+kC74\n427tOeEEzt89v3PHxQIDAQAB\n-----END PUBLIC KEY-----\n";
        let err = Key::from_spec(&spec(serde_json::json!({"pem": RSA_1024})), "short")
            .unwrap_err()
            .to_string();
        assert!(err.contains("2048 to 8192 bits"), "{err}");
        // The same size given as JWK components (n is 128 bytes, leading zero allowed).
        let n = base64::Engine::encode(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD,
            [&[0u8][..], &[0xc5; 128][..]].concat(),
        );
        let jwk = serde_json::json!({"kty": "RSA", "n": n, "e": "AQAB"});
        let err = Key::from_jwk_value(&jwk).unwrap_err().to_string();
        assert!(err.contains("RSA key of 1024 bits"), "{err}");
        let n = base64::Engine::encode(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD,
            [0xc5; 256],
        );
        let jwk = serde_json::json!({"kty": "RSA", "n": n, "e": "AQAB"});
        Key::from_jwk_value(&jwk).unwrap();
    }

    #[test]
    fn private_keys_and_garbage_pems_are_refused() {
        let private =
            "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEI\n-----END PRIVATE KEY-----\n";
        let err = Key::from_spec(&spec(serde_json::json!({"pem": private})), "p").unwrap_err();
        assert!(err.to_string().contains("private key"), "{err}");
        let err = Key::from_spec(&spec(serde_json::json!({"pem": "hello"})), "p").unwrap_err();
        assert!(err.to_string().contains("BEGIN"), "{err}");
    }

    #[test]
    fn a_key_declares_exactly_one_source() {
        let err = Key::from_spec(&spec(serde_json::json!({"kid": "x"})), "x").unwrap_err();
        assert_eq!(err, KeyError::Source("x".into()));
        let err = Key::from_spec(
            &spec(serde_json::json!({"pem": RSA_PUBLIC, "secret_env": "X"})),
            "x",
        )
        .unwrap_err();
        assert_eq!(err, KeyError::Source("x".into()));
    }

    #[test]
    fn secrets_come_from_files_and_must_be_long_enough() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        std::fs::write(&path, "0123456789abcdef0123456789abcdef\n").unwrap();
        let k = Key::from_spec(&spec(serde_json::json!({"secret_file": path})), "s").unwrap();
        assert_eq!(k.family(), Family::Hmac);
        assert!(k.allows(Algorithm::HS256));
        assert!(
            !k.allows(Algorithm::HS512),
            "32 bytes is too short for HS512"
        );
        let debug = format!("{k:?}");
        assert!(!debug.contains("0123456789"), "{debug}");
        std::fs::write(&path, "short\n").unwrap();
        let err = Key::from_spec(&spec(serde_json::json!({"secret_file": path})), "s").unwrap_err();
        assert!(err.to_string().contains("at least 32"), "{err}");
        assert!(
            !err.to_string().contains("short"),
            "the secret is never echoed"
        );
    }

    #[test]
    fn a_missing_secret_env_is_named() {
        let err = Key::from_spec(
            &spec(serde_json::json!({"secret_env": "SWITCHYARD_TEST_SURELY_UNSET_VAR"})),
            "k",
        )
        .unwrap_err();
        assert!(err.to_string().contains("SWITCHYARD_TEST_SURELY_UNSET_VAR"));
    }

    #[test]
    fn jwks_of_the_wrong_kind_are_refused() {
        let oct = serde_json::json!({"kty": "oct", "k": "c2VjcmV0", "kid": "o"});
        assert!(Key::from_jwk_value(&oct).is_err());
        let enc = serde_json::json!({"kty": "RSA", "use": "enc", "n": "AQAB", "e": "AQAB"});
        assert!(Key::from_jwk_value(&enc).is_err());
        let none = serde_json::json!({"kty": "RSA", "alg": "none", "n": "AQAB", "e": "AQAB"});
        assert!(Key::from_jwk_value(&none).is_err());
    }

    #[test]
    fn an_ec_jwk_is_bound_to_its_curve() {
        let jwk = serde_json::json!({
            "kty": "EC", "crv": "P-256", "kid": "e1",
            "x": "f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU",
            "y": "x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"
        });
        let k = Key::from_jwk_value(&jwk).unwrap();
        assert_eq!(k.kid.as_deref(), Some("e1"));
        assert!(k.allows(Algorithm::ES256));
        assert!(!k.allows(Algorithm::ES384));
    }

    #[test]
    fn candidates_follow_the_kid_exactly() {
        let rsa = |kid: &str| {
            Key::from_spec(
                &spec(serde_json::json!({"kid": kid, "pem": RSA_PUBLIC})),
                kid,
            )
            .unwrap()
        };
        let set = KeySet::build(vec![rsa("a"), rsa("b")]).unwrap();
        assert_eq!(set.candidates(Some("a"), Algorithm::RS256).count(), 1);
        assert_eq!(
            set.candidates(Some("../../etc/passwd"), Algorithm::RS256)
                .count(),
            0
        );
        assert_eq!(set.candidates(None, Algorithm::RS256).count(), 2);
        assert_eq!(set.candidates(Some("a"), Algorithm::HS256).count(), 0);
        assert!(KeySet::build(vec![rsa("a"), rsa("a")]).is_err());
    }
}
