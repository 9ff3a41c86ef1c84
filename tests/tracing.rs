//! Distributed tracing end to end: W3C trace context between client, gateway and upstream
//! (over HTTP/1.1 and HTTP/2 upstreams), the trace id in the access log, and spans exported
//! over OTLP to a receiver that decodes them with `opentelemetry-proto`.

mod support;

use std::sync::{Arc, Mutex};

use serde_json::{json, Value};
use support::{json_of, Env};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const CLIENT_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CLIENT_SPAN: &str = "00f067aa0ba902b7";

fn client_traceparent(flags: &str) -> String {
    format!("00-{CLIENT_TRACE}-{CLIENT_SPAN}-{flags}")
}

/// The parts of a `traceparent` the upstream saw: (trace id, parent id, flags), after
/// checking it is one well-formed version-00 value.
fn parts_of(traceparent: &str) -> (String, String, String) {
    let fields: Vec<&str> = traceparent.split('-').collect();
    assert_eq!(traceparent.len(), 55, "one traceparent: {traceparent:?}");
    assert_eq!(fields.len(), 4, "{traceparent:?}");
    assert_eq!(fields[0], "00");
    for f in &fields[1..] {
        assert!(
            f.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')),
            "{traceparent:?}"
        );
    }
    assert_ne!(fields[1], "0".repeat(32));
    assert_ne!(fields[2], "0".repeat(16));
    (fields[1].into(), fields[2].into(), fields[3].into())
}

fn header<'a>(seen: &'a Value, name: &str) -> Option<&'a str> {
    seen["headers"][name].as_str()
}

#[tokio::test]
async fn a_valid_traceparent_is_continued_with_the_gateways_span_as_parent() {
    let env = Env::start("trace-continue", 1, |_| {}).await;
    env.route("h1", "/h1", json!({})).await;
    env.route("h2", "/h2", json!({"upstream_protocol": "http2"}))
        .await;
    for (path, version) in [("/h1/x", "HTTP/1.1"), ("/h2/x", "HTTP/2.0")] {
        for flags in ["01", "00"] {
            let resp = env
                .get_with(path, "traceparent", &client_traceparent(flags))
                .header("tracestate", "rojo=00f067aa0ba902b7")
                .header("tracestate", "congo=t61rcWkgMzE")
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status(), 200);
            let seen = json_of(resp).await;
            assert_eq!(seen["version"], version);
            let (trace, parent, sent_flags) =
                parts_of(header(&seen, "traceparent").expect("a traceparent upstream"));
            assert_eq!(trace, CLIENT_TRACE, "{path}: the client's trace goes on");
            assert_ne!(
                parent, CLIENT_SPAN,
                "{path}: the gateway's own span is the parent"
            );
            assert_eq!(sent_flags, flags, "{path}: the sampled flag is kept");
            assert_eq!(
                header(&seen, "tracestate"),
                Some("rojo=00f067aa0ba902b7, congo=t61rcWkgMzE"),
                "{path}: tracestate passed on as sent"
            );
        }
    }
    env.stop().await;
}

#[tokio::test]
async fn a_missing_malformed_or_repeated_traceparent_is_replaced_by_one_new_trace() {
    let env = Env::start("trace-replace", 1, |_| {}).await;
    env.route("h1", "/h1", json!({})).await;
    env.route("h2", "/h2", json!({"upstream_protocol": "http2"}))
        .await;
    let upper = client_traceparent("01").to_uppercase();
    let zero = format!("00-{}-{CLIENT_SPAN}-01", "0".repeat(32));
    let long = format!("{}-x", client_traceparent("01"));
    let cases: [&[&str]; 6] = [
        &[],
        &[&upper],
        &[&zero],
        &[&long],
        &["garbage"],
        &[&client_traceparent("01"), &client_traceparent("01")],
    ];
    let mut traces = Vec::new();
    for path in ["/h1/x", "/h2/x"] {
        for sent in cases {
            let mut req = env.http.get(env.url(path)).header("tracestate", "rojo=1");
            for value in sent {
                req = req.header("traceparent", *value);
            }
            let seen = json_of(req.send().await.unwrap()).await;
            let (trace, _, flags) = parts_of(
                header(&seen, "traceparent")
                    .unwrap_or_else(|| panic!("{path} {sent:?}: no traceparent upstream: {seen}")),
            );
            assert_ne!(trace, CLIENT_TRACE, "{path} {sent:?}: not continued");
            assert_eq!(
                flags, "01",
                "{path}: new traces sampled at the default ratio 1"
            );
            assert_eq!(
                header(&seen, "tracestate"),
                None,
                "{path} {sent:?}: tracestate goes with its trace"
            );
            traces.push(trace);
        }
    }
    traces.sort();
    traces.dedup();
    assert_eq!(
        traces.len(),
        2 * cases.len(),
        "every new trace has its own id"
    );

    // Over a raw HTTP/1.1 connection: two spellings of the name, one of them valid.
    let mut conn = tokio::net::TcpStream::connect(env.gw.app.proxy_addr())
        .await
        .unwrap();
    let head = format!(
        "GET /h1/raw HTTP/1.1\r\nHost: 127.0.0.1\r\nTraceParent: {}\r\n\
         traceparent: {}\r\nConnection: close\r\n\r\n",
        client_traceparent("01"),
        "00-ffffffffffffffffffffffffffffffff-ffffffffffffffff-01"
    );
    conn.write_all(head.as_bytes()).await.unwrap();
    let mut answer = String::new();
    conn.read_to_string(&mut answer).await.unwrap();
    let body = answer.split("\r\n\r\n").nth(1).unwrap_or_default();
    let seen: Value = serde_json::from_str(body).unwrap_or_else(|_| panic!("{answer}"));
    let (trace, _, _) = parts_of(header(&seen, "traceparent").unwrap());
    assert_ne!(trace, CLIENT_TRACE);
    assert_ne!(trace, "f".repeat(32));
    env.stop().await;
}

