//! JWT providers: the document an operator writes (in the config file or at
//! `<kv-prefix>jwt/<name>`), its validation into a [`Provider`], and token verification.
//!
//! What is never accepted, whatever the document says: `alg: none`; an algorithm outside
//! the provider's allow-list; a key of another family than the token's `alg` (no HMAC
//! with a public key); keys named by the token itself (`jku`, `x5u`, `jwk`, `x5c` are
//! ignored); a `crit` header. `kid` only selects among the provider's own keys.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use http::{HeaderMap, HeaderName, HeaderValue, Uri};
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, Validation};
use serde::Deserialize;

use super::cache::{self, TokenCache};
use super::failure_budget::{FailureBudget, SpentBudget};
use super::jwks::{Jwks, JwksSettings};
use super::keys::{parse_algorithm, Key, KeyError, KeySet, KeySpec};
use super::{scopes_of, AuthError, AuthMethod, Identity};

/// Tokens without `exp` (allowed with `require_exp: false`) stay cached this long.
const NO_EXP_CACHE_S: u64 = 300;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProviderError {
    #[error("provider `{name}`: {message}")]
    Invalid { name: String, message: String },
    #[error("provider `{name}`: {source}")]
    Key { name: String, source: KeyError },
}

/// The provider document. Only `issuer`, `algorithms` and a key source are required.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderDoc {
    /// Required value of the `iss` claim.
    pub issuer: String,
    /// Accepted `aud` values (any one suffices); empty = `aud` not checked.
    #[serde(default)]
    pub audiences: Vec<String>,
    /// Algorithm allow-list; a token with any other `alg` is refused.
    pub algorithms: Vec<String>,
    /// Static keys: `{"kid", "pem"}`, `{"kid", "jwk"}`, `{"kid", "secret_file"|"secret_env"}`.
    #[serde(default)]
    pub keys: Vec<KeySpec>,
    /// JWKS endpoint, fetched in the background (http or https).
    #[serde(default)]
    pub jwks_url: Option<String>,
    /// Seconds between routine JWKS fetches.
    #[serde(default = "default_jwks_refresh")]
    pub jwks_refresh_s: u64,
    /// Least seconds between two JWKS fetches caused by tokens with an unknown kid.
    #[serde(default = "default_jwks_min_refetch")]
    pub jwks_min_refetch_s: u64,
    /// Bound of one JWKS fetch, in milliseconds.
    #[serde(default = "default_jwks_timeout")]
    pub jwks_timeout_ms: u64,
    /// Clock skew tolerated on `exp` and `nbf`, in seconds.
    #[serde(default = "default_leeway")]
    pub leeway_s: u64,
    /// Refuse tokens without `exp`.
    #[serde(default = "yes")]
    pub require_exp: bool,
    /// Larger tokens are refused before any parsing.
    #[serde(default = "default_max_token")]
    pub max_token_bytes: usize,
    /// Read the token from `Authorization: Bearer <token>` (scheme case-insensitive).
    #[serde(default = "yes")]
    pub from_bearer: bool,
    /// Also read it from this cookie.
    #[serde(default)]
    pub from_cookie: Option<String>,
    /// Also read it from this query parameter.
    #[serde(default)]
    pub from_query: Option<String>,
    /// Claim → upstream request header (string claims as is, numbers and booleans as
    /// text, arrays comma-joined, objects as JSON).
    #[serde(default = "default_claims_to_headers")]
    pub claims_to_headers: BTreeMap<String, String>,
    /// Header carrying the token's payload (base64url JSON, as in the token) upstream.
    #[serde(default)]
    pub payload_header: Option<String>,
    /// Remove `Authorization` before forwarding (when the token came from it).
    #[serde(default)]
    pub remove_authorization: bool,
    /// Verified tokens kept in memory (0 = verify every request).
    #[serde(default = "default_cache_entries")]
    pub cache_entries: usize,
}

fn yes() -> bool {
    true
}
fn default_jwks_refresh() -> u64 {
    300
}
fn default_jwks_min_refetch() -> u64 {
    30
}
fn default_jwks_timeout() -> u64 {
    3_000
}
fn default_leeway() -> u64 {
    60
}
fn default_max_token() -> usize {
    8 * 1024
}
fn default_cache_entries() -> usize {
    10_000
}
fn default_claims_to_headers() -> BTreeMap<String, String> {
    BTreeMap::from([("sub".to_string(), "X-User-Id".to_string())])
}

