//! Real upstream HTTP servers for the end-to-end tests, on `127.0.0.1:0`: HTTP/1.1 and h2c,
//! with behaviours chosen by the end of the path (so any route prefix may come first) and
//! one server covers every proxy test.
//!
//! - `/slow?ms=N`: answers after N ms.
//! - `/hold`: answers once [`Upstream::release`] is called (at once after that), so a test
//!   holds requests in flight for exactly as long as it needs.
//! - `/status/N`: answers status N.
//! - `/count`: reads the whole body and answers its length (nothing is kept).
//! - `/bytes?n=N`: streams N bytes back in 64 KiB chunks.
//! - `/grpc`: a gRPC-shaped answer with `grpc-status` in trailers.
//! - `/die`: drops the connection without answering.
//! - `/ws`: WebSocket echo.
//! - anything else: JSON with the server name, method, path+query, version and headers.
//!
//! [`Upstream::set_failing`] makes every request answer 503; [`Upstream::kill`] closes the
//! listener and every open connection at once, like a killed process.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{Request, Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;

type Body = BoxBody<Bytes, std::io::Error>;

pub struct Upstream {
    pub name: String,
    pub addr: SocketAddr,
    hits: Arc<AtomicU64>,
    failing: Arc<AtomicBool>,
    gate: Arc<watch::Sender<bool>>,
    tasks: Arc<Mutex<JoinSet<()>>>,
    accept: tokio::task::JoinHandle<()>,
}

impl Upstream {
    pub async fn start(name: &str) -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let hits = Arc::new(AtomicU64::new(0));
        let failing = Arc::new(AtomicBool::new(false));
        let gate = Arc::new(watch::channel(false).0);
        let tasks = Arc::new(Mutex::new(JoinSet::new()));
        let accept = {
            let (name, hits, failing, gate, tasks) = (
                name.to_string(),
                hits.clone(),
                failing.clone(),
                gate.clone(),
                tasks.clone(),
            );
            tokio::spawn(async move {
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        continue;
                    };
                    let (name, hits, failing, gate) =
                        (name.clone(), hits.clone(), failing.clone(), gate.clone());
                    let conn = async move {
                        let service = service_fn(move |req| {
                            handle(
                                req,
                                name.clone(),
                                hits.clone(),
                                failing.clone(),
                                gate.clone(),
                            )
                        });
                        let _ = auto::Builder::new(TokioExecutor::new())
                            .serve_connection_with_upgrades(TokioIo::new(stream), service)
                            .await;
                    };
                    tasks.lock().unwrap().spawn(conn);
                }
            })
        };
        Upstream {
            name: name.to_string(),
            addr,
            hits,
            failing,
            gate,
            tasks,
            accept,
        }
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Requests that reached this server.
    pub fn hits(&self) -> u64 {
        self.hits.load(Ordering::SeqCst)
    }

    pub fn set_failing(&self, failing: bool) {
        self.failing.store(failing, Ordering::SeqCst);
    }

    /// Answers every `/hold` request waiting now, and every later one at once.
    pub fn release(&self) {
        self.gate.send_replace(true);
    }

    /// Stops accepting and drops every connection, mid-request or not.
    pub fn kill(&self) {
        self.accept.abort();
        self.tasks.lock().unwrap().abort_all();
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.kill();
    }
}

