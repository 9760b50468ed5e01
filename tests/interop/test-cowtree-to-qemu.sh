#!/usr/bin/env bash
# Images created by `cowtree-img create` and written by cowtree-io are checked by qemu:
# `qemu-img check` must be clean (exit 0: no corruption, no leak), qemu-io `read -P` must
# verify every byte of every layer's view (expected content from the shadow model in
# tests/lib/diffrand.py), and `qemu-img compare` against a twin made by qemu-img/qemu-io with
# the same commands must say identical; `qemu-img info` of both must agree on the header.
#
# Matrix: the CONFIGS of interop-lib.sh (compat 0.10/1.1; clusters 512..2M; refcount_bits
# 1/16/64; lazy_refcounts; extended_l2; zstd header; raw and qcow2 bases; chains 3 deep) with
# pattern writes, zero writes, discards, unaligned and cluster-crossing requests, writes past
# and across the end of the shorter backing files. Also: cowtree-io writing into clusters that
# qemu-img convert -c compressed (zlib, zstd), and images left behind by a cowtree-io `abort`
# after a flush (with and without lazy_refcounts) that qemu must be able to use.
. "$(dirname "$0")/interop-lib.sh"
ulimit -c 0
cd "$T"

INFO_FIELDS=(virtual-size cluster-size format backing-filename backing-filename-format
    format-specific.data)

# compare_twins FORMAT FILE: cowtree/FILE and qemu/FILE must have the same content and header.
compare_twins() {
    local fmt=$1 f=$2 out rc
    set +e
    out=$(qemu-img compare -f "$fmt" -F "$fmt" "ct/$f" "q/$f" 2>&1)
    rc=$?
    set -e
    [ "$rc" -eq 0 ] || die "qemu-img compare -f $fmt -F $fmt ct/$f q/$f: rc=$rc (want 0): $out"
}

info_twins() { # FORMAT FILE...
    local fmt=$1 pairs="" f
    shift
    for f in "$@"; do
        qemu-img info -f "$fmt" --output=json "q/$f" >"q/$f.json" || die "qemu-img info q/$f"
        qemu-img info -f "$fmt" --output=json "ct/$f" >"ct/$f.json" || die "qemu-img info ct/$f"
        pairs+=${pairs:+,}q/$f.json:ct/$f.json
    done
    json_fields "$pairs" "${INFO_FIELDS[@]}"
}

chain_case() { # NAME BASE-FORMAT OPTIONS
    local name=$1 bfmt=$2 opts=$3
    mkdir "$name" "$name/ct" "$name/q"
    cd "$name"
    local o0 o1 o2 c0 c1 c2 sb sm st
    o0=$(layer_opts "$opts" 0) o1=$(layer_opts "$opts" 1) o2=$(layer_opts "$opts" 2)
    c0=$(cluster_of "$o0") c1=$(cluster_of "$o1") c2=$(cluster_of "$o2")
    read -r sb sm st <<<"$(sizes_for "$c0")"
    chain_scripts "$c0" "$c1" "$c2" "$sb" "$sm" "$st" "$bfmt"
    local tool img io
    for side in ct q; do
        if [ "$side" = ct ]; then img=$CT_IMG io=$CT_IO; else img=qemu-img io=qemu-io; fi
        if [ "$bfmt" = raw ]; then
            ok "$img" create -q -f raw "$side/base.raw" "$sb"
        else
            ok "$img" create -q -f qcow2 -o "$o0" "$side/base.qcow2" "$sb"
        fi
        (cd "$side" && ok "$img" create -q -f qcow2 -o "$o1" -b "base.$bfmt" -F "$bfmt" mid.qcow2 "$sm")
        (cd "$side" && ok "$img" create -q -f qcow2 -o "$o2" -b mid.qcow2 -F qcow2 top.qcow2 "$st")
        io_script "$io" "$bfmt" "$side/base.$bfmt" base.w
        io_script "$io" qcow2 "$side/mid.qcow2" mid.w
        io_script "$io" qcow2 "$side/top.qcow2" top.w
    done

    expect exp \
        "fmt=$bfmt,compat=$(compat_of "$o0"),cluster=$c0,size=$sb,script=base.w" \
        "fmt=qcow2,compat=$(compat_of "$o1"),cluster=$c1,size=$sm,script=mid.w" \
        "fmt=qcow2,compat=$(compat_of "$o2"),cluster=$c2,size=$st,script=top.w"
    local files=("base.$bfmt" mid.qcow2 top.qcow2) fmts=("$bfmt" qcow2 qcow2) i
    for i in 0 1 2; do
        if [ "${fmts[$i]}" = qcow2 ]; then qcheck_clean -f qcow2 "ct/${files[$i]}"; fi
        io_script qemu-io "${fmts[$i]}" "q/${files[$i]}" "exp$i" -r # the model agrees with qemu
        io_script qemu-io "${fmts[$i]}" "ct/${files[$i]}" "exp$i" -r
        compare_twins "${fmts[$i]}" "${files[$i]}"
    done
    info_twins "$bfmt" "base.$bfmt"
    info_twins qcow2 mid.qcow2 top.qcow2
    echo "ok chain $name"
}

