#!/usr/bin/env bash
# The project's test command: installs what the build and tests need on a fresh
# machine, then checks formatting and lints and runs every test of the workspace.
set -euo pipefail
cd "$(dirname "$0")"

need_apt=()
command -v ip >/dev/null 2>&1 || need_apt+=(iproute2)
command -v nft >/dev/null 2>&1 || need_apt+=(nftables)
# Not needed by the tests: the throughput benches (BENCHMARKS.md) use it.
command -v iperf3 >/dev/null 2>&1 || need_apt+=(iperf3)
command -v ping >/dev/null 2>&1 || need_apt+=(iputils-ping)
# The registry's etcd store: its tests start real etcd members; etcd-client's build
# script compiles the etcd protos with protoc.
command -v etcd >/dev/null 2>&1 || need_apt+=(etcd-server)
command -v protoc >/dev/null 2>&1 || need_apt+=(protobuf-compiler)
# The interdomain scenarios' DNS server (tests/tests/interdomain.rs).
command -v dnsmasq >/dev/null 2>&1 || [ -x /usr/sbin/dnsmasq ] || need_apt+=(dnsmasq-base)
# nsm-k8s's tests run deploy/webhook-certs.sh, which makes the webhook's certificate.
command -v openssl >/dev/null 2>&1 || need_apt+=(openssl)
# tests/tests/other_languages.rs: a Python gRPC client (grpcio from PyPI, below).
command -v python3 >/dev/null 2>&1 || need_apt+=(python3 python3-pip)
if [ ${#need_apt[@]} -gt 0 ] && [ "$(id -u)" = 0 ]; then
  echo "installing: ${need_apt[*]}"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi
# gRPC C-core's Python client and its protoc plugin, for tests/tests/other_languages.rs
# (Debian's own python3 refuses plain pip installs: the second form says it may).
if ! python3 -c 'import grpc, grpc_tools' >/dev/null 2>&1; then
  echo "installing grpcio grpcio-tools"
  python3 -m pip install --quiet grpcio grpcio-tools \
    || python3 -m pip install --quiet --break-system-packages grpcio grpcio-tools
fi
if ! cargo nextest --version >/dev/null 2>&1; then
  echo "installing cargo-nextest"
  cargo install cargo-nextest --locked
fi
rustup component list --installed 2>/dev/null | grep -q rustfmt || rustup component add rustfmt clippy || true

cargo fmt --all -- --check
# The shell scripts parse (the optimised build is not run here: it takes 25 minutes).
for script in run-demo.sh run-tests.sh deploy/webhook-certs.sh examples/build-optimized.sh .ci/check-external-endpoint.sh .ci/sandbox-on-etcd.sh; do bash -n "$script"; done
cargo clippy --workspace --all-targets --all-features -- -D warnings
# The library crates are packageable for crates.io (metadata, readme, file list), and
# the README's guide programs build as a crate of their own outside the workspace,
# depending on the library crates and crates.io only.
cargo package --quiet --no-verify --allow-dirty -p nsm-proto -p nsm-sdk -p nsm-sdk-kernel -p nsm-sdk-vxlan -p nsm-sdk-dns
./.ci/check-external-endpoint.sh
# nextest runs each test in its own process, so process-wide counters (live tasks)
# and kernel state of one test never disturb another.
cargo nextest run --workspace --all-features --no-fail-fast
# nsm-sdk without its `dns` feature: a name@domain lookup is Unimplemented, not a hang.
cargo nextest run -p nsm-sdk --lib -E 'test(/without_the_dns_feature/)'
# The registry-heavy sandbox suites again with the registry on a real etcd (issue 15):
# the same build, about 20 s.
./.ci/sandbox-on-etcd.sh --no-fail-fast
cargo test --workspace --all-features --doc
