#!/usr/bin/env bash
# Data written through cowtreed by many requests in flight on several connections is exactly
# what was acknowledged: fio's nbd engine writes random blocks (4k-64k, 4 jobs = 4 NBD
# connections, iodepth 16, a FLUSH every 32 writes) with crc32c verify headers and reads them
# back through cowtreed; then, cowtreed stopped, the same job file in verify-only mode reads
# the image through qemu-nbd (QEMU's qcow2 code as the oracle), qemu-img check finds it clean,
# and qemu-img compare finds cowtreed's view of the image equal to QEMU's.
. "$(dirname "$0")/../lib/common.sh"
. "$(dirname "$0")/daemon-lib.sh"
requires qemu-img qemu-io qemu-nbd fio python3
fio --enghelp 2>/dev/null | grep -qw nbd || skip "fio has no nbd engine"

DAEMON_PID=
QNBD_PID=
cleanup() {
    [ -z "$DAEMON_PID" ] || kill "$DAEMON_PID" 2>/dev/null || true
    [ -z "$QNBD_PID" ] || kill "$QNBD_PID" 2>/dev/null || true
    rm -rf "$T"
}
trap cleanup EXIT

# The job: every job writes its own 16 MiB (verify needs one writer per block), each block
# once (fio's random map), with fixed seeds so that the verify-only pass regenerates the same
# blocks.
cat >"$T/job.fio" <<'EOF'
[global]
ioengine=nbd
uri=${NBD_URI}
rw=randwrite
bssplit=4k/50:16k/30:64k/20
iodepth=16
size=16M
offset_increment=16M
numjobs=4
randrepeat=1
randseed=4242
verify=crc32c
verify_fatal=1
verify_state_save=0
do_verify=1
fsync=32
[w]
EOF

# run_fio NAME URI [fio options]: the job above against URI; fails on any fio error.
run_fio() {
    local name=$1 uri=$2
    shift 2
    (cd "$T" && NBD_URI="$uri" fio "$T/job.fio" --output="$T/fio-$name.txt" "$@") ||
        die "fio ($name) failed: $(grep -iE 'err=|verify|fail' "$T/fio-$name.txt" | head -5)"
    grep -q 'err= 0' "$T/fio-$name.txt" || die "fio ($name) reported errors: $(cat "$T/fio-$name.txt")"
    ! grep -qE 'err= *[1-9]|verify: bad' "$T/fio-$name.txt" || die "fio ($name) errors: $(cat "$T/fio-$name.txt")"
}

# check_image NAME IMAGE FORMAT: the oracle passes once cowtreed is gone.
check_image() {
    local name=$1 img=$2 fmt=$3
    rm -f "$T/qnbd.sock" "$T/qnbd.pid"
    qemu-nbd -t -k "$T/qnbd.sock" -x d -f "$fmt" --shared=8 --pid-file "$T/qnbd.pid" \
        "$img" >"$T/qnbd.log" 2>&1 &
    QNBD_PID=$!
    while [ ! -S "$T/qnbd.sock" ] || [ ! -s "$T/qnbd.pid" ]; do
        kill -0 "$QNBD_PID" 2>/dev/null || die "qemu-nbd failed: $(cat "$T/qnbd.log")"
        sleep 0.05
    done
    run_fio "$name-oracle" "nbd+unix:///d?socket=$T/qnbd.sock" --verify_only=1
    kill "$QNBD_PID"
    wait "$QNBD_PID" 2>/dev/null || true
    QNBD_PID=
    [ "$fmt" != qcow2 ] || qemu_clean "$img"
}

# 1. A fresh qcow2 image (64 KiB clusters): every write allocates or fills a cluster.
qemu-img create -q -f qcow2 "$T/a.qcow2" 64M
# 2. An overlay with 16 KiB clusters over a raw base full of data: partial-cluster writes copy
#    from the backing file while other requests read and write next to them.
qemu-img create -q -f raw "$T/base.raw" 64M
qemu-io -f raw -c 'write -q -P 0x33 0 64M' "$T/base.raw"
qemu-img create -q -f qcow2 -o cluster_size=16k -b base.raw -F raw "$T/b.qcow2"

start_daemon --blockdev node-name=a,file="$T/a.qcow2" \
    --export type=nbd,node-name=a,name=a,writable=on \
    --blockdev node-name=b,file="$T/b.qcow2" \
    --export type=nbd,node-name=b,name=b,writable=on
# Both exports at once: eight connections, two nodes.
run_fio a "$(nbd_uri a)" &
fa=$!
run_fio b "$(nbd_uri b)" &
fb=$!
wait "$fa" || die "fio on export a failed"
wait "$fb" || die "fio on export b failed"
# The same blocks read again through cowtreed by a second set of connections.
run_fio a-reread "$(nbd_uri a)" --verify_only=1
# cowtreed's view equals QEMU's view of the same files (the chain included), once an NBD
# FLUSH has put cowtreed's metadata on disk (-U: cowtreed holds the image's write lock).
qemu-io -f raw -c flush "$(nbd_uri b)" || die "NBD flush failed"
qemu-img compare -U -f raw -F qcow2 "$(nbd_uri b)" "$T/b.qcow2" >/dev/null ||
    die "cowtreed's view of b differs from qemu-img's"
stop_daemon
DAEMON_PID=

check_image a "$T/a.qcow2" qcow2
check_image b "$T/b.qcow2" qcow2
echo "fio verify ok"
