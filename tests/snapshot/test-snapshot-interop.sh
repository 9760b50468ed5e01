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
#     modelled content (QEMU 7.2 converts a snapshot at the active virtual size, so the
#     snapshot's own size is checked in the snapshot table and, when it differs from the
#     active size, by `qemu-img snapshot -a` on a copy converted in full).
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
#   RC refcount_bits=4 with 8 compressed clusters in one host cluster: a snapshot needs
#      refcount 16 there and must be refused cleanly (image unchanged), not fail half-way;
#      likewise an apply that would need 18;
#   R1 refcount_bits=1: snapshot creation refused, image unchanged;
#   V  VM state of 1 byte, 64k+1, 3 MiB: --dump-vmstate returns the same bytes (after more
#      snapshots, after apply), qemu-img shows the VM SIZE, the VM state is invisible to the
#      guest, qemu-img deletes such snapshots without leaks;
#   D  virtual disk size: a snapshot keeps its own size through resizes; apply restores it
#      (cowtree and qemu-img, either tool resizing); on v2 images cowtree refuses resizing when
#      there are snapshots, as qemu-img does;
#   T  a snapshot table spanning many 512-byte clusters (24 snapshots with long names, made by
#      both tools), deletions from the middle and the ends;
#   O  a snapshot table in the format of QEMU < 5.0 (16 bytes of extra data per entry, so the
#      table is shorter than cowtree's own encoding): delete/create/apply by cowtree must free
#      exactly the old table's clusters (the cluster after it holds guest data);
#   K  listings of snapshots carrying a VM clock and icount (patched in, as savevm writes
#      them), kept when cowtree rewrites the table;
#   G  refcount table growth during snapshot operations (512-byte clusters, refcount_bits=64).
# The seed scenario also runs with lazy_refcounts=on, 4k clusters, extended_l2+refcount_bits=4.
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
    d=$($SNAPLIB l2 "$img" $((M + M / 2 - c)))
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

section_R2() {
    local img vm c=65536 out
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
        at "R2 ($maker): refusals leave an image with a persistent bitmap untouched (bitmap stays valid)"
        cp "$img" "$T/R2-bitmap.qcow2"
        ok qemu-img bitmap --add "$T/R2-bitmap.qcow2" b0
        refused "$T/R2-bitmap.qcow2" 'refcount' "$CT_IMG" snapshot -c r3 "$T/R2-bitmap.qcow2"
        out=$(qemu-img info "$T/R2-bitmap.qcow2" 2>&1)
        ! grep -qi 'inconsistent\|lacking bitmap' <<<"$out" || fail "a refused snapshot -c invalidated the image's bitmaps"
        local bsha
        cp "$img" "$T/R2-bitmap.qcow2"
        ok qemu-img bitmap --add "$T/R2-bitmap.qcow2" b0
        bsha=$(sha "$T/R2-bitmap.qcow2")
        if ! out=$("$CT_IMG" snapshot -a r1 "$T/R2-bitmap.qcow2" 2>&1); then
            [ "$(sha "$T/R2-bitmap.qcow2")" = "$bsha" ] || fail "refused apply ($out) changed an image with a bitmap"
            out=$(qemu-img info "$T/R2-bitmap.qcow2" 2>&1)
            ! grep -qi 'inconsistent\|lacking bitmap' <<<"$out" || fail "a refused snapshot -a invalidated the image's bitmaps"
        fi
        at "R2 ($maker): active writes unshare some clusters; still refused"
        io c "$img" "write -P 0x32 0 $((2 * c))"
        refused "$img" 'refcount' "$CT_IMG" snapshot -c r3 "$img"
        everything "$img"
        at "R2 ($maker): apply needs refcount 4 on shared clusters: refused or done correctly"
        local before rc
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
        at "R2 ($maker): with r2 deleted, applying r3 fits (refcounts at most 3 on the way)"
        snap c -d "$img" r2
        snap c -a "$img" r3
        everything "$img"
    done
}

