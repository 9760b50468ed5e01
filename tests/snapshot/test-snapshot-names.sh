#!/usr/bin/env bash
# cowtree's snapshot naming rules (stricter than qemu-img's):
#   - create refuses an empty name, a duplicate name, a name equal to an existing snapshot's
#     id, and a name longer than 65535 bytes;
#   - a lookup (-a, -d, --dump-vmstate) that is one snapshot's id and another snapshot's name,
#     or the name of two snapshots (images made by qemu-img allow both), is refused as
#     ambiguous with a message naming both snapshots;
#   - otherwise a name or an id selects (checked through the content that -a restores);
#   - a name that exists nowhere is refused as not found.
# Every refusal: exit status 1..127, exactly one stderr line `cowtree-img: FILE: ...` that says
# what is wrong (regex per case), the image file byte-for-byte unchanged (sha256) and
# qemu-img check clean afterwards. Also: images built only with cowtree never contain an
# ambiguous name (every id and every name of a cowtree-made table selects exactly one
# snapshot), and accepted unusual names (spaces, quotes, UTF-8, 200+ bytes) list identically in
# qemu-img.
. "$(cd "$(dirname "${BASH_SOURCE[0]}")/../lib" && pwd)/common.sh"
. "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/snapcommon.sh"
snap_requirements

# rejects IMG REGEX... -- CMD...: the command is refused as described above; every REGEX
# (extended, case-insensitive) must match the message.
rejects() {
    local img=$1 res=() before after out err rc r
    shift
    while [ "$1" != "--" ]; do res+=("$1"); shift; done
    shift
    before=$(sha "$img")
    set +e
    out=$("$@" 2>"$T/err")
    rc=$?
    set -e
    err=$(cat "$T/err")
    after=$(sha "$img")
    if [ $rc -eq 0 ]; then
        fail "'${*: -3}' succeeded; must be refused (stdout: $out)"
    elif [ $rc -ge 128 ]; then
        fail "'${*: -3}' died with signal $((rc - 128))"
    fi
    ! grep -qE 'Sanitizer|runtime error' "$T/err" || fail "'${*: -3}': sanitizer report: $err"
    [ "$(wc -l <"$T/err")" -eq 1 ] || fail "'${*: -3}': expected one stderr line, got: $err"
    [[ $err == "cowtree-img: $img: "* ]] || fail "'${*: -3}': message not of the form 'cowtree-img: $img: ...': $err"
    for r in "${res[@]}"; do
        grep -qiE -- "$r" <<<"$err" || fail "'${*: -3}': message does not match /$r/: $err"
    done
    [ "$before" = "$after" ] || fail "'${*: -3}' was refused but changed the image"
    local c
    c=$(qemu-img check "$img" 2>&1) || fail "after refused '${*: -3}', qemu-img check: $c"
}

# selects IMG KEY NAME: 'snapshot -a KEY' on a copy restores snapshot NAME's content
# (each snapshot below has its own pattern at offset 0: byte value = its creation index).
selects() {
    local img=$1 key=$2 name=$3 cp=$T/sel.qcow2 want out
    want=${pat[$name]}
    cp "$img" "$cp"
    out=$("$CT_IMG" snapshot -a "$key" "$cp" 2>&1) || { fail "snapshot -a '$key' refused: $out"; return; }
    out=$(qemu-io -r -c "read -P $want 0 4k" "$cp" 2>&1)
    grep -q 'verification failed' <<<"$out" && fail "snapshot -a '$key' did not select '$name' (pattern $want expected at 0)"
    out=$("$CT_IMG" snapshot --dump-vmstate "$key" "$T/vm.out" "$img" 2>&1) || fail "--dump-vmstate '$key' refused: $out"
    rm -f "$cp"
}

