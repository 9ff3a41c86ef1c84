#!/usr/bin/env bash
# The cost of a cluster-scope rate limit: req/s and p99 through the gateway (release build,
# 1 worker pinned to CPU 1) to one loopback upstream, on a route without a limit, with a
# local limit, and with a cluster-scope limit in a real redis-server — with leasing on
# (LEASE tokens per call) and off (one script call per request). The limit (1e6/s, burst
# 1e6) is high enough that nothing is refused: every case must answer only 200s.
#
# Two gateways run side by side on the same registry and routes, both on CPU 1: one with
# `lease = LEASE` (cases none, local, cluster_lease) and one with `lease = 0` (cluster_exact);
# only one is under load at a time. wrk, the upstream (the shared harness's one-worker nginx)
# and Redis run on CPU 0. All cases run interleaved; the table gives medians, req/s and p99
# over the local case, the gateway's CPU per request, and Redis script calls per request
# (what leasing saves). A case with a fallback decision (Redis over its budget) is flagged.
#
# Usage: scripts/bench-ratelimit.sh [--quick]   (--quick: 3 s runs, 1 rep; default ~2.5 min)
# Env:   BENCH_DIR (default ../shared/bench next to the repo), BIN (a built gateway instead
#        of a fresh release build), DURATION (10), REPS (3), CONNS (50), LEASE (100),
#        BUDGET_MS (5), OUT (result file), and the ports below.
# Not run in CI: timed targets live in scripts, never in tests.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
OUT="${OUT:-$ROOT/target/bench-ratelimit-result.txt}"
REGISTRY_PORT="${REGISTRY_PORT:-18590}"
PROXY_PORT="${PROXY_PORT:-18190}"
ADMIN_PORT="${ADMIN_PORT:-18991}"
PROXY2_PORT="${PROXY2_PORT:-18192}"
ADMIN2_PORT="${ADMIN2_PORT:-18993}"
UPSTREAM_PORT="${UPSTREAM_PORT:-18191}"
REDIS_PORT="${REDIS_PORT:-18379}"
DURATION="${DURATION:-10}"
REPS="${REPS:-3}"
CONNS="${CONNS:-50}"
LEASE="${LEASE:-100}"
BUDGET_MS="${BUDGET_MS:-5}"
if [[ "${1:-}" == "--quick" ]]; then
    DURATION=3 REPS=1
fi

# Ports first: bench-common.sh keeps those already set.
# shellcheck source=scripts/bench-common.sh
source "$ROOT/scripts/bench-common.sh"
bench_harness wrk nginx redis-server redis-cli curl taskset
bench_binary log

HZ=$(getconf CLK_TCK)

# --- the upstream, the registry and Redis ---------------------------------------------------
bench_origin_and_registry
put() { curl -sf -X PUT "$CONSUL$1" --data "$2" >/dev/null || die "PUT $1"; }
port_free "$REDIS_PORT" || die "port $REDIS_PORT already in use"
start_bg redis 0 redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no \
    --dir "$WORK"
rcli() { redis-cli -p "$REDIS_PORT" "$@"; }
for _ in $(seq 100); do [[ $(rcli ping 2>/dev/null) == PONG ]] && break; sleep 0.1; done
[[ $(rcli ping 2>/dev/null) == PONG ]] || die "redis-server did not start"

LIMIT='"per_second":1000000,"burst":1000000'
route() { put "/v1/kv/bench-rl/routes/$1" "{\"service\":\"bench\",\"path_prefix\":\"/$1\"$2}"; }
route none ''
route local ",\"rate_limit\":{$LIMIT}"
route cluster ",\"rate_limit\":{$LIMIT,\"scope\":\"cluster\"}"

# --- the two gateways -------------------------------------------------------------------------
gateway() { # gateway NAME PROXY ADMIN LEASE
    {
        bench_gateway_config
        printf '[rate_limit]\nredis_url = "redis://127.0.0.1:%s"\nbudget_ms = %s\nlease = %s\n' \
            "$REDIS_PORT" "$BUDGET_MS" "$4"
    } >"$WORK/$1.toml"
    "$BIN" check-config "$WORK/$1.toml" >/dev/null || die "bad generated config $WORK/$1.toml"
    for p in "$2" "$3"; do port_free "$p" || die "port $p already in use"; done
    start_bg "$1" 1 "$BIN" run --config "$WORK/$1.toml" --consul "$CONSUL" \
        --kv-prefix bench-rl/ --listen "127.0.0.1:$2" --admin "127.0.0.1:$3"
}
gateway leased "$PROXY_PORT" "$ADMIN_PORT" "$LEASE"
GW1_PID=$LAST_PID
gateway exact "$PROXY2_PORT" "$ADMIN2_PORT" 0
GW2_PID=$LAST_PID

