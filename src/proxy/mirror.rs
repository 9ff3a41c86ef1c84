//! Request mirroring (a route's `mirror`): a copy of a sampled request goes to the
//! mirror service and its answer is thrown away. It must never slow or fail the real
//! request, so a copy is sent by a task of its own, only when the request body is already
//! in memory (empty, or buffered for retries), only when one of the gateway-wide
//! `proxy.mirror_max_in_flight` slots is free at once (it never waits for one), and its
//! answer is read and dropped (at most [`MAX_DISCARDED`] bytes, then its connection goes).
//! As Envoy does, the copy's `Host` gets `-shadow` appended to its host name, so the mirror
//! service can tell copies from real traffic.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Uri};
use http_body_util::BodyExt;
use tokio::sync::Semaphore;

use super::body::UpstreamBody;
use super::headers::Forwarded;
use super::upstream::{ClientKey, Clients};
use crate::balance::mirror::MirrorTarget;
use crate::balance::{self, LbPolicy, OutlierSpec, Tried};
use crate::discovery::now_ms;
use crate::http1::client::RequestHead;

/// Most bytes of a mirror's answer read (and thrown away) to keep its connection.
const MAX_DISCARDED: usize = 1 << 20;

/// Sends copies; shared by every request.
pub struct Mirrors {
    clients: Arc<Clients>,
    slots: Arc<Semaphore>,
}

/// Everything a copy needs, owned, so it can outlive the request.
pub struct MirrorCopy {
    pub method: Method,
    pub uri: Uri,
    pub headers: HeaderMap,
    pub body: Option<Bytes>,
    pub xff: HeaderValue,
    pub proto: &'static str,
    pub host: String,
    pub request_id: HeaderValue,
    /// The request's own `traceparent`: the copy belongs to the same trace.
    pub traceparent: [u8; 55],
    pub key: ClientKey,
    pub timeout: Duration,
}

impl Mirrors {
    pub fn new(clients: Arc<Clients>, max_in_flight: usize) -> Mirrors {
        Mirrors {
            clients,
            slots: Arc::new(Semaphore::new(max_in_flight)),
        }
    }

    /// Sends a copy when the target samples this request and a slot is free; `copy` is
    /// only built then.
    pub fn send(&self, target: &Arc<MirrorTarget>, copy: impl FnOnce() -> Option<MirrorCopy>) {
        if !target.sample() {
            return;
        }
        let service = target.set.service.clone();
        let Some(copy) = copy() else {
            count(&service, "streaming_body");
            return;
        };
        let Ok(slot) = self.slots.clone().try_acquire_owned() else {
            count(&service, "busy");
            return;
        };
        let Some(index) = balance::pick(
            &target.set,
            LbPolicy::RoundRobin,
            None,
            Tried::default(),
            &OutlierSpec::default(),
            now_ms(),
        ) else {
            count(&service, "no_instance");
            return;
        };
        let set = target.set.clone();
        let clients = self.clients.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let timeout = copy.timeout;
            let result =
                tokio::time::timeout(timeout, send_copy(&clients, &set.endpoints[index], copy))
                    .await;
            let outcome = match result {
                Ok(Ok(())) => "answered",
                Ok(Err(e)) => {
                    tracing::debug!(%service, error = %e, "mirror copy failed");
                    "failed"
                }
                Err(_) => "timeout",
            };
            count(&service, outcome);
        });
    }
}

async fn send_copy(
    clients: &Clients,
    endpoint: &crate::discovery::Endpoint,
    mut copy: MirrorCopy,
) -> Result<(), super::upstream::UpstreamError> {
    shadow_host(&mut copy.headers);
    let forwarded = Forwarded {
        xff: copy.xff,
        proto: copy.proto,
        host: &copy.host,
        request_id: copy.request_id,
        traceparent: copy.traceparent,
    };
    let head = RequestHead {
        method: &copy.method,
        uri: &copy.uri,
        headers: &copy.headers,
        upgrade: false,
        extra: None,
    };
    let mut body = Some(match copy.body {
        Some(bytes) => UpstreamBody::Full(Some(bytes)),
        None => UpstreamBody::Empty,
    });
    let response = clients
        .send(&copy.key, endpoint, head, &forwarded, &mut body)
        .await?;
    let mut answer = response.into_body();
    let mut read = 0usize;
    while let Some(frame) = answer.frame().await {
        let Ok(frame) = frame else { break };
        read += frame.data_ref().map_or(0, Bytes::len);
        if read > MAX_DISCARDED {
            break;
        }
    }
    Ok(())
}

/// `Host: api.example.com:8080` → `Host: api.example.com-shadow:8080`.
fn shadow_host(headers: &mut HeaderMap) {
    let Some(host) = headers.get(header::HOST).and_then(|v| v.to_str().ok()) else {
        return;
    };
    let (name, port) = match host.rfind(':') {
        Some(colon) if !host.ends_with(']') => host.split_at(colon),
        _ => (host, ""),
    };
    if let Ok(value) = HeaderValue::from_str(&format!("{name}-shadow{port}")) {
        headers.insert(header::HOST, value);
    }
}

fn count(service: &str, result: &'static str) {
    metrics::counter!(crate::metrics::MIRROR_REQUESTS,
        "service" => service.to_string(), "result" => result)
    .increment(1);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_copy_names_a_shadow_host() {
        for (host, shadow) in [
            ("api.example.com", "api.example.com-shadow"),
            ("api.example.com:8080", "api.example.com-shadow:8080"),
            ("[::1]", "[::1]-shadow"),
            ("[::1]:81", "[::1]-shadow:81"),
        ] {
            let mut h = HeaderMap::new();
            h.insert(header::HOST, HeaderValue::from_str(host).unwrap());
            shadow_host(&mut h);
            assert_eq!(h[header::HOST], shadow, "{host}");
        }
    }
}
