//! Distributed tracing end to end: W3C trace context between client, gateway and upstream
//! (over HTTP/1.1 and HTTP/2 upstreams), the trace id in the access log, and spans exported
//! over OTLP to a receiver that decodes them with `opentelemetry-proto`.

mod support;

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
