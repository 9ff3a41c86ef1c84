#!/usr/bin/env bash
# Large bodies through Switchyard and nginx, side by side in one run: 1 MiB and 100 MiB
# downloads and uploads (PUT) to one loopback nginx origin (files on /dev/shm; an upload
# is written whole to /dev/shm before it is answered), each proxy one worker pinned to
# CPU 1, clients on CPU 0. nginx runs with its defaults but the body size limit (so it
# buffers large bodies to temporary files, as it does in production); Switchyard streams
# both ways. Then memory: 100 concurrent 100 MiB downloads and 100 concurrent 100 MiB
# uploads through each proxy, with the proxy's peak resident memory (VmHWM, the nginx
# worker for nginx).
#
# Table: per case and proxy, MiB/s (wall clock, median of REPS), the proxy's CPU seconds
# per GiB moved (/proc, user + system), and the ratio to nginx.
#
# Usage: scripts/bench-bodies.sh [--quick]  (--quick: 1 rep, 20 concurrent in the memory part)
# Env:   BIN, REPS (3), PARALLEL (memory part's concurrent transfers, 100), BENCH_DIR, ports
#        as in bench-common.sh plus NGINX_PORT (18090).
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
REPS="${REPS:-3}"
PARALLEL="${PARALLEL:-100}"
if [[ "${1:-}" == "--quick" ]]; then
    REPS=1 PARALLEL=20
fi
NGINX_PORT="${NGINX_PORT:-18090}"

# shellcheck source=scripts/bench-common.sh
source "$ROOT/scripts/bench-common.sh"
bench_harness nginx curl taskset python3
bench_binary log

