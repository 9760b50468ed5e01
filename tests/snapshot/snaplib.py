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
  snaplib.py set-extra FILE N                 rewrite the snapshot table with N bytes of extra
                                              data per entry (16: as QEMU < 5.0 wrote it)
  snaplib.py set-clock FILE NAME NSEC [ICOUNT] patch a snapshot's VM clock (and icount)
  snaplib.py dirty FILE on|off                set/clear incompatible feature bit 0 (dirty)
  snaplib.py compressed FILE                  print the guest offsets of compressed clusters (active)
  snaplib.py listings-equal QEMU_INFO_JSON CT_LIST_JSON [CT_INFO_JSON]
                                              exit 0 if the snapshot lists are equal, else print
                                              the difference and exit 1
  snaplib.py names FILE                       print "id<TAB>name" of each snapshot (table order)
  snaplib.py randbytes SEED N OUT             N pseudo-random bytes
  snaplib.py verify IMG STATEDIR KINDSFILE TMPDIR
                                              all checks of snapcommon.sh's `everything`; exit
                                              status = number of failed assertions (max 100)
"""

import json
import random
import struct
import sys

sys.dont_write_bytecode = True  # no __pycache__ next to the tests (nor in tests/lib)


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
            # the whole entry (with extended L2 also the subcluster bitmap)
            self.pwrite(l2e_off, bytes(self.l2_entry_bytes))
            return l2e, 0
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

    def set_extra_size(self, n):
        """Rewrite the snapshot table in place with N bytes of extra data per entry (16 is what
        QEMU 1.1 to 4.2 wrote: no icount field). Shrinking only; the table keeps its offset,
        clusters it no longer needs are left allocated (a leak for check -r leaks)."""
        off = self.snapshots_off
        blob = b""
        for _ in range(self.nb_snapshots):
            fixed = self.pread(off, 40)
            (l1_off, l1_size, id_len, name_len, dsec, dnsec, clk, vmsz,
             extra) = struct.unpack(">QIHHIIQII", fixed)
            if n > extra:
                raise SystemExit("set-extra only shrinks (entry has %d bytes)" % extra)
            rest = self.pread(off + 40, extra + id_len + name_len)
            e = struct.pack(">QIHHIIQII", l1_off, l1_size, id_len, name_len, dsec, dnsec, clk,
                            vmsz, n) + rest[:n] + rest[extra:]
            blob += e + bytes((-len(e)) % 8)
            off += (40 + extra + id_len + name_len + 7) & ~7
        old_len = off - self.snapshots_off
        self.pwrite(self.snapshots_off, blob + bytes(old_len - len(blob)))
        return old_len, len(blob)

    def set_clock(self, name, nsec, icount=None):
        """Patch a snapshot's vm_clock_nsec (and icount, when the entry has room for it)."""
        for sn in self.snapshots():
            if sn["name"] == name:
                off = sn["entry_off"]
                self.pwrite(off + 24, struct.pack(">Q", nsec))
                extra = struct.unpack(">I", self.pread(off + 36, 4))[0]
                if icount is not None and extra >= 24:
                    self.pwrite(off + 40 + 16, struct.pack(">Q", icount))
                return
        raise SystemExit("no snapshot named %r" % name)

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


# ---------------------------------------------------------------------------------------------
# Model-based verification of one image (used by the shell tests' `everything`)

import os
import shutil
import subprocess

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "lib"))


def run(cmd, stdin=None):
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    return p.returncode, p.stdout.decode(errors="replace"), p.stderr.decode(errors="replace")


def load_model(d, key):
    """Layer (diffrand's shadow model) for the model state KEY ('cur' or 'snap.NAME')."""
    import diffrand
    compat, cl = open(os.path.join(d, "geom")).read().split()
    size = int(open(os.path.join(d, key + ".size")).read())
    lay = diffrand.Layer(size, int(cl), compat, "qcow2")
    for line in open(os.path.join(d, key + ".script")):
        line = line.split("#", 1)[0].strip()
        if line:
            lay.apply(line)
    return lay