#[tokio::test]
async fn the_access_log_line_carries_the_trace_id() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("access.log");
    let log_path = path.display().to_string();
    let env = Env::start("trace-log", 1, move |f| {
        f.log.access_log = true;
        f.log.format = switchyard::config::LogFormat::Json;
        f.log.access_log_path = log_path;
        f.log.access_log_flush_ms = 50;
    })
    .await;
    env.route("h1", "/h1", json!({})).await;
    let resp = env
        .get_with("/h1/logged", "traceparent", &client_traceparent("01"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    resp.bytes().await.unwrap();
    let fresh = env.get("/nowhere/logged").await;
    assert_eq!(fresh.status(), 404);
    fresh.bytes().await.unwrap();
    let lines = support::eventually(support::DEADLINE, "two access log lines", || {
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        let lines: Vec<Value> = text
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|l| l["path"].as_str().is_some_and(|p| p.ends_with("/logged")))
            .collect();
        async move { (lines.len() == 2).then_some(lines) }
    })
    .await;
    assert_eq!(lines[0]["trace_id"], CLIENT_TRACE, "{}", lines[0]);
    let fresh_id = lines[1]["trace_id"].as_str().unwrap();
    assert_eq!(fresh_id.len(), 32, "a refused request has a trace too");
    assert_ne!(fresh_id, CLIENT_TRACE);
    env.stop().await;
}

/// How the test collector answers export requests.
#[derive(Clone, Copy, PartialEq)]
enum Collector {
    Answers,
    Hangs,
}

/// An OTLP receiver on a loopback port: OTLP/HTTP (protobuf) on `/v1/traces`, or OTLP/gRPC,
/// decoding every export request with `opentelemetry-proto` and keeping its spans.
struct Receiver {
    addr: std::net::SocketAddr,
    spans: Arc<Mutex<Vec<Span>>>,
    task: tokio::task::JoinHandle<()>,
}

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value;
use opentelemetry_proto::tonic::trace::v1::{span::SpanKind, Span};
use prost::Message;

fn spans_of(request: ExportTraceServiceRequest) -> Vec<Span> {
    request
        .resource_spans
        .into_iter()
        .inspect(|rs| {
            let resource = rs.resource.as_ref().expect("a resource");
            let name = resource
                .attributes
                .iter()
                .find(|kv| kv.key == "service.name")
                .expect("service.name");
            assert_eq!(
                name.value.as_ref().unwrap().value,
                Some(any_value::Value::StringValue("switchyard".into()))
            );
        })
        .flat_map(|rs| rs.scope_spans)
        .flat_map(|ss| ss.spans)
        .collect()
}

struct GrpcCollector(Arc<Mutex<Vec<Span>>>);

#[tonic::async_trait]
impl TraceService for GrpcCollector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let spans = spans_of(request.into_inner());
        self.0.lock().unwrap().extend(spans);
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

