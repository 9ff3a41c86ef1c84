//! The dashboard in a real headless Chromium (system package, driven through ChromeDriver
//! with fantoccini), the audit that no admin answer carries a secret, and `switchyard
//! status` end to end. The browser tests fail, loudly, when Chromium or ChromeDriver is
//! missing (`.ci/run` installs both). `SWITCHYARD_SCREENSHOTS=1` also writes the
//! screenshots of docs/ (`docs/images/`).

mod support;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use fantoccini::wd::WebDriverCompatibleCommand;
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{json, Value};
use switchyard::config::FileConfig;
use switchyard::dev::Dev;
use switchyard::shutdown::Shutdown;

use support::tokens::{self, claims, SECRET};
use support::{eventually, unique, Consul, Gateway, DEADLINE};

/// One browser at a time: each is a few hundred MB and the machine has two cores.
static BROWSER: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// How long the page may take to show something it was polled for.
const PAGE_DEADLINE: Duration = Duration::from_secs(20);

fn system_binary(env: &str, default: &str) -> PathBuf {
    let path = std::env::var_os(env).map_or_else(|| PathBuf::from(default), PathBuf::from);
    assert!(
        path.exists(),
        "{} not found ({env} to point elsewhere): the dashboard tests drive a real Chromium \
         through ChromeDriver; install them (Debian: apt-get install chromium chromium-driver; \
         .ci/run does)",
        path.display()
    );
    path
}

/// Whether this run writes the screenshots of docs/ (`SWITCHYARD_SCREENSHOTS=1`).
fn screenshots() -> bool {
    std::env::var("SWITCHYARD_SCREENSHOTS").as_deref() == Ok("1")
}

/// `POST /session/{id}/se/log`: ChromeDriver's console log of the page (errors included).
#[derive(Debug)]
struct BrowserLog;

impl WebDriverCompatibleCommand for BrowserLog {
    fn endpoint(
        &self,
        base_url: &url::Url,
        session_id: Option<&str>,
    ) -> Result<url::Url, url::ParseError> {
        base_url.join(&format!(
            "session/{}/se/log",
            session_id.unwrap_or_default()
        ))
    }

