//! The [`Authenticator`]: the one object the proxy handler asks. It holds the serving JWT
//! providers and API keys in one `ArcSwap` (the request path never locks) and owns their
//! control-plane side: providers from the config file, providers and API keys from KV
//! (KV wins on a name clash; a bad document keeps that key's last good version).

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use http::header::{ACCEPT, AUTHORIZATION, CACHE_CONTROL, LOCATION, RETRY_AFTER, WWW_AUTHENTICATE};
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode, Uri};

use super::api_key::{ApiKeyRecord, ApiKeyStore, APIKEYS_DIR};
use super::docs::{DocRejection, KvDocs};
use super::failure_budget::{FailureBudget, FailureBudgetSettings};
use super::identity_headers;
use super::jwt::{Provider, ProviderError, TokenSource};
use super::{AuthError, Identity, Requirement};
use crate::consul::watch::{self, KvPrefix};
use crate::consul::{ConsulClient, KvPair, WatchHandle, WatchOptions};

/// The folder under the KV prefix that holds provider documents.
pub const JWT_DIR: &str = "jwt/";

/// Gateway-wide auth settings.
#[derive(Debug, Clone)]
pub struct AuthSettings {
    /// `realm` of `WWW-Authenticate` challenges.
    pub realm: String,
    /// Header an API key is read from (removed before forwarding).
    pub api_key_header: HeaderName,
    /// Header carrying an API key's consumer name upstream.
    pub consumer_header: HeaderName,
    /// Headers always stripped from client requests, besides those providers write.
    pub strip_headers: Vec<HeaderName>,
    /// Failed verifications per client address, and gateway-wide, before tokens are refused
    /// unverified.
    pub failure_budget: FailureBudgetSettings,
}

impl Default for AuthSettings {
    fn default() -> Self {
        AuthSettings {
            realm: "switchyard".into(),
            api_key_header: HeaderName::from_static("x-api-key"),
            consumer_header: HeaderName::from_static("x-consumer"),
            strip_headers: vec![HeaderName::from_static("x-user-id")],
            failure_budget: FailureBudgetSettings::default(),
        }
    }
}

impl AuthSettings {
    /// From the `[auth]` section (already validated by `FileConfig::validate`).
    pub fn from_config(section: &crate::config::AuthSection) -> Result<AuthSettings, String> {
        let header = |h: &str| {
            HeaderName::from_bytes(h.as_bytes()).map_err(|_| format!("`{h}` is not a header name"))
        };
        Ok(AuthSettings {
            realm: section.realm.clone(),
            api_key_header: header(&section.api_key_header)?,
            consumer_header: header(&section.consumer_header)?,
            strip_headers: section
                .strip_headers
                .iter()
                .map(|h| header(h))
                .collect::<Result<_, _>>()?,
            failure_budget: FailureBudgetSettings::from(&section.failure_budget),
        })
    }
}

/// A caller let in, and what to do to the request before it goes upstream.
#[derive(Debug, Clone)]
pub struct Grant {
    pub identity: Arc<Identity>,
    /// The credential's header, when it must not travel upstream.
    pub remove: Option<HeaderName>,
}

/// A refusal: its status, the headers it needs (`WWW-Authenticate` challenges, or the
/// login redirect's `Location`) and why. Nothing of the request reaches an upstream; the
/// proxy renders the answer (`crate::proxy::error`, the one error shape).
#[derive(Debug, Clone)]
pub struct AuthRejection {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub error: AuthError,
}

impl AuthRejection {
    /// The machine-readable reason: the RFC 6750 code, or `unauthorized` when no
    /// credential was presented.
    pub fn code(&self) -> &'static str {
        if self.error.spent_budget() {
            "too_many_invalid_tokens"
        } else {
            self.error.oauth_code().unwrap_or("unauthorized")
        }
    }

    /// A redirect to a login page answers with no body.
    pub fn is_redirect(&self) -> bool {
        self.status.is_redirection()
    }
}

/// What the request path reads: swapped whole on any change.
#[derive(Debug, Default)]
struct Live {
    providers: Arc<HashMap<String, Arc<Provider>>>,
    api_keys: Arc<ApiKeyStore>,
    /// Every header the gateway may write: stripped from client requests.
    strip: Arc<Vec<HeaderName>>,
}

