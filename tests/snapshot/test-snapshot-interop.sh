#!/usr/bin/env bash
# Internal snapshots, cowtree <-> QEMU in both directions.
#
# Every image has a model (snapcommon.sh): the data commands that made the active state and
# each snapshot. After every step (`everything`):
#   - qemu-img check exits 0 and reports no leak/corruption, and cowtree-img check agrees;
#   - cowtree's listings (snapshot -l human and --output=json, info human and json) equal
#     qemu-img's (ids, names, VM sizes, dates, clocks), and list the model's snapshots;
#   - the active state reads back as modelled with qemu-io and cowtree-io (read -P);
#   - every snapshot, extracted by `qemu-img convert -l snapshot.name=N -O raw`, has the
#     modelled size and content.
# Sections:
#   A  snapshots made by qemu-img (with qemu-io writes between them: partial clusters, zero
#      writes, discards) listed, applied and deleted by cowtree; writes after each apply;
#   B  snapshots made/applied/deleted by cowtree, listed/applied/converted/deleted by qemu-img,
#      mixed with qemu-img snapshots;
#   S  the seed scenario: one, write, two, apply one, write, three;
#   Z  compressed images (qemu-img convert -c): snapshot, then writes into compressed clusters
#      turn them into normal clusters; apply/delete keep the shared compressed data intact;
#   R2 refcount_bits=2: two snapshots of a fully shared image work, the third is refused with
#      the image byte-for-byte unchanged (also with --vmstate and when qemu-img made the first
#      two); after a delete it works;
#   R1 refcount_bits=1: snapshot creation refused, image unchanged;
#   V  VM state of 1 byte, 64k+1, 3 MiB: --dump-vmstate returns the same bytes (after more
#      snapshots, after apply), qemu-img shows the VM SIZE, the VM state is invisible to the
#      guest, qemu-img deletes such snapshots without leaks;
#   D  virtual disk size: a snapshot keeps its own size through resizes; apply restores it
#      (cowtree and qemu-img, either tool resizing).
# Geometries: v2 (compat=0.10) and v3, 512-byte and 64k clusters, extended_l2 (COWTREE_TEST_LONG
# adds 4k and 32k-extended_l2).
. "$(cd "$(dirname "${BASH_SOURCE[0]}")/../lib" && pwd)/common.sh"
. "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/snapcommon.sh"
snap_requirements

M=$((1024 * 1024))
CONFIGS=(
    "v2-512 compat=0.10,cluster_size=512"
    "v2-64k compat=0.10,cluster_size=65536"
    "v3-512 compat=1.1,cluster_size=512"
    "v3-64k compat=1.1,cluster_size=65536"
    "v3-64k-extl2 compat=1.1,cluster_size=65536,extended_l2=on"
)
if [ "${COWTREE_TEST_LONG:-0}" = 1 ]; then
    CONFIGS+=("v3-4k compat=1.1,cluster_size=4096" "v3-32k-extl2 compat=1.1,cluster_size=32768,extended_l2=on"
        "v2-4k compat=0.10,cluster_size=4096")
fi
clsize() { sed 's/.*cluster_size=\([0-9]*\).*/\1/' <<<"$1"; }

# Data command sets for an image of 4 MiB and cluster size $c.
w1() { local c=$1; echo "write -P 0x11 0 $((3 * c))" "|write -P 0x12 $((5 * c + 100)) 3000" \
    "|write -P 0x13 $M 65536" "|write -P 0x14 $((4 * M - 1000)) 1000" "|write -P 0x15 $((2 * M + 7)) 70000"; }
w2() { local c=$1; echo "write -P 0x21 $((c / 2)) $c" "|write -z $((2 * c)) $((c / 2 + 7))" \
    "|write -z $M 65536" "|write -P 0x22 $((2 * M)) 5000" "|write -P 0x23 $((5 * c + 50)) 100"; }
