//! A small in-process stand-in for a Consul agent, for tests and the discovery benchmark
//! until the embedded dev registry (`src/devregistry`) is available. It implements the
//! subset the gateway and the tests use, with Consul's blocking-query semantics (strictly
//! greater index, `wait`, per-service and KV result indexes, KV 404 with an index), and
//! fault injection: latency, `500 No cluster leader`, dropped connections, undecodable
//! JSON, an index that goes backwards, stop and restart on the same port.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;

/// Fault switches; flip them while a test runs.
#[derive(Debug, Default)]
pub struct Faults {
    latency_ms: AtomicU64,
    no_leader: AtomicBool,
    drop_connections: AtomicBool,
    bad_json: AtomicBool,
    store: Mutex<Option<Arc<Shared>>>,
}

impl Faults {
    /// Every answer is delayed by this much.
    pub fn set_latency(&self, d: Duration) {
        self.latency_ms
            .store(d.as_millis() as u64, Ordering::Relaxed);
    }
    /// Reads and writes answer `500 rpc error making call: No cluster leader`.
    pub fn set_no_leader(&self, on: bool) {
        self.no_leader.store(on, Ordering::Relaxed);
    }
    /// Requests are answered by closing the connection.
    pub fn set_drop_connections(&self, on: bool) {
        self.drop_connections.store(on, Ordering::Relaxed);
    }
    /// Read bodies are truncated JSON.
    pub fn set_bad_json(&self, on: bool) {
        self.bad_json.store(on, Ordering::Relaxed);
    }
    /// Every index goes back to a small value, as after a snapshot restore.
    pub fn reset_index(&self) {
        if let Some(shared) = self.store.lock().unwrap().as_ref() {
            let mut s = shared.store.lock().unwrap();
            s.index = 2;
            s.kv_index = 2;
            for v in s.service_index.values_mut() {
                *v = 2;
            }
            drop(s);
            shared.changed.send_modify(|v| *v += 1);
        }
    }
}

#[derive(Debug, Clone)]
struct Svc {
    name: String,
    tags: Vec<String>,
    address: String,
    port: u16,
    weights: Value,
    status: String,
    output: String,
    maintenance: bool,
}

#[derive(Debug, Default)]
struct Store {
    index: u64,
    kv: BTreeMap<String, (Vec<u8>, u64, u64)>,
    kv_index: u64,
    /// Instances by service name, then service id.
    services: HashMap<String, BTreeMap<String, Svc>>,
    /// Service name of each service id.
    names: HashMap<String, String>,
    /// Result index of `health/service/<name>`, raised by any change to that service.
    service_index: HashMap<String, u64>,
}

impl Store {
    fn bump(&mut self) -> u64 {
        self.index += 1;
        self.index
    }
    fn touch_service(&mut self, name: &str) {
        let i = self.bump();
        self.service_index.insert(name.to_string(), i);
    }
    fn svc_mut(&mut self, id: &str) -> Option<&mut Svc> {
        let name = self.names.get(id)?;
        self.services.get_mut(name)?.get_mut(id)
    }
}

#[derive(Debug)]
struct Shared {
    store: Mutex<Store>,
    changed: watch::Sender<u64>,
    faults: Arc<Faults>,
    /// When set, requests without this `X-Consul-Token` get 403.
    token: Option<String>,
}

/// How the fake agent is set up.
#[derive(Default, Clone)]
pub struct FakeOptions {
    pub token: Option<String>,
    /// Serve HTTPS with this configuration (e.g. requiring client certificates).
    pub tls: Option<Arc<rustls::ServerConfig>>,
}

/// A running fake agent.
pub struct FakeConsul {
    addr: SocketAddr,
    shared: Arc<Shared>,
    tls: Option<tokio_rustls::TlsAcceptor>,
    server: Mutex<Option<JoinSet<()>>>,
}

impl FakeConsul {
    pub async fn start() -> FakeConsul {
        FakeConsul::start_with(FakeOptions::default()).await
    }

