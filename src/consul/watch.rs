//! One loop for every blocking query (health of a service, a KV prefix, ...), following the
//! client rules of `shared/consul-api.md` §1.4 and §8:
//!
//! - the index goes backwards → forget it and re-read from 0; it never blocks on 0;
//! - any error (transport, HTTP status, undecodable answer, watchdog) → the index is
//!   forgotten too, as Consul's own watch package does: the agent that answers next may be a
//!   restarted one whose index starts over, where a query on the old index would wait out
//!   its whole `wait` while a health change goes unseen;
//! - an unchanged index, or a payload equal to the last one delivered → nothing is delivered;
//! - errors → jittered exponential backoff capped at `max_backoff`, reset by a success;
//! - a token bucket bounds the request rate, so a flapping key cannot spin the loop;
//! - a watchdog abandons a request that has no answer within `wait + wait/16 + margin`;
//! - the client's [`Epoch`] moves: to another agent → the pending query (waiting on the
//!   agent left) is abandoned for a fresh read; a new or working-again token → a backoff
//!   is cut short.
//!
//! The last delivered value is never withdrawn: while Consul is unreachable the consumer
//! keeps what it has, and [`WatchStatus`] says how old it is.
//!
//! Watching a KV prefix (e.g. JWT providers or API keys) from another module:
//!
//! ```no_run
//! # async fn example(client: switchyard::consul::ConsulClient) {
//! use std::time::Duration;
//! use switchyard::consul::watch::{watch_kv_prefix, WatchOptions};
//!
//! let options = WatchOptions::for_client("jwt", &client, Duration::from_secs(60));
//! // Keep `handle` alive as long as the watch should run; dropping it stops the watch.
//! let (handle, mut listings) = watch_kv_prefix(&client, "switchyard/jwt/", options);
//! while listings.changed().await.is_ok() {
//!     // `None` until Consul first answered; then every key under the prefix, sorted.
//!     let Some(pairs) = listings.borrow_and_update().clone() else { continue };
//!     for pair in pairs.iter() {
//!         let _value: Option<&[u8]> = pair.value.as_deref();
//!     }
//! }
//! # drop(handle);
//! # }
//! ```
//!
//! Anything else with blocking queries implements [`Source`] and calls [`spawn`] (callback)
//! or [`spawn_channel`] (`tokio::sync::watch` receiver).

use std::future::Future;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use rand::Rng;
use serde::Serialize;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::client::{kv_path, ConsulClient, Epoch, QueryAnswer};
use super::index::{Index, Step};
use super::types::KvPair;
use super::ConsulError;

/// Something a watch can read with blocking queries, and how to decode what it reads.
pub trait Source: Send + 'static {
    /// What consumers get; compared with the last delivery so only real changes go out.
    type Output: PartialEq + Send + Sync + 'static;

    /// One read, blocking past `index` (`Index::ZERO`: answer at once).
    fn fetch(
        &mut self,
        index: Index,
    ) -> impl Future<Output = Result<QueryAnswer, ConsulError>> + Send;

    /// Turns an answer with a new index into the value to compare and deliver. This is the
    /// place to drop what must not count as a change (e.g. a check's `Output` text).
    fn decode(&mut self, body: Option<Bytes>) -> Result<Self::Output, ConsulError>;
}

/// Tuning of one watch. [`WatchOptions::for_client`] gives the production values.
#[derive(Debug, Clone)]
pub struct WatchOptions {
    /// Shown in logs, metrics (`watch` label) and the admin API.
    pub name: String,
    /// Requests that may start back to back before the rate limit applies.
    pub burst: u32,
    /// One more request is allowed per `refill` once the burst is spent.
    pub refill: Duration,
    /// First retry delay after an error; doubles per consecutive error.
    pub base_backoff: Duration,
    pub max_backoff: Duration,
    /// A request with no answer after this long is abandoned and counted as an error.
    pub watchdog: Duration,
    /// The client's changes of agent and token (`None`: a source without a client).
    pub epochs: Option<watch::Receiver<Epoch>>,
}

