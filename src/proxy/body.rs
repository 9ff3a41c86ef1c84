//! Bodies in both directions, streamed, never buffered whole.
//!
//! [`UpstreamBody`] carries the client's body to the upstream: empty, a small buffered body
//! that can be replayed on a retry, or the live stream with the route's size limit enforced
//! as bytes flow (a lying or absent `Content-Length` cannot get more through).
//! [`ClientBody`] carries the answer back (an HTTP/1.1 instance's body returns its
//! connection to the pool as it ends) and, when it ends or is dropped, finishes the
//! request's bookkeeping: access log, metrics, in-flight counter.

use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use crate::http1::client::{H1Error, OutboundBody, ResponseBody};
use crate::http1::io::UpstreamStream;
use crate::http1::server::{ReceiveError, ReceivedBody};

#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("request body exceeds {0} bytes")]
    TooLarge(u64),
    #[error(transparent)]
    Hyper(#[from] hyper::Error),
    #[error("client request body: {0}")]
    Client(String),
    #[error("the client sent no request body bytes for too long")]
    ClientIdle,
}

impl From<ReceiveError> for BodyError {
    fn from(e: ReceiveError) -> BodyError {
        match e {
            ReceiveError::Idle => BodyError::ClientIdle,
            ReceiveError::Malformed(why) => BodyError::Client(why),
        }
    }
}

/// A request body as a client sends it: over HTTP/1.1 (read by the gateway's own server)
/// or HTTP/2 (hyper's).
pub enum RequestBody {
    Empty,
    H1(ReceivedBody),
    H2(Incoming),
}

impl std::fmt::Debug for RequestBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            RequestBody::Empty => "RequestBody::Empty",
            RequestBody::H1(_) => "RequestBody::H1",
            RequestBody::H2(_) => "RequestBody::H2",
        })
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match self.get_mut() {
            RequestBody::Empty => Poll::Ready(None),
            RequestBody::H1(b) => Pin::new(b).poll_frame(cx).map_err(BodyError::from),
            RequestBody::H2(b) => Pin::new(b).poll_frame(cx).map_err(BodyError::from),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            RequestBody::Empty => true,
            RequestBody::H1(b) => b.is_end_stream(),
            RequestBody::H2(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            RequestBody::Empty => SizeHint::with_exact(0),
            RequestBody::H1(b) => b.size_hint(),
            RequestBody::H2(b) => b.size_hint(),
        }
    }
}

/// What the client did wrong with a streamed request body, as the handler needs to know
/// after a failed try: it answers for the client (413, 408, 400) and does not hold the
/// failure against the instance. Also tells whether the body was read to its end.
#[derive(Debug, Clone, Default)]
pub struct BodyFault(Arc<AtomicU8>);

/// The client's part in a failed exchange.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientFault {
    /// More bytes than the route allows.
    TooLarge,
    /// Nothing arrived for the body read timeout.
    Idle,
    /// Framing the gateway refused (a bad chunk), or the client's stream broke.
    Broken,
}

const COMPLETE: u8 = 1 << 7;

impl BodyFault {
    fn record(&self, error: &BodyError) {
        let fault = match error {
            BodyError::TooLarge(_) => ClientFault::TooLarge,
            BodyError::ClientIdle => ClientFault::Idle,
            BodyError::Client(_) | BodyError::Hyper(_) => ClientFault::Broken,
        };
        self.0.fetch_or(fault as u8 + 1, Ordering::Relaxed);
    }

    /// The client's fault, if the body failed on its side.
    pub fn fault(&self) -> Option<ClientFault> {
        match self.0.load(Ordering::Relaxed) & !COMPLETE {
            0 => None,
            1 => Some(ClientFault::TooLarge),
            2 => Some(ClientFault::Idle),
            _ => Some(ClientFault::Broken),
        }
    }

    /// Whether all of the body came from the client.
    pub fn is_complete(&self) -> bool {
        self.0.load(Ordering::Relaxed) & COMPLETE != 0
    }
}

/// A request body on its way upstream: none, buffered (replayable), or the client's
/// stream under the route's limit.
pub type UpstreamBody = OutboundBody<LimitedBody>;

/// The client's body as it arrives, after `prefix` (what had arrived by the time the
/// request went upstream), with the route's size limit enforced as bytes flow (a lying or
/// absent `Content-Length` cannot get more through). Request trailers are dropped, as
/// nginx and Envoy do by default: fields after the body would reach the instance
/// unchecked by the phases that cleaned the head.
#[derive(Debug)]
pub struct LimitedBody {
    prefix: Option<Bytes>,
    inner: RequestBody,
    seen: u64,
    limit: u64,
    fault: BodyFault,
}

impl LimitedBody {
    /// `inner` after `prefix`, whose bytes already count against `limit`.
    pub fn new(prefix: Bytes, inner: RequestBody, limit: u64) -> (UpstreamBody, BodyFault) {
        let fault = BodyFault::default();
        let body = LimitedBody {
            seen: prefix.len() as u64,
            prefix: (!prefix.is_empty()).then_some(prefix),
            inner,
            limit,
            fault: fault.clone(),
        };
        (OutboundBody::Stream(body), fault)
    }
}

