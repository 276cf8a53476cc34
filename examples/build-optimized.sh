#!/usr/bin/env bash
# The example programs built the way a release of them should be: with profile-guided
# optimisation (PGO) and then BOLT (a post-link optimiser that lays the code out by
# how it ran), both trained on the programs' own work, into target/optimized/bin.
#
# Why: a Request crosses four processes, and each one wakes up with its caches full of
# the others' code, so the time goes into many small functions run cold (h2, hyper,
# tonic, prost, tokio, the SDK), not into one hot spot. PGO and BOLT put the code a
# call runs next to each other and the rest out of the way: a local Request + Close
# costs a third less CPU (BENCHMARKS.md, mesh_processes, "Session 5").
#
# Training: `nsm-load --processes` runs the registry, manager, forwarder and ICMP
# responder and sets up, refreshes and closes connections through them: NOOP one at
# a time and 16 at a time, both runtime kinds, at the programs' default log level, and
# as root KERNEL too (veth pairs into namespaces of its own). It is not the benchmark:
# the bench's own client and timing are not in it.
#
# Usage: examples/build-optimized.sh [--no-bolt] [--bench]
#   --no-bolt  PGO only (BOLT is also skipped when llvm-bolt cannot be had).
#   --bench    then run the mesh_processes bench against the optimised programs
#              (NSM_BENCH_RUNTIMES, default 1, and NSM_BENCH_VARIANTS, default
#              binaries, as for the bench).
# Needs: the Rust toolchain, and LLVM's llvm-profdata (and llvm-bolt, merge-fdata) of
# the same major version as rustc's LLVM; on Debian, as root, they are installed here
# (packages llvm-N and bolt-N). Takes about 25 minutes on 2 cores (two whole release
# builds with link-time optimisation). Work files stay in target/optimized.
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }

bolt=1
bench=0
for arg in "$@"; do
  case "$arg" in
    --no-bolt) bolt=0 ;;
    --bench) bench=1 ;;
    -h | --help) usage; exit 0 ;;
    *) echo "build-optimized.sh: unknown argument $arg (see --help)" >&2; exit 2 ;;
  esac
done

cd "$(dirname "$0")/.."
root=$PWD
out=$root/target/optimized
log=$out/build.log
mkdir -p "$out"
: >"$log"

say() { echo "build-optimized: $*" >&2; }
fail() { say "$*"; say "log: $log"; exit 1; }

host=$(rustc -vV | sed -n 's/^host: //p')
llvm=$(rustc -vV | sed -n 's/^LLVM version: \([0-9]*\).*/\1/p')
[ -n "$host" ] && [ -n "$llvm" ] || fail "cannot read the host or the LLVM version from rustc -vV"

# A tool of LLVM $llvm: tool-N on the PATH, or in /usr/lib/llvm-N/bin.
find_tool() {
  local t
  for t in "$1-$llvm" "/usr/lib/llvm-$llvm/bin/$1"; do
    if command -v "$t" >/dev/null 2>&1; then
      command -v "$t"
      return 0
    fi
  done
  return 1
}

install_llvm() {
  local pkgs=("$@")
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    say "installing ${pkgs[*]} (Debian packages)"
    if ! DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${pkgs[@]}" >>"$log" 2>&1; then
      apt-get update >>"$log" 2>&1 || true
      DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${pkgs[@]}" >>"$log" 2>&1 || return 1
    fi
  else
    return 1
  fi
}

profdata=$(find_tool llvm-profdata) || {
  install_llvm "llvm-$llvm" || true
  profdata=$(find_tool llvm-profdata) ||
    fail "llvm-profdata of LLVM $llvm (rustc's) is missing: install LLVM $llvm's tools (Debian: llvm-$llvm)"
}
if [ "$bolt" = 1 ]; then
  case "$host" in
    x86_64-* | aarch64-*) ;;
    *) say "BOLT does not support $host: PGO only"; bolt=0 ;;
  esac
fi
if [ "$bolt" = 1 ]; then
  if ! llvm_bolt=$(find_tool llvm-bolt) || ! merge_fdata=$(find_tool merge-fdata); then
    install_llvm "bolt-$llvm" || true
    if ! llvm_bolt=$(find_tool llvm-bolt) || ! merge_fdata=$(find_tool merge-fdata); then
      say "llvm-bolt of LLVM $llvm is missing (Debian: bolt-$llvm): PGO only"
      bolt=0
    fi
  fi
fi

# The programs a training run starts, and nsm-load, which drives them.
trained=(nsm-registry nsmgr nsm-forwarder nse-icmp-responder nsm-load)

