//! HTTP/1.1 pieces both of the gateway's own HTTP/1.1 ends share: the per-thread read
//! buffer, what a head says about framing and the connection (RFC 9112 §6, §9.3), and the
//! body decoder (content length, chunked with trailers, or until close).
//!
//! Reads land in one per-thread buffer first, and a connection keeps only the bytes it
//! has not consumed (usually none between messages): with hundreds of connections, the
//! memory a request touches stays in cache.

use std::cell::{Cell, RefCell};
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http_body::Frame;
use tokio::io::{AsyncRead, ReadBuf};

/// The most one read takes from a connection.
const READ_CHUNK: usize = 32 * 1024;
/// Trailer sections are bounded like heads.
const MAX_TRAILERS: usize = 64 * 1024;

thread_local! {
    /// Where every read lands first, and where heads are encoded.
    pub(super) static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch {
        read: vec![0; READ_CHUNK].into_boxed_slice(),
        head: Vec::with_capacity(1024),
    });
}

thread_local! {
    static SPARE_OUT: Cell<Vec<u8>> = const { Cell::new(Vec::new()) };
}

/// A buffer for bytes on their way out that outlives an `.await` (so not [`SCRATCH`]): the
/// thread's spare one when it is free, given back when dropped, so writing an answer
/// usually allocates nothing.
pub(super) struct OutBuf(Vec<u8>);

impl OutBuf {
    pub fn take() -> OutBuf {
        let mut buf = SPARE_OUT.with(Cell::take);
        buf.clear();
        buf.reserve(512);
        OutBuf(buf)
    }
}

impl Drop for OutBuf {
    fn drop(&mut self) {
        let buf = std::mem::take(&mut self.0);
        if buf.capacity() <= 64 * 1024 {
            let _ = SPARE_OUT.try_with(|spare| spare.set(buf));
        }
    }
}

impl std::ops::Deref for OutBuf {
    type Target = Vec<u8>;
    fn deref(&self) -> &Vec<u8> {
        &self.0
    }
}

impl std::ops::DerefMut for OutBuf {
    fn deref_mut(&mut self) -> &mut Vec<u8> {
        &mut self.0
    }
}

pub(super) struct Scratch {
    pub read: Box<[u8]>,
    pub head: Vec<u8>,
}

/// Reads what `io` has into the per-thread buffer and appends it to `read`, the bytes
/// not consumed yet; `Ok(0)` at the end of the stream.
pub(super) fn poll_fill<R: AsyncRead + Unpin>(
    io: &mut R,
    read: &mut Bytes,
    cx: &mut Context<'_>,
) -> Poll<io::Result<usize>> {
    SCRATCH.with_borrow_mut(|scratch| {
        let mut buf = ReadBuf::new(&mut scratch.read);
        ready!(Pin::new(io).poll_read(cx, &mut buf))?;
        let got = buf.filled();
        if read.is_empty() {
            *read = Bytes::copy_from_slice(got);
        } else if !got.is_empty() {
            let mut joined = BytesMut::with_capacity(read.len() + got.len());
            joined.extend_from_slice(read);
            joined.extend_from_slice(got);
            *read = joined.freeze();
        }
        Poll::Ready(Ok(got.len()))
    })
}

pub(super) fn push_hex(out: &mut Vec<u8>, n: usize) {
    let digits = (usize::BITS - n.leading_zeros()).div_ceil(4).max(1);
    for i in (0..digits).rev() {
        out.push(b"0123456789abcdef"[(n >> (i * 4)) & 0xf]);
    }
}

