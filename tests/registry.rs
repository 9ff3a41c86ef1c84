//! The embedded Consul-compatible registry, driven over real sockets: KV, catalog, health,
//! agent, blocking queries, ACL and fault injection, plus an independent client (rs-consul).

use std::future::Future;
use std::time::{Duration, Instant};

use base64::Engine;
use reqwest::header::HeaderMap;
use reqwest::StatusCode;
use serde_json::{json, Value};
use switchyard::devregistry::{CheckStatus, Registry, RegistryOptions};

const LIMIT: Duration = Duration::from_secs(20);

async fn within<T>(fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(LIMIT, fut)
        .await
        .expect("test exceeded its deadline")
}

fn start_with(opts: RegistryOptions) -> Registry {
    Registry::start("127.0.0.1:0".parse().unwrap(), opts).unwrap()
}

fn start() -> Registry {
    start_with(RegistryOptions::for_tests())
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(15))
        .build()
        .unwrap()
}

struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: String,
}

impl Answer {
    fn index(&self) -> u64 {
        self.headers["x-consul-index"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap()
    }
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {:?}", self.body))
    }
}

async fn send(req: reqwest::RequestBuilder) -> Answer {
    let r = req.send().await.unwrap();
    Answer {
        status: r.status(),
        headers: r.headers().clone(),
        body: r.text().await.unwrap(),
    }
}

async fn get(reg: &Registry, path: &str) -> Answer {
    send(client().get(format!("{}{path}", reg.url()))).await
}

async fn put(reg: &Registry, path: &str, body: impl Into<reqwest::Body>) -> Answer {
    send(client().put(format!("{}{path}", reg.url())).body(body)).await
}

async fn put_json(reg: &Registry, path: &str, body: Value) -> Answer {
    put(reg, path, body.to_string()).await
}

async fn delete(reg: &Registry, path: &str) -> Answer {
    send(client().delete(format!("{}{path}", reg.url()))).await
}

/// Polls `f` every 25 ms until it returns true or `limit` passes.
async fn eventually<F, Fut>(limit: Duration, mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if f().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    false
}

async fn check_status(reg: &Registry, id: &str) -> Option<String> {
    let checks = get(reg, "/v1/agent/checks").await.json();
    checks[id]["Status"].as_str().map(String::from)
}

// === KV ===

#[tokio::test]
async fn a_put_key_reads_back_as_one_base64_entry_indexed_by_its_modify_index() {
    within(async {
        let reg = start();
        assert_eq!(
            put(&reg, "/v1/kv/app/web?flags=42", "web-1").await.body,
            "true"
        );
        let a = get(&reg, "/v1/kv/app/web").await;
        assert_eq!(a.status, 200);
        let v = a.json();
        assert_eq!(v.as_array().unwrap().len(), 1);
        let e = &v[0];
        assert_eq!(e["Key"], "app/web");
        assert_eq!(e["Flags"], 42);
        assert_eq!(e["LockIndex"], 0);
        assert_eq!(
            e["Value"],
            base64::engine::general_purpose::STANDARD.encode("web-1")
        );
        assert!(e.get("Session").is_none());
        assert_eq!(e["ModifyIndex"].as_u64().unwrap(), a.index());
        assert_eq!(a.headers["x-consul-knownleader"], "true");
        assert_eq!(a.headers["x-consul-lastcontact"], "0");
        assert_eq!(a.headers["x-consul-effective-consistency"], "leader");
        assert_eq!(a.headers["x-consul-default-acl-policy"], "allow");
        assert_eq!(a.headers["content-type"], "application/json");
    })
    .await
}

#[tokio::test]
async fn an_empty_value_reads_back_as_null() {
    within(async {
        let reg = start();
        put(&reg, "/v1/kv/folder/", "").await;
        assert_eq!(
            get(&reg, "/v1/kv/folder/").await.json()[0]["Value"],
            Value::Null
        );
    })
    .await
}

#[tokio::test]
async fn a_missing_key_is_404_with_an_index_that_blocks_until_the_key_appears() {
    within(async {
        let reg = start();
        let miss = get(&reg, "/v1/kv/not/yet").await;
        assert_eq!(miss.status, 404);
        assert_eq!(miss.body, "");
        let idx = miss.index();
        assert!(idx >= 1);
        let url = format!("{}/v1/kv/not/yet?index={idx}&wait=10s", reg.url());
        let waiter = tokio::spawn(async move { send(client().get(url)).await });
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert!(!waiter.is_finished());
        put(&reg, "/v1/kv/not/yet", "here").await;
        let a = waiter.await.unwrap();
        assert_eq!(a.status, 200);
        assert!(a.index() > idx);
    })
    .await
}

#[tokio::test]
async fn recurse_keys_and_separator_list_the_prefix_in_key_order() {
    within(async {
        let reg = start();
        for k in [
            "app/web/b",
            "app/web/a",
            "app/web/sub/x",
            "app/website",
            "other",
        ] {
            put(&reg, &format!("/v1/kv/{k}"), k).await;
        }
        let rec = get(&reg, "/v1/kv/app/web?recurse").await.json();
        let keys: Vec<&str> = rec
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["Key"].as_str().unwrap())
            .collect();
        assert_eq!(
            keys,
            ["app/web/a", "app/web/b", "app/web/sub/x", "app/website"]
        );
        let k = get(&reg, "/v1/kv/app/web/?keys").await.json();
        assert_eq!(k, json!(["app/web/a", "app/web/b", "app/web/sub/x"]));
        let k = get(&reg, "/v1/kv/app/web/?keys&separator=/").await.json();
        assert_eq!(k, json!(["app/web/a", "app/web/b", "app/web/sub/"]));
        let k = get(&reg, "/v1/kv/?keys&separator=/").await.json();
        assert_eq!(k, json!(["app/", "other"]));
        assert_eq!(get(&reg, "/v1/kv/nothing/?keys").await.status, 404);
        assert_eq!(get(&reg, "/v1/kv/nothing/?recurse").await.status, 404);
        // Go clients send `recurse=` and rs-consul `recurse=false`: presence means on.
        assert_eq!(
            get(&reg, "/v1/kv/app/web?recurse=false")
                .await
                .json()
                .as_array()
                .unwrap()
                .len(),
            4
        );
    })
    .await
}

#[tokio::test]
async fn an_empty_root_lists_no_keys_but_is_not_404() {
    within(async {
        let reg = start();
        let a = get(&reg, "/v1/kv/?keys").await;
        assert_eq!(a.status, 200);
        assert_eq!(a.json(), json!([]));
        assert_eq!(get(&reg, "/v1/kv/").await.status, 400);
        assert_eq!(get(&reg, "/v1/kv/").await.body, "Missing key name");
    })
    .await
}

#[tokio::test]
async fn url_encoded_keys_are_decoded() {
    within(async {
        let reg = start();
        put(&reg, "/v1/kv/a%2Fb%20c", "v").await;
        assert_eq!(get(&reg, "/v1/kv/a/b c").await.json()[0]["Key"], "a/b c");
        assert_eq!(get(&reg, "/v1/kv/a%0Ab").await.status, 400);
    })
    .await
}

#[tokio::test]
async fn raw_answers_the_bytes_as_text() {
    within(async {
        let reg = start();
        put(&reg, "/v1/kv/raw", "plain bytes").await;
        let a = get(&reg, "/v1/kv/raw?raw").await;
        assert_eq!(a.body, "plain bytes");
        assert_eq!(a.headers["content-type"], "text/plain");
        assert_eq!(a.headers["x-content-type-options"], "nosniff");
        assert!(a.index() > 1);
    })
    .await
}

#[tokio::test]
async fn a_value_over_512_kib_is_refused_with_413() {
    within(async {
        let reg = start();
        let ok = put(&reg, "/v1/kv/big", vec![b'x'; 512 * 1024]).await;
        assert_eq!(ok.status, 200);
        let too_big = put(&reg, "/v1/kv/big", vec![b'x'; 512 * 1024 + 1]).await;
        assert_eq!(too_big.status, 413);
        assert!(too_big
            .body
            .starts_with("Request body(524289 bytes) too large, max size: 524288 bytes."));
        assert_eq!(reg.kv_get("big").unwrap().len(), 512 * 1024);
    })
    .await
}

/// What one raw HTTP/1.1 exchange returned: status, headers (lower-cased names) and body.
struct RawAnswer {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl RawAnswer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Reads one response (head, then a `Content-Length` body) off `stream`.
async fn read_raw_answer(stream: &mut tokio::net::TcpStream) -> std::io::Result<RawAnswer> {
    use tokio::io::AsyncReadExt;
    let bad = |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_string());
    let mut buf = Vec::new();
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let mut chunk = [0u8; 4096];
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(bad("connection closed before a whole response head"));
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| bad("no status line"))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let len: usize = headers
        .iter()
        .find(|(k, _)| k == "content-length")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    let mut body = buf[head_end..].to_vec();
    while body.len() < len {
        let mut chunk = [0u8; 4096];
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(bad("connection closed inside a response body"));
        }
        body.extend_from_slice(&chunk[..n]);
    }
    body.truncate(len);
    Ok(RawAnswer {
        status,
        headers,
        body,
    })
}