w3() { local c=$1; echo "discard $((2 * M)) $((2 * M))" "|write -P 0x31 $((2 * M + 3 * c + 1)) 4097" \
    "|write -z $((c / 2)) 1" "|write -P 0x32 $((3 * M)) 65536"; }
w4() { local c=$1; echo "write -P 0x41 $((c + 1)) 1" "|write -P 0x42 $((3 * M)) 204800" "|write -z 0 $c"; }
w5() { local c=$1; echo "write -P 0x51 0 $((c + 5))" "|write -z $((5 * c)) $c" "|write -P 0x52 $((M - 10)) 20"; }
w6() { local c=$1; echo "write -P 0x61 $((c * 2 - 3)) 7" "|write -P 0x62 $((2 * M + 5 * c)) $((3 * c))" "|discard 0 $((2 * c))"; }
# iow TOOL IMG SETNAME CLUSTER
iow() {
    local cmds=() x
    IFS='|' read -r -a cmds <<<"$($3 "$4")"
    for x in "${!cmds[@]}"; do cmds[$x]=$(sed 's/^ *//;s/ *$//' <<<"${cmds[$x]}"); done
    io "$1" "$2" "${cmds[@]}"
}

# ---------------------------------------------------------------------------------------------
section_A() {
    local cfg=$1 opts=$2 c img
    c=$(clsize "$opts")
    img=$T/A-$cfg.qcow2
    at "A $cfg: qemu-img makes three snapshots"
    mk q "$img" 4M "$opts"
    iow q "$img" w1 "$c"
    snap q -c "$img" s1
    iow q "$img" w2 "$c"
    snap q -c "$img" s2
    iow q "$img" w3 "$c"
    snap q -c "$img" s3
    iow q "$img" w4 "$c"
    everything "$img"
    at "A $cfg: cowtree applies s2"
    snap c -a "$img" s2
    everything "$img"
    at "A $cfg: qemu-io writes after cowtree's apply"
    iow q "$img" w5 "$c"
    everything "$img"
    at "A $cfg: cowtree deletes s1"
    snap c -d "$img" s1
    everything "$img"
    at "A $cfg: cowtree-io writes, cowtree applies s3, writes again"
    iow c "$img" w6 "$c"
    snap c -a "$img" s3
    everything "$img"
    iow c "$img" w2 "$c"
    everything "$img"
    at "A $cfg: cowtree deletes s3 (the applied one), then s2"
    snap c -d "$img" s3
    everything "$img"
    snap c -d "$img" s2
    everything "$img"
}

section_B() {
    local cfg=$1 opts=$2 c img
    c=$(clsize "$opts")
    img=$T/B-$cfg.qcow2
    at "B $cfg: cowtree makes two snapshots"
    mk c "$img" 4M "$opts"
    iow c "$img" w1 "$c"
    snap c -c "$img" s1
    iow c "$img" w2 "$c"
    snap c -c "$img" s2
    iow c "$img" w3 "$c"
    everything "$img"
    at "B $cfg: qemu-img applies s1, qemu-io writes, qemu-img makes s3"
    snap q -a "$img" s1
    everything "$img"
    iow q "$img" w4 "$c"
    snap q -c "$img" s3
    everything "$img"
    at "B $cfg: qemu-img deletes s2 (made by cowtree)"
    snap q -d "$img" s2
    everything "$img"
    at "B $cfg: cowtree applies s3 (made by qemu-img), writes, makes s4, deletes s1"
    snap c -a "$img" s3
    iow c "$img" w5 "$c"
    snap c -c "$img" s4
    iow c "$img" w6 "$c"
    snap c -d "$img" s1
    everything "$img"
    at "B $cfg: qemu-img applies s4 and deletes everything"
    snap q -a "$img" s4
    everything "$img"
    snap q -d "$img" s3
    snap q -d "$img" s4
    everything "$img"
}

