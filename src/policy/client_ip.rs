//! Who the client is: the socket peer, unless the peer is one of our own proxies
//! (`proxy.trusted_proxies`), in which case `X-Forwarded-For` is walked from the right,
//! skipping trusted hops, to the first address we did not put there ourselves. Anything a
//! client writes to the left of that is ignored, so a spoofed header buys nothing.

use std::net::{IpAddr, SocketAddr};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue};
use ipnet::IpNet;

pub static X_FORWARDED_FOR: http::HeaderName = http::HeaderName::from_static("x-forwarded-for");

/// An IPv4-mapped IPv6 address (`::ffff:10.0.0.1`, what a dual-stack socket reports) as the
/// IPv4 address it is; anything else unchanged.
pub fn canonical(ip: IpAddr) -> IpAddr {
    ip.to_canonical()
}

/// The same for a network: `::ffff:10.0.0.0/104` is `10.0.0.0/8`. Host bits are cleared.
pub fn canonical_net(net: IpNet) -> IpNet {
    match net {
        IpNet::V6(v6) if v6.prefix_len() >= 96 => match v6.addr().to_ipv4_mapped() {
            Some(v4) => ipnet::Ipv4Net::new(v4, v6.prefix_len() - 96)
                .map(IpNet::V4)
                .unwrap_or(net)
                .trunc(),
            None => net.trunc(),
        },
        other => other.trunc(),
    }
}

/// A client connection's address, canonical, with its text made once for the connection:
/// every request on it names the address in `X-Forwarded-For` by sharing that text.
#[derive(Debug, Clone)]
pub struct PeerIp {
    ip: IpAddr,
    value: HeaderValue,
}

impl PeerIp {
    pub fn new(ip: IpAddr) -> PeerIp {
        let ip = canonical(ip);
        // Owned by a shared buffer, so each request's copy is a reference count.
        let value = HeaderValue::from_maybe_shared(Bytes::from_owner(ip.to_string()))
            .unwrap_or(HeaderValue::from_static("unknown"));
        PeerIp { ip, value }
    }

    pub fn ip(&self) -> IpAddr {
        self.ip
    }

    pub fn value(&self) -> &HeaderValue {
        &self.value
    }
}

/// The peers whose `X-Forwarded-For` is believed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustedProxies {
    nets: Vec<IpNet>,
}

impl TrustedProxies {
    pub fn new(nets: &[IpNet]) -> TrustedProxies {
        TrustedProxies {
            nets: nets.iter().copied().map(canonical_net).collect(),
        }
    }

    pub fn is_trusted(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        self.nets.iter().any(|n| n.contains(&ip))
    }

    /// The client's address for a request that arrived from `peer`.
    pub fn client_ip(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        let mut nearest = canonical(peer);
        if self.nets.is_empty() || !self.is_trusted(nearest) {
            return nearest;
        }
        // Later headers were appended later: walk values, and entries within, right to left.
        for value in headers.get_all(&X_FORWARDED_FOR).iter().rev() {
            let Ok(text) = value.to_str() else {
                return nearest;
            };
            for entry in text.rsplit(',') {
                let entry = entry.trim();
                if entry.is_empty() {
                    continue;
                }
                // Garbage was written by the hop to its right, which we trust; that hop is
                // the best we know.
                let Some(ip) = parse_entry(entry) else {
                    return nearest;
                };
                nearest = canonical(ip);
                if !self.is_trusted(nearest) {
                    return nearest;
                }
            }
        }
        // Every hop is ours: the leftmost is where the request came from.
        nearest
    }

    /// The `X-Forwarded-For` to send upstream: the received chain plus `peer` when the peer
    /// is trusted, otherwise `peer` alone (a client's own header is dropped).
    pub fn forwarded_for(&self, peer: &PeerIp, headers: &HeaderMap) -> HeaderValue {
        let own = || peer.value.clone();
        if !self.is_trusted(peer.ip) {
            return own();
        }
        let mut chain = String::new();
        for value in headers.get_all(&X_FORWARDED_FOR) {
            let Ok(text) = value.to_str() else {
                return own();
            };
            if !text.trim().is_empty() {
                chain.push_str(text.trim());
                chain.push_str(", ");
            }
        }
        chain.push_str(&peer.ip.to_string());
        HeaderValue::from_str(&chain).unwrap_or_else(|_| own())
    }
}

