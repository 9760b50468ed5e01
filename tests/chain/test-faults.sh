#!/usr/bin/env bash
# Failures and kills at chosen writes during commit, rebase, pull and convert
# (COWTREE_FAULT=write:K:eio makes the K-th write fail; write:K:kill is kill -9 at it). After
# each: every image checks without corruption (leaks allowed), the top's guest view is
# unchanged (for commit: the committed top's view and Active's view, whichever link Active has
# at that instant), and sources of a convert are untouched. K runs over the first writes,
# the last ones and a few seeded random ones (every K with COWTREE_TEST_LONG=1).
. "$(dirname "$0")/../lib/common.sh"
. "$(dirname "$0")/chainlib.sh"

mkchain "$T/orig"
snapshot_raw "$T/orig/Active.qcow2" "$T/active.raw"
snapshot_raw "$T/orig/Snap-3.qcow2" "$T/snap3.raw"
snapshot_raw "$T/orig/Snap-2.qcow2" "$T/snap2.raw"
RANDOM=4242

run_verb() { # VERB-NAME: run it in the current directory
    case "$1" in
    commit-b) "$CT_IMG" commit -q -b RootBase.qcow2 Snap-3.qcow2 --rebase-overlays Active.qcow2 ;;
    commit-empty) "$CT_IMG" commit -q Snap-2.qcow2 --rebase-overlays Snap-3.qcow2 ;;
    rebase) "$CT_IMG" rebase -q -b RootBase.qcow2 -F qcow2 Active.qcow2 ;;
    pull) "$CT_IMG" pull -q -b Snap-1.qcow2 Active.qcow2 ;;
    convert) "$CT_IMG" convert -O qcow2 Active.qcow2 out.qcow2 ;;
    esac
}

verify() { # VERB DIR
    local v=$1 d=$2
    [ "$v" = convert ] || no_corruption "$d"/*.qcow2
    same_content "$d/Active.qcow2" "$T/active.raw"
    case "$v" in
    commit-b) same_content "$d/Snap-3.qcow2" "$T/snap3.raw" ;;
    commit-empty) same_content "$d/Snap-2.qcow2" "$T/snap2.raw" ;;
    convert)
        for f in RootBase Snap-1 Snap-2 Snap-3 Active; do
            cmp -s "$T/orig/$f.qcow2" "$d/$f.qcow2" || die "convert modified its source $f"
        done
        # A fault while the target was being created may leave no target or (kill) a partial
        # one; past creation, the target must be a valid image.
        if [ "${3:-0}" -gt "$create_writes" ]; then
            no_corruption "$d/out.qcow2"
        else
            rm -f "$d/out.qcow2"
        fi
        ;;
    esac
}

# Writes made by creating the convert target alone.
create_writes=$(cd "$T" && COWTREE_FAULT=count COWTREE_FAULT_REPORT=1 "$CT_IMG" create -q -f qcow2 cw.qcow2 32M 2>&1 |
    sed -n 's/^fault-counts: writes=\([0-9]*\).*/\1/p')
[ -n "$create_writes" ] || die "could not count the writes of create"
total=0
for v in commit-b commit-empty rebase pull convert; do
    d=$T/count-$v
    mkdir -p "$d"
    cp "$T"/orig/*.qcow2 "$d"/
    n=$(cd "$d" && COWTREE_FAULT=count COWTREE_FAULT_REPORT=1 run_verb "$v" 2>&1 >/dev/null |
        sed -n 's/^fault-counts: writes=\([0-9]*\).*/\1/p')
    [ -n "$n" ] && [ "$n" -gt 0 ] || die "$v: could not count writes"
    verify "$v" "$d" 999999
    if [ "${COWTREE_TEST_LONG:-0}" = 1 ]; then
        ks=$(seq 1 "$n")
    else
        ks="1 2 3 $((n / 3 + 1)) $((n / 2 + 1)) $((n - 2)) $((n - 1)) $n $((RANDOM % n + 1)) $((RANDOM % n + 1))"
    fi
    for k in $(printf '%s\n' $ks | awk -v n="$n" '$1 >= 1 && $1 <= n' | sort -nu); do
        for action in eio kill; do
            d=$T/run-$v-$k-$action
            mkdir -p "$d"
            cp "$T"/orig/*.qcow2 "$d"/
            set +e
            (cd "$d" && COWTREE_FAULT="write:$k:$action" run_verb "$v") >/dev/null 2>"$d.err"
            rc=$?
            set -e
            # The job must report the failure (the last writes may be flushes on close).
            [ "$rc" -ne 0 ] || [ "$action" = eio ] || die "$v: kill at write $k: exit 0"
            verify "$v" "$d" "$k"
            total=$((total + 1))
            rm -rf "$d" "$d.err"
        done
    done
    echo "$v: $n writes, faults at: $(printf '%s ' $(printf '%s\n' $ks | sort -nu)) ok"
done
echo "$total fault runs ok"
