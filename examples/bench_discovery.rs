//! Discovery benchmark (not a test): run it through `scripts/bench-discovery.sh`.
//!
//! 1. Propagation: time from a Consul write (KV put of a route, a check turning critical,
//!    a deregistration) to the snapshot that reflects it, p50/p99 over N changes each, with
//!    an in-process gateway and production blocking waits (`wait_s = 300`).
//! 2. Scale: 10,000 services of 10 instances registered, 1,000 of them routed; a
//!    `switchyard run` child process is measured from `/proc`: time to ready, resident
//!    memory, CPU while syncing, idle, and under churn.
//!
//! Talks to the agent at `CONSUL_HTTP_ADDR` when set, else to the embedded dev registry
//! (`switchyard::devregistry`), over HTTP either way. Part 2 needs
//! `--gateway <path to the switchyard binary>`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{HeaderMap, Method};
use serde_json::json;
use switchyard::app::{self, Listeners};
use switchyard::config::FileConfig;
use switchyard::shutdown::Shutdown;
use switchyard::state::{Snapshot, State};

type Error = Box<dyn std::error::Error + Send + Sync>;

struct Consul {
    url: String,
    http: reqwest::Client,
    token: Option<String>,
}

impl Consul {
    async fn put(&self, path: &str, body: Vec<u8>) -> Result<(), Error> {
        let mut req = self.http.put(format!("{}{path}", self.url)).body(body);
        if let Some(t) = &self.token {
            req = req.header("X-Consul-Token", t);
        }
        let resp = req.send().await?;
        if !resp.status().is_success() {
            return Err(format!("PUT {path}: {}", resp.status()).into());
        }
        Ok(())
    }

    async fn register(&self, name: &str, id: &str, port: u16) -> Result<(), Error> {
        let body = json!({"Name": name, "ID": id, "Address": "127.0.0.1", "Port": port,
                          "Check": {"TTL": "30m", "Status": "passing"}});
        self.put("/v1/agent/service/register", body.to_string().into_bytes())
            .await
    }

    async fn check(&self, id: &str, verb: &str) -> Result<(), Error> {
        self.put(&format!("/v1/agent/check/{verb}/service:{id}"), Vec::new())
            .await
    }
}

/// Polls the snapshot from a plain thread (sub-millisecond resolution) until `cond` holds.
async fn until(
    state: &Arc<State>,
    timeout: Duration,
    cond: impl Fn(&Snapshot) -> bool + Send + 'static,
) -> Option<Instant> {
    let state = state.clone();
    tokio::task::spawn_blocking(move || {
        let end = Instant::now() + timeout;
        while Instant::now() < end {
            if cond(&state.load()) {
                return Some(Instant::now());
            }
            std::thread::sleep(Duration::from_micros(50));
        }
        None
    })
    .await
    .ok()
    .flatten()
}

fn upstream_count(snap: &Snapshot, path: &str) -> Option<usize> {
    snap.lookup("", path, &Method::GET, &HeaderMap::new())
        .map(|m| m.upstreams.len())
}

fn percentiles(name: &str, mut ms: Vec<f64>) {
    if ms.is_empty() {
        println!("{name:<28} no samples");
        return;
    }
    ms.sort_by(|a, b| a.total_cmp(b));
    let at = |p: f64| ms[((ms.len() as f64 - 1.0) * p).round() as usize];
    println!(
        "{name:<28} n={:<4} p50={:>7.2} ms  p99={:>7.2} ms  max={:>7.2} ms",
        ms.len(),
        at(0.50),
        at(0.99),
        at(1.0)
    );
}

