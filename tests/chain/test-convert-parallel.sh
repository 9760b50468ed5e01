#!/usr/bin/env bash
# convert -m N (parallel copy), -W (out-of-order writes) and -C (copy offloading) give the
# same guest view as qemu-img convert on the same inputs: a large sparse qcow2 (6 GiB virtual,
# scattered data, zero clusters, data holding zero runs), a compressed source, a qcow2 backing
# chain, several sources, an internal snapshot, -n into a target holding other data, -S 0;
# qcow2 targets check clean; without -W a qcow2 target's clusters are allocated in guest order;
# -C copies raw to raw and is refused with -c and -S like qemu-img; -m outside 1..16 refused.
. "$(dirname "$0")/../lib/common.sh"
. "$(dirname "$0")/chainlib.sh"

cd "$T"
disk_kib() { du -k "$1" | cut -f1; }
# Two raw files read alike (qemu-img compare skips holes: cheaper than cmp on sparse files).
same_raw() { qemu-img compare -q -f raw -F raw "$1" "$2" || die "$3: $1 differs from $2"; }
# Host offsets of a qcow2's data extents, in guest order, never decrease (in-order writer).
in_guest_order() {
    qemu-img map -U --output=json "$1" | python3 -c '
import json, sys
offs = [e["offset"] for e in json.load(sys.stdin) if e.get("data") and "offset" in e]
bad = [i for i in range(1, len(offs)) if offs[i] < offs[i - 1]]
sys.exit(1 if bad or len(offs) < 2 else 0)' || die "$1: clusters not allocated in guest order"
}

# A large sparse source: 8 GiB, data scattered over several L2 tables, zero clusters, a
# 1 MiB data run with a 256 KiB zero run inside (to be left sparse), unaligned tails.
qemu-img create -q -f qcow2 big.qcow2 6G
qio -c 'write -P 0x61 0 3M' -c 'write -P 0x62 1G 5M' -c 'write -z 1025M 2M' \
    -c 'write -P 0x63 3G 1M' -c 'write -z 3145984k 256k' -c 'write -P 0x64 5G 513k' \
    -c 'write -P 0x65 6143M 1M' -c 'write -P 0x66 4095M 2M' big.qcow2
qemu-img convert -O raw big.qcow2 qbig.raw
qemu-img convert -O qcow2 big.qcow2 qbig.qcow2
for m in 1 2 8 16; do
    for w in "" -W; do
        rm -f o.raw o.qcow2
        ok "$CT_IMG" convert -m $m $w -O raw big.qcow2 o.raw
        same_raw o.raw qbig.raw "-m $m $w"
        [ "$(disk_kib o.raw)" -le $(($(disk_kib qbig.raw) + 64)) ] ||
            die "-m $m $w raw not sparse: $(disk_kib o.raw) KiB vs qemu-img $(disk_kib qbig.raw)"
        ok "$CT_IMG" convert -m $m $w -O qcow2 big.qcow2 o.qcow2
        same_images o.qcow2 qbig.qcow2
        all_clean o.qcow2
        [ -n "$w" ] || in_guest_order o.qcow2
    done
done
echo "large sparse image ok"


# A compressed source (the workers decompress in parallel).
qemu-img convert -c -O qcow2 big.qcow2 comp.qcow2
rm -f o.raw
ok "$CT_IMG" convert -m 8 -O raw comp.qcow2 o.raw
same_raw o.raw qbig.raw "compressed source"
ok "$CT_IMG" convert -m 4 -W -c -O qcow2 big.qcow2 c.qcow2
same_images c.qcow2 qbig.qcow2
all_clean c.qcow2
rm -f o.raw c.qcow2 comp.qcow2
echo "compressed ok"

# A qcow2 source with a backing chain, flattened; and -B (stays sequential) with -m.
mkchain "$T/c"
cd "$T/c"
qemu-img convert -O qcow2 Active.qcow2 qflat.qcow2
qemu-img convert -O raw Active.qcow2 qflat.raw
for args in "-m 8" "-m 8 -W" "-m 3" "-m 16 -W"; do
    rm -f flat.qcow2 flat.raw
    # shellcheck disable=SC2086
    ok "$CT_IMG" convert $args -O qcow2 Active.qcow2 flat.qcow2
    same_images flat.qcow2 qflat.qcow2
    all_clean flat.qcow2
    # shellcheck disable=SC2086
    ok "$CT_IMG" convert $args -O raw Active.qcow2 flat.raw
    cmp flat.raw qflat.raw || die "chain $args raw differs"
