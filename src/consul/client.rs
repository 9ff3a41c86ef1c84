//! The reqwest wrapper: one pooled client per gateway, the ACL token on every request,
//! TLS set up the way the Consul CLI does it, and read timeouts that outlast a blocking query.

use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, StatusCode};
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};

use super::{ConsulError, Index, ServiceRegistration};

/// Slack on top of `wait + wait/16` (the server's jitter) before a read counts as stalled.
const READ_SLACK: Duration = Duration::from_secs(5);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Timeout of agent calls (registration): unlike watch reads, they never block server-side.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest error body kept in an error message.
const MAX_ERROR_BODY: usize = 512;

/// What a [`ConsulClient`] needs. Built by the application from its configuration.
#[derive(Debug, Clone)]
pub struct ClientSettings {
    /// Base URL, `http(s)://host:port`, without a trailing slash.
    pub address: String,
    pub token: Option<String>,
    pub datacenter: Option<String>,
    /// Add `?stale` to reads so any server answers, also without a leader.
    pub stale: bool,
    /// The `wait` of every blocking query.
    pub wait: Duration,
    /// PEM CA bundle that the agent's certificate must chain to.
    pub ca_cert: Option<PathBuf>,
    /// PEM client certificate and key, for agents with `verify_incoming`.
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
}

impl ClientSettings {
    pub fn new(address: impl Into<String>, wait: Duration) -> ClientSettings {
        ClientSettings {
            address: address.into(),
            token: None,
            datacenter: None,
            stale: false,
            wait,
            ca_cert: None,
            client_cert: None,
            client_key: None,
        }
    }

    /// Fills TLS paths left unset from `CONSUL_CACERT`, `CONSUL_CLIENT_CERT` and
    /// `CONSUL_CLIENT_KEY`, as the Consul CLI reads them (explicit settings win).
    pub fn with_tls_env(mut self) -> ClientSettings {
        let env = |name: &str| {
            std::env::var_os(name)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        };
        if self.ca_cert.is_none() {
            self.ca_cert = env("CONSUL_CACERT");
        }
        if self.client_cert.is_none() && self.client_key.is_none() {
            self.client_cert = env("CONSUL_CLIENT_CERT");
            self.client_key = env("CONSUL_CLIENT_KEY");
        }
        self
    }
}

/// One answer to a read: the body (absent for a KV miss) and the metadata headers.
#[derive(Debug, Clone)]
pub struct QueryAnswer {
    /// `None` when a KV key or prefix does not exist (404 with an index: not an error).
    pub body: Option<Bytes>,
    /// `X-Consul-Index` as sent; the watch applies the reset rules.
    pub index: u64,
    pub known_leader: bool,
    /// Milliseconds since the answering server heard from the leader.
    pub last_contact_ms: u64,
}

/// A cheap-to-clone Consul HTTP client.
#[derive(Debug, Clone)]
pub struct ConsulClient {
    http: reqwest::Client,
    base: String,
    token: Option<HeaderValue>,
    datacenter: Option<String>,
    stale: bool,
    wait: Duration,
}

/// Characters escaped in one path segment (a service name).
const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');
/// Characters escaped in a KV key: `/` separates levels and stays.
const KV_KEY: &AsciiSet = &SEGMENT.remove(b'/');

