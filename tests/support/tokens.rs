//! Credentials for the edge-auth tests: JWTs signed with the test keys in
//! `tests/fixtures` (and hand-made hostile ones), and a small JWKS server whose document
//! the test swaps or breaks, counting every fetch.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine;
use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use tokio::net::TcpListener;

pub const ISSUER: &str = "https://id.test.example";
pub const AUDIENCE: &str = "api";
/// The HMAC secret of the HS256 test keys.
pub const SECRET: &str = "0123456789abcdef0123456789abcdef-e2e";
pub const RSA_PRIVATE: &str = include_str!("../fixtures/rsa-private.pem");
pub const RSA_PUBLIC: &str = include_str!("../fixtures/rsa-public.pem");
pub const RSA2_PRIVATE: &str = include_str!("../fixtures/rsa2-private.pem");
const RSA_JWKS: &str = include_str!("../fixtures/rsa-jwks.json");

pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Good claims for `sub`, valid for ten minutes; `extra` overrides (null removes).
pub fn claims(sub: &str, extra: Value) -> Value {
    let now = now();
    let mut c = json!({"iss": ISSUER, "aud": AUDIENCE, "sub": sub, "iat": now, "exp": now + 600});
    if let Some(e) = extra.as_object() {
        for (k, v) in e {
            if v.is_null() {
                c.as_object_mut().unwrap().remove(k);
            } else {
                c[k] = v.clone();
            }
        }
    }
    c
}

pub fn hs256(kid: &str, claims: &Value) -> String {
    sign_hmac(kid, claims, SECRET.as_bytes())
}

/// An HS256 token signed with any bytes as the secret (for key-confusion attacks).
pub fn sign_hmac(kid: &str, claims: &Value, secret: &[u8]) -> String {
    let mut h = Header::new(Algorithm::HS256);
    h.kid = Some(kid.to_string());
    encode(&h, claims, &EncodingKey::from_secret(secret)).unwrap()
}

/// RS256 with the first test RSA key.
pub fn rs256(kid: &str, claims: &Value) -> String {
    rs256_with(RSA_PRIVATE, kid, claims)
}

pub fn rs256_with(private_pem: &str, kid: &str, claims: &Value) -> String {
    let mut h = Header::new(Algorithm::RS256);
    h.kid = Some(kid.to_string());
    encode(
        &h,
        claims,
        &EncodingKey::from_rsa_pem(private_pem.as_bytes()).unwrap(),
    )
    .unwrap()
}

pub fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// `alg: none` with `claims` and an empty signature.
pub fn unsigned(claims: &Value) -> String {
    let header = b64(json!({"alg": "none", "typ": "JWT"}).to_string().as_bytes());
    format!("{header}.{}.", b64(claims.to_string().as_bytes()))
}

/// `token` with its payload replaced by `claims`, the signature kept.
pub fn tampered(token: &str, claims: &Value) -> String {
    let parts: Vec<&str> = token.split('.').collect();
    format!(
        "{}.{}.{}",
        parts[0],
        b64(claims.to_string().as_bytes()),
        parts[2]
    )
}

/// The public JWK of test RSA key 1 (`first`) or 2, with `kid`.
pub fn rsa_jwk(first: bool, kid: &str) -> Value {
    let all: Value = serde_json::from_str(RSA_JWKS).unwrap();
    let mut jwk = all[if first { "rsa" } else { "rsa2" }].clone();
    jwk["kid"] = json!(kid);
    jwk
}

/// A JWKS endpoint on `127.0.0.1:0`: serves the current document (or 500 while broken)
/// and counts requests.
pub struct JwksServer {
    pub addr: SocketAddr,
    document: Arc<Mutex<Option<String>>>,
    fetches: Arc<AtomicU64>,
    accept: tokio::task::JoinHandle<()>,
}

impl JwksServer {
    pub async fn start(keys: Vec<Value>) -> JwksServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let document = Arc::new(Mutex::new(Some(json!({ "keys": keys }).to_string())));
        let fetches = Arc::new(AtomicU64::new(0));
        let accept = {
            let (document, fetches) = (document.clone(), fetches.clone());
            tokio::spawn(async move {
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        continue;
                    };
                    let (document, fetches) = (document.clone(), fetches.clone());
                    tokio::spawn(async move {
                        let service = service_fn(move |_req| {
                            fetches.fetch_add(1, Ordering::SeqCst);
                            let body = document.lock().unwrap().clone();
                            async move {
                                let mut resp = match body {
                                    Some(b) => Response::new(Full::new(Bytes::from(b))),
                                    None => {
                                        let mut r = Response::new(Full::new(Bytes::from("down")));
                                        *r.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
                                        r
                                    }
                                };
                                resp.headers_mut()
                                    .insert("content-type", "application/json".parse().unwrap());
                                Ok::<_, Infallible>(resp)
                            }
                        });
                        let _ = auto::Builder::new(TokioExecutor::new())
                            .serve_connection(TokioIo::new(stream), service)
                            .await;
                    });
                }
            })
        };
        JwksServer {
            addr,
            document,
            fetches,
            accept,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}/jwks.json", self.addr)
    }

    /// Serves these keys from now on.
    pub fn set_keys(&self, keys: Vec<Value>) {
        *self.document.lock().unwrap() = Some(json!({ "keys": keys }).to_string());
    }

    /// Answers 500 from now on (until [`JwksServer::set_keys`]).
    pub fn break_down(&self) {
        *self.document.lock().unwrap() = None;
    }

    pub fn fetches(&self) -> u64 {
        self.fetches.load(Ordering::SeqCst)
    }
}

impl Drop for JwksServer {
    fn drop(&mut self) {
        self.accept.abort();
    }
}
