#!/usr/bin/env bash
# TLS termination against nginx, side by side in one run (release build; each proxy one
# worker pinned to CPU 1; the upstreams, the registry and every client on CPU 0):
#
# - keep-alive HTTPS: wrk over one TLS connection per wrk connection, TLS 1.3 and TLS 1.2
#   (the client's OpenSSL limited through OPENSSL_CONF), ECDSA P-256 certificate;
# - full handshakes: `openssl s_time -new` (a new connection, full handshake and one GET
#   / per connection), ECDSA P-256 and RSA-2048 certificates, TLS 1.3 and 1.2;
# - resumed handshakes: `openssl s_time -reuse` (the session from a first full handshake:
#   a ticket), ECDSA certificate, TLS 1.3 and 1.2.
#
# Both servers use the same certificates (made here with openssl; `s_time` sends no SNI, so
# each certificate has its own listener: one gateway process per certificate, one nginx
# with two ports), the same cipher suite (AES-256-GCM, ECDHE over X25519, which the clients
# offer first; checked with s_client before the run) and session tickets. `s_time` runs
# $CLIENTS copies at once (sequential handshakes each), so handshakes/s depend on the
# client's CPU too; the server's CPU time per operation (user + system, from
# /proc/<pid>/stat) is the steadier figure. With -reuse every connection must resume, or
# the run stops. Each table row is one case; the
# ratios are switchyard over nginx in the same run (req/s or handshakes/s: higher is
# better; CPU per op: lower is better).
#
# Usage: scripts/bench-tls.sh [--quick]   (--quick: 3 s runs, 1 rep)
# Env:   BIN (a built gateway instead of a fresh release build), ALT_BIN and ALT_LABEL (a
#        second gateway build measured in the same run, e.g. another crypto provider),
#        DURATION (10), REPS (3), CONNS (50), CLIENTS (3), OUT, ONLY (a regular expression:
#        the cases whose names match, e.g. ONLY=resumed), and the ports below.
# Not run in CI: timed targets live in scripts, never in tests.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
OUT="${OUT:-$ROOT/target/bench-tls-result.txt}"
REGISTRY_PORT="${REGISTRY_PORT:-29500}"
# Each gateway process n (0: BIN with the ECDSA certificate, 1: BIN with RSA, 2 and 3:
# ALT_BIN) listens on PROXY_PORT+n (plain), ADMIN_PORT+n and TLS_PORT+n; nginx on
# NGINX_TLS_PORT (ECDSA) and NGINX_TLS_PORT+1 (RSA), its plain listener on +2.
PROXY_PORT="${PROXY_PORT:-29090}"
ADMIN_PORT="${ADMIN_PORT:-29901}"
TLS_PORT="${TLS_PORT:-29443}"
NGINX_TLS_PORT="${NGINX_TLS_PORT:-29450}"
export UPSTREAM1_PORT="${UPSTREAM1_PORT:-29081}" UPSTREAM2_PORT="${UPSTREAM2_PORT:-29082}"
CLIENTS="${CLIENTS:-3}"

# shellcheck source=scripts/bench-common.sh
source "$ROOT/scripts/bench-common.sh"
bench_knobs "$@"
bench_harness wrk nginx openssl curl taskset
bench_binary log

# --- upstreams and registry (CPU 0) ------------------------------------------------------
bench_origin_and_registry "$UPSTREAM1_PORT" "$UPSTREAM2_PORT"
bench_route "$CONSUL" switchyard-bench/ bench '{"service":"bench","path_prefix":"/"}' ||
    die "storing the route failed"

# --- certificates: ECDSA P-256 and RSA-2048 -----------------------------------------------
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
    -subj /CN=bench.test -addext subjectAltName=DNS:bench.test \
    -keyout "$WORK/ec.key" -out "$WORK/ec.crt" 2>/dev/null
openssl req -x509 -newkey rsa:2048 -nodes -days 2 \
    -subj /CN=bench.test -addext subjectAltName=DNS:bench.test \
    -keyout "$WORK/rsa.key" -out "$WORK/rsa.crt" 2>/dev/null

