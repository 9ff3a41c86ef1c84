//! Which instances may serve, decided from their Consul checks: one pure function.
