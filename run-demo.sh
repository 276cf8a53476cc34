#!/usr/bin/env bash
# The demo. As root: a pod on node 1 joins a corporate network behind a VPN gateway on
# node 2, through a firewall, over VXLAN (network namespaces made and removed by the
# demo); the gateway dies and the connection heals. Without root: the same mesh in
# one process with the NOOP mechanism. `--interdomain`: a pod of one cluster uses a VPN
# gateway of another (VXLAN through public addresses, a heal), as root. Installs what it
# needs (as root) when missing. `--vl3` runs the vL3 act (three nodes, six pods, names).
set -euo pipefail
cd "$(dirname "$0")"

need_apt=()
command -v ip >/dev/null 2>&1 || need_apt+=(iproute2)
command -v ping >/dev/null 2>&1 || need_apt+=(iputils-ping)
command -v nft >/dev/null 2>&1 || need_apt+=(nftables)
# --interdomain: the clusters find each other by DNS (a real dnsmasq on loopback).
if [[ " $* " == *" --interdomain "* ]]; then
  command -v dnsmasq >/dev/null 2>&1 || [ -x /usr/sbin/dnsmasq ] || need_apt+=(dnsmasq-base)
fi
if [ ${#need_apt[@]} -gt 0 ] && [ "$(id -u)" = 0 ]; then
  echo "installing: ${need_apt[*]}"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi
exec cargo run --quiet -p nsm-examples --bin demo -- "$@"
