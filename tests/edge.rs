//! The edge under attack, over raw sockets: request smuggling (CL+TE, length and coding
//! obfuscations, chunk framing), header and host ambiguities, path confusion, tunnels,
//! and misbehaving upstreams that try to desynchronise the upstream pool. In every case
//! no second request reaches an upstream, a connection whose framing is in doubt is never
//! reused, and the client gets a clear status, never another client's answer.

mod support;

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};
use support::{unique, Env, Svc, DEADLINE};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// One response read off a raw connection.
#[derive(Debug)]
struct Answer {
    status: u16,
    head: String,
    body: Vec<u8>,
}

impl Answer {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Splits what a connection received into responses (by `Content-Length` or chunked);
/// a response whose framing cannot be read ends the list.
fn answers(mut bytes: &[u8], head_request: bool) -> Vec<Answer> {
    let mut out = Vec::new();
    while !bytes.is_empty() {
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut parsed = httparse::Response::new(&mut headers);
        let Ok(httparse::Status::Complete(len)) = parsed.parse(bytes) else {
            break;
        };
        let status = parsed.code.unwrap_or(0);
        let head = String::from_utf8_lossy(&bytes[..len]).to_lowercase();
        let length = parsed
            .headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case("content-length"))
            .and_then(|h| std::str::from_utf8(h.value).ok()?.parse::<usize>().ok());
        let chunked = head.contains("transfer-encoding: chunked");
        bytes = &bytes[len..];
        let mut body = Vec::new();
        if head_request || status == 204 || status == 304 || status < 200 {
        } else if chunked {
            loop {
                let Some(eol) = bytes.windows(2).position(|w| w == b"\r\n") else {
                    return out;
                };
                let size_text = String::from_utf8_lossy(&bytes[..eol]).to_string();
                let Ok(size) = usize::from_str_radix(size_text.split(';').next().unwrap_or(""), 16)
                else {
                    return out;
                };
                bytes = &bytes[eol + 2..];
                if size == 0 {
                    let Some(end) = bytes.windows(2).position(|w| w == b"\r\n") else {
                        return out;
                    };
                    bytes = &bytes[end + 2..];
                    break;
                }
                if bytes.len() < size + 2 {
                    return out;
                }
                body.extend_from_slice(&bytes[..size]);
                bytes = &bytes[size + 2..];
            }
        } else if let Some(n) = length {
            if bytes.len() < n {
                body.extend_from_slice(bytes);
                out.push(Answer { status, head, body });
                return out;
            }
            body.extend_from_slice(&bytes[..n]);
            bytes = &bytes[n..];
        } else {
            body.extend_from_slice(bytes);
            bytes = &[];
        }
        out.push(Answer { status, head, body });
    }
    out
}

/// Writes `bytes` on a new connection to the gateway, closes the writing half, and
/// returns everything the gateway sent back until it closed.
async fn exchange(env: &Env, bytes: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(env.gw.app.proxy_addr()).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let _ = s.shutdown().await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(DEADLINE, s.read_to_end(&mut out)).await;
    out
}

async fn send(env: &Env, bytes: &str) -> Vec<Answer> {
    let head = bytes.starts_with("HEAD");
    answers(&exchange(env, bytes.as_bytes()).await, head)
}

/// A gateway with one echo upstream behind `/e`, with short head and body timeouts.
async fn echo_env() -> Env {
    let env = Env::start("edge", 1, |c| {
        c.proxy.header_read_timeout_ms = 2_000;
        c.proxy.body_read_timeout_ms = 500;
    })
    .await;
    env.route("e", "/e", json!({})).await;
    env
}

/// Asserts that `request` is refused with `status` on its own, and that nothing reached
/// the upstream (the smuggled request behind it included).
async fn refused(env: &Env, what: &str, request: &str, status: u16) {
    let before = env.hits();
    let got = send(env, request).await;
    assert!(!got.is_empty(), "{what}: no answer");
    assert_eq!(got[0].status, status, "{what}: {}", got[0].text());
    assert_eq!(
        got.len(),
        1,
        "{what}: the connection must close after a refusal"
    );
    assert!(
        got[0].head.contains("connection: close"),
        "{what}: {}",
        got[0].head
    );
    assert_eq!(env.hits(), before, "{what}: reached the upstream");
}

const SMUGGLED: &str = "GET /e/smuggled HTTP/1.1\r\nHost: t\r\n\r\n";

