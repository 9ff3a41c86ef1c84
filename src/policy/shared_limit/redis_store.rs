//! The Redis side of shared buckets: one connection (single node, Redis Cluster or the
//! master Sentinel names) and one atomic script per decision ([`GCRA_SCRIPT`]).
//!
//! Connections are multiplexed and cloned per call (no lock); the caller bounds every call
//! with its budget. A single node goes through the connection manager, which reconnects by
//! itself; a cluster connection follows slot moves by itself; a Sentinel master is asked for
//! again by [`RedisStore::reconnect`] after a failure, so a failover is followed.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use redis::aio::{ConnectionManager, ConnectionManagerConfig, MultiplexedConnection};
use redis::cluster_async::ClusterConnection;
use redis::sentinel::{SentinelClient, SentinelNodeConnectionInfo, SentinelServerType};
use redis::{IntoConnectionInfo, Script, TlsMode};
use sha2::{Digest, Sha256};

use crate::config::RedisTarget;

/// The decision script: GCRA on the Redis clock, a lease of several tokens at once.
pub const GCRA_SCRIPT: &str = include_str!("gcra.lua");
/// How long opening a connection may take (the probe, not a request, waits on it).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// A reply later than this is an error even for a caller without a budget.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(2);

/// Why Redis gave no decision.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    #[error("no connection to Redis yet")]
    NotConnected,
    #[error("Redis did not answer within {0} ms")]
    OverBudget(u64),
    #[error("Redis: {0}")]
    Redis(String),
    #[error("Redis answered the rate-limit script with {0}")]
    BadReply(String),
    #[error("cannot use the Redis settings: {0}")]
    Settings(String),
}

impl From<redis::RedisError> for StoreError {
    fn from(e: redis::RedisError) -> StoreError {
        // Error texts of the client name the failing step, never the URL's password.
        StoreError::Redis(e.to_string())
    }
}

/// What Redis granted for one call of the script.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grant {
    /// Tokens taken from the shared bucket (0: refused).
    pub granted: u32,
    /// Tokens left in the shared bucket after this grant.
    pub remaining: u32,
    /// Time until the shared bucket is full again.
    pub reset: Duration,
    /// With nothing granted: time until one token is back.
    pub retry_after: Duration,
}

impl Grant {
    /// Checks the script's reply: four integers, none negative, no more granted than asked.
    pub fn from_reply(reply: &[i64], wanted: u32) -> Result<Grant, StoreError> {
        let bad = || StoreError::BadReply(format!("{reply:?}"));
        let &[granted, remaining, reset_us, retry_us] = reply else {
            return Err(bad());
        };
        if [granted, remaining, reset_us, retry_us]
            .iter()
            .any(|v| *v < 0)
            || granted > i64::from(wanted)
            || (granted == 0 && retry_us == 0)
        {
            return Err(bad());
        }
        let micros = |v: i64| Duration::from_micros(v as u64);
        Ok(Grant {
            granted: granted as u32,
            remaining: u32::try_from(remaining).unwrap_or(u32::MAX),
            reset: micros(reset_us),
            retry_after: micros(retry_us),
        })
    }
}

/// One route's bucket parameters in the script's units.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BucketParams {
    pub interval_us: f64,
    pub tolerance_us: f64,
}

impl BucketParams {
    pub fn new(interval: Duration, tolerance: Duration) -> BucketParams {
        BucketParams {
            interval_us: interval.as_nanos() as f64 / 1000.0,
            tolerance_us: tolerance.as_nanos() as f64 / 1000.0,
        }
    }
}

/// The Redis key of one caller's bucket on one route: the prefix, then a hash of route and
/// caller in braces. The braces make it a Redis Cluster hash tag (one slot per bucket); the
/// hash keeps client bytes (header values, consumer names) out of Redis and every key short.
pub fn bucket_key(prefix: &str, digest: &[u8; 16]) -> String {
    format!("{prefix}{{{}}}", hex::encode(digest))
}

/// A stable 128-bit digest of route and caller, the same on every gateway.
pub fn bucket_digest(route: &str, kind: u8, key: &[u8]) -> [u8; 16] {
    let mut h = Sha256::new();
    h.update((route.len() as u64).to_be_bytes());
    h.update(route.as_bytes());
    h.update([kind]);
    h.update(key);
    let full = h.finalize();
    let mut out = [0u8; 16];
    out.copy_from_slice(&full[..16]);
    out
}

