#!/usr/bin/env bash
# The cost of edge auth: req/s through the gateway (release build, 1 worker pinned to CPU 1)
# to one loopback upstream, with auth off, an API key, HS256 and RS256 tokens (the same
# token repeated, so the verified-token cache answers), and RS256, PS256 (RSA-2048), ES256
# (P-256), EdDSA (Ed25519) and HS256 with the cache turned off (every request verifies the
# signature: what a token the gateway has not seen before costs). All cases run interleaved
# in one run; the table
# gives medians, each case's req/s over the auth-off case, and the gateway's CPU time per
# request (user + system, from /proc) over the auth-off case: on two cores the load
# generator can be the bottleneck, so CPU per request is the steadier measure of auth cost.
# `off_same_header` sends the RS256 token to the open route: what carrying a 600-byte header
# costs without any auth, so the rest is what verification (or the cache) adds.
#
# Keys and tokens are made here with openssl (never the test fixtures). wrk and the
# upstream (a one-worker nginx from the shared harness) run on CPU 0.
#
# Then the bad-signature flood: a healthy client (wrk -c$HEALTHY_CONNS with a valid RS256
# token the cache knows) alone, then while a second wrk (-c$CONNS) sends a distinct
# well-formed RS256 token with a bad signature on every request: from one client address
# (its failure budget, [auth.failure_budget], is soon spent: refused unverified), the same
# on a second gateway with the budgets off (burst = 0, global_burst = 0: every bad token is
# verified), and from a different address on every request (each address fails once, so
# only the gateway-wide budget, global_burst, stops it; on the second gateway every bad
# token costs a verification); the budgets' refusals are held a second (refusal_delay_ms),
# and a third gateway sends them at once, to show what holding them does. Client addresses come from
# X-Forwarded-For (loopback is a trusted proxy in this config). The second table gives the
# flood's req/s and statuses, and the healthy client's req/s and p99 against its p99 alone;
# a flood of the same requests without a token (401 before any crypto) is the floor: what
# any flood of refused requests costs the healthy client on one worker.
#
# Usage: scripts/bench-auth.sh [--quick]     (--quick: 3 s runs, 1 rep; default ~8 min)
# Env:   FLOOD_ONLY=1 (only the flood table), BENCH_DIR (default ../shared/bench next to the repo), BIN (a built gateway instead
#        of a fresh release build), DURATION (10), REPS (3), CONNS (50), HEALTHY_CONNS (10),
#        OUT (result file), and the ports below (the gateway without budget takes the next
#        proxy and admin ports, the one without held refusals the ones after).
# Not run in CI: timed targets live in scripts, never in tests.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
OUT="${OUT:-$ROOT/target/bench-auth-result.txt}"
REGISTRY_PORT="${REGISTRY_PORT:-29580}"
PROXY_PORT="${PROXY_PORT:-29180}"
ADMIN_PORT="${ADMIN_PORT:-29981}"
UPSTREAM_PORT="${UPSTREAM_PORT:-29190}"

# Ports first: bench-common.sh keeps those already set.
# shellcheck source=scripts/bench-common.sh
source "$ROOT/scripts/bench-common.sh"
bench_knobs "$@"
bench_harness wrk nginx openssl curl taskset
bench_binary log

# --- the upstream and the registry -------------------------------------------------------
bench_origin_and_registry
put() { curl -sf -X PUT "$CONSUL$1" --data "$2" >/dev/null || die "PUT $1"; }