#[tokio::test]
async fn ambiguous_request_framing_is_refused_and_nothing_behind_it_is_served() {
    let env = echo_env().await;
    let post = |headers: &str, body: &str| {
        format!("POST /e/x HTTP/1.1\r\nHost: t\r\n{headers}\r\n{body}{SMUGGLED}")
    };
    let chunked_end = "0\r\n\r\n";
    for (what, request, status) in [
        (
            "CL+TE",
            post(
                "Content-Length: 5\r\nTransfer-Encoding: chunked\r\n",
                chunked_end,
            ),
            400,
        ),
        (
            "TE+CL",
            post(
                "Transfer-Encoding: chunked\r\nContent-Length: 5\r\n",
                chunked_end,
            ),
            400,
        ),
        (
            "two lengths",
            post("Content-Length: 0\r\nContent-Length: 5\r\n", "hello"),
            400,
        ),
        ("a list of lengths", post("Content-Length: 0, 5\r\n", ""), 400),
        ("a signed length", post("Content-Length: +5\r\n", "hello"), 400),
        ("a negative length", post("Content-Length: -5\r\n", ""), 400),
        ("a hex length", post("Content-Length: 0x5\r\n", "hello"), 400),
        ("a length with inner space", post("Content-Length: 5 0\r\n", ""), 400),
        (
            "a space before the colon",
            post("Transfer-Encoding : chunked\r\n", chunked_end),
            400,
        ),
        (
            "chunked twice",
            post("Transfer-Encoding: chunked, chunked\r\n", chunked_end),
            501,
        ),
        (
            "two TE fields",
            post(
                "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n",
                chunked_end,
            ),
            501,
        ),
        (
            "gzip then chunked",
            post("Transfer-Encoding: gzip, chunked\r\n", chunked_end),
            501,
        ),
        (
            "identity",
            post("Transfer-Encoding: identity\r\n", chunked_end),
            501,
        ),
        (
            "a coding that contains chunked",
            post("Transfer-Encoding: xchunked\r\n", chunked_end),
            501,
        ),
        (
            "a trailing comma",
            post("Transfer-Encoding: chunked,\r\n", chunked_end),
            501,
        ),
        (
            "TE in HTTP/1.0",
            format!(
                "POST /e/x HTTP/1.0\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{SMUGGLED}"
            ),
            400,
        ),
        (
            "obs-fold",
            post("X-A: 1\r\n 2\r\nContent-Length: 0\r\n", ""),
            400,
        ),
        (
            "a folded TE",
            post("X-A: 1\r\n Transfer-Encoding: chunked\r\n", chunked_end),
            400,
        ),
        ("NUL in a value", post("X-A: a\0b\r\n", ""), 400),
        ("CR in a value", post("X-A: a\rb\r\n", ""), 400),
        ("CR in a name", post("X\rA: b\r\n", ""), 400),
        ("a space in a name", post("X A: b\r\n", ""), 400),
        (
            "bare LF line ends",
            format!("POST /e/x HTTP/1.1\nHost: t\nContent-Length: 0\n\n{SMUGGLED}"),
            400,
        ),
        (
            "a bare LF inside the head",
            post("X-A: 1\nContent-Length: 0\r\n", ""),
            400,
        ),
    ] {
        refused(&env, what, &request, status).await;
    }
    env.stop().await;
}

