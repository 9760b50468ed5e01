#!/usr/bin/env python3
"""Seed inputs for fuzz-write: creation headers x operation scripts, in the target's bytecode.

usage: make-write-seeds.py OUTDIR

Bytecode (see the top of fuzz/fuzz-write.c):
  header, 8 bytes:
    h0: bit0 compat=0.10, bit1 extended_l2, bit2 lazy_refcounts, bit3 zstd,
        bits4-5 backing (0/1 none, 2 raw, 3 qcow2), bit6 preallocate, bit7 tiny caches
    h1: bits0-2 cluster_bits-9, bits3-4 prealloc mode, bit6 create -u, bit7 writethrough
    h2: refcount order = h2 % 7 (bits = 1 << order), bits3-5 backing qcow2 cluster_bits-9
    h3-h5: virtual size (h3 bits6-7 select the encoding), h6-h7: backing size and stripes
  then operations: opcode byte = kind | offset_mode << 4 | length_mode << 6, then arguments.
"""
import os
import struct
import sys

WRITE, WRITE_FUA, ZERO, ZERO_UNMAP, DISCARD, FLUSH, TRUNCATE, REOPEN, CRASH, READ, CHECK, FAULT, \
    WRITE_ZBUF, EXT = 0, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15
# Extended operations (EXT, then a selector byte and a 32-bit argument).
X_COMPRESSED, X_COMPRESSED_NOISE, X_SNAP_CREATE, X_SNAP_APPLY, X_SNAP_DELETE, X_SNAP_DIFF, \
    X_COMPACT, X_AMEND = range(8)


def header(cbits=16, v2=False, ext=False, lazy=False, zstd=False, backing=0, prealloc=0,
           tiny=False, rorder=4, size=1 << 20, wt=False, base=(0x3, 0xff)):
    h0 = (1 if v2 else 0) | (2 if ext else 0) | (4 if lazy else 0) | (8 if zstd else 0)
    h0 |= {0: 0, 1: 2, 2: 3}[backing] << 4
    h0 |= (0x40 if prealloc else 0) | (0x80 if tiny else 0)
    h1 = (cbits - 9) | (((prealloc - 1) % 3 if prealloc else 0) << 3) | (0x80 if wt else 0)
    # The target reads the refcount order as h2 % 7 and the backing cluster bits as bits 3-5.
    h2 = 3 << 3 | (rorder - 3) % 7
    if size < (4 << 20):
        h3, h4, h5 = (size >> 16) & 63, (size >> 8) & 255, size & 255
    else:
        units = size >> 18
        h3, h4, h5 = 0x80 | ((units >> 8) & 63), units & 255, 0
    return bytes([h0, h1, h2, h3, h4, h5, base[0], base[1]])


def rw(kind, off, length, om=0, lm=0):
    """An operation with an offset and a length. om 0: off is a byte offset (mod size);
    om 1: off is a cluster index. lm 0: length-1 mod 8192; lm 1: clusters-1; lm 3: len>>7."""
    b = bytes([kind | om << 4 | lm << 6])
    if om == 0:
        b += struct.pack(">IB", (off >> 8) & 0xffffffff, off & 0xff)
    else:
        b += struct.pack(">I", off)
    if lm == 0:
        b += struct.pack(">H", (length - 1) % 8192)
    elif lm == 1:
        b += struct.pack(">H", length - 1)
    else:
        b += struct.pack(">H", length >> 7)
    return b


def simple(kind, om=0):
    return bytes([kind | om << 4])


def truncate(mode, v):
    return bytes([TRUNCATE]) + struct.pack(">BI", mode, v)


def fault(k, which=0):
    return bytes([FAULT, k - 1, which])


def ext(what, arg=0, sel=0):
    """what: X_*; for X_AMEND sel 0 = compat 0.10, 1 = compat 1.1, 2 = toggle lazy refcounts,
    3 = make empty. X_SNAP_CREATE: arg & 3 != 0 saves (arg >> 2) % 70000 bytes of VM state;
    apply/delete/diff pick snapshots by arg modulo their count."""
    return bytes([EXT, what | sel << 3]) + struct.pack(">I", arg)


def script_basic():
    return (rw(WRITE, 0, 4096) + rw(WRITE, 5000, 3000) + rw(WRITE, 1, 2, om=1, lm=1) +
            rw(READ, 0, 8192) + simple(FLUSH) + rw(ZERO, 2048, 6000) +
            rw(DISCARD, 1, 1, om=1, lm=1) + simple(CHECK) + rw(WRITE_FUA, 70000, 100) +
            simple(REOPEN) + rw(READ, 0, 8000) + rw(ZERO_UNMAP, 0, 2, om=1, lm=1) +
            simple(CRASH) + rw(WRITE, 1 << 19, 9000))


def script_resize():
    return (rw(WRITE, 0, 1, om=1, lm=1) + rw(WRITE, 900000, 8000) + truncate(1, 5000) +
            rw(WRITE, 3, 1, om=1, lm=1) + truncate(0, 70000) + simple(CRASH) +
            truncate(4, 300000) + rw(READ, 290000, 8000) + simple(CHECK) + truncate(4, 2000000) +
            rw(WRITE, 1999000, 1000) + simple(REOPEN))


