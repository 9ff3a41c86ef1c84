#!/usr/bin/env bash
# bench-discovery.sh [ARGS...]: discovery benchmark (propagation p50/p99; memory and CPU with
# 10,000 services x 10 instances, 1,000 routed). Builds in release mode, starts the embedded
# registry unless CONSUL_HTTP_ADDR points at an agent, and prints the figures.
#   scripts/bench-discovery.sh                     # full run (a few minutes)
#   scripts/bench-discovery.sh --changes 50 --services 1000 --routed 100   # quicker
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --bin switchyard --example bench_discovery
registry_pid=
cleanup() { [[ -n $registry_pid ]] && kill "$registry_pid" 2>/dev/null || true; }
trap cleanup EXIT
if [[ -z ${CONSUL_HTTP_ADDR:-} ]]; then
    port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    RUST_LOG=warn target/release/switchyard registry --listen "127.0.0.1:$port" &
    registry_pid=$!
    export CONSUL_HTTP_ADDR="127.0.0.1:$port"
    for _ in $(seq 100); do
        curl -fsS "http://$CONSUL_HTTP_ADDR/v1/status/leader" >/dev/null 2>&1 && break
        sleep 0.1
    done
    echo "embedded registry at $CONSUL_HTTP_ADDR (pid $registry_pid)"
fi
echo "machine: $(nproc) cores, $(uname -sr)"
target/release/examples/bench_discovery --gateway target/release/switchyard "$@"
