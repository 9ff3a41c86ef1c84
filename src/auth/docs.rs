//! Documents kept in a KV folder (`jwt/`, `apikeys/`), one per key, with the last good
//! version of each. A bad document is rejected alone (logged, listed) and its key keeps
//! serving its last good version; a deleted key is gone.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use serde::Serialize;

use crate::consul::KvPair;

/// A document that did not compile.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DocRejection {
    /// The key below the folder (provider name, API key id).
    pub name: String,
    /// The full KV key.
    pub key: String,
    pub error: String,
    /// Whether an earlier good version still serves.
    pub serving_last_good: bool,
}

#[derive(Debug)]
struct Doc<T> {
    seen: Option<Vec<u8>>,
    good: Option<Arc<T>>,
    rejection: Option<DocRejection>,
}

impl<T> Default for Doc<T> {
    fn default() -> Self {
        Doc {
            seen: None,
            good: None,
            rejection: None,
        }
    }
}

/// The documents of one KV folder.
#[derive(Debug)]
pub struct KvDocs<T> {
    folder: String,
    docs: BTreeMap<String, Doc<T>>,
}

impl<T> KvDocs<T> {
    /// Documents under `folder`, e.g. `switchyard/jwt/`.
    pub fn new(folder: impl Into<String>) -> KvDocs<T> {
        KvDocs {
            folder: folder.into(),
            docs: BTreeMap::new(),
        }
    }

    pub fn folder(&self) -> &str {
        &self.folder
    }

    /// Applies a complete listing of the folder. `compile(name, value, last_good)` turns
    /// one changed value into a document. Returns whether the good documents changed.
    pub fn apply<F>(&mut self, pairs: &[KvPair], mut compile: F) -> bool
    where
        F: FnMut(&str, &[u8], Option<&T>) -> Result<T, String>,
    {
        let mut changed = false;
        let mut present = HashSet::with_capacity(pairs.len());
        for pair in pairs {
            let Some(name) = pair.key.strip_prefix(&self.folder) else {
                continue;
            };
            if name.is_empty() || name.ends_with('/') {
                continue;
            }
            present.insert(name.to_string());
            let value = pair.value.as_deref().unwrap_or_default();
            let doc = self.docs.entry(name.to_string()).or_default();
            if doc.seen.as_deref() == Some(value) {
                continue;
            }
            doc.seen = Some(value.to_vec());
            match compile(name, value, doc.good.as_deref()) {
                Ok(t) => {
                    doc.good = Some(Arc::new(t));
                    doc.rejection = None;
                    changed = true;
                    tracing::info!(key = %pair.key, "document accepted");
                }
                Err(error) => {
                    let serving_last_good = doc.good.is_some();
                    tracing::warn!(key = %pair.key, %error, serving_last_good, "document rejected");
                    doc.rejection = Some(DocRejection {
                        name: name.to_string(),
                        key: pair.key.clone(),
                        error,
                        serving_last_good,
                    });
                }
            }
        }
        self.docs.retain(|name, doc| {
            let keep = present.contains(name);
            if !keep && doc.good.is_some() {
                changed = true;
                tracing::info!(key = %format!("{}{name}", self.folder), "document removed");
            }
            keep
        });
        changed
    }

    /// The serving documents by name.
    pub fn good(&self) -> impl Iterator<Item = (&str, &Arc<T>)> {
        self.docs
            .iter()
            .filter_map(|(n, d)| d.good.as_ref().map(|g| (n.as_str(), g)))
    }

    pub fn rejections(&self) -> Vec<DocRejection> {
        self.docs
            .values()
            .filter_map(|d| d.rejection.clone())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(key: &str, value: &str) -> KvPair {
        serde_json::from_value(serde_json::json!({
            "Key": key,
            "Value": base64::Engine::encode(&base64::engine::general_purpose::STANDARD, value),
        }))
        .unwrap()
    }

    fn compile(_: &str, v: &[u8], _: Option<&u32>) -> Result<u32, String> {
        std::str::from_utf8(v)
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| "not a number".to_string())
    }

    #[test]
    fn a_bad_document_keeps_its_last_good_version() {
        let mut docs: KvDocs<u32> = KvDocs::new("p/jwt/");
        assert!(docs.apply(&[pair("p/jwt/a", "1"), pair("p/jwt/", "")], compile));
        assert!(!docs.apply(&[pair("p/jwt/a", "1")], compile), "unchanged");
        assert!(!docs.apply(&[pair("p/jwt/a", "x")], compile));
        let good: Vec<_> = docs.good().map(|(n, v)| (n.to_string(), **v)).collect();
        assert_eq!(good, [("a".to_string(), 1)]);
        let r = docs.rejections();
        assert_eq!(r.len(), 1);
        assert!(r[0].serving_last_good && r[0].key == "p/jwt/a");
        assert!(docs.apply(&[pair("p/jwt/a", "2")], compile));
        assert!(docs.rejections().is_empty());
        assert!(docs.apply(&[], compile), "deleted");
        assert_eq!(docs.good().count(), 0);
    }
}
