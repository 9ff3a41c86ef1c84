//! TLS termination end to end over loopback sockets: SNI selection, ALPN, protocol
//! versions, session resumption, hot reload without dropping connections, client
//! certificates and the HTTP → HTTPS redirect listener. Certificates are made on the fly with rcgen.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, HandshakeKind, RootCertStore, SignatureScheme};
use switchyard::config::{CertificateSection, TlsSection};
use switchyard::shutdown::Shutdown;
use switchyard::tls::Tls;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsConnector;

const DEADLINE: Duration = Duration::from_secs(10);

struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
}

impl Ca {
    fn new() -> Ca {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "switchyard test CA");
        let cert = params.self_signed(&key).unwrap();
        Ca { cert, key }
    }

    /// A leaf for `names`, as (cert PEM, key PEM).
    fn leaf(&self, names: &[&str]) -> (String, String) {
        let key = KeyPair::generate().unwrap();
        let params =
            CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .unwrap();
        let cert = params.signed_by(&key, &self.cert, &self.key).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    fn roots(&self) -> RootCertStore {
        let mut roots = RootCertStore::empty();
        roots.add(self.cert.der().clone()).unwrap();
        roots
    }
}

/// Writes a certificate pair and bumps its mtime, so a reload sees a change even within
/// the file system's timestamp resolution.
fn write_pair(dir: &Path, name: &str, pair: &(String, String), bump_s: u64) -> CertificateSection {
    let cert = dir.join(format!("{name}.crt"));
    let key = dir.join(format!("{name}.key"));
    std::fs::write(&cert, &pair.0).unwrap();
    std::fs::write(&key, &pair.1).unwrap();
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

fn section(certificates: Vec<CertificateSection>, client_ca: Option<PathBuf>) -> TlsSection {
    TlsSection {
        listen: "127.0.0.1:0".into(),
        certificates,
        client_ca,
        redirect_http_listen: None,
        reload_interval_s: 1,
        session_tickets: true,
        session_cache_entries: 4096,
    }
}

/// A TLS echo server: each connection echoes what it reads.
async fn echo_server(tls: &Tls) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = tls.acceptor();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut s) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut buf = [0u8; 1024];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