#[derive(Clone)]
enum Link {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
    Sentinel(MultiplexedConnection),
}

enum Connector {
    /// The manager is made once connected (by the probe), then reconnects by itself.
    Single(redis::Client, ConnectionManagerConfig),
    Cluster(redis::cluster::ClusterClient),
    Sentinel(tokio::sync::Mutex<SentinelClient>),
}

/// A connection to the configured Redis deployment and the decision script.
pub struct RedisStore {
    target: RedisTarget,
    connector: Connector,
    link: ArcSwapOption<Link>,
    script: Script,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("kind", &self.target.kind())
            .field("nodes", &self.target.redacted_urls())
            .finish_non_exhaustive()
    }
}

impl RedisStore {
    /// Prepares the connection; nothing is dialled until [`RedisStore::reconnect`].
    pub fn new(target: &RedisTarget) -> Result<RedisStore, StoreError> {
        // `rediss://` connections take rustls's process default provider: install ours.
        crate::crypto_provider::provider();
        let settings = |e: redis::RedisError| StoreError::Settings(e.to_string());
        let (connector, link) = match target {
            RedisTarget::Single(url) => {
                let client = redis::Client::open(url.as_str()).map_err(settings)?;
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(CONNECT_TIMEOUT))
                    .set_response_timeout(Some(RESPONSE_TIMEOUT))
                    .set_number_of_retries(1)
                    .set_max_delay(Duration::from_secs(1));
                (Connector::Single(client, config), None)
            }
            RedisTarget::Cluster(nodes) => {
                let client = redis::cluster::ClusterClientBuilder::new(nodes.clone())
                    .connection_timeout(CONNECT_TIMEOUT)
                    .response_timeout(RESPONSE_TIMEOUT)
                    .build()
                    .map_err(settings)?;
                (Connector::Cluster(client), None)
            }
            RedisTarget::Sentinel { nodes, master } => {
                // The master is reached with the user, password, database and TLS of the
                // first sentinel's URL.
                let first = nodes
                    .first()
                    .ok_or_else(|| StoreError::Settings("no sentinel".into()))?
                    .as_str()
                    .into_connection_info()
                    .map_err(settings)?;
                let mut node = SentinelNodeConnectionInfo::default()
                    .set_redis_connection_info(first.redis_settings().clone());
                if nodes[0].starts_with("rediss://") {
                    node = node.set_tls_mode(TlsMode::Secure);
                }
                let urls: Vec<&str> = nodes.iter().map(String::as_str).collect();
                let client = SentinelClient::build(
                    urls,
                    master.as_str(),
                    Some(node),
                    SentinelServerType::Master,
                )
                .map_err(settings)?;
                (Connector::Sentinel(tokio::sync::Mutex::new(client)), None)
            }
        };
        Ok(RedisStore {
            target: target.clone(),
            connector,
            link: ArcSwapOption::new(link),
            script: Script::new(GCRA_SCRIPT),
        })
    }

    pub fn target(&self) -> &RedisTarget {
        &self.target
    }

    /// Opens a connection where there is none yet (or a Sentinel master's was forgotten).
    /// The single-node manager and the cluster connection then reconnect by themselves.
    pub async fn reconnect(&self) -> Result<(), StoreError> {
        if self.link.load().is_some() {
            return Ok(());
        }
        let link = match &self.connector {
            Connector::Single(client, config) => Link::Single(
                tokio::time::timeout(
                    CONNECT_TIMEOUT,
                    ConnectionManager::new_with_config(client.clone(), config.clone()),
                )
                .await
                .map_err(|_| StoreError::Redis("connecting timed out".into()))??,
            ),
            Connector::Cluster(client) => Link::Cluster(
                tokio::time::timeout(CONNECT_TIMEOUT, client.get_async_connection())
                    .await
                    .map_err(|_| StoreError::Redis("connecting timed out".into()))??,
            ),
            Connector::Sentinel(client) => {
                let mut client = client.lock().await;
                Link::Sentinel(
                    tokio::time::timeout(CONNECT_TIMEOUT, client.get_async_connection())
                        .await
                        .map_err(|_| StoreError::Redis("connecting timed out".into()))??,
                )
            }
        };
        self.link.store(Some(Arc::new(link)));
        Ok(())
    }

    /// Forgets a Sentinel master's connection so the next [`RedisStore::reconnect`] asks
    /// the sentinels again (after a failover the old master may be a replica). Other kinds
    /// keep their self-healing connections.
    pub fn forget_connection(&self) {
        if matches!(self.connector, Connector::Sentinel(_)) {
            self.link.store(None);
        }
    }

    /// `PING`.
    pub async fn ping(&self) -> Result<(), StoreError> {
        let link = self.link.load_full().ok_or(StoreError::NotConnected)?;
        let cmd = redis::cmd("PING");
        let pong: String = match &*link {
            Link::Single(c) => cmd.query_async(&mut c.clone()).await?,
            Link::Cluster(c) => cmd.query_async(&mut c.clone()).await?,
            Link::Sentinel(c) => cmd.query_async(&mut c.clone()).await?,
        };
        if pong != "PONG" {
            return Err(StoreError::BadReply(format!("PING: {pong:?}")));
        }
        Ok(())
    }

    /// Takes up to `want` tokens from the bucket at `key` (one script call).
    pub async fn take(
        &self,
        key: &str,
        params: BucketParams,
        want: u32,
    ) -> Result<Grant, StoreError> {
        let link = self.link.load_full().ok_or(StoreError::NotConnected)?;
        let mut call = self.script.key(key);
        call.arg(params.interval_us)
            .arg(params.tolerance_us)
            .arg(want);
        let reply: Vec<i64> = match &*link {
            Link::Single(c) => call.invoke_async(&mut c.clone()).await?,
            Link::Cluster(c) => call.invoke_async(&mut c.clone()).await?,
            Link::Sentinel(c) => call.invoke_async(&mut c.clone()).await?,
        };
        Grant::from_reply(&reply, want)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_are_checked_before_they_count() {
        let ok = Grant::from_reply(&[3, 7, 150_000, 0], 5).unwrap();
        assert_eq!(ok.granted, 3);
        assert_eq!(ok.remaining, 7);
        assert_eq!(ok.reset, Duration::from_millis(150));
        let refused = Grant::from_reply(&[0, 0, 900_000, 50_000], 1).unwrap();
        assert_eq!(refused.retry_after, Duration::from_millis(50));
        for bad in [
            &[][..],
            &[1, 2, 3][..],
            &[1, 2, 3, 4, 5][..],
            &[6, 0, 1, 0][..],
            &[-1, 0, 1, 0][..],
            &[1, 0, -1, 0][..],
            &[0, 0, 1, 0][..],
        ] {
            assert!(Grant::from_reply(bad, 5).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn keys_are_hash_tagged_stable_and_free_of_client_bytes() {
        let d = bucket_digest("orders", 2, b"acme}{\r\n");
        assert_eq!(d, bucket_digest("orders", 2, b"acme}{\r\n"));
        assert_ne!(d, bucket_digest("orders", 1, b"acme}{\r\n"));
        assert_ne!(d, bucket_digest("orders2", 2, b"acme}{\r\n"));
        // The route name's length is hashed too: ("ab", "c") is not ("a", "bc").
        assert_ne!(
            bucket_digest("ab", 2, b"c"),
            bucket_digest("a", 2, b"\x02c")
        );
        let key = bucket_key("switchyard:rl:", &d);
        assert!(key.starts_with("switchyard:rl:{"));
        assert!(key.ends_with('}'));
        assert_eq!(key.len(), "switchyard:rl:{}".len() + 32);
        assert!(key[15..47].bytes().all(|b| b.is_ascii_hexdigit()));
    }

    #[test]
    fn bucket_parameters_are_in_microseconds() {
        let p = BucketParams::new(Duration::from_millis(50), Duration::from_secs(1));
        assert_eq!(p.interval_us, 50_000.0);
        assert_eq!(p.tolerance_us, 1_000_000.0);
        let third = BucketParams::new(Duration::from_nanos(333_333_333), Duration::from_secs(1));
        assert!((third.interval_us - 333_333.333).abs() < 1e-6);
    }
}
