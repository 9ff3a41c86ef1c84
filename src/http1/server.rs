//! HTTP/1.1 from clients.
//!
//! A connection is one loop in its own task: read a head, hand the request to the
//! [`Service`], write the answer, again. Compared with a general server this drops a
//! dispatcher between the connection and the request, and a second buffered codec layer;
//! request heads become `http` types straight from the bytes received (header values are
//! slices of them), and a small answer leaves in one write with its head.
//!
//! What it keeps of a complete HTTP/1.1 server: keep-alive and pipelining, request bodies
//! by length or chunked (the read side of the connection is lent to the body while the
//! handler reads it, and comes back when the body is done), `Expect: 100-continue`
//! answered when the body is first read, `Upgrade` handed over with the bytes read past
//! the head, one deadline for a head to arrive (slowloris; it also bounds idle keep-alive
//! connections), heads over the size cap answered 431, messages that could be smuggled
//! (`Transfer-Encoding` with `Content-Length`, bare LF, codings other than chunked)
//! refused with 400 or 501 (the service renders the answer: [`Refusal`]), and on shutdown
//! the in-flight request finishes and the connection then closes.

use std::cell::RefCell;
use std::future::Future;
use std::io::{self, IoSlice};
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::header::{self, HeaderMap};
use http::{Method, Request, StatusCode, Uri, Version};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use tokio::io::AsyncWriteExt;
use tokio::sync::{oneshot, watch};
use tokio::time::Sleep;

use super::codec::{self, DecodeError, Decoding, FramingFacts, OutBuf, Source};
use super::fields::{self, ExtraFields, NameLengths};
use super::io::{ClientRead, ClientWrite, OnUpgrade, Rewind, Upgraded};

/// What the server hands requests to: the gateway.
pub trait Service: Send + Sync {
    /// Response bodies.
    type Body: Body<Data = Bytes, Error = Self::BodyError> + Send + Unpin;
    type BodyError: std::error::Error + Send + Sync + 'static;
    /// Header fields written into every answer's head.
    type Fields: ExtraFields + Send;

    /// Answers a request; `body` is `None` when the request has none.
    /// `names`: which lengths of field name the head has (a filter for absent fields).
    fn call(
        &self,
        request: http::request::Parts,
        names: NameLengths,
        body: Option<ReceivedBody>,
    ) -> impl Future<Output = Reply<Self::Body, Self::Fields>> + Send;

    /// The answer to a request the server could not read; the connection closes after it.
    fn refused(&self, refusal: Refusal) -> Reply<Self::Body, Self::Fields>;
}

/// A service's answer.
pub struct Reply<B, F> {
    pub response: http::Response<B>,
    /// Written into the head after the response's own fields.
    pub fields: F,
    /// The connection ends with this answer (the request was malformed).
    pub close: bool,
}

/// Why a request was refused before a service saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// 431: the head is over the size cap or has too many fields.
    HeadTooLarge,
    /// 400: what two servers could read differently, or not HTTP/1.1 at all.
    Malformed(&'static str),
    /// 501: a transfer coding other than `chunked` (RFC 9112 §6.1).
    UnsupportedCoding(&'static str),
}

impl Refusal {
    pub fn status(&self) -> StatusCode {
        match self {
            Refusal::HeadTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            Refusal::Malformed(_) => StatusCode::BAD_REQUEST,
            Refusal::UnsupportedCoding(_) => StatusCode::NOT_IMPLEMENTED,
        }
    }

    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::HeadTooLarge => "request head too large",
            Refusal::Malformed(why) | Refusal::UnsupportedCoding(why) => why,
        }
    }
}

/// The server's limits.
#[derive(Debug, Clone, Copy)]
pub struct ServerSettings {
    /// Time a client has to send a whole head (also how long a keep-alive connection may
    /// stay idle).
    pub header_timeout: Duration,
    /// The longest pause between bytes of a request body.
    pub body_timeout: Duration,
    /// The largest head.
    pub max_head: usize,
}

/// Why a request body could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ReceiveError {
    #[error("request body: {0}")]
    Malformed(String),
    #[error("the client sent no request body bytes for too long")]
    Idle,
}

impl From<DecodeError> for ReceiveError {
    fn from(e: DecodeError) -> ReceiveError {
        match e {
            DecodeError::TimedOut => ReceiveError::Idle,
            e => ReceiveError::Malformed(e.to_string()),
        }
    }
}

/// Headers in one request head, as in hyper.
const MAX_HEADERS: usize = codec::MAX_FIELDS;
/// Response body frames up to this size are copied next to the head or their chunk
/// framing, so they leave in one write.
const COALESCE: usize = 16 * 1024;
/// A request body the handler left unread is read and dropped up to this size, within
/// [`DRAIN_TIME`], so the connection can carry the next request; otherwise it closes.
const DRAIN_BYTES: u64 = 256 * 1024;
const DRAIN_TIME: Duration = Duration::from_secs(1);

