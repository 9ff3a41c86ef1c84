//! TLS from the gateway to upstreams (routes with `upstream_tls: true`): the gateway
//! presents its client certificate (`[upstream_tls] client_cert`/`client_key`) and checks
//! the upstream's certificate against `ca` (the public web roots when unset), so a backend
//! can require mTLS and accept only the gateway.
//!
//! The name checked is `server_name` with `{service}` replaced by the route's service when
//! configured, else the address the gateway dials (an IP address then needs an IP SAN).

use std::net::IpAddr;
use std::sync::Arc;

use rustls::pki_types::ServerName;
use rustls::{ClientConfig, RootCertStore};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use crate::config::UpstreamTlsSection;
use crate::pem::{read_certs, read_key, PemError};

#[derive(Debug, thiserror::Error)]
pub enum UpstreamTlsError {
    #[error(transparent)]
    File(#[from] PemError),
    #[error("upstream tls: {0}")]
    Config(String),
    #[error("`{0}` is not a valid TLS server name")]
    ServerName(String),
}

/// Client TLS settings for upstreams, one `ClientConfig` per ALPN offer.
#[derive(Clone)]
pub struct UpstreamTls {
    http1: Arc<ClientConfig>,
    http2: Arc<ClientConfig>,
    server_name: Option<String>,
}

impl std::fmt::Debug for UpstreamTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamTls")
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

impl UpstreamTls {
    /// Loads the client certificate, its key and the CA bundle; every problem is reported
    /// with the file it is in.
    pub fn load(section: &UpstreamTlsSection) -> Result<UpstreamTls, UpstreamTlsError> {
        let chain = read_certs(&section.client_cert)?;
        let key = read_key(&section.client_key)?;
        let mut roots = RootCertStore::empty();
        match &section.ca {
            Some(ca) => {
                for cert in read_certs(ca)? {
                    roots
                        .add(cert)
                        .map_err(|e| PemError::file(ca, format!("unusable CA certificate: {e}")))?;
                }
            }
            None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
        }
        if let Some(name) = &section.server_name {
            ServerName::try_from(name.replace("{service}", "service").as_str())
                .map_err(|_| UpstreamTlsError::ServerName(name.clone()))?;
        }
        let config = ClientConfig::builder_with_provider(crate::crypto_provider::provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| UpstreamTlsError::Config(e.to_string()))?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .map_err(|e| {
                PemError::file(
                    &section.client_key,
                    format!("does not fit {}: {e}", section.client_cert.display()),
                )
            })?;
        let with_alpn = |proto: &[u8]| {
            let mut c = config.clone();
            c.alpn_protocols = vec![proto.to_vec()];
            Arc::new(c)
        };
        Ok(UpstreamTls {
            http1: with_alpn(b"http/1.1"),
            http2: with_alpn(b"h2"),
            server_name: section.server_name.clone(),
        })
    }

    /// The `ClientConfig` offering `h2` (prior knowledge upstreams) or `http/1.1`.
    pub fn client_config(&self, http2: bool) -> Arc<ClientConfig> {
        if http2 {
            self.http2.clone()
        } else {
            self.http1.clone()
        }
    }

    /// The name the upstream's certificate must carry, for `service` dialled at `host`
    /// (an IP address or a host name, without port or brackets).
    pub fn server_name(
        &self,
        service: &str,
        host: &str,
    ) -> Result<ServerName<'static>, UpstreamTlsError> {
        let name = match &self.server_name {
            Some(template) => template.replace("{service}", service),
            None => host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string(),
        };
        if let Ok(ip) = name.parse::<IpAddr>() {
            return Ok(ServerName::IpAddress(ip.into()));
        }
        ServerName::try_from(name.clone()).map_err(|_| UpstreamTlsError::ServerName(name))
    }