# --- keys, tokens, API key ----------------------------------------------------------------
b64url() { openssl base64 -A | tr '+/' '-_' | tr -d '='; }
openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "$WORK/rsa.pem" 2>/dev/null
openssl pkey -in "$WORK/rsa.pem" -pubout -out "$WORK/rsa.pub.pem"
openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$WORK/ec.pem" 2>/dev/null
openssl pkey -in "$WORK/ec.pem" -pubout -out "$WORK/ec.pub.pem"
openssl genpkey -algorithm ED25519 -out "$WORK/ed.pem" 2>/dev/null
openssl pkey -in "$WORK/ed.pem" -pubout -out "$WORK/ed.pub.pem"
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
        PS256) printf '%s.%s' "$input" "$(printf '%s' "$input" |
            openssl dgst -sha256 -sign "$WORK/rsa.pem" -sigopt rsa_padding_mode:pss \
                -sigopt rsa_pss_saltlen:32 -binary | b64url)" ;;
        ES256) printf '%s.%s' "$input" "$(printf '%s' "$input" |
            openssl dgst -sha256 -sign "$WORK/ec.pem" -binary | der_to_jose | b64url)" ;;
        EdDSA) printf '%s' "$input" >"$WORK/ed.in"
            printf '%s.%s' "$input" "$(openssl pkeyutl -sign -inkey "$WORK/ed.pem" -rawin \
                -in "$WORK/ed.in" | b64url)" ;;
    esac
}
# An ECDSA signature as openssl writes it (DER: SEQUENCE of r, s) in JWS form (r || s, 32
# bytes each).
der_to_jose() {
    python3 -c '
import sys
d = sys.stdin.buffer.read()
assert d[0] == 0x30
i = 2 if d[1] < 0x80 else 3
out = b""
for _ in range(2):
    assert d[i] == 0x02
    n = d[i + 1]
    out += d[i + 2:i + 2 + n].lstrip(b"\0").rjust(32, b"\0")
    i += 2 + n
sys.stdout.buffer.write(out)'
}
HS_TOKEN=$(jwt HS256 hs)
RS_TOKEN=$(jwt RS256 rs)
PS_TOKEN=$(jwt PS256 rs)
ES_TOKEN=$(jwt ES256 es)
ED_TOKEN=$(jwt EdDSA ed)
API_KEY="sy_bench_$(openssl rand -hex 24)"
put /v1/kv/bench-auth/apikeys/bench \
    "{\"sha256\":\"$(printf '%s' "$API_KEY" | sha256sum | cut -d' ' -f1)\",\"consumer\":\"bench\"}"

route() { put "/v1/kv/bench-auth/routes/$1" "{\"service\":\"bench\",\"path_prefix\":\"/$1\"$2}"; }
route off ''
route apikey ',"auth":{"api_key":true}'
route hs256 ',"auth":{"jwt":["hs"]}'
route rs256 ',"auth":{"jwt":["rs"]}'
route rs256-nocache ',"auth":{"jwt":["rs_nocache"]}'
route ps256-nocache ',"auth":{"jwt":["ps_nocache"]}'
route es256-nocache ',"auth":{"jwt":["es_nocache"]}'
route eddsa-nocache ',"auth":{"jwt":["ed_nocache"]}'
route hs256-nocache ',"auth":{"jwt":["hs_nocache"]}'

provider() { # provider NAME ALG KEY-LINE [EXTRA-LINE]
    printf '[jwt_providers.%s]\nissuer = "https://bench.invalid"\naudiences = ["bench"]\nalgorithms = ["%s"]\n%s\n' "$1" "$2" "${4:-}"
    printf '[[jwt_providers.%s.keys]]\n%s\n\n' "$1" "$3"
}
TQ="'''"
pem_key() { # pem_key KID FILE: a key given inline as PEM
    printf 'kid = "%s"\npem = %s\n%s\n%s' "$1" "$TQ" "$(cat "$2")" "$TQ"
}
hs_key="kid = \"hs\"
secret_file = \"$WORK/hs.secret\""
{
    bench_gateway_config
    provider hs HS256 "$hs_key"
    provider rs RS256 "$(pem_key rs "$WORK/rsa.pub.pem")"
    provider rs_nocache RS256 "$(pem_key rs "$WORK/rsa.pub.pem")" "cache_entries = 0"
    provider ps_nocache PS256 "$(pem_key rs "$WORK/rsa.pub.pem")" "cache_entries = 0"
    provider es_nocache ES256 "$(pem_key es "$WORK/ec.pub.pem")" "cache_entries = 0"
    provider ed_nocache EdDSA "$(pem_key ed "$WORK/ed.pub.pem")" "cache_entries = 0"
    provider hs_nocache HS256 "$hs_key" "cache_entries = 0"
} >"$WORK/switchyard.toml"
# The flood's client addresses come from X-Forwarded-For: loopback is a trusted proxy.
sed -i '/^\[proxy\]$/a trusted_proxies = ["127.0.0.1/32"]' "$WORK/switchyard.toml"
grep -q '^trusted_proxies' "$WORK/switchyard.toml" || die "no [proxy] section to extend"
"$BIN" check-config "$WORK/switchyard.toml" >/dev/null || die "bad generated config $WORK/switchyard.toml"