section_S() {
    local cfg=$1 opts=$2 c img
    c=$(clsize "$opts")
    img=$T/S-$cfg.qcow2
    at "S $cfg: one, write, two, apply one, write, three"
    mk c "$img" 4M "$opts"
    io c "$img" "write -P 0x01 0 $((4 * c))" "write -P 0x02 $((2 * M)) $((c + 1))"
    snap c -c "$img" one
    io c "$img" "write -P 0x03 $((c / 2)) $((2 * c))" "write -P 0x04 $((3 * M)) 100"
    snap c -c "$img" two
    snap c -a "$img" one
    everything "$img"
    io c "$img" "write -P 0x05 $c 10" "write -z $((2 * M)) $c"
    snap c -c "$img" three
    io c "$img" "write -P 0x06 0 $((8 * c))"
    everything "$img"
    # each snapshot in turn becomes the active state again
    local s
    for s in two three one; do
        snap c -a "$img" "$s"
        everything "$img"
    done
}

section_Z() {
    local cfg=$1 opts=$2 c img src d g n
    c=$(clsize "$opts")
    img=$T/Z-$cfg.qcow2
    src=$T/Z-$cfg.raw
    at "Z $cfg: compressed image by qemu-img convert -c"
    ok qemu-img create -q -f raw "$src" 4M
    printf '%s\n' "write -P 0x61 0 $M" "write -P 0x62 $M $((M / 2))" "write -P 0x63 $((1600 * 1024)) 3000" \
        "write -P 0x64 $((3 * M)) $M" >"$T/zsrc.script"
    local zargs=() l
    while IFS= read -r l; do zargs+=(-c "$l"); done <"$T/zsrc.script"
    qemu-io -f raw "${zargs[@]}" "$src" >/dev/null || die "qemu-io on $src failed"
    ok qemu-img convert -c -f raw -O qcow2 -o "$opts" "$src" "$img"
    register "$img" "$T/zsrc.script"
    n=$($SNAPLIB compressed "$img" | wc -l)
    [ "$n" -gt 0 ] || die "qemu-img convert -c made no compressed cluster"
    everything "$img"
    at "Z $cfg: cowtree snapshot, then writes into compressed clusters"
    snap c -c "$img" z1
    io c "$img" "write -P 0x71 $((c / 2)) 1" "write -P 0x72 $((M + c + 3)) $((2 * c))" "write -z $((3 * M + c)) $((c / 3 + 1))"
    everything "$img"
    for g in $((c / 2)) $((M + c + 3)) $((3 * M + c)); do
        g=$((g / c * c))
        d=$($SNAPLIB l2 "$img" "$g")
        case "$d" in *compressed=0*) ;; *) fail "$img: guest 0x$(printf %x $g) still compressed after a write: $d" ;; esac
        d=$($SNAPLIB l2 "$img" "$g" z1)
        case "$d" in *compressed=1*) ;; *) fail "$img: snapshot z1's cluster at 0x$(printf %x $g) lost its compressed mapping: $d" ;; esac
    done
    d=$($SNAPLIB l2 "$img" $((2 * M + M / 2 - c)))
    case "$d" in *compressed=1*) ;; *) fail "$img: an unwritten cluster is no longer compressed: $d" ;; esac
    at "Z $cfg: qemu-img snapshot z2, cowtree applies z1, writes, deletes z1 and z2"
    snap q -c "$img" z2
    snap c -a "$img" z1
    everything "$img"
    io c "$img" "write -P 0x73 0 $((3 * c))" "discard $((3 * M)) $M"
    everything "$img"
    snap c -d "$img" z1
    everything "$img"
    snap c -d "$img" z2
    everything "$img"
}

# refused CMD...: the cowtree command must fail (non-zero, message on stderr) and leave $img
# byte-for-byte unchanged and clean. $1 is a regex the message must match.
refused() {
    local img=$1 re=$2 before after out rc
    shift 2
    before=$(sha "$img")
    set +e
    out=$("$@" 2>&1)
    rc=$?
    set -e
    after=$(sha "$img")
    [ $rc -ne 0 ] || fail "$img: '$*' succeeded, must be refused"
    [ $rc -lt 128 ] || fail "$img: '$*' died with signal $((rc - 128))"
    grep -qiE "$re" <<<"$out" || fail "$img: '$*' message does not match /$re/: $out"
    [ "$before" = "$after" ] || fail "$img: refused '$*' changed the image file"
}

