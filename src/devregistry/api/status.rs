//! `/v1/status/leader` and `/v1/status/peers`: this one server is the raft leader (none
//! under the no-leader fault) and the only peer. No ACL, as in Consul.

use serde_json::{json, Value};

use super::context::ApiContext;

/// The leader's server RPC address, `""` without a leader.
pub fn leader(ctx: &ApiContext) -> Value {
    let leader = if ctx.faults.no_leader() {
        String::new()
    } else {
        format!("{}:8300", ctx.agent.identity.address)
    };
    json!(leader)
}

pub fn peers(ctx: &ApiContext) -> Value {
    json!([format!("{}:8300", ctx.agent.identity.address)])
}