# --- the gateways ---------------------------------------------------------------------------
# The second one, on the next ports, has the failure budgets turned off (for the flood).
{
    cat "$WORK/switchyard.toml"
    printf '\n[auth.failure_budget]\nburst = 0\nglobal_burst = 0\n'
} >"$WORK/switchyard-nobudget.toml"
"$BIN" check-config "$WORK/switchyard-nobudget.toml" >/dev/null || die "bad generated config $WORK/switchyard-nobudget.toml"
# The third, two ports on, has the budgets but sends their refusals at once (not held).
{
    cat "$WORK/switchyard.toml"
    printf '\n[auth.failure_budget]\nrefusal_delay_ms = 0\n'
} >"$WORK/switchyard-nohold.toml"
"$BIN" check-config "$WORK/switchyard-nohold.toml" >/dev/null || die "bad generated config $WORK/switchyard-nohold.toml"
for p in "$PROXY_PORT" "$ADMIN_PORT" $((PROXY_PORT + 1)) $((ADMIN_PORT + 1)) $((PROXY_PORT + 2)) $((ADMIN_PORT + 2)); do
    port_free "$p" || die "port $p already in use"
done
start_bg switchyard 1 "$BIN" run --config "$WORK/switchyard.toml" --consul "$CONSUL" \
    --kv-prefix bench-auth/ --listen "127.0.0.1:$PROXY_PORT" --admin "127.0.0.1:$ADMIN_PORT"
GW_PID=$LAST_PID
start_bg switchyard-nobudget 1 "$BIN" run --config "$WORK/switchyard-nobudget.toml" --consul "$CONSUL" \
    --kv-prefix bench-auth/ --listen "127.0.0.1:$((PROXY_PORT + 1))" --admin "127.0.0.1:$((ADMIN_PORT + 1))"
NOBUDGET_PID=$LAST_PID
start_bg switchyard-nohold 1 "$BIN" run --config "$WORK/switchyard-nohold.toml" --consul "$CONSUL" \
    --kv-prefix bench-auth/ --listen "127.0.0.1:$((PROXY_PORT + 2))" --admin "127.0.0.1:$((ADMIN_PORT + 2))"
NOHOLD_PID=$LAST_PID

# case|path|header: every case must answer 200 before the measurement starts.
CASES=(
    "off|/off/|"
    "off_same_header|/off/|Authorization: Bearer $RS_TOKEN"
    "api_key|/apikey/|X-API-Key: $API_KEY"
    "hs256|/hs256/|Authorization: Bearer $HS_TOKEN"
    "rs256|/rs256/|Authorization: Bearer $RS_TOKEN"
    "rs256_nocache|/rs256-nocache/|Authorization: Bearer $RS_TOKEN"
    "ps256_nocache|/ps256-nocache/|Authorization: Bearer $PS_TOKEN"
    "es256_nocache|/es256-nocache/|Authorization: Bearer $ES_TOKEN"
    "eddsa_nocache|/eddsa-nocache/|Authorization: Bearer $ED_TOKEN"
    "hs256_nocache|/hs256-nocache/|Authorization: Bearer $HS_TOKEN"
)
for c in "${CASES[@]}"; do
    IFS='|' read -r name path hdr <<<"$c"
    for port in "$PROXY_PORT" $((PROXY_PORT + 1)) $((PROXY_PORT + 2)); do
        bench_wait_url "http://127.0.0.1:$port$path" 15 ${hdr:+-H "$hdr"} ||
            die "case $name: $path on :$port does not answer 200 (see $WORK/switchyard*.out; KEEP_RUNDIR=1)"
    done
    code=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$PROXY_PORT$path" || true)
    [[ $name == off* || $code == 401 ]] || die "case $name: no credential answers $code, not 401"
done

# wrk_once PATH HEADER: "rps p50_ms p99_ms requests errors" of one run.
wrk_once() {
    timeout $((DURATION + 30)) taskset -c 0 wrk -t1 -c"$CONNS" -d"${DURATION}s" --latency \
        ${2:+-H "$2"} "http://127.0.0.1:$PROXY_PORT$1" 2>&1 | bench_wrk_summary
}