/// Where a token was found; decides whether `Authorization` may be removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenSource {
    Bearer,
    Cookie,
    Query,
}

/// A validated provider, ready for the request path.
#[derive(Debug)]
pub struct Provider {
    name: String,
    doc: ProviderDoc,
    /// One validation per allowed algorithm (each lists only that algorithm).
    validations: HashMap<Algorithm, Validation>,
    static_keys: KeySet,
    jwks: Option<Jwks>,
    leeway: u64,
    claims_to_headers: Vec<(String, HeaderName)>,
    payload_header: Option<HeaderName>,
    cache: TokenCache,
}

/// The header a token must have; everything else in it is ignored.
#[derive(Deserialize)]
struct RawHeader {
    alg: String,
    #[serde(default)]
    kid: Option<String>,
    #[serde(default)]
    crit: Option<serde_json::Value>,
}

impl Provider {
    /// Parses and validates a provider document. A `jwks_url` starts a background fetch
    /// (needs a Tokio runtime); `previous` lends its JWKS keys while the first fetch runs.
    pub fn build(
        name: &str,
        value: &serde_json::Value,
        client: &reqwest::Client,
        previous: Option<&Provider>,
    ) -> Result<Provider, ProviderError> {
        Self::compile(name, value, Some((client, previous)))
    }

    /// Validates a document without starting anything (for `check-config`). Secrets
    /// referenced by file or environment must be readable here too.
    pub fn check(name: &str, value: &serde_json::Value) -> Result<(), ProviderError> {
        Self::compile(name, value, None).map(drop)
    }