    pub async fn start_with(options: FakeOptions) -> FakeConsul {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let faults = Arc::new(Faults::default());
        let (changed, _) = watch::channel(0);
        let shared = Arc::new(Shared {
            store: Mutex::new(Store {
                index: 10,
                kv_index: 10,
                ..Store::default()
            }),
            changed,
            faults: faults.clone(),
            token: options.token,
        });
        *faults.store.lock().unwrap() = Some(shared.clone());
        let fake = FakeConsul {
            addr,
            shared,
            tls: options.tls.map(tokio_rustls::TlsAcceptor::from),
            server: Mutex::new(None),
        };
        fake.serve(listener);
        fake
    }

    fn serve(&self, listener: TcpListener) {
        let mut set = JoinSet::new();
        let shared = self.shared.clone();
        let tls = self.tls.clone();
        set.spawn(async move {
            let mut conns = JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let shared = shared.clone();
                let tls = tls.clone();
                conns.spawn(async move {
                    let svc = service_fn(move |req| {
                        let shared = shared.clone();
                        async move { handle(&shared, req).await }
                    });
                    let http = hyper::server::conn::http1::Builder::new();
                    match tls {
                        None => {
                            let _ = http.serve_connection(TokioIo::new(stream), svc).await;
                        }
                        Some(acceptor) => {
                            if let Ok(stream) = acceptor.accept(stream).await {
                                let _ = http.serve_connection(TokioIo::new(stream), svc).await;
                            }
                        }
                    }
                });
                while conns.try_join_next().is_some() {}
            }
        });
        *self.server.lock().unwrap() = Some(set);
    }

    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    pub fn faults(&self) -> &Faults {
        &self.shared.faults
    }

    /// Closes the port and every open connection (state is kept).
    pub async fn stop(&self) {
        let set = self.server.lock().unwrap().take();
        if let Some(mut set) = set {
            set.abort_all();
            while set.join_next().await.is_some() {}
        }
    }

    /// Listens again on the same port.
    pub async fn restart(&self) -> std::io::Result<()> {
        let listener = TcpListener::bind(self.addr).await?;
        self.serve(listener);
        Ok(())
    }
}

type Resp = Response<Full<Bytes>>;

#[derive(Debug)]
struct Dropped;
impl std::fmt::Display for Dropped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("connection dropped by fault injection")
    }
}
impl std::error::Error for Dropped {}

async fn handle(shared: &Arc<Shared>, req: Request<Incoming>) -> Result<Resp, Dropped> {
    let f = &shared.faults;
    let latency = f.latency_ms.load(Ordering::Relaxed);
    if latency > 0 {
        tokio::time::sleep(Duration::from_millis(latency)).await;
    }
    if f.drop_connections.load(Ordering::Relaxed) {
        return Err(Dropped);
    }
    if f.no_leader.load(Ordering::Relaxed) {
        return Ok(text(500, "rpc error making call: No cluster leader", 0));
    }
    if let Some(token) = &shared.token {
        let given = req.headers().get("x-consul-token").map(|v| v.as_bytes());
        if given != Some(token.as_bytes()) {
            return Ok(text(
                403,
                "Permission denied: anonymous token lacks permission",
                0,
            ));
        }
    }
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let query: HashMap<String, String> = req
        .uri()
        .query()
        .map(|q| {
            url::form_urlencoded::parse(q.as_bytes())
                .into_owned()
                .collect()
        })
        .unwrap_or_default();
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let path = percent_encoding::percent_decode_str(&path)
        .decode_utf8_lossy()
        .into_owned();
    if method == Method::GET {
        return Ok(read(shared, &path, &query).await);
    }
    Ok(write(shared, &method, &path, &query, &body))
}

fn parse_wait(w: &str) -> Duration {
    let (num, unit) = w.split_at(w.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(w.len()));
    let n: f64 = num.parse().unwrap_or(300.0);
    match unit {
        "ms" => Duration::from_secs_f64(n / 1000.0),
        "m" => Duration::from_secs_f64(n * 60.0),
        _ => Duration::from_secs_f64(n),
    }
}

