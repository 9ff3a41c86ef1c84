//! Operability end to end on the embedded dev registry: `/metrics` parses as Prometheus
//! text and its counters move, the gateway registers itself in Consul and leaves on
//! shutdown (also the real binary on SIGTERM), and `switchyard dev` serves its demo.

mod support;

use std::time::Duration;

use serde_json::Value;
use support::eventually;
use support::prometheus::{parse as parse_prometheus, total};
use switchyard::app::AppHandle;
use switchyard::config::FileConfig;
use switchyard::devregistry::{Registry, RegistryOptions};

/// This file's waits allow 20 s (support's `DEADLINE` is 15 s).
const DEADLINE: Duration = Duration::from_secs(20);

fn registry() -> Registry {
    Registry::start("127.0.0.1:0".parse().unwrap(), RegistryOptions::for_tests()).unwrap()
}

fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap()
}

/// The shared test config on the default KV prefix.
fn config(consul: &str) -> FileConfig {
    support::test_config(consul, &FileConfig::default().consul.kv_prefix)
}

async fn gateway(file: FileConfig) -> AppHandle {
    support::Gateway::start_with(file).await.app
}

async fn get_json(url: &str) -> Option<Value> {
    let resp = http().get(url).send().await.ok()?;
    if !resp.status().is_success() {
        return None;
    }
    resp.json().await.ok()
}

// === /metrics ===

async fn scrape(admin: std::net::SocketAddr, token: Option<&str>) -> (u16, String, String) {
    let mut req = http().get(format!("http://{admin}/metrics"));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let ctype = resp
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    (status, ctype, resp.text().await.unwrap())
}

#[test]
fn the_prometheus_reader_refuses_malformed_lines() {
    let good = "# HELP a_total A.\n# TYPE a_total counter\na_total{x=\"q\\\"\",y=\"2\"} 3\n\n\
                # TYPE h histogram\nh_bucket{le=\"+Inf\"} 1\nh_sum 0.5\nh_count 1\n";
    let s = parse_prometheus(good);
    assert_eq!(s.len(), 4);
    assert_eq!(s[0].labels["x"], "q\"");
    for bad in [
        "a_total 1\n",
        "# TYPE a counter\na{x=1} 1\n",
        "# TYPE a counter\na{x=\"1\"\n",
        "# TYPE a counter\na one\n",
        "# TYPE a counter\na -1\n",
        "# TYPE a gauge\n# TYPE a gauge\n",
        "# TYPE h histogram\nh_bucket 1\n",
        "#TYPE a gauge\n",
    ] {
        let r = std::panic::catch_unwind(|| parse_prometheus(bad));
        assert!(r.is_err(), "accepted {bad:?}");
    }
}

