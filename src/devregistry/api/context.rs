//! What every handler touches: the store, the local agent, the fault switches, the
//! datacenter and its WAN peers, and the settings the registry was started with.

use std::sync::Arc;

use super::wan::WanPeers;
use crate::devregistry::agent::Agent;
use crate::devregistry::faults::Faults;
use crate::devregistry::store::Store;

/// Settings the handlers need.
#[derive(Clone, Debug)]
pub struct ApiSettings {
    pub token: Option<String>,
    pub jitter: bool,
}

/// Everything a request handler touches.
pub struct ApiContext {
    pub store: Arc<Store>,
    pub agent: Arc<Agent>,
    pub faults: Faults,
    pub settings: ApiSettings,
    /// This registry's datacenter and its WAN peers.
    pub wan: WanPeers,
}
