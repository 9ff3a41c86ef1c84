//! TLS termination through the proxy, end to end: the gateway started by `app::start` with
//! an HTTPS listener and a redirect listener, real upstreams behind it, and a reqwest client
//! trusting a CA made on the fly with rcgen. Covers SNI, h2 over TLS via ALPN, certificate
//! hot reload with a keep-alive connection open, client certificates and HTTP → HTTPS.

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, SystemTime};

use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
use serde_json::json;
use support::upstream::Upstream;
use support::{
    eventually, json_of, metric, route, start_upstreams, test_config, unique, Consul, DEADLINE,
};
use switchyard::app::{self, AppHandle, Listeners};
use switchyard::config::{CertificateSection, FileConfig, TlsSection};
use switchyard::shutdown::Shutdown;
use tokio::net::TcpListener;

/// The certificate-reload counter, by `result` (`ok`, `error`); only the reload test of
/// this file changes certificate files, so its counts are its own.
const TLS_RELOADS: &str = "switchyard_tls_reloads_total";

struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
}

/// A leaf certificate as PEM, and its DER (to recognise it on the wire).
struct Leaf {
    cert_pem: String,
    key_pem: String,
    der: Vec<u8>,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        let cert = params.self_signed(&key).unwrap();
        Ca { cert, key }
    }

    fn leaf(&self, names: &[&str]) -> Leaf {
        let key = KeyPair::generate().unwrap();
        let params =
            CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .unwrap();
        let cert = params.signed_by(&key, &self.cert, &self.key).unwrap();
        Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            der: cert.der().to_vec(),
        }
    }

    fn reqwest_cert(&self) -> reqwest::Certificate {
        reqwest::Certificate::from_pem(self.cert.pem().as_bytes()).unwrap()
    }
}

/// Writes `leaf` as `<name>.crt`/`<name>.key` with an mtime `bump_s` ahead, so a reload
/// notices the change within the file system's timestamp resolution.
fn write_leaf(dir: &Path, name: &str, leaf: &Leaf, bump_s: u64) -> CertificateSection {
    let cert = dir.join(format!("{name}.crt"));
    let key = dir.join(format!("{name}.key"));
    std::fs::write(&cert, &leaf.cert_pem).unwrap();
    std::fs::write(&key, &leaf.key_pem).unwrap();
    let t = SystemTime::now() + Duration::from_secs(bump_s);
    for p in [&cert, &key] {
        std::fs::File::options()
            .write(true)
            .open(p)
            .unwrap()
            .set_modified(t)
            .unwrap();
    }
    CertificateSection { cert, key }
}

/// A gateway with plain, HTTPS and redirect listeners, one upstream and a route `/api`.
struct Env {
    consul: Consul,
    app: AppHandle,
    upstream: Upstream,
    plain: SocketAddr,
    https: SocketAddr,
    redirect: SocketAddr,
}

impl Env {
    async fn start(tls: TlsSection) -> Env {
        let consul = Consul::start().await;
        let prefix = format!("{}/", unique("tls"));
        let mut file: FileConfig = test_config(&consul.url, &prefix);
        file.tls = Some(tls);
        let cfg = file.validate().expect("test config is valid");
        let mut listeners = Listeners::new(
            TcpListener::bind("127.0.0.1:0").await.unwrap(),
            TcpListener::bind("127.0.0.1:0").await.unwrap(),
        );
        let https = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let redirect = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (https_addr, redirect_addr) =
            (https.local_addr().unwrap(), redirect.local_addr().unwrap());
        listeners.tls = Some(https);
        listeners.redirect = Some(redirect);
        let app = app::start(cfg, listeners, Shutdown::new())
            .await
            .expect("gateway starts");
        let service = unique("svc");
        let upstream = start_upstreams(&consul, &service, 1).await.remove(0);
        consul
            .put_kv(
                &format!("{prefix}routes/api"),
                &route(&service, "/api", json!({})),
            )
            .await;
        let plain = app.proxy_addr();
        let http = reqwest::Client::builder().no_proxy().build().unwrap();
        eventually(DEADLINE, "the route serves", || {
            let req = http.get(format!("http://{plain}/api/ready"));
            async move { (req.send().await.ok()?.status() == 200).then_some(()) }
        })
        .await;
        Env {
            consul,
            app,
            upstream,
            plain,
            https: https_addr,
            redirect: redirect_addr,
        }
    }

    /// A client trusting `ca` that sends `name` to the HTTPS listener.
    fn client(&self, ca: &Ca, name: &str) -> reqwest::Client {
        self.client_builder(ca, name).build().unwrap()
    }

