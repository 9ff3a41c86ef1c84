//! The listener: accepts connections, applies connection-level faults, serves HTTP/1.1 and
//! h2c (or HTTPS, when configured) with hyper-util, closes each connection it ends with a
//! lingering close (`linger`), and on stop closes the listener and every open connection at once.

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::oneshot;
use tokio::task::{JoinHandle, JoinSet};
use tokio_rustls::TlsAcceptor;

use super::api::{self, ApiContext};
use super::linger::LingeringStream;

/// Binds with `SO_REUSEADDR` (so a restart can take the same port back at once) and a
/// backlog large enough for thousands of watchers connecting together.
pub fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(4096)
}

/// A running accept loop.
pub struct Server {
    stop: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

impl Server {
    pub fn spawn(listener: TcpListener, ctx: Arc<ApiContext>, tls: Option<TlsAcceptor>) -> Server {
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(accept_loop(listener, ctx, tls, stopped));
        Server { stop, task }
    }

    /// Closes the listener and all connections; returns once the port is free.
    pub async fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.task.await;
    }

    /// For `Drop` paths that cannot await.
    pub fn abort(&self) {
        self.task.abort();
    }
}

async fn serve<I>(io: I, ctx: Arc<ApiContext>)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let svc = service_fn(move |req| {
        let ctx = ctx.clone();
        async move { Ok::<_, Infallible>(api::handle(ctx, req).await) }
    });
    let builder = auto::Builder::new(TokioExecutor::new());
    if let Err(e) = builder.serve_connection(TokioIo::new(io), svc).await {
        tracing::debug!(error = %e, "registry connection ended with an error");
    }
}

async fn accept_loop(
    listener: TcpListener,
    ctx: Arc<ApiContext>,
    tls: Option<TlsAcceptor>,
    mut stopped: oneshot::Receiver<()>,
) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            _ = &mut stopped => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => {
                    if ctx.faults.drop_connections() {
                        drop(stream);
                        continue;
                    }
                    let _ = stream.set_nodelay(true);
                    let ctx = ctx.clone();
                    let tls = tls.clone();
                    let stream = LingeringStream::new(stream);
                    conns.spawn(async move {
                        match tls {
                            None => serve(stream, ctx).await,
                            Some(tls) => match tls.accept(stream).await {
                                Ok(stream) => serve(stream, ctx).await,
                                Err(e) => tracing::debug!(error = %e, "registry TLS handshake failed"),
                            },
                        }
                    });
                }
                Err(e) => {
                    // Typically out of file descriptors: back off instead of spinning.
                    tracing::warn!(error = %e, "registry accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
    drop(listener);
    conns.shutdown().await;
}