/// How long a connection that closes with a request body unread keeps reading (and
/// dropping) what the client still sends, and how long it waits for each read: closing
/// with unread bytes would reset the connection, and the client, still sending, could lose
/// the answer before reading it. nginx's lingering close does the same (30 s and 5 s there).
const LINGER_TIME: Duration = Duration::from_secs(10);
const LINGER_IDLE: Duration = Duration::from_secs(2);

/// The bytes received from the client and not consumed yet, with the socket they came
/// from.
struct Reader {
    io: ClientRead,
    read: Bytes,
}

impl Source for Reader {
    fn buffered(&mut self) -> &mut Bytes {
        &mut self.read
    }

    fn poll_more(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        codec::poll_fill(&mut self.io, &mut self.read, cx)
    }
}

/// The read side of a connection with the framing of the request body being read.
struct ReadSide {
    reader: Reader,
    body: Decoding,
    /// The body failed mid-way: the connection's framing is lost.
    broken: bool,
}

/// A request body read from the client's connection, which goes back to the
/// connection's loop when the body is done or dropped.
pub struct ReceivedBody {
    side: Option<Box<ReadSide>>,
    back: Option<oneshot::Sender<Box<ReadSide>>>,
    /// Asks the connection's loop to send `100 Continue` (the client waits for it).
    expect: Option<oneshot::Sender<()>>,
    /// The longest the client may leave the body idle between two reads that found
    /// nothing (a slow-body client holds a connection and a request slot).
    idle_limit: Duration,
    /// Armed while a read waits for the client.
    idle: Option<Pin<Box<Sleep>>>,
}

impl ReceivedBody {
    fn give_back(&mut self) {
        if let (Some(side), Some(back)) = (self.side.take(), self.back.take()) {
            let _ = back.send(side);
        }
    }
}

impl Drop for ReceivedBody {
    fn drop(&mut self) {
        self.give_back();
    }
}

impl Body for ReceivedBody {
    type Data = Bytes;
    type Error = ReceiveError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, ReceiveError>>> {
        let this = self.get_mut();
        if let Some(expect) = this.expect.take() {
            let _ = expect.send(());
        }
        let Some(side) = this.side.as_mut() else {
            return Poll::Ready(None);
        };
        let frame = match side.body.poll_frame(&mut side.reader, cx) {
            Poll::Ready(frame) => {
                this.idle = None;
                frame
            }
            Poll::Pending => {
                let limit = this.idle_limit;
                let idle = this
                    .idle
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
                ready!(idle.as_mut().poll(cx));
                this.idle = None;
                Some(Err(DecodeError::TimedOut))
            }
        };
        let Some(side) = this.side.as_mut() else {
            return Poll::Ready(None);
        };
        match &frame {
            Some(Err(_)) => {
                side.broken = true;
                this.give_back();
            }
            _ if side.body.is_end() => this.give_back(),
            _ => {}
        }
        Poll::Ready(frame.map(|r| r.map_err(ReceiveError::from)))
    }

    fn is_end_stream(&self) -> bool {
        self.side.as_ref().is_none_or(|s| s.body.is_end())
    }

    fn size_hint(&self) -> SizeHint {
        self.side
            .as_ref()
            .map_or(SizeHint::with_exact(0), |s| s.body.size_hint())
    }
}