    fn client_builder(&self, ca: &Ca, name: &str) -> reqwest::ClientBuilder {
        reqwest::Client::builder()
            .no_proxy()
            .use_rustls_tls()
            .tls_built_in_root_certs(false)
            .add_root_certificate(ca.reqwest_cert())
            .resolve(name, self.https)
            .tls_info(true)
            .timeout(Duration::from_secs(10))
    }

    fn url(&self, name: &str, path: &str) -> String {
        format!("https://{name}:{}{path}", self.https.port())
    }

    async fn stop(self) {
        self.app.stop().await;
        self.consul.cleanup().await;
    }
}

fn section(
    certificates: Vec<CertificateSection>,
    client_ca: Option<std::path::PathBuf>,
) -> TlsSection {
    TlsSection {
        listen: "127.0.0.1:0".into(),
        certificates,
        client_ca,
        redirect_http_listen: Some("127.0.0.1:0".into()),
        reload_interval_s: 1,
        session_tickets: true,
        session_cache_entries: 4096,
    }
}

fn peer_der(resp: &reqwest::Response) -> Vec<u8> {
    resp.extensions()
        .get::<reqwest::tls::TlsInfo>()
        .and_then(|i| i.peer_certificate())
        .expect("TLS info with the peer certificate")
        .to_vec()
}

