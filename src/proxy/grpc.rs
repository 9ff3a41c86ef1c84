//! What the gateway knows of gRPC's wire format, so that a gRPC client refused by the
//! gateway hears it in gRPC's terms (grpc/grpc `doc/PROTOCOL-HTTP2.md`,
//! `doc/PROTOCOL-WEB.md`): which requests are gRPC calls, the status codes, and the
//! percent-encoding of `grpc-message`. Which error gets which code is decided in
//! [`super::error`].

use http::header::CONTENT_TYPE;
use http::{HeaderMap, HeaderValue};
use percent_encoding::{utf8_percent_encode, AsciiSet, CONTROLS};

/// The gRPC protocol a request speaks, from its `Content-Type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GrpcProtocol {
    /// `application/grpc`, `application/grpc+<codec>` (gRPC over HTTP/2).
    Grpc,
    /// `application/grpc-web`, `application/grpc-web+<codec>`.
    GrpcWeb,
    /// `application/grpc-web-text`, `application/grpc-web-text+<codec>` (base64 bodies).
    GrpcWebText,
}

impl GrpcProtocol {
    /// The protocol of a request with these headers: `None` unless it has exactly one
    /// `Content-Type` and that is one of gRPC's media types.
    pub fn of_request(headers: &HeaderMap) -> Option<GrpcProtocol> {
        let mut values = headers.get_all(CONTENT_TYPE).iter();
        let value = values.next()?;
        if values.next().is_some() {
            return None;
        }
        GrpcProtocol::from_content_type(value.as_bytes())
    }

    /// Parses a `Content-Type` value (RFC 9110 §8.3.1: `type "/" subtype *( OWS ";" OWS
    /// [ parameter ] )`): the type and subtype are matched whole, case-insensitively, so
    /// `application/grpcx` or `application/grpc-webby` are not gRPC; a `+codec` suffix
    /// must be a token; parameters must be well formed (token `=` token or
    /// quoted-string) and are otherwise ignored.
    pub fn from_content_type(value: &[u8]) -> Option<GrpcProtocol> {
        let end = value.iter().position(|&b| b == b';').unwrap_or(value.len());
        let (essence, parameters) = value.split_at(end);
        let essence = trim_trailing_ows(essence);
        let (main_type, subtype) = split_once(essence, b'/')?;
        if !main_type.eq_ignore_ascii_case(b"application") {
            return None;
        }
        let (base, codec) = match split_once(subtype, b'+') {
            Some((base, codec)) => (base, Some(codec)),
            None => (subtype, None),
        };
        if codec.is_some_and(|c| c.is_empty() || !c.iter().all(|&b| is_tchar(b))) {
            return None;
        }
        let protocol = if base.eq_ignore_ascii_case(b"grpc") {
            GrpcProtocol::Grpc
        } else if base.eq_ignore_ascii_case(b"grpc-web") {
            GrpcProtocol::GrpcWeb
        } else if base.eq_ignore_ascii_case(b"grpc-web-text") {
            GrpcProtocol::GrpcWebText
        } else {
            return None;
        };
        well_formed_parameters(parameters).then_some(protocol)
    }

    /// The `Content-Type` of the gateway's own answer: the protocol's media type, without
    /// a codec (a Trailers-Only answer carries no message to encode).
    pub fn content_type(self) -> HeaderValue {
        HeaderValue::from_static(match self {
            GrpcProtocol::Grpc => "application/grpc",
            GrpcProtocol::GrpcWeb => "application/grpc-web",
            GrpcProtocol::GrpcWebText => "application/grpc-web-text",
        })
    }
}

/// gRPC's status codes (grpc/grpc `doc/statuscodes.md`), those the gateway answers with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GrpcCode {
    Unknown = 2,
    DeadlineExceeded = 4,
    PermissionDenied = 7,
    ResourceExhausted = 8,
    Unimplemented = 12,
    Internal = 13,
    Unavailable = 14,
    Unauthenticated = 16,
}

impl GrpcCode {
    /// The `grpc-status` value: the code in decimal, without leading zeros.
    pub fn header_value(self) -> HeaderValue {
        HeaderValue::from_static(match self {
            GrpcCode::Unknown => "2",
            GrpcCode::DeadlineExceeded => "4",
            GrpcCode::PermissionDenied => "7",
            GrpcCode::ResourceExhausted => "8",
            GrpcCode::Unimplemented => "12",
            GrpcCode::Internal => "13",
            GrpcCode::Unavailable => "14",
            GrpcCode::Unauthenticated => "16",
        })
    }
}

/// What `grpc-message` leaves as it is: space and visible ASCII except `%`
/// (`Percent-Byte-Unencoded`); everything else, UTF-8 beyond ASCII included, is `%XX`.
const MESSAGE_ESCAPED: &AsciiSet = &CONTROLS.add(b'%');

/// A `grpc-message` value: `message` as UTF-8, percent-encoded as gRPC says.
pub fn message_value(message: &str) -> HeaderValue {
    let encoded = utf8_percent_encode(message, MESSAGE_ESCAPED).to_string();
    // Only visible ASCII and spaces are left, which a header value always accepts.
    HeaderValue::from_str(&encoded).unwrap_or_else(|_| HeaderValue::from_static(""))
}

fn split_once(bytes: &[u8], at: u8) -> Option<(&[u8], &[u8])> {
    let i = bytes.iter().position(|&b| b == at)?;
    Some((&bytes[..i], &bytes[i + 1..]))
}