# cowtree-io writes into clusters that qemu-img convert -c compressed
compressed_case() { # NAME CLUSTER CREATE-OPTIONS
    local name=$1 c=$2 opts=$3
    mkdir "comp-$name"
    cd "comp-$name"
    make_compressed "$c" "$opts"
    mkdir ct q
    cp comp.qcow2 ct/
    cp comp.qcow2 q/
    cat >over.w <<EOF
write -P 0xa1 $((c / 2 + 3)) 100                 # inside a compressed cluster
write -P 0xa2 $((2 * c - 10)) 20                 # across two compressed clusters
write -z $((6 * c + 100)) 50                     # zeroes inside a compressed cluster
discard $((4 * c)) $c                            # a whole compressed cluster
discard $((7 * c + 5)) $c                        # partial clusters: nothing
write -P 0xa4 $((c - 1)) $((c + 2))              # whole cluster plus a byte either side
write -P 0xa5 $((SIZE - c - 333 - 1)) 2          # edge of the last written range
write -P 0xa6 $((TXT - 1)) 2                     # across the start of the text region
EOF
    io_script "$CT_IO" qcow2 ct/comp.qcow2 over.w
    io_script qemu-io qcow2 q/comp.qcow2 over.w
    cat src.w over.w >all.w
    "$PY" "$DIFFRAND" expect --ignore "$TXT:$TLEN" \
        --layer "fmt=qcow2,compat=$(compat_of "$opts"),cluster=$c,size=$SIZE,script=all.w" >exp ||
        die "diffrand.py expect"
    echo "read -P 0xa6 $((TXT - 1)) 2" >>exp
    qcheck_clean -f qcow2 ct/comp.qcow2
    io_script qemu-io qcow2 q/comp.qcow2 exp -r
    io_script qemu-io qcow2 ct/comp.qcow2 exp -r
    compare_twins qcow2 comp.qcow2
    info_twins qcow2 comp.qcow2
    echo "ok compressed $name ($NCOMP compressed clusters)"
}

# cowtree-io writes, flushes, then aborts (SIGABRT, no cleanup). qemu must find an image it can
# use: with lazy_refcounts the dirty flag may be set and a repair is allowed; without, at most
# leaks; if the dirty flag is not set, the image must be clean. Flushed data must be intact.
abort_case() { # NAME CREATE-OPTIONS
    local name=$1 opts=$2
    mkdir "$name"
    cd "$name"
    local c s
    c=$(cluster_of "$opts")
    read -r s _ <<<"$(sizes_for "$c")"
    ok "$CT_IMG" create -q -f qcow2 -o "$opts" a.qcow2 "$s"
    workload "$c" "$s" 0x31 0 qcow2 0 >a.w
    local args=() line rc
    while IFS= read -r line; do args+=(-c "${line%%#*}"); done <a.w
    set +e
    bash -c '"$@" >/dev/null 2>&1' _ "$CT_IO" -f qcow2 "${args[@]}" -c flush -c abort a.qcow2 2>/dev/null
    rc=$?
    set -e
    [ "$rc" -ne 0 ] || die "$name: cowtree-io ... -c abort exited 0"
    local dirty out
    dirty=$(qemu-img info --output=json a.qcow2 | "$PY" -c 'import json,sys; print(json.load(sys.stdin).get("dirty-flag"))')
    set +e
    out=$(qemu-img check a.qcow2 2>&1)
    rc=$?
    set -e
    case "$dirty,$rc" in
    True,*) ;;            # refcounts may be anything: qemu repairs dirty images
    False,0 | False,3) ;; # clean, or leaks only (allowed after a crash)
    *) die "$name: after cowtree-io abort: dirty-flag=$dirty, qemu-img check rc=$rc: $out" ;;
    esac
    set +e
    out=$(qemu-img check -r all a.qcow2 2>&1)
    rc=$?
    set -e
    [ "$rc" -eq 0 ] || die "$name: qemu-img check -r all: rc=$rc: $out"
    qcheck_clean a.qcow2
    expect exp "fmt=qcow2,compat=$(compat_of "$opts"),cluster=$c,size=$s,script=a.w"
    io_script qemu-io qcow2 a.qcow2 exp0 -r
    echo "ok $name (dirty-flag=$dirty)"
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
    COMPRESSED+=("zstd-512 512 compat=1.1,cluster_size=512,compression_type=zstd")
fi
for cfg in "${COMPRESSED[@]}"; do
    read -r name c opts <<<"$cfg"
    run_case "compressed-$name" compressed_case "$name" "$c" "$opts"
done
run_case abort-lazy abort_case abort-lazy compat=1.1,cluster_size=65536,lazy_refcounts=on
run_case abort-plain abort_case abort-plain compat=1.1,cluster_size=4096
run_case abort-v2 abort_case abort-v2 compat=0.10,cluster_size=65536
finish
