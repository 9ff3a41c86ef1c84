//! The ACL token sent with every request, and what Consul last said about it.
//!
//! A token comes from the configuration or from a file (`consul.token_file`, like Consul's
//! `CONSUL_HTTP_TOKEN_FILE`). The file is read again by the client's upkeep, so a rotated
//! token is used without a restart. A `403` is not an outage: each refused read is recorded
//! here, one log line opens the episode (naming where the token comes from) and a gauge
//! shows it; the watches keep their last good state. The upkeep retries the refused reads,
//! so a token that works again is noticed at once; the episode ends when no read is refused
//! any more. Tracking reads, not just "a 403 happened", keeps a token that may read some
//! paths but not others from flapping between refused and accepted.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use http::HeaderValue;
use serde::Serialize;
use tokio::time::Instant;

use super::ConsulError;

/// Where the token comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenOrigin {
    /// No token: Consul uses the agent's default token, else the anonymous one.
    Anonymous,
    /// `consul.token` (or `CONSUL_HTTP_TOKEN`).
    Setting,
    /// `consul.token_file` (or `CONSUL_HTTP_TOKEN_FILE`), read again while running.
    File(PathBuf),
}

impl std::fmt::Display for TokenOrigin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TokenOrigin::Anonymous => f.write_str("no token (the agent's default or anonymous)"),
            TokenOrigin::Setting => f.write_str("the token from consul.token"),
            TokenOrigin::File(p) => write!(f, "the token in {}", p.display()),
        }
    }
}

/// A read Consul refuses: what it said, and when a watch last asked.
#[derive(Debug, Clone)]
struct RefusedRead {
    message: String,
    last_by_watch: Instant,
}

/// A read no watch has asked for this long is forgotten (its watch was stopped): longer than
/// any blocking wait or retry backoff a live watch would sit in.
const FORGET_REFUSED_AFTER: Duration = Duration::from_secs(15 * 60);

#[derive(Debug)]
struct Current {
    header: Option<HeaderValue>,
    /// The file's trimmed text as last read (compared to notice a rotation).
    file_text: Option<String>,
    /// Refused reads by path; the episode lasts while this is not empty.
    refused: BTreeMap<String, RefusedRead>,
    /// When the current episode began.
    refused_since: Option<Instant>,
    last_message: Option<String>,
    /// The last re-read of the file failed with this (logged once per distinct error).
    file_error: Option<String>,
}

/// The token state shared by every clone of a client.
#[derive(Debug)]
pub struct AclToken {
    origin: TokenOrigin,
    current: Mutex<Current>,
    /// Bumped whenever the token changes or is accepted again after a refusal.
    generation: AtomicU64,
    refusals_total: AtomicU64,
}

/// What the admin API shows about the token (never the token).
#[derive(Debug, Clone, Serialize)]
pub struct TokenReport {
    pub origin: String,
    /// Consul refuses the token (403) since this many seconds; `None` while it is accepted.
    pub refused_for_s: Option<f64>,
    pub refused_message: Option<String>,
    /// The reads refused now (KV prefixes, services), at most 10.
    pub refused_paths: Vec<String>,
    pub refusals_total: u64,
    /// The last re-read of the token file failed (the token in use is kept).
    pub file_error: Option<String>,
}

impl AclToken {
    /// `file` wins over `token` when both are given, as in Consul's own client.
    pub fn new(token: Option<String>, file: Option<PathBuf>) -> Result<AclToken, ConsulError> {
        let (origin, text, file_text) = match (file, token) {
            (Some(path), _) => {
                let text = read_token_file(&path).map_err(ConsulError::Setup)?;
                (TokenOrigin::File(path), text.clone(), Some(text))
            }
            (None, Some(t)) => (TokenOrigin::Setting, t.trim().to_string(), None),
            (None, None) => (TokenOrigin::Anonymous, String::new(), None),
        };
        let header = header_value(&text).map_err(ConsulError::Setup)?;
        let origin = match (&origin, &header) {
            (TokenOrigin::Setting, None) => TokenOrigin::Anonymous,
            _ => origin,
        };
        Ok(AclToken {
            origin,
            current: Mutex::new(Current {
                header,
                file_text,
                refused: BTreeMap::new(),
                refused_since: None,
                last_message: None,
                file_error: None,
            }),
            generation: AtomicU64::new(0),
            refusals_total: AtomicU64::new(0),
        })
    }