async fn read(shared: &Arc<Shared>, path: &str, q: &HashMap<String, String>) -> Resp {
    let index: u64 = match q.get("index").map(|i| i.parse()) {
        None => 0,
        Some(Ok(i)) => i,
        Some(Err(_)) => return text(400, "Invalid index", 0),
    };
    let wait = q
        .get("wait")
        .map(|w| parse_wait(w))
        .unwrap_or(Duration::from_secs(300));
    let deadline = tokio::time::Instant::now() + wait.min(Duration::from_secs(600));
    let mut changed = shared.changed.subscribe();
    loop {
        let result_index = result_index(shared, path);
        if index == 0 || result_index > index || tokio::time::Instant::now() >= deadline {
            let (status, body, result_index) = evaluate(shared, path, q);
            let mut bytes = body.map(|b| b.to_string().into_bytes()).unwrap_or_default();
            if shared.faults.bad_json.load(Ordering::Relaxed) && !bytes.is_empty() {
                bytes.truncate(bytes.len() / 2);
            }
            return Response::builder()
                .status(status)
                .header("Content-Type", "application/json")
                .header("X-Consul-Index", result_index.max(1).to_string())
                .header("X-Consul-KnownLeader", "true")
                .header("X-Consul-LastContact", "0")
                .body(Full::new(Bytes::from(bytes)))
                .unwrap();
        }
        let _ = tokio::time::timeout_at(deadline, changed.changed()).await;
    }
}

/// The index a read of `path` would report, without building its body.
fn result_index(shared: &Shared, path: &str) -> u64 {
    let s = shared.store.lock().unwrap();
    if path.starts_with("/v1/kv/") {
        return s.kv_index;
    }
    if let Some(name) = path.strip_prefix("/v1/health/service/") {
        return s.service_index.get(name).copied().unwrap_or(s.index);
    }
    s.index
}

fn evaluate(shared: &Shared, path: &str, q: &HashMap<String, String>) -> (u16, Option<Value>, u64) {
    let s = shared.store.lock().unwrap();
    if let Some(key) = path.strip_prefix("/v1/kv/") {
        let entry = |k: &String, v: &(Vec<u8>, u64, u64)| {
            json!({"LockIndex": 0, "Key": k, "Flags": 0,
                   "Value": if v.0.is_empty() { Value::Null } else {
                       Value::String(base64::engine::general_purpose::STANDARD.encode(&v.0)) },
                   "CreateIndex": v.1, "ModifyIndex": v.2})
        };
        let list: Vec<Value> = if q.contains_key("recurse") {
            s.kv.iter()
                .filter(|(k, _)| k.starts_with(key))
                .map(|(k, v)| entry(k, v))
                .collect()
        } else {
            s.kv.get_key_value(key)
                .map(|(k, v)| entry(k, v))
                .into_iter()
                .collect()
        };
        if list.is_empty() {
            return (404, None, s.kv_index);
        }
        return (200, Some(Value::Array(list)), s.kv_index);
    }
    if let Some(name) = path.strip_prefix("/v1/health/service/") {
        let entries: Vec<Value> = s
            .services
            .get(name)
            .into_iter()
            .flatten()
            .map(|(id, v)| {
                let mut checks = vec![
                    json!({"Node": "fake-node", "CheckID": "serfHealth", "Name": "Serf Health Status",
                           "Status": "passing", "Output": "Agent alive and reachable",
                           "ServiceID": "", "ServiceName": "", "ServiceTags": [], "Type": ""}),
                    json!({"Node": "fake-node", "CheckID": format!("service:{id}"),
                           "Name": format!("Service '{}' check", v.name), "Status": v.status,
                           "Output": v.output, "ServiceID": id, "ServiceName": v.name,
                           "ServiceTags": v.tags, "Type": "ttl"}),
                ];
                if v.maintenance {
                    checks.push(json!({"Node": "fake-node", "CheckID": format!("_service_maintenance:{id}"),
                        "Name": "Service Maintenance Mode", "Status": "critical",
                        "ServiceID": id, "ServiceName": v.name, "Type": ""}));
                }
                json!({
                    "Node": {"ID": "00000000-0000-0000-0000-000000000001", "Node": "fake-node",
                             "Address": "127.0.0.1", "Datacenter": "dc1",
                             "TaggedAddresses": {"lan": "127.0.0.1"}, "Meta": {}},
                    "Service": {"ID": id, "Service": v.name, "Tags": v.tags, "Address": v.address,
                                "Meta": {}, "Port": v.port, "Weights": v.weights},
                    "Checks": checks,
                })
            })
            .collect();
        let index = s.service_index.get(name).copied().unwrap_or(s.index);
        return (200, Some(Value::Array(entries)), index);
    }
    if path == "/v1/status/leader" {
        return (200, Some(json!("127.0.0.1:8300")), s.index);
    }
    (404, None, s.index)
}

