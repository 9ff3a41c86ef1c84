//! CORS per route. Preflights (`OPTIONS` with `Origin` and `Access-Control-Request-Method`)
//! are answered here and never reach the upstream; actual responses get the CORS headers
//! (replacing any the upstream set) and `Vary: Origin`.

use http::header::{self, HeaderName, HeaderValue};
use http::{HeaderMap, Method};

use super::spec::CorsSpec;
use super::PolicyError;

/// Methods allowed when neither `cors.methods` nor the route's `methods` name any.
const DEFAULT_METHODS: [Method; 6] = [
    Method::GET,
    Method::HEAD,
    Method::POST,
    Method::PUT,
    Method::PATCH,
    Method::DELETE,
];

/// Request headers a browser may send without asking (Fetch's CORS-safelisted names).
const SAFELISTED: [&str; 4] = [
    "accept",
    "accept-language",
    "content-language",
    "content-type",
];

static PREFLIGHT_VARY: HeaderValue = HeaderValue::from_static(
    "Origin, Access-Control-Request-Method, Access-Control-Request-Headers",
);

/// Is this a CORS preflight?
pub fn is_preflight(method: &Method, headers: &HeaderMap) -> bool {
    method == Method::OPTIONS
        && headers.contains_key(header::ORIGIN)
        && headers.contains_key(header::ACCESS_CONTROL_REQUEST_METHOD)
}

