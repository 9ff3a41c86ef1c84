//! Differential tests of the gateway's HTTP/1.1 request reading against hyper's server,
//! an independent framing implementation (its own `Content-Length`, `Transfer-Encoding`
//! and chunked decoder), on generated request bytes: the gateway may refuse what hyper
//! accepts, never the reverse, and where both accept they agree on every request, its
//! body, and so on where the next request starts. A second property: a request the
//! gateway read, written upstream by its own client side and read again, is the same
//! request.

use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::fuzz::{decode, read_back};
use super::server::{parse_head, request_framing};

/// One request as read: method, target, body.
type Read = (String, String, Vec<u8>);

/// The requests the gateway reads from `bytes`, up to the first it refuses.
fn gateway_reads(bytes: &[u8]) -> Vec<Read> {
    let mut read = Bytes::copy_from_slice(bytes);
    let mut out = Vec::new();
    while !read.is_empty() {
        let Ok(Some(head)) = parse_head(&mut read, 64 * 1024) else {
            break;
        };
        let http10 = head.request.version == http::Version::HTTP_10;
        let Ok(framing) = request_framing(&head.facts, http10) else {
            break;
        };
        let Some((body, rest)) = decode(framing, read, 0) else {
            break;
        };
        read = rest;
        out.push((
            head.request.method.to_string(),
            head.request.uri.to_string(),
            body,
        ));
        // The server closes after a request that does not keep the connection alive.
        if !head.facts.keeps_alive(http10) {
            break;
        }
    }
    out
}

/// The requests hyper's HTTP/1.1 server reads from `bytes` (bodies read whole).
async fn hyper_reads(bytes: &[u8]) -> Vec<Read> {
    let (mut client, server) = tokio::io::duplex(1 << 20);
    let seen: Arc<Mutex<Vec<Read>>> = Arc::default();
    let log = seen.clone();
    let service = service_fn(move |req: http::Request<Incoming>| {
        let log = log.clone();
        async move {
            let (parts, body) = req.into_parts();
            if let Ok(body) = body.collect().await {
                log.lock().unwrap().push((
                    parts.method.to_string(),
                    parts.uri.to_string(),
                    body.to_bytes().to_vec(),
                ));
            }
            Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::new())))
        }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .half_close(true)
        .serve_connection(TokioIo::new(server), service);
    let talk = async {
        let _ = client.write_all(bytes).await;
        let _ = client.shutdown().await;
        let mut sink = Vec::new();
        let _ = client.read_to_end(&mut sink).await;
    };
    let _ = tokio::time::timeout(std::time::Duration::from_secs(2), async {
        tokio::join!(conn, talk)
    })
    .await;
    let out = seen.lock().unwrap().clone();
    out
}

const NEXT: &str = "GET /next HTTP/1.1\r\nHost: n\r\n\r\n";