/// Control-plane state; touched only by the KV watches, never by requests.
#[derive(Debug)]
struct Control {
    config: BTreeMap<String, Arc<Provider>>,
    kv_providers: KvDocs<Provider>,
    kv_keys: KvDocs<ApiKeyRecord>,
    duplicate_keys: Vec<DocRejection>,
}

#[derive(Debug)]
pub struct Authenticator {
    settings: AuthSettings,
    client: reqwest::Client,
    failure_budget: FailureBudget,
    live: ArcSwap<Live>,
    control: Mutex<Control>,
}

impl Authenticator {
    /// Builds the config-file providers (a bad one is an error: the file must be fixed).
    /// `kv_prefix` locates `jwt/` and `apikeys/`. Needs a Tokio runtime for `jwks_url`.
    pub fn new(
        settings: AuthSettings,
        kv_prefix: &str,
        config_providers: &BTreeMap<String, serde_json::Value>,
    ) -> Result<Authenticator, ProviderError> {
        let client = reqwest::Client::builder()
            .user_agent(concat!("switchyard/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| ProviderError::Invalid {
                name: "(all)".into(),
                message: format!("HTTP client for JWKS: {e}"),
            })?;
        let mut config = BTreeMap::new();
        for (name, doc) in config_providers {
            config.insert(
                name.clone(),
                Arc::new(Provider::build(name, doc, &client, None)?),
            );
        }
        let auth = Authenticator {
            failure_budget: FailureBudget::new(settings.failure_budget),
            settings,
            client,
            live: ArcSwap::default(),
            control: Mutex::new(Control {
                config,
                kv_providers: KvDocs::new(format!("{kv_prefix}{JWT_DIR}")),
                kv_keys: KvDocs::new(format!("{kv_prefix}{APIKEYS_DIR}")),
                duplicate_keys: Vec::new(),
            }),
        };
        let mut control = auth.lock();
        auth.publish(&mut control);
        drop(control);
        Ok(auth)
    }

