#!/usr/bin/env bash
# Fuzz smoke test: replay every input in tests/fuzz/regressions/ once (each must now pass),
# then run each libFuzzer target for 20 s on its seed corpus (known bugs from
# fuzz/known-bugs.txt steered around, as fuzz/run-smoke.sh does).
#
# Skipped (exit 77) unless the fuzz build exists ($COWTREE_TOP/build-fuzz, or
# COWTREE_FUZZ_BUILD) or COWTREE_FUZZ=1 is set, in which case it is configured and built:
#   CC=clang meson setup build-fuzz -Dfuzzing=true -Db_sanitize=address,undefined -Db_lundef=false
# A regression input is named TARGET-SHORTNAME (TARGET = fuzz-open, fuzz-write, ...).
# env: COWTREE_FUZZ_SECONDS (default 20) per target.
set -uo pipefail
top=${COWTREE_TOP:-$(cd "$(dirname "$0")/../.." && pwd)}
build=${COWTREE_FUZZ_BUILD:-$top/build-fuzz}
secs=${COWTREE_FUZZ_SECONDS:-20}
if [ ! -d "$build" ] && [ "${COWTREE_FUZZ:-0}" != 1 ]; then
    echo "skip: no fuzz build at $build (set COWTREE_FUZZ=1 to build one)"
    exit 77
fi
command -v clang >/dev/null || { echo "skip: needs clang"; exit 77; }
if [ ! -f "$build/build.ninja" ]; then
    CC=clang meson setup "$build" -Dfuzzing=true -Db_sanitize=address,undefined \
        -Db_lundef=false >/dev/null || { echo "FAIL: meson setup of $build failed"; exit 1; }
fi
targets=(fuzz-open fuzz-write fuzz-nbd fuzz-qmp fuzz-xml)
ninja -C "$build" $(printf 'fuzz/%s ' "${targets[@]}") >/dev/null ||
    { echo "FAIL: building the fuzz targets failed"; exit 1; }

export ASAN_OPTIONS=${ASAN_OPTIONS:-abort_on_error=1:detect_leaks=1:allocator_may_return_null=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-halt_on_error=1:print_stacktrace=1}
tmp=$(mktemp -d "${TMPDIR:-/tmp}/ct-fuzz.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
fail=0

# 1. Regressions: strict, no FUZZ_AVOID.
n=0
for f in "$top"/tests/fuzz/regressions/*; do
    [ -f "$f" ] || continue
    name=$(basename "$f")
    t=$(echo "$name" | cut -d- -f1-2)
    bin=$build/fuzz/$t
    if [ ! -x "$bin" ]; then
        echo "FAIL: $name: no target $t"
        fail=1
        continue
    fi
    n=$((n + 1))
    FUZZ_AVOID= timeout 120 "$bin" -runs=1 -error_exitcode=1 "$f" >"$tmp/$name.log" 2>&1
    rc=$?
    if [ "$rc" -eq 0 ]; then
        echo "ok: regression $name"
    else
        echo "FAIL: regression $name (rc=$rc):"
        # The finding, then the stack frames inside cowtree and the targets.
        grep -E 'oracle violation|ERROR: (AddressSanitizer|LeakSanitizer)|runtime error|^    #[0-9]+ .*\.\./(src|fuzz)/' \
            "$tmp/$name.log" | head -12 | sed 's/^/    /'
        fail=1
    fi
done
echo "$n regression inputs replayed"

# 2. A short fuzzing run per target on a scratch copy of its corpus.
FUZZ_AVOID=$(grep -v '^#' "$top/fuzz/known-bugs.txt" 2>/dev/null | awk 'NF { print $1 }' |
             paste -sd, -)
export FUZZ_AVOID
for t in "${targets[@]}"; do
    case "$t" in
    fuzz-open) ml=307200 ;;
    fuzz-nbd) ml=70000 ;;
    fuzz-qmp | fuzz-xml) ml=16384 ;;
    *) ml=2048 ;;
    esac
    mkdir -p "$tmp/corpus-$t" "$tmp/art-$t"
    dict=()
    [ -f "$top/fuzz/$t.dict" ] && dict=(-dict="$top/fuzz/$t.dict")
    # CI sets COWTREE_FUZZ_RUNS: a fixed seed and number of runs make the result repeatable
    # (a time budget explores a different amount on every machine).
    budget=(-max_total_time="$secs")
    [ -n "${COWTREE_FUZZ_RUNS:-}" ] && budget=(-runs="$COWTREE_FUZZ_RUNS" -seed="${COWTREE_FUZZ_SEED:-1}")
    "$build/fuzz/$t" "${budget[@]}" -max_len="$ml" -timeout=60 -rss_limit_mb=4096 \
        -artifact_prefix="$tmp/art-$t/" -print_final_stats=1 -error_exitcode=1 "${dict[@]}" \
        "$tmp/corpus-$t" "$top/tests/fuzz/corpus-${t#fuzz-}" >"$tmp/$t.log" 2>&1
    rc=$?
    execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$tmp/$t.log" | grep -o '[0-9]*$' | tail -1)
    cov=$(grep -E '^#[0-9]+' "$tmp/$t.log" | grep -o 'cov: [0-9]*' | tail -1)
    if [ "$rc" -ne 0 ]; then
        echo "FAIL: $t crashed after ${execs:-?} executions (FUZZ_AVOID=$FUZZ_AVOID):"
        grep -E 'oracle violation|ERROR: (AddressSanitizer|LeakSanitizer|libFuzzer)|runtime error' \
            "$tmp/$t.log" | head -3 | sed 's/^/    /'
        for a in "$tmp/art-$t"/*; do
            [ -f "$a" ] || continue
            mkdir -p "$top/tests/out"
            cp "$a" "$top/tests/out/$t-$(basename "$a")"
            echo "    input kept as tests/out/$t-$(basename "$a")"
        done
        fail=1
    else
        echo "ok: $t ${budget[*]}, ${execs:-?} executions, ${cov:-cov: ?}"
    fi
done
exit $fail
