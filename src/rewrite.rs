//! What a route changes on the way through, besides the path: header rules for the
//! request and for the answer (`request_headers`, `response_headers`), the `Host` sent
//! upstream (`host_rewrite`), and redirects answered at the gateway (`redirect`).
//!
//! Everything is compiled when the route document is read. A rule that would set or
//! remove a header the gateway owns (framing, forwarding, request id, identity and
//! assertion headers) makes the document invalid, so its last good version keeps
//! serving: an operator's typo can never open a way to forge what backends trust.
//! Identity headers configured by JWT providers in KV can change after a route compiled;
//! the request path skips those (see [`HeaderRules::apply`]) and auth writes them last.

use std::collections::{BTreeMap, HashSet};
use std::net::IpAddr;

use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::StatusCode;
use serde::{Deserialize, Serialize};

use crate::owned_headers::{is_answer_owned, is_gateway_owned};

#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
#[error("{0}")]
pub struct RewriteError(String);

fn invalid(message: impl Into<String>) -> RewriteError {
    RewriteError(message.into())
}

/// `request_headers` / `response_headers`: `{"set": {...}, "add": {...}, "remove": [...]}`.
/// Applied in that document's order of safety: `remove`, then `set` (replacing every
/// copy), then `add` (appending).
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct HeaderRulesSpec {
    pub set: BTreeMap<String, String>,
    pub add: BTreeMap<String, String>,
    pub remove: Vec<String>,
}

/// `redirect`: answered at the gateway, no upstream involved.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RedirectSpec {
    /// `https://host[/path]`, `http://...`, or a path on the same host (`/new`).
    pub to: String,
    /// 301, 302, 307 or 308.
    #[serde(default = "default_redirect_status")]
    pub status: u16,
    /// Append the request's path (after the route's prefix rewrite) and query to `to`.
    #[serde(default)]
    pub keep_path: bool,
}

fn default_redirect_status() -> u16 {
    301
}

/// Header names that a route's own settings make the gateway write, so its rules may
/// not touch them either.
#[derive(Debug, Default, Clone, Copy)]
pub struct RouteWrites<'a> {
    /// The route's upstream assertion header, when it has one.
    pub assertion_header: Option<&'a HeaderName>,
    /// The route answers CORS (`Access-Control-*` on answers are the gateway's).
    pub cors: bool,
    /// The route has a rate limit (`RateLimit-*`, `Retry-After` are the gateway's).
    pub rate_limit: bool,
}

/// Identity headers the gateway writes with its defaults, and the assertion header it
/// always strips: owned whatever the configuration says.
static ALWAYS_OWNED_REQUEST: [&str; 3] = ["x-user-id", "x-consumer", "x-gateway-assertion"];

/// What a header value may refer to, filled in per request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Variable {
    ClientIp,
    Route,
    RequestId,
    Host,
}

impl Variable {
    fn parse(name: &str) -> Option<Variable> {
        Some(match name {
            "client_ip" => Variable::ClientIp,
            "route" => Variable::Route,
            "request_id" => Variable::RequestId,
            "host" => Variable::Host,
            _ => return None,
        })
    }
}

/// The values `${...}` stands for in one request.
#[derive(Debug, Clone, Copy)]
pub struct RuleVars<'a> {
    pub client_ip: IpAddr,
    pub route: &'a str,
    pub request_id: &'a str,
    /// The host the client asked for (lower case, no port).
    pub host: &'a str,
}

#[derive(Debug, Clone, PartialEq)]
enum Piece {
    Text(String),
    Var(Variable),
}

/// A header value: fixed, or text and variables to join per request.
#[derive(Debug, Clone, PartialEq)]
enum ValueTemplate {
    Fixed(HeaderValue),
    Pieces(Vec<Piece>),
}

impl ValueTemplate {
    fn parse(text: &str) -> Result<ValueTemplate, String> {
        if let Some(bad) = text
            .chars()
            .find(|c| !(c.is_ascii_graphic() || *c == ' ' || *c == '\t'))
        {
            return Err(format!("the value holds {bad:?}, not allowed in a header"));
        }
        let mut pieces = Vec::new();
        let mut rest = text;
        while let Some(start) = rest.find("${") {
            if start > 0 {
                pieces.push(Piece::Text(rest[..start].to_string()));
            }
            let after = &rest[start + 2..];
            let end = after
                .find('}')
                .ok_or_else(|| "`${` without a closing `}`".to_string())?;
            let name = &after[..end];
            let var = Variable::parse(name).ok_or_else(|| {
                format!(
                    "unknown variable `${{{name}}}` (known: ${{client_ip}}, ${{route}}, \
                     ${{request_id}}, ${{host}})"
                )
            })?;
            pieces.push(Piece::Var(var));
            rest = &after[end + 1..];
        }
        if !rest.is_empty() {
            pieces.push(Piece::Text(rest.to_string()));
        }
        if pieces.iter().all(|p| matches!(p, Piece::Text(_))) {
            let value = HeaderValue::from_str(text).map_err(|e| e.to_string())?;
            return Ok(ValueTemplate::Fixed(value));
        }
        Ok(ValueTemplate::Pieces(pieces))
    }

