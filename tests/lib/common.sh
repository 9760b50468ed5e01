# Shared helpers for shell tests. Source it first: . "$COWTREE_TOP/tests/lib/common.sh"
set -euo pipefail
: "${COWTREE_TOP:=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}"
: "${COWTREE_BUILD:=$COWTREE_TOP/build}"
CT_IMG="$COWTREE_BUILD/cowtree-img"
CT_IO="$COWTREE_BUILD/cowtree-io"
T=$(mktemp -d "${TMPDIR:-/tmp}/ct.XXXXXX")
trap 'rm -rf "$T"' EXIT

skip() { echo "skip: $*"; exit 77; }
die() { echo "FAIL: $*" >&2; exit 1; }
requires() { for c in "$@"; do command -v "$c" >/dev/null 2>&1 || skip "needs $c"; done; }
# Run a command that must succeed; show it on failure.
ok() { "$@" || die "command failed (rc=$?): $*"; }
# Run a command that must fail with exit code $1.
fails_with() { local want=$1; shift; set +e; "$@"; local rc=$?; set -e; [ "$rc" -eq "$want" ] || die "expected rc=$want, got rc=$rc: $*"; }
# qemu-img check must report a clean image (no corruption, no leak).
qemu_clean() { local out; out=$(qemu-img check "$@" 2>&1) || die "qemu-img check $*: $out"; }
