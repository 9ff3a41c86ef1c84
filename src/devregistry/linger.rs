//! A lingering close (as nginx's `lingering_close`): when the registry closes a connection
//! it sends its FIN, then reads and discards what the client is still sending until the
//! client closes too, for a bounded time and amount. Closing a socket with unread bytes
//! makes the kernel send a reset, and a reset can destroy an answer the client has not read
//! yet (a 413 for a body still on its way). An aborted connection (stop) closes at once.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;

/// How long a closing connection keeps reading.
const LINGER_TIME: Duration = Duration::from_secs(10);
/// How much it reads before it gives up and closes anyway.
const LINGER_MAX: u64 = 64 * 1024 * 1024;

/// A stream whose graceful shutdown lingers.
pub struct LingeringStream<S> {
    inner: S,
    closing: Option<Closing>,
}

struct Closing {
    write_shut: bool,
    read: u64,
    deadline: Pin<Box<Sleep>>,
}

impl<S> LingeringStream<S> {
    pub fn new(inner: S) -> LingeringStream<S> {
        LingeringStream {
            inner,
            closing: None,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for LingeringStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for LingeringStream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    /// Sends the FIN, then reads until the peer's EOF, an error, [`LINGER_MAX`] bytes or
    /// [`LINGER_TIME`], whichever comes first; the socket is closed when the stream drops.
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let closing = this.closing.get_or_insert_with(|| Closing {
            write_shut: false,
            read: 0,
            deadline: Box::pin(tokio::time::sleep(LINGER_TIME)),
        });
        if !closing.write_shut {
            ready!(Pin::new(&mut this.inner).poll_shutdown(cx))?;
            closing.write_shut = true;
        }
        let mut scratch = [0u8; 16 * 1024];
        loop {
            if closing.read > LINGER_MAX || closing.deadline.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Ok(()));
            }
            let mut buf = ReadBuf::new(&mut scratch);
            match Pin::new(&mut this.inner).poll_read(cx, &mut buf) {
                Poll::Ready(Ok(())) if buf.filled().is_empty() => return Poll::Ready(Ok(())),
                Poll::Ready(Ok(())) => closing.read += buf.filled().len() as u64,
                // The peer reset or went away: nothing left to protect.
                Poll::Ready(Err(_)) => return Poll::Ready(Ok(())),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}
