//! HTTP/1.1 keep-alive connections to instances, pooled per instance address and TLS
//! identity and reused most-recent first.
//!
//! A connection is taken out for one exchange ([`super::client`], run in the request's own
//! task) and comes back when the response body has been read to its end, straight from
//! the body's poll, to the idle list it points to (see [`IdleHome`]). A request thus costs
//! two short mutex sections and no task, channel or boxed future of its own. Idle
//! connections are polled by no one: one that the instance closed, or that received bytes
//! while idle, is noticed when it is next taken (a non-blocking read), or by the reaper.
//! Connections idle longer than the idle timeout, closed by the instance, holding stray
//! bytes, or beyond the per-instance cap are dropped, which closes them.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::{Duration, Instant};

use http::uri::Authority;
use http::Response;

use super::client::{
    self, BoxError, Connection, H1Error, IdleHome, OutboundBody, RequestHead, ResponseBody, Stream,
};
use super::fields::is_idempotent;
use super::io::UpstreamStream;

/// Which connections are interchangeable: same instance address, same TLS identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolKey {
    pub authority: Authority,
    /// The name the instance's certificate must carry, for TLS connections.
    pub tls_service: Option<String>,
}

impl std::hash::Hash for PoolKey {
    /// The address's length and its first and last eight bytes with the ASCII case bit
    /// set, rather than `Authority`'s byte at a time: equal up to case (as its equality
    /// is) hashes alike, and the port at the end tells instances of one host apart.
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        const CASE: u64 = 0x2020_2020_2020_2020;
        let bytes = self.authority.as_str().as_bytes();
        let word = |part: &[u8]| {
            let mut eight = [0u8; 8];
            eight[..part.len()].copy_from_slice(part);
            u64::from_le_bytes(eight) | CASE
        };
        let n = bytes.len();
        state.write_usize(n);
        state.write_u64(word(&bytes[..n.min(8)]));
        state.write_u64(word(&bytes[n.saturating_sub(8)..]));
        self.tls_service.hash(state);
    }
}

/// Why an exchange with an instance failed.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// No connection could be made; nothing was sent.
    #[error(transparent)]
    Connect(BoxError),
    /// The connection failed during the exchange; the request may have been sent.
    #[error(transparent)]
    Exchange(#[from] H1Error),
}

impl SendError {
    /// Whether the failure happened before anything reached the instance.
    pub fn is_connect(&self) -> bool {
        matches!(self, SendError::Connect(_))
    }
}

struct Idle {
    conn: Box<Connection>,
    since: Instant,
}

/// The idle connections of one key. Its connections point back to it, so one returns
/// without a lookup by key.
struct IdleList {
    conns: Mutex<VecDeque<Idle>>,
    max: usize,
    timeout: Duration,
}

impl IdleHome for IdleList {
    fn put(&self, conn: Box<Connection>) {
        let now = Instant::now();
        let mut list = self.conns.lock().unwrap_or_else(PoisonError::into_inner);
        while list
            .front()
            .is_some_and(|e| now.duration_since(e.since) >= self.timeout)
        {
            list.pop_front();
        }
        if list.len() < self.max {
            list.push_back(Idle { conn, since: now });
        }
    }
}

/// The idle connections of one key, for a caller that sends there often and keeps this at
/// hand (the gateway keeps one per instance of a snapshot): sending through it skips the
/// lookup by key and the pool-wide lock. The list lives as long as a slot holds it.
#[derive(Clone)]
pub struct PoolSlot {
    key: PoolKey,
    list: Arc<IdleList>,
}

impl std::fmt::Debug for PoolSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PoolSlot").field("key", &self.key).finish()
    }
}

impl PoolSlot {
    pub fn key(&self) -> &PoolKey {
        &self.key
    }
}

