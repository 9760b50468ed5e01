#!/usr/bin/env bash
# SIGKILL at every write and fdatasync call of `cowtree-img create -f qcow2 -o cluster_size=512
# img 1G` and `cowtree-img resize img +10G` (plus v2, preallocation=metadata, 64k-cluster and
# --shrink neighbours).  Afterwards the image either fails to open with a clear one-line error
# (interrupted create only) or checks without corruption, keeps its size old-or-new and its
# data, and is repaired to a clean check by a read-write open.  Driver: kill_create.py.
. "${COWTREE_TOP:-$(cd "$(dirname "$0")/../.." && pwd)}/tests/lib/common.sh"
requires qemu-img qemu-io python3
[ -x "$CT_IO" ] && [ -x "$CT_IMG" ] || skip "no cowtree binaries in $COWTREE_BUILD"
W=$(mktemp -d /dev/shm/ct-crash.XXXXXX 2>/dev/null) || W=$(mktemp -d "$T/w.XXXXXX")
trap 'rm -rf "$T" "$W"' EXIT
rc=0
PYTHONDONTWRITEBYTECODE=1 COWTREE_BUILD="$COWTREE_BUILD" python3 "$COWTREE_TOP/tests/crash/kill_create.py" "$W" || rc=$?
exit $rc