impl Receiver {
    async fn http(behaviour: Collector) -> Receiver {
        use http_body_util::{BodyExt, Full};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let spans: Arc<Mutex<Vec<Span>>> = Arc::default();
        let kept = spans.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let kept = kept.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req: http::Request<_>| {
                        let kept = kept.clone();
                        async move {
                            if behaviour == Collector::Hangs {
                                std::future::pending::<()>().await;
                            }
                            assert_eq!(req.uri().path(), "/v1/traces");
                            assert_eq!(req.method(), "POST");
                            assert_eq!(req.headers()["content-type"], "application/x-protobuf");
                            let body = hyper::body::Incoming::collect(req.into_body())
                                .await
                                .unwrap()
                                .to_bytes();
                            let request = ExportTraceServiceRequest::decode(body)
                                .expect("the body is an OTLP export request");
                            kept.lock().unwrap().extend(spans_of(request));
                            let answer = ExportTraceServiceResponse::default().encode_to_vec();
                            let mut resp =
                                http::Response::new(Full::new(bytes::Bytes::from(answer)));
                            resp.headers_mut().insert(
                                "content-type",
                                http::HeaderValue::from_static("application/x-protobuf"),
                            );
                            Ok::<_, std::convert::Infallible>(resp)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Receiver { addr, spans, task }
    }

    async fn grpc() -> Receiver {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let spans: Arc<Mutex<Vec<Span>>> = Arc::default();
        let service = TraceServiceServer::new(GrpcCollector(spans.clone()));
        let task = tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .serve_with_incoming_shutdown(
                    service,
                    tonic::transport::server::TcpIncoming::from(listener),
                    std::future::pending::<()>(),
                )
                .await;
        });
        Receiver { addr, spans, task }
    }

    fn spans(&self) -> Vec<Span> {
        self.spans.lock().unwrap().clone()
    }

