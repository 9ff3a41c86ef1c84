//! gRPC end to end with a real gRPC stack: a tonic server (h2c) registered in the dev
//! registry (or a real agent with `CONSUL_HTTP_ADDR`), routed with `upstream_protocol:
//! http2`, and a tonic client talking h2c to the gateway. The gateway's own refusals reach
//! the client as gRPC statuses (Trailers-Only answers), and a server stream outlives a
//! change of its route.
//!
//! The messages are written by hand with prost's derive and the service is dispatched by
//! hand with tonic's `server::Grpc`, as generated code would: no `.proto` file, no
//! `protoc`.

mod support;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures_util::stream::{self, BoxStream};
use futures_util::StreamExt;
use http::uri::PathAndQuery;
use serde_json::{json, Value};
use support::{eventually, route, unique, Consul, Gateway, Svc, DEADLINE};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{oneshot, watch};
use tonic::client::Grpc;
use tonic::server::{ServerStreamingService, UnaryService};
use tonic::transport::Channel;
use tonic::{Code, Status};
use tonic_prost::ProstCodec;

#[derive(Clone, PartialEq, prost::Message)]
struct EchoRequest {
    #[prost(string, tag = "1")]
    text: String,
    /// Messages `Count` streams back.
    #[prost(uint32, tag = "2")]
    count: u32,
}

#[derive(Clone, PartialEq, prost::Message)]
struct EchoReply {
    #[prost(string, tag = "1")]
    text: String,
    #[prost(uint32, tag = "2")]
    seq: u32,
    /// The `x-route-tag` request header the server saw (set by the route's rules).
    #[prost(string, tag = "3")]
    route_tag: String,
}

const SAY: &str = "/test.Echo/Say";
const SLOW: &str = "/test.Echo/Slow";
const COUNT: &str = "/test.Echo/Count";

/// What the server's methods share with the test.
#[derive(Default)]
struct EchoState {
    /// Calls that reached the server.
    calls: AtomicU64,
    /// `Count` sends the first half of its messages, then waits for this to be `true`.
    gate: watch::Sender<bool>,
}

fn reply(request: &tonic::Request<EchoRequest>, seq: u32) -> EchoReply {
    let route_tag = request
        .metadata()
        .get("x-route-tag")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    EchoReply {
        text: request.get_ref().text.clone(),
        seq,
        route_tag,
    }
}

type Answer<T> = Pin<Box<dyn Future<Output = Result<tonic::Response<T>, Status>> + Send>>;

/// `Say`: one reply at once. `Slow`: one reply after 10 s.
struct Unary {
    slow: bool,
}

impl UnaryService<EchoRequest> for Unary {
    type Response = EchoReply;
    type Future = Answer<EchoReply>;

    fn call(&mut self, request: tonic::Request<EchoRequest>) -> Self::Future {
        let slow = self.slow;
        Box::pin(async move {
            if slow {
                tokio::time::sleep(Duration::from_secs(10)).await;
            }
            Ok(tonic::Response::new(reply(&request, 0)))
        })
    }
}

/// `Count`: `count` replies, the second half once the gate opens.
struct Count(Arc<EchoState>);

impl ServerStreamingService<EchoRequest> for Count {
    type Response = EchoReply;
    type ResponseStream = BoxStream<'static, Result<EchoReply, Status>>;
    type Future = Answer<Self::ResponseStream>;

    fn call(&mut self, request: tonic::Request<EchoRequest>) -> Self::Future {
        let gate = self.0.gate.subscribe();
        Box::pin(async move {
            let count = request.get_ref().count;
            let replies = stream::unfold(0, move |seq| {
                let template = reply(&request, seq);
                let mut gate = gate.clone();
                async move {
                    if seq >= count {
                        return None;
                    }
                    if seq == count / 2 && gate.wait_for(|open| *open).await.is_err() {
                        return Some((Err(Status::aborted("gate dropped")), count));
                    }
                    Some((Ok(template), seq + 1))
                }
            });
            Ok(tonic::Response::new(replies.boxed()))
        })
    }
}

