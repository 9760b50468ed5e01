#!/usr/bin/env python3
"""Generate a corpus of malformed qcow2 images (and a few broken raw/chain setups).

usage:
  gen.py OUTDIR               build the corpus: OUTDIR/<case>/img.qcow2 (+ helper files),
                              OUTDIR/manifest.tsv (read by test-malformed.sh), OUTDIR/cases.json
  gen.py --list               print the cases (name, base, ops, keywords, description)
  gen.py --qemu-check OUTDIR  build the corpus, then run qemu-img/qemu-io 7.2 on a copy of every
                              case and compare with what the case records about QEMU. This
                              proves each patch hit the bytes it meant to hit.

Every case starts from a small valid image made by qemu-img/qemu-io and is then byte-patched
here (struct, big-endian). A case says, per operation, what cowtree must do:
  fail  exit status non-zero (for `check`: 1, 2 or 63 -- "leaks only" (3) is not enough),
        one `cowtree-img: FILE: msg` / `cowtree-io: msg` line on stderr (a check that
        reports corruption, rc 2, may print its report instead), and the message matches
        every keyword regex of the case (case-insensitive).
  any   may succeed; if it fails, the failure must look like a `fail` (shape + keywords).
  ok    must succeed.
In all cases: no signal, no timeout, and no file of the case directory may change.

Operations (commands are built by test-malformed.sh):
  info        cowtree-img info -f FMT IMG
  info-chain  cowtree-img info -f FMT --backing-chain IMG
  check       cowtree-img check -f FMT IMG
  read        cowtree-io -f FMT -c 'read 0 64k' IMG      (read-write open, as qemu-io)
  read-ro     cowtree-io -f FMT -r -c 'read 0 64k' IMG
  write       cowtree-io -f FMT -c 'write 0 4k' IMG
"""

import argparse
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile

QEMU_IMG = os.environ.get("QEMU_IMG", "qemu-img")
QEMU_IO = os.environ.get("QEMU_IO", "qemu-io")

TIB = 1 << 40
COPIED = 1 << 63
COMPRESSED = 1 << 62
OFF_MASK = 0x00FFFFFFFFFFFE00

EXT_END = 0x00000000
EXT_BACKING_FMT = 0xE2792ACA
EXT_FEATURES = 0x6803F857
EXT_CRYPTO = 0x0537BE77
EXT_DATA_FILE = 0x44415441

# name -> (offset, struct format)
FIELDS = {
    "magic": (0, ">I"),
    "version": (4, ">I"),
    "backing_file_offset": (8, ">Q"),
    "backing_file_size": (16, ">I"),
    "cluster_bits": (20, ">I"),
    "size": (24, ">Q"),
    "crypt_method": (32, ">I"),
    "l1_size": (36, ">I"),
    "l1_table_offset": (40, ">Q"),
    "refcount_table_offset": (48, ">Q"),
    "refcount_table_clusters": (56, ">I"),
    "nb_snapshots": (60, ">I"),
    "snapshots_offset": (64, ">Q"),
    "incompatible_features": (72, ">Q"),
    "compatible_features": (80, ">Q"),
    "autoclear_features": (88, ">Q"),
    "refcount_order": (96, ">I"),
    "header_length": (100, ">I"),
    "compression_type": (104, ">B"),
}


def run(*cmd, cwd=None):
    subprocess.run(cmd, cwd=cwd, check=True, stdout=subprocess.DEVNULL)


# --------------------------------------------------------------------------------------------
# Byte-level view of one qcow2 file


class Q:
    def __init__(self, path):
        self.path = path
        with open(path, "rb") as f:
            self.d = bytearray(f.read())

    def save(self):
        with open(self.path, "wb") as f:
            f.write(self.d)

    # raw integers
    def u64(self, off):
        return struct.unpack_from(">Q", self.d, off)[0]

    def put64(self, off, v):
        struct.pack_into(">Q", self.d, off, v)

    def u32(self, off):
        return struct.unpack_from(">I", self.d, off)[0]

    def put32(self, off, v):
        struct.pack_into(">I", self.d, off, v)

    # header fields
    def __getitem__(self, name):
        off, fmt = FIELDS[name]
        return struct.unpack_from(fmt, self.d, off)[0]

    def __setitem__(self, name, v):
        off, fmt = FIELDS[name]
        struct.pack_into(fmt, self.d, off, v)

    @property
    def cluster_size(self):
        return 1 << self["cluster_bits"]

    def truncate(self, n):
        del self.d[n:]

    # L1 / L2 / refcount table
    def l1(self, i):
        return self.u64(self["l1_table_offset"] + 8 * i)

    def set_l1(self, i, v):
        self.put64(self["l1_table_offset"] + 8 * i, v)

    def l2_off(self, l1i=0):
        off = self.l1(l1i) & OFF_MASK
        assert off, "L1 entry %d is not allocated" % l1i
        return off

    def l2(self, j, l1i=0):
        return self.u64(self.l2_off(l1i) + 8 * j)

    def set_l2(self, j, v, l1i=0):
        self.put64(self.l2_off(l1i) + 8 * j, v)

    def rt(self, i):
        return self.u64(self["refcount_table_offset"] + 8 * i)

    def set_rt(self, i, v):
        self.put64(self["refcount_table_offset"] + 8 * i, v)

    def compressed_desc(self, entry):
        """(host byte offset, additional sectors) of a compressed L2 entry."""
        x = 62 - (self["cluster_bits"] - 8)
        return entry & ((1 << x) - 1), (entry >> x) & ((1 << (62 - x)) - 1)

    def make_compressed(self, off, nsect):
        x = 62 - (self["cluster_bits"] - 8)
        assert off < (1 << x) and nsect < (1 << (62 - x))
        return COMPRESSED | (nsect << x) | off

    # header extensions
    def ext_start(self):
        return 72 if self["version"] == 2 else self["header_length"]

    def exts(self):
        """List of [type, data] up to (not including) the end marker."""
        off, out = self.ext_start(), []
        while off + 8 <= self.cluster_size:
            t, n = struct.unpack_from(">II", self.d, off)
            if t == EXT_END:
                break
            out.append([t, bytes(self.d[off + 8:off + 8 + n])])
            off += 8 + ((n + 7) & ~7)
        return out

    def backing_name(self):
        o, n = self["backing_file_offset"], self["backing_file_size"]
        return bytes(self.d[o:o + n]) if o else None

    def set_exts(self, exts, backing=None):
        """Rewrite the extension area; the backing file name (the current one unless given)
        is placed right after it, as QEMU does."""
        if backing is None:
            backing = self.backing_name()
        start = self.ext_start()
        buf = b""
        for t, data in exts:
            buf += struct.pack(">II", t, len(data)) + data + b"\0" * (-len(data) % 8)
        buf += b"\0" * 8
        end = start + len(buf) + (len(backing) if backing else 0)
        assert end <= self.cluster_size, "extensions do not fit in the first cluster"
        self.d[start:self.cluster_size] = b"\0" * (self.cluster_size - start)
        self.d[start:start + len(buf)] = buf
        if backing:
            self["backing_file_offset"] = start + len(buf)
            self["backing_file_size"] = len(backing)
            self.d[start + len(buf):end] = backing

    def set_ext(self, t, data):
        ex = [e for e in self.exts() if e[0] != t]
        ex.insert(0, [t, data])
        self.set_exts(ex)

    def set_backing(self, name, fmt=None):
        name = name.encode() if isinstance(name, str) else name
        ex = self.exts()
        if fmt is not None:
            ex = [e for e in ex if e[0] != EXT_BACKING_FMT] + [[EXT_BACKING_FMT, fmt.encode()]]
        self.set_exts(ex, backing=name)

    # snapshot table (first entry)
    def snap0(self):
        return self["snapshots_offset"]


