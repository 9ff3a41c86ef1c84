//! The one rustls crypto provider of the process, and the session-ticket keys of the
//! HTTPS listener. Which library does which part of the cryptography is decided here and
//! nowhere else (Cargo.toml gives the figures behind it).
//!
//! aws-lc does the key exchange (X25519, with the hybrid X25519MLKEM768 offered first),
//! certificate signatures and their verification, key loading, randomness and ticket
//! encryption; ring does the record ciphers and the key schedule (AES-GCM, ChaCha20-Poly1305,
//! HKDF/PRF): each is the faster at its part here (`examples/bench_tls.rs`).
//!
//! The provider is also installed as the process default on first use: libraries that
//! build their own rustls configuration (the Redis client for `rediss://`) would otherwise
//! find two compiled-in providers and no default.

use std::sync::{Arc, OnceLock};

use rustls::crypto::CryptoProvider;
use rustls::server::ProducesTickets;

/// The provider every TLS configuration of the gateway is built with.
pub fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| {
            let provider = Arc::new(CryptoProvider {
                cipher_suites: rustls::crypto::ring::DEFAULT_CIPHER_SUITES.to_vec(),
                ..rustls::crypto::aws_lc_rs::default_provider()
            });
            // Fails only when a default is already installed (by an embedding program):
            // that one stays, the gateway's own configurations still use this provider.
            let _ = CryptoProvider::install_default(provider.as_ref().clone());
            provider
        })
        .clone()
}

/// Session tickets with keys of this process: random, replaced every 6 hours, the previous
/// key still accepted, so a ticket lives at most 12 hours.
pub fn ticketer() -> Result<Arc<dyn ProducesTickets>, rustls::Error> {
    rustls::crypto::aws_lc_rs::Ticketer::new()
}
