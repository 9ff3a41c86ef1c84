//! Cost of edge policy per request, and the memory of rate-limit keys: `Edge::admit` on a
//! route without policy and with IP rules + CORS + limits, `Edge::limit_rate` for one hot
//! key and for a million distinct keys (resident memory before and after, and after the
//! sweep drops them), and upstream assertion signing (EdDSA, ES256).
//!
//!   cargo run --release --example bench_policy -- [--keys N]

use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use http::{HeaderMap, HeaderValue, Method, Uri};
use switchyard::assertion::{Caller, Signer};
use switchyard::policy::Edge;
use switchyard::routing::{Route, RouteSpec};

fn route(json: &str) -> Route {
    Route::compile("bench", RouteSpec::from_json(json.as_bytes()).unwrap()).unwrap()
}

fn rss_mb() -> f64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: f64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0.0);
    pages * 4096.0 / 1_048_576.0
}

fn per_op(d: Duration, n: u32) -> String {
    format!("{:>8.0} ns/op", d.as_nanos() as f64 / f64::from(n))
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let keys: u32 = args
        .iter()
        .position(|a| a == "--keys")
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let iterations = 200_000u32;
    let edge = Edge::default();
    let uri: Uri = "/search/items?q=x".parse().unwrap();
    let ip = IpAddr::V4(Ipv4Addr::new(203, 0, 113, 7));
    let mut headers = HeaderMap::new();
    headers.insert(
        "origin",
        HeaderValue::from_static("https://app.example.com"),
    );
    headers.insert("accept", HeaderValue::from_static("application/json"));

    let plain = route(r#"{"service":"s","path_prefix":"/search"}"#);
    let full = route(
        r#"{"service":"s","path_prefix":"/search","ip_allow":["203.0.113.0/24","10.0.0.0/8"],
            "ip_deny":["203.0.113.66/32"],"max_headers":64,"max_url_bytes":2048,
            "cors":{"origins":["https://app.example.com","https://*.example.org"],"credentials":true},
            "rate_limit":{"per_second":1e6,"burst":1000000}}"#,
    );
    for (name, r) in [
        ("admit, no policy", &plain),
        ("admit, ip+cors+limits", &full),
    ] {
        let start = Instant::now();
        for _ in 0..iterations {
            std::hint::black_box(
                edge.admit(&r.policy, ip, &Method::GET, &uri, &headers)
                    .unwrap(),
            );
        }
        println!("{name:<36} {}", per_op(start.elapsed(), iterations));
    }

    let mut adm = edge
        .admit(&full.policy, ip, &Method::GET, &uri, &headers)
        .unwrap();
    let start = Instant::now();
    for _ in 0..iterations {
        edge.limit_rate(&full.policy, &mut adm, None, &headers)
            .now_or_never()
            .expect("a local limit decides without waiting")
            .unwrap();
    }
    println!(
        "{:<36} {}",
        "limit_rate, one key",
        per_op(start.elapsed(), iterations)
    );

    let before = rss_mb();
    let start = Instant::now();
    for i in 0..keys {
        let ip = IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i));
        adm.client_ip = Some(ip);
        edge.limit_rate(&full.policy, &mut adm, None, &headers)
            .now_or_never()
            .expect("a local limit decides without waiting")
            .unwrap();
    }
    let took = start.elapsed();
    let after = rss_mb();
    println!(
        "{:<36} {}   {keys} keys: +{:.1} MB resident ({:.0} bytes/key)",
        "limit_rate, distinct keys",
        per_op(took, keys),
        after - before,
        (after - before) * 1_048_576.0 / f64::from(keys)
    );
    // At 1e6/s a spent token is back within a microsecond: the sweep drops every key.
    std::thread::sleep(Duration::from_millis(5));
    let start = Instant::now();
    edge.sweep();
    println!(
        "{:<36} {:>8.1} ms for {keys} keys; {} limiters left",
        "sweep",
        start.elapsed().as_secs_f64() * 1000.0,
        edge.limiters().len()
    );

    let scopes = vec!["orders:read".to_string()];
    let caller = Caller {
        subject: Some("alice"),
        consumer: None,
        scopes: &scopes,
    };
    for (alg, pem) in [
        ("EdDSA", include_str!("../tests/fixtures/ed-private.pem")),
        ("ES256", include_str!("../tests/fixtures/ec-private.pem")),
    ] {
        let signer = Signer::from_pem(pem, std::path::Path::new("k"), "gw", "switchyard").unwrap();
        let n = 2_000;
        let start = Instant::now();
        for _ in 0..n {
            std::hint::black_box(signer.sign("orders", 30, caller, "req-1").unwrap());
        }
        println!(
            "{:<36} {}",
            format!("assertion sign, {alg}"),
            per_op(start.elapsed(), n)
        );
    }
}