/// Writes a whole PUT of `len` bytes (with `Content-Length`, or chunked) before reading
/// anything, as the simplest clients do, then reads the answer.
async fn raw_put(
    stream: &mut tokio::net::TcpStream,
    path: &str,
    len: usize,
    chunked: bool,
) -> std::io::Result<RawAnswer> {
    use tokio::io::AsyncWriteExt;
    let framing = if chunked {
        "Transfer-Encoding: chunked".to_string()
    } else {
        format!("Content-Length: {len}")
    };
    let head = format!("PUT {path} HTTP/1.1\r\nHost: registry\r\n{framing}\r\n\r\n");
    stream.write_all(head.as_bytes()).await?;
    let block = vec![b'x'; 64 * 1024];
    let mut left = len;
    while left > 0 {
        let n = left.min(block.len());
        if chunked {
            stream.write_all(format!("{n:x}\r\n").as_bytes()).await?;
            stream.write_all(&block[..n]).await?;
            stream.write_all(b"\r\n").await?;
        } else {
            stream.write_all(&block[..n]).await?;
        }
        left -= n;
    }
    if chunked {
        stream.write_all(b"0\r\n\r\n").await?;
    }
    read_raw_answer(stream).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_concurrent_oversized_puts_each_get_a_413_and_never_a_reset() {
    within(async {
        let reg = start();
        let addr = reg.addr();
        const MIB: usize = 1024 * 1024;
        // Just over the limit, far over it (more than the registry reads before it stops
        // and closes), and chunked (no length to judge by).
        let mut cases = Vec::new();
        cases.extend((0..32).map(|i| (format!("/v1/kv/big/{i}"), MIB, false)));
        cases.extend((0..8).map(|i| (format!("/v1/kv/huge/{i}"), 24 * MIB, false)));
        cases.extend((0..8).map(|i| (format!("/v1/kv/chunked/{i}"), 2 * MIB, true)));
        let mut tasks = tokio::task::JoinSet::new();
        for (path, len, chunked) in cases {
            tasks.spawn(async move {
                let mut stream = tokio::net::TcpStream::connect(addr).await?;
                let answer = raw_put(&mut stream, &path, len, chunked).await?;
                Ok::<_, std::io::Error>((path, answer))
            });
        }
        let mut refused = 0;
        while let Some(joined) = tasks.join_next().await {
            let (path, answer) = joined
                .unwrap()
                .unwrap_or_else(|e| panic!("an oversized PUT got no answer: {e}"));
            assert_eq!(answer.status, 413, "{path}");
            let body = String::from_utf8_lossy(&answer.body);
            assert!(body.starts_with("Request body("), "{path}: {body}");
            assert!(
                body.contains("too large, max size: 524288 bytes."),
                "{path}: {body}"
            );
            refused += 1;
        }
        assert_eq!(refused, 48);
        let stored = reg
            .kv_get("big/0")
            .or(reg.kv_get("huge/0"))
            .or(reg.kv_get("chunked/0"));
        assert!(stored.is_none(), "a refused value was stored");
        // The registry still serves a good request on a fresh connection.
        let ok = put(&reg, "/v1/kv/small", "fine").await;
        assert_eq!(ok.status, 200);
        assert_eq!(reg.kv_get("small").as_deref(), Some(&b"fine"[..]));
    })
    .await
}

#[tokio::test]
async fn a_refused_body_the_registry_read_to_its_end_leaves_the_connection_usable() {
    within(async {
        let reg = start();
        let mut stream = tokio::net::TcpStream::connect(reg.addr()).await.unwrap();
        let refused = raw_put(&mut stream, "/v1/kv/big", 600 * 1024, false)
            .await
            .unwrap();
        assert_eq!(refused.status, 413);
        assert_ne!(refused.header("connection"), Some("close"));
        let ok = raw_put(&mut stream, "/v1/kv/next", 5, false).await.unwrap();
        assert_eq!(ok.status, 200);
        assert_eq!(reg.kv_get("next").as_deref(), Some(&b"xxxxx"[..]));
    })
    .await
}

#[tokio::test]
async fn an_oversized_put_that_expects_100_continue_is_refused_before_its_body_is_sent() {
    use tokio::io::AsyncWriteExt;
    within(async {
        let reg = start();
        let mut stream = tokio::net::TcpStream::connect(reg.addr()).await.unwrap();
        let head = format!(
            "PUT /v1/kv/big HTTP/1.1\r\nHost: registry\r\nContent-Length: {}\r\nExpect: 100-continue\r\n\r\n",
            8 * 1024 * 1024
        );
        stream.write_all(head.as_bytes()).await.unwrap();
        let answer = read_raw_answer(&mut stream).await.unwrap();
        assert_eq!(answer.status, 413, "no 100 Continue first: the body is not wanted");
        assert!(String::from_utf8_lossy(&answer.body)
            .starts_with("Request body(8388608 bytes) too large, max size: 524288 bytes."));
        assert!(reg.kv_get("big").is_none());
    })
    .await
}

#[tokio::test]
async fn concurrent_cas_writers_have_exactly_one_winner() {
    within(async {
        let reg = start();
        put(&reg, "/v1/kv/lock", "0").await;
        let idx = get(&reg, "/v1/kv/lock").await.index();
        let url = reg.url();
        let tasks: Vec<_> = (0..20)
            .map(|i| {
                let url = url.clone();
                tokio::spawn(async move {
                    send(
                        client()
                            .put(format!("{url}/v1/kv/lock?cas={idx}"))
                            .body(format!("{i}")),
                    )
                    .await
                    .body
                })
            })
            .collect();
        let mut wins = 0;
        for t in tasks {
            if t.await.unwrap() == "true" {
                wins += 1;
            }
        }
        assert_eq!(wins, 1);
        // cas=0 creates only when absent.
        assert_eq!(put(&reg, "/v1/kv/lock?cas=0", "x").await.body, "false");
        assert_eq!(put(&reg, "/v1/kv/fresh?cas=0", "x").await.body, "true");
    })
    .await
}

#[tokio::test]
async fn deletes_honour_recurse_and_cas() {
    within(async {
        let reg = start();
        for k in ["d/a", "d/b", "dz"] {
            put(&reg, &format!("/v1/kv/{k}"), "1").await;
        }
        let m = get(&reg, "/v1/kv/dz").await.index();
        assert_eq!(
            delete(&reg, &format!("/v1/kv/dz?cas={}", m + 100))
                .await
                .body,
            "false"
        );
        assert_eq!(delete(&reg, "/v1/kv/dz?cas=0").await.body, "false");
        assert_eq!(
            delete(&reg, &format!("/v1/kv/dz?cas={m}")).await.body,
            "true"
        );
        assert_eq!(get(&reg, "/v1/kv/dz").await.status, 404);
        assert_eq!(delete(&reg, "/v1/kv/d/?recurse").await.body, "true");
        assert_eq!(get(&reg, "/v1/kv/d/?recurse").await.status, 404);
        assert_eq!(delete(&reg, "/v1/kv/never").await.body, "true");
        assert_eq!(delete(&reg, "/v1/kv/").await.status, 400);
    })
    .await
}

#[tokio::test]
async fn conflicting_and_unparseable_flags_are_rejected() {
    within(async {
        let reg = start();
        let a = put(&reg, "/v1/kv/k?cas=0&acquire=abc", "x").await;
        assert_eq!(a.status, 400);
        assert!(a.body.starts_with("Conflicting flags: "), "{}", a.body);
        assert_eq!(delete(&reg, "/v1/kv/k?recurse&cas=1").await.status, 400);
        assert_eq!(put(&reg, "/v1/kv/k?flags=nope", "x").await.status, 500);
        assert!(put(&reg, "/v1/kv/k?acquire=no-such-session", "x")
            .await
            .body
            .contains("invalid session"));
    })
    .await
}

#[tokio::test]
async fn a_delete_under_a_prefix_raises_its_index_and_wakes_recursive_watchers() {
    within(async {
        let reg = start();
        put(&reg, "/v1/kv/p/a", "1").await;
        put(&reg, "/v1/kv/p/b", "2").await;
        let idx = get(&reg, "/v1/kv/p/?recurse").await.index();
        let url = format!("{}/v1/kv/p/?recurse&index={idx}&wait=10s", reg.url());
        let waiter = tokio::spawn(async move { send(client().get(url)).await });
        tokio::time::sleep(Duration::from_millis(100)).await;
        delete(&reg, "/v1/kv/p/a").await;
        let a = waiter.await.unwrap();
        assert!(a.index() > idx);
        assert_eq!(a.json().as_array().unwrap().len(), 1);
    })
    .await
}

// === blocking ===

#[tokio::test]
async fn a_blocking_read_that_times_out_returns_200_and_the_same_index() {
    within(async {
        let reg = start();
        put(&reg, "/v1/kv/t", "1").await;
        let idx = get(&reg, "/v1/kv/t").await.index();
        let t0 = Instant::now();
        let a = get(&reg, &format!("/v1/kv/t?index={idx}&wait=200ms")).await;
        assert!(t0.elapsed() >= Duration::from_millis(200));
        assert!(t0.elapsed() < Duration::from_secs(3));
        assert_eq!(a.status, 200);
        assert_eq!(a.index(), idx);
        let svc = get(&reg, "/v1/catalog/services").await.index();
        let t0 = Instant::now();
        let a = get(
            &reg,
            &format!("/v1/catalog/services?index={svc}&wait=150ms"),
        )
        .await;
        assert_eq!(a.index(), svc);
        assert!(t0.elapsed() >= Duration::from_millis(150));
    })
    .await
}

#[tokio::test]
async fn an_index_lower_than_the_current_one_answers_at_once() {
    within(async {
        let reg = start();
        put(&reg, "/v1/kv/t", "1").await;
        let idx = get(&reg, "/v1/kv/t").await.index();
        let t0 = Instant::now();
        let a = get(&reg, &format!("/v1/kv/t?index={}&wait=5s", idx - 1)).await;
        assert_eq!(a.index(), idx);
        assert!(t0.elapsed() < Duration::from_secs(2));
    })
    .await
}

#[tokio::test]
async fn bad_index_wait_and_passing_values_are_400() {
    within(async {
        let reg = start();
        let a = get(&reg, "/v1/kv/x?index=abc").await;
        assert_eq!((a.status.as_u16(), a.body.as_str()), (400, "Invalid index"));
        let a = get(&reg, "/v1/catalog/services?index=1&wait=10").await;
        assert_eq!(
            (a.status.as_u16(), a.body.as_str()),
            (400, "Invalid wait time")
        );
        let a = get(&reg, "/v1/health/service/web?passing=maybe").await;
        assert_eq!(
            (a.status.as_u16(), a.body.as_str()),
            (400, "Invalid value for ?passing")
        );
        let a = get(&reg, "/v1/catalog/services?stale&consistent").await;
        assert_eq!(a.status, 400);
        assert!(a.body.starts_with("Cannot specify ?stale with ?consistent"));
        let a = get(&reg, "/v1/catalog/services?cached&consistent").await;
        assert!(a
            .body
            .starts_with("Cannot specify ?cached with ?consistent"));
        let a = get(&reg, "/v1/catalog/services?stale").await;
        assert_eq!(a.headers["x-consul-effective-consistency"], "stale");
        let a = get(&reg, "/v1/catalog/services?cached").await;
        assert_eq!(a.headers["x-cache"], "MISS");
        assert_eq!(
            get(&reg, "/v1/catalog/services?dc=elsewhere").await.body,
            "No path to datacenter"
        );
    })
    .await
}

#[tokio::test]
async fn one_write_wakes_all_hundred_watchers_and_unrelated_writes_wake_none() {
    within(async {
        let reg = start();
        reg.register_service("web", "web-1", "127.0.0.1", 8080)
            .unwrap();
        put(&reg, "/v1/kv/cfg/web", "1").await;
        let h = get(&reg, "/v1/health/service/web").await.index();
        let k = get(&reg, "/v1/kv/cfg/?recurse").await.index();
        let c = client();
        let mut waiters = Vec::new();
        for i in 0..100 {
            let url = if i % 2 == 0 {
                format!("{}/v1/health/service/web?index={h}&wait=30s", reg.url())
            } else {
                format!("{}/v1/kv/cfg/?recurse&index={k}&wait=30s", reg.url())
            };
            let c = c.clone();
            waiters.push(tokio::spawn(async move { send(c.get(url)).await }));
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        // Writes to another service, another KV prefix and a sibling key wake nobody.
        reg.register_service("db", "db-1", "127.0.0.1", 5432)
            .unwrap();
        put(&reg, "/v1/kv/cfh", "1").await;
        put(&reg, "/v1/kv/other/x", "1").await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            waiters.iter().all(|w| !w.is_finished()),
            "an unrelated write woke a watcher"
        );
        // One write per watched thing wakes each of its watchers.
        reg.set_check_status("service:web-1", CheckStatus::Critical)
            .unwrap();
        put(&reg, "/v1/kv/cfg/web", "2").await;
        for (i, w) in waiters.into_iter().enumerate() {
            let a = w.await.unwrap();
            assert_eq!(a.status, 200);
            assert!(a.index() > if i % 2 == 0 { h } else { k });
        }
    })
    .await
}

// === catalog and health ===

#[tokio::test]
async fn catalog_registration_shows_in_services_service_and_nodes() {
    within(async {
        let reg = start();
        let r = put_json(&reg, "/v1/catalog/register", json!({
            "Node": "ext-1", "Address": "10.0.0.5", "NodeMeta": {"rack": "r1"},
            "Service": {"Service": "api", "Tags": ["v1", "http"], "Port": 9000, "Meta": {"version": "1"}},
            "Check": {"Name": "api alive", "Status": "passing", "ServiceID": "api"}
        }))
        .await;
        assert_eq!((r.status.as_u16(), r.body.as_str()), (200, "true"));
        put_json(&reg, "/v1/catalog/register", json!({
            "Node": "ext-2", "Address": "10.0.0.6",
            "Service": {"ID": "api-2", "Service": "api", "Tags": ["v2", "http"], "Port": 9000}
        }))
        .await;
        let services = get(&reg, "/v1/catalog/services").await;
        let v = services.json();
        assert_eq!(v["api"], json!(["v1", "http", "v2"]));
        assert_eq!(v["consul"], json!([]));
        let svc = get(&reg, "/v1/catalog/service/api").await.json();
        assert_eq!(svc.as_array().unwrap().len(), 2);
        assert_eq!(svc[0]["Node"], "ext-1");
        assert_eq!(svc[0]["Address"], "10.0.0.5");
        assert_eq!(svc[0]["ServiceID"], "api");
        assert_eq!(svc[0]["ServiceAddress"], "");
        assert_eq!(svc[0]["ServicePort"], 9000);
        assert_eq!(svc[0]["ServiceWeights"], json!({"Passing": 1, "Warning": 1}));
        assert_eq!(svc[0]["NodeMeta"], json!({"rack": "r1"}));
        let tagged = get(&reg, "/v1/catalog/service/api?tag=v2&tag=http").await.json();
        assert_eq!(tagged.as_array().unwrap().len(), 1);
        assert_eq!(get(&reg, "/v1/catalog/service/nope").await.json(), json!([]));
        assert_eq!(get(&reg, "/v1/catalog/service/").await.body, "Missing service name");
        let nodes = get(&reg, "/v1/catalog/nodes").await.json();
        let names: Vec<&str> = nodes.as_array().unwrap().iter().map(|n| n["Node"].as_str().unwrap()).collect();
        assert_eq!(names, ["ext-1", "ext-2", "switchyard-dev"]);
        // Deregistering a service, then the node.
        let d = put_json(&reg, "/v1/catalog/deregister", json!({"Node": "ext-2", "ServiceID": "api-2"})).await;
        assert_eq!(d.body, "true");
        assert_eq!(get(&reg, "/v1/catalog/service/api").await.json().as_array().unwrap().len(), 1);
        put_json(&reg, "/v1/catalog/deregister", json!({"Node": "ext-1"})).await;
        assert!(get(&reg, "/v1/catalog/services").await.json().get("api").is_none());
        assert_eq!(put(&reg, "/v1/catalog/register", "{nope").await.status, 400);
    })
    .await
}

#[tokio::test]
async fn catalog_services_index_ignores_check_changes() {
    within(async {
        let reg = start();
        reg.register_service("web", "web-1", "127.0.0.1", 80)
            .unwrap();
        let i = get(&reg, "/v1/catalog/services").await.index();
        reg.set_check_status("service:web-1", CheckStatus::Warning)
            .unwrap();
        assert_eq!(get(&reg, "/v1/catalog/services").await.index(), i);
        assert!(get(&reg, "/v1/health/service/web").await.index() > i);
    })
    .await
}

#[tokio::test]
async fn health_service_entries_carry_node_service_and_checks_including_serf_health() {
    within(async {
        let reg = start();
        reg.register_service_json(json!({
            "Name": "web", "ID": "web-1", "Tags": ["v2"], "Port": 8080,
            "Meta": {"version": "2"}, "Weights": {"Passing": 10, "Warning": 1},
            "Check": {"TTL": "30s", "Status": "passing"}
        }))
        .unwrap();
        let v = get(&reg, "/v1/health/service/web").await.json();
        let e = &v[0];
        assert_eq!(e["Node"]["Node"], "switchyard-dev");
        assert_eq!(e["Node"]["Address"], "127.0.0.1");
        assert_eq!(e["Node"]["Datacenter"], "dc1");
        assert_eq!(e["Service"]["ID"], "web-1");
        assert_eq!(e["Service"]["Service"], "web");
        assert_eq!(e["Service"]["Address"], "");
        assert_eq!(
            e["Service"]["Weights"],
            json!({"Passing": 10, "Warning": 1})
        );
        assert_eq!(e["Service"]["Meta"], json!({"version": "2"}));
        let checks = e["Checks"].as_array().unwrap();
        let ids: Vec<&str> = checks
            .iter()
            .map(|c| c["CheckID"].as_str().unwrap())
            .collect();
        assert_eq!(ids, ["serfHealth", "service:web-1"]);
        assert_eq!(checks[0]["Status"], "passing");
        assert_eq!(checks[0]["ServiceTags"], json!([]));
        assert_eq!(checks[1]["Type"], "ttl");
        assert_eq!(checks[1]["Name"], "Service 'web' check");
        assert_eq!(checks[1]["ServiceTags"], json!(["v2"]));
        assert_eq!(get(&reg, "/v1/health/service/none").await.json(), json!([]));
    })
    .await
}

#[tokio::test]
async fn passing_filters_out_warning_and_critical_and_tags_combine_with_and() {
    within(async {
        let reg = start();
        for (id, tags) in [("w1", json!(["a", "b"])), ("w2", json!(["a"])), ("w3", json!(["a", "b"]))] {
            reg.register_service_json(json!({"Name": "web", "ID": id, "Tags": tags, "Check": {"TTL": "1h", "Status": "passing"}}))
                .unwrap();
        }
        reg.set_check_status("service:w3", CheckStatus::Warning).unwrap();
        let count = |v: Value| v.as_array().unwrap().len();
        assert_eq!(count(get(&reg, "/v1/health/service/web").await.json()), 3);
        for p in ["passing", "passing=", "passing=1", "passing=true", "passing=t"] {
            assert_eq!(count(get(&reg, &format!("/v1/health/service/web?{p}")).await.json()), 2, "{p}");
        }
        assert_eq!(count(get(&reg, "/v1/health/service/web?passing=false").await.json()), 3);
        assert_eq!(count(get(&reg, "/v1/health/service/web?tag=a&tag=b").await.json()), 2);
        assert_eq!(count(get(&reg, "/v1/health/service/web?tag=a&tag=b&passing").await.json()), 1);
        // The passing filter does not change the index.
        let a = get(&reg, "/v1/health/service/web").await.index();
        assert_eq!(get(&reg, "/v1/health/service/web?passing").await.index(), a);
    })
    .await
}

#[tokio::test]
async fn health_state_and_checks_list_checks() {
    within(async {
        let reg = start();
        reg.register_service("web", "web-1", "127.0.0.1", 80)
            .unwrap();
        reg.set_check_status("service:web-1", CheckStatus::Critical)
            .unwrap();
        let crit = get(&reg, "/v1/health/state/critical").await.json();
        assert_eq!(crit.as_array().unwrap().len(), 1);
        assert_eq!(crit[0]["CheckID"], "service:web-1");
        let any = get(&reg, "/v1/health/state/any").await.json();
        assert_eq!(any.as_array().unwrap().len(), 2);
        assert_eq!(get(&reg, "/v1/health/state/purple").await.status, 400);
        let checks = get(&reg, "/v1/health/checks/web").await.json();
        assert_eq!(checks.as_array().unwrap().len(), 1);
        assert_eq!(checks[0]["ServiceName"], "web");
    })
    .await
}

#[tokio::test]
async fn a_health_watch_on_a_service_that_does_not_exist_yet_wakes_when_it_appears() {
    within(async {
        let reg = start();
        let a = get(&reg, "/v1/health/service/later").await;
        assert_eq!(a.json(), json!([]));
        let idx = a.index();
        let url = format!("{}/v1/health/service/later?index={idx}&wait=10s", reg.url());
        let waiter = tokio::spawn(async move { send(client().get(url)).await });
        tokio::time::sleep(Duration::from_millis(100)).await;
        reg.register_service("later", "later-1", "127.0.0.1", 1)
            .unwrap();
        let a = waiter.await.unwrap();
        assert_eq!(a.json().as_array().unwrap().len(), 1);
    })
    .await
}

// === agent ===

#[tokio::test]
async fn agent_registration_starts_critical_and_ttl_updates_move_the_check() {
    within(async {
        let reg = start();
        let r = put_json(
            &reg,
            "/v1/agent/service/register",
            json!({
                "Name": "web", "ID": "web-1", "Port": 80, "Check": {"TTL": "10s"}
            }),
        )
        .await;
        assert_eq!(r.status, 200);
        assert_eq!(
            check_status(&reg, "service:web-1").await.as_deref(),
            Some("critical")
        );
        assert_eq!(
            put(&reg, "/v1/agent/check/pass/service:web-1?note=ok", "")
                .await
                .status,
            200
        );
        let checks = get(&reg, "/v1/agent/checks").await.json();
        assert_eq!(checks["service:web-1"]["Status"], "passing");
        assert_eq!(checks["service:web-1"]["Output"], "ok");
        put(&reg, "/v1/agent/check/warn/service:web-1", "").await;
        assert_eq!(
            check_status(&reg, "service:web-1").await.as_deref(),
            Some("warning")
        );
        put(&reg, "/v1/agent/check/fail/service:web-1", "").await;
        assert_eq!(
            check_status(&reg, "service:web-1").await.as_deref(),
            Some("critical")
        );
        let u = put_json(
            &reg,
            "/v1/agent/check/update/service:web-1",
            json!({"Status": "passing", "Output": "fine"}),
        )
        .await;
        assert_eq!(u.status, 200);
        assert_eq!(
            check_status(&reg, "service:web-1").await.as_deref(),
            Some("passing")
        );
        let bad = put_json(
            &reg,
            "/v1/agent/check/update/service:web-1",
            json!({"Status": "green"}),
        )
        .await;
        assert_eq!(bad.status, 400);
        let unknown = put(&reg, "/v1/agent/check/pass/nope", "").await;
        assert_eq!(unknown.status, 500);
        assert_eq!(
            unknown.body,
            "CheckID \"nope\" does not have associated TTL"
        );
        let services = get(&reg, "/v1/agent/services").await.json();
        assert_eq!(services["web-1"]["Service"], "web");
        assert_eq!(services["web-1"]["Datacenter"], "dc1");
        assert!(services.get("consul").is_none());
        let one = get(&reg, "/v1/agent/service/web-1").await;
        assert_eq!(one.json()["ID"], "web-1");
        assert!(one.headers.contains_key("x-consul-contenthash"));
        assert_eq!(get(&reg, "/v1/agent/service/nope").await.status, 404);
        assert_eq!(
            put(&reg, "/v1/agent/service/deregister/web-1", "")
                .await
                .status,
            200
        );
        assert_eq!(get(&reg, "/v1/agent/services").await.json(), json!({}));
        assert_eq!(get(&reg, "/v1/agent/checks").await.json(), json!({}));
        assert_eq!(
            put(&reg, "/v1/agent/service/deregister/never", "")
                .await
                .status,
            200
        );
    })
    .await
}

#[tokio::test]
async fn agent_service_blocks_on_its_content_hash() {
    within(async {
        let reg = start();
        reg.register_service("web", "web-1", "127.0.0.1", 80)
            .unwrap();
        let a = get(&reg, "/v1/agent/service/web-1").await;
        let hash = a.headers["x-consul-contenthash"]
            .to_str()
            .unwrap()
            .to_string();
        assert_eq!(a.json()["ContentHash"], hash.as_str());
        let t0 = Instant::now();
        let same = get(
            &reg,
            &format!("/v1/agent/service/web-1?hash={hash}&wait=200ms"),
        )
        .await;
        assert!(t0.elapsed() >= Duration::from_millis(200));
        assert_eq!(same.headers["x-consul-contenthash"], hash.as_str());
        let url = format!("{}/v1/agent/service/web-1?hash={hash}&wait=10s", reg.url());
        let waiter = tokio::spawn(async move { send(client().get(url)).await });
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!waiter.is_finished());
        reg.register_service("web", "web-1", "127.0.0.1", 81)
            .unwrap();
        let changed = waiter.await.unwrap();
        assert_ne!(changed.headers["x-consul-contenthash"], hash.as_str());
        assert_eq!(changed.json()["Port"], 81);
    })
    .await
}

