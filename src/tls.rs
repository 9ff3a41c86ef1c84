//! TLS termination with rustls: the `ServerConfig` of the HTTPS listener, a resolver
//! that picks the certificate by SNI (first certificate = default), session resumption
//! (tickets, and a bounded session cache for TLS 1.2 clients without them), hot reload of
//! certificate files, optional client-certificate verification, and the plain-HTTP
//! listener that redirects to HTTPS.
//!
//! Reload swaps the resolver's certificate table through an `ArcSwap`: handshakes after the
//! swap see the new certificates, established connections are untouched, and a broken or
//! half-written file keeps the old table serving.

use std::collections::HashMap;
use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{header, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use rustls::crypto::CryptoProvider;
use rustls::server::{
    ClientHello, NoServerSessionStorage, ResolvesServerCert, ServerSessionMemoryCache,
    WebPkiClientVerifier,
};
use rustls::sign::CertifiedKey;
use rustls::{RootCertStore, ServerConfig};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::config::{CertificateSection, TlsSection};
use crate::pem::{read_certs, read_key, PemError};
use crate::shutdown::Shutdown;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error(transparent)]
    File(#[from] PemError),
    #[error("{key} does not belong to {cert}")]
    Mismatch { cert: PathBuf, key: PathBuf },
    #[error("tls: {0}")]
    Config(String),
}

/// Certificates by name. Names are lower-case; `*.example.com` is stored as `example.com`
/// in `wildcard` and matches exactly one more label.
#[derive(Debug)]
struct CertTable {
    default: Arc<CertifiedKey>,
    exact: HashMap<String, Arc<CertifiedKey>>,
    wildcard: HashMap<String, Arc<CertifiedKey>>,
    /// SAN DNS names of each certificate, in configuration order (for logs and admin).
    names: Vec<Vec<String>>,
}

impl CertTable {
    fn build(certs: Vec<(Arc<CertifiedKey>, Vec<String>)>) -> Result<CertTable, TlsError> {
        let mut exact = HashMap::new();
        let mut wildcard = HashMap::new();
        let mut names = Vec::new();
        let Some(default) = certs.first().map(|(c, _)| c.clone()) else {
            return Err(TlsError::Config("no certificate".into()));
        };
        for (cert, dns) in certs {
            for name in &dns {
                let name = name.to_ascii_lowercase();
                // The first certificate naming a host wins, as in configuration order.
                match name.strip_prefix("*.") {
                    Some(parent) => wildcard.entry(parent.to_string()),
                    None => exact.entry(name),
                }
                .or_insert_with(|| cert.clone());
            }
            names.push(dns);
        }
        Ok(CertTable {
            default,
            exact,
            wildcard,
            names,
        })
    }

    fn pick(&self, sni: Option<&str>) -> Arc<CertifiedKey> {
        let Some(sni) = sni else {
            return self.default.clone();
        };
        let sni = sni.trim_end_matches('.').to_ascii_lowercase();
        if let Some(c) = self.exact.get(&sni) {
            return c.clone();
        }
        if let Some((_, parent)) = sni.split_once('.') {
            if let Some(c) = self.wildcard.get(parent) {
                return c.clone();
            }
        }
        self.default.clone()
    }
}

/// Chooses the certificate of each handshake by SNI; falls back to the first one.
#[derive(Debug)]
pub struct SniResolver {
    table: ArcSwap<CertTable>,
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.table.load().pick(hello.server_name()))
    }
}

/// Size and modification time of every watched file: a change means reload.
type Stamps = Vec<Option<(SystemTime, u64)>>;

/// The TLS side of the HTTPS listener.
#[derive(Debug)]
pub struct Tls {
    files: Vec<CertificateSection>,
    provider: Arc<CryptoProvider>,
    resolver: Arc<SniResolver>,
    config: Arc<ServerConfig>,
    reload_interval: Duration,
    /// The stamps of the last attempt (successful or not), so a broken file is retried
    /// once it changes again, not on every poll.
    attempted: Mutex<Stamps>,
}