# Runs the training load with the programs in $1.
train() {
  local bin=$1 run
  for run in "--concurrency 1 --mesh-worker-threads 1 --clients 2000 --duration 2s" \
             "--concurrency 16 --clients 2000 --duration 10s --token-lifetime 15s"; do
    # shellcheck disable=SC2086 # $run is a list of flags
    "$bin/nsm-load" --processes --bin-dir "$bin" --mesh-log-level info --no-progress $run \
      >>"$log" 2>&1 || fail "training run failed: nsm-load $run"
  done
  if [ "$(id -u)" = 0 ] && command -v ip >/dev/null 2>&1; then
    "$bin/nsm-load" --processes --bin-dir "$bin" --mesh-log-level info --no-progress \
      --mechanism kernel --clients 100 --concurrency 10 --duration 3s \
      >>"$log" 2>&1 || fail "training run failed: nsm-load --mechanism kernel"
  fi
}

start=$(date +%s)

# 1. Instrumented build: each process writes its counters when it exits.
say "1/4 instrumented build (target/optimized/gen)"
rm -rf "$out/profraw"
mkdir -p "$out/profraw"
CARGO_TARGET_DIR=$out/gen RUSTFLAGS="-Cprofile-generate=$out/profraw" \
  cargo build --release --target "$host" -p nsm-examples --bins >>"$log" 2>&1 ||
  fail "the instrumented build failed"
say "2/4 training (PGO)"
train "$out/gen/$host/release"
ls "$out/profraw"/*.profraw >/dev/null 2>&1 || fail "the training wrote no profile"
"$profdata" merge -o "$out/nsm.profdata" "$out/profraw"/*.profraw >>"$log" 2>&1 ||
  fail "llvm-profdata merge failed"

# 2. The optimised build, with the bench (whose client chain is the SDK's too). BOLT
# needs the relocations kept in the linked programs.
say "3/4 optimised build (target/optimized/use)"
flags="-Cprofile-use=$out/nsm.profdata"
[ "$bolt" = 1 ] && flags="$flags -Clink-arg=-Wl,--emit-relocs"
CARGO_TARGET_DIR=$out/use RUSTFLAGS="$flags" \
  cargo bench --no-run --target "$host" -p nsm-examples --bench mesh_processes >>"$log" 2>&1 ||
  fail "the optimised build failed"
built=$out/use/$host/release
rm -rf "$out/bin"
mkdir -p "$out/bin"
for f in "$built"/*; do
  if [ -f "$f" ] && [ -x "$f" ]; then cp "$f" "$out/bin/"; fi
done

# 3. BOLT: instrument the trained programs, train again, lay them out by the counts.
if [ "$bolt" = 1 ]; then
  say "4/4 BOLT: instrumented programs, training, layout"
  rm -rf "$out/bolt-inst" "$out/fdata"
  mkdir -p "$out/bolt-inst" "$out/fdata"
  cp "$out/bin"/* "$out/bolt-inst/"
  for p in "${trained[@]}"; do
    "$llvm_bolt" "$built/$p" -instrument -o "$out/bolt-inst/$p" \
      -instrumentation-file="$out/fdata/$p" -instrumentation-file-append-pid >>"$log" 2>&1 ||
      fail "llvm-bolt -instrument $p failed"
  done
  train "$out/bolt-inst"
  for p in "${trained[@]}"; do
    ls "$out/fdata/$p".*.fdata >/dev/null 2>&1 || fail "BOLT training wrote no profile for $p"
    "$merge_fdata" "$out/fdata/$p".*.fdata >"$out/fdata/$p.fdata" 2>>"$log" ||
      fail "merge-fdata $p failed"
    "$llvm_bolt" "$built/$p" -o "$out/bin/$p" -data="$out/fdata/$p.fdata" \
      -reorder-blocks=ext-tsp -reorder-functions=cdsort -split-functions -split-all-cold \
      -split-eh -icf=safe -use-gnu-stack >>"$log" 2>&1 ||
      fail "llvm-bolt $p failed"
  done
else
  say "4/4 BOLT skipped"
fi

# The result must work: a short load through the optimised programs, each of which
# must stop cleanly.
"$out/bin/nsm-load" --processes --bin-dir "$out/bin" --clients 200 --concurrency 8 \
  --duration 1s --no-progress >>"$log" 2>&1 ||
  fail "the optimised programs failed a load run"

bench_bin=$(find "$built/deps" -maxdepth 1 -type f -executable -name 'mesh_processes-*' \
  -printf '%T@ %p\n' | sort -n | tail -1 | cut -d' ' -f2)
say "done in $(($(date +%s) - start)) s: $out/bin ($( [ "$bolt" = 1 ] && echo PGO + BOLT || echo PGO))"
say "bench: NSM_BENCH_BIN_DIR=$out/bin NSM_BENCH_RUNTIMES=1 NSM_BENCH_VARIANTS=binaries $bench_bin --bench"
if [ "$bench" = 1 ]; then
  [ -n "$bench_bin" ] || fail "no bench binary in $built/deps"
  NSM_BENCH_BIN_DIR=$out/bin NSM_BENCH_RUNTIMES=${NSM_BENCH_RUNTIMES:-1} \
    NSM_BENCH_VARIANTS=${NSM_BENCH_VARIANTS:-binaries} "$bench_bin" --bench
fi
