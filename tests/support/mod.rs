//! Shared helpers of the end-to-end tests: a Consul to talk to (the embedded dev registry,
//! or a real agent when `CONSUL_HTTP_ADDR` is set), a gateway started on `127.0.0.1:0`
//! listeners, and [`eventually`] for every wait.
#![allow(dead_code)]

pub mod prometheus;
pub mod redis_server;
pub mod tokens;
pub mod upstream;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderMap, Method};
use serde_json::{json, Value};
use switchyard::app::{self, AppHandle, Listeners};
use switchyard::config::FileConfig;
use switchyard::shutdown::Shutdown;
use switchyard::state::Snapshot;
use tokio::net::TcpListener;

use switchyard::devregistry::{Faults, Registry, RegistryOptions};
use upstream::Upstream;

/// Default deadline of [`eventually`] in these tests.
pub const DEADLINE: Duration = Duration::from_secs(15);

/// Polls `check` every 20 ms until it returns `Some`, or panics after `deadline` naming `what`.
pub async fn eventually<T, F, Fut>(deadline: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let end = tokio::time::Instant::now() + deadline;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if tokio::time::Instant::now() >= end {
            panic!("timed out after {deadline:?} waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Prints a note that the test harness does not capture (skips must be seen, also when
/// the test passes).
pub fn note(text: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr().lock(), "{text}");
}

/// A name no other test (or earlier run against a shared agent) uses.
pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    )
}

/// The Consul a test talks to.
pub struct Consul {
    pub url: String,
    http: reqwest::Client,
    token: Option<String>,
    registry: Option<Registry>,
    /// Service ids registered through [`Consul::register`], deregistered on drop (real agent).
    registered: std::sync::Mutex<Vec<String>>,
    /// Top-level KV folders written through [`Consul::put_kv`], removed by
    /// [`Consul::cleanup`] (a shared real agent keeps no leftovers).
    kv_roots: std::sync::Mutex<std::collections::BTreeSet<String>>,
}

/// One service instance to register, with a TTL check the test drives.
#[derive(Clone, Debug)]
pub struct Svc {
    pub name: String,
    pub id: String,
    pub port: u16,
    pub address: String,
    pub tags: Vec<String>,
    pub weights: Option<(u32, u32)>,
    /// Initial check status: `passing`, `warning` or `critical`.
    pub status: &'static str,
}

impl Svc {
    pub fn new(name: &str, id: &str, port: u16) -> Svc {
        Svc {
            name: name.into(),
            id: id.into(),
            port,
            address: "127.0.0.1".into(),
            tags: Vec::new(),
            weights: None,
            status: "passing",
        }
    }

    pub fn check_id(&self) -> String {
        format!("service:{}", self.id)
    }
}

impl Consul {
    /// A real agent when `CONSUL_HTTP_ADDR` is set, else a fresh dev registry.
    pub async fn start() -> Consul {
        match std::env::var("CONSUL_HTTP_ADDR") {
            Ok(addr) if !addr.is_empty() => {
                let url =
                    switchyard::config::normalize_consul_address(&addr).expect("CONSUL_HTTP_ADDR");
                Consul::with(url, std::env::var("CONSUL_HTTP_TOKEN").ok(), None)
            }
            _ => Consul::dev().await,
        }
    }

    /// Always the in-process registry (for fault injection).
    pub async fn dev() -> Consul {
        Consul::custom(RegistryOptions::for_tests(), reqwest::Client::new()).await
    }

    /// The in-process registry set up with `options` (an ACL token, HTTPS); `http` is the
    /// client the test itself writes with.
    pub async fn custom(options: RegistryOptions, http: reqwest::Client) -> Consul {
        let token = options.token.clone();
        let registry = Registry::start("127.0.0.1:0".parse().unwrap(), options)
            .expect("the dev registry starts");
        let mut consul = Consul::with(registry.url(), token, Some(registry));
        consul.http = http;
        consul
    }

    fn with(url: String, token: Option<String>, registry: Option<Registry>) -> Consul {
        Consul {
            url,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .unwrap(),
            token,
            registry,
            registered: Default::default(),
            kv_roots: Default::default(),
        }
    }