/// Why no request could be read.
#[derive(Debug)]
pub(super) enum HeadError {
    Io,
    Timeout,
    /// The connection closed in the middle of a head.
    Truncated,
    TooLarge,
    Bad(&'static str),
    /// A transfer coding other than chunked (RFC 9112 §6.1: 501).
    Unsupported(&'static str),
}

/// A request head as the connection's loop needs it.
pub(super) struct Head {
    pub request: http::request::Parts,
    pub names: NameLengths,
    pub facts: FramingFacts,
    pub expect_continue: bool,
}

/// Serves HTTP/1.1 on one client connection until either side closes it or `shutdown`
/// changes. `first` holds bytes already read from it.
pub async fn serve<S: Service>(
    read: ClientRead,
    write: ClientWrite,
    first: Bytes,
    service: S,
    settings: ServerSettings,
    mut shutdown: watch::Receiver<bool>,
) {
    // Between requests the signal is only looked at; while idle, the connection waits for
    // it with a future registered once, not once per request.
    let signal = shutdown.clone();
    let mut draining = Box::pin(async move {
        let _ = shutdown.changed().await;
    });
    let mut conn = Connection {
        write,
        service,
        settings,
        side: Some(Box::new(ReadSide {
            reader: Reader {
                io: read,
                read: first,
            },
            body: Decoding::Done,
            broken: false,
        })),
    };
    // One timer for the connection, moved only when it fires early: arming a timer per
    // request costs more than the check.
    let mut timer: Pin<Box<Sleep>> = Box::pin(tokio::time::sleep(settings.header_timeout));
    while !signalled(&signal) {
        let request = match conn.read_request(&mut timer, &mut draining).await {
            Ok(Some(request)) => request,
            Ok(None) => break,
            Err(e) => {
                refuse(&mut conn.write, &conn.service, e).await;
                break;
            }
        };
        let mut answered = conn.dispatch(request).await;
        let back = decide_keep_alive(&mut answered, signalled(&signal));
        // A switch needs the upgrade asked for, and the whole read side at hand.
        let may_switch = answered.upgrade.is_some() && answered.lent.is_none();
        let written = conn.write_answer(answered.reply, answered.answer_framing, may_switch);
        match written.await {
            AfterAnswer::NextRequest => {}
            AfterAnswer::Close => {
                // A request body given back unread is lingered over below.
                conn.side = conn.side.take().or(back);
                break;
            }
            AfterAnswer::Switch => {
                conn.hand_over(answered.upgrade);
                return;
            }
        }
        if !conn.take_back(answered.lent, back).await {
            break;
        }
    }
    let _ = conn.write.shutdown().await;
    if let Some(side) = conn.side.as_mut().filter(|s| !s.broken && !s.body.is_end()) {
        Box::pin(linger(&mut side.reader.io)).await;
    }
}

/// Reads and drops what the client sends until it stops, for at most [`LINGER_TIME`]
/// (the answer is out and the write side shut).
async fn linger(read: &mut ClientRead) {
    use tokio::io::AsyncReadExt;
    let until = Instant::now() + LINGER_TIME;
    let mut sink = vec![0u8; 16 * 1024];
    loop {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return;
        }
        match tokio::time::timeout(left.min(LINGER_IDLE), read.read(&mut sink)).await {
            Ok(Ok(n)) if n > 0 => {}
            _ => return,
        }
    }
}

/// One client connection between requests.
struct Connection<S> {
    write: ClientWrite,
    service: S,
    settings: ServerSettings,
    /// The read side; away only while a request body holds it.
    side: Option<Box<ReadSide>>,
}

/// A request head read off the connection, with what its body and answer depend on.
struct Incoming {
    parts: http::request::Parts,
    names: NameLengths,
    /// How its body is framed (`Done`: it has none).
    body_framing: Decoding,
    expect_continue: bool,
    /// It asks to switch to WebSocket, the one protocol a connection may switch to.
    websocket: bool,
    /// `keep_alive` as the head asks; the answer may still close.
    answer_framing: AnswerFraming,
}

/// What a connection does once an answer is out.
enum AfterAnswer {
    NextRequest,
    Close,
    /// The answer was a `101`: the connection is WebSocket's now.
    Switch,
}

/// A request the service answered, with what the connection lent it.
struct Answered<B, F> {
    reply: Reply<B, F>,
    answer_framing: AnswerFraming,
    /// The read side, lent to the request body and on its way back.
    lent: Option<oneshot::Receiver<Box<ReadSide>>>,
    /// Where the connection goes if the answer switches protocols.
    upgrade: Option<oneshot::Sender<Upgraded>>,
    /// The client asked for `100 Continue` and the service answered without it being sent.
    continue_unsent: bool,
}

impl<S: Service> Connection<S> {
    /// The next request head, and how its body is framed. `Ok(None)`: the client closed
    /// the connection between requests, or shutdown came while it was idle (or the read
    /// side is away).
    async fn read_request(
        &mut self,
        timer: &mut Pin<Box<Sleep>>,
        draining: &mut Pin<Box<impl Future<Output = ()>>>,
    ) -> Result<Option<Incoming>, HeadError> {
        let Some(home) = self.side.as_mut() else {
            return Ok(None);
        };
        let deadline = Instant::now() + self.settings.header_timeout;
        let max_head = self.settings.max_head;
        let Some(head) = read_head(&mut home.reader, timer, deadline, max_head, draining).await?
        else {
            return Ok(None);
        };
        let Head {
            request: parts,
            names,
            facts,
            expect_continue,
        } = head;
        let http10 = parts.version == Version::HTTP_10;
        let keep_alive = facts.keeps_alive(http10);
        let body_framing = request_framing(&facts, http10)?;
        // Only WebSocket may switch protocols: any other upgrade (`h2c` above all) would
        // open a raw tunnel to the instance past routing, auth and policy.
        let websocket = facts.named
            && !http10
            && parts.method == Method::GET
            && fields::wants_websocket(&parts.headers);
        Ok(Some(Incoming {
            names,
            answer_framing: AnswerFraming {
                head_request: parts.method == Method::HEAD,
                http10,
                keep_alive,
            },
            parts,
            body_framing,
            expect_continue,
            websocket,
        }))
    }

