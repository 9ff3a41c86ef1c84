//! Which instances may serve, decided from their Consul checks: one pure function.
//!
//! Every check of an entry counts: the node's checks (`serfHealth`, node maintenance) and
//! the instance's own. Maintenance is recognised by check id, never by status. Critical (or
//! a status Consul does not define) keeps an instance out; warning keeps it in as
//! [`InstanceHealth::Warning`], and each route decides whether it wants those.

use crate::consul::types::{HealthCheck, ServiceEntry};

use super::{Instance, InstanceHealth, OutOfService};

pub const NODE_MAINTENANCE: &str = "_node_maintenance";
pub const SERVICE_MAINTENANCE_PREFIX: &str = "_service_maintenance:";

/// The health of one entry, or `None` when it must not serve at all.
pub fn health(entry: &ServiceEntry) -> Option<InstanceHealth> {
    let mut worst = InstanceHealth::Passing;
    for check in &entry.checks {
        if is_maintenance(check) {
            return None;
        }
        match check.status.as_str() {
            "passing" => {}
            "warning" => worst = InstanceHealth::Warning,
            _ => return None,
        }
    }
    Some(worst)
}

fn is_maintenance(check: &HealthCheck) -> bool {
    check.check_id == NODE_MAINTENANCE || check.check_id.starts_with(SERVICE_MAINTENANCE_PREFIX)
}

/// The instances of a health answer that may serve, sorted by id. Instances without a
/// dialable address or port are left out too. Check `Output` and `Notes` are not looked at,
/// so a chatty check does not make two answers differ.
pub fn instances(entries: &[ServiceEntry]) -> Vec<Instance> {
    let mut out: Vec<Instance> = entries.iter().filter_map(instance).collect();
    out.sort_by(|a, b| a.id.cmp(&b.id));
    out.dedup_by(|a, b| a.id == b.id);
    out
}

/// The instances of a health answer that may not serve (critical or in maintenance), with
/// the checks that keep them out, sorted by id: what the admin views show beside the
/// serving ones. Check output is left out here too.
pub fn out_of_service(entries: &[ServiceEntry]) -> Vec<OutOfService> {
    let mut out: Vec<OutOfService> = entries
        .iter()
        .filter(|e| health(e).is_none())
        .map(|entry| {
            let maintenance = entry.checks.iter().any(is_maintenance);
            let svc = &entry.service;
            let address = if svc.address.is_empty() {
                &entry.node.address
            } else {
                &svc.address
            };
            OutOfService {
                id: format!("{}/{}", entry.node.node, svc.id),
                address: address.clone(),
                port: u16::try_from(svc.port).unwrap_or(0),
                health: if maintenance {
                    "maintenance"
                } else {
                    "critical"
                }
                .into(),
                checks: entry
                    .checks
                    .iter()
                    .filter(|c| {
                        is_maintenance(c) || !matches!(c.status.as_str(), "passing" | "warning")
                    })
                    .map(|c| {
                        format!(
                            "{} ({})",
                            if c.name.is_empty() {
                                &c.check_id
                            } else {
                                &c.name
                            },
                            c.status
                        )
                    })
                    .collect(),
            }
        })
        .collect();
    out.sort_by(|a, b| a.id.cmp(&b.id));
    out.dedup_by(|a, b| a.id == b.id);
    out
}

