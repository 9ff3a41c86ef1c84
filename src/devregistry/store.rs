//! The registry's state: nodes, service instances, checks and KV, one global Raft-like index,
//! per-table and per-service indices (so a query reports the index of what it read), and
//! the blocking-read loop. One std `Mutex`: no `.await` is ever taken while holding it.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use tokio::time::Instant;

use super::watch::{self, WatchKey, Watchers};

/// Health of a check, spelled like Consul spells it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    Passing,
    Warning,
    Critical,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Passing => "passing",
            Status::Warning => "warning",
            Status::Critical => "critical",
        }
    }

    pub fn parse(s: &str) -> Option<Status> {
        match s {
            "passing" => Some(Status::Passing),
            "warning" => Some(Status::Warning),
            "critical" => Some(Status::Critical),
            _ => None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegistryNode {
    pub id: String,
    pub name: String,
    pub address: String,
    pub datacenter: String,
    pub tagged_addresses: BTreeMap<String, String>,
    pub meta: BTreeMap<String, String>,
    pub create_index: u64,
    pub modify_index: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TaggedAddress {
    pub address: String,
    pub port: i64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RegistryWeights {
    pub passing: i64,
    pub warning: i64,
}

impl Default for RegistryWeights {
    fn default() -> Self {
        RegistryWeights {
            passing: 1,
            warning: 1,
        }
    }
}

/// One service instance as registered (without indices).
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct RegistryService {
    pub id: String,
    pub name: String,
    pub kind: String,
    pub tags: Vec<String>,
    pub address: String,
    pub tagged_addresses: BTreeMap<String, TaggedAddress>,
    pub meta: BTreeMap<String, String>,
    pub port: i64,
    pub weights: RegistryWeights,
    pub enable_tag_override: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegistryServiceEntry {
    pub node: String,
    pub service: RegistryService,
    /// Registered through this agent's `agent/` API (listed by `agent/services`).
    pub agent_local: bool,
    pub create_index: u64,
    pub modify_index: u64,
}

/// What a check runs, as echoed in `Definition`, `Interval` and `Timeout`.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct CheckDefinition {
    pub http: String,
    pub method: String,
    pub header: BTreeMap<String, Vec<String>>,
    pub body: String,
    pub tls_skip_verify: bool,
    pub tcp: String,
    pub ttl: Option<Duration>,
    pub interval: Option<Duration>,
    pub timeout: Option<Duration>,
    pub deregister_critical_after: Option<Duration>,
}

/// One check as registered (without indices).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Check {
    pub node: String,
    pub id: String,
    pub name: String,
    pub status: Status,
    pub notes: String,
    pub output: String,
    pub service_id: String,
    pub service_name: String,
    /// `ttl`, `http`, `tcp`, or empty (catalog checks, maintenance, serfHealth).
    pub kind: String,
    pub definition: CheckDefinition,
    pub agent_local: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckEntry {
    pub check: Check,
    pub create_index: u64,
    pub modify_index: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KvEntry {
    pub key: String,
    pub value: Bytes,
    pub flags: u64,
    pub lock_index: u64,
    pub create_index: u64,
    pub modify_index: u64,
}

/// A catalog write: a node, optionally one service and some checks, applied at one index.
#[derive(Clone, Debug, Default)]
pub struct Registration {
    pub node: String,
    pub node_id: String,
    pub address: String,
    pub datacenter: String,
    pub tagged_addresses: BTreeMap<String, String>,
    pub node_meta: BTreeMap<String, String>,
    pub skip_node_update: bool,
    pub service: Option<RegistryService>,
    pub agent_local: bool,
    pub checks: Vec<Check>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StoreError {
    #[error("Missing node name")]
    MissingNode,
    #[error("Missing node address")]
    MissingAddress,
    #[error("Missing service name")]
    MissingServiceName,
    #[error("Unknown service '{0}' for check")]
    UnknownServiceForCheck(String),
    #[error("No node named \"{0}\"")]
    UnknownNode(String),
}

/// The whole state. Readers get `&RegistryState` under the lock; fields are read directly.
#[derive(Debug, Default)]
pub struct RegistryState {
    pub index: u64,
    pub nodes: BTreeMap<String, RegistryNode>,
    /// Keyed by (node, service ID).
    pub services: BTreeMap<(String, String), RegistryServiceEntry>,
    /// Service name → keys of `services`, so a health query does not scan the catalog.
    by_name: HashMap<String, BTreeSet<(String, String)>>,
    /// (node, service ID, "" for node-level checks) → check IDs, so one instance's checks
    /// are found without walking every check of its node (an agent node holds thousands).
    checks_by_owner: HashMap<(String, String), BTreeSet<String>>,
    /// Keyed by (node, check ID).
    pub checks: BTreeMap<(String, String), CheckEntry>,
    pub kv: BTreeMap<String, KvEntry>,
    /// Deleted KV keys and the index of their deletion, so prefix indices rise on delete.
    pub tombstones: BTreeMap<String, u64>,
    pub nodes_index: u64,
    pub services_index: u64,
    pub checks_index: u64,
    pub kv_index: u64,
    /// Per service name: instances, their checks, and their nodes.
    pub service_index: HashMap<String, u64>,
    /// When the last instance of any service disappeared (index for absent names).
    pub extinction_index: u64,
    /// Bumped on snapshot restore; blocked queries return at once when it changes.
    pub epoch: u64,
}

fn clamp(x: &mut u64, to: u64) {
    if *x > to {
        *x = to;
    }
}

impl RegistryState {
    /// Index of everything about one service name (instances, checks, nodes); for an
    /// absent name, the last extinction index, so watching a not-yet-existing service works.
    pub fn service_index_of(&self, name: &str) -> u64 {
        match self.service_index.get(name) {
            Some(i) => *i,
            None if self.extinction_index > 0 => self.extinction_index,
            None => self
                .nodes_index
                .max(self.services_index)
                .max(self.checks_index),
        }
    }

    /// Instances of one service name, in (node, service ID) order.
    pub fn instances_of<'a>(
        &'a self,
        name: &'a str,
    ) -> impl Iterator<Item = &'a RegistryServiceEntry> + 'a {
        self.by_name
            .get(name)
            .into_iter()
            .flatten()
            .filter_map(|key| self.services.get(key))
    }

    /// Instances on one node, in service ID order.
    pub fn services_on<'a>(
        &'a self,
        node: &'a str,
    ) -> impl Iterator<Item = &'a RegistryServiceEntry> + 'a {
        self.services
            .range((node.to_string(), String::new())..)
            .take_while(move |((n, _), _)| n == node)
            .map(|(_, s)| s)
    }

    /// Checks on one node (node-level and service ones), in check ID order.
    pub fn checks_on<'a>(&'a self, node: &'a str) -> impl Iterator<Item = &'a CheckEntry> + 'a {
        self.checks
            .range((node.to_string(), String::new())..)
            .take_while(move |((n, _), _)| n == node)
            .map(|(_, c)| c)
    }

    /// Checks of one node: node-level ones (no service) and, with `Some(id)`, those of that
    /// service, in check ID order.
    pub fn checks_for<'a>(
        &'a self,
        node: &'a str,
        service_id: Option<&'a str>,
    ) -> impl Iterator<Item = &'a CheckEntry> + 'a {
        let mut ids: Vec<&String> = self.check_ids_of(node, "").collect();
        if let Some(id) = service_id.filter(|id| !id.is_empty()) {
            ids.extend(self.check_ids_of(node, id));
            ids.sort();
        }
        ids.into_iter()
            .filter_map(move |id| self.checks.get(&(node.to_string(), id.clone())))
    }

    /// IDs of the checks of one service instance (`""`: the node's own checks).
    pub fn check_ids_of<'a>(
        &'a self,
        node: &str,
        service_id: &str,
    ) -> impl Iterator<Item = &'a String> + 'a {
        self.checks_by_owner
            .get(&(node.to_string(), service_id.to_string()))
            .into_iter()
            .flatten()
    }

    /// Inserts or replaces an instance, keeping `by_name` in step.
    fn put_service(&mut self, entry: RegistryServiceEntry) {
        let key = (entry.node.clone(), entry.service.id.clone());
        self.take_service(&key);
        self.by_name
            .entry(entry.service.name.clone())
            .or_default()
            .insert(key.clone());
        self.services.insert(key, entry);
    }

    fn take_service(&mut self, key: &(String, String)) -> Option<RegistryServiceEntry> {
        let old = self.services.remove(key)?;
        if let Some(keys) = self.by_name.get_mut(&old.service.name) {
            keys.remove(key);
            if keys.is_empty() {
                self.by_name.remove(&old.service.name);
            }
        }
        Some(old)
    }

    /// Inserts or replaces a check, keeping `checks_by_owner` in step.
    fn put_check(&mut self, entry: CheckEntry) {
        let key = (entry.check.node.clone(), entry.check.id.clone());
        self.take_check(&key);
        self.checks_by_owner
            .entry((entry.check.node.clone(), entry.check.service_id.clone()))
            .or_default()
            .insert(entry.check.id.clone());
        self.checks.insert(key, entry);
    }

    fn take_check(&mut self, key: &(String, String)) -> Option<CheckEntry> {
        let old = self.checks.remove(key)?;
        let owner = (old.check.node.clone(), old.check.service_id.clone());
        if let Some(ids) = self.checks_by_owner.get_mut(&owner) {
            ids.remove(&old.check.id);
            if ids.is_empty() {
                self.checks_by_owner.remove(&owner);
            }
        }
        Some(old)
    }

    pub fn service_tags(&self, node: &str, service_id: &str) -> Vec<String> {
        self.services
            .get(&(node.to_string(), service_id.to_string()))
            .map(|s| s.service.tags.clone())
            .unwrap_or_default()
    }

    /// The KV index for a prefix: highest ModifyIndex or tombstone under it; the table
    /// index when nothing is (or when the prefix is empty).
    pub fn kv_prefix_index(&self, prefix: &str) -> u64 {
        if prefix.is_empty() {
            return self.kv_index;
        }
        let live = self
            .kv
            .range(prefix.to_string()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(_, e)| e.modify_index)
            .max()
            .unwrap_or(0);
        let dead = self
            .tombstones
            .range(prefix.to_string()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(_, i)| *i)
            .max()
            .unwrap_or(0);
        match live.max(dead) {
            0 => self.kv_index,
            i => i,
        }
    }

    pub fn kv_under<'a>(&'a self, prefix: &'a str) -> impl Iterator<Item = &'a KvEntry> + 'a {
        self.kv
            .range(prefix.to_string()..)
            .take_while(move |(k, _)| k.starts_with(prefix))
            .map(|(_, e)| e)
    }
}