/// The method a request is routed by: a preflight is routed as the request it announces,
/// so a route limited to `PUT` still gets (and answers) its preflights.
pub fn routing_method(method: &Method, headers: &HeaderMap) -> Method {
    if is_preflight(method, headers) {
        if let Some(m) = headers
            .get(header::ACCESS_CONTROL_REQUEST_METHOD)
            .and_then(|v| Method::from_bytes(v.as_bytes()).ok())
        {
            return m;
        }
    }
    method.clone()
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Origin {
    scheme: String,
    /// Exact host, or for a wildcard the suffix starting with `.`.
    host: String,
    port: Option<u16>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Origins {
    Any,
    Listed {
        exact: Vec<Origin>,
        wildcard: Vec<Origin>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum AllowHeaders {
    /// Echo what the preflight asks for (`"headers": ["*"]`).
    Any,
    /// Lower-case names, and the header value listing them.
    Listed(Vec<String>, Option<HeaderValue>),
}

/// Why a preflight is refused (answered 403 without CORS headers).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CorsRefusal {
    #[error("origin not allowed")]
    Origin,
    #[error("method not allowed")]
    Method,
    #[error("header `{0}` not allowed")]
    Header(String),
}

/// A route's compiled `cors`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cors {
    origins: Origins,
    methods: Vec<Method>,
    methods_value: HeaderValue,
    headers: AllowHeaders,
    expose: Option<HeaderValue>,
    credentials: bool,
    max_age: Option<HeaderValue>,
}

impl Cors {
    /// `route_methods` are the route's own `methods`: the default for `cors.methods`.
    pub fn compile(spec: &CorsSpec, route_methods: &[String]) -> Result<Cors, PolicyError> {
        if spec.origins.is_empty() {
            return Err(PolicyError::at(
                "cors.origins",
                "list at least one origin (or \"*\")",
            ));
        }
        let origins = if spec.origins.iter().any(|o| o.trim() == "*") {
            if spec.credentials {
                return Err(PolicyError::at(
                    "cors.origins",
                    "`*` cannot be combined with `credentials: true` (browsers refuse it); list the origins",
                ));
            }
            Origins::Any
        } else {
            let mut exact = Vec::new();
            let mut wildcard = Vec::new();
            for o in &spec.origins {
                let parsed = parse_origin(o.trim(), true)
                    .map_err(|m| PolicyError::at("cors.origins", format!("`{o}`: {m}")))?;
                if parsed.host.starts_with('.') {
                    wildcard.push(parsed);
                } else {
                    exact.push(parsed);
                }
            }
            Origins::Listed { exact, wildcard }
        };

        let names: &[String] = if spec.methods.is_empty() {
            route_methods
        } else {
            &spec.methods
        };
        let mut methods = Vec::new();
        for m in names {
            let method =
                Method::from_bytes(m.trim().to_ascii_uppercase().as_bytes()).map_err(|_| {
                    PolicyError::at("cors.methods", format!("`{m}` is not an HTTP method"))
                })?;
            if !methods.contains(&method) {
                methods.push(method);
            }
        }
        if methods.is_empty() {
            methods = DEFAULT_METHODS.to_vec();
        }
        let methods_value = join_value(methods.iter().map(Method::as_str))
            .ok_or_else(|| PolicyError::at("cors.methods", "not a header value"))?;

        let headers = if spec.headers.iter().any(|h| h.trim() == "*") {
            AllowHeaders::Any
        } else {
            let mut names = Vec::new();
            for h in &spec.headers {
                let name = HeaderName::from_bytes(h.trim().as_bytes()).map_err(|_| {
                    PolicyError::at("cors.headers", format!("`{h}` is not a header name"))
                })?;
                names.push(name.as_str().to_string());
            }
            let value = join_value(spec.headers.iter().map(|h| h.trim()));
            AllowHeaders::Listed(names, value)
        };

        for h in &spec.expose_headers {
            if h.trim() != "*" && HeaderName::from_bytes(h.trim().as_bytes()).is_err() {
                return Err(PolicyError::at(
                    "cors.expose_headers",
                    format!("`{h}` is not a header name"),
                ));
            }
        }
        let expose = join_value(spec.expose_headers.iter().map(|h| h.trim()));
        let max_age = match spec.max_age_s {
            Some(s) if s > 86_400 => {
                return Err(PolicyError::at(
                    "cors.max_age_s",
                    "at most 86400 (browsers cap it lower anyway)",
                ))
            }
            Some(s) => Some(HeaderValue::from(s)),
            None => None,
        };
        Ok(Cors {
            origins,
            methods,
            methods_value,
            headers,
            expose,
            credentials: spec.credentials,
            max_age,
        })
    }

    /// May a page from `origin` read this route's responses?
    pub fn allows_origin(&self, origin: &HeaderValue) -> bool {
        match &self.origins {
            Origins::Any => true,
            Origins::Listed { exact, wildcard } => {
                let Some(o) = origin
                    .to_str()
                    .ok()
                    .and_then(|s| parse_origin(s, false).ok())
                else {
                    return false;
                };
                exact.contains(&o)
                    || wildcard.iter().any(|w| {
                        w.scheme == o.scheme
                            && w.port == o.port
                            && o.host.len() > w.host.len()
                            && o.host.ends_with(&w.host)
                    })
            }
        }
    }

    /// The answer to a preflight: the headers of a 204, or why it is refused.
    pub fn preflight(&self, request: &HeaderMap) -> Result<HeaderMap, CorsRefusal> {
        let origin = request
            .get(header::ORIGIN)
            .filter(|o| self.allows_origin(o))
            .ok_or(CorsRefusal::Origin)?;
        let method = request
            .get(header::ACCESS_CONTROL_REQUEST_METHOD)
            .and_then(|m| Method::from_bytes(m.as_bytes()).ok())
            .ok_or(CorsRefusal::Method)?;
        if !self.methods.contains(&method) {
            return Err(CorsRefusal::Method);
        }
        let requested: Vec<&HeaderValue> = request
            .get_all(header::ACCESS_CONTROL_REQUEST_HEADERS)
            .iter()
            .collect();
        if let AllowHeaders::Listed(allowed, _) = &self.headers {
            for value in &requested {
                let text = value
                    .to_str()
                    .map_err(|_| CorsRefusal::Header("?".into()))?;
                for name in text.split(',').map(str::trim).filter(|n| !n.is_empty()) {
                    let lower = name.to_ascii_lowercase();
                    if !allowed.contains(&lower) && !SAFELISTED.contains(&lower.as_str()) {
                        return Err(CorsRefusal::Header(name.to_string()));
                    }
                }
            }
        }

        let mut out = HeaderMap::new();
        self.allow_origin(origin, &mut out);
        out.insert(
            header::ACCESS_CONTROL_ALLOW_METHODS,
            self.methods_value.clone(),
        );
        // Every requested name passed the check above: echo them (a browser wants each
        // one listed, safelisted names with unsafe values such as a JSON Content-Type too).
        if requested.is_empty() {
            if let AllowHeaders::Listed(_, Some(v)) = &self.headers {
                out.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, v.clone());
            }
        }
        for v in requested {
            out.append(header::ACCESS_CONTROL_ALLOW_HEADERS, v.clone());
        }
        if let Some(age) = &self.max_age {
            out.insert(header::ACCESS_CONTROL_MAX_AGE, age.clone());
        }
        out.insert(header::VARY, PREFLIGHT_VARY.clone());
        out.insert(header::CONTENT_LENGTH, HeaderValue::from_static("0"));
        Ok(out)
    }

    /// Sets the CORS headers of an actual response to a request that carried `origin`.
    /// Whatever `Access-Control-*` headers the upstream sent are replaced: the route's
    /// policy is the single source.
    pub fn decorate(&self, origin: Option<&HeaderValue>, response: &mut HeaderMap) {
        for name in [
            header::ACCESS_CONTROL_ALLOW_ORIGIN,
            header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
            header::ACCESS_CONTROL_EXPOSE_HEADERS,
            header::ACCESS_CONTROL_ALLOW_METHODS,
            header::ACCESS_CONTROL_ALLOW_HEADERS,
            header::ACCESS_CONTROL_MAX_AGE,
        ] {
            response.remove(name);
        }
        add_vary_origin(response);
        let Some(origin) = origin.filter(|o| self.allows_origin(o)) else {
            return;
        };
        self.allow_origin(origin, response);
        if let Some(expose) = &self.expose {
            response.insert(header::ACCESS_CONTROL_EXPOSE_HEADERS, expose.clone());
        }
    }

    fn allow_origin(&self, origin: &HeaderValue, out: &mut HeaderMap) {
        let value = if self.origins == Origins::Any {
            HeaderValue::from_static("*")
        } else {
            origin.clone()
        };
        out.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, value);
        if self.credentials {
            out.insert(
                header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
                HeaderValue::from_static("true"),
            );
        }
    }
}