/// A request assembled from pieces an attacker varies: framing headers in many spellings,
/// chunk lines right and wrong, line ends, folds, duplicates.
fn generate(rng: &mut StdRng) -> String {
    let pick = |rng: &mut StdRng, options: &[&str]| -> String {
        options[rng.random_range(0..options.len())].to_string()
    };
    let eol = if rng.random_bool(0.05) { "\n" } else { "\r\n" };
    let method = pick(rng, &["GET", "POST", "PUT", "POST"]);
    let version = pick(rng, &["HTTP/1.1", "HTTP/1.1", "HTTP/1.1", "HTTP/1.0"]);
    let mut head = format!("{method} /a?b=1 {version}{eol}");
    let mut fields = vec![pick(rng, &["Host: a", "Host: a", "host:a", "Host:  a  "])];
    let lengths = [
        "5",
        "05",
        "+5",
        "-5",
        "5, 5",
        "5,6",
        " 5",
        "5 ",
        "",
        "0x5",
        "5 5",
        "0",
        "99999999999999999999",
        "3",
    ];
    let codings = [
        "chunked",
        "Chunked",
        "CHUNKED",
        "chunked, chunked",
        "gzip, chunked",
        "identity",
        " chunked",
        "chunked ",
        "\tchunked",
        "chunked;q=1",
        "xchunked",
        "chunked,",
    ];
    for _ in 0..rng.random_range(0..4) {
        let field = match rng.random_range(0..9) {
            0 | 1 => format!("Content-Length: {}", pick(rng, &lengths)),
            2 | 3 => format!("Transfer-Encoding: {}", pick(rng, &codings)),
            4 => pick(
                rng,
                &[
                    "Transfer-Encoding : chunked",
                    "Content-Length : 5",
                    "Transfer_Encoding: chunked",
                    " Transfer-Encoding: chunked",
                ],
            ),
            5 => format!("X-Fold: a{eol} b"),
            6 => pick(rng, &["Connection: close", "Connection: keep-alive"]),
            7 => pick(rng, &["Expect: 100-continue", "X-A: b\0c", "X-B: c\rd"]),
            _ => "X-Plain: yes".to_string(),
        };
        fields.push(field);
    }
    for f in &fields {
        head.push_str(f);
        head.push_str(eol);
    }
    head.push_str(eol);
    let body = match rng.random_range(0..6) {
        0 => "hello".to_string(),
        1 => "abc".to_string(),
        2 => String::new(),
        _ => {
            let mut body = String::new();
            for _ in 0..rng.random_range(0..3) {
                body.push_str(&pick(
                    rng,
                    &[
                        "5\r\nhello\r\n",
                        "5;ext=1\r\nhello\r\n",
                        "5 ;e\r\nhello\r\n",
                        "5 \r\nhello\r\n",
                        "05\r\nhello\r\n",
                        "0x5\r\nhello\r\n",
                        "5\nhello\r\n",
                        "5\r\nhelloo\r\n",
                        "\r\n",
                        "  \r\n",
                        ";x\r\n",
                        "3;a\nb\r\nabc\r\n",
                        "fffffffffffffffff\r\n",
                    ],
                ));
            }
            body.push_str(&pick(
                rng,
                &[
                    "0\r\n\r\n",
                    "0\r\n\r\n",
                    "0\r\nX-T: 1\r\n\r\n",
                    "0\r\nX-T: 1\n\r\n",
                    "0;e\r\n\r\n",
                    "0\r\n",
                ],
            ));
            body
        }
    };
    format!("{head}{body}{NEXT}")
}

#[tokio::test]
async fn the_gateway_is_never_looser_than_hyper_and_agrees_where_requests_end() {
    let mut rng = StdRng::seed_from_u64(0x5117c4);
    let (mut both, mut stricter) = (0, 0);
    for case in 0..1500 {
        let request = generate(&mut rng);
        let ours = gateway_reads(request.as_bytes());
        let reference = hyper_reads(request.as_bytes()).await;
        assert!(
            ours.len() <= reference.len(),
            "case {case}: the gateway read more requests than hyper in {request:?}\n\
             gateway: {ours:?}\nhyper: {reference:?}"
        );
        for (i, read) in ours.iter().enumerate() {
            assert_eq!(
                read, &reference[i],
                "case {case}: request {i} of {request:?} read differently"
            );
        }
        if ours.len() == reference.len() {
            both += 1;
        } else {
            stricter += 1;
        }
    }
    // The generator must exercise both outcomes, or the property proves nothing.
    assert!(
        both > 200 && stricter > 20,
        "{both} agreed, {stricter} stricter"
    );
}

#[test]
fn a_request_written_upstream_reads_back_as_the_same_request() {
    let mut rng = StdRng::seed_from_u64(0xb0d7);
    let checked = (0..2000)
        .filter(|_| read_back(generate(&mut rng).as_bytes()))
        .count();
    assert!(checked > 300, "only {checked} requests were read");
}