/// One write in progress: the index it will commit at and what it touched.
struct Tx<'a> {
    state: &'a mut RegistryState,
    idx: u64,
    touched: BTreeSet<TouchKey>,
}

/// `WatchKey` is not `Ord`; this mirror is, so touched keys dedupe cheaply.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum TouchKey {
    Nodes,
    Services,
    Checks,
    Service(String),
    KvTable,
    KvKey(String),
}

impl From<TouchKey> for WatchKey {
    fn from(t: TouchKey) -> WatchKey {
        match t {
            TouchKey::Nodes => WatchKey::Nodes,
            TouchKey::Services => WatchKey::Services,
            TouchKey::Checks => WatchKey::Checks,
            TouchKey::Service(s) => WatchKey::Service(s),
            TouchKey::KvTable => WatchKey::KvTable,
            TouchKey::KvKey(k) => WatchKey::KvKey(k),
        }
    }
}

impl Tx<'_> {
    fn touch_service(&mut self, name: &str) {
        self.state.service_index.insert(name.to_string(), self.idx);
        self.touched.insert(TouchKey::Service(name.to_string()));
    }

    fn touch_services_on_node(&mut self, node: &str) {
        let names: BTreeSet<String> = self
            .state
            .services_on(node)
            .map(|s| s.service.name.clone())
            .collect();
        for n in names {
            self.touch_service(&n);
        }
    }

    fn upsert_node(&mut self, reg: &Registration) {
        let existing = self.state.nodes.get(&reg.node);
        let mut node = RegistryNode {
            id: reg.node_id.clone(),
            name: reg.node.clone(),
            address: reg.address.clone(),
            datacenter: reg.datacenter.clone(),
            tagged_addresses: reg.tagged_addresses.clone(),
            meta: reg.node_meta.clone(),
            create_index: self.idx,
            modify_index: self.idx,
        };
        if let Some(old) = existing {
            if node.id.is_empty() {
                node.id = old.id.clone();
            }
            node.create_index = old.create_index;
            node.modify_index = old.modify_index;
            if &node == old {
                return;
            }
            node.modify_index = self.idx;
        }
        self.state.nodes.insert(reg.node.clone(), node);
        self.state.nodes_index = self.idx;
        self.touched.insert(TouchKey::Nodes);
        let node_name = reg.node.clone();
        self.touch_services_on_node(&node_name);
    }

    fn upsert_service(&mut self, node: &str, svc: &RegistryService, agent_local: bool) {
        let key = (node.to_string(), svc.id.clone());
        let old = self.state.services.get(&key).cloned();
        if let Some(old) = &old {
            if &old.service == svc && old.agent_local == agent_local {
                return;
            }
        }
        let create_index = old.as_ref().map_or(self.idx, |o| o.create_index);
        self.state.put_service(RegistryServiceEntry {
            node: node.to_string(),
            service: svc.clone(),
            agent_local,
            create_index,
            modify_index: self.idx,
        });
        self.state.services_index = self.idx;
        self.touched.insert(TouchKey::Services);
        self.touch_service(&svc.name);
        if let Some(old) = old {
            if old.service.name != svc.name {
                self.after_service_removed(&old.service.name);
            }
        }
    }

    /// Bookkeeping once an instance of `name` is gone: extinction or a per-service bump.
    fn after_service_removed(&mut self, name: &str) {
        self.touched.insert(TouchKey::Service(name.to_string()));
        if self.state.instances_of(name).next().is_none() {
            self.state.service_index.remove(name);
            self.state.extinction_index = self.idx;
        } else {
            self.state.service_index.insert(name.to_string(), self.idx);
        }
    }

    fn upsert_check(&mut self, check: &Check) {
        let key = (check.node.clone(), check.id.clone());
        let old = self.state.checks.get(&key);
        if let Some(old) = old {
            if &old.check == check {
                return;
            }
        }
        let create_index = old.map_or(self.idx, |o| o.create_index);
        let old_service = old.map(|o| o.check.service_name.clone());
        self.state.put_check(CheckEntry {
            check: check.clone(),
            create_index,
            modify_index: self.idx,
        });
        self.state.checks_index = self.idx;
        self.touched.insert(TouchKey::Checks);
        self.touch_check_owner(&check.node, &check.service_name);
        if let Some(old) = old_service {
            if !old.is_empty() && old != check.service_name {
                self.touch_service(&old);
            }
        }
    }

    fn touch_check_owner(&mut self, node: &str, service_name: &str) {
        if service_name.is_empty() {
            self.touch_services_on_node(node);
        } else {
            self.touch_service(service_name);
        }
    }

    fn remove_check(&mut self, node: &str, id: &str) -> bool {
        match self.state.take_check(&(node.to_string(), id.to_string())) {
            Some(old) => {
                self.state.checks_index = self.idx;
                self.touched.insert(TouchKey::Checks);
                self.touch_check_owner(node, &old.check.service_name);
                true
            }
            None => false,
        }
    }

    fn remove_service(&mut self, node: &str, id: &str) -> bool {
        let Some(old) = self.state.take_service(&(node.to_string(), id.to_string())) else {
            return false;
        };
        let check_ids: Vec<String> = self.state.check_ids_of(node, id).cloned().collect();
        for c in check_ids {
            self.state.take_check(&(node.to_string(), c));
            self.state.checks_index = self.idx;
            self.touched.insert(TouchKey::Checks);
        }
        self.state.services_index = self.idx;
        self.touched.insert(TouchKey::Services);
        self.after_service_removed(&old.service.name);
        true
    }

    fn kv_set(&mut self, key: &str, value: Bytes, flags: u64) {
        let (create_index, lock_index) = self
            .state
            .kv
            .get(key)
            .map_or((self.idx, 0), |e| (e.create_index, e.lock_index));
        self.state.kv.insert(
            key.to_string(),
            KvEntry {
                key: key.to_string(),
                value,
                flags,
                lock_index,
                create_index,
                modify_index: self.idx,
            },
        );
        self.state.tombstones.remove(key);
        self.kv_touch(key);
    }

    fn kv_remove(&mut self, key: &str) {
        if self.state.kv.remove(key).is_some() {
            self.state.tombstones.insert(key.to_string(), self.idx);
            self.kv_touch(key);
        }
    }

    fn kv_touch(&mut self, key: &str) {
        self.state.kv_index = self.idx;
        self.touched.insert(TouchKey::KvTable);
        self.touched.insert(TouchKey::KvKey(key.to_string()));
    }
}

