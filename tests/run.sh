#!/usr/bin/env bash
# Runs every test program and script; prints "N passed, N failed[, N skipped]" last and exits
# non-zero on any failure. Each test is an executable under tests/<suite>/ named test-*.sh,
# test-*.py, or a unit-test binary built by meson into $BUILD/tests/. A test exits 0 (pass),
# 77 (skip) or anything else (fail); its output goes to tests/out/<name>.log and is shown on
# failure.
#
# usage: tests/run.sh [-b BUILD_DIR]... [-j JOBS] [-k PATTERN] [--long]
# PATTERN matches SUITE/FILE, e.g. -k interop/ or -k test-kill.
# With several -b, every test runs against each build in turn; one summary line at the end.
set -u
here=$(cd "$(dirname "$0")" && pwd)
top=$(dirname "$here")
builds=()
jobs=$(nproc 2>/dev/null || echo 2)
pattern=""
export COWTREE_TEST_LONG=${COWTREE_TEST_LONG:-0}
while [ $# -gt 0 ]; do
    case "$1" in
    -b) builds+=("$(cd "$2" && pwd)"); shift 2 ;;
    -j) jobs=$2; shift 2 ;;
    -k) pattern=$2; shift 2 ;;
    --long) COWTREE_TEST_LONG=1; shift ;;
    *) echo "usage: $0 [-b BUILD_DIR] [-j JOBS] [-k PATTERN] [--long]" >&2; exit 2 ;;
    esac
done
[ ${#builds[@]} -gt 0 ] || builds=("$top/build")
export COWTREE_TOP="$top"
total_pass=0 total_fail=0 total_skip=0
for build in "${builds[@]}"; do
export COWTREE_BUILD="$build"
CT_RUN_OUT="$top/tests/out/$(basename "$build").$$"
rm -rf "$CT_RUN_OUT"
mkdir -p "$CT_RUN_OUT"
echo "== tests against $(basename "$build") =="

tests=()
for t in "$build"/tests/unit/unit-*; do
    [ -x "$t" ] && [ -f "$t" ] && tests+=("$t")
done
for t in "$here"/*/test-*.sh "$here"/*/test-*.py; do
    [ -x "$t" ] && tests+=("$t")
done
if [ -n "$pattern" ]; then
    sel=()
    for t in "${tests[@]}"; do
        case "$(basename "$(dirname "$t")")/$(basename "$t")" in *$pattern*) sel+=("$t") ;; esac
    done
    tests=("${sel[@]}")
fi

run_one() {
    local t=$1 name log rc start
    name=$(basename "$(dirname "$t")")-$(basename "$t")
    log="$CT_RUN_OUT/$name.log"
    start=$(date +%s)
    (cd "$COWTREE_TOP" && TMPDIR=$(mktemp -d) && export TMPDIR && "$t"; rc=$?; rm -rf "$TMPDIR"; exit $rc) >"$log" 2>&1
    rc=$?
    echo "$rc $(($(date +%s) - start)) $name" >"$log.rc"
}
export -f run_one
export CT_RUN_OUT

[ ${#tests[@]} -gt 0 ] && printf '%s\n' "${tests[@]}" | xargs -P "$jobs" -I{} bash -c 'run_one "$@"' _ {}

pass=0 fail=0 skip=0
for t in "${tests[@]}"; do
    name=$(basename "$(dirname "$t")")-$(basename "$t")
    read -r rc secs _ <"$CT_RUN_OUT/$name.log.rc"
    case "$rc" in
    0) pass=$((pass + 1)); echo "PASS $name (${secs}s)" ;;
    77) skip=$((skip + 1)); echo "SKIP $name: $(tail -1 "$CT_RUN_OUT/$name.log")" ;;
    *) fail=$((fail + 1)); echo "FAIL $name (rc=$rc, ${secs}s)"; sed 's/^/    | /' "$CT_RUN_OUT/$name.log" | tail -40 ;;
    esac
done
total_pass=$((total_pass + pass)) total_fail=$((total_fail + fail)) total_skip=$((total_skip + skip))
done
echo "$total_pass passed, $total_fail failed, $total_skip skipped"
[ "$total_fail" -eq 0 ]
