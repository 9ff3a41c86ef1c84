#!/usr/bin/env bash
# chaos.sh [--minutes N]: the gateway under steady load (keep-alive and new connections, a
# public and a JWT route) while the embedded dev registry misbehaves in turn, repeatedly:
# stopped, hung, answering 500, malformed JSON, slow, killed and restarted empty, a flapping
# check, 1,000 services in and out. Prints one line per fault (requests, failed requests,
# worst convergence of a health change after the heal) and exits 1 if a request failed or a
# convergence took over 1 s. Default: 2 minutes. See docs/operations.md, "Chaos".
# A debug build: everything runs in one process and the figures are times to converge, not
# throughput, so the release build's long link is not worth it.
set -euo pipefail
cd "$(dirname "$0")/.."
echo "machine: $(nproc) cores, $(uname -sr)" >&2
cargo run --quiet --example chaos -- "$@"
