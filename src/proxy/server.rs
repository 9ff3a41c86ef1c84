//! Client connections: HTTP/1.1 and HTTP/2 (h2c by prior knowledge, or `h2` by ALPN over
//! TLS) on one listener, a gateway-wide connection limit, a deadline for the request head
//! (slowloris), a cap on head size (431), a close of idle HTTP/2 connections, and a
//! graceful drain on shutdown: stop accepting, let in-flight requests finish up to the
//! drain timeout, then close.
//! HTTP/1.1 is the gateway's own ([`crate::http1::server`], with the gateway as its
//! [`Service`](crate::http1::server::Service)); HTTP/2 is hyper's.

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use hyper::body::Incoming;
use hyper::server::conn::http2;
use hyper::service::service_fn;
use hyper::Request;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use super::body::RequestBody;
use super::body::{ClientBody, ResponseError};
use super::error::{ErrorFormat, ProxyError};
use super::handler::ClientConn;
use super::headers::{self, AnswerStamp};
use super::Gateway;
use crate::http1::fields::NameLengths;
use crate::http1::io::{ClientRead, ClientWrite, Rewind};
use crate::http1::server::{self as h1, ReceivedBody, Refusal, Reply};
use crate::shutdown::Shutdown;
use crate::tls::Tls;

/// HTTP/2 streams per client connection.
const MAX_STREAMS: u32 = 256;

/// What every HTTP/2 connection starts with (RFC 9113 §3.4).
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Serves plain HTTP (HTTP/1.1 and h2c) until shutdown, then drains.
pub async fn serve(listener: TcpListener, gateway: Arc<Gateway>, shutdown: Shutdown) {
    accept_loop(listener, gateway, None, shutdown).await
}

/// Serves HTTPS until shutdown, then drains. Certificates come from `tls`, which may be
/// reloaded at any time: each handshake uses the current ones.
pub async fn serve_tls(
    listener: TcpListener,
    gateway: Arc<Gateway>,
    tls: Arc<Tls>,
    shutdown: Shutdown,
) {
    accept_loop(listener, gateway, Some(tls), shutdown).await
}

async fn accept_loop(
    listener: TcpListener,
    gateway: Arc<Gateway>,
    tls: Option<Arc<Tls>>,
    shutdown: Shutdown,
) {
    let h2 = Arc::new(http2_builder(&gateway));
    // Every connection holds a receiver: `true` asks it to finish, and the drain is over
    // when all of them are gone.
    let (draining, _) = watch::channel(false);
    let name = if tls.is_some() { "https" } else { "proxy" };
    loop {
        let permit = tokio::select! {
            p = gateway.connections.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
            _ = shutdown.wait() => break,
        };
        let Some((stream, peer)) = shutdown.accept(&listener, name).await else {
            break;
        };
        let _ = stream.set_nodelay(true);
        let gateway = gateway.clone();
        let h2 = h2.clone();
        let finish = draining.subscribe();
        let tls = tls.clone();
        tokio::spawn(async move {
            metrics::gauge!(crate::metrics::CONNECTIONS).increment(1.0);
            let conn = ClientConn::new(peer, tls.is_some());
            match tls {
                None => serve_plain(stream, conn, gateway, &h2, finish).await,
                Some(tls) => serve_tls_stream(stream, &tls, conn, gateway, &h2, finish).await,
            }
            metrics::gauge!(crate::metrics::CONNECTIONS).decrement(1.0);
            drop(permit);
        });
    }
    drop(listener);
    let drain = gateway.settings.drain_timeout;
    let _ = draining.send(true);
    let open = draining.receiver_count();
    if open > 0 {
        tracing::info!(connections = open, ?drain, "draining client connections");
    }
    if tokio::time::timeout(drain, draining.closed())
        .await
        .is_err()
    {
        tracing::warn!("drain timeout reached; closing the remaining connections");
    }
}

/// No keep-alive pings: hyper's look at the clock and a lock on every frame, and an idle
/// connection is closed by [`serve_http2`] instead (as nginx and Envoy do).
fn http2_builder(gateway: &Gateway) -> http2::Builder<TokioExecutor> {
    let s = &gateway.settings;
    let mut b = http2::Builder::new(TokioExecutor::new());
    b.timer(TokioTimer::new())
        .max_header_list_size(s.max_header_bytes.min(u32::MAX as usize) as u32)
        .max_concurrent_streams(MAX_STREAMS);
    b
}

