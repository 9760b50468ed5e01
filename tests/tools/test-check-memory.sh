#!/usr/bin/env bash
# cowtree-img check on a 1 TiB image with every cluster allocated (qemu-img create
# -o preallocation=metadata: 2^24 host clusters, sparse file) reports what qemu-img check
# reports, in at most 24 MiB of RSS; and the compact reference counters keep exact counts
# above 255 (an image with 260 internal snapshots), with stored refcounts made too low and
# too high found exactly as qemu-img finds them.
#
# The bound: check keeps one byte per host cluster (16 MiB for 2^24 clusters), one cluster
# of scratch, and the L1/refcount tables (16 KiB and 512 KiB here); cowtree-img's own
# baseline is about 2.5 MiB (docs/benchmarks.md: 2.7 MiB for check on 1 GiB). 24 MiB leaves
# 5 MiB of allocator slack; the former uint32 counters plus filled L2 and refcount caches
# took 106 MiB, qemu-img 40 MiB. Sanitizer builds (shadow memory) skip the bound only.
. "$(dirname "$0")/../lib/common.sh"
requires qemu-img qemu-io python3
[ -x /usr/bin/time ] || skip "needs /usr/bin/time (scripts/deps.sh)"

# Same verdict as qemu-img: exit status and the counts in qemu-img's JSON keys.
same_check() {
    local img=$1 qrc crc
    set +e
    qemu-img check --output=json "$img" >"$T/q.json" 2>/dev/null
    qrc=$?
    "$CT_IMG" check --output=json "$img" >"$T/c.json" 2>/dev/null
    crc=$?
    set -e
    [ "$qrc" -eq "$crc" ] || die "check $img: rc $crc, qemu-img $qrc"
    python3 - "$T/q.json" "$T/c.json" <<'PY' || die "check $img: JSON differs from qemu-img's"
import json, sys
q = json.load(open(sys.argv[1])); c = json.load(open(sys.argv[2]))
bad = {k: (q[k], c.get(k)) for k in q if k != "filename" and c.get(k) != q[k]}
if bad:
    print(bad, file=sys.stderr); sys.exit(1)
PY
}

# A sanitizer runtime (shared with gcc, linked in statically with clang) inflates RSS: there
# only the verdicts are checked. (Captured first: grep -q closing a pipe early would make nm
# die of SIGPIPE, which pipefail turns into a false negative.)
sanitized=false
syms=$( (ldd "$CT_IMG"; nm -D "$CT_IMG") 2>/dev/null || true)
case "$syms" in
*libasan* | *libubsan* | *__asan_* | *__ubsan_*) sanitized=true ;;
esac

cd "$T"
qemu-img create -q -f qcow2 -o preallocation=metadata big.qcow2 1T
same_check big.qcow2
/usr/bin/time -f %M -o rss "$CT_IMG" check big.qcow2 >/dev/null || die "check big.qcow2 failed"
rss=$(tail -1 rss)
echo "check 1 TiB: ${rss} KiB RSS"
if ! $sanitized; then
    [ "$rss" -le $((24 * 1024)) ] || die "check of 1 TiB used ${rss} KiB (bound 24 MiB)"
fi
rm -f big.qcow2
echo "1 TiB ok"

# Counts above 255: 260 snapshots share the data clusters (refcount 261). On tmpfs when there
# is one: each snapshot costs qemu-img several fsyncs.
d=$T
[ -d /dev/shm ] && [ -w /dev/shm ] && d=$(mktemp -d /dev/shm/ct.XXXXXX) && trap 'rm -rf "$T" "$d"' EXIT
cd "$d"
qemu-img create -q -f qcow2 s.qcow2 16M
qemu-io -c 'write -P 7 0 1M' -c 'write -P 8 4M 64k' s.qcow2 >/dev/null
for i in $(seq 1 260); do qemu-img snapshot -c "s$i" s.qcow2; done
qemu-io -c 'write -P 9 4M 64k' s.qcow2 >/dev/null # one cluster copied: refcount 1 again
same_check s.qcow2
# Stored refcounts set wrong by hand: too low (261 -> 3: corruption), too high (1 -> 400:
# leak), and one shared cluster at 300 (leak over a count kept in the overflow table).
python3 - s.qcow2 <<'PY'
import json, struct, subprocess, sys
f = sys.argv[1]
m = json.loads(subprocess.check_output(["qemu-img", "map", "--output=json", f]))
data = [e for e in m if e.get("data") and "offset" in e]
shared, own = data[0]["offset"] >> 16, data[-1]["offset"] >> 16
with open(f, "r+b") as fh:
    hdr = fh.read(104)
    rt_off = struct.unpack(">Q", hdr[48:56])[0]
    order = struct.unpack(">I", hdr[96:100])[0]
    assert order == 4, order
    fh.seek(rt_off)
    rb = struct.unpack(">Q", fh.read(8))[0]
    def setrc(k, v):
        fh.seek(rb + 2 * k)
        fh.write(struct.pack(">H", v))
    setrc(shared, 3)
    setrc(shared + 1, 300)
    setrc(own, 400)
PY
same_check s.qcow2
[ "$(python3 -c 'import json;print(json.load(open("'"$T"'/c.json"))["corruptions"])')" -ge 1 ] ||
    die "the too-low refcount was not reported"
[ "$(python3 -c 'import json;print(json.load(open("'"$T"'/c.json"))["leaks"])')" -ge 2 ] ||
    die "the too-high refcounts were not reported"
echo "counts above 255 ok"
