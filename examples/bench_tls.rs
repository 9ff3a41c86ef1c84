//! What TLS costs the server side with rustls's aws-lc and ring providers and with the
//! gateway's own mix of the two (`crypto_provider.rs`), side by side in one run:
//! full handshakes (TLS 1.3 and 1.2; ECDSA P-256 and RSA-2048 certificates), resumed ones
//! (session tickets, as the gateway issues them) and 256 B or 16 KiB of application data
//! each way.
//! Client and server talk in memory, no sockets, and only the server's calls are timed, so
//! the figures are the provider's cryptography and rustls's work alone; the providers
//! alternate batch by batch and each figure is the fastest batch (the one least disturbed
//! by neighbours on a shared machine). `scripts/bench-tls.sh` measures the whole gateway.
//!
//!   cargo run --release --example bench_tls -- [--batches N]

use std::sync::Arc;
use std::time::{Duration, Instant};

use aws_lc_rs::encoding::AsDer;
use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair, PKCS_RSA_SHA256};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::{ProducesTickets, ServerSessionMemoryCache};
use rustls::{ClientConfig, ClientConnection, RootCertStore, ServerConfig, ServerConnection};

const RSA_PRIVATE: &str = include_str!("../tests/fixtures/rsa-private.pem");
const HANDSHAKES_PER_BATCH: u32 = 50;

struct Provider {
    name: &'static str,
    provider: Arc<CryptoProvider>,
    ticketer: fn() -> Result<Arc<dyn ProducesTickets>, rustls::Error>,
}

/// A CA and a leaf for `bench.test` signed by it, with the leaf's key.
struct Pki {
    roots: RootCertStore,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

fn pki(leaf_key: KeyPair, key: PrivateKeyDer<'static>) -> Pki {
    let ca_key = KeyPair::generate().expect("CA key");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).expect("CA certificate");
    let leaf = CertificateParams::new(vec!["bench.test".to_string()])
        .expect("leaf params")
        .signed_by(&leaf_key, &ca, &ca_key)
        .expect("leaf certificate");
    let mut roots = RootCertStore::empty();
    roots.add(ca.der().clone()).expect("CA in the root store");
    Pki {
        roots,
        chain: vec![leaf.der().clone()],
        key,
    }
}

