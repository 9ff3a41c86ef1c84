//! Chaos run (not a test): run it through `scripts/chaos.sh [--minutes N]`.
//!
//! An in-process gateway serves steady load (keep-alive and new connections; a public route
//! and a JWT route) from three real upstreams registered in the embedded dev registry, while
//! the registry misbehaves in turn, again and again: stopped, hung, answering 500, answering
//! malformed JSON, slow, killed and restarted empty (index reset, services re-registered),
//! a flapping check, and 1,000 services registered and removed. After each fault is healed
//! an instance's check fails and the run measures how long traffic still reaches it.
//!
//! Prints one line per fault: requests, failed requests (any transport error or non-2xx at
//! the client) and the worst convergence; exits 1 if a request failed or a convergence took
//! longer than [`CONVERGENCE_LIMIT`].

#[path = "../tests/support/mod.rs"]
mod support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;
use support::tokens::{self, claims, AUDIENCE, ISSUER, RSA_PUBLIC};
use support::upstream::Upstream;
use support::{route, Gateway};
use switchyard::devregistry::{CheckStatus, Registry, RegistryOptions};

type Error = Box<dyn std::error::Error + Send + Sync>;

const CONVERGENCE_LIMIT: Duration = Duration::from_secs(1);
/// How long each fault lasts.
const HOLD: Duration = Duration::from_secs(4);
/// The victim counts as left once it has seen no request for this long.
const QUIET: Duration = Duration::from_millis(300);
const SERVICE: &str = "chaos";
const PREFIX: &str = "chaos/";
const INSTANCES: [&str; 3] = ["a", "b", "c"];

#[derive(Clone, Copy)]
enum Fault {
    Stopped,
    Hung,
    Answering500,
    MalformedJson,
    Slow,
    KilledRestartedEmpty,
    FlappingCheck,
    ThousandServices,
}

/// Every fault, in the order they are injected, with its name in the report.
const FAULTS: [(Fault, &str); 8] = [
    (Fault::Stopped, "registry stopped"),
    (Fault::Hung, "hung (accepts, never answers)"),
    (Fault::Answering500, "answering 500 (no leader)"),
    (Fault::MalformedJson, "malformed JSON"),
    (Fault::Slow, "slow (2 s per answer)"),
    (Fault::KilledRestartedEmpty, "killed, restarted empty"),
    (Fault::FlappingCheck, "an instance's check flapping"),
    (Fault::ThousandServices, "1,000 services in and out"),
];

/// Requests and failures since the last [`Load::take`].
#[derive(Default)]
struct Load {
    requests: AtomicU64,
    failed: AtomicU64,
    /// The first few failures, told in full.
    failures: Mutex<Vec<String>>,
    stop: AtomicBool,
    /// The fault going on, to tell failures apart.
    phase: Mutex<&'static str>,
}

impl Load {
    fn take(&self) -> (u64, u64) {
        (self.requests.swap(0, Relaxed), self.failed.swap(0, Relaxed))
    }

    fn failure(&self, what: String) {
        self.failed.fetch_add(1, Relaxed);
        let mut list = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        if list.len() < 20 {
            let phase = *self.phase.lock().unwrap_or_else(|e| e.into_inner());
            list.push(format!("during {phase}: {what}"));
        }
    }
}