    pub fn settings(&self) -> &AuthSettings {
        &self.settings
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Control> {
        // Updated by plain assignments only: a poisoned lock still holds valid data.
        self.control.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Applies a listing of `<kv-prefix>jwt/`.
    pub fn apply_provider_docs(&self, pairs: &[KvPair]) {
        let mut control = self.lock();
        let live = self.live.load_full();
        let client = self.client.clone();
        let changed = control.kv_providers.apply(pairs, |name, value, last_good| {
            let doc: serde_json::Value =
                serde_json::from_slice(value).map_err(|e| format!("invalid JSON: {e}"))?;
            let previous = last_good.or_else(|| live.providers.get(name).map(|p| &**p));
            Provider::build(name, &doc, &client, previous).map_err(|e| e.to_string())
        });
        if changed {
            self.publish(&mut control);
        }
    }

    /// Applies a listing of `<kv-prefix>apikeys/`.
    pub fn apply_api_key_docs(&self, pairs: &[KvPair]) {
        let mut control = self.lock();
        let header = self.settings.consumer_header.clone();
        let changed = control.kv_keys.apply(pairs, |id, value, _| {
            ApiKeyRecord::compile(id, value, &header)
        });
        if changed {
            self.publish(&mut control);
        }
    }

    /// Documents currently rejected (bad JSON, bad fields, duplicate API keys), for the
    /// admin API. Never contains a secret: errors name fields, not values.
    pub fn rejections(&self) -> Vec<DocRejection> {
        let control = self.lock();
        let mut out = control.kv_providers.rejections();
        out.extend(control.kv_keys.rejections());
        out.extend(control.duplicate_keys.iter().cloned());
        out
    }

    /// Names of the serving providers.
    pub fn provider_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.live.load().providers.keys().cloned().collect();
        names.sort();
        names
    }

    pub fn api_key_count(&self) -> usize {
        self.live.load().api_keys.len()
    }

    fn publish(&self, control: &mut Control) {
        let mut providers: HashMap<String, Arc<Provider>> = control
            .config
            .iter()
            .map(|(n, p)| (n.clone(), p.clone()))
            .collect();
        for (name, p) in control.kv_providers.good() {
            if control.config.contains_key(name) {
                tracing::info!(provider = name, "KV provider overrides the config file's");
            }
            providers.insert(name.to_string(), p.clone());
        }
        let mut strip = self.settings.strip_headers.clone();
        strip.push(self.settings.consumer_header.clone());
        for p in providers.values() {
            strip.extend(p.identity_headers().cloned());
        }
        strip.sort_by(|a, b| a.as_str().cmp(b.as_str()));
        strip.dedup();
        let (api_keys, duplicates) = ApiKeyStore::build(control.kv_keys.good());
        let folder = control.kv_keys.folder();
        let duplicate_keys = duplicates
            .into_iter()
            .map(|(id, first)| {
                tracing::warn!(id, first, "API key document skipped: same key as another");
                DocRejection {
                    key: format!("{folder}{id}"),
                    name: id,
                    error: format!("same key as `{first}`"),
                    serving_last_good: false,
                }
            })
            .collect();
        control.duplicate_keys = duplicate_keys;
        // Runs under the control lock, so there is one writer at a time.
        self.live.store(Arc::new(Live {
            providers: Arc::new(providers),
            api_keys: Arc::new(api_keys),
            strip: Arc::new(strip),
        }));
    }

    /// Removes client-sent copies of every header the gateway may write (call on every
    /// request, before anything else reads them).
    pub fn strip_forged(&self, headers: &mut HeaderMap) {
        identity_headers::strip_forged(headers, &self.live.load().strip);
    }

    /// Whether the gateway writes `name` as an identity header (in any `_` spelling), so
    /// nothing else may set or remove it.
    pub fn writes(&self, name: &HeaderName) -> bool {
        self.live
            .load()
            .strip
            .iter()
            .any(|owned| identity_headers::folds_into(name.as_str(), owned.as_str()))
    }

    /// Checks a request from `client` (its address, for the failure budget) against a
    /// requirement. `Ok(None)`: the route is open.
    pub async fn authenticate(
        &self,
        client: IpAddr,
        uri: &Uri,
        headers: &HeaderMap,
        requirement: &Requirement,
    ) -> Result<Option<Grant>, AuthError> {
        if requirement.is_open() {
            return Ok(None);
        }
        let live = self.live.load_full();
        let mut first_error: Option<AuthError> = None;
        let mut known = 0;
        for name in &requirement.providers {
            let Some(provider) = live.providers.get(name) else {
                tracing::debug!(provider = %name, "route names an unknown JWT provider");
                continue;
            };
            known += 1;
            match provider.extract(uri, headers) {
                Ok(None) => {}
                Err(e) => {
                    first_error.get_or_insert(e);
                }
                Ok(Some((token, source))) => match provider
                    .verify_guarded(&token, Some((&self.failure_budget, client)))
                    .await
                {
                    Ok(identity) => {
                        let remove = (source == TokenSource::Bearer
                            && provider.remove_authorization())
                        .then_some(AUTHORIZATION);
                        return grant(identity, remove, requirement).map(Some);
                    }
                    Err(e) => {
                        first_error.get_or_insert(e);
                    }
                },
            }
        }
        if requirement.api_key {
            let mut values = headers.get_all(&self.settings.api_key_header).iter();
            if let Some(value) = values.next() {
                if values.next().is_some() {
                    first_error.get_or_insert(AuthError::Malformed("more than one API key"));
                } else {
                    match live.api_keys.check(value.as_bytes()) {
                        Ok(identity) => {
                            let remove = Some(self.settings.api_key_header.clone());
                            return grant(identity, remove, requirement).map(Some);
                        }
                        Err(e) => {
                            first_error.get_or_insert(e);
                        }
                    }
                }
            }
        }
        Err(first_error.unwrap_or(
            if known == 0 && !requirement.providers.is_empty() && !requirement.api_key {
                AuthError::UnknownProvider
            } else {
                AuthError::Missing
            },
        ))
    }

    /// The whole pre-upstream step: strip forged identity headers, check the requirement,
    /// write the identity's headers. On `Err`, send the rejection and nothing upstream.
    pub async fn admit(
        &self,
        requirement: &Requirement,
        client: IpAddr,
        uri: &Uri,
        headers: &mut HeaderMap,
    ) -> Result<Option<Arc<Identity>>, AuthRejection> {
        self.strip_forged(headers);
        match self.authenticate(client, uri, headers, requirement).await {
            Ok(None) => Ok(None),
            Ok(Some(grant)) => {
                identity_headers::apply(headers, &grant.identity, grant.remove.as_ref());
                Ok(Some(grant.identity))
            }
            Err(e) => {
                metrics::counter!(crate::metrics::AUTH_FAILURES, "reason" => e.reason())
                    .increment(1);
                if e.spent_budget() {
                    self.failure_budget.hold_refusal().await;
                }
                Err(self.reject(e, requirement, headers))
            }
        }
    }

    /// The response for a refused request: 401 with challenges, 403 for missing scopes,
    /// or a 302 to the route's login page for a browser.
    pub fn reject(
        &self,
        error: AuthError,
        requirement: &Requirement,
        request: &HeaderMap,
    ) -> AuthRejection {
        let mut headers = HeaderMap::new();
        headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
        if let Some(retry_after_s) = error.retry_after_s() {
            headers.insert(RETRY_AFTER, HeaderValue::from(retry_after_s));
            return AuthRejection {
                status: error.status(),
                headers,
                error,
            };
        }
        if error.status() == StatusCode::UNAUTHORIZED && accepts_html(request) {
            if let Some(location) = &requirement.redirect {
                headers.insert(LOCATION, location.clone());
                return AuthRejection {
                    status: StatusCode::FOUND,
                    headers,
                    error,
                };
            }
        }
        let code = error.oauth_code();
        let description = error.to_string();
        if !requirement.providers.is_empty() {
            let mut c = format!("Bearer realm=\"{}\"", self.settings.realm);
            if let Some(code) = code {
                c.push_str(&format!(
                    ", error=\"{code}\", error_description=\"{description}\""
                ));
            }
            if matches!(error, AuthError::InsufficientScope { .. }) {
                c.push_str(&format!(", scope=\"{}\"", requirement.scopes.join(" ")));
            }
            if let Ok(v) = HeaderValue::from_str(&c) {
                headers.append(WWW_AUTHENTICATE, v);
            }
        }
        if requirement.api_key && error.status() == StatusCode::UNAUTHORIZED {
            let c = format!(
                "ApiKey realm=\"{}\", header=\"{}\"",
                self.settings.realm, self.settings.api_key_header
            );
            if let Ok(v) = HeaderValue::from_str(&c) {
                headers.append(WWW_AUTHENTICATE, v);
            }
        }
        AuthRejection {
            status: error.status(),
            headers,
            error,
        }
    }

    /// Watches `<kv-prefix>jwt/` and `<kv-prefix>apikeys/`; dropping the handles stops them.
    pub fn watch_kv(
        self: &Arc<Self>,
        client: &ConsulClient,
        options: &WatchOptions,
    ) -> Vec<WatchHandle> {
        let (jwt_folder, keys_folder) = {
            let control = self.lock();
            (
                control.kv_providers.folder().to_string(),
                control.kv_keys.folder().to_string(),
            )
        };
        let auth = self.clone();
        let providers = watch::spawn(
            KvPrefix::new(client, &jwt_folder),
            options.named(format!("kv:{jwt_folder}")),
            move |pairs: Arc<Vec<KvPair>>| auth.apply_provider_docs(&pairs),
        );
        let auth = self.clone();
        let keys = watch::spawn(
            KvPrefix::new(client, &keys_folder),
            options.named(format!("kv:{keys_folder}")),
            move |pairs: Arc<Vec<KvPair>>| auth.apply_api_key_docs(&pairs),
        );
        vec![providers, keys]
    }
}

fn grant(
    identity: Arc<Identity>,
    remove: Option<HeaderName>,
    requirement: &Requirement,
) -> Result<Grant, AuthError> {
    let missing = identity.missing_scopes(&requirement.scopes);
    if !missing.is_empty() {
        return Err(AuthError::InsufficientScope { missing });
    }
    Ok(Grant { identity, remove })
}

fn accepts_html(headers: &HeaderMap) -> bool {
    headers
        .get_all(ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("text/html"))
}

#[cfg(test)]
mod tests;
