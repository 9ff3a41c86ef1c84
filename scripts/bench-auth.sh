#!/usr/bin/env bash
# The cost of edge auth: req/s through the gateway (release build, 1 worker pinned to CPU 1)
# to one loopback upstream, with auth off, an API key, HS256 and RS256 tokens (the same
# token repeated, so the verified-token cache answers), and RS256 with the cache turned off
# (every request verifies the signature). All cases run interleaved in one run; the table
# gives medians, each case's req/s over the auth-off case, and the gateway's CPU time per
# request (user + system, from /proc) over the auth-off case: on two cores the load
# generator can be the bottleneck, so CPU per request is the steadier measure of auth cost.
# `off_same_header` sends the RS256 token to the open route: what carrying a 600-byte header
# costs without any auth, so the rest is what verification (or the cache) adds.
#
# Keys and tokens are made here with openssl (never the test fixtures). wrk and the
# upstream (a one-worker nginx from the shared harness) run on CPU 0.
#
# Usage: scripts/bench-auth.sh [--quick]     (--quick: 3 s runs, 1 rep; default ~4 min)
# Env:   BENCH_DIR (default ../shared/bench next to the repo), BIN (a built gateway instead
#        of a fresh release build), DURATION (10), REPS (3), CONNS (50), OUT (result file),
#        and the ports below.
# Not run in CI: timed targets live in scripts, never in tests.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
OUT="${OUT:-$ROOT/target/bench-auth-result.txt}"
REGISTRY_PORT="${REGISTRY_PORT:-18580}"
PROXY_PORT="${PROXY_PORT:-18180}"
ADMIN_PORT="${ADMIN_PORT:-18981}"
UPSTREAM_PORT="${UPSTREAM_PORT:-18181}"
DURATION="${DURATION:-10}"
REPS="${REPS:-3}"
CONNS="${CONNS:-50}"
if [[ "${1:-}" == "--quick" ]]; then
    DURATION=3 REPS=1
fi

# Ports first: bench-common.sh keeps those already set.
# shellcheck source=scripts/bench-common.sh
source "$ROOT/scripts/bench-common.sh"
bench_harness wrk nginx openssl curl taskset
bench_binary log

HZ=$(getconf CLK_TCK)

# --- the upstream and the registry -------------------------------------------------------
bench_origin_and_registry
put() { curl -sf -X PUT "$CONSUL$1" --data "$2" >/dev/null || die "PUT $1"; }

# --- keys, tokens, API key ----------------------------------------------------------------
b64url() { openssl base64 -A | tr '+/' '-_' | tr -d '='; }
openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "$WORK/rsa.pem" 2>/dev/null
openssl pkey -in "$WORK/rsa.pem" -pubout -out "$WORK/rsa.pub.pem"
openssl rand -hex 32 | tr -d '\n' >"$WORK/hs.secret"
now=$(date +%s)
payload=$(printf '{"iss":"https://bench.invalid","aud":"bench","sub":"bench-user","scope":"bench","iat":%d,"exp":%d}' \
    "$now" $((now + 86400)) | b64url)
jwt() { # jwt ALG KID: a signed token over $payload
    local input
    input="$(printf '{"alg":"%s","typ":"JWT","kid":"%s"}' "$1" "$2" | b64url).$payload"
    case $1 in
        HS256) printf '%s.%s' "$input" "$(printf '%s' "$input" |
            openssl dgst -sha256 -mac HMAC -macopt "key:$(cat "$WORK/hs.secret")" -binary | b64url)" ;;
        RS256) printf '%s.%s' "$input" "$(printf '%s' "$input" |
            openssl dgst -sha256 -sign "$WORK/rsa.pem" -binary | b64url)" ;;
    esac
}
HS_TOKEN=$(jwt HS256 hs)
RS_TOKEN=$(jwt RS256 rs)
API_KEY="sy_bench_$(openssl rand -hex 24)"
put /v1/kv/bench-auth/apikeys/bench \
    "{\"sha256\":\"$(printf '%s' "$API_KEY" | sha256sum | cut -d' ' -f1)\",\"consumer\":\"bench\"}"

route() { put "/v1/kv/bench-auth/routes/$1" "{\"service\":\"bench\",\"path_prefix\":\"/$1\"$2}"; }
route off ''
route apikey ',"auth":{"api_key":true}'
route hs256 ',"auth":{"jwt":["hs"]}'
route rs256 ',"auth":{"jwt":["rs"]}'
route rs256-nocache ',"auth":{"jwt":["rs_nocache"]}'

provider() { # provider NAME ALG KEY-LINE [EXTRA-LINE]
    printf '[jwt_providers.%s]\nissuer = "https://bench.invalid"\naudiences = ["bench"]\nalgorithms = ["%s"]\n%s\n' "$1" "$2" "${4:-}"
    printf '[[jwt_providers.%s.keys]]\n%s\n\n' "$1" "$3"
}
{
    bench_gateway_config
    provider hs HS256 "kid = \"hs\"
secret_file = \"$WORK/hs.secret\""
    provider rs RS256 "kid = \"rs\"
pem = '''
$(cat "$WORK/rsa.pub.pem")
'''"
    provider rs_nocache RS256 "kid = \"rs\"
pem = '''
$(cat "$WORK/rsa.pub.pem")
'''" "cache_entries = 0"
} >"$WORK/switchyard.toml"
"$BIN" check-config "$WORK/switchyard.toml" >/dev/null || die "bad generated config $WORK/switchyard.toml"

