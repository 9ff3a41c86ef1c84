//! HTTP/1.1, spoken by the gateway itself on both sides: the server connection that reads
//! clients' requests ([`server`]), the client connection and keep-alive pool that talk to
//! instances ([`client`], [`pool`]), and what they share: the head and body codec
//! ([`codec`]), the rules of header fields ([`fields`]) and the connections' I/O ([`io`]).
//!
//! It knows nothing of routes, auth or Consul: the gateway plugs in as a
//! [`server::Service`], hands requests to [`pool::Http1Pool`], and adds its own header
//! fields through [`fields::ExtraFields`]. Everything here reads bytes from peers that may
//! be hostile, so it is strict: where two implementations could read a message
//! differently, it refuses (the rules: docs/edge-hardening.md). [`fuzz`] holds the fuzz
//! targets' entry points.

pub mod client;
pub mod codec;
#[cfg(test)]
mod differential;
pub mod fields;
#[doc(hidden)]
pub mod fuzz;
pub mod io;
pub mod pool;
pub mod server;
