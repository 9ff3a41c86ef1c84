//! One blocking watch on `/v1/health/service/<name>` per service that some route names.
//! The caller (the single writer, `snapshot_writer`) says which services are wanted; watch cost grows
//! with what is routed, not with the size of the catalog.
//!
//! Each answer is reduced to the sorted `Vec<Instance>` that may serve before it is compared
//! with the last one, so a check whose `Output` text changes on every run rebuilds nothing.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::mpsc;

use crate::consul::client::health_service_path;
use crate::consul::types::ServiceEntry;
use crate::consul::watch::{self, Source};
use crate::consul::{
    ConsulClient, ConsulError, Index, QueryAnswer, WatchHandle, WatchOptions, WatchStatus,
};

use super::{passing, Instance, OutOfService};

/// The instances of a service changed (or were read for the first time).
#[derive(Debug, Clone)]
pub struct ServiceUpdate {
    pub service: String,
    /// Those that may serve.
    pub instances: Arc<Vec<Instance>>,
    /// Those listed but critical or in maintenance (for the admin views only).
    pub out_of_service: Arc<Vec<OutOfService>>,
}

/// One health answer, reduced.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ServiceHealth {
    pub serving: Vec<Instance>,
    pub out_of_service: Vec<OutOfService>,
}

/// Reads the health of one service and reduces it to its serving instances.
#[derive(Debug, Clone)]
pub struct HealthSource {
    client: ConsulClient,
    path: String,
    /// Another datacenter's (`?dc=`), for a key like `orders@dc2`.
    datacenter: Option<String>,
}

impl HealthSource {
    /// Watches the service a [`super::watch_key`] names, in its datacenter.
    pub fn new(client: &ConsulClient, key: &str) -> HealthSource {
        let (service, datacenter) = super::parse_watch_key(key);
        HealthSource {
            client: client.clone(),
            path: health_service_path(service),
            datacenter: datacenter.map(str::to_string),
        }
    }
}

impl Source for HealthSource {
    type Output = ServiceHealth;

    fn fetch(
        &mut self,
        index: Index,
    ) -> impl Future<Output = Result<QueryAnswer, ConsulError>> + Send {
        let client = self.client.clone();
        let path = self.path.clone();
        let datacenter = self.datacenter.clone();
        async move {
            match &datacenter {
                Some(dc) => client.blocking_get(&path, &[("dc", dc)], index).await,
                None => client.blocking_get(&path, &[], index).await,
            }
        }
    }

    fn decode(&mut self, body: Option<Bytes>) -> Result<ServiceHealth, ConsulError> {
        let Some(body) = body else {
            return Ok(ServiceHealth::default());
        };
        let entries: Vec<ServiceEntry> =
            serde_json::from_slice(&body).map_err(|e| ConsulError::Decode(e.to_string()))?;
        Ok(ServiceHealth {
            serving: passing::instances(&entries),
            out_of_service: passing::out_of_service(&entries),
        })
    }
}

/// What [`HealthWatcher::sync`] changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct SyncReport {
    pub started: Vec<String>,
    pub stopped: Vec<String>,
}

/// Keeps one entry per wanted service in `running`: drops those no longer wanted (a watch
/// stops when its handle drops) and makes the missing ones with `start`.
pub fn sync_running<T>(
    running: &mut BTreeMap<String, T>,
    wanted: &BTreeSet<String>,
    mut start: impl FnMut(&str) -> T,
) -> SyncReport {
    let mut report = SyncReport::default();
    running.retain(|service, _| {
        let keep = wanted.contains(service);
        if !keep {
            report.stopped.push(service.clone());
        }
        keep
    });
    for service in wanted {
        if !running.contains_key(service) {
            running.insert(service.clone(), start(service));
            report.started.push(service.clone());
        }
    }
    report
}

/// The set of running health watches, one per wanted service.
pub struct HealthWatcher {
    client: ConsulClient,
    options: WatchOptions,
    updates: mpsc::UnboundedSender<ServiceUpdate>,
    watches: BTreeMap<String, WatchHandle>,
}

