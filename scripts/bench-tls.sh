#!/usr/bin/env bash
# TLS termination against nginx, side by side in one run (release build; each proxy one
# worker pinned to CPU 1; the upstreams, the registry and every client on CPU 0):
#
# - keep-alive HTTPS: wrk over one TLS connection per wrk connection, TLS 1.3 and TLS 1.2
#   (the client's OpenSSL limited through OPENSSL_CONF), ECDSA P-256 certificate;
# - full handshakes: `examples/tls_handshakes.rs` (a new connection per request: full
#   handshake, one GET / with `Connection: close`, read until the server closes), ECDSA
#   P-256 and RSA-2048 certificates, TLS 1.3 and 1.2;
# - resumed handshakes: the same client, each of its loops resuming the session of its
#   previous connection (a ticket), ECDSA certificate, TLS 1.3 and 1.2.
#
# Both servers use the same certificates (made here with openssl: a CA and a leaf for
# bench.test per key type; one gateway process per certificate, one nginx with two ports),
# the same cipher suite (AES-256-GCM, ECDHE over X25519, which the clients offer first;
# checked with s_client before the run) and session tickets. The handshake client (rustls,
# one thread, $HS_CONNS connections at once, each one connection after the other) verifies
# the certificate against the CA and spends about 250 us of CPU per full ECDSA handshake
# (a third or more of it in the kernel's TCP), against ~550 for `openssl s_time`, used
# before, whose rates measured the client; a server that spends about as little per
# handshake as the client is still bound by it (server_busy below 1). Every full case must
# see only full handshakes, every resumed case only resumed ones after each loop's first
# connection, and every response must be a 200, or the run stops. The server's CPU time
# per operation (user + system, from /proc/<pid>/stat) is the steadier figure; server_busy
# is that CPU time over the case's wall time (1.0: a whole core, the server is the
# bottleneck), client_us/op the handshake client's own CPU per handshake. Each table row
# is one case; the ratios are switchyard over nginx in the same run (req/s or
# handshakes/s: higher is better; CPU per op: lower is better).
#
# Usage: scripts/bench-tls.sh [--quick]   (--quick: 3 s runs, 1 rep)
# Env:   BIN (a built gateway instead of a fresh release build), ALT_BIN and ALT_LABEL (a
#        second gateway build measured in the same run, e.g. another crypto provider),
#        CLIENT_BIN (a built `tls_handshakes` example instead of a fresh release build),
#        DURATION (10), REPS (3), CONNS (50: wrk's connections), HS_CONNS (64: the
#        handshake client's), OUT, ONLY (a regular expression: the cases whose names match,
#        e.g. ONLY=resumed), and the ports below.
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
HS_CONNS="${HS_CONNS:-64}"

# shellcheck source=scripts/bench-common.sh
source "$ROOT/scripts/bench-common.sh"
bench_knobs "$@"
bench_harness wrk nginx openssl curl taskset
bench_binary log
if [[ -n "${CLIENT_BIN:-}" ]]; then
    [[ -x "$CLIENT_BIN" ]] || die "CLIENT_BIN=$CLIENT_BIN is not an executable"
else
    log "building the handshake client (release)"
    (cd "$ROOT" && cargo build --release --locked --example tls_handshakes >&2)
    CLIENT_BIN="$ROOT/target/release/examples/tls_handshakes"
fi

# --- upstreams and registry (CPU 0) ------------------------------------------------------
bench_origin_and_registry "$UPSTREAM1_PORT" "$UPSTREAM2_PORT"
bench_route "$CONSUL" switchyard-bench/ bench '{"service":"bench","path_prefix":"/"}' ||
    die "storing the route failed"

# --- certificates: a CA (ECDSA P-256), leaves ECDSA P-256 and RSA-2048 ----------------------
# A CA and leaves rather than self-signed certificates: a verifying client (webpki) refuses
# a CA certificate as the server's own.
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
    -subj /CN=bench-ca -keyout "$WORK/ca.key" -out "$WORK/ca.crt" 2>/dev/null
printf '%s\n' 'subjectAltName = DNS:bench.test, IP:127.0.0.1' \
    'basicConstraints = critical, CA:FALSE' 'extendedKeyUsage = serverAuth' >"$WORK/leaf.ext"
