//! Gateway → backend trust: short-lived signed assertions and the JWKS that verifies them.
