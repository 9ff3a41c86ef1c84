//! The Consul HTTP client and the generic blocking-query watch loop. Knows nothing of the gateway.
