//! WAN federation as the HTTP API shows it: the registry's datacenter name, the peers it
//! knows (datacenter name → base URL), and a request for another datacenter forwarded to
//! its peer, as a Consul server forwards the RPC to a server of that datacenter: the peer
//! runs the query (blocking parameters included) and its answer comes back as it is, status,
//! body and `X-Consul-*` headers.
//!
//! Consul's words for the failures: a datacenter nobody knows is `500 No path to
//! datacenter`; a known one none of whose servers answers is `500 Remote DC has no server
//! currently reachable`; a failure half-way is the RPC error, `500 rpc error making call: …`.

use std::collections::BTreeMap;
use std::sync::RwLock;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::header::{
    HeaderName, AUTHORIZATION, CACHE_CONTROL, CONNECTION, CONTENT_LENGTH, CONTENT_TYPE, DATE,
    TRANSFER_ENCODING, UPGRADE,
};
use http::{HeaderMap, Method, Response, Uri};
use http_body_util::Full;

use crate::devregistry::error::ApiError;
use crate::devregistry::params::{self, Query};

/// Consul's errors for a datacenter it cannot reach.
pub const NO_PATH: &str = "No path to datacenter";
pub const DC_NOT_AVAILABLE: &str = "Remote DC has no server currently reachable";

/// How long a peer may take to accept a connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a non-blocking forwarded request may take.
const PLAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// Slack on top of a blocking request's wait (and the peer's jitter, up to wait/16).
const BLOCKING_SLACK: Duration = Duration::from_secs(10);
/// The largest answer taken from a peer.
const ANSWER_MAX: usize = 64 * 1024 * 1024;
/// Marks a forwarded request. A request that arrives marked is never forwarded again, so a
/// peer URL that leads back (to this registry, or to one that names the datacenter
/// differently) ends in `No path to datacenter` instead of a loop.
const FORWARDED_MARK: HeaderName = HeaderName::from_static("x-switchyard-wan-forwarded");
/// Request headers a forwarded request carries (the token goes on, as in Consul's RPC).
const FORWARDED_REQUEST_HEADERS: [HeaderName; 4] = [
    AUTHORIZATION,
    CACHE_CONTROL,
    CONTENT_TYPE,
    HeaderName::from_static("x-consul-token"),
];

/// A bad datacenter name or WAN peer.
#[derive(Debug, thiserror::Error)]
pub enum WanConfigError {
    #[error("datacenter cannot be {0:?}. Please use only [a-z0-9-_].")]
    BadName(String),
    #[error("WAN peer {0:?}: expected NAME=http://HOST:PORT")]
    BadFlag(String),
    #[error("WAN peer {name}: {reason}")]
    BadUrl { name: String, reason: String },
    #[error("WAN peer {0} has this registry's own datacenter name")]
    OwnName(String),
    #[error("WAN peer {0} is given twice")]
    Twice(String),
    #[error("cannot build the HTTP client for WAN peers: {0}")]
    Client(String),
}

/// A datacenter name as Consul takes it from its configuration: lower-cased, then only
/// `[a-z0-9-_]`.
pub fn datacenter_name(name: &str) -> Result<String, WanConfigError> {
    let lower = name.to_ascii_lowercase();
    let valid = !lower.is_empty()
        && lower
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
    if valid {
        Ok(lower)
    } else {
        Err(WanConfigError::BadName(name.to_string()))
    }
}

/// `NAME=http://HOST:PORT`, as `--wan` takes it: the datacenter name and the peer's base
/// URL, both checked and in their normal form (parsing that form again gives it back).
pub fn parse_wan_flag(flag: &str) -> Result<(String, String), WanConfigError> {
    let (name, url) = flag
        .split_once('=')
        .ok_or_else(|| WanConfigError::BadFlag(flag.to_string()))?;
    let name = datacenter_name(name)?;
    let url = peer_url(&name, url)?;
    Ok((name, url))
}

/// A peer's base URL: `http://host:port`, nothing else (no credentials, path, query).
fn peer_url(name: &str, raw: &str) -> Result<String, WanConfigError> {
    let bad = |reason: &str| WanConfigError::BadUrl {
        name: name.to_string(),
        reason: reason.to_string(),
    };
    let url = url::Url::parse(raw).map_err(|e| bad(&format!("{raw:?} is not a URL: {e}")))?;
    if url.scheme() != "http" {
        return Err(bad("only http:// peers are supported"));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(bad("the URL has no host"));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(bad("the URL may not carry credentials"));
    }
    if url.path() != "/" || url.query().is_some() || url.fragment().is_some() {
        return Err(bad("the URL may not have a path, query or fragment"));
    }
    let port = url
        .port_or_known_default()
        .ok_or_else(|| bad("the URL has no port"))?;
    let host = url.host_str().unwrap_or_default();
    Ok(format!("http://{host}:{port}"))
}

