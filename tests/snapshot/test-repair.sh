#!/usr/bin/env bash
# cowtree-img check / check -r on images with deliberately broken metadata, with and without
# internal snapshots, compared with qemu-img check on copies of the same file.
#
# Base image (cowtree and qemu-img both make snapshots): data, snapshot s1 (cowtree), more data,
# snapshot s2 (qemu-img), then a write to the first cluster (the active L2 table becomes private)
# and to 7M. Guest offsets used:  SHARED = one cluster in, referenced by s1, s2 and the active
# state (refcount 3, no COPIED), ACTIVE = 7M, only in the active state (refcount 1, COPIED).
# Damage (patched with snaplib.py from the qcow2 header, refcount table, L1/L2 tables):
#   raise-shared  refcount of SHARED's data cluster +1           -> leak
#   raise-active  refcount of ACTIVE's data cluster +1           -> leak + wrong COPIED
#   raise-snapl1  refcount of s1's L1 table cluster +1           -> leak
#   lower-shared  refcount of SHARED's data cluster -1           -> corruption
#   lower-active  refcount of ACTIVE's data cluster -1 (to 0)    -> corruption
#   lower-l2      refcount of ACTIVE's active L2 table -1        -> corruption
#   zero-active   ACTIVE's L2 entry := 0                         -> leak
#   zero-shared   SHARED's active L2 entry := 0                  -> leak (refcount 3, 2 refs)
#   clr-copied    clear COPIED of ACTIVE's L2 entry              -> corruption
#   set-copied    set COPIED of SHARED's L2 entry                -> corruption
#   clr-l1copied  clear COPIED of ACTIVE's L1 entry              -> corruption
# For each: `cowtree-img check` exits like `qemu-img check` (2 corruption, 3 leaks only; the
# expected one is also asserted) with the same leak/corruption counts (--output=json);
# `check -r leaks` behaves like qemu-img's -r leaks (same exit code and result: leaks gone,
# COPIED flags fixed once the refcounts are right, other corruptions left; where qemu-img gives
# up with exit 1 cowtree may exit 2 instead, never 0);
# `check -r all` exits like qemu-img check -r all (0) and afterwards qemu-img check and
# cowtree-img check are clean, the guest-visible content of the active state and of every
# snapshot is what it was on the damaged image (for refcount/COPIED damage: as before the
# damage), and a write through cowtree-io to the damaged cluster changes only the active state.
# Dirty bit: the same leaks and corruptions on a v3 image with incompatible bit 0 set are
# repaired by opening it read-write with `cowtree-io -c 'read 0 512'` (dirty bit cleared,
# qemu-img check clean, content unchanged).
. "$(cd "$(dirname "${BASH_SOURCE[0]}")/../lib" && pwd)/common.sh"
. "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/snapcommon.sh"
snap_requirements

M=$((1024 * 1024))
GEOMS=(
    "v3-64k 1 compat=1.1,cluster_size=65536"
    "v2-64k 1 compat=0.10,cluster_size=65536"
    "v3-512 1 compat=1.1,cluster_size=512"
    "v3-4k-rb4 1 compat=1.1,cluster_size=4096,refcount_bits=4"
    "v3-64k 0 compat=1.1,cluster_size=65536"
)
DGEOMS=("v3-64k 1 compat=1.1,cluster_size=65536" "v3-512 1 compat=1.1,cluster_size=512")
if [ "${COWTREE_TEST_LONG:-0}" = 1 ]; then
    DGEOMS+=("v3-64k-extl2 1 compat=1.1,cluster_size=65536,extended_l2=on" "v3-64k 0 compat=1.1,cluster_size=65536")
    GEOMS+=("v3-64k-extl2 1 compat=1.1,cluster_size=65536,extended_l2=on" "v2-512 0 compat=0.10,cluster_size=512"
        "v3-64k-rb64 1 compat=1.1,cluster_size=65536,refcount_bits=64"
        "v3-32k-rb8-extl2 1 compat=1.1,cluster_size=32768,refcount_bits=8,extended_l2=on"
        "v2-4k 1 compat=0.10,cluster_size=4096")