async fn propagation(consul: &Consul, changes: usize) -> Result<(), Error> {
    let tag = uuid::Uuid::new_v4().simple().to_string()[..8].to_string();
    let prefix = format!("bench-{tag}/");
    let svc = format!("bench-{tag}");
    for (i, id) in ["a", "b", "c"].iter().enumerate() {
        consul
            .register(&svc, &format!("{svc}-{id}"), 20_000 + i as u16)
            .await?;
    }
    let route = |p: &str| json!({"service": svc, "path_prefix": p}).to_string();
    consul
        .put(
            &format!("/v1/kv/{prefix}routes/base"),
            route("/base").into_bytes(),
        )
        .await?;

    let mut file = FileConfig::default();
    file.consul.address = Some(consul.url.clone());
    file.consul.token = consul.token.clone();
    file.consul.kv_prefix = prefix.clone();
    file.consul.wait_s = 300;
    file.registration.enabled = false;
    let cfg = file.validate()?;
    let listeners = Listeners::new(
        tokio::net::TcpListener::bind("127.0.0.1:0").await?,
        tokio::net::TcpListener::bind("127.0.0.1:0").await?,
    );
    let gw = app::start(cfg, listeners, Shutdown::new()).await?;
    if !gw.first_snapshot(Duration::from_secs(30)).await {
        return Err("the gateway did not become ready".into());
    }
    let state = gw.state().clone();
    until(&state, Duration::from_secs(10), |s| {
        upstream_count(s, "/base") == Some(3)
    })
    .await
    .ok_or("base route never had 3 instances")?;
    // Spacing keeps the per-watch rate limit (burst 2, then 10/s) out of the figures.
    let spacing = Duration::from_millis(120);
    let timeout = Duration::from_secs(10);

    let mut kv = Vec::with_capacity(changes);
    for i in 0..changes {
        let path = format!("/r{i}");
        let start = Instant::now();
        consul
            .put(
                &format!("/v1/kv/{prefix}routes/r{i}"),
                route(&path).into_bytes(),
            )
            .await?;
        let p = path.clone();
        let done = until(&state, timeout, move |s| upstream_count(s, &p).is_some())
            .await
            .ok_or("route never appeared")?;
        kv.push((done - start).as_secs_f64() * 1000.0);
        tokio::time::sleep(spacing).await;
    }

    let check = format!("service:{svc}-b");
    let mut fail = Vec::with_capacity(changes);
    for _ in 0..changes {
        for (verb, want) in [("fail", 2), ("pass", 3)] {
            let start = Instant::now();
            consul
                .put(&format!("/v1/agent/check/{verb}/{check}"), Vec::new())
                .await?;
            let done = until(&state, timeout, move |s| {
                upstream_count(s, "/base") == Some(want)
            })
            .await
            .ok_or("check change never propagated")?;
            if verb == "fail" {
                fail.push((done - start).as_secs_f64() * 1000.0);
            }
            tokio::time::sleep(spacing).await;
        }
    }

    let mut dereg = Vec::with_capacity(changes);
    let c = format!("{svc}-c");
    for _ in 0..changes {
        let start = Instant::now();
        consul
            .put(&format!("/v1/agent/service/deregister/{c}"), Vec::new())
            .await?;
        let done = until(&state, timeout, |s| upstream_count(s, "/base") == Some(2))
            .await
            .ok_or("deregistration never propagated")?;
        dereg.push((done - start).as_secs_f64() * 1000.0);
        tokio::time::sleep(spacing).await;
        consul.register(&svc, &c, 20_002).await?;
        until(&state, timeout, |s| upstream_count(s, "/base") == Some(3))
            .await
            .ok_or("re-registration never propagated")?;
        tokio::time::sleep(spacing).await;
    }

    println!("\n== propagation: Consul write -> new snapshot (wait_s = 300)");
    percentiles("KV put (new route)", kv);
    percentiles("check -> critical", fail);
    percentiles("deregister", dereg);
    println!("snapshots published: {}", state.load().version);
    gw.stop().await;
    for id in ["a", "b", "c"] {
        let _ = consul
            .put(
                &format!("/v1/agent/service/deregister/{svc}-{id}"),
                Vec::new(),
            )
            .await;
    }
    Ok(())
}

/// `/proc/<pid>` readings: resident memory and CPU seconds.
struct Proc(u32);

impl Proc {
    fn status_kb(&self, field: &str) -> u64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.0))
            .unwrap_or_default()
            .lines()
            .find(|l| l.starts_with(field))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }

    fn cpu_s(&self) -> f64 {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.0)).unwrap_or_default();
        // Fields after the `(comm)`: utime and stime are the 12th and 13th.
        let rest = stat.rsplit(')').next().unwrap_or_default();
        let f: Vec<u64> = rest
            .split_whitespace()
            .map(|x| x.parse().unwrap_or(0))
            .collect();
        let ticks = 100.0; // USER_HZ on Linux
        (f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0)) as f64 / ticks
    }

    fn threads(&self) -> u64 {
        self.status_kb("Threads:")
    }
}

