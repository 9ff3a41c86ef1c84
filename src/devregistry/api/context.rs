//! What every handler touches: the store, the local agent, the fault switches and the
//! settings the registry was started with.

use std::sync::Arc;

use crate::devregistry::agent::Agent;
use crate::devregistry::faults::Faults;
use crate::devregistry::store::Store;

/// Settings the handlers need.
#[derive(Clone, Debug)]
pub struct ApiSettings {
    pub token: Option<String>,
    pub datacenter: String,
    pub jitter: bool,
}

/// Everything a request handler touches.
pub struct ApiContext {
    pub store: Arc<Store>,
    pub agent: Arc<Agent>,
    pub faults: Faults,
    pub settings: ApiSettings,
}