#[tokio::test]
async fn bad_chunk_framing_is_refused_before_the_upstream_sees_the_request() {
    let env = echo_env().await;
    let chunked = |body: &str| {
        format!(
            "POST /e/x HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n{body}{SMUGGLED}"
        )
    };
    for (what, body) in [
        ("an empty size line", "\r\n0\r\n\r\n".to_string()),
        ("spaces for a size", "   \r\nabc\r\n0\r\n\r\n".into()),
        ("an extension for a size", ";x=1\r\nabc\r\n0\r\n\r\n".into()),
        ("a negative size", "-3\r\nabc\r\n0\r\n\r\n".into()),
        (
            "an oversize size",
            "fffffffffffffffff\r\nabc\r\n0\r\n\r\n".into(),
        ),
        ("a size with a 0x", "0x3\r\nabc\r\n0\r\n\r\n".into()),
        ("a space inside the size", "1 0\r\nabc\r\n0\r\n\r\n".into()),
        ("a bare LF after the size", "3\nabc\r\n0\r\n\r\n".into()),
        (
            "a bare LF in an extension",
            "3;a\nb\r\nabc\r\n0\r\n\r\n".into(),
        ),
        ("data longer than its size", "3\r\nabcd\r\n0\r\n\r\n".into()),
        (
            "an endless extension",
            format!("3;{}\r\nabc\r\n0\r\n\r\n", "e".repeat(5000)),
        ),
        (
            "a bare LF in a trailer",
            "3\r\nabc\r\n0\r\nx: 1\n\r\n".into(),
        ),
    ] {
        let before = env.hits();
        let got = send(&env, &chunked(&body)).await;
        assert!(!got.is_empty(), "{what}: no answer");
        assert_eq!(got[0].status, 400, "{what}: {}", got[0].text());
        assert_eq!(got.len(), 1, "{what}: nothing after a broken body");
        assert_eq!(env.hits(), before, "{what}: reached the upstream");
    }
    // Well-framed, the same body goes through once, and the request behind it is
    // served as its own request with its own answer.
    let before = env.hits();
    let got = send(&env, &chunked("3;ext=1\r\nabc\r\n0\r\n\r\n")).await;
    assert_eq!(got.len(), 2, "{got:?}");
    assert_eq!(got[0].status, 200);
    assert!(got[1].text().contains("/e/smuggled"));
    assert_eq!(env.hits(), before + 2);
    env.stop().await;
}

