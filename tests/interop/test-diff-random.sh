#!/usr/bin/env bash
# Differential random test: tests/lib/diffrand.py applies the same seeded sequence of
# operations (pattern writes, zero writes, discards, read -P checks against a shadow model;
# random sizes and alignments, cluster-crossing, around the end of the shorter backing file and
# of the image) to a cowtree overlay with cowtree-io and to a qemu twin with qemu-io, in batches
# of a few hundred -c commands per process; after every batch qemu-img compare must say equal
# and qemu-img check must be clean on both. The seed picks the geometry (v2/v3, 4k/32k/64k
# clusters, extended_l2, raw or qcow2 base, optional middle layer).
#
# Default: 3 seeds x 10,000 operations. COWTREE_TEST_LONG=1: 12 seeds x 25,000 operations.
# DIFFRAND_SEEDS / DIFFRAND_OPS override. Replay a failure with
#   COWTREE_BUILD=build tests/lib/diffrand.py --seed N [--keep DIR]
. "$(dirname "$0")/interop-lib.sh"

if [ "$LONG" = 1 ]; then
    seeds=${DIFFRAND_SEEDS:-$(seq 0 11)}
    ops=${DIFFRAND_OPS:-25000}
else
    # seeds 0, 1, 2 give: v2 4k clusters, v3 64k extended_l2, v3 4k
    seeds=${DIFFRAND_SEEDS:-0 1 2}
    ops=${DIFFRAND_OPS:-10000}
fi
failed=()
for seed in $seeds; do
    if ! "$PY" "$DIFFRAND" --seed "$seed" --ops "$ops"; then
        failed+=("$seed")
        echo "FAILED seed $seed: replay with: COWTREE_BUILD=$COWTREE_BUILD $DIFFRAND --seed $seed --ops $ops" >&2
    fi
done
[ "${#failed[@]}" -eq 0 ] || die "diffrand failed for seed(s) ${failed[*]}"
echo "all seeds passed"
