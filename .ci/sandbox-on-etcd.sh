#!/usr/bin/env bash
# The registry-heavy sandbox suites again, with the sandbox's registry on a real etcd
# (issue 15): starts one etcd member on free loopback ports with a temporary data
# directory, runs the suites with NSM_SANDBOX_ETCD pointing at it (each sandbox keeps
# its entries under a prefix of its own), and stops etcd whatever happens. Extra
# arguments go to cargo nextest (the same build as the workspace run: no rebuild).
set -euo pipefail
cd "$(dirname "$0")/.."

free_port() {
  local port
  while :; do
    port=$((20000 + RANDOM % 40000))
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
      echo "$port"
      return
    fi
  done
}

client_port=$(free_port)
peer_port=$(free_port)
data=$(mktemp -d -t nsm-sandbox-etcd.XXXXXX)
etcd --name sandbox --data-dir "$data/data" \
  --listen-client-urls "http://127.0.0.1:$client_port" \
  --advertise-client-urls "http://127.0.0.1:$client_port" \
  --listen-peer-urls "http://127.0.0.1:$peer_port" \
  --initial-advertise-peer-urls "http://127.0.0.1:$peer_port" \
  --initial-cluster "sandbox=http://127.0.0.1:$peer_port" \
  --heartbeat-interval 50 --election-timeout 500 \
  --logger zap --log-level warn >"$data/etcd.log" 2>&1 &
etcd_pid=$!
trap 'kill "$etcd_pid" 2>/dev/null || true; wait "$etcd_pid" 2>/dev/null || true; rm -rf "$data"' EXIT

healthy() {
  exec 3<>"/dev/tcp/127.0.0.1/$client_port" || return 1
  printf 'GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n' >&3
  grep -q '"health":"true"' <&3
  local ok=$?
  exec 3<&-
  return $ok
}
for _ in $(seq 1 150); do
  if healthy 2>/dev/null; then break; fi
  if ! kill -0 "$etcd_pid" 2>/dev/null; then
    echo "etcd exited:"; cat "$data/etcd.log"; exit 1
  fi
  sleep 0.2
done
healthy 2>/dev/null || { echo "etcd not healthy within 30 s:"; cat "$data/etcd.log"; exit 1; }

echo "sandbox suites with the registry on etcd at http://127.0.0.1:$client_port"
NSM_SANDBOX_ETCD="http://127.0.0.1:$client_port" cargo nextest run --workspace --all-features \
  -E 'binary(usecases) | binary(reselect) | binary(lifecycle) | binary(selection) | binary(upstream) | binary(vl3) | binary(interdomain)' \
  "$@"