    /// Hands the request to the service, lending it the read side when it has a body, and
    /// sends `100 Continue` when the service first reads a body the client holds back.
    async fn dispatch(&mut self, request: Incoming) -> Answered<S::Body, S::Fields> {
        let Incoming {
            mut parts,
            names,
            body_framing,
            expect_continue,
            websocket,
            answer_framing,
        } = request;
        let mut upgrade = None;
        if websocket {
            let (tx, on_upgrade) = OnUpgrade::channel();
            parts.extensions.insert(on_upgrade);
            upgrade = Some(tx);
        }
        let mut lent = None;
        let mut continue_asked = None;
        let body = match self.side.as_mut() {
            Some(home) if body_framing != Decoding::Done => {
                home.body = body_framing;
                let (back, returned) = oneshot::channel();
                lent = Some(returned);
                let expect = expect_continue.then(|| {
                    let (tx, rx) = oneshot::channel();
                    continue_asked = Some(rx);
                    tx
                });
                Some(ReceivedBody {
                    side: self.side.take(),
                    back: Some(back),
                    expect,
                    idle_limit: self.settings.body_timeout,
                    idle: None,
                })
            }
            _ => None,
        };

        // Boxed, into a block another request just freed: pinned in the connection's own
        // future instead, it saves an allocation but spreads each request's state over
        // every connection's memory (at 256 connections, 3.6× the last-level cache misses).
        let mut answer = Box::pin(self.service.call(parts, names, body));
        let mut asked_done = false;
        let mut continued = false;
        let reply = match continue_asked {
            None => (&mut answer).await,
            Some(mut asked) => loop {
                tokio::select! {
                    biased;
                    reply = &mut answer => break reply,
                    wanted = &mut asked, if !asked_done => {
                        asked_done = true;
                        if wanted.is_ok() {
                            continued = true;
                            let _ = write_flushed(&mut self.write, b"HTTP/1.1 100 Continue\r\n\r\n").await;
                        }
                    }
                }
            },
        };
        Answered {
            reply,
            answer_framing,
            lent,
            upgrade,
            continue_unsent: expect_continue && !continued,
        }
    }

    /// Writes the answer; what the connection does next.
    async fn write_answer(
        &mut self,
        reply: Reply<S::Body, S::Fields>,
        framing: AnswerFraming,
        may_switch: bool,
    ) -> AfterAnswer {
        let switching = reply.response.status() == StatusCode::SWITCHING_PROTOCOLS;
        if switching && !may_switch {
            return AfterAnswer::Close;
        }
        let framing = AnswerFraming {
            keep_alive: framing.keep_alive && !switching,
            ..framing
        };
        match write_response(&mut self.write, reply, framing).await {
            Ok(_) if switching => AfterAnswer::Switch,
            Ok(true) => AfterAnswer::NextRequest,
            Ok(false) | Err(_) => AfterAnswer::Close,
        }
    }

    /// After an answer that keeps the connection: takes back the read side lent to the
    /// request body (`back` if it came already), draining what the service left unread.
    /// `false` when the connection must close instead.
    async fn take_back(
        &mut self,
        lent: Option<oneshot::Receiver<Box<ReadSide>>>,
        back: Option<Box<ReadSide>>,
    ) -> bool {
        let Some(returned) = lent else {
            return true;
        };
        let back = match back {
            Some(side) => Some(side),
            None => recover(returned, self.settings.header_timeout).await,
        };
        let Some(mut back) = back else {
            return false;
        };
        let usable = !back.broken && (back.body.is_end() || drain(&mut back).await);
        // Kept either way: a body left unread is lingered over before the close.
        self.side = Some(back);
        usable
    }

