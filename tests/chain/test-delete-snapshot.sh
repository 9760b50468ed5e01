#!/usr/bin/env bash
# Deleting the external snapshot sn2 of base <- sn1 <- sn2 <- sn3 (seed 002, "Deleting
# snapshots"): method (1) commits sn2 into sn1 and repoints sn3 with an unsafe rebase, in one
# step (commit --rebase-overlays); method (2) rebases sn3 onto sn1 in safe mode, copying sn2's
# data into sn3. Either way sn3 must read as before, match qemu-img doing the same on a twin
# chain, and every image must check clean. Both methods give the same sn3 content.
. "$(dirname "$0")/../lib/common.sh"
. "$(dirname "$0")/chainlib.sh"

o=$T/orig
mkdir -p "$o"
(
    cd "$o"
    qemu-img create -q -f qcow2 base.qcow2 16M
    qio -c 'write -P 0xb0 0 6M' -c 'write -P 0xb1 12M 2M' base.qcow2
    qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 sn1.qcow2
    qio -c 'write -P 0xa1 1M 1M' -c 'write -z 5M 512k' -c 'write -P 0xa2 8M 100k' sn1.qcow2
    qemu-img create -q -f qcow2 -b sn1.qcow2 -F qcow2 sn2.qcow2
    qio -c 'write -P 0xa3 1536k 1M' -c 'discard 12M 1M' -c 'write -P 0xa4 5M 64k' \
        -c 'write -P 0xa5 10485860 70000' sn2.qcow2
    qemu-img create -q -f qcow2 -b sn2.qcow2 -F qcow2 sn3.qcow2
    qio -c 'write -P 0xa6 2M 64k' -c 'write -z 5M 32k' sn3.qcow2
)
snapshot_raw "$o/sn3.qcow2" "$T/sn3.raw"

twin() { mkdir -p "$1" && cp "$o"/*.qcow2 "$1"/; }

# Method (1): commit sn2 into sn1, then sn3 -> sn1 (unsafe), as one cowtree-img command.
twin "$T/m1"
twin "$T/m1q"
(cd "$T/m1" && ok "$CT_IMG" commit -q sn2.qcow2 --rebase-overlays sn3.qcow2)
(cd "$T/m1q" && ok qemu-img commit -q sn2.qcow2 && ok qemu-img rebase -u -b sn1.qcow2 -F qcow2 sn3.qcow2)
[ "$(backing_of "$T/m1/sn3.qcow2")" = sn1.qcow2 ] || die "method 1: sn3 not on sn1"
rm "$T/m1/sn2.qcow2" "$T/m1q/sn2.qcow2"
same_content "$T/m1/sn3.qcow2" "$T/sn3.raw"
same_images "$T/m1/sn3.qcow2" "$T/m1q/sn3.qcow2"
same_images "$T/m1/sn1.qcow2" "$T/m1q/sn1.qcow2"
all_clean "$T"/m1/*.qcow2 "$T"/m1q/*.qcow2
echo "method 1 ok"

# Method (2): safe rebase of sn3 onto sn1.
twin "$T/m2"
twin "$T/m2q"
(cd "$T/m2" && ok "$CT_IMG" rebase -q -b sn1.qcow2 -F qcow2 sn3.qcow2)
(cd "$T/m2q" && ok qemu-img rebase -q -b sn1.qcow2 -F qcow2 sn3.qcow2)
[ "$(backing_of "$T/m2/sn3.qcow2")" = sn1.qcow2 ] || die "method 2: sn3 not on sn1"
rm "$T/m2/sn2.qcow2" "$T/m2q/sn2.qcow2"
same_content "$T/m2/sn3.qcow2" "$T/sn3.raw"
same_images "$T/m2/sn3.qcow2" "$T/m2q/sn3.qcow2"
for f in base sn1; do
    cmp -s "$o/$f.qcow2" "$T/m2/$f.qcow2" || die "method 2 modified $f"
done
all_clean "$T"/m2/*.qcow2 "$T"/m2q/*.qcow2
# Only sn2's contribution was copied: sn3 holds no more than qemu-img's result does.
ours=$(qemu-img check --output=json "$T/m2/sn3.qcow2" | python3 -c 'import json,sys;print(json.load(sys.stdin)["allocated-clusters"])')
theirs=$(qemu-img check --output=json "$T/m2q/sn3.qcow2" | python3 -c 'import json,sys;print(json.load(sys.stdin)["allocated-clusters"])')
[ "$ours" -le "$theirs" ] || die "method 2 allocated $ours clusters, qemu-img $theirs"
echo "method 2 ok (allocated clusters: ours $ours, qemu-img $theirs)"

same_images "$T/m1/sn3.qcow2" "$T/m2/sn3.qcow2"
echo "methods agree"