section_R2() {
    local img vm c=65536
    for maker in c q; do
        img=$T/R2-$maker.qcow2
        at "R2 ($maker makes the first two): refcount_bits=2"
        mk q "$img" 1M "compat=1.1,refcount_bits=2,cluster_size=65536"
        io q "$img" "write -P 0x31 0 $M"
        snap "$maker" -c "$img" r1
        snap "$maker" -c "$img" r2
        everything "$img"
        at "R2 ($maker): third snapshot of a fully shared image is refused, image unchanged"
        refused "$img" 'refcount' "$CT_IMG" snapshot -c r3 "$img"
        everything "$img"
        printf 'x' >"$T/vm1"
        refused "$img" 'refcount' "$CT_IMG" snapshot -c r3 --vmstate "$T/vm1" "$img"
        everything "$img"
        at "R2 ($maker): active writes unshare some clusters; still refused"
        io c "$img" "write -P 0x32 0 $((2 * c))"
        refused "$img" 'refcount' "$CT_IMG" snapshot -c r3 "$img"
        everything "$img"
        at "R2 ($maker): apply needs refcount 4 on shared clusters: refused or done correctly"
        local before rc out
        before=$(sha "$img")
        set +e
        out=$("$CT_IMG" snapshot -a r1 "$img" 2>&1)
        rc=$?
        set -e
        if [ $rc -eq 0 ]; then
            local d
            d=$(st "$img")
            cp "$d/snap.r1.script" "$d/cur.script"
        else
            [ "$(sha "$img")" = "$before" ] || fail "$img: refused apply changed the image ($out)"
            grep -qi refcount <<<"$out" || fail "$img: refused apply does not say why: $out"
        fi
        everything "$img"
        at "R2 ($maker): after deleting r1 a new snapshot fits"
        snap c -d "$img" r1
        snap c -c "$img" r3
        everything "$img"
        io c "$img" "write -P 0x33 $((5 * c)) 100"
        snap c -a "$img" r2
        everything "$img"
    done
}

section_R1() {
    local img maker
    for maker in c q; do
        img=$T/R1-$maker.qcow2
        at "R1 ($maker created): refcount_bits=1 refuses snapshots"
        mk "$maker" "$img" 1M "compat=1.1,refcount_bits=1"
        io c "$img" "write -P 0x41 0 100000"
        refused "$img" 'refcount' "$CT_IMG" snapshot -c s "$img"
        printf 'vm' >"$T/vm2"
        refused "$img" 'refcount' "$CT_IMG" snapshot -c s --vmstate "$T/vm2" "$img"
        everything "$img"
    done
}

