#!/usr/bin/env bash
# Cache modes (-t / -T) as qemu-img and qemu-io take them, and the flushes behind them.
#  - Every mode qemu accepts gives the same images as qemu-img with the same mode (convert,
#    commit, rebase, cowtree-io writes), and qemu-img check is clean.
#  - A mode qemu rejects is rejected with qemu's message, before anything is created.
#  - unsafe skips every flush of the image written (COWTREE_FAULT=count reports the flushes
#    that reach the storage), writeback flushes, writethrough flushes after each write.
#  - Write-behind: a copy job starts writeback as it goes (sync_file_range), except in unsafe
#    mode, where nothing is to be flushed at all.
#  - create issues no more fdatasyncs than qemu-img create (creation skips the engine's
#    ordering barriers: the file is not an image until create returns).
. "$(dirname "$0")/../lib/common.sh"
requires qemu-img qemu-io python3
cd "$T"

MiB=$((1 << 20))
# base: data in the first 48 MiB; top: every 4th MiB rewritten, a zeroed MiB.
mkchain() {
    qemu-img create -q -f qcow2 "$1-base.qcow2" 96M
    qemu-io -f qcow2 -c "write -q -P 0x11 0 48M" "$1-base.qcow2" >/dev/null
    qemu-img create -q -f qcow2 -b "$1-base.qcow2" -F qcow2 "$1-top.qcow2"
    local cmds=()
    for ((o = 0; o < 96; o += 4)); do cmds+=(-c "write -q -P 0x22 $((o * MiB)) 1M"); done
    cmds+=(-c "write -q -z $((9 * MiB)) 1M")
    qemu-io -f qcow2 "${cmds[@]}" "$1-top.qcow2" >/dev/null
}
mkchain src

flushes() { # flushes cowtree reports for one command (COWTREE_FAULT=count)
    COWTREE_FAULT=count COWTREE_FAULT_REPORT=1 "$@" 2>&1 >/dev/null |
        sed -n 's/.*flushes=\([0-9]*\).*/\1/p' | tail -1
}

for mode in writeback none off writethrough directsync unsafe; do
    # convert
    rm -f c.qcow2 q.qcow2
    ok "$CT_IMG" convert -t "$mode" -T "$mode" -O qcow2 src-top.qcow2 c.qcow2
    ok qemu-img convert -t "$mode" -T "$mode" -O qcow2 src-top.qcow2 q.qcow2
    ok qemu-img compare -q c.qcow2 q.qcow2
    qemu_clean c.qcow2
    # commit on twin chains
    mkchain c
    mkchain q
    ok "$CT_IMG" commit -q -t "$mode" c-top.qcow2
    ok qemu-img commit -q -t "$mode" q-top.qcow2
    ok qemu-img compare -q c-base.qcow2 q-base.qcow2
    ok qemu-img compare -q c-top.qcow2 src-top.qcow2
    qemu_clean c-base.qcow2
    qemu_clean c-top.qcow2
    # safe rebase onto nothing (standalone)
    mkchain c
    mkchain q
    ok "$CT_IMG" rebase -t "$mode" -T "$mode" -b "" c-top.qcow2
    ok qemu-img rebase -t "$mode" -T "$mode" -b "" q-top.qcow2
    ok qemu-img compare -q c-top.qcow2 q-top.qcow2
    ok qemu-img compare -q c-top.qcow2 src-top.qcow2
    qemu_clean c-top.qcow2
    # cowtree-io
    cp src-top.qcow2 io.qcow2
    ok "$CT_IO" -t "$mode" -c "write -P 0x5a 1M 64k" -c "read -P 0x5a 1M 64k" io.qcow2 >/dev/null
    ok qemu-io -f qcow2 -c "read -P 0x5a 1M 64k" io.qcow2 >/dev/null
    qemu_clean io.qcow2
done