/// The service: tonic's `server::Grpc` per method, dispatched on the path.
#[derive(Clone)]
struct EchoService(Arc<EchoState>);

impl tower_service::Service<http::Request<tonic::body::Body>> for EchoService {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        let state = self.0.clone();
        state.calls.fetch_add(1, Ordering::Relaxed);
        Box::pin(async move {
            let mut grpc = tonic::server::Grpc::new(ProstCodec::<EchoReply, EchoRequest>::new());
            Ok(match request.uri().path() {
                SAY => grpc.unary(Unary { slow: false }, request).await,
                SLOW => grpc.unary(Unary { slow: true }, request).await,
                COUNT => grpc.server_streaming(Count(state), request).await,
                _ => Status::unimplemented("no such method at the server").into_http(),
            })
        })
    }
}

/// A tonic server on `127.0.0.1:0`, h2c.
struct EchoServer {
    addr: SocketAddr,
    state: Arc<EchoState>,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl EchoServer {
    async fn start() -> EchoServer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(EchoState::default());
        let service = EchoService(state.clone());
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            tonic::transport::Server::builder()
                .serve_with_incoming_shutdown(
                    service,
                    tonic::transport::server::TcpIncoming::from(listener),
                    async {
                        let _ = stopped.await;
                    },
                )
                .await
                .expect("the tonic server runs");
        });
        EchoServer {
            addr,
            state,
            stop: Some(stop),
            task,
        }
    }

    fn calls(&self) -> u64 {
        self.state.calls.load(Ordering::Relaxed)
    }

    async fn stop(mut self) {
        let _ = self.state.gate.send(true);
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = tokio::time::timeout(Duration::from_secs(5), &mut self.task).await;
        self.task.abort();
    }
}

/// A registry, a gateway on its own KV prefix, and the tonic server registered as a
/// fresh service.
struct GrpcEnv {
    consul: Consul,
    gw: Gateway,
    service: String,
    server: EchoServer,
}

impl GrpcEnv {
    async fn start() -> GrpcEnv {
        let consul = Consul::start().await;
        let gw = Gateway::start(&consul, &format!("{}/", unique("grpc")), |_| {}).await;
        let service = unique("echo");
        let server = EchoServer::start().await;
        consul
            .register(&Svc::new(
                &service,
                &format!("{service}-0"),
                server.addr.port(),
            ))
            .await;
        GrpcEnv {
            consul,
            gw,
            service,
            server,
        }
    }

    /// Puts route `name` to the tonic server at `prefix` (HTTP/2 upstream, `extra`
    /// merged in) and waits until it serves the instance.
    async fn route(&self, name: &str, prefix: &str, extra: Value) {
        self.put_route(name, prefix, extra).await;
        let id = format!("{}-0", self.service);
        self.gw.wait_upstreams(prefix, &[id.as_str()]).await;
    }

    async fn put_route(&self, name: &str, prefix: &str, mut extra: Value) {
        extra["upstream_protocol"] = json!("http2");
        self.consul
            .put_kv(
                &self.gw.route_key(name),
                &route(&self.service, prefix, extra),
            )
            .await;
    }

    /// A tonic client to the gateway's proxy port, h2c.
    async fn client(&self) -> Grpc<Channel> {
        let url = format!("http://{}", self.gw.app.proxy_addr());
        let channel = tonic::transport::Endpoint::from_shared(url)
            .unwrap()
            .connect_timeout(Duration::from_secs(5))
            .connect()
            .await
            .expect("the gateway accepts h2c");
        Grpc::new(channel)
    }

    async fn stop(self) {
        self.server.stop().await;
        self.gw.stop().await;
        self.consul.cleanup().await;
    }
}