impl ConsulClient {
    pub fn new(settings: &ClientSettings) -> Result<ConsulClient, ConsulError> {
        let base = settings.address.trim_end_matches('/').to_string();
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            return Err(ConsulError::Setup(format!(
                "address `{base}` must start with http:// or https://"
            )));
        }
        let mut builder = reqwest::Client::builder()
            .use_rustls_tls()
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_nodelay(true)
            .pool_idle_timeout(Duration::from_secs(90));
        if let Some(ca) = &settings.ca_cert {
            let pem = read(ca, "CA certificate")?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem)
                .map_err(|e| ConsulError::Setup(format!("CA certificate {}: {e}", ca.display())))?;
            if certs.is_empty() {
                return Err(ConsulError::Setup(format!(
                    "CA certificate {}: no certificate found",
                    ca.display()
                )));
            }
            builder = builder.tls_built_in_root_certs(false);
            for cert in certs {
                builder = builder.add_root_certificate(cert);
            }
        }
        match (&settings.client_cert, &settings.client_key) {
            (Some(cert), Some(key)) => {
                let mut pem = read(cert, "client certificate")?;
                pem.push(b'\n');
                pem.extend(read(key, "client key")?);
                let identity = reqwest::Identity::from_pem(&pem).map_err(|e| {
                    ConsulError::Setup(format!(
                        "client certificate {} / key {}: {e}",
                        cert.display(),
                        key.display()
                    ))
                })?;
                builder = builder.identity(identity);
            }
            (None, None) => {}
            _ => {
                return Err(ConsulError::Setup(
                    "a client certificate needs its key and the other way round".into(),
                ))
            }
        }
        let http = builder
            .build()
            .map_err(|e| ConsulError::Setup(e.to_string()))?;
        let token = match &settings.token {
            None => None,
            Some(t) => {
                let mut v = HeaderValue::from_str(t)
                    .map_err(|_| ConsulError::Setup("the token is not a valid header".into()))?;
                v.set_sensitive(true);
                Some(v)
            }
        };
        Ok(ConsulClient {
            http,
            base,
            token,
            datacenter: settings.datacenter.clone(),
            stale: settings.stale,
            wait: settings.wait,
        })
    }

    pub fn address(&self) -> &str {
        &self.base
    }

    pub fn wait(&self) -> Duration {
        self.wait
    }

    /// The longest a blocking read may take before the client gives up on it:
    /// the server may hold it for `wait + wait/16`.
    pub fn read_timeout(&self) -> Duration {
        self.wait + self.wait / 16 + READ_SLACK
    }

    /// A read of `path` (e.g. `/v1/health/service/web`) that blocks until Consul's index
    /// passes `index` or `wait` elapses; `Index::ZERO` answers at once. `query` holds extra
    /// parameters such as `("recurse", "")`. Under `/v1/kv/` a 404 is the normal answer for
    /// a missing key and comes back as `body: None` with its index.
    pub async fn blocking_get(
        &self,
        path: &str,
        query: &[(&str, &str)],
        index: Index,
    ) -> Result<QueryAnswer, ConsulError> {
        let url = format!("{}{}", self.base, path);
        let wait = format!("{}ms", self.wait.as_millis().max(1));
        let index_s = index.get().to_string();
        let mut params: Vec<(&str, &str)> = query.to_vec();
        if index != Index::ZERO {
            params.push(("index", &index_s));
            params.push(("wait", &wait));
        }
        if self.stale {
            params.push(("stale", ""));
        }
        if let Some(dc) = &self.datacenter {
            params.push(("dc", dc));
        }
        let mut req = self
            .http
            .get(&url)
            .query(&params)
            .timeout(self.read_timeout());
        if let Some(t) = &self.token {
            req = req.header("X-Consul-Token", t.clone());
        }
        let resp = req.send().await.map_err(transport)?;
        let status = resp.status();
        let headers = resp.headers().clone();
        let body = resp.bytes().await.map_err(transport)?;
        let absent = status == StatusCode::NOT_FOUND && path.starts_with("/v1/kv/");
        if !status.is_success() && !absent {
            let text = String::from_utf8_lossy(&body[..body.len().min(MAX_ERROR_BODY)])
                .trim()
                .to_string();
            return Err(ConsulError::Status {
                status: status.as_u16(),
                body: text,
            });
        }
        let index = header_u64(&headers, "x-consul-index").ok_or(ConsulError::NoIndex)?;
        Ok(QueryAnswer {
            body: if absent { None } else { Some(body) },
            index,
            known_leader: headers
                .get("x-consul-knownleader")
                .is_some_and(|v| v.as_bytes() == b"true"),
            last_contact_ms: header_u64(&headers, "x-consul-lastcontact").unwrap_or(0),
        })
    }
}

impl ConsulClient {
    /// `PUT /v1/agent/service/register`: registers (or replaces) a service on the agent.
    pub async fn agent_service_register(
        &self,
        registration: &ServiceRegistration,
    ) -> Result<(), ConsulError> {
        let body =
            serde_json::to_vec(registration).map_err(|e| ConsulError::Decode(e.to_string()))?;
        self.put("/v1/agent/service/register", Some(body)).await
    }

    /// `PUT /v1/agent/service/deregister/<id>`: removes a service and its checks.
    pub async fn agent_service_deregister(&self, id: &str) -> Result<(), ConsulError> {
        let path = format!(
            "/v1/agent/service/deregister/{}",
            utf8_percent_encode(id, SEGMENT)
        );
        self.put(&path, None).await
    }