# case|port|admin|pid|path
CASES=(
    "none|$PROXY_PORT|$ADMIN_PORT|$GW1_PID|/none/"
    "local|$PROXY_PORT|$ADMIN_PORT|$GW1_PID|/local/"
    "cluster_lease|$PROXY_PORT|$ADMIN_PORT|$GW1_PID|/cluster/"
    "cluster_exact|$PROXY2_PORT|$ADMIN2_PORT|$GW2_PID|/cluster/"
)
for c in "${CASES[@]}"; do
    IFS='|' read -r name port admin _ path <<<"$c"
    bench_wait_url "http://127.0.0.1:$port$path" 15 \
        || die "case $name: $path does not answer 200 (see $WORK/*.out; KEEP_RUNDIR=1)"
    bench_wait_url "http://127.0.0.1:$admin/rate_limits" 5 || die "case $name: no /rate_limits"
done
for admin in "$ADMIN_PORT" "$ADMIN2_PORT"; do
    for _ in $(seq 100); do
        curl -sf "http://127.0.0.1:$admin/rate_limits" | grep -Eq '"state": ?"up"' && break
        sleep 0.1
    done
    curl -sf "http://127.0.0.1:$admin/rate_limits" | grep -Eq '"state": ?"up"' \
        || die "the gateway on admin $admin does not see Redis up"
done

# wrk_once PORT PATH: "rps p50_ms p99_ms requests errors" of one run.
wrk_once() {
    timeout $((DURATION + 30)) taskset -c 0 wrk -t1 -c"$CONNS" -d"${DURATION}s" --latency \
        "http://127.0.0.1:$1$2" 2>&1 | bench_wrk_summary
}
# Script calls Redis has run (EVALSHA, and EVAL after a script cache miss).
script_calls() {
    rcli info commandstats | awk -F'[=,:]' '/^cmdstat_eval(sha)?:/ { n += $3 } END { print n + 0 }'
}
fallbacks() { # fallbacks ADMIN_PORT
    curl -sf "http://127.0.0.1:$1/rate_limits" |
        grep -Eo '"fallback_decisions": ?[0-9]+' | grep -Eo '[0-9]+$'
}

log "${#CASES[@]} cases x $REPS reps x ${DURATION}s at -c$CONNS, lease $LEASE, budget ${BUDGET_MS}ms, interleaved"
rows="$WORK/rows"
: >"$rows"
for c in "${CASES[@]}"; do # warm-up (connections, pools, script cache)
    IFS='|' read -r name port _ _ path <<<"$c"
    DURATION=2 wrk_once "$port" "$path" >/dev/null
done
for rep in $(seq "$REPS"); do
    for c in "${CASES[@]}"; do
        IFS='|' read -r name port admin pid path <<<"$c"
        t0=$(cpu_ticks "$pid")
        s0=$(script_calls)
        f0=$(fallbacks "$admin")
        read -r rps p50 p99 reqs err < <(wrk_once "$port" "$path")
        t1=$(cpu_ticks "$pid")
        s1=$(script_calls)
        f1=$(fallbacks "$admin")
        us=$(awk -v t=$((t1 - t0)) -v hz="$HZ" -v n="$reqs" 'BEGIN { print (n > 0 ? t * 1e6 / hz / n : 0) }')
        calls=$(awk -v s=$((s1 - s0)) -v n="$reqs" 'BEGIN { print (n > 0 ? s / n : 0) }')
        echo "$name $rep $rps $p50 $p99 $err $us $calls $((f1 - f0))" >>"$rows"
        log "run $rep/$REPS $name: $rps req/s p50 ${p50}ms p99 ${p99}ms errors $err gateway ${us} us/req redis ${calls} calls/req fallbacks $((f1 - f0))"
    done
done
for pid in "$GW1_PID" "$GW2_PID"; do
    alive "$pid" || die "a gateway died during the run (see $WORK/*.out)"
done

col() { awk -v n="$1" -v f="$2" '$1 == n { print $f }' "$rows" | median; }
sum() { awk -v n="$1" -v f="$2" '$1 == n { s += $f } END { print s + 0 }' "$rows"; }
base=$(col local 3)
base_p99=$(col local 5)
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { print (b > 0 ? a / b : 0) }'; }
mkdir -p "$(dirname "$OUT")"
{
    echo "# switchyard rate limits, $(date -u +%F), 1 worker on CPU 1, wrk -c$CONNS and redis-server on CPU 0, ${DURATION}s x $REPS, lease $LEASE, budget ${BUDGET_MS}ms"
    printf '%-14s %10s %9s %8s %8s %10s %7s %11s %10s %9s\n' case req/s vs_local p50_ms p99_ms \
        p99_vs_loc errors cpu_us/req redis/req fallbacks
    for c in "${CASES[@]}"; do
        IFS='|' read -r name _ _ _ _ <<<"$c"
        rps=$(col "$name" 3)
        p99=$(col "$name" 5)
        printf '%-14s %10.0f %9.3f %8.3f %8.3f %10.3f %7d %11.2f %10.4f %9d\n' "$name" "$rps" \
            "$(ratio "$rps" "$base")" "$(col "$name" 4)" "$p99" "$(ratio "$p99" "$base_p99")" \
            "$(sum "$name" 6)" "$(col "$name" 7)" "$(col "$name" 8)" "$(sum "$name" 9)"
    done
} | tee "$OUT"
