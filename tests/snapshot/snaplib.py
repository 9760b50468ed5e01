#!/usr/bin/env python3
"""Helpers for the snapshot tests: a small qcow2 parser/patcher and listing comparison.

Command line (used by the shell tests):
  snaplib.py hdr FILE                         header fields as JSON
  snaplib.py l2 FILE GUEST_OFF [SNAPNAME]     the L2 entry mapping GUEST_OFF (active or snapshot):
                                              prints "l1=0x.. l2=0x.. entry=0x.. host=0x..
                                              compressed=0|1 copied=0|1 zero=0|1 l2off=0x.."
  snaplib.py setl2 FILE GUEST_OFF OP          OP: zero (entry := 0), clear-copied, set-copied
  snaplib.py l1copied FILE GUEST_OFF OP       OP: clear-copied, set-copied on the active L1 entry
  snaplib.py refcount FILE HOST_OFF [DELTA]   print the refcount of the cluster at HOST_OFF; with
                                              DELTA, add it (the stored value changes)
  snaplib.py dirty FILE on|off                set/clear incompatible feature bit 0 (dirty)
  snaplib.py compressed FILE                  print the guest offsets of compressed clusters (active)
  snaplib.py listings-equal QEMU_INFO_JSON CT_LIST_JSON [CT_INFO_JSON]
                                              exit 0 if the snapshot lists are equal, else print
                                              the difference and exit 1
  snaplib.py names FILE                       print "id<TAB>name" of each snapshot (table order)
  snaplib.py randbytes SEED N OUT             N pseudo-random bytes
"""

import json
import random
import struct
import sys