#[tokio::test]
async fn pipelined_requests_after_a_refused_one_are_never_served() {
    let env = echo_env().await;
    let before = env.hits();
    let got = send(
        &env,
        &format!("GET /e/a HTTP/1.1\r\nHost: t\r\n\r\nGET /e/b HTTP/1.1\r\nHost: t\r\nContent-Length: -1\r\n\r\n{SMUGGLED}"),
    )
    .await;
    let statuses: Vec<u16> = got.iter().map(|a| a.status).collect();
    assert_eq!(statuses, [200, 400]);
    assert_eq!(env.hits(), before + 1);
    // A body that carries a request is a body, also when 100-continue is asked for.
    let body = SMUGGLED;
    let got = send(
        &env,
        &format!(
            "POST /e/up HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        ),
    )
    .await;
    let last = got.last().expect("an answer");
    assert_eq!(last.status, 200);
    assert!(got.iter().all(|a| !a.text().contains("/e/smuggled")));
    assert_eq!(env.hits(), before + 2);
    env.stop().await;
}

#[tokio::test]
async fn one_host_per_request_for_the_router_and_the_upstream() {
    let env = echo_env().await;
    refused(
        &env,
        "no Host",
        &format!("GET /e/x HTTP/1.1\r\n\r\n{SMUGGLED}"),
        400,
    )
    .await;
    refused(
        &env,
        "two Hosts",
        "GET /e/x HTTP/1.1\r\nHost: a.example\r\nHost: b.example\r\n\r\n",
        400,
    )
    .await;
    refused(
        &env,
        "user info",
        "GET http://u@a.example/e/x HTTP/1.1\r\nHost: a.example\r\n\r\n",
        400,
    )
    .await;
    refused(
        &env,
        "CONNECT",
        "CONNECT a.example:443 HTTP/1.1\r\nHost: a.example:443\r\n\r\n",
        400,
    )
    .await;
    let got = send(&env, "GET /e/x HTTP/1.0\r\n\r\n").await;
    assert_eq!(got[0].status, 200, "HTTP/1.0 needs no Host");
    // Absolute form: the authority names the host, for the router and the upstream.
    let got = send(
        &env,
        "GET http://a.example/e/x HTTP/1.1\r\nHost: b.example\r\n\r\n",
    )
    .await;
    assert_eq!(got[0].status, 200);
    let seen: Value = serde_json::from_slice(&got[0].body).unwrap();
    assert_eq!(seen["headers"]["host"], "a.example", "{seen}");
    assert_eq!(seen["headers"]["x-forwarded-host"], "a.example");
    // `Connection: host` cannot take the routed host away from the upstream.
    let got = send(
        &env,
        "GET /e/x HTTP/1.1\r\nHost: c.example\r\nConnection: host\r\n\r\n",
    )
    .await;
    let seen: Value = serde_json::from_slice(&got[0].body).unwrap();
    assert_eq!(seen["headers"]["host"], "c.example", "{seen}");

    // HTTP/2: a Host that differs from :authority is malformed.
    let h2 = support::h2c_client();
    let resp = h2
        .get(env.url("/e/x"))
        .header("host", "other.example")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let resp = h2.get(env.url("/e/x")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    env.stop().await;
}

#[tokio::test]
async fn headers_a_backend_could_fold_into_the_gateways_never_reach_it() {
    let env = Env::start("edge-us", 1, |_| {}).await;
    env.route("e", "/e", json!({})).await;
    let spoof = [
        ("x_user_id", "admin"),
        ("X-User_Id", "admin"),
        ("x_forwarded_for", "1.2.3.4"),
        ("x-real-ip", "1.2.3.4"),
        ("forwarded", "for=1.2.3.4"),
        ("x-forwarded-prefix", "/admin"),
        ("x-forwarded-port", "8443"),
        ("transfer_encoding", "chunked"),
        ("x_custom", "1"),
    ];
    let check = |seen: &serde_json::Map<String, Value>, allowed: bool| {
        for (name, _) in spoof {
            let lower = name.to_lowercase();
            let kept = allowed && lower == "x_custom";
            assert_eq!(seen.contains_key(&lower), kept, "{name}: {seen:?}");
        }
        assert!(seen.contains_key("x-forwarded-for"));
        assert_ne!(seen["x-forwarded-for"], "1.2.3.4");
    };
    for client in [support::client(), support::h2c_client()] {
        let mut req = client.get(env.url("/e/x"));
        for (k, v) in spoof {
            req = req.header(k, v);
        }
        let seen = support::seen_headers(req.send().await.unwrap()).await;
        check(&seen, false);
    }
    env.stop().await;

    let env = Env::start("edge-us2", 1, |c| c.proxy.underscores_in_headers = true).await;
    env.route("e", "/e", json!({})).await;
    let mut raw = String::from("GET /e/x HTTP/1.1\r\nHost: t\r\n");
    for (k, v) in spoof {
        raw.push_str(&format!("{k}: {v}\r\n"));
    }
    raw.push_str("\r\n");
    let got = send(&env, &raw).await;
    let seen: Value = serde_json::from_slice(&got[0].body).unwrap();
    let seen = seen["headers"].as_object().unwrap().clone();
    check(&seen, true);
    env.stop().await;
}

#[tokio::test]
async fn identity_headers_cannot_be_forged_in_any_spelling_on_protected_routes() {
    let env = Env::start("edge-id", 1, |c| c.proxy.underscores_in_headers = true).await;
    let minted = switchyard::auth::api_key::mint("edge-app", vec![], None);
    let key = minted.key.clone();
    env.consul
        .put_kv(
            &format!("{}apikeys/{}", env.gw.kv_prefix, minted.id),
            &serde_json::to_value(&minted.doc).unwrap().to_string(),
        )
        .await;
    env.route("e", "/e", json!({"auth": {"api_key": true}}))
        .await;
    let gateway = &env;
    let key = &key;
    let send_with = |extra: &'static str| {
        let raw = format!("GET /e/x HTTP/1.1\r\nHost: t\r\nX-Api-Key: {key}\r\n{extra}\r\n");
        async move { send(gateway, &raw).await }
    };
    let got = support::eventually(DEADLINE, "the API key is known", || async {
        let got = send_with("").await;
        (got.first()?.status == 200).then_some(got)
    })
    .await;
    let seen: Value = serde_json::from_slice(&got[0].body).unwrap();
    let consumer = seen["headers"]["x-consumer"].clone();
    assert_eq!(consumer, "edge-app", "{seen}");
    let got = send_with("X_Consumer: root\r\nx-consumer_: a\r\nConnection: x_consumer\r\n").await;
    let seen: Value = serde_json::from_slice(&got[0].body).unwrap();
    let headers = seen["headers"].as_object().unwrap();
    assert_eq!(headers["x-consumer"], "edge-app", "{seen}");
    assert!(!headers.contains_key("x_consumer"), "{seen}");
    env.stop().await;
}

#[tokio::test]
async fn escaped_slashes_follow_the_route_policy() {
    let env = echo_env().await;
    env.route("keep", "/keep", json!({"escaped_slashes": "keep"}))
        .await;
    env.route("dec", "/dec", json!({"escaped_slashes": "decode"}))
        .await;
    let get = |path: &str| format!("GET {path} HTTP/1.1\r\nHost: t\r\n\r\n");
    for path in [
        "/e/..%2fprivate/x",
        "/e/a%2Fb",
        "/e/a%5Cb",
        "/e/a%5cb",
        "/e/a\\b",
        "/e/..;/x",
        "/e/%2e%2e;/x",
    ] {
        refused(&env, path, &get(path), 400).await;
    }
    let path_seen = |got: &[Answer]| -> String {
        let seen: Value = serde_json::from_slice(&got[0].body).unwrap();
        seen["path"].as_str().unwrap_or_default().to_string()
    };
    let got = send(&env, &get("/keep/a%2fb")).await;
    assert_eq!(got[0].status, 200);
    assert_eq!(path_seen(&got), "/keep/a%2Fb", "kept encoded, as routed");
    let got = send(&env, &get("/dec/a%2Fb%5Cc")).await;
    assert_eq!(got[0].status, 200);
    assert_eq!(path_seen(&got), "/dec/a/b/c", "decoded, as routed");
    // Decoding that leaves the route is routed again on the decoded path, which must
    // itself accept decoding.
    refused(&env, "decoded into /e", &get("/dec/..%2Fe/x"), 400).await;
    env.stop().await;
}

#[tokio::test]
async fn only_websocket_may_switch_protocols() {
    let env = echo_env().await;
    let got = send(
        &env,
        "GET /e/x HTTP/1.1\r\nHost: t\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n",
    )
    .await;
    assert_eq!(got[0].status, 200, "served as a plain request");
    let seen: Value = serde_json::from_slice(&got[0].body).unwrap();
    let headers = seen["headers"].as_object().unwrap();
    for gone in ["upgrade", "http2-settings", "connection"] {
        assert!(!headers.contains_key(gone), "{gone}: {seen}");
    }
    assert_eq!(seen["version"], "HTTP/1.1");
    env.stop().await;
}

#[tokio::test]
async fn broken_client_bodies_are_the_clients_fault_not_the_instances() {
    let env = Env::start("edge-blame", 2, |c| c.proxy.body_read_timeout_ms = 300).await;
    env.route(
        "e",
        "/e",
        json!({"outlier": {"consecutive_failures": 2, "max_ejected_percent": 100,
                           "panic_threshold_percent": 0}}),
    )
    .await;
    for i in 0..12 {
        let got = send(
            &env,
            "POST /e/x HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nabc",
        )
        .await;
        assert!(matches!(got[0].status, 400 | 408), "{i}: {got:?}");
    }
    // A body that starts well and then breaks, after the request went upstream.
    for _ in 0..4 {
        let mut s = TcpStream::connect(env.gw.app.proxy_addr()).await.unwrap();
        s.write_all(
            b"POST /e/count HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n",
        )
        .await
        .unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        s.write_all(b"zz\r\n").await.unwrap();
        let mut out = Vec::new();
        let _ = tokio::time::timeout(DEADLINE, s.read_to_end(&mut out)).await;
        let got = answers(&out, false);
        assert_eq!(got[0].status, 400, "{}", got[0].text());
    }
    let mut served = std::collections::BTreeSet::new();
    for _ in 0..20 {
        let resp = env.get("/e/x").await;
        assert_eq!(resp.status(), 200);
        let seen: Value = resp.json().await.unwrap();
        served.insert(seen["server"].as_str().unwrap_or_default().to_string());
    }
    assert_eq!(served.len(), 2, "no instance was ejected: {served:?}");
    env.stop().await;
}

#[tokio::test]
async fn a_streamed_body_goes_to_another_instance_when_the_first_cannot_be_reached() {
    let env = Env::start("edge-dial", 1, |_| {}).await;
    let dead = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dead_port = dead.local_addr().unwrap().port();
    drop(dead);
    let dead_id = format!("{}-dead", env.service);
    env.consul
        .register(&Svc::new(&env.service, &dead_id, dead_port))
        .await;
    env.consul
        .put_kv(
            &env.gw.route_key("up"),
            &support::route(
                &env.service,
                "/up",
                json!({"outlier": {"consecutive_failures": 0}, "retry": {"attempts": 1}}),
            ),
        )
        .await;
    let live = format!("{}-0", env.service);
    env.gw
        .wait_upstreams("/up", &[live.as_str(), dead_id.as_str()])
        .await;
    // Over the replay buffer, so the body streams: it can be sent once, and it is when
    // the first instance picked refuses the connection (nothing of it was read).
    let body = vec![b'z'; 200 * 1024];
    for i in 0..6 {
        let resp = env
            .http
            .put(env.url("/up/count"))
            .body(body.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "try {i}");
        assert_eq!(resp.text().await.unwrap(), body.len().to_string());
    }
    env.stop().await;
}

#[tokio::test]
async fn a_client_that_stalls_its_body_gets_408() {
    let env = echo_env().await;
    let mut s = TcpStream::connect(env.gw.app.proxy_addr()).await.unwrap();
    s.write_all(b"POST /e/count HTTP/1.1\r\nHost: t\r\nContent-Length: 100000\r\n\r\nabc")
        .await
        .unwrap();
    let mut out = Vec::new();
    let started = std::time::Instant::now();
    let _ = tokio::time::timeout(DEADLINE, s.read_to_end(&mut out)).await;
    let got = answers(&out, false);
    assert_eq!(got[0].status, 408, "{got:?}");
    assert!(started.elapsed() < Duration::from_secs(5));
    env.stop().await;
}

/// An upstream that answers each request with bytes chosen by its path (see
/// [`scripted_answer`]), and otherwise with its own path as the body; every request
/// line it reads is recorded, and so is every connection it accepts.
struct RawUpstream {
    port: u16,
    lines: Arc<Mutex<Vec<String>>>,
    received: Arc<Mutex<Vec<u8>>>,
    accepted: Arc<Mutex<usize>>,
}

impl RawUpstream {
    async fn start() -> RawUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let received = Arc::new(Mutex::new(Vec::new()));
        let accepted = Arc::new(Mutex::new(0));
        let (log, bytes, count) = (lines.clone(), received.clone(), accepted.clone());
        tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                *count.lock().unwrap() += 1;
                tokio::spawn(serve_raw(s, log.clone(), bytes.clone()));
            }
        });
        RawUpstream {
            port,
            lines,
            received,
            accepted,
        }
    }

    fn saw(&self, path: &str) -> bool {
        self.lines.lock().unwrap().iter().any(|l| l.contains(path))
    }
}

