//! HTTP/1.1 keep-alive connections to instances, pooled per instance address and TLS
//! identity and reused most-recent first.
//!
//! Each connection runs hyper's dispatcher in a task of its own; it is leased for one
//! exchange and comes back when the response body has been read to its end, straight
//! from the body's poll (see [`Lease`]). A request thus costs one short mutex section and
//! no task, boxed future or checkout channel of its own; hyper-util's general-purpose
//! client, which has them, cost 8% more instructions per request
//! (`scripts/bench-cost.sh`). Connections idle longer than the idle timeout,
//! closed by the instance, or beyond the per-instance cap are dropped, which closes them.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::{Duration, Instant};

use http::uri::Authority;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;

use super::body::UpstreamBody;
use super::upstream::{ConnectError, Connector};

/// Which connections are interchangeable: same instance address, same TLS identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolKey {
    pub authority: Authority,
    /// The service whose name the upstream certificate carries, for TLS connections.
    pub tls_service: Option<String>,
}

impl std::hash::Hash for PoolKey {
    /// The address in one write rather than `Authority`'s byte at a time, lower-cased
    /// like its (case-insensitive) equality; an address is short.
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        let mut lower = [0u8; 64];
        for chunk in self.authority.as_str().as_bytes().chunks(lower.len()) {
            let lower = &mut lower[..chunk.len()];
            lower.copy_from_slice(chunk);
            lower.make_ascii_lowercase();
            state.write(lower);
        }
        self.tls_service.hash(state);
    }
}

/// Why an exchange with an instance failed.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// No connection could be made; nothing was sent.
    #[error(transparent)]
    Connect(#[from] ConnectError),
    /// The connection failed during the exchange; the request may have been sent.
    #[error(transparent)]
    Http(#[from] hyper::Error),
    /// An HTTP/2 exchange through hyper-util's client.
    #[error(transparent)]
    Client(#[from] hyper_util::client::legacy::Error),
    /// The request could not be addressed to the instance; nothing was sent.
    #[error("cannot address the instance: {0}")]
    Address(#[from] http::Error),
}

impl SendError {
    /// Whether the failure happened before anything reached the instance.
    pub fn is_connect(&self) -> bool {
        match self {
            SendError::Connect(_) => true,
            SendError::Http(_) | SendError::Address(_) => false,
            SendError::Client(e) => e.is_connect(),
        }
    }
}

struct Idle {
    tx: SendRequest<UpstreamBody>,
    since: Instant,
}

pub struct Http1Pool {
    idle: Mutex<HashMap<PoolKey, VecDeque<Idle>, foldhash::fast::RandomState>>,
    max_idle_per_host: usize,
    idle_timeout: Duration,
    /// Set once the task that drops expired connections of quiet instances runs.
    reaper: std::sync::Once,
    this: Weak<Http1Pool>,
}

impl Http1Pool {
    pub fn new(max_idle_per_host: usize, idle_timeout: Duration) -> Arc<Http1Pool> {
        Arc::new_cyclic(|this| Http1Pool {
            idle: Mutex::new(HashMap::default()),
            max_idle_per_host,
            idle_timeout,
            reaper: std::sync::Once::new(),
            this: this.clone(),
        })
    }

    /// Sends `req` on an idle connection to `key`, or on a new one made by `connector`.
    /// A request that a pooled connection could not take (it closed meanwhile) moves to
    /// the next one; only what reached the wire can fail with [`SendError::Http`].
    pub async fn send(
        &self,
        key: PoolKey,
        connector: impl FnOnce() -> Connector,
        mut req: Request<UpstreamBody>,
    ) -> Result<(Response<Incoming>, Lease), SendError> {
        while let Some(mut tx) = self.checkout(&key) {
            // Only connections ready for a request are pooled; one that is not any more
            // is closing.
            if !tx.is_ready() {
                continue;
            }
            match tx.try_send_request(req).await {
                Ok(response) => return Ok((response, self.lease(tx, key))),
                Err(mut e) => match e.take_message() {
                    Some(back) => req = back,
                    None => return Err(SendError::Http(e.into_error())),
                },
            }
        }
        // Boxed: dialing (TLS included) is the cold path, and its state would otherwise
        // enlarge every request's future, which stays in memory while the request is out.
        let mut tx = Box::pin(self.connect(&key, connector())).await?;
        let response = tx.send_request(req).await?;
        Ok((response, self.lease(tx, key)))
    }

    fn lease(&self, tx: SendRequest<UpstreamBody>, key: PoolKey) -> Lease {
        Lease {
            tx,
            key,
            pool: self.this.clone(),
        }
    }

    fn checkout(&self, key: &PoolKey) -> Option<SendRequest<UpstreamBody>> {
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        let list = idle.get_mut(key)?;
        let now = Instant::now();
        while let Some(entry) = list.pop_back() {
            if !entry.tx.is_closed() && now.duration_since(entry.since) < self.idle_timeout {
                return Some(entry.tx);
            }
        }
        None
    }

    async fn connect(
        &self,
        key: &PoolKey,
        connector: Connector,
    ) -> Result<SendRequest<UpstreamBody>, SendError> {
        let stream = connector.dial(&key.authority).await?;
        let (tx, conn) = http1::Builder::new()
            .writev(false)
            .handshake(TokioIo::new(stream))
            .await?;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(error = %e, "upstream connection ended with an error");
            }
        });
        metrics::counter!(crate::metrics::UPSTREAM_CONNECTS).increment(1);
        self.start_reaper();
        Ok(tx)
    }

    fn put(&self, key: PoolKey, tx: SendRequest<UpstreamBody>) {
        if tx.is_closed() || self.max_idle_per_host == 0 {
            return;
        }
        let now = Instant::now();
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        let list = idle.entry(key).or_default();
        while list
            .front()
            .is_some_and(|e| e.tx.is_closed() || now.duration_since(e.since) >= self.idle_timeout)
        {
            list.pop_front();
        }
        if list.len() < self.max_idle_per_host {
            list.push_back(Idle { tx, since: now });
        }
    }

    /// Drops expired and closed connections of every instance, and forgets instances
    /// with none left, so addresses that left the catalog do not hold memory.
    fn reap(&self) {
        let now = Instant::now();
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        idle.retain(|_, list| {
            list.retain(|e| !e.tx.is_closed() && now.duration_since(e.since) < self.idle_timeout);
            !list.is_empty()
        });
    }

    fn start_reaper(&self) {
        self.reaper.call_once(|| {
            let pool = self.this.clone();
            let every = (self.idle_timeout / 2).max(Duration::from_millis(100));
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(every);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tick.tick().await;
                    match pool.upgrade() {
                        Some(pool) => pool.reap(),
                        None => return,
                    }
                }
            });
        });
    }

    #[cfg(test)]
    fn idle_count(&self, key: &PoolKey) -> usize {
        let idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        idle.get(key).map_or(0, VecDeque::len)
    }
}