    pub fn is_real(&self) -> bool {
        self.registry.is_none()
    }

    /// Fault injection; `None` against a real agent (print why and skip the test then).
    pub fn faults(&self) -> Option<&Faults> {
        self.registry.as_ref().map(|r| r.faults())
    }

    pub fn registry(&self) -> Option<&Registry> {
        self.registry.as_ref()
    }

    async fn put(&self, path: &str, body: Option<Vec<u8>>) -> (u16, String) {
        let mut req = self.http.put(format!("{}{}", self.url, path));
        if let Some(t) = &self.token {
            req = req.header("X-Consul-Token", t);
        }
        if let Some(b) = body {
            req = req.body(b);
        }
        let resp = req.send().await.expect("consul answers");
        let status = resp.status().as_u16();
        (status, resp.text().await.unwrap_or_default())
    }

    async fn put_ok(&self, path: &str, body: Option<Vec<u8>>) {
        let (status, text) = self.put(path, body).await;
        assert!(status == 200, "PUT {path}: {status} {text}");
    }

    pub async fn register(&self, svc: &Svc) {
        let mut body = json!({
            "Name": svc.name,
            "ID": svc.id,
            "Address": svc.address,
            "Port": svc.port,
            "Tags": svc.tags,
            "Check": {"TTL": "10m", "Status": svc.status},
        });
        if let Some((passing, warning)) = svc.weights {
            body["Weights"] = json!({"Passing": passing, "Warning": warning});
        }
        self.put_ok(
            "/v1/agent/service/register",
            Some(serde_json::to_vec(&body).unwrap()),
        )
        .await;
        self.registered.lock().unwrap().push(svc.id.clone());
    }

    pub async fn deregister(&self, id: &str) {
        self.put_ok(&format!("/v1/agent/service/deregister/{id}"), None)
            .await;
    }

    /// `pass`, `warn` or `fail` a TTL check, with a note (the check's `Output`).
    pub async fn check(&self, check_id: &str, verb: &str, note: &str) {
        let note: String = url::form_urlencoded::byte_serialize(note.as_bytes()).collect();
        self.put_ok(
            &format!("/v1/agent/check/{verb}/{check_id}?note={note}"),
            None,
        )
        .await;
    }

    pub async fn service_maintenance(&self, id: &str, enable: bool) {
        self.put_ok(
            &format!("/v1/agent/service/maintenance/{id}?enable={enable}&reason=test"),
            None,
        )
        .await;
    }

    pub async fn put_kv(&self, key: &str, value: &str) {
        if let Some((root, _)) = key.split_once('/') {
            self.kv_roots.lock().unwrap().insert(format!("{root}/"));
        }
        self.put_ok(&format!("/v1/kv/{key}"), Some(value.as_bytes().to_vec()))
            .await;
    }

    pub async fn delete_kv(&self, key: &str) {
        let mut req = self.http.delete(format!("{}/v1/kv/{key}", self.url));
        if let Some(t) = &self.token {
            req = req.header("X-Consul-Token", t);
        }
        let resp = req.send().await.expect("consul answers");
        assert!(resp.status().is_success(), "DELETE {key}");
    }

    /// Removes every key under `prefix` (cleanup against a shared agent).
    pub async fn delete_prefix(&self, prefix: &str) {
        let mut req = self
            .http
            .delete(format!("{}/v1/kv/{prefix}?recurse", self.url));
        if let Some(t) = &self.token {
            req = req.header("X-Consul-Token", t);
        }
        let _ = req.send().await;
    }

    /// Deregisters what this test registered and deletes the KV folders it wrote to
    /// (matters only on a shared real agent).
    pub async fn cleanup(&self) {
        let ids = std::mem::take(&mut *self.registered.lock().unwrap());
        for id in ids {
            let _ = self
                .put(&format!("/v1/agent/service/deregister/{id}"), None)
                .await;
        }
        let roots = std::mem::take(&mut *self.kv_roots.lock().unwrap());
        for root in roots {
            self.delete_prefix(&root).await;
        }
    }
}

/// A gateway under test.
pub struct Gateway {
    pub app: AppHandle,
    pub kv_prefix: String,
    http: reqwest::Client,
}