#[tokio::test]
async fn writes_ignore_blocking_and_consistency_parameters() {
    within(async {
        let reg = start();
        assert_eq!(
            put(&reg, "/v1/kv/w?index=abc&stale&consistent", "v")
                .await
                .body,
            "true"
        );
    })
    .await
}

#[tokio::test]
async fn several_checks_get_numbered_ids_and_an_unnamed_service_is_rejected() {
    within(async {
        let reg = start();
        put_json(&reg, "/v1/agent/service/register", json!({
            "name": "web", "id": "w", "checks": [{"ttl": "10s"}, {"TTL": "10s", "Status": "passing"}]
        }))
        .await;
        let checks = get(&reg, "/v1/agent/checks").await.json();
        assert_eq!(checks["service:w:1"]["Status"], "critical");
        assert_eq!(checks["service:w:2"]["Status"], "passing");
        let r = put_json(&reg, "/v1/agent/service/register", json!({"Port": 1})).await;
        assert_eq!((r.status.as_u16(), r.body.as_str()), (400, "Missing service name"));
        let r = put_json(&reg, "/v1/agent/service/register", json!({"Name": "x", "Check": {"GRPC": "127.0.0.1:1", "Interval": "1s"}})).await;
        assert_eq!(r.status, 400);
    })
    .await
}

