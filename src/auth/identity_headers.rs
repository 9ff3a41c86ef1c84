//! Identity headers: upstreams trust `X-User-Id` and friends only because the gateway is
//! the sole writer. So, before auth, every client-sent copy of a header the gateway may set
//! is removed (on every route, protected or not), and a client's `Connection:` header loses
//! any token naming one of them, so hop-by-hop stripping can never take away a header the
//! gateway added. After auth, the identity's headers are written.

use http::header::CONNECTION;
use http::{HeaderMap, HeaderName, HeaderValue};

use super::Identity;

/// Removes every copy of `names`, in any spelling a backend could read as one of them
/// (`_` for `-`, which many backends fold together), and scrubs those names
/// from `Connection`.
pub fn strip_forged(headers: &mut HeaderMap, names: &[HeaderName]) {
    // A pass over the (few) received names is cheaper than a lookup per name.
    let (mut forged, mut connection) = (false, false);
    let mut folded: Vec<HeaderName> = Vec::new();
    for k in headers.keys() {
        forged |= names.contains(k);
        connection |= k == CONNECTION;
        if k.as_str().as_bytes().contains(&b'_')
            && names.iter().any(|n| folds_into(k.as_str(), n.as_str()))
        {
            folded.push(k.clone());
        }
    }
    if forged {
        for name in names {
            headers.remove(name);
        }
    }
    for name in &folded {
        headers.remove(name);
    }
    if !connection {
        return;
    }
    let values: Vec<HeaderValue> = headers.get_all(CONNECTION).iter().cloned().collect();
    let mut kept: Vec<String> = Vec::new();
    let mut scrubbed = false;
    for v in &values {
        let Ok(text) = v.to_str() else {
            // Not text: cannot be parsed into tokens, so it cannot name anything safely.
            scrubbed = true;
            continue;
        };
        for token in text.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            let lower = token.to_ascii_lowercase();
            if names.iter().any(|n| folds_into(&lower, n.as_str())) {
                scrubbed = true;
            } else {
                kept.push(token.to_string());
            }
        }
    }
    if !scrubbed {
        return;
    }
    headers.remove(CONNECTION);
    if !kept.is_empty() {
        if let Ok(v) = HeaderValue::from_str(&kept.join(", ")) {
            headers.insert(CONNECTION, v);
        }
    }
}

/// Whether `name` (lower case, as header names are kept) reads as `owned` once `_` is
/// taken for `-`.
pub fn folds_into(name: &str, owned: &str) -> bool {
    name.len() == owned.len()
        && name
            .bytes()
            .zip(owned.bytes())
            .all(|(a, b)| a == b || (a == b'_' && b == b'-'))
}

/// Writes the identity's headers (replacing any value) and removes `remove` (the
/// credential's own header when it should not travel upstream).
pub fn apply(headers: &mut HeaderMap, identity: &Identity, remove: Option<&HeaderName>) {
    if let Some(h) = remove {
        headers.remove(h);
    }
    for (name, value) in &identity.headers {
        headers.insert(name.clone(), value.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::AuthMethod;
    use std::sync::Arc;

    fn names() -> Vec<HeaderName> {
        vec![
            HeaderName::from_static("x-user-id"),
            HeaderName::from_static("x-consumer"),
        ]
    }

    #[test]
    fn forged_copies_are_removed_whatever_their_case_or_count() {
        let mut h = HeaderMap::new();
        h.append("X-User-Id", "root".parse().unwrap());
        h.append("x-user-id", "admin".parse().unwrap());
        h.append("X-CONSUMER", "billing".parse().unwrap());
        h.append("x-other", "kept".parse().unwrap());
        strip_forged(&mut h, &names());
        assert!(!h.contains_key("x-user-id") && !h.contains_key("x-consumer"));
        assert_eq!(h["x-other"], "kept");
    }

    #[test]
    fn underscore_spellings_are_removed_with_the_names_they_fold_into() {
        let mut h = HeaderMap::new();
        h.append("x_user_id", "root".parse().unwrap());
        h.append("X-User_Id", "root".parse().unwrap());
        h.append("x_user_ids", "kept".parse().unwrap());
        h.append(CONNECTION, "x_consumer, x-a".parse().unwrap());
        strip_forged(&mut h, &names());
        let kept: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(kept, ["x_user_ids", "connection"]);
        assert_eq!(h[CONNECTION], "x-a");
    }

    #[test]
    fn connection_cannot_name_a_gateway_header() {
        let mut h = HeaderMap::new();
        h.append(CONNECTION, "keep-alive, X-User-Id".parse().unwrap());
        h.append(CONNECTION, "x-consumer".parse().unwrap());
        strip_forged(&mut h, &names());
        assert_eq!(h.get_all(CONNECTION).iter().count(), 1);
        assert_eq!(h[CONNECTION], "keep-alive");
        let mut h = HeaderMap::new();
        h.insert(CONNECTION, "X-User-Id".parse().unwrap());
        strip_forged(&mut h, &names());
        assert!(!h.contains_key(CONNECTION));
        let mut h = HeaderMap::new();
        h.insert(CONNECTION, "close".parse().unwrap());
        strip_forged(&mut h, &names());
        assert_eq!(h[CONNECTION], "close");
    }

    #[test]
    fn apply_replaces_and_removes() {
        let id = Identity {
            method: AuthMethod::Jwt,
            subject: Some("alice".into()),
            consumer: None,
            scopes: vec![],
            claims: Arc::default(),
            source: "p".into(),
            expires_at: None,
            headers: vec![(
                HeaderName::from_static("x-user-id"),
                "alice".parse().unwrap(),
            )],
        };
        let mut h = HeaderMap::new();
        h.insert("authorization", "Bearer t".parse().unwrap());
        apply(&mut h, &id, Some(&http::header::AUTHORIZATION));
        assert_eq!(h["x-user-id"], "alice");
        assert!(!h.contains_key("authorization"));
    }
}