impl Body for LimitedBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.get_mut();
        if let Some(data) = this.prefix.take() {
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
        loop {
            let frame = match ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
                None => {
                    this.fault.0.fetch_or(COMPLETE, Ordering::Relaxed);
                    return Poll::Ready(None);
                }
                Some(Err(e)) => {
                    this.fault.record(&e);
                    return Poll::Ready(Some(Err(e)));
                }
                Some(Ok(frame)) => frame,
            };
            let Some(data) = frame.data_ref() else {
                continue;
            };
            this.seen += data.len() as u64;
            if this.seen > this.limit {
                let e = BodyError::TooLarge(this.limit);
                this.fault.record(&e);
                return Poll::Ready(Some(Err(e)));
            }
            return Poll::Ready(Some(Ok(frame)));
        }
    }

    fn is_end_stream(&self) -> bool {
        self.prefix.is_none() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let early = self.prefix.as_ref().map_or(0, |p| p.len() as u64);
        let rest = self.inner.size_hint();
        let mut hint = SizeHint::new();
        if let Some(upper) = rest.upper() {
            hint.set_upper(upper + early);
        }
        hint.set_lower(rest.lower() + early);
        hint
    }
}

/// Runs once when a response is finished (fully sent, failed or abandoned by the client),
/// with the number of body bytes that went out.
pub trait Finish: Send + Sync + 'static {
    fn finish(&mut self, bytes: u64, complete: bool);
}

/// Why a response body stopped before its end.
#[derive(Debug, thiserror::Error)]
pub enum ResponseError {
    #[error(transparent)]
    H1(#[from] H1Error),
    #[error(transparent)]
    H2(#[from] hyper::Error),
}

/// A response body on its way to the client.
pub struct ClientBody {
    inner: Inner,
    bytes: u64,
    finish: Option<Box<dyn Finish>>,
}

enum Inner {
    Full(Option<Bytes>),
    H1(ResponseBody<LimitedBody>),
    H2(Incoming),
}

impl ClientBody {
    pub fn full(data: impl Into<Bytes>) -> ClientBody {
        let data: Bytes = data.into();
        ClientBody {
            inner: Inner::Full((!data.is_empty()).then_some(data)),
            bytes: 0,
            finish: None,
        }
    }

    pub fn empty() -> ClientBody {
        ClientBody::full(Bytes::new())
    }

    /// An HTTP/1.1 instance's body; its connection goes back to the pool once the body
    /// has been read to its end, and is closed if the body is abandoned before.
    pub fn h1(body: ResponseBody<LimitedBody>) -> ClientBody {
        ClientBody {
            inner: Inner::H1(body),
            bytes: 0,
            finish: None,
        }
    }

    /// An HTTP/2 instance's body.
    pub fn h2(body: Incoming) -> ClientBody {
        ClientBody {
            inner: Inner::H2(body),
            bytes: 0,
            finish: None,
        }
    }

    /// For an instance's `101`: its connection and the bytes already read past the
    /// head. Leaves this body empty.
    pub fn take_upgraded(&mut self) -> Option<(UpstreamStream, Bytes)> {
        match std::mem::replace(&mut self.inner, Inner::Full(None)) {
            Inner::H1(body) => body.into_upgraded(),
            _ => None,
        }
    }

    /// Calls `finish` when the body ends or is dropped.
    pub fn on_finish(&mut self, finish: Box<dyn Finish>) {
        self.finish = Some(finish);
    }

    fn done(&mut self, complete: bool) {
        if let Some(mut f) = self.finish.take() {
            f.finish(self.bytes, complete);
        }
    }
}

impl Drop for ClientBody {
    fn drop(&mut self) {
        let complete = self.is_end_stream();
        self.done(complete);
    }
}

impl Body for ClientBody {
    type Data = Bytes;
    type Error = ResponseError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, ResponseError>>> {
        let this = self.get_mut();
        let frame = match &mut this.inner {
            Inner::Full(data) => data.take().map(|d| Ok(Frame::data(d))),
            Inner::H1(body) => ready!(Pin::new(body).poll_frame(cx)).map(|r| r.map_err(Into::into)),
            Inner::H2(body) => ready!(Pin::new(body).poll_frame(cx)).map(|r| r.map_err(Into::into)),
        };
        match &frame {
            Some(Ok(f)) => {
                if let Some(d) = f.data_ref() {
                    this.bytes += d.len() as u64;
                }
                if this.is_end_stream() {
                    this.done(true);
                }
            }
            Some(Err(_)) => this.done(false),
            None => this.done(true),
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        match &self.inner {
            Inner::Full(d) => d.is_none(),
            Inner::H1(b) => b.is_end_stream(),
            Inner::H2(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Inner::Full(d) => SizeHint::with_exact(d.as_ref().map_or(0, |d| d.len() as u64)),
            Inner::H1(b) => b.size_hint(),
            Inner::H2(b) => b.size_hint(),
        }
    }
}
