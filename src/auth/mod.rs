//! Edge authentication: who is calling ([`Identity`]), what a route demands
//! ([`Requirement`]), and why a request is refused ([`AuthError`]: 401, 403 or a 302 to a
//! login page). Independent of the gateway: it sees a URI and headers, never routes or
//! Consul. `routing` compiles a route's `auth` section into a `Requirement`; the proxy
//! handler asks the [`Authenticator`] before anything reaches an upstream.
//!
//! - [`jwt`]: provider documents and token verification (allow-listed algorithms, iss, aud,
//!   exp, nbf, leeway, size limit, token sources).
//! - [`keys`]: PEM, JWK and HMAC-secret keys, typed by algorithm family; [`jwks`]: keys
//!   fetched from a `jwks_url`, refreshed in the background.
//! - [`api_key`]: hashed API keys from KV, compared in constant time.
//! - [`identity_headers`]: forged identity headers out, verified ones in.
//! - [`cache`]: verified tokens by hash, so a token's signature is checked once.
//! - [`failure_budget`]: failed verifications per client address and gateway-wide, so tokens
//!   with bad signatures cannot make every request cost a signature check.
//! - [`docs`]: KV documents (providers, API keys) with the last good version per key.

pub mod api_key;
mod authenticator;
pub mod cache;
pub mod docs;
pub mod failure_budget;
pub mod identity_headers;
pub mod jwks;
pub mod jwt;
pub mod keys;

use std::sync::Arc;

use http::{HeaderName, HeaderValue, StatusCode};

pub use authenticator::{AuthRejection, AuthSettings, Authenticator, Grant};
pub use failure_budget::{FailureBudget, FailureBudgetSettings, SpentBudget};

/// How a caller proved who it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMethod {
    Jwt,
    ApiKey,
}

impl AuthMethod {
    pub fn as_str(self) -> &'static str {
        match self {
            AuthMethod::Jwt => "jwt",
            AuthMethod::ApiKey => "api_key",
        }
    }
}

/// A verified caller.
#[derive(Debug, Clone)]
pub struct Identity {
    pub method: AuthMethod,
    /// `sub` of a token; the consumer name of an API key.
    pub subject: Option<String>,
    /// The consumer an API key belongs to (`None` for tokens).
    pub consumer: Option<String>,
    /// Sorted, without duplicates.
    pub scopes: Vec<String>,
    /// Every claim of a token (empty for API keys).
    pub claims: Arc<serde_json::Map<String, serde_json::Value>>,
    /// The provider that verified the token, or the id of the API key.
    pub source: String,
    /// `exp` of a token, in Unix seconds.
    pub expires_at: Option<u64>,
    /// The headers this identity adds to the upstream request, computed once.
    pub headers: Vec<(HeaderName, HeaderValue)>,
}

impl Identity {
    /// Does this identity carry every scope in `required`?
    pub fn missing_scopes(&self, required: &[String]) -> Vec<String> {
        required
            .iter()
            .filter(|s| self.scopes.binary_search(s).is_err())
            .cloned()
            .collect()
    }
}

/// Scopes of a token: `scope` (space-delimited, OAuth 2), `scp` (array or space-delimited,
/// Azure AD / Okta) and `roles` (array), merged, sorted and deduplicated.
pub fn scopes_of(claims: &serde_json::Map<String, serde_json::Value>) -> Vec<String> {
    let mut scopes = Vec::new();
    for name in ["scope", "scp", "roles"] {
        match claims.get(name) {
            Some(serde_json::Value::String(s)) => {
                scopes.extend(s.split_ascii_whitespace().map(str::to_string))
            }
            Some(serde_json::Value::Array(items)) => scopes.extend(
                items
                    .iter()
                    .filter_map(|v| v.as_str())
                    .filter(|s| !s.is_empty())
                    .map(str::to_string),
            ),
            _ => {}
        }
    }
    scopes.sort();
    scopes.dedup();
    scopes
}

/// What a route demands, compiled from its `auth` section. Plain data.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Requirement {
    /// JWT providers, any of which may vouch for the caller.
    pub providers: Vec<String>,
    /// An API key is accepted too (or alone when `providers` is empty).
    pub api_key: bool,
    /// Scopes the caller must carry, all of them (sorted).
    pub scopes: Vec<String>,
    /// Where browsers (`Accept: text/html`) go instead of a 401.
    pub redirect: Option<HeaderValue>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequirementError {
    #[error("provider name `{0}` is not valid (letters, digits, `-`, `_`, `.`)")]
    ProviderName(String),
    #[error("provider `{0}` is listed twice")]
    DuplicateProvider(String),
    #[error("scope `{0}` is not valid (non-empty, no spaces or quotes)")]
    Scope(String),
    #[error(
        "`{0}` needs `jwt` or `api_key` (a route open to everyone has no scopes or login page)"
    )]
    NeedsCredential(&'static str),
    #[error("redirect `{0}` must be an http(s) URL or an absolute path")]
    Redirect(String),
}

