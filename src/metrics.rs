//! Every metric name, registered in one place, and the Prometheus renderer.
