//! Running checks: TTL timers, HTTP and TCP probes at their interval, each a task that
//! reports status changes back through a callback (the agent writes them to the store).

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::sync::Notify;

use super::store::{CheckDefinition, Status};

/// HTTP check responses are cut to this many bytes of output, like Consul's default.
const OUTPUT_MAX: usize = 4096;

/// Where a runner reports (status, output).
pub type Report = Arc<dyn Fn(Status, String) + Send + Sync>;

/// Clients for HTTP checks: no connection reuse (a dead target must fail the next probe).
#[derive(Clone)]
pub struct Probers {
    verify: reqwest::Client,
    insecure: reqwest::Client,
}

impl Probers {
    pub fn new() -> Probers {
        let build = |insecure: bool| {
            reqwest::Client::builder()
                .pool_max_idle_per_host(0)
                .danger_accept_invalid_certs(insecure)
                .user_agent("Consul Health Check")
                .build()
                .unwrap_or_default()
        };
        Probers {
            verify: build(false),
            insecure: build(true),
        }
    }

    /// One HTTP probe: 2xx passing, 429 warning, anything else (or no answer) critical.
    pub async fn http(&self, def: &CheckDefinition, timeout: Duration) -> (Status, String) {
        let client = if def.tls_skip_verify {
            &self.insecure
        } else {
            &self.verify
        };
        let method = if def.method.is_empty() {
            "GET"
        } else {
            def.method.as_str()
        };
        let Ok(m) = reqwest::Method::from_bytes(method.as_bytes()) else {
            return (Status::Critical, format!("invalid HTTP method {method:?}"));
        };
        let mut req = client
            .request(m, &def.http)
            .timeout(timeout)
            .header("Accept", "text/plain, text/*, */*");
        for (name, values) in &def.header {
            for v in values {
                req = req.header(name.as_str(), v.as_str());
            }
        }
        if !def.body.is_empty() {
            req = req.body(def.body.clone());
        }
        let resp = match req.send().await {
            Ok(r) => r,
            Err(e) => {
                return (
                    Status::Critical,
                    format!("{method} {:?}: {}", def.http, error_chain(&e)),
                )
            }
        };
        let code = resp.status();
        let body = resp.bytes().await.unwrap_or_default();
        let text = String::from_utf8_lossy(&body[..body.len().min(OUTPUT_MAX)]).into_owned();
        let status_line = format!(
            "{} {}",
            code.as_u16(),
            code.canonical_reason().unwrap_or_default()
        );
        let output = format!("HTTP {method} {}: {status_line} Output: {text}", def.http);
        let status = if code.is_success() {
            Status::Passing
        } else if code.as_u16() == 429 {
            Status::Warning
        } else {
            Status::Critical
        };
        (status, output)
    }

    /// One TCP probe: a completed connect is passing.
    pub async fn tcp(&self, addr: &str, timeout: Duration) -> (Status, String) {
        match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
            Ok(Ok(_)) => (Status::Passing, format!("TCP connect {addr}: Success")),
            Ok(Err(e)) => (Status::Critical, format!("dial tcp {addr}: {e}")),
            Err(_) => (Status::Critical, format!("dial tcp {addr}: i/o timeout")),
        }
    }
}

impl Default for Probers {
    fn default() -> Self {
        Self::new()
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
}

/// Probes at `interval` (after a random first stagger within it, as Consul does) until aborted.
pub async fn run_probe(probers: Probers, def: CheckDefinition, report: Report) {
    let interval = def
        .interval
        .unwrap_or(Duration::from_secs(10))
        .max(Duration::from_millis(1));
    let timeout = def.timeout.unwrap_or(Duration::from_secs(10));
    let stagger = rand::random_range(0..interval.as_nanos().min(u64::MAX as u128) as u64);
    tokio::time::sleep(Duration::from_nanos(stagger)).await;
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let (status, output) = if !def.http.is_empty() {
            probers.http(&def, timeout).await
        } else {
            probers.tcp(&def.tcp, timeout).await
        };
        report(status, output);
    }
}

/// Turns the check critical when `ttl` passes without a reset (`reset` is notified by every
/// pass/warn/fail/update). `last_output` gives the output to quote in the expiry message.
pub async fn run_ttl(
    ttl: Duration,
    reset: Arc<Notify>,
    last_output: Arc<dyn Fn() -> String + Send + Sync>,
    report: Report,
) {
    loop {
        tokio::select! {
            _ = reset.notified() => continue,
            _ = tokio::time::sleep(ttl) => {
                let last = last_output();
                let output = if last.is_empty() {
                    "TTL expired".to_string()
                } else {
                    format!("TTL expired (last output before timeout follows): {last}")
                };
                report(Status::Critical, output);
                reset.notified().await;
            }
        }
    }
}