// === access log ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_log_lines_reach_their_file_with_the_request_they_describe() {
    let reg = registry();
    let echo = switchyard::devregistry::demo::serve_echo("log-svc", "log-svc-1")
        .await
        .unwrap();
    reg.register_service("log-svc", "log-svc-1", "127.0.0.1", echo.addr.port())
        .unwrap();
    reg.kv_put(
        "switchyard/routes/log-demo",
        r#"{"service":"log-svc","path_prefix":"/log-demo"}"#,
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("access.log");
    let mut file = config(&reg.url());
    file.log.access_log = true;
    file.log.format = switchyard::config::LogFormat::Json;
    file.log.access_log_path = path.display().to_string();
    file.log.access_log_flush_ms = 50;
    let gw = gateway(file).await;
    let proxy = gw.proxy_addr();
    eventually(DEADLINE, "the route serves", || async {
        let r = http()
            .get(format!("http://{proxy}/log-demo/ready"))
            .send()
            .await
            .ok()?;
        (r.status() == 200).then_some(())
    })
    .await;
    let sent = http()
        .get(format!("http://{proxy}/log-demo/a%22b?q=1"))
        .header("x-request-id", "log-test-1")
        .send()
        .await
        .unwrap();
    assert_eq!(sent.status(), 200);
    let line: Value = eventually(DEADLINE, "the request's line is written", || async {
        let text = std::fs::read_to_string(&path).ok()?;
        text.lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .find(|v| v["request_id"] == "log-test-1")
    })
    .await;
    assert_eq!(line["target"], "access");
    assert_eq!(line["method"], "GET");
    assert_eq!(line["path"], "/log-demo/a%22b");
    assert_eq!(line["status"], 200);
    assert_eq!(line["route"], "log-demo");
    assert_eq!(line["service"], "log-svc");
    assert!(line["upstream"].as_str().unwrap().ends_with("log-svc-1"));
    assert_eq!(line["tries"], 1);
    assert_eq!(line["complete"], true);
    assert_eq!(line["client_ip"], "127.0.0.1");
    assert!(line["duration_ms"].as_f64().unwrap() >= 0.0);
    assert!(line["bytes"].as_u64().unwrap() > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_parse_as_prometheus_text_and_counters_move() {
    let reg = registry();
    let echo = switchyard::devregistry::demo::serve_echo("metrics-svc", "metrics-svc-1")
        .await
        .unwrap();
    reg.register_service(
        "metrics-svc",
        "metrics-svc-1",
        "127.0.0.1",
        echo.addr.port(),
    )
    .unwrap();
    let mut file = config(&reg.url());
    file.admin.token = Some("scrape-token".into());
    let gw = gateway(file).await;
    let admin = gw.admin_addr();

    let (status, _, _) = scrape(admin, None).await;
    assert_eq!(status, 401, "/metrics needs the admin token");
    let (status, ctype, before) = scrape(admin, Some("scrape-token")).await;
    assert_eq!(status, 200);
    assert!(ctype.starts_with("text/plain; version=0.0.4"), "{ctype}");
    let before = total(
        &parse_prometheus(&before),
        "switchyard_snapshots_published_total",
        &[],
    );

    reg.kv_put(
        "switchyard/routes/metrics-demo",
        r#"{"service":"metrics-svc","path_prefix":"/metrics-demo"}"#,
    )
    .unwrap();
    let proxy = gw.proxy_addr();
    eventually(DEADLINE, "the route serves", || async {
        let r = http()
            .get(format!("http://{proxy}/metrics-demo/x"))
            .send()
            .await
            .ok()?;
        (r.status() == 200).then_some(())
    })
    .await;

    let (_, _, after) = scrape(admin, Some("scrape-token")).await;
    let samples = parse_prometheus(&after);
    let published = total(&samples, "switchyard_snapshots_published_total", &[]);
    assert!(
        published > before,
        "snapshots published did not move: {before} -> {published}"
    );
    let requests = total(
        &samples,
        "switchyard_requests_total",
        &[("route", "metrics-demo")],
    );
    assert!(
        requests >= 1.0,
        "no request counted for the route:\n{after}"
    );
    assert!(
        samples
            .iter()
            .any(|s| s.name == "switchyard_request_duration_seconds_bucket"),
        "no latency histogram:\n{after}"
    );
    assert!(samples
        .iter()
        .any(|s| s.name == "switchyard_consul_data_age_seconds"
            && s.labels.get("watch").is_some_and(|w| w == "routes")));

    // Consul goes away: watch errors count up and the data ages.
    let errors_before = total(
        &samples,
        "switchyard_consul_watch_errors_total",
        &[("watch", "routes")],
    );
    reg.stop().await;
    eventually(DEADLINE, "watch errors and data age move", || async {
        let (_, _, text) = scrape(admin, Some("scrape-token")).await;
        let s = parse_prometheus(&text);
        let errors = total(
            &s,
            "switchyard_consul_watch_errors_total",
            &[("watch", "routes")],
        );
        let age = total(
            &s,
            "switchyard_consul_data_age_seconds",
            &[("watch", "routes")],
        );
        (errors > errors_before && age > 0.0).then_some(())
    })
    .await;
    gw.stop().await;
}

// === self-registration ===

fn registering(consul: &str) -> FileConfig {
    let mut file = config(consul);
    file.registration.enabled = true;
    file.registration.check_interval_s = 1;
    file.registration.tags = vec!["edge".into()];
    file
}

/// The agent's services, by ID.
async fn agent_services(consul: &str) -> Option<serde_json::Map<String, Value>> {
    get_json(&format!("{consul}/v1/agent/services"))
        .await?
        .as_object()
        .cloned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_registers_itself_with_a_ready_check_and_leaves_on_stop() {
    let reg = registry();
    let consul = reg.url();
    let gw = gateway(registering(&consul)).await;
    let id = gw
        .registration()
        .expect("registration is on")
        .id()
        .to_string();
    let proxy_port = gw.proxy_addr().port();

    let svc = eventually(DEADLINE, "the agent lists the gateway", || async {
        agent_services(&consul).await?.get(&id).cloned()
    })
    .await;
    assert_eq!(svc["Service"], "switchyard");
    assert_eq!(svc["Port"], proxy_port);
    assert_eq!(svc["Tags"][0], "edge");
    // The agent can list the service before the gateway has read the agent's answer.
    eventually(DEADLINE, "the gateway knows it is registered", || async {
        gw.registration()?.is_registered().then_some(())
    })
    .await;

    let entry = eventually(DEADLINE, "its /ready check passes", || async {
        let list = get_json(&format!("{consul}/v1/health/service/switchyard?passing")).await?;
        list.as_array()?
            .iter()
            .find(|e| e["Service"]["ID"] == id.as_str())
            .cloned()
    })
    .await;
    let check = entry["Checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["ServiceID"] == id.as_str())
        .expect("the service check")
        .clone();
    assert_eq!(check["Status"], "passing");
    assert_eq!(check["Type"], "http", "{check}");

    gw.stop().await;
    let services = agent_services(&consul).await.unwrap();
    assert!(
        !services.contains_key(&id),
        "still registered: {services:?}"
    );
    let list = get_json(&format!("{consul}/v1/health/service/switchyard"))
        .await
        .unwrap();
    assert_eq!(list.as_array().unwrap().len(), 0, "{list}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registration_turned_off_registers_nothing() {
    let reg = registry();
    let gw = gateway(config(&reg.url())).await;
    assert!(gw.registration().is_none());
    assert!(gw.first_snapshot(DEADLINE).await);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let services = agent_services(&reg.url()).await.unwrap();
    assert!(services.is_empty(), "{services:?}");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registration_retries_until_consul_comes_up_and_never_blocks_start() {
    let reg = registry();
    let consul = reg.url();
    reg.stop().await;
    let started = tokio::time::Instant::now();
    let gw = gateway(registering(&consul)).await;
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "start waited on consul"
    );
    let id = gw.registration().unwrap().id().to_string();
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(!gw.registration().unwrap().is_registered());
    reg.restart().await.unwrap();
    eventually(DEADLINE, "registered once consul is back", || async {
        agent_services(&consul).await?.get(&id).map(|_| ())
    })
    .await;
    gw.stop().await;
    assert!(!agent_services(&consul).await.unwrap().contains_key(&id));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registration_the_agent_forgot_is_made_again() {
    let reg = registry();
    let consul = reg.url();
    let gw = gateway(registering(&consul)).await;
    let id = gw.registration().unwrap().id().to_string();
    eventually(DEADLINE, "registered", || async {
        agent_services(&consul).await?.get(&id).map(|_| ())
    })
    .await;
    // What an agent restarted without its data directory looks like.
    reg.deregister_service(&id);
    assert!(!agent_services(&consul).await.unwrap().contains_key(&id));
    eventually(DEADLINE, "registered again", || async {
        agent_services(&consul).await?.get(&id).map(|_| ())
    })
    .await;
    gw.stop().await;
    assert!(!agent_services(&consul).await.unwrap().contains_key(&id));
}

/// A loopback port free right now (bound, then released).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Waits for `child` up to `deadline`; kills it and panics (with its log) on timeout.
async fn wait_exit(
    child: &mut std::process::Child,
    deadline: Duration,
    log: &std::path::Path,
) -> std::process::ExitStatus {
    let end = tokio::time::Instant::now() + deadline;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if tokio::time::Instant::now() >= end {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "did not exit within {deadline:?}; log:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn sigterm(child: &std::process::Child) {
    let ok = std::process::Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill -TERM failed");
}

/// Sends SIGTERM and asserts that `child` exits zero within 15 s.
async fn sigterm_and_expect_success(child: &mut std::process::Child, log: &std::path::Path) {
    sigterm(child);
    let status = wait_exit(child, Duration::from_secs(15), log).await;
    assert!(
        status.success(),
        "exit {status:?}; log:\n{}",
        std::fs::read_to_string(log).unwrap_or_default()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_deregisters_and_exits_zero_on_sigterm() {
    let reg = registry();
    let consul = reg.url();
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("switchyard.toml");
    std::fs::write(
        &cfg,
        "[consul]\nwait_s = 2\nmax_backoff_s = 1\n[registration]\ncheck_interval_s = 1\n",
    )
    .unwrap();
    let log = dir.path().join("log.txt");
    let (proxy_port, admin_port) = (free_port(), free_port());
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["run", "--config"])
        .arg(&cfg)
        .args(["--consul", &consul])
        .args(["--listen", &format!("127.0.0.1:{proxy_port}")])
        .args(["--admin", &format!("127.0.0.1:{admin_port}")])
        .env_remove("CONSUL_HTTP_ADDR")
        .env_remove("CONSUL_HTTP_TOKEN")
        .env_remove("RUST_LOG")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();

    let found = tokio::time::timeout(
        DEADLINE,
        eventually(DEADLINE, "the binary registers itself", || async {
            agent_services(&consul)
                .await?
                .into_iter()
                .find_map(|(id, s)| {
                    (s["Service"] == "switchyard" && s["Port"] == proxy_port).then_some(id)
                })
        }),
    )
    .await;
    let Ok(id) = found else {
        let _ = child.kill();
        panic!("{}", std::fs::read_to_string(&log).unwrap_or_default());
    };
    eventually(DEADLINE, "its check passes", || async {
        let list = get_json(&format!("{consul}/v1/health/service/switchyard?passing")).await?;
        (list.as_array()?.len() == 1).then_some(())
    })
    .await;

    sigterm_and_expect_success(&mut child, &log).await;
    let services = agent_services(&consul).await.unwrap();
    assert!(
        !services.contains_key(&id),
        "still registered: {services:?}"
    );
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("deregistered from consul"), "{text}");
}

// === switchyard dev ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switchyard_dev_serves_the_public_and_the_jwt_protected_demo_routes() {
    let dir = tempfile::tempdir().unwrap();
    let (out, log) = (dir.path().join("stdout.txt"), dir.path().join("log.txt"));
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["dev", "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
        .args(["--registry-listen", "127.0.0.1:0"])
        .env_remove("RUST_LOG")
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let guide = tokio::time::timeout(
        Duration::from_secs(30),
        eventually(Duration::from_secs(30), "the printed guide", || async {
            let text = std::fs::read_to_string(&out).ok()?;
            text.contains("/v1/health/service/demo").then_some(text)
        }),
    )
    .await;
    let Ok(guide) = guide else {
        let _ = child.kill();
        panic!("{}", std::fs::read_to_string(&log).unwrap_or_default());
    };
    let field = |prefix: &str| {
        guide
            .lines()
            .find_map(|l| l.trim().strip_prefix(prefix))
            .unwrap_or_else(|| panic!("no `{prefix}` in:\n{guide}"))
            .trim()
            .to_string()
    };
    let proxy = field("gateway");
    let token = field("export TOKEN=");
    let admin = field("admin");

    let echo = eventually(
        Duration::from_secs(30),
        "GET /demo through the gateway",
        || async { get_json(&format!("{proxy}/demo/hello")).await },
    )
    .await;
    assert_eq!(echo["service"], "demo");
    assert!(
        ["demo-1", "demo-2"].contains(&echo["instance"].as_str().unwrap()),
        "{echo}"
    );
    assert_eq!(echo["path"], "/demo/hello");

    let secure = format!("{proxy}/secure/hi");
    let status = http().get(&secure).send().await.unwrap().status();
    assert_eq!(status, 401, "without a token");
    let with_token = eventually(DEADLINE, "the secure route with the token", || async {
        let r = http().get(&secure).bearer_auth(&token).send().await.ok()?;
        if r.status() != 200 {
            return None;
        }
        r.json::<Value>().await.ok()
    })
    .await;
    assert_eq!(
        with_token["headers"]["x-user-id"], "demo-user",
        "{with_token}"
    );
    let wrong = http()
        .get(&secure)
        .bearer_auth(format!("{token}x"))
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 401, "a tampered token");
    let (status, _, metrics) =
        scrape(admin.trim_start_matches("http://").parse().unwrap(), None).await;
    assert_eq!(status, 200);
    assert!(
        total(
            &parse_prometheus(&metrics),
            "switchyard_requests_total",
            &[("route", "demo")]
        ) >= 1.0
    );

    sigterm_and_expect_success(&mut child, &log).await;
}
