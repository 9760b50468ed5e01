#!/usr/bin/env bash
# Safe rebase on a 1 TiB virtual chain with about 1 MiB of differing data: base <- sn1 <- top,
# rebased from sn1 onto base. Only sn1's ranges can differ, so the job's cost follows them,
# not the virtual size. No timing assertion: the times of cowtree-img and (when it finishes
# within 120 s) qemu-img are printed. Checks: top reads as before, only sn1's data was copied,
# the images check clean.
. "$(dirname "$0")/../lib/common.sh"
. "$(dirname "$0")/chainlib.sh"
requires timeout

G=$((1 << 30))
mk() { qemu-img create -q -f qcow2 "$@" >/dev/null || die "create $*"; }
o=$T/orig
mkdir -p "$o"
cd "$o"
mk base.qcow2 1T
qio -c "write -P 0x11 0 1M" -c "write -P 0x12 $((500 * G)) 1M" -c "write -P 0x13 $((1024 * G - (1 << 20))) 1M" base.qcow2
mk -b base.qcow2 -F qcow2 sn1.qcow2
qio -c "write -P 0x21 $((100 * G)) 256k" -c "write -P 0x22 $((300 * G)) 256k" \
    -c "write -P 0x23 $((500 * G + 512 * 1024)) 256k" -c "write -z $((1024 * G - (1 << 20))) 256k" sn1.qcow2
mk -b sn1.qcow2 -F qcow2 top.qcow2
qio -c "write -P 0x31 $((100 * G)) 64k" -c "write -P 0x32 $((200 * G)) 64k" top.qcow2
cd - >/dev/null

mkdir -p "$T/ct" "$T/q" "$T/ref"
cp "$o"/* "$T/ct"/
cp "$o"/* "$T/q"/
cp "$o"/* "$T/ref"/

ns() { date +%s%N; }
t0=$(ns)
(cd "$T/ct" && ok "$CT_IMG" rebase -q -b base.qcow2 -F qcow2 top.qcow2)
t1=$(ns)
ct_ms=$(((t1 - t0) / 1000000))
echo "cowtree-img rebase (1 TiB, ~1 MiB differing): ${ct_ms} ms"

[ "$(backing_of "$T/ct/top.qcow2")" = base.qcow2 ] || die "link not changed"
same_images "$T/ct/top.qcow2" "$T/ref/top.qcow2"
all_clean "$T/ct/top.qcow2"
# top now holds its own 128 KiB plus sn1's ranges (about 1 MiB), nothing more.
own=$(qemu-img map --output=json "$T/ct/top.qcow2" | python3 -c '
import json, sys
print(sum(e["length"] for e in json.load(sys.stdin) if e["depth"] == 0 and e["present"]))')
[ "$own" -le $((2 << 20)) ] || die "top allocates $own bytes after the rebase"
echo "top allocates $own bytes"

set +e
t0=$(ns)
(cd "$T/q" && timeout 120 qemu-img rebase -q -b base.qcow2 -F qcow2 top.qcow2)
rc=$?
t1=$(ns)
set -e
if [ "$rc" -eq 124 ]; then
    echo "qemu-img rebase: did not finish within 120 s (stopped)"
elif [ "$rc" -eq 0 ]; then
    echo "qemu-img rebase: $(((t1 - t0) / 1000000)) ms"
    same_images "$T/ct/top.qcow2" "$T/q/top.qcow2"
else
    die "qemu-img rebase failed: rc=$rc"
fi

# Onto a copy of base (another file: no common ancestor): every range either chain allocates
# is compared; still a few MiB.
mkdir -p "$T/ct2" "$T/q2"
cp "$o"/* "$T/ct2"/
cp "$o/base.qcow2" "$T/ct2/copy.qcow2"
cp "$T"/ct2/* "$T/q2"/
t0=$(ns)
(cd "$T/ct2" && ok "$CT_IMG" rebase -q -b copy.qcow2 -F qcow2 top.qcow2)
t1=$(ns)
echo "cowtree-img rebase onto an unrelated 1 TiB chain: $(((t1 - t0) / 1000000)) ms"
same_images "$T/ct2/top.qcow2" "$T/ref/top.qcow2"
all_clean "$T/ct2/top.qcow2"
set +e
# qemu-img compares the whole disk here: give it 120 s in long mode, 15 s otherwise.
limit=15
[ "${COWTREE_TEST_LONG:-0}" = 1 ] && limit=120
t0=$(ns)
(cd "$T/q2" && timeout "$limit" qemu-img rebase -q -b copy.qcow2 -F qcow2 top.qcow2)
rc=$?
t1=$(ns)
set -e
if [ "$rc" -eq 124 ]; then
    echo "qemu-img rebase onto the unrelated chain: did not finish within $limit s (stopped)"
elif [ "$rc" -eq 0 ]; then
    echo "qemu-img rebase onto the unrelated chain: $(((t1 - t0) / 1000000)) ms"
    same_images "$T/ct2/top.qcow2" "$T/q2/top.qcow2"
else
    die "qemu-img rebase failed: rc=$rc"
fi
