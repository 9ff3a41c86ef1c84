#!/usr/bin/env bash
# CPU work per proxied request, counted rather than timed: the gateway runs under
# valgrind's callgrind while wrk drives it, and the counts between a warm-up and the end
# of the load are divided by the requests served. Instructions and simulated cache misses
# do not move with the neighbours on a shared machine, so two builds can be compared
# exactly (wall-clock ratios here move by 10-30% from one minute to the next).
#
# The last-level cache is simulated at 2 MiB (this machine has 1 MiB of L2 per core in
# front of a shared L3): with hundreds of connections, the state of requests in flight no
# longer fits, and its misses per request are what grows from c50 to c256.
#
# Usage: scripts/bench-cost.sh [BINARY...]   (default: a fresh release build)
#        Several binaries (e.g. builds of two commits) are measured one after the other
#        and printed side by side.
# Env:   CONNS ("50 256"), DURATION (seconds of counted load per case, 8), TOP (functions
#        listed per case, 15; 0 for none), LL (simulated last level: size,assoc,line),
#        NGINX (1: also count nginx as a one-worker proxy, the harness's anchor),
#        FLOOR (1: also count HAProxy in TCP mode, the byte-pipe floor of scripts/bench.sh),
#        BENCH_DIR (../shared/bench, for the upstreams), ports as in scripts/bench.sh,
#        DUMPS (a folder to keep the callgrind dumps in, for callgrind_annotate),
#        ACCESS_LOG (1: access logs on at both sides, to files: Switchyard's default writer,
#        nginx's `combined` format with `buffer=64k`),
#        H2 (1: HTTP/2 from the client instead, h2c by prior knowledge with h2load, CONNS
#        connections of STREAMS concurrent streams each (default 1); nginx gets `http2` on
#        its listener).
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
BENCH_DIR="${BENCH_DIR:-$ROOT/../shared/bench}"
CONNS="${CONNS:-50 256}"
DURATION="${DURATION:-8}"
TOP="${TOP:-15}"
LL="${LL:-2097152,16,64}"

