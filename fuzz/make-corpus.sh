#!/usr/bin/env bash
# Regenerate the fuzzing seed corpora:
#   tests/fuzz/corpus-open/   small qcow2 images made by qemu-img/qemu-io (each < 300 KiB)
#   tests/fuzz/corpus-write/  operation scripts for fuzz-write (fuzz/make-write-seeds.py)
#   tests/fuzz/corpus-{nbd,qmp,xml}/  client streams, QMP sessions, libvirt XML documents for
#                             fuzz-nbd, fuzz-qmp, fuzz-xml (fuzz/make-proto-seeds.py)
#
# usage: fuzz/make-corpus.sh [TOP]     (needs qemu-img, qemu-io, python3)
# Images hold fixed patterns; qemu-img stamps snapshot dates, so a rerun changes a few bytes of
# the snapshot images and nothing else.
set -euo pipefail
top=${1:-$(cd "$(dirname "$0")/.." && pwd)}
out="$top/tests/fuzz/corpus-open"
for c in qemu-img qemu-io python3; do
    command -v "$c" >/dev/null || { echo "make-corpus.sh: needs $c" >&2; exit 1; }
done
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$out"
rm -f "$out"/*.qcow2

q() { qemu-img "$@" >/dev/null; }
io() { local f=$1; shift; local a=(); for c in "$@"; do a+=(-c "$c"); done; qemu-io -f qcow2 "${a[@]}" "$f" >/dev/null; }
keep() { # keep NAME FILE: copy into the corpus, refusing anything too big
    local sz; sz=$(stat -c %s "$2")
    if [ "$sz" -ge $((300 * 1024)) ]; then
        echo "make-corpus.sh: $1 is $sz bytes (limit 300 KiB)" >&2; exit 1
    fi
    cp "$2" "$out/$1.qcow2"
}

# compat=0.10 (v2), 4 KiB clusters, data at both ends.
f=$tmp/v2.qcow2
q create -f qcow2 -o compat=0.10,cluster_size=4096 "$f" 1M
io "$f" "write -P 0xa1 0 12k" "write -P 0xa2 1020k 4k" "write -P 0xa3 300k 5k"
keep v2-4k "$f"

# compat=1.1 (v3), 64 KiB clusters (the default), empty.
f=$tmp/v3-64k.qcow2
q create -f qcow2 "$f" 64M
keep v3-64k-empty "$f"

# v3, 4 KiB clusters: data, zero clusters, a discard, a partial cluster.
f=$tmp/v3.qcow2
q create -f qcow2 -o cluster_size=4096 "$f" 4M
io "$f" "write -P 0x11 0 16k" "write -z 16k 8k" "write -P 0x22 64k 4k" "discard 64k 4k" \
    "write -P 0x33 2M 6k" "write -P 0x44 4092k 4k"
keep v3-4k "$f"

# 512-byte clusters: many L2 tables (each maps 32 KiB), virtual size not cluster-aligned.
f=$tmp/c512.qcow2
q create -f qcow2 -o cluster_size=512 "$f" 1000000
io "$f" "write -P 0x55 0 2k" "write -P 0x56 40k 1k" "write -P 0x57 500000 3000" \
    "write -z 70000 4096" "write -P 0x58 999000 1000"
keep c512 "$f"

# 512-byte clusters, compat=0.10.
f=$tmp/c512v2.qcow2
q create -f qcow2 -o cluster_size=512,compat=0.10 "$f" 256k
io "$f" "write -P 0x59 0 1536" "write -P 0x5a 100k 2k"
keep c512-v2 "$f"

# Extended L2 entries (subclusters), 16 KiB clusters: partial subcluster writes and zeroes.
f=$tmp/extl2.qcow2
q create -f qcow2 -o cluster_size=16384,extended_l2=on "$f" 2M
io "$f" "write -P 0x61 0 512" "write -P 0x62 1536 1024" "write -z 4096 1024" \
    "write -P 0x63 64k 16k" "write -z 128k 16k" "write -P 0x64 200k 3k"
keep extl2-16k "$f"

# Extended L2 with a backing file: unallocated subclusters read from it.
b=$tmp/extl2-base.raw
f=$tmp/extl2b.qcow2
q create -f raw "$b" 256k
qemu-io -f raw -c "write -P 0x70 0 256k" "$b" >/dev/null
q create -f qcow2 -o cluster_size=32768,extended_l2=on -b extl2-base.raw -F raw "$f" 256k
io "$f" "write -P 0x71 1024 1024" "write -z 40k 2k"
keep extl2-backing "$f"

# Compressed clusters (zlib and zstd) through qemu-img convert -c.
r=$tmp/data.raw
python3 - "$r" <<'EOF'
import sys
with open(sys.argv[1], "wb") as f:
    for i in range(48):
        f.write((("cluster %d " % i) * 400).encode()[:4096])
    f.write(bytes(4096 * 8))
    f.write(bytes(range(256)) * 64)
EOF
f=$tmp/comp.qcow2
q convert -c -f raw -O qcow2 -o cluster_size=4096 "$r" "$f"
keep compressed-zlib "$f"
f=$tmp/compz.qcow2
q convert -c -f raw -O qcow2 -o cluster_size=4096,compression_type=zstd "$r" "$f"
keep compressed-zstd "$f"
f=$tmp/comp32.qcow2
q convert -c -f raw -O qcow2 -o cluster_size=32768 "$r" "$f"
keep compressed-32k "$f"

# Internal snapshots: L2 tables and data shared between the active state and a snapshot.
f=$tmp/snap.qcow2
q create -f qcow2 -o cluster_size=4096 "$f" 1M
io "$f" "write -P 0x81 0 20k"
q snapshot -c snap1 "$f"
io "$f" "write -P 0x82 4k 4k" "write -P 0x83 600k 4k"
q snapshot -c snap2 "$f"
io "$f" "discard 0 4k"
keep snapshots "$f"

# Backing file name (and format) in the header.
b=$tmp/base.qcow2
f=$tmp/overlay.qcow2
q create -f qcow2 -o cluster_size=4096 "$b" 1M
io "$b" "write -P 0x91 0 64k"
q create -f qcow2 -o cluster_size=4096 -b base.qcow2 -F qcow2 "$f" 2M
io "$f" "write -P 0x92 4k 2k" "write -P 0x93 1500k 4k" "write -z 32k 8k"
keep backing "$f"
# compat=0.10 overlay with a backing file (name right after the 72-byte header).
f=$tmp/overlay-v2.qcow2
q create -f qcow2 -o compat=0.10,cluster_size=4096 -b base.qcow2 -F qcow2 "$f" 1M
io "$f" "write -P 0x94 8k 4k"
keep backing-v2 "$f"

# Refcount widths 1 and 64.
f=$tmp/rc1.qcow2
q create -f qcow2 -o cluster_size=4096,refcount_bits=1 "$f" 1M
io "$f" "write -P 0xa5 0 8k" "write -P 0xa6 512k 4k"
keep refcount1 "$f"
f=$tmp/rc64.qcow2
q create -f qcow2 -o cluster_size=4096,refcount_bits=64 "$f" 1M
io "$f" "write -P 0xa7 0 8k" "write -P 0xa8 768k 4k"
keep refcount64 "$f"

# Dirty image (lazy refcounts, writer aborted): a read-write open must repair it.
f=$tmp/dirty.qcow2
q create -f qcow2 -o cluster_size=4096,lazy_refcounts=on "$f" 1M
io "$f" "write -P 0xb1 0 4k" "write -P 0xb2 256k 8k" "abort" 2>/dev/null || true
keep dirty-lazy "$f"

# Persistent dirty bitmap (bitmaps extension, bitmap directory and tables).
f=$tmp/bitmap.qcow2
q create -f qcow2 -o cluster_size=4096 "$f" 1M
io "$f" "write -P 0xc1 0 4k"
if qemu-img bitmap --add "$f" bm0 >/dev/null 2>&1; then
    io "$f" "write -P 0xc2 128k 4k"
    keep bitmap "$f"
fi

# Large sparse virtual size with small clusters (a big L1 table).
f=$tmp/big.qcow2
q create -f qcow2 -o cluster_size=2048 "$f" 8G
io "$f" "write -P 0xd1 0 2k" "write -P 0xd2 4G 2k" "write -P 0xd3 8191M 2k"
keep sparse-8g "$f"

ls -l "$out"

# Operation scripts for fuzz-write.
wout="$top/tests/fuzz/corpus-write"
mkdir -p "$wout"
rm -f "$wout"/seed-*
python3 "$top/fuzz/make-write-seeds.py" "$wout"
echo "$(ls "$wout" | wc -l) fuzz-write seeds in $wout"

# Client streams, QMP sessions and libvirt documents for fuzz-nbd, fuzz-qmp and fuzz-xml.
python3 "$top/fuzz/make-proto-seeds.py" "$top"
for t in nbd qmp xml; do
    echo "$(ls "$top/tests/fuzz/corpus-$t" | wc -l) fuzz-$t seeds in $top/tests/fuzz/corpus-$t"
done
