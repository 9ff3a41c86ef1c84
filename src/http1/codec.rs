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
/// The longest chunk-size line, extensions included.
const MAX_CHUNK_LINE: usize = 4096;
/// Chunk extensions one body may carry in all, as hyper allows.
const MAX_EXTENSIONS: usize = 16 * 1024;
/// Hex digits of a chunk size: a `u64`, no more.
const MAX_SIZE_DIGITS: usize = 16;

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

/// What a connection keeps to read into, so that what it receives is handed on without a
/// copy (answer heads and bodies are slices of it) and the buffer is reused once those
/// slices are gone: no allocation per answer. For upstream connections, which are few and
/// busy; client connections, many and often idle, read through [`SCRATCH`]. It holds
/// [`AREA`] bytes, or [`READ_CHUNK`] after a read that filled it (a large answer), until
/// [`ReadArea::shrink`].
#[derive(Default)]
pub(super) struct ReadArea {
    buf: BytesMut,
    big: bool,
}

/// The size of a [`ReadArea`] for ordinary answers.
const AREA: usize = 8 * 1024;
/// Below this much room the area is reclaimed (or replaced) before a read.
const AREA_LOW: usize = 1024;

impl ReadArea {
    /// Reads what `io` has and appends it to `read`; `Ok(0)` at the end of the stream.
    pub fn poll_fill<R: AsyncRead + Unpin>(
        &mut self,
        io: &mut R,
        read: &mut Bytes,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<usize>> {
        if self.buf.capacity() < AREA_LOW {
            // Takes the buffer back when nothing cut from it is alive any more.
            self.buf.reserve(if self.big { READ_CHUNK } else { AREA });
        }
        let room = self.buf.capacity();
        let n = ready!(tokio_util::io::poll_read_buf(
            Pin::new(io),
            cx,
            &mut self.buf
        ))?;
        self.big = n == room;
        let got = self.buf.split().freeze();
        if read.is_empty() {
            *read = got;
        } else if !got.is_empty() {
            let mut joined = BytesMut::with_capacity(read.len() + got.len());
            joined.extend_from_slice(read);
            joined.extend_from_slice(&got);
            *read = joined.freeze();
        }
        Poll::Ready(Ok(n))
    }

    /// Lets go of an area grown for a large answer (an idle connection keeps [`AREA`] at
    /// most).
    pub fn shrink(&mut self) {
        if self.big || self.buf.capacity() > AREA {
            *self = ReadArea::default();
        }
    }
}

/// `given` equals `lower` (a lowercase constant) but for ASCII case: a word at a time
/// where `str::eq_ignore_ascii_case` folds each byte (it cost ~12 instructions a byte, and
/// every head is checked against a few such names). Exact for any bytes: only positions
/// where `lower` has a letter accept that letter's other case.
#[inline]
pub(super) fn eq_lower(given: &[u8], lower: &[u8]) -> bool {
    #[inline]
    fn word(b: &[u8], at: usize) -> u64 {
        let mut w = [0u8; 8];
        w.copy_from_slice(&b[at..at + 8]);
        u64::from_le_bytes(w)
    }
    #[inline]
    fn short(b: &[u8]) -> u64 {
        b.iter().rev().fold(0, |w, &c| w << 8 | u64::from(c))
    }
    /// 0x20 in each byte of `t` that is a lowercase ASCII letter.
    #[inline]
    fn letters(t: u64) -> u64 {
        const L: u64 = 0x0101_0101_0101_0101;
        const H: u64 = 0x8080_8080_8080_8080;
        let x = t & !H;
        let from_a = (x + 0x1f * L) & H;
        let past_z = (x + 0x05 * L) & H;
        ((from_a & !past_z & !(t & H)) >> 2) & (0x20 * L)
    }
    let n = lower.len();
    if given.len() != n {
        return false;
    }
    let same = |g: u64, t: u64| g | letters(t) == t;
    if n < 8 {
        return same(short(given), short(lower));
    }
    let mut at = 0;
    while at + 8 <= n {
        if !same(word(given, at), word(lower, at)) {
            return false;
        }
        at += 8;
    }
    at == n || same(word(given, n - 8), word(lower, n - 8))
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
pub(super) struct FramingFacts {
    /// `Connection: close`.
    pub close: bool,
    /// `Connection: keep-alive` (meaningful for HTTP/1.0).
    pub keep_alive: bool,
    /// `Connection` names other headers, to be removed with it.
    pub named: bool,
    /// `Transfer-Encoding` present: whether it names `chunked` alone (one field, one
    /// coding). Anything else (`gzip, chunked`, `chunked, chunked`, two fields, an empty
    /// value) is `Some(false)`: a coding the gateway does not speak.
    pub chunked: Option<bool>,
    pub length: Option<u64>,
    pub bad_length: Option<&'static str>,
}

impl FramingFacts {
    /// Whether a header name of this length may be one [`FramingFacts::note`] looks at.
    pub fn may_note(name: &str) -> bool {
        matches!(name.len(), 10 | 14 | 17)
    }

    pub fn note(&mut self, name: &str, value: &[u8]) {
        // The common single values first, without tokenizing.
        if name.len() == 14 && value.iter().all(u8::is_ascii_digit) {
            if eq_lower(name.as_bytes(), b"content-length") && (1..=19).contains(&value.len()) {
                let n = value.iter().fold(0u64, |n, d| n * 10 + u64::from(d - b'0'));
                match self.length {
                    Some(l) if l != n => {
                        self.bad_length = Some("conflicting Content-Length values")
                    }
                    _ => self.length = Some(n),
                }
                return;
            }
        } else if name.len() == 10 && eq_lower(name.as_bytes(), b"connection") {
            if eq_lower(value, b"keep-alive") {
                self.keep_alive = true;
                return;
            }
            if eq_lower(value, b"close") {
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
        if eq_lower(name.as_bytes(), b"connection") {
            for token in tokens() {
                let close = eq_lower(token, b"close");
                let keep_alive = eq_lower(token, b"keep-alive");
                self.close |= close;
                self.keep_alive |= keep_alive;
                self.named |= !close && !keep_alive;
            }
        } else if eq_lower(name.as_bytes(), b"transfer-encoding") {
            let mut codings = tokens();
            let only_chunked = codings.next().is_some_and(|c| eq_lower(c, b"chunked"))
                && codings.next().is_none()
                && !value.contains(&b',');
            self.chunked = Some(only_chunked && self.chunked.is_none());
        } else if eq_lower(name.as_bytes(), b"content-length") {
            // One decimal number per field. RFC 9110 §8.6 lets a recipient take a list of
            // equal values; hyper does not, and the gateway is never looser than it.
            let part = value.trim_ascii();
            let n = (!part.is_empty() && part.len() <= 19 && part.iter().all(u8::is_ascii_digit))
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
    Chunked(Chunked),
    /// Until the peer closes (responses only).
    Close,
    /// The connection now speaks another protocol (`101`); no body.
    Upgraded,
    Done,
}

/// Where a chunked body is, and how many bytes of chunk extensions it has carried (the
/// gateway ignores them; they are capped like hyper's, so a body cannot be endless
/// extensions around one-byte chunks).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Chunked {
    pub at: Chunk,
    pub extensions: usize,
}

impl Chunked {
    pub const START: Chunked = Chunked {
        at: Chunk::Size,
        extensions: 0,
    };
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
    #[error("the peer sent nothing for too long")]
    TimedOut,
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
                Decoding::Chunked(chunked) => {
                    if let Some(frame) = ready!(self.poll_chunked(src, cx, chunked)) {
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
        chunked: Chunked,
    ) -> Poll<Option<Result<Frame<Bytes>, DecodeError>>> {
        let read = src.buffered();
        let at = |at| Decoding::Chunked(Chunked { at, ..chunked });
        let need_more = match chunked.at {
            Chunk::Size => match parse_chunk_line(read) {
                Ok(Some(line)) if line.used > MAX_CHUNK_LINE => {
                    return Poll::Ready(Some(Err(DecodeError::Framing("chunk size line too long"))))
                }
                Ok(Some(line)) => {
                    let extensions = chunked.extensions + line.extension;
                    if extensions > MAX_EXTENSIONS {
                        return Poll::Ready(Some(Err(DecodeError::Framing(
                            "chunk extensions too long",
                        ))));
                    }
                    read.advance(line.used);
                    let next = if line.size == 0 {
                        Chunk::Trailers
                    } else {
                        Chunk::Data(line.size)
                    };
                    *self = Decoding::Chunked(Chunked {
                        at: next,
                        extensions,
                    });
                    false
                }
                Ok(None) if read.len() > MAX_CHUNK_LINE => {
                    return Poll::Ready(Some(Err(DecodeError::Framing("chunk size line too long"))))
                }
                Ok(None) => true,
                Err(why) => return Poll::Ready(Some(Err(DecodeError::Framing(why)))),
            },
            Chunk::Data(left) => {
                if read.is_empty() {
                    true
                } else {
                    let n = (read.len() as u64).min(left);
                    let data = read.split_to(n as usize);
                    *self = at(if n == left {
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
                    *self = at(Chunk::Size);
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
                    Ok(httparse::Status::Complete((used, _))) if used > MAX_TRAILERS => {
                        return Poll::Ready(Some(Err(DecodeError::TooLarge)))
                    }
                    Ok(httparse::Status::Complete((used, fields))) => {
                        if has_bare_lf(&read[..used]) {
                            return Poll::Ready(Some(Err(DecodeError::Framing(
                                "bare LF in the trailers",
                            ))));
                        }
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

/// A complete chunk-size line.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct ChunkLine {
    /// Bytes of the line, CRLF included.
    pub used: usize,
    pub size: u64,
    /// Bytes of its extensions.
    pub extension: usize,
}

/// Parses `chunk-size [ BWS ";" chunk-ext ] CRLF` (RFC 9112 §7.1) more strictly than the
/// grammar allows, so that no peer can read the line differently: 1 to 16 hex digits,
/// white space only before an extension, extensions of visible characters, space and tab
/// only (no bare CR or LF), and CRLF. `Ok(None)` when the line is not complete yet.
pub(super) fn parse_chunk_line(buf: &[u8]) -> Result<Option<ChunkLine>, &'static str> {
    let digits = buf.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    if digits > MAX_SIZE_DIGITS {
        return Err("chunk size too large");
    }
    if digits == buf.len() {
        return Ok(None);
    }
    if digits == 0 {
        return Err("bad chunk size");
    }
    let size = buf[..digits].iter().fold(0u64, |n, &d| {
        let v = (d as char).to_digit(16).unwrap_or(0) as u64;
        n << 4 | v
    });
    let mut at = digits;
    let blank = buf[at..]
        .iter()
        .take_while(|&&b| b == b' ' || b == b'\t')
        .count();
    at += blank;
    let Some(&next) = buf.get(at) else {
        return Ok(None);
    };
    let ext_start = at;
    if next == b';' {
        let ext = buf[at..]
            .iter()
            .take_while(|&&b| b == b'\t' || (b' '..=b'~').contains(&b) || b >= 0x80)
            .count();
        at += ext;
    } else if blank > 0 {
        return Err("white space in a chunk size line");
    }
    match buf.get(at) {
        None => Ok(None),
        Some(b'\r') => match buf.get(at + 1) {
            None => Ok(None),
            Some(b'\n') => Ok(Some(ChunkLine {
                used: at + 2,
                size,
                extension: at - ext_start,
            })),
            Some(_) => Err("bad chunk size line ending"),
        },
        Some(_) => Err("bad character in a chunk size line"),
    }
}

/// Whether `bytes` hold an LF not preceded by CR: heads and trailers are read with CRLF
/// line ends only, so that a peer that ends lines differently cannot disagree on them.
pub(super) fn has_bare_lf(bytes: &[u8]) -> bool {
    memchr::memchr_iter(b'\n', bytes).any(|at| at == 0 || bytes[at - 1] != b'\r')
}

/// Where a field lies in a head's bytes: name offset, name length, value offset, value
/// length (kept as offsets so the fields can be cut from the bytes once they are frozen).
pub(super) type FieldSpan = (u32, u32, u32, u32);

/// The spans of a head's fields, written in place: zeroing room for [`MAX_FIELDS`] spans
/// first cost a twentieth of a short request's parsing.
pub(super) struct FieldSpans {
    slots: [std::mem::MaybeUninit<FieldSpan>; MAX_FIELDS],
    len: usize,
}

/// Fields in one head, request or answer (hyper's limit too).
pub(super) const MAX_FIELDS: usize = 100;

impl FieldSpans {
    pub fn new() -> FieldSpans {
        FieldSpans {
            slots: [const { std::mem::MaybeUninit::uninit() }; MAX_FIELDS],
            len: 0,
        }
    }

    /// Adds a span; one past [`MAX_FIELDS`] panics (heads are parsed into as many slots).
    pub fn push(&mut self, span: FieldSpan) {
        self.slots[self.len].write(span);
        self.len += 1;
    }

    pub fn as_slice(&self) -> &[FieldSpan] {
        // SAFETY: the first `len` slots were written by `push`, and a `MaybeUninit<T>` has
        // the layout of `T`.
        unsafe { std::slice::from_raw_parts(self.slots.as_ptr().cast::<FieldSpan>(), self.len) }
    }
}

/// The span of a field httparse found in the head that starts at address `base`.
pub(super) fn field_span(field: &httparse::Header<'_>, base: usize) -> FieldSpan {
    (
        (field.name.as_ptr() as usize - base) as u32,
        field.name.len() as u32,
        (field.value.as_ptr() as usize - base) as u32,
        field.value.len() as u32,
    )
}

/// The fields of a head as a map whose values share the head's bytes, but for those whose
/// bit (by position) is set in `skip`; `room` more fields fit without growing.
#[inline]
pub(super) fn field_map(
    head: &Bytes,
    spans: &[FieldSpan],
    skip: u128,
    room: usize,
) -> Result<HeaderMap, http::header::InvalidHeaderName> {
    let mut fields = HeaderMap::with_capacity(spans.len() + room);
    for (i, &(name_at, name_len, value_at, value_len)) in spans.iter().enumerate() {
        if skip & (1 << i) != 0 {
            continue;
        }
        let name = HeaderName::from_bytes(&head[name_at as usize..(name_at + name_len) as usize])?;
        let value = head.slice(value_at as usize..(value_at + value_len) as usize);
        // SAFETY: httparse admits in a value only HTAB, SP, visible ASCII and obs-text,
        // exactly the bytes a `HeaderValue` may hold (hyper relies on the same);
        // validating them again cost ~4% of a request's instructions.
        let value = unsafe { HeaderValue::from_maybe_shared_unchecked(value) };
        fields.append(name, value);
    }
    Ok(fields)
}

/// Whether a head that httparse parsed ends every line with CRLF, checked where lines can
/// end rather than by scanning it all (a head's cost per request matters): `fields` are
/// the (name offset, name length, value offset, value length) of its fields, `head` its
/// bytes up to and including the empty line. httparse admits no LF inside a start line,
/// name or value, so a bare LF can only end a line (or an empty line before the start
/// line).
pub(super) fn head_lines_end_in_crlf(head: &[u8], fields: &[FieldSpan]) -> bool {
    let start = head
        .iter()
        .take_while(|&&b| b == b'\r' || b == b'\n')
        .count();
    if has_bare_lf(&head[..start]) || !head.ends_with(b"\r\n\r\n") {
        return false;
    }
    // The start line ends right before the first field (or the empty line).
    let first_field = fields.first().map_or(head.len() - 2, |f| f.0 as usize);
    if first_field < 2 || &head[first_field - 2..first_field] != b"\r\n" {
        return false;
    }
    fields.iter().all(|&(_, _, value_at, value_len)| {
        let end = (value_at + value_len) as usize;
        let blank = head[end..]
            .iter()
            .take_while(|&&b| b == b' ' || b == b'\t')
            .count();
        head.get(end + blank) == Some(&b'\r')
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eq_lower_agrees_with_eq_ignore_ascii_case_on_every_byte() {
        let targets: [&[u8]; 8] = [
            b"te",
            b"close",
            b"chunked",
            b"keep-alive",
            b"content-length",
            b"transfer-encoding",
            b"100-continue",
            b"x_y-z.0~|",
        ];
        for t in targets {
            assert!(eq_lower(t, t));
            assert!(eq_lower(&t.to_ascii_uppercase(), t));
            assert!(!eq_lower(&t[1..], t));
            // Every byte value at every position.
            for at in 0..t.len() {
                for b in 0..=255u8 {
                    let mut given = t.to_vec();
                    given[at] = b;
                    assert_eq!(
                        eq_lower(&given, t),
                        given.eq_ignore_ascii_case(t),
                        "{:?} vs {:?}",
                        String::from_utf8_lossy(&given),
                        String::from_utf8_lossy(t)
                    );
                }
            }
        }
    }

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
    #[test]
    fn chunk_size_lines_are_read_strictly() {
        let line = |text: &str| parse_chunk_line(text.as_bytes());
        let ok = |text: &str, size: u64| {
            let got = line(text).unwrap().unwrap();
            assert_eq!((got.used, got.size), (text.len(), size), "{text:?}");
        };
        ok("5\r\n", 5);
        ok("1F4\r\n", 0x1f4);
        ok("0\r\n", 0);
        ok("a;name=value\r\n", 10);
        ok("a ;x\r\n", 10);
        ok("ffffffffffffffff\r\n", u64::MAX);
        assert_eq!(line("5;e=1\r\n").unwrap().unwrap().extension, 4);
        for partial in ["", "5", "5\r", "5;ext", "5 ", "5 ;x\r"] {
            assert_eq!(line(partial), Ok(None), "{partial:?}");
        }
        for bad in [
            "\r\n",
            " \r\n",
            "   5\r\n",
            ";ext\r\n",
            "5 \r\n",
            "5\n",
            "5;ext\n",
            "5;a\nb\r\n",
            "5;a\rb\r\n",
            "5\r5",
            "-5\r\n",
            "+5\r\n",
            "0x5\r\n",
            "5\x00\r\n",
            "10000000000000000\r\n",
            "00000000000000005\r\n",
        ] {
            assert!(line(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn heads_are_checked_for_crlf_where_lines_end() {
        let check = |head: &str| {
            let mut slots = [httparse::EMPTY_HEADER; 16];
            let mut req = httparse::Request::new(&mut slots);
            let len = match req.parse(head.as_bytes()) {
                Ok(httparse::Status::Complete(len)) => len,
                other => panic!("{head:?}: {other:?}"),
            };
            let base = head.as_ptr() as usize;
            let fields: Vec<_> = req
                .headers
                .iter()
                .map(|h| {
                    let at = |s: &[u8]| (s.as_ptr() as usize - base) as u32;
                    (
                        at(h.name.as_bytes()),
                        h.name.len() as u32,
                        at(h.value),
                        h.value.len() as u32,
                    )
                })
                .collect();
            let fast = head_lines_end_in_crlf(&head.as_bytes()[..len], &fields);
            assert_eq!(fast, !has_bare_lf(&head.as_bytes()[..len]), "{head:?}");
            fast
        };
        assert!(check("GET / HTTP/1.1\r\nHost: a\r\nX: b  \r\n\r\n"));
        assert!(check("GET / HTTP/1.1\r\n\r\n"));
        assert!(check("\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n"));
        for bare in [
            "GET / HTTP/1.1\nHost: a\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\n\r\n",
            "GET / HTTP/1.1\r\nHost: a \nX: b\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\n\n",
            "GET / HTTP/1.1\n\n",
            "\nGET / HTTP/1.1\r\n\r\n",
        ] {
            assert!(!check(bare), "{bare:?}");
        }
    }

    #[test]
    fn bare_line_feeds_are_found() {
        assert!(!has_bare_lf(b"a\r\nb\r\n\r\n"));
        assert!(has_bare_lf(b"a\nb"));
        assert!(has_bare_lf(b"\n"));
        assert!(has_bare_lf(b"a\r\n\n"));
        assert!(!has_bare_lf(b""));
    }

    #[test]
    fn transfer_encoding_is_chunked_only_when_it_says_chunked_alone() {
        let chunked = |values: &[&str]| {
            let mut facts = FramingFacts::default();
            for v in values {
                facts.note("Transfer-Encoding", v.as_bytes());
            }
            facts.chunked
        };
        assert_eq!(chunked(&["chunked"]), Some(true));
        assert_eq!(chunked(&["Chunked"]), Some(true));
        for other in [
            &["gzip, chunked"][..],
            &["chunked, chunked"],
            &["chunked", "chunked"],
            &["identity"],
            &["chunked,"],
            &[""],
            &["gzip", "chunked"],
        ] {
            assert_eq!(chunked(other), Some(false), "{other:?}");
        }
        assert_eq!(chunked(&[]), None);
    }

    struct Bytesrc(Bytes);

    impl Source for Bytesrc {
        fn buffered(&mut self) -> &mut Bytes {
            &mut self.0
        }
        fn poll_more(&mut self, _: &mut Context<'_>) -> Poll<io::Result<usize>> {
            Poll::Ready(Ok(0))
        }
    }

    /// Decodes all of `text` as a chunked body: the data, or the first error.
    fn dechunk(text: &[u8]) -> Result<(Vec<u8>, Bytes), DecodeError> {
        let mut src = Bytesrc(Bytes::copy_from_slice(text));
        let mut state = Decoding::Chunked(Chunked::START);
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let mut data = Vec::new();
        loop {
            match state.poll_frame(&mut src, &mut cx) {
                Poll::Ready(None) => return Ok((data, src.0)),
                Poll::Ready(Some(Err(e))) => return Err(e),
                Poll::Ready(Some(Ok(frame))) => {
                    if let Some(d) = frame.data_ref() {
                        data.extend_from_slice(d);
                    }
                }
                Poll::Pending => unreachable!("the source never waits"),
            }
        }
    }

    #[test]
    fn chunked_bodies_end_exactly_where_their_last_chunk_says() {
        let (data, rest) = dechunk(b"3\r\nabc\r\n0\r\n\r\nGET / HTTP/1.1").unwrap();
        assert_eq!(data, b"abc");
        assert_eq!(&rest[..], b"GET / HTTP/1.1");
        let (data, rest) = dechunk(b"2;x=y\r\nok\r\n0\r\nx-t: 1\r\n\r\n").unwrap();
        assert_eq!((&data[..], &rest[..]), (&b"ok"[..], &b""[..]));
        for smuggled in [
            &b"\r\n\r\nGET /admin HTTP/1.1\r\n\r\n"[..],
            b"3\r\nabc\r\n\r\n0\r\n\r\n",
            b"3\r\nabcd\r\n0\r\n\r\n",
            b"3\nabc\r\n0\r\n\r\n",
            b"0\r\nx-t: 1\n\r\n",
        ] {
            assert!(
                dechunk(smuggled).is_err(),
                "{:?}",
                String::from_utf8_lossy(smuggled)
            );
        }
        let many = "1;".to_string() + &"e".repeat(1000) + "\r\nx\r\n";
        let body = many.repeat(20) + "0\r\n\r\n";
        assert!(
            matches!(dechunk(body.as_bytes()), Err(DecodeError::Framing(w)) if w.contains("extensions")),
            "extensions are capped over the whole body"
        );
    }
}
