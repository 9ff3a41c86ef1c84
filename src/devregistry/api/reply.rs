//! Answers: the read context of one request (consistency and blocking parameters, run
//! against the store) and the shapes of what goes back (JSON with Consul's index, leader
//! and consistency headers, `true`/`false`, empty 200s, plain-text errors).

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue, ALLOW, CONNECTION, CONTENT_TYPE};
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use serde_json::Value;

use super::body::{read_limited, LimitedBody};
use super::context::ApiContext;
use crate::devregistry::error::ApiError;
use crate::devregistry::params::{self, Blocking, Consistency, Query};
use crate::devregistry::store::{IndexedAnswer, RegistryState};

/// Cap for JSON request bodies (Consul has none; this keeps a runaway client bounded).
const JSON_BODY_MAX: u64 = 8 * 1024 * 1024;

pub type Resp = Response<Full<Bytes>>;

pub fn error_response(e: ApiError) -> Resp {
    let has_body = !e.body.is_empty();
    let mut r = Response::new(Full::new(Bytes::from(e.body)));
    *r.status_mut() = e.status;
    if let Some(allow) = e.allow {
        r.headers_mut()
            .insert(ALLOW, HeaderValue::from_static(allow));
    }
    if e.close {
        r.headers_mut()
            .insert(CONNECTION, HeaderValue::from_static("close"));
    }
    if has_body {
        r.headers_mut().insert(
            CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
    }
    r
}

pub fn header(name: &'static str, value: &str) -> (HeaderName, HeaderValue) {
    (
        HeaderName::from_static(name),
        HeaderValue::from_str(value).unwrap_or_else(|_| HeaderValue::from_static("")),
    )
}

pub fn empty_ok() -> Resp {
    Response::new(Full::new(Bytes::new()))
}

pub fn bool_ok(b: bool) -> Resp {
    let mut r = Response::new(Full::new(Bytes::from(if b { "true" } else { "false" })));
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

/// A JSON request body, whole; over [`JSON_BODY_MAX`] it is refused with 413.
pub async fn read_json_body(req: Request<Incoming>) -> Result<Bytes, ApiError> {
    match read_limited(req, JSON_BODY_MAX).await {
        Ok(LimitedBody::Whole(b)) => Ok(b),
        Ok(LimitedBody::TooLarge(o)) => Err(ApiError::too_large(o.size, JSON_BODY_MAX, o.drained)),
        Err(e) => Err(ApiError::bad_request(format!("Request decode failed: {e}"))),
    }
}

/// Per-request read context: consistency, blocking parameters and the answer formatter.
pub struct Reader<'a> {
    pub ctx: &'a ApiContext,
    pub q: &'a Query,
    pub consistency: Consistency,
    pub blocking: Blocking,
}

impl<'a> Reader<'a> {
    pub fn new(ctx: &'a ApiContext, q: &'a Query) -> Result<Reader<'a>, ApiError> {
        Ok(Reader {
            ctx,
            q,
            consistency: params::consistency(q)?,
            blocking: params::blocking(q, ctx.settings.jitter)?,
        })
    }

    pub fn for_write(ctx: &'a ApiContext, q: &'a Query) -> Reader<'a> {
        Reader {
            ctx,
            q,
            consistency: Consistency::Leader,
            blocking: Blocking {
                min_index: 0,
                timeout: params::DEFAULT_WAIT,
            },
        }
    }

    /// Reads served by the servers fail without a leader unless `?stale`.
    fn require_leader(&self) -> Result<(), ApiError> {
        if self.ctx.faults.no_leader() && self.consistency != Consistency::Stale {
            return Err(ApiError::no_leader());
        }
        Ok(())
    }

    pub async fn run<T>(
        &self,
        query: impl Fn(&RegistryState) -> IndexedAnswer<T>,
    ) -> Result<(T, u64), ApiError> {
        self.require_leader()?;
        let r = self
            .ctx
            .store
            .block(self.blocking.min_index, self.blocking.timeout, query)
            .await;
        Ok((r.value, r.index))
    }

    fn body(&self, v: &Value) -> Bytes {
        let mut s = if self.q.has("pretty") {
            serde_json::to_vec_pretty(v).unwrap_or_default()
        } else {
            serde_json::to_vec(v).unwrap_or_default()
        };
        if self.ctx.faults.bad_json() {
            s.truncate(s.len() / 2);
            s.extend_from_slice(b"\x00{garbage");
        }
        Bytes::from(s)
    }

    /// A JSON answer without index headers (agent and status endpoints).
    pub fn plain_json(&self, v: Value) -> Resp {
        let mut r = Response::new(Full::new(self.body(&v)));
        r.headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        r
    }

    /// Index, leader and consistency headers of a catalog/health/KV read.
    pub fn meta(&self, r: &mut Resp, index: u64) {
        let index = if self.ctx.faults.zero_index() {
            0
        } else {
            index.max(1)
        };
        let known_leader = if self.ctx.faults.no_leader() {
            "false"
        } else {
            "true"
        };
        let h = r.headers_mut();
        for (k, v) in [
            header("x-consul-index", &index.to_string()),
            header("x-consul-knownleader", known_leader),
            header("x-consul-lastcontact", "0"),
            header("x-consul-effective-consistency", self.consistency.as_str()),
        ] {
            h.insert(k, v);
        }
        if self.q.has("cached") {
            let (k, v) = header("x-cache", "MISS");
            h.insert(k, v);
        }
    }

    pub fn indexed_json(&self, v: Value, index: u64) -> Resp {
        let mut r = self.plain_json(v);
        self.meta(&mut r, index);
        r
    }

    pub fn not_found(&self, index: u64) -> Resp {
        let mut r = Response::new(Full::new(Bytes::new()));
        *r.status_mut() = StatusCode::NOT_FOUND;
        self.meta(&mut r, index);
        r
    }
}
