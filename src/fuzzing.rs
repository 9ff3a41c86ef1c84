//! Entry points for the cargo-fuzz targets in `fuzz/` and for the corpus replay in
//! `tests/fuzz_corpus.rs`. They live in the library so that both run the parsers the gateway
//! itself uses, on stable and nightly alike. Each takes any bytes and must never panic,
//! except on a broken invariant (which is what the fuzzer is looking for).

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use futures_util::FutureExt;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Uri};

// The HTTP/1.1 protocol layer's targets live beside the code they reach into.
use crate::auth::api_key::{ApiKeyDoc, ApiKeyRecord, ApiKeyStore};
use crate::auth::docs::KvDocs;
use crate::auth::jwt::Provider;
use crate::auth::{AuthSettings, Authenticator, FailureBudgetSettings, Requirement};
use crate::consul::watch::{CatalogServices, Source};
use crate::consul::{ClientSettings, ConsulClient, KvPair, KvPrefix};
use crate::discovery::watcher::HealthSource;
use crate::discovery::UpstreamSet;
pub use crate::http1::fuzz::{chunked_body, request_head, response_head};
use crate::routing::kv::RouteDocs;
use crate::routing::{fabio, Route, RouteSpec, RouteTable};

/// The key a fuzzed document is stored under, as Consul would list it.
fn kv_pair(key: &str, value: &[u8]) -> KvPair {
    KvPair {
        key: key.to_string(),
        value: Some(value.to_vec()),
        flags: 0,
        create_index: 1,
        modify_index: 1,
        lock_index: 0,
        session: None,
    }
}

/// A route KV document, through the same `RouteDocs` listing the KV watch feeds. A document
/// that parses must serialise and parse again to the same spec, compiling the same way.
pub fn route_document(data: &[u8]) {
    let mut docs = RouteDocs::new("fuzz/");
    let _ = docs.apply(&[kv_pair("fuzz/routes/r", data)]);
    let _ = docs.rejections();
    let table = RouteTable::build(docs.routes());
    let _ = table.lookup("api.example.com", "/", &Method::GET, &HeaderMap::new());

    let Ok(spec) = RouteSpec::from_json(data) else {
        return;
    };
    let compiled = Route::compile("r", spec.clone());
    let text = match serde_json::to_vec(&spec) {
        Ok(text) => text,
        Err(e) => panic!("a parsed route does not serialise: {e}"),
    };
    let again = match RouteSpec::from_json(&text) {
        Ok(again) => again,
        Err(e) => panic!(
            "a re-serialised route does not parse: {e}\n{}",
            String::from_utf8_lossy(&text)
        ),
    };
    assert!(
        same_spec(&spec, &again),
        "round trip changed the route:\n{spec:?}\n{again:?}"
    );
    assert_eq!(
        Route::compile("r", again).is_ok(),
        compiled.is_ok(),
        "round trip changed whether the route compiles"
    );
    if let Ok(route) = compiled {
        apply_rewrites(&route);
    }
}

/// A compiled route's header rules never touch a header the gateway owns, and its
/// redirect never sends a browser to a host `to` did not name.
fn apply_rewrites(route: &Route) {
    let owned = [
        "host",
        "x-forwarded-for",
        "x-request-id",
        "content-length",
        "x-user-id",
    ];
    let mut headers = HeaderMap::new();
    for name in owned {
        headers.insert(name, http::HeaderValue::from_static("gateway"));
    }
    let vars = crate::rewrite::RuleVars {
        client_ip: std::net::IpAddr::from([10, 0, 0, 1]),
        route: "r",
        request_id: "id",
        host: "api.example.com",
    };
    for rules in [&route.request_headers, &route.response_headers]
        .into_iter()
        .flatten()
    {
        let mut h = headers.clone();
        rules.apply(&mut h, &vars, &|_| false);
        for name in ["x-forwarded-for", "x-request-id", "content-length"] {
            assert_eq!(h.get_all(name).iter().count(), 1, "rules reached {name}");
        }
    }
    if let Some(redirect) = &route.redirect {
        for path in ["/", "//evil.example/x", "/a/../b"] {
            if let Some(location) = redirect.location(path, Some("q=1")) {
                let text = location.to_str().unwrap_or_default();
                assert!(!text.starts_with("//"), "protocol-relative redirect {text}");
            }
        }
    }
}