/// Accepts any server certificate (the tests inspect it instead).
#[derive(Debug)]
struct AcceptAny(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AcceptAny {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    switchyard::crypto_provider::provider()
}

fn client(
    roots: Option<RootCertStore>,
    alpn: &[&str],
    versions: &[&'static rustls::SupportedProtocolVersion],
    identity: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
) -> TlsConnector {
    TlsConnector::from(Arc::new(client_config(roots, alpn, versions, identity)))
}

/// A client that keeps its sessions (rustls's in-memory store) and offers them again.
fn resuming_client(
    roots: RootCertStore,
    version: &'static rustls::SupportedProtocolVersion,
) -> TlsConnector {
    let mut config = client_config(Some(roots), &[], &[version], None);
    config.resumption = rustls::client::Resumption::default();
    TlsConnector::from(Arc::new(config))
}

fn client_config(
    roots: Option<RootCertStore>,
    alpn: &[&str],
    versions: &[&'static rustls::SupportedProtocolVersion],
    identity: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
) -> ClientConfig {
    let b = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(versions)
        .unwrap();
    let b = match roots {
        Some(r) => b.with_root_certificates(r),
        None => b
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAny(provider()))),
    };
    let mut config = match identity {
        Some((chain, key)) => b.with_client_auth_cert(chain, key).unwrap(),
        None => b.with_no_client_auth(),
    };
    config.alpn_protocols = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    // Each connection makes a full handshake, so it sees the certificate served now.
    config.resumption = rustls::client::Resumption::disabled();
    config
}

type ClientStream = tokio_rustls::client::TlsStream<TcpStream>;

async fn connect(c: &TlsConnector, addr: SocketAddr, sni: &str) -> std::io::Result<ClientStream> {
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from(sni.to_string()).unwrap();
    tokio::time::timeout(DEADLINE, c.connect(name, tcp))
        .await
        .expect("handshake within the deadline")
}

fn leaf_der(s: &ClientStream) -> Vec<u8> {
    s.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

fn der_of(pem: &str) -> Vec<u8> {
    rustls_pemfile::certs(&mut pem.as_bytes())
        .next()
        .unwrap()
        .unwrap()
        .to_vec()
}

async fn echo(s: &mut ClientStream, msg: &[u8]) -> Vec<u8> {
    s.write_all(msg).await.unwrap();
    let mut buf = vec![0u8; msg.len()];
    tokio::time::timeout(DEADLINE, s.read_exact(&mut buf))
        .await
        .unwrap()
        .unwrap();
    buf
}

#[tokio::test]
async fn sni_picks_the_certificate_and_unknown_names_get_the_first() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new();
    let a = ca.leaf(&["a.test"]);
    let b = ca.leaf(&["b.test", "*.wild.test"]);
    let tls = Tls::load(&section(
        vec![
            write_pair(dir.path(), "a", &a, 0),
            write_pair(dir.path(), "b", &b, 0),
        ],
        None,
    ))
    .unwrap();
    assert_eq!(
        tls.certificate_names(),
        [
            vec!["a.test".to_string()],
            vec!["b.test".into(), "*.wild.test".into()]
        ]
    );
    let addr = echo_server(&tls).await;
    let verified = client(Some(ca.roots()), &[], &[&rustls::version::TLS13], None);
    for (sni, want) in [
        ("a.test", &a),
        ("b.test", &b),
        ("x.wild.test", &b),
        ("B.TEST", &b),
    ] {
        let s = connect(&verified, addr, sni).await.unwrap();
        assert_eq!(leaf_der(&s), der_of(&want.0), "{sni}");
    }
    let any = client(None, &[], &[&rustls::version::TLS13], None);
    for sni in ["unknown.test", "deep.x.wild.test"] {
        let s = connect(&any, addr, sni).await.unwrap();
        assert_eq!(leaf_der(&s), der_of(&a.0), "{sni} gets the default");
    }
}

#[tokio::test]
async fn alpn_offers_h2_then_http1_over_tls_1_2_and_1_3() {
    let ca = Ca::new();
    let addr = one_certificate_server(&ca, |_| {}).await;
    for version in [&rustls::version::TLS12, &rustls::version::TLS13] {
        let c = client(Some(ca.roots()), &["h2", "http/1.1"], &[version], None);
        let s = connect(&c, addr, "a.test").await.unwrap();
        assert_eq!(s.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
        assert_eq!(s.get_ref().1.protocol_version(), Some(version.version));
        let c = client(Some(ca.roots()), &["http/1.1"], &[version], None);
        let s = connect(&c, addr, "a.test").await.unwrap();
        assert_eq!(s.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    }
}

/// An echo server with one certificate for `a.test` from `ca`, its `[tls]` section adjusted.
async fn one_certificate_server(ca: &Ca, adjust: impl FnOnce(&mut TlsSection)) -> SocketAddr {
    let dir = tempfile::tempdir().unwrap();
    let mut section = section(
        vec![write_pair(dir.path(), "a", &ca.leaf(&["a.test"]), 0)],
        None,
    );
    adjust(&mut section);
    echo_server(&Tls::load(&section).unwrap()).await
}

fn handshake_kind(s: &ClientStream) -> Option<HandshakeKind> {
    s.get_ref().1.handshake_kind()
}

#[tokio::test]
async fn a_returning_client_resumes_its_session_even_after_many_other_clients() {
    let ca = Ca::new();
    let addr = one_certificate_server(&ca, |_| {}).await;
    for version in [&rustls::version::TLS12, &rustls::version::TLS13] {
        let returning = resuming_client(ca.roots(), version);
        let mut first = connect(&returning, addr, "a.test").await.unwrap();
        assert_eq!(handshake_kind(&first), Some(HandshakeKind::Full));
        // TLS 1.3 tickets come after the handshake: the echo reads them.
        assert_eq!(echo(&mut first, b"first").await, b"first");
        drop(first);
        // More clients than rustls's default session cache holds (256 entries; TLS 1.3
        // stores two per handshake), each making a full handshake.
        let others = client(Some(ca.roots()), &[], &[version], None);
        for _ in 0..300 {
            let mut s = connect(&others, addr, "a.test").await.unwrap();
            assert_eq!(echo(&mut s, b"x").await, b"x");
        }
        let mut again = connect(&returning, addr, "a.test").await.unwrap();
        assert_eq!(
            handshake_kind(&again),
            Some(HandshakeKind::Resumed),
            "{version:?}: the returning client resumes"
        );
        assert_eq!(echo(&mut again, b"again").await, b"again");
    }
}

#[tokio::test]
async fn without_tickets_or_session_cache_every_handshake_is_full() {
    let ca = Ca::new();
    let addr = one_certificate_server(&ca, |s| {
        s.session_tickets = false;
        s.session_cache_entries = 0;
    })
    .await;
    for version in [&rustls::version::TLS12, &rustls::version::TLS13] {
        let returning = resuming_client(ca.roots(), version);
        for _ in 0..2 {
            let mut s = connect(&returning, addr, "a.test").await.unwrap();
            assert_eq!(echo(&mut s, b"hi").await, b"hi");
            assert_eq!(handshake_kind(&s), Some(HandshakeKind::Full), "{version:?}");
        }
    }
}

#[tokio::test]
async fn a_reload_serves_new_certificates_without_dropping_connections() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new();
    let old = ca.leaf(&["a.test"]);
    let tls = Tls::load(&section(vec![write_pair(dir.path(), "a", &old, 0)], None)).unwrap();
    let addr = echo_server(&tls).await;
    let c = client(Some(ca.roots()), &[], &[&rustls::version::TLS13], None);
    let mut open = connect(&c, addr, "a.test").await.unwrap();
    assert_eq!(echo(&mut open, b"before").await, b"before");
    assert!(tls.reload_if_changed().is_none(), "nothing changed");

    let new = ca.leaf(&["a.test"]);
    write_pair(dir.path(), "a", &new, 10);
    assert!(matches!(tls.reload_if_changed(), Some(Ok(()))));
    let s = connect(&c, addr, "a.test").await.unwrap();
    assert_eq!(
        leaf_der(&s),
        der_of(&new.0),
        "new handshakes see the new certificate"
    );
    assert_eq!(leaf_der(&open), der_of(&old.0));
    assert_eq!(
        echo(&mut open, b"after").await,
        b"after",
        "the open connection lives on"
    );

    std::fs::write(dir.path().join("a.key"), "not a key").unwrap();
    assert!(matches!(tls.reload_if_changed(), Some(Err(_))));
    let s = connect(&c, addr, "a.test").await.unwrap();
    assert_eq!(
        leaf_der(&s),
        der_of(&new.0),
        "a broken file keeps the last good certificate"
    );
}

#[tokio::test]
async fn the_reloader_notices_changed_files_on_its_own() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new();
    let tls = Arc::new(
        Tls::load(&section(
            vec![write_pair(dir.path(), "a", &ca.leaf(&["a.test"]), 0)],
            None,
        ))
        .unwrap(),
    );
    let shutdown = Shutdown::new();
    let task = tls.spawn_reloader(shutdown.clone());
    let addr = echo_server(&tls).await;
    let new = ca.leaf(&["a.test", "new.test"]);
    write_pair(dir.path(), "a", &new, 10);
    let c = client(Some(ca.roots()), &[], &[&rustls::version::TLS13], None);
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let s = connect(&c, addr, "a.test").await.unwrap();
        if leaf_der(&s) == der_of(&new.0) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "reload not seen");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    shutdown.trigger();
    tokio::time::timeout(DEADLINE, task).await.unwrap().unwrap();
}