# --------------------------------------------------------------------------------------------
# Base images: each is a directory with img.qcow2 (plus helper files); a case copies one.


def qimg(*a, cwd):
    run(QEMU_IMG, *a, cwd=cwd)


def qio(fmt, img, *cmds, cwd):
    args = [QEMU_IO, "-f", fmt]
    for c in cmds:
        args += ["-c", c]
    run(*args, img, cwd=cwd)


def base_v3(d):  # 64 KiB clusters, data at guest 0..128k and 32M
    qimg("create", "-q", "-f", "qcow2", "-o", "compat=1.1,cluster_size=65536", "img.qcow2", "64M", cwd=d)
    qio("qcow2", "img.qcow2", "write -q -P 0x11 0 128k", "write -q -P 0x22 32M 64k", cwd=d)


def base_v2(d):
    qimg("create", "-q", "-f", "qcow2", "-o", "compat=0.10,cluster_size=65536", "img.qcow2", "64M", cwd=d)
    qio("qcow2", "img.qcow2", "write -q -P 0x11 0 128k", cwd=d)


def base_v3_512(d):  # 512-byte clusters: one L2 table maps 32 KiB, so 1M needs 32 L1 entries
    qimg("create", "-q", "-f", "qcow2", "-o", "compat=1.1,cluster_size=512", "img.qcow2", "1M", cwd=d)
    qio("qcow2", "img.qcow2", "write -q -P 0x11 0 64k", cwd=d)


def base_v2_512(d):
    qimg("create", "-q", "-f", "qcow2", "-o", "compat=0.10,cluster_size=512", "img.qcow2", "1M", cwd=d)
    qio("qcow2", "img.qcow2", "write -q -P 0x11 0 64k", cwd=d)


def base_v3_4k(d):
    qimg("create", "-q", "-f", "qcow2", "-o", "compat=1.1,cluster_size=4096", "img.qcow2", "16M", cwd=d)
    qio("qcow2", "img.qcow2", "write -q -P 0x11 0 64k", cwd=d)


def base_v3_hole0(d):  # guest cluster 0 unallocated (L2 table exists): 'write 0 4k' must allocate
    qimg("create", "-q", "-f", "qcow2", "-o", "compat=1.1,cluster_size=65536", "img.qcow2", "64M", cwd=d)
    qio("qcow2", "img.qcow2", "write -q -P 0x11 1M 128k", cwd=d)


def base_v3_comp(d):  # guest cluster 0 is a zlib-compressed cluster
    qimg("create", "-q", "-f", "qcow2", "-o", "compat=1.1,cluster_size=65536", "img.qcow2", "64M", cwd=d)
    qio("qcow2", "img.qcow2", "write -q -c -P 0x33 0 64k", "write -q -P 0x11 64k 64k", cwd=d)


def base_v3_snap(d):  # one internal snapshot 's1'; cluster 0 rewritten after it
    qimg("create", "-q", "-f", "qcow2", "-o", "compat=1.1,cluster_size=65536", "img.qcow2", "64M", cwd=d)
    qio("qcow2", "img.qcow2", "write -q -P 0x11 0 128k", cwd=d)
    qimg("snapshot", "-c", "s1", "img.qcow2", cwd=d)
    qio("qcow2", "img.qcow2", "write -q -P 0x22 0 64k", cwd=d)


def base_v3_backing(d):  # img.qcow2 -> backing.raw (backing_fmt raw); data only at 64k in the top
    qimg("create", "-q", "-f", "raw", "backing.raw", "4M", cwd=d)
    qio("raw", "backing.raw", "write -q -P 0x55 0 1M", cwd=d)
    qimg("create", "-q", "-f", "qcow2", "-o", "compat=1.1,cluster_size=65536",
         "-b", "backing.raw", "-F", "raw", "img.qcow2", cwd=d)
    qio("qcow2", "img.qcow2", "write -q -P 0x11 64k 64k", cwd=d)


