//! What RFC 9110 and 9112 say of header fields, as both ends of a connection need it:
//! the hop-by-hop fields that never cross a proxy (§7.6.1), with every field a
//! `Connection` header names; which upgrade may pass (WebSocket only); which fields may
//! trail a body; which methods may be sent twice.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::Method;

static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");
/// A request that asks to switch to WebSocket, the one protocol switch the gateway
/// forwards: one `Upgrade` field naming `websocket` alone, and `Connection: upgrade`.
/// The lengths of the field names a request head came with, in one word (bit `n`: a name
/// of `n` bytes; 63 and longer share bit 63). A filter that tells, without a hash lookup,
/// that a request has no field of some name: an API client's request with a handful of
/// fields skips most of the lookups a gateway makes for optional ones (request id, trace
/// context, gRPC). Built for free while the head is parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NameLengths(u64);

impl NameLengths {
    /// For a request read some other way: any name may be there.
    pub const UNKNOWN: NameLengths = NameLengths(u64::MAX);
    pub const NONE: NameLengths = NameLengths(0);

    fn bit(len: usize) -> u64 {
        1 << len.min(63)
    }

    pub fn add(&mut self, len: usize) {
        self.0 |= Self::bit(len);
    }

    /// `false` only when the request has no field of this name.
    pub fn may_have(self, name: &HeaderName) -> bool {
        self.0 & Self::bit(name.as_str().len()) != 0
    }
}

pub fn wants_websocket(headers: &HeaderMap) -> bool {
    let mut upgrades = headers.get_all(header::UPGRADE).iter();
    let websocket = upgrades
        .next()
        .is_some_and(|v| v.as_bytes().trim_ascii().eq_ignore_ascii_case(b"websocket"));
    websocket && upgrades.next().is_none() && connection_lists(headers, "upgrade")
}

fn connection_lists(headers: &HeaderMap, token: &str) -> bool {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// The hop-by-hop names (RFC 9110 §7.6.1 and the historical ones), as bits of a mask.
static HOP_BY_HOP: [&HeaderName; 9] = [
    &header::CONNECTION,
    &KEEP_ALIVE,
    &PROXY_CONNECTION,
    &header::PROXY_AUTHENTICATE,
    &header::PROXY_AUTHORIZATION,
    &header::TRAILER,
    &header::TRANSFER_ENCODING,
    &header::TE,
    &header::UPGRADE,
];
const CONNECTION_BIT: u16 = 1;
const TE_BIT: u16 = 1 << 7;
const UPGRADE_BIT: u16 = 1 << 8;

/// Whether a hop-by-hop name could have this length: most names are ruled out by one
/// comparison instead of nine.
#[inline]
fn may_be_hop_by_hop(len: usize) -> bool {
    matches!(len, 2 | 7 | 10 | 16..=19)
}

fn hop_by_hop_bit(name: &HeaderName) -> u16 {
    if !may_be_hop_by_hop(name.as_str().len()) {
        return 0;
    }
    HOP_BY_HOP
        .iter()
        .position(|h| *h == name)
        .map_or(0, |i| 1 << i)
}

/// Whether a raw header name (any case) is hop-by-hop.
#[inline]
pub fn is_hop_by_hop(name: &str) -> bool {
    may_be_hop_by_hop(name.len())
        && HOP_BY_HOP
            .iter()
            .any(|h| super::codec::eq_lower(name.as_bytes(), h.as_str().as_bytes()))
}

/// Removes hop-by-hop headers and every header named in `Connection`. With `upgrade`,
/// `Connection: upgrade` and `Upgrade` are kept so the switch can be forwarded. `TE:
/// trailers` is kept (gRPC needs it); any other `TE` is dropped.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, upgrade: bool) {
    // One pass over the names finds which are present; only those are looked up again.
    let present = headers
        .keys()
        .fold(0, |mask, name| mask | hop_by_hop_bit(name));
    if present == 0 && !upgrade {
        return;
    }
    if present & CONNECTION_BIT != 0 {
        let named: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            // `close`, `keep-alive` and the other hop-by-hop names are handled below.
            .filter(|t| !t.eq_ignore_ascii_case("close") && !t.eq_ignore_ascii_case("keep-alive"))
            .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
            // `Connection: host` would send the request upstream without the name the
            // gateway routed it on.
            .filter(|name| hop_by_hop_bit(name) == 0 && name != header::HOST)
            .collect();
        for name in named {
            headers.remove(&name);
        }
    }
    for (i, name) in HOP_BY_HOP.iter().enumerate() {
        let bit = 1 << i;
        if present & bit == 0 || bit == TE_BIT || bit == UPGRADE_BIT {
            continue;
        }
        headers.remove(*name);
    }
    if present & TE_BIT != 0 {
        let trailers_only = headers
            .get(header::TE)
            .and_then(|te| te.to_str().ok())
            .is_some_and(|v| {
                v.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("trailers"))
            });
        headers.remove(header::TE);
        if trailers_only {
            headers.insert(header::TE, HeaderValue::from_static("trailers"));
        }
    }
    if upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    } else if present & UPGRADE_BIT != 0 {
        headers.remove(header::UPGRADE);
    }
}

