#!/usr/bin/env bash
# Offline blockcommit cases (1)-(6) of the blockcommit/blockpull notes (seed 002) on
# RootBase <- Snap-1 <- Snap-2 <- Snap-3 <- Active, each done by cowtree-img commit
# (--rebase-overlays repoints the image above TOP, as qemu-img commit + rebase -u do) and by
# qemu-img on a twin chain. Checks: Active's guest view unchanged (against a raw copy made
# before), Active's new backing link, the committed base equal to qemu-img's, every image
# clean for qemu-img check and cowtree-img check. Case (6) is done both ways (method-a: one
# commit of Snap-2+Snap-3 into Snap-1; method-b: Snap-3 into Snap-2, then Snap-2 into Snap-1)
# and the two Active images must read alike.
. "$(dirname "$0")/../lib/common.sh"
. "$(dirname "$0")/chainlib.sh"

mkchain "$T/orig"
snapshot_raw "$T/orig/Active.qcow2" "$T/active.raw"

# run_case N BASE TOP OVERLAY [-b]: ours in $T/N/ct, qemu-img's in $T/N/qemu.
run_case() {
    local n=$1 base=$2 top=$3 ov=$4 withb=${5:-}
    local ct=$T/$n/ct q=$T/$n/qemu
    mkdir -p "$ct" "$q"
    cp "$T"/orig/*.qcow2 "$ct"/
    cp "$T"/orig/*.qcow2 "$q"/
    if [ -n "$withb" ]; then
        (cd "$ct" && ok "$CT_IMG" commit -q -b "$base" "$top" --rebase-overlays "$ov")
        (cd "$q" && ok qemu-img commit -q -b "$base" "$top" && ok qemu-img rebase -u -b "$base" -F qcow2 "$ov")
    else
        (cd "$ct" && ok "$CT_IMG" commit -q "$top" --rebase-overlays "$ov")
        (cd "$q" && ok qemu-img commit -q "$top" && ok qemu-img rebase -u -b "$base" -F qcow2 "$ov")
    fi
    [ "$(backing_of "$ct/$ov")" = "$base" ] || die "case $n: $ov's backing is '$(backing_of "$ct/$ov")', want $base"
    same_content "$ct/Active.qcow2" "$T/active.raw"
    same_content "$q/Active.qcow2" "$T/active.raw"
    same_images "$ct/$base" "$q/$base"
    same_images "$ct/$ov" "$q/$ov"
    # TOP emptied (no -b) or kept (-b): the same as qemu-img either way.
    same_images "$ct/$top" "$q/$top"
    [ "$(qemu-img info --output=json "$ct/$base" | python3 -c 'import json,sys;print(json.load(sys.stdin)["virtual-size"])')" \
      = "$(qemu-img info --output=json "$q/$base" | python3 -c 'import json,sys;print(json.load(sys.stdin)["virtual-size"])')" ] \
        || die "case $n: base sizes differ"
    all_clean "$ct"/*.qcow2 "$q"/*.qcow2
    echo "case $n ok"
}

# (1) Snap-1, Snap-2, Snap-3 into RootBase; RootBase becomes Active's backing file.
run_case 1 RootBase.qcow2 Snap-3.qcow2 Active.qcow2 -b
# (2) Snap-1 and Snap-2 into RootBase; RootBase becomes Snap-3's backing file.
run_case 2 RootBase.qcow2 Snap-2.qcow2 Snap-3.qcow2 -b
# (3) Snap-1 into RootBase.
run_case 3 RootBase.qcow2 Snap-1.qcow2 Snap-2.qcow2
# (4) Snap-2 into Snap-1.
run_case 4 Snap-1.qcow2 Snap-2.qcow2 Snap-3.qcow2
# (5) Snap-3 into Snap-2.
run_case 5 Snap-2.qcow2 Snap-3.qcow2 Active.qcow2
# (6) method-a: Snap-2 and Snap-3 into Snap-1.
run_case 6 Snap-1.qcow2 Snap-3.qcow2 Active.qcow2 -b

# (6) method-b: two single-level commits, keeping the tops (-d) as blockcommit does.
mb=$T/6b
mkdir -p "$mb"
cp "$T"/orig/*.qcow2 "$mb"/
(cd "$mb" && ok "$CT_IMG" commit -q -d Snap-3.qcow2 --rebase-overlays Active.qcow2 &&
    ok "$CT_IMG" commit -q -d Snap-2.qcow2 --rebase-overlays Active.qcow2)
[ "$(backing_of "$mb/Active.qcow2")" = Snap-1.qcow2 ] || die "method-b: Active's backing is not Snap-1"
same_content "$mb/Active.qcow2" "$T/active.raw"
same_images "$mb/Active.qcow2" "$T/6/ct/Active.qcow2"
all_clean "$mb"/*.qcow2
echo "case 6 method-a == method-b ok"

# An overlay that is not above TOP is refused before anything changes.
mkdir -p "$T/bad"
cp "$T"/orig/*.qcow2 "$T/bad"/
(cd "$T/bad" && fails_with 1 "$CT_IMG" commit -q Snap-3.qcow2 --rebase-overlays Snap-2.qcow2)
for f in "$T"/orig/*.qcow2; do
    cmp -s "$f" "$T/bad/$(basename "$f")" || die "refused commit changed $(basename "$f")"
done
# TOP without a backing file, and a BASE not in the chain.
(cd "$T/bad" && fails_with 1 "$CT_IMG" commit -q RootBase.qcow2 &&
    fails_with 1 "$CT_IMG" commit -q -b Active.qcow2 Snap-2.qcow2)
echo "refusals ok"
