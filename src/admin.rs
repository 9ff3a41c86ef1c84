//! The admin listener: read-only JSON views of what the gateway believes, and metrics.