/// Equal, but for `rate_limit.per_second`, which serde_json's default float parser may read
/// one unit in the last place off (its `float_roundtrip` feature is not enabled).
fn same_spec(a: &RouteSpec, b: &RouteSpec) -> bool {
    if a == b {
        return true;
    }
    match (&a.rate_limit, &b.rate_limit) {
        (Some(x), Some(y)) => {
            let close = (x.per_second - y.per_second).abs()
                <= f64::EPSILON * x.per_second.abs().max(y.per_second.abs());
            let mut b = b.clone();
            if let Some(r) = b.rate_limit.as_mut() {
                r.per_second = x.per_second;
            }
            close && *a == b
        }
        _ => false,
    }
}

/// Where `secret_file` in a fuzzed provider document points: any readable file works as an
/// HMAC secret, and the manifest is always there. Fuzzed paths are never read (a document
/// naming `/dev/zero` would only measure the disk).
const SECRET_FILE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml");

/// A JWT provider KV document, compiled as the authenticator's KV listing compiles it
/// (`Provider::check` is `Provider::build` without starting a JWKS fetch).
pub fn jwt_provider_document(data: &[u8]) {
    let mut docs: KvDocs<()> = KvDocs::new("fuzz/jwt/");
    let _ = docs.apply(&[kv_pair("fuzz/jwt/main", data)], |name, value, _| {
        let mut doc: serde_json::Value =
            serde_json::from_slice(value).map_err(|e| format!("invalid JSON: {e}"))?;
        if let Some(keys) = doc.get_mut("keys").and_then(|k| k.as_array_mut()) {
            for key in keys.iter_mut().filter_map(|k| k.as_object_mut()) {
                if key.contains_key("secret_file") {
                    key.insert("secret_file".into(), SECRET_FILE.into());
                }
            }
        }
        Provider::check(name, &doc).map_err(|e| e.to_string())
    });
    let _ = docs.rejections();
}

/// The presented key whose digest the seed API key documents carry.
const FUZZ_API_KEY: &[u8] = b"sy_fuzz-key";

/// An API key KV document, through the authenticator's listing, store and lookup. A
/// document holding the SHA-256 of [`FUZZ_API_KEY`] must admit that key unless disabled.
pub fn api_key_document(data: &[u8]) {
    let header = HeaderName::from_static("x-consumer");
    let mut docs: KvDocs<ApiKeyRecord> = KvDocs::new("fuzz/apikeys/");
    let _ = docs.apply(&[kv_pair("fuzz/apikeys/k", data)], |id, value, _| {
        ApiKeyRecord::compile(id, value, &header)
    });
    let (store, _duplicates) = ApiKeyStore::build(docs.good());
    let _ = store.check(data);
    let found = store.check(FUZZ_API_KEY);
    if store.is_empty() {
        return;
    }
    if let Ok(doc) = serde_json::from_slice::<ApiKeyDoc>(data) {
        let digest = <sha2::Sha256 as sha2::Digest>::digest(FUZZ_API_KEY);
        if doc.sha256.trim().eq_ignore_ascii_case(&hex::encode(digest)) {
            assert_eq!(
                found.is_ok(),
                !doc.disabled,
                "the key of a stored digest: {found:?}"
            );
        }
    }
}

/// HMAC secret of the provider behind [`jwt_token`].
const JWT_SECRET: &[u8] = b"switchyard-fuzz-hmac-secret-0123456789abcdef";
/// The client address the fuzzed requests come from.
const FUZZ_CLIENT: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
/// `iss` of that provider; tokens signed by the target carry whatever the input says.
pub const JWT_ISSUER: &str = "https://id.fuzz.example";

