//! The one place a request the gateway does not forward becomes a response, whatever
//! stopped it (the HTTP/1.1 server, routing, edge policy, auth, the upstream): its status,
//! the headers its phase needs, and one JSON body shape:
//! `{"error": <short machine-readable code>, "message": <for humans>, "request_id": ...}`.
//!
//! A client that made a gRPC call cannot read that: its request's `Content-Type` picks the
//! other rendering ([`ErrorFormat`]), a gRPC Trailers-Only answer whose `grpc-status`
//! follows the HTTP status the error has.

use http::header::{CACHE_CONTROL, CONTENT_TYPE, LOCATION};
use http::{HeaderMap, HeaderName, HeaderValue, Response, StatusCode};

use super::body::ClientBody;
use super::grpc::{self, GrpcCode, GrpcProtocol};
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

const GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");
const GRPC_MESSAGE: HeaderName = HeaderName::from_static("grpc-message");

/// How the gateway writes the errors it answers for one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ErrorFormat {
    /// The error's HTTP status with the JSON body.
    #[default]
    Json,
    /// A gRPC Trailers-Only answer (PROTOCOL-HTTP2): `200`, the protocol's
    /// `Content-Type`, `grpc-status` and `grpc-message`, no body. Over HTTP/2 that is one
    /// HEADERS frame with END_STREAM; over HTTP/1.1 (gRPC-Web) a head with
    /// `Content-Length: 0`, which PROTOCOL-WEB allows ("trailers may be sent together
    /// with response headers").
    Grpc(GrpcProtocol),
}

impl ErrorFormat {
    /// The format of a request's errors, from the headers it came with (before any phase
    /// changed them): gRPC when its one `Content-Type` is a gRPC media type.
    pub fn for_request(headers: &HeaderMap) -> ErrorFormat {
        match GrpcProtocol::of_request(headers) {
            Some(protocol) => ErrorFormat::Grpc(protocol),
            None => ErrorFormat::Json,
        }
    }
}

/// The HTTP status a gateway error has, kept on a gRPC answer (sent as `200`) for the
/// metrics and the access log, which count it as a plain HTTP client's answer would be.
#[derive(Debug, Clone, Copy)]
struct ErrorStatus(StatusCode);

