# Shared by the benchmark scripts (sourced): the gateway's benchmark configuration and the
# dev registry set up with the benchmark service, so every script measures the same setup.

# The benchmark's ports, overridable through the environment; a script that needs others
# sets them before sourcing this file.
REGISTRY_PORT="${REGISTRY_PORT:-18500}"
PROXY_PORT="${PROXY_PORT:-18080}"
ADMIN_PORT="${ADMIN_PORT:-18901}"
export UPSTREAM1_PORT="${UPSTREAM1_PORT:-18081}" UPSTREAM2_PORT="${UPSTREAM2_PORT:-18082}"

# bench_knobs [--quick]: DURATION (10 s per run), REPS (3) and CONNS (50) from the
# environment, --quick for 3 s runs and 1 rep; HZ, the clock ticks of cpu_ticks.
bench_knobs() {
    DURATION="${DURATION:-10}"
    REPS="${REPS:-3}"
    CONNS="${CONNS:-50}"
    if [[ "${1:-}" == "--quick" ]]; then
        DURATION=3 REPS=1
    fi
    HZ=$(getconf CLK_TCK)
}

# bench_cpu_us TICKS OPS: CPU microseconds per operation, from cpu_ticks differences.
bench_cpu_us() {
    awk -v t="$1" -v hz="$HZ" -v n="$2" 'BEGIN { print (n > 0 ? t * 1e6 / hz / n : 0) }'
}

# bench_ratio A B: A / B (0 when B is 0).
bench_ratio() {
    awk -v a="$1" -v b="$2" 'BEGIN { print (b > 0 ? a / b : 0) }'
}

# bench_wrk_summary: reads `wrk --latency` output (with a Lua script's lines mixed in) and
# prints "rps p50_ms p99_ms requests errors"; errors are socket errors and non-2xx/3xx.
bench_wrk_summary() {
    awk '
        function ms(v) {
            if (v ~ /us$/) return v / 1000; if (v ~ /ms$/) return v + 0
            if (v ~ /m$/) return v * 60000; if (v ~ /s$/) return v * 1000; return v
        }
        /^ +50%/ { p50 = ms($2) }
        /^ +99%/ { p99 = ms($2) }
        /Requests\/sec:/ { rps = $2 }
        / requests in / { reqs = $1 }
        /Socket errors:/ { gsub(",", ""); err += $4 + $6 + $8 + $10 }
        /Non-2xx or 3xx responses:/ { err += $5 }
        END { printf "%.0f %.3f %.3f %d %d\n", rps, p50, p99, reqs, err }'
}

# bench_harness TOOL...: finds the shared benchmark harness (BENCH_DIR, else ../shared/bench
# next to the repository or next to a worktree's parent), sources its lib.sh (log, die,
# start_upstream, ...) and checks that each TOOL is installed. Needs ROOT.
bench_harness() {
    local d tool
    if [[ -z "${BENCH_DIR:-}" ]]; then
        for d in "$ROOT/../shared/bench" "$ROOT/../../shared/bench"; do
            [[ -f "$d/lib.sh" ]] && { BENCH_DIR="$(cd "$d" && pwd)"; break; }
        done
    fi
    BENCH_DIR="${BENCH_DIR:-$ROOT/../shared/bench}"
    [[ -f "$BENCH_DIR/lib.sh" ]] || { echo "no harness at $BENCH_DIR (set BENCH_DIR)" >&2; exit 1; }
    # shellcheck source=/dev/null
    source "$BENCH_DIR/lib.sh"
    for tool in "$@"; do
        command -v "$tool" >/dev/null || die "$tool is missing (see $BENCH_DIR/setup.sh)"
    done
}

# bench_binary LOGGER: the gateway to measure in $BIN: BIN as given (a built gateway, e.g.
# scripts/build-pgo.sh's), else a fresh release build. LOGGER is the script's log function;
# `die` must be defined.
bench_binary() {
    if [[ -n "${BIN:-}" ]]; then
        [[ -x "$BIN" ]] || die "BIN=$BIN is not an executable"
        "$1" "measuring $BIN"
    else
        "$1" "building switchyard (release)"
        (cd "$ROOT" && cargo build --release --locked --bin switchyard >&2)
        BIN="$ROOT/target/release/switchyard"
    fi
}

# bench_origin_and_registry [PORT...]: the run folder in $WORK (removed at exit, with every
# process started through the harness), then on CPU 0 the harness's one-worker nginx
# origin on each PORT (default UPSTREAM_PORT) and the dev registry ($BIN) on REGISTRY_PORT,
# at $CONSUL, with the origins registered as service `bench`. Needs bench_harness and
# bench_binary first.
bench_origin_and_registry() {
    local ports=("${@:-$UPSTREAM_PORT}") i=0 port
    trap bench_cleanup EXIT
    trap 'exit 130' INT TERM
    bench_rundir
    WORK="$BENCH_RUNDIR"
    for port in "${ports[@]}"; do
        i=$((i + 1))
        start_upstream "upstream$i" "$port" 0
        wait_ready "127.0.0.1:$port" 10 || die "upstream on $port did not start"
    done
    CONSUL="http://127.0.0.1:$REGISTRY_PORT"
    port_free "$REGISTRY_PORT" || die "port $REGISTRY_PORT already in use"
    start_bg registry 0 "$BIN" registry --listen "127.0.0.1:$REGISTRY_PORT"
    bench_wait_registry "$CONSUL" || die "registry did not start"
    bench_register "$CONSUL" "${ports[@]}" || die "registering the upstreams failed"
}

