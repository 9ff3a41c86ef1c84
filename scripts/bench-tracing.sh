#!/usr/bin/env bash
# What distributed tracing costs the proxy: the same keep-alive load (wrk, one route, two
# nginx upstreams) with span export off, on at 1% sampling and on at 100%, each measured
# twice: requests per second on one pinned core (wall clock: compare the ratios, a shared
# machine moves absolute figures by 10-30%), and instructions per request under callgrind
# (exact, as scripts/bench-cost.sh counts them). W3C trace context is propagated in every
# mode (it is always on); "off" has no `[tracing] otlp_endpoint`. Spans go to a local
# OTLP/HTTP sink that reads and discards them (on the upstreams' core).
#
# Usage: scripts/bench-tracing.sh          (a fresh release build; BIN=... measures a build)
# Env:   CONNS (50), DURATION (seconds of wrk per mode, 10), COUNT_DURATION (seconds counted
#        under callgrind per mode, 8), BENCH_DIR (../shared/bench), OTLP_PORT (18318).
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
BENCH_DIR="${BENCH_DIR:-$ROOT/../shared/bench}"
CONNS="${CONNS:-50}"
DURATION="${DURATION:-10}"
COUNT_DURATION="${COUNT_DURATION:-8}"
OTLP_PORT="${OTLP_PORT:-18318}"

