#!/usr/bin/env bash
# Switchyard vs nginx vs HAProxy, side by side in one run, on the same two loopback
# upstreams, with the shared harness (../shared/bench: wrk, 1 proxy worker pinned to CPU 1).
#
# Switchyard runs as in production: it learns the two upstreams from a Consul-compatible
# registry (the embedded dev registry, started here) and its route from KV.
#
# Usage: scripts/bench.sh [--quick]       (--quick: 3 s runs, 1 rep; default ~5 min)
# Env:   BENCH_DIR (default ../shared/bench next to the repo), LAYOUTS (default pinned),
#        DURATION, REPS, CONNS (passed to the harness), OUT (result file), BIN (a built
#        gateway to measure instead of a fresh release build, e.g. scripts/build-pgo.sh's),
#        FLOOR (1: also measure HAProxy in TCP mode, a byte pipe per client connection that
#        does no HTTP work: the least CPU any proxy can spend per request on this kernel),
#        FLOOR_PORT (18095), ACCESS_LOG (1: access logs on: Switchyard's, and an nginx with
#        `access_log ... buffer=64k` on NGINX_LOG_PORT, 18096, which the target is stated
#        against).
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
BENCH_DIR="${BENCH_DIR:-$ROOT/../shared/bench}"
OUT="${OUT:-$ROOT/target/bench-result.txt}"
export LAYOUTS="${LAYOUTS:-pinned}"
if [[ "${1:-}" == "--quick" ]]; then
    export DURATION="${DURATION:-3}" REPS="${REPS:-1}"
fi