impl Requirement {
    /// A route anyone may call.
    pub fn open() -> Requirement {
        Requirement::default()
    }

    pub fn new(
        providers: Vec<String>,
        api_key: bool,
        mut scopes: Vec<String>,
        redirect: Option<String>,
    ) -> Result<Requirement, RequirementError> {
        let mut seen = std::collections::HashSet::new();
        for p in &providers {
            if !valid_name(p) {
                return Err(RequirementError::ProviderName(p.clone()));
            }
            if !seen.insert(p.as_str()) {
                return Err(RequirementError::DuplicateProvider(p.clone()));
            }
        }
        for s in &scopes {
            if s.is_empty()
                || s.chars()
                    .any(|c| c.is_whitespace() || c == '"' || c == '\\')
            {
                return Err(RequirementError::Scope(s.clone()));
            }
        }
        scopes.sort();
        scopes.dedup();
        let open = providers.is_empty() && !api_key;
        if open && !scopes.is_empty() {
            return Err(RequirementError::NeedsCredential("scopes"));
        }
        if open && redirect.is_some() {
            return Err(RequirementError::NeedsCredential("on_unauthenticated"));
        }
        let redirect = redirect
            .map(|r| {
                let ok = if r.starts_with('/') {
                    !r.starts_with("//")
                } else {
                    url::Url::parse(&r)
                        .is_ok_and(|u| matches!(u.scheme(), "http" | "https") && u.has_host())
                };
                match HeaderValue::from_str(&r) {
                    Ok(v) if ok => Ok(v),
                    _ => Err(RequirementError::Redirect(r)),
                }
            })
            .transpose()?;
        Ok(Requirement {
            providers,
            api_key,
            scopes,
            redirect,
        })
    }

    /// No credential needed.
    pub fn is_open(&self) -> bool {
        self.providers.is_empty() && !self.api_key
    }
}

/// Provider names double as KV key names: keep them plain.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && name != "."
        && name != ".."
}

/// Why a request was refused. Descriptions are safe to show a client: they never contain
/// a token, a key or a secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("no credentials")]
    Missing,
    #[error("token larger than {max} bytes")]
    TooLarge { max: usize },
    #[error("malformed credentials: {0}")]
    Malformed(&'static str),
    #[error("algorithm not allowed")]
    Algorithm,
    #[error("no key for this token")]
    UnknownKey,
    #[error("invalid signature")]
    Signature,
    #[error("token expired")]
    Expired,
    #[error("token not valid yet")]
    NotYetValid,
    #[error("wrong issuer")]
    Issuer,
    #[error("wrong audience")]
    Audience,
    #[error("missing claim `{0}`")]
    MissingClaim(String),
    #[error("unknown API key")]
    UnknownApiKey,
    #[error("API key disabled")]
    DisabledApiKey,
    #[error("authentication provider unavailable")]
    UnknownProvider,
    #[error("insufficient scope")]
    InsufficientScope { missing: Vec<String> },
    /// This client's budget of failed verifications is spent: its tokens are refused
    /// without verification for a while.
    #[error("too many invalid tokens from this address; retry in {retry_after_s} s")]
    TooManyFailures { retry_after_s: u64 },
    /// The gateway-wide budget of failed verifications is spent (a flood of bad tokens from
    /// many addresses): tokens it has not verified before are refused unverified for a while.
    #[error("too many invalid tokens at this gateway; retry in {retry_after_s} s")]
    TooManyFailuresGatewayWide { retry_after_s: u64 },
}

impl AuthError {
    pub fn status(&self) -> StatusCode {
        match self {
            AuthError::InsufficientScope { .. } => StatusCode::FORBIDDEN,
            AuthError::TooManyFailures { .. } | AuthError::TooManyFailuresGatewayWide { .. } => {
                StatusCode::TOO_MANY_REQUESTS
            }
            AuthError::Missing
            | AuthError::TooLarge { .. }
            | AuthError::Malformed(_)
            | AuthError::Algorithm
            | AuthError::UnknownKey
            | AuthError::Signature
            | AuthError::Expired
            | AuthError::NotYetValid
            | AuthError::Issuer
            | AuthError::Audience
            | AuthError::MissingClaim(_)
            | AuthError::UnknownApiKey
            | AuthError::DisabledApiKey
            | AuthError::UnknownProvider => StatusCode::UNAUTHORIZED,
        }
    }