section_RC() {
    local img=$T/RC.qcow2 d host rc
    at "RC: refcount_bits=4, 8 compressed clusters packed into one host cluster (refcount 8)"
    mk c "$img" 1M "compat=1.1,cluster_size=4096,refcount_bits=4"
    io c "$img" "write -c -P 0x41 0 32768"
    d=$($SNAPLIB l2 "$img" 0)
    host=$(sed 's/.*host=\(0x[0-9a-f]*\).*/\1/' <<<"$d")
    rc=$($SNAPLIB refcount "$img" "$host")
    [ "$rc" -ge 8 ] || die "setup: compressed clusters not packed (refcount $rc): $d"
    everything "$img"
    at "RC: a snapshot would need refcount 16 (each compressed entry adds one): refused cleanly"
    refused "$img" 'refcount' "$CT_IMG" snapshot -c s "$img"
    everything "$img"
    at "RC: with fewer packed references the snapshot works"
    io c "$img" "write -P 0x42 0 16384"
    snap c -c "$img" s
    everything "$img"
    snap q -a "$img" s
    everything "$img"
    img=$T/RC2.qcow2
    at "RC: 6 packed compressed clusters, one snapshot (refcount 12): apply would need 18, refused cleanly"
    mk c "$img" 1M "compat=1.1,cluster_size=4096,refcount_bits=4"
    io c "$img" "write -c -P 0x43 0 24576"
    snap c -c "$img" s
    everything "$img"
    refused "$img" 'refcount' "$CT_IMG" snapshot -a s "$img"
    everything "$img"
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
    local span=$((c * c / 8)) vmoff
    vmoff=$(((4 * M + span - 1) / span * span))
    if [[ $opts == *compat=0.10* ]]; then
        # qemu-img 7.2 refuses to resize a v2 image that has snapshots (v2 readers may ignore
        # the snapshot's disk size), and cannot apply a snapshot whose size differs later on.
        at "V $cfg: resizing a v2 image with snapshots is refused, like qemu-img"
        refused "$img" 'snapshot' "$CT_IMG" resize -f qcow2 "$img" $((vmoff + 3 * M + 2 * c))
        # if it was not refused, follow the new size so the rest of the section still checks
        qemu-img info --output=json "$img" | python3 -c 'import json,sys; print(json.load(sys.stdin)["virtual-size"])' >"$(st "$img")/cur.size"
    elif [ "$vmoff" -le $((64 * M)) ]; then
        at "V $cfg: growing the disk over the VM state area (at $vmoff) shows zeros, not the VM state"
        resize c "$img" $((vmoff + 3 * M + 2 * c))
    else
        at "V $cfg: growing the disk"
        resize c "$img" $((8 * M))
    fi
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

section_T() {
    local img=$T/T.qcow2 i name
    at "T: a snapshot table over many 512-byte clusters (long names), cowtree and qemu-img mixed"
    mk c "$img" 2M "compat=1.1,cluster_size=512"
    for i in $(seq 1 24); do
        name="snapshot-$i-$(head -c $((i * 9)) /dev/zero | tr '\0' 'n')"
        io c "$img" "write -P $i $((i * 40000)) 3000"
        if [ $((i % 3)) = 0 ]; then snap q -c "$img" "$name"; else snap c -c "$img" "$name"; fi
    done
    everything "$img"
    at "T: deleting from the middle and the ends"
    for i in 12 1 24 7 13; do
        name="snapshot-$i-$(head -c $((i * 9)) /dev/zero | tr '\0' 'n')"
        snap c -d "$img" "$name"
    done
    snap q -d "$img" "snapshot-2-$(head -c 18 /dev/zero | tr '\0' 'n')"
    everything "$img"
    snap c -a "$img" "snapshot-9-$(head -c 81 /dev/zero | tr '\0' 'n')"
    io c "$img" "write -P 0x99 0 $M"
    snap c -c "$img" last
    everything "$img"
}

section_O() {
    local img=$T/O.qcow2 i
    at "O: snapshot table written by QEMU < 5.0 (16 bytes of extra data per entry)"
    mk q "$img" 1M "compat=1.1,cluster_size=512"
    for i in 1 2 3 4 5 6 7 8; do
        io q "$img" "write -P $i $((i * 4096)) 512"
        snap q -c "$img" "s$i"
    done
    # 8 entries: 576 bytes with 24 bytes of extra data, 512 (one cluster) with 16
    $SNAPLIB set-extra "$img" 16 >/dev/null
    qemu-img check -q -r leaks "$img" >/dev/null 2>&1 || true  # the table's second cluster is free now
    io q "$img" "write -P 0x77 $((100 * 1024)) 2048" # ... and holds guest data
    everything "$img"
    at "O: cowtree deletes and creates snapshots in the old-format table"
    snap c -d "$img" s3
    everything "$img"
    io c "$img" "write -P 0x55 $((200 * 1024)) 4096" "write -P 0x56 $((300 * 1024)) 8192"
    everything "$img"
    snap c -c "$img" new
    io c "$img" "write -P 0x57 $((400 * 1024)) 8192"
    everything "$img"
    snap c -a "$img" s1
    everything "$img"
}

section_K() {
    local img=$T/K.qcow2
    at "K: listings of snapshots with a VM clock and icount (as QEMU's savevm records them)"
    mk q "$img" 1M "compat=1.1,cluster_size=65536"
    snap q -c "$img" k1
    snap c -c "$img" k2
    snap q -c "$img" k3
    $SNAPLIB set-clock "$img" k1 3723456789012 12345
    $SNAPLIB set-clock "$img" k2 360000500000000 0
    $SNAPLIB set-clock "$img" k3 999999999
    everything "$img"
    at "K: cowtree rewrites the table (create, delete): clocks and icounts are kept"
    snap c -c "$img" k4
    snap c -d "$img" k3
    everything "$img"
    local clk
    clk=$(qemu-img info --output=json "$img" | python3 -c '
import json, sys
print(" ".join("%s:%d.%09d:%s" % (s["name"], s["vm-clock-sec"], s["vm-clock-nsec"], s.get("icount"))
               for s in json.load(sys.stdin)["snapshots"]))')
    [ "$clk" = "k1:3723.456789012:12345 k2:360000.500000000:0 k4:0.000000000:0" ] ||
        fail "$img: clocks/icounts after cowtree rewrote the table: $clk"
}

section_G() {
    local img=$T/G.qcow2
    at "G: refcount structures grow during snapshot operations (512-byte clusters, refcount_bits=64)"
    mk c "$img" 6M "compat=1.1,cluster_size=512,refcount_bits=64"
    io c "$img" "write -P 1 0 6M"
    snap c -c "$img" g1
    io c "$img" "write -P 2 0 6M"
    snap c -c "$img" g2
    io c "$img" "write -P 3 1M 3M"
    everything "$img"
    snap c -a "$img" g1
    io q "$img" "write -P 4 2M 2M"
    snap c -d "$img" g2
    everything "$img"
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
section_RC
section_R1
section_V v3-64k "compat=1.1,cluster_size=65536"
section_V v3-4k "compat=1.1,cluster_size=4096"
section_V v2-512 "compat=0.10,cluster_size=512"
section_D
section_T
section_O
section_K
section_G
for cfg in "v3-64k-lazy compat=1.1,cluster_size=65536,lazy_refcounts=on" "v3-4k compat=1.1,cluster_size=4096" \
    "v3-32k-extl2-rb4 compat=1.1,cluster_size=32768,extended_l2=on,refcount_bits=4"; do
    read -r name opts <<<"$cfg"
    section_S "$name" "$opts"
done
finish
