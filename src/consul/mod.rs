//! The Consul HTTP client and the generic blocking-query watch loop. Knows nothing of the
//! gateway: `discovery`, `routing::kv` and the auth key sources build on [`watch`].
//!
//! - [`client`]: reqwest wrapper (TLS like the Consul CLI, timeouts, consistency modes).
//! - [`agents`]: several agent addresses, failover and failback.
//! - [`token`]: the ACL token, re-read from its file, and Consul's refusals of it.
//! - [`index`]: the `X-Consul-Index` rules.
//! - [`watch`]: one loop for every blocking query: backoff, rate limit, watchdog, publish on change.
//! - [`types`]: serde shapes of health entries and KV pairs.

pub mod agents;
pub mod client;
pub mod index;
pub mod token;
pub mod types;
pub mod watch;

pub use client::{ClientSettings, Consistency, ConsulClient, QueryAnswer};
pub use index::Index;
pub use types::{KvPair, ServiceCheck, ServiceEntry, ServiceRegistration};
pub use watch::{KvPrefix, WatchHandle, WatchOptions, WatchStatus};

#[derive(Debug, thiserror::Error)]
pub enum ConsulError {
    #[error("consul client setup: {0}")]
    Setup(String),
    #[error("cannot reach consul: {0}")]
    Transport(String),
    #[error("consul answered {status}: {body}")]
    Status { status: u16, body: String },
    /// 403: the ACL token is missing, expired, revoked or lacks a permission. Not an
    /// outage: the agent answered, and will again once the token works.
    #[error("consul refused the ACL token (403 {message})")]
    Refused { message: String },
    #[error("consul answer without a valid X-Consul-Index header")]
    NoIndex,
    #[error("cannot decode consul answer: {0}")]
    Decode(String),
    #[error("no answer from consul within {0:?} (watchdog)")]
    Stalled(std::time::Duration),
}

impl ConsulError {
    /// Worth retrying as is: network trouble, 5xx (no leader) and 429 (rate limited).
    /// Other statuses (403 ACL, 400) need an operator; the watch still retries, slowly.
    pub fn is_transient(&self) -> bool {
        match self {
            ConsulError::Transport(_) | ConsulError::Stalled(_) | ConsulError::NoIndex => true,
            ConsulError::Status { status, .. } => *status >= 500 || *status == 429,
            ConsulError::Setup(_) | ConsulError::Decode(_) | ConsulError::Refused { .. } => false,
        }
    }
}