    /// After a `101`: the connection, with the bytes read past the head, goes to whoever
    /// waits for the upgrade.
    fn hand_over(self, upgrade: Option<oneshot::Sender<Upgraded>>) {
        if let (Some(tx), Some(home)) = (upgrade, self.side) {
            let read = Rewind::new(home.reader.read, home.reader.io);
            let _ = tx.send(Upgraded::new(read, self.write));
        }
    }
}

/// Whether the connection can carry another request after this answer, so the answer
/// can say so. Returns the read side when the request body already gave it back.
fn decide_keep_alive<B, F>(answered: &mut Answered<B, F>, stopping: bool) -> Option<Box<ReadSide>> {
    let keep_alive = &mut answered.answer_framing.keep_alive;
    // A malformed request; or one answered without its body being asked for: the
    // client may still be waiting to send it; or the gateway is shutting down.
    if answered.reply.close || answered.continue_unsent || stopping {
        *keep_alive = false;
    }
    // A body given back unfinished tells now whether the rest can be read and dropped.
    let side = answered.lent.as_mut()?.try_recv().ok()?;
    *keep_alive &= !side.broken && (side.body.is_end() || drainable(&side.body));
    Some(side)
}

/// Whether the drain signal has come (or its sender is gone); never waits.
fn signalled(signal: &watch::Receiver<bool>) -> bool {
    signal.has_changed().unwrap_or(true)
}

/// Waits for the next request head: `None` when the client closed the connection between
/// requests or the gateway is shutting down while it is idle.
async fn read_head(
    reader: &mut Reader,
    timer: &mut Pin<Box<Sleep>>,
    deadline: Instant,
    max_head: usize,
    draining: &mut Pin<Box<impl Future<Output = ()>>>,
) -> Result<Option<Head>, HeadError> {
    loop {
        if !reader.read.is_empty() {
            if let Some(head) = parse_head(&mut reader.read, max_head)? {
                return Ok(Some(head));
            }
        }
        let idle = reader.read.is_empty();
        tokio::select! {
            biased;
            got = std::future::poll_fn(|cx| reader.poll_more(cx)) => match got {
                Ok(0) if idle => return Ok(None),
                Ok(0) => return Err(HeadError::Truncated),
                Ok(_) => {}
                Err(_) => return Err(HeadError::Io),
            },
            _ = draining.as_mut(), if idle => return Ok(None),
            _ = timer.as_mut() => {
                if Instant::now() >= deadline {
                    return Err(HeadError::Timeout);
                }
                timer.as_mut().reset(deadline.into());
            }
        }
    }
}

/// A complete head taken off `read`, or `None` when more bytes are needed.
pub(super) fn parse_head(read: &mut Bytes, max_head: usize) -> Result<Option<Head>, HeadError> {
    let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut spans = codec::FieldSpans::new();
    let buf = &read[..];
    let base = buf.as_ptr() as usize;
    let mut parsed = httparse::Request::new(&mut []);
    let len = match httparse::ParserConfig::default().parse_request_with_uninit_headers(
        &mut parsed,
        buf,
        &mut slots,
    ) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buf.len() > max_head => return Err(HeadError::TooLarge),
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(HeadError::TooLarge),
        Err(_) => return Err(HeadError::Bad("malformed request head")),
    };
    if len > max_head {
        return Err(HeadError::TooLarge);
    }
    let method = parsed.method.unwrap_or_default();
    let method = Method::from_bytes(method.as_bytes()).map_err(|_| HeadError::Bad("bad method"))?;
    let version = match parsed.version {
        Some(0) => Version::HTTP_10,
        _ => Version::HTTP_11,
    };
    let target = parsed.path.unwrap_or_default();
    let target_at = (target.as_ptr() as usize - base, target.len());
    let mut facts = FramingFacts::default();
    let mut expect = None;
    let mut names = NameLengths::NONE;
    for h in parsed.headers.iter() {
        names.add(h.name.len());
        if FramingFacts::may_note(h.name) {
            facts.note(h.name, h.value);
        } else if codec::eq_lower(h.name.as_bytes(), b"expect") {
            expect = Some(codec::eq_lower(h.value, b"100-continue"));
        }
        spans.push(codec::field_span(h, base));
    }
    let spans = spans.as_slice();
    if !codec::head_lines_end_in_crlf(&read[..len], spans) {
        return Err(HeadError::Bad("bare LF in the request head"));
    }
    let raw = read.split_to(len);
    if read.is_empty() {
        // An empty slice still holds the buffer it was cut from; the request's header
        // values hold it only as long as the request lives.
        *read = Bytes::new();
    }
    let uri = Uri::from_maybe_shared(raw.slice(target_at.0..target_at.0 + target_at.1))
        .map_err(|_| HeadError::Bad("bad request target"))?;
    // A little room for what auth and policy may add (identity, assertion); the
    // forwarding headers are written into the upstream head, not put in the map.
    let mut headers =
        codec::field_map(&raw, spans, 0, 2).map_err(|_| HeadError::Bad("bad header name"))?;
    // The gateway answers the expectation itself; the instance gets the body at once.
    if expect.is_some() {
        headers.remove(header::EXPECT);
    }
    let mut request = Request::new(());
    *request.method_mut() = method;
    *request.uri_mut() = uri;
    *request.version_mut() = version;
    *request.headers_mut() = headers;
    let (request, ()) = request.into_parts();
    Ok(Some(Head {
        request,
        names,
        facts,
        expect_continue: expect == Some(true) && version == Version::HTTP_11,
    }))
}

/// RFC 9112 §6.3 for requests. A request that could be read two ways by two servers
/// (`Transfer-Encoding` with `Content-Length`, or a coding other than chunked last) is
/// refused rather than guessed at.
pub(super) fn request_framing(facts: &FramingFacts, http10: bool) -> Result<Decoding, HeadError> {
    if let Some(chunked) = facts.chunked {
        if facts.length.is_some() || facts.bad_length.is_some() {
            return Err(HeadError::Bad("both Transfer-Encoding and Content-Length"));
        }
        if http10 {
            return Err(HeadError::Bad("Transfer-Encoding in an HTTP/1.0 request"));
        }
        if !chunked {
            return Err(HeadError::Unsupported(
                "only Transfer-Encoding: chunked is accepted",
            ));
        }
        return Ok(Decoding::Chunked(codec::Chunked::START));
    }
    if let Some(problem) = facts.bad_length {
        return Err(HeadError::Bad(problem));
    }
    Ok(match facts.length {
        None | Some(0) => Decoding::Done,
        Some(n) => Decoding::Length(n),
    })
}