/// Plain TCP: HTTP/2 by prior knowledge when the client opens with the HTTP/2 preface,
/// else HTTP/1.1.
async fn serve_plain(
    mut stream: TcpStream,
    conn: ClientConn,
    gateway: Arc<Gateway>,
    h2: &http2::Builder<TokioExecutor>,
    mut finish: watch::Receiver<bool>,
) {
    let deadline = gateway.settings.header_read_timeout;
    let first = tokio::select! {
        first = tokio::time::timeout(deadline, read_opening(&mut stream)) => match first {
            Ok(Ok(first)) => first,
            _ => return,
        },
        _ = finish.changed() => return,
    };
    if first.starts_with(PREFACE) {
        let io = Rewind::new(first, stream);
        serve_http2(io, conn, gateway, h2, finish).await;
        return;
    }
    let (read, write) = stream.into_split();
    let (read, write) = (ClientRead::Tcp(read), ClientWrite::Tcp(write));
    let settings = gateway.settings.http1();
    h1::serve(
        read,
        write,
        first,
        Http1Service { gateway, conn },
        settings,
        finish,
    )
    .await;
}

/// The first bytes of a connection: enough to tell the HTTP/2 preface from an HTTP/1.1
/// request line. Empty when the client closed without sending anything.
async fn read_opening(stream: &mut TcpStream) -> io::Result<Bytes> {
    let mut buf = BytesMut::with_capacity(4096);
    loop {
        if stream.read_buf(&mut buf).await? == 0 {
            return Ok(buf.freeze());
        }
        let n = buf.len().min(PREFACE.len());
        if buf[..n] != PREFACE[..n] || buf.len() >= PREFACE.len() {
            return Ok(buf.freeze());
        }
    }
}

async fn serve_tls_stream(
    stream: TcpStream,
    tls: &Tls,
    conn: ClientConn,
    gateway: Arc<Gateway>,
    h2: &http2::Builder<TokioExecutor>,
    finish: watch::Receiver<bool>,
) {
    let peer = conn.peer;
    let deadline = gateway.settings.header_read_timeout;
    let stream = match tokio::time::timeout(deadline, tls.acceptor().accept(stream)).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => {
            tracing::debug!(%peer, error = %e, "TLS handshake failed");
            return;
        }
        Err(_) => {
            tracing::debug!(%peer, "TLS handshake timed out");
            return;
        }
    };
    if stream.get_ref().1.alpn_protocol() == Some(b"h2") {
        serve_http2(stream, conn, gateway, h2, finish).await;
        return;
    }
    let (read, write) = tokio::io::split(stream);
    let (read, write) = (ClientRead::Tls(read), ClientWrite::Tls(write));
    let settings = gateway.settings.http1();
    let service = Http1Service { gateway, conn };
    h1::serve(read, write, Bytes::new(), service, settings, finish).await;
}

/// Serves HTTP/2 until the client goes, the gateway drains, or the connection has been idle
/// (no stream open, no byte either way) for `idle_timeout`: then a graceful close (GOAWAY).
/// Idle is judged by looking at the connection's activity once per `idle_timeout`, so an
/// idle connection closes between one and two timeouts after its last byte.
async fn serve_http2<I>(
    io: I,
    conn: ClientConn,
    gateway: Arc<Gateway>,
    builder: &http2::Builder<TokioExecutor>,
    mut finish: watch::Receiver<bool>,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let peer = conn.peer;
    let idle = gateway.settings.idle_timeout.max(Duration::from_secs(1));
    let activity = Arc::new(H2Activity::default());
    let io = ActivityIo {
        inner: io,
        activity: activity.clone(),
    };
    let streams = activity.clone();
    let service = service_fn(move |req: Request<Incoming>| {
        let gateway = gateway.clone();
        let conn = conn.clone();
        let open = OpenStream::new(streams.clone());
        let (parts, body) = req.into_parts();
        Box::pin(async move {
            let answer = gateway
                .handle(parts, NameLengths::UNKNOWN, RequestBody::H2(body), &conn)
                .await;
            Ok::<_, Infallible>(
                answer
                    .into_response()
                    .map(|body| H2AnswerBody { body, _open: open }),
            )
        })
    });
    let mut connection = pin!(builder.serve_connection(TokioIo::new(io), service));
    let mut seen = activity.io_events();
    let mut check = pin!(tokio::time::sleep(idle));
    let result = loop {
        tokio::select! {
            result = connection.as_mut() => break result,
            _ = finish.changed() => {
                connection.as_mut().graceful_shutdown();
                break connection.await;
            }
            _ = check.as_mut() => {
                let now = activity.io_events();
                if now == seen && activity.open_streams() == 0 {
                    tracing::debug!(%peer, "closing an idle HTTP/2 connection");
                    connection.as_mut().graceful_shutdown();
                    break connection.await;
                }
                seen = now;
                check.as_mut().reset(tokio::time::Instant::now() + idle);
            }
        }
    };
    if let Err(e) = result {
        trace_connection_error(peer, &e);
    }
}

