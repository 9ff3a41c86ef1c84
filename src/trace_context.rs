//! W3C Trace Context on every request, exporter or not: a valid `traceparent` from the
//! client is continued (its trace id, and the gateway's own span id as the parent of what
//! goes upstream), anything else starts a new trace. `tracestate` goes along only with a
//! continued trace and only when it has the list shape the spec gives it.
//!
//! Parsing is stricter than lenient proxies on purpose: one `traceparent` field exactly
//! (several are ambiguous: which one did the client mean?), lower-case hex only, no
//! all-zero ids, version `ff` refused, version `00` exactly 55 bytes, and a later version
//! read by the spec's forward-compatibility rule (its first 55 bytes, then `-` or the end).
//! The gateway always sends version `00` with only the sampled flag, its own
//! span id as parent-id, and exactly one `traceparent` whatever the client sent
//! ([`crate::proxy::headers::Forwarded`] replaces the client's copies).
//!
//! Per request this is two header lookups, a few random words from a thread-local
//! generator and nothing allocated: the ids are integers, written as hex only where a
//! head or a log line needs them.

use std::cell::RefCell;
use std::fmt;

use http::header::{HeaderMap, HeaderName, HeaderValue};
use rand::rngs::SmallRng;
use rand::{RngCore, SeedableRng};

pub static TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
pub static TRACESTATE: HeaderName = HeaderName::from_static("tracestate");

/// Length of a version-00 `traceparent`: `00-` 32 hex `-` 16 hex `-` 2 hex.
const TRACEPARENT_LEN: usize = 55;
/// Most list members in `tracestate` (the spec's limit).
const TRACESTATE_MAX_MEMBERS: usize = 32;
/// Longest `tracestate` passed on, all fields together. The spec asks propagators to
/// carry at least 512 characters; a longer one is dropped whole rather than cut.
pub const TRACESTATE_MAX_BYTES: usize = 512;

/// What a valid `traceparent` says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParentContext {
    pub trace_id: u128,
    pub parent_id: u64,
    pub sampled: bool,
}

/// Reads one `traceparent` value, or `None` when it is not valid by the W3C rules.
pub fn parse_traceparent(value: &[u8]) -> Option<ParentContext> {
    // Stricter than the spec, which leaves a later version's tail open: only visible ASCII
    // (found by fuzzing: a tail of obs-text bytes was accepted).
    if value.len() < TRACEPARENT_LEN || !value.iter().all(|b| b.is_ascii_graphic()) {
        return None;
    }
    let version = hex_digits(&value[0..2])? as u8;
    match version {
        0xff => return None,
        0 if value.len() != TRACEPARENT_LEN => return None,
        // A later version: what follows the flags must start with `-`.
        _ if value.len() > TRACEPARENT_LEN && value[TRACEPARENT_LEN] != b'-' => return None,
        _ => {}
    }
    if value[2] != b'-' || value[35] != b'-' || value[52] != b'-' {
        return None;
    }
    let trace_id = hex_digits(&value[3..35])?;
    let parent_id = hex_digits(&value[36..52])? as u64;
    let flags = hex_digits(&value[53..55])? as u8;
    if trace_id == 0 || parent_id == 0 {
        return None;
    }
    Some(ParentContext {
        trace_id,
        parent_id,
        sampled: flags & 1 == 1,
    })
}

/// Lower-case hex digits (at most 32) as a number; `None` on any other byte.
fn hex_digits(text: &[u8]) -> Option<u128> {
    let mut n: u128 = 0;
    for &c in text {
        let digit = match c {
            b'0'..=b'9' => c - b'0',
            b'a'..=b'f' => c - b'a' + 10,
            _ => return None,
        };
        n = n << 4 | u128::from(digit);
    }
    Some(n)
}

/// Whether the `tracestate` fields, read as one comma-separated list, have the spec's
/// shape: at most 32 members of `key=value` (empty members allowed, as the list grammar
/// says), keys and values from their character sets and lengths, no key twice, and at
/// most [`TRACESTATE_MAX_BYTES`] in all.
pub fn tracestate_is_valid<'a>(fields: impl Iterator<Item = &'a [u8]>) -> bool {
    let mut total = 0usize;
    let mut members = 0usize;
    // Keys seen so far: a short list, no allocation.
    let mut seen: [&[u8]; TRACESTATE_MAX_MEMBERS] = [&[]; TRACESTATE_MAX_MEMBERS];
    for field in fields {
        total += field.len();
        if total > TRACESTATE_MAX_BYTES {
            return false;
        }
        for member in field.split(|&b| b == b',') {
            let member = trim_ows(member);
            if member.is_empty() {
                continue;
            }
            let Some(eq) = member.iter().position(|&b| b == b'=') else {
                return false;
            };
            let (key, value) = (&member[..eq], &member[eq + 1..]);
            if !tracestate_key(key) || !tracestate_value(value) {
                return false;
            }
            if members == TRACESTATE_MAX_MEMBERS {
                return false;
            }
            if seen[..members].contains(&key) {
                return false;
            }
            seen[members] = key;
            members += 1;
        }
    }
    true
}