fn request(text: &str, count: u32) -> tonic::Request<EchoRequest> {
    let mut request = tonic::Request::new(EchoRequest {
        text: text.into(),
        count,
    });
    request.set_timeout(Duration::from_secs(20));
    request
}

/// A unary call of `path` with `text`.
async fn unary(grpc: &mut Grpc<Channel>, path: &str, text: &str) -> Result<EchoReply, Status> {
    grpc.ready()
        .await
        .map_err(|e| Status::unavailable(format!("channel not ready: {e}")))?;
    let path = PathAndQuery::try_from(path.to_string()).expect("a method path");
    grpc.unary(
        request(text, 0),
        path,
        ProstCodec::<EchoRequest, EchoReply>::new(),
    )
    .await
    .map(tonic::Response::into_inner)
}

/// Asserts that `result` is the gateway's own refusal with `code`, whose message holds
/// `says`, stamped with the gateway's request id.
fn refused(what: &str, result: Result<EchoReply, Status>, code: Code, says: &str) -> Status {
    let status = match result {
        Ok(reply) => panic!("{what}: answered {reply:?}"),
        Err(status) => status,
    };
    assert_eq!(status.code(), code, "{what}: {status:?}");
    assert!(
        status.message().contains(says),
        "{what}: message {:?}",
        status.message()
    );
    let id = status
        .metadata()
        .get("x-request-id")
        .unwrap_or_else(|| panic!("{what}: no x-request-id in {:?}", status.metadata()));
    assert_eq!(id.len(), 32, "{what}: the gateway's request id");
    status
}

#[tokio::test]
async fn a_unary_call_goes_through_and_an_unknown_method_path_is_unimplemented() {
    let env = GrpcEnv::start().await;
    env.route("echo", "/test.Echo", json!({})).await;
    let mut grpc = env.client().await;
    let answer = unary(&mut grpc, SAY, "hello")
        .await
        .expect("the call succeeds");
    assert_eq!(answer.text, "hello");

    let before = env.server.calls();
    let result = unary(&mut grpc, "/other.Service/Call", "x").await;
    refused(
        "no route",
        result,
        Code::Unimplemented,
        "no route matches this request",
    );
    assert_eq!(env.server.calls(), before, "nothing reached the server");
    // The server's own UNIMPLEMENTED passes through untouched.
    let status = unary(&mut grpc, "/test.Echo/Missing", "x")
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unimplemented);
    assert_eq!(status.message(), "no such method at the server");
    env.stop().await;
}

#[tokio::test]
async fn a_call_without_credentials_on_an_auth_route_is_unauthenticated() {
    let env = GrpcEnv::start().await;
    env.route("echo", "/test.Echo", json!({"auth": {"api_key": true}}))
        .await;
    let mut grpc = env.client().await;
    let status = refused(
        "no api key",
        unary(&mut grpc, SAY, "x").await,
        Code::Unauthenticated,
        "",
    );
    assert!(
        status.metadata().get("www-authenticate").is_some(),
        "the challenge stays: {:?}",
        status.metadata()
    );
    assert_eq!(env.server.calls(), 0, "nothing reached the server");
    env.stop().await;
}

#[tokio::test]
async fn a_service_without_a_healthy_instance_is_unavailable() {
    let env = GrpcEnv::start().await;
    let down = unique("down");
    let mut sick = Svc::new(&down, &format!("{down}-0"), env.server.addr.port());
    sick.status = "critical";
    env.consul.register(&sick).await;
    env.consul
        .put_kv(
            &env.gw.route_key("down"),
            &route(&down, "/test.Echo", json!({"upstream_protocol": "http2"})),
        )
        .await;
    eventually(DEADLINE, "the route with no healthy instance", || {
        let routed = env.gw.upstreams_for(SAY);
        async move { (routed == Some(Vec::new())).then_some(()) }
    })
    .await;
    let mut grpc = env.client().await;
    refused(
        "no instance",
        unary(&mut grpc, SAY, "x").await,
        Code::Unavailable,
        "has no healthy instance",
    );
    assert_eq!(env.server.calls(), 0);
    // Sent as 200, counted as the 503 it is.
    let counted = |status: &'static str| {
        let down = down.clone();
        let gw = &env.gw;
        async move {
            gw.metric(
                "switchyard_requests_total",
                &[("service", &down), ("status", status)],
            )
            .await
        }
    };
    // Counted when the answer is done, which may be just after the client has it.
    eventually(DEADLINE, "the refusal counted as a 503", || async {
        (counted("503").await == 1.0).then_some(())
    })
    .await;
    assert_eq!(counted("200").await, 0.0);
    env.stop().await;
}

