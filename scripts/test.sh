#!/usr/bin/env bash
# Everything CI runs: dependencies, release + sanitizer builds, format check, the whole test
# suite in both builds. Ends with "N passed, N failed".
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh
scripts/build.sh --asan
if command -v clang-format >/dev/null; then
    bad=$(clang-format --dry-run $(git ls-files '*.c' '*.h') 2>&1 | grep -c warning || true)
    if [ "$bad" != 0 ]; then
        echo "clang-format: $bad places differ from .clang-format" >&2
        clang-format --dry-run $(git ls-files '*.c' '*.h') 2>&1 | head -20 >&2
        exit 1
    fi
fi
# The fuzz smoke test builds the libFuzzer targets (build-fuzz/) and runs each briefly.
# A fixed seed and run count keep CI repeatable; tests/fuzz/open-findings lists known open bugs.
export COWTREE_FUZZ=1 COWTREE_FUZZ_RUNS=${COWTREE_FUZZ_RUNS:-400} COWTREE_FUZZ_SEED=${COWTREE_FUZZ_SEED:-3}
export ASAN_OPTIONS=detect_leaks=1:abort_on_error=0:exitcode=99
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1:exitcode=98
tests/run.sh -b build-asan -b build "$@"