fi
CASES="raise-shared:3 raise-active:2 raise-snapl1:3 lower-shared:2 lower-active:2 lower-l2:2
zero-active:3 zero-shared:3 clr-copied:2 set-copied:2 clr-l1copied:2"

field() { sed "s/.*\b$1=\(0x[0-9a-f]*\|[0-9]*\).*/\1/" <<<"$2"; }

make_base() { # make_base IMG OPTS SNAPS
    local img=$1 opts=$2 snaps=$3 c
    c=$(sed 's/.*cluster_size=\([0-9]*\).*/\1/' <<<"$opts")
    ok "$CT_IMG" create -q -f qcow2 -o "$opts" "$img" 8M >/dev/null
    ok "$CT_IO" -c "write -q -P 1 0 $M" -c "write -q -P 2 $((3 * M)) 200k" "$img" >/dev/null
    [ "$snaps" = 0 ] || ok "$CT_IMG" snapshot -c s1 "$img"
    ok "$CT_IO" -c "write -q -P 3 512k 64k" -c "write -q -P 4 $((6 * M)) 128k" "$img" >/dev/null
    [ "$snaps" = 0 ] || ok qemu-img snapshot -c s2 "$img"
    ok qemu-io -c "write -q -P 5 0 $c" -c "write -q -P 6 $((7 * M)) 64k" "$img" >/dev/null
    SHARED=$c ACTIVE=$((7 * M))
    qemu_clean "$img"
}

snaps_of() { $SNAPLIB names "$1" | cut -f2; }

# contents IMG DIR: raw copies of the active state and of each snapshot
contents() {
    local img=$1 dir=$2 s
    rm -rf "$dir"
    mkdir -p "$dir"
    ok qemu-img convert -U -f qcow2 -O raw "$img" "$dir/active.raw"
    for s in $(snaps_of "$img"); do
        ok qemu-img convert -U -f qcow2 -l "snapshot.name=$s" -O raw "$img" "$dir/snap-$s.raw"
    done
}
same_contents() { # same_contents DIR_A DIR_B WHAT
    local f
    [ "$(cd "$1" && ls)" = "$(cd "$2" && ls)" ] || { fail "$3: the set of snapshots changed: $(cd "$1" && ls) vs $(cd "$2" && ls)"; return; }
    for f in $(cd "$1" && ls); do
        cmp -s "$1/$f" "$2/$f" || fail "$3: ${f%.raw} content changed: $(cmp "$1/$f" "$2/$f" 2>&1 | head -1)"
    done
}

# damage IMG CASE: returns 1 if the case does not apply to this image
damage() {
    local img=$1 kind=$2 d host l2off
    case "$kind" in *shared*|set-copied|raise-snapl1) [ -n "$($SNAPLIB names "$img")" ] || return 1 ;; esac
    case "$kind" in
    *shared*|set-copied) d=$($SNAPLIB l2 "$img" "$SHARED") ;;
    *) d=$($SNAPLIB l2 "$img" "$ACTIVE") ;;
    esac
    host=$(field host "$d")
    l2off=$(field l2off "$d")
    # sanity of the base image: the flags the cases rely on
    case "$kind" in
    *shared*|set-copied) [[ $d == *copied=0* ]] || die "base image: SHARED cluster has COPIED set: $d" ;;
    *) [[ $d == *copied=1* ]] || die "base image: ACTIVE cluster lacks COPIED: $d" ;;
    esac
    case "$kind" in
    raise-shared|raise-active) $SNAPLIB refcount "$img" "$host" 1 >/dev/null ;;
    lower-shared|lower-active) $SNAPLIB refcount "$img" "$host" -1 >/dev/null ;;
    lower-l2) $SNAPLIB refcount "$img" "$l2off" -1 >/dev/null ;;
    raise-snapl1)
        local l1
        l1=$(python3 -B -c "
import sys; sys.path.insert(0, '$SNAP_HERE'); import snaplib
print([s['l1_off'] for s in snaplib.Qcow2('$img').snapshots() if s['name'] == 's1'][0])")
        $SNAPLIB refcount "$img" "$l1" 1 >/dev/null ;;
    zero-active) $SNAPLIB setl2 "$img" "$ACTIVE" zero >/dev/null ;;
    zero-shared) $SNAPLIB setl2 "$img" "$SHARED" zero >/dev/null ;;
    clr-copied) $SNAPLIB setl2 "$img" "$ACTIVE" clear-copied >/dev/null ;;
    set-copied) $SNAPLIB setl2 "$img" "$SHARED" set-copied >/dev/null ;;
    clr-l1copied) $SNAPLIB l1copied "$img" "$ACTIVE" clear-copied >/dev/null ;;
    *) die "unknown case $kind" ;;
    esac
}