struct JwtTarget {
    auth: Authenticator,
    requirement: Requirement,
}

fn jwt_target() -> Option<&'static JwtTarget> {
    static TARGET: OnceLock<Option<JwtTarget>> = OnceLock::new();
    TARGET
        .get_or_init(|| {
            // The secret is read once, when the provider is built: the file goes right after.
            let path = std::env::temp_dir().join(format!(
                "switchyard-fuzz-secret-{}-{:?}",
                std::process::id(),
                std::thread::current().id()
            ));
            std::fs::write(&path, JWT_SECRET).ok()?;
            let doc = serde_json::json!({
                "issuer": JWT_ISSUER,
                "audiences": ["api"],
                "algorithms": ["HS256", "HS384"],
                "keys": [{"kid": "k1", "secret_file": path}],
                "from_cookie": "sy_token",
                "from_query": "access_token",
                "claims_to_headers": {"sub": "X-User-Id", "groups": "X-Groups", "level": "X-Level"},
                "payload_header": "X-Jwt-Payload",
                "cache_entries": 0,
            });
            let providers = BTreeMap::from([("main".to_string(), doc)]);
            // No failure budget: every input must reach the verifier.
            let settings = AuthSettings {
                failure_budget: FailureBudgetSettings {
                    burst: 0,
                    global_burst: 0,
                    ..FailureBudgetSettings::default()
                },
                ..AuthSettings::default()
            };
            let auth = Authenticator::new(settings, "fuzz/", &providers);
            let _ = std::fs::remove_file(&path);
            let requirement = Requirement::new(vec!["main".into()], true, Vec::new(), None).ok()?;
            Some(JwtTarget {
                auth: auth.ok()?,
                requirement,
            })
        })
        .as_ref()
}