async fn serve_raw(mut s: TcpStream, log: Arc<Mutex<Vec<String>>>, bytes: Arc<Mutex<Vec<u8>>>) {
    let mut pending: VecDeque<u8> = VecDeque::new();
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let end = loop {
            let flat: Vec<u8> = pending.iter().copied().collect();
            if let Some(end) = flat.windows(4).position(|w| w == b"\r\n\r\n") {
                break end + 4;
            }
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    bytes.lock().unwrap().extend_from_slice(&buf[..n]);
                    pending.extend(&buf[..n]);
                }
            }
        };
        let head: Vec<u8> = pending.drain(..end).collect();
        let head = String::from_utf8_lossy(&head).to_string();
        let line = head.lines().next().unwrap_or_default().to_string();
        log.lock().unwrap().push(line.clone());
        let path = line.split(' ').nth(1).unwrap_or("/").to_string();
        let length: usize = head
            .to_lowercase()
            .split("content-length: ")
            .nth(1)
            .and_then(|v| v.split('\r').next())
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        // `/early` answers before reading its body (a broken instance): the body's
        // bytes are then read as the next request.
        if !path.ends_with("/early") {
            while pending.len() < length {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => {
                        bytes.lock().unwrap().extend_from_slice(&buf[..n]);
                        pending.extend(&buf[..n]);
                    }
                }
            }
            pending.drain(..length);
        }
        let (now, later, close) = scripted_answer(&path);
        if s.write_all(&now).await.is_err() {
            return;
        }
        if let Some(later) = later {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let _ = s.write_all(&later).await;
        }
        if close {
            return;
        }
    }
}