# --- the gateway ----------------------------------------------------------------------------
for p in "$PROXY_PORT" "$ADMIN_PORT"; do port_free "$p" || die "port $p already in use"; done
start_bg switchyard 1 "$BIN" run --config "$WORK/switchyard.toml" --consul "$CONSUL" \
    --kv-prefix bench-auth/ --listen "127.0.0.1:$PROXY_PORT" --admin "127.0.0.1:$ADMIN_PORT"
GW_PID=$LAST_PID

# case|path|header: every case must answer 200 before the measurement starts.
CASES=(
    "off|/off/|"
    "off_same_header|/off/|Authorization: Bearer $RS_TOKEN"
    "api_key|/apikey/|X-API-Key: $API_KEY"
    "hs256|/hs256/|Authorization: Bearer $HS_TOKEN"
    "rs256|/rs256/|Authorization: Bearer $RS_TOKEN"
    "rs256_nocache|/rs256-nocache/|Authorization: Bearer $RS_TOKEN"
)
for c in "${CASES[@]}"; do
    IFS='|' read -r name path hdr <<<"$c"
    ok=""
    for _ in $(seq 100); do
        code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 1 ${hdr:+-H "$hdr"} \
            "http://127.0.0.1:$PROXY_PORT$path" || true)
        [[ $code == 200 ]] && { ok=1; break; }
        sleep 0.1
    done
    [[ -n $ok ]] || die "case $name: $path answers $code, not 200 (see $WORK/switchyard.out; KEEP_RUNDIR=1)"
    code=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$PROXY_PORT$path" || true)
    [[ $name == off* || $code == 401 ]] || die "case $name: no credential answers $code, not 401"
done

# wrk_once PATH HEADER: "rps p50_ms p99_ms requests errors" of one run.
wrk_once() {
    timeout $((DURATION + 30)) taskset -c 0 wrk -t1 -c"$CONNS" -d"${DURATION}s" --latency \
        ${2:+-H "$2"} "http://127.0.0.1:$PROXY_PORT$1" 2>&1 | awk '
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

log "${#CASES[@]} cases x $REPS reps x ${DURATION}s at -c$CONNS, interleaved"
rows="$WORK/rows"
: >"$rows"
for c in "${CASES[@]}"; do # warm-up (connections, pools, caches)
    IFS='|' read -r name path hdr <<<"$c"
    DURATION=2 wrk_once "$path" "$hdr" >/dev/null
done
for rep in $(seq "$REPS"); do
    for c in "${CASES[@]}"; do
        IFS='|' read -r name path hdr <<<"$c"
        t0=$(cpu_ticks "$GW_PID")
        read -r rps p50 p99 reqs err < <(wrk_once "$path" "$hdr")
        t1=$(cpu_ticks "$GW_PID")
        # The gateway's CPU per request: what auth costs it, whoever is the bottleneck.
        us=$(awk -v t=$((t1 - t0)) -v hz="$HZ" -v n="$reqs" 'BEGIN { print (n > 0 ? t * 1e6 / hz / n : 0) }')
        echo "$name $rep $rps $p50 $p99 $err $us" >>"$rows"
        log "run $rep/$REPS $name: $rps req/s p50 ${p50}ms p99 ${p99}ms errors $err gateway ${us} us/req"
    done
done
alive "$GW_PID" || die "the gateway died during the run (see $WORK/switchyard.out)"

col() { awk -v n="$1" -v f="$2" '$1 == n { print $f }' "$rows" | median; }
base=$(col off 3)
base_us=$(col off 7)
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { print (b > 0 ? a / b : 0) }'; }
mkdir -p "$(dirname "$OUT")"
{
    echo "# switchyard edge auth, $(date -u +%F), 1 worker on CPU 1, wrk -c$CONNS on CPU 0, ${DURATION}s x $REPS"
    printf '%-15s %10s %8s %8s %8s %7s %11s %9s\n' case req/s vs_off p50_ms p99_ms errors \
        cpu_us/req cpu_vs_off
    for c in "${CASES[@]}"; do
        IFS='|' read -r name _ _ <<<"$c"
        rps=$(col "$name" 3)
        us=$(col "$name" 7)
        printf '%-15s %10.0f %8.3f %8.3f %8.3f %7d %11.2f %9.3f\n' "$name" "$rps" \
            "$(ratio "$rps" "$base")" "$(col "$name" 4)" "$(col "$name" 5)" \
            "$(awk -v n="$name" '$1 == n { s += $6 } END { print s + 0 }' "$rows")" \
            "$us" "$(ratio "$us" "$base_us")"
    done
} | tee "$OUT"