declare -A pat
# qsnap TOOL IMG NAME PATTERN: write PATTERN at 0 and take a snapshot with qemu-img / cowtree-img
qsnap() {
    local tool=$1 img=$2 name=$3 p=$4 out
    qemu-io -c "write -P $p 0 4k" "$img" >/dev/null || die "qemu-io write"
    if [ "$tool" = q ]; then
        out=$(qemu-img snapshot -c "$name" "$img" 2>&1) || die "qemu-img snapshot -c '$name': $out"
    else
        out=$("$CT_IMG" snapshot -c "$name" "$img" 2>&1) || die "cowtree-img snapshot -c '$name': $out"
    fi
    pat[$name]=$p
}

# ---------------------------------------------------------------------------------------------
at "create: empty, duplicate, id-like and too long names"
img=$T/n1.qcow2
ok qemu-img create -q -f qcow2 "$img" 1M
rejects "$img" 'empty' -- "$CT_IMG" snapshot -c '' "$img"
qsnap c "$img" alpha 0x01
qsnap c "$img" beta 0x02
rejects "$img" 'alpha' 'exist|duplicate|already' -- "$CT_IMG" snapshot -c alpha "$img"
rejects "$img" 'beta' 'exist|duplicate|already' -- "$CT_IMG" snapshot -c beta "$img"
rejects "$img" "'1'" '\bid\b' 'alpha' -- "$CT_IMG" snapshot -c 1 "$img"
rejects "$img" "'2'" '\bid\b' 'beta' -- "$CT_IMG" snapshot -c 2 "$img"
printf 'v' >"$T/vm"
rejects "$img" 'alpha' 'exist|duplicate|already' -- "$CT_IMG" snapshot -c alpha --vmstate "$T/vm" "$img"
rejects "$img" "'1'" '\bid\b' -- "$CT_IMG" snapshot -c 1 --vmstate "$T/vm" "$img"
long=$(head -c 65536 /dev/zero | tr '\0' 'n')
rejects "$img" 'long|65535|length' -- "$CT_IMG" snapshot -c "$long" "$img"
rejects "$img" 'not found|no snapshot|does not exist' 'gamma' -- "$CT_IMG" snapshot -a gamma "$img"
rejects "$img" 'not found|no snapshot|does not exist' 'gamma' -- "$CT_IMG" snapshot -d gamma "$img"
rejects "$img" 'not found|no snapshot|does not exist' '\b3\b' -- "$CT_IMG" snapshot -d 3 "$img"
rejects "$img" 'not found|no snapshot|does not exist' 'gamma' -- "$CT_IMG" snapshot --dump-vmstate gamma "$T/vm.out" "$img"
at "create: a name or an id selects"
selects "$img" alpha alpha
selects "$img" 1 alpha
selects "$img" beta beta
selects "$img" 2 beta

at "unusual names accepted and listed like qemu-img does"
odd1="with  spaces and 'quotes'"
# (names stay under 256 bytes: QEMU's tools keep at most 255 bytes of a name)
odd2="ünïcødé-名前-$(head -c 200 /dev/zero | tr '\0' 'x')"
qsnap c "$img" "$odd1" 0x03
qsnap c "$img" "$odd2" 0x04
selects "$img" "$odd1" "$odd1"
selects "$img" "$odd2" "$odd2"
got=$(qemu-img info --output=json "$img" | python3 -c 'import json,sys; [print(s["name"]) for s in json.load(sys.stdin)["snapshots"]]')
want=$(printf '%s\n' alpha beta "$odd1" "$odd2")
[ "$got" = "$want" ] || fail "qemu-img lists names [$got], expected [$want]"
c=$(qemu-img check "$img" 2>&1) || fail "qemu-img check: $c"

# ---------------------------------------------------------------------------------------------
at "qemu-img image: two snapshots with the same name"
img=$T/dup.qcow2
ok qemu-img create -q -f qcow2 "$img" 1M
qsnap q "$img" twin 0x11    # id 1
qsnap q "$img" twin 0x12    # id 2 (qemu-img allows duplicate names)
qsnap q "$img" other 0x13   # id 3
for op in -a -d; do
    rejects "$img" 'ambiguous' "twin" '\b1\b' '\b2\b' -- "$CT_IMG" snapshot $op twin "$img"
