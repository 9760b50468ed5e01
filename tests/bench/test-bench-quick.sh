#!/usr/bin/env bash
# Smoke test of the benchmark harness: bench/run --quick builds cowtree optimised, runs every
# workload beside its QEMU counterpart once or twice, and fails only if a command fails or the
# two sides' outputs differ. Times are reported, never asserted. Runs once (release build).
. "$(dirname "$0")/../lib/common.sh"
requires qemu-img python3
case "$COWTREE_BUILD" in *asan*) skip "benchmarks run against the release build only" ;; esac
python3 "$COWTREE_TOP/bench/run" --quick --out "$T/bench" || die "bench/run --quick failed"
ls "$T/bench" >/dev/null
echo "benchmark harness ok"