impl Tls {
    /// Loads every certificate and builds the server configuration: TLS 1.2 and 1.3,
    /// ALPN `h2` then `http/1.1`, session resumption as configured, client certificates
    /// when `client_ca` is set.
    pub fn load(section: &TlsSection) -> Result<Tls, TlsError> {
        let provider = crate::crypto_provider::provider();
        let stamps = stamps(&section.certificates);
        let table = load_table(&section.certificates, &provider)?;
        let resolver = Arc::new(SniResolver {
            table: ArcSwap::from_pointee(table),
        });
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| TlsError::Config(e.to_string()))?;
        let builder = match &section.client_ca {
            None => builder.with_no_client_auth(),
            Some(path) => {
                let mut roots = RootCertStore::empty();
                for cert in read_certs(path)? {
                    roots
                        .add(cert)
                        .map_err(|e| PemError::file(path, format!("not a CA certificate: {e}")))?;
                }
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                        .build()
                        .map_err(|e| PemError::file(path, e.to_string()))?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let mut config = builder.with_cert_resolver(resolver.clone());
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        // rustls's default keeps 256 sessions and issues no ticket: with more clients than
        // that, a returning one finds its session evicted and pays a full handshake.
        if section.session_tickets {
            config.ticketer = crate::crypto_provider::ticketer()
                .map_err(|e| TlsError::Config(format!("session ticket keys: {e}")))?;
        }
        config.session_storage = match section.session_cache_entries {
            0 => Arc::new(NoServerSessionStorage {}),
            n => ServerSessionMemoryCache::new(n),
        };
        Ok(Tls {
            files: section.certificates.clone(),
            provider,
            resolver,
            config: Arc::new(config),
            reload_interval: Duration::from_secs(section.reload_interval_s.max(1)),
            attempted: Mutex::new(stamps),
        })
    }

    pub fn server_config(&self) -> Arc<ServerConfig> {
        self.config.clone()
    }

    pub fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(self.config.clone())
    }

    /// SAN DNS names of each served certificate, in configuration order.
    pub fn certificate_names(&self) -> Vec<Vec<String>> {
        self.resolver.table.load().names.clone()
    }

    /// Reloads when any certificate or key file changed since the last attempt.
    /// `None`: nothing changed.
    pub fn reload_if_changed(&self) -> Option<Result<(), TlsError>> {
        let now = stamps(&self.files);
        {
            let mut attempted = self.attempted.lock().unwrap_or_else(|p| p.into_inner());
            if *attempted == now {
                return None;
            }
            *attempted = now;
        }
        Some(self.reload())
    }

    /// Loads every file again and swaps the table in; on error the old one keeps serving.
    pub fn reload(&self) -> Result<(), TlsError> {
        match load_table(&self.files, &self.provider) {
            Ok(table) => {
                tracing::info!(certificates = ?table.names, "TLS certificates reloaded");
                self.resolver.table.store(Arc::new(table));
                metrics::counter!(crate::metrics::TLS_RELOADS, "result" => "ok").increment(1);
                Ok(())
            }
            Err(e) => {
                tracing::error!(error = %e, "TLS reload failed; the previous certificates keep serving");
                metrics::counter!(crate::metrics::TLS_RELOADS, "result" => "error").increment(1);
                Err(e)
            }
        }
    }

    /// Polls the files every `reload_interval_s` until shutdown.
    pub fn spawn_reloader(self: &Arc<Self>, shutdown: Shutdown) -> JoinHandle<()> {
        let tls = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(tls.reload_interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = shutdown.wait() => return,
                }
                let tls = tls.clone();
                // File reads are blocking; keep them off the request workers.
                let _ = tokio::task::spawn_blocking(move || tls.reload_if_changed()).await;
            }
        })
    }
}

fn stamps(files: &[CertificateSection]) -> Stamps {
    files
        .iter()
        .flat_map(|c| [&c.cert, &c.key])
        .map(|p| {
            std::fs::metadata(p)
                .ok()
                .and_then(|m| Some((m.modified().ok()?, m.len())))
        })
        .collect()
}

fn load_table(
    files: &[CertificateSection],
    provider: &CryptoProvider,
) -> Result<CertTable, TlsError> {
    let mut certs = Vec::with_capacity(files.len());
    for f in files {
        certs.push(load_pair(&f.cert, &f.key, provider)?);
    }
    CertTable::build(certs)
}

