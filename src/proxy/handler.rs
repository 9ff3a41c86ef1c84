//! One request, phase by phase: normalise → route → edge admission (IP rules, CORS
//! preflight, limits) → auth → rate limit → upstream assertion → forward with retries →
//! response. Each phase either hands the request on or ends it with a response; every
//! response, the gateway's own included, gets `X-Request-Id`, `Via` and the route's CORS
//! and rate-limit headers, and is logged once when its body is done.

use std::borrow::Cow;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::request::Parts;
use http::{Method, Response, StatusCode, Uri};
use http_body::Body;
use http_body_util::BodyExt;
use tokio::io::AsyncWriteExt;

use super::body::{
    BodyError, BodyFault, ClientBody, ClientFault, Finish, LimitedBody, RequestBody, UpstreamBody,
};
use super::error::{self, ErrorFormat, ProxyError};
use super::headers::{self, Forwarded, X_REQUEST_ID};
use super::mirror::MirrorCopy;
use super::path;
use super::retry::Retries;
use super::upstream::{ClientKey, UpstreamError};
use super::Gateway;
use crate::access_log::{AccessLine, AccessLog};
use crate::assertion::Caller;
use crate::auth::AuthRejection;
use crate::balance::breaker::{Admitted, Overflow, ServiceLoad};
use crate::balance::mirror::MirrorTarget;
use crate::balance::{self, outlier, Tried};
use crate::discovery::{ms_at, now_ms, EndpointStats, UpstreamSet};
use crate::http1::client::RequestHead;
use crate::http1::fields::{self, NameLengths};
use crate::http1::io::OnUpgrade;
use crate::otel_export::{AttrValue, FinishedSpan, SpanSink};
use crate::policy::{cors, Admission, PeerIp, PolicyReply};
use crate::rewrite::{Redirect, RuleVars};
use crate::routing::spec::{EscapedSlashes, UpstreamProtocol};
use crate::routing::Route;
use crate::trace_context::{TraceContext, TraceState, TRACEPARENT, TRACESTATE};

/// Bodies up to this size are buffered when the request may be retried, so a retry can
/// replay them; larger ones stream and get a single try.
const REPLAYABLE_BODY: u64 = 64 * 1024;

/// Where a request came in.
#[derive(Debug, Clone)]
pub struct ClientConn {
    pub peer: SocketAddr,
    pub tls: bool,
    pub peer_ip: PeerIp,
}

impl ClientConn {
    pub fn new(peer: SocketAddr, tls: bool) -> ClientConn {
        ClientConn {
            peer,
            tls,
            peer_ip: PeerIp::new(peer.ip()),
        }
    }
}

/// What the request phases learned, for the response phase and the access log.
struct RequestRecord {
    start: Instant,
    method: Method,
    version: http::Version,
    tls: bool,
    path: NormalPath,
    request_id: HeaderValue,
    trace: TraceContext,
    client_ip: IpAddr,
    route: Option<Arc<Route>>,
    admission: Option<Admission>,
    consumer: Option<String>,
    /// The instance of the last try: its set and index there.
    instance: Option<(Arc<UpstreamSet>, usize)>,
    tries: u32,
    /// The status of the last upstream answer (0: none came).
    upstream_status: u16,
    /// What edge auth made of the request: `not_reached`, `open` (the route asks for no
    /// credential), `passed` or `refused` (with the reason).
    auth: &'static str,
    auth_reason: &'static str,
    /// The host asked for, kept when the route's answer rules may name it or the request's
    /// span is recorded.
    host: Option<Box<str>>,
    /// The instance that answered, counted in flight until the response is done.
    in_flight: Option<InFlight>,
    /// The circuit-breaker slot the request holds until its response is done.
    breaker_slot: Option<Admitted>,
    /// The gateway answered with an error of its own (not the upstream's status).
    by_gateway: bool,
}

/// The request's path as routed: the client's own when it was already normal (kept in
/// the URI it came in, whose clone shares its bytes), else the normalised copy.
enum NormalPath {
    AsSent(Uri),
    Normalised(String),
}

impl NormalPath {
    fn as_str(&self) -> &str {
        match self {
            NormalPath::AsSent(uri) => uri.path(),
            NormalPath::Normalised(path) => path,
        }
    }
}

/// Whether the URI's path-and-query text starts with its path (an absolute-form URI with
/// an empty path, `http://host?q`, does not: `path()` reads `/` there).
fn starts_with_path(uri: &Uri) -> bool {
    uri.path_and_query()
        .is_some_and(|pq| pq.as_str().starts_with('/'))
}

/// The URI a rewritten or normalised path goes upstream with, the client's query kept.
fn upstream_uri(path: &str, query: Option<&str>) -> Result<Uri, ProxyError> {
    let mut text = String::with_capacity(path.len() + query.map_or(0, |q| q.len() + 1));
    text.push_str(path);
    if let Some(q) = query {
        text.push('?');
        text.push_str(q);
    }
    // From the `String`, so the URI keeps its buffer instead of copying it.
    Uri::try_from(text).map_err(|e| ProxyError::Upstream(e.to_string()))
}

