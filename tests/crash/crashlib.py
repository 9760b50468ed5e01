"""Shared machinery for the crash-safety tests in tests/crash/.

A *scenario* is a starting image (a qcow2 overlay made by cowtree over a backing file made by
qemu) plus a deterministic *workload*: a list of cowtree-io commands (pattern writes of mixed
sizes and alignments, zero writes, discards, one growing truncate) cut into segments, each
ending with `flush`.  Every workload command is followed by a `length` command, which performs
no write and prints one line, so the stdout of a run (flushed after every command) tells the
driver exactly how many commands completed before a SIGKILL and which of them failed.

Before any fault is injected the scenario is analysed with clean runs of every prefix of the
workload (COWTREE_FAULT=count, COWTREE_FAULT_REPORT=1): that yields the write/flush counts the
K values are chosen from, and the image content after every command, which is checked against
an independent byte model (pattern writes and zero writes exactly; discards may only turn whole
sectors inside the range into zeros or backing data) and, for the whole workload, against
qemu-io running the same commands.

The oracle for a faulted run works per 512-byte sector.  Starting from the initial content, the
commands are folded in order: a *certain* command (acknowledged and followed by a completed
flush) replaces the set of possible contents by its image, an *uncertain* one (in the interrupted
segment, failed, or not followed by a completed flush) adds its image to the set.  The actual
content of every sector must be one of the possible contents; sectors no command touched must be
unchanged.  So durable data must read back exactly, and a sector written in an interrupted
segment holds the content it had before some in-order subset of that segment's commands was
applied -- old or new per request, never a mix inside a sector, never foreign bytes.
"""

import concurrent.futures
import itertools
import json
import os
import random
import re
import shlex
import shutil
import subprocess
import sys
import time

SECTOR = 512
KiB = 1024
MiB = 1024 * 1024

SANITIZER_RE = re.compile(r"(ERROR: (Address|Leak|Memory|Thread)Sanitizer|runtime error:|"
                          r"UndefinedBehaviorSanitizer|SUMMARY: \w+Sanitizer)")
FAIL_LINE_RE = re.compile(r"^(write|read|discard|flush|map|alloc) failed: |^truncate: ")
MARKER_RE = re.compile(r"^\d+(\.\d+)? (bytes|KiB|MiB|GiB|TiB|PiB|EiB)$")
COUNTS_RE = re.compile(r"fault-counts: writes=(\d+) flushes=(\d+)")


def long_mode():
    return os.environ.get("COWTREE_TEST_LONG", "0") not in ("", "0")


def log(*a):
    print(*a, flush=True)


class Tools:
    def __init__(self, build):
        self.build = os.path.abspath(build)
        self.img = os.path.join(self.build, "cowtree-img")
        self.io = os.path.join(self.build, "cowtree-io")
        for p in (self.img, self.io):
            if not os.access(p, os.X_OK):
                raise FileNotFoundError(p)
        self.jobs = max(1, int(os.environ.get("COWTREE_CRASH_JOBS", os.cpu_count() or 2)))


def clean_env(extra=None):
    env = dict(os.environ)
    for k in ("COWTREE_FAULT", "COWTREE_FAULT_REPORT"):
        env.pop(k, None)
    # Make sanitizer reports land on stderr and keep their exit code recognisable.
    env.setdefault("ASAN_OPTIONS", "detect_leaks=1")
    env.setdefault("UBSAN_OPTIONS", "print_stacktrace=1")
    if extra:
        env.update(extra)
    return env


class Result:
    def __init__(self, argv, rc, out, err, env_extra):
        self.argv, self.rc, self.out, self.err, self.env_extra = argv, rc, out, err, env_extra

    def sanitizer(self):
        m = SANITIZER_RE.search(self.err)
        return self.err[m.start():m.start() + 600] if m else None

    def counts(self):
        m = COUNTS_RE.search(self.err)
        return (int(m.group(1)), int(m.group(2))) if m else None

    def describe(self):
        return "rc=%s\n  stdout: %s\n  stderr: %s" % (
            self.rc, tail(self.out), tail(self.err))


def tail(s, n=8):
    lines = s.strip().splitlines()
    if len(lines) > n:
        lines = ["..."] + lines[-n:]
    return "\n    ".join(lines) if lines else "(empty)"


