//! The data plane: listeners, the per-request handler, forwarding, retries and errors.