# --- the gateways (CPU 1, one worker each) -------------------------------------------------
# TARGETS: "server|certificate|port|pid" per listener.
TARGETS=()
start_gateway() { # start_gateway N LABEL BINARY CERT
    local n=$1 p
    for p in $((PROXY_PORT + n)) $((ADMIN_PORT + n)) $((TLS_PORT + n)); do
        port_free "$p" || die "port $p already in use"
    done
    {
        bench_gateway_config
        printf '[tls]\nlisten = "127.0.0.1:%s"\n' $((TLS_PORT + n))
        printf 'certificates = [{ cert = "%s", key = "%s" }]\n' "$WORK/$4.crt" "$WORK/$4.key"
    } >"$WORK/gw$n.toml"
    "$3" check-config "$WORK/gw$n.toml" >/dev/null || die "bad generated config $WORK/gw$n.toml"
    start_bg "gw$n" 1 "$3" run --config "$WORK/gw$n.toml" --consul "$CONSUL" \
        --kv-prefix switchyard-bench/ --listen "127.0.0.1:$((PROXY_PORT + n))" \
        --admin "127.0.0.1:$((ADMIN_PORT + n))"
    TARGETS+=("$2|$4|$((TLS_PORT + n))|$LAST_PID")
}
start_gateway 0 switchyard "$BIN" ec
start_gateway 1 switchyard "$BIN" rsa
if [[ -n "${ALT_BIN:-}" ]]; then
    start_gateway 2 "${ALT_LABEL:-alt}" "$ALT_BIN" ec
    start_gateway 3 "${ALT_LABEL:-alt}" "$ALT_BIN" rsa
fi

# --- nginx: the harness's proxy template, plus TLS on the same certificates -----------------
render "$BENCH_DIR/conf/proxy.nginx.conf.tmpl" "$WORK/nginx.conf" \
    PORT="$((NGINX_TLS_PORT + 2))" WORKERS=1 RUNDIR="$WORK" NAME=nginx \
    UPSTREAM1="$UPSTREAM1_PORT" UPSTREAM2="$UPSTREAM2_PORT"
tls_server() { # tls_server PORT CERT
    cat <<EOF_NGINX
    server {
        listen 127.0.0.1:$1 ssl backlog=4096;
        ssl_certificate $WORK/$2.crt;
        ssl_certificate_key $WORK/$2.key;
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_ciphers ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384;
        ssl_conf_command Ciphersuites TLS_AES_256_GCM_SHA384;
        ssl_ecdh_curve X25519:prime256v1;
        ssl_session_tickets on;
        location / {
            proxy_pass http://backends;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }
    }
EOF_NGINX
}
for p in "$NGINX_TLS_PORT" $((NGINX_TLS_PORT + 1)); do
    port_free "$p" || die "port $p already in use"
done
servers="$(tls_server "$NGINX_TLS_PORT" ec
tls_server $((NGINX_TLS_PORT + 1)) rsa)"
# The TLS servers go where the template's http block ends (its last closing brace).
python3 - "$WORK/nginx.conf" "$servers" <<'EOF_PY'
import sys
path, servers = sys.argv[1], sys.argv[2]
text = open(path).read().rstrip()
assert text.endswith("}")
open(path, "w").write(text[:-1] + servers + "\n}\n")
EOF_PY
nginx -t -q -p "$WORK" -c "$WORK/nginx.conf" -e "$WORK/nginx.error.log" 2>/dev/null ||
    die "bad nginx config $WORK/nginx.conf"
start_bg nginx 1 nginx -e "$WORK/nginx.error.log" -p "$WORK" -c "$WORK/nginx.conf" -g 'daemon off;'
TARGETS+=("nginx|ec|$NGINX_TLS_PORT|$LAST_PID" "nginx|rsa|$((NGINX_TLS_PORT + 1))|$LAST_PID")

for t in "${TARGETS[@]}"; do
    IFS='|' read -r name _ port _ <<<"$t"
    bench_wait_url "https://127.0.0.1:$port/" 15 -k ||
        die "$name on :$port does not answer 200 (KEEP_RUNDIR=1 to look)"
