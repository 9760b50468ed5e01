#!/usr/bin/env bash
# I/O errors instead of kills: the test-kill-random workload with one write or fdatasync call
# failing (COWTREE_FAULT=write:K:eio, write:K:enospc, flush:K:eio).  cowtree-io must exit 1
# with a message naming the error (no crash, no sanitizer report); afterwards qemu-img check
# finds no corruption, a read-write open by cowtree-io leaves the image clean, and data made
# durable by a successful flush reads back.  Default: ~30+20+30 sampled K per image variant;
# COWTREE_TEST_LONG=1: every K.  Driver: fault_errors.py.
. "${COWTREE_TOP:-$(cd "$(dirname "$0")/../.." && pwd)}/tests/lib/common.sh"
requires qemu-img qemu-io python3
[ -x "$CT_IO" ] && [ -x "$CT_IMG" ] || skip "no cowtree binaries in $COWTREE_BUILD"
W=$(mktemp -d /dev/shm/ct-crash.XXXXXX 2>/dev/null) || W=$(mktemp -d "$T/w.XXXXXX")
trap 'rm -rf "$T" "$W"' EXIT
rc=0
PYTHONDONTWRITEBYTECODE=1 COWTREE_BUILD="$COWTREE_BUILD" python3 "$COWTREE_TOP/tests/crash/fault_errors.py" "$W" || rc=$?
exit $rc