    pub fn origin(&self) -> &TokenOrigin {
        &self.origin
    }

    /// The `X-Consul-Token` value to send, if any.
    pub fn header(&self) -> Option<HeaderValue> {
        self.lock().header.clone()
    }

    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Reads the token file again. `true` when the token changed (the watches should retry
    /// at once). An unreadable, empty or malformed file keeps the token in use: a writer
    /// caught halfway must not turn the gateway anonymous.
    pub fn reload(&self) -> bool {
        let TokenOrigin::File(path) = &self.origin else {
            return false;
        };
        let read = read_token_file(path).and_then(|text| {
            if text.is_empty() {
                return Err(format!("{} is empty", path.display()));
            }
            header_value(&text).map(|h| (text, h))
        });
        let mut current = self.lock();
        match read {
            Err(e) => {
                if current.file_error.as_deref() != Some(e.as_str()) {
                    tracing::warn!(error = %e, "cannot re-read the consul token file; keeping the token in use");
                    current.file_error = Some(e);
                }
                false
            }
            Ok((text, header)) => {
                current.file_error = None;
                if current.file_text.as_deref() == Some(text.as_str()) {
                    return false;
                }
                current.file_text = Some(text);
                current.header = header;
                drop(current);
                tracing::info!(path = %path.display(), "consul token file changed; using the new token");
                self.generation.fetch_add(1, Ordering::AcqRel);
                true
            }
        }
    }

    /// Consul answered a watch's read of `path` with 403. The first refusal of an episode
    /// is logged.
    pub fn refused(&self, path: &str, message: &str) {
        self.record_refusal(path, message, true);
    }

    /// The upkeep's retry of a refused read was refused again (does not keep the read
    /// alive: only a watch asking for it does).
    pub fn still_refused(&self, path: &str, message: &str) {
        self.record_refusal(path, message, false);
    }

    fn record_refusal(&self, path: &str, message: &str, by_watch: bool) {
        self.refusals_total.fetch_add(1, Ordering::Relaxed);
        let now = Instant::now();
        let mut current = self.lock();
        let first = current.refused_since.is_none();
        match current.refused.get_mut(path) {
            Some(read) => {
                read.message = message.to_string();
                if by_watch {
                    read.last_by_watch = now;
                }
            }
            None if by_watch => {
                current.refused.insert(
                    path.to_string(),
                    RefusedRead {
                        message: message.to_string(),
                        last_by_watch: now,
                    },
                );
            }
            None => return,
        }
        current.last_message = Some(message.to_string());
        if first {
            current.refused_since = Some(now);
        }
        drop(current);
        if first {
            metrics::gauge!(crate::metrics::CONSUL_TOKEN_REFUSED).set(1.0);
            tracing::error!(token = %self.origin, consul_said = %message, path,
                "consul refuses the ACL token (403: missing, expired or revoked, or lacking a \
                 permission); serving the last good state until it is accepted");
        }
    }

    /// Consul answered a read of `path`. `true` when this ends a refusal episode (the
    /// watches waiting out a backoff should retry now).
    pub fn accepted(&self, path: &str) -> bool {
        let mut current = self.lock();
        if current.refused.remove(path).is_none() || !current.refused.is_empty() {
            return false;
        }
        self.end_episode(current)
    }

    /// The refused reads worth retrying now (at most `max`, those no watch asked for in
    /// [`FORGET_REFUSED_AFTER`] are dropped first, which may end the episode).
    pub fn refused_paths(&self, max: usize) -> Vec<String> {
        let mut current = self.lock();
        let before = current.refused.len();
        current
            .refused
            .retain(|_, r| r.last_by_watch.elapsed() < FORGET_REFUSED_AFTER);
        if before > 0 && current.refused.is_empty() {
            self.end_episode(current);
            return Vec::new();
        }
        current.refused.keys().take(max).cloned().collect()
    }

    fn end_episode(&self, mut current: std::sync::MutexGuard<'_, Current>) -> bool {
        let Some(since) = current.refused_since.take() else {
            return false;
        };
        current.last_message = None;
        drop(current);
        metrics::gauge!(crate::metrics::CONSUL_TOKEN_REFUSED).set(0.0);
        tracing::info!(token = %self.origin, refused_for_s = since.elapsed().as_secs(),
            "consul accepts the ACL token again");
        self.generation.fetch_add(1, Ordering::AcqRel);
        true
    }

    pub fn report(&self) -> TokenReport {
        let current = self.lock();
        TokenReport {
            origin: self.origin.to_string(),
            refused_for_s: current
                .refused_since
                .map(|since| since.elapsed().as_secs_f64()),
            refused_message: current.last_message.clone(),
            refused_paths: current.refused.keys().take(10).cloned().collect(),
            refusals_total: self.refusals_total.load(Ordering::Relaxed),
            file_error: current.file_error.clone(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Current> {
        // Only whole-field assignments happen under this lock: a poisoned one holds valid data.
        self.current.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The file's text without surrounding whitespace (as Consul trims it).
fn read_token_file(path: &Path) -> Result<String, String> {
    std::fs::read_to_string(path)
        .map(|t| t.trim().to_string())
        .map_err(|e| format!("token file {}: {e}", path.display()))
}

/// `None` for an empty token; an error for one that cannot be a header value.
fn header_value(text: &str) -> Result<Option<HeaderValue>, String> {
    if text.is_empty() {
        return Ok(None);
    }
    let mut v = HeaderValue::from_str(text)
        .map_err(|_| "the consul token holds characters a header cannot carry".to_string())?;
    v.set_sensitive(true);
    Ok(Some(v))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_token_is_trimmed_and_a_rotation_is_noticed_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "first\n").unwrap();
        let token = AclToken::new(None, Some(path.clone())).unwrap();
        assert_eq!(token.header().unwrap(), "first");
        assert!(!token.reload(), "unchanged");
        std::fs::write(&path, "  second \n").unwrap();
        assert!(token.reload());
        assert_eq!(token.header().unwrap(), "second");
        assert_eq!(token.generation(), 1);
        assert!(!token.reload());
    }

    #[test]
    fn an_empty_missing_or_malformed_file_keeps_the_token_in_use() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "good").unwrap();
        let token = AclToken::new(None, Some(path.clone())).unwrap();
        for bad in ["", "bad\u{7f}token"] {
            std::fs::write(&path, bad).unwrap();
            assert!(!token.reload());
            assert_eq!(token.header().unwrap(), "good");
            assert!(token.report().file_error.is_some());
        }
        std::fs::remove_file(&path).unwrap();
        assert!(!token.reload());
        assert_eq!(token.header().unwrap(), "good");
        std::fs::write(&path, "good").unwrap();
        assert!(!token.reload(), "the same token again is no change");
        assert!(token.report().file_error.is_none());
    }

    #[test]
    fn the_file_wins_over_the_setting_and_a_missing_file_is_a_setup_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "from-file").unwrap();
        let token = AclToken::new(Some("from-setting".into()), Some(path)).unwrap();
        assert_eq!(token.header().unwrap(), "from-file");
        let err = AclToken::new(None, Some(dir.path().join("nope"))).unwrap_err();
        assert!(err.to_string().contains("nope"), "{err}");
        let none = AclToken::new(Some("  ".into()), None).unwrap();
        assert_eq!(none.origin(), &TokenOrigin::Anonymous);
        assert!(none.header().is_none());
    }