BASES = {
    "v3": base_v3, "v2": base_v2, "v3-512": base_v3_512, "v2-512": base_v2_512,
    "v3-4k": base_v3_4k, "v3-hole0": base_v3_hole0, "v3-comp": base_v3_comp,
    "v3-snap": base_v3_snap, "v3-backing": base_v3_backing,
}


# --------------------------------------------------------------------------------------------
# Cases

OPS = ("info", "info-chain", "check", "read-ro", "read", "write")

# Expectation presets
HDR = dict(info="fail", check="fail", read="fail", write="fail")      # open must fail
DATA = dict(info="any", check="fail", read="fail")                  # data path broken at guest 0
REFC = dict(info="any", check="fail", read="any", write="fail")     # refcount structures broken
CHAIN = {"info": "any", "info-chain": "fail", "check": "fail", "read": "fail", "write": "fail"}

# keyword regexes (all must match the failure message, case-insensitive)
K_HDR_SHORT = r"header|truncat|too (short|small)|end of (the )?file|EOF|short read"
K_PAST = r"past|beyond|end of (the )?(file|image)|EOF|outside|exceed"
K_LOOP = r"loop|cycl|circular|recurs|itself|already in the chain"

CASES = []


class Case:
    def __init__(self, name, desc, base, patch, ops, kw, op_kw=None, fmt="qcow2", qemu=None):
        self.name, self.desc, self.base, self.patch = name, desc, base, patch
        self.ops, self.kw, self.op_kw, self.fmt = dict(ops), list(kw), dict(op_kw or {}), fmt
        # qemu: {op: "fail"|"ok", "msg": regex on qemu's stderr of the first failing op}
        # records what QEMU 7.2 does with the same bytes (verified by --qemu-check).
        self.qemu = qemu or {}
        for op in self.ops:
            assert op in OPS, op

    def kw_for(self, op):
        return self.op_kw.get(op, self.kw)


def case(name, desc, base, ops, kw, op_kw=None, fmt="qcow2", qemu=None):
    def deco(fn):
        CASES.append(Case(name, desc, base, fn, ops, kw, op_kw, fmt, qemu))
        return fn
    return deco


def field_case(name, desc, base, field, value, ops, kw, qemu=None, op_kw=None):
    def patch(q, d):
        q[field] = value
    CASES.append(Case(name, desc, base, patch, ops, kw, op_kw, "qcow2", qemu))


QF = dict(info="fail", check="fail", read="fail")  # QEMU refuses to open


# ---- truncated / not qcow2 at all

@case("trunc-40", "v3 image truncated to 40 bytes (shorter than the 72-byte v2 header)", "v3",
      HDR, [K_HDR_SHORT], qemu=dict(QF, msg="header too short"))
def _(q, d):
    q.truncate(40)


@case("trunc-v2-64", "v2 image truncated to 64 bytes (shorter than 72; QEMU zero-fills the "
      "short read and opens it)", "v2", HDR, [K_HDR_SHORT],
      qemu=dict(info="ok", check="fail", read="ok"))
def _(q, d):
    q.truncate(64)


@case("trunc-100", "v3 image truncated to 100 bytes (shorter than the 104-byte v3 header)", "v3",
      HDR, [K_HDR_SHORT], qemu=dict(QF, msg="header too short"))
def _(q, d):
    q.truncate(100)


@case("empty-file", "zero-length file opened with -f qcow2", "v3",
      HDR, [K_HDR_SHORT + r"|empty|magic"], qemu=dict(QF, msg="not in qcow2 format"))
def _(q, d):
    q.truncate(0)


@case("raw-as-qcow2", "a raw image (1 MiB of 0x55) opened with -f qcow2", "v3",
      HDR, [r"magic|not a qcow2"], qemu=dict(QF, msg="Image is not in qcow2 format"))
def _(q, d):
    q.d[:] = b"\x55" * (1 << 20)


# ---- header fields

field_case("bad-magic", "magic QFI\\xfa instead of QFI\\xfb", "v3", "magic", 0x514649FA,
           HDR, [r"magic|not a qcow2"], qemu=dict(QF, msg="not in qcow2 format"))
field_case("version-1", "header version 1", "v3", "version", 1, HDR, [r"version"],
           qemu=dict(QF, msg="Unsupported qcow2 version 1"))
field_case("version-4", "header version 4", "v3", "version", 4, HDR, [r"version"],
           qemu=dict(QF, msg="Unsupported qcow2 version 4"))
field_case("cluster-bits-8", "cluster_bits 8 (256-byte clusters, below the minimum 9)", "v3",
           "cluster_bits", 8, HDR, [r"cluster"], qemu=dict(QF, msg="Unsupported cluster size"))
field_case("cluster-bits-22", "cluster_bits 22 (4 MiB clusters, above the 2 MiB maximum)", "v3",
           "cluster_bits", 22, HDR, [r"cluster"], qemu=dict(QF, msg="Unsupported cluster size"))
field_case("cluster-bits-63", "cluster_bits 63", "v3", "cluster_bits", 63, HDR, [r"cluster"],
           qemu=dict(QF, msg="Unsupported cluster size"))
field_case("header-length-96", "v3 header_length 96 (< 104)", "v3", "header_length", 96,
           HDR, [r"header"], qemu=dict(QF, msg="header too short"))
field_case("header-length-108", "v3 header_length 108 (not a multiple of 8; QEMU then parses "
           "the extensions from byte 108)", "v3", "header_length", 108, HDR, [r"header"],
           qemu=dict(QF, msg="Header extension too large"))
field_case("header-length-cluster", "header_length 520 with 512-byte clusters (header larger than "
           "a cluster)", "v3-512", "header_length", 520, HDR, [r"header"],
           qemu=dict(QF, msg="exceeds cluster size"))