/// One client loop: `GET /pub/…` and `GET /api/…` (with the token) in turn until stopped.
async fn drive(load: Arc<Load>, http: reqwest::Client, base: String, token: String) {
    let mut n = 0u64;
    while !load.stop.load(Relaxed) {
        n += 1;
        let req = if n % 2 == 0 {
            http.get(format!("{base}/pub/{n}"))
        } else {
            http.get(format!("{base}/api/{n}")).bearer_auth(&token)
        };
        load.requests.fetch_add(1, Relaxed);
        match req.send().await {
            Ok(resp) if resp.status().is_success() => match resp.bytes().await {
                Ok(_) => {}
                Err(e) => load.failure(format!("body of request {n}: {e}")),
            },
            Ok(resp) => {
                let status = resp.status();
                let body = resp.text().await.unwrap_or_default();
                load.failure(format!("request {n}: {status} {body}"));
            }
            Err(e) => load.failure(format!("request {n}: {e:?}")),
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Registers the three instances and writes both routes and the JWT provider, straight
/// into `registry` (nothing reads it in between).
fn seed(registry: &Registry, upstreams: &[Upstream]) -> Result<(), Error> {
    for (id, upstream) in INSTANCES.iter().zip(upstreams) {
        registry.register_service(SERVICE, id, "127.0.0.1", upstream.port())?;
    }
    let provider = json!({
        "issuer": ISSUER,
        "audiences": [AUDIENCE],
        "algorithms": ["RS256"],
        "keys": [{"kid": "k1", "pem": RSA_PUBLIC}],
    });
    registry.kv_put(&format!("{PREFIX}jwt/chaos"), provider.to_string())?;
    registry.kv_put(
        &format!("{PREFIX}routes/pub"),
        route(SERVICE, "/pub", json!({})),
    )?;
    registry.kv_put(
        &format!("{PREFIX}routes/api"),
        route(SERVICE, "/api", json!({"auth": {"jwt": ["chaos"]}})),
    )?;
    Ok(())
}

struct Chaos {
    addr: SocketAddr,
    registry: Option<Registry>,
    upstreams: Vec<Upstream>,
}

impl Chaos {
    fn registry(&self) -> Result<&Registry, Error> {
        self.registry.as_ref().ok_or_else(|| "no registry".into())
    }

    async fn inject(&mut self, fault: Fault) -> Result<(), Error> {
        let registry = self.registry()?;
        let faults = registry.faults();
        match fault {
            Fault::Stopped => registry.stop().await,
            Fault::Hung => faults.set_stall(true),
            Fault::Answering500 => faults.set_no_leader(true),
            Fault::MalformedJson => faults.set_bad_json(true),
            Fault::Slow => faults.set_latency(Duration::from_secs(2)),
            Fault::KilledRestartedEmpty => {
                registry.stop().await;
                self.registry = None;
            }
            Fault::FlappingCheck | Fault::ThousandServices => {}
        }
        Ok(())
    }

    /// Keeps the fault going for [`HOLD`] (the flapping and the churn happen here). Every
    /// 250 ms the route and the service change in ways that move no traffic (a route
    /// rewritten as it was, a critical spare instance in and out), so that the gateway's
    /// blocking queries return and are asked again while the fault lasts; otherwise they
    /// would sit out the fault in queries sent before it.
    async fn hold(&self, fault: Fault) -> Result<(), Error> {
        let end = Instant::now() + HOLD;
        if let Fault::ThousandServices = fault {
            let registry = self.registry()?;
            for i in 0..1000 {
                let id = format!("churn-{i}");
                registry.register_service(&id, &id, "127.0.0.1", 9)?;
                if i % 50 == 0 {
                    tokio::task::yield_now().await;
                }
            }
            for i in 0..1000 {
                registry.deregister_service(&format!("churn-{i}"));
                if i % 50 == 0 {
                    tokio::task::yield_now().await;
                }
            }
        }
        let mut odd = false;
        while Instant::now() < end {
            odd = !odd;
            if let Some(registry) = &self.registry {
                if let Fault::FlappingCheck = fault {
                    let status = if odd {
                        CheckStatus::Critical
                    } else {
                        CheckStatus::Passing
                    };
                    registry.set_check_status("service:b", status)?;
                }
                registry.kv_put(
                    &format!("{PREFIX}routes/pub"),
                    route(SERVICE, "/pub", json!({})),
                )?;
                if odd {
                    registry.register_service_json(json!({
                        "Name": SERVICE, "ID": "spare", "Address": "127.0.0.1", "Port": 9,
                        "Check": {"TTL": "1h", "Status": "critical"},
                    }))?;
                } else {
                    registry.deregister_service("spare");
                }
            }
            tokio::time::sleep(Duration::from_millis(if let Fault::FlappingCheck = fault {
                100
            } else {
                250
            }))
            .await;
        }
        if let Some(registry) = &self.registry {
            registry.deregister_service("spare");
        }
        Ok(())
    }

    async fn heal(&mut self, fault: Fault) -> Result<(), Error> {
        if let Fault::KilledRestartedEmpty = fault {
            let fresh = Registry::start(self.addr, RegistryOptions::for_tests())?;
            seed(&fresh, &self.upstreams)?;
            self.registry = Some(fresh);
            return Ok(());
        }
        let registry = self.registry()?;
        let faults = registry.faults();
        match fault {
            Fault::Stopped => registry.restart().await?,
            Fault::Hung => faults.set_stall(false),
            Fault::Answering500 => faults.set_no_leader(false),
            Fault::MalformedJson => faults.set_bad_json(false),
            Fault::Slow => faults.set_latency(Duration::ZERO),
            Fault::FlappingCheck => registry.set_check_status("service:b", CheckStatus::Passing)?,
            Fault::KilledRestartedEmpty | Fault::ThousandServices => {}
        }
        Ok(())
    }

    /// Fails the check of instance `victim` and returns how long requests still reached it
    /// (`None`: still after 10 s); then passes it again and waits until it serves again.
    async fn convergence(&self, victim: usize) -> Result<Option<Duration>, Error> {
        let registry = self.registry()?;
        let check = format!("service:{}", INSTANCES[victim]);
        let upstream = &self.upstreams[victim];
        registry.set_check_status(&check, CheckStatus::Critical)?;
        let failed_at = Instant::now();
        let (mut hits, mut last_hit) = (upstream.hits(), failed_at);
        let left = loop {
            tokio::time::sleep(Duration::from_millis(2)).await;
            let now = upstream.hits();
            if now != hits {
                (hits, last_hit) = (now, Instant::now());
            }
            if last_hit.elapsed() >= QUIET {
                break Some(last_hit - failed_at);
            }
            if failed_at.elapsed() > Duration::from_secs(10) {
                break None;
            }
        };
        registry.set_check_status(&check, CheckStatus::Passing)?;
        let back = Instant::now();
        let before = upstream.hits();
        while upstream.hits() == before {
            if back.elapsed() > Duration::from_secs(30) {
                return Err(format!("{check} got no traffic 30 s after passing again").into());
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Ok(left)
    }
}

/// Totals of one fault over the run.
#[derive(Default)]
struct Row {
    rounds: u32,
    requests: u64,
    failed: u64,
    worst: Option<Duration>,
    unconverged: u32,
}

fn minutes_from_args() -> Result<f64, Error> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.as_slice() {
        [] => Ok(2.0),
        [flag, n] if flag == "--minutes" => Ok(n.parse::<f64>()?),
        _ => Err("usage: chaos [--minutes N]".into()),
    }
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    let minutes = minutes_from_args()?;
    let run_for = Duration::from_secs_f64(minutes * 60.0);
    let mut upstreams = Vec::new();
    for id in INSTANCES {
        upstreams.push(Upstream::start(id).await);
    }
    let registry = Registry::start("127.0.0.1:0".parse()?, RegistryOptions::for_tests())?;
    seed(&registry, &upstreams)?;
    let mut file = support::test_config(&registry.url(), PREFIX);
    // Blocking queries as long as a production gateway's would be stuck in; the backoff
    // ceiling stays at 1 s, since it adds directly to how soon a returned registry is read.
    file.consul.wait_s = 60;
    file.consul.max_backoff_s = 1;
    let gw = Gateway::start_with(file).await;
    gw.wait_ready().await;
    gw.wait_upstreams("/pub/x", &INSTANCES).await;
    gw.wait_upstreams("/api/x", &INSTANCES).await;
    let mut chaos = Chaos {
        addr: registry.addr(),
        registry: Some(registry),
        upstreams,
    };

    let token = tokens::rs256(
        "k1",
        &claims("chaos", json!({"exp": tokens::now() + 86_400})),
    );
    let base = format!("http://{}", gw.app.proxy_addr());
    let keep_alive = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(10))
        .build()?;
    let fresh_connections = reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(10))
        .build()?;
    let load = Arc::new(Load::default());
    // The token must be accepted before the run starts (providers load from KV).
    let started = Instant::now();
    loop {
        let resp = keep_alive
            .get(format!("{base}/api/ready"))
            .bearer_auth(&token)
            .send()
            .await?;
        if resp.status().is_success() {
            break;
        }
        if started.elapsed() > Duration::from_secs(15) {
            return Err(format!("the JWT route still answers {}", resp.status()).into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut clients = Vec::new();
    for http in [
        &keep_alive,
        &keep_alive,
        &fresh_connections,
        &fresh_connections,
    ] {
        clients.push(tokio::spawn(drive(
            load.clone(),
            http.clone(),
            base.clone(),
            token.clone(),
        )));
    }

    let mut rows: BTreeMap<usize, Row> = BTreeMap::new();
    let begin = Instant::now();
    let mut round = 0;
    'run: loop {
        for (i, (fault, name)) in FAULTS.iter().enumerate() {
            if round > 0 && begin.elapsed() >= run_for {
                break 'run;
            }
            load.take();
            *load.phase.lock().unwrap_or_else(|e| e.into_inner()) = name;
            chaos.inject(*fault).await?;
            chaos.hold(*fault).await?;
            chaos.heal(*fault).await?;
            let converged = chaos.convergence((round + i) % INSTANCES.len()).await?;
            let (requests, failed) = load.take();
            eprintln!(
                "round {round} {name}: {requests} requests, {failed} failed, convergence {}",
                shown(converged)
            );
            let row = rows.entry(i).or_default();
            row.rounds += 1;
            row.requests += requests;
            row.failed += failed;
            match converged {
                Some(d) => row.worst = row.worst.max(Some(d)),
                None => row.unconverged += 1,
            }
        }
        round += 1;
    }
    load.stop.store(true, Relaxed);
    for c in clients {
        let _ = c.await;
    }
    gw.stop().await;

    println!(
        "{:<32} {:>6} {:>9} {:>7} {:>16}",
        "fault", "rounds", "requests", "failed", "worst convergence"
    );
    let mut ok = true;
    for (i, row) in &rows {
        let worst = if row.unconverged > 0 { None } else { row.worst };
        ok &= row.failed == 0 && worst.is_some_and(|d| d <= CONVERGENCE_LIMIT);
        println!(
            "{:<32} {:>6} {:>9} {:>7} {:>16}",
            FAULTS[*i].1,
            row.rounds,
            row.requests,
            row.failed,
            shown(worst)
        );
    }
    let failures = load.failures.lock().unwrap_or_else(|e| e.into_inner());
    for f in failures.iter() {
        eprintln!("failed: {f}");
    }
    if !ok {
        eprintln!(
            "chaos: FAILED (a request failed or a convergence took over {CONVERGENCE_LIMIT:?})"
        );
        std::process::exit(1);
    }
    println!("chaos: ok");
    Ok(())
}

fn shown(d: Option<Duration>) -> String {
    match d {
        Some(d) => format!("{} ms", d.as_millis()),
        None => "> 10 s".into(),
    }
}
