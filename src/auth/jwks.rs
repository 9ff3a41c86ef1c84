//! Keys published at a provider's `jwks_url`: fetched in the background, refreshed on a
//! timer, and fetched early when a token names a kid nobody knows (a rotation) — but at
//! most once per `min_refetch`, so random kids cannot cause a fetch storm. A failed or
//! unusable fetch keeps the last good keys. The set lives in an `ArcSwap`: requests read
//! it without a lock.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::{ArcSwap, Guard};
use bytes::Bytes;
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::keys::{Key, KeySet};

/// Largest JWKS document accepted.
const MAX_BODY: usize = 1024 * 1024;
/// First retry delay after a failed fetch; doubles up to `MAX_RETRY` (or `refresh`).
const FIRST_RETRY: Duration = Duration::from_millis(500);
const MAX_RETRY: Duration = Duration::from_secs(60);
const NEVER: u64 = u64::MAX;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JwksSettings {
    pub url: String,
    /// Time between routine fetches.
    pub refresh: Duration,
    /// Least time between two fetches caused by unknown kids.
    pub min_refetch: Duration,
    /// Bound of one fetch; a request waiting for a fetch waits no longer.
    pub timeout: Duration,
}

#[derive(Debug)]
struct Inner {
    settings: JwksSettings,
    keys: ArcSwap<KeySet>,
    /// Bumped each time the served key set changes.
    generation: AtomicU64,
    wake: Notify,
    /// Completed fetches (success or not); requests wait on it.
    fetches: watch::Sender<u64>,
    in_flight: AtomicBool,
    started: Instant,
    /// Milliseconds after `started` of the last kid-triggered fetch (`NEVER` if none).
    last_trigger_ms: AtomicU64,
}

/// A running JWKS source. Dropping it stops its task.
#[derive(Debug)]
pub struct Jwks {
    inner: Arc<Inner>,
    task: JoinHandle<()>,
}

impl Drop for Jwks {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Jwks {
    /// Starts fetching at once. `seed` (the previous provider's keys for the same URL)
    /// serves until the first fetch succeeds. Needs a Tokio runtime.
    pub fn start(
        settings: JwksSettings,
        client: reqwest::Client,
        seed: Option<Arc<KeySet>>,
    ) -> Jwks {
        let (fetches, _) = watch::channel(0);
        let inner = Arc::new(Inner {
            settings,
            keys: ArcSwap::new(seed.unwrap_or_default()),
            generation: AtomicU64::new(0),
            wake: Notify::new(),
            fetches,
            in_flight: AtomicBool::new(true),
            started: Instant::now(),
            last_trigger_ms: AtomicU64::new(NEVER),
        });
        let task = tokio::spawn(run(inner.clone(), client));
        Jwks { inner, task }
    }

    pub fn url(&self) -> &str {
        &self.inner.settings.url
    }

    pub fn keys(&self) -> Guard<Arc<KeySet>> {
        self.inner.keys.load()
    }

    /// The key set itself, to seed a replacement source for the same URL.
    pub fn key_set(&self) -> Arc<KeySet> {
        self.inner.keys.load_full()
    }

    pub fn generation(&self) -> u64 {
        self.inner.generation.load(Ordering::Acquire)
    }

    /// A token named a kid that is not in the set. Waits (bounded) for a fetch when one is
    /// running or may start now; returns at once when the rate limit says no. True when a
    /// fetch completed meanwhile (the caller should look again).
    pub async fn refresh_for_unknown_kid(&self) -> bool {
        let inner = &self.inner;
        let mut rx = inner.fetches.subscribe();
        let seen = *rx.borrow_and_update();
        if !inner.in_flight.load(Ordering::Acquire) {
            let now = inner.started.elapsed().as_millis() as u64;
            let last = inner.last_trigger_ms.load(Ordering::Acquire);
            let min = inner.settings.min_refetch.as_millis() as u64;
            if last != NEVER && now.saturating_sub(last) < min {
                return false;
            }
            if inner
                .last_trigger_ms
                .compare_exchange(last, now, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                tracing::debug!(url = %inner.settings.url, "unknown kid: fetching the JWKS early");
                inner.in_flight.store(true, Ordering::Release);
                inner.wake.notify_one();
            }
        }
        let wait = inner.settings.timeout + Duration::from_millis(100);
        let completed = tokio::time::timeout(wait, rx.wait_for(|c| *c > seen))
            .await
            .is_ok_and(|r| r.is_ok());
        completed
    }
}

async fn run(inner: Arc<Inner>, client: reqwest::Client) {
    let mut last_body: Option<Bytes> = None;
    let mut failures: u32 = 0;
    loop {
        inner.in_flight.store(true, Ordering::Release);
        let outcome = match fetch(&client, &inner.settings).await {
            Ok(body) if last_body.as_ref() == Some(&body) => Ok(()),
            Ok(body) => parse(&body).map(|set| {
                tracing::info!(url = %inner.settings.url, keys = set.len(), "JWKS keys updated");
                inner.keys.store(Arc::new(set));
                inner.generation.fetch_add(1, Ordering::AcqRel);
                last_body = Some(body);
            }),
            Err(e) => Err(e),
        };
        let delay = match outcome {
            Ok(()) => {
                failures = 0;
                metrics::counter!(crate::metrics::JWKS_FETCHES, "result" => "ok").increment(1);
                inner.settings.refresh
            }
            Err(e) => {
                failures = failures.saturating_add(1);
                metrics::counter!(crate::metrics::JWKS_FETCHES, "result" => "error").increment(1);
                tracing::warn!(url = %inner.settings.url, error = %e, failures,
                    keys_kept = inner.keys.load().len(), "JWKS fetch failed; keeping the last good keys");
                let backoff = FIRST_RETRY.saturating_mul(1 << failures.min(10).saturating_sub(1));
                backoff.min(MAX_RETRY).min(inner.settings.refresh)
            }
        };
        inner.in_flight.store(false, Ordering::Release);
        inner.fetches.send_modify(|c| *c += 1);
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = inner.wake.notified() => {}
        }
    }
}