fn instance(entry: &ServiceEntry) -> Option<Instance> {
    let health = health(entry)?;
    let svc = &entry.service;
    let address = if svc.address.is_empty() {
        &entry.node.address
    } else {
        &svc.address
    };
    let port = u16::try_from(svc.port).ok().filter(|p| *p != 0)?;
    if address.is_empty() {
        return None;
    }
    // Consul's default weights are 1/1.
    let weights = svc.weights.unwrap_or_default();
    let weight = match health {
        InstanceHealth::Passing => weights.passing,
        InstanceHealth::Warning => weights.warning,
    };
    let mut tags = svc.tags.clone();
    tags.sort();
    tags.dedup();
    Some(Instance {
        id: format!("{}/{}", entry.node.node, svc.id),
        node: entry.node.node.clone(),
        service_id: svc.id.clone(),
        address: address.clone(),
        port,
        tags,
        meta: svc.meta.clone(),
        health,
        weight,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::consul::types::{AgentService, Node, Weights};

    fn check(id: &str, status: &str, service_id: &str) -> HealthCheck {
        HealthCheck {
            node: "n1".into(),
            check_id: id.into(),
            name: id.into(),
            status: status.into(),
            notes: String::new(),
            output: String::new(),
            service_id: service_id.into(),
            service_name: String::new(),
            kind: String::new(),
        }
    }

    fn entry(checks: Vec<HealthCheck>) -> ServiceEntry {
        ServiceEntry {
            node: Node {
                id: String::new(),
                node: "n1".into(),
                address: "10.0.0.1".into(),
                datacenter: "dc1".into(),
                tagged_addresses: Default::default(),
                meta: Default::default(),
            },
            service: AgentService {
                id: "web-1".into(),
                service: "web".into(),
                tags: vec!["v2".into()],
                address: String::new(),
                tagged_addresses: Default::default(),
                meta: Default::default(),
                port: 8080,
                weights: Some(Weights {
                    passing: 10,
                    warning: 2,
                }),
            },
            checks,
        }
    }

    fn serf(status: &str) -> HealthCheck {
        check("serfHealth", status, "")
    }

    fn own(status: &str) -> HealthCheck {
        check("service:web-1", status, "web-1")
    }

    #[test]
    fn health_from_checks() {
        use InstanceHealth::*;
        let cases: Vec<(&str, Vec<HealthCheck>, Option<InstanceHealth>)> = vec![
            (
                "all checks passing means passing",
                vec![serf("passing"), own("passing")],
                Some(Passing),
            ),
            ("no checks at all means passing", vec![], Some(Passing)),
            (
                "a warning service check means warning",
                vec![serf("passing"), own("warning")],
                Some(Warning),
            ),
            (
                "a warning node check means warning",
                vec![serf("warning"), own("passing")],
                Some(Warning),
            ),
            (
                "a critical service check excludes the instance",
                vec![serf("passing"), own("critical")],
                None,
            ),
            (
                "a critical serfHealth excludes every instance of the node",
                vec![serf("critical"), own("passing")],
                None,
            ),
            (
                "critical wins over warning",
                vec![serf("warning"), own("critical")],
                None,
            ),
            (
                "node maintenance excludes even if reported passing",
                vec![serf("passing"), check(NODE_MAINTENANCE, "passing", "")],
                None,
            ),
            (
                "service maintenance excludes even if reported warning",
                vec![
                    own("passing"),
                    check("_service_maintenance:web-1", "warning", "web-1"),
                ],
                None,
            ),
            (
                "an unknown status is treated as critical",
                vec![own("maintenance")],
                None,
            ),
            (
                "an empty status is treated as critical",
                vec![own("")],
                None,
            ),
        ];
        for (name, checks, want) in cases {
            assert_eq!(health(&entry(checks)), want, "{name}");
        }
    }

    #[test]
    fn instances_from_entries() {
        type Tweak = fn(&mut ServiceEntry);
        type Dial<'a> = Option<(&'a str, u16, u32)>;
        let cases: Vec<(&str, Tweak, Dial)> = vec![
            (
                "the node address is used when the service has none",
                |_| {},
                Some(("10.0.0.1", 8080, 10)),
            ),
            (
                "the service address wins over the node address",
                |e| e.service.address = "10.9.9.9".into(),
                Some(("10.9.9.9", 8080, 10)),
            ),
            (
                "a warning instance takes the warning weight",
                |e| e.checks.push(own("warning")),
                Some(("10.0.0.1", 8080, 2)),
            ),
            (
                "missing weights default to one",
                |e| e.service.weights = None,
                Some(("10.0.0.1", 8080, 1)),
            ),
            (
                "a zero port cannot be dialled",
                |e| e.service.port = 0,
                None,
            ),
            (
                "a port above 65535 cannot be dialled",
                |e| e.service.port = 70_000,
                None,
            ),
            (
                "no address at all cannot be dialled",
                |e| e.node.address.clear(),
                None,
            ),
            (
                "a critical instance is left out",
                |e| e.checks.push(own("critical")),
                None,
            ),
        ];
        for (name, tweak, want) in cases {
            let mut e = entry(vec![serf("passing")]);
            tweak(&mut e);
            let got = instances(&[e]);
            let got = got.first().map(|i| (i.address.as_str(), i.port, i.weight));
            assert_eq!(got, want, "{name}");
        }
    }

    #[test]
    fn check_output_does_not_change_the_result() {
        let mut a = entry(vec![serf("passing"), own("passing")]);
        let mut b = a.clone();
        a.checks[1].output = "HTTP GET /health: 200 OK in 3ms".into();
        b.checks[1].output = "HTTP GET /health: 200 OK in 4ms".into();
        assert_ne!(a, b);
        assert_eq!(instances(&[a]), instances(&[b]));
    }

    #[test]
    fn instances_are_sorted_and_identified_by_node_and_service_id() {
        let mut a = entry(vec![]);
        a.service.id = "web-2".into();
        let b = entry(vec![]);
        let got = instances(&[a, b]);
        let ids: Vec<_> = got.iter().map(|i| i.id.as_str()).collect();
        assert_eq!(ids, ["n1/web-1", "n1/web-2"]);
    }

    #[test]
    fn instances_kept_out_are_listed_with_the_checks_that_keep_them_out() {
        let passing = entry(vec![check("serfHealth", "passing", "")]);
        let mut critical = entry(vec![
            check("serfHealth", "passing", ""),
            check("service:web-2", "critical", "web-2"),
        ]);
        critical.service.id = "web-2".into();
        let mut maintenance = entry(vec![
            check("_service_maintenance:web-3", "critical", "web-3"),
            check("service:web-3", "passing", "web-3"),
        ]);
        maintenance.service.id = "web-3".into();
        let entries = [maintenance.clone(), passing, critical.clone(), critical];
        let out = out_of_service(&entries);
        let ids: Vec<&str> = out.iter().map(|o| o.id.as_str()).collect();
        assert_eq!(
            ids,
            ["n1/web-2", "n1/web-3"],
            "sorted, once each, serving ones left out"
        );
        assert_eq!(out[0].health, "critical");
        assert_eq!(out[0].checks, ["service:web-2 (critical)"]);
        assert_eq!((out[0].address.as_str(), out[0].port), ("10.0.0.1", 8080));
        assert_eq!(out[1].health, "maintenance");
        assert_eq!(out[1].checks, ["_service_maintenance:web-3 (critical)"]);
        assert_eq!(instances(&entries).len(), 1);
    }
}
