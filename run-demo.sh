#!/usr/bin/env bash
# The demo: a two-node mesh in one process; prints the connection path and closes it.
set -euo pipefail
cd "$(dirname "$0")"
exec cargo run --quiet -p nsm-examples --bin demo