async fn fetch(client: &reqwest::Client, settings: &JwksSettings) -> Result<Bytes, String> {
    let work = async {
        let mut resp = client
            .get(&settings.url)
            .header(http::header::ACCEPT, "application/json")
            .send()
            .await
            .map_err(|e| format!("request failed: {e}"))?;
        if !resp.status().is_success() {
            return Err(format!("answered {}", resp.status()));
        }
        if resp.content_length().is_some_and(|l| l > MAX_BODY as u64) {
            return Err(format!("document larger than {MAX_BODY} bytes"));
        }
        let mut body = Vec::new();
        while let Some(chunk) = resp.chunk().await.map_err(|e| format!("reading: {e}"))? {
            if body.len() + chunk.len() > MAX_BODY {
                return Err(format!("document larger than {MAX_BODY} bytes"));
            }
            body.extend_from_slice(&chunk);
        }
        Ok(Bytes::from(body))
    };
    tokio::time::timeout(settings.timeout, work)
        .await
        .map_err(|_| format!("no answer within {:?}", settings.timeout))?
}

/// A JWKS document into a key set. Unusable keys are skipped (and logged); a document
/// without any usable key is an error, so the last good set keeps serving.
pub fn parse(body: &[u8]) -> Result<KeySet, String> {
    #[derive(serde::Deserialize)]
    struct Document {
        keys: Vec<serde_json::Value>,
    }
    let doc: Document =
        serde_json::from_slice(body).map_err(|e| format!("not a JWKS document: {e}"))?;
    let mut set = KeySet::default();
    for value in &doc.keys {
        match Key::from_jwk_value(value) {
            Ok(key) => {
                if let Err(e) = set.insert(key) {
                    tracing::warn!(error = %e, "JWKS key skipped");
                }
            }
            Err(e) => tracing::debug!(error = %e, "JWKS key skipped"),
        }
    }
    if set.is_empty() {
        return Err(format!(
            "none of the {} keys is a usable signing key",
            doc.keys.len()
        ));
    }
    Ok(set)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::jwt::{unix_now, Provider};
    use crate::auth::AuthError;
    use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
    use std::sync::atomic::AtomicUsize;
    use std::sync::Mutex;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const EC_JWK: &str = r#"{"kty":"EC","crv":"P-256","kid":"e1","x":"f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU","y":"x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"}"#;
    const JWKS: &str = include_str!("../../tests/fixtures/rsa-jwks.json");
    const RSA_PRIVATE: &str = include_str!("../../tests/fixtures/rsa-private.pem");
    const RSA2_PRIVATE: &str = include_str!("../../tests/fixtures/rsa2-private.pem");

    /// A loopback identity provider serving whatever (status, body) it is told.
    struct FakeIdp {
        url: String,
        reply: Arc<Mutex<(u16, String)>>,
        hits: Arc<AtomicUsize>,
        task: JoinHandle<()>,
    }

    impl Drop for FakeIdp {
        fn drop(&mut self) {
            self.task.abort();
        }
    }

    impl FakeIdp {
        async fn start(body: String) -> FakeIdp {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let url = format!("http://{}/jwks.json", listener.local_addr().unwrap());
            let reply = Arc::new(Mutex::new((200, body)));
            let hits = Arc::new(AtomicUsize::new(0));
            let (r, h) = (reply.clone(), hits.clone());
            let task = tokio::spawn(async move {
                while let Ok((mut s, _)) = listener.accept().await {
                    let (r, h) = (r.clone(), h.clone());
                    tokio::spawn(async move {
                        let mut buf = vec![0u8; 4096];
                        let mut n = 0;
                        while !buf[..n].windows(4).any(|w| w == b"\r\n\r\n") && n < buf.len() {
                            match s.read(&mut buf[n..]).await {
                                Ok(0) | Err(_) => return,
                                Ok(m) => n += m,
                            }
                        }
                        h.fetch_add(1, Ordering::SeqCst);
                        let (status, body) = r.lock().unwrap().clone();
                        let head = format!("HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n", body.len());
                        let _ = s.write_all(head.as_bytes()).await;
                        let _ = s.write_all(body.as_bytes()).await;
                    });
                }
            });
            FakeIdp {
                url,
                reply,
                hits,
                task,
            }
        }

        fn set(&self, status: u16, body: String) {
            *self.reply.lock().unwrap() = (status, body);
        }

        fn hits(&self) -> usize {
            self.hits.load(Ordering::SeqCst)
        }
    }

    fn jwks_with(kids: &[(&str, &str)]) -> String {
        let all: serde_json::Value = serde_json::from_str(JWKS).unwrap();
        let keys: Vec<serde_json::Value> = kids
            .iter()
            .map(|(name, kid)| {
                let mut k = all[name].clone();
                k["kid"] = (*kid).into();
                k
            })
            .collect();
        serde_json::json!({ "keys": keys }).to_string()
    }

    fn token(private: &str, kid: &str) -> String {
        token_for(private, kid, "u")
    }

    fn token_for(private: &str, kid: &str, sub: &str) -> String {
        let mut h = Header::new(Algorithm::RS256);
        h.kid = Some(kid.into());
        let claims = serde_json::json!({"iss": "https://id", "sub": sub, "exp": unix_now() + 600});
        encode(
            &h,
            &claims,
            &EncodingKey::from_rsa_pem(private.as_bytes()).unwrap(),
        )
        .unwrap()
    }

    fn provider(url: &str, min_refetch_s: u64) -> Provider {
        let doc = serde_json::json!({"issuer": "https://id", "algorithms": ["RS256"], "jwks_url": url,
            "jwks_min_refetch_s": min_refetch_s, "jwks_timeout_ms": 2000});
        Provider::build("idp", &doc, &reqwest::Client::new(), None).unwrap()
    }

    #[test]
    fn unusable_keys_are_skipped_and_an_empty_result_is_an_error() {
        let doc = format!(
            r#"{{"keys":[{EC_JWK},{{"kty":"oct","k":"c2VjcmV0"}},{{"kty":"RSA","use":"enc","n":"AQAB","e":"AQAB"}}]}}"#
        );
        let set = parse(doc.as_bytes()).unwrap();
        assert_eq!(set.len(), 1);
        assert!(set.contains_kid("e1"));
        assert!(parse(br#"{"keys":[{"kty":"oct","k":"c2VjcmV0"}]}"#).is_err());
        assert!(parse(br#"{"keys":[]}"#).is_err());
        assert!(parse(b"<html>").is_err());
    }

    #[tokio::test]
    async fn a_rotated_kid_is_fetched_and_a_failed_fetch_keeps_the_old_keys() {
        let idp = FakeIdp::start(jwks_with(&[("rsa", "k1")])).await;
        let p = provider(&idp.url, 0);
        assert!(
            p.verify(&token(RSA_PRIVATE, "k1")).await.is_ok(),
            "waits for the first fetch"
        );
        idp.set(200, jwks_with(&[("rsa", "k1"), ("rsa2", "k2")]));
        let id = p.verify(&token(RSA2_PRIVATE, "k2")).await.unwrap();
        assert_eq!(id.subject.as_deref(), Some("u"));
        idp.set(500, "down".into());
        let before = idp.hits();
        assert_eq!(
            p.verify(&token(RSA_PRIVATE, "k3")).await.unwrap_err(),
            AuthError::UnknownKey
        );
        assert!(
            idp.hits() > before,
            "the unknown kid caused a fetch, which failed"
        );
        let uncached = token_for(RSA_PRIVATE, "k1", "someone-else");
        assert!(
            p.verify(&uncached).await.is_ok(),
            "old keys survive a failed fetch"
        );
        idp.set(200, "{\"keys\": []}".into());
        let _ = p.verify(&token(RSA_PRIVATE, "k4")).await;
        assert!(
            p.verify(&token(RSA2_PRIVATE, "k2")).await.is_ok(),
            "an empty set is not served"
        );
    }

    #[tokio::test]
    async fn random_kids_cannot_cause_a_fetch_storm() {
        let idp = FakeIdp::start(jwks_with(&[("rsa", "k1")])).await;
        let p = provider(&idp.url, 3600);
        assert!(p.verify(&token(RSA_PRIVATE, "k1")).await.is_ok());
        for i in 0..50 {
            let err = p
                .verify(&token(RSA_PRIVATE, &format!("random-{i}")))
                .await
                .unwrap_err();
            assert_eq!(err, AuthError::UnknownKey);
        }
        assert!(idp.hits() <= 2, "{} fetches", idp.hits());
    }

    #[tokio::test]
    async fn keys_rotated_away_invalidate_cached_tokens() {
        let idp = FakeIdp::start(jwks_with(&[("rsa", "k1")])).await;
        let p = provider(&idp.url, 0);
        let t = token(RSA_PRIVATE, "k1");
        assert!(p.verify(&t).await.is_ok());
        idp.set(200, jwks_with(&[("rsa2", "k2")]));
        assert!(p.verify(&token(RSA2_PRIVATE, "k2")).await.is_ok());
        assert_eq!(p.verify(&t).await.unwrap_err(), AuthError::UnknownKey);
    }
}