def script_fault(k, which):
    return (rw(WRITE, 0, 4096) + simple(FLUSH) + fault(k, which) + rw(WRITE, 200000, 5000) +
            rw(WRITE, 0, 3, om=1, lm=1) + rw(ZERO, 100000, 8000) + simple(FLUSH) +
            rw(DISCARD, 0, 1, om=1, lm=1) + rw(WRITE, 600000, 2000))


def script_many():
    s = b""
    for i in range(40):
        s += rw(WRITE, (i * 7919 * 512) % (1 << 20), 700)
    return s + simple(CHECK) + simple(CRASH) + simple(FLUSH) + simple(CRASH)


def script_crash():
    return (rw(WRITE, 0, 8192) + simple(CRASH) + rw(WRITE, 4096, 100) + rw(DISCARD, 0, 8192) +
            simple(CRASH) + simple(FLUSH) + rw(WRITE, 12000, 5000) + simple(CRASH))


def script_snapshots():
    return (rw(WRITE, 0, 8192) + rw(WRITE, 3, 2, om=1, lm=1) + ext(X_SNAP_CREATE, 1 | 4000 << 2) +
            rw(WRITE, 4096, 100) + rw(DISCARD, 3, 1, om=1, lm=1) + ext(X_SNAP_DIFF, 0) +
            ext(X_SNAP_CREATE, 0) + rw(ZERO, 0, 3000) + ext(X_SNAP_DIFF, 1 | 1 << 8) +
            simple(CRASH) + ext(X_SNAP_APPLY, 0) + rw(READ, 0, 8192) + rw(WRITE, 100, 5000) +
            ext(X_SNAP_DELETE, 1) + simple(CHECK) + ext(X_COMPACT) + truncate(0, 70000) +
            simple(REOPEN) + ext(X_SNAP_DIFF, 0))


def script_compressed():
    return (ext(X_COMPRESSED, 0) + ext(X_COMPRESSED, 1) + ext(X_COMPRESSED_NOISE, 2) +
            rw(READ, 0, 8192) + rw(WRITE, 100, 50) + ext(X_COMPRESSED, 5) + rw(ZERO, 1, 1, om=1,
                                                                               lm=1) +
            rw(DISCARD, 0, 1, om=1, lm=1) + simple(CRASH) + ext(X_COMPRESSED, 0) + simple(CHECK) +
            ext(X_COMPACT) + simple(REOPEN) + rw(READ, 0, 40000))


def script_amend():
    return (rw(WRITE, 0, 4096) + rw(ZERO, 1, 2, om=1, lm=1) + ext(X_AMEND, 0, 0) +
            rw(WRITE, 8000, 100) + simple(CHECK) + ext(X_AMEND, 0, 2) + ext(X_AMEND, 0, 1) +
            rw(DISCARD, 0, 1, om=1, lm=1) + simple(CRASH) + ext(X_AMEND, 0, 3) + rw(READ, 0, 8192) +
            rw(WRITE, 2, 1, om=1, lm=1) + ext(X_COMPACT) + simple(REOPEN))


def main():
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    headers = {
        "v3-64k": header(),
        "v3-4k": header(cbits=12),
        "v3-512": header(cbits=9),
        "v2-4k": header(cbits=12, v2=True),
        "v2-512": header(cbits=9, v2=True),
        "extl2-16k": header(cbits=14, ext=True),
        "extl2-64k": header(cbits=16, ext=True),
        "rc1-4k": header(cbits=12, rorder=0),
        "rc64-1k": header(cbits=10, rorder=6),
        "rc8-512": header(cbits=9, rorder=3),
        "tiny-cache-512": header(cbits=9, tiny=True),
        "raw-backing-4k": header(cbits=12, backing=1),
        "qcow2-backing-4k": header(cbits=12, backing=2, base=(0x37, 0xa5)),
        "extl2-backing-16k": header(cbits=14, ext=True, backing=1, base=(0x0f, 0x3c)),
        "prealloc-full-4k": header(cbits=12, prealloc=3, size=300000),
        "prealloc-falloc-4k": header(cbits=12, prealloc=2, size=300000),
        "big-64k": header(size=3 << 30),
        "big-512": header(cbits=9, size=1 << 30),
        "writethrough-2k": header(cbits=11, wt=True),
        "zstd-lazy-8k": header(cbits=13, zstd=True, lazy=True),
    }
    scripts = {
        "basic": script_basic(),
        "resize": script_resize(),
        "fault-w": script_fault(3, 0),
        "fault-f": script_fault(2, 1),
        "fault-any": script_fault(9, 2),
        "many": script_many(),
        "crash": script_crash(),
        "snapshots": script_snapshots(),
        "compressed": script_compressed(),
        "amend": script_amend(),
    }
    n = 0
    for hn, h in headers.items():
        for sn, s in scripts.items():
            # Keep the set small: every header with "basic", the rest on a few headers.
            if sn != "basic" and hn not in ("v3-4k", "v2-512", "extl2-16k", "rc1-4k",
                                            "qcow2-backing-4k", "tiny-cache-512", "big-512"):
                continue
            with open(os.path.join(out, "seed-%s-%s" % (hn, sn)), "wb") as f:
                f.write(h + s)
            n += 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
