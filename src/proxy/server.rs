//! Client connections: HTTP/1.1 and HTTP/2 (h2c by prior knowledge, or `h2` by ALPN over
//! TLS) on one listener, a gateway-wide connection limit, a deadline for the request head
//! (slowloris), a cap on head size (431), and a graceful drain on shutdown: stop
//! accepting, let in-flight requests finish up to the drain timeout, then close.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::Request;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;

use super::handler::Conn;
use super::Gateway;
use crate::shutdown::Shutdown;
use crate::tls::Tls;

/// HTTP/2 streams per client connection.
const MAX_STREAMS: u32 = 256;

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
    let builder = Arc::new(builder(&gateway));
    let graceful = GracefulShutdown::new();
    loop {
        let permit = tokio::select! {
            p = gateway.connections.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
            _ = shutdown.wait() => break,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.wait() => break,
        };
        let _ = stream.set_nodelay(true);
        let gateway = gateway.clone();
        let builder = builder.clone();
        let watcher = graceful.watcher();
        let tls = tls.clone();
        tokio::spawn(async move {
            metrics::gauge!(crate::metrics::CONNECTIONS).increment(1.0);
            match tls {
                None => {
                    let conn = Conn { peer, tls: false };
                    serve_connection(stream, conn, gateway, &builder, watcher).await;
                }
                Some(tls) => {
                    let deadline = gateway.settings.header_read_timeout;
                    match tokio::time::timeout(deadline, tls.acceptor().accept(stream)).await {
                        Ok(Ok(stream)) => {
                            let conn = Conn { peer, tls: true };
                            serve_connection(stream, conn, gateway, &builder, watcher).await;
                        }
                        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                }
            }
            metrics::gauge!(crate::metrics::CONNECTIONS).decrement(1.0);
            drop(permit);
        });
    }
    drop(listener);
    let drain = gateway.settings.drain_timeout;
    let open = graceful.count();
    if open > 0 {
        tracing::info!(connections = open, ?drain, "draining client connections");
    }
    if tokio::time::timeout(drain, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("drain timeout reached; closing the remaining connections");
    }
}

fn builder(gateway: &Gateway) -> auto::Builder<TokioExecutor> {
    let s = &gateway.settings;
    let mut b = auto::Builder::new(TokioExecutor::new());
    b.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(s.header_read_timeout)
        .max_buf_size(s.max_header_bytes.max(8192))
        // Copy small bodies behind the head and send one buffer: a few % less CPU per
        // request than a two-part writev for typical API responses (scripts/bench.sh).
        .writev(false)
        .keep_alive(true);
    b.http2()
        .timer(TokioTimer::new())
        .max_header_list_size(s.max_header_bytes.min(u32::MAX as usize) as u32)
        .max_concurrent_streams(MAX_STREAMS)
        .keep_alive_interval(Some(s.idle_timeout.max(Duration::from_secs(1))))
        .keep_alive_timeout(s.idle_timeout.max(Duration::from_secs(1)));
    b
}

async fn serve_connection<I>(
    io: I,
    conn: Conn,
    gateway: Arc<Gateway>,
    builder: &auto::Builder<TokioExecutor>,
    watcher: hyper_util::server::graceful::Watcher,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = service_fn(move |req: Request<Incoming>| {
        let gateway = gateway.clone();
        // Boxed: hyper keeps the request's future in a slot of its connection, which has
        // gone cold by the time a connection is used again when there are hundreds of
        // them; a fresh allocation reuses the block a request just freed, still in cache
        // (scripts/bench-cost.sh: fewer cache misses per request at 256 connections).
        Box::pin(async move { Ok::<_, Infallible>(gateway.handle(req, conn).await) })
    });
    let connection = builder
        .serve_connection_with_upgrades(TokioIo::new(io), service)
        .into_owned();
    if let Err(e) = watcher.watch(connection).await {
        trace_connection_error(conn.peer, &*e);
    }
}

fn trace_connection_error(peer: SocketAddr, e: &(dyn std::error::Error + 'static)) {
    tracing::debug!(%peer, error = %e, "client connection ended with an error");
}