# shellcheck source=scripts/bench-common.sh
source "$ROOT/scripts/bench-common.sh"
say() { printf '[bench-tracing] %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

for tool in valgrind callgrind_control wrk python3 curl taskset; do
    command -v "$tool" >/dev/null || die "$tool is missing (apt-get install valgrind python3 curl; wrk: $BENCH_DIR/setup.sh)"
done
[[ -x "$BENCH_DIR/upstream.sh" ]] || die "no harness at $BENCH_DIR (set BENCH_DIR)"
bench_binary say

bench_workdir switchyard-tracing
say "starting the upstreams, the dev registry and the OTLP sink (CPU 0)"
CONSUL="http://127.0.0.1:$REGISTRY_PORT"
UPSTREAM_CPUS=0 "$BENCH_DIR/upstream.sh" 3600 >"$WORK/upstreams.log" 2>&1 &
PIDS+=($!)
taskset -c 0 "$BIN" registry --listen "127.0.0.1:$REGISTRY_PORT" >"$WORK/registry.log" 2>&1 &
PIDS+=($!)
# The OTLP/HTTP sink: answers every export with 200 and an empty ExportTraceServiceResponse.
taskset -c 0 python3 - "$OTLP_PORT" >"$WORK/sink.log" 2>&1 <<'PY' &
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
class Sink(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_POST(self):
        self.rfile.read(int(self.headers.get("content-length", "0")))
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", "0")
        self.end_headers()
    def log_message(self, *args):
        pass
ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Sink).serve_forever()
PY
PIDS+=($!)
bench_wait_registry "$CONSUL" || die "registry did not start (see $WORK/registry.log)"
for _ in $(seq 100); do
    curl -sf "http://127.0.0.1:$UPSTREAM1_PORT/" >/dev/null \
        && curl -sf "http://127.0.0.1:$UPSTREAM2_PORT/" >/dev/null && break
    sleep 0.1
done
curl -sf "http://127.0.0.1:$UPSTREAM2_PORT/" >/dev/null || die "upstreams did not start (see $WORK/upstreams.log)"
bench_register "$CONSUL" "$UPSTREAM1_PORT" "$UPSTREAM2_PORT" || die "registering the upstreams failed"
bench_route "$CONSUL" switchyard-bench/ root '{"service":"bench","path_prefix":"/"}' || die "storing the route failed"

# config MODE: the benchmark config with tracing as MODE says (off, or a sample ratio).
config() {
    bench_gateway_config
    if [[ "$1" != off ]]; then
        printf '[tracing]\notlp_endpoint = "http://127.0.0.1:%s"\nsample_ratio = %s\n' "$OTLP_PORT" "$1"
    fi
}

# metric NAME [LABEL_MATCH]: the sum of a counter's series on the admin listener.
metric() {
    curl -sf "http://127.0.0.1:$ADMIN_PORT/metrics" \
        | awk -v n="$1" -v m="${2:-}" '$1 ~ "^"n && (m == "" || $1 ~ m) { s += $2 } END { printf "%d\n", s }'
}

served() {
    curl -sf "http://127.0.0.1:$ADMIN_PORT/metrics" \
        | awk '/^switchyard_requests_total/ { if ($0 ~ /status="200"/) ok += $2; all += $2 } END { printf "%d %d\n", ok, all }'
}

stop() {
    kill "$1" 2>/dev/null || true
    wait "$1" 2>/dev/null || true
}

# instructions FILE REQUESTS: the dump's instructions per request.
instructions() {
    awk -v n="$2" '/^events:/ { for (i = 2; i <= NF; i++) if ($i == "Ir") col = i - 1 }
        /^summary:/ { printf "%.0f\n", $(col + 1) / n }' "$1"
}

declare -A RPS INSTR SPANS DROPPED
MODES=(off 0.01 1.0)
for mode in "${MODES[@]}"; do
    config "$mode" >"$WORK/switchyard.toml"

    # Requests per second: the gateway alone on CPU 1, wrk on CPU 0.
    bench_gateway "$WORK/switchyard.toml" "$CONSUL" "$WORK/gateway-$mode.log" taskset -c 1 "$BIN"
    gw=$!
    PIDS+=("$gw")
    bench_wait_url "http://127.0.0.1:$ADMIN_PORT/ready" 30 || die "gateway not ready (see $WORK/gateway-$mode.log)"
    bench_wait_url "http://127.0.0.1:$PROXY_PORT/" 30 || die "the route does not answer (mode $mode)"
    say "tracing $mode: warm-up, then ${DURATION}s of wrk -c$CONNS"
    taskset -c 0 wrk -t1 -c"$CONNS" -d3s "http://127.0.0.1:$PROXY_PORT/" >/dev/null
    read -r ok0 all0 < <(served)
    taskset -c 0 wrk -t1 -c"$CONNS" -d"${DURATION}s" "http://127.0.0.1:$PROXY_PORT/" >"$WORK/wrk-$mode.txt"
    read -r ok1 all1 < <(served)
    [[ $((ok1 - ok0)) -eq $((all1 - all0)) ]] || die "mode $mode: $((all1 - all0 - ok1 + ok0)) requests were not 200"
    RPS[$mode]=$(awk '/^Requests\/sec/ { printf "%.0f\n", $2 }' "$WORK/wrk-$mode.txt")
    sleep 2 # the last batch goes out
    SPANS[$mode]=$(metric switchyard_otlp_spans_exported_total)
    DROPPED[$mode]=$(metric switchyard_otlp_spans_dropped_total)
    stop "$gw"

    # Instructions per request, under callgrind.
    out="$WORK/callgrind.out"
    bench_gateway "$WORK/switchyard.toml" "$CONSUL" "$WORK/gateway-$mode-vg.log" \
        taskset -c 1 valgrind --tool=callgrind --callgrind-out-file="$out" "$BIN"
    vg=$!
    PIDS+=("$vg")
    bench_wait_url "http://127.0.0.1:$ADMIN_PORT/ready" 60 || die "gateway not ready under valgrind"
    say "tracing $mode: ${COUNT_DURATION}s counted under callgrind"
    taskset -c 0 wrk -t1 -c"$CONNS" -d3s "http://127.0.0.1:$PROXY_PORT/" >/dev/null
    read -r ok0 all0 < <(served)
    callgrind_control -z "$vg" >/dev/null 2>&1
    taskset -c 0 wrk -t1 -c"$CONNS" -d"${COUNT_DURATION}s" "http://127.0.0.1:$PROXY_PORT/" >/dev/null
    callgrind_control -d "$vg" >/dev/null 2>&1
    read -r ok1 all1 < <(served)
    stop "$vg"
    n=$((all1 - all0))
    [[ $n -gt 0 && $((ok1 - ok0)) -eq $n ]] || die "mode $mode: no or failed requests under callgrind"
    dump=$(ls "$out".* 2>/dev/null | head -n 1)
    [[ -n "$dump" ]] || die "callgrind wrote no dump"
    INSTR[$mode]=$(instructions "$dump" "$n")
    rm -f "$out" "$out".*
done

printf '%-12s %10s %8s %11s %8s %14s %9s\n' "tracing" "req/s" "vs off" "instr/req" "vs off" "spans exported" "dropped"
for mode in "${MODES[@]}"; do
    case $mode in off) label="off" ;; 0.01) label="on, 1%" ;; *) label="on, 100%" ;; esac
    printf '%-12s %10s %7.1f%% %11s %7.1f%% %14s %9s\n' "$label" "${RPS[$mode]}" \
        "$(awk -v a="${RPS[$mode]}" -v b="${RPS[off]}" 'BEGIN { print 100 * (a - b) / b }')" \
        "${INSTR[$mode]}" \
        "$(awk -v a="${INSTR[$mode]}" -v b="${INSTR[off]}" 'BEGIN { print 100 * (a - b) / b }')" \
        "${SPANS[$mode]}" "${DROPPED[$mode]}"
done
say "req/s: one run per mode on a shared machine (compare the ratios); instr/req: exact."