struct Inner {
    state: RegistryState,
    watchers: Watchers,
}

/// The shared store. All mutation goes through [`Store::write`]-based methods so the index,
/// table indices and wake-ups stay consistent.
pub struct Store {
    inner: Mutex<Inner>,
}

/// The outcome of one (possibly blocking) read.
pub struct Read<T> {
    pub value: T,
    pub index: u64,
}

/// What a read computes: its value, result index, and the keys a change of which may change it.
pub struct IndexedAnswer<T> {
    pub value: T,
    pub index: u64,
    pub watch: Vec<WatchKey>,
}

impl Default for Store {
    fn default() -> Self {
        Self::new()
    }
}

impl Store {
    pub fn new() -> Store {
        Store {
            inner: Mutex::new(Inner {
                state: RegistryState {
                    index: 1,
                    ..RegistryState::default()
                },
                watchers: Watchers::default(),
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves plain data behind; keep serving it.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `f` as one write at the next index; commits the index only if it touched something.
    fn write<R>(&self, f: impl FnOnce(&mut Tx<'_>) -> R) -> R {
        let mut g = self.lock();
        let inner = &mut *g;
        let idx = inner.state.index + 1;
        let mut tx = Tx {
            state: &mut inner.state,
            idx,
            touched: BTreeSet::new(),
        };
        let r = f(&mut tx);
        let touched = std::mem::take(&mut tx.touched);
        if !touched.is_empty() {
            inner.state.index = idx;
            let keys: Vec<WatchKey> = touched.into_iter().map(WatchKey::from).collect();
            inner.watchers.notify(&keys);
        }
        r
    }

    /// A non-blocking look at the state.
    pub fn read<R>(&self, f: impl FnOnce(&RegistryState) -> R) -> R {
        f(&self.lock().state)
    }

    pub fn current_index(&self) -> u64 {
        self.lock().state.index
    }

    /// Runs a query; with `min_index > 0` blocks (up to `timeout`) until its result index
    /// is strictly greater, re-evaluating only when a write touches one of its watch keys.
    /// A snapshot restore returns at once with whatever the query now says.
    pub async fn block<T>(
        &self,
        min_index: u64,
        timeout: Duration,
        query: impl Fn(&RegistryState) -> IndexedAnswer<T>,
    ) -> Read<T> {
        let deadline = Instant::now() + timeout;
        let mut start_epoch = None;
        let mut timed_out = false;
        loop {
            let wakeups = {
                let mut g = self.lock();
                let inner = &mut *g;
                let a = query(&inner.state);
                let epoch = *start_epoch.get_or_insert(inner.state.epoch);
                if min_index == 0 || a.index > min_index || timed_out || epoch != inner.state.epoch
                {
                    return Read {
                        value: a.value,
                        index: a.index,
                    };
                }
                inner.watchers.subscribe(&a.watch)
            };
            tokio::select! {
                _ = watch::any(wakeups) => {}
                _ = tokio::time::sleep_until(deadline) => timed_out = true,
            }
        }
    }

    /// Wakes every blocked query (used on shutdown so they answer with what they have).
    pub fn wake_all(&self) {
        self.lock().watchers.notify_all();
    }

    // === catalog ===

    pub fn register(&self, reg: &Registration) -> Result<(), StoreError> {
        if reg.node.is_empty() {
            return Err(StoreError::MissingNode);
        }
        if let Some(s) = &reg.service {
            if s.name.is_empty() {
                return Err(StoreError::MissingServiceName);
            }
        }
        self.write(|tx| {
            for c in &reg.checks {
                if !c.service_id.is_empty() {
                    let known = tx
                        .state
                        .services
                        .contains_key(&(reg.node.clone(), c.service_id.clone()))
                        || reg.service.as_ref().is_some_and(|s| s.id == c.service_id);
                    if !known {
                        return Err(StoreError::UnknownServiceForCheck(c.service_id.clone()));
                    }
                }
            }
            let node_exists = tx.state.nodes.contains_key(&reg.node);
            if !reg.skip_node_update || !node_exists {
                if reg.address.is_empty() {
                    return Err(StoreError::MissingAddress);
                }
                tx.upsert_node(reg);
            }
            if let Some(s) = &reg.service {
                tx.upsert_service(&reg.node, s, reg.agent_local);
            }
            for c in &reg.checks {
                let mut c = c.clone();
                c.node = reg.node.clone();
                if !c.service_id.is_empty() {
                    if let Some(s) = tx
                        .state
                        .services
                        .get(&(reg.node.clone(), c.service_id.clone()))
                    {
                        c.service_name = s.service.name.clone();
                    }
                }
                tx.upsert_check(&c);
            }
            Ok(())
        })
    }

    /// Removes a node with everything on it.
    pub fn deregister_node(&self, node: &str) {
        self.write(|tx| {
            let ids: Vec<String> = tx
                .state
                .services_on(node)
                .map(|s| s.service.id.clone())
                .collect();
            for id in ids {
                tx.remove_service(node, &id);
            }
            let checks: Vec<String> = tx
                .state
                .checks_on(node)
                .map(|c| c.check.id.clone())
                .collect();
            for c in checks {
                tx.remove_check(node, &c);
            }
            if tx.state.nodes.remove(node).is_some() {
                tx.state.nodes_index = tx.idx;
                tx.touched.insert(TouchKey::Nodes);
            }
        })
    }

    pub fn deregister_service(&self, node: &str, service_id: &str) -> bool {
        self.write(|tx| tx.remove_service(node, service_id))
    }

    pub fn deregister_check(&self, node: &str, check_id: &str) -> bool {
        self.write(|tx| tx.remove_check(node, check_id))
    }

    /// Sets a check's status and output; a no-op (no index bump) when neither changes.
    pub fn set_check(&self, node: &str, check_id: &str, status: Status, output: &str) -> bool {
        self.write(|tx| {
            let Some(entry) = tx
                .state
                .checks
                .get(&(node.to_string(), check_id.to_string()))
            else {
                return false;
            };
            if entry.check.status == status && entry.check.output == output {
                return true;
            }
            let mut c = entry.check.clone();
            c.status = status;
            c.output = output.to_string();
            tx.upsert_check(&c);
            true
        })
    }

    pub fn check(&self, node: &str, check_id: &str) -> Option<Check> {
        self.read(|s| {
            s.checks
                .get(&(node.to_string(), check_id.to_string()))
                .map(|c| c.check.clone())
        })
    }

    pub fn service(&self, node: &str, service_id: &str) -> Option<RegistryServiceEntry> {
        self.read(|s| {
            s.services
                .get(&(node.to_string(), service_id.to_string()))
                .cloned()
        })
    }

    // === KV ===

    /// Writes a key. `cas`: `Some(0)` creates only if absent, `Some(i)` replaces only at ModifyIndex `i`.
    pub fn kv_put(&self, key: &str, value: Bytes, flags: u64, cas: Option<u64>) -> bool {
        self.write(|tx| {
            let current = tx.state.kv.get(key).map(|e| e.modify_index);
            let ok = match (cas, current) {
                (None, _) => true,
                (Some(0), None) => true,
                (Some(0), Some(_)) => false,
                (Some(want), Some(have)) => want == have,
                (Some(_), None) => false,
            };
            if ok {
                tx.kv_set(key, value, flags);
            }
            ok
        })
    }

    /// Deletes one key, or (recurse) every key under the prefix. `cas` as in Consul: only
    /// at a matching ModifyIndex; `cas=0` never deletes.
    pub fn kv_delete(&self, key: &str, recurse: bool, cas: Option<u64>) -> bool {
        self.write(|tx| {
            if recurse {
                let keys: Vec<String> = tx.state.kv_under(key).map(|e| e.key.clone()).collect();
                for k in keys {
                    tx.kv_remove(&k);
                }
                return true;
            }
            match cas {
                None => {
                    tx.kv_remove(key);
                    true
                }
                Some(want) => match tx.state.kv.get(key) {
                    Some(e) if want != 0 && e.modify_index == want => {
                        tx.kv_remove(key);
                        true
                    }
                    _ => false,
                },
            }
        })
    }

    // === faults ===

    /// Simulates a snapshot restore to an older state: every index above `to` drops to `to`,
    /// the global index restarts there, and blocked queries return at once.
    pub fn rewind(&self, to: u64) {
        let mut g = self.lock();
        let s = &mut g.state;
        let to = to.max(1);
        s.index = to;
        for n in s.nodes.values_mut() {
            clamp(&mut n.create_index, to);
            clamp(&mut n.modify_index, to);
        }
        for e in s.services.values_mut() {
            clamp(&mut e.create_index, to);
            clamp(&mut e.modify_index, to);
        }
        for c in s.checks.values_mut() {
            clamp(&mut c.create_index, to);
            clamp(&mut c.modify_index, to);
        }
        for e in s.kv.values_mut() {
            clamp(&mut e.create_index, to);
            clamp(&mut e.modify_index, to);
        }
        for i in s.tombstones.values_mut() {
            clamp(i, to);
        }
        for i in s.service_index.values_mut() {
            clamp(i, to);
        }
        for i in [
            &mut s.nodes_index,
            &mut s.services_index,
            &mut s.checks_index,
            &mut s.kv_index,
            &mut s.extinction_index,
        ] {
            clamp(i, to);
        }
        s.epoch += 1;
        g.watchers.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reg(node: &str, svc: Option<(&str, &str)>) -> Registration {
        Registration {
            node: node.into(),
            address: "127.0.0.1".into(),
            datacenter: "dc1".into(),
            service: svc.map(|(id, name)| RegistryService {
                id: id.into(),
                name: name.into(),
                ..RegistryService::default()
            }),
            ..Registration::default()
        }
    }

    fn check(id: &str, service_id: &str) -> Check {
        Check {
            node: String::new(),
            id: id.into(),
            name: id.into(),
            status: Status::Passing,
            notes: String::new(),
            output: String::new(),
            service_id: service_id.into(),
            service_name: String::new(),
            kind: String::new(),
            definition: CheckDefinition::default(),
            agent_local: false,
        }
    }

    fn ids(s: &Store, f: impl FnOnce(&RegistryState) -> Vec<String>) -> Vec<String> {
        s.read(f)
    }

    #[test]
    fn lookups_by_name_and_owner_follow_renames_and_removals() {
        let s = Store::new();
        let mut r = reg("n1", Some(("web-1", "web")));
        r.checks = vec![check("node-ok", ""), check("web-1-ok", "web-1")];
        s.register(&r).unwrap();
        s.register(&reg("n1", Some(("web-2", "web")))).unwrap();
        s.register(&reg("n2", Some(("web-3", "web")))).unwrap();
        let names = |s: &Store, name: &'static str| {
            ids(s, |st| {
                st.instances_of(name)
                    .map(|e| format!("{}/{}", e.node, e.service.id))
                    .collect()
            })
        };
        assert_eq!(names(&s, "web"), ["n1/web-1", "n1/web-2", "n2/web-3"]);
        let checks = |s: &Store, id: &'static str| {
            ids(s, |st| {
                st.checks_for("n1", Some(id))
                    .map(|c| c.check.id.clone())
                    .collect()
            })
        };
        assert_eq!(checks(&s, "web-1"), ["node-ok", "web-1-ok"]);
        assert_eq!(checks(&s, "web-2"), ["node-ok"]);

        // The same ID re-registered under another name moves to that name.
        s.register(&reg("n1", Some(("web-2", "api")))).unwrap();
        assert_eq!(names(&s, "web"), ["n1/web-1", "n2/web-3"]);
        assert_eq!(names(&s, "api"), ["n1/web-2"]);

        // A check re-registered for another instance leaves the first one's list.
        let mut moved = reg("n1", None);
        moved.checks = vec![check("web-1-ok", "web-2")];
        s.register(&moved).unwrap();
        assert_eq!(checks(&s, "web-1"), ["node-ok"]);
        assert_eq!(checks(&s, "web-2"), ["node-ok", "web-1-ok"]);

        assert!(s.deregister_service("n1", "web-2"));
        assert!(names(&s, "api").is_empty());
        assert_eq!(checks(&s, "web-2"), ["node-ok"]);
        s.deregister_node("n1");
        assert_eq!(names(&s, "web"), ["n2/web-3"]);
        assert!(checks(&s, "web-1").is_empty());
        assert!(s.read(|st| st.checks.is_empty()));
    }

    #[test]
    fn an_identical_registration_does_not_move_the_index() {
        let s = Store::new();
        s.register(&reg("n1", Some(("web-1", "web")))).unwrap();
        let i = s.current_index();
        s.register(&reg("n1", Some(("web-1", "web")))).unwrap();
        assert_eq!(s.current_index(), i);
    }

    #[test]
    fn a_write_to_another_service_leaves_this_service_index_alone() {
        let s = Store::new();
        s.register(&reg("n1", Some(("web-1", "web")))).unwrap();
        let web = s.read(|st| st.service_index_of("web"));
        s.register(&reg("n1b", Some(("db-1", "db")))).unwrap();
        s.register(&reg("n1b", Some(("db-2", "db")))).unwrap();
        assert_eq!(s.read(|st| st.service_index_of("web")), web);
        assert!(s.read(|st| st.service_index_of("db")) > web);
    }

    #[test]
    fn the_last_instance_leaving_sets_the_extinction_index() {
        let s = Store::new();
        s.register(&reg("n1", Some(("web-1", "web")))).unwrap();
        assert!(s.deregister_service("n1", "web-1"));
        let i = s.current_index();
        assert_eq!(s.read(|st| st.service_index_of("web")), i);
        assert_eq!(s.read(|st| st.service_index_of("never")), i);
    }

    #[test]
    fn deleting_a_key_raises_its_prefix_index() {
        let s = Store::new();
        s.kv_put("app/a", Bytes::from_static(b"1"), 0, None);
        s.kv_put("app/b", Bytes::from_static(b"2"), 0, None);
        let before = s.read(|st| st.kv_prefix_index("app/"));
        s.kv_delete("app/a", false, None);
        assert!(s.read(|st| st.kv_prefix_index("app/")) > before);
    }

    #[test]
    fn cas_zero_creates_only_when_absent_and_cas_index_must_match() {
        let s = Store::new();
        assert!(s.kv_put("k", Bytes::new(), 0, Some(0)));
        assert!(!s.kv_put("k", Bytes::new(), 0, Some(0)));
        let m = s.read(|st| st.kv["k"].modify_index);
        assert!(!s.kv_put("k", Bytes::new(), 0, Some(m + 1)));
        assert!(s.kv_put("k", Bytes::new(), 0, Some(m)));
        assert!(!s.kv_delete("k", false, Some(0)));
    }

    #[test]
    fn rewind_lowers_every_index() {
        let s = Store::new();
        for i in 0..10 {
            s.kv_put(&format!("k{i}"), Bytes::new(), 0, None);
        }
        s.rewind(3);
        assert_eq!(s.current_index(), 3);
        assert!(s.read(|st| st.kv.values().all(|e| e.modify_index <= 3)));
        assert!(s.read(|st| st.kv_prefix_index("k") <= 3));
    }
}