/// Answers a head that cannot be served, before closing the connection.
async fn refuse<S: Service>(write: &mut ClientWrite, service: &S, error: HeadError) {
    let refusal = match error {
        HeadError::TooLarge => Refusal::HeadTooLarge,
        HeadError::Bad(why) => Refusal::Malformed(why),
        HeadError::Unsupported(why) => Refusal::UnsupportedCoding(why),
        HeadError::Io | HeadError::Timeout | HeadError::Truncated => return,
    };
    let exchange = AnswerFraming {
        head_request: false,
        http10: false,
        keep_alive: false,
    };
    let _ = write_response(write, service.refused(refusal), exchange).await;
}

async fn write_flushed(write: &mut ClientWrite, bytes: &[u8]) -> io::Result<()> {
    write.write_all(bytes).await?;
    write.flush().await
}

/// What the response's framing depends on in the request.
struct AnswerFraming {
    head_request: bool,
    http10: bool,
    keep_alive: bool,
}

/// How a response body goes out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Out {
    /// None may be sent (HEAD, 1xx, 204, 304); the headers stay as they are.
    None,
    Length(u64),
    Chunked,
    /// Until the connection closes (an HTTP/1.0 client and a body of unknown length).
    Close,
}

/// Writes the response; `Ok(true)` when the connection can carry another request.
async fn write_response<B, F>(
    write: &mut ClientWrite,
    answer: Reply<B, F>,
    ex: AnswerFraming,
) -> io::Result<bool>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: std::error::Error + Send + Sync + 'static,
    F: ExtraFields,
{
    let (parts, mut body) = answer.response.into_parts();
    let status = parts.status;
    let code = status.as_u16();
    let no_body = ex.head_request || status.is_informational() || code == 204 || code == 304;
    let out = if no_body {
        Out::None
    } else if let Some(n) = body.size_hint().exact() {
        Out::Length(n)
    } else if let Some(n) = declared_length(&parts.headers) {
        Out::Length(n)
    } else if ex.http10 {
        Out::Close
    } else {
        Out::Chunked
    };
    let keep_alive = ex.keep_alive && out != Out::Close;

    let mut buf = OutBuf::take();
    push_status_line(&mut buf, status);
    let mut dated = false;
    for (name, value) in &parts.headers {
        if out != Out::None && (name == header::CONTENT_LENGTH || name == header::TRANSFER_ENCODING)
        {
            continue;
        }
        if answer.fields.replaces(name) {
            continue;
        }
        dated |= name == header::DATE;
        codec::push_header(&mut buf, name, value);
    }
    answer.fields.write(&mut buf);
    match out {
        Out::Length(n) => {
            buf.extend_from_slice(b"content-length: ");
            codec::push_decimal(&mut buf, n);
            buf.extend_from_slice(b"\r\n");
        }
        Out::Chunked => buf.extend_from_slice(b"transfer-encoding: chunked\r\n"),
        Out::None | Out::Close => {}
    }
    if status != StatusCode::SWITCHING_PROTOCOLS {
        if !keep_alive {
            buf.extend_from_slice(b"connection: close\r\n");
        } else if ex.http10 {
            buf.extend_from_slice(b"connection: keep-alive\r\n");
        }
    }
    if !dated {
        push_date(&mut buf);
    }
    buf.extend_from_slice(b"\r\n");
    if out == Out::None {
        write_flushed(write, &buf).await?;
        return Ok(keep_alive);
    }

    let mut left = match out {
        Out::Length(n) => n,
        _ => u64::MAX,
    };
    let mut trailers = None;
    let mut ended = false;
    // Whatever the body has ready now joins the head in one write.
    while buf.len() < COALESCE {
        let polled =
            std::future::poll_fn(|cx| Poll::Ready(Pin::new(&mut body).poll_frame(cx))).await;
        match polled {
            Poll::Pending => break,
            Poll::Ready(None) => {
                ended = true;
                break;
            }
            Poll::Ready(Some(Err(e))) => return Err(io::Error::other(e)),
            Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                Ok(data) => {
                    if data.len() > COALESCE {
                        write.write_all(&buf).await?;
                        buf.clear();
                        send_data(write, &mut buf, data, out, &mut left).await?;
                    } else {
                        frame_data(&mut buf, &data, out, &mut left)?;
                    }
                }
                Err(frame) => {
                    trailers = frame.into_trailers().ok();
                    ended = true;
                    break;
                }
            },
        }
    }
    if !ended {
        write.write_all(&buf).await?;
        buf.clear();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(io::Error::other)?;
            match frame.into_data() {
                Ok(data) => send_data(write, &mut buf, data, out, &mut left).await?,
                Err(frame) => {
                    trailers = frame.into_trailers().ok();
                    break;
                }
            }
        }
    }
    match out {
        Out::Chunked => {
            buf.extend_from_slice(b"0\r\n");
            for (name, value) in trailers.iter().flatten() {
                if fields::may_trail(name) {
                    codec::push_header(&mut buf, name, value);
                }
            }
            buf.extend_from_slice(b"\r\n");
        }
        Out::Length(_) if left != 0 => {
            return Err(io::Error::other("response body shorter than its length"))
        }
        _ => {}
    }
    write_flushed(write, &buf).await?;
    drop(body);
    Ok(keep_alive)
}