pub struct Http1Pool {
    lists: Mutex<HashMap<PoolKey, Arc<IdleList>, foldhash::fast::RandomState>>,
    max_idle_per_host: usize,
    idle_timeout: Duration,
    /// Set once the task that drops expired connections of quiet instances runs.
    reaper: std::sync::Once,
    this: Weak<Http1Pool>,
}

impl Http1Pool {
    pub fn new(max_idle_per_host: usize, idle_timeout: Duration) -> Arc<Http1Pool> {
        Arc::new_cyclic(|this| Http1Pool {
            lists: Mutex::new(HashMap::default()),
            max_idle_per_host,
            idle_timeout,
            reaper: std::sync::Once::new(),
            this: this.clone(),
        })
    }

    /// Sends `req` on an idle connection to `key`, or on a new one that `dial` opens.
    ///
    /// Every request first checks that its idle connection is still open and has sent
    /// nothing since its last answer (bytes an instance sent while idle would otherwise be
    /// read as the next request's answer: nginx and hyper close such connections too).
    /// A request that can be sent twice (idempotent method, body not streamed) that finds
    /// its connection closed before a byte came back goes again on the next one.
    ///
    /// `body` is taken when the request goes out on a connection, and left in place when
    /// no connection could be made, so the caller may send it elsewhere (a streamed body
    /// too: nothing of it was read).
    pub async fn send<S, D, E>(
        &self,
        key: PoolKey,
        dial: impl FnOnce() -> D,
        req: RequestHead<'_>,
        body: &mut Option<OutboundBody<S>>,
    ) -> Result<Response<ResponseBody<S>>, SendError>
    where
        S: Stream,
        D: Future<Output = Result<UpstreamStream, E>>,
        E: Into<BoxError>,
    {
        let slot = self.slot(key);
        self.send_to(&slot, dial, req, body).await
    }

    /// [`Http1Pool::send`] to the key of a slot taken before.
    pub async fn send_to<S, D, E>(
        &self,
        slot: &PoolSlot,
        dial: impl FnOnce() -> D,
        req: RequestHead<'_>,
        body: &mut Option<OutboundBody<S>>,
    ) -> Result<Response<ResponseBody<S>>, SendError>
    where
        S: Stream,
        D: Future<Output = Result<UpstreamStream, E>>,
        E: Into<BoxError>,
    {
        let replayable =
            is_idempotent(req.method) && !matches!(body, Some(OutboundBody::Stream(_)));
        while let Some(conn) = self.checkout(&slot.list) {
            let going = body.take().unwrap_or(OutboundBody::Empty);
            match client::exchange(conn, req, going, replayable).await {
                Ok(response) => return Ok(response),
                Err((error, true, back)) => {
                    tracing::debug!(error = %error, "pooled upstream connection was closed; trying the next");
                    *body = Some(back);
                }
                Err((error, false, _)) => return Err(error.into()),
            }
        }
        // Boxed: dialing (TLS included) is the cold path, and its state would otherwise
        // enlarge every request's future, which stays in memory while the request is out.
        let conn = Box::pin(self.connect(&slot.list, dial())).await?;
        let going = body.take().unwrap_or(OutboundBody::Empty);
        client::exchange(conn, req, going, false)
            .await
            .map_err(|(error, _, _)| error.into())
    }

    /// The idle list of `key`, made when there is none.
    pub fn slot(&self, key: PoolKey) -> PoolSlot {
        let mut lists = self.lists.lock().unwrap_or_else(PoisonError::into_inner);
        let list = lists.entry(key.clone()).or_insert_with(|| {
            Arc::new(IdleList {
                conns: Mutex::default(),
                max: self.max_idle_per_host,
                timeout: self.idle_timeout,
            })
        });
        PoolSlot {
            list: list.clone(),
            key,
        }
    }

    fn checkout(&self, list: &IdleList) -> Option<Box<Connection>> {
        let mut list = list.conns.lock().unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        while let Some(mut entry) = list.pop_back() {
            if now.duration_since(entry.since) >= self.idle_timeout {
                continue;
            }
            if !entry.conn.is_idle_and_open() {
                continue;
            }
            return Some(entry.conn);
        }
        None
    }

