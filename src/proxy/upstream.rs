//! Connections to upstream instances. HTTP/1.1 goes through the gateway's own keep-alive
//! pool ([`super::pool`]); HTTP/2 through hyper-util's client, one per way of connecting
//! (connect timeout, TLS identity), which multiplexes requests over one connection per
//! instance. The connector dials with the route's connect timeout and, for
//! `upstream_tls` routes, runs the TLS handshake with the gateway's client certificate.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwap;
use http::uri::Authority;
use http::{Request, Response, Uri, Version};
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};

use tokio::net::TcpStream;

use super::body::{ClientBody, UpstreamBody};
use super::headers::Forwarded;
use crate::discovery::Endpoint;
use crate::http1::client::RequestHead;
use crate::http1::io::UpstreamStream;
use crate::http1::pool::{Http1Pool, PoolKey, SendError};
use crate::upstream_tls::UpstreamTls;

/// Why an exchange with an instance failed.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// Over HTTP/1.1 (the gateway's own client).
    #[error(transparent)]
    Http1(#[from] SendError),
    /// Over HTTP/2 (hyper-util's client).
    #[error(transparent)]
    Http2(#[from] hyper_util::client::legacy::Error),
    /// The request could not be addressed to the instance; nothing was sent.
    #[error("cannot address the instance: {0}")]
    Address(#[from] http::Error),
}

impl UpstreamError {
    /// Whether the failure happened before anything reached the instance.
    pub fn is_connect(&self) -> bool {
        match self {
            UpstreamError::Http1(e) => e.is_connect(),
            UpstreamError::Http2(e) => e.is_connect(),
            UpstreamError::Address(_) => false,
        }
    }
}

/// Why a connection could not be made; always safe to retry elsewhere (nothing was sent).
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("upstream URI has no host")]
    NoHost,
    #[error("connect timed out after {0:?}")]
    Timeout(Duration),
    #[error("connect: {0}")]
    Io(#[from] io::Error),
    #[error("route wants upstream TLS but the gateway has no [upstream_tls] section")]
    NoTlsConfig,
    #[error("upstream TLS: {0}")]
    Tls(String),
}

/// How a route connects; routes that agree share a client and its pools.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ClientKey {
    pub http2: bool,
    pub connect_ms: u64,
    /// The service whose name the upstream certificate must carry, for TLS routes.
    pub tls_service: Option<String>,
}

pub type UpstreamClient = Client<Connector, UpstreamBody>;

/// The HTTP/1.1 pool, and every HTTP/2 client the gateway has built, by [`ClientKey`].
/// Reads are lock-free; the first HTTP/2 request of a new kind builds its client under a
/// mutex.
pub struct Clients {
    h1: Arc<Http1Pool>,
    live: ArcSwap<HashMap<ClientKey, UpstreamClient>>,
    build: Mutex<()>,
    tls: Option<Arc<UpstreamTls>>,
    max_idle_per_host: usize,
    idle_timeout: Duration,
}

impl Clients {
    pub fn new(
        tls: Option<UpstreamTls>,
        max_idle_per_host: usize,
        idle_timeout: Duration,
    ) -> Clients {
        Clients {
            h1: Http1Pool::new(max_idle_per_host, idle_timeout),
            live: ArcSwap::default(),
            build: Mutex::new(()),
            tls: tls.map(Arc::new),
            max_idle_per_host,
            idle_timeout,
        }
    }

    /// Sends a request (origin-form URI, `Host` set) with the gateway's forwarding
    /// headers to the instance `endpoint`. An HTTP/1.1 connection goes back to its
    /// pool with the response body's end. Over HTTP/1.1, `body` is left in place when no
    /// connection could be made.
    pub async fn send(
        &self,
        key: &ClientKey,
        endpoint: &Endpoint,
        head: RequestHead<'_>,
        forwarded: &Forwarded<'_>,
        body: &mut Option<UpstreamBody>,
    ) -> Result<Response<ClientBody>, UpstreamError> {
        let authority = &endpoint.authority;
        if key.http2 {
            let mut uri = Uri::builder().scheme("http").authority(authority.clone());
            if let Some(pq) = head.uri.path_and_query() {
                uri = uri.path_and_query(pq.clone());
            }
            let mut req = Request::new(body.take().unwrap_or(UpstreamBody::Empty));
            *req.method_mut() = head.method.clone();
            *req.uri_mut() = uri.build()?;
            *req.version_mut() = Version::HTTP_2;
            *req.headers_mut() = head.headers.clone();
            forwarded.insert_into(req.headers_mut());
            let response = Box::pin(self.get(key).request(req)).await?;
            return Ok(response.map(ClientBody::h2));
        }
        let head = RequestHead {
            extra: Some(forwarded),
            ..head
        };
        let dial = || {
            let connector = self.connector(key);
            let authority = authority.clone();
            async move {
                let stream = connector.dial(&authority).await?;
                metrics::counter!(crate::metrics::UPSTREAM_CONNECTS).increment(1);
                Ok::<_, ConnectError>(stream)
            }
        };
        let slot = endpoint.connections.get_or_init(|| {
            self.h1.slot(PoolKey {
                authority: authority.clone(),
                tls_service: key.tls_service.clone(),
            })
        });
        let response = if slot.key().tls_service == key.tls_service {
            self.h1.send_to(slot, dial, head, body).await?
        } else {
            // An instance that routes reach both with and without TLS (rare): the other
            // way is looked up by key.
            let pool_key = PoolKey {
                authority: authority.clone(),
                tls_service: key.tls_service.clone(),
            };
            self.h1.send(pool_key, dial, head, body).await?
        };
        Ok(response.map(ClientBody::h1))
    }