def run(argv, env_extra=None, cwd=None, timeout=300):
    for attempt in range(6):
        try:
            p = subprocess.run(argv, cwd=cwd, env=clean_env(env_extra), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, timeout=timeout)
            rc = p.returncode
            out, err = p.stdout, p.stderr
            break
        except subprocess.TimeoutExpired as e:
            rc = "timeout (%ds)" % timeout
            out, err = e.stdout or b"", e.stderr or b""
            break
        except OSError as e:
            # The binary is being relinked under us (ETXTBSY/EACCES/ENOENT): try again.
            rc = "exec failed: %s" % e
            out = err = b""
            time.sleep(0.5 * (attempt + 1))
    return Result(argv, rc, out.decode("utf-8", "replace"), err.decode("utf-8", "replace"),
                  env_extra)


def must(res, what):
    if res.rc != 0:
        raise RuntimeError("%s failed: %s %s" % (what, " ".join(map(shlex.quote, res.argv)),
                                                 res.describe()))
    return res


def env_prefix(env_extra):
    return " ".join("%s=%s" % (k, shlex.quote(v)) for k, v in (env_extra or {}).items())


def cmdline(argv, env_extra=None, tools=None):
    s = " ".join(shlex.quote(a) for a in argv)
    if env_extra:
        s = env_prefix(env_extra) + " " + s
    return s


def qemu_check(path, cwd=None):
    """qemu-img check --output=json: (rc, parsed dict or None, human output)."""
    r = run(["qemu-img", "check", "-f", "qcow2", "--output=json", path], cwd=cwd)
    info = None
    try:
        info = json.loads(r.out) if r.out.strip() else None
    except ValueError:
        info = None
    human = None
    if r.rc not in (0,):
        human = run(["qemu-img", "check", "-f", "qcow2", path], cwd=cwd)
        human = (human.out + human.err).strip()
    return r.rc, info, human


def check_summary(rc, info, human):
    if info:
        keys = ("corruptions", "leaks", "check-errors", "corruptions-fixed", "leaks-fixed")
        parts = ["%s=%s" % (k, info[k]) for k in keys if info.get(k)]
        s = "rc=%s %s" % (rc, " ".join(parts))
    else:
        s = "rc=%s" % rc
    if human and rc not in (0, 3):
        lines = [l for l in human.splitlines() if l.strip()]
        errs = [l for l in lines if "ERROR" in l or "rror" in l.split(":")[0]]
        rest = [l for l in lines if l not in errs and not l.startswith("Leaked cluster")]
        shown = errs[:10] + (["... %d more ERROR lines" % (len(errs) - 10)] if len(errs) > 10
                             else []) + rest[:6]
        s += "\n    " + "\n    ".join(shown)
    return s


def qemu_raw(path, out_path, cwd=None):
    r = run(["qemu-img", "convert", "-O", "raw", path, out_path], cwd=cwd)
    if r.rc != 0:
        return None, r
    with open(out_path, "rb") as f:
        data = f.read()
    os.unlink(out_path)
    return data, r


def qcow2_header(path):
    """A few fixed header fields of a qcow2 file."""
    import struct
    with open(path, "rb") as f:
        h = f.read(104)
    if len(h) < 72 or h[:4] != b"QFI\xfb":
        return None
    ver, = struct.unpack(">I", h[4:8])
    size, = struct.unpack(">Q", h[24:32])
    l1_size, l1_off, rt_off, rt_clusters = struct.unpack(">IQQI", h[36:60])
    return {"version": ver, "size": size, "l1_size": l1_size, "l1_offset": l1_off,
            "reftable_offset": rt_off, "reftable_clusters": rt_clusters,
            "incompat": struct.unpack(">Q", h[72:80])[0] if ver >= 3 and len(h) >= 80 else 0,
            "file_size": os.path.getsize(path)}


def summarize_bytes(b):
    """Run-length summary of a sector, e.g. '0x41*300 0x00*212'."""
    out = []
    i = 0
    while i < len(b) and len(out) < 6:
        j = i
        while j < len(b) and b[j] == b[i]:
            j += 1
        out.append("0x%02x*%d" % (b[i], j - i))
        i = j
    if i < len(b):
        out.append("...")
    return " ".join(out)


# ---------------------------------------------------------------------------------------------
# Workload

class Cmd:
    def __init__(self, kind, off=0, length=0, pattern=None, size=0, seg=0):
        self.kind, self.off, self.length, self.pattern, self.size, self.seg = (
            kind, off, length, pattern, size, seg)

    def text(self):
        if self.kind == "write":
            return "write -q -P 0x%02x %d %d" % (self.pattern, self.off, self.length)
        if self.kind == "zero":
            return "write -q -z %d %d" % (self.off, self.length)
        if self.kind == "discard":
            return "discard -q %d %d" % (self.off, self.length)
        if self.kind == "truncate":
            return "truncate %d" % self.size
        return self.kind

    def __repr__(self):
        return self.text()