# bench_workdir NAME: a fresh temporary folder in $WORK, and $PIDS, whose processes are
# stopped (and the folder removed) when the script exits, however it exits.
bench_workdir() {
    WORK="$(mktemp -d "${TMPDIR:-/tmp}/$1.XXXXXX")"
    PIDS=()
    trap bench_workdir_cleanup EXIT
}

bench_workdir_cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    rm -rf "$WORK"
}

# bench_gateway_config: the part of the gateway's config every benchmark uses (one worker,
# a pool large enough for 256 connections, quiet logs, no self-registration). With
# ACCESS_LOG=1 the access log is on, as in production.
bench_gateway_config() {
    cat <<'EOF_CONFIG'
[proxy]
worker_threads = 1
pool_max_idle_per_host = 512
max_connections = 100000

[registration]
enabled = false

EOF_CONFIG
    if [[ "${ACCESS_LOG:-0}" == 1 ]]; then
        # On stderr, which the scripts send to a file: builds from before the file target
        # read the same config.
        printf '[log]\nlevel = "warn,access=info"\naccess_log = true\n'
    else
        printf '[log]\nlevel = "warn"\naccess_log = false\n'
    fi
}

# bench_nginx_access_log CONF: with ACCESS_LOG=1, turns the access log of an nginx config
# rendered from the harness's template on, buffered as production nginx runs it.
bench_nginx_access_log() {
    [[ "${ACCESS_LOG:-0}" == 1 ]] || return 0
    sed -i "s#access_log off;#access_log $WORK/nginx-access.log combined buffer=64k flush=1s;#" "$1"
}

# bench_wait_registry CONSUL_URL: waits up to 10 s for the registry to answer.
bench_wait_registry() {
    local _
    for _ in $(seq 100); do
        curl -sf "$1/v1/status/leader" >/dev/null && return 0
        sleep 0.1
    done
    return 1
}

# bench_register CONSUL_URL PORT...: registers instances bench-1, bench-2, ... of service
# `bench` on 127.0.0.1 at the given ports.
bench_register() {
    local consul=$1 i=0 port
    shift
    for port in "$@"; do
        i=$((i + 1))
        curl -sf -X PUT "$consul/v1/agent/service/register" \
            --data "{\"Name\":\"bench\",\"ID\":\"bench-$i\",\"Address\":\"127.0.0.1\",\"Port\":$port}" >/dev/null \
            || return 1
    done
}

# bench_route CONSUL_URL KV_PREFIX NAME JSON: stores a route document.
bench_route() {
    curl -sf -X PUT "$1/v1/kv/$2routes/$3" --data "$4" >/dev/null
}

# bench_gateway CONFIG CONSUL_URL LOG COMMAND...: starts `COMMAND run` (the binary, with
# any launcher such as taskset or valgrind in front) in the background on PROXY_PORT and
# ADMIN_PORT with the benchmark's KV prefix; its PID is in $! afterwards.
bench_gateway() {
    local config=$1 consul=$2 logfile=$3
    shift 3
    "$@" run --config "$config" --consul "$consul" --kv-prefix switchyard-bench/ \
        --listen "127.0.0.1:$PROXY_PORT" --admin "127.0.0.1:$ADMIN_PORT" >"$logfile" 2>&1 &
}

# bench_wait_url URL SECONDS [CURL-ARG...]: waits until URL answers with a success status
# (curl given the extra arguments, e.g. -k or -H).
bench_wait_url() {
    local url=$1 deadline=$((SECONDS + $2))
    shift 2
    until curl -sf --max-time 1 "$@" "$url" >/dev/null; do
        ((SECONDS < deadline)) || return 1
        sleep 0.1
    done
}

# bench_floor_config PORT: HAProxy in TCP mode on PORT, one thread, round-robin over the
# upstreams: each client connection gets its own upstream connection and bytes are copied
# both ways with no HTTP work, the least a proxy can do per request on this kernel.
bench_floor_config() {
    cat <<EOF_FLOOR
global
    nbthread 1
    maxconn 8000
defaults
    mode tcp
    timeout connect 5s
    timeout client 30s
    timeout server 30s
frontend fe
    bind 127.0.0.1:$1
    default_backend be
backend be
    balance roundrobin
    server u1 127.0.0.1:$UPSTREAM1_PORT
    server u2 127.0.0.1:$UPSTREAM2_PORT
EOF_FLOOR
}