    fn get(&self, key: &ClientKey) -> UpstreamClient {
        if let Some(c) = self.live.load().get(key) {
            return c.clone();
        }
        let _guard = self.build.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = self.live.load().get(key) {
            return c.clone();
        }
        let client = self.build(key);
        let mut next = HashMap::clone(&self.live.load());
        next.insert(key.clone(), client.clone());
        self.live.store(Arc::new(next));
        client
    }

    fn connector(&self, key: &ClientKey) -> Connector {
        Connector {
            connect_timeout: Duration::from_millis(key.connect_ms),
            tls: key
                .tls_service
                .as_ref()
                .map(|service| (self.tls.clone(), service.clone())),
            http2: key.http2,
        }
    }

    fn build(&self, key: &ClientKey) -> UpstreamClient {
        let connector = self.connector(key);
        let mut builder = Client::builder(TokioExecutor::new());
        builder
            .timer(TokioTimer::new())
            .pool_timer(TokioTimer::new())
            .pool_max_idle_per_host(self.max_idle_per_host)
            .pool_idle_timeout(self.idle_timeout)
            .retry_canceled_requests(true)
            .set_host(false);
        builder.http2_only(true);
        builder.build(connector)
    }
}

/// Dials an instance: TCP with a timeout, `TCP_NODELAY`, then TLS when asked.
#[derive(Clone)]
pub struct Connector {
    connect_timeout: Duration,
    /// `(config, service)` for TLS routes; the config is `None` when the gateway has no
    /// `[upstream_tls]` (every connect then fails with a clear error).
    tls: Option<(Option<Arc<UpstreamTls>>, String)>,
    http2: bool,
}

impl tower_service::Service<Uri> for Connector {
    type Response = TokioIo<UpstreamStream>;
    type Error = ConnectError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, ConnectError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), ConnectError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let authority = uri.authority().ok_or(ConnectError::NoHost)?;
            this.dial(authority).await.map(TokioIo::new)
        })
    }
}

impl Connector {
    /// Plain TCP with a connect timeout.
    pub fn plain(connect_timeout: Duration) -> Connector {
        Connector {
            connect_timeout,
            tls: None,
            http2: false,
        }
    }

    pub async fn dial(&self, authority: &Authority) -> Result<UpstreamStream, ConnectError> {
        let host = authority.host();
        let port = authority.port_u16().unwrap_or(80);
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        let tcp = tokio::time::timeout(self.connect_timeout, TcpStream::connect((bare, port)))
            .await
            .map_err(|_| ConnectError::Timeout(self.connect_timeout))??;
        let _ = tcp.set_nodelay(true);
        let Some((config, service)) = &self.tls else {
            return Ok(UpstreamStream::Plain(tcp));
        };
        let config = config.as_ref().ok_or(ConnectError::NoTlsConfig)?;
        let name = config
            .server_name(service, bare)
            .map_err(|e| ConnectError::Tls(e.to_string()))?;
        let tls = tokio::time::timeout(self.connect_timeout, config.connect(tcp, name, self.http2))
            .await
            .map_err(|_| ConnectError::Timeout(self.connect_timeout))?
            .map_err(|e| ConnectError::Tls(e.to_string()))?;
        Ok(UpstreamStream::Tls(Box::new(tls)))
    }
}

impl Connection for UpstreamStream {
    fn connected(&self) -> Connected {
        match self {
            UpstreamStream::Plain(_) => Connected::new(),
            UpstreamStream::Tls(tls) => {
                if tls.get_ref().1.alpn_protocol() == Some(b"h2") {
                    Connected::new().negotiated_h2()
                } else {
                    Connected::new()
                }
            }
        }
    }
}
