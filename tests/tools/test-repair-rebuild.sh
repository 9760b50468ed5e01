#!/usr/bin/env bash
# check -r all rebuilds refcount structures that are beyond patching (iotest 108's territory):
# an unusable refcount table offset, a refcount block pointing into the L1 table, a missing
# refcount block. Afterwards qemu-img check is clean and no guest-visible byte of the active
# state or of the snapshot has changed; before the repair, qemu-img and cowtree both refuse.
. "$(dirname "$0")/../lib/common.sh"
requires qemu-img python3

make_image() {
    rm -f "$T/img.qcow2"
    "$CT_IMG" create -q -f qcow2 -o "$1" "$T/img.qcow2" 64M
    "$CT_IO" -c 'write -q -P 1 0 8M' -c 'write -q -P 7 40M 3M' "$T/img.qcow2"
    "$CT_IMG" snapshot -c s "$T/img.qcow2"
    "$CT_IO" -c 'write -q -P 2 1M 1M' -c 'write -q -z 41M 64k' "$T/img.qcow2"
    qemu-img convert -O raw "$T/img.qcow2" "$T/active.raw"
    qemu-img convert -l s -O raw "$T/img.qcow2" "$T/snap.raw"
}

patch() { # patch KIND
    python3 - "$T/img.qcow2" "$1" <<'PY'
import struct, sys
path, kind = sys.argv[1], sys.argv[2]
f = open(path, "r+b")
hdr = f.read(72)
l1 = struct.unpack(">Q", hdr[40:48])[0]
rt = struct.unpack(">Q", hdr[48:56])[0]
if kind == "unaligned-table":
    f.seek(48); f.write(struct.pack(">Q", rt + 0x200))
elif kind == "block-into-l1":
    f.seek(rt); f.write(struct.pack(">Q", l1))
elif kind == "block-missing":
    f.seek(rt); f.write(struct.pack(">Q", 0))
PY
}

n=0
for opts in compat=1.1 compat=0.10 cluster_size=4k,refcount_bits=8 extended_l2=on; do
    for kind in unaligned-table block-into-l1 block-missing; do
        make_image "$opts"
        patch "$kind"
        set +e
        "$CT_IMG" check "$T/img.qcow2" >/dev/null 2>&1
        rc=$?
        set -e
        [ "$rc" -ne 0 ] || die "$opts/$kind: check of the broken image said clean"
        out=$("$CT_IMG" check -r all "$T/img.qcow2" 2>&1) || die "$opts/$kind: repair failed: $out"
        qemu_clean "$T/img.qcow2"
        qemu-img compare -q "$T/img.qcow2" "$T/active.raw" || die "$opts/$kind: active state changed"
        qemu-img convert -l s -O raw "$T/img.qcow2" "$T/snap2.raw"
        cmp -s "$T/snap.raw" "$T/snap2.raw" || die "$opts/$kind: snapshot content changed"
        # The repaired image is fully usable.
        "$CT_IO" -c 'write -q -P 9 20M 1M' -c 'read -q -P 9 20M 1M' "$T/img.qcow2" >/dev/null
        qemu_clean "$T/img.qcow2"
        n=$((n + 1))
    done
done
echo "$n broken refcount structures rebuilt with nothing lost"
