//! JSON shapes: request bodies decoded the way Consul's Go decoder reads them (field names
//! case-insensitive, snake_case accepted, durations as strings or nanoseconds), and response
//! bodies with Consul's field names, `[]`/`{}` instead of `null` for lists and maps.

use std::collections::BTreeMap;
use std::time::Duration;

use base64::Engine;
use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::agent::CheckSpec;
use super::params::{format_go_duration, parse_go_duration};
use super::store::{
    Check, CheckDefinition, CheckEntry, KvEntry, Registration, RegistryNode, RegistryService,
    RegistryServiceEntry, RegistryState, RegistryWeights, Status, TaggedAddress,
};

/// Field names whose object values are user data (keys kept verbatim).
const USER_MAPS: &[&str] = &["meta", "node_meta", "service_meta", "header"];

/// `CheckID` → `check_id`, `TLSSkipVerify` → `tls_skip_verify`, `name` → `name`.
pub fn snake(k: &str) -> String {
    let chars: Vec<char> = k.chars().collect();
    let mut out = String::with_capacity(k.len() + 4);
    for (i, &c) in chars.iter().enumerate() {
        if c.is_ascii_uppercase() {
            let prev = i.checked_sub(1).map(|j| chars[j]);
            let next = chars.get(i + 1).copied();
            let boundary = match prev {
                Some(p) if p.is_ascii_lowercase() || p.is_ascii_digit() => true,
                Some(p) if p.is_ascii_uppercase() => next.is_some_and(|n| n.is_ascii_lowercase()),
                _ => false,
            };
            if boundary && !out.ends_with('_') {
                out.push('_');
            }
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

/// Rewrites object keys to snake_case, except inside user maps.
pub fn normalize(v: Value) -> Value {
    match v {
        Value::Object(m) => {
            let mut out = Map::new();
            for (k, v) in m {
                let nk = snake(&k);
                let nv = if USER_MAPS.contains(&nk.as_str()) {
                    v
                } else if nk == "tagged_addresses" {
                    match v {
                        Value::Object(inner) => Value::Object(
                            inner.into_iter().map(|(k, v)| (k, normalize(v))).collect(),
                        ),
                        other => other,
                    }
                } else {
                    normalize(v)
                };
                out.insert(nk, nv);
            }
            Value::Object(out)
        }
        Value::Array(a) => Value::Array(a.into_iter().map(normalize).collect()),
        other => other,
    }
}

/// Decodes a body after key normalisation; errors read like Consul's `Request decode failed: …`.
pub fn decode<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, String> {
    let v: Value = if body.iter().all(u8::is_ascii_whitespace) {
        Value::Object(Map::new())
    } else {
        serde_json::from_slice(body).map_err(|e| format!("Request decode failed: {e}"))?
    };
    serde_json::from_value(normalize(v)).map_err(|e| format!("Request decode failed: {e}"))
}

fn duration(v: &Option<Value>, field: &str) -> Result<Option<Duration>, String> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.is_empty() => Ok(None),
        Some(Value::String(s)) => match parse_go_duration(s) {
            Some(ns) if ns >= 0 => Ok(Some(Duration::from_nanos(ns as u64))),
            Some(_) => Ok(Some(Duration::ZERO)),
            None => Err(format!(
                "Request decode failed: {field}: invalid duration {s:?}"
            )),
        },
        Some(Value::Number(n)) => Ok(Some(Duration::from_nanos(n.as_u64().unwrap_or(0)))),
        Some(other) => Err(format!(
            "Request decode failed: {field}: invalid duration {other}"
        )),
    }
}

#[derive(Deserialize, Default)]
#[serde(default)]
pub struct TaggedIn {
    address: String,
    port: i64,
}

#[derive(Deserialize, Default)]
#[serde(default)]
pub struct WeightsIn {
    passing: i64,
    warning: i64,
}

/// `AgentServiceRegistration` and the `Service` of a `CatalogRegistration`.
#[derive(Deserialize, Default)]
#[serde(default)]
pub struct ServiceIn {
    id: Option<String>,
    name: Option<String>,
    service: Option<String>,
    kind: Option<String>,
    tags: Option<Vec<String>>,
    address: Option<String>,
    tagged_addresses: Option<BTreeMap<String, TaggedIn>>,
    meta: Option<BTreeMap<String, String>>,
    port: Option<i64>,
    weights: Option<WeightsIn>,
    enable_tag_override: Option<bool>,
    check: Option<CheckIn>,
    checks: Option<Vec<CheckIn>>,
}

impl ServiceIn {
    pub fn into_service(self) -> Result<(RegistryService, Vec<CheckSpec>), String> {
        let name = self.name.or(self.service).unwrap_or_default();
        let weights = match self.weights {
            Some(w) => RegistryWeights {
                passing: w.passing,
                warning: w.warning,
            },
            None => RegistryWeights::default(),
        };
        let svc = RegistryService {
            id: self.id.unwrap_or_default(),
            name,
            kind: self.kind.unwrap_or_default(),
            tags: self.tags.unwrap_or_default(),
            address: self.address.unwrap_or_default(),
            tagged_addresses: self
                .tagged_addresses
                .unwrap_or_default()
                .into_iter()
                .map(|(k, t)| {
                    (
                        k,
                        TaggedAddress {
                            address: t.address,
                            port: t.port,
                        },
                    )
                })
                .collect(),
            meta: self.meta.unwrap_or_default(),
            port: self.port.unwrap_or(0),
            weights,
            enable_tag_override: self.enable_tag_override.unwrap_or(false),
        };
        let mut specs = Vec::new();
        for c in self
            .check
            .into_iter()
            .chain(self.checks.unwrap_or_default())
        {
            specs.push(c.into_spec()?);
        }
        Ok((svc, specs))
    }
}

/// `AgentServiceCheck` / `AgentCheckRegistration`.
#[derive(Deserialize, Default)]
#[serde(default)]
pub struct CheckIn {
    id: Option<String>,
    check_id: Option<String>,
    #[serde(alias = "checkid")]
    checkid_lower: Option<String>,
    name: Option<String>,
    notes: Option<String>,
    status: Option<String>,
    #[serde(alias = "serviceid")]
    service_id: Option<String>,
    ttl: Option<Value>,
    http: Option<String>,
    method: Option<String>,
    header: Option<BTreeMap<String, Vec<String>>>,
    body: Option<String>,
    tcp: Option<String>,
    interval: Option<Value>,
    timeout: Option<Value>,
    tls_skip_verify: Option<bool>,
    #[serde(alias = "deregistercriticalserviceafter")]
    deregister_critical_service_after: Option<Value>,
    grpc: Option<String>,
    udp: Option<String>,
    #[serde(alias = "h2ping")]
    h2_ping: Option<String>,
    args: Option<Vec<String>>,
    script_args: Option<Vec<String>>,
    docker_container_id: Option<String>,
    alias_node: Option<String>,
    alias_service: Option<String>,
    os_service: Option<String>,
}

fn nonempty(s: &Option<String>) -> bool {
    s.as_deref().is_some_and(|s| !s.is_empty())
}

pub fn parse_status(s: &str) -> Result<Status, String> {
    Status::parse(s)
        .ok_or_else(|| "Status for checks must 'passing', 'warning', 'critical'".to_string())
}

impl CheckIn {
    pub fn into_spec(self) -> Result<CheckSpec, String> {
        let unsupported = if nonempty(&self.grpc) {
            Some("gRPC")
        } else if nonempty(&self.udp) {
            Some("UDP")
        } else if nonempty(&self.h2_ping) {
            Some("H2PING")
        } else if self.args.as_ref().is_some_and(|a| !a.is_empty())
            || self.script_args.as_ref().is_some_and(|a| !a.is_empty())
        {
            Some("script")
        } else if nonempty(&self.docker_container_id) {
            Some("Docker")
        } else if nonempty(&self.alias_node) || nonempty(&self.alias_service) {
            Some("alias")
        } else if nonempty(&self.os_service) {
            Some("OS service")
        } else {
            None
        };
        let status = match self.status.as_deref() {
            None | Some("") => None,
            Some(s) => Some(parse_status(s)?),
        };
        Ok(CheckSpec {
            id: self
                .check_id
                .or(self.checkid_lower)
                .or(self.id)
                .unwrap_or_default(),
            name: self.name.unwrap_or_default(),
            notes: self.notes.unwrap_or_default(),
            status,
            service_id: self.service_id.unwrap_or_default(),
            definition: CheckDefinition {
                http: self.http.unwrap_or_default(),
                method: self.method.unwrap_or_default(),
                header: self.header.unwrap_or_default(),
                body: self.body.unwrap_or_default(),
                tls_skip_verify: self.tls_skip_verify.unwrap_or(false),
                tcp: self.tcp.unwrap_or_default(),
                ttl: duration(&self.ttl, "TTL")?,
                interval: duration(&self.interval, "Interval")?,
                timeout: duration(&self.timeout, "Timeout")?,
                deregister_critical_after: duration(
                    &self.deregister_critical_service_after,
                    "DeregisterCriticalServiceAfter",
                )?,
            },
            unsupported,
        })
    }
}

/// `PUT /v1/agent/check/update/:id` body.
#[derive(Deserialize, Default)]
#[serde(default)]
pub struct CheckUpdateIn {
    pub status: String,
    pub output: String,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct DefinitionIn {
    http: Option<String>,
    tcp: Option<String>,
    interval: Option<Value>,
    timeout: Option<Value>,
    deregister_critical_service_after: Option<Value>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct CatalogCheckIn {
    node: Option<String>,
    check_id: Option<String>,
    name: Option<String>,
    notes: Option<String>,
    status: Option<String>,
    output: Option<String>,
    service_id: Option<String>,
    #[serde(rename = "type")]
    kind: Option<String>,
    definition: Option<DefinitionIn>,
}

/// `CatalogRegistration`.
#[derive(Deserialize, Default)]
#[serde(default)]
pub struct CatalogRegisterIn {
    id: Option<String>,
    node: Option<String>,
    address: Option<String>,
    datacenter: Option<String>,
    tagged_addresses: Option<BTreeMap<String, String>>,
    node_meta: Option<BTreeMap<String, String>>,
    service: Option<ServiceIn>,
    check: Option<CatalogCheckIn>,
    checks: Option<Vec<CatalogCheckIn>>,
    skip_node_update: Option<bool>,
}

impl CatalogRegisterIn {
    pub fn datacenter(&self) -> Option<&str> {
        self.datacenter.as_deref().filter(|d| !d.is_empty())
    }

    pub fn into_registration(self, default_dc: &str) -> Result<Registration, String> {
        let node = self.node.unwrap_or_default();
        let service = match self.service {
            Some(s) => {
                let (mut svc, _) = s.into_service()?;
                if svc.id.is_empty() {
                    svc.id = svc.name.clone();
                }
                Some(svc)
            }
            None => None,
        };
        let mut checks = Vec::new();
        for c in self
            .check
            .into_iter()
            .chain(self.checks.unwrap_or_default())
        {
            let name = c.name.unwrap_or_default();
            let id = c
                .check_id
                .filter(|i| !i.is_empty())
                .unwrap_or_else(|| name.clone());
            let status = match c.status.as_deref() {
                None | Some("") => Status::Critical,
                Some(s) => parse_status(s)?,
            };
            let d = c.definition.unwrap_or_default();
            checks.push(Check {
                node: c.node.unwrap_or_else(|| node.clone()),
                id,
                name,
                status,
                notes: c.notes.unwrap_or_default(),
                output: c.output.unwrap_or_default(),
                service_id: c.service_id.unwrap_or_default(),
                service_name: String::new(),
                kind: c.kind.unwrap_or_default(),
                definition: CheckDefinition {
                    http: d.http.unwrap_or_default(),
                    tcp: d.tcp.unwrap_or_default(),
                    interval: duration(&d.interval, "Interval")?,
                    timeout: duration(&d.timeout, "Timeout")?,
                    deregister_critical_after: duration(
                        &d.deregister_critical_service_after,
                        "DeregisterCriticalServiceAfter",
                    )?,
                    ..CheckDefinition::default()
                },
                agent_local: false,
            });
        }
        Ok(Registration {
            node,
            node_id: self.id.unwrap_or_default(),
            address: self.address.unwrap_or_default(),
            datacenter: self
                .datacenter
                .filter(|d| !d.is_empty())
                .unwrap_or_else(|| default_dc.to_string()),
            tagged_addresses: self.tagged_addresses.unwrap_or_default(),
            node_meta: self.node_meta.unwrap_or_default(),
            skip_node_update: self.skip_node_update.unwrap_or(false),
            service,
            agent_local: false,
            checks,
        })
    }
}

/// `CatalogDeregistration`.
#[derive(Deserialize, Default)]
#[serde(default)]
pub struct CatalogDeregisterIn {
    pub node: Option<String>,
    pub datacenter: Option<String>,
    pub service_id: Option<String>,
    pub check_id: Option<String>,
}

// === responses ===

pub fn node_json(n: &RegistryNode) -> Value {
    json!({
        "ID": n.id,
        "Node": n.name,
        "Address": n.address,
        "Datacenter": n.datacenter,
        "TaggedAddresses": n.tagged_addresses,
        "Meta": n.meta,
        "CreateIndex": n.create_index,
        "ModifyIndex": n.modify_index,
    })
}

fn tagged_json(t: &BTreeMap<String, TaggedAddress>) -> Value {
    t.iter()
        .map(|(k, a)| (k.clone(), json!({"Address": a.address, "Port": a.port})))
        .collect::<Map<_, _>>()
        .into()
}

fn weights_json(w: RegistryWeights) -> Value {
    json!({"Passing": w.passing, "Warning": w.warning})
}

/// The `Service` of a health entry (a `NodeService`).
pub fn node_service_json(e: &RegistryServiceEntry) -> Value {
    let s = &e.service;
    let mut v = json!({
        "ID": s.id,
        "Service": s.name,
        "Tags": s.tags,
        "Address": s.address,
        "Meta": s.meta,
        "Port": s.port,
        "Weights": weights_json(s.weights),
        "EnableTagOverride": s.enable_tag_override,
        "Proxy": {"Mode": "", "MeshGateway": {}, "Expose": {}},
        "Connect": {},
        "PeerName": "",
        "CreateIndex": e.create_index,
        "ModifyIndex": e.modify_index,
    });
    if !s.kind.is_empty() {
        v["Kind"] = json!(s.kind);
    }
    if !s.tagged_addresses.is_empty() {
        v["TaggedAddresses"] = tagged_json(&s.tagged_addresses);
    }
    v
}

/// One element of `catalog/service/:name` (a flat `CatalogService`).
pub fn catalog_service_json(n: Option<&RegistryNode>, e: &RegistryServiceEntry) -> Value {
    let s = &e.service;
    let empty = BTreeMap::new();
    json!({
        "ID": n.map_or("", |n| n.id.as_str()),
        "Node": e.node,
        "Address": n.map_or("", |n| n.address.as_str()),
        "Datacenter": n.map_or("", |n| n.datacenter.as_str()),
        "TaggedAddresses": n.map_or(&empty, |n| &n.tagged_addresses),
        "NodeMeta": n.map_or(&empty, |n| &n.meta),
        "ServiceKind": s.kind,
        "ServiceID": s.id,
        "ServiceName": s.name,
        "ServiceAddress": s.address,
        "ServiceTaggedAddresses": tagged_json(&s.tagged_addresses),
        "ServiceTags": s.tags,
        "ServiceMeta": s.meta,
        "ServicePort": s.port,
        "ServiceWeights": weights_json(s.weights),
        "ServiceEnableTagOverride": s.enable_tag_override,
        "ServiceProxy": {"Mode": "", "MeshGateway": {}, "Expose": {}},
        "ServiceConnect": {},
        "CreateIndex": e.create_index,
        "ModifyIndex": e.modify_index,
    })
}

/// `AgentService` (for `agent/services` and `agent/service/:id`).
pub fn agent_service_json(e: &RegistryServiceEntry, datacenter: &str) -> Value {
    let s = &e.service;
    let mut v = json!({
        "ID": s.id,
        "Service": s.name,
        "Tags": s.tags,
        "Meta": s.meta,
        "Port": s.port,
        "Address": s.address,
        "Weights": weights_json(s.weights),
        "EnableTagOverride": s.enable_tag_override,
        "Datacenter": datacenter,
    });
    if !s.kind.is_empty() {
        v["Kind"] = json!(s.kind);
    }
    if !s.tagged_addresses.is_empty() {
        v["TaggedAddresses"] = tagged_json(&s.tagged_addresses);
    }
    v
}

fn dur(d: Option<Duration>) -> String {
    d.map(format_go_duration).unwrap_or_default()
}

fn definition_json(d: &CheckDefinition) -> Value {
    let mut m = Map::new();
    if !d.http.is_empty() {
        m.insert("HTTP".into(), json!(d.http));
    }
    if !d.tcp.is_empty() {
        m.insert("TCP".into(), json!(d.tcp));
    }
    if let Some(i) = d.interval {
        m.insert("Interval".into(), json!(format_go_duration(i)));
    }
    if let Some(t) = d.timeout {
        m.insert("Timeout".into(), json!(format_go_duration(t)));
    }
    if let Some(t) = d.deregister_critical_after {
        m.insert(
            "DeregisterCriticalServiceAfter".into(),
            json!(format_go_duration(t)),
        );
    }
    Value::Object(m)
}

/// A `HealthCheck`, with `ServiceTags` from the instance it belongs to.
pub fn check_json(state: &RegistryState, c: &CheckEntry) -> Value {
    let k: &Check = &c.check;
    let tags = if k.service_id.is_empty() {
        Vec::new()
    } else {
        state.service_tags(&k.node, &k.service_id)
    };
    json!({
        "Node": k.node,
        "CheckID": k.id,
        "Name": k.name,
        "Status": k.status.as_str(),
        "Notes": k.notes,
        "Output": k.output,
        "ServiceID": k.service_id,
        "ServiceName": k.service_name,
        "ServiceTags": tags,
        "Type": k.kind,
        "Interval": dur(k.definition.interval),
        "Timeout": dur(k.definition.timeout),
        "ExposedPort": 0,
        "Definition": definition_json(&k.definition),
        "CreateIndex": c.create_index,
        "ModifyIndex": c.modify_index,
    })
}

/// A `DirEntry`: `Value` is standard base64, `null` when empty; no `Session` (no locks held).
pub fn kv_json(e: &KvEntry) -> Value {
    let value = if e.value.is_empty() {
        Value::Null
    } else {
        json!(base64::engine::general_purpose::STANDARD.encode(&e.value))
    };
    json!({
        "LockIndex": e.lock_index,
        "Key": e.key,
        "Flags": e.flags,
        "Value": value,
        "CreateIndex": e.create_index,
        "ModifyIndex": e.modify_index,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_become_snake_case_like_consul_translates_them() {
        for (k, want) in [
            ("CheckID", "check_id"),
            ("TTL", "ttl"),
            ("HTTP", "http"),
            ("TLSSkipVerify", "tls_skip_verify"),
            (
                "DeregisterCriticalServiceAfter",
                "deregister_critical_service_after",
            ),
            ("ServiceID", "service_id"),
            ("ID", "id"),
            ("name", "name"),
            ("enable_tag_override", "enable_tag_override"),
        ] {
            assert_eq!(snake(k), want);
        }
    }

    #[test]
    fn user_meta_keys_are_kept_verbatim() {
        let v = normalize(json!({"Meta": {"Version": "1"}, "Check": {"TTL": "10s"}}));
        assert_eq!(
            v,
            json!({"meta": {"Version": "1"}, "check": {"ttl": "10s"}})
        );
    }

    #[test]
    fn a_service_registration_decodes_in_either_spelling() {
        let a: ServiceIn =
            decode(br#"{"Name":"web","ID":"web-1","Port":80,"Check":{"TTL":"10s"}}"#).unwrap();
        let b: ServiceIn =
            decode(br#"{"name":"web","id":"web-1","port":80,"check":{"ttl":"10s"}}"#).unwrap();
        let (sa, ca) = a.into_service().unwrap();
        let (sb, cb) = b.into_service().unwrap();
        assert_eq!(sa, sb);
        assert_eq!(ca[0].definition.ttl, Some(Duration::from_secs(10)));
        assert_eq!(cb[0].definition.ttl, Some(Duration::from_secs(10)));
    }

    #[test]
    fn a_bad_check_status_is_rejected() {
        let a: ServiceIn =
            decode(br#"{"Name":"web","Check":{"TTL":"1s","Status":"green"}}"#).unwrap();
        assert!(a.into_service().is_err());
    }
}