impl HealthWatcher {
    /// Updates of every watch go to `updates`; `options` is the template (name replaced).
    pub fn new(
        client: ConsulClient,
        options: WatchOptions,
        updates: mpsc::UnboundedSender<ServiceUpdate>,
    ) -> HealthWatcher {
        HealthWatcher {
            client,
            options,
            updates,
            watches: BTreeMap::new(),
        }
    }

    /// Starts a watch for each wanted service without one and stops those no longer wanted.
    pub fn sync(&mut self, wanted: &BTreeSet<String>) -> SyncReport {
        sync_running(&mut self.watches, wanted, |service| {
            let tx = self.updates.clone();
            let name = service.to_string();
            watch::spawn(
                HealthSource::new(&self.client, service),
                self.options.named(format!("health:{service}")),
                move |health: Arc<ServiceHealth>| {
                    let _ = tx.send(ServiceUpdate {
                        service: name.clone(),
                        instances: Arc::new(health.serving.clone()),
                        out_of_service: Arc::new(health.out_of_service.clone()),
                    });
                },
            )
        })
    }

    pub fn status(&self, service: &str) -> Option<&Arc<WatchStatus>> {
        self.watches.get(service).map(WatchHandle::status)
    }

    /// Every running watch, by service name.
    pub fn statuses(&self) -> impl Iterator<Item = (&str, &Arc<WatchStatus>)> {
        self.watches.iter().map(|(k, h)| (k.as_str(), h.status()))
    }

    pub fn len(&self) -> usize {
        self.watches.len()
    }

    pub fn is_empty(&self) -> bool {
        self.watches.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::consul::ClientSettings;
    use std::time::Duration;

    fn watcher() -> HealthWatcher {
        // Nothing listens on port 9: the watches just retry in the background.
        let client = ConsulClient::new(&ClientSettings::new(
            "http://127.0.0.1:9",
            Duration::from_secs(1),
        ))
        .unwrap();
        let options = WatchOptions::for_client("t", &client, Duration::from_secs(1));
        let (tx, _rx) = mpsc::unbounded_channel();
        HealthWatcher::new(client, options, tx)
    }

    fn set(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    #[tokio::test]
    async fn watches_follow_the_wanted_set() {
        let mut w = watcher();
        let r = w.sync(&set(&["a", "b"]));
        assert_eq!(r.started, ["a", "b"]);
        let r = w.sync(&set(&["b", "c"]));
        assert_eq!(
            r,
            SyncReport {
                started: vec!["c".into()],
                stopped: vec!["a".into()]
            }
        );
        assert_eq!(w.sync(&set(&["b", "c"])), SyncReport::default());
        assert_eq!(w.status("c").unwrap().name(), "health:c");
        assert_eq!(w.len(), 2);
    }

    #[test]
    fn a_health_answer_decodes_to_serving_instances() {
        let body = br#"[{"Node":{"Node":"n1","Address":"10.0.0.1"},
            "Service":{"ID":"w1","Service":"web","Port":80},
            "Checks":[{"CheckID":"serfHealth","Status":"passing","Output":"x"}]},
          {"Node":{"Node":"n2","Address":"10.0.0.2"},
            "Service":{"ID":"w2","Service":"web","Port":80},
            "Checks":[{"CheckID":"service:w2","Status":"critical"}]}]"#;
        let client = ConsulClient::new(&ClientSettings::new(
            "http://127.0.0.1:9",
            Duration::from_secs(1),
        ))
        .unwrap();
        let mut src = HealthSource::new(&client, "web");
        let got = src.decode(Some(Bytes::from_static(body))).unwrap();
        assert_eq!(got.serving.len(), 1);
        assert_eq!(got.serving[0].id, "n1/w1");
        assert_eq!(got.out_of_service.len(), 1);
        assert_eq!(got.out_of_service[0].id, "n2/w2");
        assert_eq!(got.out_of_service[0].health, "critical");
        assert_eq!(got.out_of_service[0].checks, ["service:w2 (critical)"]);
        assert!(src.decode(Some(Bytes::from_static(b"{oops"))).is_err());
    }
}