/// Token text through the authenticator's whole admission (extraction from `Authorization`,
/// a cookie and a query parameter; header and payload decoding; signature and claim checks;
/// identity headers). Bytes split at the first NUL into a JWS header and a payload are also
/// signed with the provider's secret, so the claim checks see arbitrary JSON too.
pub fn jwt_token(data: &[u8]) {
    let Some(target) = jwt_target() else {
        panic!("the fuzz JWT provider does not build");
    };
    let text = String::from_utf8_lossy(data);
    let admit = |uri: &Uri, mut headers: HeaderMap| {
        let _ = target
            .auth
            .admit(&target.requirement, FUZZ_CLIENT, uri, &mut headers)
            .now_or_never();
    };
    let root = Uri::from_static("/r");
    if let Ok(v) = HeaderValue::from_str(&format!("Bearer {text}")) {
        admit(
            &root,
            HeaderMap::from_iter([(http::header::AUTHORIZATION, v)]),
        );
    }
    if let Ok(v) = HeaderValue::from_bytes(&[b"sy_token=", data].concat()) {
        admit(&root, HeaderMap::from_iter([(http::header::COOKIE, v)]));
    }
    let query: String = url::form_urlencoded::Serializer::new(String::new())
        .append_pair("access_token", &text)
        .finish();
    if let Ok(uri) = format!("/r?{query}").parse::<Uri>() {
        admit(&uri, HeaderMap::new());
    }
    if let Ok(v) = HeaderValue::from_bytes(data) {
        let name = HeaderName::from_static("x-api-key");
        admit(&root, HeaderMap::from_iter([(name, v)]));
    }

    let (head, payload) = match data.iter().position(|&b| b == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (&br#"{"alg":"HS256","typ":"JWT","kid":"k1"}"#[..], data),
    };
    if let Some(token) = signed_token(head, payload) {
        if let Ok(v) = HeaderValue::from_str(&format!("Bearer {token}")) {
            admit(
                &root,
                HeaderMap::from_iter([(http::header::AUTHORIZATION, v)]),
            );
        }
    }
}

/// A compact JWS of these header and payload bytes, signed with [`JWT_SECRET`] (HS384 when
/// the header names it, else HS256).
fn signed_token(head: &[u8], payload: &[u8]) -> Option<String> {
    use base64::Engine;
    let alg = if head.windows(5).any(|w| w == b"HS384") {
        jsonwebtoken::Algorithm::HS384
    } else {
        jsonwebtoken::Algorithm::HS256
    };
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let message = format!("{}.{}", b64.encode(head), b64.encode(payload));
    let key = jsonwebtoken::EncodingKey::from_secret(JWT_SECRET);
    let signature = jsonwebtoken::crypto::sign(message.as_bytes(), &key, alg).ok()?;
    Some(format!("{message}.{signature}"))
}

/// `FileConfig::parse` then `validate`, as `run` and `check-config` do. A `token_file` is
/// dropped first: the fuzzer must not make the target read arbitrary files.
pub fn config_toml(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(mut file) = crate::config::FileConfig::parse(text) else {
        return;
    };
    file.consul.token_file = None;
    if let Ok(config) = file.validate() {
        let _ = AuthSettings::from_config(&config.file.auth);
        // Agents: at least one, each a base URL, none twice, the first one preferred.
        let agents = &config.consul_addresses;
        assert!(!agents.is_empty());
        assert_eq!(agents[0], config.consul_address);
        for (i, a) in agents.iter().enumerate() {
            assert!(a.starts_with("http://") || a.starts_with("https://"), "{a}");
            assert!(!agents[..i].contains(a), "{a} twice");
        }
        if config.consul_max_stale.is_some() {
            assert_eq!(
                config.consul_consistency,
                crate::config::ConsulConsistency::Stale
            );
        }
    }
}

/// A `switchyard registry --wan NAME=URL` flag. What it accepts is a datacenter name of
/// `[a-z0-9-_]` and a plain `http://host:port` URL, in a normal form that parses back to
/// itself.
pub fn registry_wan_flag(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok((name, url)) = crate::devregistry::parse_wan_flag(text) else {
        return;
    };
    assert!(
        !name.is_empty()
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_'),
        "accepted datacenter name {name:?}"
    );
    assert!(url.starts_with("http://"), "accepted peer URL {url:?}");
    match crate::devregistry::parse_wan_flag(&format!("{name}={url}")) {
        Ok(again) => assert_eq!(again, (name, url), "the normal form is not stable"),
        Err(e) => panic!("the normal form {name}={url} is refused: {e}"),
    }
}

fn consul_client() -> Option<&'static ConsulClient> {
    static CLIENT: OnceLock<Option<ConsulClient>> = OnceLock::new();
    CLIENT
        .get_or_init(|| {
            // Never dialled: only the watches' decoders are used.
            ConsulClient::new(&ClientSettings::new(
                "http://127.0.0.1:8500",
                Duration::from_secs(1),
            ))
            .ok()
        })
        .as_ref()
}

/// One answer body through the decoders of the three watch kinds (health of a service,
/// `catalog/services`, a KV listing) and what consumes each: the upstream set, fabio tag
/// routes, and route documents.
pub fn consul_bodies(data: &[u8]) {
    let Some(client) = consul_client() else {
        panic!("the fuzz Consul client does not build");
    };
    let body = Some(Bytes::copy_from_slice(data));
    if let Ok(health) = HealthSource::new(client, "fuzz").decode(body.clone()) {
        let instances = health.serving;
        for i in &instances {
            let _ = i.authority();
        }
        let _ = UpstreamSet::build("fuzz", instances, &HashMap::new());
    }
    if let Ok(services) = CatalogServices::new(client).decode(body.clone()) {
        let (specs, _errors) = fabio::routes_from_tags(&services);
        let routes: Vec<Arc<Route>> = specs
            .into_iter()
            .filter_map(|(name, spec)| Route::compile(&name, spec).ok().map(Arc::new))
            .collect();
        let _ = RouteTable::build(routes);
    }
    if let Ok(pairs) = KvPrefix::new(client, "fuzz/").decode(body) {
        let mut docs = RouteDocs::new("fuzz/");
        let _ = docs.apply(&pairs);
        let _ = RouteTable::build(docs.routes());
    }
}