def read_cmds(lay):
    out = []
    for o, n, b in lay.runs(0, lay.size):
        out.extend(lay.reads(o, o + n, quiet=True))
        if n >= 3:
            so = o + n // 3 + (1 if n > 8 else 0)
            out.append("read -q -P 0x%02x %d %d" % (b, so, max(1, min(n // 3, 4099))))
    return out


def first_diff(path, lay, n=None):
    """None if the file equals the model's bytes, else a description of the first difference.
    With n, only the first n bytes are compared (and the file must be at least that long)."""
    size = os.path.getsize(path)
    if n is None:
        if size != lay.size:
            return "size %d, expected %d" % (size, lay.size)
        n = size
    elif size < n:
        return "size %d, expected at least %d" % (size, n)
    with open(path, "rb") as f:
        off = 0
        while off < n:
            blk = f.read(min(1 << 22, n - off))
            exp = bytes(lay.view[off:off + len(blk)])
            if blk != exp:
                i = next(k for k in range(len(blk)) if blk[k] != exp[k])
                return ("first difference at offset %d: 0x%02x, expected 0x%02x"
                        % (off + i, blk[i], exp[i]))
            off += len(blk)
    return None


def model_snaps(d):
    return sorted(f[5:-7] for f in os.listdir(d) if f.startswith("snap.") and f.endswith(".script"))


class Verifier:
    def __init__(self, ct_img, ct_io, kinds_file, tmp):
        self.ct_img, self.ct_io = ct_img, ct_io
        self.kinds_file = kinds_file
        self.tmp = tmp
        self.nfail = 0
        self.msgs = []

    def fail(self, msg, kind=None):
        self.nfail += 1
        if kind:
            seen = set()
            if os.path.exists(self.kinds_file):
                seen = set(open(self.kinds_file).read().split())
            if kind in seen:
                return
            with open(self.kinds_file, "a") as f:
                f.write(kind + "\n")
            msg += " (further failures of this kind are counted, not shown)"
        self.msgs.append(msg)

    def clean(self, img):
        before = self.nfail
        rc, out, err = run(["qemu-img", "check", "-f", "qcow2", "--output=json", img])
        if rc != 0:
            _, hout, herr = run(["qemu-img", "check", "-f", "qcow2", img])
            self.fail("%s: qemu-img check rc=%d: %s" % (img, rc, (hout + herr).strip()[:1500]))
        else:
            j = json.loads(out)
            bad = {k: j.get(k, 0) for k in ("leaks", "corruptions", "check-errors") if j.get(k, 0)}
            if bad:
                self.fail("%s: qemu-img check reports %s" % (img, bad))
        rc, out, err = run([self.ct_img, "check", "-f", "qcow2", img])
        if rc != 0:
            self.fail("%s: cowtree-img check rc=%d (%s): %s"
                      % (img, rc, "qemu-img check failed too" if self.nfail > before else
                         "qemu-img check finds the image clean", (out + err).strip()[:1500]))

    def lists(self, img, d):
        rc, qinfo, err = run(["qemu-img", "info", "-U", "--output=json", img])
        if rc != 0:
            self.fail("%s: qemu-img info failed: %s" % (img, err.strip()))
            return None
        qinfo = json.loads(qinfo)
        qs = qinfo.get("snapshots", [])
        rc, cl, err = run([self.ct_img, "snapshot", "-l", "--output=json", img])
        if rc != 0:
            self.fail("%s: cowtree-img snapshot -l --output=json rc=%d: %s" % (img, rc, err.strip()))
        elif json.loads(cl) != qs:
            self.fail("%s: cowtree-img snapshot -l --output=json differs from qemu-img info's "
                      "snapshots:\n  qemu-img: %s\n  cowtree : %s"
                      % (img, json.dumps(qs, sort_keys=True), json.dumps(json.loads(cl), sort_keys=True)))
        rc, ci, err = run([self.ct_img, "info", "--output=json", img])
        if rc != 0:
            self.fail("%s: cowtree-img info --output=json rc=%d: %s" % (img, rc, err.strip()))
        else:
            ci = json.loads(ci)
            if ci.get("snapshots", []) != qs:
                self.fail("%s: cowtree-img info --output=json snapshots differ from qemu-img's:\n"
                          "  qemu-img: %s\n  cowtree : %s" % (img, json.dumps(qs, sort_keys=True),
                                                             json.dumps(ci.get("snapshots", []), sort_keys=True)))
            if ci.get("virtual-size") != qinfo.get("virtual-size"):
                self.fail("%s: cowtree-img info virtual-size %s, qemu-img %s"
                          % (img, ci.get("virtual-size"), qinfo.get("virtual-size")))
        _, q, _ = run(["qemu-img", "snapshot", "-l", img])
        rc, c, err = run([self.ct_img, "snapshot", "-l", img])
        if q != c:
            self.fail("%s: 'snapshot -l' human listing differs from qemu-img's:\n--- qemu-img\n%s"
                      "--- cowtree-img\n%s" % (img, q, c), kind="human-list")

        def section(t):
            lines, on = [], False
            for l in t.splitlines():
                if l.startswith("Snapshot list:"):
                    on = True
                elif l.startswith("Format specific"):
                    on = False
                if on:
                    lines.append(l)
            return "\n".join(lines)
        _, q, _ = run(["qemu-img", "info", "-U", img])
        _, c, _ = run([self.ct_img, "info", img])
        if section(q) != section(c):
            self.fail("%s: 'info' snapshot section differs from qemu-img's:\n--- qemu-img\n%s\n"
                      "--- cowtree-img\n%s" % (img, section(q), section(c)), kind="human-info")
        want = model_snaps(d)
        got = sorted(s["name"] for s in qs)
        if want != got:
            self.fail("%s: qemu-img lists snapshots %s, expected %s" % (img, got, want))
        return qinfo

    def active(self, img, d, qinfo):
        lay = load_model(d, "cur")
        if qinfo is not None and qinfo.get("virtual-size") != lay.size:
            self.fail("%s: virtual size %s, expected %d" % (img, qinfo.get("virtual-size"), lay.size))
        cmds = read_cmds(lay)
        args = []
        for c in cmds:
            args += ["-c", c]
        for name, tool in (("qemu-io", "qemu-io"), ("cowtree-io", self.ct_io)):
            rc, out, err = run([tool, "-r", "-f", "qcow2"] + args + [img])
            bad = [l for l in (out + err).splitlines()
                   if re.search(r"fail|error|mismatch", l, re.I)]
            if rc != 0 or bad:
                self.fail("%s: active state wrong as read by %s (rc=%d): %s"
                          % (img, name, rc, "; ".join(bad[:4])))

    def snapshot(self, img, d, name, active_size):
        """qemu-img convert -l: QEMU 7.2 keeps the active virtual size for it (load_tmp swaps the
        L1 table only), so compare [0, min(snapshot size, active size)) there; past the
        snapshot's own size QEMU reads whatever the snapshot's L1 maps (e.g. VM state).
        The snapshot's own size is checked in the table and, when it differs from the active
        size, by qemu-img snapshot -a on a copy, then converting the copy in full."""
        lay = load_model(d, "snap." + name)
        raw = os.path.join(self.tmp, "snap-verify.raw")
        if os.path.exists(raw):
            os.unlink(raw)
        rc, out, err = run(["qemu-img", "convert", "-f", "qcow2", "-l", "snapshot.name=" + name,
                            "-O", "raw", img, raw])
        if rc != 0:
            self.fail("%s: qemu-img convert -l %s failed: %s" % (img, name, err.strip()))
            return
        n = min(lay.size, active_size if active_size is not None else lay.size)
        why = first_diff(raw, lay, n)
        if why:
            self.fail("%s: snapshot '%s' (qemu-img convert -l) wrong: %s" % (img, name, why))
        os.unlink(raw)
        tbl = [x for x in Qcow2(img).snapshots() if x["name"] == name]
        if len(tbl) == 1 and tbl[0]["disk_size"] != lay.size:
            self.fail("%s: snapshot '%s' records disk size %d, expected %d"
                      % (img, name, tbl[0]["disk_size"], lay.size))
        if active_size is not None and lay.size != active_size:
            cp = os.path.join(self.tmp, "snap-verify.qcow2")
            shutil.copyfile(img, cp)
            rc, out, err = run(["qemu-img", "snapshot", "-a", name, cp])
            if rc != 0:
                self.fail("%s: qemu-img snapshot -a %s (on a copy) failed: %s" % (img, name, err.strip()))
            else:
                rc, out, err = run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", cp, raw])
                why = first_diff(raw, lay) if rc == 0 else "qemu-img convert failed: " + err.strip()
                if why:
                    self.fail("%s: snapshot '%s' applied by qemu-img (on a copy) wrong: %s"
                              % (img, name, why))
                if os.path.exists(raw):
                    os.unlink(raw)
            os.unlink(cp)

    def everything(self, img, d):
        self.clean(img)
        qinfo = self.lists(img, d)
        self.active(img, d, qinfo)
        for s in model_snaps(d):
            self.snapshot(img, d, s, qinfo.get("virtual-size") if qinfo else None)


import re


def verify_main(a):
    img, d, kinds, tmp = a[:4]
    build = os.environ.get("COWTREE_BUILD")
    v = Verifier(os.path.join(build, "cowtree-img"), os.path.join(build, "cowtree-io"), kinds, tmp)
    v.everything(img, d)
    step = os.environ.get("SNAP_STEP", "")
    for m in v.msgs:
        print("FAIL [%s]: %s" % (step, m), file=sys.stderr)
    return min(v.nfail, 100)


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
    elif cmd == "set-extra":
        print("snapshot table: %d -> %d bytes" % Qcow2(a[0]).set_extra_size(int(a[1])))
    elif cmd == "set-clock":
        Qcow2(a[0]).set_clock(a[1], int(a[2]), int(a[3]) if len(a) > 3 else None)
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
    elif cmd == "verify":
        return verify_main(a)
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