# rc_of CMD...: exit status
rc_of() { set +e; "$@" >/dev/null 2>&1; local rc=$?; set -e; echo $rc; }
counts() { # counts TOOL IMG -> "leaks corruptions"
    local out
    set +e
    out=$("$1" check -f qcow2 --output=json "$2" 2>/dev/null)
    set -e
    python3 -c 'import json,sys
try:
    j = json.loads(sys.stdin.read())
    print(j.get("leaks", 0), j.get("corruptions", 0))
except Exception:
    print("unparsable")' <<<"$out"
}

# after_write IMG DIR: write to SHARED and ACTIVE with cowtree-io; only the active state changes
after_write() {
    local img=$1 ref=$2 what=$3
    ok "$CT_IO" -c "write -q -P 0x77 $SHARED 512" -c "write -q -P 0x78 $ACTIVE 1000" "$img" >/dev/null
    qemu_clean_soft "$img" "$what, after writes to the repaired image"
    contents "$img" "$T/post"
    local s
    for s in $(snaps_of "$img"); do
        cmp -s "$ref/snap-$s.raw" "$T/post/snap-$s.raw" || fail "$what: a write to the active state after repair changed snapshot $s"
    done
    local out
    out=$(qemu-io -r -c "read -P 0x77 $SHARED 512" -c "read -P 0x78 $ACTIVE 1000" "$img" 2>&1)
    grep -q 'verification failed' <<<"$out" && fail "$what: writes after repair did not land: $out"
    return 0
}
qemu_clean_soft() {
    local out
    out=$(qemu-img check -f qcow2 "$1" 2>&1) || fail "$2: qemu-img check: $(head -8 <<<"$out")"
    out=$("$CT_IMG" check -f qcow2 "$1" 2>&1) || fail "$2: cowtree-img check: $(head -8 <<<"$out")"
}