#[tokio::test]
async fn https_picks_the_certificate_by_sni_and_speaks_h2_through_the_proxy() {
    let ca = Ca::new("sni CA");
    let dir = tempfile::tempdir().unwrap();
    let a = ca.leaf(&["a.test"]);
    let b = ca.leaf(&["b.test", "*.b.test"]);
    let env = Env::start(section(
        vec![
            write_leaf(dir.path(), "a", &a, 0),
            write_leaf(dir.path(), "b", &b, 0),
        ],
        None,
    ))
    .await;

    for (name, want) in [("a.test", &a), ("b.test", &b), ("x.b.test", &b)] {
        let before = env.upstream.hits();
        let resp = env
            .client(&ca, name)
            .get(env.url(name, "/api/who"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "{name}");
        assert_eq!(
            peer_der(&resp),
            want.der,
            "{name} got the wrong certificate"
        );
        assert_eq!(resp.version(), reqwest::Version::HTTP_2, "ALPN chose h2");
        let body = json_of(resp).await;
        assert_eq!(body["headers"]["x-forwarded-proto"], "https");
        assert_eq!(env.upstream.hits(), before + 1);
    }

    // HTTP/1.1 only clients still get through (ALPN http/1.1).
    let resp = env
        .client_builder(&ca, "a.test")
        .http1_only()
        .build()
        .unwrap()
        .get(env.url("a.test", "/api/h1"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.version(), reqwest::Version::HTTP_11);
    env.stop().await;
}

#[tokio::test]
async fn new_certificates_serve_new_handshakes_while_open_connections_keep_working() {
    let ca = Ca::new("reload CA");
    let dir = tempfile::tempdir().unwrap();
    let first = ca.leaf(&["a.test"]);
    let env = Env::start(section(vec![write_leaf(dir.path(), "a", &first, 0)], None)).await;

    // One client, one h2 connection, kept open across the reload.
    let kept = env.client(&ca, "a.test");
    let resp = kept.get(env.url("a.test", "/api/1")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(peer_der(&resp), first.der);

    let second = ca.leaf(&["a.test"]);
    let ok_before = metric(env.app.admin_addr(), TLS_RELOADS, &[("result", "ok")]).await;
    write_leaf(dir.path(), "a", &second, 5);
    eventually(DEADLINE, "a new handshake gets the new certificate", || {
        let client = env.client(&ca, "a.test");
        let url = env.url("a.test", "/api/2");
        let want = second.der.clone();
        async move {
            let resp = client.get(url).send().await.ok()?;
            (resp.status() == 200 && peer_der(&resp) == want).then_some(())
        }
    })
    .await;
    assert!(
        metric(env.app.admin_addr(), TLS_RELOADS, &[("result", "ok")]).await > ok_before,
        "the new certificate came from a reload counted as ok"
    );

    // The open connection was not dropped: same handshake (old certificate), still serving.
    for i in 0..3 {
        let resp = kept
            .get(env.url("a.test", &format!("/api/kept-{i}")))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(
            peer_der(&resp),
            first.der,
            "the keep-alive connection was replaced"
        );
    }

    // Broken files are refused and the current certificate keeps serving. Failed reloads
    // are counted from here: one above may have caught the pair half written, but only
    // before the new certificate served.
    let admin = env.app.admin_addr();
    let reloads = |result: &'static str| async move {
        metric(admin, TLS_RELOADS, &[("result", result)]).await
    };
    let errors_before = reloads("error").await;
    // Put in place with one rename: the reloader sees one change, never a half-written file.
    let broken = dir.path().join("a.crt.new");
    std::fs::write(&broken, "not a certificate").unwrap();
    std::fs::rename(&broken, dir.path().join("a.crt")).unwrap();
    eventually(DEADLINE, "the reloader tries the broken file", || async {
        (reloads("error").await > errors_before).then_some(())
    })
    .await;
    let resp = env
        .client(&ca, "a.test")
        .get(env.url("a.test", "/api/3"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        peer_der(&resp),
        second.der,
        "the last good certificate serves"
    );
    assert_eq!(
        reloads("error").await,
        errors_before + 1.0,
        "one refused reload"
    );
    env.stop().await;
}

#[tokio::test]
async fn a_client_certificate_is_required_when_the_listener_has_a_client_ca() {
    let ca = Ca::new("server CA");
    let clients = Ca::new("clients CA");
    let strangers = Ca::new("someone else's CA");
    let dir = tempfile::tempdir().unwrap();
    let server = ca.leaf(&["a.test"]);
    let client_ca = dir.path().join("clients-ca.pem");
    std::fs::write(&client_ca, clients.cert.pem()).unwrap();
    let env = Env::start(section(
        vec![write_leaf(dir.path(), "a", &server, 0)],
        Some(client_ca),
    ))
    .await;
    let identity = |issuer: &Ca| {
        let leaf = issuer.leaf(&["client.test"]);
        reqwest::Identity::from_pem(format!("{}{}", leaf.cert_pem, leaf.key_pem).as_bytes())
            .unwrap()
    };

    let before = env.upstream.hits();
    let anonymous = env
        .client(&ca, "a.test")
        .get(env.url("a.test", "/api/x"))
        .send()
        .await;
    assert!(anonymous.is_err(), "no client certificate: {anonymous:?}");
    let stranger = env
        .client_builder(&ca, "a.test")
        .identity(identity(&strangers))
        .build()
        .unwrap()
        .get(env.url("a.test", "/api/x"))
        .send()
        .await;
    assert!(stranger.is_err(), "certificate of another CA: {stranger:?}");
    assert_eq!(
        env.upstream.hits(),
        before,
        "refused handshakes reach nothing"
    );

    let resp = env
        .client_builder(&ca, "a.test")
        .identity(identity(&clients))
        .build()
        .unwrap()
        .get(env.url("a.test", "/api/x"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(env.upstream.hits(), before + 1);
    // The plain listener does not ask for certificates.
    let resp = reqwest::Client::builder()
        .no_proxy()
        .build()
        .unwrap()
        .get(format!("http://{}/api/plain", env.plain))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    env.stop().await;
}

#[tokio::test]
async fn the_redirect_listener_sends_plain_http_to_the_https_listener() {
    let ca = Ca::new("redirect CA");
    let dir = tempfile::tempdir().unwrap();
    let leaf = ca.leaf(&["a.test"]);
    let env = Env::start(section(vec![write_leaf(dir.path(), "a", &leaf, 0)], None)).await;
    let plain = reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .resolve("a.test", env.redirect)
        .build()
        .unwrap();
    let before = env.upstream.hits();
    let resp = plain
        .post(format!("http://a.test:{}/api/x?q=1", env.redirect.port()))
        .body("payload")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 308, "method and body kept on the redirect");
    assert_eq!(
        resp.headers()["location"],
        format!("https://a.test:{}/api/x?q=1", env.https.port()).as_str()
    );
    assert_eq!(
        env.upstream.hits(),
        before,
        "the redirect listener proxies nothing"
    );

    // Following it lands on the HTTPS listener, which proxies.
    let follow = reqwest::Client::builder()
        .no_proxy()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(ca.reqwest_cert())
        .resolve("a.test", env.https)
        .build()
        .unwrap();
    let location = plain
        .get(format!("http://a.test:{}/api/y", env.redirect.port()))
        .send()
        .await
        .unwrap()
        .headers()["location"]
        .to_str()
        .unwrap()
        .to_string();
    let resp = follow.get(location).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(env.upstream.hits(), before + 1);
    env.stop().await;
}
