//! Request bodies, read whole up to a limit. A body refused as too large is still read on
//! to its end (up to a cap) and thrown away: a client that writes its whole request before
//! it reads (most do) then gets its 413 instead of a connection reset, and the connection
//! stays usable. Past the cap the answer says `Connection: close`, and the listener's
//! lingering close (`linger`) takes the rest, so even then the 413 arrives.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::header::{CONTENT_LENGTH, EXPECT};
use http::{HeaderMap, Request};
use http_body_util::BodyExt;
use hyper::body::Incoming;

/// How much of a refused body is read (and discarded) while answering.
const DRAIN_MAX: u64 = 4 * 1024 * 1024;
/// How long that reading may take.
const DRAIN_TIME: Duration = Duration::from_secs(5);

/// A body read up to its limit.
pub enum LimitedBody {
    Whole(Bytes),
    TooLarge(Oversize),
}

/// A refused body.
#[derive(Debug, Clone, Copy)]
pub struct Oversize {
    /// Its declared length, or the bytes read of it when it declared none.
    pub size: u64,
    /// Read to its end: the connection may carry the next request.
    pub drained: bool,
}

fn declared_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
}

fn expects_continue(headers: &HeaderMap) -> bool {
    headers
        .get(EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"))
}

/// Reads the body of `req` if it is at most `limit` bytes. An error is the client's
/// (a broken framing or a connection gone mid-body).
pub async fn read_limited(req: Request<Incoming>, limit: u64) -> Result<LimitedBody, hyper::Error> {
    if let Some(size) = declared_length(req.headers()) {
        if size > limit {
            // With `Expect: 100-continue` the body was not sent and never will be: no
            // `100 Continue` goes out when it is not read.
            if expects_continue(req.headers()) || size - limit > DRAIN_MAX {
                return Ok(LimitedBody::TooLarge(Oversize {
                    size,
                    drained: false,
                }));
            }
            let (_, drained) = drain(req.into_body()).await;
            return Ok(LimitedBody::TooLarge(Oversize { size, drained }));
        }
    }
    let mut body = req.into_body();
    let mut buf = BytesMut::new();
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame?.into_data() else {
            continue; // trailers
        };
        let seen = (buf.len() + data.len()) as u64;
        if seen > limit {
            let (rest, drained) = drain(body).await;
            return Ok(LimitedBody::TooLarge(Oversize {
                size: seen + rest,
                drained,
            }));
        }
        buf.extend_from_slice(&data);
    }
    Ok(LimitedBody::Whole(buf.freeze()))
}

/// Reads and discards up to [`DRAIN_MAX`] bytes for up to [`DRAIN_TIME`]; returns the
/// bytes read and whether the body ended.
async fn drain(mut body: Incoming) -> (u64, bool) {
    let mut read = 0u64;
    let ended = tokio::time::timeout(DRAIN_TIME, async {
        while let Some(frame) = body.frame().await {
            let Ok(frame) = frame else {
                return false;
            };
            if let Some(data) = frame.data_ref() {
                read += data.len() as u64;
                if read > DRAIN_MAX {
                    return false;
                }
            }
        }
        true
    })
    .await;
    (read, ended.unwrap_or(false))
}