const FAKE: &str = "HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nSMUGGLED";

/// What the raw upstream answers for `path`: bytes now, bytes 100 ms later, and
/// whether it then closes.
fn scripted_answer(path: &str) -> (Vec<u8>, Option<Vec<u8>>, bool) {
    let name = path.rsplit('/').next().unwrap_or_default();
    let text = |s: &str| s.as_bytes().to_vec();
    match name {
        "head-body" => (
            text("HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nSMUGGLED"),
            None,
            false,
        ),
        "204-body" => (text(&format!("HTTP/1.1 204 No Content\r\n\r\n{FAKE}")), None, false),
        "304-body" => (text(&format!("HTTP/1.1 304 Not Modified\r\n\r\n{FAKE}")), None, false),
        "long-body" => (
            text(&format!("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok{FAKE}")),
            None,
            false,
        ),
        "late" => (
            text("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"),
            Some(text(FAKE)),
            false,
        ),
        "head-late" => (
            text("HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\n"),
            Some(text("SMUGGLED")),
            false,
        ),
        "interim" => (
            text("HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>; rel=preload\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\ninterim"),
            None,
            false,
        ),
        "many-interim" => (
            text(&("HTTP/1.1 100 Continue\r\n\r\n".repeat(20) + FAKE)),
            None,
            false,
        ),
        "bare-lf" => (
            text(&format!("HTTP/1.1 200 OK\nContent-Length: 2\n\nok{FAKE}")),
            None,
            false,
        ),
        "cl-te" => (
            text(&format!(
                "HTTP/1.1 200 OK\r\nContent-Length: 40\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n{FAKE}"
            )),
            None,
            false,
        ),
        "double-cl" => (
            text(&format!(
                "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 10\r\n\r\nok{FAKE}"
            )),
            None,
            false,
        ),
        "gzip-chunked" => (
            text("HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n"),
            None,
            false,
        ),
        "switch" => (
            text("HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: h2c\r\n\r\n"),
            None,
            false,
        ),
        "truncated" => (
            text("HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello"),
            None,
            true,
        ),
        "mid-chunk" => (
            text("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel"),
            None,
            true,
        ),
        "bad-chunk" => (
            text(&format!(
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2 \r\nok\r\n0\r\n\r\n{FAKE}"
            )),
            None,
            false,
        ),
        _ => {
            let body = path.as_bytes();
            let mut out = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", body.len())
                .into_bytes();
            out.extend_from_slice(body);
            (out, None, false)
        }
    }
}

