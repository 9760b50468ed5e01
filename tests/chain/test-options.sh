#!/usr/bin/env bash
# Flags shared by the chain verbs: -p prints qemu-img's "    (NN.NN/100%)" lines (\r-separated,
# newline at the end) when stdout is not a terminal, -q silences "Image committed.", -r limits
# the rate (the job still completes with the right content), bad values are refused.
. "$(dirname "$0")/../lib/common.sh"
. "$(dirname "$0")/chainlib.sh"

mkchain "$T/c"
cd "$T/c"
snapshot_raw Active.qcow2 active.raw
snapshot_raw Snap-3.qcow2 snap3.raw

out=$("$CT_IMG" commit -d -b Snap-1.qcow2 Snap-3.qcow2) || die "commit"
[ "$out" = "Image committed." ] || die "commit output: '$out'"
same_content Snap-3.qcow2 snap3.raw
out=$("$CT_IMG" commit -q -d Active.qcow2) || die "commit -q"
[ -z "$out" ] || die "commit -q printed '$out'"

"$CT_IMG" convert -p -O qcow2 Active.qcow2 p.qcow2 >p.out || die "convert -p"
tr '\r' '\n' <p.out | grep -qx "    (0.00/100%)" || die "convert -p: no 0% line"
tr '\r' '\n' <p.out | grep -qx "    (100.00/100%)" || die "convert -p: no 100% line"
[ "$(tail -c 1 p.out | od -An -c | tr -d ' ')" = '\n' ] || die "convert -p: no final newline"
same_content p.qcow2 active.raw

"$CT_IMG" rebase -p -b Snap-1.qcow2 -F qcow2 Active.qcow2 >r.out || die "rebase -p"
grep -q "(100.00/100%)" r.out || die "rebase -p: no 100% line"
same_content Active.qcow2 active.raw
echo "progress ok"

# -r: 64 MiB/s over a few MiB of data; completes (no timing asserted).
ok "$CT_IMG" convert -r 64M -O raw Active.qcow2 r.raw
cmp r.raw active.raw || die "convert -r content"
ok "$CT_IMG" pull -q -r 64M -b RootBase.qcow2 Active.qcow2
same_content Active.qcow2 active.raw
ok "$CT_IMG" commit -q -r 64M -b RootBase.qcow2 Active.qcow2
same_content Active.qcow2 active.raw
all_clean ./*.qcow2
echo "rate ok"

fails_with 1 "$CT_IMG" commit -r 0 Active.qcow2
fails_with 1 "$CT_IMG" commit -r nonsense Active.qcow2
fails_with 1 "$CT_IMG" convert -S 1000 Active.qcow2 x.raw
fails_with 1 "$CT_IMG" convert -m 17 Active.qcow2 x.raw
fails_with 1 "$CT_IMG" convert Active.qcow2
fails_with 1 "$CT_IMG" pull
fails_with 1 "$CT_IMG" measure --output=xml Active.qcow2
echo "errors ok"