fn route_table() -> &'static RouteTable {
    static TABLE: OnceLock<RouteTable> = OnceLock::new();
    TABLE.get_or_init(|| {
        let docs = [
            (
                "api",
                r#"{"service":"a","path_prefix":"/api","strip_prefix":true}"#,
            ),
            (
                "api-v2-post",
                r#"{"service":"b","path_prefix":"/api/v2","methods":["POST"]}"#,
            ),
            (
                "public",
                r#"{"service":"c","path_prefix":"/public","host":"*.example.com"}"#,
            ),
            (
                "admin",
                r#"{"service":"d","path_prefix":"/admin","host":"admin.example.com"}"#,
            ),
            (
                "static",
                r#"{"service":"e","path_prefix":"/static/","rewrite_prefix":"/assets"}"#,
            ),
            (
                "tenant",
                r#"{"service":"f","path_prefix":"/t/a/b","headers":{"x-tenant":"a"}}"#,
            ),
            (
                "root",
                r#"{"service":"g","path_prefix":"/","host":"root.example.com"}"#,
            ),
        ];
        let routes = docs
            .iter()
            .filter_map(|(name, json)| {
                let spec = RouteSpec::from_json(json.as_bytes()).ok()?;
                Route::compile(name, spec).ok().map(Arc::new)
            })
            .collect();
        RouteTable::build(routes)
    })
}

/// The bytes as a request's `Content-Type` through the gRPC media-type parser, and (as
/// UTF-8, lossily) as the message of a gRPC answer. A value taken for gRPC is one
/// header-safe media type whose subtype is exactly gRPC's, followed by nothing, a `+codec`
/// or parameters; the answer's media type reads back as the same protocol. An encoded
/// message holds only what `grpc-message` allows, `%` only before two upper-case hex
/// digits, and decodes back to the message.
pub fn grpc_fields(data: &[u8]) {
    use crate::proxy::grpc::{self, GrpcProtocol};
    if let Some(protocol) = GrpcProtocol::from_content_type(data) {
        let own = protocol.content_type();
        let base = own.as_bytes();
        assert!(
            data.len() >= base.len() && data[..base.len()].eq_ignore_ascii_case(base),
            "{protocol:?} from a value not starting with {own:?}"
        );
        assert!(
            matches!(
                data.get(base.len()),
                None | Some(b'+' | b';' | b' ' | b'\t')
            ),
            "the subtype runs on past {own:?}"
        );
        assert!(
            data.iter()
                .all(|&b| b == b'\t' || (0x20..0x7f).contains(&b)),
            "a gRPC content type with bytes a header value should not hold"
        );
        assert_eq!(GrpcProtocol::from_content_type(base), Some(protocol));
    }
    let message = String::from_utf8_lossy(data);
    let value = grpc::message_value(&message);
    let encoded = value.as_bytes();
    assert!(
        encoded.iter().all(|&b| (0x20..0x7f).contains(&b)),
        "grpc-message outside space and visible ASCII"
    );
    for (i, _) in encoded.iter().enumerate().filter(|(_, &b)| b == b'%') {
        let hex = encoded.get(i + 1..i + 3).unwrap_or_default();
        assert!(
            hex.len() == 2
                && hex
                    .iter()
                    .all(|b| b.is_ascii_digit() || (b'A'..=b'F').contains(b)),
            "a bare % in grpc-message"
        );
    }
    let decoded: Vec<u8> = percent_encoding::percent_decode(encoded).collect();
    assert_eq!(
        decoded,
        message.as_bytes(),
        "grpc-message does not decode back"
    );
}