/// Margin of the watchdog on top of the server's `wait + wait/16`: more than the client's
/// own read timeout, which fires first and so counts the agent as unreachable.
const WATCHDOG_MARGIN: Duration = Duration::from_secs(10);

impl WatchOptions {
    pub fn for_client(
        name: impl Into<String>,
        client: &ConsulClient,
        max_backoff: Duration,
    ) -> Self {
        let wait = client.wait();
        WatchOptions {
            name: name.into(),
            burst: 2,
            refill: Duration::from_millis(100),
            base_backoff: Duration::from_millis(250),
            max_backoff,
            watchdog: wait + wait / 16 + WATCHDOG_MARGIN,
            epochs: Some(client.epochs()),
        }
    }

    pub fn named(&self, name: impl Into<String>) -> Self {
        WatchOptions {
            name: name.into(),
            ..self.clone()
        }
    }
}

/// What a watch knows about its own health; shared with the admin API.
#[derive(Debug)]
pub struct WatchStatus {
    name: String,
    started: Instant,
    inner: Mutex<StatusInner>,
    errors_total: AtomicU64,
    consecutive_errors: AtomicU32,
    deliveries: AtomicU64,
    index: AtomicU64,
}

#[derive(Debug, Default)]
struct StatusInner {
    last_success: Option<Instant>,
    /// The most recent request failed (the data may have moved on without us).
    failing: bool,
    last_error: Option<String>,
    /// Leader headers and agent of the last answer.
    last_answer: Option<AnswerMeta>,
}

/// What Consul said about its own state in an answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AnswerMeta {
    /// The agent that answered.
    pub agent: String,
    /// `X-Consul-KnownLeader`.
    pub known_leader: bool,
    /// `X-Consul-LastContact`, milliseconds.
    pub last_contact_ms: u64,
    /// `X-Consul-Effective-Consistency`, when sent.
    pub effective_consistency: Option<String>,
}

/// One watch as the admin API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct WatchReport {
    pub name: String,
    pub index: u64,
    pub data_age_s: Option<f64>,
    pub last_contact_s: Option<f64>,
    pub errors_total: u64,
    pub consecutive_errors: u32,
    pub last_error: Option<String>,
    pub last_answer: Option<AnswerMeta>,
}

