//! OpenTelemetry export: one server span per sampled request, sent over OTLP (HTTP/protobuf
//! or gRPC) to `tracing.otlp_endpoint` in batches.
//!
//! The request path never waits on export: a finished request hands its span record to a
//! bounded queue with `try_send`; a full queue (a slow, hung or dead collector) drops the
//! span and counts it (`switchyard_otlp_spans_dropped_total`), it never grows or blocks.
//! At shutdown what is queued is sent once more, unless the collector was failing (a
//! stop never waits on a dead collector).
//! One task drains the queue, builds the OTLP messages (`opentelemetry-proto`) and sends
//! one batch at a time, each bounded by `tracing.export_timeout_ms`; a batch that fails is
//! dropped and counted, not retried, so a dead collector costs the gateway nothing but
//! those counters.

use std::borrow::Cow;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_TYPE};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, InstrumentationScope, KeyValue};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{
    span, status, ResourceSpans, ScopeSpans, Span, Status,
};
use prost::Message;
use tokio::sync::mpsc::{self, error::TrySendError};
use tokio::task::JoinHandle;

use crate::config::{OtlpProtocol, TracingSection};
use crate::shutdown::Shutdown;

/// Where spans of an OTLP/HTTP endpoint without a path go (the spec's default path).
const HTTP_TRACES_PATH: &str = "/v1/traces";

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("tracing.otlp_endpoint `{0}`: {1}")]
    Endpoint(String, String),
    #[error("OTLP export: {0}")]
    Http(#[from] reqwest::Error),
    #[error("OTLP export answered {0}")]
    Status(reqwest::StatusCode),
    #[error("OTLP export: {0}")]
    Grpc(Box<tonic::Status>),
    #[error("OTLP export took longer than {0:?}")]
    Timeout(Duration),
}

/// An attribute value of a span.
#[derive(Debug, Clone, PartialEq)]
pub enum AttrValue {
    Str(Cow<'static, str>),
    Int(i64),
}

impl From<&'static str> for AttrValue {
    fn from(s: &'static str) -> AttrValue {
        AttrValue::Str(Cow::Borrowed(s))
    }
}

impl From<String> for AttrValue {
    fn from(s: String) -> AttrValue {
        AttrValue::Str(Cow::Owned(s))
    }
}

impl From<i64> for AttrValue {
    fn from(n: i64) -> AttrValue {
        AttrValue::Int(n)
    }
}

/// A finished request's span, as the proxy records it.
#[derive(Debug, Clone)]
pub struct FinishedSpan {
    pub trace_id: u128,
    pub span_id: u64,
    pub parent_id: Option<u64>,
    pub name: String,
    pub start: SystemTime,
    pub end: SystemTime,
    pub attributes: Vec<(&'static str, AttrValue)>,
    /// The gateway answered with a server error.
    pub error: bool,
}

/// The request path's end of the export queue.
#[derive(Debug, Clone)]
pub struct SpanSink {
    tx: mpsc::Sender<FinishedSpan>,
}

impl SpanSink {
    /// Queues a span for export, or drops and counts it when the queue is full.
    pub fn send(&self, span: FinishedSpan) {
        match self.tx.try_send(span) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => dropped("queue_full", 1),
            Err(TrySendError::Closed(_)) => dropped("shutdown", 1),
        }
    }
}

#[cold]
fn dropped(reason: &'static str, n: u64) {
    metrics::counter!(crate::metrics::OTLP_SPANS_DROPPED, "reason" => reason).increment(n);
}

/// `[tracing]` as the exporter needs it.
#[derive(Debug, Clone)]
pub struct ExportSettings {
    pub endpoint: String,
    pub protocol: OtlpProtocol,
    pub service_name: String,
    pub queue_size: usize,
    pub batch_size: usize,
    pub interval: Duration,
    pub timeout: Duration,
    pub headers: Vec<(String, String)>,
}