/// One connection lent to one exchange. [`Lease::release`] gives it back once the
/// response body has ended; dropping the lease instead closes the connection, which is
/// right for anything else (a body abandoned mid-way, an upgrade, an error).
pub struct Lease {
    tx: SendRequest<UpstreamBody>,
    key: PoolKey,
    pool: Weak<Http1Pool>,
}

impl Lease {
    /// Returns the connection to its pool once it can take another request. Usually at
    /// once; a connection still sending the request body (the instance answered early)
    /// is pooled when the body is through, or closed if that takes longer than the idle
    /// timeout, so no other request ever waits behind an upload.
    pub fn release(self) {
        let Lease { mut tx, key, pool } = self;
        let Some(strong) = pool.upgrade() else {
            return;
        };
        if tx.is_ready() {
            strong.put(key, tx);
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let wait = strong.idle_timeout;
        drop(strong);
        runtime.spawn(async move {
            if let Ok(Ok(())) = tokio::time::timeout(wait, tx.ready()).await {
                if let Some(pool) = pool.upgrade() {
                    pool.put(key, tx);
                }
            }
        });
    }
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease").field("key", &self.key).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// An HTTP/1.1 server answering every request on a connection with `ok`, counting
    /// the connections it accepted; `close_after` requests per connection, then closes.
    async fn server(close_after: usize) -> (Authority, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    let mut pending = Vec::new();
                    let mut served = 0;
                    while served < close_after {
                        let Ok(n) = s.read(&mut buf).await else {
                            return;
                        };
                        if n == 0 {
                            return;
                        }
                        pending.extend_from_slice(&buf[..n]);
                        while let Some(end) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
                            pending.drain(..end + 4);
                            let reply = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                            if s.write_all(reply).await.is_err() {
                                return;
                            }
                            served += 1;
                        }
                    }
                });
            }
        });
        (addr.to_string().parse().unwrap(), accepted)
    }

    fn request(authority: &Authority) -> Request<UpstreamBody> {
        Request::builder()
            .uri("/")
            .header(http::header::HOST, authority.as_str())
            .body(UpstreamBody::Empty)
            .unwrap()
    }

    fn connector() -> Connector {
        Connector::plain(Duration::from_secs(2))
    }

    async fn exchange(pool: &Http1Pool, key: &PoolKey) -> Result<Lease, SendError> {
        let (response, lease) = pool
            .send(key.clone(), connector, request(&key.authority))
            .await?;
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"ok");
        Ok(lease)
    }

    #[tokio::test]
    async fn a_released_connection_serves_the_next_request() {
        let (authority, accepted) = server(usize::MAX).await;
        let pool = Http1Pool::new(8, Duration::from_secs(60));
        let key = PoolKey {
            authority,
            tls_service: None,
        };
        for _ in 0..20 {
            exchange(&pool, &key).await.unwrap().release();
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
        assert_eq!(pool.idle_count(&key), 1);
    }

    #[tokio::test]
    async fn a_dropped_lease_closes_its_connection() {
        let (authority, accepted) = server(usize::MAX).await;
        let pool = Http1Pool::new(8, Duration::from_secs(60));
        let key = PoolKey {
            authority,
            tls_service: None,
        };
        for _ in 0..3 {
            drop(exchange(&pool, &key).await.unwrap());
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 3);
        assert_eq!(pool.idle_count(&key), 0);
    }

    #[tokio::test]
    async fn connections_the_instance_closed_are_skipped() {
        // The server closes each connection after one answer: every pooled connection is
        // dead by the next request, which must still succeed on a fresh one.
        let (authority, accepted) = server(1).await;
        let pool = Http1Pool::new(8, Duration::from_secs(60));
        let key = PoolKey {
            authority,
            tls_service: None,
        };
        for _ in 0..5 {
            exchange(&pool, &key).await.unwrap().release();
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 5);
    }

    #[tokio::test]
    async fn idle_connections_are_capped_and_expire() {
        let (authority, _) = server(usize::MAX).await;
        let pool = Http1Pool::new(2, Duration::from_millis(200));
        let key = PoolKey {
            authority,
            tls_service: None,
        };
        let leases = futures_lease(&pool, &key, 4).await;
        for lease in leases {
            lease.release();
        }
        assert_eq!(pool.idle_count(&key), 2);
        tokio::time::sleep(Duration::from_millis(250)).await;
        pool.reap();
        assert_eq!(pool.idle_count(&key), 0);
    }

    async fn futures_lease(pool: &Http1Pool, key: &PoolKey, n: usize) -> Vec<Lease> {
        let mut out = Vec::new();
        for _ in 0..n {
            // Hold each lease so the next request needs a new connection.
            out.push(exchange(pool, key).await.unwrap());
        }
        out
    }

    #[test]
    fn keys_equal_up_to_case_hash_alike() {
        use std::hash::BuildHasher;
        let state = foldhash::fast::RandomState::default();
        let a = PoolKey {
            authority: "Backend.Example:8080".parse().unwrap(),
            tls_service: Some("api".into()),
        };
        let b = PoolKey {
            authority: "backend.example:8080".parse().unwrap(),
            tls_service: Some("api".into()),
        };
        assert_eq!(a, b);
        assert_eq!(state.hash_one(&a), state.hash_one(&b));
    }

    #[tokio::test]
    async fn a_refused_connect_is_a_connect_error() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let authority: Authority = listener.local_addr().unwrap().to_string().parse().unwrap();
        drop(listener);
        let pool = Http1Pool::new(8, Duration::from_secs(60));
        let key = PoolKey {
            authority,
            tls_service: None,
        };
        let err = exchange(&pool, &key).await.unwrap_err();
        assert!(err.is_connect(), "{err}");
    }
}