fn declared_length(headers: &HeaderMap) -> Option<u64> {
    let value = headers.get(header::CONTENT_LENGTH)?.as_bytes();
    (!value.is_empty() && value.len() <= 19 && value.iter().all(u8::is_ascii_digit))
        .then(|| value.iter().fold(0u64, |n, d| n * 10 + u64::from(d - b'0')))
}

/// Appends one data frame, framed, to `buf`.
fn frame_data(buf: &mut Vec<u8>, data: &[u8], out: Out, left: &mut u64) -> io::Result<()> {
    if data.is_empty() {
        return Ok(());
    }
    match out {
        Out::Chunked => {
            codec::push_hex(buf, data.len());
            buf.extend_from_slice(b"\r\n");
            buf.extend_from_slice(data);
            buf.extend_from_slice(b"\r\n");
        }
        Out::Length(_) => {
            let n = data.len() as u64;
            if n > *left {
                return Err(io::Error::other("response body longer than its length"));
            }
            *left -= n;
            buf.extend_from_slice(data);
        }
        Out::Close => buf.extend_from_slice(data),
        Out::None => {}
    }
    Ok(())
}

/// Writes one data frame: small ones copied next to their framing, large ones from
/// their own buffer.
async fn send_data(
    write: &mut ClientWrite,
    buf: &mut Vec<u8>,
    data: Bytes,
    out: Out,
    left: &mut u64,
) -> io::Result<()> {
    if data.len() <= COALESCE {
        frame_data(buf, &data, out, left)?;
        write.write_all(buf).await?;
        buf.clear();
        return Ok(());
    }
    match out {
        Out::Chunked => {
            buf.clear();
            codec::push_hex(buf, data.len());
            buf.extend_from_slice(b"\r\n");
            write_parts(write, &mut [buf, &data, b"\r\n"]).await?;
            buf.clear();
        }
        Out::Length(_) => {
            let n = data.len() as u64;
            if n > *left {
                return Err(io::Error::other("response body longer than its length"));
            }
            *left -= n;
            write.write_all(&data).await?;
        }
        Out::Close => write.write_all(&data).await?,
        Out::None => {}
    }
    Ok(())
}

/// Writes all of `parts`, in as few writes as the socket allows.
async fn write_parts(write: &mut ClientWrite, parts: &mut [&[u8]]) -> io::Result<()> {
    let mut first = 0;
    while first < parts.len() {
        let n = {
            let slices: Vec<IoSlice<'_>> = parts[first..].iter().map(|p| IoSlice::new(p)).collect();
            write.write_vectored(&slices).await?
        };
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        let mut n = n;
        while first < parts.len() && n >= parts[first].len() {
            n -= parts[first].len();
            first += 1;
        }
        if first < parts.len() {
            parts[first] = &parts[first][n..];
        }
    }
    Ok(())
}

fn push_status_line(out: &mut Vec<u8>, status: StatusCode) {
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("Unknown").as_bytes());
    out.extend_from_slice(b"\r\n");
}

thread_local! {
    /// The `Date` header line, rendered once a second.
    static DATE: RefCell<(u64, [u8; 29])> = const { RefCell::new((0, [0; 29])) };
}

fn push_date(out: &mut Vec<u8>) {
    let now = SystemTime::now();
    let second = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    DATE.with_borrow_mut(|(at, text)| {
        if *at != second {
            let rendered = httpdate::fmt_http_date(now);
            if rendered.len() == text.len() {
                text.copy_from_slice(rendered.as_bytes());
                *at = second;
            }
        }
        out.extend_from_slice(b"date: ");
        out.extend_from_slice(text);
        out.extend_from_slice(b"\r\n");
    });
}

/// Waits for a lent read side to come back from the request body; `None` if it does not
/// within `limit` (the body is still held, reading slowly) or is gone.
async fn recover(
    mut returned: oneshot::Receiver<Box<ReadSide>>,
    limit: Duration,
) -> Option<Box<ReadSide>> {
    match returned.try_recv() {
        Ok(side) => Some(side),
        Err(oneshot::error::TryRecvError::Closed) => None,
        Err(oneshot::error::TryRecvError::Empty) => {
            tokio::time::timeout(limit, returned).await.ok()?.ok()
        }
    }
}

