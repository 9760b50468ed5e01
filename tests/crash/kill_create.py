#!/usr/bin/env python3
"""Driver for test-kill-create.sh: SIGKILL cowtree-img at every write and fdatasync call of
`create` and `resize` (COWTREE_FAULT=write:K:kill / flush:K:kill, K = 1..N with N from a
COWTREE_FAULT=count run).

usage: kill_create.py WORKDIR
After each kill the image must either
 - (create only) fail to open with a clear error: `cowtree-img info` exits 1 with one line
   `cowtree-img: FILE: ...` on stderr, no crash, no sanitizer report -- and if qemu-img can open
   the file, its check must not find corruption; or
 - open and check without corruption (qemu-img check and cowtree-img check exit 0 or 3), have a
   virtual size the operation passes through (create: 0 or the requested size; resize: old or
   new), keep the data written before the operation, read as zeroes in any grown area, and be
   repaired by a read-write open of cowtree-io to a clean qemu-img check, after which a write at
   the end of the image reads back.
"""
import os
import shutil
import sys

sys.dont_write_bytecode = True  # no __pycache__ in the source tree
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import crashlib as cl  # noqa: E402

KiB, MiB, GiB = 1024, 1024 ** 2, 1024 ** 3
DATA = [(0x11, 0, 64 * KiB), (0x12, 300 * MiB + 512, 5000), (0x13, 512 * MiB, 4 * KiB),
        (0x14, GiB - 4 * KiB, 4 * KiB)]


def operations(t):
    ops = []

    def create(name, opts, size):
        ops.append(dict(name=name, setup=[], argv=[t.img, "create", "-f", "qcow2", "-o", opts,
                                                    "img.qcow2", str(size)],
                        sizes={0, size}, data=[], create=True, grown=[]))

    def resize(name, opts, delta, new, shrink=False):
        setup = [[t.img, "create", "-q", "-f", "qcow2", "-o", opts, "img.qcow2", "1G"],
                 [t.io] + sum((["-c", "write -q -P 0x%x %d %d" % d] for d in DATA), []) +
                 ["img.qcow2"]]
        argv = [t.img, "resize"] + (["--shrink"] if shrink else []) + ["img.qcow2", delta]
        data = [d for d in DATA if d[1] + d[2] <= min(GiB, new)]
        grown = [(GiB, 64 * KiB), (new - 64 * KiB, 64 * KiB)] if new > GiB else []
        ops.append(dict(name=name, setup=setup, argv=argv, sizes={GiB, new}, data=data,
                        create=False, grown=grown))

    # The brief's two operations first, then neighbours that take other paths.
    create("create-c512", "cluster_size=512", GiB)
    resize("resize-c512", "cluster_size=512", "+10G", 11 * GiB)
    create("create-v2-c512", "compat=0.10,cluster_size=512", GiB)
    create("create-prealloc", "cluster_size=4k,preallocation=metadata", 64 * MiB)
    resize("resize-v2-c512", "compat=0.10,cluster_size=512", "+10G", 11 * GiB)
    resize("resize-64k", "cluster_size=64k", "+1T", GiB + 1024 * GiB)
    resize("shrink-c512", "cluster_size=512", "-600M", GiB - 600 * MiB, shrink=True)
    return ops


def repro(op, spec):
    lines = ["# reproduce (bash):", "cd \"$(mktemp -d)\""]
    lines += [cl.cmdline(a) for a in op["setup"]]
    lines.append(cl.cmdline(op["argv"], {"COWTREE_FAULT": spec}))
    lines.append("%s info img.qcow2; qemu-img check img.qcow2" % op["argv"][0])
    return "\n".join(lines)


