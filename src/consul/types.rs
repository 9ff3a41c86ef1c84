//! The serde shapes of the Consul answers we read (health entries, KV pairs) and of the
//! one document we write (an agent service registration).
//! Lenient where Consul is loose (`null` lists, tagged-address casing), strict on what we use.

use std::collections::BTreeMap;

use base64::Engine;
use serde::{Deserialize, Deserializer, Serialize};

/// One element of `GET /v1/health/service/<name>`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ServiceEntry {
    pub node: Node,
    pub service: AgentService,
    /// The node's node-level checks (e.g. `serfHealth`) and this instance's checks.
    #[serde(default, deserialize_with = "null_as_default")]
    pub checks: Vec<HealthCheck>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct Node {
    #[serde(rename = "ID", default)]
    pub id: String,
    pub node: String,
    #[serde(default)]
    pub address: String,
    #[serde(default)]
    pub datacenter: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub tagged_addresses: BTreeMap<String, String>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub meta: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct AgentService {
    #[serde(rename = "ID")]
    pub id: String,
    /// The service name (Consul calls it `Service`, not `Name`).
    pub service: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub tags: Vec<String>,
    /// May be empty: then the node's address is the one to dial.
    #[serde(default)]
    pub address: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub tagged_addresses: BTreeMap<String, ServiceAddress>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub meta: BTreeMap<String, String>,
    #[serde(default)]
    pub port: u32,
    #[serde(default)]
    pub weights: Option<Weights>,
}

/// A tagged service address. Consul's docs show both `Address` and `address` casing.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct ServiceAddress {
    #[serde(rename = "Address", alias = "address", default)]
    pub address: String,
    #[serde(rename = "Port", alias = "port", default)]
    pub port: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct Weights {
    #[serde(default = "one")]
    pub passing: u32,
    #[serde(default = "one")]
    pub warning: u32,
}

impl Default for Weights {
    fn default() -> Self {
        Weights {
            passing: 1,
            warning: 1,
        }
    }
}

fn one() -> u32 {
    1
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct HealthCheck {
    #[serde(default)]
    pub node: String,
    #[serde(rename = "CheckID")]
    pub check_id: String,
    #[serde(default)]
    pub name: String,
    /// `passing`, `warning` or `critical` on the wire.
    pub status: String,
    #[serde(default)]
    pub notes: String,
    /// Free text that changes on every run of many checks; never a reason to rebuild.
    #[serde(default)]
    pub output: String,
    /// Empty for node-level checks.
    #[serde(rename = "ServiceID", default)]
    pub service_id: String,
    #[serde(default)]
    pub service_name: String,
    #[serde(rename = "Type", default)]
    pub kind: String,
}

/// One KV entry, its value already base64-decoded.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct KvPair {
    pub key: String,
    /// `None` for keys stored without a value (folders).
    #[serde(default, deserialize_with = "base64_value")]
    pub value: Option<Vec<u8>>,
    #[serde(default)]
    pub flags: u64,
    #[serde(default)]
    pub create_index: u64,
    #[serde(default)]
    pub modify_index: u64,
    #[serde(default)]
    pub lock_index: u64,
    #[serde(default)]
    pub session: Option<String>,
}

fn null_as_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

fn base64_value<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<u8>>, D::Error> {
    match Option::<String>::deserialize(d)? {
        None => Ok(None),
        Some(s) => base64::engine::general_purpose::STANDARD
            .decode(s.as_bytes())
            .map(Some)
            .map_err(|e| serde::de::Error::custom(format!("KV value is not base64: {e}"))),
    }
}

/// The body of `PUT /v1/agent/service/register`.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct ServiceRegistration {
    #[serde(rename = "ID")]
    pub id: String,
    pub name: String,
    /// Empty: Consul uses the agent node's address.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub address: String,
    pub port: u16,
    pub tags: Vec<String>,
    pub meta: BTreeMap<String, String>,
    pub check: Option<ServiceCheck>,
}

/// An HTTP check of a registration (`Check` in the register body).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct ServiceCheck {
    #[serde(rename = "HTTP")]
    pub http: String,
    /// Go duration strings, e.g. `10s`.
    pub interval: String,
    pub timeout: String,
    pub deregister_critical_service_after: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_entries_from_the_api_brief_parse() {
        let json = r#"[{"Node":{"ID":"5b","Node":"app-node-2","Address":"10.20.1.12","Datacenter":"dc1",
            "TaggedAddresses":{"lan":"10.20.1.12"},"Meta":null,"CreateIndex":15,"ModifyIndex":17},
          "Service":{"ID":"web-2","Service":"web","Tags":null,"Address":"",
            "TaggedAddresses":{"lan_ipv4":{"address":"10.20.1.12","port":8080},"wan":{"Address":"1.2.3.4","Port":80}},
            "Meta":{"version":"2.5.0-rc1"},"Port":8080,"Weights":{"Passing":10,"Warning":1},
            "EnableTagOverride":false,"Proxy":{"Mode":"","MeshGateway":{},"Expose":{}},"Connect":{}},
          "Checks":[{"Node":"app-node-2","CheckID":"serfHealth","Name":"Serf Health Status","Status":"passing",
            "Notes":"","Output":"Agent alive and reachable","ServiceID":"","ServiceName":"","ServiceTags":[],
            "Type":"","ExposedPort":0,"Definition":{},"CreateIndex":15,"ModifyIndex":15}]}]"#;
        let entries: Vec<ServiceEntry> = serde_json::from_str(json).unwrap();
        let e = &entries[0];
        assert_eq!(e.node.address, "10.20.1.12");
        assert!(e.node.meta.is_empty());
        assert!(e.service.tags.is_empty());
        assert_eq!(e.service.tagged_addresses["lan_ipv4"].port, 8080);
        assert_eq!(e.service.tagged_addresses["wan"].address, "1.2.3.4");
        assert_eq!(e.service.weights.unwrap().passing, 10);
        assert_eq!(e.checks[0].check_id, "serfHealth");
    }

    #[test]
    fn kv_values_are_base64_decoded_and_null_is_absent() {
        let json = r#"[{"LockIndex":1,"Key":"a/leader","Flags":42,"Value":"d2ViLTE=","Session":"f3","CreateIndex":1,"ModifyIndex":2},
                       {"LockIndex":0,"Key":"a/","Flags":0,"Value":null,"CreateIndex":3,"ModifyIndex":3}]"#;
        let pairs: Vec<KvPair> = serde_json::from_str(json).unwrap();
        assert_eq!(pairs[0].value.as_deref(), Some(&b"web-1"[..]));
        assert_eq!(pairs[0].session.as_deref(), Some("f3"));
        assert_eq!(pairs[1].value, None);
    }

    #[test]
    fn a_kv_value_that_is_not_base64_is_an_error() {
        let err = serde_json::from_str::<Vec<KvPair>>(r#"[{"Key":"a","Value":"***"}]"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("base64"), "{err}");
    }
}