/// A response and the request id the gateway stamps on it. The server that sends it adds
/// `X-Request-Id` and `Via`: the HTTP/1.1 server writes them straight into the head.
pub struct GatewayAnswer {
    pub response: Response<ClientBody>,
    pub request_id: HeaderValue,
    /// The request was malformed: the connection it came on ends with this answer, as
    /// nginx does after a 400 (what follows on it may not be framed as the client meant).
    pub close: bool,
}

impl GatewayAnswer {
    /// The response with the gateway's headers in its map (replacing an upstream's
    /// `X-Request-Id`, appended to its `Via`).
    pub fn into_response(self) -> Response<ClientBody> {
        let mut response = self.response;
        let h = response.headers_mut();
        // Unique per answer: kept out of the HPACK tables (an HTTP/2-only flag), where it
        // would only evict the fields that repeat.
        let mut request_id = self.request_id;
        request_id.set_sensitive(true);
        h.insert(&X_REQUEST_ID, request_id);
        headers::add_via(h);
        response
    }
}

/// A request stopped before or at the upstream: a ready response or an error to render.
enum Stopped {
    Reply(Box<Response<ClientBody>>),
    Error(ProxyError),
}

impl From<ProxyError> for Stopped {
    fn from(e: ProxyError) -> Stopped {
        Stopped::Error(e)
    }
}

// Out of line and cold: refusals are rare, and the request path's code stays small.
impl Stopped {
    /// Edge policy answered: a CORS preflight (204 with its headers), or a refusal.
    #[cold]
    #[inline(never)]
    fn refused(reply: PolicyReply) -> Stopped {
        if let PolicyReply::Preflight(_) = &reply {
            let mut response = Response::new(ClientBody::empty());
            *response.status_mut() = reply.status();
            reply.add_headers(response.headers_mut());
            return Stopped::Reply(Box::new(response));
        }
        Stopped::Error(ProxyError::Policy(Box::new(reply)))
    }

    #[cold]
    #[inline(never)]
    fn rejected(rejection: AuthRejection) -> Stopped {
        Stopped::Error(ProxyError::Auth(Box::new(rejection)))
    }

    /// The response for a request that stopped here.
    #[cold]
    #[inline(never)]
    fn into_response(self, request_id: &HeaderValue, format: ErrorFormat) -> Response<ClientBody> {
        match self {
            Stopped::Reply(r) => *r,
            Stopped::Error(e) => {
                if e.status().is_server_error() {
                    tracing::debug!(?request_id, error = %e, "request failed");
                }
                e.to_response(request_id, format)
            }
        }
    }
}

impl Gateway {
    /// Serves one request; never fails (errors become responses). Takes the request in
    /// parts: a `Request` taken apart here would be held twice in the future.
    /// `names` tells which optional fields the request cannot have (no lookup for them).
    pub async fn handle(
        &self,
        mut parts: Parts,
        names: NameLengths,
        body: RequestBody,
        conn: &ClientConn,
    ) -> GatewayAnswer {
        let request_id = if names.may_have(&X_REQUEST_ID) {
            headers::request_id(&parts.headers)
        } else {
            headers::new_request_id()
        };
        let trace = if names.may_have(&TRACEPARENT) || names.may_have(&TRACESTATE) {
            TraceContext::for_request(&parts.headers, &self.tracing.sampler)
        } else {
            TraceContext::new_trace(&self.tracing.sampler)
        };
        let mut ex = RequestRecord {
            start: Instant::now(),
            method: parts.method.clone(),
            version: parts.version,
            tls: conn.tls,
            path: NormalPath::Normalised(String::new()),
            request_id,
            trace,
            client_ip: self.edge.client_ip(conn.peer_ip.ip(), &parts.headers),
            route: None,
            admission: None,
            consumer: None,
            instance: None,
            tries: 0,
            upstream_status: 0,
            auth: "not_reached",
            auth_reason: "",
            host: None,
            in_flight: None,
            breaker_slot: None,
            by_gateway: false,
        };
        // From the headers as the client sent them, before any phase changes them.
        let errors = if names.may_have(&header::CONTENT_TYPE) {
            ErrorFormat::for_request(&parts.headers)
        } else {
            ErrorFormat::Json
        };
        let mut close = false;
        let response = match self.process(&mut ex, &mut parts, body, conn).await {
            Ok(r) => r,
            Err(stop) => {
                close = matches!(&stop, Stopped::Error(e) if e.is_malformed_request());
                ex.by_gateway = matches!(&stop, Stopped::Error(_));
                stop.into_response(&ex.request_id, errors)
            }
        };
        let mut answer = self.respond(ex, response);
        answer.close = close;
        answer
    }

