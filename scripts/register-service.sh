#!/usr/bin/env bash
# register-service.sh NAME PORT [ADDRESS] [ID]: registers a service instance in the Consul agent
# at $CONSUL_HTTP_ADDR (default 127.0.0.1:8500) with an HTTP check on http://ADDRESS:PORT/health.
# Deregister with: curl -X PUT $CONSUL_HTTP_ADDR/v1/agent/service/deregister/ID
set -euo pipefail
(($# >= 2)) || { echo "usage: $0 NAME PORT [ADDRESS] [ID]" >&2; exit 2; }
name=$1 port=$2 address=${3:-127.0.0.1} id=${4:-$1-$2}
consul=${CONSUL_HTTP_ADDR:-127.0.0.1:8500}
[[ $consul == *://* ]] || consul="http://$consul"
auth=()
[[ -n ${CONSUL_HTTP_TOKEN:-} ]] && auth=(-H "X-Consul-Token: $CONSUL_HTTP_TOKEN")
curl -fsS "${auth[@]}" -X PUT "$consul/v1/agent/service/register" --data-binary @- <<JSON
{"Name": "$name", "ID": "$id", "Address": "$address", "Port": $port,
 "Check": {"HTTP": "http://$address:$port/health", "Interval": "2s", "Timeout": "1s",
           "DeregisterCriticalServiceAfter": "10m"}}
JSON
echo "registered $id ($name at $address:$port)"