def trial(t, work, op, kind, k, startdir):
    d = os.path.join(work, "%s-%s%d" % (op["name"], kind, k))
    os.makedirs(d)
    if op["setup"]:
        shutil.copyfile(os.path.join(startdir, "img.qcow2"), os.path.join(d, "img.qcow2"))
    spec = "%s:%d:kill" % (kind, k)
    r = cl.run(op["argv"], {"COWTREE_FAULT": spec}, cwd=d)
    label = "%s %s" % (op["name"], spec)
    if r.rc == 0:
        shutil.rmtree(d)
        return label, None, "not-reached"
    problems = []
    if r.rc != -9:
        problems.append("expected SIGKILL at %s, got %s" % (spec, r.describe()))
    outcome = None
    info = cl.run([t.img, "info", "-f", "qcow2", "--output=json", "img.qcow2"], cwd=d)
    if info.rc != 0:
        outcome = "does not open"
        lines = [l for l in info.err.splitlines() if l.strip()]
        clear = (info.rc == 1 and len(lines) == 1 and
                 lines[0].startswith("cowtree-img: img.qcow2: ") and not info.sanitizer())
        if not op["create"]:
            problems.append("the image no longer opens after a kill during %s: %s" % (
                " ".join(op["argv"][1:]), info.describe()))
        elif not clear:
            problems.append("an image left by an interrupted create fails to open without a "
                            "clear one-line error: " + info.describe())
        rc, qi, human = cl.qemu_check("img.qcow2", cwd=d)
        if rc not in (0, 3) and "Could not open" not in (human or ""):
            problems.append("cowtree refuses the file but qemu-img opens it and finds it "
                            "corrupt: " + cl.check_summary(rc, qi, human))
    else:
        import json
        try:
            size = json.loads(info.out)["virtual-size"]
        except (ValueError, KeyError):
            size = None
            problems.append("cowtree-img info --output=json is not parseable: " + info.describe())
        outcome = "opens, size %s" % size
        if size is not None and size not in op["sizes"]:
            problems.append("virtual size %s is neither %s" % (
                size, " nor ".join(str(s) for s in sorted(op["sizes"]))))
        rc, qi, human = cl.qemu_check("img.qcow2", cwd=d)
        if rc not in (0, 3):
            problems.append("qemu-img check: " + cl.check_summary(rc, qi, human))
        c = cl.run([t.img, "check", "-f", "qcow2", "img.qcow2"], cwd=d)
        if c.rc not in (0, 3) or c.sanitizer():
            problems.append("cowtree-img check: " + c.describe())
        for pat, off, ln in op["data"]:
            rr = cl.run(["qemu-io", "-r", "-f", "qcow2", "-c",
                         "read -P 0x%x %d %d" % (pat, off, ln), "img.qcow2"], cwd=d)
            if rr.rc != 0 or "verification failed" in rr.out:
                problems.append("data written before the operation is lost (read -P 0x%x %d %d): "
                                "%s" % (pat, off, ln, rr.describe()))
        if size is not None and size > GiB:
            for off, ln in op["grown"]:
                rr = cl.run(["qemu-io", "-r", "-f", "qcow2", "-c", "read -P 0 %d %d" % (off, ln),
                             "img.qcow2"], cwd=d)
                if rr.rc != 0 or "verification failed" in rr.out:
                    problems.append("grown area does not read as zeroes at %d: %s" % (
                        off, rr.describe()))
        if size:
            # Use the image: a write at its end and 4 MiB somewhere in the middle must read
            # back (a cluster the kill left with refcount 0 would be handed out again here).
            mid = size // 3 // 512 * 512
            w = cl.run([t.io, "-f", "qcow2",
                        "-c", "write -q -P 0x5a %d 512" % (size - 512),
                        "-c", "write -q -P 0x5b %d %d" % (mid, 4 * MiB), "img.qcow2"], cwd=d)
            if w.rc != 0 or w.sanitizer():
                problems.append("read-write open + writes by cowtree-io failed: " + w.describe())
            else:
                rr = cl.run(["qemu-io", "-r", "-f", "qcow2",
                             "-c", "read -P 0x5a %d 512" % (size - 512),
                             "-c", "read -P 0x5b %d %d" % (mid, 4 * MiB), "img.qcow2"], cwd=d)
                if rr.rc != 0 or "verification failed" in rr.out:
                    problems.append(
                        "data written by cowtree-io after the kill does not read back (write -P "
                        "0x5a %d 512; write -P 0x5b %d %d): %s" % (size - 512, mid, 4 * MiB,
                                                                    rr.describe()))
        else:
            w = cl.run([t.io, "-f", "qcow2", "-c", "length", "img.qcow2"], cwd=d)
            if w.rc != 0 or w.sanitizer():
                problems.append("read-write open by cowtree-io failed: " + w.describe())
        rc2, qi2, human2 = cl.qemu_check("img.qcow2", cwd=d)
        v2 = "compat=0.10" in " ".join(op["argv"] + sum(op["setup"], []))
        if v2 and rc2 == 3:
            # No dirty bit in v2: leaks stay until an explicit repair, which must clean them.
            fix = cl.run([t.img, "check", "-r", "leaks", "img.qcow2"], cwd=d)
            rc2, qi2, human2 = cl.qemu_check("img.qcow2", cwd=d)
            if rc2 != 0:
                problems.append("v2 image not clean after `cowtree-img check -r leaks` (%s): "
                                "qemu-img check %s" % (fix.describe(),
                                                       cl.check_summary(rc2, qi2, human2)))
        elif rc2 != 0:
            problems.append("after the repairing read-write open, qemu-img check: " +
                            cl.check_summary(rc2, qi2, human2))
    cl.done_with(d, bool(problems))
    return label, problems or None, outcome