impl ExportSettings {
    /// The export settings, when `otlp_endpoint` is set (the section is validated).
    pub fn from_config(t: &TracingSection) -> Option<ExportSettings> {
        Some(ExportSettings {
            endpoint: t.otlp_endpoint.clone()?,
            protocol: t.otlp_protocol,
            service_name: t.service_name.clone(),
            queue_size: t.queue_size,
            batch_size: t.batch_size,
            interval: Duration::from_millis(t.export_interval_ms),
            timeout: Duration::from_millis(t.export_timeout_ms),
            headers: t
                .headers
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        })
    }
}

/// Starts the export task; spans sent to the returned sink go out until `shutdown`, when
/// what is queued is sent once more (within the export timeout).
pub fn start(
    settings: ExportSettings,
    shutdown: Shutdown,
) -> Result<(SpanSink, JoinHandle<()>), ExportError> {
    let transport = Transport::new(&settings)?;
    let (tx, rx) = mpsc::channel(settings.queue_size.max(1));
    let exporter = Exporter {
        transport,
        resource: Resource {
            attributes: vec![
                key_value("service.name", settings.service_name.clone().into()),
                key_value("service.version", env!("CARGO_PKG_VERSION").into()),
            ],
            ..Default::default()
        },
        settings,
        failing: false,
    };
    let task = tokio::spawn(exporter.run(rx, shutdown));
    Ok((SpanSink { tx }, task))
}

enum Transport {
    Http {
        client: reqwest::Client,
        url: reqwest::Url,
        headers: HeaderMap,
    },
    Grpc {
        client: TraceServiceClient<tonic::transport::Channel>,
        metadata: tonic::metadata::MetadataMap,
    },
}

impl Transport {
    fn new(s: &ExportSettings) -> Result<Transport, ExportError> {
        let bad =
            |e: &dyn std::fmt::Display| ExportError::Endpoint(s.endpoint.clone(), e.to_string());
        match s.protocol {
            OtlpProtocol::HttpProtobuf => {
                let mut url = reqwest::Url::parse(&s.endpoint).map_err(|e| bad(&e))?;
                if url.path().is_empty() || url.path() == "/" {
                    url.set_path(HTTP_TRACES_PATH);
                }
                let mut headers = HeaderMap::new();
                for (k, v) in &s.headers {
                    let name = HeaderName::from_bytes(k.as_bytes()).map_err(|e| bad(&e))?;
                    let value = HeaderValue::from_str(v).map_err(|e| bad(&e))?;
                    headers.append(name, value);
                }
                headers.insert(
                    CONTENT_TYPE,
                    HeaderValue::from_static("application/x-protobuf"),
                );
                let client = reqwest::Client::builder()
                    .timeout(s.timeout)
                    .connect_timeout(s.timeout)
                    .build()?;
                Ok(Transport::Http {
                    client,
                    url,
                    headers,
                })
            }
            OtlpProtocol::Grpc => {
                let channel = tonic::transport::Endpoint::from_shared(s.endpoint.clone())
                    .map_err(|e| bad(&e))?
                    .connect_timeout(s.timeout)
                    .timeout(s.timeout)
                    .connect_lazy();
                let mut metadata = tonic::metadata::MetadataMap::new();
                for (k, v) in &s.headers {
                    let key =
                        tonic::metadata::MetadataKey::from_bytes(k.to_ascii_lowercase().as_bytes())
                            .map_err(|e| bad(&e))?;
                    let value = v.parse().map_err(|e| bad(&e))?;
                    metadata.append(key, value);
                }
                Ok(Transport::Grpc {
                    client: TraceServiceClient::new(channel),
                    metadata,
                })
            }
        }
    }

    /// Sends one request; the number of spans the collector says it rejected.
    async fn export(&mut self, request: ExportTraceServiceRequest) -> Result<i64, ExportError> {
        match self {
            Transport::Http {
                client,
                url,
                headers,
            } => {
                let response = client
                    .post(url.clone())
                    .headers(headers.clone())
                    .body(request.encode_to_vec())
                    .send()
                    .await?;
                let status = response.status();
                if !status.is_success() {
                    return Err(ExportError::Status(status));
                }
                let body = response.bytes().await?;
                Ok(rejected(ExportTraceServiceResponse::decode(body).ok()))
            }
            Transport::Grpc { client, metadata } => {
                let mut request = tonic::Request::new(request);
                *request.metadata_mut() = metadata.clone();
                let answer = client
                    .export(request)
                    .await
                    .map_err(|e| ExportError::Grpc(Box::new(e)))?;
                Ok(rejected(Some(answer.into_inner())))
            }
        }
    }
}

