#!/usr/bin/env bash
# Crash safety under SIGKILL: a mixed cowtree-io workload (pattern writes of mixed sizes and
# alignments, zero writes, discards, a growing truncate, flushes between segments) on qcow2
# overlays (v3, v2, extended L2, a moving refcount table) is killed at chosen write/fdatasync
# calls with COWTREE_FAULT=write:K:kill / flush:K:kill.  After each kill: qemu-img check finds
# no corruption; a read-write open by cowtree-io repairs the image to a clean check; durable
# data reads back and interrupted writes are old-or-new per sector.  Default: ~60 write points
# per variant plus those around every flush, and every flush point; COWTREE_TEST_LONG=1: every
# write and flush point.  Driver: kill_random.py (crashlib.py holds the oracle).
. "${COWTREE_TOP:-$(cd "$(dirname "$0")/../.." && pwd)}/tests/lib/common.sh"
requires qemu-img qemu-io python3
[ -x "$CT_IO" ] && [ -x "$CT_IMG" ] || skip "no cowtree binaries in $COWTREE_BUILD"
# Work on tmpfs when there is one: a killed process loses nothing that is in the page cache,
# so fdatasync buys nothing here and costs a lot on a real disk.
W=$(mktemp -d /dev/shm/ct-crash.XXXXXX 2>/dev/null) || W=$(mktemp -d "$T/w.XXXXXX")
trap 'rm -rf "$T" "$W"' EXIT
rc=0
PYTHONDONTWRITEBYTECODE=1 COWTREE_BUILD="$COWTREE_BUILD" python3 "$COWTREE_TOP/tests/crash/kill_random.py" "$W" || rc=$?
exit $rc