    /// Waits for the span of `trace` (lower-case hex).
    async fn span_of(&self, trace: &str) -> Span {
        support::eventually(
            support::DEADLINE,
            &format!("a span of trace {trace}"),
            || {
                let found = self
                    .spans()
                    .into_iter()
                    .find(|s| hex::encode(&s.trace_id) == trace);
                async move { found }
            },
        )
        .await
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn attr(span: &Span, key: &str) -> Option<any_value::Value> {
    span.attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.clone())
        .and_then(|v| v.value)
}

fn text(s: &str) -> Option<any_value::Value> {
    Some(any_value::Value::StringValue(s.into()))
}

fn int(n: i64) -> Option<any_value::Value> {
    Some(any_value::Value::IntValue(n))
}

/// What the upstream saw as `traceparent` for a request.
async fn upstream_traceparent(resp: reqwest::Response) -> (String, String, String) {
    let seen = json_of(resp).await;
    parts_of(header(&seen, "traceparent").expect("a traceparent upstream"))
}

#[tokio::test]
async fn spans_go_to_an_otlp_collector_with_the_trace_parent_and_attributes_of_each_request() {
    for grpc in [false, true] {
        let receiver = if grpc {
            Receiver::grpc().await
        } else {
            Receiver::http(Collector::Answers).await
        };
        let endpoint = format!("http://{}", receiver.addr);
        let env = Env::start("trace-export", 1, |c| {
            c.tracing.otlp_endpoint = Some(endpoint);
            if grpc {
                c.tracing.otlp_protocol = switchyard::config::OtlpProtocol::Grpc;
            }
            c.tracing.export_interval_ms = 50;
        })
        .await;
        env.route("api", "/api", json!({})).await;

        // Continued: the span has the client's trace and parent, and is the parent upstream.
        let resp = env
            .get_with("/api/items?q=1", "traceparent", &client_traceparent("01"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let (trace, parent, _) = upstream_traceparent(resp).await;
        let span = receiver.span_of(CLIENT_TRACE).await;
        assert_eq!(trace, CLIENT_TRACE);
        assert_eq!(
            hex::encode(&span.parent_span_id),
            CLIENT_SPAN,
            "grpc {grpc}"
        );
        assert_eq!(
            hex::encode(&span.span_id),
            parent,
            "the upstream's parent is the span"
        );
        assert_eq!(span.kind, SpanKind::Server as i32);
        assert_eq!(span.name, "GET api");
        assert!(span.end_time_unix_nano >= span.start_time_unix_nano);
        assert!(span.start_time_unix_nano > 0);
        assert_eq!(attr(&span, "http.request.method"), text("GET"));
        assert_eq!(attr(&span, "url.path"), text("/api/items"));
        assert_eq!(attr(&span, "server.address"), text("127.0.0.1"));
        assert_eq!(attr(&span, "http.response.status_code"), int(200));
        assert_eq!(attr(&span, "http.route"), text("/api"));
        assert_eq!(attr(&span, "switchyard.route"), text("api"));
        assert_eq!(attr(&span, "switchyard.service"), text(&env.service));
        let instance = attr(&span, "switchyard.upstream.instance");
        assert!(
            matches!(&instance, Some(any_value::Value::StringValue(id))
                if id.ends_with(&format!("{}-0", env.service))),
            "{instance:?}"
        );
        let address = format!("127.0.0.1:{}", env.upstreams[0].port());
        assert_eq!(attr(&span, "switchyard.upstream.address"), text(&address));
        assert_eq!(attr(&span, "switchyard.upstream.status_code"), int(200));
        assert_eq!(attr(&span, "switchyard.tries"), int(1));
        assert_eq!(attr(&span, "switchyard.retries"), int(0));
        assert_eq!(attr(&span, "switchyard.auth"), text("open"));

        // New: a root span whose ids are the ones the upstream saw.
        let (trace, parent, flags) = upstream_traceparent(env.get("/api/new").await).await;
        assert_eq!(flags, "01");
        let span = receiver.span_of(&trace).await;
        assert!(span.parent_span_id.is_empty(), "a root span");
        assert_eq!(hex::encode(&span.span_id), parent);

        // A refused request has its span too, with the auth outcome.
        env.route("locked", "/locked", json!({"auth": {"api_key": true}}))
            .await;
        let tp = format!("00-{}-{CLIENT_SPAN}-01", "a".repeat(32));
        let resp = env
            .get_with("/locked/x", "traceparent", &tp)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 401);
        let span = receiver.span_of(&"a".repeat(32)).await;
        assert_eq!(attr(&span, "switchyard.auth"), text("refused"));
        assert!(attr(&span, "switchyard.auth.reason").is_some());
        assert_eq!(attr(&span, "http.response.status_code"), int(401));
        assert_eq!(attr(&span, "switchyard.tries"), int(0));
        env.stop().await;
    }
}

#[tokio::test]
async fn sampling_zero_exports_no_new_trace_but_still_propagates() {
    let receiver = Receiver::http(Collector::Answers).await;
    let endpoint = format!("http://{}", receiver.addr);
    let env = Env::start("trace-ratio0", 1, |c| {
        c.tracing.otlp_endpoint = Some(endpoint);
        c.tracing.sample_ratio = 0.0;
        c.tracing.export_interval_ms = 50;
    })
    .await;
    env.route("api", "/api", json!({})).await;
    let mut unsampled = Vec::new();
    for i in 0..20 {
        let req = if i % 2 == 0 {
            env.http.get(env.url("/api/x"))
        } else {
            let tp = format!("00-{:032x}-{CLIENT_SPAN}-00", i + 1);
            env.get_with("/api/x", "traceparent", &tp)
        };
        let (trace, _, flags) = upstream_traceparent(req.send().await.unwrap()).await;
        assert_eq!(flags, "00", "propagated, marked not sampled");
        unsampled.push(trace);
    }
    // A sampled parent is still honoured (parent-based): its span arriving shows the
    // exporter ran after every request above.
    let resp = env
        .get_with("/api/x", "traceparent", &client_traceparent("01"))
        .send()
        .await
        .unwrap();
    assert_eq!(upstream_traceparent(resp).await.2, "01");
    receiver.span_of(CLIENT_TRACE).await;
    let exported: Vec<String> = receiver
        .spans()
        .iter()
        .map(|s| hex::encode(&s.trace_id))
        .collect();
    assert_eq!(
        exported,
        [CLIENT_TRACE],
        "nothing but the sampled parent's span"
    );
    assert_eq!(unsampled.len(), 20);
    env.stop().await;
}

#[tokio::test]
async fn a_collector_that_is_down_or_hangs_never_fails_or_holds_requests_and_drops_are_counted() {
    let hung = Receiver::http(Collector::Hangs).await;
    let down = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
        // Closed here: nothing listens there.
    };
    for (what, addr) in [("hung", hung.addr), ("down", down)] {
        let endpoint = format!("http://{addr}");
        let env = Env::start("trace-dead", 1, |c| {
            c.tracing.otlp_endpoint = Some(endpoint);
            c.tracing.queue_size = 8;
            c.tracing.batch_size = 4;
            c.tracing.export_interval_ms = 10;
            c.tracing.export_timeout_ms = 5_000;
        })
        .await;
        env.route("api", "/api", json!({})).await;
        let dropped = |reason: &'static str| {
            let gw = &env.gw;
            async move {
                gw.metric("switchyard_otlp_spans_dropped_total", &[("reason", reason)])
                    .await
            }
        };
        let (full_before, failed_before) =
            (dropped("queue_full").await, dropped("export_failed").await);
        let mut slowest = std::time::Duration::ZERO;
        for _ in 0..100 {
            let started = std::time::Instant::now();
            let resp = env.get("/api/x").await;
            assert_eq!(resp.status(), 200, "{what}");
            resp.bytes().await.unwrap();
            slowest = slowest.max(started.elapsed());
        }
        // Far below the 5 s export timeout a request would wait out if it waited on export.
        assert!(
            slowest < std::time::Duration::from_millis(2_500),
            "{what}: a request took {slowest:?}"
        );
        if what == "hung" {
            // One batch is stuck in the hung export; the queue behind it fills.
            let full = dropped("queue_full").await;
            assert!(full >= full_before + 80.0, "{what}: {full_before} → {full}");
        } else {
            support::eventually(support::DEADLINE, "failed exports counted", || {
                let dropped = &dropped;
                async move { (dropped("export_failed").await > failed_before).then_some(()) }
            })
            .await;
        }
        env.stop().await;
    }
}