ncases=0
for g in "${GEOMS[@]}"; do
    read -r gname snaps opts <<<"$g"
    base=$T/base-$gname-$snaps.qcow2
    make_base "$base" "$opts" "$snaps"
    contents "$base" "$T/orig"
    for ce in $CASES; do
        kind=${ce%%:*} want=${ce##*:}
        at "$gname snaps=$snaps $kind"
        img=$T/img.qcow2
        cp "$base" "$img"
        damage "$img" "$kind" || { echo "   (not applicable)"; continue; }
        ncases=$((ncases + 1))
        cp "$img" "$T/damaged.qcow2"
        contents "$img" "$T/dmg"
        case "$kind" in zero-*) ;; *) same_contents "$T/orig" "$T/dmg" "$kind: metadata damage (before any repair)" ;; esac
        # plain check: cowtree vs qemu-img
        qrc=$(rc_of qemu-img check -f qcow2 "$img")
        crc=$(rc_of "$CT_IMG" check -f qcow2 "$img")
        [ "$crc" = "$qrc" ] || fail "check exit code: cowtree-img $crc, qemu-img $qrc"
        [ "$crc" = "$want" ] || fail "check exit code $crc, expected $want"
        qc=$(counts qemu-img "$img")
        cc=$(counts "$CT_IMG" "$img")
        [ "$qc" = "$cc" ] || fail "leaks/corruptions: cowtree-img [$cc], qemu-img [$qc]"
        [ "$(sha "$img")" = "$(sha "$T/damaged.qcow2")" ] || fail "check without -r modified the image"
        # -r leaks on copies
        cp "$T/damaged.qcow2" "$T/q.qcow2"
        qrc=$(rc_of qemu-img check -f qcow2 -r leaks "$T/q.qcow2")
        crc=$(rc_of "$CT_IMG" check -f qcow2 -r leaks "$img")
        after=$(rc_of qemu-img check -f qcow2 "$img")
        if [ "$qrc" = 1 ]; then
            # qemu-img gives up ("need to rebuild refcount structures", exit 1) where only -r all
            # may rebuild; cowtree may report the corruption instead, but must not call it clean.
            [ "$crc" = 1 ] || [ "$crc" = 2 ] || fail "check -r leaks exit code $crc where qemu-img gives up (1)"
            [ "$after" = 2 ] || fail "after check -r leaks qemu-img check exits $after, the corruption must remain"
        else
            # qemu-img -r leaks also repairs COPIED flags once the refcounts are right.
            qafter=$(rc_of qemu-img check -f qcow2 "$T/q.qcow2")
            if [ "$crc" != "$qrc" ] || [ "$after" != "$qafter" ]; then
                fail_once "rleaks-$kind" "check -r leaks differs from qemu-img's: exit code $crc vs $qrc; qemu-img check afterwards exits $after on cowtree's result, $qafter on qemu-img's"
            fi
        fi
        if [ "$after" = 0 ]; then
            [ "$(rc_of "$CT_IMG" check -f qcow2 "$img")" = 0 ] || fail "after check -r leaks qemu-img finds the image clean, cowtree-img does not"
            contents "$img" "$T/rep"
            same_contents "$T/dmg" "$T/rep" "$kind: check -r leaks"
        fi
        [ "$want" != 3 ] || [ "$after" = 0 ] || fail "check -r leaks left a leak-only image unclean (qemu-img check exits $after): $(qemu-img check "$img" 2>&1 | head -6)"
        # -r all
        cp "$T/damaged.qcow2" "$img"
        cp "$T/damaged.qcow2" "$T/q.qcow2"
        qrc=$(rc_of qemu-img check -f qcow2 -r all "$T/q.qcow2")
        set +e
        out=$("$CT_IMG" check -f qcow2 -r all "$img" 2>&1)
        crc=$?
        set -e
        [ "$crc" = "$qrc" ] || fail "check -r all exit code: cowtree-img $crc, qemu-img $qrc ($(tail -3 <<<"$out" | tr '\n' ' '))"
        qemu_clean_soft "$img" "$kind: after check -r all"
        contents "$img" "$T/rep"
        same_contents "$T/dmg" "$T/rep" "$kind: check -r all"
        after_write "$img" "$T/rep" "$kind"
    done
done

# ---------------------------------------------------------------------------------------------
# Dirty bit: opening read-write repairs.
for g in "${DGEOMS[@]}"; do
    read -r gname snaps opts <<<"$g"
    base=$T/dbase-$gname-$snaps.qcow2
    make_base "$base" "$opts" "$snaps"
    for kind in raise-shared zero-active raise-snapl1 lower-shared clr-copied set-copied; do
        at "dirty bit: $gname snaps=$snaps $kind"
        img=$T/img.qcow2
        cp "$base" "$img"
        damage "$img" "$kind" || { echo "   (not applicable)"; continue; }
        ncases=$((ncases + 1))
        contents "$img" "$T/dmg"
        $SNAPLIB dirty "$img" on
        [ "$(rc_of qemu-img check -f qcow2 "$img")" != 0 ] || die "damage not visible to qemu-img check"
        out=$("$CT_IO" -c 'read 0 512' "$img" 2>&1) || fail "cowtree-io could not open the dirty image: $out"
        flags=$($SNAPLIB hdr "$img" | python3 -c 'import json,sys; print(json.load(sys.stdin)["incompat"] & 1)')
        [ "$flags" = 0 ] || fail "dirty bit still set after a read-write open and close"
        qemu_clean_soft "$img" "$kind: after the read-write open of the dirty image"
        contents "$img" "$T/rep"
        same_contents "$T/dmg" "$T/rep" "$kind: repair on open"
        after_write "$img" "$T/rep" "dirty $kind"
    done
done
echo "$ncases damaged images checked"
finish
