#!/usr/bin/env bash
# Build the libFuzzer targets and run each one for a while.
#
# usage: fuzz/run-smoke.sh [TARGET...]        (default: every target)
# env:   FUZZ_SECONDS  seconds per target (default 60)
#        FUZZ_BUILD    build directory (default build-fuzz at the top of the tree; created with
#                      CC=clang meson setup ... -Dfuzzing=true -Db_sanitize=address,undefined)
#        FUZZ_AVOID    known bugs to steer around (default: the names in fuzz/known-bugs.txt;
#                      set it to "" to look for those too)
#        FUZZ_JOBS     parallel libFuzzer workers per target (default 1)
#
# The working corpus grows in $FUZZ_BUILD/fuzz/corpus-TARGET (seeded from tests/fuzz/corpus-*),
# crashes land in $FUZZ_BUILD/fuzz/artifacts-TARGET/, the full log in $FUZZ_BUILD/fuzz/TARGET.log.
# Prints executions and coverage per target; exits 1 if any target crashed.
# Minimise a crash with:  $FUZZ_BUILD/fuzz/TARGET -minimize_crash=1 -runs=20000 CRASH
set -uo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
build=${FUZZ_BUILD:-$top/build-fuzz}
secs=${FUZZ_SECONDS:-60}
jobs=${FUZZ_JOBS:-1}
if [ -z "${FUZZ_AVOID+x}" ]; then
    FUZZ_AVOID=$(grep -v '^#' "$top/fuzz/known-bugs.txt" 2>/dev/null | awk 'NF { print $1 }' |
                 paste -sd, -)
fi
export FUZZ_AVOID
export ASAN_OPTIONS=${ASAN_OPTIONS:-abort_on_error=1:detect_leaks=1:allocator_may_return_null=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-halt_on_error=1:print_stacktrace=1}

targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(fuzz-open fuzz-write fuzz-nbd fuzz-qmp fuzz-xml)

if [ ! -f "$build/build.ninja" ]; then
    CC=clang meson setup "$build" -Dfuzzing=true -Db_sanitize=address,undefined \
        -Db_lundef=false >/dev/null || { echo "run-smoke.sh: meson setup failed" >&2; exit 2; }
fi
ninja -C "$build" $(printf 'fuzz/%s ' "${targets[@]}") >/dev/null ||
    { echo "run-smoke.sh: build failed" >&2; exit 2; }

max_len() {
    case "$1" in
    fuzz-open) echo 307200 ;; # seed images are < 300 KiB
    fuzz-write) echo 2048 ;;  # 8-byte header + up to 96 operations of <= 8 bytes
    fuzz-nbd) echo 70000 ;;   # room for one option just over the 64 KiB option limit
    fuzz-qmp | fuzz-xml) echo 16384 ;;
    *) echo 65536 ;;
    esac
}

status=0
echo "FUZZ_AVOID=${FUZZ_AVOID:-<none>}"
for t in "${targets[@]}"; do
    bin=$build/fuzz/$t
    corpus=$build/fuzz/corpus-$t
    art=$build/fuzz/artifacts-$t
    log=$build/fuzz/$t.log
    seeds=$top/tests/fuzz/corpus-${t#fuzz-}
    mkdir -p "$corpus" "$art"
    before=$(ls "$art" | wc -l)
    extra=()
    [ "$jobs" -gt 1 ] && extra=(-fork="$jobs" -ignore_crashes=1)
    [ -f "$top/fuzz/$t.dict" ] && extra+=(-dict="$top/fuzz/$t.dict")
    echo "== $t: ${secs}s, seeds $(ls "$seeds" 2>/dev/null | wc -l), corpus $(ls "$corpus" | wc -l)"
    "$bin" -max_total_time="$secs" -max_len="$(max_len "$t")" -timeout=60 -rss_limit_mb=4096 \
        -artifact_prefix="$art/" -print_final_stats=1 -error_exitcode=1 "${extra[@]}" \
        "$corpus" "$seeds" >"$log" 2>&1
    rc=$?
    execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' | tail -1)
    last=$(grep -E '^#[0-9]+' "$log" | grep -o 'cov: [0-9]* ft: [0-9]* corp: [0-9]*' | tail -1)
    echo "   executions: ${execs:-?}  ${last:-cov: ?}  exit: $rc"
    after=$(ls "$art" | wc -l)
    if [ "$rc" -ne 0 ] || [ "$after" -gt "$before" ]; then
        status=1
        grep -E 'oracle violation|ERROR: (AddressSanitizer|LeakSanitizer|libFuzzer)|runtime error' "$log" |
            head -3 | sed 's/^/   /'
        ls -t "$art" | head -3 | sed "s|^|   artifact: $art/|"
    fi
done
exit $status