pub(super) fn push_header(out: &mut Vec<u8>, name: &HeaderName, value: &HeaderValue) {
    out.extend_from_slice(name.as_str().as_bytes());
    out.extend_from_slice(b": ");
    out.extend_from_slice(value.as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// Writes a decimal number without going through `fmt`.
pub(super) fn push_decimal(out: &mut Vec<u8>, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[at..]);
}

/// What a head says about its framing and its connection, gathered while its headers are
/// read (only names of the lengths below can matter).
#[derive(Debug, Default)]
pub(super) struct Facts {
    /// `Connection: close`.
    pub close: bool,
    /// `Connection: keep-alive` (meaningful for HTTP/1.0).
    pub keep_alive: bool,
    /// `Connection` names other headers, to be removed with it.
    pub named: bool,
    /// `Transfer-Encoding` present: whether its last coding is `chunked`.
    pub chunked: Option<bool>,
    pub length: Option<u64>,
    pub bad_length: Option<&'static str>,
}

impl Facts {
    /// Whether a header name of this length may be one [`Facts::note`] looks at.
    pub fn may_note(name: &str) -> bool {
        matches!(name.len(), 10 | 14 | 17)
    }

    pub fn note(&mut self, name: &str, value: &[u8]) {
        // The common single values first, without tokenizing.
        if name.len() == 14 && value.iter().all(u8::is_ascii_digit) {
            if name.eq_ignore_ascii_case("content-length") && (1..=19).contains(&value.len()) {
                let n = value.iter().fold(0u64, |n, d| n * 10 + u64::from(d - b'0'));
                match self.length {
                    Some(l) if l != n => {
                        self.bad_length = Some("conflicting Content-Length values")
                    }
                    _ => self.length = Some(n),
                }
                return;
            }
        } else if name.len() == 10 && name.eq_ignore_ascii_case("connection") {
            if value.eq_ignore_ascii_case(b"keep-alive") {
                self.keep_alive = true;
                return;
            }
            if value.eq_ignore_ascii_case(b"close") {
                self.close = true;
                return;
            }
        }
        let tokens = || {
            value
                .split(|&b| b == b',')
                .map(<[u8]>::trim_ascii)
                .filter(|t| !t.is_empty())
        };
        if name.eq_ignore_ascii_case("connection") {
            for token in tokens() {
                let close = token.eq_ignore_ascii_case(b"close");
                let keep_alive = token.eq_ignore_ascii_case(b"keep-alive");
                self.close |= close;
                self.keep_alive |= keep_alive;
                self.named |= !close && !keep_alive;
            }
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            let last = tokens().next_back().unwrap_or_default();
            self.chunked = Some(last.eq_ignore_ascii_case(b"chunked"));
        } else if name.eq_ignore_ascii_case("content-length") {
            for part in value.split(|&b| b == b',').map(<[u8]>::trim_ascii) {
                let n =
                    (!part.is_empty() && part.len() <= 19 && part.iter().all(u8::is_ascii_digit))
                        .then(|| part.iter().fold(0u64, |n, d| n * 10 + u64::from(d - b'0')));
                match (n, self.length) {
                    (None, _) => self.bad_length = Some("bad Content-Length"),
                    (Some(n), Some(l)) if n != l => {
                        self.bad_length = Some("conflicting Content-Length values")
                    }
                    (Some(n), _) => self.length = Some(n),
                }
            }
        }
    }

    /// Whether the connection may carry another message after this one.
    pub fn keeps_alive(&self, http10: bool) -> bool {
        if http10 {
            self.keep_alive && !self.close
        } else {
            !self.close
        }
    }
}

/// Where a body is in its framing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Decoding {
    Length(u64),
    Chunked(Chunk),
    /// Until the peer closes (responses only).
    Close,
    /// The connection now speaks another protocol (`101`); no body.
    Upgraded,
    Done,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Chunk {
    /// Before a chunk-size line.
    Size,
    Data(u64),
    /// The CRLF after a chunk's data.
    DataEnd,
    /// After the last chunk: trailer fields up to an empty line.
    Trailers,
}

#[derive(Debug, thiserror::Error)]
pub(super) enum DecodeError {
    #[error(transparent)]
    Io(#[from] io::Error),
    #[error("connection closed in the middle of the body")]
    Truncated,
    #[error("{0}")]
    Framing(&'static str),
    #[error("bad trailers: {0}")]
    Parse(httparse::Error),
    #[error("trailers exceed {MAX_TRAILERS} bytes")]
    TooLarge,
}

/// A connection's read side, as the decoder needs it.
pub(super) trait Source {
    /// Received and not yet consumed.
    fn buffered(&mut self) -> &mut Bytes;
    /// Reads more into [`Source::buffered`]; `Ok(0)` at the end of the stream.
    fn poll_more(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>>;
}

impl Decoding {
    /// The next frame of the body, `None` at its end (the state is then `Done`).
    pub fn poll_frame<S: Source>(
        &mut self,
        src: &mut S,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, DecodeError>>> {
        loop {
            match *self {
                Decoding::Done | Decoding::Upgraded => return Poll::Ready(None),
                Decoding::Length(left) => {
                    if src.buffered().is_empty() && ready!(src.poll_more(cx))? == 0 {
                        return Poll::Ready(Some(Err(DecodeError::Truncated)));
                    }
                    let read = src.buffered();
                    let n = (read.len() as u64).min(left);
                    let data = read.split_to(n as usize);
                    *self = if n == left {
                        Decoding::Done
                    } else {
                        Decoding::Length(left - n)
                    };
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Decoding::Close => {
                    if src.buffered().is_empty() && ready!(src.poll_more(cx))? == 0 {
                        *self = Decoding::Done;
                        return Poll::Ready(None);
                    }
                    let data = std::mem::take(src.buffered());
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Decoding::Chunked(chunk) => {
                    if let Some(frame) = ready!(self.poll_chunked(src, cx, chunk)) {
                        return Poll::Ready(Some(frame));
                    }
                }
            }
        }
    }

    /// One step of chunked decoding: a frame, or `None` when the state moved on without
    /// one (a size line, a CRLF, the end).
    fn poll_chunked<S: Source>(
        &mut self,
        src: &mut S,
        cx: &mut Context<'_>,
        chunk: Chunk,
    ) -> Poll<Option<Result<Frame<Bytes>, DecodeError>>> {
        let read = src.buffered();
        let need_more = match chunk {
            Chunk::Size => match httparse::parse_chunk_size(read) {
                Ok(httparse::Status::Complete((used, size))) => {
                    read.advance(used);
                    *self = Decoding::Chunked(if size == 0 {
                        Chunk::Trailers
                    } else {
                        Chunk::Data(size)
                    });
                    false
                }
                Ok(httparse::Status::Partial) if read.len() > 4096 => {
                    return Poll::Ready(Some(Err(DecodeError::Framing("chunk size line too long"))))
                }
                Ok(httparse::Status::Partial) => true,
                Err(_) => return Poll::Ready(Some(Err(DecodeError::Framing("bad chunk size")))),
            },
            Chunk::Data(left) => {
                if read.is_empty() {
                    true
                } else {
                    let n = (read.len() as u64).min(left);
                    let data = read.split_to(n as usize);
                    *self = Decoding::Chunked(if n == left {
                        Chunk::DataEnd
                    } else {
                        Chunk::Data(left - n)
                    });
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
            }
            Chunk::DataEnd => {
                if read.len() < 2 {
                    true
                } else if &read[..2] == b"\r\n" {
                    read.advance(2);
                    *self = Decoding::Chunked(Chunk::Size);
                    false
                } else {
                    return Poll::Ready(Some(Err(DecodeError::Framing("chunk not ended by CRLF"))));
                }
            }
            Chunk::Trailers => {
                if read.starts_with(b"\r\n") {
                    read.advance(2);
                    *self = Decoding::Done;
                    return Poll::Ready(None);
                }
                let mut slots = [httparse::EMPTY_HEADER; 32];
                match httparse::parse_headers(read, &mut slots) {
                    Ok(httparse::Status::Complete((used, fields))) => {
                        let mut trailers = HeaderMap::new();
                        for f in fields {
                            if let (Ok(name), Ok(value)) = (
                                HeaderName::from_bytes(f.name.as_bytes()),
                                HeaderValue::from_bytes(f.value),
                            ) {
                                trailers.append(name, value);
                            }
                        }
                        read.advance(used);
                        *self = Decoding::Done;
                        return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
                    }
                    Ok(httparse::Status::Partial) if read.len() > MAX_TRAILERS => {
                        return Poll::Ready(Some(Err(DecodeError::TooLarge)))
                    }
                    Ok(httparse::Status::Partial) => true,
                    Err(e) => return Poll::Ready(Some(Err(DecodeError::Parse(e)))),
                }
            }
        };
        if need_more && ready!(src.poll_more(cx))? == 0 {
            return Poll::Ready(Some(Err(DecodeError::Truncated)));
        }
        Poll::Ready(None)
    }

    pub fn is_end(&self) -> bool {
        matches!(self, Decoding::Done | Decoding::Upgraded)
    }

    pub fn size_hint(&self) -> http_body::SizeHint {
        match self {
            Decoding::Length(n) => http_body::SizeHint::with_exact(*n),
            Decoding::Done | Decoding::Upgraded => http_body::SizeHint::with_exact(0),
            _ => http_body::SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimals_and_hex_are_written_without_fmt() {
        let mut out = Vec::new();
        for n in [0u64, 7, 10, 4096, u64::MAX] {
            out.clear();
            push_decimal(&mut out, n);
            assert_eq!(out, n.to_string().as_bytes());
        }
        out.clear();
        push_hex(&mut out, 0x1f4);
        assert_eq!(out, b"1f4");
    }
}
