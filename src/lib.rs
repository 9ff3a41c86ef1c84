//! Switchyard: an API gateway that lives on HashiCorp Consul.
//!
//! Two flows, pointing one way:
//! - **Consul → snapshot.** `consul` watches blocking queries; `discovery` turns health
//!   entries into upstream sets, `routing` turns KV documents into a route table;
//!   `snapshot_writer` (the single writer) combines them into one immutable
//!   [`state::Snapshot`] and swaps it in.
//! - **Request → upstream.** `proxy` loads the snapshot once per request, matches a route,
//!   applies `auth` and `policy`, lets `balance` pick an instance and forwards.
//!
//! The request path never takes a lock and never waits on Consul. `http1` speaks HTTP/1.1
//! on both sides of the proxy and knows nothing of the gateway; `devregistry` is a
//! Consul-compatible registry for tests and the quick start; neither imports from here.

pub mod access_log;
pub mod admin;
pub mod app;
pub mod assertion;
pub mod auth;
pub mod balance;
pub mod config;
pub mod consul;
pub mod control;
pub mod crypto_provider;
pub mod dev;
pub mod devregistry;
pub mod discovery;
// Entry points of the fuzz targets (fuzz/) and of their corpus replay (tests/fuzz_corpus.rs).
#[doc(hidden)]
pub mod fuzzing;
pub mod hex;
pub mod http1;
pub mod metrics;
pub mod otel_export;
pub mod owned_headers;
pub mod pem;
pub mod policy;
pub mod prehashed;
pub mod proxy;
pub mod registration;
pub mod rewrite;
pub mod routing;
pub mod shutdown;
pub mod snapshot_writer;
pub mod state;
pub mod state_file;
pub mod status_cli;
pub mod telemetry;
pub mod tls;
pub mod trace_context;
pub mod traffic;
pub mod upstream_tls;