    fn method_and_body(&self, _: &url::Url) -> (http::Method, Option<String>) {
        (http::Method::POST, Some(r#"{"type":"browser"}"#.into()))
    }
}

/// ChromeDriver on an ephemeral loopback port and one headless Chromium session.
struct Browser {
    client: Option<Client>,
    driver: tokio::process::Child,
    _profile: tempfile::TempDir,
}

impl Browser {
    async fn start() -> Browser {
        let chromium = system_binary("CHROMIUM", "/usr/bin/chromium");
        let chromedriver = system_binary("CHROMEDRIVER", "/usr/bin/chromedriver");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let driver = tokio::process::Command::new(chromedriver)
            .arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .expect("chromedriver starts");
        let base = format!("http://127.0.0.1:{port}");
        let http = support::client();
        eventually(DEADLINE, "chromedriver answers", || {
            let req = http.get(format!("{base}/status"));
            async move { req.send().await.ok().filter(|r| r.status() == 200) }
        })
        .await;
        let profile = tempfile::tempdir().unwrap();
        let caps = json!({
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": chromium,
                "args": [
                    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                    "--no-first-run", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
                    "--window-size=1400,1000",
                    format!("--user-data-dir={}", profile.path().display()),
                ],
            },
            "goog:loggingPrefs": {"browser": "ALL"},
        });
        let Value::Object(caps) = caps else {
            unreachable!()
        };
        let client = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(caps)
            .connect(&base)
            .await
            .expect("a Chromium session starts");
        Browser {
            client: Some(client),
            driver,
            _profile: profile,
        }
    }

    fn page(&self) -> &Client {
        self.client.as_ref().expect("the session is open")
    }

    /// Runs `script` (a function body) in the page.
    async fn js(&self, script: &str) -> Value {
        self.page()
            .execute(script, vec![])
            .await
            .unwrap_or_else(|e| panic!("script failed: {e}\n{script}"))
    }

    /// Polls `script` until `done` holds for its answer; returns the answer.
    async fn wait_for(&self, what: &str, script: &str, done: impl Fn(&Value) -> bool) -> Value {
        let started = Instant::now();
        loop {
            let v = self.js(script).await;
            if done(&v) {
                return v;
            }
            assert!(
                started.elapsed() < PAGE_DEADLINE,
                "the page never showed {what}; last answer: {v}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Console entries of level SEVERE (errors, failed loads, exceptions).
    async fn console_errors(&self) -> Vec<String> {
        let log = self
            .page()
            .issue_cmd(BrowserLog)
            .await
            .expect("ChromeDriver gives the console log");
        log.as_array()
            .into_iter()
            .flatten()
            .filter(|e| e["level"] == "SEVERE")
            .map(|e| e["message"].as_str().unwrap_or_default().to_string())
            .collect()
    }

    async fn screenshot(&self, name: &str) {
        if !screenshots() {
            return;
        }
        let png = self.page().screenshot().await.expect("a screenshot");
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/images");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(name), png).unwrap();
    }

    async fn close(mut self) {
        if let Some(client) = self.client.take() {
            let _ = client.close().await;
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // A test that failed before `close`: end ChromeDriver and the Chromium it started
        // (its process group).
        if let Some(pid) = self.driver.id() {
            let _ = std::process::Command::new("kill")
                .args(["-KILL", "--", &format!("-{pid}")])
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// `switchyard dev` on ephemeral ports: the dev registry seeded with the demo (two echo
/// instances with HTTP checks every second, a public and a JWT route) and the gateway.
async fn demo(tweak: impl FnOnce(&mut FileConfig)) -> Dev {
    let mut file = FileConfig::default();
    file.proxy.listen = "127.0.0.1:0".into();
    file.admin.listen = "127.0.0.1:0".into();
    file.registration.enabled = false;
    file.consul.wait_s = 1;
    file.consul.max_backoff_s = 1;
    tweak(&mut file);
    let dev = switchyard::dev::start(file, "127.0.0.1:0".parse().unwrap(), Shutdown::new())
        .await
        .expect("the demo starts");
    assert!(dev.gateway.first_snapshot(DEADLINE).await);
    dev
}

/// The routes the page lists, in order (`data-route` of each visible row).
const ROUTE_ROWS: &str =
    "return Array.from(document.querySelectorAll('#routes tbody tr')).map(tr => tr.dataset.route);";

/// The text of one cell (by header name) of a route's row, or null.
fn route_cell(route: &str, column: &str) -> String {
    format!(
        "const heads = Array.from(document.querySelectorAll('#routes thead th')).map(t => t.textContent);
         const row = document.querySelector('#routes tbody tr[data-route=\"{route}\"]');
         return row ? row.cells[heads.indexOf('{column}')].textContent : null;"
    )
}

fn names(v: &Value) -> Vec<String> {
    v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| s.as_str().map(str::to_string))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_the_demo_live_in_a_real_browser_without_console_errors() {
    let _one = BROWSER.lock().await;
    let dev = demo(|_| {}).await;
    let admin = dev.gateway.admin_addr();
    let proxy = dev.gateway.proxy_addr();
    let browser = Browser::start().await;
    browser
        .page()
        .goto(&format!("http://{admin}/"))
        .await
        .unwrap();

    // The demo's routes, the Consul connection and the snapshot.
    browser
        .wait_for("the demo's routes", ROUTE_ROWS, |v| {
            names(v) == ["demo", "secure"]
        })
        .await;
    let consul = browser
        .js("return ['c-agent','c-contact','c-age','c-snapshot','c-ready'].map(id => document.getElementById(id).textContent);")
        .await;
    let consul = names(&consul);
    assert_eq!(
        consul[0],
        dev.registry.url().trim_start_matches("http://"),
        "{consul:?}"
    );
    assert_eq!(consul[1], "live", "{consul:?}");
    assert!(consul[3].starts_with('v'), "{consul:?}");
    assert_eq!(consul[4], "ready", "{consul:?}");
    let auth = browser.js(&route_cell("secure", "Auth & policies")).await;
    assert!(
        auth.as_str().unwrap_or_default().contains("jwt:demo"),
        "{auth}"
    );

    // Traffic: answers from the upstream on /demo, the gateway's own 401s on /secure.
    let http = support::client();
    for _ in 0..40 {
        let ok = http
            .get(format!("http://{proxy}/demo/x"))
            .send()
            .await
            .unwrap();
        assert_eq!(ok.status(), 200);
        let refused = http
            .get(format!("http://{proxy}/secure/x"))
            .send()
            .await
            .unwrap();
        assert_eq!(refused.status(), 401);
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    browser
        .wait_for(
            "requests per second on /demo",
            &route_cell("demo", "req/s"),
            |v| v.as_str().is_some_and(|s| s != "0"),
        )
        .await;
    browser
        .wait_for(
            "the gateway's refusals on /secure",
            &route_cell("secure", "gateway"),
            |v| v == "100%",
        )
        .await;
    assert_eq!(browser.js(&route_cell("secure", "4xx")).await, "100%");
    assert_eq!(browser.js(&route_cell("demo", "5xx")).await, "0%");
    let p99 = browser.js(&route_cell("demo", "p99")).await;
    assert!(p99.as_str().is_some_and(|s| s.ends_with("ms")), "{p99}");

    // A rejected document: the last good version keeps serving, the page says so.
    let token = dev.token.clone();
    dev.registry
        .kv_put(
            "switchyard/routes/secure",
            "{\"service\": \"demo\", \"path_prefix\": ",
        )
        .unwrap();
    let rejected = browser
        .wait_for(
            "the rejected document",
            "const r = document.querySelector('#rejected tbody tr[data-rejected=\"secure\"]');
             return r && !document.getElementById('rejected-section').hidden ? r.textContent : null;",
            |v| v.is_string(),
        )
        .await;
    let rejected = rejected.as_str().unwrap_or_default();
    assert!(rejected.contains("switchyard/routes/secure"), "{rejected}");
    assert!(rejected.contains("invalid JSON"), "{rejected}");
    assert!(rejected.contains("last good version"), "{rejected}");
    let still = http
        .get(format!("http://{proxy}/secure/x"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(still.status(), 200, "the last good version serves");

    // The search box filters routes.
    let search = browser.page().find(Locator::Id("search")).await.unwrap();
    search.send_keys("secure").await.unwrap();
    browser
        .wait_for("only the matching route", ROUTE_ROWS, |v| {
            names(v) == ["secure"]
        })
        .await;
    search.clear().await.unwrap();
    browser
        .js("document.getElementById('search').dispatchEvent(new Event('input')); return null;")
        .await;
    browser
        .wait_for("every route again", ROUTE_ROWS, |v| names(v).len() == 2)
        .await;

    // The 10-minute chart: the page asks for the other ring and draws it.
    browser
        .js("const s = document.getElementById('span'); s.value = '10m'; s.dispatchEvent(new Event('change')); return null;")
        .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    browser
        .js("const s = document.getElementById('span'); s.value = '60s'; s.dispatchEvent(new Event('change')); return null;")
        .await;

    // An instance's check fails: the page shows it critical within 2 s of Consul saying so.
    let instance_health =
        "const r = document.querySelector('#services tr[data-instance$=\"/demo-1\"]');
                           return r ? r.dataset.health : null;";
    assert_eq!(browser.js(instance_health).await, "passing");
    let checks = format!("{}/v1/health/checks/demo", dev.registry.url());
    let consul_says_critical = async {
        let started = Instant::now();
        loop {
            let list: Value = http
                .get(&checks)
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            let critical = list
                .as_array()
                .into_iter()
                .flatten()
                .any(|c| c["ServiceID"] == "demo-1" && c["Status"] == "critical");
            if critical {
                return Instant::now();
            }
            assert!(started.elapsed() < DEADLINE, "the check never failed");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    let page_says_critical = async {
        browser
            .wait_for("demo-1 critical", instance_health, |v| v == "critical")
            .await;
        Instant::now()
    };
    dev.demo[0].set_healthy(false);
    let (in_consul, on_page) = tokio::join!(consul_says_critical, page_says_critical);
    let lag = on_page.saturating_duration_since(in_consul);
    support::note(&format!("critical on the page {lag:?} after Consul"));
    assert!(lag <= Duration::from_secs(2), "took {lag:?}");
    let why = browser
        .js("return document.querySelector('#services tr[data-instance$=\"/demo-1\"]').textContent;")
        .await;
    assert!(
        why.as_str().unwrap_or_default().contains("(critical)"),
        "{why}"
    );

    // Nothing went wrong in the page: no console error, no error banner of its own.
    let alarm = browser
        .js("const a = document.getElementById('alarm'); return a.hidden ? '' : a.textContent;")
        .await;
    assert!(
        !alarm
            .as_str()
            .unwrap_or_default()
            .contains("Dashboard error"),
        "{alarm}"
    );
    let errors = browser.console_errors().await;
    assert!(errors.is_empty(), "console errors: {errors:#?}");
    // The log really is read: an error the page logs now is seen.
    browser
        .js("console.error('probe-4711'); return null;")
        .await;
    let errors = browser.console_errors().await;
    assert!(
        errors.iter().any(|e| e.contains("probe-4711")),
        "{errors:?}"
    );

    if screenshots() {
        // A few minutes' worth of chart for the docs: 20 s of steady traffic (bounded).
        for i in 0..400u32 {
            let path = if i % 5 == 0 { "secure" } else { "demo" };
            let _ = http.get(format!("http://{proxy}/{path}/x")).send().await;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        browser.screenshot("dashboard.png").await;
    }
    browser.close().await;
    dev.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_needs_the_admin_token_when_one_is_set_and_works_with_it() {
    let _one = BROWSER.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("admin-token");
    std::fs::write(&token_file, "dash-token-1\n").unwrap();
    let dev = demo(|f| {
        f.admin.token_file = Some(token_file.clone());
        f.readiness.max_data_age_s = 2;
    })
    .await;
    let admin = dev.gateway.admin_addr();

    let http = support::client();
    let refused = http
        .get(format!("http://{admin}/dashboard.json"))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 401);
    let body = support::json_of(refused).await;
    assert_eq!(body["error"], "unauthorized");
    assert!(body["request_id"].is_string(), "{body}");
    assert!(body["message"].is_string(), "{body}");

    let browser = Browser::start().await;
    browser
        .page()
        .goto(&format!("http://{admin}/"))
        .await
        .unwrap();
    let locked =
        "return [document.getElementById('login').hidden, document.getElementById('main').hidden,
                          document.querySelectorAll('#routes tbody tr').length];";
    browser
        .wait_for("the token form and no data", locked, |v| {
            *v == json!([false, true, 0])
        })
        .await;
    browser.screenshot("dashboard-token.png").await;

    let unlock = |token: &'static str| {
        let page = browser.page().clone();
        async move {
            let input = page.find(Locator::Id("token")).await.unwrap();
            input.send_keys(token).await.unwrap();
            page.find(Locator::Css("#login button"))
                .await
                .unwrap()
                .click()
                .await
                .unwrap();
        }
    };
    unlock("wrong-token").await;
    browser
        .wait_for(
            "the refusal",
            "return document.getElementById('login-error').textContent;",
            |v| v.as_str().is_some_and(|s| s.contains("refused")),
        )
        .await;
    assert_eq!(browser.js(locked).await, json!([false, true, 0]));

    unlock("dash-token-1").await;
    browser
        .wait_for("the routes", ROUTE_ROWS, |v| names(v) == ["demo", "secure"])
        .await;

    // The token stays for the tab: a reload works without asking again.
    browser.page().refresh().await.unwrap();
    browser
        .wait_for("the routes after a reload", ROUTE_ROWS, |v| {
            names(v) == ["demo", "secure"]
        })
        .await;

    // Consul goes away: the page raises the stale-data alarm (limit 2 s here).
    dev.registry.stop().await;
    let alarm = browser
        .wait_for(
            "the stale-data alarm",
            "const a = document.getElementById('alarm');
             return [a.hidden ? '' : a.textContent,
                     document.getElementById('c-age-card').classList.contains('stale')];",
            |v| v[1] == true,
        )
        .await;
    assert!(
        alarm[0]
            .as_str()
            .unwrap_or_default()
            .contains("Consul data is stale"),
        "{alarm}"
    );
    browser.screenshot("dashboard-stale.png").await;

    // A rotated token file takes effect at once: the page asks again.
    std::fs::write(&token_file, "dash-token-2-rotated\n").unwrap();
    browser
        .wait_for("the token form again", locked, |v| v[0] == false)
        .await;
    browser.close().await;
    dev.stop().await;
}

/// Every answer of the admin listener, fetched with the admin token.
async fn every_admin_answer(gw: &Gateway, token: &str) -> Vec<(String, String)> {
    let http = support::client();
    let mut out = Vec::new();
    for path in [
        "/",
        "/app.js",
        "/app.css",
        "/dashboard.json",
        "/routes",
        "/upstreams",
        "/auth",
        "/consul",
        "/rate_limits",
        "/metrics",
        "/ready",
        "/healthz",
        "/jwks.json",
        "/nope",
    ] {
        let resp = http
            .get(format!("http://{}{path}", gw.admin_addr()))
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        assert_ne!(resp.status(), 401, "{path}");
        out.push((path.to_string(), resp.text().await.unwrap()));
    }
    out
}

#[tokio::test]
async fn no_admin_answer_carries_a_secret_of_the_configuration() {
    let consul_token = format!("consul-acl-{}", unique("secret"));
    let admin_token = format!("admin-{}", unique("secret"));
    let mut options = switchyard::devregistry::RegistryOptions::for_tests();
    options.token = Some(consul_token.clone());
    let consul = Consul::custom(options, support::client()).await;
    let dir = tempfile::tempdir().unwrap();
    let hmac_file = dir.path().join("hs256.secret");
    std::fs::write(&hmac_file, format!("{SECRET}\n")).unwrap();
    let assertion_key = dir.path().join("assertion.pem");
    let assertion_pem = include_str!("fixtures/ed-private.pem");
    std::fs::write(&assertion_key, assertion_pem).unwrap();
    let prefix = format!("{}/", unique("secrets"));
    // A Redis password (nothing listens there: the store shows as down, with its URL).
    let redis_password = format!("redis-{}", unique("secret"));
    let gw = Gateway::start(&consul, &prefix, |f| {
        f.admin.token = Some(admin_token.clone());
        f.rate_limit.redis_url = Some(format!("redis://:{redis_password}@127.0.0.1:1"));
        f.jwt_providers.insert(
            "corp".into(),
            json!({"issuer": tokens::ISSUER, "audiences": [tokens::AUDIENCE],
                   "algorithms": ["HS256"], "keys": [{"kid": "h", "secret_file": hmac_file}]}),
        );
        f.assertion = Some(switchyard::config::AssertionSection {
            key_file: assertion_key.clone(),
            kid: "gw-test".into(),
            issuer: "switchyard-test".into(),
        });
    })
    .await;
    let service = unique("svc");
    let upstreams = support::start_upstreams(&consul, &service, 1).await;
    let key =
        switchyard::auth::api_key::mint("billing", vec!["read".into()], Some("billing-1".into()));
    consul
        .put_kv(
            &format!("{prefix}apikeys/billing-1"),
            &serde_json::to_string(&key.doc).unwrap(),
        )
        .await;
    // A rejected key document whose hash field is shown nowhere either.
    let bad_hash = "ab".repeat(32);
    consul
        .put_kv(
            &format!("{prefix}apikeys/broken"),
            &json!({"sha256": bad_hash, "consumer": 7}).to_string(),
        )
        .await;
    consul
        .put_kv(
            &gw.route_key("private"),
            &support::route(
                &service,
                "/private",
                json!({"auth": {"jwt": ["corp"], "api_key": true},
                       "upstream_assertion": {"audience": "private"}}),
            ),
        )
        .await;
    gw.wait_upstreams("/private", &[&format!("{service}-0")])
        .await;
    let proxy = gw.app.proxy_addr();
    let http = support::client();
    let jwt = tokens::hs256("h", &claims("alice", json!({})));
    for (name, value) in [
        ("x-api-key", key.key.clone()),
        ("authorization", format!("Bearer {jwt}")),
    ] {
        eventually(DEADLINE, "the credential is accepted", || {
            let req = http
                .get(format!("http://{proxy}/private/x"))
                .header(name, value.clone());
            async move { req.send().await.ok().filter(|r| r.status() == 200) }
        })
        .await;
    }
    eventually(DEADLINE, "the broken key document is reported", || {
        let gw = &gw;
        let token = admin_token.clone();
        async move {
            let answers = every_admin_answer(gw, &token).await;
            let auth = &answers.iter().find(|(p, _)| p == "/auth")?.1;
            auth.contains("apikeys/broken").then_some(())
        }
    })
    .await;
    // Traffic history too (the sampler runs every second).
    tokio::time::sleep(Duration::from_millis(1100)).await;

    let assertion_body: String = assertion_pem
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect();
    let secrets = [
        ("the consul ACL token", consul_token.as_str()),
        ("the admin token", admin_token.as_str()),
        ("the HMAC secret", SECRET),
        ("the API key", key.key.as_str()),
        ("the API key's hash", key.doc.sha256.as_str()),
        ("a rejected document's hash", bad_hash.as_str()),
        ("the assertion private key", assertion_body.as_str()),
        ("a JWT", jwt.as_str()),
        ("the Redis password", redis_password.as_str()),
    ];
    let answers = every_admin_answer(&gw, &admin_token).await;
    let dashboard = &answers
        .iter()
        .find(|(p, _)| p == "/dashboard.json")
        .unwrap()
        .1;
    assert!(
        dashboard.contains("\"private\""),
        "the audit sees real data: {dashboard}"
    );
    let rate_limits = &answers.iter().find(|(p, _)| p == "/rate_limits").unwrap().1;
    assert!(
        rate_limits.contains("127.0.0.1:1"),
        "the audit sees the store: {rate_limits}"
    );
    for (path, body) in &answers {
        for (what, secret) in secrets {
            assert!(!secret.is_empty());
            assert!(!body.contains(secret), "{path} shows {what}");
        }
    }
    drop(upstreams);
    gw.stop().await;
    consul.cleanup().await;
}

fn status_command(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .arg("status")
        .args(args)
        .env_remove("SWITCHYARD_ADMIN")
        .env_remove("SWITCHYARD_ADMIN_TOKEN_FILE")
        .output()
        .expect("switchyard status runs")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switchyard_status_prints_routes_instances_data_age_and_top_errors() {
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("admin-token");
    std::fs::write(&token_file, "status-token\n").unwrap();
    let dev = demo(|f| f.admin.token_file = Some(token_file.clone())).await;
    let admin = dev.gateway.admin_addr().to_string();
    let proxy = dev.gateway.proxy_addr();
    let http = support::client();
    for _ in 0..10 {
        http.get(format!("http://{proxy}/secure/x"))
            .send()
            .await
            .unwrap();
        http.get(format!("http://{proxy}/demo/x"))
            .send()
            .await
            .unwrap();
    }
    dev.demo[1].set_healthy(false);
    let token_arg = token_file.to_str().unwrap();
    let text = eventually(
        DEADLINE,
        "status shows the errors and demo-2 critical",
        || {
            let out = status_command(&["--admin", &admin, "--token-file", token_arg]);
            async move {
                let text = String::from_utf8_lossy(&out.stdout).to_string();
                (out.status.code() == Some(0)
                    && text.contains("critical")
                    && text.contains("secure: 10 of 10 requests failed"))
                .then_some(text)
            }
        },
    )
    .await;
    assert!(text.contains(": ready (serving)"), "{text}");
    assert!(text.contains(&dev.registry.url()), "{text}");
    assert!(text.contains("data age"), "{text}");
    assert!(text.contains("*/demo"), "{text}");
    assert!(text.contains("jwt:demo"), "{text}");
    assert!(text.contains("switchyard-dev/demo-1"), "{text}");
    assert!(text.contains("passing"), "{text}");
    assert!(text.contains("by the gateway 10"), "{text}");

    let json_out = status_command(&["--admin", &admin, "--token-file", token_arg, "--json"]);
    assert_eq!(json_out.status.code(), Some(0));
    let v: Value = serde_json::from_slice(&json_out.stdout).expect("--json prints JSON");
    assert_eq!(v["routes"][0]["name"], "demo");
    assert!(v["consul"]["data_age_s"].is_f64());

    let refused = status_command(&["--admin", &admin]);
    assert_eq!(refused.status.code(), Some(1));
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(err.contains("needs its token"), "{err}");

    // Consul gone: the picture still comes, stale, and the exit status says so.
    dev.registry.stop().await;
    let stale = eventually(Duration::from_secs(30), "status reports stale data", || {
        let out = status_command(&["--admin", &admin, "--token-file", token_arg]);
        async move { (out.status.code() == Some(2)).then_some(out) }
    })
    .await;
    let text = String::from_utf8_lossy(&stale.stdout);
    assert!(text.contains("STALE"), "{text}");
    dev.stop().await;
}
