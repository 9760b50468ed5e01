#!/usr/bin/env python3
"""kill -9 at every write and flush of internal snapshot create, apply and delete, and of
check -r all, on an image with data and existing snapshots.

After each kill:
  - the next read-write open by cowtree (which repairs a dirty v3 image) succeeds, after which
    `qemu-img check` reports no corruption and no leaks;
  - the active state reads as before or after the operation (never a mix), and every snapshot
    that exists reads exactly as it did; the snapshot list is the old or the new one.
v2 images carry no dirty bit: there `cowtree-img check -r all` is the repair step.
"""
import json, os, random, shutil, subprocess, sys, tempfile

build = os.environ.get("COWTREE_BUILD", os.path.join(os.path.dirname(__file__), "../../build"))
IMG, IO = os.path.join(build, "cowtree-img"), os.path.join(build, "cowtree-io")
LONG = os.environ.get("COWTREE_TEST_LONG") == "1"


def run(*a, env=None, ok=True):
    p = subprocess.run(a, capture_output=True, text=True, env=env)
    if ok and p.returncode != 0:
        sys.exit(f"FAIL: {' '.join(a)} -> {p.returncode}\n{p.stdout}{p.stderr}")
    return p


def raw(img, snap=None, d="/tmp"):
    out = os.path.join(d, "view.raw")
    run("qemu-img", "convert", "-U", "-O", "raw", *(["-l", snap] if snap else []), img, out)
    with open(out, "rb") as f:
        return f.read()


def snaps(img):
    p = run("qemu-img", "snapshot", "-U", "-l", img)
    return sorted(l.split()[1] for l in p.stdout.splitlines()[2:] if l.strip())


def make_base(d, compat):
    img = os.path.join(d, "base.qcow2")
    run(IMG, "create", "-q", "-f", "qcow2", "-o", f"compat={compat},cluster_size=4k", img, "8M")
    run(IO, "-c", "write -q -P 1 0 3M", "-c", "write -q -P 2 5M 1M", img)
    run(IMG, "snapshot", "-c", "a", img)
    run(IO, "-c", "write -q -P 3 1M 1M", "-c", "write -q -z 5M 64k", img)
    run(IMG, "snapshot", "-c", "b", img)
    run(IO, "-c", "write -q -P 4 2M 512k", img)
    return img


def count(cmd, img):
    env = dict(os.environ, COWTREE_FAULT="count", COWTREE_FAULT_REPORT="1")
    p = run(*cmd, img, env=env)
    line = [l for l in p.stderr.splitlines() if l.startswith("fault-counts:")][0]
    w, f = (int(x.split("=")[1]) for x in line.split()[1:])
    return w, f


def main():
    ops = [("create", [IMG, "snapshot", "-c", "c"]), ("apply", [IMG, "snapshot", "-a", "a"]),
           ("delete", [IMG, "snapshot", "-d", "a"]), ("repair", [IMG, "check", "-r", "all"])]
    tried = 0
    with tempfile.TemporaryDirectory(dir="/dev/shm" if os.path.isdir("/dev/shm") else None) as d:
        for compat in ("1.1", "0.10"):
            base = make_base(d, compat)
            before = {s: raw(base, s, d) for s in snaps(base)}
            before_active = raw(base, None, d)
            for name, cmd in ops:
                work = os.path.join(d, "work.qcow2")
                shutil.copy(base, work)
                run(*cmd, work)
                after_active = raw(work, None, d)
                after_snaps = snaps(work)
                shutil.copy(base, work)
                w, f = count(cmd, work)
                points = [("write", k) for k in range(1, w + 1)] + \
                         [("flush", k) for k in range(1, f + 1)]
                if not LONG and len(points) > 60:
                    rng = random.Random(len(points))
                    points = sorted(rng.sample(points, 60))
                for kind, k in points:
                    shutil.copy(base, work)
                    env = dict(os.environ, COWTREE_FAULT=f"{kind}:{k}:kill")
                    p = subprocess.run(cmd + [work], capture_output=True, env=env)
                    where = f"compat={compat} {name} {kind}:{k}:kill"
                    if p.returncode >= 0 and p.returncode != 0:
                        sys.exit(f"FAIL {where}: exited {p.returncode} instead of being killed: "
                                 f"{p.stderr.decode()}")
                    # repair step: cowtree's read-write open (v3), explicit check -r (v2)
                    if compat == "1.1":
                        run(IO, "-c", "read -q 0 512", work)
                    else:
                        run(IMG, "check", "-q", "-r", "all", work, ok=False)
                    c = run("qemu-img", "check", "--output=json", work, ok=False)
                    j = json.loads(c.stdout or "{}")
                    if c.returncode != 0 or j.get("corruptions") or j.get("leaks"):
                        sys.exit(f"FAIL {where}: qemu-img check after repair: {c.stdout}{c.stderr}")
                    active = raw(work, None, d)
                    if active not in (before_active, after_active):
                        sys.exit(f"FAIL {where}: the active state is neither before nor after")
                    now = snaps(work)
                    if now not in (sorted(before), after_snaps):
                        sys.exit(f"FAIL {where}: snapshot list {now}")
                    for s in now:
                        if s in before and raw(work, s, d) != before[s]:
                            sys.exit(f"FAIL {where}: snapshot {s} changed")
                    tried += 1
                print(f"compat={compat} {name}: {len(points)} kill points of {w} writes + "
                      f"{f} flushes survived")
    print(f"{tried} kill points, no corruption, no snapshot changed")


main()
