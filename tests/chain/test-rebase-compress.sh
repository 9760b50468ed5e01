#!/usr/bin/env bash
# rebase -c (QEMU 8.2's meaning): the clusters a safe rebase copies into the overlay are
# written compressed, the overlay's own clusters stay as they were; the result reads the same
# as an uncompressed rebase (qemu-img compare), checks clean with qemu-img, and its map shows
# the copied ranges as data without a host offset (compressed) while the overlay's own
# clusters keep theirs. Also convert -B -c; refusals: -c with -u, -c on a raw image.
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