# shellcheck source=scripts/bench-common.sh
source "$ROOT/scripts/bench-common.sh"
say() { printf '[bench-cost] %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

H2="${H2:-0}"
STREAMS="${STREAMS:-1}"
[[ $H2 == 1 ]] && ! command -v h2load >/dev/null && die "h2load is missing (apt-get install nghttp2-client)"
for tool in valgrind callgrind_control wrk python3 curl nginx; do
    command -v "$tool" >/dev/null || die "$tool is missing (apt-get install valgrind python3 curl; wrk and nginx: $BENCH_DIR/setup.sh)"
done
[[ -x "$BENCH_DIR/upstream.sh" ]] || die "no harness at $BENCH_DIR (set BENCH_DIR)"

BINS=("$@")
if [[ ${#BINS[@]} -eq 0 ]]; then
    say "building switchyard (release)"
    (cd "$ROOT" && cargo build --release --locked --bin switchyard >&2)
    BINS=("$ROOT/target/release/switchyard")
fi

bench_workdir switchyard-cost

say "starting the upstreams (CPU 0) and the dev registry"
CONSUL="http://127.0.0.1:$REGISTRY_PORT"
UPSTREAM_CPUS=0 "$BENCH_DIR/upstream.sh" 3600 >"$WORK/upstreams.log" 2>&1 &
PIDS+=($!)
taskset -c 0 "${BINS[0]}" registry --listen "127.0.0.1:$REGISTRY_PORT" >"$WORK/registry.log" 2>&1 &
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
bench_gateway_config >"$WORK/switchyard.toml"

# load CONNECTIONS SECONDS: drives the proxy on PROXY_PORT and prints the requests it
# completed (wrk, or h2load with H2=1).
load() {
    if [[ $H2 == 1 ]]; then
        taskset -c 0 h2load -c"$1" -m"$STREAMS" -D"$2" "http://127.0.0.1:$PROXY_PORT/" \
            | awk '/^requests:/ { print $8 }'
    else
        taskset -c 0 wrk -t1 -c"$1" -d"$2s" "http://127.0.0.1:$PROXY_PORT/" | awk '/requests in/ { print $1 }'
    fi
}

served() {
    curl -sf "http://127.0.0.1:$ADMIN_PORT/metrics" \
        | awk '/^switchyard_requests_total/ { if ($0 ~ /status="200"/) ok += $2; all += $2 } END { printf "%d %d\n", ok, all }'
}

# report FILE REQUESTS LABEL: totals per request and the functions with the most
# instructions of their own.
report() {
    python3 - "$1" "$2" "$3" "$TOP" <<'PY'
import collections, re, sys
path, n, label, top = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
names, own = {}, collections.Counter()
events, totals, fn, after_call = [], None, None, False
def name(ref):
    m = re.match(r'\((\d+)\)(?: (.*))?', ref)
    if not m:
        return ref
    if m.group(2):
        names[m.group(1)] = m.group(2)
    return names.get(m.group(1), m.group(1))
for line in open(path):
    line = line.rstrip('\n')
    if line.startswith('events:'):
        events = line.split()[1:]
    elif line.startswith('summary:'):
        totals = [int(x) for x in line.split()[1:]]
    elif line.startswith('fn='):
        fn = name(line[3:])
    elif line.startswith('cfn='):
        name(line[4:])
    elif line.startswith('calls='):
        after_call = True
    elif line[:1].isdigit() or line[:1] in '+-*':
        if after_call:  # the inclusive cost of a call, not this function's own
            after_call = False
        elif fn is not None and len(line.split()) > 1:
            own[fn] += int(line.split()[1])
t = dict(zip(events, totals))
print(f"{label:<28} {t['Ir']/n:9.0f} {t['I1mr']/n:9.1f} {t['D1mr']/n + t['D1mw']/n:9.1f} {t['DLmr']/n + t['DLmw']/n:9.1f}")
if top:
    for f, ir in own.most_common(top):
        print(f"    {ir/n:7.0f}  {100*ir/t['Ir']:4.1f}%  {f[:110]}")
PY
}

keep_dump() {
    [[ -z "${DUMPS:-}" ]] && return 0
    mkdir -p "$DUMPS" && cp "$1" "$DUMPS/callgrind.$2.out"
}

printf '%-28s %9s %9s %9s %9s\n' "case" "instr/req" "L1i_miss" "L1d_miss" "LL_miss"
for bin in "${BINS[@]}"; do
    label_base="$(basename "$bin")"
    for c in $CONNS; do
        out="$WORK/callgrind.out"
        bench_gateway "$WORK/switchyard.toml" "$CONSUL" "$WORK/gateway.log" \
            taskset -c 1 valgrind --tool=callgrind --cache-sim=yes --LL="$LL" \
            --callgrind-out-file="$out" "$bin"
        vg=$!
        PIDS+=("$vg")
        bench_wait_url "http://127.0.0.1:$ADMIN_PORT/ready" 60 \
            || die "gateway not ready under valgrind (see $WORK/gateway.log)"
        say "$label_base c$c: warm-up, then ${DURATION}s counted"
        load "$c" 3 >/dev/null
        read -r ok0 all0 < <(served)
        callgrind_control -z "$vg" >/dev/null 2>&1
        load "$c" "$DURATION" >/dev/null
        callgrind_control -d "$vg" >/dev/null 2>&1
        read -r ok1 all1 < <(served)
        kill "$vg" 2>/dev/null || true
        wait "$vg" 2>/dev/null || true
        n=$((all1 - all0))
        [[ $n -gt 0 ]] || die "no requests counted for $label_base c$c"
        [[ $((ok1 - ok0)) -eq $n ]] || die "$((n - ok1 + ok0)) of $n requests were not 200: the figures would be of errors"
        dump=$(ls "$out".* 2>/dev/null | head -n 1)
        [[ -n "$dump" ]] || die "callgrind wrote no dump"
        report "$dump" "$n" "$label_base c$c"
        keep_dump "$dump" "$label_base-c$c"
        rm -f "$out" "$out".*
    done
done
# count_anchor LABEL COMMAND...: counts another proxy the same way, listening on PROXY_PORT
# in the foreground with one worker (valgrind follows it); requests are wrk's count.
count_anchor() {
    local label=$1 c out vg n dump
    shift
    for c in $CONNS; do
        out="$WORK/callgrind.out"
        taskset -c 1 valgrind --tool=callgrind --cache-sim=yes --LL="$LL" \
            --callgrind-out-file="$out" "$@" >"$WORK/$label.log" 2>&1 &
        vg=$!
        PIDS+=("$vg")
        local proto=()
        [[ $H2 == 1 ]] && proto=(--http2-prior-knowledge)
        for _ in $(seq 300); do
            curl -sf "${proto[@]}" "http://127.0.0.1:$PROXY_PORT/" >/dev/null && break
            sleep 0.2
        done
        say "$label c$c: warm-up, then ${DURATION}s counted"
        load "$c" 3 >/dev/null
        callgrind_control -z "$vg" >/dev/null 2>&1
        n=$(load "$c" "$DURATION")
        callgrind_control -d "$vg" >/dev/null 2>&1
        kill "$vg" 2>/dev/null || true
        wait "$vg" 2>/dev/null || true
        dump=$(ls "$out".* 2>/dev/null | head -n 1)
        [[ -n "$dump" && "${n:-0}" -gt 0 ]] || die "no callgrind dump or no requests for $label c$c"
        report "$dump" "$n" "$label c$c"
        keep_dump "$dump" "$label-c$c"
        rm -f "$out" "$out".*
    done
}

if [[ "${NGINX:-1}" == 1 ]]; then
    # The harness's anchor: nginx as a one-worker proxy (no master process), its config.
    sed -e "s/@WORKERS@/1/; s/@PORT@/$PROXY_PORT/; s/@UPSTREAM1@/$UPSTREAM1_PORT/; s/@UPSTREAM2@/$UPSTREAM2_PORT/" \
        -e "s#@RUNDIR@#$WORK#g; s/@NAME@/nginx-proxy/g" \
        "$BENCH_DIR/conf/proxy.nginx.conf.tmpl" >"$WORK/nginx-proxy.conf"
    bench_nginx_access_log "$WORK/nginx-proxy.conf"
    if [[ $H2 == 1 ]]; then
        sed -i "s#listen 127.0.0.1:$PROXY_PORT #listen 127.0.0.1:$PROXY_PORT http2 #" "$WORK/nginx-proxy.conf"
        grep -q "listen 127.0.0.1:$PROXY_PORT http2" "$WORK/nginx-proxy.conf" || die "could not turn http2 on in nginx's config"
    fi
    count_anchor nginx-1w nginx -e "$WORK/nginx-proxy.error.log" -c "$WORK/nginx-proxy.conf" \
        -g 'daemon off; master_process off;'
fi
if [[ "${FLOOR:-0}" == 1 ]]; then
    # The floor: HAProxy in TCP mode, a byte pipe per client connection (scripts/bench.sh).
    command -v haproxy >/dev/null || die "haproxy is missing ($BENCH_DIR/setup.sh)"
    bench_floor_config "$PROXY_PORT" >"$WORK/l4-floor.cfg"
    count_anchor l4-floor haproxy -db -f "$WORK/l4-floor.cfg"
fi
say "instr/req: instructions the gateway ran per request (user space; the kernel's share is"
say "about the same for any proxy here). *_miss: simulated misses per request (LL = $LL)."
