//! The one place a request the gateway does not forward becomes a response, whatever
//! stopped it (the HTTP/1.1 server, routing, edge policy, auth, the upstream): its status,
//! the headers its phase needs, and one JSON body shape:
//! `{"error": <short machine-readable code>, "message": <for humans>, "request_id": ...}`.

use http::header::{CACHE_CONTROL, CONTENT_TYPE};
use http::{HeaderValue, Response, StatusCode};

use super::body::ClientBody;
use super::path::PathError;
use crate::auth::AuthRejection;
use crate::http1::server::Refusal;
use crate::policy::PolicyReply;

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("bad request path: {0}")]
    BadPath(#[from] PathError),
    #[error("the request has no usable host")]
    BadHost,
    #[error("{0}")]
    BadRequest(&'static str),
    /// Refused by the HTTP/1.1 server before the gateway saw the request.
    #[error("{}", .0.reason())]
    Refused(Refusal),
    #[error("the path holds an encoded slash or backslash, which this route does not accept")]
    EscapedSlash,
    #[error("the client sent no request body bytes for too long")]
    BodyTimeout,
    #[error("no route matches this request")]
    NoRoute,
    #[error("request body exceeds {0} bytes")]
    BodyTooLarge(u64),
    #[error("reading the request body: {0}")]
    ClientBody(String),
    #[error("service `{0}` has no healthy instance")]
    NoInstance(String),
    #[error("upstream failed: {0}")]
    Upstream(String),
    #[error("upstream did not answer in time")]
    Timeout,
    /// The route's circuit breaker for the service is full.
    #[error("service `{service}` is at its circuit-breaker limit ({reason})")]
    CircuitOpen {
        service: String,
        reason: &'static str,
    },
    /// Auth refused the request (401, 403, or a redirect to a login page).
    #[error("{}", .0.error)]
    Auth(Box<AuthRejection>),
    /// Edge policy refused the request (IP rules, CORS, limits, rate limit, assertion).
    #[error("{}", .0.description())]
    Policy(Box<PolicyReply>),
}

impl ProxyError {
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::BadPath(_)
            | ProxyError::BadHost
            | ProxyError::BadRequest(_)
            | ProxyError::EscapedSlash
            | ProxyError::ClientBody(_) => StatusCode::BAD_REQUEST,
            ProxyError::BodyTimeout => StatusCode::REQUEST_TIMEOUT,
            ProxyError::Refused(r) => r.status(),
            ProxyError::Auth(r) => r.status,
            ProxyError::Policy(r) => r.status(),
            ProxyError::NoRoute => StatusCode::NOT_FOUND,
            ProxyError::BodyTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ProxyError::NoInstance(_) | ProxyError::CircuitOpen { .. } => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ProxyError::Upstream(_) => StatusCode::BAD_GATEWAY,
            ProxyError::Timeout => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    /// Whether the client sent something the gateway cannot read as one well-formed
    /// request (its connection is then closed after the answer).
    pub fn is_malformed_request(&self) -> bool {
        matches!(
            self,
            ProxyError::BadPath(_)
                | ProxyError::BadHost
                | ProxyError::BadRequest(_)
                | ProxyError::EscapedSlash
                | ProxyError::ClientBody(_)
                | ProxyError::BodyTimeout
                | ProxyError::Refused(_)
        )
    }

    pub fn code(&self) -> &'static str {
        match self {
            ProxyError::BadPath(_) => "bad_path",
            ProxyError::BadHost => "bad_host",
            ProxyError::BadRequest(_) => "bad_request",
            ProxyError::Refused(Refusal::HeadTooLarge) => "header_too_large",
            ProxyError::Refused(Refusal::Malformed(_)) => "bad_request",
            ProxyError::Refused(Refusal::UnsupportedCoding(_)) => "not_implemented",
            ProxyError::EscapedSlash => "escaped_slash",
            ProxyError::BodyTimeout => "body_timeout",
            ProxyError::ClientBody(_) => "bad_body",
            ProxyError::NoRoute => "no_route",
            ProxyError::BodyTooLarge(_) => "body_too_large",
            ProxyError::NoInstance(_) => "no_instance",
            ProxyError::Upstream(_) => "upstream_error",
            ProxyError::Timeout => "upstream_timeout",
            ProxyError::CircuitOpen { .. } => "circuit_open",
            ProxyError::Auth(r) => r.code(),
            ProxyError::Policy(r) => r.reason(),
        }
    }

    /// The response; upstream details stay in the log, the client gets the category.
    pub fn to_response(&self, request_id: &HeaderValue) -> Response<ClientBody> {
        let redirect = matches!(self, ProxyError::Auth(r) if r.is_redirect());
        let body = if redirect {
            ClientBody::empty()
        } else {
            let message = match self {
                ProxyError::Upstream(_) => "the upstream failed to answer".to_string(),
                other => other.to_string(),
            };
            let body = serde_json::json!({
                "error": self.code(),
                "message": message,
                "request_id": request_id.to_str().unwrap_or(""),
            });
            ClientBody::full(body.to_string())
        };
        let mut resp = Response::new(body);
        *resp.status_mut() = self.status();
        let h = resp.headers_mut();
        match self {
            ProxyError::Auth(r) => h.extend(r.headers.clone()),
            ProxyError::Policy(r) => r.add_headers(h),
            _ => {}
        }
        if !redirect {
            h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        }
        h.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn errors_are_small_json_with_the_request_id() {
        let resp =
            ProxyError::NoInstance("users".into()).to_response(&HeaderValue::from_static("rid-1"));
        assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["error"], "no_instance");
        assert_eq!(v["request_id"], "rid-1");
        assert!(v["message"].as_str().unwrap().contains("users"));
        let resp = ProxyError::Upstream("connection reset by 10.0.0.1".into())
            .to_response(&HeaderValue::from_static("r"));
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert!(
            !String::from_utf8_lossy(&body).contains("10.0.0.1"),
            "no internals leak"
        );
    }

    #[tokio::test]
    async fn every_phase_refuses_in_the_one_shape() {
        use crate::auth::AuthError;
        let mut challenge = http::HeaderMap::new();
        challenge.insert(
            http::header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"x\""),
        );
        let errors = [
            ProxyError::Refused(Refusal::Malformed("bare LF in the request head")),
            ProxyError::NoRoute,
            ProxyError::Policy(Box::new(PolicyReply::IpDenied)),
            ProxyError::Auth(Box::new(AuthRejection {
                status: StatusCode::UNAUTHORIZED,
                headers: challenge,
                error: AuthError::Missing,
            })),
            ProxyError::Timeout,
        ];
        for e in errors {
            let resp = e.to_response(&HeaderValue::from_static("rid-9"));
            assert_eq!(resp.status(), e.status());
            assert_eq!(resp.headers()[CONTENT_TYPE], "application/json");
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
            let keys: Vec<_> = v.as_object().unwrap().keys().cloned().collect();
            assert_eq!(keys, ["error", "message", "request_id"], "{e}");
            assert_eq!(v["error"], e.code());
            assert_eq!(v["request_id"], "rid-9");
        }
    }
}