/// Whether a response trailer may go to the client: not a field that frames, routes,
/// authenticates or describes the content (RFC 9110 §6.5.1), and no `_` spelling.
pub fn may_trail(name: &HeaderName) -> bool {
    let text = name.as_str();
    !(is_hop_by_hop(text)
        || text.as_bytes().contains(&b'_')
        || matches!(
            text,
            "content-length"
                | "content-encoding"
                | "content-type"
                | "content-range"
                | "host"
                | "set-cookie"
                | "www-authenticate"
                | "authorization"
                | "cache-control"
                | "expires"
                | "date"
                | "location"
                | "retry-after"
                | "vary"
        ))
}

/// Methods whose requests may be sent twice (RFC 9110 §9.2.2).
pub fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
    )
}

/// Header fields a layer above writes into a head itself, after the message's own: the
/// gateway's forwarding headers on requests, its request id and `Via` on answers.
pub trait ExtraFields: Sync {
    /// Whether the message's own field of this name is left out (this one replaces it).
    fn replaces(&self, name: &HeaderName) -> bool;
    /// The lengths of the names [`ExtraFields::replaces`] may say yes to, as bits (bit
    /// `n` for length `n`, bit 63 for 63 and over), so most fields are passed over
    /// without asking.
    fn replaced_lengths(&self) -> u64 {
        u64::MAX
    }
    /// Appends the fields, each ending in CRLF.
    fn write(&self, out: &mut Vec<u8>);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn name_lengths_rule_out_only_names_of_lengths_never_seen() {
        let mut names = NameLengths::NONE;
        names.add("host".len());
        names.add("content-type".len());
        names.add(200);
        assert!(names.may_have(&header::HOST));
        // Same length as content-type: only "maybe".
        assert!(names.may_have(&HeaderName::from_static("x-request-id")));
        assert!(!names.may_have(&HeaderName::from_static("traceparent")));
        assert!(!names.may_have(&header::ACCEPT));
        // Long names share the last bit.
        assert!(names.may_have(&HeaderName::from_static(
            "x-a-very-long-field-name-that-goes-on-past-sixty-three-bytes-of-length"
        )));
        assert!(NameLengths::UNKNOWN.may_have(&header::ACCEPT));
    }

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
    fn every_hop_by_hop_name_gets_its_bit() {
        for (i, name) in HOP_BY_HOP.iter().enumerate() {
            assert_eq!(hop_by_hop_bit(name), 1 << i, "{name}");
        }
        assert_eq!(
            hop_by_hop_bit(&header::USER_AGENT),
            0,
            "same length as connection"
        );
        assert_eq!(hop_by_hop_bit(&header::CONTENT_LENGTH), 0);
        assert!(is_hop_by_hop("Transfer-Encoding") && is_hop_by_hop("TE"));
        assert!(!is_hop_by_hop("User-Agent") && !is_hop_by_hop("x-te"));
    }

    #[test]
    fn hop_by_hop_and_connection_listed_headers_go() {
        let mut h = map(&[
            ("connection", "keep-alive, X-Secret"),
            ("x-secret", "1"),
            ("keep-alive", "timeout=5"),
            ("transfer-encoding", "chunked"),
            ("te", "gzip"),
            ("upgrade", "websocket"),
            ("proxy-authorization", "Basic x"),
            ("x-kept", "yes"),
        ]);
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.len(), 1, "{h:?}");
        assert_eq!(h["x-kept"], "yes");
    }

    #[test]
    fn only_websocket_upgrades_are_wanted() {
        assert!(wants_websocket(&map(&[
            ("connection", "keep-alive, Upgrade"),
            ("upgrade", "WebSocket"),
        ])));
        for refused in [
            &[("connection", "upgrade"), ("upgrade", "h2c")][..],
            &[("connection", "upgrade"), ("upgrade", "websocket, h2c")],
            &[("connection", "upgrade"), ("upgrade", "h2c, websocket")],
            &[
                ("connection", "upgrade"),
                ("upgrade", "websocket"),
                ("upgrade", "h2c"),
            ],
            &[("upgrade", "websocket")],
        ] {
            assert!(!wants_websocket(&map(refused)), "{refused:?}");
        }
    }

    #[test]
    fn connection_cannot_take_the_host_away() {
        let mut h = map(&[("connection", "host, x-a"), ("host", "a"), ("x-a", "1")]);
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h["host"], "a");
        assert!(!h.contains_key("x-a"));
    }

    #[test]
    fn framing_and_routing_fields_never_trail() {
        for name in [
            "content-length",
            "transfer-encoding",
            "host",
            "connection",
            "x_a",
        ] {
            assert!(!may_trail(&HeaderName::from_static(name)), "{name}");
        }
        assert!(may_trail(&HeaderName::from_static("grpc-status")));
        assert!(may_trail(&HeaderName::from_static("x-checksum")));
    }

    #[test]
    fn upgrades_and_grpc_trailers_survive() {
        let mut h = map(&[
            ("connection", "Upgrade"),
            ("upgrade", "websocket"),
            ("te", "trailers"),
        ]);
        assert!(wants_websocket(&h));
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h["upgrade"], "websocket");
        assert_eq!(h["connection"], "upgrade");
        assert_eq!(h["te"], "trailers");
    }
}