/// The server configuration the gateway builds (`tls.rs`), for one provider.
fn server_config(p: &Provider, pki: &Pki) -> Arc<ServerConfig> {
    let mut config = ServerConfig::builder_with_provider(p.provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(pki.chain.clone(), pki.key.clone_key())
        .expect("certificate");
    config.ticketer = (p.ticketer)().expect("ticketer");
    config.session_storage = ServerSessionMemoryCache::new(4096);
    Arc::new(config)
}

/// A client that keeps its sessions (to resume) or makes a full handshake every time.
fn client_config(
    p: &Provider,
    pki: &Pki,
    version: &'static rustls::SupportedProtocolVersion,
    resume: bool,
) -> Arc<ClientConfig> {
    let mut config = ClientConfig::builder_with_provider(p.provider.clone())
        .with_protocol_versions(&[version])
        .expect("version")
        .with_root_certificates(pki.roots.clone())
        .with_no_client_auth();
    if !resume {
        config.resumption = rustls::client::Resumption::disabled();
    }
    Arc::new(config)
}

/// Hands what the client has to send to the server; the server's time goes to `server`.
fn client_to_server(c: &mut ClientConnection, s: &mut ServerConnection, server: &mut Duration) {
    let mut buf = Vec::new();
    while c.wants_write() {
        c.write_tls(&mut buf).expect("client write");
    }
    let t = Instant::now();
    let mut rd = &buf[..];
    while !rd.is_empty() {
        s.read_tls(&mut rd).expect("server read");
        s.process_new_packets().expect("server process");
    }
    *server += t.elapsed();
}

fn server_to_client(s: &mut ServerConnection, c: &mut ClientConnection, server: &mut Duration) {
    let mut buf = Vec::new();
    let t = Instant::now();
    while s.wants_write() {
        s.write_tls(&mut buf).expect("server write");
    }
    *server += t.elapsed();
    let mut rd = &buf[..];
    while !rd.is_empty() {
        c.read_tls(&mut rd).expect("client read");
        c.process_new_packets().expect("client process");
    }
}

/// One handshake (and, for TLS 1.3, the tickets after it); the server's time.
fn handshake(client: &Arc<ClientConfig>, server: &Arc<ServerConfig>, resumed: bool) -> Duration {
    let name = ServerName::try_from("bench.test").expect("name");
    let mut c = ClientConnection::new(client.clone(), name).expect("client");
    let mut spent = Duration::ZERO;
    let t = Instant::now();
    let mut s = ServerConnection::new(server.clone()).expect("server");
    spent += t.elapsed();
    for _ in 0..8 {
        if !(c.is_handshaking() || s.is_handshaking() || s.wants_write()) {
            break;
        }
        client_to_server(&mut c, &mut s, &mut spent);
        server_to_client(&mut s, &mut c, &mut spent);
    }
    assert!(
        !c.is_handshaking() && !s.is_handshaking(),
        "handshake stalled"
    );
    let kind = c.handshake_kind();
    assert_eq!(
        kind == Some(rustls::HandshakeKind::Resumed),
        resumed,
        "{kind:?}"
    );
    spent
}

/// `bytes` each way over an established connection; the server's time.
fn records(
    client: &Arc<ClientConfig>,
    server: &Arc<ServerConfig>,
    bytes: usize,
    rounds: u32,
) -> Duration {
    let name = ServerName::try_from("bench.test").expect("name");
    let mut c = ClientConnection::new(client.clone(), name).expect("client");
    let mut s = ServerConnection::new(server.clone()).expect("server");
    let mut ignored = Duration::ZERO;
    for _ in 0..8 {
        client_to_server(&mut c, &mut s, &mut ignored);
        server_to_client(&mut s, &mut c, &mut ignored);
    }
    assert!(
        !c.is_handshaking() && !s.is_handshaking(),
        "handshake stalled"
    );
    let data = vec![7u8; bytes];
    let mut got = vec![0u8; bytes];
    let mut spent = Duration::ZERO;
    for _ in 0..rounds {
        std::io::Write::write_all(&mut c.writer(), &data).expect("client data");
        client_to_server(&mut c, &mut s, &mut spent);
        let t = Instant::now();
        std::io::Read::read_exact(&mut s.reader(), &mut got).expect("server reads");
        std::io::Write::write_all(&mut s.writer(), &got).expect("server data");
        spent += t.elapsed();
        server_to_client(&mut s, &mut c, &mut spent);
        std::io::Read::read_exact(&mut c.reader(), &mut got).expect("client reads");
    }
    spent
}

fn main() {
    let mut batches = 9u32;
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let [flag, n] = &args[..] {
        if flag == "--batches" {
            batches = n.parse().expect("--batches N");
        }
    }
    let providers = [
        Provider {
            name: "aws-lc-rs",
            provider: Arc::new(rustls::crypto::aws_lc_rs::default_provider()),
            ticketer: rustls::crypto::aws_lc_rs::Ticketer::new,
        },
        Provider {
            name: "ring",
            provider: Arc::new(rustls::crypto::ring::default_provider()),
            ticketer: rustls::crypto::ring::Ticketer::new,
        },
        Provider {
            name: "gateway",
            provider: switchyard::crypto_provider::provider(),
            ticketer: switchyard::crypto_provider::ticketer,
        },
    ];
    let ecdsa_key = KeyPair::generate().expect("ECDSA key");
    let ecdsa_der = PrivateKeyDer::Pkcs8(ecdsa_key.serialize_der().into());
    let ecdsa = pki(ecdsa_key, ecdsa_der);
    // The fixture is PKCS#1; rcgen takes PKCS#8.
    let pkcs1 = rustls_pemfile::private_key(&mut RSA_PRIVATE.as_bytes())
        .expect("RSA-2048 PEM")
        .expect("an RSA-2048 key");
    let pkcs8 = aws_lc_rs::rsa::KeyPair::from_der(pkcs1.secret_der())
        .expect("RSA-2048 key")
        .as_der()
        .expect("RSA-2048 key as PKCS#8");
    let pkcs8 = rustls::pki_types::PrivatePkcs8KeyDer::from(pkcs8.as_ref().to_vec());
    let rsa_key =
        KeyPair::from_pkcs8_der_and_sign_algo(&pkcs8, &PKCS_RSA_SHA256).expect("RSA-2048 key");
    let rsa = pki(rsa_key, PrivateKeyDer::Pkcs8(pkcs8));
    let v13 = &rustls::version::TLS13;
    let v12 = &rustls::version::TLS12;
    // case, PKI, version, what: Ok(resumed) for a handshake, Err(bytes) for records
    let cases: [(&str, &Pki, _, Result<bool, usize>); 10] = [
        ("full TLS 1.3 ECDSA", &ecdsa, v13, Ok(false)),
        ("full TLS 1.3 RSA-2048", &rsa, v13, Ok(false)),
        ("full TLS 1.2 ECDSA", &ecdsa, v12, Ok(false)),
        ("full TLS 1.2 RSA-2048", &rsa, v12, Ok(false)),
        ("resumed TLS 1.3 (ticket)", &ecdsa, v13, Ok(true)),
        ("resumed TLS 1.2 (ticket)", &ecdsa, v12, Ok(true)),
        ("256 B each way, TLS 1.3", &ecdsa, v13, Err(256)),
        ("256 B each way, TLS 1.2", &ecdsa, v12, Err(256)),
        ("16 KiB each way, TLS 1.3", &ecdsa, v13, Err(16 * 1024)),
        ("16 KiB each way, TLS 1.2", &ecdsa, v12, Err(16 * 1024)),
    ];
    println!(
        "# server-side µs per operation, fastest of {batches} batches of {HANDSHAKES_PER_BATCH}"
    );
    print!("{:<28}", "case");
    for p in &providers {
        print!(" {:>10}", p.name);
    }
    println!(" {:>8} {:>8}", "gw/aws", "gw/ring");
    for (case, pki, version, what) in cases {
        let mut best = vec![f64::INFINITY; providers.len()];
        for _ in 0..batches {
            for (i, p) in providers.iter().enumerate() {
                let server = server_config(p, pki);
                let client = client_config(p, pki, version, what == Ok(true));
                let spent = match what {
                    Ok(resumed) => {
                        if resumed {
                            handshake(&client, &server, false);
                        }
                        (0..HANDSHAKES_PER_BATCH)
                            .map(|_| handshake(&client, &server, resumed))
                            .sum::<Duration>()
                    }
                    Err(bytes) => records(&client, &server, bytes, HANDSHAKES_PER_BATCH),
                };
                let us = spent.as_secs_f64() * 1e6 / f64::from(HANDSHAKES_PER_BATCH);
                best[i] = best[i].min(us);
            }
        }
        print!("{case:<28}");
        for us in &best {
            print!(" {us:>10.1}");
        }
        println!(" {:>8.2} {:>8.2}", best[2] / best[0], best[2] / best[1]);
    }
}