@case("size-2p63", "virtual size 2^63", "v3", HDR, [r"size|too (big|large)"],
      qemu=dict(QF, msg="too big|too large|Invalid"))
def _(q, d):
    q["size"] = 1 << 63


# ---- L1 table

@case("l1-unaligned", "l1_table_offset 0x30200 (not cluster aligned)", "v3", HDR,
      [r"L1"], qemu=dict(QF, msg="L1 table offset invalid"))
def _(q, d):
    q["l1_table_offset"] = q["l1_table_offset"] + 0x200


@case("l1-past-eof", "l1_table_offset 1 TiB, far past the end of the file", "v3",
      HDR, [r"L1"], op_kw={"info": [r"L1"], "read": [r"L1"]},
      qemu=dict(info="ok", read="ok"))
def _(q, d):
    q["l1_table_offset"] = TIB


@case("l1-overlaps-header", "l1_table_offset 0: the L1 table overlaps the header", "v3",
      dict(info="any", check="fail", read="fail", write="fail"), [r"L1|L2|overlap|header"],
      qemu=dict(info="ok", check="fail", msg="L1 entry with reserved bits set: 514649fb"))
def _(q, d):
    q["l1_table_offset"] = 0


@case("l1-overlaps-reftable", "l1_table_offset = refcount_table_offset", "v3",
      dict(info="any", check="fail", read="any", write="fail"), [r"L1|L2|refcount|overlap"],
      qemu=dict(info="ok", check="fail", msg="offset 0x1000100010000"))
def _(q, d):
    q["l1_table_offset"] = q["refcount_table_offset"]


field_case("l1-size-2p31", "l1_size 2^31 (16 GiB L1 table)", "v3", "l1_size", 1 << 31,
           HDR, [r"L1"], qemu=dict(QF, msg="L1 table (is )?too large"))
field_case("l1-size-too-small", "1 MiB image with 512-byte clusters needs 32 L1 entries; "
           "l1_size says 1", "v3-512", "l1_size", 1, HDR, [r"L1"],
           qemu=dict(QF, msg="L1 table is too small"))


# ---- refcounts

@case("rt-unaligned", "refcount_table_offset 0x10200 (not cluster aligned)", "v3", HDR,
      [r"refcount"], qemu=dict(QF, msg="[Rr]eference count table offset invalid"))
def _(q, d):
    q["refcount_table_offset"] = q["refcount_table_offset"] + 0x200


@case("rt-zero", "refcount_table_offset 0 (overlaps the header)", "v3-hole0", REFC,
      [r"refcount"], qemu=dict(info="ok", check="fail", msg="refcount table entry 0 has reserved bits"))
def _(q, d):
    q["refcount_table_offset"] = 0


@case("rt-past-eof", "refcount_table_offset 1 TiB, past the end of the file", "v3-hole0", REFC,
      [r"refcount"], qemu=dict(info="ok", check="fail", msg="offset 0x10000000000 size 0x10000"))
def _(q, d):
    q["refcount_table_offset"] = TIB


field_case("rt-clusters-2p31", "refcount_table_clusters 2^31", "v3", "refcount_table_clusters",
           1 << 31, HDR, [r"refcount"], qemu=dict(QF, msg="[Rr]eference count table too large"))


@case("rt-entry-into-l1", "refcount table entry 0 points at the L1 table (refcount block "
      "overlaps the L1 table)", "v3-hole0", REFC, [r"refcount|overlap"],
      qemu=dict(info="ok", check="fail", msg="refcount block 0 refcount=2"))
def _(q, d):
    q.set_rt(0, q["l1_table_offset"])


@case("refblock-past-eof", "refcount table entry 0 points 1 TiB past the end of the file",
      "v3-hole0", REFC, [r"refcount"], qemu=dict(info="ok", check="fail", msg="refcount block 0 is outside image"))
def _(q, d):
    q.set_rt(0, TIB)


field_case("refcount-order-7", "refcount_order 7 (128-bit refcounts)", "v3", "refcount_order", 7,
           HDR, [r"refcount"], qemu=dict(QF, msg="[Rr]eference count entry width too large"))


# ---- L2 tables and entries

@case("l2-unaligned", "L1[0] = L2 offset + 0x200 (L2 table not cluster aligned)", "v3",
      DATA, [r"L2"], qemu=dict(info="ok", check="fail", read="fail", msg="unaligned"))
def _(q, d):
    q.set_l1(0, q.l1(0) + 0x200)


@case("l2-past-eof", "L1[0] points at an L2 table 1 TiB past the end of the file", "v3",
      DATA, [r"L2"], qemu=dict(info="ok", check="fail", msg="offset 0x10000000000 size 0x10000"))
def _(q, d):
    q.set_l1(0, COPIED | TIB)


@case("v2-512-l1-reserved", "v2, 512-byte clusters: L1[0] has reserved bit 8 set", "v2-512",
      dict(info="any", check="fail", read="any"), [r"L1|L2|reserved|unaligned"],
      qemu=dict(info="ok", check="fail", read="ok", msg="L1 entry with reserved bits"))
def _(q, d):
    q.set_l1(0, q.l1(0) + 0x100)


@case("l2-entry-past-eof", "L2[0] maps guest cluster 0 to host 1 TiB (past the end of the file)",
      "v3", DATA, [r"L2|cluster|" + K_PAST], op_kw={"check": [r"L2|cluster|" + K_PAST]},
      qemu=dict(info="ok", check="fail", msg="offset 0x10000000000 size 0x10000"))
def _(q, d):
    q.set_l2(0, COPIED | TIB)


@case("l2-entry-reserved-lo", "L2[0] has reserved bit 1 set (standard descriptor bits 1-8 are "
      "reserved)", "v3", dict(info="any", check="fail", read="any"),
      [r"L2|reserved|unaligned|invalid"],
      qemu=dict(info="ok", check="fail", read="ok", msg="l2 entry with reserved bits"))
