//! API keys, stored hashed in KV at `<kv-prefix>apikeys/<id>` as
//! `{"sha256": "<hex>", "consumer": "...", "scopes": [...], "disabled": false}`.
//!
//! The gateway never sees a stored key, only its SHA-256. A presented key is hashed, its
//! digest's first 8 bytes pick a bucket, and the full digest is compared with each entry
//! of the bucket in constant time (`subtle`), so timing reveals nothing about stored keys.

use std::collections::HashMap;
use std::sync::Arc;

use http::{HeaderName, HeaderValue};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::{AuthError, AuthMethod, Identity};

/// The folder under the KV prefix that holds API key documents.
pub const APIKEYS_DIR: &str = "apikeys/";
/// Prefix of minted keys (lets secret scanners recognise them).
pub const KEY_PREFIX: &str = "sy_";

/// The KV document of one API key.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ApiKeyDoc {
    /// Hex SHA-256 of the key.
    pub sha256: String,
    /// Who the key belongs to; sent upstream in the consumer header.
    pub consumer: String,
    #[serde(default)]
    pub scopes: Vec<String>,
    /// A disabled key is refused (401) but stays on record.
    #[serde(default)]
    pub disabled: bool,
}

/// A validated API key document.
#[derive(Debug)]
pub struct ApiKeyRecord {
    digest: [u8; 32],
    disabled: bool,
    identity: Arc<Identity>,
}

impl ApiKeyRecord {
    /// Parses and checks the document stored at `apikeys/<id>`.
    pub fn compile(
        id: &str,
        value: &[u8],
        consumer_header: &HeaderName,
    ) -> Result<ApiKeyRecord, String> {
        let doc: ApiKeyDoc = serde_json::from_slice(value).map_err(|e| e.to_string())?;
        let digest = hex::decode(doc.sha256.trim())
            .ok()
            .and_then(|d| <[u8; 32]>::try_from(d).ok())
            .ok_or("`sha256` must be 64 hex digits (the SHA-256 of the key)")?;
        let consumer = doc.consumer.trim();
        if consumer.is_empty() || consumer.len() > 256 {
            return Err("`consumer` must be 1 to 256 characters".into());
        }
        let value = HeaderValue::from_str(consumer)
            .map_err(|_| "`consumer` must be printable text (it becomes a header)")?;
        let mut scopes = doc.scopes.clone();
        if let Some(bad) = scopes
            .iter()
            .find(|s| s.is_empty() || s.contains(char::is_whitespace))
        {
            return Err(format!("scope `{bad}` must be non-empty without spaces"));
        }
        scopes.sort();
        scopes.dedup();
        Ok(ApiKeyRecord {
            digest,
            disabled: doc.disabled,
            identity: Arc::new(Identity {
                method: AuthMethod::ApiKey,
                subject: Some(consumer.to_string()),
                consumer: Some(consumer.to_string()),
                scopes,
                claims: Arc::default(),
                source: id.to_string(),
                expires_at: None,
                headers: vec![(consumer_header.clone(), value)],
            }),
        })
    }
}

/// Every serving API key, bucketed by digest prefix.
#[derive(Debug, Default)]
pub struct ApiKeyStore {
    buckets: HashMap<[u8; 8], Vec<Arc<ApiKeyRecord>>>,
    len: usize,
}

impl ApiKeyStore {
    /// Builds the store; a second document with the same digest is reported and skipped
    /// (the first by id wins, the same on every gateway).
    pub fn build<'a>(
        records: impl IntoIterator<Item = (&'a str, &'a Arc<ApiKeyRecord>)>,
    ) -> (ApiKeyStore, Vec<(String, String)>) {
        let mut store = ApiKeyStore::default();
        let mut owners: HashMap<[u8; 32], &str> = HashMap::new();
        let mut duplicates = Vec::new();
        for (id, record) in records {
            if let Some(first) = owners.get(&record.digest) {
                duplicates.push((id.to_string(), first.to_string()));
                continue;
            }
            owners.insert(record.digest, id);
            store
                .buckets
                .entry(bucket(&record.digest))
                .or_default()
                .push(record.clone());
            store.len += 1;
        }
        (store, duplicates)
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The identity of a presented key.
    pub fn check(&self, presented: &[u8]) -> Result<Arc<Identity>, AuthError> {
        let digest: [u8; 32] = Sha256::digest(presented).into();
        let mut found: Option<&Arc<ApiKeyRecord>> = None;
        for record in self.buckets.get(&bucket(&digest)).into_iter().flatten() {
            if bool::from(record.digest.ct_eq(&digest)) {
                found = Some(record);
            }
        }
        match found {
            None => Err(AuthError::UnknownApiKey),
            Some(r) if r.disabled => Err(AuthError::DisabledApiKey),
            Some(r) => Ok(r.identity.clone()),
        }
    }
}