done
rejects "$img" 'ambiguous' "twin" '\b1\b' '\b2\b' -- "$CT_IMG" snapshot --dump-vmstate twin "$T/vm.out" "$img"
rejects "$img" 'exist|duplicate|already' 'twin' -- "$CT_IMG" snapshot -c twin "$img"
at "qemu-img image: ids still select the two 'twin' snapshots"
pat[twin1]=0x11 pat[twin2]=0x12
selects "$img" 1 twin1
selects "$img" 2 twin2
selects "$img" other other
selects "$img" 3 other
at "qemu-img image: deleting one 'twin' by id makes the name unique again"
ok "$CT_IMG" snapshot -d 1 "$img" >/dev/null
c=$(qemu-img check "$img" 2>&1) || fail "qemu-img check after delete: $c"
pat[twin]=0x12
selects "$img" twin twin

# ---------------------------------------------------------------------------------------------
at "qemu-img image: a name that is another snapshot's id"
img=$T/idname.qcow2
ok qemu-img create -q -f qcow2 "$img" 1M
qsnap q "$img" 2 0x21       # id 1, name "2"
qsnap q "$img" other 0x22   # id 2, name "other"
qsnap q "$img" 3 0x23       # id 3, name "3": its own id, not ambiguous
for op in -a -d; do
    rejects "$img" 'ambiguous' "other" '\b1\b' -- "$CT_IMG" snapshot $op 2 "$img"
done
rejects "$img" 'ambiguous' "other" '\b1\b' -- "$CT_IMG" snapshot --dump-vmstate 2 "$T/vm.out" "$img"
rejects "$img" 'exist|duplicate|already|\bid\b' -- "$CT_IMG" snapshot -c 2 "$img"
rejects "$img" "\bid\b" -- "$CT_IMG" snapshot -c 1 "$img"
at "qemu-img image: unambiguous keys select"
pat[id1]=0x21
selects "$img" 1 id1
selects "$img" other other
selects "$img" 3 3
at "qemu-img image: the ambiguity is gone once 'other' (id 2) is deleted"
ok "$CT_IMG" snapshot -d other "$img" >/dev/null
c=$(qemu-img check "$img" 2>&1) || fail "qemu-img check after delete: $c"
selects "$img" 2 2

# ---------------------------------------------------------------------------------------------
# Images made with cowtree alone must never contain an ambiguous key: every id and every name
# in the table selects exactly one snapshot (a digit-only name must not collide with an id that
# cowtree hands out later).
declare -A reported=()
unambiguous() {
    local img=$1 id name out
    while IFS=$'\t' read -r id name; do
        for k in "$id" "$name"; do
            [ -z "${reported[$img:$k]+x}" ] || continue
            if ! out=$("$CT_IMG" snapshot --dump-vmstate "$k" "$T/vm.out" "$img" 2>&1); then
                reported[$img:$k]=1
                fail "cowtree-made table (id:name $($SNAPLIB names "$img" | tr '\t\n' ': ')) has an unusable key '$k': $out"
            fi
        done
    done < <($SNAPLIB names "$img")
}
at "cowtree alone: digit-only names never become ambiguous"
img=$T/digits.qcow2
ok "$CT_IMG" create -q -f qcow2 "$img" 1M >/dev/null
for n in 2 x 5 y z 4 w; do
    out=$("$CT_IMG" snapshot -c "$n" "$img" 2>&1) || echo "create '$n' refused: $out"
    unambiguous "$img"
done
at "cowtree alone: ids are not reused as names after deletes"
img=$T/digits2.qcow2
ok "$CT_IMG" create -q -f qcow2 "$img" 1M >/dev/null
for n in a b c; do ok "$CT_IMG" snapshot -c "$n" "$img" >/dev/null; done
ok "$CT_IMG" snapshot -d c "$img" >/dev/null  # id 3 is free again
out=$("$CT_IMG" snapshot -c 3 "$img" 2>&1) || echo "create '3' refused: $out"
ok "$CT_IMG" snapshot -c d "$img" >/dev/null
unambiguous "$img"
c=$(qemu-img check "$img" 2>&1) || fail "qemu-img check: $c"

finish