done

# The clients' OpenSSL settings per TLS version: one cipher suite, X25519.
for v in 1.2 1.3; do
    cat >"$WORK/client-tls$v.cnf" <<EOF_CNF
openssl_conf = default_conf
[default_conf]
ssl_conf = ssl_sect
[ssl_sect]
system_default = system_default_sect
[system_default_sect]
MinProtocol = TLSv$v
MaxProtocol = TLSv$v
CipherString = ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384
Ciphersuites = TLS_AES_256_GCM_SHA384
Groups = X25519:P-256
EOF_CNF
done

# Each measurement prints "OPERATIONS SECONDS" (requests or handshakes, and the time they
# took), or ERR.
# keepalive VERSION PORT: wrk over HTTPS with keep-alive.
keepalive() {
    local rps _p50 _p99 reqs err
    read -r rps _p50 _p99 reqs err < <(OPENSSL_CONF="$WORK/client-tls$1.cnf" \
        timeout $((DURATION + 30)) taskset -c 0 \
        wrk -t1 -c"$CONNS" -d"${DURATION}s" --latency "https://127.0.0.1:$2/" 2>&1 | bench_wrk_summary)
    if [[ $err != 0 || $reqs == 0 ]]; then echo ERR; else echo "$reqs $(bench_ratio "$reqs" "$rps") -"; fi
}
# handshakes MODE VERSION PORT: $CLIENTS s_time clients at once (MODE -new or -reuse),
# each with a GET / per connection. With -reuse every connection after each client's first
# must have resumed (s_time prints `r` for a resumed one, `*` for a full one).
handshakes() {
    local i total=0 n full t0 t1 cpu
    rm -f "$WORK"/s_time.cpu.*
    t0=$(date +%s.%N)
    for i in $(seq "$CLIENTS"); do
        OPENSSL_CONF="$WORK/client-tls$2.cnf" timeout $((DURATION + 30)) taskset -c 0 \
            /usr/bin/time -f '%U %S' -o "$WORK/s_time.cpu.$i" \
            openssl s_time -connect "127.0.0.1:$3" "$1" -time "$DURATION" -www / \
            >"$WORK/s_time.$i" 2>&1 &
    done
    wait
    t1=$(date +%s.%N)
    for i in $(seq "$CLIENTS"); do
        # "N connections in T real seconds"
        n=$(awk '/connections in .* real seconds/ { print $1 }' "$WORK/s_time.$i" | tail -1)
        [[ -n $n ]] || { echo ERR; return; }
        if [[ $1 == -reuse ]]; then
            full=$(sed -n '/^starting/,$p' "$WORK/s_time.$i" | tr -cd '*' | wc -c)
            ((full <= 1)) || { log "$full of $n connections did not resume"; echo ERR; return; }
        fi
        total=$((total + n))
    done
    # The clients' own CPU (user + system seconds, all of them): what bounds the rate here.
    cpu=$(cat "$WORK"/s_time.cpu.* | awk '{ s += $1 + $2 } END { print s + 0 }')
    echo "$total $(awk -v a="$t0" -v b="$t1" 'BEGIN { print b - a }') $cpu"
}
# check_version VERSION PORT: the client settings give that version and AES-256-GCM.
check_version() {
    OPENSSL_CONF="$WORK/client-tls$1.cnf" timeout 10 openssl s_client -connect "127.0.0.1:$2" \
        </dev/null 2>/dev/null | grep -Eq "^New, TLSv$1, Cipher is .*AES.?256.?GCM"
}
# A case: label|certificate|function and arguments (the port is appended per target).
CASES=(
    "keepalive_tls1.3_ecdsa|ec|keepalive 1.3"
    "keepalive_tls1.2_ecdsa|ec|keepalive 1.2"
    "full_tls1.3_ecdsa|ec|handshakes -new 1.3"
    "full_tls1.3_rsa2048|rsa|handshakes -new 1.3"
    "full_tls1.2_ecdsa|ec|handshakes -new 1.2"
    "full_tls1.2_rsa2048|rsa|handshakes -new 1.2"
    "resumed_tls1.3_ecdsa|ec|handshakes -reuse 1.3"
    "resumed_tls1.2_ecdsa|ec|handshakes -reuse 1.2"
)
if [[ -n ${ONLY:-} ]]; then # a subset of the cases, by an extended regular expression
    mapfile -t CASES < <(printf '%s\n' "${CASES[@]}" | grep -E "^[^|]*(${ONLY})[^|]*\|")
    ((${#CASES[@]})) || die "no case matches ONLY=$ONLY"
fi
SERVERS=$(for t in "${TARGETS[@]}"; do echo "${t%%|*}"; done | uniq)

for t in "${TARGETS[@]}"; do
    IFS='|' read -r name cert port _ <<<"$t"
    for v in 1.2 1.3; do
        check_version "$v" "$port" || die "$name ($cert) on :$port does not speak TLS $v with AES-256-GCM"
    done
done

log "${#CASES[@]} cases x $(echo "$SERVERS" | wc -w) servers x $REPS reps x ${DURATION}s, interleaved"
rows="$WORK/rows"
: >"$rows"
for t in "${TARGETS[@]}"; do # warm-up
    IFS='|' read -r _ _ port _ <<<"$t"
    DURATION=2 keepalive 1.3 "$port" >/dev/null
done
for rep in $(seq "$REPS"); do
    for c in "${CASES[@]}"; do
        IFS='|' read -r case cert cmd <<<"$c"
        for t in "${TARGETS[@]}"; do
            IFS='|' read -r name tcert port pid <<<"$t"
            [[ $tcert == "$cert" ]] || continue
            t0=$(cpu_ticks "$pid")
            # shellcheck disable=SC2086 # cmd is a function name and its words
            read -r n secs client_s < <($cmd "$port")
            t1=$(cpu_ticks "$pid")
            [[ $n != ERR && $n -gt 0 ]] || die "$case on $name failed (see $WORK; KEEP_RUNDIR=1)"
            ops=$(bench_ratio "$n" "$secs")
            us=$(bench_cpu_us $((t1 - t0)) "$n")
            client_us=-
            [[ $client_s == - ]] || client_us=$(awk -v s="$client_s" -v n="$n" 'BEGIN { printf "%.1f", s * 1e6 / n }')
            echo "$case $name $rep $ops $us $client_us" >>"$rows"
            log "run $rep/$REPS $case $name: $ops/s, ${us} us CPU per op (clients: $client_us)"
        done
    done
done
for t in "${TARGETS[@]}"; do
    IFS='|' read -r name cert _ pid <<<"$t"
    alive "$pid" || die "$name ($cert) died during the run"
done

col() { awk -v c="$1" -v n="$2" -v f="$3" '$1 == c && $2 == n { print $f }' "$rows" | median; }
mkdir -p "$(dirname "$OUT")"
{
    echo "# TLS termination, $(date -u +%F), 1 worker each on CPU 1, clients on CPU 0, ${DURATION}s x $REPS (medians)"
    printf '%-24s %-12s %10s %9s %11s %12s %14s\n' case server ops/s vs_nginx cpu_us/op cpu_vs_nginx client_us/op
    for c in "${CASES[@]}"; do
        IFS='|' read -r case _ _ <<<"$c"
        n_ops=$(col "$case" nginx 4)
        n_us=$(col "$case" nginx 5)
        for name in $SERVERS; do
            ops=$(col "$case" "$name" 4)
            us=$(col "$case" "$name" 5)
            client=$(awk -v c="$case" -v n="$name" '$1 == c && $2 == n && $6 != "-" { print $6 }' "$rows" | median)
            printf '%-24s %-12s %10.0f %9.3f %11.1f %12.3f %14s\n' "$case" "$name" "$ops" \
                "$(bench_ratio "$ops" "$n_ops")" "$us" "$(bench_ratio "$us" "$n_us")" "${client:--}"
        done
    done
} | tee "$OUT"
