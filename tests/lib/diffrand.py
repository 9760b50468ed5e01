#!/usr/bin/env python3
"""Differential random test of cowtree-io against qemu-io, and the shadow model it uses.

Two modes:

  diffrand.py [--seed N] [--ops N] [--batch N] [--keep DIR] [--create-with qemu]
              [--no-discard] [-v]
      Build identical backing chains (made with qemu-img/qemu-io) for a cowtree image and a
      qemu twin, create a qcow2 overlay on each (cowtree-img create / qemu-img create), then
      apply the same seeded random operation sequence to both: batches of `-c` commands, one
      cowtree-io and one qemu-io process per batch. Reads are `read -P` checks against a
      shadow model of the expected content. After every batch `qemu-img compare` must say the
      two overlays are identical and `qemu-img check` must be clean on both. The image
      geometry (v2/v3, cluster size, extended_l2, backing layout) is derived from the seed, so
      `--seed N` alone replays a run. Exit 0 pass, 1 fail.

  diffrand.py expect --layer SPEC [--layer SPEC ...] [--view I | --all-views PREFIX]
                     [--ignore OFF:LEN ...]
      Shadow model of a backing chain whose layers were written by qemu-io style scripts;
      prints `read -P` commands that together verify every byte of layer I's view (default:
      the top), or writes those of every layer to PREFIX0, PREFIX1, ... SPEC is comma separated key=value: fmt=qcow2|raw, compat=0.10|1.1,
      cluster=BYTES, size=BYTES, script=FILE (one qemu-io command per line, `#` comments).

Model semantics (those of qemu 7.2 on qcow2):
  - write -P / write -z: the bytes become the pattern / zero;
  - discard acts on whole clusters only: partial clusters at either end are ignored, except a
    cluster-aligned partial last cluster that reaches the end of the image. A discarded
    cluster reads as zero. Exception: on compat=0.10 (v2) images that have a backing file,
    qemu ignores discard altogether (v2 has no zero flag, and dropping the cluster would
    expose the backing file's data), so nothing changes;
  - bytes of an overlay past the end of its (shorter) backing file read as zero.

The binaries come from $COWTREE_BUILD (default: <repo>/build): cowtree-img, cowtree-io.
"""

import argparse
import hashlib
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
TOP = os.environ.get("COWTREE_TOP") or os.path.dirname(os.path.dirname(HERE))
BUILD = os.environ.get("COWTREE_BUILD") or os.path.join(TOP, "build")

KiB = 1024
MiB = 1024 * 1024


# ---------------------------------------------------------------------------------------------
# Shadow model


def parse_size(s):
    s = s.strip()
    mult = {"k": KiB, "m": MiB, "g": 1024 * MiB, "t": 1024 * 1024 * MiB}
    if s and s[-1].lower() in mult:
        return int(s[:-1], 0) * mult[s[-1].lower()]
    if s and s[-1].lower() == "b":
        return int(s[:-1], 0)
    return int(s, 0)


def is_v3(compat):
    return compat in ("1.1", "v3")


_BLOCKS = {}


def _block(b):
    """64 KiB of byte b (cached)."""
    blk = _BLOCKS.get(b)
    if blk is None:
        blk = _BLOCKS[b] = bytes((b,)) * 65536
    return blk