#[tokio::test]
async fn agent_check_register_and_deregister() {
    within(async {
        let reg = start();
        reg.register_service("web", "web-1", "127.0.0.1", 80)
            .unwrap();
        let r = put_json(
            &reg,
            "/v1/agent/check/register",
            json!({
                "Name": "extra", "ServiceID": "web-1", "TTL": "5s", "Status": "warning"
            }),
        )
        .await;
        assert_eq!(r.status, 200);
        let checks = get(&reg, "/v1/agent/checks").await.json();
        assert_eq!(checks["extra"]["ServiceName"], "web");
        assert_eq!(checks["extra"]["Status"], "warning");
        assert_eq!(
            put(&reg, "/v1/agent/check/deregister/extra", "")
                .await
                .status,
            200
        );
        assert!(get(&reg, "/v1/agent/checks")
            .await
            .json()
            .get("extra")
            .is_none());
        let r = put_json(
            &reg,
            "/v1/agent/check/register",
            json!({"Name": "x", "ServiceID": "ghost", "TTL": "5s"}),
        )
        .await;
        assert_eq!(r.status, 400);
    })
    .await
}

#[tokio::test]
async fn an_expired_ttl_turns_the_check_critical() {
    within(async {
        let reg = start();
        put_json(
            &reg,
            "/v1/agent/service/register",
            json!({
                "Name": "web", "ID": "web-1", "Check": {"TTL": "300ms", "Status": "passing"}
            }),
        )
        .await;
        assert_eq!(
            check_status(&reg, "service:web-1").await.as_deref(),
            Some("passing")
        );
        let expired = eventually(Duration::from_secs(5), || async {
            check_status(&reg, "service:web-1").await.as_deref() == Some("critical")
        })
        .await;
        assert!(expired);
        let out = get(&reg, "/v1/agent/checks").await.json()["service:web-1"]["Output"].clone();
        assert!(out.as_str().unwrap().starts_with("TTL expired"));
        // A pass resets the clock.
        put(&reg, "/v1/agent/check/pass/service:web-1", "").await;
        assert_eq!(
            check_status(&reg, "service:web-1").await.as_deref(),
            Some("passing")
        );
    })
    .await
}