class Qcow2:
    def __init__(self, path):
        self.path = path
        with open(path, "rb") as f:
            h = f.read(112)
        (magic, self.version, self.backing_off, self.backing_len, self.cluster_bits, self.size,
         self.crypt, self.l1_size, self.l1_off, self.rt_off, self.rt_clusters, self.nb_snapshots,
         self.snapshots_off) = struct.unpack(">IIQIIQIIQQIIQ", h[:72])
        if magic != 0x514649FB:
            raise SystemExit("%s: not a qcow2 image" % path)
        self.incompat = self.compat = self.autoclear = 0
        self.refcount_order = 4
        if self.version >= 3:
            (self.incompat, self.compat, self.autoclear, self.refcount_order) = struct.unpack(
                ">QQQI", h[72:100])
        self.cluster = 1 << self.cluster_bits
        self.extl2 = bool(self.incompat & (1 << 4))
        self.l2_entry_bytes = 16 if self.extl2 else 8
        self.l2_entries = self.cluster // self.l2_entry_bytes
        self.refcount_bits = 1 << self.refcount_order

    def as_dict(self):
        keys = ("version cluster_bits cluster size l1_size l1_off rt_off rt_clusters nb_snapshots "
                "snapshots_off incompat compat autoclear refcount_order refcount_bits extl2").split()
        return {k: getattr(self, k) for k in keys}

    def pread(self, off, n):
        with open(self.path, "rb") as f:
            f.seek(off)
            return f.read(n)

    def pwrite(self, off, data):
        with open(self.path, "r+b") as f:
            f.seek(off)
            f.write(data)

    def be64(self, off):
        return struct.unpack(">Q", self.pread(off, 8))[0]

    def snapshots(self):
        out = []
        off = self.snapshots_off
        for _ in range(self.nb_snapshots):
            fixed = self.pread(off, 40)
            l1_off, l1_size, id_len, name_len, dsec, dnsec, clk, vmsz, extra = struct.unpack(
                ">QIHHIIQII", fixed)
            rest = self.pread(off + 40, extra + id_len + name_len)
            sid = rest[extra:extra + id_len].decode()
            name = rest[extra + id_len:].decode()
            disk = self.size
            if extra >= 16:
                disk = struct.unpack(">Q", rest[8:16])[0]
            out.append(dict(id=sid, name=name, l1_off=l1_off, l1_size=l1_size, disk_size=disk,
                            entry_off=off))
            ln = 40 + extra + id_len + name_len
            off += (ln + 7) & ~7
        return out

    def l1_of(self, snapname=None):
        if snapname is None:
            return self.l1_off, self.l1_size
        for s in self.snapshots():
            if s["name"] == snapname:
                return s["l1_off"], s["l1_size"]
        raise SystemExit("no snapshot named %r" % snapname)

    def locate(self, guest, snapname=None):
        """(l1 entry offset, l1 entry, l2 entry offset or None, l2 entry)."""
        l1_off, l1_size = self.l1_of(snapname)
        span = self.cluster * self.l2_entries
        i = guest // span
        if i >= l1_size:
            return None, 0, None, 0
        l1e_off = l1_off + 8 * i
        l1e = self.be64(l1e_off)
        l2 = l1e & 0x00FFFFFFFFFFFE00
        if not l2:
            return l1e_off, l1e, None, 0
        j = (guest % span) // self.cluster
        l2e_off = l2 + j * self.l2_entry_bytes
        return l1e_off, l1e, l2e_off, self.be64(l2e_off)

    def describe(self, guest, snapname=None):
        l1e_off, l1e, l2e_off, l2e = self.locate(guest, snapname)
        comp = bool(l2e & (1 << 62))
        host = 0
        if comp:
            x = 62 - (self.cluster_bits - 8)
            host = l2e & ((1 << x) - 1)
        else:
            host = l2e & 0x00FFFFFFFFFFFE00
        return ("l1=0x%x l2=0x%x entry=0x%x host=0x%x compressed=%d copied=%d zero=%d l2off=0x%x"
                % (l1e, l2e, l2e_off or 0, host, comp, (l2e >> 63) & 1,
                   0 if comp else l2e & 1, l1e & 0x00FFFFFFFFFFFE00))

    def set_l2(self, guest, op):
        _, _, l2e_off, l2e = self.locate(guest)
        if l2e_off is None:
            raise SystemExit("guest offset 0x%x has no L2 table" % guest)
        if op == "zero":
            new = 0
        elif op == "clear-copied":
            new = l2e & ~(1 << 63)
        elif op == "set-copied":
            new = l2e | (1 << 63)
        else:
            raise SystemExit("bad op %s" % op)
        self.pwrite(l2e_off, struct.pack(">Q", new))
        return l2e, new

    def set_l1(self, guest, op):
        l1e_off, l1e, _, _ = self.locate(guest)
        if l1e_off is None or not l1e:
            raise SystemExit("guest offset 0x%x has no L1 entry" % guest)
        new = l1e & ~(1 << 63) if op == "clear-copied" else l1e | (1 << 63)
        self.pwrite(l1e_off, struct.pack(">Q", new))
        return l1e, new

    # refcounts
    def _refentry(self, host):
        cl = host >> self.cluster_bits
        per_block = self.cluster * 8 // self.refcount_bits
        ti, bi = divmod(cl, per_block)
        rb = self.be64(self.rt_off + 8 * ti) & ~0x1FF
        if not rb:
            raise SystemExit("no refcount block for host offset 0x%x" % host)
        return rb, bi

    def refcount(self, host):
        rb, bi = self._refentry(host)
        b = self.refcount_bits
        if b >= 8:
            n = b // 8
            return int.from_bytes(self.pread(rb + bi * n, n), "big")
        byte = self.pread(rb + bi * b // 8, 1)[0]
        shift = (bi * b) % 8
        return (byte >> shift) & ((1 << b) - 1)

    def set_refcount(self, host, val):
        rb, bi = self._refentry(host)
        b = self.refcount_bits
        if val < 0 or val >= (1 << b):
            raise SystemExit("refcount %d does not fit in %d bits" % (val, b))
        if b >= 8:
            n = b // 8
            self.pwrite(rb + bi * n, val.to_bytes(n, "big"))
            return
        off = rb + bi * b // 8
        byte = self.pread(off, 1)[0]
        shift = (bi * b) % 8
        mask = ((1 << b) - 1) << shift
        self.pwrite(off, bytes(((byte & ~mask) | (val << shift),)))

    def set_dirty(self, on):
        if self.version < 3:
            raise SystemExit("v2 images have no dirty bit")
        v = self.incompat | 1 if on else self.incompat & ~1
        self.pwrite(72, struct.pack(">Q", v))

    def compressed_guest_offsets(self):
        out = []
        span = self.cluster * self.l2_entries
        for i in range(self.l1_size):
            l1e = self.be64(self.l1_off + 8 * i)
            l2 = l1e & 0x00FFFFFFFFFFFE00
            if not l2:
                continue
            tbl = self.pread(l2, self.cluster)
            for j in range(self.l2_entries):
                e = struct.unpack(">Q", tbl[j * self.l2_entry_bytes:j * self.l2_entry_bytes + 8])[0]
                if e & (1 << 62):
                    g = i * span + j * self.cluster
                    if g < self.size:
                        out.append(g)
        return out


def snaps_of(doc):
    if isinstance(doc, list):
        return doc
    return doc.get("snapshots", [])


def listings_equal(paths):
    docs = []
    for p in paths:
        with open(p) as f:
            docs.append(snaps_of(json.load(f)))
    ref = docs[0]
    ok = True
    for p, d in zip(paths[1:], docs[1:]):
        if d != ref:
            ok = False
            print("snapshot list of %s differs from qemu-img's:" % p)
            print("  qemu-img: %s" % json.dumps(ref, sort_keys=True))
            print("  cowtree : %s" % json.dumps(d, sort_keys=True))
    return 0 if ok else 1


def main(argv):
    if len(argv) < 2:
        print(__doc__)
        return 2
    cmd, a = argv[1], argv[2:]
    num = lambda s: int(s, 0)
    if cmd == "hdr":
        print(json.dumps(Qcow2(a[0]).as_dict()))
    elif cmd == "l2":
        print(Qcow2(a[0]).describe(num(a[1]), a[2] if len(a) > 2 else None))
    elif cmd == "setl2":
        old, new = Qcow2(a[0]).set_l2(num(a[1]), a[2])
        print("0x%x -> 0x%x" % (old, new))
    elif cmd == "l1copied":
        old, new = Qcow2(a[0]).set_l1(num(a[1]), a[2])
        print("0x%x -> 0x%x" % (old, new))
    elif cmd == "refcount":
        q = Qcow2(a[0])
        host = num(a[1])
        rc = q.refcount(host)
        if len(a) > 2:
            q.set_refcount(host, rc + int(a[2]))
            rc = q.refcount(host)
        print(rc)
    elif cmd == "dirty":
        Qcow2(a[0]).set_dirty(a[1] == "on")
    elif cmd == "compressed":
        for g in Qcow2(a[0]).compressed_guest_offsets():
            print(g)
    elif cmd == "listings-equal":
        return listings_equal(a)
    elif cmd == "names":
        for s in Qcow2(a[0]).snapshots():
            print("%s\t%s" % (s["id"], s["name"]))
    elif cmd == "randbytes":
        rng = random.Random(int(a[0]))
        n = int(a[1])
        with open(a[2], "wb") as f:
            f.write(bytes(rng.getrandbits(8) for _ in range(n)) if n < 4096 else
                    rng.getrandbits(8 * n).to_bytes(n, "little"))
    else:
        print("unknown command %s" % cmd, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