    /// The value for this request; `None` if a variable's value cannot be a header value
    /// (then the header is left out rather than sent mangled).
    fn render(&self, vars: &RuleVars<'_>) -> Option<HeaderValue> {
        let pieces = match self {
            ValueTemplate::Fixed(v) => return Some(v.clone()),
            ValueTemplate::Pieces(p) => p,
        };
        let mut out = String::new();
        for piece in pieces {
            match piece {
                Piece::Text(t) => out.push_str(t),
                Piece::Var(Variable::ClientIp) => out.push_str(&vars.client_ip.to_string()),
                Piece::Var(Variable::Route) => out.push_str(vars.route),
                Piece::Var(Variable::RequestId) => out.push_str(vars.request_id),
                Piece::Var(Variable::Host) => out.push_str(vars.host),
            }
        }
        HeaderValue::from_str(&out).ok()
    }
}

/// Which side of the exchange a rule list edits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Request,
    Response,
}

/// Compiled header rules of one side of a route.
#[derive(Debug, Clone, PartialEq)]
pub struct HeaderRules {
    remove: Vec<HeaderName>,
    set: Vec<(HeaderName, ValueTemplate)>,
    add: Vec<(HeaderName, ValueTemplate)>,
}

impl HeaderRules {
    /// `request_headers`; `None` when the rules do nothing.
    pub fn for_requests(
        spec: &HeaderRulesSpec,
        writes: RouteWrites<'_>,
    ) -> Result<Option<HeaderRules>, RewriteError> {
        Self::compile(spec, Side::Request, writes)
    }

    /// `response_headers`; `None` when the rules do nothing.
    pub fn for_responses(
        spec: &HeaderRulesSpec,
        writes: RouteWrites<'_>,
    ) -> Result<Option<HeaderRules>, RewriteError> {
        Self::compile(spec, Side::Response, writes)
    }

    fn compile(
        spec: &HeaderRulesSpec,
        side: Side,
        writes: RouteWrites<'_>,
    ) -> Result<Option<HeaderRules>, RewriteError> {
        let mut seen: HashSet<HeaderName> = HashSet::new();
        let mut name = |text: &str, list: &str| -> Result<HeaderName, RewriteError> {
            let name = HeaderName::from_bytes(text.as_bytes())
                .map_err(|_| invalid(format!("{list}: `{text}` is not a header name")))?;
            if let Some(why) = owned_by_gateway(&name, side, writes) {
                return Err(invalid(format!(
                    "{list}: `{text}` cannot be changed by header rules ({why})"
                )));
            }
            if !seen.insert(name.clone()) {
                return Err(invalid(format!(
                    "`{text}` is named more than once across set, add and remove"
                )));
            }
            Ok(name)
        };
        let mut remove = Vec::with_capacity(spec.remove.len());
        for text in &spec.remove {
            remove.push(name(text, "remove")?);
        }
        let mut set = Vec::with_capacity(spec.set.len());
        for (text, value) in &spec.set {
            let n = name(text, "set")?;
            let v = ValueTemplate::parse(value)
                .map_err(|m| invalid(format!("set: value of `{text}`: {m}")))?;
            set.push((n, v));
        }
        let mut add = Vec::with_capacity(spec.add.len());
        for (text, value) in &spec.add {
            let n = name(text, "add")?;
            let v = ValueTemplate::parse(value)
                .map_err(|m| invalid(format!("add: value of `{text}`: {m}")))?;
            add.push((n, v));
        }
        if remove.is_empty() && set.is_empty() && add.is_empty() {
            return Ok(None);
        }
        Ok(Some(HeaderRules { remove, set, add }))
    }

    /// Applies the rules: `remove`, then `set`, then `add`. `skip` names headers the
    /// gateway owns that were not known when the route compiled (identity headers of JWT
    /// providers); rules naming them are passed over.
    pub fn apply(
        &self,
        headers: &mut HeaderMap,
        vars: &RuleVars<'_>,
        skip: &dyn Fn(&HeaderName) -> bool,
    ) {
        for name in &self.remove {
            if !skip(name) {
                headers.remove(name);
            }
        }
        for (name, template) in &self.set {
            if skip(name) {
                continue;
            }
            match template.render(vars) {
                Some(value) => {
                    headers.insert(name, value);
                }
                None => {
                    headers.remove(name);
                }
            }
        }
        for (name, template) in &self.add {
            if skip(name) {
                continue;
            }
            if let Some(value) = template.render(vars) {
                headers.append(name, value);
            }
        }
    }
}