/// The settings every test gateway shares: short blocking waits and backoff, loopback
/// listeners, no self-registration.
pub fn test_config(consul_url: &str, kv_prefix: &str) -> FileConfig {
    let mut file = FileConfig::default();
    file.consul.address = Some(consul_url.to_string());
    file.consul.kv_prefix = kv_prefix.to_string();
    file.consul.wait_s = 1;
    file.consul.max_backoff_s = 1;
    file.proxy.listen = "127.0.0.1:0".into();
    file.admin.listen = "127.0.0.1:0".into();
    file.registration.enabled = false;
    // Lines on stderr would drown the test output; tests/ops.rs logs to a file.
    file.log.access_log = false;
    file
}

impl Gateway {
    /// Starts a gateway on fresh loopback ports; `tweak` adjusts the config first.
    pub async fn start(
        consul: &Consul,
        kv_prefix: &str,
        tweak: impl FnOnce(&mut FileConfig),
    ) -> Gateway {
        let mut file = test_config(&consul.url, kv_prefix);
        if let Some(t) = &consul.token {
            file.consul.token = Some(t.clone());
        }
        tweak(&mut file);
        Gateway::start_with(file).await
    }

    pub async fn start_with(file: FileConfig) -> Gateway {
        let kv_prefix = file.consul.kv_prefix.clone();
        let cfg = file.validate().expect("test config is valid");
        let listeners = Listeners::new(
            TcpListener::bind("127.0.0.1:0").await.unwrap(),
            TcpListener::bind("127.0.0.1:0").await.unwrap(),
        );
        let app = app::start(cfg, listeners, Shutdown::new())
            .await
            .expect("gateway starts");
        Gateway {
            app,
            kv_prefix,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(5))
                .build()
                .unwrap(),
        }
    }

    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.app.state().load()
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.app.admin_addr()
    }

    /// Status and JSON body of an admin endpoint.
    pub async fn admin(&self, path: &str) -> (u16, Value) {
        let resp = self
            .http
            .get(format!("http://{}{path}", self.admin_addr()))
            .send()
            .await
            .expect("admin answers");
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    /// The sum of the samples of metric `name` whose labels include `with`, as scraped
    /// from this gateway's `/metrics` (the recorder is process-wide: every gateway of the
    /// test process renders the same counters).
    pub async fn metric(&self, name: &str, with: &[(&str, &str)]) -> f64 {
        metric(self.admin_addr(), name, with).await
    }

    /// The `/upstreams` entry of instance `service_id` of `service` (its JSON: `ejected`,
    /// `ejected_for_ms`, `in_flight`, ...), `None` while the admin does not list it.
    pub async fn instance(&self, service: &str, service_id: &str) -> Option<Value> {
        let (status, body) = self.admin("/upstreams").await;
        assert_eq!(status, 200, "/upstreams: {body}");
        let suffix = format!("/{service_id}");
        body["services"]
            .as_array()?
            .iter()
            .find(|s| s["service"] == service)?["instances"]
            .as_array()?
            .iter()
            .find(|i| i["id"].as_str().is_some_and(|id| id.ends_with(&suffix)))
            .cloned()
    }

    /// Whether the admin shows instance `service_id` of `service` as ejected now.
    pub async fn is_ejected(&self, service: &str, service_id: &str) -> bool {
        let instance = self
            .instance(service, service_id)
            .await
            .unwrap_or_else(|| panic!("{service_id} is not in /upstreams"));
        let ejected = instance["ejected"]
            .as_bool()
            .unwrap_or_else(|| panic!("no `ejected` in {instance}"));
        let for_ms = instance["ejected_for_ms"].as_u64().unwrap_or(0);
        assert_eq!(
            ejected,
            for_ms > 0,
            "inconsistent ejection state: {instance}"
        );
        ejected
    }

    /// Ids of the instances the route matching `GET path` (any host) would use, sorted;
    /// `None` when no route matches.
    pub fn upstreams_for(&self, path: &str) -> Option<Vec<String>> {
        self.upstreams_for_host("", path)
    }

    pub fn upstreams_for_host(&self, host: &str, path: &str) -> Option<Vec<String>> {
        let snap = self.snapshot();
        let m = snap.lookup(host, path, &Method::GET, &HeaderMap::new())?;
        Some(
            m.upstreams
                .endpoints
                .iter()
                .map(|e| e.instance.service_id.clone())
                .collect(),
        )
    }

    /// Waits until `GET path` routes to exactly the instances `ids` (by service id).
    pub async fn wait_upstreams(&self, path: &str, ids: &[&str]) {
        let mut want: Vec<String> = ids.iter().map(|s| s.to_string()).collect();
        want.sort();
        eventually(DEADLINE, &format!("{path} → {want:?}"), || {
            let got = self.upstreams_for(path);
            let ok = got.as_ref() == Some(&want);
            async move { ok.then_some(()) }
        })
        .await;
    }

    /// Waits until no route matches `GET path`.
    pub async fn wait_no_route(&self, path: &str) {
        eventually(DEADLINE, &format!("no route for {path}"), || {
            let gone = self.upstreams_for(path).is_none();
            async move { gone.then_some(()) }
        })
        .await;
    }

    pub async fn wait_ready(&self) {
        assert!(
            self.app.first_snapshot(DEADLINE).await,
            "no first snapshot within {DEADLINE:?}"
        );
    }

    pub fn route_key(&self, name: &str) -> String {
        format!("{}routes/{name}", self.kv_prefix)
    }

    pub async fn stop(self) {
        self.app.stop().await;
    }
}