def make_workload(seed, cluster_size, size, grow_to, nseg=10, big_write=0):
    """Deterministic mixed workload; returns a list of Cmd (segments end with flush)."""
    rng = random.Random(seed)
    cs = cluster_size
    l2span = cs * (cs // 8)
    cmds = []
    pat = [0x40]
    cur_size = size
    grow_seg = nseg // 2

    def next_pattern():
        p = pat[0]
        pat[0] = p + 1 if p < 0xfe else 0x40
        return p

    def pick_range():
        shape = rng.choice(["sector", "unaligned", "tiny", "clusters", "cluster-unaligned",
                            "l2-cross", "large", "sub"])
        if shape == "sector":
            ln = SECTOR * rng.randint(1, 16)
            off = SECTOR * rng.randrange(0, (cur_size - ln) // SECTOR)
        elif shape == "unaligned":
            ln = rng.randint(1, 3 * cs + 700)
            off = rng.randrange(0, cur_size - ln)
        elif shape == "tiny":
            ln = rng.randint(1, 100)
            off = rng.randrange(0, cur_size - ln)
        elif shape == "clusters":
            ln = cs * rng.randint(1, 24)
            off = cs * rng.randrange(0, (cur_size - ln) // cs)
        elif shape == "cluster-unaligned":
            ln = cs * rng.randint(1, 6) + rng.choice([-SECTOR, SECTOR, 17, -17])
            off = cs * rng.randrange(1, (cur_size - ln) // cs) + rng.choice([0, SECTOR, -SECTOR, 5])
        elif shape == "l2-cross":
            nb = max(1, cur_size // l2span)
            b = l2span * rng.randint(1, nb) if nb > 1 else l2span
            b = min(b, cur_size - cs)
            ln = rng.randint(2 * SECTOR, 3 * cs)
            off = max(0, b - rng.randint(1, ln - 1))
        elif shape == "large":
            ln = rng.randint(64 * KiB, 320 * KiB)
            if rng.random() < 0.5:
                ln -= ln % cs
            off = rng.randrange(0, cur_size - ln)
            if rng.random() < 0.5:
                off -= off % cs
        else:  # "sub": inside one cluster, sector aligned (subcluster paths with extended L2)
            c = rng.randrange(0, cur_size // cs)
            a = rng.randrange(0, cs // SECTOR)
            b = rng.randrange(a, cs // SECTOR) + 1
            off, ln = c * cs + a * SECTOR, (b - a) * SECTOR
        ln = max(1, min(ln, cur_size - off))
        return off, ln

    for s in range(nseg):
        for _ in range(rng.randint(3, 6)):
            kind = rng.choices(["write", "zero", "discard"], weights=[6, 2, 2])[0]
            off, ln = pick_range()
            if kind == "write":
                cmds.append(Cmd("write", off, ln, pattern=next_pattern(), seg=s))
            else:
                cmds.append(Cmd(kind, off, ln, seg=s))
        if s == grow_seg and grow_to and grow_to > cur_size:
            old = cur_size
            cmds.append(Cmd("truncate", size=grow_to, seg=s))
            cur_size = grow_to
            # Data in the new area, and a write straddling the old end.
            cmds.append(Cmd("write", old + cs + 100, 3 * cs, pattern=next_pattern(), seg=s))
            cmds.append(Cmd("write", old - 700, 1400, pattern=next_pattern(), seg=s))
            if big_write:
                cmds.append(Cmd("write", old + 4 * cs, min(big_write, cur_size - old - 4 * cs),
                                pattern=next_pattern(), seg=s))
        cmds.append(Cmd("flush", seg=s))
    return cmds


def io_args(cmds):
    a = []
    for c in cmds:
        a += ["-c", c.text(), "-c", "length"]
    return a


def parse_progress(out):
    """Per completed command: True (ok) or False (it printed a failure line)."""
    st = []
    failed = False
    for line in out.splitlines():
        if FAIL_LINE_RE.match(line):
            failed = True
        elif MARKER_RE.match(line.strip()):
            st.append(not failed)
            failed = False
    return st


# ---------------------------------------------------------------------------------------------
# Scenario: starting image, clean analysis, oracle

class Variant:
    def __init__(self, name, create_opts, cluster_size, size=4 * MiB, grow_to=6 * MiB,
                 seed=1, big_write=0, nseg=10, backing=True):
        self.name, self.create_opts, self.cluster_size = name, create_opts, cluster_size
        self.backing = backing
        self.size, self.grow_to, self.seed, self.big_write, self.nseg = (
            size, grow_to, seed, big_write, nseg)
        self.v2 = "compat=0.10" in create_opts or "compat=v2" in create_opts


def default_variants():
    seed = int(os.environ.get("COWTREE_CRASH_SEED", "1"))
    vs = [
        Variant("v3", "compat=1.1,cluster_size=1024", 1024, seed=seed),
        # v2 with the smallest clusters: many L2 tables and refcount blocks.
        Variant("v2", "compat=0.10,cluster_size=512", 512, seed=seed + 1),
        Variant("extl2", "extended_l2=on,cluster_size=16k", 16384, seed=seed + 2),
        # 64-bit refcounts in 512-byte clusters: one refcount block covers 64 clusters and the
        # first refcount table 2 MiB of file, so the refcount table moves (twice) during the
        # workload.  No backing file (a 512-byte first cluster has no room for the backing
        # format extension next to the feature table).
        Variant("v3-reftable", "compat=1.1,cluster_size=512,refcount_bits=64", 512,
                size=4 * MiB, grow_to=8 * MiB, seed=seed + 3, big_write=3 * MiB,
                backing=False),
    ]
    if long_mode():
        vs += [
            Variant("v3-64k", "compat=1.1", 65536, size=8 * MiB, grow_to=12 * MiB,
                    seed=seed + 4),
            Variant("v3-rc8", "compat=1.1,cluster_size=2048,refcount_bits=8", 2048,
                    seed=seed + 5),
        ]
    only = os.environ.get("COWTREE_CRASH_VARIANTS")
    if only:
        vs = [v for v in vs if v.name in only.split(",")]
    return vs


class Scenario:
    """Starting image + workload + everything learnt from clean runs."""

    def __init__(self, tools, variant, workdir):
        self.t, self.v = tools, variant
        self.dir = os.path.join(workdir, variant.name)
        os.makedirs(self.dir, exist_ok=True)
        self.start_dir = os.path.join(self.dir, "start")
        os.makedirs(self.start_dir, exist_ok=True)
        self.cmds = make_workload(variant.seed, variant.cluster_size, variant.size,
                                  variant.grow_to, nseg=variant.nseg,
                                  big_write=variant.big_write)
        self.n = len(self.cmds)
        self.recipe = []  # (env, argv) with relative file names, run in an empty directory
        self.trial_seq = itertools.count(1)  # next() is atomic: trials run in threads
        self.setup_problems = []
        self.headers = {}
        self.coverage = ""
        self.soft_problems = []  # failures that do not invalidate the oracle

    # -- starting image ------------------------------------------------------------------
    def build_start(self):
        v, t = self.v, self.t
        sz = v.size
        base_cmds = []
        chunk = 256 * KiB
        for i in range(sz // chunk):
            if i % 4 != 3:
                base_cmds += ["-c", "write -q -P 0x%02x %d %d" % (0x10 + (i % 0x20), i * chunk,
                                                                  chunk)]
        base_cmds += ["-c", "write -q -P 0x3a 777 3000", "-c", "write -q -z %d 5000" % (chunk + 99)]
        ov_init = [
            "write -q -P 0x31 0 %d" % (64 * KiB),
            "write -q -P 0x32 %d %d" % (300 * KiB + 512, 100 * KiB),
            "write -q -z %d %d" % (1 * MiB, 64 * KiB),
            "write -q -P 0x33 %d 5000" % (2 * MiB + 123),
            "write -q -P 0x34 %d %d" % (sz - 8 * KiB, 8 * KiB),
            "discard -q %d %d" % (3 * MiB, 128 * KiB),
        ]
        for argv in (["qemu-img", "create", "-q", "-f", "qcow2", "base.qcow2", str(sz)],
                     ["qemu-io", "-f", "qcow2"] + base_cmds + ["base.qcow2"]):
            if not v.backing:
                break
            must(run(argv, cwd=self.start_dir), "building the backing file")
            self.recipe.append(argv)
        bopts = ["-b", "base.qcow2", "-F", "qcow2"] if v.backing else []
        bsize = [] if v.backing else [str(sz)]
        # The overlay is made by cowtree-img.  If that does not give a usable overlay (a bug,
        # recorded in setup_problems so the test fails), fall back to qemu-img create so that
        # the crash points can still be exercised.
        create = [t.img, "create", "-q", "-f", "qcow2"] + bopts + ["-o", v.create_opts,
                                                                   "ov.qcow2"] + bsize
        r = run(create, cwd=self.start_dir)
        why = None
        if r.rc != 0:
            why = "failed: " + r.describe()
        else:
            r2 = run([t.io, "-r", "-c", "read 0 512", "ov.qcow2"], cwd=self.start_dir)
            r3 = run(["qemu-img", "info", "--output=json", "ov.qcow2"], cwd=self.start_dir)
            try:
                qi = json.loads(r3.out)
            except ValueError:
                qi = {}
            if r2.rc != 0:
                why = "made an overlay cowtree-io cannot open: " + r2.describe()
            elif qi.get("backing-filename") != ("base.qcow2" if v.backing else None) or \
                    qi.get("virtual-size") != sz:
                why = ("made an overlay that qemu-img info reads with backing file %r and size "
                       "%r (want 'base.qcow2', %d)" % (qi.get("backing-filename"),
                                                        qi.get("virtual-size"), sz))
        if why:
            self.setup_problems.append(
                "`%s` %s\n    (the overlay is made with qemu-img create instead, to run the "
                "kill points anyway)" % (cmdline(create), why))
            if os.path.exists(os.path.join(self.start_dir, "ov.qcow2")):
                os.unlink(os.path.join(self.start_dir, "ov.qcow2"))
            create = ["qemu-img", "create", "-q", "-f", "qcow2"] + bopts + [
                "-o", v.create_opts, "ov.qcow2"] + bsize
            must(run(create, cwd=self.start_dir), "qemu-img create of the overlay")
        self.recipe.append(create)
        argv = [t.io] + sum((["-c", c] for c in ov_init), []) + ["ov.qcow2"]
        must(run(argv, cwd=self.start_dir), "writing the overlay's initial data")
        self.recipe.append(argv)
        rc, info, human = qemu_check("ov.qcow2", cwd=self.start_dir)
        if rc != 0:
            raise RuntimeError("starting image of %s does not check clean: %s" % (
                v.name, check_summary(rc, info, human)))
        if v.backing:
            self.base_raw, _ = qemu_raw("base.qcow2", os.path.join(self.start_dir, "base.raw"),
                                        cwd=self.start_dir)
        else:
            self.base_raw = b""
        s0, r = qemu_raw("ov.qcow2", os.path.join(self.start_dir, "s0.raw"), cwd=self.start_dir)
        if s0 is None:
            raise RuntimeError("qemu-img convert of the starting image failed: " + r.describe())
        self.maxsize = max(v.size, v.grow_to or 0)
        self.s0 = s0 + bytes(self.maxsize - len(s0))
        self.base_pad = self.base_raw + bytes(self.maxsize - len(self.base_raw))

    def new_trial_dir(self, tag):
        d = os.path.join(self.dir, "%s-%d" % (tag, next(self.trial_seq)))
        os.makedirs(d)
        if self.v.backing:
            os.symlink(os.path.join(self.start_dir, "base.qcow2"), os.path.join(d, "base.qcow2"))
        shutil.copyfile(os.path.join(self.start_dir, "ov.qcow2"), os.path.join(d, "ov.qcow2"))
        return d

    def workload_argv(self, cmds=None):
        return [self.t.io] + io_args(self.cmds if cmds is None else cmds) + ["ov.qcow2"]

    def repro(self, env_extra, extra_note=""):
        lines = ["# reproduce (bash; qemu-img/qemu-io 7.2 on PATH):",
                 "cd \"$(mktemp -d)\""]
        for argv in self.recipe:
            lines.append(cmdline(argv))
        lines.append(cmdline(self.workload_argv(), env_extra))
        lines.append("qemu-img check ov.qcow2                      # (a) leaks at most")
        lines.append("%s -c 'read 0 4k' ov.qcow2 && qemu-img check ov.qcow2   # (b) clean" %
                     shlex.quote(self.t.io))
        if extra_note:
            lines.append(extra_note)
        return "\n".join(lines)

    # -- clean analysis ------------------------------------------------------------------
    def analyse(self):
        """Run every prefix cleanly: counts, per-command images, model and qemu-io checks.
        Returns problems that make the oracle unusable; others go to soft_problems."""
        problems = []
        n = self.n

        def prefix(i):
            d = self.new_trial_dir("prefix")
            r = run(self.workload_argv(self.cmds[:i]),
                    {"COWTREE_FAULT": "count", "COWTREE_FAULT_REPORT": "1"}, cwd=d)
            if r.rc != 0 or r.sanitizer():
                return i, None, None, "clean run of the first %d commands failed: %s" % (
                    i, r.describe())
            counts = r.counts()
            rc, info, human = qemu_check("ov.qcow2", cwd=d)
            if rc != 0:
                shutil.rmtree(d)
                return i, counts, None, ("after a clean run of the first %d commands qemu-img "
                                         "check: %s" % (i, check_summary(rc, info, human)))
            hdr = qcow2_header(os.path.join(d, "ov.qcow2"))
            raw, rr = qemu_raw("ov.qcow2", os.path.join(d, "img.raw"), cwd=d)
            path = os.path.join(d, "state.raw")
            with open(path, "wb") as f:
                f.write(raw)
            os.unlink(os.path.join(d, "ov.qcow2"))
            return i, counts, (path, hdr), None

        self.counts = [(0, 0)]
        # Effects per command, validated against the byte model (in order, as runs finish).
        model = bytearray(self.s0)
        size = self.v.size
        self.sizes = [size]
        self.effects = []
        with concurrent.futures.ThreadPoolExecutor(self.t.jobs) as ex:
            for i, counts, path, err in ex.map(prefix, range(1, n + 1)):
                if err:
                    problems.append(err)
                if problems:
                    if path:
                        os.unlink(path[0])
                    continue
                self.counts.append(counts)
                self.headers[i] = path[1]
                c = self.cmds[i - 1]
                with open(path[0], "rb") as f:
                    st = f.read()
                os.unlink(path[0])
                if c.kind == "truncate":
                    size = c.size
                self.sizes.append(size)
                if len(st) != size:
                    problems.append("after command %d (%s) the virtual size is %d, expected %d" % (
                        i, c.text(), len(st), size))
                    continue
                st = st + bytes(self.maxsize - len(st))
                eff = {}
                if c.kind in ("write", "zero"):
                    val = c.pattern if c.kind == "write" else 0
                    model[c.off:c.off + c.length] = bytes([val]) * c.length
                elif c.kind == "discard":
                    lo = (c.off + SECTOR - 1) // SECTOR
                    hi = (c.off + c.length) // SECTOR
                    for s in range(lo, hi):
                        a = s * SECTOR
                        new = st[a:a + SECTOR]
                        old = bytes(model[a:a + SECTOR])
                        if new != old:
                            if new != bytes(SECTOR) and new != self.base_pad[a:a + SECTOR]:
                                problems.append(
                                    "discard (command %d: %s) turned sector %d into %s, which is "
                                    "neither zeroes nor the backing data" % (
                                        i, c.text(), s, summarize_bytes(new)))
                            eff[s] = (new, True)
                            model[a:a + SECTOR] = new
                        else:
                            eff[s] = (new, False)
                if st != bytes(model):
                    bad = first_diff_sectors(st, model)
                    problems.append(
                        "after a clean run of the first %d commands the image differs from the "
                        "model (last command %s) at %s" % (
                            i, c.text(), "; ".join(
                                "sector %d: got %s, want %s" % (
                                    s, summarize_bytes(st[s * SECTOR:(s + 1) * SECTOR]),
                                    summarize_bytes(model[s * SECTOR:(s + 1) * SECTOR]))
                                for s in bad[:3])))
                self.effects.append(eff)
        if problems:
            return problems
        self.final = bytes(model)
        problems += self.oracle_selftest()
        if problems:
            return problems
        self.total_writes, self.total_flushes = self.counts[n]
        h0 = qcow2_header(os.path.join(self.start_dir, "ov.qcow2"))
        l1s = {h0["l1_offset"]} | {h["l1_offset"] for h in self.headers.values()}
        rts = {h0["reftable_offset"]} | {h["reftable_offset"] for h in self.headers.values()}
        self.coverage = ("file grows %d -> %d bytes; L1 table at %d place(s), refcount table at "
                         "%d place(s)" % (h0["file_size"], self.headers[n]["file_size"],
                                          len(l1s), len(rts)))

        # The same workload through qemu-io must give the same content.
        d = self.new_trial_dir("qemu")
        r = run(["qemu-io", "-f", "qcow2"] + io_args(self.cmds) + ["ov.qcow2"], cwd=d)
        if r.rc != 0:
            problems.append("qemu-io could not run the workload: " + r.describe())
        else:
            q, _ = qemu_raw("ov.qcow2", os.path.join(d, "q.raw"), cwd=d)
            q = q + bytes(self.maxsize - len(q))
            if q != self.final:
                bad = first_diff_sectors(q, self.final)
                self.soft_problems.append(
                    "qemu-io and cowtree-io disagree on the workload's result: %s" % "; ".join(
                        "sector %d (offset %d): qemu %s, cowtree %s%s" % (
                            s, s * SECTOR, summarize_bytes(q[s * SECTOR:(s + 1) * SECTOR]),
                            summarize_bytes(self.final[s * SECTOR:(s + 1) * SECTOR]),
                            self.blame(s)) for s in bad[:3]))
        shutil.rmtree(d)
        return problems

    def blame(self, s):
        """The last workload command touching sector s."""
        for i in range(self.n, 0, -1):
            c = self.cmds[i - 1]
            if c.kind in ("write", "zero", "discard") and \
                    c.off < (s + 1) * SECTOR and c.off + c.length > s * SECTOR:
                return " [last written by command %d `%s`]" % (i, c.text())
        return ""

    def oracle_selftest(self):
        """The oracle must accept the clean result and reject obviously wrong content."""
        errs = []
        allc = [(i, True) for i in range(1, self.n + 1)]
        P, sizes = self.possible(allc)
        final = self.final[:self.sizes[-1]]
        if self.verify(final, P, sizes):
            errs.append("oracle rejects the clean result: %s" % self.verify(final, P, sizes)[:2])
        if not self.verify(self.s0[:self.v.size], P, sizes):
            errs.append("oracle accepts the starting content as the fully durable result")
        bad = bytearray(final)
        touched = sorted(P)
        s = touched[len(touched) // 2]
        bad[s * SECTOR + 100] ^= 0xff
        if not self.verify(bytes(bad), P, sizes):
            errs.append("oracle accepts a flipped byte in sector %d" % s)
        return ["harness self-test: " + e for e in errs]

    def flush_indices(self):
        return [i for i in range(1, self.n + 1) if self.cmds[i - 1].kind == "flush"]

    # -- oracle --------------------------------------------------------------------------
    def possible(self, modes):
        """modes: list of (command index 1-based, certain: bool), in order.
        Returns (dict sector -> set of possible contents, set of possible sizes)."""
        P = {}
        sizes = {self.v.size}
        s0 = self.s0
        for i, certain in modes:
            c = self.cmds[i - 1]
            if c.kind == "truncate":
                sizes = {c.size} if certain else sizes | {c.size}
                continue
            if c.kind in ("write", "zero"):
                val = c.pattern if c.kind == "write" else 0
                a, b = c.off, c.off + c.length
                for s in range(a // SECTOR, (b - 1) // SECTOR + 1):
                    sa = s * SECTOR
                    cur = P.get(s)
                    if cur is None:
                        cur = {s0[sa:sa + SECTOR]}
                    lo, hi = max(a, sa) - sa, min(b, sa + SECTOR) - sa
                    if lo == 0 and hi == SECTOR:
                        new = {bytes([val]) * SECTOR}
                    else:
                        new = {x[:lo] + bytes([val]) * (hi - lo) + x[hi:] for x in cur}
                    P[s] = new if certain else cur | new
            elif c.kind == "discard":
                for s, (new, strict) in self.effects[i - 1].items():
                    sa = s * SECTOR
                    cur = P.get(s)
                    if cur is None:
                        cur = {s0[sa:sa + SECTOR]}
                    if certain and strict:
                        P[s] = {new}
                    else:
                        P[s] = cur | {new}
        return P, sizes

    def verify(self, actual, P, sizes):
        """Returns a list of problem strings (empty: content is acceptable)."""
        errs = []
        if len(actual) not in sizes:
            errs.append("virtual size %d, expected one of %s" % (len(actual), sorted(sizes)))
        if len(actual) > self.maxsize:
            return errs
        act = actual + bytes(self.maxsize - len(actual))
        bad = []
        for s in sorted(P):
            sa = s * SECTOR
            if act[sa:sa + SECTOR] not in P[s]:
                bad.append(s)
        chunk = 64 * KiB
        for a in range(0, self.maxsize, chunk):
            if act[a:a + chunk] != self.s0[a:a + chunk]:
                for s in range(a // SECTOR, (a + chunk) // SECTOR):
                    if s not in P and act[s * SECTOR:(s + 1) * SECTOR] != \
                            self.s0[s * SECTOR:(s + 1) * SECTOR]:
                        bad.append(s)
        for s in sorted(set(bad))[:6]:
            sa = s * SECTOR
            allowed = P.get(s, {self.s0[sa:sa + SECTOR]})
            errs.append("sector %d (guest offset %d): found %s; allowed: %s" % (
                s, sa, summarize_bytes(act[sa:sa + SECTOR]),
                " | ".join(sorted(summarize_bytes(x) for x in allowed))))
        if len(set(bad)) > 6:
            errs.append("... %d bad sectors in all" % len(set(bad)))
        return errs

    def describe_cmd(self, i):
        if i < 1:
            return "(before the first command)"
        if i > self.n:
            return "(image close, after the last command)"
        return "command %d `%s` (segment %d)" % (i, self.cmds[i - 1].text(),
                                                 self.cmds[i - 1].seg)


def first_diff_sectors(a, b):
    out = []
    chunk = 64 * KiB
    n = min(len(a), len(b))
    for x in range(0, n, chunk):
        if a[x:x + chunk] != b[x:x + chunk]:
            for s in range(x // SECTOR, min(n, x + chunk) // SECTOR):
                if a[s * SECTOR:(s + 1) * SECTOR] != b[s * SECTOR:(s + 1) * SECTOR]:
                    out.append(s)
                    if len(out) >= 10:
                        return out
    return out


def spread(lo, hi, count):
    """About `count` integers spread evenly over [lo, hi]."""
    if hi < lo:
        return []
    if hi - lo + 1 <= count:
        return list(range(lo, hi + 1))
    return sorted({lo + round(j * (hi - lo) / (count - 1)) for j in range(count)})


# ---------------------------------------------------------------------------------------------
# After-fault checks shared by the kill and error tests

def post_fault_checks(scn, d, modes):
    """(a) qemu-img check without corruption, (b) a read-write open by cowtree-io repairs the
    image (v3: qemu-img check clean afterwards), (c) content per the oracle.
    Returns a list of problems."""
    problems = []
    rc, info, human = qemu_check("ov.qcow2", cwd=d)
    if rc not in (0, 3):
        problems.append("(a) qemu-img check right after the fault: " +
                        check_summary(rc, info, human))
    shutil.copyfile(os.path.join(d, "ov.qcow2"), os.path.join(d, "faulted.qcow2"))
    r = run([scn.t.io, "-c", "read 0 4k", "ov.qcow2"], cwd=d)
    if r.rc != 0 or r.sanitizer():
        problems.append("(b) read-write reopen `cowtree-io -c 'read 0 4k' ov.qcow2` failed: " +
                        r.describe() + (("\n  sanitizer: " + r.sanitizer()) if r.sanitizer() else ""))
    rc2, info2, human2 = qemu_check("ov.qcow2", cwd=d)
    if scn.v.v2:
        # v2 has no dirty bit: nothing tells a later open to repair, leaks stay (as in QEMU).
        if rc2 not in (0, 3):
            problems.append("(b) qemu-img check after the reopen: " +
                            check_summary(rc2, info2, human2))
        elif rc2 == 3:
            r = run([scn.t.img, "check", "-r", "leaks", "ov.qcow2"], cwd=d)
            rc3, info3, human3 = qemu_check("ov.qcow2", cwd=d)
            if rc3 != 0:
                problems.append("(b) v2 image still not clean after `cowtree-img check -r leaks` "
                                "(%s): qemu-img check %s" % (r.describe(),
                                                             check_summary(rc3, info3, human3)))
    elif rc2 != 0:
        problems.append("(b) qemu-img check after the repairing reopen is not clean: " +
                        check_summary(rc2, info2, human2))
    raw, rr = qemu_raw("ov.qcow2", os.path.join(d, "img.raw"), cwd=d)
    if raw is None:
        problems.append("(c) qemu-img convert failed: " + rr.describe())
    else:
        P, sizes = scn.possible(modes)
        errs = scn.verify(raw, P, sizes)
        if errs:
            # Tell apart "the fault left bad data" from "the repair damaged it".
            before, _ = qemu_raw("faulted.qcow2", os.path.join(d, "f.raw"), cwd=d)
            note = ""
            if before is not None and before != raw:
                e2 = scn.verify(before, P, sizes)
                note = (" (content before the repairing reopen was %s)" %
                        ("acceptable: the reopen/repair changed it" if not e2 else "also wrong"))
            problems.append("(c) content%s:\n      " % note + "\n      ".join(errs))
    return problems


class Report:
    def __init__(self, title):
        self.title = title
        self.tried = 0
        self.failures = []  # (label, problems, repro)
        self.notes = []
        self.t0 = time.time()

    def fail(self, label, problems, repro):
        self.failures.append((label, problems, repro))

    def print_failures(self, max_full=4):
        shown_repro = 0
        for label, problems, repro in self.failures:
            log("FAIL %s" % label)
            for p in problems:
                log("   - " + p.replace("\n", "\n     "))
            if shown_repro < max_full:
                log("   " + repro.replace("\n", "\n   "))
                shown_repro += 1
        if len(self.failures) > max_full:
            log("(reproduction shown for the first %d failures; the others differ only in the "
                "COWTREE_FAULT value)" % max_full)

    def finish(self):
        log("%s: %d fault points tried, %d failed, %.1fs" % (
            self.title, self.tried, len(self.failures), time.time() - self.t0))
        return 1 if self.failures else 0


def done_with(d, failed):
    """Remove a trial directory (kept on failure when COWTREE_CRASH_KEEP=1)."""
    if failed and os.environ.get("COWTREE_CRASH_KEEP") == "1":
        log("kept " + d)
        return
    shutil.rmtree(d, ignore_errors=True)


def parallel(tools, fn, items):
    with concurrent.futures.ThreadPoolExecutor(tools.jobs) as ex:
        return list(ex.map(fn, items))
