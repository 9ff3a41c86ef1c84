//! The gateway's own header policy between client and upstream: what a client may not
//! send in any spelling ([`scrub_request`]), and what the gateway adds: `X-Forwarded-*`,
//! `X-Request-Id`, `Via` and `traceparent`. (Hop-by-hop fields are the protocol's:
//! [`crate::http1::fields`].)
//!
//! Order matters for safety: the client's `Connection` list is applied first, before auth
//! and policy add their headers, so a client can never make the gateway drop a header it set.

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};

use crate::http1::fields::ExtraFields;
use crate::owned_headers::is_gateway_owned;
use crate::trace_context::TRACEPARENT;

pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
pub static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
pub static VIA_VALUE: HeaderValue = HeaderValue::from_static("1.1 switchyard");

/// Headers a client may not send, whatever their spelling: `Forwarded`, `X-Real-IP` and
/// `X-Forwarded-*` other than `-For` (the gateway's `X-Forwarded-For`, read from trusted
/// proxies only, is the one account of the client's address; scheme, host, port and
/// prefix claims are not the client's to make), `Expect`, and,
/// since many backends fold `_` into `-` (CGI-style environments, PHP, some Node and
/// Ruby stacks), any name with an underscore: all of them unless `underscores` allows
/// them (nginx's `underscores_in_headers`), and then still those that fold into a name
/// the gateway sets, reads or strips. Identity and assertion headers are folded when
/// they are stripped
/// ([`strip_forged`](crate::auth::identity_headers::strip_forged)).
pub fn scrub_request(headers: &mut HeaderMap, underscores: bool) {
    let mut doomed: Vec<HeaderName> = Vec::new();
    for name in headers.keys() {
        let text = name.as_str();
        let refused = if text.as_bytes().contains(&b'_') {
            !underscores || is_gateway_owned(&text.replace('_', "-"))
        } else {
            is_client_claim(text)
        };
        if refused {
            doomed.push(name.clone());
        }
    }
    for name in &doomed {
        headers.remove(name);
    }
}

/// A header only a proxy may set, which the gateway does not take from clients: what
/// the client says of its own address, of the scheme, port or prefix it used, and
/// `Expect` (the gateway answers expectations itself and never forwards them).
fn is_client_claim(name: &str) -> bool {
    match name.len() {
        6 => name == "expect",
        9 => name == "forwarded" || name == "x-real-ip",
        15 => false,
        n if n > 12 => name.starts_with("x-forwarded-"),
        _ => false,
    }
}

/// The headers the gateway sets on a request it forwards: `X-Forwarded-For/-Proto/-Host`,
/// `X-Request-Id`, `traceparent` and its own `Via` entry. They stay out of the request's
/// map: an HTTP/1.1 head gets them written after the client's headers (the client's
/// copies of all but `Via` are skipped, however many it sent), an HTTP/2 request has them
/// inserted into its own copy of the map.
pub struct Forwarded<'a> {
    pub xff: HeaderValue,
    pub proto: &'static str,
    /// The host the client asked for, already checked to be a plain host name.
    pub host: &'a str,
    pub request_id: HeaderValue,
    /// The request's trace with the gateway's span as parent
    /// ([`crate::trace_context::TraceContext::traceparent`]).
    pub traceparent: [u8; 55],
}

