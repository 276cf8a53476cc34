#!/usr/bin/env bash
# Builds the guide programs (hello-endpoint, embed-client, my-nsmgr) the way a user
# outside this repository would: each copied into a fresh crate whose only
# dependencies are the library crates (by path) and crates.io crates. Fails when one
# of them needs the unpublished nsm-examples crate or anything else of the workspace.
#
# Usage: .ci/check-external-endpoint.sh [REPOSITORY_ROOT]   (default: this checkout)
# CARGO_TARGET_DIR defaults to the repository's target/ (warm).
set -euo pipefail

root="$(cd "${1:-"$(dirname "$0")/.."}" && pwd)"
programs=(hello-endpoint embed-client my-nsmgr)

crate="$(mktemp -d "${TMPDIR:-/tmp}/nsm-external-check.XXXXXX")"
trap 'rm -rf "$crate"' EXIT
mkdir -p "$crate/src/bin"
for p in "${programs[@]}"; do
    src="$root/examples/src/bin/$p.rs"
    if grep -q 'nsm_examples' "$src"; then
        echo "$src uses nsm_examples: a crate outside the repository cannot build it" >&2
        exit 1
    fi
    cp "$src" "$crate/src/bin/$p.rs"
done
# The workspace's lock file: the same versions as CI's build of the workspace.
cp "$root/Cargo.lock" "$crate/Cargo.lock"
cat >"$crate/Cargo.toml" <<TOML
[package]
name = "nsm-external-check"
version = "0.1.0"
edition = "2021"
publish = false

[dependencies]
nsm-sdk = { path = "$root/nsm-sdk" }
clap = { version = "4", features = ["derive", "env"] }
tokio = { version = "1", features = ["macros", "rt-multi-thread", "signal", "time"] }
tokio-util = "0.7"
tracing = "0.1"
tracing-subscriber = { version = "0.3", features = ["env-filter", "fmt"] }

# Not a member of any workspace above it.
[workspace]
TOML

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$root/target}"
# The workspace builds dependencies without debug info ([profile.dev.package."*"]): the
# same here, so the warm dependencies are reused instead of built again.
export CARGO_PROFILE_DEV_DEBUG="${CARGO_PROFILE_DEV_DEBUG:-false}"
cargo check --manifest-path "$crate/Cargo.toml" --bins
echo "ok: ${programs[*]} build outside the workspace"
