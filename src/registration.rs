//! Self-registration: the gateway registers itself in Consul (service `switchyard` by
//! default, port = the proxy port) with an HTTP check on the admin `/ready`, so a fleet of
//! gateways behind a load balancer is discoverable, and deregisters on shutdown.
//!
//! Registration runs in the background and retries with backoff while the agent is down:
//! it never delays start and never stops the gateway. Once registered, it checks every
//! check interval that the agent still knows the service (a restarted dev-mode agent forgets
//! it) and registers again when it does not.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;

use crate::config::RegistrationSection;
use crate::consul::watch::backoff;
use crate::consul::{ConsulClient, ServiceCheck, ServiceRegistration};
use crate::shutdown::Shutdown;

/// First retry delay after a failed registration.
const BASE_BACKOFF: Duration = Duration::from_millis(500);
/// Longest pause between registration attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// How long shutdown waits for the deregistration.
const DEREGISTER_TIMEOUT: Duration = Duration::from_secs(3);
/// A gateway that died without deregistering is removed by Consul after this long critical.
const DEREGISTER_CRITICAL_AFTER: &str = "30m";
/// Longest timeout of the `/ready` check.
const MAX_CHECK_TIMEOUT_S: u64 = 5;

/// What this gateway tells Consul about itself.
pub fn registration(
    section: &RegistrationSection,
    proxy: SocketAddr,
    admin: SocketAddr,
) -> ServiceRegistration {
    let name = section.service_name.trim().to_string();
    let address = section.address.trim().to_string();
    // The agent runs the check: the advertised address, else wherever the admin listener
    // is bound, else loopback (an agent on the same host).
    let check_host = if !address.is_empty() {
        address.clone()
    } else if admin.ip().is_unspecified() {
        IpAddr::V4(Ipv4Addr::LOCALHOST).to_string()
    } else {
        admin.ip().to_string()
    };
    let check_host = if check_host.contains(':') && !check_host.starts_with('[') {
        format!("[{check_host}]")
    } else {
        check_host
    };
    let interval = section.check_interval_s.max(1);
    let host = hostname();
    ServiceRegistration {
        id: format!("{name}-{host}-{}", proxy.port()),
        name,
        address,
        port: proxy.port(),
        tags: section.tags.clone(),
        meta: BTreeMap::from([
            ("version".to_string(), env!("CARGO_PKG_VERSION").to_string()),
            ("admin_port".to_string(), admin.port().to_string()),
            ("host".to_string(), host),
        ]),
        check: Some(ServiceCheck {
            http: format!("http://{check_host}:{}/ready", admin.port()),
            interval: format!("{interval}s"),
            timeout: format!("{}s", interval.min(MAX_CHECK_TIMEOUT_S)),
            deregister_critical_service_after: DEREGISTER_CRITICAL_AFTER.to_string(),
        }),
    }
}

/// The machine's host name, reduced to characters safe in a service ID.
fn hostname() -> String {
    let raw = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_default();
    let clean: String = raw
        .trim()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
        .collect();
    if clean.is_empty() {
        "localhost".into()
    } else {
        clean
    }
}

/// A registration in progress or done; [`Registered::deregister`] undoes it.
pub struct Registered {
    client: ConsulClient,
    id: String,
    done: Arc<AtomicBool>,
    task: JoinHandle<()>,
}

/// Starts registering in the background (and keeping the registration) until `shutdown`
/// trips; `recheck` is how often the agent is asked whether it still has it.
pub fn spawn(
    client: ConsulClient,
    reg: ServiceRegistration,
    recheck: Duration,
    shutdown: Shutdown,
) -> Registered {
    let done = Arc::new(AtomicBool::new(false));
    let id = reg.id.clone();
    let task = tokio::spawn(keep_registered(
        client.clone(),
        reg,
        recheck,
        done.clone(),
        shutdown,
    ));
    Registered {
        client,
        id,
        done,
        task,
    }
}

async fn keep_registered(
    client: ConsulClient,
    reg: ServiceRegistration,
    recheck: Duration,
    done: Arc<AtomicBool>,
    shutdown: Shutdown,
) {
    loop {
        if !register(&client, &reg, &done, &shutdown).await {
            return;
        }
        // Registered: watch for the agent forgetting it.
        loop {
            tokio::select! {
                _ = shutdown.wait() => return,
                _ = tokio::time::sleep(recheck) => {}
            }
            match client.agent_service_exists(&reg.id).await {
                Ok(true) => {}
                Ok(false) => {
                    tracing::warn!(id = %reg.id, "the agent no longer has this gateway; registering again");
                    break;
                }
                // The agent is unreachable: it may come back with or without us; ask again.
                Err(e) => {
                    tracing::debug!(id = %reg.id, error = %e, "cannot check the registration")
                }
            }
        }
    }
}