done
ok "$CT_IMG" convert -m 8 -O qcow2 -B Snap-3.qcow2 -F qcow2 Active.qcow2 ovl.qcow2
ok qemu-img convert -O qcow2 -B Snap-3.qcow2 -F qcow2 Active.qcow2 qovl.qcow2
same_images ovl.qcow2 qovl.qcow2
all_clean ovl.qcow2
echo "backing chain ok"

# Several sources concatenated, in parallel.
qemu-img create -q -f raw small.raw 1000448
qemu-io -f raw -c 'write -P 0x77 4096 8192' small.raw >/dev/null
ok "$CT_IMG" convert -m 8 -O qcow2 RootBase.qcow2 small.raw Snap-2.qcow2 cat.qcow2
ok qemu-img convert -O qcow2 RootBase.qcow2 small.raw Snap-2.qcow2 qcat.qcow2
same_images cat.qcow2 qcat.qcow2
all_clean cat.qcow2
ok "$CT_IMG" convert -m 8 -W -O raw RootBase.qcow2 small.raw Snap-2.qcow2 cat.raw
ok qemu-img convert -O raw RootBase.qcow2 small.raw Snap-2.qcow2 qcat.raw
cmp cat.raw qcat.raw || die "concatenated raw differs"
echo "concatenation ok"

# -n into targets that hold other data (zeros must be written, by the workers for raw).
qemu-img create -q -f qcow2 exist.qcow2 32M
qio -c 'write -P 0xee 0 32M' exist.qcow2
ok "$CT_IMG" convert -m 8 -n -O qcow2 Active.qcow2 exist.qcow2
same_images exist.qcow2 qflat.raw
all_clean exist.qcow2
qemu-img create -q -f raw exist.raw 32M
qemu-io -f raw -c 'write -P 0xee 0 32M' exist.raw >/dev/null
ok "$CT_IMG" convert -m 8 -n -O raw Active.qcow2 exist.raw
cmp exist.raw qflat.raw || die "-n raw differs"
echo "-n ok"

# -S 0: fully allocated raw output, still the same bytes.
ok "$CT_IMG" convert -m 8 -S 0 -O raw Active.qcow2 full.raw
cmp full.raw qflat.raw || die "-S 0 -m 8 differs"
[ "$(disk_kib full.raw)" -ge 32768 ] || die "-S 0 -m 8 not fully allocated"
echo "-S 0 ok"

# An internal snapshot, with -m.
qemu-img create -q -f qcow2 snap.qcow2 64M
qio -c 'write -P 0x61 0 20M' snap.qcow2
qemu-img snapshot -c s1 snap.qcow2
qio -c 'write -P 0x62 512k 30M' snap.qcow2
qemu-img convert -O raw -l snapshot.name=s1 snap.qcow2 qs1.raw
ok "$CT_IMG" convert -m 8 -O raw -l snapshot.name=s1 snap.qcow2 s1.raw
cmp s1.raw qs1.raw || die "-l with -m differs"
echo "snapshot ok"

# -C: raw to raw through copy_file_range (and qcow2 sources fall back to plain copies).
for m in 1 8; do
    rm -f cr.raw cq.raw cq.qcow2
    ok "$CT_IMG" convert -C -m $m -f raw -O raw qflat.raw cr.raw
    cmp cr.raw qflat.raw || die "-C -m $m raw to raw differs"
    ok "$CT_IMG" convert -C -m $m -O raw Active.qcow2 cq.raw
    cmp cq.raw qflat.raw || die "-C -m $m qcow2 to raw differs"
    ok "$CT_IMG" convert -C -m $m -O qcow2 Active.qcow2 cq.qcow2
    same_images cq.qcow2 qflat.qcow2
    all_clean cq.qcow2
done
ok qemu-img convert -C -f raw -O raw qflat.raw qcr.raw
cmp cr.raw qcr.raw || die "-C differs from qemu-img -C"
echo "-C ok"

# Refusals, with qemu-img's messages.
refused() {
    local want=$1
    shift
    set +e
    "$CT_IMG" convert "$@" Active.qcow2 refused.out 2>"$T/err"
    local rc=$?
    set -e
    [ "$rc" -eq 1 ] && grep -q "$want" "$T/err" || die "convert $*: rc=$rc $(cat "$T/err")"
    [ ! -e refused.out ] || die "convert $*: left a target behind"
}
refused "Cannot enable copy offloading when -c is used" -C -c -O qcow2
refused "Cannot enable copy offloading when -S is used" -C -S 4k -O raw
refused "Cannot enable copy offloading when -S is used" -C -S 0 -O raw
refused "Allowed number of coroutines is between 1 and 16" -m 0 -O raw
refused "Allowed number of coroutines is between 1 and 16" -m 17 -O raw
refused "Allowed number of coroutines is between 1 and 16" -m x -O raw
echo "refusals ok"
