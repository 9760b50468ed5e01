#!/usr/bin/env bash
# Images made and written by qemu-img/qemu-io are read back by cowtree-io; every byte of every
# layer's view is verified with `read -P` (the expected content comes from the shadow model in
# tests/lib/diffrand.py, itself checked against qemu-io on the same images).
#
# Matrix (see CONFIGS in interop-lib.sh): compat 0.10/1.1; cluster sizes 512, 4k, 16k, 64k, 2M;
# refcount_bits 1/16/64; lazy_refcounts=on; extended_l2=on; a compression_type=zstd header;
# raw and qcow2 base files; each configuration is a chain base <- mid <- top where every layer
# writes its own patterns at overlapping, unaligned and cluster-crossing offsets, with zero
# writes and discards, and the top reaches past the end of the shorter backing files.
# Also: zlib/zstd compressed clusters made by `qemu-img convert -c` (read with read -P, and
# random-ish data via `cowtree-img compare` with the raw source), compressed clusters partly
# overwritten by qemu-io, and a lazy-refcounts image left dirty by a qemu-io abort.
# For every image `cowtree-img info --output=json` must agree with qemu-img on the main fields
# and `cowtree-img check` must exit 0.
. "$(dirname "$0")/interop-lib.sh"
ulimit -c 0
cd "$T"

INFO_FIELDS=(virtual-size cluster-size format backing-filename backing-filename-format
    format-specific.data.compat format-specific.data.refcount-bits
    format-specific.data.lazy-refcounts format-specific.data.extended-l2
    format-specific.data.compression-type)