/// Why the gateway owns `name` on this side, if it does.
fn owned_by_gateway(
    name: &HeaderName,
    side: Side,
    writes: RouteWrites<'_>,
) -> Option<&'static str> {
    let text = name.as_str();
    match side {
        Side::Request => {
            // Many backends read `_` as `-`: a rule may not reach an owned name that way.
            let folded = text.replace('_', "-");
            if is_gateway_owned(&folded) {
                return Some("the gateway sets it; use host_rewrite for the Host");
            }
            if ALWAYS_OWNED_REQUEST.contains(&folded.as_str()) {
                return Some("an identity or assertion header");
            }
            if writes
                .assertion_header
                .is_some_and(|h| h.as_str() == folded)
            {
                return Some("the route's upstream assertion header");
            }
            None
        }
        Side::Response => {
            if is_answer_owned(text) {
                return Some("it frames the answer or is stamped by the gateway");
            }
            if writes.cors && text.starts_with("access-control-") {
                return Some("the route's cors settings write it");
            }
            if writes.rate_limit
                && (text.starts_with("ratelimit")
                    || text.starts_with("x-ratelimit")
                    || text == "retry-after")
            {
                return Some("the route's rate limit writes it");
            }
            None
        }
    }
}

/// `host_rewrite`: a host name or address with an optional port, nothing else.
pub fn compile_host(text: &str) -> Result<HeaderValue, RewriteError> {
    let authority: http::uri::Authority = text
        .parse()
        .map_err(|_| invalid(format!("`{text}` is not a host[:port]")))?;
    if authority.as_str().contains('@') || authority.host().is_empty() {
        return Err(invalid(format!("`{text}` is not a host[:port]")));
    }
    let has_port = text
        .rsplit_once(']')
        .map_or(text, |(_, after)| after)
        .contains(':');
    if has_port && authority.port_u16().is_none() {
        return Err(invalid(format!("`{text}` is not a host[:port]")));
    }
    if authority.as_str() != text {
        return Err(invalid(format!("`{text}` is not a host[:port]")));
    }
    HeaderValue::from_str(&text.to_ascii_lowercase()).map_err(|e| invalid(e.to_string()))
}

/// A compiled `redirect`.
#[derive(Debug, Clone, PartialEq)]
pub struct Redirect {
    /// `to`, without a trailing `/` when the path is appended.
    base: String,
    status: StatusCode,
    keep_path: bool,
}

impl Redirect {
    pub fn compile(spec: &RedirectSpec) -> Result<Redirect, RewriteError> {
        let status = match spec.status {
            301 | 302 | 307 | 308 => {
                StatusCode::from_u16(spec.status).map_err(|e| invalid(format!("status: {e}")))?
            }
            other => {
                return Err(invalid(format!(
                    "status {other}: must be 301, 302, 307 or 308"
                )))
            }
        };
        let to = spec.to.as_str();
        if to.bytes().any(|b| !b.is_ascii_graphic()) || to.contains('#') {
            return Err(invalid(
                "to: must be a URL without spaces, control characters or a fragment",
            ));
        }
        let uri: http::Uri = to
            .parse()
            .map_err(|_| invalid(format!("to: `{to}` is not a URL")))?;
        match (uri.scheme_str(), uri.authority()) {
            (Some("http" | "https"), Some(authority)) if !authority.as_str().contains('@') => {}
            (None, None) if to.starts_with('/') && !to.starts_with("//") => {}
            _ => {
                return Err(invalid(format!(
                    "to: `{to}` must be an http(s) URL with a host, or a path starting with one '/'"
                )))
            }
        }
        if spec.keep_path && uri.query().is_some() {
            return Err(invalid(
                "to: with keep_path the client's query is kept, so `to` may not have one",
            ));
        }
        let base = if spec.keep_path {
            to.trim_end_matches('/').to_string()
        } else {
            to.to_string()
        };
        Ok(Redirect {
            base,
            status,
            keep_path: spec.keep_path,
        })
    }

    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The `Location` for a request with this (normalised, rewritten) path and query.
    pub fn location(&self, path: &str, query: Option<&str>) -> Option<HeaderValue> {
        if !self.keep_path {
            return HeaderValue::from_str(&self.base).ok();
        }
        // One leading '/', whatever the path held: `//host` must never reach a browser.
        let path = path.trim_start_matches('/');
        let mut text =
            String::with_capacity(self.base.len() + path.len() + query.map_or(0, str::len) + 2);
        text.push_str(&self.base);
        text.push('/');
        text.push_str(path);
        if let Some(q) = query {
            text.push('?');
            text.push_str(q);
        }
        HeaderValue::from_str(&text).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(json: &str) -> HeaderRulesSpec {
        serde_json::from_str(json).unwrap()
    }

    fn vars() -> RuleVars<'static> {
        RuleVars {
            client_ip: "10.1.2.3".parse().unwrap(),
            route: "orders",
            request_id: "abc",
            host: "api.example.com",
        }
    }