    async fn process(
        &self,
        ex: &mut RequestRecord,
        parts: &mut Parts,
        body: RequestBody,
        conn: &ClientConn,
    ) -> Result<Response<ClientBody>, Stopped> {
        check_authority(parts)?;
        headers::scrub_request(&mut parts.headers, self.settings.underscores_in_headers);
        if ex.trace.tracestate == TraceState::Dropped {
            parts.headers.remove(&TRACESTATE);
        }
        ex.path = match path::normalize(parts.uri.path()).map_err(ProxyError::from)? {
            Cow::Borrowed(_) => NormalPath::AsSent(parts.uri.clone()),
            Cow::Owned(normalised) => NormalPath::Normalised(normalised),
        };
        let host = request_host(parts).ok_or(ProxyError::BadHost)?;
        let snapshot = self.state.load();
        let routing_method = cors::routing_method(&parts.method, &parts.headers);
        let mut found = snapshot.lookup(&host, ex.path.as_str(), &routing_method, &parts.headers);
        if path::has_escaped_slash(ex.path.as_str()) {
            // The route that serves must be one that said how it wants such paths, and
            // the path it was matched on is the path that goes upstream.
            let keep = found
                .as_ref()
                .is_some_and(|f| f.route.spec.escaped_slashes == EscapedSlashes::Keep);
            if !keep {
                let decoded =
                    path::decode_escaped_slashes(ex.path.as_str()).map_err(ProxyError::from)?;
                found = snapshot
                    .lookup(&host, &decoded, &routing_method, &parts.headers)
                    .filter(|f| f.route.spec.escaped_slashes == EscapedSlashes::Decode);
                if found.is_none() {
                    return Err(ProxyError::EscapedSlash.into());
                }
                ex.path = NormalPath::Normalised(decoded);
            }
        }
        let found = found.ok_or(ProxyError::NoRoute)?;
        let route = found.route.clone();
        let mut set = found.upstreams.clone();
        let split = found.split.cloned();
        let mirror = found.mirror.cloned();
        let loads = route
            .spec
            .circuit_breaker
            .is_some()
            .then(|| snapshot.loads.clone());
        drop(snapshot);
        ex.route = Some(route.clone());
        if route.response_headers.is_some() || self.records(&ex.trace) {
            ex.host = Some(host.as_str().into());
        }

        let admission = self
            .edge
            .admit(
                &route.policy,
                ex.client_ip,
                &parts.method,
                &parts.uri,
                &parts.headers,
            )
            .map_err(Stopped::refused)?;
        ex.admission = Some(admission);

        let limit = route.policy.limits.body_limit(self.settings.max_body_bytes);
        // The declared length, as the server read it from the head.
        if body.size_hint().exact().is_some_and(|n| n > limit) {
            return Err(ProxyError::BodyTooLarge(limit).into());
        }

        // The HTTP/1.1 server marks the requests that ask for a protocol switch.
        let upgrade = parts.extensions.get::<OnUpgrade>().is_some();
        fields::strip_hop_by_hop(&mut parts.headers, upgrade);

        let identity = match self
            .auth
            .admit(&route.auth, ex.client_ip, &parts.uri, &mut parts.headers)
            .await
        {
            Ok(identity) => identity,
            Err(rejection) => {
                ex.auth = "refused";
                ex.auth_reason = rejection.error.reason();
                return Err(Stopped::rejected(rejection));
            }
        };
        ex.auth = if identity.is_some() { "passed" } else { "open" };
        ex.consumer = identity
            .as_ref()
            .and_then(|i| i.subject.clone().or_else(|| i.consumer.clone()));

        if let Some(admission) = ex.admission.as_mut() {
            self.edge
                .limit_rate(
                    &route.policy,
                    admission,
                    ex.consumer.as_deref(),
                    &parts.headers,
                )
                .await
                .map_err(Stopped::refused)?;
        }
        let caller = identity.as_deref().map(Caller::from).unwrap_or_default();
        let request_id = ex.request_id.to_str().unwrap_or_default();
        self.edge
            .assert_upstream(&route.policy, caller, request_id, &mut parts.headers)
            .map_err(Stopped::refused)?;

        if let Some(redirect) = &route.redirect {
            let path = route.upstream_path(ex.path.as_str());
            return Ok(redirect_response(redirect, &path, parts.uri.query())?);
        }
        if let Some(rules) = &route.request_headers {
            let vars = RuleVars {
                client_ip: ex.client_ip,
                route: &route.name,
                request_id,
                host: &host,
            };
            rules.apply(&mut parts.headers, &vars, &|name| self.auth.writes(name));
        }
        if let Some(upstream_host) = &route.host_rewrite {
            parts.headers.insert(header::HOST, upstream_host.clone());
        }

        let forwarded = self.forwarded(ex, parts, conn, &host);
        // A header the gateway sets is hashed as it goes upstream.
        let hash = route.hash_on.as_ref().and_then(|h| {
            match h.header().and_then(|name| forwarded.get(name)) {
                Some(sent) => Some(balance::hash_bytes(sent)),
                None => h.key(&parts.headers, ex.client_ip),
            }
        });
        if let Some(chosen) = split.as_ref().and_then(|s| s.choose(hash)) {
            set = chosen.clone();
        }
        let uri = match (&ex.path, route.upstream_path(ex.path.as_str())) {
            // The client's path, query and all, goes upstream unchanged: no new URI to build.
            (NormalPath::AsSent(sent), Cow::Borrowed(_)) if starts_with_path(sent) => sent.clone(),
            (_, upstream_path) => upstream_uri(&upstream_path, parts.uri.query())?,
        };
        let load = loads.and_then(|l| l.get(&set.service).cloned());
        let target = Upstream {
            route: &route,
            set: &set,
            uri,
            forwarded: &forwarded,
            limit,
            upgrade,
            hash,
            load,
            mirror,
        };
        self.forward(ex, parts, body, target).await
    }