/// Appends `Origin` to `Vary` unless it is already listed (or `Vary: *`).
fn add_vary_origin(headers: &mut HeaderMap) {
    let listed = headers.get_all(header::VARY).iter().any(|v| {
        v.to_str().is_ok_and(|s| {
            s.split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("origin") || t.trim() == "*")
        })
    });
    if !listed {
        headers.append(header::VARY, HeaderValue::from_static("Origin"));
    }
}

fn join_value<'a>(items: impl Iterator<Item = &'a str>) -> Option<HeaderValue> {
    let joined = items.collect::<Vec<_>>().join(", ");
    if joined.is_empty() {
        return None;
    }
    HeaderValue::from_str(&joined).ok()
}

/// `scheme://host[:port]`, lower-cased, default port dropped. In configuration
/// (`pattern`), the host may start with `*.` and one trailing `/` is tolerated.
fn parse_origin(text: &str, pattern: bool) -> Result<Origin, String> {
    let lower = text.to_ascii_lowercase();
    let (scheme, rest) = lower
        .split_once("://")
        .ok_or("an origin looks like `https://app.example.com`")?;
    if scheme.is_empty()
        || !scheme
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
    {
        return Err("bad scheme".into());
    }
    let rest = if pattern {
        rest.strip_suffix('/').unwrap_or(rest)
    } else {
        rest
    };
    if rest.contains(['/', '?', '#', '@']) {
        return Err(
            "an origin has no path, query or user (browsers send `scheme://host[:port]`)".into(),
        );
    }
    let (host, port) = if rest.starts_with('[') {
        let (inner, after) = rest.split_once(']').ok_or("unclosed `[`")?;
        let port = match after {
            "" => None,
            _ => Some(after.strip_prefix(':').ok_or("bad port")?),
        };
        (&rest[..inner.len() + 1], port)
    } else {
        match rest.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (rest, None),
        }
    };
    let port = port
        .map(|p| p.parse::<u16>().map_err(|_| format!("bad port `{p}`")))
        .transpose()?;
    let port = match (scheme, port) {
        ("https", Some(443)) | ("http", Some(80)) => None,
        (_, p) => p,
    };
    let host = if pattern {
        match host.strip_prefix("*.") {
            Some(suffix) => {
                check_host(suffix)?;
                if !suffix.contains('.') {
                    return Err("a wildcard needs a domain below a public suffix, e.g. `https://*.example.com`".into());
                }
                format!(".{suffix}")
            }
            None => {
                if host.contains('*') {
                    return Err("only a leading `*.` wildcard is allowed".into());
                }
                check_host(host)?;
                host.to_string()
            }
        }
    } else {
        check_host(host)?;
        host.to_string()
    };
    Ok(Origin {
        scheme: scheme.to_string(),
        host,
        port,
    })
}