section_V() {
    local cfg=$1 opts=$2 c img size i out
    c=$(clsize "$opts")
    img=$T/V-$cfg.qcow2
    at "V $cfg: VM state"
    mk c "$img" 4M "$opts"
    io c "$img" "write -P 0x51 0 $((M + 3))" "write -P 0x52 $((4 * M - c)) $c"
    i=0
    for size in 1 65537 $((3 * M)); do
        i=$((i + 1))
        $SNAPLIB randbytes "$i$size" "$size" "$T/vm$i"
        at "V $cfg: snapshot vm$i with $size bytes of VM state"
        "$CT_IMG" snapshot -c "vm$i" --vmstate "$T/vm$i" "$img" || die "snapshot -c --vmstate failed"
        snap_model_add "$img" "vm$i"
        ok "$CT_IMG" snapshot --dump-vmstate "vm$i" "$T/out" "$img"
        cmp "$T/vm$i" "$T/out" || fail "$img: dumped VM state of vm$i differs from what was saved"
        vms=$(qemu-img info --output=json "$img" | python3 -c "import json,sys; print([s['vm-state-size'] for s in json.load(sys.stdin)['snapshots'] if s['name']=='vm$i'][0])")
        [ "$vms" = "$size" ] || fail "$img: qemu-img says vm$i has $vms bytes of VM state, expected $size"
        everything "$img"
        io c "$img" "write -P 0x5$((i + 2)) $((i * c)) $((c + 1))"
    done
    at "V $cfg: growing the disk over the VM state area shows zeros, not the VM state"
    local span=$((c * c / 8))
    resize c "$img" $(((4 * M + span - 1) / span * span + 3 * M + 2 * c))
    everything "$img"
    at "V $cfg: VM state survives an apply and other snapshots' deletion"
    snap c -c "$img" plain
    ok "$CT_IMG" snapshot --dump-vmstate plain "$T/out" "$img"
    [ ! -s "$T/out" ] || fail "$img: snapshot without VM state dumps $(stat -c %s "$T/out") bytes"
    snap c -a "$img" vm2
    everything "$img"
    snap c -d "$img" vm1
    for i in 2 3; do
        ok "$CT_IMG" snapshot --dump-vmstate "vm$i" "$T/out" "$img"
        cmp "$T/vm$i" "$T/out" || fail "$img: VM state of vm$i changed after apply/delete"
    done
    everything "$img"
    at "V $cfg: qemu-img deletes snapshots with VM state"
    snap q -d "$img" vm3
    everything "$img"
    snap q -d "$img" vm2
    snap q -d "$img" plain
    everything "$img"
}

snap_model_add() {
    local d
    d=$(st "$1")
    cp "$d/cur.script" "$d/snap.$2.script"
    cp "$d/cur.size" "$d/snap.$2.size"
}

section_D() {
    local img
    for maker in c q; do
        img=$T/D-$maker.qcow2
        at "D ($maker resizes): snapshots keep their own disk size"
        mk c "$img" 1M "compat=1.1,cluster_size=65536"
        io c "$img" "write -P 0x61 0 $M"
        snap c -c "$img" small
        resize "$maker" "$img" $((3 * M))
        io c "$img" "write -P 0x62 $((M - 100)) $((M + 200))" "write -P 0x63 $((3 * M - 1)) 1"
        snap c -c "$img" big
        resize "$maker" "$img" $((5 * M + 512))
        io q "$img" "write -P 0x64 $((5 * M)) 512"
        snap q -c "$img" huge
        everything "$img"
        at "D ($maker): cowtree apply restores the smaller size"
        snap c -a "$img" small
        everything "$img"
        local vs
        vs=$("$CT_IMG" info --output=json "$img" | python3 -c 'import json,sys; print(json.load(sys.stdin)["virtual-size"])')
        [ "$vs" = "$M" ] || fail "$img: cowtree-img info says $vs after applying 'small', expected $M"
        at "D ($maker): qemu-img apply of cowtree's big, cowtree apply of qemu's huge"
        snap q -a "$img" big
        everything "$img"
        snap c -a "$img" huge
        everything "$img"
        snap c -d "$img" big
        snap c -a "$img" small
        io c "$img" "write -P 0x65 0 100"
        everything "$img"
    done
}

for cfg in "${CONFIGS[@]}"; do
    read -r name opts <<<"$cfg"
    section_A "$name" "$opts"
    section_B "$name" "$opts"
    section_S "$name" "$opts"
done
section_Z v3-64k "compat=1.1,cluster_size=65536"
section_Z v2-512 "compat=0.10,cluster_size=512"
section_Z v3-64k-extl2 "compat=1.1,cluster_size=65536,extended_l2=on"
section_R2
section_R1
section_V v3-64k "compat=1.1,cluster_size=65536"
section_V v2-512 "compat=0.10,cluster_size=512"
section_D
finish