    async fn connect<E: Into<BoxError>>(
        &self,
        list: &Arc<IdleList>,
        dial: impl Future<Output = Result<UpstreamStream, E>>,
    ) -> Result<Box<Connection>, SendError> {
        let stream = dial.await.map_err(|e| SendError::Connect(e.into()))?;
        self.start_reaper();
        let home: Weak<dyn IdleHome> = Arc::downgrade(list) as Weak<dyn IdleHome>;
        Ok(Connection::new(stream, home))
    }

    /// Drops expired and closed connections of every instance, and forgets instances
    /// with none left, so addresses that left the catalog do not hold memory.
    fn reap(&self) {
        let now = Instant::now();
        let mut lists = self.lists.lock().unwrap_or_else(PoisonError::into_inner);
        lists.retain(|_, list| {
            let mut conns = list.conns.lock().unwrap_or_else(PoisonError::into_inner);
            conns.retain_mut(|e| {
                now.duration_since(e.since) < self.idle_timeout && e.conn.is_idle_and_open()
            });
            // Kept while a connection that is out serving a request points to it.
            // Kept while a connection out or a caller's slot points to it.
            !conns.is_empty() || Arc::weak_count(list) > 0 || Arc::strong_count(list) > 1
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
    pub(crate) fn idle_count(&self, key: &PoolKey) -> usize {
        let lists = self.lists.lock().unwrap_or_else(PoisonError::into_inner);
        lists.get(key).map_or(0, |l| {
            l.conns.lock().unwrap_or_else(PoisonError::into_inner).len()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::Method;
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

    fn request(authority: &Authority, method: Method) -> http::request::Parts {
        http::Request::builder()
            .method(method)
            .uri("/")
            .header(http::header::HOST, authority.as_str())
            .body(())
            .unwrap()
            .into_parts()
            .0
    }

    /// The request bodies of these tests: none.
    type NoBody = http_body_util::Empty<bytes::Bytes>;

    async fn get(
        pool: &Http1Pool,
        key: &PoolKey,
    ) -> Result<Response<ResponseBody<NoBody>>, SendError> {
        let parts = request(&key.authority, Method::GET);
        pool.send(
            key.clone(),
            || dial(key.authority.clone()),
            RequestHead::of(&parts),
            &mut Some(OutboundBody::<NoBody>::Empty),
        )
        .await
    }

    /// Plain TCP to `authority`.
    pub(crate) async fn dial(authority: Authority) -> std::io::Result<UpstreamStream> {
        let tcp = tokio::net::TcpStream::connect(authority.as_str()).await?;
        Ok(UpstreamStream::Plain(tcp))
    }

    async fn exchange(pool: &Http1Pool, key: &PoolKey) -> Result<(), SendError> {
        let response = get(pool, key).await?;
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"ok");
        Ok(())
    }

    fn key(authority: Authority) -> PoolKey {
        PoolKey {
            authority,
            tls_service: None,
        }
    }

    #[tokio::test]
    async fn a_connection_whose_body_was_read_serves_the_next_request() {
        let (authority, accepted) = server(usize::MAX).await;
        let pool = Http1Pool::new(8, Duration::from_secs(60));
        let key = key(authority);
        for _ in 0..20 {
            exchange(&pool, &key).await.unwrap();
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
        assert_eq!(pool.idle_count(&key), 1);
    }

    #[tokio::test]
    async fn a_slot_taken_before_any_connection_survives_the_reaper_and_shares_the_keys_connections(
    ) {
        let (authority, accepted) = server(usize::MAX).await;
        let pool = Http1Pool::new(8, Duration::from_secs(60));
        let key = key(authority);
        let slot = pool.slot(key.clone());
        // Empty and with no connection out: only the slot holds it.
        pool.reap();
        for i in 0..6 {
            let parts = request(&key.authority, Method::GET);
            let response = if i % 2 == 0 {
                pool.send_to(
                    &slot,
                    || dial(key.authority.clone()),
                    RequestHead::of(&parts),
                    &mut Some(OutboundBody::<NoBody>::Empty),
                )
                .await
                .unwrap()
            } else {
                get(&pool, &key).await.unwrap()
            };
            let body = response.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(&body[..], b"ok");
        }
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            1,
            "by slot and by key: one list"
        );
        assert_eq!(pool.idle_count(&key), 1);
    }

    #[tokio::test]
    async fn an_abandoned_body_closes_its_connection() {
        let (authority, accepted) = server(usize::MAX).await;
        let pool = Http1Pool::new(8, Duration::from_secs(60));
        let key = key(authority);
        for _ in 0..3 {
            let response = get(&pool, &key).await.unwrap();
            drop(response);
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 3);
        assert_eq!(pool.idle_count(&key), 0);
    }

    #[tokio::test]
    async fn connections_the_instance_closed_are_skipped() {
        // The server closes each connection after one answer: every pooled connection is
        // dead by the next request, which must still succeed on a fresh one, whether it
        // may be sent twice (GET: tried, found closed) or not (POST: checked first).
        let (authority, accepted) = server(1).await;
        let pool = Http1Pool::new(8, Duration::from_secs(60));
        let key = key(authority);
        for i in 0..6 {
            let method = if i % 2 == 1 {
                Method::POST
            } else {
                Method::GET
            };
            let parts = request(&key.authority, method);
            let response = pool
                .send(
                    key.clone(),
                    || dial(key.authority.clone()),
                    RequestHead::of(&parts),
                    &mut Some(OutboundBody::<NoBody>::Empty),
                )
                .await
                .unwrap();
            let body = response.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(&body[..], b"ok");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 6);
    }

    #[tokio::test]
    async fn idle_connections_are_capped_and_expire() {
        let (authority, accepted) = server(usize::MAX).await;
        let pool = Http1Pool::new(2, Duration::from_millis(200));
        let key = key(authority);
        // Four answers held unread at once need four connections.
        let mut held = Vec::new();
        for _ in 0..4 {
            let response = get(&pool, &key).await.unwrap();
            held.push(response);
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 4);
        for response in held {
            response.into_body().collect().await.unwrap();
        }
        assert_eq!(pool.idle_count(&key), 2);
        tokio::time::sleep(Duration::from_millis(250)).await;
        pool.reap();
        assert_eq!(pool.idle_count(&key), 0);
    }

    #[tokio::test]
    async fn the_reaper_keeps_the_list_of_a_connection_that_is_out() {
        let (authority, accepted) = server(usize::MAX).await;
        let pool = Http1Pool::new(8, Duration::from_secs(60));
        let key = key(authority);
        let response = get(&pool, &key).await.unwrap();
        pool.reap();
        response.into_body().collect().await.unwrap();
        assert_eq!(
            pool.idle_count(&key),
            1,
            "came back to a list still in the pool"
        );
        exchange(&pool, &key).await.unwrap();
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
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
        let short = |text: &str| PoolKey {
            authority: text.parse().unwrap(),
            tls_service: None,
        };
        assert_eq!(short("Ab:1"), short("aB:1"));
        assert_eq!(state.hash_one(short("Ab:1")), state.hash_one(short("aB:1")));
        assert_ne!(
            state.hash_one(short("10.0.0.1:8080")),
            state.hash_one(short("10.0.0.1:8081"))
        );
    }

    #[tokio::test]
    async fn a_refused_connect_is_a_connect_error() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let authority: Authority = listener.local_addr().unwrap().to_string().parse().unwrap();
        drop(listener);
        let pool = Http1Pool::new(8, Duration::from_secs(60));
        let err = exchange(&pool, &key(authority)).await.unwrap_err();
        assert!(err.is_connect(), "{err}");
    }
}