    /// `GET /v1/agent/service/<id>`: is the service registered on the agent?
    pub async fn agent_service_exists(&self, id: &str) -> Result<bool, ConsulError> {
        let url = format!(
            "{}/v1/agent/service/{}",
            self.base,
            utf8_percent_encode(id, SEGMENT)
        );
        let mut req = self.http.get(url).timeout(WRITE_TIMEOUT);
        if let Some(t) = &self.token {
            req = req.header("X-Consul-Token", t.clone());
        }
        let resp = req.send().await.map_err(transport)?;
        match resp.status() {
            s if s.is_success() => Ok(true),
            StatusCode::NOT_FOUND => Ok(false),
            s => {
                let body = resp.bytes().await.unwrap_or_default();
                Err(ConsulError::Status {
                    status: s.as_u16(),
                    body: String::from_utf8_lossy(&body[..body.len().min(MAX_ERROR_BODY)])
                        .trim()
                        .to_string(),
                })
            }
        }
    }

    /// A write to the local agent (agent endpoints take no `dc`).
    async fn put(&self, path: &str, body: Option<Vec<u8>>) -> Result<(), ConsulError> {
        let mut req = self
            .http
            .put(format!("{}{}", self.base, path))
            .timeout(WRITE_TIMEOUT);
        if let Some(t) = &self.token {
            req = req.header("X-Consul-Token", t.clone());
        }
        if let Some(b) = body {
            req = req
                .header(http::header::CONTENT_TYPE, "application/json")
                .body(b);
        }
        let resp = req.send().await.map_err(transport)?;
        let status = resp.status();
        if status.is_success() {
            return Ok(());
        }
        let body = resp.bytes().await.unwrap_or_default();
        Err(ConsulError::Status {
            status: status.as_u16(),
            body: String::from_utf8_lossy(&body[..body.len().min(MAX_ERROR_BODY)])
                .trim()
                .to_string(),
        })
    }
}

/// `/v1/health/service/<name>` with the name escaped.
pub fn health_service_path(service: &str) -> String {
    format!(
        "/v1/health/service/{}",
        utf8_percent_encode(service, SEGMENT)
    )
}

/// `/v1/kv/<key>` with the key escaped level by level.
pub fn kv_path(key: &str) -> String {
    format!("/v1/kv/{}", utf8_percent_encode(key, KV_KEY))
}

fn header_u64(headers: &HeaderMap, name: &str) -> Option<u64> {
    headers.get(name)?.to_str().ok()?.trim().parse().ok()
}

fn transport(e: reqwest::Error) -> ConsulError {
    // reqwest's Display hides the cause ("error sending request"); keep the chain.
    let mut msg = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        source = s.source();
    }
    ConsulError::Transport(msg)
}

fn read(path: &Path, what: &str) -> Result<Vec<u8>, ConsulError> {
    std::fs::read(path).map_err(|e| ConsulError::Setup(format!("{what} {}: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_escape_what_consul_would_misread() {
        assert_eq!(health_service_path("web"), "/v1/health/service/web");
        assert_eq!(health_service_path("a b/c"), "/v1/health/service/a%20b%2Fc");
        assert_eq!(
            kv_path("switchyard/routes/a b"),
            "/v1/kv/switchyard/routes/a%20b"
        );
    }

    #[test]
    fn the_read_timeout_outlasts_the_server_jitter() {
        let c = ConsulClient::new(&ClientSettings::new(
            "http://127.0.0.1:8500",
            Duration::from_secs(160),
        ))
        .unwrap();
        assert!(c.read_timeout() >= Duration::from_secs(170));
    }

    #[test]
    fn an_address_without_scheme_is_refused() {
        let err = ConsulClient::new(&ClientSettings::new(
            "127.0.0.1:8500",
            Duration::from_secs(1),
        ))
        .unwrap_err();
        assert!(err.to_string().contains("http://"), "{err}");
    }

    #[test]
    fn a_missing_ca_file_is_named() {
        let mut s = ClientSettings::new("https://127.0.0.1:8501", Duration::from_secs(1));
        s.ca_cert = Some("/nonexistent/ca.pem".into());
        let err = ConsulClient::new(&s).unwrap_err().to_string();
        assert!(err.contains("/nonexistent/ca.pem"), "{err}");
    }
}
