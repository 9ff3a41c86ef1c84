//! Request size limits per route that can be judged from the head alone: header count
//! (431) and URL length (414). The body limit is enforced by the proxy while it streams
//! (it knows the body); it only reads the number from here.

use http::{HeaderMap, Uri};

use super::spec::PolicyFields;
use super::PolicyError;

/// Why a request head is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum LimitExceeded {
    #[error("{count} request headers; this route accepts at most {limit}")]
    Headers { count: usize, limit: usize },
    #[error("URL of {len} bytes; this route accepts at most {limit}")]
    Url { len: usize, limit: usize },
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RequestLimits {
    pub max_headers: Option<usize>,
    pub max_url_bytes: Option<usize>,
    /// `None`: the gateway default (`proxy.max_body_bytes`).
    pub max_body_bytes: Option<u64>,
}

impl RequestLimits {
    pub fn compile(spec: &PolicyFields<'_>) -> Result<RequestLimits, PolicyError> {
        if spec.max_headers == Some(0) {
            return Err(PolicyError::at("max_headers", "must be at least 1"));
        }
        if let Some(n) = spec.max_url_bytes {
            // `/` alone is one byte; a limit below the route's own prefix refuses everything.
            if n < spec.path_prefix.len().max(1) {
                return Err(PolicyError::at(
                    "max_url_bytes",
                    format!(
                        "{n} is shorter than the route's path_prefix ({} bytes)",
                        spec.path_prefix.len()
                    ),
                ));
            }
        }
        Ok(RequestLimits {
            max_headers: spec.max_headers,
            max_url_bytes: spec.max_url_bytes,
            max_body_bytes: spec.max_body_bytes,
        })
    }

    /// The body limit of the route, or `default` when it sets none.
    pub fn body_limit(&self, default: u64) -> u64 {
        self.max_body_bytes.unwrap_or(default)
    }

    /// Judges a request head. The URL is what the client sent after the authority: path
    /// and query.
    pub fn check(&self, uri: &Uri, headers: &HeaderMap) -> Result<(), LimitExceeded> {
        if let Some(limit) = self.max_headers {
            let count = headers.len();
            if count > limit {
                return Err(LimitExceeded::Headers { count, limit });
            }
        }
        if let Some(limit) = self.max_url_bytes {
            let len = uri.path_and_query().map_or(1, |pq| pq.as_str().len());
            if len > limit {
                return Err(LimitExceeded::Url { len, limit });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn limits(json: &str) -> Result<RequestLimits, PolicyError> {
        let spec = crate::routing::RouteSpec::from_json(json.as_bytes()).unwrap();
        RequestLimits::compile(&spec.policy_fields("r"))
    }

    fn headers(n: usize) -> HeaderMap {
        let mut h = HeaderMap::new();
        for i in 0..n {
            // Repeated names count once per value.
            h.append("x-n", HeaderValue::from(i));
        }
        h
    }

    #[test]
    fn limits_are_validated() {
        assert_eq!(
            limits(r#"{"service":"a","path_prefix":"/","max_headers":0}"#)
                .unwrap_err()
                .field(),
            "max_headers"
        );
        assert_eq!(
            limits(r#"{"service":"a","path_prefix":"/long/prefix","max_url_bytes":4}"#)
                .unwrap_err()
                .field(),
            "max_url_bytes"
        );
        let l = limits(r#"{"service":"a","path_prefix":"/","max_body_bytes":10}"#).unwrap();
        assert_eq!(l.body_limit(99), 10);
        assert_eq!(RequestLimits::default().body_limit(99), 99);
    }

    #[test]
    fn heads_over_the_limits_are_refused() {
        let l = limits(r#"{"service":"a","path_prefix":"/","max_headers":3,"max_url_bytes":10}"#)
            .unwrap();
        let cases: &[(&str, usize, Result<(), LimitExceeded>)] = &[
            ("/abc", 3, Ok(())),
            (
                "/abc",
                4,
                Err(LimitExceeded::Headers { count: 4, limit: 3 }),
            ),
            ("/abcdefghi", 0, Ok(())),
            (
                "/abcdefghij",
                0,
                Err(LimitExceeded::Url { len: 11, limit: 10 }),
            ),
            (
                "/a?b=cdefgh",
                0,
                Err(LimitExceeded::Url { len: 11, limit: 10 }),
            ),
            ("http://h.example/abc", 0, Ok(())),
        ];
        for (uri, n, want) in cases {
            let uri: Uri = uri.parse().unwrap();
            assert_eq!(l.check(&uri, &headers(*n)), *want, "{uri} {n}");
        }
        assert_eq!(
            RequestLimits::default().check(&"/".parse().unwrap(), &headers(500)),
            Ok(())
        );
    }
}