fn rejected(answer: Option<ExportTraceServiceResponse>) -> i64 {
    answer
        .and_then(|a| a.partial_success)
        .map_or(0, |p| p.rejected_spans.max(0))
}

struct Exporter {
    transport: Transport,
    resource: Resource,
    settings: ExportSettings,
    /// The last export failed (a failure is logged as a warning once, until one succeeds).
    failing: bool,
}

impl Exporter {
    async fn run(mut self, mut rx: mpsc::Receiver<FinishedSpan>, shutdown: Shutdown) {
        let size = self.settings.batch_size.max(1);
        let mut batch = Vec::with_capacity(size);
        loop {
            tokio::select! {
                n = rx.recv_many(&mut batch, size) => if n == 0 { return },
                () = shutdown.wait() => break,
            }
            // A batch waits at most one interval for more spans.
            let until = tokio::time::Instant::now() + self.settings.interval;
            while batch.len() < size {
                let room = size - batch.len();
                tokio::select! {
                    n = rx.recv_many(&mut batch, room) => if n == 0 { break },
                    () = tokio::time::sleep_until(until) => break,
                    () = shutdown.wait() => break,
                }
            }
            let n = batch.len() as u64;
            tokio::select! {
                () = self.send(&mut batch) => {}
                // A stop does not wait out an export in progress.
                () = shutdown.wait() => {
                    dropped("shutdown", n);
                    self.failing = true;
                    break;
                }
            }
        }
        // Stopping: what is queued goes out once more, unless the collector was failing.
        rx.close();
        while let Some(span) = rx.recv().await {
            batch.push(span);
        }
        if self.failing {
            dropped("shutdown", batch.len() as u64);
            return;
        }
        while !batch.is_empty() {
            let mut chunk: Vec<FinishedSpan> = batch.drain(..batch.len().min(size)).collect();
            self.send(&mut chunk).await;
        }
    }

    /// Sends the batch (emptied either way), counting what went and what was lost.
    async fn send(&mut self, batch: &mut Vec<FinishedSpan>) {
        if batch.is_empty() {
            return;
        }
        let n = batch.len() as u64;
        let request = self.request(batch.drain(..));
        let timeout = self.settings.timeout;
        let outcome = match tokio::time::timeout(timeout, self.transport.export(request)).await {
            Ok(result) => result,
            Err(_) => Err(ExportError::Timeout(timeout)),
        };
        match outcome {
            Ok(refused) => {
                let refused = (refused as u64).min(n);
                metrics::counter!(crate::metrics::OTLP_SPANS_EXPORTED).increment(n - refused);
                if refused > 0 {
                    dropped("rejected", refused);
                }
                if self.failing {
                    tracing::info!(endpoint = %self.settings.endpoint, "OTLP export works again");
                }
                self.failing = false;
            }
            Err(e) => {
                dropped("export_failed", n);
                if self.failing {
                    tracing::debug!(error = %e, spans = n, "OTLP export failed");
                } else {
                    tracing::warn!(endpoint = %self.settings.endpoint, error = %e, spans = n,
                        "OTLP export failed; spans are dropped until it works again");
                }
                self.failing = true;
            }
        }
    }

    fn request(&self, spans: impl Iterator<Item = FinishedSpan>) -> ExportTraceServiceRequest {
        ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                resource: Some(self.resource.clone()),
                scope_spans: vec![ScopeSpans {
                    scope: Some(InstrumentationScope {
                        name: "switchyard".into(),
                        version: env!("CARGO_PKG_VERSION").into(),
                        ..Default::default()
                    }),
                    spans: spans.map(otlp_span).collect(),
                    ..Default::default()
                }],
                ..Default::default()
            }],
        }
    }
}

fn unix_nanos(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos().min(u128::from(u64::MAX)) as u64)
}

fn key_value(key: &str, value: AttrValue) -> KeyValue {
    let value = match value {
        AttrValue::Str(s) => any_value::Value::StringValue(s.into_owned()),
        AttrValue::Int(n) => any_value::Value::IntValue(n),
    };
    KeyValue {
        key: key.to_string(),
        value: Some(AnyValue { value: Some(value) }),
        ..Default::default()
    }
}

