//! Demo upstreams for the quick start, docker-compose and tests: an HTTP server that echoes
//! each request as JSON, with a `/health` endpoint whose answer can be flipped
//! (`PUT /_demo/health?status=fail|ok`) to watch a gateway fail over. `switchyard dev`
//! registers them here with real HTTP checks; `switchyard echo` serves one on its own.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use super::{Registry, RegistryError};

/// The demo service `switchyard dev` starts: two instances of `demo`.
pub const DEMO_SERVICE: &str = "demo";
pub const DEMO_INSTANCES: usize = 2;

/// One running echo instance; dropping it stops the server (its check then turns critical).
pub struct DemoInstance {
    pub service: String,
    pub id: String,
    pub addr: SocketAddr,
    healthy: Arc<AtomicBool>,
    hits: Arc<AtomicU64>,
    task: JoinHandle<()>,
}

impl DemoInstance {
    /// Requests echoed so far (health probes excluded).
    pub fn hits(&self) -> u64 {
        self.hits.load(Ordering::Relaxed)
    }

    /// What `/health` answers: 200 when healthy, else 503.
    pub fn set_healthy(&self, healthy: bool) {
        self.healthy.store(healthy, Ordering::Relaxed);
    }

    /// The HTTP check URL of this instance.
    pub fn health_url(&self) -> String {
        format!("http://{}/health", self.addr)
    }
}

impl Drop for DemoInstance {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Starts [`DEMO_INSTANCES`] echo instances of [`DEMO_SERVICE`] (`demo-1`, `demo-2`) on
/// loopback and registers them with HTTP checks on `/health` every second.
pub async fn start_demo_services(reg: &Registry) -> Result<Vec<DemoInstance>, RegistryError> {
    let mut out = Vec::new();
    for i in 1..=DEMO_INSTANCES {
        let id = format!("{DEMO_SERVICE}-{i}");
        let inst = serve_echo(DEMO_SERVICE, &id)
            .await
            .map_err(|source| RegistryError::Bind {
                addr: SocketAddr::from(([127, 0, 0, 1], 0)),
                source,
            })?;
        reg.register_service_json(json!({
            "Name": DEMO_SERVICE, "ID": id,
            "Address": inst.addr.ip().to_string(), "Port": inst.addr.port(),
            "Meta": {"demo": "true"},
            "Check": {
                "HTTP": inst.health_url(),
                "Interval": "1s", "Timeout": "1s", "Status": "passing"
            }
        }))?;
        out.push(inst);
    }
    Ok(out)
}

/// Starts one echo server on an ephemeral loopback port.
pub async fn serve_echo(service: &str, id: &str) -> io::Result<DemoInstance> {
    serve_echo_on(TcpListener::bind("127.0.0.1:0").await?, service, id)
}

/// Serves the echo on `listener` until the returned instance is dropped.
pub fn serve_echo_on(listener: TcpListener, service: &str, id: &str) -> io::Result<DemoInstance> {
    let addr = listener.local_addr()?;
    let echo = Arc::new(Echo {
        service: service.to_string(),
        id: id.to_string(),
        healthy: Arc::new(AtomicBool::new(true)),
        hits: Arc::new(AtomicU64::new(0)),
    });
    let (healthy, hits) = (echo.healthy.clone(), echo.hits.clone());
    let task = tokio::spawn(async move {
        loop {
            let stream = match listener.accept().await {
                Ok((s, _)) => s,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let echo = echo.clone();
            tokio::spawn(async move {
                let handler = service_fn(move |req: Request<Incoming>| {
                    let echo = echo.clone();
                    async move { Ok::<_, Infallible>(echo.answer(req).await) }
                });
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection_with_upgrades(TokioIo::new(stream), handler)
                    .await;
            });
        }
    });
    Ok(DemoInstance {
        service: service.to_string(),
        id: id.to_string(),
        addr,
        healthy,
        hits,
        task,
    })
}

struct Echo {
    service: String,
    id: String,
    healthy: Arc<AtomicBool>,
    hits: Arc<AtomicU64>,
}

impl Echo {
    async fn answer(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        let path = req.uri().path().to_string();
        if path == "/health" {
            return if self.healthy.load(Ordering::Relaxed) {
                text(StatusCode::OK, "ok\n")
            } else {
                text(StatusCode::SERVICE_UNAVAILABLE, "failing\n")
            };
        }
        if path == "/_demo/health" && req.method() == Method::PUT {
            let fail = req
                .uri()
                .query()
                .is_some_and(|q| q.split('&').any(|p| p == "status=fail"));
            self.healthy.store(!fail, Ordering::Relaxed);
            return text(StatusCode::OK, if fail { "failing\n" } else { "ok\n" });
        }
        self.hits.fetch_add(1, Ordering::Relaxed);
        let method = req.method().to_string();
        let uri = req.uri().to_string();
        let query = req.uri().query().unwrap_or("").to_string();
        let headers: BTreeMap<String, String> = req
            .headers()
            .iter()
            .map(|(k, v)| {
                (
                    k.to_string(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect();
        let body_bytes = match req.into_body().collect().await {
            Ok(b) => b.to_bytes().len(),
            Err(_) => 0,
        };
        let doc = json!({
            "service": self.service,
            "instance": self.id,
            "method": method,
            "uri": uri,
            "path": path,
            "query": query,
            "headers": headers,
            "body_bytes": body_bytes,
        });
        let mut r = Response::new(Full::new(Bytes::from(doc.to_string() + "\n")));
        r.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/json"),
        );
        r
    }
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *r.status_mut() = status;
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn echo_reports_itself_and_its_health_can_be_flipped() {
        let echo = serve_echo("demo", "demo-1").await.unwrap();
        let base = format!("http://{}", echo.addr);
        let client = reqwest::Client::new();
        let doc: serde_json::Value = client
            .post(format!("{base}/hello?x=1"))
            .body("abc")
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(doc["service"], "demo");
        assert_eq!(doc["instance"], "demo-1");
        assert_eq!(doc["method"], "POST");
        assert_eq!(doc["path"], "/hello");
        assert_eq!(doc["query"], "x=1");
        assert_eq!(doc["body_bytes"], 3);
        assert_eq!(echo.hits(), 1);
        let health = |c: reqwest::Client, u: String| async move {
            c.get(u).send().await.unwrap().status().as_u16()
        };
        assert_eq!(health(client.clone(), echo.health_url()).await, 200);
        client
            .put(format!("{base}/_demo/health?status=fail"))
            .send()
            .await
            .unwrap();
        assert_eq!(health(client.clone(), echo.health_url()).await, 503);
        echo.set_healthy(true);
        assert_eq!(health(client.clone(), echo.health_url()).await, 200);
        assert_eq!(echo.hits(), 1, "health probes are not counted");
    }
}
