//! A lean HTTPS handshake load client for `scripts/bench-tls.sh`: `openssl s_time` spends
//! more CPU per handshake than the servers it measures (OpenSSL 3), so with it the
//! handshake rates measured the client. This one costs about half as much (rustls with the
//! gateway's mix of aws-lc and ring, one thread, no process per client), so a server on
//! its own core is the bottleneck unless it is about as cheap as the client.
//!
//! `--connections` loops run at once on one thread, each a sequence of connections: TCP
//! connect (no Nagle), handshake (one cipher suite, AES-256-GCM, and a key share for X25519
//! alone, like the s_time settings the script had), `GET /` with `Connection: close`, the whole response
//! read until the server closes, status 200 and the body's length checked. The certificate
//! is verified against `--ca` (the chain once per run, the handshake signature every time).
//! With `--resume` each loop keeps its own session cache, so every connection after
//! its first must resume (a ticket); without it every handshake must be a full one. Any
//! failure or a handshake of the wrong kind makes the exit status non-zero.
//!
//! Prints one line: `handshakes=N seconds=S cpu_s=C resumed=R full=F failed=X` (handshakes:
//! connections with a complete 200 response; cpu_s: this process's user + system time
//! during the run).
//!
//!   cargo run --release --example tls_handshakes -- 127.0.0.1:8443 --ca ca.pem \
//!       --server-name bench.test --version 1.3 --resume --connections 8 --seconds 10

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::Resumption;
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{aws_lc_rs, ring, CryptoProvider};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{
    ClientConfig, DigitallySignedStruct, HandshakeKind, RootCertStore, SignatureScheme,
    SupportedProtocolVersion,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

#[derive(Parser)]
#[command(about = "HTTPS handshakes per second against one server")]
struct Args {
    /// The server, ip:port.
    address: SocketAddr,
    /// TLS version: 1.2 or 1.3.
    #[arg(long, value_parser = ["1.2", "1.3"])]
    version: String,
    /// Resume every connection after each loop's first (session tickets).
    #[arg(long)]
    resume: bool,
    /// Loops running at once, each one connection after the other.
    #[arg(long, default_value_t = 8)]
    connections: usize,
    /// How long new connections are started.
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    /// PEM file of the CA the server's certificate must chain to.
    #[arg(long)]
    ca: PathBuf,
    /// Name to verify (and send as SNI); default: the address's IP (no SNI).
    #[arg(long)]
    server_name: Option<String>,
}

/// What one loop did.
#[derive(Default)]
struct Tally {
    handshakes: u64,
    resumed: u64,
    full: u64,
    failed: u64,
    wrong_kind: u64,
    first_error: Option<String>,
}

impl Tally {
    fn add(&mut self, other: Tally) {
        self.handshakes += other.handshakes;
        self.resumed += other.resumed;
        self.full += other.full;
        self.failed += other.failed;
        self.wrong_kind += other.wrong_kind;
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
    }

    fn error(&mut self, message: String) {
        if self.first_error.is_none() {
            self.first_error = Some(message);
        }
    }
}

struct Target {
    address: SocketAddr,
    name: ServerName<'static>,
    request: Vec<u8>,
    resume: bool,
}

fn main() -> Result<()> {
    let args = Args::parse();
    if args.connections == 0 || !(args.seconds > 0.0 && args.seconds.is_finite()) {
        bail!("--connections and --seconds must be positive");
    }
    let version: &'static SupportedProtocolVersion = match args.version.as_str() {
        "1.2" => &rustls::version::TLS12,
        _ => &rustls::version::TLS13,
    };
    let roots = load_roots(&args.ca)?;
    let name = match &args.server_name {
        Some(name) => ServerName::try_from(name.clone())
            .with_context(|| format!("bad server name {name:?}"))?,
        None => ServerName::IpAddress(args.address.ip().into()),
    };
    let host = args
        .server_name
        .clone()
        .unwrap_or_else(|| args.address.to_string());
    let target = Arc::new(Target {
        address: args.address,
        name,
        request: format!("GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n")
            .into_bytes(),
        resume: args.resume,
    });
    // The gateway's mix (`src/crypto_provider.rs`), the cheaper per handshake here too: ring
    // for the record cipher and the key schedule, aws-lc for key exchange and signatures.
    let provider = Arc::new(CryptoProvider {
        cipher_suites: vec![
            ring::cipher_suite::TLS13_AES_256_GCM_SHA384,
            ring::cipher_suite::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
            ring::cipher_suite::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
        ],
        // P-256 too: an OpenSSL server picks an ECDSA P-256 certificate for TLS 1.2 only when
        // the client lists that curve (the key share goes to X25519 alone, listed first).
        kx_groups: vec![aws_lc_rs::kx_group::X25519, aws_lc_rs::kx_group::SECP256R1],
        ..aws_lc_rs::default_provider()
    });
    let verifier = Arc::new(RememberingVerifier {
        webpki: WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
            .build()?,
        verified: Mutex::new(Vec::new()),
    });
    // One configuration per loop: each its own session cache.
    let configs = (0..args.connections)
        .map(|_| {
            let mut config = ClientConfig::builder_with_provider(provider.clone())
                .with_protocol_versions(&[version])?
                .dangerous()
                .with_custom_certificate_verifier(verifier.clone())
                .with_no_client_auth();
            config.resumption = if args.resume {
                Resumption::in_memory_sessions(8)
            } else {
                Resumption::disabled()
            };
            Ok(Arc::new(config))
        })
        .collect::<Result<Vec<_>, rustls::Error>>()?;

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let cpu0 = cpu_seconds()?;
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(args.seconds);
    let tally = runtime.block_on(async {
        let loops: Vec<_> = configs
            .into_iter()
            .map(|config| tokio::spawn(run_loop(config, target.clone(), deadline)))
            .collect();
        let mut tally = Tally::default();
        for handle in loops {
            tally.add(handle.await?);
        }
        anyhow::Ok(tally)
    })?;
    let seconds = start.elapsed().as_secs_f64();
    let cpu = cpu_seconds()? - cpu0;

    println!(
        "handshakes={} seconds={seconds:.3} cpu_s={cpu:.3} resumed={} full={} failed={}",
        tally.handshakes, tally.resumed, tally.full, tally.failed
    );
    if let Some(error) = &tally.first_error {
        eprintln!("first error: {error}");
    }
    if tally.failed > 0 || tally.wrong_kind > 0 {
        bail!(
            "{} connections failed, {} handshakes were not {}",
            tally.failed,
            tally.wrong_kind,
            if args.resume { "resumed" } else { "full" }
        );
    }
    if tally.handshakes == 0 {
        bail!("no handshake completed");
    }
    Ok(())
}

