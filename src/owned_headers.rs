//! Header names only the gateway writes on a forwarded request: framing and hop-by-hop
//! fields, the forwarding account of the client (`X-Forwarded-*`, `Forwarded`,
//! `X-Real-IP`), `X-Request-Id` and `Via`. A client never gets them through in any
//! spelling ([`crate::proxy::headers::scrub_request`]), and an operator's header rules may
//! not set or remove them ([`crate::rewrite`]): one list, so the two cannot drift apart.

/// Whether `name` (lower case, `-` for `_`) is one the gateway sets, reads for framing or
/// routing, or strips.
pub fn is_gateway_owned(name: &str) -> bool {
    is_answer_owned(name) || FORWARDING.contains(&name) || name.starts_with("x-forwarded-")
}

/// Whether `name` (lower case) frames an answer or belongs to one hop, or is one the
/// gateway stamps on every answer (`X-Request-Id`, `Via`).
pub fn is_answer_owned(name: &str) -> bool {
    FRAMING.contains(&name) || STAMPED.contains(&name)
}

/// Fields that frame a message or belong to one hop.
static FRAMING: [&str; 8] = [
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "proxy-connection",
    "upgrade",
    "te",
    "trailer",
];

/// What the gateway says of the request and its client, and stamps on every message.
static FORWARDING: [&str; 8] = [
    "host",
    "expect",
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
    "x-forwarded-port",
    "forwarded",
    "x-real-ip",
];

static STAMPED: [&str; 2] = ["x-request-id", "via"];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwarding_framing_and_stamped_names_are_owned() {
        for name in ["host", "x-forwarded-prefix", "forwarded", "via", "te"] {
            assert!(is_gateway_owned(name), "{name}");
        }
        for name in ["x-tenant", "authorization", "cookie", "x-forwarded"] {
            assert!(!is_gateway_owned(name), "{name}");
        }
        assert!(is_answer_owned("transfer-encoding"));
        assert!(is_answer_owned("x-request-id"));
        assert!(!is_answer_owned("host"));
        assert!(!is_answer_owned("cache-control"));
    }
}