# shellcheck source=scripts/bench-common.sh
source "$ROOT/scripts/bench-common.sh"
say() { printf '[bench] %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

[[ -x "$BENCH_DIR/anchors.sh" ]] || die "no harness at $BENCH_DIR (set BENCH_DIR)"
if ! command -v wrk >/dev/null || ! command -v nginx >/dev/null || ! command -v haproxy >/dev/null; then
    say "installing wrk, nginx, haproxy ($BENCH_DIR/setup.sh)"
    "$BENCH_DIR/setup.sh" >/dev/null
fi

bench_binary say

bench_workdir switchyard-bench

CONSUL="http://127.0.0.1:$REGISTRY_PORT"
say "starting the dev registry on $CONSUL (CPU 0)"
taskset -c 0 "$BIN" registry --listen "127.0.0.1:$REGISTRY_PORT" >"$WORK/registry.log" 2>&1 &
PIDS+=($!)
bench_wait_registry "$CONSUL" || die "registry did not start (see $WORK/registry.log)"
bench_register "$CONSUL" "$UPSTREAM1_PORT" "$UPSTREAM2_PORT" || die "registering the upstreams failed"
bench_route "$CONSUL" switchyard-bench/ root '{"service":"bench","path_prefix":"/"}' || die "storing the route failed"
bench_gateway_config >"$WORK/switchyard.toml"

say "starting switchyard on 127.0.0.1:$PROXY_PORT (1 worker, CPU 1)"
bench_gateway "$WORK/switchyard.toml" "$CONSUL" "$WORK/switchyard.log" taskset -c 1 "$BIN"
GW_PID=$!
PIDS+=("$GW_PID")
bench_wait_url "http://127.0.0.1:$ADMIN_PORT/ready" 10 || die "gateway not ready (see $WORK/switchyard.log)"
routes=$( (curl -sf "http://127.0.0.1:$ADMIN_PORT/upstreams" || true) | grep -o "bench-[12]" | sort -u | wc -l)
[[ "$routes" -ge 2 ]] || say "warning: the gateway does not list both upstreams yet"

targets=("switchyard=127.0.0.1:$PROXY_PORT@$GW_PID")
if [[ "${ACCESS_LOG:-0}" == 1 ]]; then
    # nginx with its access log on, buffered as in production (the harness's nginx-1w
    # keeps its log off): Switchyard's line is compared with this one.
    NGINX_LOG_PORT="${NGINX_LOG_PORT:-18096}"
    sed -e "s/@WORKERS@/1/; s/@PORT@/$NGINX_LOG_PORT/; s/@UPSTREAM1@/$UPSTREAM1_PORT/; s/@UPSTREAM2@/$UPSTREAM2_PORT/" \
        -e "s#@RUNDIR@#$WORK#g; s/@NAME@/nginx-log/g" \
        "$BENCH_DIR/conf/proxy.nginx.conf.tmpl" >"$WORK/nginx-log.conf"
    bench_nginx_access_log "$WORK/nginx-log.conf"
    say "starting nginx with its access log on 127.0.0.1:$NGINX_LOG_PORT (1 worker, CPU 1)"
    taskset -c 1 nginx -e "$WORK/nginx-log.error.log" -p "$WORK" -c "$WORK/nginx-log.conf" -g 'daemon off;' &
    PIDS+=($!)
    targets+=("nginx-log=127.0.0.1:$NGINX_LOG_PORT@$!")
fi
if [[ "${FLOOR:-0}" == 1 ]]; then
    FLOOR_PORT="${FLOOR_PORT:-18095}"
    bench_floor_config "$FLOOR_PORT" >"$WORK/l4-floor.cfg"
    say "starting the L4 floor (HAProxy, mode tcp) on 127.0.0.1:$FLOOR_PORT (1 thread, CPU 1)"
    taskset -c 1 haproxy -f "$WORK/l4-floor.cfg" >"$WORK/l4-floor.log" 2>&1 &
    PIDS+=($!)
    targets+=("l4-floor=127.0.0.1:$FLOOR_PORT@$!")
fi

say "running the harness (LAYOUTS=$LAYOUTS DURATION=${DURATION:-10} REPS=${REPS:-3}); results in $OUT"
mkdir -p "$(dirname "$OUT")"
"$BENCH_DIR/anchors.sh" "${targets[@]}" | tee "$OUT"
if grep -v ' INFO access: ' "$WORK/switchyard.log" | grep -q .; then
    say "gateway log (warnings and errors):"
    grep -v ' INFO access: ' "$WORK/switchyard.log" | tail -n 20 >&2
fi

# The issue's target, stated against this run: req/s >= 1.10x nginx-1w with p99 <= nginx-1w.
awk '
    $1 == anchor && $2 ~ /^c[0-9]+$/       { nrps[$2] = $3; np99[$2] = $5 }
    $1 == "switchyard" && $2 ~ /^c[0-9]+$/ { srps[$2] = $3; sp99[$2] = $5; order[++n] = $2 }
    $1 == anchor && NF == 4                { ncpu = $4 }
    $1 == "switchyard" && NF == 4          { scpu = $4 }
    $1 == "l4-floor" && $2 ~ /^c[0-9]+$/   { frps[$2] = $3; fp99[$2] = $5 }
    $1 == "l4-floor" && NF == 4            { fcpu = $4 }
    END {
        if (n == 0) exit
        print ""
        print "switchyard vs " anchor " (target: req/s >= 1.10x with p99 <= nginx)"
        for (i = 1; i <= n; i++) {
            c = order[i]
            if (!(c in nrps) || nrps[c] == 0) continue
            r = srps[c] / nrps[c]
            ok = (r >= 1.10 && sp99[c] <= np99[c]) ? "met" : "not met"
            printf "  %-5s req/s %.2fx   p99 %s vs %s ms   %s\n", c, r, sp99[c], np99[c], ok
        }
        if (ncpu > 0) printf "  cpu_us_per_req %.2fx\n", scpu / ncpu
        if (length(frps) == 0) exit
        print "l4-floor (a byte pipe, no HTTP work) vs " anchor
        for (i = 1; i <= n; i++) {
            c = order[i]
            if (!(c in nrps) || nrps[c] == 0) continue
            printf "  %-5s req/s %.2fx   p99 %s vs %s ms\n", c, frps[c] / nrps[c], fp99[c], np99[c]
        }
        if (ncpu > 0) printf "  cpu_us_per_req %.2fx\n", fcpu / ncpu
    }' anchor="$([[ "${ACCESS_LOG:-0}" == 1 ]] && echo nginx-log || echo nginx-1w)" "$OUT" | tee -a "$OUT"
