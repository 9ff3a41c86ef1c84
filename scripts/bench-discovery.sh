#!/usr/bin/env bash
# bench-discovery.sh [ARGS...]: discovery benchmark (propagation p50/p99; memory and CPU with
# 10,000 services x 10 instances, 1,000 routed). Builds in release mode and prints the figures.
# Talks to the agent at CONSUL_HTTP_ADDR when set, else to the embedded dev registry.
#   scripts/bench-discovery.sh                     # full run (a few minutes)
#   scripts/bench-discovery.sh --changes 50 --services 1000 --routed 100   # quicker
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --bin switchyard --example bench_discovery
echo "machine: $(nproc) cores, $(uname -sr)"
target/release/examples/bench_discovery --gateway target/release/switchyard "$@"
