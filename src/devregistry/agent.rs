//! The local agent: services and checks registered through `/v1/agent/*` on the registry's
//! own node, the tasks that run their checks, maintenance mode, and the critical-service reaper.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use tokio::task::AbortHandle;

use super::checks::{self, Probers, Report};
use super::store::{
    Check, CheckDefinition, Registration, RegistryService, Status, Store, StoreError,
};

pub const SERF_CHECK_ID: &str = "serfHealth";
pub const NODE_MAINT_ID: &str = "_node_maintenance";
const SERVICE_MAINT_PREFIX: &str = "_service_maintenance:";
const DEFAULT_NODE_MAINT_REASON: &str =
    "Maintenance mode is enabled for this node, but no reason was provided. This is a default message.";
const DEFAULT_SERVICE_MAINT_REASON: &str =
    "Maintenance mode is enabled for this service, but no reason was provided. This is a default message.";

/// The agent's own node.
#[derive(Clone, Debug)]
pub struct AgentIdentity {
    pub node_name: String,
    pub node_id: String,
    pub address: String,
    pub datacenter: String,
}

/// A check as a registration asks for it (before IDs and defaults are filled in).
#[derive(Clone, Debug, Default)]
pub struct CheckSpec {
    pub id: String,
    pub name: String,
    pub notes: String,
    pub status: Option<Status>,
    pub service_id: String,
    pub definition: CheckDefinition,
    /// A kind Consul supports but this registry cannot run (gRPC, script, Docker, ...).
    pub unsupported: Option<&'static str>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AgentError {
    #[error("Missing service name")]
    MissingServiceName,
    #[error("Invalid check: {0}")]
    InvalidCheck(String),
    #[error("ServiceID {0:?} does not exist")]
    UnknownService(String),
    #[error("No service registered with ID {0:?}")]
    NoSuchService(String),
    #[error("CheckID {0:?} does not have associated TTL")]
    NotTtl(String),
    #[error("Unknown check {0:?}")]
    UnknownCheck(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Reaper timing: Consul runs it every 30 s and never reaps before 1 min.
#[derive(Clone, Copy, Debug)]
pub struct ReapSettings {
    pub interval: Duration,
    pub min_after: Duration,
}

struct Runner {
    task: AbortHandle,
    ttl_reset: Option<Arc<Notify>>,
}

pub struct Agent {
    pub identity: AgentIdentity,
    store: Arc<Store>,
    probers: Probers,
    runners: Mutex<HashMap<String, Runner>>,
    critical_since: Arc<Mutex<HashMap<String, Instant>>>,
    reap: ReapSettings,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Agent {
    /// Registers the agent's node (with `serfHealth`) and the `consul` service a server agent has.
    pub fn new(identity: AgentIdentity, store: Arc<Store>, reap: ReapSettings) -> Agent {
        let mut tagged = BTreeMap::new();
        for k in ["lan", "lan_ipv4", "wan", "wan_ipv4"] {
            tagged.insert(k.to_string(), identity.address.clone());
        }
        let reg = Registration {
            node: identity.node_name.clone(),
            node_id: identity.node_id.clone(),
            address: identity.address.clone(),
            datacenter: identity.datacenter.clone(),
            tagged_addresses: tagged,
            node_meta: BTreeMap::from([("consul-network-segment".to_string(), String::new())]),
            service: Some(RegistryService {
                id: "consul".into(),
                name: "consul".into(),
                port: 8300,
                ..RegistryService::default()
            }),
            checks: vec![Check {
                node: identity.node_name.clone(),
                id: SERF_CHECK_ID.into(),
                name: "Serf Health Status".into(),
                status: Status::Passing,
                notes: String::new(),
                output: "Agent alive and reachable".into(),
                service_id: String::new(),
                service_name: String::new(),
                kind: String::new(),
                definition: CheckDefinition::default(),
                agent_local: false,
            }],
            ..Registration::default()
        };
        // Cannot fail: node name and address are set and the check is node-level.
        let _ = store.register(&reg);
        Agent {
            identity,
            store,
            probers: Probers::new(),
            runners: Mutex::default(),
            critical_since: Arc::default(),
            reap,
        }
    }

    fn node(&self) -> &str {
        &self.identity.node_name
    }

    fn base_registration(&self) -> Registration {
        Registration {
            node: self.identity.node_name.clone(),
            address: self.identity.address.clone(),
            datacenter: self.identity.datacenter.clone(),
            skip_node_update: true,
            agent_local: true,
            ..Registration::default()
        }
    }

    /// Builds the stored check, filling Consul's default ID and name.
    fn build_check(
        spec: &CheckSpec,
        default_id: String,
        service: Option<&RegistryService>,
    ) -> Result<Check, AgentError> {
        if let Some(kind) = spec.unsupported {
            return Err(AgentError::InvalidCheck(format!(
                "{kind} checks are not supported by the dev registry (use TTL, HTTP or TCP)"
            )));
        }
        let d = &spec.definition;
        let kind = if d.ttl.is_some() {
            if d.ttl.is_some_and(|t| t.is_zero()) {
                return Err(AgentError::InvalidCheck(
                    "TTL must be > 0 for TTL checks".into(),
                ));
            }
            "ttl"
        } else if !d.http.is_empty() || !d.tcp.is_empty() {
            if d.interval.is_none_or(|i| i.is_zero()) {
                return Err(AgentError::InvalidCheck(
                    "Interval must be > 0 for HTTP or TCP checks".into(),
                ));
            }
            if !d.http.is_empty() {
                "http"
            } else {
                "tcp"
            }
        } else {
            return Err(AgentError::InvalidCheck(
                "one of TTL, HTTP or TCP (with Interval) is required".into(),
            ));
        };
        let id = if spec.id.is_empty() {
            default_id
        } else {
            spec.id.clone()
        };
        let name = match (spec.name.is_empty(), service) {
            (false, _) => spec.name.clone(),
            (true, Some(s)) => format!("Service '{}' check", s.name),
            (true, None) => id.clone(),
        };
        let mut definition = d.clone();
        if kind != "ttl" && definition.timeout.is_none() {
            definition.timeout = Some(Duration::from_secs(10));
        }
        Ok(Check {
            node: String::new(),
            id,
            name,
            status: spec.status.unwrap_or(Status::Critical),
            notes: spec.notes.clone(),
            output: String::new(),
            service_id: service.map(|s| s.id.clone()).unwrap_or_default(),
            service_name: service.map(|s| s.name.clone()).unwrap_or_default(),
            kind: kind.into(),
            definition,
            agent_local: true,
        })
    }

    /// `PUT /v1/agent/service/register`. Checks without an ID get `service:<id>` (with
    /// `:1`, `:2`, ... when there are several) and start critical unless `Status` says otherwise.
    pub fn register_service(
        self: &Arc<Self>,
        mut service: RegistryService,
        specs: Vec<CheckSpec>,
        replace_existing_checks: bool,
    ) -> Result<(), AgentError> {
        if service.name.is_empty() {
            return Err(AgentError::MissingServiceName);
        }
        if service.id.is_empty() {
            service.id = service.name.clone();
        }
        let many = specs.len() > 1;
        let mut built = Vec::with_capacity(specs.len());
        for (i, spec) in specs.iter().enumerate() {
            let default_id = if many {
                format!("service:{}:{}", service.id, i + 1)
            } else {
                format!("service:{}", service.id)
            };
            built.push(Self::build_check(spec, default_id, Some(&service))?);
        }
        let previous: Vec<String> = self.store.read(|s| {
            s.checks_for(self.node(), Some(&service.id))
                .filter(|c| c.check.service_id == service.id && c.check.agent_local)
                .map(|c| c.check.id.clone())
                .collect()
        });
        let mut reg = self.base_registration();
        reg.service = Some(service.clone());
        reg.checks = built.clone();
        self.store.register(&reg)?;
        if replace_existing_checks {
            for id in previous {
                let maint = id.starts_with(SERVICE_MAINT_PREFIX);
                if !maint && !built.iter().any(|c| c.id == id) {
                    self.drop_check(&id);
                }
            }
        }
        for c in &built {
            self.start_runner(c);
        }
        Ok(())
    }

    /// `PUT /v1/agent/service/deregister/:id`: unknown IDs are a no-op, as documented.
    pub fn deregister_service(&self, id: &str) {
        let checks: Vec<String> = self.store.read(|s| {
            s.check_ids_of(&self.identity.node_name, id)
                .cloned()
                .collect()
        });
        for c in checks {
            self.stop_runner(&c);
        }
        self.store.deregister_service(self.node(), id);
    }

    /// `PUT /v1/agent/check/register`.
    pub fn register_check(self: &Arc<Self>, spec: CheckSpec) -> Result<(), AgentError> {
        let service = if spec.service_id.is_empty() {
            None
        } else {
            Some(
                self.store
                    .service(self.node(), &spec.service_id)
                    .ok_or_else(|| AgentError::UnknownService(spec.service_id.clone()))?
                    .service,
            )
        };
        if spec.id.is_empty() && spec.name.is_empty() {
            return Err(AgentError::InvalidCheck("missing name".into()));
        }
        let default_id = spec.name.clone();
        let check = Self::build_check(&spec, default_id, service.as_ref())?;
        let mut reg = self.base_registration();
        reg.checks = vec![check.clone()];
        self.store.register(&reg)?;
        self.start_runner(&check);
        Ok(())
    }

    /// `PUT /v1/agent/check/deregister/:id`.
    pub fn deregister_check(&self, id: &str) -> Result<(), AgentError> {
        match self.store.check(self.node(), id) {
            Some(c) if c.agent_local => {
                self.drop_check(id);
                Ok(())
            }
            _ => Err(AgentError::UnknownCheck(id.to_string())),
        }
    }

    fn drop_check(&self, id: &str) {
        self.stop_runner(id);
        lock(&self.critical_since).remove(id);
        self.store.deregister_check(self.node(), id);
    }

    /// `PUT /v1/agent/check/{pass,warn,fail,update}/:id`: TTL checks only; resets the TTL clock.
    pub fn update_ttl(&self, id: &str, status: Status, output: &str) -> Result<(), AgentError> {
        let reset = {
            let runners = lock(&self.runners);
            runners.get(id).and_then(|r| r.ttl_reset.clone())
        };
        let Some(reset) = reset else {
            return Err(AgentError::NotTtl(id.to_string()));
        };
        self.apply(id, status, output);
        reset.notify_one();
        Ok(())
    }

    /// Sets any agent check's status directly (a test convenience; TTL clocks are reset too).
    pub fn set_check_status(
        &self,
        id: &str,
        status: Status,
        output: &str,
    ) -> Result<(), AgentError> {
        if self.store.check(self.node(), id).is_none() {
            return Err(AgentError::UnknownCheck(id.to_string()));
        }
        self.apply(id, status, output);
        if let Some(reset) = lock(&self.runners)
            .get(id)
            .and_then(|r| r.ttl_reset.clone())
        {
            reset.notify_one();
        }
        Ok(())
    }

    fn apply(&self, id: &str, status: Status, output: &str) {
        record(&self.critical_since, id, status);
        self.store.set_check(self.node(), id, status, output);
    }

    /// `PUT /v1/agent/service/maintenance/:id?enable=...&reason=...`.
    pub fn service_maintenance(
        &self,
        service_id: &str,
        enable: bool,
        reason: &str,
    ) -> Result<(), AgentError> {
        let Some(entry) = self.store.service(self.node(), service_id) else {
            return Err(AgentError::NoSuchService(service_id.to_string()));
        };
        let id = format!("{SERVICE_MAINT_PREFIX}{service_id}");
        if !enable {
            self.store.deregister_check(self.node(), &id);
            return Ok(());
        }
        // Already in maintenance: Consul keeps the first reason.
        if self.store.check(self.node(), &id).is_some() {
            return Ok(());
        }
        let notes = if reason.is_empty() {
            DEFAULT_SERVICE_MAINT_REASON
        } else {
            reason
        };
        let mut reg = self.base_registration();
        reg.checks = vec![Check {
            node: self.identity.node_name.clone(),
            id,
            name: "Service Maintenance Mode".into(),
            status: Status::Critical,
            notes: notes.into(),
            output: String::new(),
            service_id: service_id.into(),
            service_name: entry.service.name.clone(),
            kind: String::new(),
            definition: CheckDefinition::default(),
            agent_local: true,
        }];
        self.store.register(&reg)?;
        Ok(())
    }

    /// `PUT /v1/agent/maintenance?enable=...&reason=...`.
    pub fn node_maintenance(&self, enable: bool, reason: &str) -> Result<(), AgentError> {
        if !enable {
            self.store.deregister_check(self.node(), NODE_MAINT_ID);
            return Ok(());
        }
        if self.store.check(self.node(), NODE_MAINT_ID).is_some() {
            return Ok(());
        }
        let notes = if reason.is_empty() {
            DEFAULT_NODE_MAINT_REASON
        } else {
            reason
        };
        let mut reg = self.base_registration();
        reg.checks = vec![Check {
            node: self.identity.node_name.clone(),
            id: NODE_MAINT_ID.into(),
            name: "Node Maintenance Mode".into(),
            status: Status::Critical,
            notes: notes.into(),
            output: String::new(),
            service_id: String::new(),
            service_name: String::new(),
            kind: String::new(),
            definition: CheckDefinition::default(),
            agent_local: true,
        }];
        self.store.register(&reg)?;
        Ok(())
    }

    fn start_runner(self: &Arc<Self>, check: &Check) {
        self.stop_runner(&check.id);
        record(&self.critical_since, &check.id, check.status);
        let report = self.reporter(&check.id);
        let d = check.definition.clone();
        let runner = if let Some(ttl) = d.ttl {
            let reset = Arc::new(Notify::new());
            let store = self.store.clone();
            let (node, id) = (self.identity.node_name.clone(), check.id.clone());
            let last_output = Arc::new(move || {
                store
                    .check(&node, &id)
                    .map(|c| c.output)
                    .unwrap_or_default()
            });
            let task = tokio::spawn(checks::run_ttl(ttl, reset.clone(), last_output, report));
            Runner {
                task: task.abort_handle(),
                ttl_reset: Some(reset),
            }
        } else if !d.http.is_empty() || !d.tcp.is_empty() {
            let task = tokio::spawn(checks::run_probe(self.probers.clone(), d, report));
            Runner {
                task: task.abort_handle(),
                ttl_reset: None,
            }
        } else {
            return;
        };
        lock(&self.runners).insert(check.id.clone(), runner);
    }

    /// A callback for runners; holds only the store, so a runner never keeps the agent alive.
    fn reporter(&self, id: &str) -> Report {
        let store = self.store.clone();
        let since = self.critical_since.clone();
        let (node, id) = (self.identity.node_name.clone(), id.to_string());
        Arc::new(move |status, output| {
            record(&since, &id, status);
            store.set_check(&node, &id, status, &output);
        })
    }

    fn stop_runner(&self, id: &str) {
        if let Some(r) = lock(&self.runners).remove(id) {
            r.task.abort();
        }
    }

    /// Stops every check task (the registry is being dropped).
    pub fn abort_all(&self) {
        for (_, r) in lock(&self.runners).drain() {
            r.task.abort();
        }
    }

    /// Deregisters services whose checks have been critical longer than their
    /// `DeregisterCriticalServiceAfter` (never sooner than the configured minimum).
    pub fn reap_once(&self) {
        let now = Instant::now();
        let doomed: Vec<String> = {
            let since = lock(&self.critical_since);
            self.store.read(|s| {
                s.checks_on(&self.identity.node_name)
                    .filter(|c| c.check.agent_local && c.check.status == Status::Critical)
                    .filter_map(|c| {
                        let after = c.check.definition.deregister_critical_after?;
                        let t = since.get(&c.check.id)?;
                        (now.duration_since(*t) >= after.max(self.reap.min_after)
                            && !c.check.service_id.is_empty())
                        .then(|| c.check.service_id.clone())
                    })
                    .collect()
            })
        };
        for id in doomed {
            tracing::info!(service_id = %id, "deregistering service critical for too long");
            self.deregister_service(&id);
        }
    }

    pub async fn run_reaper(self: Arc<Self>) {
        let mut tick = tokio::time::interval(self.reap.interval.max(Duration::from_millis(10)));
        loop {
            tick.tick().await;
            self.reap_once();
        }
    }
}

fn record(since: &Mutex<HashMap<String, Instant>>, id: &str, status: Status) {
    let mut m = lock(since);
    if status == Status::Critical {
        m.entry(id.to_string()).or_insert_with(Instant::now);
    } else {
        m.remove(id);
    }
}