    fn request_rules(json: &str) -> Result<Option<HeaderRules>, RewriteError> {
        HeaderRules::for_requests(&spec(json), RouteWrites::default())
    }

    #[test]
    fn rules_remove_then_set_then_add_with_variables() {
        let rules = request_rules(
            r#"{"set":{"X-Route":"${route}@${host}"},"add":{"x-trace":"ip=${client_ip};id=${request_id}"},"remove":["cookie"]}"#,
        )
        .unwrap()
        .unwrap();
        let mut h = HeaderMap::new();
        h.insert("cookie", HeaderValue::from_static("a=1"));
        h.append("x-route", HeaderValue::from_static("client"));
        h.append("x-route", HeaderValue::from_static("client2"));
        h.insert("x-trace", HeaderValue::from_static("first"));
        rules.apply(&mut h, &vars(), &|_| false);
        assert!(h.get("cookie").is_none());
        let routes: Vec<_> = h.get_all("x-route").iter().collect();
        assert_eq!(routes, ["orders@api.example.com"]);
        let traces: Vec<_> = h.get_all("x-trace").iter().collect();
        assert_eq!(traces, ["first", "ip=10.1.2.3;id=abc"]);
    }

    #[test]
    fn empty_rules_compile_to_nothing() {
        assert_eq!(request_rules("{}").unwrap(), None);
    }