def main():
    work = sys.argv[1]
    t = cl.Tools(os.environ.get("COWTREE_BUILD", "build"))
    rep = cl.Report("test-kill-create")
    cl.log("build: %s; jobs: %d" % (t.build, t.jobs))
    for op in operations(t):
        startdir = os.path.join(work, op["name"] + "-start")
        os.makedirs(startdir)
        for a in op["setup"]:
            cl.must(cl.run(a, cwd=startdir), "setting up " + op["name"])
        cd = os.path.join(work, op["name"] + "-count")
        os.makedirs(cd)
        if op["setup"]:
            shutil.copyfile(os.path.join(startdir, "img.qcow2"), os.path.join(cd, "img.qcow2"))
        r = cl.run(op["argv"], {"COWTREE_FAULT": "count", "COWTREE_FAULT_REPORT": "1"}, cwd=cd)
        if r.rc != 0 or not r.counts():
            rep.fail(op["name"], ["the operation fails without any fault: " + r.describe()],
                     repro(op, "count"))
            continue
        rcq, qi, human = cl.qemu_check("img.qcow2", cwd=cd)
        if rcq != 0:
            rep.fail(op["name"], ["after a clean run, qemu-img check: " +
                                  cl.check_summary(rcq, qi, human)], repro(op, "count"))
        W, F = r.counts()
        points = [("write", k) for k in range(1, W + 1)] + [("flush", k) for k in range(1, F + 1)]

        def one(p):
            return trial(t, work, op, p[0], p[1], startdir)

        results = cl.parallel(t, one, points)
        hist = {}
        nfail = 0
        for label, problems, outcome in results:
            if outcome == "not-reached":
                continue
            rep.tried += 1
            hist[outcome] = hist.get(outcome, 0) + 1
            if problems:
                nfail += 1
                rep.fail(label, problems, repro(op, label.split()[-1]))
        cl.log("%s: `%s`: %d writes, %d flushes; %d kill points, %d failed; outcomes: %s" % (
            op["name"], " ".join(os.path.basename(a) if i == 0 else a
                                 for i, a in enumerate(op["argv"])),
            W, F, len(points), nfail,
            ", ".join("%s x%d" % kv for kv in sorted(hist.items(), key=str))))
    rep.print_failures(max_full=6)
    return rep.finish()


if __name__ == "__main__":
    sys.exit(main())