fn trim_ows(mut s: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = s {
        s = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = s {
        s = rest;
    }
    s
}

fn key_char(c: u8) -> bool {
    c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, b'_' | b'-' | b'*' | b'/')
}

/// `simple-key` (lcalpha then up to 255 key characters) or `tenant@system` (tenant: a
/// letter or digit then up to 240; system: a letter then up to 13).
fn tracestate_key(key: &[u8]) -> bool {
    match key.iter().position(|&b| b == b'@') {
        None => {
            key.len() <= 256
                && key.first().is_some_and(u8::is_ascii_lowercase)
                && key.iter().all(|&c| key_char(c))
        }
        Some(at) => {
            let (tenant, system) = (&key[..at], &key[at + 1..]);
            (1..=241).contains(&tenant.len())
                && tenant
                    .first()
                    .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
                && tenant.iter().all(|&c| key_char(c))
                && (1..=14).contains(&system.len())
                && system.first().is_some_and(u8::is_ascii_lowercase)
                && system.iter().all(|&c| key_char(c))
        }
    }
}

/// Up to 256 printable characters but `,` and `=`, not ending in a space.
fn tracestate_value(value: &[u8]) -> bool {
    let printable = |c: &u8| matches!(c, 0x20..=0x7e) && !matches!(c, b',' | b'=');
    (1..=256).contains(&value.len()) && value.iter().all(printable) && value.last() != Some(&b' ')
}

/// What happens to the client's `tracestate`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TraceState {
    /// None was sent.
    Absent,
    /// Valid, with a continued trace: forwarded as sent.
    Kept,
    /// Invalid, or its trace was not continued: removed before forwarding.
    Dropped,
}

/// Which traces a gateway records, by OpenTelemetry's `ParentBased(TraceIdRatioBased)`:
/// a continued trace keeps its parent's sampled flag; a new one is sampled when its trace
/// id's low 63 bits fall under `ratio` of their range (so every gateway that sees the same
/// trace id decides alike).
#[derive(Debug, Clone, Copy)]
pub struct Sampler {
    bound: u64,
}

impl Sampler {
    /// `ratio` in 0..=1 (clamped).
    pub fn new(ratio: f64) -> Sampler {
        let ratio = if ratio.is_nan() {
            0.0
        } else {
            ratio.clamp(0.0, 1.0)
        };
        let bound = if ratio >= 1.0 {
            u64::MAX
        } else {
            (ratio * (1u64 << 63) as f64) as u64
        };
        Sampler { bound }
    }

    fn samples_new(&self, trace_id: u128) -> bool {
        self.bound == u64::MAX || ((trace_id as u64) >> 1) < self.bound
    }
}

/// The trace a request belongs to and the gateway's span in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceContext {
    pub trace_id: u128,
    /// The gateway's span: the parent-id of what goes upstream.
    pub span_id: u64,
    /// The client's span when the trace was continued.
    pub parent_id: Option<u64>,
    /// The sampled flag sent upstream; a recording gateway exports this request's span.
    pub sampled: bool,
    pub tracestate: TraceState,
}

impl TraceContext {
    /// The context of a request with these headers (as the client sent them).
    pub fn for_request(headers: &HeaderMap, sampler: &Sampler) -> TraceContext {
        let mut fields = headers.get_all(&TRACEPARENT).iter();
        let parent = match (fields.next(), fields.next()) {
            (Some(one), None) => parse_traceparent(one.as_bytes()),
            _ => None,
        };
        let tracestate = match headers.get(&TRACESTATE) {
            None => TraceState::Absent,
            Some(_) if parent.is_none() => TraceState::Dropped,
            Some(_) => {
                let fields = headers.get_all(&TRACESTATE).iter().map(|v| v.as_bytes());
                if tracestate_is_valid(fields) {
                    TraceState::Kept
                } else {
                    TraceState::Dropped
                }
            }
        };
        let span_id = random_nonzero();
        match parent {
            Some(p) => TraceContext {
                trace_id: p.trace_id,
                span_id,
                parent_id: Some(p.parent_id),
                sampled: p.sampled,
                tracestate,
            },
            None => TraceContext {
                tracestate,
                ..TraceContext::new_trace_with_span(span_id, sampler)
            },
        }
    }