    /// The headers the gateway sets on the forwarded request.
    fn forwarded<'h>(
        &self,
        ex: &RequestRecord,
        parts: &Parts,
        conn: &ClientConn,
        host: &'h str,
    ) -> Forwarded<'h> {
        Forwarded {
            xff: self
                .edge
                .trusted_proxies()
                .forwarded_for(&conn.peer_ip, &parts.headers),
            proto: if conn.tls { "https" } else { "http" },
            host,
            request_id: ex.request_id.clone(),
            traceparent: ex.trace.traceparent(),
        }
    }

    async fn forward(
        &self,
        ex: &mut RequestRecord,
        parts: &mut Parts,
        body: RequestBody,
        target: Upstream<'_>,
    ) -> Result<Response<ClientBody>, Stopped> {
        let Upstream {
            route,
            set,
            uri,
            forwarded,
            limit,
            upgrade,
            hash,
            load,
            mirror,
        } = target;
        let spec = &route.spec;
        let mut retries = Retries::new(&spec.retry, &parts.method, &self.budget, &route.name);
        let (mut source, body_fault) =
            BodySource::new(body, limit, retries.may_retry() && !upgrade).await?;
        let deadline = ex.start + Duration::from_millis(spec.timeouts.total_ms);
        if let (Some(limits), Some(load)) = (&spec.circuit_breaker, load) {
            let until = tokio::time::Instant::from_std(deadline);
            match load.admit(limits, until).await {
                Ok(slot) => ex.breaker_slot = Some(slot),
                Err(why) => return Err(circuit_open(set, why).into()),
            }
        }
        let client_upgrade = upgrade
            .then(|| parts.extensions.remove::<OnUpgrade>())
            .flatten();
        let http2 = spec.upstream_protocol == UpstreamProtocol::Http2;
        if let Some(target) = mirror.filter(|_| !upgrade) {
            self.mirrors.send(&target, || {
                let body = match &source {
                    BodySource::Empty => None,
                    BodySource::Buffered(b) => Some(b.clone()),
                    BodySource::Stream(_) => return None,
                };
                Some(MirrorCopy {
                    method: parts.method.clone(),
                    uri: uri.clone(),
                    headers: parts.headers.clone(),
                    body,
                    xff: forwarded.xff.clone(),
                    proto: forwarded.proto,
                    host: forwarded.host.to_string(),
                    request_id: forwarded.request_id.clone(),
                    traceparent: forwarded.traceparent,
                    key: ClientKey {
                        http2,
                        connect_ms: spec.timeouts.connect_ms,
                        tls_service: route
                            .policy
                            .upstream_tls
                            .then(|| target.set.service.clone()),
                    },
                    timeout: Duration::from_millis(spec.timeouts.per_try_ms),
                })
            });
        }
        let client_key = ClientKey {
            http2,
            connect_ms: spec.timeouts.connect_ms,
            tls_service: route.policy.upstream_tls.then(|| spec.service.clone()),
        };
        let per_try = Duration::from_millis(spec.timeouts.per_try_ms);
        let mut tried = Tried::default();
        let mut last = None;

        while retries.start_try(source.replayable()) {
            let started = Instant::now();
            let now = ms_at(started);
            let Some(index) = balance::pick(set, spec.lb, hash, tried, &spec.outlier, now) else {
                return Err(ProxyError::NoInstance(set.service.clone()).into());
            };
            tried.insert(index);
            let endpoint = &set.endpoints[index];
            ex.tries += 1;
            ex.instance = Some((set.clone(), index));
            let head = RequestHead {
                method: &parts.method,
                uri: &uri,
                headers: &parts.headers,
                upgrade,
                extra: None,
            };

            let guard = InFlight::enter(&endpoint.stats);
            let stats = &endpoint.stats;
            let remaining = deadline.saturating_duration_since(started);
            let mut going = Some(source.take());
            let send = self
                .clients
                .send(&client_key, endpoint, head, forwarded, &mut going);
            let try_deadline = tokio::time::Instant::from_std(started + per_try.min(remaining));
            let outcome = tokio::time::timeout_at(try_deadline, send).await;
            // A body that never left (no connection could be made) can go elsewhere.
            let unsent = going.take().map(|body| source.put_back(body)).is_some();
            let failure = match outcome {
                Ok(Ok(mut response)) => {
                    let status = response.status();
                    ex.upstream_status = status.as_u16();
                    let bad = matches!(status.as_u16(), 502..=504);
                    if bad || retries.names_status(status) {
                        outlier::record_failure(set, index, &spec.outlier, now_ms());
                    } else {
                        outlier::record_success(stats, &spec.outlier, now_ms);
                    }
                    if retries.retries_status(status, source.replayable()) {
                        last = Some(ProxyError::Upstream(format!("upstream answered {status}")));
                        continue;
                    }
                    ex.in_flight = Some(guard);
                    if status == StatusCode::SWITCHING_PROTOCOLS {
                        return Ok(splice_upgrade(client_upgrade, &mut response, ex));
                    }
                    return Ok(response);
                }
                Ok(Err(e)) => {
                    // The client's own fault is answered for the client and not held
                    // against the instance (a few bad uploads must not eject it).
                    if let Some(fault) = body_fault.fault() {
                        return Err(client_fault(fault, limit).into());
                    }
                    let (error, connect) = try_failed(set, index, &e);
                    (error, retries.retries_failure(connect))
                }
                Err(_) => {
                    if let Some(fault) = body_fault.fault() {
                        return Err(client_fault(fault, limit).into());
                    }
                    // Still waiting for the client's body: the instance is not to blame.
                    if !source.replayable() && !body_fault.is_complete() {
                        return Err(ProxyError::Timeout.into());
                    }
                    (try_timed_out(set), retries.retries_failure(unsent))
                }
            };
            drop(guard);
            outlier::record_failure(set, index, &spec.outlier, now_ms());
            let (error, retryable) = failure;
            last = Some(error);
            if !retryable || Instant::now() >= deadline {
                break;
            }
        }
        if Instant::now() >= deadline {
            return Err(ProxyError::Timeout.into());
        }
        Err(last
            .unwrap_or_else(|| ProxyError::NoInstance(set.service.clone()))
            .into())
    }

    /// Final touches on every response, and the bookkeeping when its body is done.
    fn respond(&self, ex: RequestRecord, mut response: Response<ClientBody>) -> GatewayAnswer {
        let upgraded = response.status() == StatusCode::SWITCHING_PROTOCOLS;
        let h = response.headers_mut();
        fields::strip_hop_by_hop(h, upgraded);
        if let Some(route) = &ex.route {
            if let Some(rules) = &route.response_headers {
                let vars = RuleVars {
                    client_ip: ex.client_ip,
                    route: &route.name,
                    request_id: ex.request_id.to_str().unwrap_or_default(),
                    host: ex.host.as_deref().unwrap_or_default(),
                };
                rules.apply(h, &vars, &|_| false);
            }
        }
        if let (Some(route), Some(admission)) = (&ex.route, &ex.admission) {
            self.edge.decorate(&route.policy, admission, h);
        }
        let request_id = ex.request_id.clone();
        let done = Done {
            status: error::recorded_status(&response).as_u16(),
            access_log: self.access_log.clone(),
            spans: (self.tracing.spans.as_ref())
                .filter(|_| ex.trace.sampled)
                .cloned(),
            ex,
        };
        response.body_mut().on_finish(Box::new(done));
        GatewayAnswer {
            response,
            request_id,
            close: false,
        }
    }
}