/// Registers, retrying with backoff; false when shutdown came first.
async fn register(
    client: &ConsulClient,
    reg: &ServiceRegistration,
    done: &AtomicBool,
    shutdown: &Shutdown,
) -> bool {
    let mut failures = 0u32;
    loop {
        let attempt = tokio::select! {
            _ = shutdown.wait() => return false,
            r = client.agent_service_register(reg) => r,
        };
        match attempt {
            Ok(()) => {
                done.store(true, Ordering::Release);
                tracing::info!(id = %reg.id, service = %reg.name, port = reg.port,
                    check = reg.check.as_ref().map(|c| c.http.as_str()).unwrap_or(""),
                    "registered in consul");
                return true;
            }
            Err(e) => {
                failures += 1;
                let delay = backoff(failures, BASE_BACKOFF, MAX_BACKOFF, &mut rand::rng());
                tracing::warn!(id = %reg.id, error = %e, retry_in_ms = delay.as_millis() as u64,
                    "cannot register in consul; retrying");
                tokio::select! {
                    _ = shutdown.wait() => return false,
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
}

impl Registered {
    /// The service ID registered.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Has Consul accepted the registration?
    pub fn is_registered(&self) -> bool {
        self.done.load(Ordering::Acquire)
    }

    /// Stops the background work and removes the registration (bounded by `DEREGISTER_TIMEOUT`).
    pub async fn deregister(self) {
        self.task.abort();
        let _ = self.task.await;
        if !self.done.load(Ordering::Acquire) {
            return;
        }
        match tokio::time::timeout(
            DEREGISTER_TIMEOUT,
            self.client.agent_service_deregister(&self.id),
        )
        .await
        {
            Ok(Ok(())) => tracing::info!(id = %self.id, "deregistered from consul"),
            Ok(Err(e)) => tracing::warn!(id = %self.id, error = %e, "cannot deregister"),
            Err(_) => tracing::warn!(id = %self.id, "deregistration timed out"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn section() -> RegistrationSection {
        RegistrationSection {
            tags: vec!["edge".into()],
            check_interval_s: 2,
            ..RegistrationSection::default()
        }
    }

    #[test]
    fn the_check_targets_ready_on_the_admin_port_and_the_service_port_is_the_proxy() {
        let r = registration(
            &section(),
            "0.0.0.0:8080".parse().unwrap(),
            "0.0.0.0:9901".parse().unwrap(),
        );
        assert_eq!(r.name, "switchyard");
        assert_eq!(r.port, 8080);
        assert!(
            r.id.starts_with("switchyard-") && r.id.ends_with("-8080"),
            "{}",
            r.id
        );
        assert_eq!(r.address, "");
        let check = r.check.unwrap();
        assert_eq!(check.http, "http://127.0.0.1:9901/ready");
        assert_eq!(check.interval, "2s");
        assert_eq!(check.timeout, "2s");
        assert_eq!(r.tags, vec!["edge".to_string()]);
    }

    #[test]
    fn an_advertised_address_is_used_for_the_service_and_its_check() {
        let mut s = section();
        s.address = "gw-1.internal".into();
        let r = registration(
            &s,
            "10.0.0.5:8080".parse().unwrap(),
            "10.0.0.5:9901".parse().unwrap(),
        );
        assert_eq!(r.address, "gw-1.internal");
        assert_eq!(r.check.unwrap().http, "http://gw-1.internal:9901/ready");
        s.address = "::1".into();
        let r = registration(&s, "[::1]:1".parse().unwrap(), "[::1]:2".parse().unwrap());
        assert_eq!(r.check.unwrap().http, "http://[::1]:2/ready");
    }

    #[test]
    fn the_register_body_uses_consul_field_names() {
        let r = registration(
            &section(),
            "127.0.0.1:1".parse().unwrap(),
            "127.0.0.1:2".parse().unwrap(),
        );
        let v = serde_json::to_value(&r).unwrap();
        assert!(v["ID"].is_string());
        assert!(
            v.get("Address").is_none(),
            "empty address is left to the agent"
        );
        assert_eq!(v["Check"]["HTTP"], "http://127.0.0.1:2/ready");
        assert_eq!(v["Check"]["DeregisterCriticalServiceAfter"], "30m");
    }
}
