//! Per-route client networks: `ip_deny` refuses, a non-empty `ip_allow` admits only its
//! networks; deny wins. Addresses and networks are compared in canonical form, so an
//! IPv4 client seen through a dual-stack socket (`::ffff:10.0.0.1`) matches `10.0.0.0/8`.

use std::net::IpAddr;

use ipnet::IpNet;

use super::client_ip::{canonical, canonical_net};

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IpRules {
    allow: Vec<IpNet>,
    deny: Vec<IpNet>,
}

impl IpRules {
    pub fn new(allow: &[IpNet], deny: &[IpNet]) -> IpRules {
        let norm = |nets: &[IpNet]| nets.iter().copied().map(canonical_net).collect();
        IpRules {
            allow: norm(allow),
            deny: norm(deny),
        }
    }

    /// No rule at all: every client passes without a check.
    pub fn is_empty(&self) -> bool {
        self.allow.is_empty() && self.deny.is_empty()
    }

    pub fn permits(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        if self.deny.iter().any(|n| n.contains(&ip)) {
            return false;
        }
        self.allow.is_empty() || self.allow.iter().any(|n| n.contains(&ip))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|n| n.parse().unwrap()).collect()
    }

    #[test]
    fn deny_wins_and_allow_restricts() {
        let cases: &[(&[&str], &[&str], &str, bool)] = &[
            (&[], &[], "203.0.113.1", true),
            (&["10.0.0.0/8"], &[], "10.1.2.3", true),
            (&["10.0.0.0/8"], &[], "11.0.0.1", false),
            (&["10.0.0.0/8"], &["10.9.0.0/16"], "10.9.1.1", false),
            (&["10.0.0.0/8"], &["10.9.0.0/16"], "10.8.1.1", true),
            (&[], &["192.0.2.0/24"], "192.0.2.77", false),
            (&[], &["192.0.2.0/24"], "192.0.3.1", true),
            (&["::1/128"], &[], "::1", true),
            (&["::1/128"], &[], "127.0.0.1", false),
            (&["2001:db8::/32"], &[], "2001:db8:1::9", true),
            (&[], &["2001:db8::/32"], "2001:db9::1", true),
            // An IPv4 client through a dual-stack socket.
            (&["127.0.0.0/8"], &[], "::ffff:127.0.0.1", true),
            (&[], &["127.0.0.1/32"], "::ffff:127.0.0.1", false),
            // A mapped network in the document.
            (&["::ffff:10.0.0.0/104"], &[], "10.4.4.4", true),
            (
                &["127.0.0.1/32"],
                &["0.0.0.0/0", "::/0"],
                "127.0.0.1",
                false,
            ),
        ];
        for &(allow, deny, ip, want) in cases {
            let rules = IpRules::new(&nets(allow), &nets(deny));
            assert_eq!(
                rules.permits(ip.parse().unwrap()),
                want,
                "allow {allow:?} deny {deny:?} ip {ip}"
            );
        }
    }
}
