//! Demo upstreams for the quick start and docker-compose: an HTTP echo service that can
//! register itself in Consul with an HTTP health check, and whose health can be flipped
//! (`PUT /_demo/health?status=fail|ok`) to watch the gateway fail over.
//!
//! It speaks to Consul only over HTTP, like any service would; nothing here is gateway code.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

use crate::shutdown::Shutdown;

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("consul at {url}: {message}")]
    Consul { url: String, message: String },
}

/// A running echo instance.
#[derive(Clone)]
pub struct Echo {
    pub id: String,
    pub addr: SocketAddr,
    healthy: Arc<AtomicBool>,
    hits: Arc<AtomicU64>,
}

impl Echo {
    /// Requests answered so far (health checks excluded).
    pub fn hits(&self) -> u64 {
        self.hits.load(Ordering::Relaxed)
    }

    pub fn set_healthy(&self, healthy: bool) {
        self.healthy.store(healthy, Ordering::Relaxed);
    }
}

/// Serves the echo service on `listener` until `shutdown`.
pub fn start_echo(listener: TcpListener, id: &str, shutdown: Shutdown) -> std::io::Result<Echo> {
    let addr = listener.local_addr()?;
    let echo = Echo {
        id: id.to_string(),
        addr,
        healthy: Arc::new(AtomicBool::new(true)),
        hits: Arc::new(AtomicU64::new(0)),
    };
    let server = echo.clone();
    tokio::spawn(async move {
        loop {
            let (stream, _) = tokio::select! {
                _ = shutdown.wait() => return,
                r = listener.accept() => match r {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::warn!(error = %e, "echo accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let echo = server.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req| {
                    let echo = echo.clone();
                    async move { Ok::<_, Infallible>(answer(&echo, req).await) }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection_with_upgrades(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Ok(echo)
}

async fn answer(echo: &Echo, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_string();
    if path == "/health" {
        return if echo.healthy.load(Ordering::Relaxed) {
            text(StatusCode::OK, "ok")
        } else {
            text(StatusCode::SERVICE_UNAVAILABLE, "failing")
        };
    }
    if path == "/_demo/health" && req.method() == hyper::Method::PUT {
        let fail = req.uri().query().is_some_and(|q| q.contains("status=fail"));
        echo.set_healthy(!fail);
        return text(StatusCode::OK, if fail { "failing" } else { "ok" });
    }
    echo.hits.fetch_add(1, Ordering::Relaxed);
    let method = req.method().to_string();
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
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => Bytes::new(),
    };
    let doc = serde_json::json!({
        "instance": echo.id,
        "method": method,
        "path": path,
        "query": query,
        "headers": headers,
        "body_bytes": body.len(),
    });
    let mut resp = Response::new(Full::new(Bytes::from(doc.to_string())));
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    resp
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *r.status_mut() = status;
    r
}

/// What to tell Consul about an echo instance.
#[derive(Debug, Clone)]
pub struct Registration {
    pub consul: String,
    pub token: Option<String>,
    pub name: String,
    pub id: String,
    /// Address other hosts reach this instance at.
    pub address: String,
    pub port: u16,
    pub tags: Vec<String>,
    pub check_interval: Duration,
}

/// Registers the instance with an HTTP check on `/health` (agent API, as any service would).
pub async fn register(reg: &Registration) -> Result<(), DemoError> {
    let check_url = format!("http://{}:{}/health", bracket(&reg.address), reg.port);
    let body = serde_json::json!({
        "Name": reg.name,
        "ID": reg.id,
        "Address": reg.address,
        "Port": reg.port,
        "Tags": reg.tags,
        "Meta": {"demo": "true"},
        "Check": {
            "HTTP": check_url,
            "Interval": format!("{}ms", reg.check_interval.as_millis()),
            "Timeout": "2s",
            "DeregisterCriticalServiceAfter": "10m",
        }
    });
    put(reg, "/v1/agent/service/register", Some(body)).await
}

pub async fn deregister(reg: &Registration) -> Result<(), DemoError> {
    put(
        reg,
        &format!("/v1/agent/service/deregister/{}", reg.id),
        None,
    )
    .await
}

async fn put(
    reg: &Registration,
    path: &str,
    body: Option<serde_json::Value>,
) -> Result<(), DemoError> {
    let url = format!("{}{}", reg.consul.trim_end_matches('/'), path);
    let err = |message: String| DemoError::Consul {
        url: url.clone(),
        message,
    };
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .map_err(|e| err(e.to_string()))?;
    let mut req = client.put(&url);
    if let Some(t) = &reg.token {
        req = req.header("X-Consul-Token", t);
    }
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().await.map_err(|e| err(e.to_string()))?;
    if !resp.status().is_success() {
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        return Err(err(format!("{status}: {text}")));
    }
    Ok(())
}

fn bracket(addr: &str) -> String {
    if addr.contains(':') && !addr.starts_with('[') {
        format!("[{addr}]")
    } else {
        addr.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn echo_reports_itself_and_its_health_can_be_flipped() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let shutdown = Shutdown::new();
        let echo = start_echo(listener, "demo-1", shutdown.clone()).unwrap();
        let base = format!("http://{}", echo.addr);
        let client = reqwest::Client::new();
        let doc: serde_json::Value = client
            .get(format!("{base}/hello?x=1"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(doc["instance"], "demo-1");
        assert_eq!(doc["path"], "/hello");
        assert_eq!(doc["query"], "x=1");
        assert_eq!(echo.hits(), 1);
        let health = |c: reqwest::Client, u: String| async move {
            c.get(u).send().await.unwrap().status().as_u16()
        };
        assert_eq!(health(client.clone(), format!("{base}/health")).await, 200);
        client
            .put(format!("{base}/_demo/health?status=fail"))
            .send()
            .await
            .unwrap();
        assert_eq!(health(client.clone(), format!("{base}/health")).await, 503);
        shutdown.trigger();
    }
}