/// Where and how a request goes upstream, as the phases before forwarding decided.
struct Upstream<'a> {
    route: &'a Arc<Route>,
    set: &'a Arc<UpstreamSet>,
    /// The URI it goes with (origin form, rewritten as the route says).
    uri: Uri,
    forwarded: &'a Forwarded<'a>,
    /// The body limit of the route.
    limit: u64,
    /// A WebSocket upgrade.
    upgrade: bool,
    /// The client's hash for `consistent_hash` (and a sticky split).
    hash: Option<u64>,
    /// The service's in-flight count, when the route has a circuit breaker.
    load: Option<Arc<ServiceLoad>>,
    /// Where copies of the request go, when the route mirrors.
    mirror: Option<Arc<MirrorTarget>>,
}

/// One request in flight on an instance (for `least_request`), however the request ends:
/// answered, failed, or abandoned by a client that went away mid-try.
struct InFlight(Arc<EndpointStats>);

impl InFlight {
    fn enter(stats: &Arc<EndpointStats>) -> InFlight {
        stats.in_flight.fetch_add(1, Ordering::Relaxed);
        stats.requests.fetch_add(1, Ordering::Relaxed);
        InFlight(stats.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The request's bookkeeping, run when its response body is done.
struct Done {
    ex: RequestRecord,
    status: u16,
    access_log: Option<Arc<AccessLog>>,
    /// Where the request's span goes, when it is sampled and spans are exported.
    spans: Option<SpanSink>,
}

impl Finish for Done {
    fn finish(&mut self, bytes: u64, complete: bool) {
        self.ex.in_flight = None;
        self.ex.breaker_slot = None;
        let ex = &self.ex;
        let elapsed = ex.start.elapsed();
        let route = ex.route.as_ref().map_or("", |r| r.name.as_str());
        let service = match (&ex.instance, &ex.route) {
            (Some((set, _)), _) => set.service.as_str(),
            (None, Some(r)) => r.service().unwrap_or(""),
            (None, None) => "",
        };
        match &ex.route {
            Some(r) => r.metrics.record(self.status, elapsed, ex.by_gateway),
            None => metrics::counter!(crate::metrics::REQUESTS,
                "route" => "", "status" => status_class(self.status), "service" => "")
            .increment(1),
        }
        if let Some(log) = &self.access_log {
            log.write(&AccessLine {
                request_id: ex.request_id.as_bytes(),
                trace_id: ex.trace.trace_id_hex().0,
                method: ex.method.as_str(),
                path: ex.path.as_str(),
                status: self.status,
                route,
                service,
                upstream: ex
                    .instance
                    .as_ref()
                    .map_or("", |(set, i)| set.endpoints[*i].instance.id.as_str()),
                tries: ex.tries,
                bytes,
                complete,
                duration: elapsed,
                client_ip: ex.client_ip,
                consumer: ex.consumer.as_deref().unwrap_or(""),
            });
        }
        if let Some(sink) = self.spans.take() {
            sink.send(finished_span(ex, service, self.status, bytes, elapsed));
        }
    }
}

/// The request's server span, named `{method} {route}` (the method alone without a
/// route), with OpenTelemetry's HTTP attribute names where they exist and the gateway's
/// own (`switchyard.*`) for the rest. Out of line: only sampled requests get here.
#[cold]
#[inline(never)]
fn finished_span(
    ex: &RequestRecord,
    service: &str,
    status: u16,
    bytes: u64,
    elapsed: Duration,
) -> FinishedSpan {
    let end = SystemTime::now();
    let start = end.checked_sub(elapsed).unwrap_or(end);
    let name = match &ex.route {
        Some(route) => format!("{} {}", ex.method, route.name),
        None => ex.method.to_string(),
    };
    let text = |s: &str| AttrValue::from(s.to_string());
    let mut a: Vec<(&'static str, AttrValue)> = Vec::with_capacity(20);
    a.push(("http.request.method", text(ex.method.as_str())));
    a.push(("url.path", text(ex.path.as_str())));
    a.push(("url.scheme", if ex.tls { "https" } else { "http" }.into()));
    let version = match ex.version {
        http::Version::HTTP_2 => "2",
        http::Version::HTTP_10 => "1.0",
        _ => "1.1",
    };
    a.push(("network.protocol.version", version.into()));
    if let Some(host) = ex.host.as_deref().filter(|h| !h.is_empty()) {
        a.push(("server.address", text(host)));
    }
    a.push(("client.address", ex.client_ip.to_string().into()));
    a.push(("http.response.status_code", i64::from(status).into()));
    if status >= 500 {
        a.push(("error.type", status.to_string().into()));
    }
    a.push(("http.response.body.size", (bytes as i64).into()));
    if let Some(route) = &ex.route {
        a.push(("http.route", text(&route.path_prefix)));
        a.push(("switchyard.route", text(&route.name)));
    }
    if !service.is_empty() {
        a.push(("switchyard.service", text(service)));
    }
    if let Some((set, i)) = &ex.instance {
        let endpoint = &set.endpoints[*i];
        a.push(("switchyard.upstream.instance", text(&endpoint.instance.id)));
        a.push((
            "switchyard.upstream.address",
            text(endpoint.authority.as_str()),
        ));
    }
    if ex.upstream_status != 0 {
        a.push((
            "switchyard.upstream.status_code",
            i64::from(ex.upstream_status).into(),
        ));
    }
    a.push(("switchyard.tries", i64::from(ex.tries).into()));
    a.push((
        "switchyard.retries",
        i64::from(ex.tries.saturating_sub(1)).into(),
    ));
    a.push(("switchyard.auth", ex.auth.into()));
    if !ex.auth_reason.is_empty() {
        a.push(("switchyard.auth.reason", ex.auth_reason.into()));
    }
    if let Some(consumer) = &ex.consumer {
        a.push(("enduser.id", text(consumer)));
    }
    a.push((
        "switchyard.request_id",
        text(ex.request_id.to_str().unwrap_or("")),
    ));
    FinishedSpan {
        trace_id: ex.trace.trace_id,
        span_id: ex.trace.span_id,
        parent_id: ex.trace.parent_id,
        name,
        start,
        end,
        attributes: a,
        error: status >= 500,
    }
}

/// Logs and counts a try that failed at the instance; the error, and whether the failure
/// was connecting. Out of line: the request path's code stays small.
#[cold]
#[inline(never)]
fn try_failed(set: &UpstreamSet, index: usize, e: &UpstreamError) -> (ProxyError, bool) {
    let connect = e.is_connect();
    let detail = error_chain(e);
    let instance = &set.endpoints[index].instance.id;
    tracing::debug!(%instance, error = %detail, connect, "upstream try failed");
    metrics::counter!(crate::metrics::UPSTREAM_ERRORS,
        "service" => set.service.clone(), "kind" => if connect { "connect" } else { "reset" })
    .increment(1);
    (ProxyError::Upstream(detail), connect)
}

/// Counts and logs a request the route's circuit breaker refused.
#[cold]
#[inline(never)]
fn circuit_open(set: &UpstreamSet, why: Overflow) -> ProxyError {
    metrics::counter!(crate::metrics::CIRCUIT_BREAKER_REFUSED,
        "service" => set.service.clone(), "reason" => why.reason())
    .increment(1);
    tracing::debug!(service = %set.service, reason = why.reason(), "circuit breaker refused a request");
    ProxyError::CircuitOpen {
        service: set.service.clone(),
        reason: why.reason(),
    }
}

#[cold]
#[inline(never)]
fn try_timed_out(set: &UpstreamSet) -> ProxyError {
    metrics::counter!(crate::metrics::UPSTREAM_ERRORS,
        "service" => set.service.clone(), "kind" => "timeout")
    .increment(1);
    ProxyError::Timeout
}

fn status_class(status: u16) -> &'static str {
    match status {
        400 => "400",
        404 => "404",
        _ if status < 500 => "4xx",
        _ => "5xx",
    }
}

/// The request body as the tries need it: replayable when small and retries are possible.
enum BodySource {
    Empty,
    Buffered(Bytes),
    Stream(Option<UpstreamBody>),
}

impl BodySource {
    /// What has arrived of the body already is read before anything goes upstream: a
    /// body whose framing is bad from the start is refused before the instance sees its
    /// head, and one that is all there goes with its length (and may be sent again).
    async fn new(
        mut body: RequestBody,
        limit: u64,
        may_retry: bool,
    ) -> Result<(BodySource, BodyFault), ProxyError> {
        if body.is_end_stream() {
            return Ok((BodySource::Empty, BodyFault::default()));
        }
        let small = body
            .size_hint()
            .exact()
            .is_some_and(|n| n <= REPLAYABLE_BODY.min(limit));
        if may_retry && small {
            let collected = http_body_util::Limited::new(body, limit as usize)
                .collect()
                .await
                .map_err(|e| match e.downcast_ref::<BodyError>() {
                    Some(e) => body_error(e, limit),
                    None => ProxyError::BodyTooLarge(limit),
                })?;
            return Ok((
                BodySource::Buffered(collected.to_bytes()),
                BodyFault::default(),
            ));
        }
        let mut early = bytes::BytesMut::new();
        while (early.len() as u64) < REPLAYABLE_BODY {
            let polled =
                std::future::poll_fn(|cx| Poll::Ready(Pin::new(&mut body).poll_frame(cx))).await;
            match polled {
                Poll::Pending => break,
                Poll::Ready(None) => {
                    return Ok((BodySource::Buffered(early.freeze()), BodyFault::default()))
                }
                Poll::Ready(Some(Err(e))) => return Err(body_error(&e, limit)),
                Poll::Ready(Some(Ok(frame))) => {
                    if let Some(data) = frame.data_ref() {
                        if early.len() as u64 + data.len() as u64 > limit {
                            return Err(ProxyError::BodyTooLarge(limit));
                        }
                        early.extend_from_slice(data);
                    }
                }
            }
        }
        let (body, fault) = LimitedBody::new(early.freeze(), body, limit);
        Ok((BodySource::Stream(Some(body)), fault))
    }

    /// Whether the body can be sent (again): always when buffered, and a stream only
    /// while none of it has been read.
    fn replayable(&self) -> bool {
        !matches!(self, BodySource::Stream(None))
    }

    fn take(&mut self) -> UpstreamBody {
        match self {
            BodySource::Empty => UpstreamBody::Empty,
            BodySource::Buffered(b) => UpstreamBody::Full(Some(b.clone())),
            BodySource::Stream(s) => s.take().unwrap_or(UpstreamBody::Empty),
        }
    }

    /// A streamed body back from a try that never sent it.
    fn put_back(&mut self, unsent: UpstreamBody) {
        if let BodySource::Stream(slot @ None) = self {
            *slot = Some(unsent);
        }
    }
}

/// The answer to a request body the client got wrong.
#[cold]
fn client_fault(fault: ClientFault, limit: u64) -> ProxyError {
    match fault {
        ClientFault::TooLarge => ProxyError::BodyTooLarge(limit),
        ClientFault::Idle => ProxyError::BodyTimeout,
        ClientFault::Broken => ProxyError::ClientBody("the request body is malformed".into()),
    }
}

#[cold]
fn body_error(e: &BodyError, limit: u64) -> ProxyError {
    match e {
        BodyError::TooLarge(_) => ProxyError::BodyTooLarge(limit),
        BodyError::ClientIdle => ProxyError::BodyTimeout,
        e => ProxyError::ClientBody(e.to_string()),
    }
}

/// A route's redirect, answered here.
#[cold]
fn redirect_response(
    redirect: &Redirect,
    path: &str,
    query: Option<&str>,
) -> Result<Response<ClientBody>, ProxyError> {
    let location = redirect
        .location(path, query)
        .ok_or(ProxyError::BadRequest("the path cannot be redirected"))?;
    let mut response = Response::new(ClientBody::empty());
    *response.status_mut() = redirect.status();
    response.headers_mut().insert(header::LOCATION, location);
    Ok(response)
}

/// Joins the client's and the upstream's upgraded connections and copies both ways until
/// either side closes; the client gets the upstream's `101`.
fn splice_upgrade(
    client: Option<OnUpgrade>,
    response: &mut Response<ClientBody>,
    ex: &RequestRecord,
) -> Response<ClientBody> {
    let upstream = response.body_mut().take_upgraded();
    let request_id = ex.request_id.clone();
    if let (Some(client), Some((mut upstream, early))) = (client, upstream) {
        tokio::spawn(async move {
            let result = async {
                let mut client = client.upgraded().await?;
                // Bytes the instance sent right behind its 101 belong to the new protocol.
                if !early.is_empty() {
                    client.write_all(&early).await?;
                }
                tokio::io::copy_bidirectional(&mut client, &mut upstream).await
            };
            if let Err(e) = result.await {
                tracing::debug!(?request_id, error = %e, "upgraded connection ended");
            }
        });
    }
    let mut out = Response::new(ClientBody::empty());
    *out.status_mut() = response.status();
    *out.headers_mut() = std::mem::take(response.headers_mut());
    out
}

/// One host per request, the same for the router and the upstream (RFC 9112 §3.2,
/// RFC 9113 §8.3.1): HTTP/1.1 needs exactly one `Host`; a target in absolute form (or
/// HTTP/2's `:authority`) names the host, and the `Host` that goes upstream is set from
/// it; an HTTP/2 `Host` that names another host is refused. `CONNECT` and user info in
/// the authority are refused too.
fn check_authority(parts: &mut Parts) -> Result<(), ProxyError> {
    let mut hosts = parts.headers.get_all(header::HOST).iter();
    let host = hosts.next();
    if hosts.next().is_some() {
        return Err(ProxyError::BadRequest("more than one Host header"));
    }
    if parts.method == Method::CONNECT {
        return Err(ProxyError::BadRequest("CONNECT is not served"));
    }
    let Some(authority) = parts.uri.authority() else {
        if host.is_none() && parts.version == http::Version::HTTP_11 {
            return Err(ProxyError::BadRequest(
                "an HTTP/1.1 request needs a Host header",
            ));
        }
        return Ok(());
    };
    if authority.as_str().contains('@') {
        return Err(ProxyError::BadRequest("user info in the request target"));
    }
    if parts.version == http::Version::HTTP_2 {
        if let Some(host) = host {
            if !host
                .as_bytes()
                .eq_ignore_ascii_case(authority.as_str().as_bytes())
            {
                return Err(ProxyError::BadRequest("Host differs from :authority"));
            }
            return Ok(());
        }
    }
    let value = HeaderValue::from_str(authority.as_str()).map_err(|_| ProxyError::BadHost)?;
    parts.headers.insert(header::HOST, value);
    Ok(())
}

/// The host the client asked for: `:authority` (HTTP/2) or `Host`, lower-case, no port.
fn request_host(parts: &Parts) -> Option<String> {
    let raw = match parts.uri.host() {
        Some(h) => h,
        None => match parts.headers.get(header::HOST) {
            Some(v) => v.to_str().ok()?,
            None => return Some(String::new()),
        },
    };
    let host = if let Some(rest) = raw.strip_prefix('[') {
        rest.split(']').next().unwrap_or("")
    } else {
        raw.bytes()
            .rposition(|b| b == b':')
            .map_or(raw, |colon| &raw[..colon])
    };
    if host
        .bytes()
        .any(|b| !(b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_' | b':')))
    {
        return None;
    }
    Some(host.to_ascii_lowercase())
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_http2_answer_carries_its_request_id_never_indexed_and_replaces_the_upstreams() {
        let mut response = Response::new(ClientBody::empty());
        response
            .headers_mut()
            .insert(&X_REQUEST_ID, HeaderValue::from_static("from-upstream"));
        let answer = GatewayAnswer {
            response,
            request_id: HeaderValue::from_static("gw-1"),
            close: false,
        };
        let response = answer.into_response();
        let ids: Vec<_> = response.headers().get_all(&X_REQUEST_ID).iter().collect();
        assert_eq!(ids, ["gw-1"]);
        assert!(
            ids[0].is_sensitive(),
            "a unique value would churn the HPACK table"
        );
    }

    #[test]
    fn a_client_uri_goes_upstream_as_is_only_when_its_text_starts_with_the_path() {
        let uri = |s: &str| s.parse::<Uri>().unwrap();
        assert!(starts_with_path(&uri("/a?b=1")));
        assert!(starts_with_path(&uri("http://h/a?b=1")));
        assert!(
            !starts_with_path(&uri("http://h?b=1")),
            "path() reads / here"
        );
        assert_eq!(upstream_uri("/x", Some("a=1&b")).unwrap(), "/x?a=1&b");
        assert_eq!(upstream_uri("/x", Some("")).unwrap(), "/x?");
        assert_eq!(upstream_uri("/x/y", None).unwrap(), "/x/y");
    }
}