#[tokio::test]
async fn a_slow_upstream_past_the_route_timeouts_is_deadline_exceeded() {
    let env = GrpcEnv::start().await;
    env.route(
        "echo",
        "/test.Echo",
        json!({"timeouts": {"per_try_ms": 200, "total_ms": 300}}),
    )
    .await;
    let mut grpc = env.client().await;
    let started = Instant::now();
    refused(
        "slow upstream",
        unary(&mut grpc, SLOW, "x").await,
        Code::DeadlineExceeded,
        "upstream did not answer in time",
    );
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "the gateway answered, not the server's 10 s reply: {:?}",
        started.elapsed()
    );
    env.stop().await;
}

#[tokio::test]
async fn a_rate_limited_call_is_resource_exhausted_and_says_when_to_retry() {
    let env = GrpcEnv::start().await;
    env.route(
        "echo",
        "/test.Echo",
        json!({"rate_limit": {"per_second": 0.001, "burst": 1}}),
    )
    .await;
    let mut grpc = env.client().await;
    unary(&mut grpc, SAY, "first")
        .await
        .expect("within the burst");
    let status = refused(
        "over the limit",
        unary(&mut grpc, SAY, "second").await,
        Code::ResourceExhausted,
        "rate limit exceeded",
    );
    let retry_after = status.metadata().get("retry-after");
    assert!(retry_after.is_some(), "{:?}", status.metadata());
    assert_eq!(
        status
            .metadata()
            .get("ratelimit-remaining")
            .and_then(|v| v.to_str().ok()),
        Some("0")
    );
    assert_eq!(env.server.calls(), 1);
    env.stop().await;
}

#[tokio::test]
async fn a_server_stream_survives_its_route_changing_mid_stream() {
    const MESSAGES: u32 = 40;
    let env = GrpcEnv::start().await;
    let tagged = |tag: &str| json!({"request_headers": {"set": {"x-route-tag": tag}}});
    env.route("echo", "/test.Echo", tagged("one")).await;
    let mut grpc = env.client().await;
    assert_eq!(unary(&mut grpc, SAY, "x").await.unwrap().route_tag, "one");

    grpc.ready().await.unwrap();
    let mut stream = grpc
        .server_streaming(
            request("stream", MESSAGES),
            PathAndQuery::from_static(COUNT),
            ProstCodec::<EchoRequest, EchoReply>::new(),
        )
        .await
        .expect("the stream starts")
        .into_inner();
    let mut got = Vec::new();
    for _ in 0..MESSAGES / 2 {
        let next = tokio::time::timeout(DEADLINE, stream.message()).await;
        got.push(
            next.expect("in time")
                .expect("a message")
                .expect("not the end"),
        );
    }

    // The route changes while the stream waits half way: a new call sees the new rules.
    env.put_route("echo", "/test.Echo", tagged("two")).await;
    let mut fresh = grpc.clone();
    eventually(DEADLINE, "new calls use the changed route", || {
        let mut grpc = fresh.clone();
        async move {
            let reply = unary(&mut grpc, SAY, "x").await.ok()?;
            (reply.route_tag == "two").then_some(())
        }
    })
    .await;
    assert_eq!(unary(&mut fresh, SAY, "x").await.unwrap().route_tag, "two");

    env.server.state.gate.send(true).unwrap();
    loop {
        let next = tokio::time::timeout(DEADLINE, stream.message()).await;
        match next.expect("in time").expect("no error before the end") {
            Some(message) => got.push(message),
            None => break,
        }
    }
    let trailers = stream.trailers().await.expect("trailers");
    assert!(
        trailers.is_some(),
        "the stream ends with the server's trailers"
    );
    let seqs: Vec<u32> = got.iter().map(|m| m.seq).collect();
    assert_eq!(
        seqs,
        (0..MESSAGES).collect::<Vec<_>>(),
        "every message, in order"
    );
    assert!(
        got.iter()
            .all(|m| m.route_tag == "one" && m.text == "stream"),
        "the stream kept the route it started on"
    );
    env.stop().await;
}

