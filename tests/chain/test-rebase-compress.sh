#!/usr/bin/env bash
# rebase -c (QEMU 8.2's meaning): the clusters a safe rebase copies into the overlay are
# written compressed, the overlay's own clusters stay as they were; the result reads the same
# as an uncompressed rebase (qemu-img compare), checks clean with qemu-img, and its map shows
# the copied ranges as data without a host offset (compressed) while the overlay's own
# clusters keep theirs. With extended L2, whole clusters compressed, partly written ones as
# subclusters. Also convert -B -c; refusals: -c with -u, -c on a raw image.
. "$(dirname "$0")/../lib/common.sh"
. "$(dirname "$0")/chainlib.sh"

mkchain "$T/c"
cd "$T/c"
snapshot_raw Active.qcow2 active.raw
comp() { qemu-img check -U --output=json "$1" | python3 -c 'import json,sys;print(json.load(sys.stdin).get("compressed-clusters",0))'; }
# Guest ranges the map shows as data without a host offset (compressed clusters).
map_compressed() {
    qemu-img map -U --output=json "$1" | python3 -c '
import json, sys
print(sum(e["length"] for e in json.load(sys.stdin) if e["data"] and "offset" not in e))'
}
# Host offsets of the clusters the image allocated before the rebase, unchanged.
own_offsets() {
    qemu-img map -U --output=json "$1" | python3 -c '
import json, sys
print(" ".join("%d:%d" % (e["start"], e["offset"]) for e in json.load(sys.stdin)
               if e["depth"] == 0 and "offset" in e))'
}

for target in "" Snap-1.qcow2 RootBase.qcow2; do
    for f in Active Snap-3; do
        rm -f p.qcow2 c.qcow2
        cp $f.qcow2 p.qcow2
        cp $f.qcow2 c.qcow2
        before=$(own_offsets c.qcow2)
        snapshot_raw $f.qcow2 want.raw
        if [ -z "$target" ]; then
            ok "$CT_IMG" rebase -b "" p.qcow2
            ok "$CT_IMG" rebase -c -b "" c.qcow2
        else
            ok "$CT_IMG" rebase -b "$target" -F qcow2 p.qcow2
            ok "$CT_IMG" rebase -c -b "$target" -F qcow2 c.qcow2
        fi
        same_images c.qcow2 p.qcow2
        same_content c.qcow2 want.raw
        all_clean c.qcow2
        [ "$(backing_of c.qcow2)" = "$target" ] || die "$f onto '$target': link not changed"
        n=$(comp c.qcow2)
        [ "$n" -gt 0 ] || die "$f onto '$target': no compressed cluster"
        [ "$(comp p.qcow2)" -eq 0 ] || die "$f onto '$target': plain rebase compressed"
        [ "$(map_compressed c.qcow2)" -gt 0 ] || die "$f onto '$target': map shows no compressed data"
        # What the overlay allocated itself keeps its host clusters (not rewritten).
        for e in $before; do
            own_offsets c.qcow2 | tr ' ' '\n' | grep -qx "$e" ||
                die "$f onto '$target': own cluster $e moved or compressed"
        done
        echo "rebase -c $f onto '${target:-nothing}' ok ($n compressed clusters)"
    done
done

# qemu-img (7.2 here) reads and keeps using the result: a write through it, then compare.
qemu-io -c 'write -P 0x99 1M 64k' c.qcow2 >/dev/null
qemu-io -c 'write -P 0x99 1M 64k' p.qcow2 >/dev/null
same_images c.qcow2 p.qcow2
all_clean c.qcow2

# Extended L2 (subclusters of 2 KiB): clusters the overlay does not touch are copied whole and
# compressed; in clusters where it wrote a few subclusters, those stay and the rest of the
# cluster is copied as uncompressed subclusters (a compressed cluster has no subclusters).
qemu-img create -q -f qcow2 xb.qcow2 8M
qemu-io -c 'write -P 0x41 0 8M' xb.qcow2 >/dev/null
for v in p c; do
    qemu-img create -q -f qcow2 -o extended_l2=on -b xb.qcow2 -F qcow2 x$v.qcow2
    qemu-io -c 'write -P 0x42 6k 4k' -c 'write -P 0x43 1M 2k' -c 'write -z 2M 64k' \
        x$v.qcow2 >/dev/null
done
snapshot_raw xc.qcow2 xwant.raw
ok "$CT_IMG" rebase -b "" xp.qcow2
ok "$CT_IMG" rebase -c -b "" xc.qcow2
same_images xc.qcow2 xp.qcow2
same_content xc.qcow2 xwant.raw
all_clean xc.qcow2
n=$(comp xc.qcow2)
# 128 clusters: 2 partly written, 1 zeroed by the overlay, the other 125 copied compressed.
[ "$n" -eq 125 ] || die "extended L2: $n compressed clusters, want 125"
qemu-io -c 'read -P 0x42 6k 4k' -c 'read -P 0x41 0 6k' -c 'read -P 0x41 10k 54k' \
    -c 'read -P 0x43 1M 2k' -c 'read -P 0 2M 64k' xc.qcow2 >/dev/null ||
    die "extended L2: content of the partly written clusters"
echo "rebase -c with extended L2 ok ($n compressed clusters)"

# convert -B -c: the overlay's data compressed too.
ok "$CT_IMG" convert -c -O qcow2 -B Snap-3.qcow2 -F qcow2 Active.qcow2 ovl.qcow2
same_content ovl.qcow2 active.raw
all_clean ovl.qcow2
[ "$(comp ovl.qcow2)" -gt 0 ] || die "convert -B -c: no compressed cluster"
echo "convert -B -c ok"

# Refusals.
cp Active.qcow2 r.qcow2
fails_with 1 "$CT_IMG" rebase -c -u -b "" r.qcow2
qemu-img compare -q r.qcow2 Active.qcow2 || die "refused rebase changed the image"
[ "$(backing_of r.qcow2)" = Snap-3.qcow2 ] || die "refused rebase changed the link"
qemu-img create -q -f raw raw.img 1M
fails_with 1 "$CT_IMG" rebase -c -f raw -b "" raw.img
echo "refusals ok"
