//! Demo upstreams for the quick start: small HTTP servers on loopback that echo each request
//! as JSON, registered in the registry with real HTTP checks on `/health`.

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use super::{Registry, RegistryError};

/// One running demo instance; dropping it stops the server (its check then turns critical).
pub struct DemoInstance {
    pub service: String,
    pub id: String,
    pub addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Drop for DemoInstance {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The services `switchyard dev` starts: `web` (tags `v1`, two instances) and `api` (two instances).
pub const DEMO_SERVICES: &[(&str, &[&str], usize)] = &[("web", &["v1"], 2), ("api", &[], 2)];

/// Starts the demo services and registers them with HTTP checks every 2 s.
pub async fn start_demo_services(reg: &Registry) -> Result<Vec<DemoInstance>, RegistryError> {
    let mut out = Vec::new();
    for (service, tags, count) in DEMO_SERVICES {
        for i in 1..=*count {
            let id = format!("{service}-{i}");
            let inst = serve_echo(service, &id)
                .await
                .map_err(|source| RegistryError::Bind {
                    addr: SocketAddr::from(([127, 0, 0, 1], 0)),
                    source,
                })?;
            reg.register_service_json(json!({
                "Name": service, "ID": id, "Tags": tags,
                "Address": inst.addr.ip().to_string(), "Port": inst.addr.port(),
                "Meta": {"demo": "true"},
                "Check": {
                    "HTTP": format!("http://{}/health", inst.addr),
                    "Interval": "2s", "Timeout": "1s", "Status": "passing"
                }
            }))?;
            out.push(inst);
        }
    }
    Ok(out)
}

/// Starts one echo server on an ephemeral loopback port.
pub async fn serve_echo(service: &str, id: &str) -> io::Result<DemoInstance> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let (svc_name, inst_id) = (service.to_string(), id.to_string());
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            };
            let (svc_name, inst_id) = (svc_name.clone(), inst_id.clone());
            tokio::spawn(async move {
                let handler = service_fn(move |req: Request<Incoming>| {
                    let body = echo(&svc_name, &inst_id, &req);
                    async move { Ok::<_, Infallible>(body) }
                });
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), handler)
                    .await;
            });
        }
    });
    Ok(DemoInstance {
        service: service.to_string(),
        id: id.to_string(),
        addr,
        task,
    })
}

fn echo(service: &str, id: &str, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    if req.uri().path() == "/health" {
        return Response::new(Full::new(Bytes::from_static(b"ok")));
    }
    let headers: serde_json::Map<String, serde_json::Value> = req
        .headers()
        .iter()
        .map(|(k, v)| (k.to_string(), json!(String::from_utf8_lossy(v.as_bytes()))))
        .collect();
    let body = json!({
        "service": service,
        "instance": id,
        "method": req.method().as_str(),
        "uri": req.uri().to_string(),
        "headers": headers,
    });
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    r
}
