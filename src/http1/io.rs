//! Connections' I/O: a client connection as the server uses it (its two halves, so a
//! request body reads while the answer is written; bytes read ahead put back in front, for
//! the h2c preface check and upgrades; the hand-over of an upgraded connection to whoever
//! splices it), and a connection to an instance, plain or TLS ([`UpstreamStream`]).

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio_rustls::server::TlsStream;

/// The read half of a client connection.
pub enum ClientRead {
    Tcp(OwnedReadHalf),
    Tls(tokio::io::ReadHalf<TlsStream<TcpStream>>),
}

/// The write half of a client connection.
pub enum ClientWrite {
    Tcp(OwnedWriteHalf),
    Tls(tokio::io::WriteHalf<TlsStream<TcpStream>>),
}

/// `AsyncRead` for an enum of streams, by delegating to the variant's stream.
macro_rules! delegate_read {
    ($ty:ident: $($variant:ident),+) => {
        impl AsyncRead for $ty {
            fn poll_read(
                self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                buf: &mut ReadBuf<'_>,
            ) -> Poll<io::Result<()>> {
                match self.get_mut() {
                    $($ty::$variant(s) => Pin::new(s).poll_read(cx, buf),)+
                }
            }
        }
    };
}

/// `AsyncWrite` for an enum of streams, by delegating to the variant's stream.
macro_rules! delegate_write {
    ($ty:ident: $($variant:ident),+) => {
        impl AsyncWrite for $ty {
            fn poll_write(
                self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                buf: &[u8],
            ) -> Poll<io::Result<usize>> {
                match self.get_mut() {
                    $($ty::$variant(s) => Pin::new(s).poll_write(cx, buf),)+
                }
            }

            fn poll_write_vectored(
                self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                bufs: &[IoSlice<'_>],
            ) -> Poll<io::Result<usize>> {
                match self.get_mut() {
                    $($ty::$variant(s) => Pin::new(s).poll_write_vectored(cx, bufs),)+
                }
            }

            fn is_write_vectored(&self) -> bool {
                match self {
                    $($ty::$variant(s) => s.is_write_vectored(),)+
                }
            }

            fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                match self.get_mut() {
                    $($ty::$variant(s) => Pin::new(s).poll_flush(cx),)+
                }
            }

            fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                match self.get_mut() {
                    $($ty::$variant(s) => Pin::new(s).poll_shutdown(cx),)+
                }
            }
        }
    };
}

delegate_read!(ClientRead: Tcp, Tls);
delegate_write!(ClientWrite: Tcp, Tls);

/// A client connection after `101 Switching Protocols`: the bytes the client sent past
/// its request head, then the socket.
pub struct Upgraded {
    read: Rewind<ClientRead>,
    write: ClientWrite,
}

/// In an upgrade request's extensions: yields the connection once the `101` is out.
/// (Extensions must be `Clone`; only one clone gets the connection.)
#[derive(Clone)]
pub struct OnUpgrade(Arc<Mutex<Option<oneshot::Receiver<Upgraded>>>>);

impl OnUpgrade {
    /// The extension, and where the connection is sent once the `101` is out.
    pub fn channel() -> (oneshot::Sender<Upgraded>, OnUpgrade) {
        let (tx, rx) = oneshot::channel();
        (tx, OnUpgrade(Arc::new(Mutex::new(Some(rx)))))
    }

    pub async fn upgraded(self) -> io::Result<Upgraded> {
        let taken = self.0.lock().ok().and_then(|mut rx| rx.take());
        let rx = taken.ok_or_else(|| io::Error::other("upgrade already taken"))?;
        rx.await
            .map_err(|_| io::Error::other("the connection was not upgraded"))
    }
}

impl Upgraded {
    pub fn new(read: Rewind<ClientRead>, write: ClientWrite) -> Upgraded {
        Upgraded { read, write }
    }
}

impl AsyncRead for Upgraded {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().read).poll_read(cx, buf)
    }
}

impl AsyncWrite for Upgraded {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().write).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().write).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().write).poll_shutdown(cx)
    }
}

/// A stream with bytes already read from it put back in front.
pub struct Rewind<T> {
    early: Bytes,
    inner: T,
}

impl<T> Rewind<T> {
    pub fn new(early: Bytes, inner: T) -> Rewind<T> {
        Rewind { early, inner }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Rewind<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.early.is_empty() {
            let n = this.early.len().min(buf.remaining());
            buf.put_slice(&this.early.split_to(n));
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Rewind<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
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

/// A connection to an upstream, plain or TLS.
pub enum UpstreamStream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

delegate_read!(UpstreamStream: Plain, Tls);
delegate_write!(UpstreamStream: Plain, Tls);

impl UpstreamStream {
    fn tcp(&self) -> &TcpStream {
        match self {
            UpstreamStream::Plain(tcp) => tcp,
            UpstreamStream::Tls(tls) => tls.get_ref().0,
        }
    }

    /// Acknowledges what has arrived now rather than after the delayed-ACK timer.
    ///
    /// An instance that writes an answer's head and body in two writes without
    /// `TCP_NODELAY` (Python's `http.server` is one) holds the body back under Nagle until
    /// the head is acknowledged, while the gateway's kernel, with nothing to send back,
    /// delays that ACK by up to 40 ms: every such answer then took 40 ms longer, through
    /// nginx as well. Linux sends the pending ACK when the option is set; elsewhere this
    /// does nothing.
    pub fn acknowledge_now(&self) {
        #[cfg(target_os = "linux")]
        {
            let _ = socket2::SockRef::from(self.tcp()).set_quickack(true);
        }
        #[cfg(not(target_os = "linux"))]
        let _ = self.tcp();
    }
}