/// What a forwarded request keeps of the one it forwards (its body is read apart).
pub struct RequestHead {
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    forwarded: bool,
}

impl RequestHead {
    pub fn of<B>(req: &http::Request<B>) -> RequestHead {
        let mut headers = HeaderMap::new();
        for name in &FORWARDED_REQUEST_HEADERS {
            for value in req.headers().get_all(name) {
                headers.append(name.clone(), value.clone());
            }
        }
        RequestHead {
            method: req.method().clone(),
            uri: req.uri().clone(),
            headers,
            forwarded: req.headers().contains_key(&FORWARDED_MARK),
        }
    }
}

/// Where a request for a datacenter goes.
pub enum DatacenterRoute {
    Local,
    Peer(String),
    Unknown,
}

/// This registry's datacenter and its WAN peers.
pub struct WanPeers {
    own: String,
    peers: RwLock<BTreeMap<String, String>>,
    client: reqwest::Client,
}

impl WanPeers {
    pub fn new(own: &str, peers: &[(String, String)]) -> Result<WanPeers, WanConfigError> {
        let client = reqwest::Client::builder()
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(CONNECT_TIMEOUT)
            .build()
            .map_err(|e| WanConfigError::Client(e.to_string()))?;
        let wan = WanPeers {
            own: datacenter_name(own)?,
            peers: RwLock::default(),
            client,
        };
        for (name, url) in peers {
            wan.join(name, url, false)?;
        }
        Ok(wan)
    }

    /// This registry's datacenter name.
    pub fn own(&self) -> &str {
        &self.own
    }

    /// Adds a peer (`consul join -wan`); with `replace`, a known name gets the new URL.
    pub fn join(&self, name: &str, url: &str, replace: bool) -> Result<(), WanConfigError> {
        let name = datacenter_name(name)?;
        if name == self.own {
            return Err(WanConfigError::OwnName(name));
        }
        let url = peer_url(&name, url)?;
        let mut peers = self.peers.write().unwrap_or_else(|p| p.into_inner());
        if !replace && peers.contains_key(&name) {
            return Err(WanConfigError::Twice(name));
        }
        peers.insert(name, url);
        Ok(())
    }

    /// `GET /v1/catalog/datacenters`: Consul sorts by median round-trip time from this
    /// server, after a sort by name that ties keep. Its own datacenter is at distance 0;
    /// the registry measures no distance to its peers, so they tie, in name order.
    pub fn datacenters(&self) -> Vec<String> {
        let peers = self.peers.read().unwrap_or_else(|p| p.into_inner());
        std::iter::once(self.own.clone())
            .chain(peers.keys().cloned())
            .collect()
    }

    /// Where a request naming `dc` goes (names are compared exactly, as Consul does). A
    /// request another registry forwarded here goes to no further peer.
    pub fn route(&self, dc: &str, head: &RequestHead) -> DatacenterRoute {
        if dc == self.own {
            return DatacenterRoute::Local;
        }
        let peers = self.peers.read().unwrap_or_else(|p| p.into_inner());
        match peers.get(dc) {
            Some(_) if head.forwarded => {
                tracing::warn!(
                    datacenter = dc,
                    own = %self.own,
                    "a forwarded request names another datacenter again: a WAN peer URL leads to the wrong registry"
                );
                DatacenterRoute::Unknown
            }
            Some(url) => DatacenterRoute::Peer(url.clone()),
            None => DatacenterRoute::Unknown,
        }
    }

    /// Sends the request to the peer at `base` and answers with what it answered.
    pub async fn forward(
        &self,
        base: &str,
        head: &RequestHead,
        body: Bytes,
    ) -> Result<Response<Full<Bytes>>, ApiError> {
        let path = head.uri.path_and_query().map_or("/", |p| p.as_str());
        let q = Query::parse(head.uri.query());
        let answer = self
            .client
            .request(head.method.clone(), format!("{base}{path}"))
            .headers(head.headers.clone())
            .header(FORWARDED_MARK, self.own.as_str())
            .timeout(forward_timeout(&q))
            .body(body)
            .send()
            .await
            .map_err(|e| {
                if e.is_connect() {
                    ApiError::internal(DC_NOT_AVAILABLE)
                } else {
                    rpc_error(&e.to_string())
                }
            })?;
        let status = answer.status();
        let mut out_headers = answer.headers().clone();
        for hop in [CONNECTION, CONTENT_LENGTH, DATE, TRANSFER_ENCODING, UPGRADE] {
            out_headers.remove(hop);
        }
        out_headers.remove("keep-alive");
        out_headers.remove("x-consul-default-acl-policy");
        let body = read_answer(answer).await?;
        let mut resp = Response::new(Full::new(body));
        *resp.status_mut() = status;
        *resp.headers_mut() = out_headers;
        Ok(resp)
    }
}