fn load_roots(path: &PathBuf) -> Result<RootCertStore> {
    let pem = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let mut roots = RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
        roots
            .add(cert.with_context(|| format!("bad PEM in {}", path.display()))?)
            .with_context(|| format!("bad certificate in {}", path.display()))?;
    }
    if roots.is_empty() {
        bail!("no certificate in {}", path.display());
    }
    Ok(roots)
}

/// webpki's verification of the server's certificate chain and name, done once per distinct
/// chain and name and then remembered for the run (a few seconds, well inside the
/// certificates' validity), as browsers cache verified chains: the chain's signatures cost
/// the client more than signing costs the server. The handshake's own signature (the proof
/// that the server holds the key) is still verified on every connection.
#[derive(Debug)]
struct RememberingVerifier {
    webpki: Arc<WebPkiServerVerifier>,
    verified: Mutex<Vec<VerifiedChain>>,
}

#[derive(Debug, PartialEq)]
struct VerifiedChain {
    end_entity: Vec<u8>,
    intermediates: Vec<Vec<u8>>,
    server_name: ServerName<'static>,
}

impl ServerCertVerifier for RememberingVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let seen = |v: &VerifiedChain| {
            v.end_entity == end_entity.as_ref()
                && v.server_name == *server_name
                && v.intermediates.len() == intermediates.len()
                && v.intermediates
                    .iter()
                    .zip(intermediates)
                    .all(|(a, b)| a.as_slice() == b.as_ref())
        };
        let lock_error = || rustls::Error::General("verified chains lock poisoned".into());
        if self
            .verified
            .lock()
            .map_err(|_| lock_error())?
            .iter()
            .any(seen)
        {
            return Ok(ServerCertVerified::assertion());
        }
        let verified = self.webpki.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )?;
        let mut chains = self.verified.lock().map_err(|_| lock_error())?;
        if chains.len() < 16 {
            chains.push(VerifiedChain {
                end_entity: end_entity.to_vec(),
                intermediates: intermediates.iter().map(|c| c.to_vec()).collect(),
                server_name: server_name.to_owned(),
            });
        }
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.webpki.supported_verify_schemes()
    }
}