/// A gateway whose route `/r` goes to one [`RawUpstream`].
async fn raw_env() -> (Env, RawUpstream) {
    let env = Env::start("edge-raw", 0, |_| {}).await;
    let raw = RawUpstream::start().await;
    let service = unique("raw");
    env.consul
        .register(&Svc::new(&service, &format!("{service}-0"), raw.port))
        .await;
    env.consul
        .put_kv(
            &env.gw.route_key("r"),
            &support::route(&service, "/r", json!({"retry": {"attempts": 0}})),
        )
        .await;
    env.gw
        .wait_upstreams("/r", &[format!("{service}-0").as_str()])
        .await;
    (env, raw)
}

/// A request of its own connection; every answer it got.
async fn one(env: &Env, method: &str, path: &str) -> Vec<Answer> {
    let raw = format!("{method} {path} HTTP/1.1\r\nHost: t\r\n\r\n");
    answers(&exchange(env, raw.as_bytes()).await, method == "HEAD")
}

#[tokio::test]
async fn misbehaving_upstreams_never_leak_one_clients_answer_to_another() {
    let (env, raw) = raw_env().await;
    for (method, name, status) in [
        ("HEAD", "head-body", Some(200)),
        ("HEAD", "head-late", Some(200)),
        ("GET", "204-body", Some(204)),
        ("GET", "304-body", Some(304)),
        ("GET", "long-body", Some(200)),
        ("GET", "late", Some(200)),
        ("GET", "interim", Some(200)),
        ("GET", "many-interim", Some(502)),
        ("GET", "bare-lf", Some(502)),
        ("GET", "cl-te", Some(200)),
        ("GET", "double-cl", Some(502)),
        ("GET", "gzip-chunked", Some(502)),
        ("GET", "switch", Some(502)),
        ("GET", "truncated", None),
        ("GET", "mid-chunk", None),
        ("GET", "bad-chunk", None),
    ] {
        let got = one(&env, method, &format!("/r/{name}")).await;
        match status {
            Some(status) => {
                assert_eq!(got.len(), 1, "{name}: {got:?}");
                assert_eq!(got[0].status, status, "{name}: {}", got[0].text());
            }
            // The body broke after the head went out: the client's connection is cut
            // short of the declared end.
            None => assert!(
                got.len() <= 1 && got.iter().all(|a| a.body.len() < 10),
                "{name}: {got:?}"
            ),
        }
        if name == "interim" {
            assert_eq!(got[0].text(), "interim");
        }
        if name == "cl-te" {
            assert_eq!(got[0].text(), "ok");
        }
        assert!(
            got.iter().all(|a| !a.text().contains("SMUGGLED")),
            "{name}: {got:?}"
        );
        // Give late bytes time to arrive on an idle pooled connection.
        tokio::time::sleep(Duration::from_millis(200)).await;
        for i in 0..3 {
            let after = format!("/r/after-{name}-{i}");
            let got = one(&env, "GET", &after).await;
            assert_eq!(got.len(), 1, "after {name}: {got:?}");
            assert_eq!(got[0].status, 200, "after {name}");
            assert_eq!(got[0].text(), after, "after {name}: another answer");
        }
    }
    env.stop().await;
    drop(raw);
}

