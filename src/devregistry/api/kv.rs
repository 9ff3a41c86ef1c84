//! `/v1/kv/:key`: reads (single key, `recurse`, `keys` with `separator`, `raw`), writes
//! with `flags`/`cas` and Consul's 512 KiB value limit, and deletes (`recurse`, `cas`).

use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_TYPE};
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use serde_json::{json, Value};

use super::body::{read_limited, LimitedBody};
use super::context::ApiContext;
use super::reply::{bool_ok, header, Reader, Resp};
use crate::devregistry::error::ApiError;
use crate::devregistry::params::Query;
use crate::devregistry::store::{IndexedAnswer, RegistryState};
use crate::devregistry::watch::WatchKey;
use crate::devregistry::wire;

/// Consul's default `kv_max_value_size`.
pub const KV_MAX_VALUE_SIZE: u64 = 512 * 1024;

enum KvRead {
    Entries(Vec<Value>),
    Keys(Vec<String>),
    Raw(Bytes),
    Missing,
}

pub async fn get(r: &Reader<'_>, key: &str) -> Result<Resp, ApiError> {
    let q = r.q;
    let keys = q.has("keys");
    let recurse = q.has("recurse");
    if key.is_empty() && !keys && !recurse {
        return Err(ApiError::bad_request("Missing key name"));
    }
    let separator = q
        .get("separator")
        .or(q.get("seperator"))
        .unwrap_or("")
        .to_string();
    let raw = q.has("raw");
    let prefix_watch = |s: &RegistryState| {
        let mut w = vec![WatchKey::KvPrefix(key.to_string())];
        if s.kv_under(key).next().is_none() {
            w.push(WatchKey::KvTable);
        }
        w
    };
    let (value, index) = r
        .run(|s| {
            if keys {
                let mut out: Vec<String> = Vec::new();
                for e in s.kv_under(key) {
                    let rest = &e.key[key.len()..];
                    let k = match (separator.is_empty(), rest.find(separator.as_str())) {
                        (false, Some(i)) => format!("{key}{}", &rest[..i + separator.len()]),
                        _ => e.key.clone(),
                    };
                    if out.last() != Some(&k) {
                        out.push(k);
                    }
                }
                let v = if out.is_empty() && !key.is_empty() {
                    KvRead::Missing
                } else {
                    KvRead::Keys(out)
                };
                IndexedAnswer {
                    value: v,
                    index: s.kv_prefix_index(key),
                    watch: prefix_watch(s),
                }
            } else if recurse {
                let entries: Vec<Value> = s.kv_under(key).map(wire::kv_json).collect();
                let v = if entries.is_empty() {
                    KvRead::Missing
                } else {
                    KvRead::Entries(entries)
                };
                IndexedAnswer {
                    value: v,
                    index: s.kv_prefix_index(key),
                    watch: prefix_watch(s),
                }
            } else {
                match s.kv.get(key) {
                    Some(e) => IndexedAnswer {
                        value: if raw {
                            KvRead::Raw(e.value.clone())
                        } else {
                            KvRead::Entries(vec![wire::kv_json(e)])
                        },
                        index: e.modify_index,
                        watch: vec![WatchKey::KvKey(key.to_string())],
                    },
                    None => IndexedAnswer {
                        value: KvRead::Missing,
                        index: s.kv_index,
                        watch: vec![WatchKey::KvTable],
                    },
                }
            }
        })
        .await?;
    Ok(match value {
        KvRead::Missing => r.not_found(index),
        KvRead::Entries(e) => r.indexed_json(Value::Array(e), index),
        KvRead::Keys(k) => r.indexed_json(json!(k), index),
        KvRead::Raw(bytes) => {
            let mut resp = Response::new(Full::new(bytes));
            r.meta(&mut resp, index);
            let h = resp.headers_mut();
            h.insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
            for (k, v) in [
                header("x-content-type-options", "nosniff"),
                header("content-security-policy", "sandbox"),
            ] {
                h.insert(k, v);
            }
            resp
        }
    })
}

/// Go's `strconv.ParseUint` error, which Consul returns unwrapped with a 500.
fn parse_u64(q: &Query, name: &str) -> Result<Option<u64>, ApiError> {
    match q.get(name) {
        None => Ok(None),
        Some(v) => v.parse::<u64>().map(Some).map_err(|_| {
            ApiError::internal(format!("strconv.ParseUint: parsing {v:?}: invalid syntax"))
        }),
    }
}

fn conflicting(q: &Query, flags: &[&str]) -> Result<(), ApiError> {
    if flags.iter().filter(|f| q.has(f)).count() > 1 {
        return Err(ApiError::bad_request(format!(
            "Conflicting flags: {}",
            q.encode_sorted()
        )));
    }
    Ok(())
}

pub async fn put(
    ctx: &ApiContext,
    q: &Query,
    key: &str,
    req: Request<Incoming>,
) -> Result<Resp, ApiError> {
    if key.is_empty() {
        return Err(ApiError::bad_request("Missing key name"));
    }
    conflicting(q, &["cas", "acquire", "release"])?;
    let flags = parse_u64(q, "flags")?.unwrap_or(0);
    let cas = parse_u64(q, "cas")?;
    let body = match read_limited(req, KV_MAX_VALUE_SIZE).await {
        Ok(LimitedBody::Whole(b)) => b,
        Ok(LimitedBody::TooLarge(o)) => {
            let mut e = ApiError::too_large(o.size, KV_MAX_VALUE_SIZE, o.drained);
            e.body.push_str(
                " See https://developer.hashicorp.com/docs/agent/config/config-files#kv_max_value_size.",
            );
            return Err(e);
        }
        // Consul returns the copy error itself, with a 500.
        Err(e) => return Err(ApiError::internal(e.to_string())),
    };
    if ctx.faults.no_leader() {
        return Err(ApiError::no_leader());
    }
    for lock in ["acquire", "release"] {
        if let Some(session) = q.get(lock) {
            // No session endpoints exist here, so no session is ever valid.
            return Err(ApiError::internal(format!("invalid session {session:?}")));
        }
    }
    Ok(bool_ok(ctx.store.kv_put(key, body, flags, cas)))
}

pub fn delete(ctx: &ApiContext, q: &Query, key: &str) -> Result<Resp, ApiError> {
    conflicting(q, &["recurse", "cas"])?;
    let recurse = q.has("recurse");
    if key.is_empty() && !recurse {
        return Err(ApiError::bad_request("Missing key name"));
    }
    let cas = parse_u64(q, "cas")?;
    if ctx.faults.no_leader() {
        return Err(ApiError::no_leader());
    }
    Ok(bool_ok(ctx.store.kv_delete(key, recurse, cas)))
}