/// The sum of the samples of metric `name` whose labels include `with`, scraped from the
/// admin listener at `admin` (no admin token).
pub async fn metric(admin: SocketAddr, name: &str, with: &[(&str, &str)]) -> f64 {
    let resp = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap()
        .get(format!("http://{admin}/metrics"))
        .send()
        .await
        .expect("the admin listener answers /metrics");
    assert_eq!(resp.status(), 200, "/metrics");
    let text = resp.text().await.expect("a /metrics body");
    prometheus::total(&prometheus::parse(&text), name, with)
}

/// A route document for `service` at `prefix` with extra JSON fields merged in.
pub fn route(service: &str, prefix: &str, extra: Value) -> String {
    let mut doc = json!({"service": service, "path_prefix": prefix});
    if let (Some(d), Some(e)) = (doc.as_object_mut(), extra.as_object()) {
        for (k, v) in e {
            d.insert(k.clone(), v.clone());
        }
    }
    doc.to_string()
}

/// A client for the proxy port: no system proxy, redirects not followed, 20 s timeout.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap()
}

/// A client speaking HTTP/2 without TLS (h2c, prior knowledge), no system proxy.
pub fn h2c_client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .http2_prior_knowledge()
        .build()
        .unwrap()
}

/// Starts `n` upstreams `u0`… and registers them as `service`, ids `{service}-{i}`.
pub async fn start_upstreams(consul: &Consul, service: &str, n: usize) -> Vec<Upstream> {
    let mut upstreams = Vec::new();
    for i in 0..n {
        let u = Upstream::start(&format!("u{i}")).await;
        consul
            .register(&Svc::new(service, &format!("{service}-{i}"), u.port()))
            .await;
        upstreams.push(u);
    }
    upstreams
}

/// A Consul, a gateway on its own KV prefix, and `n` upstreams registered as a fresh
/// service.
pub struct Env {
    pub consul: Consul,
    pub gw: Gateway,
    pub service: String,
    pub upstreams: Vec<Upstream>,
    pub http: reqwest::Client,
}

impl Env {
    /// `tag` names the KV prefix; `tweak` adjusts the gateway's config.
    pub async fn start(tag: &str, n: usize, tweak: impl FnOnce(&mut FileConfig)) -> Env {
        let consul = Consul::start().await;
        let prefix = format!("{}/", unique(tag));
        let gw = Gateway::start(&consul, &prefix, tweak).await;
        let service = unique("svc");
        let upstreams = start_upstreams(&consul, &service, n).await;
        Env {
            consul,
            gw,
            service,
            upstreams,
            http: client(),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.gw.app.proxy_addr())
    }