    /// The `reason` label of `switchyard_auth_failures_total`.
    pub fn reason(&self) -> &'static str {
        match self {
            AuthError::Missing => "missing",
            AuthError::TooLarge { .. } => "too_large",
            AuthError::Malformed(_) => "malformed",
            AuthError::Algorithm => "algorithm",
            AuthError::UnknownKey => "unknown_key",
            AuthError::Signature => "signature",
            AuthError::Expired => "expired",
            AuthError::NotYetValid => "not_yet_valid",
            AuthError::Issuer => "issuer",
            AuthError::Audience => "audience",
            AuthError::MissingClaim(_) => "missing_claim",
            AuthError::UnknownApiKey => "unknown_api_key",
            AuthError::DisabledApiKey => "disabled_api_key",
            AuthError::UnknownProvider => "unknown_provider",
            AuthError::InsufficientScope { .. } => "insufficient_scope",
            AuthError::TooManyFailures { .. } => "failure_budget",
            AuthError::TooManyFailuresGatewayWide { .. } => "failure_budget_global",
        }
    }

    /// How long a refusal by a failure budget asks the client to wait (`Retry-After`).
    pub fn retry_after_s(&self) -> Option<u64> {
        match *self {
            AuthError::TooManyFailures { retry_after_s }
            | AuthError::TooManyFailuresGatewayWide { retry_after_s } => Some(retry_after_s),
            _ => None,
        }
    }

    /// Whether a failure budget refused this request (the refusal is held, see
    /// [`FailureBudget::hold_refusal`]).
    pub fn spent_budget(&self) -> bool {
        matches!(
            self,
            AuthError::TooManyFailures { .. } | AuthError::TooManyFailuresGatewayWide { .. }
        )
    }

    /// Whether this failure came out of a signature check (bad signature, or a good one on
    /// claims that do not pass): what the failure budget counts. Failures found before any
    /// crypto (size, syntax, algorithm, unknown key) cost next to nothing.
    pub fn spent_verification(&self) -> bool {
        matches!(
            self,
            AuthError::Signature
                | AuthError::Expired
                | AuthError::NotYetValid
                | AuthError::Issuer
                | AuthError::Audience
                | AuthError::MissingClaim(_)
        )
    }

    /// The RFC 6750 `error` code (`None` when no credential was presented at all).
    pub fn oauth_code(&self) -> Option<&'static str> {
        match self {
            AuthError::Missing
            | AuthError::TooManyFailures { .. }
            | AuthError::TooManyFailuresGatewayWide { .. } => None,
            AuthError::InsufficientScope { .. } => Some("insufficient_scope"),
            AuthError::Malformed(_) => Some("invalid_request"),
            _ => Some("invalid_token"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_merge_scope_scp_and_roles() {
        let claims = serde_json::json!({
            "scope": "orders:read  orders:write",
            "scp": ["profile", ""],
            "roles": ["admin", "orders:read"],
        });
        let scopes = scopes_of(claims.as_object().unwrap());
        assert_eq!(scopes, ["admin", "orders:read", "orders:write", "profile"]);
        let claims = serde_json::json!({"scp": "a b"});
        assert_eq!(scopes_of(claims.as_object().unwrap()), ["a", "b"]);
    }

    #[test]
    fn requirements_are_checked_when_compiled() {
        let r = Requirement::new(
            vec!["main".into()],
            true,
            vec!["b".into(), "a".into()],
            None,
        )
        .unwrap();
        assert_eq!(r.scopes, ["a", "b"]);
        assert!(!r.is_open());
        assert!(Requirement::open().is_open());
        assert_eq!(
            Requirement::new(vec!["../x".into()], false, vec![], None),
            Err(RequirementError::ProviderName("../x".into()))
        );
        assert_eq!(
            Requirement::new(vec!["a".into(), "a".into()], false, vec![], None),
            Err(RequirementError::DuplicateProvider("a".into()))
        );
        assert_eq!(
            Requirement::new(vec![], false, vec!["x".into()], None),
            Err(RequirementError::NeedsCredential("scopes"))
        );
        assert_eq!(
            Requirement::new(vec![], true, vec!["a b".into()], None),
            Err(RequirementError::Scope("a b".into()))
        );
        for bad in [
            "//evil.example",
            "javascript:alert(1)",
            "ftp://x/y",
            "login",
        ] {
            assert_eq!(
                Requirement::new(vec![], true, vec![], Some(bad.into())),
                Err(RequirementError::Redirect(bad.into())),
                "{bad}"
            );
        }
        for good in ["/login", "https://id.example.com/login?next=/"] {
            assert!(Requirement::new(vec![], true, vec![], Some(good.into())).is_ok());
        }
    }

    #[test]
    fn only_missing_scope_is_forbidden() {
        let e = AuthError::InsufficientScope {
            missing: vec!["x".into()],
        };
        assert_eq!(e.status(), StatusCode::FORBIDDEN);
        assert_eq!(AuthError::Expired.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(AuthError::Missing.oauth_code(), None);
        assert_eq!(AuthError::Signature.oauth_code(), Some("invalid_token"));
    }
}