def _(q, d):
    q.set_l2(0, q.l2(0) | (1 << 1))


@case("l2-entry-reserved-hi", "L2[0] has reserved bit 56 set (descriptor bits 56-61 are "
      "reserved)", "v3", dict(info="any", check="fail", read="any"),
      [r"L2|reserved|invalid|" + K_PAST],
      qemu=dict(info="ok", check="fail", read="ok", msg="l2 entry with reserved bits"))
def _(q, d):
    q.set_l2(0, q.l2(0) | (1 << 56))


@case("v2-zero-flag", "v2 image with L2[0] bit 0 (the v3-only 'reads as zero' flag) set",
      "v2", dict(info="any", check="any", read="fail"), [r"L2|zero|reserved|version|invalid"],
      qemu=dict(info="ok", check="ok", read="fail", msg="Zero cluster entry found in pre-v3"))
def _(q, d):
    q.set_l2(0, q.l2(0) | 1)


# data or L2 pointers aimed at metadata: a write through them would destroy the metadata
OVL = dict(info="any", check="fail", read="any", write="fail")
K_OVL = r"overlap|metadata|refcount|L1|L2"


@case("l2-entry-into-reftable", "L2[0] maps guest cluster 0 onto the refcount table cluster",
      "v3", OVL, [K_OVL], qemu=dict(info="ok", check="fail", read="ok", write="fail",
                                    msg="overlaps with refcount table"))
def _(q, d):
    q.set_l2(0, COPIED | q["refcount_table_offset"])


@case("l2-entry-into-l1", "L2[0] maps guest cluster 0 onto the L1 table cluster", "v3", OVL,
      [K_OVL], qemu=dict(info="ok", check="fail", read="ok", write="fail",
                         msg="overlaps with active L1 table"))
def _(q, d):
    q.set_l2(0, COPIED | q["l1_table_offset"])


@case("l1-entry-into-refblock", "L1[0] uses refcount block 0 as its L2 table", "v3", OVL,
      [K_OVL], qemu=dict(info="ok", check="fail", read="ok", msg="overlaps with active L2"))
def _(q, d):
    q.set_l1(0, COPIED | q.rt(0))


# cowtree refuses a read-write open of such an image (and its overlap guard would keep the
# allocator off the table anyway); check must report the broken refcount.
@case("refcount-zero-l2", "the active L2 table's refcount is 0 (so an allocator may hand it out); "
      "guest cluster 0 is unallocated, 'write 0 4k' must allocate without touching the L2 "
      "table", "v3-hole0", OVL,
      [K_OVL], qemu=dict(info="ok", check="fail", read="ok", write="fail",
                         msg="overlaps with active L2 table"))