/// What an HTTP/2 connection has done lately: how many reads and writes moved bytes (a
/// count, compared between two looks) and how many streams are open.
#[derive(Default)]
struct H2Activity {
    io_events: AtomicU64,
    open_streams: AtomicUsize,
}

impl H2Activity {
    fn io_events(&self) -> u64 {
        self.io_events.load(Ordering::Relaxed)
    }

    fn open_streams(&self) -> usize {
        self.open_streams.load(Ordering::Relaxed)
    }

    /// Only the connection's task reads and writes its socket: no read-modify-write needed.
    fn moved(&self) {
        self.io_events.store(
            self.io_events.load(Ordering::Relaxed).wrapping_add(1),
            Ordering::Relaxed,
        );
    }
}

/// One stream, from its request until its answer's body is sent or dropped.
struct OpenStream(Arc<H2Activity>);

impl OpenStream {
    fn new(activity: Arc<H2Activity>) -> OpenStream {
        activity.open_streams.fetch_add(1, Ordering::Relaxed);
        OpenStream(activity)
    }
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.0.open_streams.fetch_sub(1, Ordering::Relaxed);
    }
}

/// An answer's body on HTTP/2: the gateway's, holding its stream open until it is done.
struct H2AnswerBody {
    body: ClientBody,
    _open: OpenStream,
}

impl hyper::body::Body for H2AnswerBody {
    type Data = Bytes;
    type Error = ResponseError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Bytes>, ResponseError>>> {
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

/// The client connection's transport, counting the reads and writes that move bytes.
struct ActivityIo<I> {
    inner: I,
    activity: Arc<H2Activity>,
}

impl<I: AsyncRead + Unpin> AsyncRead for ActivityIo<I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        if buf.filled().len() != before {
            this.activity.moved();
        }
        polled
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for ActivityIo<I> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_write(cx, data);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            this.activity.moved();
        }
        polled
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_write_vectored(cx, data);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            this.activity.moved();
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// The gateway as the HTTP/1.1 server's service, for one client connection.
struct Http1Service {
    gateway: Arc<Gateway>,
    conn: ClientConn,
}

impl h1::Service for Http1Service {
    type Body = ClientBody;
    type BodyError = ResponseError;
    type Fields = AnswerStamp;

    async fn call(
        &self,
        request: http::request::Parts,
        names: NameLengths,
        body: Option<ReceivedBody>,
    ) -> Reply<ClientBody, AnswerStamp> {
        let body = body.map_or(RequestBody::Empty, RequestBody::H1);
        let answer = self.gateway.handle(request, names, body, &self.conn).await;
        Reply {
            response: answer.response,
            fields: AnswerStamp(answer.request_id),
            close: answer.close,
        }
    }

    fn refused(&self, refusal: Refusal) -> Reply<ClientBody, AnswerStamp> {
        let request_id = headers::new_request_id();
        Reply {
            response: ProxyError::Refused(refusal).to_response(&request_id, ErrorFormat::Json),
            fields: AnswerStamp(request_id),
            close: true,
        }
    }
}

fn trace_connection_error(peer: SocketAddr, e: &(dyn std::error::Error + 'static)) {
    tracing::debug!(%peer, error = %e, "client connection ended with an error");
}