impl WatchStatus {
    pub fn new(name: impl Into<String>) -> WatchStatus {
        WatchStatus {
            name: name.into(),
            started: Instant::now(),
            inner: Mutex::new(StatusInner::default()),
            errors_total: AtomicU64::new(0),
            consecutive_errors: AtomicU32::new(0),
            deliveries: AtomicU64::new(0),
            index: AtomicU64::new(0),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// How stale the delivered data may be: zero while the watch is healthy (a pending
    /// blocking query returns as soon as anything changes), the time since Consul last
    /// answered once requests fail; `None` if Consul never answered.
    pub fn data_age(&self) -> Option<Duration> {
        let inner = self.lock();
        let last = inner.last_success?;
        Some(if inner.failing {
            last.elapsed()
        } else {
            Duration::ZERO
        })
    }

    /// Time since Consul last answered this watch (changed or not).
    pub fn last_contact(&self) -> Option<Duration> {
        self.lock().last_success.map(|t| t.elapsed())
    }

    /// Time since the watch started; the age of "nothing" for a watch that never succeeded.
    pub fn since_start(&self) -> Duration {
        self.started.elapsed()
    }

    pub fn has_succeeded(&self) -> bool {
        self.lock().last_success.is_some()
    }

    pub fn last_error(&self) -> Option<String> {
        self.lock().last_error.clone()
    }

    /// Leader headers and agent of the last answer.
    pub fn last_answer(&self) -> Option<AnswerMeta> {
        self.lock().last_answer.clone()
    }

    pub fn report(&self) -> WatchReport {
        WatchReport {
            name: self.name.clone(),
            index: self.index(),
            data_age_s: self.data_age().map(|a| a.as_secs_f64()),
            last_contact_s: self.last_contact().map(|a| a.as_secs_f64()),
            errors_total: self.errors_total(),
            consecutive_errors: self.consecutive_errors(),
            last_error: self.last_error(),
            last_answer: self.last_answer(),
        }
    }

    pub fn errors_total(&self) -> u64 {
        self.errors_total.load(Ordering::Relaxed)
    }

    pub fn consecutive_errors(&self) -> u32 {
        self.consecutive_errors.load(Ordering::Relaxed)
    }

    /// Values handed to the consumer so far.
    pub fn deliveries(&self) -> u64 {
        self.deliveries.load(Ordering::Relaxed)
    }

    /// The index the next request blocks on.
    pub fn index(&self) -> u64 {
        self.index.load(Ordering::Relaxed)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, StatusInner> {
        // Only plain assignments happen under this lock: a poisoned one still holds valid data.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn record_answer(&self, answer: &QueryAnswer) {
        let meta = AnswerMeta {
            agent: answer.agent.clone(),
            known_leader: answer.known_leader,
            last_contact_ms: answer.last_contact_ms,
            effective_consistency: answer.effective_consistency.clone(),
        };
        let mut inner = self.lock();
        if inner.last_answer.as_ref() != Some(&meta) {
            inner.last_answer = Some(meta);
        }
    }

    fn record_success(&self, index: Index) {
        let mut inner = self.lock();
        inner.last_success = Some(Instant::now());
        inner.failing = false;
        drop(inner);
        self.consecutive_errors.store(0, Ordering::Relaxed);
        self.index.store(index.get(), Ordering::Relaxed);
    }

    fn record_error(&self, error: &ConsulError) -> u32 {
        let mut inner = self.lock();
        inner.last_error = Some(error.to_string());
        inner.failing = true;
        drop(inner);
        self.errors_total.fetch_add(1, Ordering::Relaxed);
        self.consecutive_errors.fetch_add(1, Ordering::Relaxed) + 1
    }
}

/// A running watch. Dropping it stops the watch.
#[derive(Debug)]
pub struct WatchHandle {
    status: Arc<WatchStatus>,
    task: JoinHandle<()>,
}

impl WatchHandle {
    pub fn status(&self) -> &Arc<WatchStatus> {
        &self.status
    }
}

impl Drop for WatchHandle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Starts a watch that calls `deliver` with every new value (never twice with equal values).
/// `deliver` runs on the watch's task: keep it short (send to a channel).
pub fn spawn<S, F>(source: S, options: WatchOptions, deliver: F) -> WatchHandle
where
    S: Source,
    F: FnMut(Arc<S::Output>) + Send + 'static,
{
    let status = Arc::new(WatchStatus::new(options.name.clone()));
    let task = tokio::spawn(run(source, options, status.clone(), deliver));
    WatchHandle { status, task }
}

/// Starts a watch whose values land in a `tokio::sync::watch` channel: `None` until the
/// first answer, then always the latest value.
pub fn spawn_channel<S: Source>(
    source: S,
    options: WatchOptions,
) -> (WatchHandle, watch::Receiver<Option<Arc<S::Output>>>) {
    let (tx, rx) = watch::channel(None);
    let handle = spawn(source, options, move |value| {
        let _ = tx.send(Some(value));
    });
    (handle, rx)
}

/// Every key under a KV prefix (`?recurse`), e.g. `switchyard/jwt/`. A missing prefix is
/// an empty list, not an error.
#[derive(Debug, Clone)]
pub struct KvPrefix {
    client: ConsulClient,
    path: String,
}

impl KvPrefix {
    pub fn new(client: &ConsulClient, prefix: &str) -> KvPrefix {
        KvPrefix {
            client: client.clone(),
            path: kv_path(prefix),
        }
    }
}

impl Source for KvPrefix {
    type Output = Vec<KvPair>;

    fn fetch(
        &mut self,
        index: Index,
    ) -> impl Future<Output = Result<QueryAnswer, ConsulError>> + Send {
        let client = self.client.clone();
        let path = self.path.clone();
        async move { client.blocking_get(&path, &[("recurse", "")], index).await }
    }

    fn decode(&mut self, body: Option<Bytes>) -> Result<Vec<KvPair>, ConsulError> {
        match body {
            None => Ok(Vec::new()),
            Some(b) => serde_json::from_slice(&b).map_err(|e| ConsulError::Decode(e.to_string())),
        }
    }
}

/// `/v1/catalog/services`: every service in the datacenter with the union of its
/// instances' tags (what fabio-style tag routes are made from).
#[derive(Debug, Clone)]
pub struct CatalogServices {
    client: ConsulClient,
}

impl CatalogServices {
    pub fn new(client: &ConsulClient) -> CatalogServices {
        CatalogServices {
            client: client.clone(),
        }
    }
}

impl Source for CatalogServices {
    type Output = std::collections::BTreeMap<String, Vec<String>>;

    fn fetch(
        &mut self,
        index: Index,
    ) -> impl Future<Output = Result<QueryAnswer, ConsulError>> + Send {
        let client = self.client.clone();
        async move {
            client
                .blocking_get("/v1/catalog/services", &[], index)
                .await
        }
    }

    fn decode(&mut self, body: Option<Bytes>) -> Result<Self::Output, ConsulError> {
        let Some(b) = body else {
            return Ok(Default::default());
        };
        let mut services: Self::Output =
            serde_json::from_slice(&b).map_err(|e| ConsulError::Decode(e.to_string()))?;
        for tags in services.values_mut() {
            tags.sort();
            tags.dedup();
        }
        Ok(services)
    }
}

/// Watches every key under `prefix`: the receiver holds the latest listing (sorted by key),
/// `None` until Consul first answered. For the auth key sources (`jwt/`, `apikeys/`) and
/// anything else kept in KV.
pub fn watch_kv_prefix(
    client: &ConsulClient,
    prefix: &str,
    options: WatchOptions,
) -> (WatchHandle, watch::Receiver<Option<Arc<Vec<KvPair>>>>) {
    spawn_channel(KvPrefix::new(client, prefix), options)
}

async fn run<S, F>(mut source: S, options: WatchOptions, status: Arc<WatchStatus>, mut deliver: F)
where
    S: Source,
    F: FnMut(Arc<S::Output>),
{
    let mut index = Index::ZERO;
    let mut last: Option<Arc<S::Output>> = None;
    let mut failures: u32 = 0;
    let mut bucket = TokenBucket::new(options.burst, options.refill);
    let mut epochs = options.epochs.clone();
    loop {
        bucket.acquire().await;
        let sent_in = epochs.as_ref().map(|rx| *rx.borrow());
        let fetched = tokio::select! {
            biased;
            fetched = tokio::time::timeout(options.watchdog, source.fetch(index)) => fetched,
            () = agent_moved(&mut epochs, sent_in) => {
                tracing::debug!(watch = %options.name,
                    "consul agent changed; abandoning the query waiting on the old one");
                index = Index::ZERO;
                continue;
            }
        };
        let outcome = match fetched {
            Err(_) => Err(ConsulError::Stalled(options.watchdog)),
            Ok(Err(e)) => Err(e),
            Ok(Ok(answer)) => {
                status.record_answer(&answer);
                match index.step(answer.index) {
                    Step::Unchanged => Ok((index, None)),
                    Step::WentBackwards => {
                        tracing::info!(watch = %options.name, from = %index, to = answer.index,
                            "consul index went backwards; re-reading from scratch");
                        Ok((Index::ZERO, None))
                    }
                    Step::Advanced(next) => source.decode(answer.body).map(|v| (next, Some(v))),
                }
            }
        };
        match outcome {
            Ok((next, value)) => {
                if failures > 0 {
                    tracing::info!(watch = %options.name, failures, "consul answers again");
                }
                failures = 0;
                index = next;
                status.record_success(index);
                let Some(value) = value else { continue };
                if last.as_deref() == Some(&value) {
                    continue;
                }
                let value = Arc::new(value);
                last = Some(value.clone());
                status.deliveries.fetch_add(1, Ordering::Relaxed);
                deliver(value);
            }
            Err(e) => {
                failures = status.record_error(&e);
                // Whatever answers next gets a fresh baseline (see the module doc).
                index = Index::ZERO;
                status.index.store(0, Ordering::Relaxed);
                metrics::counter!(crate::metrics::WATCH_ERRORS, "watch" => options.name.clone())
                    .increment(1);
                let delay = backoff(
                    failures,
                    options.base_backoff,
                    options.max_backoff,
                    &mut rand::rng(),
                );
                log_failure(&options.name, &e, failures, delay);
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    () = token_changed(&mut epochs, sent_in) => {}
                }
            }
        }
    }
}

/// An outage fails every watch at once: log the 1st, 2nd, 4th, 8th... failure. A refused
/// token is logged by the client once for all watches, and counted here per watch.
fn log_failure(name: &str, e: &ConsulError, failures: u32, delay: Duration) {
    let retry_in_ms = delay.as_millis() as u64;
    if let ConsulError::Refused { .. } = e {
        metrics::counter!(crate::metrics::CONSUL_ACL_REFUSALS, "watch" => name.to_string())
            .increment(1);
        tracing::debug!(watch = %name, error = %e, failures, retry_in_ms,
            "consul refused the token; keeping last state");
    } else if !failures.is_power_of_two() {
        tracing::debug!(watch = %name, error = %e, failures, retry_in_ms,
            "consul watch failed again");
    } else if e.is_transient() {
        tracing::warn!(watch = %name, error = %e, failures, retry_in_ms,
            "consul watch failed; keeping last state");
    } else {
        tracing::error!(watch = %name, error = %e, failures, retry_in_ms,
            "consul refused the watch; keeping last state");
    }
}

/// Completes once the client moved to another agent than the one of `since`; never
/// without a client.
async fn agent_moved(epochs: &mut Option<watch::Receiver<Epoch>>, since: Option<Epoch>) {
    if let (Some(rx), Some(since)) = (epochs.as_mut(), since) {
        if rx.wait_for(|e| e.agent != since.agent).await.is_ok() {
            return;
        }
    }
    std::future::pending().await
}

/// Completes once the token changed or works again since `since`; never without a client.
async fn token_changed(epochs: &mut Option<watch::Receiver<Epoch>>, since: Option<Epoch>) {
    if let (Some(rx), Some(since)) = (epochs.as_mut(), since) {
        if rx.wait_for(|e| e.token != since.token).await.is_ok() {
            return;
        }
    }
    std::future::pending().await
}

/// Delay before retry number `failures` (1-based): `base · 2^(failures-1)` capped at `max`,
/// then "equal jitter" (between half and all of it) so watches do not retry in lockstep.
pub fn backoff(failures: u32, base: Duration, max: Duration, rng: &mut impl Rng) -> Duration {
    let exp = failures.saturating_sub(1).min(30);
    let full = base.saturating_mul(1u32 << exp).min(max);
    let half = full / 2;
    half + full.saturating_sub(half).mul_f64(rng.random::<f64>())
}

/// A token bucket over tokio time: `burst` requests may go at once, then one per `refill`.
#[derive(Debug)]
struct TokenBucket {
    capacity: f64,
    tokens: f64,
    refill: Duration,
    last: Instant,
}

impl TokenBucket {
    fn new(burst: u32, refill: Duration) -> TokenBucket {
        let capacity = burst.max(1) as f64;
        TokenBucket {
            capacity,
            tokens: capacity,
            refill,
            last: Instant::now(),
        }
    }

    async fn acquire(&mut self) {
        loop {
            let now = Instant::now();
            if self.refill.is_zero() {
                return;
            }
            let gained = now.duration_since(self.last).as_secs_f64() / self.refill.as_secs_f64();
            self.tokens = (self.tokens + gained).min(self.capacity);
            self.last = now;
            if self.tokens >= 1.0 {
                self.tokens -= 1.0;
                return;
            }
            tokio::time::sleep(self.refill.mul_f64(1.0 - self.tokens)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;
    use tokio::sync::mpsc;

    /// One scripted reaction of the fake Consul.
    enum Reply {
        Ok(u64, &'static str),
        Fail,
        Hang,
    }

    struct Fake {
        script: Arc<Mutex<VecDeque<Reply>>>,
        asked: Arc<Mutex<Vec<u64>>>,
    }

    impl Source for Fake {
        type Output = String;

        fn fetch(
            &mut self,
            index: Index,
        ) -> impl Future<Output = Result<QueryAnswer, ConsulError>> + Send {
            self.asked.lock().unwrap().push(index.get());
            let next = self.script.lock().unwrap().pop_front();
            async move {
                match next {
                    Some(Reply::Ok(i, body)) => Ok(QueryAnswer {
                        body: Some(Bytes::from_static(body.as_bytes())),
                        index: i,
                        known_leader: true,
                        last_contact_ms: 0,
                        effective_consistency: None,
                        agent: "http://fake".into(),
                    }),
                    Some(Reply::Fail) => Err(ConsulError::Status {
                        status: 500,
                        body: "No cluster leader".into(),
                    }),
                    Some(Reply::Hang) | None => std::future::pending().await,
                }
            }
        }

        fn decode(&mut self, body: Option<Bytes>) -> Result<String, ConsulError> {
            let b = body.unwrap_or_default();
            if &b[..] == b"garbage" {
                return Err(ConsulError::Decode("garbage".into()));
            }
            Ok(String::from_utf8_lossy(&b).into_owned())
        }
    }

    fn quick(name: &str) -> WatchOptions {
        WatchOptions {
            name: name.into(),
            burst: 100,
            refill: Duration::from_millis(1),
            base_backoff: Duration::from_millis(1),
            max_backoff: Duration::from_millis(4),
            watchdog: Duration::from_secs(5),
            epochs: None,
        }
    }

    struct Run {
        handle: WatchHandle,
        asked: Arc<Mutex<Vec<u64>>>,
        got: mpsc::UnboundedReceiver<String>,
    }

    fn start(script: Vec<Reply>, options: WatchOptions) -> Run {
        let asked = Arc::new(Mutex::new(Vec::new()));
        let fake = Fake {
            script: Arc::new(Mutex::new(script.into())),
            asked: asked.clone(),
        };
        let (tx, got) = mpsc::unbounded_channel();
        let handle = spawn(fake, options, move |v: Arc<String>| {
            let _ = tx.send((*v).clone());
        });
        Run { handle, asked, got }
    }

    /// Waits (bounded) until the fake has been asked `n` times, then returns what it was asked.
    async fn asked_after(run: &Run, n: usize) -> Vec<u64> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let asked = run.asked.lock().unwrap().clone();
            if asked.len() >= n {
                return asked;
            }
            assert!(Instant::now() < deadline, "only asked {asked:?}");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    fn drain(got: &mut mpsc::UnboundedReceiver<String>) -> Vec<String> {
        let mut out = Vec::new();
        while let Ok(v) = got.try_recv() {
            out.push(v);
        }
        out
    }

    #[tokio::test]
    async fn only_new_indexes_with_new_payloads_are_delivered() {
        let mut run = start(
            vec![
                Reply::Ok(5, "a"),
                Reply::Ok(5, "ignored: same index"),
                Reply::Ok(7, "a"),
                Reply::Ok(9, "b"),
            ],
            quick("t"),
        );
        let asked = asked_after(&run, 5).await;
        assert_eq!(asked, [0, 5, 5, 7, 9]);
        assert_eq!(drain(&mut run.got), ["a", "b"]);
        assert_eq!(run.handle.status().deliveries(), 2);
        assert_eq!(run.handle.status().index(), 9);
    }

    #[tokio::test]
    async fn an_index_that_goes_backwards_restarts_from_zero() {
        let mut run = start(
            vec![
                Reply::Ok(50, "a"),
                Reply::Ok(3, "b"),
                Reply::Ok(3, "b"),
                Reply::Ok(4, "b"),
            ],
            quick("t"),
        );
        let asked = asked_after(&run, 5).await;
        assert_eq!(asked, [0, 50, 0, 3, 4]);
        assert_eq!(drain(&mut run.got), ["a", "b"]);
    }

    #[tokio::test]
    async fn an_index_of_zero_is_never_blocked_on() {
        let run = start(vec![Reply::Ok(0, "a"), Reply::Ok(0, "a")], quick("t"));
        let asked = asked_after(&run, 3).await;
        assert_eq!(
            asked,
            [0, 1, 0],
            "0 reported → block on 1; 0 again → went backwards"
        );
    }

    #[tokio::test]
    async fn errors_keep_the_last_value_and_a_success_resets_the_count() {
        let mut run = start(
            vec![
                Reply::Ok(5, "a"),
                Reply::Fail,
                Reply::Fail,
                Reply::Ok(6, "a"),
                Reply::Ok(8, "c"),
            ],
            quick("t"),
        );
        let asked = asked_after(&run, 6).await;
        assert_eq!(
            asked,
            [0, 5, 0, 0, 6, 8],
            "after an error the next read is a fresh baseline"
        );
        let status = run.handle.status();
        assert_eq!(status.errors_total(), 2);
        assert_eq!(status.consecutive_errors(), 0);
        assert!(status.last_error().unwrap().contains("No cluster leader"));
        assert_eq!(status.data_age(), Some(Duration::ZERO), "healthy again");
        assert_eq!(
            drain(&mut run.got),
            ["a", "c"],
            "the fresh baseline equal to the last value is not delivered again"
        );
    }

    #[tokio::test]
    async fn one_error_drops_the_index_so_a_restarted_agent_is_read_from_scratch() {
        // The agent restarts: the query on index 50 fails, and the new agent's index starts
        // over. Blocking on 50 there would hold any change back for a whole `wait`.
        let mut run = start(
            vec![Reply::Ok(50, "a"), Reply::Fail, Reply::Ok(3, "b")],
            quick("t"),
        );
        let asked = asked_after(&run, 4).await;
        assert_eq!(asked, [0, 50, 0, 3]);
        assert_eq!(drain(&mut run.got), ["a", "b"]);
        assert_eq!(run.handle.status().index(), 3);
    }

    #[tokio::test]
    async fn an_undecodable_answer_is_an_error_and_the_next_read_is_a_fresh_baseline() {
        let mut run = start(
            vec![
                Reply::Ok(5, "a"),
                Reply::Ok(6, "garbage"),
                Reply::Ok(7, "b"),
            ],
            quick("t"),
        );
        let asked = asked_after(&run, 4).await;
        assert_eq!(asked, [0, 5, 0, 7]);
        assert_eq!(run.handle.status().errors_total(), 1);
        assert_eq!(drain(&mut run.got), ["a", "b"]);
    }

    #[tokio::test]
    async fn a_move_to_another_agent_abandons_the_query_waiting_on_the_old_one() {
        let (tx, rx) = watch::channel(Epoch::default());
        let mut options = quick("t");
        options.epochs = Some(rx);
        let mut run = start(
            vec![Reply::Ok(5, "a"), Reply::Hang, Reply::Ok(2, "b")],
            options,
        );
        asked_after(&run, 2).await;
        tx.send_modify(|e| e.token += 1);
        tokio::time::sleep(Duration::from_millis(30)).await;
        assert_eq!(
            run.asked.lock().unwrap().len(),
            2,
            "a token change leaves a pending query alone"
        );
        tx.send_modify(|e| e.agent += 1);
        let asked = asked_after(&run, 4).await;
        assert_eq!(asked, [0, 5, 0, 2]);
        assert_eq!(drain(&mut run.got), ["a", "b"]);
        assert_eq!(run.handle.status().errors_total(), 0, "not an error");
    }

    #[tokio::test]
    async fn a_changed_token_cuts_the_backoff_short() {
        let (tx, rx) = watch::channel(Epoch::default());
        let mut options = quick("t");
        options.epochs = Some(rx);
        options.base_backoff = Duration::from_secs(60);
        options.max_backoff = Duration::from_secs(60);
        let run = start(
            vec![Reply::Ok(5, "a"), Reply::Fail, Reply::Ok(6, "b")],
            options,
        );
        asked_after(&run, 2).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
        tx.send_modify(|e| e.token += 1);
        let asked = asked_after(&run, 4).await;
        assert_eq!(asked, [0, 5, 0, 6]);
    }

    #[tokio::test]
    async fn the_watchdog_abandons_a_request_that_never_answers() {
        let mut options = quick("t");
        options.watchdog = Duration::from_millis(30);
        let mut run = start(
            vec![Reply::Ok(5, "a"), Reply::Hang, Reply::Ok(6, "b")],
            options,
        );
        let asked = asked_after(&run, 4).await;
        assert_eq!(asked, [0, 5, 0, 6]);
        let status = run.handle.status();
        assert!(status.last_error().unwrap().contains("watchdog"));
        assert_eq!(drain(&mut run.got), ["a", "b"]);
    }

    #[tokio::test]
    async fn a_flapping_source_is_rate_limited_after_the_burst() {
        let mut options = quick("t");
        options.burst = 2;
        options.refill = Duration::from_millis(40);
        let script = (1..=6).map(|i| Reply::Ok(i, if i % 2 == 0 { "x" } else { "y" }));
        let started = Instant::now();
        let run = start(script.collect(), options);
        asked_after(&run, 6).await;
        // Two at once, then four more at one per 40 ms.
        assert!(
            started.elapsed() >= Duration::from_millis(150),
            "{:?}",
            started.elapsed()
        );
    }

    #[tokio::test]
    async fn data_age_grows_only_while_requests_fail() {
        let run = start(
            vec![Reply::Ok(5, "a"), Reply::Fail, Reply::Hang],
            quick("t"),
        );
        asked_after(&run, 3).await;
        tokio::time::sleep(Duration::from_millis(30)).await;
        let age = run.handle.status().data_age().unwrap();
        assert!(age >= Duration::from_millis(30), "{age:?}");
        let never = start(vec![Reply::Fail, Reply::Hang], quick("t"));
        asked_after(&never, 2).await;
        assert_eq!(never.handle.status().data_age(), None);
    }

    #[tokio::test]
    async fn dropping_the_handle_stops_the_watch() {
        let run = start(vec![Reply::Ok(1, "a")], quick("t"));
        asked_after(&run, 2).await;
        let asked = run.asked.clone();
        drop(run);
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(asked.lock().unwrap().len(), 2);
    }

    #[test]
    fn backoff_doubles_with_jitter_and_is_capped() {
        let mut rng = rand::rng();
        let base = Duration::from_millis(100);
        let max = Duration::from_secs(2);
        for _ in 0..50 {
            let first = backoff(1, base, max, &mut rng);
            assert!(
                first >= Duration::from_millis(50) && first <= base,
                "{first:?}"
            );
            let third = backoff(3, base, max, &mut rng);
            assert!(third >= Duration::from_millis(200) && third <= Duration::from_millis(400));
            let late = backoff(40, base, max, &mut rng);
            assert!(late >= Duration::from_secs(1) && late <= max, "{late:?}");
        }
    }
}