async fn handle(
    req: Request<Incoming>,
    name: String,
    hits: Arc<AtomicU64>,
    failing: Arc<AtomicBool>,
    gate: Arc<watch::Sender<bool>>,
) -> Result<Response<Body>, std::io::Error> {
    hits.fetch_add(1, Ordering::SeqCst);
    // Behaviours key on the last path segments, so any route prefix can be in front.
    let full_path = req.uri().path().to_string();
    let segments: Vec<&str> = full_path.split('/').collect();
    let last = segments.last().copied().unwrap_or("");
    let path = match segments.len() {
        n if n >= 2 && segments[n - 2] == "status" => format!("/status/{last}"),
        _ => format!("/{last}"),
    };
    let query = req.uri().query().unwrap_or("").to_string();
    let param = |key: &str| -> Option<u64> {
        query
            .split('&')
            .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('=')?.parse().ok())
    };
    let mut resp = if failing.load(Ordering::SeqCst) {
        text(StatusCode::SERVICE_UNAVAILABLE, "failing")
    } else if path == "/slow" {
        tokio::time::sleep(Duration::from_millis(param("ms").unwrap_or(1000))).await;
        text(StatusCode::OK, "slow")
    } else if path == "/hold" {
        let _ = gate.subscribe().wait_for(|open| *open).await;
        text(StatusCode::OK, "held")
    } else if let Some(code) = path.strip_prefix("/status/") {
        let code = code.parse().ok().and_then(|c| StatusCode::from_u16(c).ok());
        text(code.unwrap_or(StatusCode::BAD_REQUEST), "status")
    } else if path == "/count" {
        let mut body = req.into_body();
        let mut n = 0u64;
        while let Some(frame) = body.frame().await {
            match frame {
                Ok(f) => n += f.data_ref().map_or(0, |d| d.len() as u64),
                Err(e) => return Err(std::io::Error::other(e)),
            }
        }
        text(StatusCode::OK, &n.to_string())
    } else if path == "/bytes" {
        let total = param("n").unwrap_or(0);
        let chunk = Bytes::from(vec![b'x'; 64 * 1024]);
        let stream = futures_util::stream::unfold(total, move |left| {
            let chunk = chunk.clone();
            async move {
                if left == 0 {
                    return None;
                }
                let take = left.min(chunk.len() as u64);
                Some((
                    Ok::<_, std::io::Error>(Frame::data(chunk.slice(..take as usize))),
                    left - take,
                ))
            }
        });
        Response::new(BodyExt::boxed(StreamBody::new(stream)))
    } else if path == "/grpc" {
        // A gRPC-shaped answer: one data frame, then `grpc-status` in trailers.
        let mut trailers = http::HeaderMap::new();
        trailers.insert("grpc-status", "0".parse().unwrap());
        let frames = futures_util::stream::iter([
            Ok::<_, std::io::Error>(Frame::data(Bytes::from_static(b"\0\0\0\0\x02hi"))),
            Ok(Frame::trailers(trailers)),
        ]);
        let mut r = Response::new(BodyExt::boxed(StreamBody::new(frames)));
        r.headers_mut()
            .insert("content-type", "application/grpc".parse().unwrap());
        r
    } else if path == "/die" {
        return Err(std::io::Error::other("dying on purpose"));
    } else if path == "/ws" {
        return Ok(websocket(req));
    } else {
        // Repeated headers joined in order, as a proxy would combine them, so a header
        // sent twice shows.
        let headers: serde_json::Map<String, serde_json::Value> = req
            .headers()
            .keys()
            .map(|k| {
                let all: Vec<&str> = req
                    .headers()
                    .get_all(k)
                    .iter()
                    .map(|v| v.to_str().unwrap_or("?"))
                    .collect();
                (k.to_string(), json!(all.join(", ")))
            })
            .collect();
        let body = json!({
            "server": name,
            "method": req.method().as_str(),
            "path": req.uri().path_and_query().map(|p| p.as_str()).unwrap_or(""),
            "version": format!("{:?}", req.version()),
            "headers": headers,
        });
        let mut r = text(StatusCode::OK, &body.to_string());
        r.headers_mut()
            .insert("content-type", "application/json".parse().unwrap());
        if param("own_id") == Some(1) {
            // What an instance behind another proxy might answer with.
            r.headers_mut()
                .insert("x-request-id", "upstream-id".parse().unwrap());
            r.headers_mut()
                .insert("via", "1.1 inner-proxy".parse().unwrap());
        }
        r
    };
    resp.headers_mut()
        .insert("x-upstream", name.parse().unwrap());
    Ok(resp)
}

fn text(status: StatusCode, body: &str) -> Response<Body> {
    let mut r = Response::new(
        Full::new(Bytes::from(body.to_string()))
            .map_err(|e: Infallible| match e {})
            .boxed(),
    );
    *r.status_mut() = status;
    r
}

fn websocket(mut req: Request<Incoming>) -> Response<Body> {
    use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
    use tokio_tungstenite::tungstenite::protocol::Role;
    let Some(key) = req.headers().get("sec-websocket-key").cloned() else {
        return text(StatusCode::BAD_REQUEST, "not a websocket request");
    };
    let on_upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        let Ok(upgraded) = on_upgrade.await else {
            return;
        };
        let mut ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
            TokioIo::new(upgraded),
            Role::Server,
            None,
        )
        .await;
        while let Some(Ok(msg)) = ws.next().await {
            if msg.is_text() || msg.is_binary() {
                if ws.send(msg).await.is_err() {
                    break;
                }
            } else if msg.is_close() {
                break;
            }
        }
    });
    let mut r = text(StatusCode::SWITCHING_PROTOCOLS, "");
    let h = r.headers_mut();
    h.insert("connection", "upgrade".parse().unwrap());
    h.insert("upgrade", "websocket".parse().unwrap());
    h.insert(
        "sec-websocket-accept",
        derive_accept_key(key.as_bytes()).parse().unwrap(),
    );
    r
}