    #[test]
    fn a_refusal_lasts_until_every_refused_read_is_accepted() {
        let token = AclToken::new(Some("t".into()), None).unwrap();
        assert!(!token.accepted("/v1/kv/sy/"), "nothing to end");
        token.refused("/v1/kv/sy/", "ACL not found");
        token.refused("/v1/health/service/web", "ACL not found");
        let report = token.report();
        assert!(report.refused_for_s.is_some());
        assert_eq!(report.refusals_total, 2);
        assert_eq!(
            token.refused_paths(10),
            ["/v1/health/service/web", "/v1/kv/sy/"]
        );
        assert!(
            !token.accepted("/v1/health/service/other"),
            "another read says nothing about the refused ones"
        );
        assert!(!token.accepted("/v1/kv/sy/"), "one is still refused");
        assert!(token.report().refused_for_s.is_some());
        token.still_refused("/v1/kv/sy/", "ACL not found");
        assert_eq!(
            token.refused_paths(10),
            ["/v1/health/service/web"],
            "a retry does not bring back a read no watch asks for"
        );
        assert!(token.accepted("/v1/health/service/web"));
        assert!(token.report().refused_for_s.is_none());
        assert_eq!(token.generation(), 1);
        assert!(token.refused_paths(10).is_empty());
    }
}