def _(q, d):
    assert q["refcount_order"] == 4
    struct.pack_into(">H", q.d, q.rt(0) + 2 * (q.l2_off(0) // q.cluster_size), 0)


@case("compressed-past-eof", "compressed descriptor of guest cluster 0 points 1 TiB past EOF",
      "v3-comp", DATA, [r"compress|" + K_PAST], qemu=dict(info="ok", read="fail"))
def _(q, d):
    e = q.l2(0)
    assert e & COMPRESSED
    off, ns = q.compressed_desc(e)
    q.set_l2(0, q.make_compressed(TIB + (off & 511), ns))


@case("compressed-garbage", "compressed data of guest cluster 0 overwritten with 0xff",
      "v3-comp", dict(info="any", check="any", read="fail"), [r"compress|inflate|zlib|corrupt"],
      qemu=dict(info="ok", check="ok", read="fail"))
def _(q, d):
    e = q.l2(0)
    assert e & COMPRESSED
    off, ns = q.compressed_desc(e)
    n = (ns + 1) * 512 - (off % 512)
    n = min(n, len(q.d) - off)
    q.d[off:off + n] = b"\xff" * n


# ---- backing file

@case("backing-offset-past-eof", "backing_file_offset 1 TiB (name past the end of the file)",
      "v3-backing", HDR, [r"backing"], qemu=dict(QF, msg="Invalid backing file offset"))
def _(q, d):
    q["backing_file_offset"] = TIB


field_case("backing-size-1024", "backing_file_size 1024 (> 1023)", "v3-backing",
           "backing_file_size", 1024, HDR, [r"backing"],
           qemu=dict(QF, msg="[Bb]acking file name too long"))
field_case("backing-size-4g", "backing_file_size 0xffffffff (longer than the file)", "v3-backing",
           "backing_file_size", 0xFFFFFFFF, HDR, [r"backing"],
           qemu=dict(QF, msg="[Bb]acking file name too long"))


@case("backing-name-past-cluster", "backing name at offset 65530, 20 bytes: runs past the first "
      "cluster", "v3-backing", HDR, [r"backing"],
      qemu=dict(QF, msg="[Bb]acking file name too long"))
def _(q, d):
    q["backing_file_offset"] = q.cluster_size - 6
    q["backing_file_size"] = 20


@case("backing-missing", "backing file 'missing.qcow2' does not exist", "v3-backing",
      CHAIN, [r"backing|no such file|missing"], qemu=dict(info="ok", check="fail", read="fail"))
def _(q, d):
    q.set_backing("missing.qcow2", "qcow2")


@case("backing-missing-deep", "img -> mid.qcow2 -> gone.raw (missing two levels down)",
      "v3-backing", CHAIN, [r"backing|no such file|gone"],
      qemu=dict(info="ok", check="fail", read="fail"))
def _(q, d):
    run(QEMU_IMG, "create", "-q", "-f", "qcow2", "-u", "-b", "gone.raw", "-F", "raw",
        "mid.qcow2", "4M", cwd=d)
    q.set_backing("mid.qcow2", "qcow2")


@case("backing-self", "backing file names the image itself", "v3-backing", CHAIN,
      [K_LOOP],
      qemu={"info": "ok", "info-chain": "fail", "check": "fail", "msg": "infinite loop"})
def _(q, d):
    q.set_backing("img.qcow2", "qcow2")


@case("backing-loop-ab", "img.qcow2 -> b.qcow2 -> img.qcow2", "v3-backing", CHAIN,
      [K_LOOP],
      qemu={"info": "ok", "info-chain": "fail", "check": "fail", "msg": "infinite loop"})
def _(q, d):
    run(QEMU_IMG, "create", "-q", "-f", "qcow2", "-u", "-b", "img.qcow2", "-F", "qcow2",
        "b.qcow2", "4M", cwd=d)
    q.set_backing("b.qcow2", "qcow2")


@case("backing-loop-abcb", "img.qcow2 -> b.qcow2 -> c.qcow2 -> b.qcow2 (loop below the top)",
      "v3-backing", CHAIN, [K_LOOP],
      qemu={"info": "ok", "info-chain": "fail", "check": "fail", "msg": "infinite loop"})
def _(q, d):
    run(QEMU_IMG, "create", "-q", "-f", "qcow2", "-u", "-b", "b.qcow2", "-F", "qcow2",
        "c.qcow2", "4M", cwd=d)
    run(QEMU_IMG, "create", "-q", "-f", "qcow2", "-u", "-b", "c.qcow2", "-F", "qcow2",
        "b.qcow2", "4M", cwd=d)
    q.set_backing("b.qcow2", "qcow2")


JSON_NAME = 'json:{"driver":"raw","file":{"driver":"file","filename":"backing.raw"}}'


@case("backing-json", "backing name uses the json:{...} pseudo-protocol (a plain file of that "
      "literal name also exists, so treating it as a path would 'work')", "v3-backing", CHAIN,
      [r"json|protocol"], qemu=dict(info="ok", read="ok"))
def _(q, d):
    shutil.copyfile(os.path.join(d, "backing.raw"), os.path.join(d, JSON_NAME))
    q.set_backing(JSON_NAME, "raw")


@case("backing-fmt-unknown", "backing format extension names 'nosuchfmt'", "v3-backing", CHAIN,
      [r"format|nosuchfmt"], qemu=dict(info="ok", check="fail", read="fail", msg="nosuchfmt"))
def _(q, d):
    q.set_backing("backing.raw", "nosuchfmt")


@case("backing-fmt-mismatch", "backing format says qcow2 but backing.raw is raw", "v3-backing",
      CHAIN, [r"backing|magic|not a qcow2|qcow2 format"],
      qemu=dict(info="ok", check="fail", read="fail"))
def _(q, d):
    q.set_backing("backing.raw", "qcow2")


@case("backing-is-dir", "backing file is a directory", "v3-backing", CHAIN,
      [r"backing|director"], qemu=dict(info="ok", check="fail", read="fail"))
def _(q, d):
    os.mkdir(os.path.join(d, "dir"))
    q.set_backing("dir", "raw")


@case("backing-bad-version", "backing file b.qcow2 is a qcow2 with header version 4",
      "v3-backing", CHAIN, [r"version"], qemu=dict(info="ok", check="fail", read="fail"))
def _(q, d):
    run(QEMU_IMG, "create", "-q", "-f", "qcow2", "b.qcow2", "4M", cwd=d)
    b = Q(os.path.join(d, "b.qcow2"))
    b["version"] = 4
    b.save()
    q.set_backing("b.qcow2", "qcow2")


# ---- feature bits

field_case("incompat-bit5", "unknown incompatible feature bit 5", "v3", "incompatible_features",
           1 << 5, HDR, [r"feature", r"\b5\b"], qemu=dict(QF, msg="Unsupported qcow2 feature"))
field_case("incompat-bit63", "unknown incompatible feature bit 63", "v3", "incompatible_features",
           1 << 63, HDR, [r"feature", r"\b63\b"], qemu=dict(QF, msg="Unsupported qcow2 feature"))


@case("incompat-bit5-named", "incompatible bit 5 set; the feature name table calls it "
      "'frobnicate'", "v3", HDR, [r"feature", r"\b5\b", r"frobnicate"],
      qemu=dict(QF, msg="frobnicate"))
def _(q, d):
    ex = q.exts()
    ft = [e for e in ex if e[0] == EXT_FEATURES]
    assert ft
    ft[0][1] = ft[0][1] + struct.pack(">BB46s", 0, 5, b"frobnicate")
    q.set_exts(ex)
    q["incompatible_features"] = 1 << 5


@case("corrupt-bit", "incompatible bit 1 (corrupt) set: read-only open allowed, read-write "
      "open refused", "v3", {"info": "ok", "check": "any", "read-ro": "ok", "read": "fail",
                             "write": "fail"}, [r"corrupt"],
      qemu={"info": "ok", "read-ro": "ok", "read": "fail", "msg": "corrupt"})
def _(q, d):
    q["incompatible_features"] = 1 << 1


@case("extl2-512", "extended_l2 bit (incompatible bit 4) with 512-byte clusters", "v3-512", HDR,
      [r"extended|subcluster"], qemu=dict(QF, msg="Unsupported subcluster size: 16$"))
def _(q, d):
    q["incompatible_features"] = 1 << 4


@case("extl2-4k", "extended_l2 bit with 4 KiB clusters (minimum is 16 KiB)", "v3-4k", HDR,
      [r"extended|subcluster"], qemu=dict(QF, msg="Unsupported subcluster size: 128"))
def _(q, d):
    q["incompatible_features"] = 1 << 4


@case("data-file-bit", "external data file bit set, no data file extension", "v3",
      dict(info="any", check="fail", read="fail", write="fail"), [r"data.file|external"],
      qemu=dict(info="ok", check="fail", read="fail", msg="'data-file' is required"))
def _(q, d):
    q["incompatible_features"] = 1 << 2


field_case("crypt-aes", "crypt_method 1 (legacy AES-CBC)", "v3", "crypt_method", 1,
           dict(info="any", check="any", read="fail", write="fail"), [r"encrypt|AES|crypt"],
           qemu=dict(info="ok", read="fail", msg="encrypt.key-secret"))
field_case("crypt-luks", "crypt_method 2 (LUKS) without the encryption header extension", "v3",
           "crypt_method", 2, dict(info="any", check="any", read="fail", write="fail"),
           [r"encrypt|LUKS|crypt"],
           qemu=dict(info="crash", check="fail", read="fail", msg="Missing CRYPTO header"))
field_case("crypt-3", "crypt_method 3 (undefined)", "v3", "crypt_method", 3, HDR,
           [r"encrypt|crypt"], qemu=dict(QF, msg="[Uu]nsupported encryption method"))


@case("compression-type-no-bit", "compression_type 1 (zstd) without incompatible bit 3", "v3",
      HDR, [r"compression"], qemu=dict(QF, msg="compression"))
def _(q, d):
    q["compression_type"] = 1


@case("compression-type-7", "compression_type 7 (unknown) with incompatible bit 3", "v3",
      HDR, [r"compression"], qemu=dict(QF, msg="compression"))
def _(q, d):
    q["compression_type"] = 7
    q["incompatible_features"] = 1 << 3


# ---- header extensions

@case("ext-past-cluster", "feature name table extension length 0x10000 runs past the first "
      "cluster", "v3", HDR, [r"extension"], qemu=dict(QF, msg="extension"))
def _(q, d):
    off = q.ext_start()
    assert q.u32(off) == EXT_FEATURES
    q.put32(off + 4, 0x10000)


@case("ext-past-cluster-512", "backing format extension length 600 with 512-byte clusters",
      "v3-512", HDR, [r"extension"], qemu=dict(QF, msg="extension"))
def _(q, d):
    q.set_exts([[EXT_BACKING_FMT, b"raw"]])
    q.put32(q.ext_start() + 4, 600)


@case("ext-duplicate", "two backing format extensions ('raw' then 'qcow2')", "v3-backing",
      HDR, [r"extension|duplicate"],
      qemu=dict(info="ok", check="fail", read="fail", msg="Could not open backing file: Image is not "
                "in qcow2 format"))
def _(q, d):
    ex = q.exts()
    q.set_exts(ex + [[EXT_BACKING_FMT, b"qcow2"]])


# ---- snapshots

field_case("nb-snapshots-2p31", "nb_snapshots 2^31", "v3-snap", "nb_snapshots", 1 << 31, HDR,
           [r"snapshot"], qemu=dict(QF, msg="Snapshot table too large"))


@case("snapshots-past-eof", "snapshots_offset 1 TiB, past the end of the file", "v3-snap", HDR,
      [r"snapshot"], qemu=dict(info="ok", check="fail", msg="snapshot table entry 0 is incomplete"))
def _(q, d):
    q["snapshots_offset"] = TIB


@case("snapshots-unaligned", "snapshots_offset not cluster aligned", "v3-snap", HDR,
      [r"snapshot"], qemu=dict(QF, msg="[Ss]napshot table offset invalid"))
def _(q, d):
    q["snapshots_offset"] = q["snapshots_offset"] + 0x200


@case("snapshot-name-past-eof", "snapshot entry name_size 0xffff makes the table run past EOF",
      "v3-snap", HDR, [r"snapshot"],
      qemu=dict(info="ok", check="fail", msg=r"cluster 12 refcount=0 reference=1"))
def _(q, d):
    so = q["snapshots_offset"]
    # copy the table to a fresh cluster at the end of the file, then claim a 64 KiB name
    tbl = bytes(q.d[so:so + 256])
    last = (len(q.d) + q.cluster_size - 1) & ~(q.cluster_size - 1)
    q.d[len(q.d):] = b"\0" * (last - len(q.d)) + tbl
    q["snapshots_offset"] = last
    struct.pack_into(">H", q.d, last + 14, 0xFFFF)
    # keep the refcounts consistent: new table cluster used, old one free
    assert q["refcount_order"] == 4
    rb = q.rt(0)
    struct.pack_into(">H", q.d, rb + 2 * (last // q.cluster_size), 1)
    struct.pack_into(">H", q.d, rb + 2 * (so // q.cluster_size), 0)


@case("snapshot-l1-past-eof", "snapshot 1's L1 table offset is 1 TiB, past EOF", "v3-snap",
      dict(info="any", check="fail", read="any"), [r"snapshot|L1"],
      qemu=dict(info="ok", check="fail", read="ok", msg="offset 0x10000000000 size"))
def _(q, d):
    q.put64(q["snapshots_offset"], TIB)


@case("snapshot-l1-unaligned", "snapshot 1's L1 table offset not cluster aligned", "v3-snap",
      dict(info="any", check="fail", read="any"), [r"snapshot|L1"],
      qemu=dict(info="ok", check="fail", read="ok", msg="L1 table is not cluster aligned"))
def _(q, d):
    so = q["snapshots_offset"]
    q.put64(so, q.u64(so) + 0x200)


@case("snapshot-l1-size-2p31", "snapshot 1's l1_size is 2^31", "v3-snap",
      dict(info="any", check="fail", read="any"), [r"snapshot|L1"],
      qemu=dict(info="ok", check="fail", read="ok", msg="L1 table is too large"))
def _(q, d):
    q.put32(q["snapshots_offset"] + 8, 1 << 31)


# ---- v2 specifics

@case("v2-l1-past-eof", "v2 image, l1_table_offset 1 TiB past EOF", "v2",
      HDR, [r"L1"], qemu=dict(info="ok", check="fail", read="ok"))
def _(q, d):
    q["l1_table_offset"] = TIB


# --------------------------------------------------------------------------------------------


def build(out):
    os.makedirs(out, exist_ok=True)
    bases = os.path.join(out, ".bases")
    if os.path.exists(bases):
        shutil.rmtree(bases)
    os.makedirs(bases)
    needed = sorted({c.base for c in CASES})
    for b in needed:
        bd = os.path.join(bases, b)
        os.mkdir(bd)
        BASES[b](bd)
    names = set()
    rows, meta = [], []
    for c in CASES:
        assert c.name not in names, c.name
        names.add(c.name)
        cd = os.path.join(out, c.name)
        if os.path.exists(cd):
            shutil.rmtree(cd)
        shutil.copytree(os.path.join(bases, c.base), cd)
        q = Q(os.path.join(cd, "img.qcow2"))
        c.patch(q, cd)
        q.save()
        for op in OPS:
            if op in c.ops:
                kws = c.kw_for(op)
                for k in kws:
                    re.compile(k)
                    assert "\t" not in k
                rows.append("\t".join([c.name, op, c.ops[op], c.fmt] + kws))
        meta.append(dict(name=c.name, desc=c.desc, base=c.base, fmt=c.fmt, ops=c.ops,
                         kw=c.kw, op_kw=c.op_kw, qemu=c.qemu))
    shutil.rmtree(bases)
    with open(os.path.join(out, "manifest.tsv"), "w") as f:
        f.write("# case\top\texpect\tfmt\tkeyword-regex...\n")
        f.write("\n".join(rows) + "\n")
    with open(os.path.join(out, "cases.tsv"), "w") as f:
        for c in CASES:
            f.write("%s\t%s\t%s\n" % (c.name, c.base, c.desc))
    with open(os.path.join(out, "cases.json"), "w") as f:
        json.dump(meta, f, indent=1)
    return len(CASES)


QEMU_CMDS = {
    "info": lambda fmt: [QEMU_IMG, "info", "-f", fmt, "img.qcow2"],
    "info-chain": lambda fmt: [QEMU_IMG, "info", "--backing-chain", "-f", fmt, "img.qcow2"],
    "check": lambda fmt: [QEMU_IMG, "check", "-f", fmt, "img.qcow2"],
    "read-ro": lambda fmt: [QEMU_IO, "-f", fmt, "-r", "-c", "read 0 64k", "img.qcow2"],
    "read": lambda fmt: [QEMU_IO, "-f", fmt, "-c", "read 0 64k", "img.qcow2"],
    "write": lambda fmt: [QEMU_IO, "-f", fmt, "-c", "write 0 4k", "img.qcow2"],
}


def qemu_check(out, verbose=False):
    """Run QEMU on a copy of each case (QEMU may mark images corrupt); compare the outcome
    with what the case records in .qemu. Result per op: ok, fail, crash (signal), hang."""
    bad = 0
    qops = ("info", "info-chain", "check", "read-ro", "read", "write")
    print("%-26s %-6s %-6s %-6s %-6s %-6s %-6s  %s" % ("case", "info", "chain", "check", "rd-ro",
                                                       "read", "write", "verdict"))
    for c in CASES:
        res, errs = {}, {}
        for op in qops:
            with tempfile.TemporaryDirectory() as tmp:
                cd = os.path.join(tmp, c.name)
                shutil.copytree(os.path.join(out, c.name), cd, symlinks=True)
                try:
                    p = subprocess.run(QEMU_CMDS[op](c.fmt), cwd=cd, capture_output=True,
                                       text=True, timeout=10)
                    rc = p.returncode
                    err = p.stderr + (p.stdout if rc else "")
                except subprocess.TimeoutExpired:
                    rc, err = -1, "timeout"
            if rc == -1:
                res[op] = "hang"
            elif rc < 0:
                res[op] = "crash"
            elif op == "check":
                res[op] = "ok" if rc in (0, 3) else "fail"
            else:
                res[op] = "ok" if rc == 0 else "fail"
            errs[op] = (rc, err.strip().replace("\n", " | ")[:200])
        verdict = []
        for op, want in c.qemu.items():
            if op == "msg":
                continue
            got = res[op]
            if got != want and not (want == "fail" and got == "hang"):
                verdict.append("%s: want %s got %s" % (op, want, got))
        if "msg" in c.qemu:
            msgs = [errs[o][1] for o in qops]
            if not any(re.search(c.qemu["msg"], e, re.I) for e in msgs):
                verdict.append("msg /%s/ not seen" % c.qemu["msg"])
        if not c.qemu:
            verdict.append("nothing recorded")
        bad += bool(verdict)
        print("%-26s %-6s %-6s %-6s %-6s %-6s %-6s  %s" % (
            c.name, res["info"], res["info-chain"], res["check"], res["read-ro"], res["read"],
            res["write"], "; ".join(verdict) or "as recorded"))
        if verbose or verdict:
            for op in qops:
                if errs[op][1]:
                    print("    %-10s rc=%d %s" % (op, errs[op][0], errs[op][1]))
    print("%d cases, %d differ from the recorded QEMU behaviour" % (len(CASES), bad))
    return bad


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("outdir", nargs="?")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--qemu-check", action="store_true")
    ap.add_argument("-v", "--verbose", action="store_true")
    a = ap.parse_args()
    if a.list:
        for c in CASES:
            ops = " ".join("%s=%s" % (o, c.ops[o]) for o in OPS if o in c.ops)
            print("%-26s [%s] %s\n    %s\n    keywords: %s" % (c.name, c.base, c.desc, ops,
                                                             " AND ".join(c.kw)))
        return 0
    if not a.outdir:
        ap.error("OUTDIR required")
    n = build(a.outdir)
    print("%d cases written to %s" % (n, a.outdir))
    if a.qemu_check:
        return 1 if qemu_check(a.outdir, a.verbose) else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
