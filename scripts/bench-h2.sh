#!/usr/bin/env bash
# HTTP/2 from clients: Switchyard vs nginx with h2load (nghttp2), side by side in one run,
# on the same two loopback upstreams (the shared harness's one-worker nginx origins, CPU 0),
# each proxy one worker pinned to CPU 1 and speaking HTTP/1.1 to the upstreams. Cases:
# h2c (prior knowledge) and h2 over TLS 1.3 (ALPN, one ECDSA P-256 certificate made here
# for both), each with 1 and 100 concurrent streams per connection. Rounds interleave the
# proxies; the table gives medians of req/s and of p99 request time (from h2load's
# per-request log), the ratio to nginx, and each proxy's CPU per request (/proc).
#
# Usage: scripts/bench-h2.sh [--quick]   (--quick: 3 s, 1 rep; default ~4 min)
# Env:   BIN (a built gateway instead of a fresh release build), DURATION (8), REPS (3),
#        CLIENTS (connections, 16), BENCH_DIR, ports as in bench-common.sh plus
#        TLS_PORT (18443), NGINX_PORT (18090, HTTP/1.1), NGINX_H2C_PORT (18091),
#        NGINX_TLS_PORT (18453). nginx 1.22 (Debian 12) takes `http2` on `listen`, and its
#        h2c listener speaks nothing else, hence a port of its own.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
DURATION="${DURATION:-8}"
REPS="${REPS:-3}"
CLIENTS="${CLIENTS:-16}"
if [[ "${1:-}" == "--quick" ]]; then
    DURATION=3 REPS=1
fi
TLS_PORT="${TLS_PORT:-18443}"
NGINX_PORT="${NGINX_PORT:-18090}"
NGINX_TLS_PORT="${NGINX_TLS_PORT:-18453}"
NGINX_H2C_PORT="${NGINX_H2C_PORT:-18091}"

# shellcheck source=scripts/bench-common.sh
source "$ROOT/scripts/bench-common.sh"
bench_harness h2load nginx openssl curl taskset python3
bench_binary log

trap bench_cleanup EXIT
trap 'exit 130' INT TERM
bench_rundir
WORK="$BENCH_RUNDIR"
HZ=$(getconf CLK_TCK)

start_upstream upstream1 "$UPSTREAM1_PORT" 0
start_upstream upstream2 "$UPSTREAM2_PORT" 0
wait_ready "127.0.0.1:$UPSTREAM1_PORT" 10 || die "upstream 1 did not start"
wait_ready "127.0.0.1:$UPSTREAM2_PORT" 10 || die "upstream 2 did not start"

openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
    -subj "/CN=localhost" -addext "subjectAltName=DNS:localhost,IP:127.0.0.1" \
    -keyout "$WORK/key.pem" -out "$WORK/cert.pem" 2>/dev/null

# nginx: the harness's proxy template plus an h2c listener and a TLS one.
render "$BENCH_DIR/conf/proxy.nginx.conf.tmpl" "$WORK/nginx.conf" \
    PORT="$NGINX_PORT" WORKERS=1 RUNDIR="$WORK" NAME=nginx \
    UPSTREAM1="$UPSTREAM1_PORT" UPSTREAM2="$UPSTREAM2_PORT"
python3 - "$WORK/nginx.conf" "$NGINX_PORT" "$NGINX_TLS_PORT" "$WORK" "$NGINX_H2C_PORT" <<'PY'
import sys
path, port, tls_port, work, h2c_port = sys.argv[1:]
text = open(path).read()
listen = f"listen 127.0.0.1:{port} backlog=4096;"
assert listen in text
text = text.replace(listen, f"""{listen}
        listen 127.0.0.1:{h2c_port} http2 backlog=4096;
        listen 127.0.0.1:{tls_port} ssl http2 backlog=4096;
        ssl_certificate {work}/cert.pem;
        ssl_certificate_key {work}/key.pem;
        ssl_protocols TLSv1.3;
        http2_max_concurrent_streams 128;
        keepalive_requests 10000000;""")
open(path, "w").write(text)
PY
start_bg nginx 1 nginx -e "$WORK/nginx.error.log" -p "$WORK" -c "$WORK/nginx.conf" -g 'daemon off;'
NGINX_PID=$LAST_PID
wait_ready "127.0.0.1:$NGINX_PORT" 10 || die "nginx did not start (see $WORK/nginx.error.log)"
# The worker does the work (the master only waits).
NGINX_PID=$(pgrep -P "$NGINX_PID" nginx | head -n 1)
[[ -n $NGINX_PID ]] || die "no nginx worker"