/// A tiny HTTP target answering `status` to everything; abort the task to kill it.
async fn http_target(status: u16) -> (String, tokio::task::JoinHandle<()>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut buf = [0u8; 2048];
                let _ = s.read(&mut buf).await;
                let resp = format!(
                    "HTTP/1.1 {status} X\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
                );
                let _ = s.write_all(resp.as_bytes()).await;
            });
        }
    });
    (format!("http://{addr}/health"), task)
}

#[tokio::test]
async fn an_http_check_flips_to_critical_when_its_target_dies() {
    within(async {
        let reg = start();
        let (url, target) = http_target(200).await;
        put_json(&reg, "/v1/agent/service/register", json!({
            "Name": "web", "ID": "web-1", "Check": {"HTTP": url, "Interval": "200ms", "Timeout": "1s"}
        }))
        .await;
        assert!(eventually(Duration::from_secs(5), || async {
            check_status(&reg, "service:web-1").await.as_deref() == Some("passing")
        })
        .await);
        let c = get(&reg, "/v1/agent/checks").await.json()["service:web-1"].clone();
        assert_eq!(c["Type"], "http");
        assert_eq!(c["Interval"], "200ms");
        assert!(c["Output"].as_str().unwrap().contains("200"));
        target.abort();
        let _ = target.await;
        assert!(eventually(Duration::from_secs(5), || async {
            check_status(&reg, "service:web-1").await.as_deref() == Some("critical")
        })
        .await);
    })
    .await
}

#[tokio::test]
async fn an_http_429_is_a_warning_and_a_500_is_critical() {
    within(async {
        let reg = start();
        let (warn_url, _t1) = http_target(429).await;
        let (crit_url, _t2) = http_target(500).await;
        put_json(
            &reg,
            "/v1/agent/service/register",
            json!({
                "Name": "web", "ID": "w", "Checks": [
                    {"CheckID": "warn", "HTTP": warn_url, "Interval": "100ms", "Status": "passing"},
                    {"CheckID": "crit", "HTTP": crit_url, "Interval": "100ms", "Status": "passing"}
                ]
            }),
        )
        .await;
        assert!(
            eventually(Duration::from_secs(5), || async {
                check_status(&reg, "warn").await.as_deref() == Some("warning")
                    && check_status(&reg, "crit").await.as_deref() == Some("critical")
            })
            .await
        );
    })
    .await
}

#[tokio::test]
async fn a_tcp_check_follows_its_target() {
    within(async {
        let reg = start();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        put_json(
            &reg,
            "/v1/agent/service/register",
            json!({
                "Name": "db", "ID": "db-1", "Check": {"TCP": addr.to_string(), "Interval": "100ms"}
            }),
        )
        .await;
        assert!(
            eventually(Duration::from_secs(5), || async {
                check_status(&reg, "service:db-1").await.as_deref() == Some("passing")
            })
            .await
        );
        drop(listener);
        assert!(
            eventually(Duration::from_secs(5), || async {
                check_status(&reg, "service:db-1").await.as_deref() == Some("critical")
            })
            .await
        );
    })
    .await
}

#[tokio::test]
async fn a_service_critical_longer_than_deregister_after_is_reaped() {
    within(async {
        let reg = start();
        put_json(&reg, "/v1/agent/service/register", json!({
            "Name": "doomed", "ID": "d1", "Check": {"TTL": "10m", "DeregisterCriticalServiceAfter": "300ms"}
        }))
        .await;
        put_json(&reg, "/v1/agent/service/register", json!({
            "Name": "fine", "ID": "f1", "Check": {"TTL": "10m", "Status": "passing", "DeregisterCriticalServiceAfter": "300ms"}
        }))
        .await;
        assert!(eventually(Duration::from_secs(5), || async {
            get(&reg, "/v1/agent/services").await.json().get("d1").is_none()
        })
        .await);
        assert!(get(&reg, "/v1/agent/services").await.json().get("f1").is_some());
        assert_eq!(get(&reg, "/v1/health/service/doomed").await.json(), json!([]));
    })
    .await
}

#[tokio::test]
async fn service_and_node_maintenance_add_critical_checks() {
    within(async {
        let reg = start();
        reg.register_service("web", "web-1", "127.0.0.1", 80)
            .unwrap();
        let passing = |v: Value| v.as_array().unwrap().len();
        assert_eq!(
            passing(get(&reg, "/v1/health/service/web?passing").await.json()),
            1
        );
        let r = put(
            &reg,
            "/v1/agent/service/maintenance/web-1?enable=true&reason=deploying%20v2",
            "",
        )
        .await;
        assert_eq!(r.status, 200);
        let checks = get(&reg, "/v1/agent/checks").await.json();
        let m = &checks["_service_maintenance:web-1"];
        assert_eq!(m["Status"], "critical");
        assert_eq!(m["Notes"], "deploying v2");
        assert_eq!(m["ServiceID"], "web-1");
        assert_eq!(
            passing(get(&reg, "/v1/health/service/web?passing").await.json()),
            0
        );
        // Enabling again keeps the first reason, as Consul does.
        put(
            &reg,
            "/v1/agent/service/maintenance/web-1?enable=true&reason=other",
            "",
        )
        .await;
        let checks = get(&reg, "/v1/agent/checks").await.json();
        assert_eq!(
            checks["_service_maintenance:web-1"]["Notes"],
            "deploying v2"
        );
        put(&reg, "/v1/agent/service/maintenance/web-1?enable=false", "").await;
        assert_eq!(
            passing(get(&reg, "/v1/health/service/web?passing").await.json()),
            1
        );

        put(&reg, "/v1/agent/maintenance?enable=true", "").await;
        let checks = get(&reg, "/v1/agent/checks").await.json();
        assert_eq!(checks["_node_maintenance"]["Status"], "critical");
        let entry = get(&reg, "/v1/health/service/web").await.json();
        assert!(entry[0]["Checks"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["CheckID"] == "_node_maintenance"));
        assert_eq!(
            passing(get(&reg, "/v1/health/service/web?passing").await.json()),
            0
        );
        put(&reg, "/v1/agent/maintenance?enable=false", "").await;
        assert_eq!(
            passing(get(&reg, "/v1/health/service/web?passing").await.json()),
            1
        );

        let r = put(&reg, "/v1/agent/service/maintenance/ghost?enable=true", "").await;
        assert_eq!(
            (r.status.as_u16(), r.body.as_str()),
            (404, "No service registered with ID \"ghost\"")
        );
        let r = put(&reg, "/v1/agent/service/maintenance/web-1", "").await;
        assert_eq!(
            (r.status.as_u16(), r.body.as_str()),
            (400, "Missing value for enable")
        );
        let r = put(&reg, "/v1/agent/service/maintenance/web-1?enable=yes", "").await;
        assert_eq!(
            (r.status.as_u16(), r.body.as_str()),
            (400, "Invalid value for enable: \"yes\"")
        );
    })
    .await
}

