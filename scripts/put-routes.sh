#!/usr/bin/env bash
# put-routes.sh [FILE.json|DIR]...: stores route documents in Consul KV under
# ${SWITCHYARD_KV_PREFIX:-switchyard/}routes/<file name without .json>. Default: config/routes/.
# The gateway picks them up live; check with: curl 127.0.0.1:9901/routes
set -euo pipefail
consul=${CONSUL_HTTP_ADDR:-127.0.0.1:8500}
[[ $consul == *://* ]] || consul="http://$consul"
prefix=${SWITCHYARD_KV_PREFIX:-switchyard/}
auth=()
[[ -n ${CONSUL_HTTP_TOKEN:-} ]] && auth=(-H "X-Consul-Token: $CONSUL_HTTP_TOKEN")
(($# > 0)) || set -- "$(dirname "$0")/../config/routes"
files=()
for arg in "$@"; do
    if [[ -d $arg ]]; then files+=("$arg"/*.json); else files+=("$arg"); fi
done
for f in "${files[@]}"; do
    name=$(basename "$f" .json)
    curl -fsS "${auth[@]}" -X PUT --data-binary "@$f" "$consul/v1/kv/${prefix}routes/$name" >/dev/null
    echo "stored ${prefix}routes/$name"
done