trap 'bench_cleanup; rm -rf "$SHM"' EXIT
trap 'exit 130' INT TERM
bench_rundir
WORK="$BENCH_RUNDIR"
SHM=$(mktemp -d /dev/shm/switchyard-bodies.XXXXXX)
HZ=$(getconf CLK_TCK)
mkdir -p "$SHM/files" "$SHM/tmp" "$SHM/upload"
head -c $((1 << 20)) /dev/urandom >"$SHM/files/1m"
head -c $((100 << 20)) /dev/urandom >"$SHM/files/100m"
# nginx workers run as an unprivileged user.
chmod 755 "$SHM" "$SHM/files" && chmod 644 "$SHM"/files/* && chmod 1777 "$SHM/tmp" "$SHM/upload"

cat >"$WORK/origin.conf" <<CONF
worker_processes 1;
pid $WORK/origin.pid;
error_log $WORK/origin.error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    keepalive_requests 10000000;
    client_max_body_size 200m;
    client_body_temp_path $SHM/tmp;
    server {
        listen 127.0.0.1:$UPSTREAM1_PORT backlog=4096;
        root $SHM;
        location /files/ { }
        # An upload is read whole (into a file on /dev/shm) before it is answered.
        location /upload/ { dav_methods PUT; create_full_put_path on; }
    }
}
CONF
port_free "$UPSTREAM1_PORT" || die "port $UPSTREAM1_PORT already in use"
start_bg origin 0 nginx -e "$WORK/origin.error.log" -p "$WORK" -c "$WORK/origin.conf" -g 'daemon off;'
ok=""
for _ in $(seq 100); do
    curl -sf -o /dev/null "http://127.0.0.1:$UPSTREAM1_PORT/files/1m" && { ok=1; break; }
    sleep 0.1
done
[[ -n $ok ]] || die "the origin does not serve /files/1m (see $WORK/origin.error.log)"

render "$BENCH_DIR/conf/proxy.nginx.conf.tmpl" "$WORK/nginx.conf" \
    PORT="$NGINX_PORT" WORKERS=1 RUNDIR="$WORK" NAME=nginx \
    UPSTREAM1="$UPSTREAM1_PORT" UPSTREAM2="$UPSTREAM1_PORT"
# Its temporary files (large bodies are buffered) where its unprivileged worker may write.
sed -i -e 's/    access_log off;/    access_log off;\n    client_max_body_size 200m;/' \
    -e "s#$WORK/nginx\.\(body\|proxy\)#$SHM/tmp/nginx.\1#" "$WORK/nginx.conf"
start_bg nginx 1 nginx -e "$WORK/nginx.error.log" -p "$WORK" -c "$WORK/nginx.conf" -g 'daemon off;'
NGINX_MASTER=$LAST_PID

CONSUL="http://127.0.0.1:$REGISTRY_PORT"
port_free "$REGISTRY_PORT" || die "port $REGISTRY_PORT already in use"
start_bg registry 0 "$BIN" registry --listen "127.0.0.1:$REGISTRY_PORT"
bench_wait_registry "$CONSUL" || die "registry did not start"
bench_register "$CONSUL" "$UPSTREAM1_PORT" || die "registering the origin failed"
# The answer to an upload comes once it is all through: 100 at once take longer than the
# default 15 s to response headers (nginx starts its timer only after buffering a body).
bench_route "$CONSUL" switchyard-bench/ root \
    '{"service":"bench","path_prefix":"/","timeouts":{"per_try_ms":300000,"total_ms":300000}}' \
    || die "storing the route failed"
bench_gateway_config | sed 's/^\[proxy\]$/[proxy]\nmax_body_bytes = 209715200/' >"$WORK/switchyard.toml"
for p in "$PROXY_PORT" "$ADMIN_PORT"; do port_free "$p" || die "port $p already in use"; done
start_bg switchyard 1 "$BIN" run --config "$WORK/switchyard.toml" --consul "$CONSUL" \
    --kv-prefix switchyard-bench/ --listen "127.0.0.1:$PROXY_PORT" --admin "127.0.0.1:$ADMIN_PORT"
GW_PID=$LAST_PID
for port in "$NGINX_PORT" "$PROXY_PORT"; do
    ok=""
    for _ in $(seq 200); do
        curl -sf -o /dev/null "http://127.0.0.1:$port/files/1m" && { ok=1; break; }
        sleep 0.1
    done
    [[ -n $ok ]] || die "proxy on $port does not serve /files/1m"
done
NGINX_PID=$(pgrep -P "$NGINX_MASTER" nginx | head -n 1)
[[ -n $NGINX_PID ]] || die "no nginx worker"

ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }

# transfer PORT KIND SIZE COUNT PARALLEL: COUNT transfers, PARALLEL at a time; prints the
# seconds they took. Every transfer must succeed with the full size.
transfer() {
    local port=$1 kind=$2 size=$3 count=$4 par=$5
    python3 - "$port" "$kind" "$size" "$count" "$par" "$SHM" <<'PY'
import subprocess, sys, time
port, kind, size, count, par, shm = sys.argv[1:]
count, par = int(count), int(par)
if kind == "down":
    cmd = ["taskset", "-c", "0", "curl", "-sf", "-o", "/dev/null", "-w", "%{size_download}",
           f"http://127.0.0.1:{port}/files/{size}"]
else:
    cmd = ["taskset", "-c", "0", "curl", "-sf", "-o", "/dev/null", "-w", "%{size_upload}",
           "-H", "Expect:", "-T", f"{shm}/files/{size}", f"http://127.0.0.1:{port}/upload/{size}"]
expected = (1 << 20) if size == "1m" else (100 << 20)
start = time.monotonic()
running, done = [], 0
while done < count:
    while len(running) < par and done + len(running) < count:
        running.append(subprocess.Popen(cmd, stdout=subprocess.PIPE))
    p = running.pop(0)
    out, _ = p.communicate()
    if p.returncode != 0 or int(float(out or 0)) != expected:
        sys.exit(f"transfer failed: rc {p.returncode}, {out!r} bytes")
    done += 1
print(f"{time.monotonic() - start:.3f}")
PY
}

# CASE: name kind size count parallel
CASES=(
    "download-1MiB down 1m 400 8"
    "upload-1MiB up 1m 400 8"
    "download-100MiB down 100m 8 2"
    "upload-100MiB up 100m 8 2"
)
declare -A R
for rep in $(seq "$REPS"); do
    for c in "${CASES[@]}"; do
        read -r name kind size count par <<<"$c"
        mib=$([[ $size == 1m ]] && echo 1 || echo 100)
        for proxy in nginx switchyard; do
            if [[ $proxy == nginx ]]; then port=$NGINX_PORT pid=$NGINX_PID; else port=$PROXY_PORT pid=$GW_PID; fi
            t0=$(ticks "$pid")
            secs=$(transfer "$port" "$kind" "$size" "$count" "$par") || die "$name through $proxy failed"
            t1=$(ticks "$pid")
            R[$proxy $name]+=$(awk -v s="$secs" -v n="$count" -v m="$mib" -v t="$((t1 - t0))" -v hz="$HZ" \
                'BEGIN { mb = n * m; printf "%.1f %.3f", mb / s, (t / hz) / (mb / 1024) }')$'\n'
        done
    done
    log "round $rep of $REPS done"
done

med() { sort -n | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }
printf '%-16s %-11s %9s %13s %9s %9s\n' case proxy MiB/s cpu_s_per_GiB vs_nginx cpu_vs
for c in "${CASES[@]}"; do
    read -r name _ <<<"$c"
    n_mbs=$(printf '%s' "${R[nginx $name]}" | awk '{ print $1 }' | med)
    n_cpu=$(printf '%s' "${R[nginx $name]}" | awk '{ print $2 }' | med)
    for proxy in nginx switchyard; do
        mbs=$(printf '%s' "${R[$proxy $name]}" | awk '{ print $1 }' | med)
        cpu=$(printf '%s' "${R[$proxy $name]}" | awk '{ print $2 }' | med)
        awk -v c="$name" -v p="$proxy" -v m="$mbs" -v u="$cpu" -v nm="$n_mbs" -v nu="$n_cpu" \
            'BEGIN { printf "%-16s %-11s %9.1f %13.3f %8.2fx %8.2fx\n", c, p, m, u, m / nm, (nu > 0 ? u / nu : 0) }'
    done
done

# Memory: PARALLEL concurrent 100 MiB transfers each way through each proxy.
hwm() { awk '/^VmHWM/ { print $2 }' "/proc/$1/status"; }
rss() { awk '/^VmRSS/ { print $2 }' "/proc/$1/status"; }
printf '\n%-11s %-9s %11s %13s %12s\n' proxy direction transfers rss_before_MiB peak_MiB
for proxy in nginx switchyard; do
    if [[ $proxy == nginx ]]; then port=$NGINX_PORT pid=$NGINX_PID; else port=$PROXY_PORT pid=$GW_PID; fi
    for kind in down up; do
        before=$(rss "$pid")
        # VmHWM is the peak since start; reset it (Linux: writing 5 to clear_refs).
        echo 5 >"/proc/$pid/clear_refs" 2>/dev/null || true
        transfer "$port" "$kind" 100m "$PARALLEL" "$PARALLEL" >/dev/null || die "memory run through $proxy failed"
        awk -v p="$proxy" -v k="$kind" -v n="$PARALLEL" -v b="$before" -v h="$(hwm "$pid")" \
            'BEGIN { printf "%-11s %-9s %11d %13.1f %12.1f\n", p, (k == "down" ? "download" : "upload"), n, b / 1024, h / 1024 }'
    done
done
