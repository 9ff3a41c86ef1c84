//! Header names only the gateway writes on a forwarded request: framing and hop-by-hop
//! fields, the forwarding account of the client (`X-Forwarded-*`, `Forwarded`,
//! `X-Real-IP`), `X-Request-Id`, `Via` and the trace context (`traceparent`, always
//! rewritten, and `tracestate`, passed on only with a trace it continues). A client never gets them through in any
//! spelling ([`crate::proxy::headers::scrub_request`]), and an operator's header rules may
//! not set or remove them ([`crate::rewrite`]): one list, so the two cannot drift apart.

/// Whether `name` (lower case, `-` for `_`) is one the gateway sets, reads for framing or
/// routing, or strips.
pub fn is_gateway_owned(name: &str) -> bool {
    is_answer_owned(name)
        || FORWARDING.contains(&name)
        || TRACE_CONTEXT.contains(&name)
        || name.starts_with("x-forwarded-")
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

/// The W3C trace context ([`crate::trace_context`]): the client may send it, the gateway
/// decides what goes upstream.
static TRACE_CONTEXT: [&str; 2] = ["traceparent", "tracestate"];

static STAMPED: [&str; 2] = ["x-request-id", "via"];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwarding_framing_and_stamped_names_are_owned() {
        for name in [
            "host",
            "x-forwarded-prefix",
            "forwarded",
            "via",
            "te",
            "traceparent",
            "tracestate",
        ] {
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