#[tokio::test]
async fn client_certificates_are_required_when_a_client_ca_is_set() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new();
    let clients = Ca::new();
    let ca_path = dir.path().join("clients.pem");
    std::fs::write(&ca_path, clients.cert.pem()).unwrap();
    let tls = Tls::load(&section(
        vec![write_pair(dir.path(), "a", &ca.leaf(&["a.test"]), 0)],
        Some(ca_path),
    ))
    .unwrap();
    let addr = echo_server(&tls).await;

    let anonymous = client(Some(ca.roots()), &[], &[&rustls::version::TLS13], None);
    let refused = match connect(&anonymous, addr, "a.test").await {
        Err(_) => true,
        // TLS 1.3: the client learns of the refusal on its first read.
        Ok(mut s) => {
            let _ = s.write_all(b"x").await;
            let mut buf = [0u8; 1];
            !matches!(
                tokio::time::timeout(DEADLINE, s.read(&mut buf)).await,
                Ok(Ok(1))
            )
        }
    };
    assert!(refused, "a client without a certificate is refused");

    let (pem, key) = clients.leaf(&["client.test"]);
    let chain = vec![CertificateDer::from(der_of(&pem))];
    let key = rustls_pemfile::private_key(&mut key.as_bytes())
        .unwrap()
        .unwrap();
    let trusted = client(
        Some(ca.roots()),
        &[],
        &[&rustls::version::TLS13],
        Some((chain, key)),
    );
    let mut s = connect(&trusted, addr, "a.test").await.unwrap();
    assert_eq!(echo(&mut s, b"hi").await, b"hi");
}

#[tokio::test]
async fn bad_files_are_reported_by_path() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new();
    let a = write_pair(dir.path(), "a", &ca.leaf(&["a.test"]), 0);
    let b = write_pair(dir.path(), "b", &ca.leaf(&["b.test"]), 0);
    let mismatched = CertificateSection {
        cert: a.cert.clone(),
        key: b.key.clone(),
    };
    let err = Tls::load(&section(vec![mismatched], None)).unwrap_err();
    assert!(err.to_string().contains("does not belong"), "{err}");
    let missing = CertificateSection {
        cert: dir.path().join("nope.crt"),
        key: a.key.clone(),
    };
    let err = Tls::load(&section(vec![missing], None)).unwrap_err();
    assert!(err.to_string().contains("nope.crt"), "{err}");
}

#[tokio::test]
async fn the_redirect_listener_sends_plain_http_to_https() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = Shutdown::new();
    let task = tokio::spawn(switchyard::tls::serve_redirect(
        listener,
        8443,
        shutdown.clone(),
    ));
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(
        b"GET /login?next=%2F HTTP/1.1\r\nHost: example.test:80\r\nConnection: close\r\n\r\n",
    )
    .await
    .unwrap();
    let mut response = String::new();
    tokio::time::timeout(DEADLINE, s.read_to_string(&mut response))
        .await
        .unwrap()
        .unwrap();
    assert!(response.starts_with("HTTP/1.1 308"), "{response}");
    assert!(
        response
            .to_ascii_lowercase()
            .contains("location: https://example.test:8443/login?next=%2f"),
        "{response}"
    );
    shutdown.trigger();
    tokio::time::timeout(DEADLINE, task).await.unwrap().unwrap();
}