/// A request path (and, after the first newline, a `Host`) through `proxy::path::normalize`
/// and the route table. A normalised path starts with `/`, normalises to itself and holds
/// no empty, `.` or `..` segment and no escaped unreserved character; a route found for it
/// has a prefix of it on a segment boundary, and its upstream path starts with `/`.
pub fn path_routing(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let (path, host) = text.split_once('\n').unwrap_or((&text, "api.example.com"));
    let Ok(normal) = crate::proxy::path::normalize(path) else {
        return;
    };
    let normal: &str = &normal;
    check_normal(path, normal);
    let table = route_table();
    let mut headers = HeaderMap::new();
    headers.insert("x-tenant", HeaderValue::from_static("a"));
    for (method, headers) in [(Method::GET, HeaderMap::new()), (Method::POST, headers)] {
        for host in [host, "api.example.com", "admin.example.com", ""] {
            let Some(route) = table
                .lookup(host, normal, &method, &headers)
                .and_then(|id| table.get(id))
            else {
                continue;
            };
            let prefix = route.path_prefix.as_str();
            assert!(
                prefix == "/"
                    || normal == prefix
                    || normal
                        .strip_prefix(prefix)
                        .is_some_and(|r| r.starts_with('/')),
                "route {} (prefix {prefix}) matched {normal:?}",
                route.name
            );
            let upstream = route.upstream_path(normal);
            assert!(
                upstream.starts_with('/'),
                "route {} sends {normal:?} upstream as {upstream:?}",
                route.name
            );
        }
    }
}

fn check_normal(input: &str, normal: &str) {
    let fail = |what: &str| panic!("normalize({input:?}) = {normal:?}: {what}");
    if !normal.starts_with('/') {
        fail("does not start with '/'");
    }
    for bad in ["/../", "/./", "//"] {
        if normal.contains(bad) {
            fail(bad);
        }
    }
    if normal.split('/').any(|s| s == ".." || s == ".") {
        fail("dot segment");
    }
    let bytes = normal.as_bytes();
    for (i, _) in normal.match_indices('%') {
        let hex = match bytes.get(i + 1..i + 3) {
            Some(&[h, l]) if h.is_ascii_hexdigit() && l.is_ascii_hexdigit() => [h, l],
            _ => fail("malformed escape"),
        };
        if hex.iter().any(u8::is_ascii_lowercase) {
            fail("lower-case escape");
        }
        let b = hex_digit(hex[0]) << 4 | hex_digit(hex[1]);
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            fail("escaped unreserved character");
        }
    }
    match crate::proxy::path::normalize(normal) {
        Ok(again) if again == normal => {}
        Ok(again) => panic!("normalize is not idempotent: {input:?} -> {normal:?} -> {again:?}"),
        Err(e) => panic!("normalize({input:?}) = {normal:?}, which it refuses: {e}"),
    }
}

fn hex_digit(b: u8) -> u8 {
    (b as char).to_digit(16).map_or(0, |d| d as u8)
}

