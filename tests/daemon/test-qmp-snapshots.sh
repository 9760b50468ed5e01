#!/usr/bin/env bash
# Live snapshots through QMP while the disks are exported: an atomic external snapshot of two
# disks in one transaction (exports follow the new overlays), a transaction rolled back by an
# abort action (nothing created, nothing switched), internal snapshots created and deleted,
# QMP error classes for bad input; afterwards every image checks clean and each layer holds
# exactly the bytes written before/after the snapshot.
. "$(dirname "$0")/../lib/common.sh"
. "$(dirname "$0")/daemon-lib.sh"
requires qemu-img qemu-io python3

qmp() { python3 "$COWTREE_TOP/tests/daemon/qmp.py" "$T/qmp.sock" "$@"; }
expect_return() { local out; out=$(qmp "$1"); grep -q '"return"' <<<"$out" || die "QMP $1 -> $out"; }
expect_error() { # expect_error CLASS CMD
    local out; out=$(qmp "$2"); grep -q "\"class\": \"$1\"" <<<"$out" || die "QMP $2: want $1, got $out"
}

for d in vda vdb; do
    "$CT_IMG" create -q -f qcow2 "$T/$d.qcow2" 32M
done
start_daemon --blockdev node-name=vda,file="$T/vda.qcow2" --blockdev node-name=vdb,file="$T/vdb.qcow2" \
    --export type=nbd,node-name=vda,name=vda,writable=on --export type=nbd,node-name=vdb,name=vdb,writable=on
qemu-io -f raw -c 'write -q -P 0x11 0 4M' "$(nbd_uri vda)"
qemu-io -f raw -c 'write -q -P 0x21 0 4M' "$(nbd_uri vdb)"

# Atomic external snapshot of both disks.
expect_return '{"execute":"transaction","arguments":{"actions":[
  {"type":"blockdev-snapshot-sync","data":{"device":"vda","snapshot-file":"'"$T"'/vda.s1","format":"qcow2"}},
  {"type":"blockdev-snapshot-sync","data":{"device":"vdb","snapshot-file":"'"$T"'/vdb.s1","format":"qcow2"}}]}}'
qmp '{"execute":"query-block"}' | grep -q "$T/vda.s1" || die "vda did not switch to its overlay"
qmp '{"execute":"query-block"}' | grep -q "$T/vdb.s1" || die "vdb did not switch to its overlay"
qemu-io -f raw -c 'write -q -P 0x12 1M 1M' "$(nbd_uri vda)"
qemu-io -f raw -c 'write -q -P 0x22 2M 1M' "$(nbd_uri vdb)"

# A transaction with an abort action changes nothing.
expect_error GenericError '{"execute":"transaction","arguments":{"actions":[
  {"type":"blockdev-snapshot-sync","data":{"device":"vda","snapshot-file":"'"$T"'/vda.s2"}},
  {"type":"abort","data":{}}]}}'
[ ! -e "$T/vda.s2" ] || die "aborted transaction left $T/vda.s2 behind"
qmp '{"execute":"query-block"}' | grep -q "$T/vda.s1" || die "aborted transaction moved vda"
qemu-io -f raw -c 'read -q -P 0x12 1M 1M' "$(nbd_uri vda)" || die "vda lost data after the abort"

# A transaction whose second action fails rolls the first one back.
expect_error DeviceNotFound '{"execute":"transaction","arguments":{"actions":[
  {"type":"blockdev-snapshot-sync","data":{"device":"vda","snapshot-file":"'"$T"'/vda.s3"}},
  {"type":"blockdev-snapshot-sync","data":{"device":"nosuch","snapshot-file":"'"$T"'/x.s3"}}]}}'
[ ! -e "$T/vda.s3" ] || die "failed transaction left $T/vda.s3 behind"

# Internal snapshots on the active overlay, with QEMU's errors for bad names.
expect_return '{"execute":"blockdev-snapshot-internal-sync","arguments":{"device":"vda","name":"i1"}}'
expect_error GenericError '{"execute":"blockdev-snapshot-internal-sync","arguments":{"device":"vda","name":"i1"}}'
expect_error GenericError '{"execute":"blockdev-snapshot-internal-sync","arguments":{"device":"vda","name":""}}'
expect_error DeviceNotFound '{"execute":"blockdev-snapshot-internal-sync","arguments":{"device":"nope","name":"x"}}'
qemu-io -f raw -c 'write -q -P 0x13 1M 64k' "$(nbd_uri vda)"
out=$(qmp '{"execute":"blockdev-snapshot-delete-internal-sync","arguments":{"device":"vda","name":"i1"}}')
grep -q '"name": "i1"' <<<"$out" || die "delete-internal did not return the SnapshotInfo: $out"
expect_error CommandNotFound '{"execute":"no-such-command"}'
expect_error GenericError '{"execute":"blockdev-snapshot-sync","arguments":{"device":"vda"}}'

stop_daemon
for f in vda.qcow2 vdb.qcow2 vda.s1 vdb.s1; do qemu_clean "$T/$f"; done
# The snapshot layers hold the state at snapshot time; the overlays hold the rest.
qemu-io -c 'read -q -P 0x11 0 4M' "$T/vda.qcow2" || die "vda base changed"
qemu-io -c 'read -q -P 0x21 0 4M' "$T/vdb.qcow2" || die "vdb base changed"
qemu-io -c 'read -q -P 0x11 0 1M' -c 'read -q -P 0x13 1M 64k' -c 'read -q -P 0x12 1088k 960k' \
    -c 'read -q -P 0x11 2M 2M' "$T/vda.s1" || die "vda overlay content"
qemu-io -c 'read -q -P 0x21 0 2M' -c 'read -q -P 0x22 2M 1M' "$T/vdb.s1" || die "vdb overlay content"
echo "qmp snapshots ok"