for key in ec rsa; do
    case $key in
        ec) newkey=(-newkey ec -pkeyopt ec_paramgen_curve:P-256) ;;
        rsa) newkey=(-newkey rsa:2048) ;;
    esac
    openssl req -new "${newkey[@]}" -nodes -subj /CN=bench.test \
        -keyout "$WORK/$key.key" -out "$WORK/$key.csr" 2>/dev/null
    openssl x509 -req -in "$WORK/$key.csr" -CA "$WORK/ca.crt" -CAkey "$WORK/ca.key" \
        -set_serial "$RANDOM$RANDOM" -days 2 -extfile "$WORK/leaf.ext" \
        -out "$WORK/$key.crt" 2>/dev/null || die "signing the $key certificate failed"
done

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
# handshakes MODE VERSION PORT: the handshake client, MODE full or resume, a GET / per
# connection. It exits non-zero on any failed request, and on any handshake of the wrong
# kind (full ones with MODE full; after each loop's first connection, resumed ones with
# MODE resume). Prints "HANDSHAKES SECONDS CLIENT_CPU_SECONDS".
handshakes() {
    local resume=() line
    [[ $1 == resume ]] && resume=(--resume)
    if ! line=$(RUST_BACKTRACE=0 timeout $((DURATION + 30)) taskset -c 0 "$CLIENT_BIN" \
        "127.0.0.1:$3" --ca "$WORK/ca.crt" --server-name bench.test --version "$2" \
        "${resume[@]}" --connections "$HS_CONNS" --seconds "$DURATION" 2>"$WORK/handshakes.err"); then
        log "handshake client: $line $(tr '\n' ' ' <"$WORK/handshakes.err")"
        echo ERR
        return
    fi
    # handshakes=N seconds=S cpu_s=C resumed=R full=F failed=X
    awk '{ for (i = 1; i <= NF; i++) { split($i, kv, "="); v[kv[1]] = kv[2] }
           print v["handshakes"], v["seconds"], v["cpu_s"] }' <<<"$line"
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
    "full_tls1.3_ecdsa|ec|handshakes full 1.3"
    "full_tls1.3_rsa2048|rsa|handshakes full 1.3"
    "full_tls1.2_ecdsa|ec|handshakes full 1.2"
    "full_tls1.2_rsa2048|rsa|handshakes full 1.2"
    "resumed_tls1.3_ecdsa|ec|handshakes resume 1.3"
    "resumed_tls1.2_ecdsa|ec|handshakes resume 1.2"
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
            busy=$(awk -v t=$((t1 - t0)) -v hz="$HZ" -v s="$secs" 'BEGIN { printf "%.2f", t / hz / s }')
            client_us=-
            [[ $client_s == - ]] || client_us=$(awk -v s="$client_s" -v n="$n" 'BEGIN { printf "%.1f", s * 1e6 / n }')
            echo "$case $name $rep $ops $us $client_us $busy" >>"$rows"
            log "run $rep/$REPS $case $name: $ops/s, ${us} us CPU per op, server busy $busy (client: $client_us us/op)"
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
    printf '%-24s %-12s %10s %9s %11s %12s %11s %13s\n' case server ops/s vs_nginx cpu_us/op cpu_vs_nginx server_busy client_us/op
    for c in "${CASES[@]}"; do
        IFS='|' read -r case _ _ <<<"$c"
        n_ops=$(col "$case" nginx 4)
        n_us=$(col "$case" nginx 5)
        for name in $SERVERS; do
            ops=$(col "$case" "$name" 4)
            us=$(col "$case" "$name" 5)
            busy=$(col "$case" "$name" 7)
            client=$(awk -v c="$case" -v n="$name" '$1 == c && $2 == n && $6 != "-" { print $6 }' "$rows" | median)
            printf '%-24s %-12s %10.0f %9.3f %11.1f %12.3f %11.2f %13s\n' "$case" "$name" "$ops" \
                "$(bench_ratio "$ops" "$n_ops")" "$us" "$(bench_ratio "$us" "$n_us")" "$busy" "${client:--}"
        done
    done
} | tee "$OUT"