#[tokio::test]
async fn agent_self_and_status_describe_the_node() {
    within(async {
        let reg = start();
        let s = get(&reg, "/v1/agent/self").await.json();
        assert_eq!(s["Config"]["Datacenter"], "dc1");
        assert_eq!(s["Config"]["NodeName"], "switchyard-dev");
        assert_eq!(s["Member"]["Name"], "switchyard-dev");
        assert_eq!(s["Member"]["Status"], 1);
        assert_eq!(
            get(&reg, "/v1/status/leader").await.json(),
            json!("127.0.0.1:8300")
        );
        assert_eq!(
            get(&reg, "/v1/status/peers").await.json(),
            json!(["127.0.0.1:8300"])
        );
    })
    .await
}

#[tokio::test]
async fn wrong_methods_are_405_with_allow_and_unknown_paths_are_404() {
    within(async {
        let reg = start();
        let a = send(client().post(format!("{}/v1/kv/x", reg.url()))).await;
        assert_eq!(a.status, 405);
        assert_eq!(a.body, "method POST not allowed");
        assert!(a.headers["allow"].to_str().unwrap().contains("PUT"));
        let a = get(&reg, "/v1/agent/service/register").await;
        assert_eq!(a.status, 405);
        let a = get(&reg, "/v1/nope").await;
        assert_eq!((a.status.as_u16(), a.body.as_str()), (404, ""));
    })
    .await
}

// === ACL ===

#[tokio::test]
async fn with_a_token_requests_without_it_are_denied() {
    within(async {
        let reg = start_with(RegistryOptions {
            token: Some("s3cret".into()),
            ..RegistryOptions::for_tests()
        });
        let a = get(&reg, "/v1/kv/x").await;
        assert_eq!(a.status, 403);
        assert!(a.body.starts_with("Permission denied"));
        assert_eq!(a.headers["x-consul-default-acl-policy"], "deny");
        assert_eq!(get(&reg, "/v1/kv/x?token=wrong").await.status, 403);
        assert_eq!(get(&reg, "/v1/kv/x?token=s3cret").await.status, 404);
        let h = send(
            client()
                .get(format!("{}/v1/catalog/services", reg.url()))
                .header("X-Consul-Token", "s3cret"),
        )
        .await;
        assert_eq!(h.status, 200);
        let b = send(
            client()
                .get(format!("{}/v1/catalog/services", reg.url()))
                .bearer_auth("s3cret"),
        )
        .await;
        assert_eq!(b.status, 200);
        let w = send(client().put(format!("{}/v1/kv/x", reg.url())).body("v")).await;
        assert_eq!(w.status, 403);
        assert!(reg.kv_get("x").is_none());
        assert_eq!(get(&reg, "/v1/status/leader").await.status, 200);
    })
    .await
}

// === datacenters (WAN federation) ===

/// Two registries federated over the WAN: `dc1` and `dc2`, each knowing the other.
fn federation(opts: RegistryOptions) -> (Registry, Registry) {
    let dc1 = start_with(RegistryOptions {
        datacenter: "dc1".into(),
        ..opts.clone()
    });
    let dc2 = start_with(RegistryOptions {
        datacenter: "dc2".into(),
        wan_peers: vec![("dc1".into(), dc1.url())],
        ..opts
    });
    dc1.join_wan("dc2", &dc2.url()).unwrap();
    (dc1, dc2)
}

#[tokio::test]
async fn a_query_for_a_peer_datacenter_is_answered_by_that_peer_with_its_index_headers() {
    within(async {
        let (dc1, dc2) = federation(RegistryOptions::for_tests());
        dc1.register_service("web", "web-1", "10.1.0.1", 8080)
            .unwrap();
        dc2.kv_put("only/in/dc2", "x").unwrap();
        dc2.kv_put("more/in/dc2", "y").unwrap();
        let direct = get(&dc1, "/v1/health/service/web").await;
        let via = get(&dc2, "/v1/health/service/web?dc=dc1").await;
        assert_eq!(via.status, 200);
        assert_eq!(via.json(), direct.json());
        assert_eq!(via.json()[0]["Node"]["Datacenter"], "dc1");
        assert_eq!(via.index(), direct.index(), "the peer's index, not dc2's");
        assert_ne!(
            via.index(),
            get(&dc2, "/v1/health/service/web").await.index()
        );
        assert_eq!(via.headers["x-consul-knownleader"], "true");
        assert_eq!(via.headers["x-consul-lastcontact"], "0");
        assert_eq!(via.headers["x-consul-effective-consistency"], "leader");
        assert_eq!(via.headers["content-type"], "application/json");
        // dc2 answers its own name itself, and so without `dc`.
        for path in ["/v1/health/service/web?dc=dc2", "/v1/health/service/web"] {
            let local = get(&dc2, path).await;
            assert_eq!(local.status, 200);
            assert_eq!(local.json(), json!([]), "{path}");
        }
        // A KV miss stays a 404 with the peer's index headers.
        let miss = get(&dc1, "/v1/kv/only/in/dc2?dc=dc1").await;
        assert_eq!(miss.status, 404);
        let via_miss = get(&dc2, "/v1/kv/only/in/dc2?dc=dc1").await;
        assert_eq!(via_miss.status, 404);
        assert_eq!(via_miss.index(), miss.index());
        assert_eq!(via_miss.body, "");
        // Raw reads keep the peer's content type.
        dc1.kv_put("raw/key", "plain bytes").unwrap();
        let raw = get(&dc2, "/v1/kv/raw/key?dc=dc1&raw").await;
        assert_eq!(raw.body, "plain bytes");
        assert_eq!(raw.headers["content-type"], "text/plain");
        assert_eq!(raw.headers["x-content-type-options"], "nosniff");
        // Status endpoints take `dc` too.
        assert_eq!(get(&dc2, "/v1/status/leader?dc=dc1").await.status, 200);
    })
    .await
}

#[tokio::test]
async fn a_blocking_query_for_a_peer_datacenter_blocks_at_the_peer_until_its_index_moves() {
    within(async {
        let (dc1, dc2) = federation(RegistryOptions::for_tests());
        dc1.register_service("web", "web-1", "10.1.0.1", 8080)
            .unwrap();
        let first = get(&dc2, "/v1/health/service/web?dc=dc1").await;
        let index = first.index();
        let url = format!(
            "{}/v1/health/service/web?dc=dc1&index={index}&wait=10s",
            dc2.url()
        );
        let started = Instant::now();
        let blocked = tokio::spawn(async move { send(client().get(url)).await });
        // Writes in dc2 do not wake a query that dc1 holds.
        dc2.register_service("web", "web-2", "10.2.0.1", 8080)
            .unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!blocked.is_finished(), "answered before dc1 changed");
        dc1.set_check_status("service:web-1", CheckStatus::Critical)
            .unwrap();
        let woke = blocked.await.unwrap();
        assert_eq!(woke.status, 200);
        assert!(woke.index() > index, "{} > {index}", woke.index());
        assert_eq!(woke.json()[0]["Checks"][1]["Status"], "critical");
        assert!(started.elapsed() < Duration::from_secs(10));
        // `wait` goes through as well: an unchanged index comes back when it passes.
        let now = woke.index();
        let started = Instant::now();
        let timed_out = get(
            &dc2,
            &format!("/v1/health/service/web?dc=dc1&index={now}&wait=400ms"),
        )
        .await;
        assert_eq!(timed_out.status, 200);
        assert_eq!(timed_out.index(), now);
        assert!(started.elapsed() >= Duration::from_millis(400));
    })
    .await
}

#[tokio::test]
async fn an_unknown_datacenter_is_500_no_path_to_datacenter() {
    within(async {
        let (_dc1, dc2) = federation(RegistryOptions::for_tests());
        for path in [
            "/v1/health/service/web?dc=dc9",
            "/v1/catalog/services?dc=dc9",
            "/v1/kv/x?dc=dc9",
            "/v1/status/leader?dc=dc9",
            // Names are compared exactly, as Consul compares them.
            "/v1/catalog/services?dc=DC1",
        ] {
            let a = get(&dc2, path).await;
            assert_eq!(a.status, 500, "{path}");
            assert_eq!(a.body, "No path to datacenter", "{path}");
        }
        let w = put(&dc2, "/v1/kv/x?dc=dc9", "v").await;
        assert_eq!(
            (w.status.as_u16(), w.body.as_str()),
            (500, "No path to datacenter")
        );
        assert!(dc2.kv_get("x").is_none());
        // The agent's own endpoints and the datacenter list do not take `dc`.
        assert_eq!(get(&dc2, "/v1/agent/services?dc=dc9").await.status, 200);
        assert_eq!(
            get(&dc2, "/v1/agent/self?dc=dc9").await.json()["Config"]["Datacenter"],
            "dc2"
        );
        assert_eq!(
            get(&dc2, "/v1/catalog/datacenters?dc=dc9").await.status,
            200
        );
        // A registration naming an unknown datacenter in its body.
        let r = put_json(
            &dc2,
            "/v1/catalog/register",
            json!({"Datacenter": "dc9", "Node": "n1", "Address": "10.9.0.1"}),
        )
        .await;
        assert_eq!(
            (r.status.as_u16(), r.body.as_str()),
            (500, "No path to datacenter")
        );
    })
    .await
}