/// Whether what is left of a body may be small enough to read and drop.
fn drainable(body: &Decoding) -> bool {
    match body {
        Decoding::Length(n) => *n <= DRAIN_BYTES,
        _ => true,
    }
}

/// Reads and drops what is left of a request body the handler did not read, when that
/// is small and quick; `false` when the connection should close instead.
async fn drain(side: &mut ReadSide) -> bool {
    if !drainable(&side.body) {
        return false;
    }
    let mut seen = 0u64;
    let drained = tokio::time::timeout(DRAIN_TIME, async {
        while let Some(frame) =
            std::future::poll_fn(|cx| side.body.poll_frame(&mut side.reader, cx)).await
        {
            let Ok(frame) = frame else {
                return false;
            };
            seen += frame.data_ref().map_or(0, |d| d.len() as u64);
            if seen > DRAIN_BYTES {
                return false;
            }
        }
        true
    })
    .await;
    matches!(drained, Ok(true))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Option<Head>, HeadError> {
        let mut read = Bytes::copy_from_slice(text.as_bytes());
        parse_head(&mut read, 1024)
    }

    #[test]
    fn heads_parse_into_http_parts_and_leave_what_follows() {
        let mut read = Bytes::from_static(
            b"POST /a?b=1 HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nExpect: 100-continue\r\nX-A: 1\r\nX-A: 2\r\n\r\nabcGET",
        );
        let head = parse_head(&mut read, 1024).unwrap().unwrap();
        assert_eq!(&read[..], b"abcGET", "the body and the next request stay");
        let parts = &head.request;
        assert_eq!(parts.method, Method::POST);
        assert_eq!(parts.uri, "/a?b=1");
        assert_eq!(parts.version, Version::HTTP_11);
        assert_eq!(parts.headers.get_all("x-a").iter().count(), 2);
        assert!(head.expect_continue);
        assert!(
            !parts.headers.contains_key(header::EXPECT),
            "the gateway answers the expectation itself"
        );
        assert_eq!(
            request_framing(&head.facts, false).unwrap(),
            Decoding::Length(3)
        );
    }

    #[test]
    fn partial_large_and_malformed_heads_are_told_apart() {
        assert!(matches!(parse("GET / HTTP/1.1\r\nHost: x\r\n"), Ok(None)));
        let long = format!("GET / HTTP/1.1\r\nX: {}\r\n", "y".repeat(2000));
        assert!(matches!(parse(&long), Err(HeadError::TooLarge)));
        let many: String = (0..MAX_HEADERS + 1)
            .map(|i| format!("X-{i}: v\r\n"))
            .collect();
        let many = format!("GET / HTTP/1.1\r\n{many}\r\n");
        let mut read = Bytes::from(many);
        assert!(matches!(
            parse_head(&mut read, 1 << 20),
            Err(HeadError::TooLarge)
        ));
        assert!(matches!(
            parse("GET / HTTP/1.1\r\nBad Name: x\r\n\r\n"),
            Err(HeadError::Bad(_))
        ));
        assert!(matches!(
            parse("GET / HTTP/2.0\r\n\r\n"),
            Err(HeadError::Bad(_))
        ));
    }

    #[test]
    fn request_framing_refuses_what_two_servers_could_read_differently() {
        let facts = |text: &str| parse(text).unwrap().unwrap().facts;
        let chunked = facts("POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n");
        assert_eq!(
            request_framing(&chunked, false).unwrap(),
            Decoding::Chunked(codec::Chunked::START)
        );
        assert!(
            request_framing(&chunked, true).is_err(),
            "no chunking in HTTP/1.0"
        );
        for refused in [
            "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n",
            "POST / HTTP/1.1\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
        ] {
            assert!(
                request_framing(&facts(refused), false).is_err(),
                "{refused}"
            );
        }
        let same_twice = facts("POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\n");
        assert_eq!(
            request_framing(&same_twice, false).unwrap(),
            Decoding::Length(3)
        );
        let listed = facts("POST / HTTP/1.1\r\nContent-Length: 3, 3\r\n\r\n");
        assert!(
            request_framing(&listed, false).is_err(),
            "stricter than RFC 9110 §8.6, as hyper"
        );
        let none = facts("GET / HTTP/1.1\r\n\r\n");
        assert_eq!(request_framing(&none, false).unwrap(), Decoding::Done);
    }

    #[test]
    fn the_date_line_is_an_http_date() {
        let mut out = Vec::new();
        push_date(&mut out);
        let text = String::from_utf8(out).unwrap();
        let value = text.strip_prefix("date: ").unwrap().trim_end();
        assert!(httpdate::parse_http_date(value).is_ok(), "{value}");
    }
}