#[tokio::test]
async fn an_instance_that_answers_before_the_body_is_never_reused() {
    let (env, raw) = raw_env().await;
    let body = "GET /r/smuggled HTTP/1.1\r\nHost: t\r\n\r\n";
    let request = format!(
        "POST /r/early HTTP/1.1\r\nHost: t\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    for _ in 0..3 {
        let got = answers(&exchange(&env, request.as_bytes()).await, false);
        assert_eq!(got[0].status, 200);
        assert_eq!(got[0].text(), "/r/early");
        tokio::time::sleep(Duration::from_millis(100)).await;
        let got = one(&env, "GET", "/r/next").await;
        assert_eq!(got[0].text(), "/r/next", "another request's answer");
    }
    // The broken instance read the body as a request; its answer went nowhere.
    assert!(raw.saw("/r/smuggled"));
    let accepted = *raw.accepted.lock().unwrap();
    assert!(
        accepted >= 4,
        "early answers closed their connections: {accepted}"
    );
    env.stop().await;
}

#[tokio::test]
async fn request_trailers_never_reach_the_upstream() {
    let (env, raw) = raw_env().await;
    let got = send(
        &env,
        "POST /r/t HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\nContent-Length: 50\r\nX-User-Id: admin\r\nHost: evil\r\n\r\n",
    )
    .await;
    assert_eq!(got[0].status, 200, "{got:?}");
    assert!(raw.saw("/r/t"));
    let received = String::from_utf8_lossy(&raw.received.lock().unwrap()).to_lowercase();
    assert!(received.contains("\r\n\r\nabc"), "{received}");
    for trailer in ["admin", "evil", "content-length: 50"] {
        assert!(!received.contains(trailer), "{trailer}: {received}");
    }
    // Streamed (the body arrives after the request went upstream), trailers go too.
    let mut s = TcpStream::connect(env.gw.app.proxy_addr()).await.unwrap();
    s.write_all(
        b"POST /r/t2 HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n",
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    s.write_all(b"0\r\nX-User-Id: admin2\r\n\r\n")
        .await
        .unwrap();
    let _ = s.shutdown().await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(DEADLINE, s.read_to_end(&mut out)).await;
    assert_eq!(answers(&out, false)[0].status, 200);
    let received = String::from_utf8_lossy(&raw.received.lock().unwrap()).to_lowercase();
    assert!(received.contains("/r/t2"));
    assert!(!received.contains("admin2"), "{received}");
    env.stop().await;
}

#[tokio::test]
async fn an_answer_that_comes_before_the_request_body_is_through_still_reaches_the_client() {
    // The instance answers on the head alone; the gateway must not reset the connection
    // under a client that is still sending a body too large to drain, or the client may
    // never read the answer (as curl failed here: "Failed sending data to the peer").
    let (env, _raw) = raw_env().await;
    let size = 4 << 20;
    let s = TcpStream::connect(env.gw.app.proxy_addr()).await.unwrap();
    let (mut rd, mut wr) = s.into_split();
    let writer = tokio::spawn(async move {
        let head = format!("POST /r/early HTTP/1.1\r\nHost: t\r\nContent-Length: {size}\r\n\r\n");
        wr.write_all(head.as_bytes()).await?;
        let chunk = vec![b'x'; 64 * 1024];
        let mut sent = 0;
        while sent < size {
            wr.write_all(&chunk).await?;
            sent += chunk.len();
        }
        Ok::<usize, std::io::Error>(sent)
    });
    let mut answer = Vec::new();
    let read = tokio::time::timeout(DEADLINE, rd.read_to_end(&mut answer)).await;
    assert!(
        matches!(read, Ok(Ok(_))),
        "the answer is read to a clean end: {read:?}"
    );
    let answers = answers(&answer, false);
    assert_eq!(answers.len(), 1, "{:?}", String::from_utf8_lossy(&answer));
    assert_eq!(answers[0].status, 200);
    let sent = tokio::time::timeout(DEADLINE, writer)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(sent.unwrap(), size, "the whole body could be sent");
}