# FLOOD_ONLY=1 skips the per-case table (the flood table alone takes a third of the time).
if [[ ${FLOOD_ONLY:-0} != 1 ]]; then
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
        us=$(bench_cpu_us $((t1 - t0)) "$reqs")
        echo "$name $rep $rps $p50 $p99 $err $us" >>"$rows"
        log "run $rep/$REPS $name: $rps req/s p50 ${p50}ms p99 ${p99}ms errors $err gateway ${us} us/req"
    done
done
alive "$GW_PID" || die "the gateway died during the run (see $WORK/switchyard.out)"

col() { awk -v n="$1" -v f="$2" '$1 == n { print $f }' "$rows" | median; }
base=$(col off 3)
base_us=$(col off 7)
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
            "$(bench_ratio "$rps" "$base")" "$(col "$name" 4)" "$(col "$name" 5)" \
            "$(awk -v n="$name" '$1 == n { s += $6 } END { print s + 0 }' "$rows")" \
            "$us" "$(bench_ratio "$us" "$base_us")"
    done
} | tee "$OUT"
else
    mkdir -p "$(dirname "$OUT")"
    : >"$OUT"
fi

# --- the bad-signature flood ------------------------------------------------------------
HEALTHY_CONNS="${HEALTHY_CONNS:-10}"
# Distinct RS256 tokens with bad signatures: the valid token's signature with its first 8
# characters replaced by a counter. `one`: every request from 10.6.6.6; `many`: each from
# its own address; `notoken`: the same requests without a token (401 before any crypto:
# the floor a flood of refused requests costs).
cat >"$WORK/flood.lua" <<'EOF_LUA'
local alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
local counter, base, tail, mode = 0, "", "", "one"
local threads = {}
function setup(thread) table.insert(threads, thread) end
function init(args)
    base, tail, mode = args[1], args[2], args[3]
    s401, s429, sother = 0, 0, 0
end
function request()
    counter = counter + 1
    local n, pre = counter, {}
    for i = 1, 8 do
        local d = n % 64
        pre[i] = alphabet:sub(d + 1, d + 1)
        n = math.floor(n / 64)
    end
    local xff = "10.6.6.6"
    if mode == "many" then
        local c = counter
        xff = string.format("10.%d.%d.%d", math.floor(c / 65536) % 256, math.floor(c / 256) % 256, c % 256)
    end
    local headers = { ["X-Forwarded-For"] = xff }
    if mode ~= "notoken" then
        headers["Authorization"] = "Bearer " .. base .. table.concat(pre) .. tail
    end
    return wrk.format("GET", "/rs256/", headers)
end
function response(status)
    if status == 401 then s401 = s401 + 1
    elseif status == 429 then s429 = s429 + 1
    else sother = sother + 1 end
end
function done()
    local a, b, c = 0, 0, 0
    for _, t in ipairs(threads) do
        a, b, c = a + t:get("s401"), b + t:get("s429"), c + t:get("sother")
    end
    io.write(string.format("statuses 401=%d 429=%d other=%d\n", a, b, c))
end
EOF_LUA
RS_BASE="${RS_TOKEN%.*}."
RS_SIG="${RS_TOKEN##*.}"

# flood MODE PORT SECONDS: the flood's wrk output (summary and statuses) in $WORK/flood.out.
flood() {
    timeout $(($3 + 30)) taskset -c 0 wrk -t1 -c"$CONNS" -d"${3}s" --latency \
        -s "$WORK/flood.lua" "http://127.0.0.1:$2/rs256/" -- \
        "$RS_BASE" "${RS_SIG:8}" "$1" >"$WORK/flood.out" 2>&1
}
# healthy PORT: "rps p50_ms p99_ms requests errors" of the healthy client, which sends its
# own X-Forwarded-For and a token the cache knows.
healthy() {
    timeout $((DURATION + 30)) taskset -c 0 wrk -t1 -c"$HEALTHY_CONNS" -d"${DURATION}s" --latency \
        -H "Authorization: Bearer $RS_TOKEN" -H "X-Forwarded-For: 10.1.1.1" \
        "http://127.0.0.1:$1/rs256/" 2>&1 | bench_wrk_summary
}