    /// The context of a request that carries no trace context: a new trace.
    pub fn new_trace(sampler: &Sampler) -> TraceContext {
        TraceContext::new_trace_with_span(random_nonzero(), sampler)
    }

    fn new_trace_with_span(span_id: u64, sampler: &Sampler) -> TraceContext {
        let trace_id = u128::from(random_nonzero()) << 64 | u128::from(random_nonzero());
        TraceContext {
            trace_id,
            span_id,
            parent_id: None,
            sampled: sampler.samples_new(trace_id),
            tracestate: TraceState::Absent,
        }
    }

    /// The `traceparent` value sent upstream (55 bytes).
    pub fn traceparent(&self) -> [u8; TRACEPARENT_LEN] {
        let mut out = [0u8; TRACEPARENT_LEN];
        out[..3].copy_from_slice(b"00-");
        put_hex(&mut out[3..35], self.trace_id);
        out[35] = b'-';
        put_hex(&mut out[36..52], u128::from(self.span_id));
        out[52] = b'-';
        out[53] = b'0';
        out[54] = if self.sampled { b'1' } else { b'0' };
        out
    }

    /// `traceparent: ...` and CRLF, appended to an HTTP/1.1 head being written.
    pub fn write_header(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(b"traceparent: ");
        out.extend_from_slice(&self.traceparent());
        out.extend_from_slice(b"\r\n");
    }

    /// The `traceparent` as a header value (for HTTP/2 requests, whose headers are a map).
    pub fn header_value(&self) -> HeaderValue {
        HeaderValue::from_bytes(&self.traceparent())
            .unwrap_or_else(|_| HeaderValue::from_static("00-"))
    }

    /// The trace id as 32 lower-case hex digits, for log lines.
    pub fn trace_id_hex(&self) -> HexId<16> {
        HexId(self.trace_id.to_be_bytes())
    }

    /// The gateway's span id as 16 lower-case hex digits.
    pub fn span_id_hex(&self) -> HexId<8> {
        HexId(self.span_id.to_be_bytes())
    }
}

/// Hex digits of `n`, the last `out.len()` (even) of its 32, most significant first.
fn put_hex(out: &mut [u8], n: u128) {
    let bytes = n.to_be_bytes();
    crate::hex::encode_into(out, &bytes[16 - out.len() / 2..]);
}

/// An id shown as lower-case hex (trace ids in the access log, span ids in messages).
#[derive(Clone, Copy)]
pub struct HexId<const N: usize>(pub [u8; N]);

impl<const N: usize> fmt::Display for HexId<N> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut text = [0u8; 32];
        let text = &mut text[..2 * N];
        for (i, b) in self.0.iter().enumerate() {
            put_hex(&mut text[2 * i..2 * i + 2], u128::from(*b));
        }
        // Only hex digits were written.
        f.write_str(std::str::from_utf8(text).unwrap_or_default())
    }
}

impl<const N: usize> fmt::Debug for HexId<N> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

thread_local! {
    // Ids need to be unique, not secret: a fast generator seeded once per thread.
    static IDS: RefCell<SmallRng> = RefCell::new(SmallRng::from_os_rng());
}