    #[test]
    fn gateway_owned_request_headers_are_refused_in_every_spelling() {
        for doc in [
            r#"{"set":{"X-Forwarded-For":"1.2.3.4"}}"#,
            r#"{"set":{"x_forwarded_for":"1.2.3.4"}}"#,
            r#"{"remove":["x-request-id"]}"#,
            r#"{"add":{"Host":"evil"}}"#,
            r#"{"set":{"X-User-Id":"admin"}}"#,
            r#"{"set":{"x_user_id":"admin"}}"#,
            r#"{"remove":["x-gateway-assertion"]}"#,
            r#"{"set":{"transfer-encoding":"chunked"}}"#,
            r#"{"set":{"content-length":"0"}}"#,
            r#"{"set":{"connection":"close"}}"#,
            r#"{"set":{"forwarded":"for=1.2.3.4"}}"#,
            r#"{"set":{"x-real-ip":"1.2.3.4"}}"#,
        ] {
            let err = request_rules(doc).unwrap_err().to_string();
            assert!(err.contains("cannot be changed"), "{doc}: {err}");
        }
        let assertion = HeaderName::from_static("x-internal-proof");
        let writes = RouteWrites {
            assertion_header: Some(&assertion),
            ..RouteWrites::default()
        };
        assert!(
            HeaderRules::for_requests(&spec(r#"{"set":{"x-internal-proof":"x"}}"#), writes)
                .is_err()
        );
    }

    #[test]
    fn response_rules_may_not_touch_framing_or_what_the_route_writes() {
        let cors = RouteWrites {
            cors: true,
            rate_limit: true,
            ..RouteWrites::default()
        };
        for doc in [
            r#"{"set":{"content-length":"1"}}"#,
            r#"{"remove":["x-request-id"]}"#,
            r#"{"set":{"via":"me"}}"#,
        ] {
            assert!(
                HeaderRules::for_responses(&spec(doc), RouteWrites::default()).is_err(),
                "{doc}"
            );
        }
        let acao = spec(r#"{"set":{"access-control-allow-origin":"*"}}"#);
        assert!(HeaderRules::for_responses(&acao, RouteWrites::default())
            .unwrap()
            .is_some());
        assert!(HeaderRules::for_responses(&acao, cors).is_err());
        let limit = spec(r#"{"remove":["ratelimit-remaining"]}"#);
        assert!(HeaderRules::for_responses(&limit, cors).is_err());
        let fine =
            spec(r#"{"set":{"strict-transport-security":"max-age=63072000"},"remove":["server"]}"#);
        assert!(HeaderRules::for_responses(&fine, cors).unwrap().is_some());
    }

    #[test]
    fn bad_names_values_variables_and_repeats_are_refused_with_the_reason() {
        for (doc, says) in [
            (r#"{"set":{"bad name":"x"}}"#, "not a header name"),
            (r#"{"set":{"x-a":"line\nbreak"}}"#, "not allowed"),
            (r#"{"set":{"x-a":"${nope}"}}"#, "unknown variable"),
            (r#"{"set":{"x-a":"${route"}}"#, "closing"),
            (r#"{"set":{"x-a":"1"},"remove":["X-A"]}"#, "more than once"),
            (r#"{"set":{"X-A":"1","x-a":"2"}}"#, "more than once"),
            (r#"{"sett":{}}"#, ""),
        ] {
            match serde_json::from_str::<HeaderRulesSpec>(doc) {
                Err(_) => assert!(says.is_empty(), "{doc}"),
                Ok(s) => {
                    let err = HeaderRules::for_requests(&s, RouteWrites::default())
                        .unwrap_err()
                        .to_string();
                    assert!(err.contains(says), "{doc}: {err}");
                }
            }
        }
    }

    #[test]
    fn skipped_names_are_left_alone() {
        let rules = request_rules(r#"{"set":{"x-team":"a"},"remove":["x-plan"]}"#)
            .unwrap()
            .unwrap();
        let mut h = HeaderMap::new();
        h.insert("x-plan", HeaderValue::from_static("gold"));
        h.insert("x-team", HeaderValue::from_static("from-auth"));
        rules.apply(&mut h, &vars(), &|n| n == "x-team" || n == "x-plan");
        assert_eq!(h["x-team"], "from-auth");
        assert_eq!(h["x-plan"], "gold");
    }

    #[test]
    fn host_rewrite_takes_a_host_and_port_only() {
        assert_eq!(
            compile_host("Backend.internal:8443").unwrap(),
            "backend.internal:8443"
        );
        assert_eq!(compile_host("10.0.0.1").unwrap(), "10.0.0.1");
        assert_eq!(compile_host("[::1]:8080").unwrap(), "[::1]:8080");
        for bad in [
            "",
            "user@host",
            "host/path",
            "host name",
            "http://host",
            "host:port",
        ] {
            assert!(compile_host(bad).is_err(), "{bad}");
        }
    }

    fn redirect(json: &str) -> Result<Redirect, RewriteError> {
        Redirect::compile(&serde_json::from_str(json).unwrap())
    }

    #[test]
    fn redirects_keep_the_path_and_query_when_asked() {
        let r = redirect(r#"{"to":"https://new.example.com/v2/","status":308,"keep_path":true}"#)
            .unwrap();
        assert_eq!(r.status(), StatusCode::PERMANENT_REDIRECT);
        assert_eq!(
            r.location("/a/b", Some("x=1")).unwrap(),
            "https://new.example.com/v2/a/b?x=1"
        );
        let r = redirect(r#"{"to":"https://new.example.com"}"#).unwrap();
        assert_eq!(r.status(), StatusCode::MOVED_PERMANENTLY);
        assert_eq!(
            r.location("/a", Some("q")).unwrap(),
            "https://new.example.com"
        );
    }

    #[test]
    fn a_same_host_redirect_can_never_name_another_host() {
        let r = redirect(r#"{"to":"/","keep_path":true}"#).unwrap();
        assert_eq!(
            r.location("//evil.example/x", None).unwrap(),
            "/evil.example/x"
        );
        assert_eq!(r.location("/", None).unwrap(), "/");
        let r = redirect(r#"{"to":"/new","keep_path":true}"#).unwrap();
        assert_eq!(r.location("/old/page", None).unwrap(), "/new/old/page");
    }

    #[test]
    fn bad_redirects_are_refused() {
        for doc in [
            r#"{"to":"https://x","status":200}"#,
            r#"{"to":"https://x","status":303}"#,
            r#"{"to":"//evil.example"}"#,
            r#"{"to":"ftp://x"}"#,
            r#"{"to":"javascript:alert(1)"}"#,
            r#"{"to":"https://user@x"}"#,
            r#"{"to":"https://x/a b"}"#,
            r#"{"to":"https://x/#frag"}"#,
            r#"{"to":"https://x/?a=1","keep_path":true}"#,
            r#"{"to":"relative"}"#,
        ] {
            assert!(redirect(doc).is_err(), "{doc}");
        }
        assert!(serde_json::from_str::<RedirectSpec>(r#"{"to":"/","keep":true}"#).is_err());
    }
}