CONSUL="http://127.0.0.1:$REGISTRY_PORT"
port_free "$REGISTRY_PORT" || die "port $REGISTRY_PORT already in use"
start_bg registry 0 "$BIN" registry --listen "127.0.0.1:$REGISTRY_PORT"
bench_wait_registry "$CONSUL" || die "registry did not start"
bench_register "$CONSUL" "$UPSTREAM1_PORT" "$UPSTREAM2_PORT" || die "registering the upstreams failed"
bench_route "$CONSUL" switchyard-bench/ root '{"service":"bench","path_prefix":"/"}' || die "storing the route failed"
{
    bench_gateway_config
    printf '[tls]\nlisten = "127.0.0.1:%s"\ncertificates = [{ cert = "%s", key = "%s" }]\n' \
        "$TLS_PORT" "$WORK/cert.pem" "$WORK/key.pem"
} >"$WORK/switchyard.toml"
for p in "$PROXY_PORT" "$ADMIN_PORT" "$TLS_PORT"; do port_free "$p" || die "port $p already in use"; done
start_bg switchyard 1 "$BIN" run --config "$WORK/switchyard.toml" --consul "$CONSUL" \
    --kv-prefix switchyard-bench/ --listen "127.0.0.1:$PROXY_PORT" --admin "127.0.0.1:$ADMIN_PORT"
GW_PID=$LAST_PID
wait_ready "127.0.0.1:$PROXY_PORT" 20 || die "switchyard did not start (see $WORK/switchyard.out)"

# proc_cpu PID: the process's user + system ticks.
proc_cpu() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }

# one URL STREAMS PID: "rps p99_ms cpu_us_per_req" of one h2load run.
one() {
    local url=$1 m=$2 pid=$3 before after out log="$WORK/h2load.log"
    rm -f "$log"
    before=$(proc_cpu "$pid")
    out=$(timeout $((DURATION + 60)) taskset -c 0 h2load -D "$DURATION" -c "$CLIENTS" -m "$m" \
        --warm-up-time=1 --log-file="$log" "$url" 2>&1) || true
    after=$(proc_cpu "$pid")
    H2LOAD_OUT="$out" python3 - "$log" "$before" "$after" "$HZ" <<'PY'
import os, sys
log, before, after, hz = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
out = os.environ["H2LOAD_OUT"]
rps = 0.0
ok = 0
for line in out.splitlines():
    if line.startswith("finished in"):
        rps = float(line.split(",")[1].split()[0])
    if line.startswith("status codes:"):
        ok = int(line.split()[2])
times = []
try:
    for line in open(log):
        parts = line.split()
        if len(parts) >= 3 and parts[1] == "200":
            times.append(int(parts[2]))
except FileNotFoundError:
    pass
times.sort()
p99 = times[int(len(times) * 0.99) - 1] / 1000 if times else float("nan")
cpu_us = (after - before) / hz * 1e6 / max(len(times), 1)
print(f"{rps:.0f} {p99:.3f} {cpu_us:.2f} {ok}")
PY
}

CASES=(
    "h2c-m1|http://127.0.0.1:%s/|1|plain"
    "h2c-m100|http://127.0.0.1:%s/|100|plain"
    "h2-tls-m1|https://127.0.0.1:%s/|1|tls"
    "h2-tls-m100|https://127.0.0.1:%s/|100|tls"
)
declare -A R
for rep in $(seq "$REPS"); do
    for c in "${CASES[@]}"; do
        IFS='|' read -r name fmt m kind <<<"$c"
        if [[ $kind == tls ]]; then np=$NGINX_TLS_PORT sp=$TLS_PORT; else np=$NGINX_H2C_PORT sp=$PROXY_PORT; fi
        # shellcheck disable=SC2059
        R[nginx-1w $name]+="$(one "$(printf "$fmt" "$np")" "$m" "$NGINX_PID")"$'\n'
        # shellcheck disable=SC2059
        R[switchyard $name]+="$(one "$(printf "$fmt" "$sp")" "$m" "$GW_PID")"$'\n'
    done
    log "round $rep of $REPS done"
done

med() { sort -n | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }
printf '%-12s %-13s %9s %9s %14s %7s %9s\n' proxy case req/s p99_ms cpu_us_per_req vs_nginx p99_vs
for c in "${CASES[@]}"; do
    name=${c%%|*}
    n_rps=$(printf '%s' "${R[nginx-1w $name]}" | awk '{ print $1 }' | med)
    n_p99=$(printf '%s' "${R[nginx-1w $name]}" | awk '{ print $2 }' | med)
    for proxy in nginx-1w switchyard; do
        rows="${R[$proxy $name]}"
        rps=$(printf '%s' "$rows" | awk '{ print $1 }' | med)
        p99=$(printf '%s' "$rows" | awk '{ print $2 }' | med)
        cpu=$(printf '%s' "$rows" | awk '{ print $3 }' | med)
        awk -v p="$proxy" -v c="$name" -v r="$rps" -v q="$p99" -v u="$cpu" -v nr="$n_rps" -v nq="$n_p99" \
            'BEGIN { printf "%-12s %-13s %9d %9.3f %14.2f %7.2fx %8.2fx\n", p, c, r, q, u, r / nr, q / nq }'
    done
done
