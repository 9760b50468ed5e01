# Shared fixtures for the chain tests (sourced after tests/lib/common.sh).
#
# mkchain DIR: RootBase <- Snap-1 <- Snap-2 <- Snap-3 <- Active, written with qemu-io, each
# layer with its own data, data overlapping the layers below, zero clusters, discarded
# clusters (which read as zero on v3 images with a backing file), unaligned writes, a base
# smaller than its overlays (commit must grow it), a layer with 4 KiB clusters (Snap-2) and a
# v2 (compat=0.10) layer (Snap-1), whose zero writes are stored as data. (Snap-1 is never an
# overlay whose link gets rewritten: see test-link-rewrite.sh.)

requires qemu-img qemu-io

qio() { qemu-io -f qcow2 "$@" >/dev/null || die "qemu-io $*"; }

mkchain() {
    local d=$1
    mkdir -p "$d"
    (
        cd "$d"
        qemu-img create -q -f qcow2 RootBase.qcow2 24M
        qio -c 'write -P 0x11 0 8M' -c 'write -P 0x12 16M 4M' -c 'write -P 0x13 23M 1M' \
            RootBase.qcow2
        qemu-img create -q -f qcow2 -o compat=0.10 -b RootBase.qcow2 -F qcow2 Snap-1.qcow2 32M
        qio -c 'write -P 0x21 1M 2M' -c 'write -z 4M 1M' -c 'write -P 0x22 25M 1M' \
            -c 'write -P 0x23 6291944 5000' -c 'write -z 23M 64k' Snap-1.qcow2
        qemu-img create -q -f qcow2 -o cluster_size=4096 -b Snap-1.qcow2 -F qcow2 Snap-2.qcow2
        qio -c 'write -P 0x31 2M 2112k' -c 'discard 16M 1M' -c 'write -P 0x32 30M 1M' \
            -c 'write -P 0x33 7M 12k' Snap-2.qcow2
        qemu-img create -q -f qcow2 -b Snap-2.qcow2 -F qcow2 Snap-3.qcow2
        qio -c 'write -P 0x41 0 512k' -c 'write -z 1152k 128k' -c 'write -P 0x42 17M 1M' \
            -c 'write -P 0x43 9437284 300000' -c 'write -z 30M 128k' Snap-3.qcow2
        qemu-img create -q -f qcow2 -b Snap-3.qcow2 -F qcow2 Active.qcow2
        qio -c 'write -P 0x51 3M 64k' -c 'write -P 0x52 26M 1M' -c 'discard 0 128k' \
            -c 'write -z 18M 1M' -c 'write -P 0x53 31M 1M' Active.qcow2
    )
}

# A raw copy of an image's guest view.
snapshot_raw() { qemu-img convert -U -O raw "$1" "$2" || die "convert $1"; }

# The image reads exactly like the raw file.
same_content() { local out; out=$(qemu-img compare -U "$1" "$2" 2>&1) || die "$1 differs from $2: $out"; }
# Two images read alike.
same_images() { local out; out=$(qemu-img compare -U "$1" "$2" 2>&1) || die "$1 and $2 differ: $out"; }

# qemu-img check and cowtree-img check both clean (qemu_clean from common.sh + ours).
all_clean() {
    local f
    for f in "$@"; do
        qemu_clean -U "$f"
        local out
        out=$("$CT_IMG" check -U "$f" 2>&1) || die "cowtree-img check $f: $out"
    done
}

# Checks that may report leaks (exit 3) but no corruption.
no_corruption() {
    local f rc
    for f in "$@"; do
        set +e
        qemu-img check -U "$f" >"$T/qcheck.out" 2>&1
        rc=$?
        set -e
        [ "$rc" -eq 0 ] || [ "$rc" -eq 3 ] || die "qemu-img check $f: rc=$rc: $(cat "$T/qcheck.out")"
        set +e
        "$CT_IMG" check -U "$f" >"$T/ccheck.out" 2>&1
        rc=$?
        set -e
        [ "$rc" -eq 0 ] || [ "$rc" -eq 3 ] || die "cowtree-img check $f: rc=$rc: $(cat "$T/ccheck.out")"
    done
}

# backing_of IMG: the backing file name stored in IMG ("" when none).
backing_of() { qemu-img info -U --output=json "$1" | python3 -c 'import json,sys; print(json.load(sys.stdin).get("backing-filename",""))'; }