fn bucket(digest: &[u8; 32]) -> [u8; 8] {
    let mut b = [0u8; 8];
    b.copy_from_slice(&digest[..8]);
    b
}

/// A freshly minted key: shown once, stored only as its hash.
#[derive(Debug)]
pub struct MintedKey {
    pub id: String,
    pub key: String,
    pub doc: ApiKeyDoc,
}

/// Makes a new random key (256 bits) for `consumer`. `id` defaults to the consumer name
/// plus a random suffix.
pub fn mint(consumer: &str, scopes: Vec<String>, id: Option<String>) -> MintedKey {
    let mut secret = [0u8; 32];
    rand::rng().fill_bytes(&mut secret);
    let key = format!(
        "{KEY_PREFIX}{}",
        base64::Engine::encode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, secret)
    );
    let id = id.unwrap_or_else(|| {
        let mut suffix = [0u8; 4];
        rand::rng().fill_bytes(&mut suffix);
        let base: String = consumer
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                    c
                } else {
                    '-'
                }
            })
            .collect();
        format!("{base}-{}", hex::encode(suffix))
    });
    MintedKey {
        id,
        doc: ApiKeyDoc {
            sha256: hex::encode(Sha256::digest(key.as_bytes())),
            consumer: consumer.to_string(),
            scopes,
            disabled: false,
        },
        key,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> HeaderName {
        HeaderName::from_static("x-consumer")
    }

    fn record(id: &str, doc: &ApiKeyDoc) -> Arc<ApiKeyRecord> {
        Arc::new(ApiKeyRecord::compile(id, &serde_json::to_vec(doc).unwrap(), &header()).unwrap())
    }

    #[test]
    fn a_minted_key_checks_against_its_document() {
        let m = mint("billing svc", vec!["orders:read".into()], None);
        assert!(m.key.starts_with(KEY_PREFIX) && m.key.len() > 40);
        assert!(m.id.starts_with("billing-svc-"), "{}", m.id);
        let r = record(&m.id, &m.doc);
        let (store, dup) = ApiKeyStore::build([(m.id.as_str(), &r)]);
        assert!(dup.is_empty());
        let id = store.check(m.key.as_bytes()).unwrap();
        assert_eq!(id.consumer.as_deref(), Some("billing svc"));
        assert_eq!(id.scopes, ["orders:read"]);
        assert_eq!(id.headers[0].1, "billing svc");
        assert_eq!(
            store.check(b"sy_other").unwrap_err(),
            AuthError::UnknownApiKey
        );
        let other = mint("x", vec![], None);
        assert_ne!(other.key, m.key);
    }

    #[test]
    fn a_disabled_key_is_refused() {
        let mut m = mint("a", vec![], Some("a1".into()));
        m.doc.disabled = true;
        let r = record("a1", &m.doc);
        let (store, _) = ApiKeyStore::build([("a1", &r)]);
        assert_eq!(
            store.check(m.key.as_bytes()).unwrap_err(),
            AuthError::DisabledApiKey
        );
    }

    #[test]
    fn duplicate_digests_keep_the_first_id() {
        let m = mint("a", vec![], None);
        let r1 = record("a1", &m.doc);
        let mut doc2 = m.doc.clone();
        doc2.consumer = "b".into();
        let r2 = record("b1", &doc2);
        let (store, dup) = ApiKeyStore::build([("a1", &r1), ("b1", &r2)]);
        assert_eq!(dup, [("b1".to_string(), "a1".to_string())]);
        assert_eq!(store.len(), 1);
        assert_eq!(
            store.check(m.key.as_bytes()).unwrap().consumer.as_deref(),
            Some("a")
        );
    }

    #[test]
    fn bad_documents_are_explained() {
        let cases = [
            (r#"{"sha256":"abc","consumer":"a"}"#, "64 hex"),
            (r#"{"sha256":"00","consumer":"a","extra":1}"#, "extra"),
            (
                r#"{"sha256":"0000000000000000000000000000000000000000000000000000000000000000","consumer":""}"#,
                "consumer",
            ),
            (
                r#"{"sha256":"0000000000000000000000000000000000000000000000000000000000000000","consumer":"a","scopes":["a b"]}"#,
                "scope",
            ),
        ];
        for (doc, want) in cases {
            let err = ApiKeyRecord::compile("k", doc.as_bytes(), &header()).unwrap_err();
            assert!(err.contains(want), "{doc}: {err}");
        }
    }
}