fn load_pair(
    cert_path: &Path,
    key_path: &Path,
    provider: &CryptoProvider,
) -> Result<(Arc<CertifiedKey>, Vec<String>), TlsError> {
    let chain = read_certs(cert_path)?;
    let key = read_key(key_path)?;
    let signing = provider
        .key_provider
        .load_private_key(key)
        .map_err(|e| PemError::file(key_path, format!("unusable private key: {e}")))?;
    let certified = CertifiedKey::new(chain, signing);
    if certified.keys_match().is_err() {
        return Err(TlsError::Mismatch {
            cert: cert_path.to_path_buf(),
            key: key_path.to_path_buf(),
        });
    }
    let names = {
        let leaf = &certified.cert[0];
        let ee = webpki::EndEntityCert::try_from(leaf)
            .map_err(|e| PemError::file(cert_path, format!("unparsable certificate: {e}")))?;
        ee.valid_dns_names().map(str::to_string).collect()
    };
    Ok((Arc::new(certified), names))
}

/// Serves the HTTP → HTTPS redirect listener until shutdown: every request gets a 308 to
/// the same host and path on `https_port`.
pub async fn serve_redirect(listener: TcpListener, https_port: u16, shutdown: Shutdown) {
    loop {
        let Some((stream, _)) = shutdown.accept(&listener, "redirect").await else {
            return;
        };
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<Incoming>| async move {
                Ok::<_, Infallible>(redirect_response(&req, https_port))
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), service);
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = shutdown.wait() => conn.as_mut().graceful_shutdown(),
            }
        });
    }
}

/// The redirect for one request (400 when the request names no usable host).
pub fn redirect_response<B>(req: &Request<B>, https_port: u16) -> Response<Full<Bytes>> {
    let host = req
        .uri()
        .host()
        .or_else(|| req.headers().get(header::HOST)?.to_str().ok())
        .map(strip_port)
        .filter(|h| valid_host(h));
    let Some(host) = host else {
        let mut resp = Response::new(Full::new(Bytes::from_static(b"missing or invalid Host\n")));
        *resp.status_mut() = StatusCode::BAD_REQUEST;
        return resp;
    };
    let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
    let location = if https_port == 443 {
        format!("https://{host}{path}")
    } else {
        format!("https://{host}:{https_port}{path}")
    };
    let mut resp = Response::new(Full::new(Bytes::new()));
    *resp.status_mut() = StatusCode::PERMANENT_REDIRECT;
    if let Ok(v) = header::HeaderValue::from_str(&location) {
        resp.headers_mut().insert(header::LOCATION, v);
    }
    resp
}

fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        return host
            .split_once(']')
            .map_or(host, |(h, _)| &host[..h.len() + 1]);
    }
    host.rsplit_once(':').map_or(host, |(h, _)| h)
}

fn valid_host(h: &str) -> bool {
    if let Some(inner) = h.strip_prefix('[').and_then(|r| r.strip_suffix(']')) {
        return inner.parse::<std::net::Ipv6Addr>().is_ok();
    }
    !h.is_empty()
        && h.len() <= 253
        && h.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(uri: &str, host: Option<&str>) -> Response<Full<Bytes>> {
        let mut b = Request::builder().uri(uri);
        if let Some(h) = host {
            b = b.header(header::HOST, h);
        }
        redirect_response(&b.body(()).unwrap(), 8443)
    }

    #[test]
    fn plain_http_is_sent_to_the_same_place_over_https() {
        let r = get("/a/b?c=d", Some("Example.com:8080"));
        assert_eq!(r.status(), StatusCode::PERMANENT_REDIRECT);
        assert_eq!(
            r.headers()[header::LOCATION],
            "https://Example.com:8443/a/b?c=d"
        );
        let r = redirect_response(
            &Request::builder()
                .uri("/")
                .header(header::HOST, "[::1]:80")
                .body(())
                .unwrap(),
            443,
        );
        assert_eq!(r.headers()[header::LOCATION], "https://[::1]/");
    }

    #[test]
    fn a_missing_or_odd_host_is_refused() {
        assert_eq!(get("/", None).status(), StatusCode::BAD_REQUEST);
        assert_eq!(
            get("/", Some("evil.com/path")).status(),
            StatusCode::BAD_REQUEST
        );
        assert_eq!(get("/", Some("a b")).status(), StatusCode::BAD_REQUEST);
    }
}
