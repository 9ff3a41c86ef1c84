#!/usr/bin/env bash
# Latency through a proxy to an upstream that writes an answer's head and body in two
# writes without TCP_NODELAY (scripts/nagle_upstream.py, as Python's http.server does):
# the upstream's Nagle holds the body until the head is acknowledged, and a proxy whose
# kernel delays that ACK adds up to 40 ms to every keep-alive request. One client
# connection (wrk -c1), requests one after another; direct, nginx (harness template, both
# upstream slots on the Python upstream) and Switchyard side by side, interleaved rounds,
# medians. BEFORE=<binary> adds a second Switchyard build (e.g. one without TCP_QUICKACK).
#
# Usage: scripts/bench-nagle.sh [--quick]   (--quick: 2 s runs, 1 rep; default ~2 min)
# Env:   BIN (a built gateway instead of a fresh release build), BEFORE, DURATION (5),
#        REPS (3), BENCH_DIR, ports as in bench-common.sh.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
DURATION="${DURATION:-5}"
REPS="${REPS:-3}"
if [[ "${1:-}" == "--quick" ]]; then
    DURATION=2 REPS=1
fi
NGINX_PORT="${NGINX_PORT:-18090}"

# shellcheck source=scripts/bench-common.sh
source "$ROOT/scripts/bench-common.sh"
bench_harness wrk nginx python3 curl taskset
bench_binary log

trap bench_cleanup EXIT
trap 'exit 130' INT TERM
bench_rundir
WORK="$BENCH_RUNDIR"

port_free "$UPSTREAM1_PORT" || die "port $UPSTREAM1_PORT already in use"
start_bg nagle-upstream 0 python3 "$ROOT/scripts/nagle_upstream.py" "$UPSTREAM1_PORT"
wait_ready "127.0.0.1:$UPSTREAM1_PORT" 10 || die "the Python upstream did not start"
CONSUL="http://127.0.0.1:$REGISTRY_PORT"
port_free "$REGISTRY_PORT" || die "port $REGISTRY_PORT already in use"
start_bg registry 0 "$BIN" registry --listen "127.0.0.1:$REGISTRY_PORT"
bench_wait_registry "$CONSUL" || die "registry did not start"
bench_register "$CONSUL" "$UPSTREAM1_PORT" || die "registering the upstream failed"
bench_route "$CONSUL" switchyard-bench/ root '{"service":"bench","path_prefix":"/"}' || die "storing the route failed"
bench_gateway_config >"$WORK/switchyard.toml"

UPSTREAM2_PORT="$UPSTREAM1_PORT" start_nginx_proxy nginx "$NGINX_PORT" 1 1
wait_ready "127.0.0.1:$NGINX_PORT" 10 || die "nginx did not start"

targets=("direct=127.0.0.1:$UPSTREAM1_PORT" "nginx-1w=127.0.0.1:$NGINX_PORT")
# gateway LABEL BINARY OFFSET: a gateway on PROXY_PORT+OFFSET (admin ADMIN_PORT+OFFSET).
gateway() {
    local port=$((PROXY_PORT + $3)) admin=$((ADMIN_PORT + $3))
    for p in "$port" "$admin"; do port_free "$p" || die "port $p already in use"; done
    start_bg "$1" 1 "$2" run --config "$WORK/switchyard.toml" --consul "$CONSUL" \
        --kv-prefix switchyard-bench/ --listen "127.0.0.1:$port" --admin "127.0.0.1:$admin"
    wait_ready "127.0.0.1:$port" 20 || die "$1 did not start (see $WORK/$1.out)"
    targets+=("$1=127.0.0.1:$port")
}
gateway switchyard "$BIN" 0
[[ -n "${BEFORE:-}" ]] && gateway switchyard-before "$BEFORE" 2

# one ADDR: "rps p50_ms p99_ms" of one run on one connection.
one() {
    timeout $((DURATION + 30)) taskset -c 0 wrk -t1 -c1 -d"${DURATION}s" --latency "http://$1/" 2>&1 |
        bench_wrk_summary | cut -d' ' -f1-3
}

declare -A RESULTS
for rep in $(seq "$REPS"); do
    for t in "${targets[@]}"; do
        RESULTS[${t%%=*}]+="$(one "${t#*=}")"$'\n'
    done
    log "round $rep of $REPS done"
done
printf '%-18s %9s %9s %9s\n' case req/s p50_ms p99_ms
for t in "${targets[@]}"; do
    name=${t%%=*}
    printf '%s' "${RESULTS[$name]}" | sort -k2 -n | awk -v n="$name" '
        { r[NR] = $1; a[NR] = $2; b[NR] = $3 }
        END { m = int((NR + 1) / 2); printf "%-18s %9d %9.3f %9.3f\n", n, r[m], a[m], b[m] }'
done
