//! TLS termination with rustls: certificates by SNI, hot reload, optional client certificates.
