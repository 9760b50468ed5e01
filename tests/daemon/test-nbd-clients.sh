#!/usr/bin/env bash
# cowtreed serves a qcow2 chain over NBD to real clients: qemu-io and qemu-img through
# nbd+unix URIs, nbdinfo, nbdcopy, fio's nbd engine, several connections at once. Content
# written through NBD lands in the image (qemu-img compare against a twin written with
# qemu-io directly), block status agrees with qemu-img map, and the image checks clean.
. "$(dirname "$0")/../lib/common.sh"
. "$(dirname "$0")/daemon-lib.sh"
requires qemu-img qemu-io nbdinfo nbdcopy python3

qemu-img create -q -f raw "$T/base.raw" 32M
qemu-io -f raw -c 'write -q -P 1 0 8M' -c 'write -q -P 2 20M 1M' "$T/base.raw"
"$CT_IMG" create -q -f qcow2 -b base.raw -F raw "$T/top.qcow2" 64M
"$CT_IO" -c 'write -q -P 3 4M 64k' -c 'write -q -z 6M 1M' "$T/top.qcow2"
cp "$T/top.qcow2" "$T/twin.qcow2"
qemu-img rebase -u -b "$T/base.raw" -F raw "$T/twin.qcow2"

start_daemon --blockdev node-name=vda,file="$T/top.qcow2" \
    --export type=nbd,node-name=vda,name=dom/vda,writable=on
uri=$(nbd_uri dom/vda)

# Negotiation: the export, its size and contexts.
info=$(nbdinfo "$uri")
grep -q 'export-size: 67108864' <<<"$info" || die "nbdinfo size: $info"
grep -q 'base:allocation' <<<"$info" || die "no base:allocation context: $info"
grep -q 'qemu:allocation-depth' <<<"$info" || die "no qemu:allocation-depth context: $info"
grep -q 'can_multi_conn: true' <<<"$info" || die "multi-conn not advertised: $info"
nbdinfo --list "nbd+unix:///?socket=$T/nbd.sock" | grep -q 'export="dom/vda"' || die "LIST"
set +e
nbdinfo "$(nbd_uri nosuch)" >/dev/null 2>&1
[ $? -ne 0 ] || die "an unknown export name was accepted"
set -e

# The same qemu-io script through NBD and directly on the twin.
script=(-c 'read -q -P 1 0 4M' -c 'read -q -P 3 4M 64k' -c 'read -q -P 0 6M 1M'
    -c 'write -q -P 9 100k 3333' -c 'write -q -z 7M 100k' -c 'discard -q 20M 64k'
    -c 'write -q -P 8 63M 1M' -c 'flush' -c 'read -q -P 9 100k 3333')
qemu-io -f raw "${script[@]}" "$uri" || die "qemu-io through NBD failed"
qemu-io "${script[@]}" "$T/twin.qcow2" >/dev/null
qemu-img compare -f raw -F qcow2 "$uri" "$T/twin.qcow2" || die "NBD view differs from the twin"

# Block status: allocation depth and zero/data agree with qemu-img map of the twin.
nbdinfo --map=qemu:allocation-depth "$uri" >"$T/depth.txt"
grep -q 'local' "$T/depth.txt" && grep -q 'backing depth 2' "$T/depth.txt" ||
    die "allocation depth map unexpected: $(cat "$T/depth.txt")"
python3 - "$T" "$uri" <<'PY'
import json, subprocess, sys
t, uri = sys.argv[1], sys.argv[2]
want = json.loads(subprocess.check_output(["qemu-img", "map", "--output=json", f"{t}/twin.qcow2"]))
got = subprocess.check_output(["nbdinfo", "--map", "--json", uri])
got = json.loads(got)
def zero_at(m, off, key_len, key_zero):
    for e in m:
        if e["offset" if "offset" in e and key_len == "length" and "start" not in e else "start"] <= off < e.get("start", e.get("offset")) + e[key_len]:
            return key_zero(e)
    raise SystemExit(f"offset {off} not covered")
for off in range(0, 64 << 20, 1 << 20):
    w = next(e for e in want if e["start"] <= off < e["start"] + e["length"])
    g = next(e for e in got if e["offset"] <= off < e["offset"] + e["length"])
    wz = w["zero"]
    gz = bool(g["type"] & 2)
    if wz != gz:
        raise SystemExit(f"zero status differs at {off}: qemu-img map {w}, nbd {g}")
PY

# nbdcopy out and back in, several connections at once.
nbdcopy --connections=4 "$uri" "$T/copy.raw"
qemu-img compare -f raw -F qcow2 "$T/copy.raw" "$T/twin.qcow2" || die "nbdcopy image differs"
qemu-io -f raw -c 'write -q -P 0x5a 0 16M' "$T/copy.raw"
nbdcopy --connections=4 "$T/copy.raw" "$uri"
qemu-io -f raw -c 'read -q -P 0x5a 0 16M' "$uri" || die "nbdcopy write-back lost data"

# Several clients in parallel on disjoint ranges.
pids=()
for i in 0 1 2 3; do
    qemu-io -f raw -c "write -q -P $((0x40 + i)) $((32 + i * 4))M 4M" "$uri" &
    pids+=($!)
done
for p in "${pids[@]}"; do wait "$p" || die "parallel client failed"; done
for i in 0 1 2 3; do
    qemu-io -f raw -c "read -q -P $((0x40 + i)) $((32 + i * 4))M 4M" "$uri" || die "client $i data"
done

# fio's nbd engine, if available, with a verify pass.
if command -v fio >/dev/null && fio --enghelp 2>/dev/null | grep -qw nbd; then
    fio --name=v --ioengine=nbd --uri="$uri" --rw=randwrite --bs=4k --size=8M --offset=50M \
        --iodepth=16 --verify=crc32c --do_verify=1 --verify_state_save=0 --output="$T/fio.txt" >/dev/null ||
        die "fio failed: $(cat "$T/fio.txt")"
fi

stop_daemon
qemu_clean "$T/top.qcow2"
qemu-io -c 'read -q -P 0x5a 0 16M' -c 'read -q -P 0x43 44M 4M' "$T/top.qcow2" ||
    die "data written over NBD is not in the image after shutdown"
echo "nbd clients ok"
