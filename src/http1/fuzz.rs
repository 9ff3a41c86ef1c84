//! Entry points of the HTTP/1.1 fuzz targets (`fuzz/`, replayed by `tests/fuzz_corpus.rs`):
//! the gateway's own request and response head parsers and chunked decoder, driven with
//! any bytes. Besides never panicking, each checks what the protocol layer promises: a
//! request it reads is written upstream and read back as the same request, and a body is
//! decoded the same whether its bytes come at once or in pieces.

use std::io;
use std::task::{Context, Poll};

use bytes::Bytes;

use super::client::{
    encode_head, parse_response_head, response_framing, Framing, OutboundBody, RequestHead,
};
use super::codec::{Chunked, Decoding, Source};
use super::server::{parse_head, request_framing};

/// Fields a request may have for its read-back check (the cap, less what the client side
/// may add).
const MAX_FIELDS_READ_BACK: usize = 96;

/// Bytes handed to the decoder `step` at a time (all at once when `step` is 0).
struct Pieces {
    buffered: Bytes,
    rest: Bytes,
    step: usize,
}

impl Source for Pieces {
    fn buffered(&mut self) -> &mut Bytes {
        &mut self.buffered
    }
    fn poll_more(&mut self, _: &mut Context<'_>) -> Poll<io::Result<usize>> {
        let n = if self.step == 0 {
            self.rest.len()
        } else {
            self.step.min(self.rest.len())
        };
        let more = self.rest.split_to(n);
        let mut joined = Vec::with_capacity(self.buffered.len() + more.len());
        joined.extend_from_slice(&self.buffered);
        joined.extend_from_slice(&more);
        self.buffered = Bytes::from(joined);
        Poll::Ready(Ok(n))
    }
}

/// The body, the bytes left after it, or `None` when it is refused.
pub(super) fn decode(framing: Decoding, bytes: Bytes, step: usize) -> Option<(Vec<u8>, Bytes)> {
    let mut src = Pieces {
        buffered: Bytes::new(),
        rest: bytes,
        step,
    };
    let mut state = framing;
    let mut cx = Context::from_waker(std::task::Waker::noop());
    let mut body = Vec::new();
    // Bounded: every poll consumes input or ends the body.
    for _ in 0..1_000_000 {
        match state.poll_frame(&mut src, &mut cx) {
            Poll::Ready(None) => {
                let mut left = src.buffered.to_vec();
                left.extend_from_slice(&src.rest);
                return Some((body, Bytes::from(left)));
            }
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(d) = frame.data_ref() {
                    body.extend_from_slice(d);
                }
            }
            Poll::Ready(Some(Err(_))) | Poll::Pending => return None,
        }
    }
    panic!("the decoder made no progress");
}

/// Request heads: parse, frame, write upstream, read back.
pub fn request_head(data: &[u8]) {
    read_back(data);
}

/// Reads the request at the start of `data` and, when the gateway accepts it, writes it
/// as it would go upstream and checks that it reads back the same; whether it was
/// accepted.
pub(super) fn read_back(data: &[u8]) -> bool {
    let mut read = Bytes::copy_from_slice(data);
    let Ok(Some(head)) = parse_head(&mut read, 64 * 1024) else {
        return false;
    };
    let http10 = head.request.version == http::Version::HTTP_10;
    let Ok(framing) = request_framing(&head.facts, http10) else {
        return false;
    };
    let Some((body, _)) = decode(framing, read, 0) else {
        return false;
    };
    let parts = &head.request;
    // The client side may add a field or two (`Content-Length`, and the gateway's own):
    // a head at the field cap cannot be read back under the same cap.
    if parts.headers.len() > MAX_FIELDS_READ_BACK {
        return true;
    }
    let mut out = Vec::new();
    // As the gateway sends them: no body, or the body it has read, with its length.
    let mut upstream = if body.is_empty() {
        OutboundBody::<http_body_util::Empty<Bytes>>::Empty
    } else {
        OutboundBody::Full(Some(Bytes::from(body.clone())))
    };
    let req = RequestHead {
        method: &parts.method,
        uri: &parts.uri,
        headers: &parts.headers,
        upgrade: false,
        extra: None,
    };
    let rest = encode_head(&mut out, req, &mut upstream);
    let mut again = Bytes::from(out);
    let reread = parse_head(&mut again.clone(), usize::MAX);
    let Ok(Some(head2)) = parse_head(&mut again, usize::MAX) else {
        panic!(
            "the gateway cannot read the request it wrote: {:?}",
            reread.err()
        );
    };
    assert_eq!(head2.request.method, parts.method);
    let origin = |uri: &http::Uri| {
        let pq = uri.path_and_query().map_or("", |pq| pq.as_str());
        if pq.starts_with('/') {
            pq.to_string()
        } else {
            format!("/{pq}")
        }
    };
    assert_eq!(head2.request.uri, origin(&parts.uri).as_str());
    if rest.is_none() {
        let framing = request_framing(&head2.facts, false).expect("framed by the gateway");
        let (body2, left) = decode(framing, again, 0).expect("a whole body");
        assert_eq!(body2, body);
        assert!(left.is_empty());
        let framing_free = |h: &http::HeaderMap| -> Vec<(String, Vec<u8>)> {
            h.iter()
                .filter(|(n, _)| {
                    *n != http::header::CONTENT_LENGTH && *n != http::header::TRANSFER_ENCODING
                })
                .map(|(n, v)| (n.to_string(), v.as_bytes().to_vec()))
                .collect()
        };
        assert_eq!(
            framing_free(&head2.request.headers),
            framing_free(&parts.headers)
        );
    }
    true
}

/// Response heads: parse and frame (the first byte says whether it answers a HEAD).
pub fn response_head(data: &[u8]) {
    let Some((&flags, data)) = data.split_first() else {
        return;
    };
    let mut read = Bytes::copy_from_slice(data);
    let Ok(Some(head)) = parse_response_head(&mut read) else {
        return;
    };
    let Ok((framing, _)) = response_framing(&head, flags & 1 == 1) else {
        return;
    };
    let state = match framing {
        Framing::Length(n) => Decoding::Length(n),
        Framing::Chunked => Decoding::Chunked(Chunked::START),
        Framing::Close => Decoding::Close,
    };
    let _ = decode(state, read, 0);
}

/// Chunked bodies: the same result whether read at once or in pieces of the size the
/// first byte gives.
pub fn chunked_body(data: &[u8]) {
    let Some((&step, data)) = data.split_first() else {
        return;
    };
    let bytes = Bytes::copy_from_slice(data);
    let whole = decode(Decoding::Chunked(Chunked::START), bytes.clone(), 0);
    let pieces = decode(
        Decoding::Chunked(Chunked::START),
        bytes,
        usize::from(step % 16) + 1,
    );
    match (&whole, &pieces) {
        (Some(a), Some(b)) => assert_eq!(a, b, "read differently in pieces"),
        (None, None) => {}
        // In pieces, a body may only be refused where at once it was refused too; a
        // complete one must be read the same.
        _ => panic!("whole: {whole:?}, in pieces: {pieces:?}"),
    }
}