impl Forwarded<'_> {
    /// Whether the gateway sets `name` itself, so a client's copy never goes upstream.
    pub fn replaces(name: &HeaderName) -> bool {
        // Lengths first: a standard name never pays for a string comparison.
        match name.as_str().len() {
            11 => name == TRACEPARENT,
            12 => name == X_REQUEST_ID,
            15 => name == X_FORWARDED_FOR,
            16 => name == X_FORWARDED_HOST,
            17 => name == X_FORWARDED_PROTO,
            _ => false,
        }
    }

    /// The value the gateway sends for `name`, if it sets it (`Via` aside, which it
    /// appends to).
    pub fn get(&self, name: &HeaderName) -> Option<&[u8]> {
        if !Self::replaces(name) {
            return None;
        }
        Some(if name == X_FORWARDED_FOR {
            self.xff.as_bytes()
        } else if name == X_FORWARDED_PROTO {
            self.proto.as_bytes()
        } else if name == X_FORWARDED_HOST {
            self.host.as_bytes()
        } else if name == TRACEPARENT {
            &self.traceparent
        } else {
            self.request_id.as_bytes()
        })
    }

    /// Appends the headers to an HTTP/1.1 head being written.
    pub fn write(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(b"x-forwarded-for: ");
        out.extend_from_slice(self.xff.as_bytes());
        out.extend_from_slice(b"\r\nx-forwarded-proto: ");
        out.extend_from_slice(self.proto.as_bytes());
        if !self.host.is_empty() {
            out.extend_from_slice(b"\r\nx-forwarded-host: ");
            out.extend_from_slice(self.host.as_bytes());
        }
        out.extend_from_slice(b"\r\ntraceparent: ");
        out.extend_from_slice(&self.traceparent);
        out.extend_from_slice(b"\r\n");
        write_id_and_via(out, &self.request_id);
    }

    /// Puts the headers into a map, replacing the client's copies.
    pub fn insert_into(&self, headers: &mut HeaderMap) {
        headers.insert(&X_FORWARDED_FOR, self.xff.clone());
        headers.insert(&X_FORWARDED_PROTO, HeaderValue::from_static(self.proto));
        match HeaderValue::from_str(self.host) {
            Ok(v) if !self.host.is_empty() => headers.insert(&X_FORWARDED_HOST, v),
            _ => headers.remove(&X_FORWARDED_HOST),
        };
        headers.insert(&X_REQUEST_ID, self.request_id.clone());
        if let Ok(v) = HeaderValue::from_bytes(&self.traceparent) {
            headers.insert(&TRACEPARENT, v);
        }
        add_via(headers);
    }
}

impl ExtraFields for Forwarded<'_> {
    fn replaces(&self, name: &HeaderName) -> bool {
        Forwarded::replaces(name)
    }

    fn replaced_lengths(&self) -> u64 {
        1 << 11 | 1 << 12 | 1 << 15 | 1 << 16 | 1 << 17
    }

    fn write(&self, out: &mut Vec<u8>) {
        Forwarded::write(self, out)
    }
}

/// What the gateway stamps on every answer it sends over HTTP/1.1: its `X-Request-Id`
/// (replacing an upstream's) and its `Via` entry, written straight into the head.
pub struct AnswerStamp(pub HeaderValue);

impl ExtraFields for AnswerStamp {
    fn replaces(&self, name: &HeaderName) -> bool {
        name.as_str().len() == X_REQUEST_ID.as_str().len() && name == X_REQUEST_ID
    }

    fn replaced_lengths(&self) -> u64 {
        1 << 12
    }

    fn write(&self, out: &mut Vec<u8>) {
        write_id_and_via(out, &self.0)
    }
}