    /// Runs the handshake on a connected socket.
    pub async fn connect(
        &self,
        tcp: TcpStream,
        name: ServerName<'static>,
        http2: bool,
    ) -> std::io::Result<TlsStream<TcpStream>> {
        TlsConnector::from(self.client_config(http2))
            .connect(name, tcp)
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
    use rustls::pki_types::PrivateKeyDer;
    use rustls::server::WebPkiClientVerifier;
    use std::path::PathBuf;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    struct Pki {
        dir: tempfile::TempDir,
        ca: rcgen::Certificate,
        ca_key: KeyPair,
    }

    impl Pki {
        fn new() -> Pki {
            let ca_key = KeyPair::generate().unwrap();
            let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            let ca = params.self_signed(&ca_key).unwrap();
            let dir = tempfile::tempdir().unwrap();
            std::fs::write(dir.path().join("ca.pem"), ca.pem()).unwrap();
            Pki { dir, ca, ca_key }
        }

        /// A leaf signed by the CA, written as `<name>.pem` and `<name>-key.pem`.
        fn leaf(&self, name: &str, sans: &[&str]) -> (rcgen::Certificate, KeyPair) {
            let key = KeyPair::generate().unwrap();
            let sans: Vec<String> = sans.iter().map(|s| s.to_string()).collect();
            let cert = CertificateParams::new(sans)
                .unwrap()
                .signed_by(&key, &self.ca, &self.ca_key)
                .unwrap();
            std::fs::write(self.path(&format!("{name}.pem")), cert.pem()).unwrap();
            std::fs::write(self.path(&format!("{name}-key.pem")), key.serialize_pem()).unwrap();
            (cert, key)
        }

        fn path(&self, file: &str) -> PathBuf {
            self.dir.path().join(file)
        }

        fn section(&self, server_name: Option<&str>) -> UpstreamTlsSection {
            UpstreamTlsSection {
                client_cert: self.path("gateway.pem"),
                client_key: self.path("gateway-key.pem"),
                ca: Some(self.path("ca.pem")),
                server_name: server_name.map(str::to_string),
            }
        }
    }

    /// A TLS echo server that requires a client certificate from `pki`'s CA.
    async fn mtls_server(pki: &Pki) -> (std::net::SocketAddr, tokio::task::JoinHandle<bool>) {
        let (cert, key) = pki.leaf("upstream", &["127.0.0.1", "orders.service.consul"]);
        let mut roots = RootCertStore::empty();
        roots.add(pki.ca.der().clone()).unwrap();
        let provider = crate::crypto_provider::provider();
        let verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                .build()
                .unwrap();
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_client_cert_verifier(verifier)
            .with_single_cert(
                vec![cert.der().clone()],
                PrivateKeyDer::try_from(key.serialize_der()).unwrap(),
            )
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            match acceptor.accept(tcp).await {
                Ok(mut tls) => {
                    let mut buf = [0u8; 4];
                    tls.read_exact(&mut buf).await.unwrap();
                    tls.write_all(&buf).await.unwrap();
                    tls.flush().await.unwrap();
                    true
                }
                Err(_) => false,
            }
        });
        (addr, task)
    }

    #[tokio::test]
    async fn the_gateway_certificate_opens_an_upstream_that_requires_one() {
        let pki = Pki::new();
        pki.leaf("gateway", &["gateway"]);
        let (addr, server) = mtls_server(&pki).await;
        let tls = UpstreamTls::load(&pki.section(None)).unwrap();
        let name = tls.server_name("orders", "127.0.0.1").unwrap();
        let tcp = TcpStream::connect(addr).await.unwrap();
        let mut stream = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            tls.connect(tcp, name, false),
        )
        .await
        .unwrap()
        .unwrap();
        stream.write_all(b"ping").await.unwrap();
        let mut buf = [0u8; 4];
        stream.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"ping");
        assert!(server.await.unwrap());
    }

    #[tokio::test]
    async fn an_upstream_outside_the_ca_is_refused() {
        let pki = Pki::new();
        pki.leaf("gateway", &["gateway"]);
        let (addr, _server) = mtls_server(&pki).await;
        // Trust another CA only.
        let other = Pki::new();
        let mut section = pki.section(None);
        section.ca = Some(other.path("ca.pem"));
        let tls = UpstreamTls::load(&section).unwrap();
        let tcp = TcpStream::connect(addr).await.unwrap();
        let result = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            tls.connect(tcp, tls.server_name("orders", "127.0.0.1").unwrap(), false),
        )
        .await
        .unwrap();
        assert!(result.is_err());
    }

    #[test]
    fn server_names_come_from_the_template_or_the_address() {
        let pki = Pki::new();
        pki.leaf("gateway", &["gateway"]);
        let plain = UpstreamTls::load(&pki.section(None)).unwrap();
        assert_eq!(
            plain.server_name("orders", "10.0.0.5").unwrap(),
            ServerName::IpAddress("10.0.0.5".parse::<IpAddr>().unwrap().into())
        );
        assert_eq!(
            plain.server_name("orders", "[::1]").unwrap(),
            ServerName::IpAddress("::1".parse::<IpAddr>().unwrap().into())
        );
        let templ = UpstreamTls::load(&pki.section(Some("{service}.service.consul"))).unwrap();
        assert_eq!(
            templ.server_name("orders", "10.0.0.5").unwrap(),
            ServerName::try_from("orders.service.consul").unwrap()
        );
    }

    #[test]
    fn file_problems_name_the_file() {
        let pki = Pki::new();
        pki.leaf("gateway", &["gateway"]);
        pki.leaf("stranger", &["stranger"]);
        let mut s = pki.section(None);
        s.client_key = pki.path("stranger-key.pem");
        let err = UpstreamTls::load(&s).unwrap_err().to_string();
        assert!(err.contains("stranger-key.pem"), "{err}");
        let mut s = pki.section(None);
        s.ca = Some(pki.path("missing.pem"));
        let err = UpstreamTls::load(&s).unwrap_err().to_string();
        assert!(err.contains("missing.pem"), "{err}");
        let err = UpstreamTls::load(&pki.section(Some("bad name!"))).unwrap_err();
        assert!(matches!(err, UpstreamTlsError::ServerName(_)), "{err}");
    }
}
