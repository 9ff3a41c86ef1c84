//! Dev registry benchmark (not a test): thousands of blocked watchers.
//!
//! Parks N blocking `health/service/web` queries (default 5000; `cargo run --release
//! --example bench_registry -- 5000`), then reports: process CPU while they are parked (should
//! be ~0: no polling), how many a write to an unrelated service wakes (should be 0), and how
//! long one write to `web` takes to answer all of them.

use std::time::{Duration, Instant};

use switchyard::devregistry::{CheckStatus, Registry, RegistryOptions};

type Error = Box<dyn std::error::Error + Send + Sync>;

/// User + system CPU of this process, from /proc (Linux).
fn cpu_time() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = stat.rsplit(')').next().unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    // Fields 14 and 15 of stat (utime, stime) are at 11 and 12 after the command name.
    Duration::from_millis((ticks(11) + ticks(12)) * 10)
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(5000);
    let reg = Registry::start("127.0.0.1:0".parse()?, RegistryOptions::for_tests())?;
    reg.register_service("web", "web-1", "127.0.0.1", 8080)?;
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(120))
        .build()?;
    let idx: u64 = client
        .get(format!("{}/v1/health/service/web", reg.url()))
        .send()
        .await?
        .headers()["x-consul-index"]
        .to_str()?
        .parse()?;
    let url = format!("{}/v1/health/service/web?index={idx}&wait=60s", reg.url());
    let mut waiters = Vec::with_capacity(n);
    for _ in 0..n {
        let (c, u) = (client.clone(), url.clone());
        waiters.push(tokio::spawn(async move {
            c.get(u).send().await.map(|r| r.status())
        }));
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    println!("{n} watchers parked");

    let cpu0 = cpu_time();
    tokio::time::sleep(Duration::from_secs(3)).await;
    println!("CPU while parked for 3 s: {:?}", cpu_time() - cpu0);

    reg.register_service("db", "db-1", "127.0.0.1", 5432)?;
    reg.kv_put("unrelated", "x")?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let woken = waiters.iter().filter(|w| w.is_finished()).count();
    println!("woken by unrelated writes: {woken}");

    let cpu0 = cpu_time();
    let t0 = Instant::now();
    reg.set_check_status("service:web-1", CheckStatus::Critical)?;
    let mut ok = 0;
    for w in waiters {
        if matches!(w.await, Ok(Ok(s)) if s == 200) {
            ok += 1;
        }
    }
    println!(
        "one write answered {ok}/{n} watchers in {:.1?} (CPU {:?})",
        t0.elapsed(),
        cpu_time() - cpu0
    );
    Ok(())
}