#[tokio::test]
async fn catalog_datacenters_lists_its_own_first_then_its_peers_by_name() {
    within(async {
        let (dc1, dc2) = federation(RegistryOptions::for_tests());
        assert_eq!(
            get(&dc1, "/v1/catalog/datacenters").await.json(),
            json!(["dc1", "dc2"])
        );
        assert_eq!(
            get(&dc2, "/v1/catalog/datacenters").await.json(),
            json!(["dc2", "dc1"])
        );
        let solo = start();
        assert_eq!(
            get(&solo, "/v1/catalog/datacenters").await.json(),
            json!(["dc1"])
        );
        let dc3 = start_with(RegistryOptions {
            datacenter: "dc3".into(),
            wan_peers: vec![
                ("eu-west".into(), dc1.url()),
                ("dc4".into(), dc2.url()),
                ("ap-south".into(), dc1.url()),
            ],
            ..RegistryOptions::for_tests()
        });
        assert_eq!(
            get(&dc3, "/v1/catalog/datacenters").await.json(),
            json!(["dc3", "ap-south", "dc4", "eu-west"])
        );
    })
    .await
}

#[tokio::test]
async fn writes_for_a_peer_datacenter_land_in_the_peer() {
    within(async {
        let (dc1, dc2) = federation(RegistryOptions::for_tests());
        let w = put(&dc2, "/v1/kv/app/config?dc=dc1", "from dc2").await;
        assert_eq!((w.status.as_u16(), w.body.as_str()), (200, "true"));
        assert_eq!(dc1.kv_get("app/config").as_deref(), Some(&b"from dc2"[..]));
        assert!(dc2.kv_get("app/config").is_none());
        let read = get(&dc2, "/v1/kv/app/config?dc=dc1").await;
        assert_eq!(read.json()[0]["Value"], "ZnJvbSBkYzI=");
        // cas goes through: a stale cas fails at the peer.
        let stale = put(&dc2, "/v1/kv/app/config?dc=dc1&cas=1", "lost").await;
        assert_eq!(stale.body, "false");
        // A value over the limit is refused (by the peer, in Consul's words).
        let big = put(&dc2, "/v1/kv/big?dc=dc1", vec![b'x'; 512 * 1024 + 1]).await;
        assert_eq!(big.status, 413);
        assert!(big.body.starts_with("Request body(524289 bytes) too large"));
        let d = delete(&dc2, "/v1/kv/app/config?dc=dc1").await;
        assert_eq!(d.status, 200);
        assert!(dc1.kv_get("app/config").is_none());
        // A catalog registration goes where its body's Datacenter says.
        let r = put_json(
            &dc2,
            "/v1/catalog/register",
            json!({"Datacenter": "dc1", "Node": "ext-1", "Address": "10.1.9.9",
                   "Service": {"Service": "legacy", "Port": 9000}}),
        )
        .await;
        assert_eq!((r.status.as_u16(), r.body.as_str()), (200, "true"));
        let there = get(&dc1, "/v1/catalog/service/legacy").await.json();
        assert_eq!(there[0]["Node"], "ext-1");
        assert_eq!(there[0]["Datacenter"], "dc1");
        assert_eq!(
            get(&dc2, "/v1/catalog/service/legacy").await.json(),
            json!([])
        );
        let d = put_json(
            &dc2,
            "/v1/catalog/deregister",
            json!({"Datacenter": "dc1", "Node": "ext-1"}),
        )
        .await;
        assert_eq!(d.status, 200);
        assert_eq!(
            get(&dc1, "/v1/catalog/service/legacy").await.json(),
            json!([])
        );
    })
    .await
}

#[tokio::test]
async fn a_peer_that_is_down_is_500_until_it_comes_back() {
    within(async {
        let (dc1, dc2) = federation(RegistryOptions::for_tests());
        dc1.register_service("web", "web-1", "10.1.0.1", 8080)
            .unwrap();
        dc1.stop().await;
        let down = get(&dc2, "/v1/health/service/web?dc=dc1").await;
        assert_eq!(down.status, 500);
        assert_eq!(down.body, "Remote DC has no server currently reachable");
        // dc2 still serves itself, and still lists dc1.
        assert_eq!(get(&dc2, "/v1/health/service/web").await.status, 200);
        assert_eq!(
            get(&dc2, "/v1/catalog/datacenters").await.json(),
            json!(["dc2", "dc1"])
        );
        dc1.restart().await.unwrap();
        let back = get(&dc2, "/v1/health/service/web?dc=dc1").await;
        assert_eq!(back.status, 200);
        assert_eq!(back.json()[0]["Service"]["ID"], "web-1");
        // The peer's own faults come through as its answers.
        dc1.faults().set_no_leader(true);
        let no_leader = get(&dc2, "/v1/health/service/web?dc=dc1").await;
        assert_eq!(no_leader.status, 500);
        assert!(no_leader.body.contains("No cluster leader"));
        let stale = get(&dc2, "/v1/health/service/web?dc=dc1&stale").await;
        assert_eq!(stale.status, 200);
        assert_eq!(stale.headers["x-consul-knownleader"], "false");
    })
    .await
}

#[tokio::test]
async fn a_peer_url_that_leads_back_ends_in_no_path_instead_of_a_loop() {
    within(async {
        let (dc1, dc2) = federation(RegistryOptions::for_tests());
        // dc2 believes dc3 lives at dc1's address, and dc1 believes dc3 is at dc2's.
        dc2.join_wan("dc3", &dc1.url()).unwrap();
        dc1.join_wan("dc3", &dc2.url()).unwrap();
        let a = get(&dc2, "/v1/catalog/services?dc=dc3").await;
        assert_eq!(
            (a.status.as_u16(), a.body.as_str()),
            (500, "No path to datacenter")
        );
        // A registry named as a peer of itself.
        dc1.join_wan("dc4", &dc1.url()).unwrap();
        let b = get(&dc1, "/v1/kv/x?dc=dc4").await;
        assert_eq!(
            (b.status.as_u16(), b.body.as_str()),
            (500, "No path to datacenter")
        );
        let r = put_json(
            &dc1,
            "/v1/catalog/register",
            json!({"Datacenter": "dc4", "Node": "n", "Address": "10.0.0.1"}),
        )
        .await;
        assert_eq!(
            (r.status.as_u16(), r.body.as_str()),
            (500, "No path to datacenter")
        );
    })
    .await
}

#[tokio::test]
async fn with_a_token_a_forwarded_request_carries_it_to_the_peer() {
    within(async {
        let (dc1, dc2) = federation(RegistryOptions {
            token: Some("s3cret".into()),
            ..RegistryOptions::for_tests()
        });
        dc1.kv_put("k", "v").unwrap();
        assert_eq!(get(&dc2, "/v1/kv/k?dc=dc1").await.status, 403);
        assert_eq!(get(&dc2, "/v1/kv/k?dc=dc1&token=s3cret").await.status, 200);
        for req in [
            client()
                .get(format!("{}/v1/kv/k?dc=dc1", dc2.url()))
                .header("X-Consul-Token", "s3cret"),
            client()
                .get(format!("{}/v1/kv/k?dc=dc1", dc2.url()))
                .bearer_auth("s3cret"),
        ] {
            assert_eq!(send(req).await.status, 200);
        }
        // A peer with another token refuses what this one let through.
        let other = start_with(RegistryOptions {
            datacenter: "dc3".into(),
            token: Some("other".into()),
            ..RegistryOptions::for_tests()
        });
        dc2.join_wan("dc3", &other.url()).unwrap();
        let refused = get(&dc2, "/v1/kv/k?dc=dc3&token=s3cret").await;
        assert_eq!(
            (refused.status.as_u16(), refused.body.as_str()),
            (403, "ACL not found")
        );
    })
    .await
}

// === faults ===

#[tokio::test]
async fn added_latency_delays_answers() {
    within(async {
        let reg = start();
        reg.faults().set_latency(Duration::from_millis(1500));
        let t0 = Instant::now();
        get(&reg, "/v1/catalog/services").await;
        assert!(t0.elapsed() >= Duration::from_millis(1500));
        reg.faults().set_latency(Duration::ZERO);
        let t0 = Instant::now();
        get(&reg, "/v1/catalog/services").await;
        assert!(t0.elapsed() < Duration::from_millis(1500));
    })
    .await
}