#[tokio::test]
async fn a_refusal_is_one_headers_frame_over_http2_and_a_bare_head_over_http1() {
    use http_body::Body as _;
    use http_body_util::BodyExt;
    let env = GrpcEnv::start().await;
    env.route("echo", "/test.Echo", json!({})).await;
    let proxy = env.gw.app.proxy_addr();

    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build_http::<http_body_util::Full<bytes::Bytes>>();
    let send = |content_type: &'static str| {
        let req = http::Request::post(format!("http://{proxy}/other.Service/Call"))
            .header("content-type", content_type)
            .header("te", "trailers")
            .body(http_body_util::Full::new(bytes::Bytes::from_static(
                b"\0\0\0\0\0",
            )))
            .unwrap();
        tokio::time::timeout(DEADLINE, client.request(req))
    };
    let resp = send("application/grpc+proto").await.unwrap().unwrap();
    assert_eq!(resp.version(), http::Version::HTTP_2);
    assert_eq!(resp.status(), 200);
    let h = resp.headers();
    assert_eq!(h["content-type"], "application/grpc");
    assert_eq!(h["grpc-status"], "12");
    assert_eq!(h["grpc-message"], "no route matches this request");
    assert_eq!(h["x-request-id"].len(), 32);
    assert!(
        resp.body().is_end_stream(),
        "END_STREAM came with the headers"
    );
    let collected = resp.into_body().collect().await.unwrap();
    assert!(collected.trailers().is_none(), "no trailers frame follows");
    assert!(collected.to_bytes().is_empty());

    // A prefix of a gRPC media type is not one: JSON, as for any client.
    let resp = send("application/grpcx").await.unwrap().unwrap();
    assert_eq!(resp.status(), 404);
    assert_eq!(resp.headers()["content-type"], "application/json");

    // gRPC-Web over HTTP/1.1: the same answer as a head with an empty body.
    let mut tcp = tokio::net::TcpStream::connect(proxy).await.unwrap();
    tcp.write_all(
        b"POST /other.Service/Call HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\
          Content-Type: application/grpc-web-text\r\nContent-Length: 8\r\n\r\nAAAAAAA=",
    )
    .await
    .unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(DEADLINE, tcp.read_to_end(&mut answer))
        .await
        .expect("the gateway answers and closes")
        .unwrap();
    let answer = String::from_utf8(answer).unwrap();
    let (head, body) = answer.split_once("\r\n\r\n").expect("a whole head");
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    let fields: Vec<String> = head.lines().skip(1).map(str::to_ascii_lowercase).collect();
    for want in [
        "content-type: application/grpc-web-text",
        "grpc-status: 12",
        "grpc-message: no route matches this request",
        "content-length: 0",
    ] {
        assert!(fields.iter().any(|f| f == want), "{want} in {head}");
    }
    assert!(fields.iter().any(|f| f.starts_with("x-request-id: ")));
    assert!(body.is_empty(), "no body: {body:?}");
    env.stop().await;
}