/// The OTLP form of a span: a server span, status error for a server error.
fn otlp_span(s: FinishedSpan) -> Span {
    Span {
        trace_id: s.trace_id.to_be_bytes().to_vec(),
        span_id: s.span_id.to_be_bytes().to_vec(),
        parent_span_id: s
            .parent_id
            .map_or_else(Vec::new, |p| p.to_be_bytes().to_vec()),
        // W3C sampled flag (only sampled spans are exported), and "the parent is remote"
        // known and true when there is a parent (the client).
        flags: 0x01 | 0x100 | if s.parent_id.is_some() { 0x200 } else { 0 },
        name: s.name,
        kind: span::SpanKind::Server as i32,
        start_time_unix_nano: unix_nanos(s.start),
        end_time_unix_nano: unix_nanos(s.end),
        attributes: s
            .attributes
            .into_iter()
            .map(|(k, v)| key_value(k, v))
            .collect(),
        status: Some(Status {
            code: if s.error {
                status::StatusCode::Error as i32
            } else {
                status::StatusCode::Unset as i32
            },
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn finished() -> FinishedSpan {
        FinishedSpan {
            trace_id: 0x4bf92f3577b34da6a3ce929d0e0e4736,
            span_id: 0x1122334455667788,
            parent_id: Some(0x00f067aa0ba902b7),
            name: "GET api".into(),
            start: UNIX_EPOCH + Duration::from_secs(1),
            end: UNIX_EPOCH + Duration::from_millis(1500),
            attributes: vec![
                ("http.request.method", "GET".into()),
                ("http.response.status_code", 502i64.into()),
            ],
            error: true,
        }
    }

    #[test]
    fn a_finished_request_becomes_an_otlp_server_span() {
        let s = otlp_span(finished());
        assert_eq!(hex::encode(&s.trace_id), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(hex::encode(&s.span_id), "1122334455667788");
        assert_eq!(hex::encode(&s.parent_span_id), "00f067aa0ba902b7");
        assert_eq!(s.kind, span::SpanKind::Server as i32);
        assert_eq!(s.start_time_unix_nano, 1_000_000_000);
        assert_eq!(s.end_time_unix_nano, 1_500_000_000);
        assert_eq!(s.status.unwrap().code, status::StatusCode::Error as i32);
        assert_eq!(s.attributes[0].key, "http.request.method");
        assert_eq!(
            s.attributes[1].value,
            Some(AnyValue {
                value: Some(any_value::Value::IntValue(502))
            })
        );
        let root = otlp_span(FinishedSpan {
            parent_id: None,
            error: false,
            ..finished()
        });
        assert!(root.parent_span_id.is_empty());
        assert_eq!(root.flags, 0x101);
        assert_eq!(root.status.unwrap().code, status::StatusCode::Unset as i32);
    }

    #[test]
    fn an_http_endpoint_without_a_path_gets_the_traces_path() {
        let settings = |endpoint: &str| ExportSettings {
            endpoint: endpoint.into(),
            protocol: OtlpProtocol::HttpProtobuf,
            service_name: "gw".into(),
            queue_size: 1,
            batch_size: 1,
            interval: Duration::from_millis(1),
            timeout: Duration::from_millis(1),
            headers: vec![("x-api-key".into(), "k".into())],
        };
        for (endpoint, want) in [
            ("http://127.0.0.1:4318", "http://127.0.0.1:4318/v1/traces"),
            ("http://127.0.0.1:4318/", "http://127.0.0.1:4318/v1/traces"),
            (
                "https://c.example/otlp/traces",
                "https://c.example/otlp/traces",
            ),
        ] {
            match Transport::new(&settings(endpoint)).unwrap() {
                Transport::Http { url, headers, .. } => {
                    assert_eq!(url.as_str(), want);
                    assert_eq!(headers["x-api-key"], "k");
                    assert_eq!(headers[CONTENT_TYPE], "application/x-protobuf");
                }
                Transport::Grpc { .. } => unreachable!(),
            }
        }
    }
}