/// The status a response is counted under: its own, or the gateway error's it renders.
pub fn recorded_status<B>(response: &Response<B>) -> StatusCode {
    response
        .extensions()
        .get::<ErrorStatus>()
        .map_or(response.status(), |s| s.0)
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

    /// The gRPC status for a gRPC client: the one the HTTP status maps to (grpc/grpc
    /// `doc/http-grpc-status-mapping.md` where it has one, with the codes
    /// `doc/statuscodes.md` gives gRPC's own runtimes for the same cases: a limit →
    /// RESOURCE_EXHAUSTED, a deadline → DEADLINE_EXCEEDED, an unsupported coding →
    /// UNIMPLEMENTED).
    pub fn grpc_code(&self) -> GrpcCode {
        if matches!(self, ProxyError::Auth(r) if r.is_redirect()) {
            return GrpcCode::Unauthenticated;
        }
        match self.status().as_u16() {
            400 | 500 => GrpcCode::Internal,
            401 => GrpcCode::Unauthenticated,
            403 => GrpcCode::PermissionDenied,
            404 | 501 => GrpcCode::Unimplemented,
            408 | 504 => GrpcCode::DeadlineExceeded,
            413 | 414 | 429 | 431 => GrpcCode::ResourceExhausted,
            502 | 503 => GrpcCode::Unavailable,
            _ => GrpcCode::Unknown,
        }
    }

    /// What the client is told; upstream details stay in the log.
    fn message(&self) -> String {
        match self {
            ProxyError::Upstream(_) => "the upstream failed to answer".to_string(),
            other => other.to_string(),
        }
    }

    /// The response, in the request's format; the client gets the category.
    pub fn to_response(
        &self,
        request_id: &HeaderValue,
        format: ErrorFormat,
    ) -> Response<ClientBody> {
        match format {
            ErrorFormat::Json => self.json_response(request_id),
            ErrorFormat::Grpc(protocol) => self.grpc_response(protocol),
        }
    }

    fn json_response(&self, request_id: &HeaderValue) -> Response<ClientBody> {
        let redirect = matches!(self, ProxyError::Auth(r) if r.is_redirect());
        let body = if redirect {
            ClientBody::empty()
        } else {
            let body = serde_json::json!({
                "error": self.code(),
                "message": self.message(),
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

    /// Trailers-Only. The refusal's own headers stay (`WWW-Authenticate`, `Retry-After`,
    /// `RateLimit-*`: gRPC clients read them as metadata), but not a login redirect's
    /// `Location`, which no gRPC client follows. The request id goes in `X-Request-Id`,
    /// as on every answer.
    fn grpc_response(&self, protocol: GrpcProtocol) -> Response<ClientBody> {
        let mut resp = Response::new(ClientBody::empty());
        let h = resp.headers_mut();
        match self {
            ProxyError::Auth(r) => {
                h.extend(r.headers.clone());
                h.remove(LOCATION);
            }
            ProxyError::Policy(r) => r.add_headers(h),
            _ => {}
        }
        h.insert(CONTENT_TYPE, protocol.content_type());
        h.insert(GRPC_STATUS, self.grpc_code().header_value());
        h.insert(GRPC_MESSAGE, grpc::message_value(&self.message()));
        h.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
        resp.extensions_mut().insert(ErrorStatus(self.status()));
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn errors_are_small_json_with_the_request_id() {
        let resp = ProxyError::NoInstance("users".into())
            .to_response(&HeaderValue::from_static("rid-1"), ErrorFormat::Json);
        assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["error"], "no_instance");
        assert_eq!(v["request_id"], "rid-1");
        assert!(v["message"].as_str().unwrap().contains("users"));
        let resp = ProxyError::Upstream("connection reset by 10.0.0.1".into())
            .to_response(&HeaderValue::from_static("r"), ErrorFormat::Json);
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
            let resp = e.to_response(&HeaderValue::from_static("rid-9"), ErrorFormat::Json);
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

    fn grpc(e: &ProxyError) -> Response<ClientBody> {
        e.to_response(
            &HeaderValue::from_static("rid-g"),
            ErrorFormat::Grpc(GrpcProtocol::Grpc),
        )
    }

    #[tokio::test]
    async fn grpc_clients_get_trailers_only_with_the_mapped_code() {
        use crate::auth::AuthError;
        use crate::policy::LimitExceeded;
        let auth = |status, error| {
            ProxyError::Auth(Box::new(AuthRejection {
                status,
                headers: http::HeaderMap::new(),
                error,
            }))
        };
        let cases = [
            (ProxyError::NoRoute, "12"),
            (auth(StatusCode::UNAUTHORIZED, AuthError::Missing), "16"),
            (
                auth(
                    StatusCode::FORBIDDEN,
                    AuthError::InsufficientScope { missing: vec![] },
                ),
                "7",
            ),
            (auth(StatusCode::FOUND, AuthError::Missing), "16"),
            (ProxyError::Policy(Box::new(PolicyReply::IpDenied)), "7"),
            (
                ProxyError::Policy(Box::new(PolicyReply::TooLarge(LimitExceeded::Url {
                    len: 20,
                    limit: 10,
                }))),
                "8",
            ),
            (
                ProxyError::Policy(Box::new(PolicyReply::AssertionUnavailable("k".into()))),
                "13",
            ),
            (ProxyError::NoInstance("users".into()), "14"),
            (
                ProxyError::CircuitOpen {
                    service: "users".into(),
                    reason: "max_requests",
                },
                "14",
            ),
            (ProxyError::Upstream("reset by 10.0.0.1".into()), "14"),
            (ProxyError::Timeout, "4"),
            (ProxyError::BodyTimeout, "4"),
            (ProxyError::BodyTooLarge(10), "8"),
            (ProxyError::Refused(Refusal::HeadTooLarge), "8"),
            (
                ProxyError::Refused(Refusal::UnsupportedCoding("gzip")),
                "12",
            ),
            (ProxyError::BadRequest("more than one Host header"), "13"),
            (ProxyError::EscapedSlash, "13"),
        ];
        for (e, code) in cases {
            let resp = grpc(&e);
            assert_eq!(resp.status(), StatusCode::OK, "{e}");
            assert_eq!(recorded_status(&resp), e.status(), "{e}");
            let h = resp.headers();
            assert_eq!(h[CONTENT_TYPE], "application/grpc", "{e}");
            assert_eq!(h["grpc-status"], code, "{e}");
            assert_eq!(h[CACHE_CONTROL], "no-store");
            let message = h["grpc-message"].to_str().unwrap();
            assert!(!message.contains("10.0.0.1"), "no internals leak");
            assert!(!h.contains_key(LOCATION), "{e}");
            assert!(http_body::Body::is_end_stream(resp.body()), "{e}: no body");
        }
        let json =
            ProxyError::NoRoute.to_response(&HeaderValue::from_static("r"), ErrorFormat::Json);
        assert_eq!(recorded_status(&json), StatusCode::NOT_FOUND);
    }

    #[test]
    fn grpc_answers_keep_the_refusals_own_headers() {
        use crate::auth::AuthError;
        use crate::policy::ratelimit::Decision;
        let mut challenge = http::HeaderMap::new();
        challenge.insert(
            http::header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"x\""),
        );
        let resp = grpc(&ProxyError::Auth(Box::new(AuthRejection {
            status: StatusCode::UNAUTHORIZED,
            headers: challenge,
            error: AuthError::Missing,
        })));
        assert_eq!(resp.headers()["www-authenticate"], "Bearer realm=\"x\"");
        let limited = PolicyReply::RateLimited(Decision {
            allowed: false,
            limit: 5,
            remaining: 0,
            reset: std::time::Duration::from_secs(3),
            retry_after: std::time::Duration::from_millis(1500),
            window_s: 5,
        });
        let resp = grpc(&ProxyError::Policy(Box::new(limited)));
        let h = resp.headers();
        assert_eq!(h["grpc-status"], "8");
        assert_eq!(h["retry-after"], "2");
        assert_eq!(h["ratelimit-remaining"], "0");
        assert_eq!(h["grpc-message"], "rate limit exceeded");
    }

    #[test]
    fn the_request_content_type_picks_the_format() {
        let mut headers = http::HeaderMap::new();
        assert_eq!(ErrorFormat::for_request(&headers), ErrorFormat::Json);
        headers.insert(
            CONTENT_TYPE,
            HeaderValue::from_static("application/grpc-web-text+proto"),
        );
        assert_eq!(
            ErrorFormat::for_request(&headers),
            ErrorFormat::Grpc(GrpcProtocol::GrpcWebText)
        );
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpcx"));
        assert_eq!(ErrorFormat::for_request(&headers), ErrorFormat::Json);
        let web = ProxyError::NoRoute.to_response(
            &HeaderValue::from_static("r"),
            ErrorFormat::Grpc(GrpcProtocol::GrpcWeb),
        );
        assert_eq!(web.headers()[CONTENT_TYPE], "application/grpc-web");
    }
}