#[tokio::test]
async fn path_latency_delays_only_the_matching_endpoints() {
    within(async {
        let reg = start();
        reg.faults()
            .set_path_latency("/v1/catalog/", Duration::from_millis(1500));
        let t0 = Instant::now();
        get(&reg, "/v1/kv/?keys").await;
        let kv = t0.elapsed();
        let t0 = Instant::now();
        get(&reg, "/v1/catalog/services").await;
        let catalog = t0.elapsed();
        assert!(catalog >= Duration::from_millis(1500), "{catalog:?}");
        assert!(kv < Duration::from_millis(1500), "{kv:?}");
        reg.faults().clear();
        let t0 = Instant::now();
        get(&reg, "/v1/catalog/services").await;
        assert!(t0.elapsed() < Duration::from_millis(1500));
    })
    .await
}

#[tokio::test]
async fn without_a_leader_reads_and_writes_fail_but_stale_reads_work() {
    within(async {
        let reg = start();
        put(&reg, "/v1/kv/k", "v").await;
        reg.faults().set_no_leader(true);
        let a = get(&reg, "/v1/kv/k").await;
        assert_eq!(a.status, 500);
        assert!(a.body.contains("No cluster leader"));
        assert_eq!(put(&reg, "/v1/kv/k", "w").await.status, 500);
        assert_eq!(
            get(&reg, "/v1/health/service/web?consistent").await.status,
            500
        );
        let s = get(&reg, "/v1/kv/k?stale").await;
        assert_eq!(s.status, 200);
        assert_eq!(s.headers["x-consul-knownleader"], "false");
        assert_eq!(get(&reg, "/v1/status/leader").await.json(), json!(""));
        reg.faults().set_no_leader(false);
        assert_eq!(get(&reg, "/v1/kv/k").await.status, 200);
    })
    .await
}

#[tokio::test]
async fn dropped_connections_close_without_an_answer() {
    within(async {
        let reg = start();
        reg.faults().set_drop_connections(true);
        let r = client()
            .get(format!("{}/v1/catalog/services", reg.url()))
            .send()
            .await;
        assert!(r.is_err());
        reg.faults().set_drop_connections(false);
        assert_eq!(get(&reg, "/v1/catalog/services").await.status, 200);
    })
    .await
}

#[tokio::test]
async fn a_snapshot_restore_sends_the_index_backwards_and_wakes_watchers() {
    within(async {
        let reg = start();
        for i in 0..10 {
            put(&reg, &format!("/v1/kv/r/{i}"), "v").await;
        }
        let idx = get(&reg, "/v1/kv/r/?recurse").await.index();
        assert!(idx > 5);
        let url = format!("{}/v1/kv/r/?recurse&index={idx}&wait=10s", reg.url());
        let waiter = tokio::spawn(async move { send(client().get(url)).await });
        tokio::time::sleep(Duration::from_millis(100)).await;
        reg.faults().restore_snapshot(3);
        let a = waiter.await.unwrap();
        assert_eq!(a.status, 200);
        assert!(a.index() <= 3, "{}", a.index());
        assert!(get(&reg, "/v1/kv/r/?recurse").await.index() < idx);
        put(&reg, "/v1/kv/r/new", "v").await;
        assert_eq!(reg.index(), 4);
    })
    .await
}

#[tokio::test]
async fn bad_json_and_zero_index_and_rate_limit_faults() {
    within(async {
        let reg = start();
        reg.faults().set_bad_json(true);
        let a = get(&reg, "/v1/catalog/services").await;
        assert_eq!(a.status, 200);
        assert!(serde_json::from_str::<Value>(&a.body).is_err());
        reg.faults().set_bad_json(false);
        reg.faults().set_zero_index(true);
        assert_eq!(get(&reg, "/v1/catalog/services").await.index(), 0);
        reg.faults().set_zero_index(false);
        reg.faults().set_rate_limited(true);
        assert_eq!(get(&reg, "/v1/catalog/services").await.status, 429);
        reg.faults().clear();
        let a = get(&reg, "/v1/catalog/services").await;
        assert!(a.index() >= 1);
        a.json();
    })
    .await
}

#[tokio::test]
async fn a_stalled_registry_accepts_but_never_answers() {
    within(async {
        let reg = start();
        reg.faults().set_stall(true);
        let r = reqwest::Client::builder()
            .timeout(Duration::from_millis(300))
            .build()
            .unwrap()
            .get(format!("{}/v1/catalog/services", reg.url()))
            .send()
            .await;
        assert!(r.unwrap_err().is_timeout());
    })
    .await
}

#[tokio::test]
async fn stop_closes_connections_and_restart_serves_the_same_state_on_the_same_port() {
    within(async {
        let reg = start();
        put(&reg, "/v1/kv/keep", "me").await;
        let idx = get(&reg, "/v1/kv/keep").await.index();
        let url = format!("{}/v1/kv/keep?index={idx}&wait=30s", reg.url());
        let blocked = tokio::spawn(async move { client().get(url).send().await });
        tokio::time::sleep(Duration::from_millis(100)).await;
        reg.stop().await;
        assert!(
            blocked.await.unwrap().is_err(),
            "a blocked query survived stop"
        );
        assert!(client()
            .get(format!("{}/v1/kv/keep", reg.url()))
            .send()
            .await
            .is_err());
        reg.restart().await.unwrap();
        let a = get(&reg, "/v1/kv/keep").await;
        assert_eq!(a.status, 200);
        assert_eq!(a.index(), idx);
    })
    .await
}

// === an independent client ===

#[tokio::test]
async fn rs_consul_reads_and_writes_what_the_registry_serves() {
    use rs_consul::{
        Config, Consul, CreateOrUpdateKeyRequest, GetServiceNodesRequest, ReadKeyRequest,
        RegisterEntityPayload, RegisterEntityService,
    };
    within(async {
        let reg = start();
        // rs-consul's HTTPS connector takes rustls's process default provider, and with two
        // compiled in (ring and aws-lc) there is none until one is installed.
        switchyard::crypto_provider::provider();
        let consul = Consul::new(Config {
            address: reg.url(),
            token: None,
            ..Config::default()
        });
        let (ok, _) = consul
            .create_or_update_key(
                CreateOrUpdateKeyRequest {
                    key: "rs/key",
                    ..Default::default()
                },
                b"hello".to_vec(),
            )
            .await
            .unwrap();
        assert!(ok);
        let read = consul
            .read_key(ReadKeyRequest {
                key: "rs/key",
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(read.response[0].value.as_deref(), Some("hello"));
        assert!(read.index > 1);

        consul
            .register_entity(&RegisterEntityPayload {
                ID: None,
                Node: "rs-node".into(),
                Address: "10.1.1.1".into(),
                Datacenter: None,
                TaggedAddresses: Default::default(),
                NodeMeta: Default::default(),
                Service: Some(RegisterEntityService {
                    ID: Some("rs-api-1".into()),
                    Service: "rs-api".into(),
                    Tags: vec!["v1".into()],
                    TaggedAddresses: Default::default(),
                    Meta: Default::default(),
                    Port: Some(7070),
                    Namespace: None,
                }),
                Checks: vec![],
                SkipNodeUpdate: None,
            })
            .await
            .unwrap();
        let nodes = consul
            .get_service_nodes(
                GetServiceNodesRequest {
                    service: "rs-api",
                    ..Default::default()
                },
                None,
            )
            .await
            .unwrap();
        assert_eq!(nodes.response.len(), 1);
        assert_eq!(nodes.response[0].node.address, "10.1.1.1");
        assert_eq!(nodes.response[0].service.port, 7070);
        let addrs = consul
            .get_service_addresses_and_ports("rs-api", None)
            .await
            .unwrap();
        assert_eq!(addrs, vec![("10.1.1.1".to_string(), 7070)]);
        let names = consul.get_all_registered_service_names(None).await.unwrap();
        assert!(names.response.contains(&"rs-api".to_string()));
    })
    .await
}

// === demo services ===

#[tokio::test]
async fn demo_services_register_healthy_and_echo_requests() {
    within(async {
        let reg = start();
        let demo = switchyard::devregistry::demo::start_demo_services(&reg)
            .await
            .unwrap();
        assert_eq!(demo.len(), 2);
        let healthy = eventually(Duration::from_secs(10), || async {
            get(&reg, "/v1/health/service/demo?passing")
                .await
                .json()
                .as_array()
                .unwrap()
                .len()
                == 2
        })
        .await;
        assert!(healthy);
        let entry = &get(&reg, "/v1/health/service/demo").await.json()[0];
        let url = format!(
            "http://{}:{}/hello",
            entry["Service"]["Address"].as_str().unwrap(),
            entry["Service"]["Port"]
        );
        let echo: Value = client()
            .get(url)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(echo["service"], "demo");
        assert_eq!(echo["uri"], "/hello");
    })
    .await
}