fn rpc_error(detail: &str) -> ApiError {
    ApiError::internal(format!("rpc error making call: {detail}"))
}

/// A blocking request may take its wait (clamped as the peer clamps it) plus the peer's
/// jitter; anything else should be quick.
fn forward_timeout(q: &Query) -> Duration {
    match params::blocking(q, false) {
        Ok(b) if b.min_index > 0 => b.timeout + b.timeout / 16 + BLOCKING_SLACK,
        _ => PLAIN_TIMEOUT,
    }
}

async fn read_answer(mut answer: reqwest::Response) -> Result<Bytes, ApiError> {
    let mut buf = BytesMut::new();
    while let Some(chunk) = answer
        .chunk()
        .await
        .map_err(|e| rpc_error(&e.to_string()))?
    {
        if buf.len() + chunk.len() > ANSWER_MAX {
            return Err(rpc_error(&format!("the answer is over {ANSWER_MAX} bytes")));
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(buf.freeze())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn datacenter_names_follow_consuls_rule() {
        assert_eq!(datacenter_name("dc1").unwrap(), "dc1");
        assert_eq!(datacenter_name("EU-West_2").unwrap(), "eu-west_2");
        for bad in ["", "dc 1", "dc.1", "dc/1", "dé"] {
            assert!(datacenter_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn wan_flags_name_a_datacenter_and_a_plain_http_base_url() {
        assert_eq!(
            parse_wan_flag("dc1=http://127.0.0.1:8500").unwrap(),
            ("dc1".to_string(), "http://127.0.0.1:8500".to_string())
        );
        assert_eq!(
            parse_wan_flag("DC1=http://LocalHost").unwrap(),
            ("dc1".to_string(), "http://localhost:80".to_string())
        );
        assert!(parse_wan_flag("http://127.0.0.1:8500").is_err());
        assert!(parse_wan_flag("dc1=ftp://127.0.0.1:8500").is_err());
        let wan = WanPeers::new("dc2", &[]).unwrap();
        assert!(wan.join("dc1", "http://127.0.0.1:8500", false).is_ok());
        assert!(wan.join("dc3", "http://[::1]:8500", false).is_ok());
        assert!(wan.join("dc4", "http://localhost", false).is_ok());
        for bad in [
            "https://127.0.0.1:8500",
            "127.0.0.1:8500",
            "http://user:pw@127.0.0.1:8500",
            "http://127.0.0.1:8500/v1",
            "http://127.0.0.1:8500/?dc=dc1",
        ] {
            assert!(wan.join("dc5", bad, false).is_err(), "{bad}");
        }
        assert!(matches!(
            wan.join("dc2", "http://127.0.0.1:1", false),
            Err(WanConfigError::OwnName(_))
        ));
        assert!(matches!(
            wan.join("dc1", "http://127.0.0.1:1", false),
            Err(WanConfigError::Twice(_))
        ));
    }

    #[test]
    fn the_own_datacenter_comes_first_then_peers_by_name() {
        let peers = [
            ("dc3".to_string(), "http://127.0.0.1:3".to_string()),
            ("dc1".to_string(), "http://127.0.0.1:1".to_string()),
            ("a-dc".to_string(), "http://127.0.0.1:4".to_string()),
        ];
        let wan = WanPeers::new("dc2", &peers).unwrap();
        assert_eq!(wan.datacenters(), ["dc2", "a-dc", "dc1", "dc3"]);
        let head = RequestHead::of(&http::Request::new(()));
        assert!(matches!(wan.route("dc2", &head), DatacenterRoute::Local));
        assert!(
            matches!(wan.route("dc1", &head), DatacenterRoute::Peer(u) if u == "http://127.0.0.1:1")
        );
        assert!(matches!(wan.route("DC1", &head), DatacenterRoute::Unknown));
        assert!(matches!(wan.route("dc9", &head), DatacenterRoute::Unknown));
        let forwarded = RequestHead::of(
            &http::Request::builder()
                .header(FORWARDED_MARK, "dc3")
                .body(())
                .unwrap(),
        );
        assert!(matches!(
            wan.route("dc1", &forwarded),
            DatacenterRoute::Unknown
        ));
        assert!(matches!(
            wan.route("dc2", &forwarded),
            DatacenterRoute::Local
        ));
    }

    #[test]
    fn a_blocking_forward_waits_longer_than_the_wait_and_its_jitter() {
        let t = forward_timeout(&Query::parse(Some("index=5&wait=1m")));
        assert!(t > Duration::from_secs(60) + Duration::from_secs(60) / 16);
        let clamped = forward_timeout(&Query::parse(Some("index=5&wait=1h")));
        assert!(clamped < Duration::from_secs(11 * 60 + 10));
        assert_eq!(
            forward_timeout(&Query::parse(Some("wait=1m"))),
            PLAIN_TIMEOUT
        );
    }
}