/// Connections one after the other until the deadline.
async fn run_loop(config: Arc<ClientConfig>, target: Arc<Target>, deadline: Instant) -> Tally {
    let connector = TlsConnector::from(config);
    let mut tally = Tally::default();
    let mut response = Vec::with_capacity(4096);
    let mut first = true;
    while Instant::now() < deadline {
        match connection(&connector, &target, &mut response).await {
            Ok(kind) => {
                tally.handshakes += 1;
                match kind {
                    HandshakeKind::Resumed => tally.resumed += 1,
                    HandshakeKind::Full => tally.full += 1,
                    HandshakeKind::FullWithHelloRetryRequest => {}
                }
                let expected = if target.resume && !first {
                    HandshakeKind::Resumed
                } else {
                    HandshakeKind::Full
                };
                if kind != expected {
                    tally.wrong_kind += 1;
                    tally.error(format!("a {kind:?} handshake where {expected:?} was due"));
                }
                first = false;
            }
            Err(error) => {
                tally.failed += 1;
                tally.error(format!("{error:#}"));
            }
        }
    }
    tally
}

/// One connection: handshake, `GET /`, the response until the server closes.
async fn connection(
    connector: &TlsConnector,
    target: &Target,
    response: &mut Vec<u8>,
) -> Result<HandshakeKind> {
    let tcp = TcpStream::connect(target.address)
        .await
        .context("connecting")?;
    tcp.set_nodelay(true)?;
    let mut tls = connector
        .connect(target.name.clone(), tcp)
        .await
        .context("TLS handshake")?;
    let kind = tls
        .get_ref()
        .1
        .handshake_kind()
        .context("no handshake kind after the handshake")?;
    tls.write_all(&target.request)
        .await
        .context("sending the request")?;
    tls.flush().await.context("sending the request")?;
    response.clear();
    tls.read_to_end(response)
        .await
        .context("reading the response")?;
    check_response(response)?;
    Ok(kind)
}

/// A 200 with exactly the body its Content-Length announces (or up to the close without one).
fn check_response(response: &[u8]) -> Result<()> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut head = httparse::Response::new(&mut headers);
    let body_start = match head.parse(response) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => bail!("response head cut short"),
        Err(error) => bail!("bad response head: {error}"),
    };
    if head.code != Some(200) {
        bail!("status {:?}", head.code);
    }
    let length = head
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("content-length"))
        .map(|h| {
            std::str::from_utf8(h.value)
                .ok()
                .and_then(|v| v.trim().parse::<usize>().ok())
                .context("bad Content-Length")
        })
        .transpose()?;
    let body = response.len() - body_start;
    if let Some(length) = length {
        if body != length {
            bail!("body of {body} bytes, Content-Length {length}");
        }
    }
    Ok(())
}

/// This process's user + system CPU seconds so far.
fn cpu_seconds() -> Result<f64> {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage writes a whole `rusage` into the pointer it is given.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr()) } != 0 {
        return Err(std::io::Error::last_os_error()).context("getrusage");
    }
    // SAFETY: initialised by the successful call above (and zeroed before it).
    let usage = unsafe { usage.assume_init() };
    let seconds = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    Ok(seconds(usage.ru_utime) + seconds(usage.ru_stime))
}