fn write(
    shared: &Shared,
    method: &Method,
    path: &str,
    q: &HashMap<String, String>,
    body: &[u8],
) -> Resp {
    let mut s = shared.store.lock().unwrap();
    let resp = if let Some(key) = path.strip_prefix("/v1/kv/") {
        let i = s.bump();
        s.kv_index = i;
        if *method == Method::DELETE {
            if q.contains_key("recurse") {
                s.kv.retain(|k, _| !k.starts_with(key));
            } else {
                s.kv.remove(key);
            }
        } else {
            let create = s.kv.get(key).map(|v| v.1).unwrap_or(i);
            s.kv.insert(key.to_string(), (body.to_vec(), create, i));
        }
        text(200, "true", i)
    } else if path == "/v1/agent/service/register" {
        let Ok(v) = serde_json::from_slice::<Value>(body) else {
            return text(400, "Request decode failed", 0);
        };
        let name = v["Name"].as_str().unwrap_or_default().to_string();
        let id = v["ID"].as_str().unwrap_or(&name).to_string();
        let svc = Svc {
            name: name.clone(),
            tags: serde_json::from_value(v["Tags"].clone()).unwrap_or_default(),
            address: v["Address"].as_str().unwrap_or_default().to_string(),
            port: v["Port"].as_u64().unwrap_or(0) as u16,
            weights: if v["Weights"].is_object() {
                v["Weights"].clone()
            } else {
                json!({"Passing": 1, "Warning": 1})
            },
            status: v["Check"]["Status"]
                .as_str()
                .unwrap_or("critical")
                .to_string(),
            output: String::new(),
            maintenance: false,
        };
        if let Some(old) = s.names.insert(id.clone(), name.clone()) {
            if let Some(m) = s.services.get_mut(&old) {
                m.remove(&id);
            }
            s.touch_service(&old);
        }
        s.services.entry(name.clone()).or_default().insert(id, svc);
        s.touch_service(&name);
        text(200, "", s.index)
    } else if let Some(id) = path.strip_prefix("/v1/agent/service/deregister/") {
        if let Some(name) = s.names.remove(id) {
            if let Some(m) = s.services.get_mut(&name) {
                m.remove(id);
            }
            s.touch_service(&name);
        }
        text(200, "", s.index)
    } else if let Some(id) = path.strip_prefix("/v1/agent/service/maintenance/") {
        let enable = q.get("enable").map(String::as_str) == Some("true");
        let Some(svc) = s.svc_mut(id) else {
            return text(404, &format!("No service registered with ID \"{id}\""), 0);
        };
        svc.maintenance = enable;
        let name = svc.name.clone();
        s.touch_service(&name);
        text(200, "", s.index)
    } else if let Some(rest) = path.strip_prefix("/v1/agent/check/") {
        let (verb, check) = rest.split_once('/').unwrap_or((rest, ""));
        let status = match verb {
            "pass" => "passing",
            "warn" => "warning",
            "fail" => "critical",
            _ => return text(404, "", 0),
        };
        let id = check.strip_prefix("service:").unwrap_or(check);
        let Some(svc) = s.svc_mut(id) else {
            return text(
                500,
                &format!("CheckID \"{check}\" does not have associated TTL"),
                0,
            );
        };
        svc.status = status.to_string();
        svc.output = q.get("note").cloned().unwrap_or_default();
        let name = svc.name.clone();
        s.touch_service(&name);
        text(200, "", s.index)
    } else {
        return text(404, "", 0);
    };
    drop(s);
    shared.changed.send_modify(|v| *v += 1);
    resp
}

fn text(status: u16, body: &str, index: u64) -> Resp {
    let mut b = Response::builder()
        .status(StatusCode::from_u16(status).unwrap())
        .header("Content-Type", "text/plain");
    if index > 0 {
        b = b.header("X-Consul-Index", index.to_string());
    }
    b.body(Full::new(Bytes::from(body.to_string()))).unwrap()
}