    pub fn ids(&self) -> Vec<String> {
        (0..self.upstreams.len())
            .map(|i| format!("{}-{i}", self.service))
            .collect()
    }

    /// Requests the upstreams have seen, all together.
    pub fn hits(&self) -> u64 {
        self.upstreams.iter().map(Upstream::hits).sum()
    }

    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.http.get(self.url(path)).send().await.unwrap()
    }

    /// `GET path` on the proxy port with the header `name: value`.
    pub fn get_with(&self, path: &str, name: &str, value: &str) -> reqwest::RequestBuilder {
        self.http.get(self.url(path)).header(name, value)
    }

    /// Puts a route for the env's service and waits until it serves every upstream.
    pub async fn route(&self, name: &str, prefix: &str, extra: Value) {
        self.consul
            .put_kv(
                &self.gw.route_key(name),
                &route(&self.service, prefix, extra),
            )
            .await;
        let ids = self.ids();
        let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
        self.gw.wait_upstreams(prefix, &ids).await;
    }

    /// Sends `req`, asserts `status` and that no upstream saw it; returns the response.
    pub async fn refused(
        &self,
        what: &str,
        req: reqwest::RequestBuilder,
        status: u16,
    ) -> reqwest::Response {
        let before = self.hits();
        let resp = req.send().await.unwrap();
        assert_eq!(resp.status().as_u16(), status, "{what}");
        assert_eq!(self.hits(), before, "{what}: reached the upstream");
        resp
    }

    pub async fn stop(self) {
        self.gw.stop().await;
        self.consul.cleanup().await;
    }
}

/// The JSON body of `resp` (panics with the text when it is not JSON).
pub async fn json_of(resp: reqwest::Response) -> Value {
    let text = resp.text().await.unwrap();
    serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text}"))
}

/// The request headers the upstream saw, from its JSON echo.
pub async fn seen_headers(resp: reqwest::Response) -> serde_json::Map<String, Value> {
    json_of(resp).await["headers"]
        .as_object()
        .cloned()
        .unwrap_or_default()
}

/// A throwaway PKI: a CA, a server certificate for 127.0.0.1 and a client certificate,
/// written as PEM files for the gateway's `consul.ca_cert` / `client_cert` / `client_key`.
pub struct Pki {
    pub dir: tempfile::TempDir,
    pub ca: std::path::PathBuf,
    pub client_cert: std::path::PathBuf,
    pub client_key: std::path::PathBuf,
    /// HTTPS that requires a client certificate signed by the CA.
    pub server: Arc<rustls::ServerConfig>,
    /// A client that trusts the CA and presents the client certificate.
    pub http: reqwest::Client,
}

pub fn pki() -> Pki {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "switchyard test CA");
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let server_key = KeyPair::generate().unwrap();
    let server = CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])
        .unwrap()
        .signed_by(&server_key, &ca, &ca_key)
        .unwrap();
    let client_key = KeyPair::generate().unwrap();
    let mut client_params = CertificateParams::new(vec!["gateway".to_string()]).unwrap();
    client_params
        .distinguished_name
        .push(DnType::CommonName, "gateway");
    let client = client_params.signed_by(&client_key, &ca, &ca_key).unwrap();

    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, pem: String| {
        let path = dir.path().join(name);
        std::fs::write(&path, pem).unwrap();
        path
    };
    let ca_path = write("ca.pem", ca.pem());
    let client_cert = write("client.pem", client.pem());
    let client_key_path = write("client-key.pem", client_key.serialize_pem());

    let provider = switchyard::crypto_provider::provider();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.der().clone()).unwrap();
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()
    .unwrap();
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(server_key.serialize_der().into());
    let server = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_client_cert_verifier(verifier)
        .with_single_cert(vec![server.der().clone()], key)
        .unwrap();

    let identity = reqwest::Identity::from_pem(
        format!("{}{}", client.pem(), client_key.serialize_pem()).as_bytes(),
    )
    .unwrap();
    let http = reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(ca.pem().as_bytes()).unwrap())
        .identity(identity)
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    Pki {
        dir,
        ca: ca_path,
        client_cert,
        client_key: client_key_path,
        server: Arc::new(server),
        http,
    }
}