/// `1.2.3.4`, `1.2.3.4:80`, `2001:db8::1` or `[2001:db8::1]:80`.
fn parse_entry(entry: &str) -> Option<IpAddr> {
    if let Ok(ip) = entry.parse::<IpAddr>() {
        return Some(ip);
    }
    if let Ok(sa) = entry.parse::<SocketAddr>() {
        return Some(sa.ip());
    }
    entry
        .strip_prefix('[')
        .and_then(|r| r.strip_suffix(']'))
        .and_then(|inner| inner.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trusted(nets: &[&str]) -> TrustedProxies {
        let nets: Vec<IpNet> = nets.iter().map(|n| n.parse().unwrap()).collect();
        TrustedProxies::new(&nets)
    }

    fn xff(values: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(&X_FORWARDED_FOR, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn the_client_is_the_first_untrusted_hop_from_the_right() {
        let t = trusted(&["10.0.0.0/8", "::1/128"]);
        let cases: &[(&str, &[&str], &str)] = &[
            // An untrusted peer: its header is ignored.
            ("203.0.113.9", &["1.1.1.1"], "203.0.113.9"),
            // A trusted peer without a header: the peer.
            ("10.0.0.1", &[], "10.0.0.1"),
            ("10.0.0.1", &["198.51.100.7"], "198.51.100.7"),
            // The client prepended a fake; the LB appended the real one.
            ("10.0.0.1", &["6.6.6.6, 198.51.100.7"], "198.51.100.7"),
            // Two of our hops, then the client.
            ("10.0.0.1", &["198.51.100.7, 10.0.0.2"], "198.51.100.7"),
            // Header split over two fields counts as one list.
            (
                "10.0.0.1",
                &["6.6.6.6", "198.51.100.7, 10.0.0.9"],
                "198.51.100.7",
            ),
            // Every hop trusted: the leftmost.
            ("10.0.0.1", &["10.1.1.1, 10.0.0.2"], "10.1.1.1"),
            // Garbage stops the walk at the hop that wrote it.
            ("10.0.0.1", &["198.51.100.7, bogus, 10.0.0.2"], "10.0.0.2"),
            ("10.0.0.1", &["bogus"], "10.0.0.1"),
            // Ports, brackets, IPv6, IPv4-mapped peers.
            ("10.0.0.1", &["198.51.100.7:5555"], "198.51.100.7"),
            ("10.0.0.1", &["[2001:db8::5]:443"], "2001:db8::5"),
            ("::1", &["2001:db8::5"], "2001:db8::5"),
            ("::ffff:10.0.0.1", &["198.51.100.7"], "198.51.100.7"),
            ("::ffff:203.0.113.9", &["1.1.1.1"], "203.0.113.9"),
            ("10.0.0.1", &["::ffff:198.51.100.7"], "198.51.100.7"),
        ];
        for &(peer, values, want) in cases {
            let got = t.client_ip(peer.parse().unwrap(), &xff(values));
            assert_eq!(got, want.parse::<IpAddr>().unwrap(), "{peer} {values:?}");
        }
    }

    #[test]
    fn nothing_is_trusted_by_default() {
        let t = TrustedProxies::default();
        let peer: IpAddr = "127.0.0.1".parse().unwrap();
        assert_eq!(t.client_ip(peer, &xff(&["1.2.3.4"])), peer);
    }

    #[test]
    fn mapped_networks_are_canonical() {
        let t = trusted(&["::ffff:10.0.0.0/104"]);
        assert!(t.is_trusted("10.9.9.9".parse().unwrap()));
        assert!(t.is_trusted("::ffff:10.9.9.9".parse().unwrap()));
        assert!(!t.is_trusted("11.0.0.1".parse().unwrap()));
        assert_eq!(
            canonical_net("10.1.2.3/8".parse().unwrap()),
            "10.0.0.0/8".parse::<IpNet>().unwrap()
        );
    }

    #[test]
    fn peers_are_named_canonically() {
        for (ip, text) in [
            ("9.10.99.100", "9.10.99.100"),
            ("::ffff:10.0.0.1", "10.0.0.1"),
            ("2001:db8::1", "2001:db8::1"),
        ] {
            let peer = PeerIp::new(ip.parse().unwrap());
            assert_eq!(peer.value(), text);
            assert_eq!(peer.ip().to_string(), text);
        }
    }

    fn peer(ip: &str) -> PeerIp {
        PeerIp::new(ip.parse().unwrap())
    }

    #[test]
    fn forwarded_for_drops_a_clients_own_chain() {
        let t = trusted(&["10.0.0.0/8"]);
        let h = xff(&["6.6.6.6"]);
        assert_eq!(t.forwarded_for(&peer("203.0.113.9"), &h), "203.0.113.9");
        assert_eq!(t.forwarded_for(&peer("10.0.0.1"), &h), "6.6.6.6, 10.0.0.1");
        assert_eq!(
            t.forwarded_for(&peer("::ffff:10.0.0.1"), &HeaderMap::new()),
            "10.0.0.1"
        );
    }
}
