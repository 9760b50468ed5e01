#!/usr/bin/env bash
# Offline blockpull (cowtree-img pull) on RootBase <- Snap-1 <- Snap-2 <- Snap-3 <- Active:
# Figure-5 (pull Snap-1..Snap-3 into Active, RootBase becomes its backing file), Figure-6 (pull
# everything: Active standalone), and a pull down to an intermediate image. Each result must
# read like Active before, match qemu-img rebase (safe) doing the same on a twin chain, leave
# the other images untouched, and check clean.
. "$(dirname "$0")/../lib/common.sh"
. "$(dirname "$0")/chainlib.sh"

mkchain "$T/orig"
snapshot_raw "$T/orig/Active.qcow2" "$T/active.raw"

# pull_case NAME BASE(""=none)
pull_case() {
    local n=$1 base=$2 ct=$T/$1/ct q=$T/$1/qemu
    mkdir -p "$ct" "$q"
    cp "$T"/orig/*.qcow2 "$ct"/
    cp "$T"/orig/*.qcow2 "$q"/
    if [ -n "$base" ]; then
        (cd "$ct" && ok "$CT_IMG" pull -q -b "$base" Active.qcow2)
        (cd "$q" && ok qemu-img rebase -q -b "$base" -F qcow2 Active.qcow2)
    else
        (cd "$ct" && ok "$CT_IMG" pull -q Active.qcow2)
        (cd "$q" && ok qemu-img rebase -q -b "" Active.qcow2)
    fi
    [ "$(backing_of "$ct/Active.qcow2")" = "$base" ] || die "$n: backing is '$(backing_of "$ct/Active.qcow2")', want '$base'"
    same_content "$ct/Active.qcow2" "$T/active.raw"
    same_images "$ct/Active.qcow2" "$q/Active.qcow2"
    for f in RootBase Snap-1 Snap-2 Snap-3; do
        cmp -s "$T/orig/$f.qcow2" "$ct/$f.qcow2" || die "$n: pull modified $f"
    done
    all_clean "$ct"/*.qcow2 "$q"/*.qcow2
    if [ -z "$base" ]; then
        # Standalone: every range is now decided by Active itself (depth 0) or reads zero.
        qemu-img map --output=json "$ct/Active.qcow2" | python3 -c '
import json, sys
for e in json.load(sys.stdin):
    assert e["depth"] == 0, e
' || die "$n: standalone Active still reads through a backing file"
    fi
    echo "$n ok"
}

pull_case figure-5 RootBase.qcow2
pull_case figure-6 ""
pull_case to-snap-2 Snap-2.qcow2

# Progress output in qemu-img's format when stdout is not a terminal.
mkdir -p "$T/p"
cp "$T"/orig/*.qcow2 "$T/p"/
(cd "$T/p" && "$CT_IMG" pull -p -b RootBase.qcow2 Active.qcow2 >"$T/p.out") || die "pull -p"
grep -q "(100.00/100%)" "$T/p.out" || die "no final progress line: $(od -c "$T/p.out" | head)"
grep -q "(0.00/100%)" "$T/p.out" || die "no initial progress line"
same_content "$T/p/Active.qcow2" "$T/active.raw"
echo "progress ok"

# A base that is not in the chain is refused, nothing changes.
(cd "$T/p" && cp Active.qcow2 before.qcow2 && fails_with 1 "$CT_IMG" pull -q -b nothere.qcow2 Active.qcow2 &&
    cmp -s before.qcow2 Active.qcow2) || die "refused pull changed Active"