/// The bytes as a request's trace context: lines starting `s:` are `tracestate` fields,
/// other lines `traceparent` fields (lines that are no header value are left out), each
/// line also straight through `parse_traceparent`. A value read as valid is at least 55
/// bytes of lower-case hex and dashes where the spec puts them, with non-zero ids, a
/// version other than `ff`, and exactly 55 bytes for version `00`; the context continues
/// the trace of exactly one valid `traceparent` and no other, never has a zero id, keeps
/// `tracestate` only with a continued trace and within its size, and the `traceparent`
/// it sends reads back as its own trace, span and flag.
pub fn trace_context(data: &[u8]) {
    use crate::trace_context::{
        parse_traceparent, tracestate_is_valid, Sampler, TraceContext, TraceState, TRACEPARENT,
        TRACESTATE, TRACESTATE_MAX_BYTES,
    };
    let mut headers = HeaderMap::new();
    let mut parents = 0;
    let mut states: Vec<&[u8]> = Vec::new();
    for line in data.split(|&b| b == b'\n') {
        let (name, value) = match line.strip_prefix(b"s:") {
            Some(state) => (&TRACESTATE, state),
            None => (&TRACEPARENT, line),
        };
        if let Some(p) = parse_traceparent(value) {
            let text = std::str::from_utf8(value).expect("a valid traceparent is ASCII");
            assert!(text.len() >= 55, "{text:?} is short");
            assert!(&text[..2] != "ff", "version ff taken");
            assert!(&text[..2] != "00" || text.len() == 55, "long version 00");
            for (i, c) in text[..55].bytes().enumerate() {
                let dash = matches!(i, 2 | 35 | 52);
                assert!(
                    if dash {
                        c == b'-'
                    } else {
                        matches!(c, b'0'..=b'9' | b'a'..=b'f')
                    },
                    "{text:?}: byte {i}"
                );
            }
            assert!(text.len() == 55 || text.as_bytes()[55] == b'-');
            assert!(p.trace_id != 0 && p.parent_id != 0);
            assert_eq!(
                format!("{:032x}-{:016x}", p.trace_id, p.parent_id),
                &text[3..52]
            );
        }
        let Ok(value) = HeaderValue::from_bytes(value) else {
            continue;
        };
        if name == TRACEPARENT {
            parents += 1;
        } else {
            states.push(line.strip_prefix(b"s:").unwrap_or_default());
        }
        headers.append(name, value);
    }
    if tracestate_is_valid(states.iter().copied()) {
        let total: usize = states.iter().map(|s| s.len()).sum();
        assert!(total <= TRACESTATE_MAX_BYTES);
    }
    for ratio in [0.0, 0.5, 1.0] {
        let t = TraceContext::for_request(&headers, &Sampler::new(ratio));
        assert!(t.trace_id != 0 && t.span_id != 0);
        let one = headers.get(&TRACEPARENT).filter(|_| parents == 1);
        match one.and_then(|v| parse_traceparent(v.as_bytes())) {
            Some(p) => {
                assert_eq!((t.trace_id, t.parent_id), (p.trace_id, Some(p.parent_id)));
                assert_eq!(t.sampled, p.sampled);
            }
            None => {
                assert_eq!(t.parent_id, None, "continued without one valid traceparent");
                assert_ne!(t.tracestate, TraceState::Kept);
            }
        }
        if states.is_empty() {
            assert_eq!(t.tracestate, TraceState::Absent);
        }
        let sent = t.traceparent();
        let back = parse_traceparent(&sent).expect("the gateway's traceparent is valid");
        assert_eq!(
            (back.trace_id, back.parent_id, back.sampled),
            (t.trace_id, t.span_id, t.sampled)
        );
        assert_eq!(&sent[..3], b"00-");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The targets must reach the code behind the parsers, not stop at a setup error.
    #[test]
    fn the_fixed_parts_of_the_targets_build() {
        assert!(consul_client().is_some());
        assert_eq!(route_table().len(), 7);
        let target = jwt_target().expect("provider");
        let claims =
            format!(r#"{{"iss":"{JWT_ISSUER}","aud":"api","sub":"alice","exp":4102444800}}"#);
        let token = signed_token(br#"{"alg":"HS256","kid":"k1"}"#, claims.as_bytes()).unwrap();
        let mut headers = HeaderMap::new();
        let bearer = HeaderValue::from_str(&format!("Bearer {token}")).unwrap();
        headers.insert(http::header::AUTHORIZATION, bearer);
        let admitted = target
            .auth
            .admit(
                &target.requirement,
                FUZZ_CLIENT,
                &Uri::from_static("/r"),
                &mut headers,
            )
            .now_or_never()
            .expect("no JWKS to wait for");
        let identity = admitted.expect("admitted").expect("an identity");
        assert_eq!(identity.subject.as_deref(), Some("alice"));
    }
}