# info_matches FILE:FORMAT[,FILE:FORMAT...] [EXTRA FIELD...]: cowtree-img info --output=json
# agrees with qemu-img info --output=json on INFO_FIELDS (and the extra ones).
info_matches() {
    local files=$1 pairs="" f fmt x
    shift
    local list
    IFS=, read -ra list <<<"$files"
    for x in "${list[@]}"; do
        f=${x%%:*} fmt=${x#*:}
        qemu-img info -f "$fmt" --output=json "$f" >"$f.qemu.json" || die "qemu-img info $f"
        "$CT_IMG" info -f "$fmt" --output=json "$f" >"$f.ct.json" ||
            die "cowtree-img info -f $fmt --output=json $f: rc=$?"
        pairs+=${pairs:+,}$f.qemu.json:$f.ct.json
    done
    json_fields "$pairs" "${INFO_FIELDS[@]}" "$@"
}

# ct_check_clean FILE: cowtree-img check must exit 0 on an image qemu-img calls clean.
ct_check_clean() {
    local out rc
    qcheck_clean -f qcow2 "$1"
    set +e
    out=$("$CT_IMG" check -f qcow2 "$1" 2>&1)
    rc=$?
    set -e
    [ "$rc" -eq 0 ] || die "cowtree-img check -f qcow2 $1: rc=$rc (qemu-img check: clean): $out"
}

# verify FILE FORMAT EXPECT-SCRIPT [COWTREE-IO OPTIONS]: the model must agree with qemu-io,
# then cowtree-io must read the same.
verify() {
    local f=$1 fmt=$2 exp=$3
    shift 3
    io_script qemu-io "$fmt" "$f" "$exp" -r
    io_script "$CT_IO" "$fmt" "$f" "$exp" "$@"
}

chain_case() { # NAME BASE-FORMAT OPTIONS
    local name=$1 bfmt=$2 opts=$3
    mkdir "$name"
    cd "$name"
    local o0 o1 o2 c0 c1 c2 sb sm st
    o0=$(layer_opts "$opts" 0) o1=$(layer_opts "$opts" 1) o2=$(layer_opts "$opts" 2)
    c0=$(cluster_of "$o0") c1=$(cluster_of "$o1") c2=$(cluster_of "$o2")
    read -r sb sm st <<<"$(sizes_for "$c0")"

    if [ "$bfmt" = raw ]; then
        ok qemu-img create -q -f raw base.raw "$sb"
    else
        ok qemu-img create -q -f qcow2 -o "$o0" base.qcow2 "$sb"
    fi
    ok qemu-img create -q -f qcow2 -o "$o1" -b "base.$bfmt" -F "$bfmt" mid.qcow2 "$sm"
    ok qemu-img create -q -f qcow2 -o "$o2" -b mid.qcow2 -F qcow2 top.qcow2 "$st"
    chain_scripts "$c0" "$c1" "$c2" "$sb" "$sm" "$st" "$bfmt"
    io_script qemu-io "$bfmt" "base.$bfmt" base.w
    io_script qemu-io qcow2 mid.qcow2 mid.w
    io_script qemu-io qcow2 top.qcow2 top.w

    local specs=(
        "fmt=$bfmt,compat=$(compat_of "$o0"),cluster=$c0,size=$sb,script=base.w"
        "fmt=qcow2,compat=$(compat_of "$o1"),cluster=$c1,size=$sm,script=mid.w"
        "fmt=qcow2,compat=$(compat_of "$o2"),cluster=$c2,size=$st,script=top.w"
    )
    expect exp "${specs[@]}"
    verify "base.$bfmt" "$bfmt" exp0 -r
    verify mid.qcow2 qcow2 exp1 -r
    verify top.qcow2 qcow2 exp2 # read-write open: must leave the image clean
    if [ "$bfmt" = qcow2 ]; then ct_check_clean base.qcow2; fi
    ct_check_clean mid.qcow2
    ct_check_clean top.qcow2
    info_matches "base.$bfmt:$bfmt,mid.qcow2:qcow2,top.qcow2:qcow2"
    echo "ok chain $name"
}

compressed_case() { # NAME CLUSTER CREATE-OPTIONS (compression_type etc.)
    local name=$1 c=$2 opts=$3
    mkdir "comp-$name"
    cd "comp-$name"
    make_compressed "$c" "$opts"
    local s=$SIZE txt=$TXT tlen=$TLEN n=$NCOMP
    local spec="fmt=qcow2,compat=$(compat_of "$opts"),cluster=$c,size=$s,script=src.w"
    "$PY" "$DIFFRAND" expect --layer "$spec" --ignore "$txt:$tlen" >exp ||
        die "diffrand.py expect"
    verify comp.qcow2 qcow2 exp -r
    # the text region (and everything else) through compare with the raw source
    local rc
    set +e
    "$CT_IMG" compare -f qcow2 -F raw comp.qcow2 src.raw >cmp.out 2>&1
    rc=$?
    set -e
    [ "$rc" -eq 0 ] || die "$name: cowtree-img compare -f qcow2 -F raw comp.qcow2 src.raw: rc=$rc (want 0): $(cat cmp.out)"
    cp src.raw other.raw
    ok qemu-io -f raw -c "write -q -P 0x99 $((txt + 777)) 1" other.raw
    set +e
    "$CT_IMG" compare -f qcow2 -F raw comp.qcow2 other.raw >cmp.out 2>&1
    rc=$?
    set -e
    [ "$rc" -eq 1 ] || die "$name: cowtree-img compare of differing images: rc=$rc (want 1): $(cat cmp.out)"
    ct_check_clean comp.qcow2
    # qemu-io then rewrites parts of compressed clusters; cowtree reads the mix
    cat >over.w <<EOF
write -P 0xa1 $((c / 2 + 3)) 100
write -P 0xa2 $((2 * c - 10)) 20
write -z $((6 * c + 100)) 50
discard $((4 * c)) $c
write -P 0xa3 $((txt + c / 4)) 5
EOF
    io_script qemu-io qcow2 comp.qcow2 over.w
    cat src.w over.w >all.w
    spec="fmt=qcow2,compat=$(compat_of "$opts"),cluster=$c,size=$s,script=all.w"
    "$PY" "$DIFFRAND" expect --layer "$spec" --ignore "$txt:$tlen" >exp2 ||
        die "diffrand.py expect"
    echo "read -P 0xa3 $((txt + c / 4)) 5" >>exp2
    verify comp.qcow2 qcow2 exp2
    ct_check_clean comp.qcow2
    info_matches comp.qcow2:qcow2
    cd "$T"
    echo "ok compressed $name ($n compressed clusters)"
}

# A lazy-refcounts image left dirty by qemu-io abort: cowtree must read it, report the dirty
# flag as qemu does, and a read-write open must leave a consistent image (the qcow2 spec says
# refcounts must be repaired before the image is used).
dirty_case() {
    mkdir dirty
    cd dirty
    local c=65536 s
    read -r s _ <<<"$(sizes_for "$c")"
    ok qemu-img create -q -f qcow2 -o compat=1.1,lazy_refcounts=on,cluster_size=$c d.qcow2 "$s"
    workload "$c" "$s" 0x31 0 qcow2 0 >d.w
    local args=() line
    while IFS= read -r line; do args+=(-c "${line%%#*}"); done <d.w
    bash -c '"$@" >/dev/null 2>&1; exit 0' _ qemu-io -f qcow2 "${args[@]}" -c flush -c abort d.qcow2 2>/dev/null
    qemu-img info --output=json d.qcow2 | grep -q '"dirty-flag": true' ||
        die "dirty: qemu-io abort did not leave the dirty flag set (test setup)"
    local spec="fmt=qcow2,compat=1.1,cluster=$c,size=$s,script=d.w"
    expect exp "$spec"
    verify d.qcow2 qcow2 exp0 -r
    info_matches d.qcow2:qcow2 dirty-flag
    echo "write -P 0x99 $((3 * c + 5)) $((c + 7))" >more.w
    io_script "$CT_IO" qcow2 d.qcow2 more.w
    cat d.w more.w >all.w
    expect exp2- "fmt=qcow2,compat=1.1,cluster=$c,size=$s,script=all.w"
    qcheck_clean -f qcow2 d.qcow2
    io_script qemu-io qcow2 d.qcow2 exp2-0 -r
    echo "ok dirty lazy-refcounts image"
}

for cfg in "${CONFIGS[@]}"; do
    read -r name bfmt opts <<<"$cfg"
    run_case "chain-$name" chain_case "$name" "$bfmt" "$opts"
done
COMPRESSED=(
    "zlib-4k 4096 compat=1.1,cluster_size=4096"
    "zlib-v2-64k 65536 compat=0.10,cluster_size=65536"
    "zstd-64k 65536 compat=1.1,cluster_size=65536,compression_type=zstd"
    "zstd-xl2-64k 65536 compat=1.1,cluster_size=65536,compression_type=zstd,extended_l2=on"
    "zlib-xl2-2M 2097152 compat=1.1,cluster_size=2097152,extended_l2=on"
)
if [ "$LONG" = 1 ]; then
    COMPRESSED+=("zstd-512 512 compat=1.1,cluster_size=512,compression_type=zstd"
        "zstd-2M 2097152 compat=1.1,cluster_size=2097152,compression_type=zstd")
fi
for cfg in "${COMPRESSED[@]}"; do
    read -r name c opts <<<"$cfg"
    run_case "compressed-$name" compressed_case "$name" "$c" "$opts"
done
run_case dirty dirty_case
finish