async fn scale(
    consul: &Consul,
    gateway: &str,
    services: usize,
    per: usize,
    routed: usize,
) -> Result<(), Error> {
    let tag = uuid::Uuid::new_v4().simple().to_string()[..8].to_string();
    let prefix = format!("scale-{tag}/");
    println!("\n== scale: {services} services x {per} instances, {routed} routed");
    let t = Instant::now();
    let consul = Arc::new(Consul {
        url: consul.url.clone(),
        http: consul.http.clone(),
        token: consul.token.clone(),
    });
    let work: Vec<(String, String)> = (0..services)
        .flat_map(|s| {
            let tag = tag.clone();
            (0..per).map(move |i| (format!("s{s}-{tag}"), format!("s{s}-{tag}-{i}")))
        })
        .collect();
    let total = work.len();
    let queue = Arc::new(std::sync::Mutex::new(work));
    let mut workers = Vec::new();
    for _ in 0..32 {
        let queue = queue.clone();
        let consul = consul.clone();
        workers.push(tokio::spawn(async move {
            loop {
                let Some((name, id)) = queue.lock().unwrap().pop() else {
                    return Ok::<(), Error>(());
                };
                consul.register(&name, &id, 8080).await?;
            }
        }));
    }
    for w in workers {
        w.await??;
    }
    for s in 0..routed {
        let doc = json!({"service": format!("s{s}-{tag}"), "path_prefix": format!("/s{s}")});
        consul
            .put(
                &format!("/v1/kv/{prefix}routes/s{s}"),
                doc.to_string().into_bytes(),
            )
            .await?;
    }
    println!(
        "catalog filled: {total} instances in {:.1} s",
        t.elapsed().as_secs_f64()
    );

    let admin = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let listen = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let mut child = tokio::process::Command::new(gateway)
        .args([
            "run",
            "--no-register",
            "--consul",
            &consul.url,
            "--kv-prefix",
            &prefix,
        ])
        .args([
            "--listen",
            &listen.to_string(),
            "--admin",
            &admin.to_string(),
        ])
        .env(
            "RUST_LOG",
            std::env::var("BENCH_GATEWAY_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .kill_on_drop(true)
        .spawn()?;
    let proc = Proc(child.id().ok_or("no child pid")?);
    let started = Instant::now();
    let http = reqwest::Client::new();
    loop {
        if started.elapsed() > Duration::from_secs(120) {
            return Err("gateway not ready within 120 s".into());
        }
        if let Ok(r) = http.get(format!("http://{admin}/ready")).send().await {
            if r.status().is_success() {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let ready_after = started.elapsed();
    let cpu_ready = proc.cpu_s();
    // Every routed service's first answer is in once /upstreams lists 1000 with instances.
    loop {
        let v: serde_json::Value = http
            .get(format!("http://{admin}/upstreams"))
            .send()
            .await?
            .json()
            .await?;
        let full = v["services"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter(|s| s["instances"].as_array().map(Vec::len) == Some(per))
                    .count()
            })
            .unwrap_or(0);
        if full == routed {
            break;
        }
        if started.elapsed() > Duration::from_secs(120) {
            return Err(format!("only {full} services synced").into());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!(
        "ready after {:.2} s (all {routed} services synced after {:.2} s), CPU to ready {:.2} s",
        ready_after.as_secs_f64(),
        started.elapsed().as_secs_f64(),
        cpu_ready
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let idle_cpu0 = proc.cpu_s();
    let idle = Duration::from_secs(20);
    tokio::time::sleep(idle).await;
    let idle_cpu = proc.cpu_s() - idle_cpu0;
    println!(
        "idle: RSS {:.1} MiB, threads {}, CPU {:.2}% of one core",
        proc.status_kb("VmRSS:") as f64 / 1024.0,
        proc.threads(),
        idle_cpu / idle.as_secs_f64() * 100.0
    );

    // Churn: 20 check flips per second spread over the routed services.
    let churn = Duration::from_secs(20);
    let cpu0 = proc.cpu_s();
    let t = Instant::now();
    let mut i = 0usize;
    while t.elapsed() < churn {
        let s = (i * 37) % routed;
        let inst = i % per;
        let verb = if (i / routed) % 2 == 0 {
            "fail"
        } else {
            "pass"
        };
        consul.check(&format!("s{s}-{tag}-{inst}"), verb).await?;
        i += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let churn_cpu = proc.cpu_s() - cpu0;
    println!(
        "churn ({} check changes in {:.0} s): CPU {:.2}% of one core, RSS {:.1} MiB, peak RSS {:.1} MiB",
        i,
        churn.as_secs_f64(),
        churn_cpu / churn.as_secs_f64() * 100.0,
        proc.status_kb("VmRSS:") as f64 / 1024.0,
        proc.status_kb("VmHWM:") as f64 / 1024.0,
    );
    child.kill().await?;
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    let (url, _registry) = match std::env::var("CONSUL_HTTP_ADDR") {
        Ok(addr) if !addr.is_empty() => {
            (switchyard::config::normalize_consul_address(&addr)?, None)
        }
        _ => {
            let registry = switchyard::devregistry::Registry::start(
                "127.0.0.1:0".parse()?,
                switchyard::devregistry::RegistryOptions::default(),
            )?;
            println!("consul: embedded dev registry at {}", registry.url());
            (registry.url(), Some(registry))
        }
    };
    let consul = Consul {
        url,
        http: reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()?,
        token: std::env::var("CONSUL_HTTP_TOKEN")
            .ok()
            .filter(|t| !t.is_empty()),
    };
    let mut args = std::env::args().skip(1);
    let mut gateway = None;
    let mut changes = 200;
    let (mut services, mut per, mut routed) = (10_000, 10, 1_000);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--gateway" => gateway = args.next(),
            "--changes" => changes = args.next().and_then(|v| v.parse().ok()).unwrap_or(changes),
            "--services" => services = args.next().and_then(|v| v.parse().ok()).unwrap_or(services),
            "--instances" => per = args.next().and_then(|v| v.parse().ok()).unwrap_or(per),
            "--routed" => routed = args.next().and_then(|v| v.parse().ok()).unwrap_or(routed),
            other => return Err(format!("unknown argument {other}").into()),
        }
    }
    propagation(&consul, changes).await?;
    match gateway {
        Some(g) => scale(&consul, &g, services, per, routed.min(services)).await?,
        None => println!("\n(scale part skipped: pass --gateway <switchyard binary>)"),
    }
    Ok(())
}