/// A random id that is not zero (zero means "none" in both W3C and OTLP).
fn random_nonzero() -> u64 {
    IDS.with(|rng| {
        let mut rng = rng.borrow_mut();
        loop {
            let n = rng.next_u64();
            if n != 0 {
                return n;
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALID: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn a_valid_traceparent_is_read() {
        let p = parse_traceparent(VALID.as_bytes()).unwrap();
        assert_eq!(p.trace_id, 0x4bf92f3577b34da6a3ce929d0e0e4736);
        assert_eq!(p.parent_id, 0x00f067aa0ba902b7);
        assert!(p.sampled);
        let unsampled = VALID.replace("-01", "-00");
        assert!(!parse_traceparent(unsampled.as_bytes()).unwrap().sampled);
        // Other flag bits are read past: only "sampled" means something to version 00.
        let flagged = VALID.replace("-01", "-03");
        assert!(parse_traceparent(flagged.as_bytes()).unwrap().sampled);
    }

    #[test]
    fn malformed_traceparents_are_refused() {
        let bad = [
            "",
            "00",
            &VALID[..54],
            &format!("{VALID}-"),
            &format!("{VALID} "),
            &VALID.to_uppercase(),
            &VALID.replace("4bf9", "4BF9"),
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "0x-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736_00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7_01",
            "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0g",
            "00-+bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b",
        ];
        for value in bad {
            assert_eq!(parse_traceparent(value.as_bytes()), None, "{value:?}");
        }
    }

    #[test]
    fn a_later_version_is_read_by_its_first_55_bytes() {
        let later = "cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert!(parse_traceparent(later.as_bytes()).is_some());
        let extended = format!("{later}-what-the-future-holds");
        let p = parse_traceparent(extended.as_bytes()).unwrap();
        assert_eq!(p.parent_id, 0x00f067aa0ba902b7);
    }

    #[test]
    fn a_continued_trace_keeps_its_id_and_flag_with_a_new_span() {
        let sampler = Sampler::new(0.0);
        let h = headers(&[("traceparent", VALID), ("tracestate", "congo=t61rcWkgMzE")]);
        let t = TraceContext::for_request(&h, &sampler);
        assert_eq!(t.trace_id, 0x4bf92f3577b34da6a3ce929d0e0e4736);
        assert_eq!(t.parent_id, Some(0x00f067aa0ba902b7));
        assert_ne!(t.span_id, 0x00f067aa0ba902b7);
        assert!(t.sampled, "the parent's decision wins over the ratio");
        assert_eq!(t.tracestate, TraceState::Kept);
        let sent = t.traceparent();
        let again = parse_traceparent(&sent).unwrap();
        assert_eq!((again.trace_id, again.parent_id), (t.trace_id, t.span_id));
        assert_eq!(&sent[..36], &VALID.as_bytes()[..36]);
        assert_eq!(t.trace_id_hex().to_string(), &VALID[3..35]);
    }

    #[test]
    fn several_or_bad_traceparents_start_a_new_trace_and_drop_tracestate() {
        let sampler = Sampler::new(1.0);
        for h in [
            headers(&[("traceparent", VALID), ("traceparent", VALID)]),
            headers(&[("traceparent", "garbage"), ("tracestate", "a=b")]),
            headers(&[("tracestate", "a=b")]),
        ] {
            let t = TraceContext::for_request(&h, &sampler);
            assert_ne!(t.trace_id, 0x4bf92f3577b34da6a3ce929d0e0e4736);
            assert_ne!(t.trace_id, 0);
            assert_eq!(t.parent_id, None);
            assert!(t.sampled);
            assert_ne!(t.tracestate, TraceState::Kept);
            let sent = t.traceparent();
            assert_eq!(sent.len(), 55);
            assert!(parse_traceparent(&sent).is_some());
        }
        let fresh = TraceContext::for_request(&HeaderMap::new(), &Sampler::new(0.0));
        assert!(!fresh.sampled);
        assert_eq!(fresh.tracestate, TraceState::Absent);
        assert!(fresh.traceparent().ends_with(b"-00"));
    }

    #[test]
    fn tracestate_lists_are_checked_for_shape() {
        let ok = |fields: &[&str]| tracestate_is_valid(fields.iter().map(|f| f.as_bytes()));
        assert!(ok(&["rojo=00f067aa0ba902b7,congo=t61rcWkgMzE"]));
        assert!(ok(&["rojo=1", "congo=2"]));
        assert!(ok(&["a=1 , ,b=2"]));
        assert!(ok(&["tenant@vendor=x", "1ab@sys=y"]));
        assert!(!ok(&["a=1,a=2"]), "a key twice");
        assert!(!ok(&["a=1", "a=2"]), "a key twice across fields");
        assert!(!ok(&["Upper=1"]));
        assert!(!ok(&["novalue"]));
        assert!(!ok(&["a="]));
        assert!(!ok(&["a=x=y"]));
        assert!(
            ok(&["a=in side "]),
            "a space inside; the last one is list whitespace"
        );
        assert!(!ok(&["a=x\ty"]));
        assert!(!ok(&["@v=1"]));
        assert!(!ok(&["t@=1"]));
        assert!(!ok(&["t@waytoolongsystemid=1"]));
        let many: Vec<String> = (0..33).map(|i| format!("k{i}=v")).collect();
        assert!(!ok(&[&many.join(",")]));
        assert!(ok(&[&many[..32].join(",")]));
        assert!(!ok(&[&format!("a={}", "x".repeat(TRACESTATE_MAX_BYTES))]));
    }

    #[test]
    fn the_ratio_samples_by_trace_id() {
        assert!(Sampler::new(1.0).samples_new(0));
        assert!(!Sampler::new(0.0).samples_new(0));
        let half = Sampler::new(0.5);
        assert!(half.samples_new(0x0000_0000_0000_0000_3fff_ffff_ffff_ffff << 1));
        assert!(!half.samples_new(u128::from(u64::MAX)));
        let sampled = (0..10_000u64)
            .filter(|_| Sampler::new(0.01).samples_new(u128::from(random_nonzero())))
            .count();
        assert!((30..300).contains(&sampled), "{sampled} of 10,000 at 1%");
    }
}
