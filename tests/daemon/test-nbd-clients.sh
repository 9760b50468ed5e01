#!/usr/bin/env bash
# cowtreed serves a qcow2 chain over NBD to real clients: qemu-io and qemu-img through
# nbd+unix URIs, nbdinfo, nbdcopy, fio's nbd engine, several connections at once, a raw
# client with many requests in flight (replies out of order, dropped connections). Content
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

# The protocol engine with many requests in flight on one connection (a raw client):
# pipelined writes, a FLUSH and reads are each answered exactly once, whatever the order;
# 160 MiB of writes sent while replies are read (more than the connection's in-flight memory
# bound: the server stops reading until requests complete); connections dropped with
# requests outstanding leave a daemon that still serves.
python3 - "$T/nbd.sock" dom/vda <<'PY'
import socket, struct, sys, threading
path, name = sys.argv[1], sys.argv[2].encode()
MiB = 1 << 20

def recvall(s, n):
    b = bytearray()
    while len(b) < n:
        k = s.recv(n - len(b))
        if not k:
            raise SystemExit(f"connection closed after {len(b)} of {n} bytes")
        b += k
    return bytes(b)

def connect():
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    assert recvall(s, 18)[:16] == b"NBDMAGICIHAVEOPT"
    s.sendall(struct.pack(">I", 3))
    def opt(o, data=b""):
        s.sendall(struct.pack(">QII", 0x49484156454F5054, o, len(data)) + data)
    def rep():
        _, o, t, n = struct.unpack(">QIII", recvall(s, 20))
        return t, recvall(s, n)
    opt(8)
    assert rep()[0] == 1, "STRUCTURED_REPLY refused"
    opt(7, struct.pack(">I", len(name)) + name + struct.pack(">H", 0))
    while True:
        t, _ = rep()
        if t == 1:
            return s
        assert t == 3, f"GO answered {t:#x}"

def req(s, typ, cookie, off, n, data=b"", flags=0):
    s.sendall(struct.pack(">IHHQQI", 0x25609513, flags, typ, cookie, off, n) + data)

def replies(s, count):
    """cookie -> (error, {offset: data}); each cookie's chunks end with DONE exactly once."""
    got, order = {}, []
    while len(order) < count:
        magic, flags, typ, cookie, n = struct.unpack(">IHHQI", recvall(s, 20))
        assert magic == 0x668E33EF, f"reply magic {magic:#x}"
        body = recvall(s, n)
        assert cookie not in order, f"chunk for cookie {cookie} after its DONE"
        err, data = got.setdefault(cookie, (0, {}))
        if typ == 1:
            data[struct.unpack(">Q", body[:8])[0]] = body[8:]
        elif typ >= 0x8000:
            got[cookie] = (struct.unpack(">I", body[:4])[0], data)
        if flags & 1:
            order.append(cookie)
    return got, order

def check_read(got, cookie, off, n, want):
    err, data = got[cookie]
    assert err == 0, f"read {cookie} failed: {err}"
    buf = bytearray(n)
    for o, d in data.items():
        buf[o - off:o - off + len(d)] = d
    assert bytes(buf) == want, f"read {cookie} at {off} returned wrong data"

# 1. Pipelined writes and a FLUSH, then one big and many small reads in one go.
s = connect()
for i in range(16):
    req(s, 1, 100 + i, 16 * MiB + i * 256 * 1024, 256 * 1024, bytes([0x70 + i]) * 256 * 1024)
req(s, 3, 200, 0, 0)
got, order = replies(s, 17)
assert sorted(order) == [200] + list(range(100, 116)) or sorted(order) == list(range(100, 116)) + [200]
assert all(got[c][0] == 0 for c in order), "a write or the flush failed"
area = b"".join(bytes([0x70 + i]) * 256 * 1024 for i in range(16))
req(s, 0, 300, 16 * MiB, 4 * MiB)
small = [(301 + k, 16 * MiB + (k * 61 % 1024) * 4096) for k in range(64)]
for c, off in small:
    req(s, 0, c, off, 4096)
got, order = replies(s, 65)
check_read(got, 300, 16 * MiB, 4 * MiB, area)
for c, off in small:
    check_read(got, c, off, 4096, area[off - 16 * MiB:off - 16 * MiB + 4096])
print(f"pipelined: {sum(1 for i, c in enumerate(order) if c != 300 + i)} of 65 replies not where request order puts them")

# 2. 160 MiB of 2 MiB writes while another thread reads the replies.
done = {}
t = threading.Thread(target=lambda: done.update(replies(s, 81)[0]))
t.start()
for k in range(80):
    j = k % 4
    req(s, 1, 1000 + k, 24 * MiB + j * 2 * MiB, 2 * MiB, bytes([0x60 + j]) * 2 * MiB)
req(s, 3, 2000, 0, 0)
t.join()
assert len(done) == 81 and all(e == 0 for e, _ in done.values()), "a write or the flush failed"
req(s, 2, 0, 0, 0)  # DISC
s.close()

# 3. Disconnects with reads and writes outstanding (same data as above, so nothing changes);
#    what is sent fits in the socket buffer, so the client never waits for the server.
for rnd in range(4):
    s = connect()
    for k in range(8):
        req(s, 0, k, 24 * MiB + (k % 4) * 2 * MiB, 2 * MiB)
        req(s, 1, 100 + k, 24 * MiB + (k % 4) * 2 * MiB + 4096 * k, 4096,
            bytes([0x60 + k % 4]) * 4096)
    req(s, 3, 200, 0, 0)
    if rnd % 2:
        s.shutdown(socket.SHUT_WR)  # half-closed: the replies can still be read
        got, _ = replies(s, 17)
        assert all(e == 0 for e, _ in got.values()), "a request failed"
    s.close()
s = connect()
req(s, 0, 1, 24 * MiB, 8 * MiB)
got, _ = replies(s, 1)
check_read(got, 1, 24 * MiB, 8 * MiB, b"".join(bytes([0x60 + j]) * 2 * MiB for j in range(4)))
s.close()
PY
nbdinfo "$uri" >/dev/null || die "daemon no longer serves after dropped connections"

# fio's nbd engine, if available, with a verify pass.
if command -v fio >/dev/null && fio --enghelp 2>/dev/null | grep -qw nbd; then
    fio --name=v --ioengine=nbd --uri="$uri" --rw=randwrite --bs=4k --size=8M --offset=50M \
        --iodepth=16 --verify=crc32c --do_verify=1 --verify_state_save=0 --output="$T/fio.txt" >/dev/null ||
        die "fio failed: $(cat "$T/fio.txt")"
fi

stop_daemon
qemu_clean "$T/top.qcow2"
qemu-io -c 'read -q -P 0x5a 0 16M' -c 'read -q -P 0x43 44M 4M' -c 'read -q -P 0x70 16M 256k' \
    -c 'read -q -P 0x7f 20224k 256k' -c 'read -q -P 0x60 24M 2M' -c 'read -q -P 0x63 30M 2M' \
    "$T/top.qcow2" ||
    die "data written over NBD is not in the image after shutdown"
echo "nbd clients ok"
