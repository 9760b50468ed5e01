#!/usr/bin/env bash
# Safe and unsafe rebase against qemu-img rebase on twin directories: onto an unrelated image
# (no common ancestor), a sibling (common ancestor below), a deeper ancestor, an overlay of
# the old backing, shorter and longer backing files, a raw backing file, no backing file
# (-b ""), relative names from a subdirectory, targets with 4 KiB clusters, extended L2
# (subclusters) and partly allocated clusters. Each result must read like the image did before,
# equal qemu-img's, and check clean; unsafe mode changes the link only.
. "$(dirname "$0")/../lib/common.sh"
. "$(dirname "$0")/chainlib.sh"

w=$T/w
mkdir -p "$w"
cd "$w"
mk() { qemu-img create -q -f qcow2 "$@" >/dev/null || die "create $*"; }
mk base.qcow2 8M
qio -c 'write -P 0x10 0 3M' -c 'write -P 0x11 6M 1M' base.qcow2
mk -b base.qcow2 -F qcow2 a.qcow2
qio -c 'write -P 0x20 1M 1M' -c 'write -z 6M 256k' -c 'write -P 0x21 4M 8k' a.qcow2
mk -b base.qcow2 -F qcow2 b.qcow2
qio -c 'write -P 0x30 1536k 1M' -c 'write -P 0x31 5M 64k' -c 'discard 0 64k' b.qcow2
mk -b a.qcow2 -F qcow2 a2.qcow2
qio -c 'write -P 0x40 7M 100k' -c 'write -z 2M 64k' a2.qcow2
mk other.qcow2 8M
qio -c 'write -P 0x50 512k 5M' -c 'write -P 0x51 7M 1M' other.qcow2
mk short.qcow2 3M
qio -c 'write -P 0x60 0 3M' short.qcow2
mk long.qcow2 12M
qio -c 'write -P 0x70 0 12M' long.qcow2
qemu-img create -q -f raw raw.img 8M
qemu-io -f raw -c 'write -P 0x80 2M 3M' raw.img >/dev/null
# Targets: over a2 <- a <- base.
mk -b a2.qcow2 -F qcow2 top.qcow2
qio -c 'write -P 0x90 3M 64k' -c 'write -P 0x91 6M 5000' -c 'write -z 7M 4k' top.qcow2
mk -o cluster_size=4096 -b a2.qcow2 -F qcow2 top4k.qcow2
qio -c 'write -P 0x92 1M 6k' -c 'write -P 0x93 6M 1000' top4k.qcow2
mk -o extended_l2=on,cluster_size=128k -b a2.qcow2 -F qcow2 topext.qcow2
qio -c 'write -P 0x94 1M 4k' -c 'write -P 0x95 6M 12k' -c 'write -z 7M 4k' topext.qcow2
mk -b a2.qcow2 -F qcow2 topbig.qcow2 10M
qio -c 'write -P 0x96 9M 64k' topbig.qcow2
cd - >/dev/null

# rebase_case NAME TARGET NEWBACKING FMT
rebase_case() {
    local n=$1 tgt=$2 nb=$3 fmt=$4 ct=$T/$1/ct q=$T/$1/qemu
    mkdir -p "$ct" "$q"
    cp "$w"/* "$ct"/
    cp "$w"/* "$q"/
    snapshot_raw "$w/$tgt" "$T/$n.raw"
    local fa=()
    [ -n "$nb" ] && fa=(-F "$fmt")
    (cd "$ct" && ok "$CT_IMG" rebase -q -b "$nb" "${fa[@]}" "$tgt")
    (cd "$q" && ok qemu-img rebase -q -b "$nb" "${fa[@]}" "$tgt")
    [ "$(backing_of "$ct/$tgt")" = "$nb" ] || die "$n: link is '$(backing_of "$ct/$tgt")'"
    same_content "$ct/$tgt" "$T/$n.raw"
    same_images "$ct/$tgt" "$q/$tgt"
    for f in "$w"/*; do
        [ "$(basename "$f")" = "$tgt" ] && continue
        cmp -s "$f" "$ct/$(basename "$f")" || die "$n: rebase modified $(basename "$f")"
    done
    all_clean "$ct/$tgt" "$q/$tgt"
    echo "$n ok"
}

rebase_case unrelated top.qcow2 other.qcow2 qcow2
rebase_case sibling top.qcow2 b.qcow2 qcow2
rebase_case ancestor top.qcow2 base.qcow2 qcow2
rebase_case same-chain-skip-one top.qcow2 a.qcow2 qcow2
rebase_case shorter top.qcow2 short.qcow2 qcow2
rebase_case longer top.qcow2 long.qcow2 qcow2
rebase_case raw top.qcow2 raw.img raw
rebase_case none top.qcow2 "" ""
rebase_case 4k-clusters top4k.qcow2 b.qcow2 qcow2
rebase_case subclusters topext.qcow2 b.qcow2 qcow2
rebase_case subclusters-none topext.qcow2 "" ""
rebase_case bigger-than-backing topbig.qcow2 b.qcow2 qcow2

# The new backing is an overlay of the old one: only the new layer's ranges are compared.
mkdir -p "$T/ov"
cp "$w"/* "$T/ov"/
(cd "$T/ov" && mk -b a2.qcow2 -F qcow2 newtop.qcow2 && qio -c 'write -P 0xa0 0 2M' newtop.qcow2 &&
    snapshot_raw top.qcow2 ../ov.raw && ok "$CT_IMG" rebase -q -b newtop.qcow2 -F qcow2 top.qcow2)
same_content "$T/ov/top.qcow2" "$T/ov.raw"
all_clean "$T/ov/top.qcow2"
echo "overlay-of-old ok"

# Relative names are relative to the image's directory, and stored as given.
mkdir -p "$T/rel/sub"
cp "$w"/* "$T/rel"/
(cd "$T/rel" && mk -b ../a2.qcow2 -F qcow2 sub/t.qcow2 && qio -c 'write -P 0xb0 1M 64k' sub/t.qcow2 &&
    snapshot_raw sub/t.qcow2 ../rel.raw && ok "$CT_IMG" rebase -q -b ../b.qcow2 -F qcow2 sub/t.qcow2)
[ "$(backing_of "$T/rel/sub/t.qcow2")" = ../b.qcow2 ] || die "relative link not kept"
same_content "$T/rel/sub/t.qcow2" "$T/rel.raw"
echo "relative ok"

# Unsafe mode: only the link changes; the old backing need not exist.
mkdir -p "$T/u"
cp "$w"/* "$T/u"/
(cd "$T/u" && rm a.qcow2 && ok "$CT_IMG" rebase -q -u -b b.qcow2 -F qcow2 a2.qcow2)
[ "$(backing_of "$T/u/a2.qcow2")" = b.qcow2 ] || die "unsafe: link not changed"
(cd "$T/u" && qemu-img map --output=json -f qcow2 a2.qcow2 >/dev/null) || die "unsafe result unreadable"
all_clean "$T/u/a2.qcow2"
echo "unsafe ok"

# Usage errors.
(cd "$T/u" && fails_with 1 "$CT_IMG" rebase -q -b b.qcow2 top.qcow2 &&
    fails_with 1 "$CT_IMG" rebase -q top.qcow2 &&
    fails_with 1 "$CT_IMG" rebase -q -b missing.qcow2 -F qcow2 top.qcow2)
echo "errors ok"