/// Appends `X-Request-Id` and the gateway's `Via` entry to an HTTP/1.1 head being
/// written: what the gateway adds to every request it forwards and every answer it sends.
pub fn write_id_and_via(out: &mut Vec<u8>, request_id: &HeaderValue) {
    out.extend_from_slice(b"x-request-id: ");
    out.extend_from_slice(request_id.as_bytes());
    out.extend_from_slice(b"\r\nvia: ");
    out.extend_from_slice(VIA_VALUE.as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// The client's `X-Request-Id` when it is sane (1–128 visible characters from a safe
/// set), else a fresh random one.
pub fn request_id(headers: &HeaderMap) -> HeaderValue {
    if let Some(v) = headers.get(&X_REQUEST_ID) {
        let b = v.as_bytes();
        if !b.is_empty()
            && b.len() <= 128
            && b.iter().all(|c| {
                c.is_ascii_alphanumeric()
                    || matches!(c, b'-' | b'_' | b'.' | b':' | b'+' | b'/' | b'=')
            })
        {
            return v.clone();
        }
    }
    new_request_id()
}

/// 128 random bits as 32 lower-case hex digits.
pub fn new_request_id() -> HeaderValue {
    let text = crate::hex::u128_digits(rand::random());
    // Owned by a shared buffer: the request and the response each hold a reference.
    // SAFETY: hex digits are visible ASCII, which a `HeaderValue` may hold.
    unsafe { HeaderValue::from_maybe_shared_unchecked(Bytes::from_owner(text)) }
}

/// Appends the gateway to `Via`.
pub fn add_via(headers: &mut HeaderMap) {
    headers.append(header::VIA, VIA_VALUE.clone());
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::identity_headers::folds_into;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        h
    }

    #[test]
    fn underscored_names_and_forwarding_claims_are_scrubbed() {
        let sent = [
            ("x_user_id", "admin"),
            ("X-User_Id", "admin"),
            ("transfer_encoding", "chunked"),
            ("x_forwarded_for", "1.2.3.4"),
            ("x_forwarded_prefix", "/admin"),
            ("x-forwarded-port", "443"),
            ("x-forwarded-prefix", "/admin"),
            ("forwarded", "for=1.2.3.4"),
            ("x-real-ip", "1.2.3.4"),
            ("expect", "100-continue"),
            ("x_custom", "1"),
            ("x-kept", "1"),
            ("x-forwarded-for", "1.2.3.4"),
        ];
        let mut h = map(&sent);
        scrub_request(&mut h, false);
        let kept: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(
            kept,
            ["x-forwarded-for", "x-kept"],
            "the chain is read from trusted proxies only, and rewritten"
        );
        let mut h = map(&sent);
        scrub_request(&mut h, true);
        let mut kept: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        kept.sort();
        assert_eq!(
            kept,
            [
                "x-forwarded-for",
                "x-kept",
                "x-user_id",
                "x_custom",
                "x_user_id"
            ],
            "allowed underscores stay unless they fold into a name the gateway owns \
             (identity names are folded where they are stripped)"
        );
        assert!(folds_into("x_user_id", "x-user-id"));
        assert!(!folds_into("x_user_idx", "x-user-id"));
    }

    #[test]
    fn forwarded_headers_are_written_and_named() {
        let f = Forwarded {
            xff: HeaderValue::from_static("10.0.0.1, 127.0.0.1"),
            proto: "https",
            host: "api.example.com",
            request_id: HeaderValue::from_static("id-1"),
            traceparent: *b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        };
        let mut out = Vec::new();
        f.write(&mut out);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "x-forwarded-for: 10.0.0.1, 127.0.0.1\r\nx-forwarded-proto: https\r\n\
             x-forwarded-host: api.example.com\r\n\
             traceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\r\n\
             x-request-id: id-1\r\nvia: 1.1 switchyard\r\n"
        );
        for name in [
            &X_FORWARDED_FOR,
            &X_FORWARDED_PROTO,
            &X_FORWARDED_HOST,
            &X_REQUEST_ID,
            &TRACEPARENT,
        ] {
            assert!(Forwarded::replaces(name), "{name}");
            let mut map = HeaderMap::new();
            f.insert_into(&mut map);
            assert_eq!(f.get(name), Some(map[name].as_bytes()), "{name}");
        }
        for name in [&header::VIA, &header::HOST, &header::CONTENT_TYPE] {
            assert!(
                !Forwarded::replaces(name) && f.get(name).is_none(),
                "{name}"
            );
        }
        let mut map = self::map(&[
            ("x-forwarded-host", "forged"),
            ("via", "1.0 a"),
            ("traceparent", "forged-1"),
            ("traceparent", "forged-2"),
        ]);
        let hostless = Forwarded { host: "", ..f };
        hostless.insert_into(&mut map);
        assert!(
            !map.contains_key(&X_FORWARDED_HOST),
            "the client's copy goes"
        );
        let via: Vec<_> = map.get_all(header::VIA).iter().collect();
        assert_eq!(via, ["1.0 a", "1.1 switchyard"]);
        let traceparent: Vec<_> = map.get_all(&TRACEPARENT).iter().collect();
        assert_eq!(
            traceparent,
            [&f.traceparent[..]],
            "exactly the gateway's one"
        );
        let mut out = Vec::new();
        hostless.write(&mut out);
        assert!(!String::from_utf8(out).unwrap().contains("host"));
    }

    #[test]
    fn new_request_ids_are_32_hex_digits_and_differ() {
        let a = new_request_id();
        let b = new_request_id();
        assert_ne!(a, b);
        assert_eq!(a.len(), 32);
        assert!(a
            .as_bytes()
            .iter()
            .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
    }

    #[test]
    fn request_ids_are_kept_when_sane() {
        let h = map(&[("x-request-id", "abc-123")]);
        assert_eq!(request_id(&h), "abc-123");
        for bad in ["", "a b", "<script>", &"x".repeat(200)] {
            let mut h = HeaderMap::new();
            if let Ok(v) = HeaderValue::from_str(bad) {
                h.insert(&X_REQUEST_ID, v);
            }
            let id = request_id(&h);
            assert_eq!(id.len(), 32, "{bad:?} replaced");
        }
    }
}