fn trim_trailing_ows(mut bytes: &[u8]) -> &[u8] {
    while let [rest @ .., b' ' | b'\t'] = bytes {
        bytes = rest;
    }
    bytes
}

fn skip_ows(mut bytes: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = bytes {
        bytes = rest;
    }
    bytes
}

/// RFC 9110 §5.6.2 `tchar`.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// `*( OWS ";" OWS [ token "=" ( token / quoted-string ) ] )` to the end of `rest`.
fn well_formed_parameters(mut rest: &[u8]) -> bool {
    loop {
        rest = skip_ows(rest);
        let Some(after) = rest.strip_prefix(b";") else {
            return rest.is_empty();
        };
        rest = skip_ows(after);
        if rest.is_empty() || rest[0] == b';' {
            continue;
        }
        let name = rest.iter().take_while(|&&b| is_tchar(b)).count();
        if name == 0 || rest.get(name) != Some(&b'=') {
            return false;
        }
        rest = &rest[name + 1..];
        let value = if rest.first() == Some(&b'"') {
            match quoted_string_len(rest) {
                Some(n) => n,
                None => return false,
            }
        } else {
            rest.iter().take_while(|&&b| is_tchar(b)).count()
        };
        if value == 0 {
            return false;
        }
        rest = &rest[value..];
    }
}

/// The length of the quoted-string `bytes` starts with (RFC 9110 §5.6.4), quotes
/// included; `None` when it does not end. Stricter than the RFC: no obs-text.
fn quoted_string_len(bytes: &[u8]) -> Option<usize> {
    let mut i = 1;
    while i < bytes.len() {
        match bytes[i] {
            b'"' => return Some(i + 1),
            b'\\' => match bytes.get(i + 1) {
                Some(&b) if b == b'\t' || (0x20..0x7f).contains(&b) => i += 2,
                _ => return None,
            },
            b'\t' | 0x20..=0x7e => i += 1,
            _ => return None,
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(value: &str) -> Option<GrpcProtocol> {
        GrpcProtocol::from_content_type(value.as_bytes())
    }

    #[test]
    fn the_media_types_of_grpc_and_grpc_web_are_recognised() {
        use GrpcProtocol::*;
        for (value, protocol) in [
            ("application/grpc", Grpc),
            ("application/grpc+proto", Grpc),
            ("application/grpc+json", Grpc),
            ("Application/GRPC+Proto", Grpc),
            ("application/grpc-web", GrpcWeb),
            ("application/grpc-web+proto", GrpcWeb),
            ("application/grpc-web-text", GrpcWebText),
            ("application/grpc-web-text+proto", GrpcWebText),
            ("application/grpc; charset=utf-8", Grpc),
            ("application/grpc ;a=b;c=\"d;e\\\"f\"", Grpc),
            ("application/grpc;", Grpc),
            ("application/grpc;;a=b ;", Grpc),
            ("application/grpc+a+b", Grpc),
        ] {
            assert_eq!(parse(value), Some(protocol), "{value}");
        }
    }

    #[test]
    fn near_misses_are_not_grpc() {
        for value in [
            "",
            "application/grpcx",
            "application/grpc-webby",
            "application/grpc-web-textual",
            "application/grpc-",
            "application/grpc+",
            "application/grpc+pro to",
            "application/grpc+proto/x",
            "application/grpc/x",
            "text/grpc",
            "application/json",
            "applications/grpc",
            " application/grpc",
            "application /grpc",
            "application/ grpc",
            "application/grpc, application/json",
            "application/grpc; charset",
            "application/grpc; =x",
            "application/grpc; a=",
            "application/grpc; a=b c",
            "application/grpc; a=\"unterminated",
            "application/grpc; a=\"bad\\\u{7f}\"",
            "application/grpc; a=\"x\"y",
            "application/grpc\u{0}",
            "application/grpc\r\n",
            "application/grpc-web-text-base64",
        ] {
            assert_eq!(parse(value), None, "{value:?}");
        }
        let non_ascii = b"application/grpc; a=\"\xe9\"";
        assert_eq!(GrpcProtocol::from_content_type(non_ascii), None);
    }

    #[test]
    fn only_a_single_content_type_makes_a_grpc_call() {
        let mut headers = HeaderMap::new();
        assert_eq!(GrpcProtocol::of_request(&headers), None);
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
        assert_eq!(GrpcProtocol::of_request(&headers), Some(GrpcProtocol::Grpc));
        headers.append(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
        assert_eq!(GrpcProtocol::of_request(&headers), None, "ambiguous");
    }

    #[test]
    fn the_answer_content_type_reads_back_as_the_same_protocol() {
        for p in [
            GrpcProtocol::Grpc,
            GrpcProtocol::GrpcWeb,
            GrpcProtocol::GrpcWebText,
        ] {
            assert_eq!(
                GrpcProtocol::from_content_type(p.content_type().as_bytes()),
                Some(p)
            );
        }
    }

    #[test]
    fn messages_are_percent_encoded_as_grpc_says() {
        assert_eq!(message_value("no route matches"), "no route matches");
        assert_eq!(message_value("100% sure"), "100%25 sure");
        assert_eq!(message_value("a\r\nb\t"), "a%0D%0Ab%09");
        assert_eq!(message_value("café ✓"), "caf%C3%A9 %E2%9C%93");
        assert_eq!(
            message_value("~!\"#$&'()*+,/:;<=>?@[\\]^_`{|}"),
            "~!\"#$&'()*+,/:;<=>?@[\\]^_`{|}"
        );
        assert_eq!(message_value("\u{7f}"), "%7F");
    }
}