# A flood case: name|flood mode (- for none)|gateway (budget: the default budgets, whose
# refusals are held a second; nohold: the same budgets, refusals sent at once; nobudget:
# burst = 0, global_burst = 0)|label.
FLOODS=(
    "none|-|budget|none (healthy alone)"
    "notoken|notoken|budget|no token (floor)"
    "one|one|budget|one address, budget on"
    "one_nohold|one|nohold|one address, refusals not held"
    "one_nobudget|one|nobudget|one address, budget off"
    "many|many|budget|new address each"
    "many_nohold|many|nohold|new address each, not held"
    "many_nobudget|many|nobudget|new address each, budgets off"
)
log "flood: healthy -c$HEALTHY_CONNS alone, then beside a bad-signature flood -c$CONNS, x $REPS"
frows="$WORK/flood-rows"
: >"$frows"
for rep in $(seq "$REPS"); do
    for f in "${FLOODS[@]}"; do
        IFS='|' read -r name mode gw _ <<<"$f"
        case $gw in
            budget) port=$PROXY_PORT pid=$GW_PID ;;
            nobudget) port=$((PROXY_PORT + 1)) pid=$NOBUDGET_PID ;;
            nohold) port=$((PROXY_PORT + 2)) pid=$NOHOLD_PID ;;
        esac
        if [[ $mode != - ]]; then
            flood "$mode" "$port" $((DURATION + 2)) &
            fpid=$!
            sleep 1
        fi
        t0=$(cpu_ticks "$pid")
        read -r rps _ p99 reqs err < <(healthy "$port")
        t1=$(cpu_ticks "$pid")
        frps=0 s401=0 s429=0
        if [[ $mode != - ]]; then
            wait "$fpid" || true
            frps=$(awk '/Requests\/sec:/ { print $2 }' "$WORK/flood.out")
            read -r s401 s429 < <(sed -n 's/^statuses 401=\([0-9]*\) 429=\([0-9]*\).*/\1 \2/p' "$WORK/flood.out")
        fi
        # The gateway's CPU share over the healthy client's run (1.0: a whole core).
        busy=$(awk -v t=$((t1 - t0)) -v hz="$HZ" -v d="$DURATION" 'BEGIN { print t / hz / d }')
        echo "$name $rep $rps $p99 $err ${frps:-0} ${s401:-0} ${s429:-0} $busy" >>"$frows"
        log "run $rep/$REPS flood=$name: healthy $rps req/s p99 ${p99}ms errors $err; flood ${frps:-0} req/s 401=${s401:-0} 429=${s429:-0}; gateway busy $busy"
    done
done
alive "$GW_PID" || die "the gateway died during the flood (see $WORK/switchyard.out)"
alive "$NOBUDGET_PID" || die "the gateway without budget died during the flood (see $WORK/switchyard-nobudget.out)"
alive "$NOHOLD_PID" || die "the gateway without held refusals died during the flood (see $WORK/switchyard-nohold.out)"
fcol() { awk -v n="$1" -v f="$2" '$1 == n { print $f }' "$frows" | median; }
base_p99=$(fcol none 4)
{
    echo
    echo "# bad-signature flood (RS256, distinct tokens), healthy client wrk -c$HEALTHY_CONNS with a cached token, flood wrk -c$CONNS, ${DURATION}s x $REPS"
    printf '%-30s %11s %8s %12s %9s %9s %9s %8s %6s\n' flood healthy_rps p99_ms p99_vs_alone \
        flood_rps flood_401 flood_429 gw_busy errors
    for f in "${FLOODS[@]}"; do
        IFS='|' read -r name _ _ label <<<"$f"
        p99=$(fcol "$name" 4)
        printf '%-30s %11.0f %8.3f %12.2f %9.0f %9.0f %9.0f %8.2f %6d\n' "$label" "$(fcol "$name" 3)" "$p99" \
            "$(bench_ratio "$p99" "$base_p99")" "$(fcol "$name" 6)" "$(fcol "$name" 7)" "$(fcol "$name" 8)" \
            "$(fcol "$name" 9)" "$(awk -v n="$name" '$1 == n { s += $5 } END { print s + 0 }' "$frows")"
    done
} | tee -a "$OUT"