class Layer:
    """Flat expected content of one image as seen through its backing chain."""

    def __init__(self, size, cluster=65536, compat="1.1", fmt="qcow2", below=None):
        self.size = size
        self.cluster = cluster
        self.v3 = is_v3(compat)
        self.fmt = fmt
        self.has_backing = below is not None
        self.below = bytearray(size)  # what the backing chain shows (zero past its end)
        if below is not None:
            n = min(size, len(below))
            self.below[:n] = below[:n]
        self.view = bytearray(self.below)

    def _check(self, off, n):
        if off < 0 or n < 0 or off + n > self.size:
            raise ValueError("request %d+%d outside image of size %d" % (off, n, self.size))

    def write(self, off, n, pattern):
        self._check(off, n)
        self.view[off:off + n] = bytes((pattern,)) * n

    def zero(self, off, n):
        self._check(off, n)
        self.view[off:off + n] = bytes(n)

    def discard_range(self, off, n):
        """The byte range a discard really affects (may be empty)."""
        c = self.cluster
        end = off + n
        s = -(-off // c) * c
        e = end if end == self.size else end // c * c
        return s, e

    def discard(self, off, n):
        self._check(off, n)
        if self.fmt != "qcow2":
            raise ValueError("the model knows discard on qcow2 only")
        if not self.v3 and self.has_backing:
            return  # qemu ignores discard on v2 images with a backing file
        s, e = self.discard_range(off, n)
        if s < e:
            self.view[s:e] = bytes(e - s)

    def apply(self, line):
        """Apply one qemu-io command line (write/discard; read/flush are ignored)."""
        words = line.split()
        if not words:
            return
        verb, args = words[0], words[1:]
        pattern, zero, pos = 0xCD, False, []
        i = 0
        while i < len(args):
            a = args[i]
            if a == "-P":
                pattern = int(args[i + 1], 0)
                i += 2
                continue
            if a == "-z":
                zero = True
            elif a.startswith("-"):
                pass
            else:
                pos.append(parse_size(a))
            i += 1
        if verb == "write":
            off, n = pos
            if zero:
                self.zero(off, n)
            else:
                self.write(off, n, pattern)
        elif verb == "discard":
            off, n = pos
            self.discard(off, n)
        elif verb in ("read", "flush", "map", "length", "alloc"):
            pass
        else:
            raise ValueError("model does not know command %r" % line)

    def run_len(self, i, end):
        """Length of the run of equal bytes starting at i, not past end."""
        pat = bytes((self.view[i],))
        chunk = self.view[i:min(end, i + 4096)]
        n = len(chunk) - len(chunk.lstrip(pat))
        if n < len(chunk):
            return n
        blk = _block(self.view[i])
        w = len(blk)
        mv = memoryview(self.view)
        while i + n + w <= end and mv[i + n:i + n + w] == blk:
            n += w
        mv.release()
        chunk = self.view[i + n:min(end, i + n + w)]
        return n + len(chunk) - len(chunk.lstrip(pat))

    def runs(self, off, end, limit=None):
        """Yield (offset, length, byte) for the uniform runs covering [off, end)."""
        i, count = off, 0
        while i < end and (limit is None or count < limit):
            n = self.run_len(i, end)
            yield i, n, self.view[i]
            i += n
            count += 1

    def reads(self, off, end, limit=None, quiet=False, maxlen=8 * MiB):
        q = "-q " if quiet else ""
        out = []
        for o, n, b in self.runs(off, end, limit):
            while n > 0:
                k = min(n, maxlen)
                out.append("read %s-P 0x%02x %d %d" % (q, b, o, k))
                o += k
                n -= k
        return out


def expect_main(argv):
    ap = argparse.ArgumentParser(prog="diffrand.py expect")
    ap.add_argument("--layer", action="append", required=True)
    ap.add_argument("--view", type=int, default=-1)
    ap.add_argument("--ignore", action="append", default=[],
                    help="OFF:LEN range whose content the model does not know")
    ap.add_argument("--no-subreads", action="store_true")
    ap.add_argument("--all-views", metavar="PREFIX",
                    help="write the reads for every layer's view to PREFIX0, PREFIX1, ...")
    a = ap.parse_args(argv)
    layers = []
    below = None
    for spec in a.layer:
        kv = dict(p.split("=", 1) for p in spec.split(","))
        lay = Layer(parse_size(kv["size"]), parse_size(kv.get("cluster", "65536")),
                    kv.get("compat", "1.1"), kv.get("fmt", "qcow2"), below)
        if kv.get("script"):
            with open(kv["script"]) as f:
                for line in f:
                    line = line.split("#", 1)[0].strip()
                    if line:
                        lay.apply(line)
        layers.append(lay)
        below = lay.view
    ignore = []
    for r in a.ignore:
        o, n = r.split(":")
        ignore.append((parse_size(o), parse_size(o) + parse_size(n)))
    if a.all_views:
        for i, lay in enumerate(layers):
            with open("%s%d" % (a.all_views, i), "w") as f:
                f.write(expect_reads(lay, ignore, a.no_subreads))
    else:
        sys.stdout.write(expect_reads(layers[a.view], ignore, a.no_subreads))
    return 0


def expect_reads(lay, ignore, no_subreads):
    """read -P commands covering every byte of lay.view outside the ignored ranges."""
    pieces = [(0, lay.size)]
    for lo, hi in ignore:
        nxt = []
        for s, e in pieces:
            if hi <= s or lo >= e:
                nxt.append((s, e))
                continue
            if s < lo:
                nxt.append((s, lo))
            if hi < e:
                nxt.append((hi, e))
        pieces = nxt
    out = []
    for s, e in pieces:
        for o, n, b in lay.runs(s, e):
            out.extend(lay.reads(o, o + n))
            if not no_subreads and n >= 3:
                # an extra small unaligned read inside the run
                so = o + n // 3 + (1 if n > 8 else 0)
                sn = max(1, min(n // 3, 4099))
                out.append("read -P 0x%02x %d %d" % (b, so, sn))
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------------------------
# Differential random driver

# (name, compat, cluster size, extended_l2) of the overlay under test; picked by seed % len.
CONFIGS = [
    ("v2-4k", "0.10", 4 * KiB, False),
    ("v3-64k-extl2", "1.1", 64 * KiB, True),
    ("v3-4k", "1.1", 4 * KiB, False),
    ("v2-64k", "0.10", 64 * KiB, False),
    ("v3-64k", "1.1", 64 * KiB, False),
    ("v3-32k-extl2", "1.1", 32 * KiB, True),
]


class Failure(Exception):
    pass


def run(cmd, cwd, check_rc=True):
    try:
        p = subprocess.run(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    except OSError as e:
        raise Failure("cannot run %s: %s" % (cmd[0], e))
    out = p.stdout.decode(errors="replace") + p.stderr.decode(errors="replace")
    if check_rc and p.returncode != 0:
        raise Failure("command failed (rc=%d): %s\n%s" % (p.returncode, short(cmd), tail(out)))
    return p.returncode, out


def short(cmd):
    s = " ".join(cmd)
    return s if len(s) < 400 else s[:300] + " ... " + s[-80:]


def tail(out, n=30):
    lines = out.splitlines()
    interesting = [l for l in lines if re.search(r"fail|error|mismatch|corrupt|leak|abort", l, re.I)]
    if interesting:
        lines = interesting
    return "\n".join("    " + l for l in lines[:n])


def io_args(cmds):
    args = []
    for c in cmds:
        args += ["-c", c]
    return args


def sha(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for blk in iter(lambda: f.read(1 << 20), b""):
            h.update(blk)
    return h.hexdigest()


class Generator:
    def __init__(self, rng, top, backing_end, discard=True):
        self.discard = discard
        self.rng = rng
        self.top = top
        self.c = top.cluster
        self.size = top.size
        self.bend = backing_end

    def offset(self):
        r, rng, c, size = self.rng.random(), self.rng, self.c, self.size
        if r < 0.35:
            o = rng.randrange(size)
        elif r < 0.55:  # near a cluster boundary
            o = rng.randrange(size // c + 1) * c + rng.randint(-2048, 2048)
        elif r < 0.70:  # near the end of the backing file
            o = self.bend + rng.randint(-3 * c, 3 * c)
        elif r < 0.80:  # near the end of the image
            o = size - rng.randint(1, 3 * c)
        else:  # hot region with many overlaps
            o = rng.randrange(min(size, 1 * MiB))
        return max(0, min(size - 1, o))

    def length(self):
        r, rng, c = self.rng.random(), self.rng, self.c
        if r < 0.50:
            n = rng.randint(1, 4096)
        elif r < 0.80:
            n = rng.randint(1, 3 * c)
        elif r < 0.97:
            n = rng.randint(1, 128) * 512
        else:
            n = rng.randint(1, 512 * KiB)
        return n

    def range(self):
        o = self.offset()
        n = min(self.length(), self.size - o)
        return o, max(1, n)

    def aligned_range(self):
        c = self.c
        nclus = -(-self.size // c)
        first = self.offset() // c
        k = self.rng.randint(1, 4)
        last = min(nclus, first + k)
        o = first * c
        e = min(self.size, last * c)
        return o, e - o

    def op(self):
        """Return a list of commands (one logical operation) and apply it to the model."""
        rng, top = self.rng, self.top
        r = rng.random()
        if not self.discard and 0.50 <= r < 0.63:
            r = 0.99  # a read instead
        if r < 0.38:
            o, n = self.range()
            p = rng.randrange(256)
            top.write(o, n, p)
            return ["write -q -P 0x%02x %d %d" % (p, o, n)]
        if r < 0.50:
            o, n = self.range()
            top.zero(o, n)
            u = "-u " if rng.random() < 0.3 else ""
            return ["write -q -z %s%d %d" % (u, o, n)]
        if r < 0.63:
            o, n = self.aligned_range() if rng.random() < 0.5 else self.range()
            top.discard(o, n)
            return ["discard -q %d %d" % (o, n)]
        if r < 0.64:
            return ["flush"]
        o, n = self.range()
        return top.reads(o, o + n, limit=4, quiet=True)


def build_chain(d, rng, cfg, workdir):
    """Create the backing chain in directory d with qemu tools; return (layers, files, desc)."""
    name, compat, c, ext = cfg
    top_size = rng.randrange(8 * MiB, 20 * MiB, 512)
    if rng.random() < 0.5:
        top_size = top_size // c * c  # cluster aligned half of the time
    base_fmt = rng.choice(["raw", "qcow2"])
    base_size = rng.randrange(top_size // 3, top_size * 3 // 4) // 512 * 512
    if base_fmt == "raw" and rng.random() < 0.5:
        base_size += rng.randrange(1, 512)  # raw file of a size that is not sector aligned
    have_mid = rng.random() < 0.5
    mid_size = rng.randrange(base_size + 512, top_size) // 512 * 512 if have_mid else None
    files, layers, desc = [], [], []

    base_file = "base." + base_fmt
    if base_fmt == "raw":
        run(["qemu-img", "create", "-q", "-f", "raw", base_file, str(base_size)], d)
        base = Layer(base_size, 512, "1.1", "raw")
    else:
        bc = rng.choice([4 * KiB, 64 * KiB])
        bcompat = rng.choice(["0.10", "1.1"])
        run(["qemu-img", "create", "-q", "-f", "qcow2", "-o",
             "compat=%s,cluster_size=%d" % (bcompat, bc), base_file, str(base_size)], d)
        base = Layer(base_size, bc, bcompat, "qcow2")
    desc.append("%s(%d)" % (base_file, base_size))
    cmds = []
    for _ in range(40):
        o = rng.randrange(base_size)
        n = min(base_size - o, rng.randint(1, 300 * KiB))
        if rng.random() < 0.85:
            p = rng.randrange(1, 256)
            base.write(o, n, p)
            cmds.append("write -q -P 0x%02x %d %d" % (p, o, n))
        else:
            base.zero(o, n)
            cmds.append("write -q -z %d %d" % (o, n))
    cmds.append("write -q -P 0x5a %d 512" % (base_size - 512))  # data right up to the end
    base.write(base_size - 512, 512, 0x5A)
    run(["qemu-io", "-f", base_fmt] + io_args(cmds) + [base_file], d)
    files.append(base_file)
    layers.append(base)
    below_file, below_fmt, below = base_file, base_fmt, base

    if have_mid:
        mc = rng.choice([4 * KiB, 64 * KiB])
        mcompat = rng.choice(["0.10", "1.1"])
        run(["qemu-img", "create", "-q", "-f", "qcow2", "-o",
             "compat=%s,cluster_size=%d" % (mcompat, mc), "-b", below_file, "-F", below_fmt,
             "mid.qcow2", str(mid_size)], d)
        mid = Layer(mid_size, mc, mcompat, "qcow2", below.view)
        cmds = []
        for _ in range(30):
            o = rng.randrange(mid_size)
            n = min(mid_size - o, rng.randint(1, 200 * KiB))
            x = rng.random()
            if x < 0.7:
                p = rng.randrange(1, 256)
                mid.write(o, n, p)
                cmds.append("write -q -P 0x%02x %d %d" % (p, o, n))
            elif x < 0.85:
                mid.zero(o, n)
                cmds.append("write -q -z %d %d" % (o, n))
            else:
                mid.discard(o, n)
                cmds.append("discard -q %d %d" % (o, n))
        run(["qemu-io", "-f", "qcow2"] + io_args(cmds) + ["mid.qcow2"], d)
        files.append("mid.qcow2")
        layers.append(mid)
        desc.append("mid.qcow2(%d,%s,%d)" % (mid_size, mcompat, mc))
        below_file, below_fmt, below = "mid.qcow2", "qcow2", mid
    desc.append("top.qcow2(%d,%s,%d%s)" % (top_size, compat, c, ",extl2" if ext else ""))
    top_opts = "compat=%s,cluster_size=%d" % (compat, c) + (",extended_l2=on" if ext else "")
    return layers, files, below_file, below_fmt, top_size, top_opts, desc


def diff_main(argv):
    ap = argparse.ArgumentParser(prog="diffrand.py")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--ops", type=int, default=10000)
    ap.add_argument("--batch", type=int, default=300, help="operations per tool invocation")
    ap.add_argument("--keep", help="work in this directory and keep it")
    ap.add_argument("--create-with", choices=("cowtree", "qemu"), default="cowtree",
                    help="which tool creates the cowtree side's overlay (qemu: to separate "
                    "create bugs from I/O bugs)")
    ap.add_argument("--no-discard", action="store_true",
                    help="generate no discards (to look past a discard bug)")
    ap.add_argument("-v", "--verbose", action="store_true")
    a = ap.parse_args(argv)

    ct_io = os.path.join(BUILD, "cowtree-io")
    ct_img = os.path.join(BUILD, "cowtree-img")
    for b in (ct_io, ct_img):
        if not os.access(b, os.X_OK):
            print("diffrand: missing %s" % b, file=sys.stderr)
            return 1

    if a.keep:
        work = os.path.abspath(a.keep)
        shutil.rmtree(work, ignore_errors=True)
        os.makedirs(work)
    else:
        work = tempfile.mkdtemp(prefix="diffrand.")
    qd, cd = os.path.join(work, "qemu"), os.path.join(work, "cowtree")
    os.makedirs(qd)
    os.makedirs(cd)

    rng = random.Random(a.seed)
    cfg = CONFIGS[a.seed % len(CONFIGS)]
    replay = "tests/lib/diffrand.py --seed %d --ops %d --batch %d" % (a.seed, a.ops, a.batch)
    history = []  # (batch number, command)
    batch_no = 0
    desc = []
    try:
        layers, files, bfile, bfmt, top_size, top_opts, desc = build_chain(qd, rng, cfg, work)
        for f in files:
            shutil.copyfile(os.path.join(qd, f), os.path.join(cd, f))
        sums = {f: sha(os.path.join(qd, f)) for f in files}
        run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", top_opts, "-b", bfile, "-F", bfmt,
             "top.qcow2", str(top_size)], qd)
        creator = ct_img if a.create_with == "cowtree" else "qemu-img"
        run([creator, "create", "-q", "-f", "qcow2", "-o", top_opts, "-b", bfile, "-F", bfmt,
             "top.qcow2", str(top_size)], cd)
        top = Layer(top_size, cfg[2], cfg[1], "qcow2", layers[-1].view)
        gen = Generator(rng, top, layers[-1].size, not a.no_discard)
        print("seed %d: config %s, chain %s" % (a.seed, cfg[0], " <- ".join(desc)))
        sys.stdout.flush()

        done = 0
        while done < a.ops:
            batch_no += 1
            cmds = []
            k = min(a.batch, a.ops - done)
            for _ in range(k):
                cmds.extend(gen.op())
            done += k
            history.extend((batch_no, c) for c in cmds)
            step(ct_io, cd, qd, cmds, "batch %d" % batch_no)
            if a.verbose:
                print("batch %d: %d ops (%d commands) ok" % (batch_no, k, len(cmds)))
        # Finally every byte of the overlay, through both tools.
        batch_no += 1
        final = top.reads(0, top.size, quiet=True)
        history.extend((batch_no, c) for c in final)
        step(ct_io, cd, qd, final, "final full read")
        for f in files:
            if sha(os.path.join(cd, f)) != sums[f]:
                raise Failure("backing file %s was modified by cowtree" % f)
            if sha(os.path.join(qd, f)) != sums[f]:
                raise Failure("backing file %s was modified by qemu-io (test bug)" % f)
    except Failure as e:
        print("FAIL seed %d (config %s, chain %s) in batch %d:\n%s"
              % (a.seed, cfg[0], " <- ".join(desc), batch_no, e), file=sys.stderr)
        explain(e, history)
        log = os.path.join(work, "ops-seed-%d.txt" % a.seed)
        with open(log, "w") as f:
            f.write("".join("%d %s\n" % h for h in history))
        if not a.keep:
            log = "(rerun with --keep DIR to keep the commands and images)"
            shutil.rmtree(work, ignore_errors=True)
        print("replay: %s   commands: %s" % (replay, log), file=sys.stderr)
        return 1
    if not a.keep:
        shutil.rmtree(work, ignore_errors=True)
    print("seed %d: %d ops in %d batches, all equal" % (a.seed, a.ops, batch_no - 1))
    return 0


def explain(e, history):
    """Show the last commands of the history touching the offset a failure mentions."""
    m = re.search(r"(?:offset|Offset) (\d+)", str(e))
    if not m:
        return
    x = int(m.group(1))
    hits = []
    for b, c in history:
        w = c.split()
        nums = [t for t in w[1:] if re.fullmatch(r"\d+", t)]
        if len(nums) < 2:
            continue
        o, n = int(nums[-2]), int(nums[-1])
        if o <= x < o + n:
            hits.append((b, c))
    if hits:
        print("last commands touching offset %d:" % x, file=sys.stderr)
        for b, c in hits[-12:]:
            print("    batch %d: %s" % (b, c), file=sys.stderr)


def step(ct_io, cd, qd, cmds, what):
    args = io_args(cmds)
    rc, out = run([ct_io, "-f", "qcow2"] + args + ["top.qcow2"], cd, check_rc=False)
    if rc != 0 or "verification failed" in out:
        raise Failure("%s: cowtree-io (%d commands) rc=%d\n%s" % (what, len(cmds), rc, tail(out)))
    rc, out = run(["qemu-io", "-t", "unsafe", "-f", "qcow2"] + args + ["top.qcow2"], qd, check_rc=False)
    if rc != 0 or "verification failed" in out:
        raise Failure("%s: qemu-io twin rc=%d (model or test bug)\n%s" % (what, rc, tail(out)))
    rc, out = run(["qemu-img", "compare", "-f", "qcow2", "-F", "qcow2",
                   os.path.join(cd, "top.qcow2"), os.path.join(qd, "top.qcow2")], cd,
                  check_rc=False)
    if rc != 0:
        raise Failure("%s: qemu-img compare cowtree/top.qcow2 qemu/top.qcow2 rc=%d: %s"
                      % (what, rc, out.strip()))
    for d, who in ((cd, "cowtree"), (qd, "qemu")):
        rc, out = run(["qemu-img", "check", "-f", "qcow2", "top.qcow2"], d, check_rc=False)
        if rc != 0:
            raise Failure("%s: qemu-img check of the %s image rc=%d\n%s"
                          % (what, who, rc, tail(out, 20)))


def main(argv):
    if argv and argv[0] == "expect":
        return expect_main(argv[1:])
    return diff_main(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
