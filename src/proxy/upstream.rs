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
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use super::body::{ClientBody, UpstreamBody};
use super::h1::RequestHead;
use super::pool::{Http1Pool, PoolKey, SendError};
use crate::upstream_tls::UpstreamTls;

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

    /// Sends a request (origin-form URI, `Host` set) to the instance at `authority`. An
    /// HTTP/1.1 connection goes back to its pool with the response body's end.
    pub async fn send(
        &self,
        key: &ClientKey,
        authority: &Authority,
        head: RequestHead<'_>,
        body: UpstreamBody,
    ) -> Result<Response<ClientBody>, SendError> {
        if key.http2 {
            let mut uri = Uri::builder().scheme("http").authority(authority.clone());
            if let Some(pq) = head.uri.path_and_query() {
                uri = uri.path_and_query(pq.clone());
            }
            let mut req = Request::new(body);
            *req.method_mut() = head.method.clone();
            *req.uri_mut() = uri.build()?;
            *req.version_mut() = Version::HTTP_2;
            *req.headers_mut() = head.headers.clone();
            if let Some(forwarded) = head.forwarded {
                forwarded.insert_into(req.headers_mut());
            }
            let response = Box::pin(self.get(key).request(req)).await?;
            return Ok(response.map(ClientBody::h2));
        }
        let pool_key = PoolKey {
            authority: authority.clone(),
            tls_service: key.tls_service.clone(),
        };
        let response = self
            .h1
            .send(pool_key, || self.connector(key), head, body)
            .await?;
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

/// A connection to an upstream, plain or TLS.
pub enum UpstreamStream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
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

impl AsyncRead for UpstreamStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamStream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            UpstreamStream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for UpstreamStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpstreamStream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            UpstreamStream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpstreamStream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            UpstreamStream::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            UpstreamStream::Plain(s) => s.is_write_vectored(),
            UpstreamStream::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamStream::Plain(s) => Pin::new(s).poll_flush(cx),
            UpstreamStream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamStream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            UpstreamStream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}
