#!/usr/bin/env bash
# A profile-guided release build. An instrumented build of the gateway serves the
# benchmark's traffic (the dev registry, the harness's two loopback upstreams, GETs from wrk
# at 50 and 256 connections), llvm-profdata merges what it counted, and the release build
# is compiled with those counts: hot code laid out together, cold code out of the way.
# The profile tunes the HTTP/1.1 proxy path it was trained on; every other path stays
# correct, only untuned. Out of CI (it needs wrk, nginx and llvm-profdata).
#
# Usage: scripts/build-pgo.sh             → target/pgo/release/switchyard
#        BIN=target/pgo/release/switchyard scripts/bench.sh   (measures that build)
# Needs: llvm-profdata of the LLVM version rustc was built with (`rustc -vV`); on Debian
#        `apt-get install llvm-<major>`. Env: BENCH_DIR (../shared/bench), TRAIN_SECONDS (10
#        per connection count), ports as in scripts/bench.sh.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
BENCH_DIR="${BENCH_DIR:-$ROOT/../shared/bench}"
TRAIN_SECONDS="${TRAIN_SECONDS:-10}"

# shellcheck source=scripts/bench-common.sh
source "$ROOT/scripts/bench-common.sh"
say() { printf '[build-pgo] %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

major="$(rustc -vV | sed -n 's/^LLVM version: \([0-9]*\).*/\1/p')"
[[ -n "$major" ]] || die "rustc -vV names no LLVM version"
PROFDATA=""
for candidate in "llvm-profdata-$major" "/usr/lib/llvm-$major/bin/llvm-profdata"; do
    if command -v "$candidate" >/dev/null; then
        PROFDATA="$candidate"
        break
    fi
done
[[ -n "$PROFDATA" ]] || die "llvm-profdata for LLVM $major is missing (Debian: apt-get install llvm-$major)"
[[ -x "$BENCH_DIR/upstream.sh" ]] || die "no harness at $BENCH_DIR (set BENCH_DIR)"
for tool in wrk nginx curl; do
    command -v "$tool" >/dev/null || die "$tool is missing ($BENCH_DIR/setup.sh installs it)"
done

bench_workdir switchyard-pgo

say "1/4 instrumented build"
(cd "$ROOT" && CARGO_TARGET_DIR="$ROOT/target/pgo-gen" \
    RUSTFLAGS="-Cprofile-generate=$WORK/raw" \
    cargo build --release --locked --bin switchyard >&2)
GEN="$ROOT/target/pgo-gen/release/switchyard"

say "2/4 training: ${TRAIN_SECONDS}s of GETs at 50 and at 256 connections"
"$BENCH_DIR/upstream.sh" 600 >"$WORK/upstreams.log" 2>&1 &
PIDS+=($!)
# The registry is not what is being trained: its counts go elsewhere.
LLVM_PROFILE_FILE="$WORK/registry-%p.profraw" "$GEN" registry \
    --listen "127.0.0.1:$REGISTRY_PORT" >"$WORK/registry.log" 2>&1 &
PIDS+=($!)
CONSUL="http://127.0.0.1:$REGISTRY_PORT"
bench_wait_registry "$CONSUL" || die "registry did not start (see $WORK/registry.log)"
bench_register "$CONSUL" "$UPSTREAM1_PORT" "$UPSTREAM2_PORT" || die "registering the upstreams failed"
bench_route "$CONSUL" switchyard-bench/ root '{"service":"bench","path_prefix":"/"}' || die "storing the route failed"
bench_gateway_config >"$WORK/switchyard.toml"
LLVM_PROFILE_FILE="$WORK/raw/gateway-%p.profraw" \
    bench_gateway "$WORK/switchyard.toml" "$CONSUL" "$WORK/switchyard.log" "$GEN"
GW=$!
PIDS+=("$GW")
bench_wait_url "http://127.0.0.1:$ADMIN_PORT/ready" 10 || die "gateway not ready (see $WORK/switchyard.log)"
for conns in 50 256; do
    wrk -t1 -c"$conns" -d"${TRAIN_SECONDS}s" "http://127.0.0.1:$PROXY_PORT/" | grep -E 'Requests/sec|errors' >&2 || true
done
# The counts are written when the process exits.
kill -TERM "$GW"
wait "$GW" || die "the instrumented gateway did not exit cleanly (see $WORK/switchyard.log)"

say "3/4 merging the profile"
"$PROFDATA" merge -o "$WORK/merged.profdata" "$WORK"/raw/gateway-*.profraw

say "4/4 optimised build with the profile"
(cd "$ROOT" && CARGO_TARGET_DIR="$ROOT/target/pgo" \
    RUSTFLAGS="-Cprofile-use=$WORK/merged.profdata" \
    cargo build --release --locked --bin switchyard >&2)
say "done: $ROOT/target/pgo/release/switchyard"