fn check_host(host: &str) -> Result<(), String> {
    let ok = if let Some(inner) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        inner.parse::<std::net::Ipv6Addr>().is_ok()
    } else {
        !host.is_empty()
            && host
                .split('.')
                .all(|l| !l.is_empty() && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'))
    };
    if ok {
        Ok(())
    } else {
        Err(format!("`{host}` is not a host name"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(json: &str) -> CorsSpec {
        serde_json::from_str(json).unwrap()
    }

    fn cors(json: &str) -> Cors {
        Cors::compile(&spec(json), &[]).unwrap()
    }

    fn preflight(origin: &str, method: &str, headers: Option<&str>) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::ORIGIN, HeaderValue::from_str(origin).unwrap());
        h.insert(
            header::ACCESS_CONTROL_REQUEST_METHOD,
            HeaderValue::from_str(method).unwrap(),
        );
        if let Some(v) = headers {
            h.insert(
                header::ACCESS_CONTROL_REQUEST_HEADERS,
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn bad_documents_name_the_field() {
        let cases = [
            (r#"{"origins":[]}"#, "cors.origins"),
            (r#"{"origins":["*"],"credentials":true}"#, "cors.origins"),
            (r#"{"origins":["app.example.com"]}"#, "cors.origins"),
            (r#"{"origins":["https://a.com/path"]}"#, "cors.origins"),
            (r#"{"origins":["https://a.*.com"]}"#, "cors.origins"),
            (r#"{"origins":["https://*.com"]}"#, "cors.origins"),
            (r#"{"origins":["https://a.com:99999"]}"#, "cors.origins"),
            (r#"{"origins":["null"]}"#, "cors.origins"),
            (
                r#"{"origins":["https://a.com"],"methods":["G E T"]}"#,
                "cors.methods",
            ),
            (
                r#"{"origins":["https://a.com"],"headers":["X Y"]}"#,
                "cors.headers",
            ),
            (
                r#"{"origins":["https://a.com"],"expose_headers":["("]}"#,
                "cors.expose_headers",
            ),
            (
                r#"{"origins":["https://a.com"],"max_age_s":100000}"#,
                "cors.max_age_s",
            ),
        ];
        for (json, field) in cases {
            let err = Cors::compile(&spec(json), &[]).unwrap_err();
            assert_eq!(err.field(), field, "{json}: {err}");
        }
    }

    #[test]
    fn origins_match_exactly_or_by_subdomain_wildcard() {
        let c = cors(
            r#"{"origins":["https://app.example.com/","https://*.example.org","http://localhost:3000"]}"#,
        );
        let cases = [
            ("https://app.example.com", true),
            ("https://APP.example.com", true),
            ("https://app.example.com:443", true),
            ("http://app.example.com", false),
            ("https://app.example.com:8443", false),
            ("https://evil.com", false),
            ("https://a.example.org", true),
            ("https://a.b.example.org", true),
            ("https://example.org", false),
            ("https://evilexample.org", false),
            ("https://a.example.org.evil.com", false),
            ("https://a.example.org:444", false),
            ("http://localhost:3000", true),
            ("http://localhost:3001", false),
            ("null", false),
            ("https://a.example.org/x", false),
        ];
        for (origin, want) in cases {
            assert_eq!(
                c.allows_origin(&HeaderValue::from_static(origin)),
                want,
                "{origin}"
            );
        }
    }

    #[test]
    fn an_allowed_preflight_gets_every_header() {
        let c = cors(
            r#"{"origins":["https://app.example.com"],"methods":["get","PUT"],"headers":["Authorization","X-Trace"],"credentials":true,"max_age_s":600}"#,
        );
        let out = c
            .preflight(&preflight(
                "https://app.example.com",
                "PUT",
                Some("authorization, content-type"),
            ))
            .unwrap();
        assert_eq!(
            out[header::ACCESS_CONTROL_ALLOW_ORIGIN],
            "https://app.example.com"
        );
        assert_eq!(out[header::ACCESS_CONTROL_ALLOW_CREDENTIALS], "true");
        assert_eq!(out[header::ACCESS_CONTROL_ALLOW_METHODS], "GET, PUT");
        assert_eq!(
            out[header::ACCESS_CONTROL_ALLOW_HEADERS],
            "authorization, content-type"
        );
        assert_eq!(out[header::ACCESS_CONTROL_MAX_AGE], "600");
        assert!(out[header::VARY].to_str().unwrap().starts_with("Origin"));
    }

    #[test]
    fn preflights_outside_the_policy_are_refused() {
        let c =
            cors(r#"{"origins":["https://app.example.com"],"methods":["GET"],"headers":["X-A"]}"#);
        let cases = [
            (
                preflight("https://evil.com", "GET", None),
                CorsRefusal::Origin,
            ),
            (
                preflight("https://app.example.com", "DELETE", None),
                CorsRefusal::Method,
            ),
            (
                preflight("https://app.example.com", "GET", Some("x-a, X-B")),
                CorsRefusal::Header("X-B".into()),
            ),
        ];
        for (req, want) in cases {
            assert_eq!(c.preflight(&req).unwrap_err(), want);
        }
        assert!(c
            .preflight(&preflight("https://app.example.com", "GET", Some("X-A")))
            .is_ok());
        let out = c
            .preflight(&preflight("https://app.example.com", "GET", None))
            .unwrap();
        assert_eq!(out[header::ACCESS_CONTROL_ALLOW_HEADERS], "X-A");
    }

    #[test]
    fn star_answers_any_origin_and_echoes_requested_headers() {
        let c = cors(r#"{"origins":["*"],"headers":["*"]}"#);
        let out = c
            .preflight(&preflight("https://x.test", "PATCH", Some("X-Anything")))
            .unwrap();
        assert_eq!(out[header::ACCESS_CONTROL_ALLOW_ORIGIN], "*");
        assert_eq!(out[header::ACCESS_CONTROL_ALLOW_HEADERS], "X-Anything");
        assert!(!out.contains_key(header::ACCESS_CONTROL_ALLOW_CREDENTIALS));
    }

    #[test]
    fn route_methods_are_the_default() {
        let c = Cors::compile(
            &spec(r#"{"origins":["*"]}"#),
            &["GET".to_string(), "post".to_string()],
        )
        .unwrap();
        assert_eq!(c.methods_value, "GET, POST");
        assert_eq!(
            cors(r#"{"origins":["*"]}"#).methods_value,
            "GET, HEAD, POST, PUT, PATCH, DELETE"
        );
    }

    #[test]
    fn actual_responses_are_decorated_and_vary_on_origin() {
        let c = cors(
            r#"{"origins":["https://app.example.com"],"credentials":true,"expose_headers":["X-Total"]}"#,
        );
        let mut resp = HeaderMap::new();
        resp.insert(
            header::ACCESS_CONTROL_ALLOW_ORIGIN,
            HeaderValue::from_static("*"),
        );
        resp.insert(header::VARY, HeaderValue::from_static("Accept-Encoding"));
        c.decorate(
            Some(&HeaderValue::from_static("https://app.example.com")),
            &mut resp,
        );
        assert_eq!(
            resp[header::ACCESS_CONTROL_ALLOW_ORIGIN],
            "https://app.example.com"
        );
        assert_eq!(resp[header::ACCESS_CONTROL_ALLOW_CREDENTIALS], "true");
        assert_eq!(resp[header::ACCESS_CONTROL_EXPOSE_HEADERS], "X-Total");
        let vary: Vec<_> = resp.get_all(header::VARY).iter().collect();
        assert_eq!(vary, ["Accept-Encoding", "Origin"]);

        let mut other = HeaderMap::new();
        other.insert(
            header::ACCESS_CONTROL_ALLOW_ORIGIN,
            HeaderValue::from_static("*"),
        );
        c.decorate(
            Some(&HeaderValue::from_static("https://evil.com")),
            &mut other,
        );
        assert!(!other.contains_key(header::ACCESS_CONTROL_ALLOW_ORIGIN));
        assert_eq!(other[header::VARY], "Origin");
    }

    #[test]
    fn preflights_are_routed_by_the_announced_method() {
        let h = preflight("https://a.com", "PUT", None);
        assert_eq!(routing_method(&Method::OPTIONS, &h), Method::PUT);
        assert_eq!(routing_method(&Method::GET, &h), Method::GET);
        assert_eq!(
            routing_method(&Method::OPTIONS, &HeaderMap::new()),
            Method::OPTIONS
        );
    }
}