# Rejected modes: qemu's message, nothing created, rc 1 (as qemu-img and qemu-io).
rejects() {
    local out
    set +e
    out=$("$@" 2>&1)
    local rc=$?
    set -e
    [ "$rc" -eq 1 ] || die "rc $rc from: $*"
    echo "$out" | grep -q "Invalid cache option: bogus" || die "message of $*: $out"
}
rejects "$CT_IMG" convert -t bogus -O qcow2 src-top.qcow2 never.qcow2
rejects "$CT_IMG" convert -T bogus -O qcow2 src-top.qcow2 never.qcow2
[ ! -e never.qcow2 ] || die "convert with a bad cache mode created its target"
rejects "$CT_IMG" commit -t bogus src-top.qcow2
rejects "$CT_IMG" rebase -t bogus -b "" src-top.qcow2
rejects "$CT_IMG" bench -t bogus -c 1 src-top.qcow2
rejects "$CT_IO" -t bogus -c "read 0 512" src-top.qcow2
ok qemu-img compare -q src-top.qcow2 c.qcow2 # the source chain was not touched

# Flushes that reach the storage, through the fault seam's counter. A converted image of the
# same content is created first (-n: into an existing target) so creation is not counted.
count_convert() {
    rm -f n.qcow2
    qemu-img create -q -f qcow2 n.qcow2 96M
    flushes "$CT_IMG" convert -n "$@" -O qcow2 src-top.qcow2 n.qcow2
}
unsafe=$(count_convert -t unsafe)
wb=$(count_convert -t writeback)
[ -n "$unsafe" ] && [ -n "$wb" ] || die "no flush counts reported (COWTREE_FAULT=count)"
[ "$unsafe" -eq 0 ] || die "convert -t unsafe flushed $unsafe times"
[ "$wb" -gt 0 ] || die "convert -t writeback never flushed"
cp src-top.qcow2 io.qcow2
wt=$(flushes "$CT_IO" -t writethrough -c "write 0 4k" -c "write 8k 4k" -c "write 1M 4k" io.qcow2)
cp src-top.qcow2 io.qcow2
wb_io=$(flushes "$CT_IO" -t writeback -c "write 0 4k" -c "write 8k 4k" -c "write 1M 4k" io.qcow2)
# (a flush after each of the 3 writes; the close then finds nothing left to flush)
[ "$wt" -ge 3 ] && [ "$wt" -gt "$wb_io" ] ||
    die "writethrough: $wt flushes for 3 writes, writeback $wb_io"

if command -v strace >/dev/null; then
    # Write-behind: 96 MiB written by the copy, a start every 32 MiB.
    sfr() {
        rm -f n.qcow2
        qemu-img create -q -f qcow2 n.qcow2 96M
        strace -f -c -e trace=sync_file_range -o st.txt "$CT_IMG" convert -n "$@" -O qcow2 \
            src-top.qcow2 n.qcow2
        awk '$NF == "sync_file_range" {print $4}' st.txt
    }
    n=$(sfr -t writeback)
    [ "${n:-0}" -ge 1 ] || die "convert started no writeback while copying 96 MiB"
    n=$(sfr -t unsafe)
    [ "${n:-0}" -eq 0 ] || die "convert -t unsafe started writeback $n times"
    # create: no more fdatasyncs than qemu-img create.
    fds() {
        rm -f cr.qcow2
        strace -f -c -e trace=fdatasync,fsync -o st.txt "$@" >/dev/null
        awk '$NF == "fdatasync" || $NF == "fsync" {n += $4} END {print n + 0}' st.txt
    }
    ours=$(fds "$CT_IMG" create -f qcow2 -b src-base.qcow2 -F qcow2 cr.qcow2)
    qemu_clean cr.qcow2
    theirs=$(fds qemu-img create -f qcow2 -b src-base.qcow2 -F qcow2 cr.qcow2)
    [ "$ours" -ge 1 ] || die "create never flushed"
    [ "$ours" -le "$theirs" ] || die "create: $ours fdatasyncs, qemu-img $theirs"
    echo "create -b: $ours fdatasyncs (qemu-img $theirs)"
else
    echo "strace missing: write-behind and create flush counts not checked"
fi
echo "cache modes: all passed"