    fn compile(
        name: &str,
        value: &serde_json::Value,
        start: Option<(&reqwest::Client, Option<&Provider>)>,
    ) -> Result<Provider, ProviderError> {
        let err = |message: String| ProviderError::Invalid {
            name: name.to_string(),
            message,
        };
        if !super::valid_name(name) {
            return Err(err("name must use letters, digits, `-`, `_`, `.`".into()));
        }
        let doc: ProviderDoc =
            serde_json::from_value(value.clone()).map_err(|e| err(e.to_string()))?;
        if doc.issuer.trim().is_empty() {
            return Err(err("`issuer` must not be empty".into()));
        }
        if doc.algorithms.is_empty() {
            return Err(err("`algorithms` must list at least one algorithm".into()));
        }
        if doc.audiences.iter().any(|a| a.is_empty()) {
            return Err(err("`audiences` must not contain an empty string".into()));
        }
        if doc.max_token_bytes < 64 {
            return Err(err("`max_token_bytes` must be at least 64".into()));
        }
        if !doc.from_bearer && doc.from_cookie.is_none() && doc.from_query.is_none() {
            return Err(err(
                "no token source: enable `from_bearer` or set `from_cookie`/`from_query`".into(),
            ));
        }
        for (field, v) in [
            ("from_cookie", &doc.from_cookie),
            ("from_query", &doc.from_query),
        ] {
            if v.as_deref()
                .is_some_and(|n| n.is_empty() || n.contains([';', '=', '&', ' ']))
            {
                return Err(err(format!("`{field}` must be a plain name")));
            }
        }
        let mut required = vec!["iss"];
        if doc.require_exp {
            required.push("exp");
        }
        if !doc.audiences.is_empty() {
            required.push("aud");
        }
        let mut validations = HashMap::new();
        for a in &doc.algorithms {
            let alg = parse_algorithm(a).map_err(&err)?;
            let mut v = Validation::new(alg);
            v.leeway = doc.leeway_s;
            v.validate_exp = true;
            v.validate_nbf = true;
            v.set_issuer(&[doc.issuer.as_str()]);
            v.validate_aud = !doc.audiences.is_empty();
            if v.validate_aud {
                v.set_audience(&doc.audiences);
            }
            v.set_required_spec_claims(&required);
            validations.insert(alg, v);
        }
        let mut static_keys = KeySet::default();
        for (i, spec) in doc.keys.iter().enumerate() {
            let label = spec.kid.clone().unwrap_or_else(|| format!("#{}", i + 1));
            let key = Key::from_spec(spec, &label).map_err(|source| ProviderError::Key {
                name: name.to_string(),
                source,
            })?;
            if !validations.keys().any(|a| key.allows(*a)) {
                return Err(err(format!(
                    "key {label} ({:?}) fits none of the allowed algorithms",
                    key.family()
                )));
            }
            static_keys
                .insert(key)
                .map_err(|source| ProviderError::Key {
                    name: name.to_string(),
                    source,
                })?;
        }
        let jwks = match &doc.jwks_url {
            None => None,
            Some(url) => {
                let parsed = url::Url::parse(url).map_err(|e| err(format!("`jwks_url`: {e}")))?;
                if !matches!(parsed.scheme(), "http" | "https") || !parsed.has_host() {
                    return Err(err("`jwks_url` must be an http(s) URL".into()));
                }
                if doc.jwks_refresh_s == 0 || doc.jwks_timeout_ms == 0 {
                    return Err(err(
                        "`jwks_refresh_s` and `jwks_timeout_ms` must be positive".into(),
                    ));
                }
                let settings = JwksSettings {
                    url: url.clone(),
                    refresh: Duration::from_secs(doc.jwks_refresh_s),
                    min_refetch: Duration::from_secs(doc.jwks_min_refetch_s),
                    timeout: Duration::from_millis(doc.jwks_timeout_ms),
                };
                start.map(|(client, previous)| {
                    let seed = previous
                        .and_then(|p| p.jwks.as_ref())
                        .filter(|j| j.url() == url)
                        .map(|j| j.key_set());
                    Jwks::start(settings, client.clone(), seed)
                })
            }
        };
        if static_keys.is_empty() && doc.jwks_url.is_none() {
            return Err(err("no keys: give `keys` or `jwks_url`".into()));
        }
        let mut claims_to_headers = Vec::new();
        for (claim, header) in &doc.claims_to_headers {
            let h = HeaderName::from_bytes(header.as_bytes())
                .map_err(|_| err(format!("`{header}` is not a header name")))?;
            claims_to_headers.push((claim.clone(), h));
        }
        let payload_header = doc
            .payload_header
            .as_deref()
            .map(|h| {
                HeaderName::from_bytes(h.as_bytes())
                    .map_err(|_| err(format!("`{h}` is not a header name")))
            })
            .transpose()?;
        for h in claims_to_headers
            .iter()
            .map(|(_, h)| h)
            .chain(payload_header.as_ref())
        {
            if is_reserved(h) {
                return Err(err(format!("`{h}` cannot carry identity")));
            }
        }
        Ok(Provider {
            name: name.to_string(),
            leeway: doc.leeway_s,
            cache: TokenCache::new(doc.cache_entries),
            doc,
            validations,
            static_keys,
            jwks,
            claims_to_headers,
            payload_header,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn doc(&self) -> &ProviderDoc {
        &self.doc
    }

    pub fn remove_authorization(&self) -> bool {
        self.doc.remove_authorization
    }

    /// Every header this provider writes (to strip client-sent copies).
    pub fn identity_headers(&self) -> impl Iterator<Item = &HeaderName> {
        self.claims_to_headers
            .iter()
            .map(|(_, h)| h)
            .chain(self.payload_header.as_ref())
    }

    /// Finds this provider's token in a request. `Ok(None)`: no token there.
    pub fn extract<'a>(
        &self,
        uri: &'a Uri,
        headers: &'a HeaderMap,
    ) -> Result<Option<(std::borrow::Cow<'a, str>, TokenSource)>, AuthError> {
        if self.doc.from_bearer {
            if let Some(t) = bearer_token(headers)? {
                return Ok(Some((t.into(), TokenSource::Bearer)));
            }
        }
        if let Some(name) = &self.doc.from_cookie {
            if let Some(t) = cookie(headers, name) {
                return Ok(Some((t.into(), TokenSource::Cookie)));
            }
        }
        if let Some(name) = &self.doc.from_query {
            if let Some(q) = uri.query() {
                if let Some((_, v)) =
                    url::form_urlencoded::parse(q.as_bytes()).find(|(k, _)| k == name)
                {
                    return Ok(Some((v, TokenSource::Query)));
                }
            }
        }
        Ok(None)
    }

    /// Verifies a token, from the cache when it was verified before.
    pub async fn verify(&self, token: &str) -> Result<Arc<Identity>, AuthError> {
        self.verify_guarded(token, None).await
    }

    /// [`Provider::verify`], where a token not in the cache is only verified while the
    /// client's failure budget lasts, and a verification that fails spends it.
    pub async fn verify_guarded(
        &self,
        token: &str,
        guard: Option<(&FailureBudget, IpAddr)>,
    ) -> Result<Arc<Identity>, AuthError> {
        if token.len() > self.doc.max_token_bytes {
            return Err(AuthError::TooLarge {
                max: self.doc.max_token_bytes,
            });
        }
        let now = unix_now();
        let key = cache::digest(token);
        let generation = self.generation();
        if let Some(identity) = self.cache.get(&key, now, generation) {
            return Ok(identity);
        }
        if let Some((budget, client)) = guard {
            if let Some(spent) = budget.spent(client) {
                let wait = spent.wait();
                let retry_after_s = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
                return Err(match spent {
                    SpentBudget::Address(_) => AuthError::TooManyFailures { retry_after_s },
                    SpentBudget::Gateway(_) => {
                        AuthError::TooManyFailuresGatewayWide { retry_after_s }
                    }
                });
            }
        }
        let identity = match self.verify_uncached(token).await {
            Ok(identity) => Arc::new(identity),
            Err(e) => {
                if let Some((budget, client)) = guard.filter(|_| e.spent_verification()) {
                    budget.charge(client);
                }
                return Err(e);
            }
        };
        let valid_until = match identity.expires_at {
            Some(exp) => exp.saturating_add(self.leeway),
            None => now + NO_EXP_CACHE_S,
        };
        // Generation as read before verifying: a rotation meanwhile makes the entry stale.
        self.cache
            .insert(key, identity.clone(), valid_until, now, generation);
        Ok(identity)
    }

    fn generation(&self) -> u64 {
        self.jwks.as_ref().map_or(0, |j| j.generation())
    }

    async fn verify_uncached(&self, token: &str) -> Result<Identity, AuthError> {
        let mut parts = token.split('.');
        let (Some(head), Some(payload), Some(signature), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(AuthError::Malformed("not a compact JWS"));
        };
        if head.is_empty() || payload.is_empty() || signature.is_empty() {
            return Err(AuthError::Malformed("empty token part"));
        }
        let header_bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(head)
            .map_err(|_| AuthError::Malformed("header is not base64url"))?;
        let header: RawHeader = serde_json::from_slice(&header_bytes)
            .map_err(|_| AuthError::Malformed("header is not a JWS header"))?;
        if header.crit.is_some() {
            return Err(AuthError::Malformed(
                "critical header extensions are not supported",
            ));
        }
        let alg = parse_algorithm(&header.alg).map_err(|_| AuthError::Algorithm)?;
        let validation = self.validations.get(&alg).ok_or(AuthError::Algorithm)?;
        let kid = header.kid.as_deref();

        let mut outcome = self.try_keys(token, kid, alg, validation);
        if matches!(outcome, Err(AuthError::UnknownKey)) {
            if let Some(jwks) = &self.jwks {
                let unknown = kid.is_none_or(|k| !jwks.keys().contains_kid(k));
                if unknown && jwks.refresh_for_unknown_kid().await {
                    outcome = self.try_keys(token, kid, alg, validation);
                }
            }
        }
        let claims = outcome?;
        let expires_at = claims
            .get("exp")
            .and_then(|v| v.as_u64().or_else(|| v.as_f64().map(|f| f as u64)));
        let subject = claims
            .get("sub")
            .and_then(|v| v.as_str())
            .map(str::to_string);
        let scopes = scopes_of(&claims);
        let headers = self.identity_header_values(&claims, payload);
        Ok(Identity {
            method: AuthMethod::Jwt,
            subject,
            consumer: None,
            scopes,
            claims: Arc::new(claims),
            source: self.name.clone(),
            expires_at,
            headers,
        })
    }

    /// Tries every candidate key; a claim error means the signature was good (the claims
    /// are only checked after it), so it is returned at once.
    fn try_keys(
        &self,
        token: &str,
        kid: Option<&str>,
        alg: Algorithm,
        validation: &Validation,
    ) -> Result<serde_json::Map<String, serde_json::Value>, AuthError> {
        let jwks_keys = self.jwks.as_ref().map(|j| j.keys());
        let static_candidates = self.static_keys.candidates(kid, alg);
        let jwks_candidates = jwks_keys
            .as_deref()
            .into_iter()
            .flat_map(|set| set.candidates(kid, alg));
        let mut tried = false;
        for key in static_candidates.chain(jwks_candidates) {
            tried = true;
            match jsonwebtoken::decode::<serde_json::Map<String, serde_json::Value>>(
                token,
                key.decoding(),
                validation,
            ) {
                Ok(data) => return Ok(data.claims),
                Err(e) => match map_error(e.kind()) {
                    AuthError::Signature => continue,
                    other => return Err(other),
                },
            }
        }
        Err(if tried {
            AuthError::Signature
        } else {
            AuthError::UnknownKey
        })
    }

    fn identity_header_values(
        &self,
        claims: &serde_json::Map<String, serde_json::Value>,
        payload: &str,
    ) -> Vec<(HeaderName, HeaderValue)> {
        let mut out = Vec::with_capacity(self.claims_to_headers.len() + 1);
        for (claim, header) in &self.claims_to_headers {
            let Some(value) = claims.get(claim) else {
                continue;
            };
            let text = match value {
                serde_json::Value::String(s) => s.clone(),
                serde_json::Value::Number(_) | serde_json::Value::Bool(_) => value.to_string(),
                serde_json::Value::Array(items) => items
                    .iter()
                    .map(|v| match v {
                        serde_json::Value::String(s) => s.clone(),
                        other => other.to_string(),
                    })
                    .collect::<Vec<_>>()
                    .join(","),
                serde_json::Value::Object(_) => value.to_string(),
                serde_json::Value::Null => continue,
            };
            match HeaderValue::from_str(&text) {
                Ok(v) => out.push((header.clone(), v)),
                Err(_) => tracing::debug!(provider = %self.name, %claim,
                    "claim value cannot be a header value; header not set"),
            }
        }
        if let Some(h) = &self.payload_header {
            if let Ok(v) = HeaderValue::from_str(payload) {
                out.push((h.clone(), v));
            }
        }
        out
    }
}

/// Headers that must never be overwritten with identity data.
fn is_reserved(h: &HeaderName) -> bool {
    use http::header::*;
    [
        HOST,
        AUTHORIZATION,
        CONNECTION,
        CONTENT_LENGTH,
        TRANSFER_ENCODING,
        TE,
        UPGRADE,
        COOKIE,
        PROXY_AUTHORIZATION,
        CONTENT_TYPE,
    ]
    .contains(h)
}

fn map_error(kind: &ErrorKind) -> AuthError {
    match kind {
        ErrorKind::ExpiredSignature => AuthError::Expired,
        ErrorKind::ImmatureSignature => AuthError::NotYetValid,
        ErrorKind::InvalidIssuer => AuthError::Issuer,
        ErrorKind::InvalidAudience => AuthError::Audience,
        ErrorKind::MissingRequiredClaim(c) => AuthError::MissingClaim(c.clone()),
        ErrorKind::InvalidAlgorithm | ErrorKind::MissingAlgorithm => AuthError::Algorithm,
        ErrorKind::InvalidClaimFormat(_) => AuthError::Malformed("claim of the wrong type"),
        ErrorKind::InvalidToken
        | ErrorKind::Base64(_)
        | ErrorKind::Json(_)
        | ErrorKind::Utf8(_) => AuthError::Malformed("undecodable token"),
        // Bad signature, or a key the crypto refused for this token: try the next key.
        _ => AuthError::Signature,
    }
}

/// `Authorization: Bearer <token>`, scheme case-insensitive. Another scheme is not a token;
/// two `Authorization` headers are ambiguous and refused.
fn bearer_token(headers: &HeaderMap) -> Result<Option<&str>, AuthError> {
    let mut values = headers.get_all(http::header::AUTHORIZATION).iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(AuthError::Malformed("more than one Authorization header"));
    }
    let value = value
        .to_str()
        .map_err(|_| AuthError::Malformed("Authorization is not text"))?;
    let (scheme, rest) = value.trim().split_once(' ').unwrap_or((value.trim(), ""));
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Ok(None);
    }
    let token = rest.trim();
    // `to_str` admitted visible ASCII, space and tab only: a byte scan finds any whitespace
    // (a `char` walk over a 1 KB token showed up in profiles).
    if token.is_empty() || token.bytes().any(|b| b == b' ' || b == b'\t') {
        return Err(AuthError::Malformed("Bearer needs exactly one token"));
    }
    Ok(Some(token))
}

fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.trim_matches('"'))
        .filter(|v| !v.is_empty())
}

pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests;
