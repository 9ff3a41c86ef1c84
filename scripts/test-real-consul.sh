#!/usr/bin/env bash
# test-real-consul.sh: runs the end-to-end suite against a real Consul agent.
#   CONSUL_HTTP_ADDR=127.0.0.1:8500 scripts/test-real-consul.sh
# Tests that need fault injection (only the embedded registry can misbehave on demand) say
# so and skip themselves; everything else talks to the agent exactly as in production.
set -euo pipefail
: "${CONSUL_HTTP_ADDR:?set CONSUL_HTTP_ADDR to a Consul agent, e.g. 127.0.0.1:8500}"
cd "$(dirname "$0")/.."
addr=$CONSUL_HTTP_ADDR
[[ $addr == *://* ]] || addr="http://$addr"
curl -fsS "$addr/v1/status/leader" >/dev/null || { echo "no Consul agent answers at $addr" >&2; exit 1; }
exec cargo test --tests -- --test-threads=2 "$@"
