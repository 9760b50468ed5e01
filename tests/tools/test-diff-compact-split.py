#!/usr/bin/env python3
"""diff, compact and split on random snapshot histories.

- diff: every byte that differs between two snapshots (or a snapshot and the active state),
  found by brute force on raw exports, lies inside an extent `cowtree-img diff` reports.
- split: the image written for a snapshot (standalone, and as an overlay of another snapshot's
  split) has the same guest-visible content as `qemu-img convert -l`.
- compact: after deleting snapshots and discarding, compaction keeps the active state and every
  remaining snapshot byte-identical, qemu-img check stays clean, and the file does not grow.
"""
import json, os, random, subprocess, sys, tempfile

build = os.environ.get("COWTREE_BUILD", os.path.join(os.path.dirname(__file__), "../../build"))
IMG = os.path.join(build, "cowtree-img")
IO = os.path.join(build, "cowtree-io")
CL = 65536
SIZE = 64 << 20


def run(*args, ok=True):
    p = subprocess.run(args, capture_output=True, text=True)
    if ok and p.returncode != 0:
        sys.exit(f"FAIL: {' '.join(args)} -> rc={p.returncode}\n{p.stdout}\n{p.stderr}")
    return p


def export(img, snap, out):
    args = ["qemu-img", "convert", "-O", "raw"] + (["-l", snap] if snap else []) + [img, out]
    run(*args)
    with open(out, "rb") as f:
        return f.read()


def random_ops(rng, n):
    cmds = []
    for _ in range(n):
        k = rng.random()
        off = rng.randrange(0, SIZE - 1)
        ln = min(rng.choice([512, 4096, CL, 3 * CL + 17, 1 << 20]), SIZE - off)
        if k < 0.7:
            cmds += ["-c", f"write -q -P {rng.randrange(1, 255)} {off} {ln}"]
        elif k < 0.85:
            cmds += ["-c", f"write -q -z {off} {ln}"]
        else:
            cmds += ["-c", f"discard -q {off} {ln}"]
    return cmds


def check_clean(img):
    p = run("qemu-img", "check", "--output=json", img, ok=False)
    j = json.loads(p.stdout) if p.stdout.strip() else {}
    if p.returncode != 0 or j.get("leaks", 0) or j.get("corruptions", 0):
        sys.exit(f"FAIL: qemu-img check {img}: rc={p.returncode} {p.stdout} {p.stderr}")


def diff_extents(img, a, b):
    args = [IMG, "diff", "--output=json", img, a] + ([b] if b else [])
    return [(e["start"], e["length"]) for e in json.loads(run(*args).stdout)]


def covered(extents, off):
    return any(s <= off < s + l for s, l in extents)


def one_seed(seed, d):
    rng = random.Random(seed)
    img = os.path.join(d, f"h{seed}.qcow2")
    opts = rng.choice(["compat=1.1", "compat=0.10", "extended_l2=on", "cluster_size=4k"])
    run(IMG, "create", "-q", "-f", "qcow2", "-o", opts, img, str(SIZE))
    snaps = []
    for i in range(6):
        run(IO, *random_ops(rng, 25), img)
        name = f"s{i}"
        run(IMG, "snapshot", "-c", name, img)
        snaps.append(name)
    run(IO, *random_ops(rng, 25), img)
    raw = {s: export(img, s, os.path.join(d, f"{s}.raw")) for s in snaps}
    raw[None] = export(img, None, os.path.join(d, "active.raw"))
    # diff: brute force comparison must be inside reported extents
    pairs = [(snaps[i], snaps[j]) for i in range(len(snaps)) for j in range(i + 1, len(snaps))]
    pairs += [(s, None) for s in snaps]
    for a, b in rng.sample(pairs, 8):
        ext = diff_extents(img, a, b)
        ra, rb = raw[a], raw[b]
        for off in range(0, SIZE, 512):
            if ra[off:off + 512] != rb[off:off + 512] and not covered(ext, off):
                sys.exit(f"FAIL seed {seed}: diff {a} {b} misses a change at {off} (opts {opts})")
    # split: standalone and as an overlay of another split
    s0, s1 = snaps[1], snaps[4]
    sp0, sp1 = os.path.join(d, "sp0.qcow2"), os.path.join(d, "sp1.qcow2")
    run(IMG, "split", "-q", img, s0, sp0)
    run(IMG, "split", "-q", "-B", sp0, "-F", "qcow2", img, s1, sp1)
    for sp, s in ((sp0, s0), (sp1, s1)):
        check_clean(sp)
        if export(sp, None, os.path.join(d, "sp.raw")) != raw[s]:
            sys.exit(f"FAIL seed {seed}: split of {s} differs from qemu-img convert -l")
    # compact: delete some snapshots, discard, compact; everything left must be unchanged
    for s in (snaps[0], snaps[2], snaps[3]):
        run(IMG, "snapshot", "-d", s, img)
        del raw[s]
    run(IO, "-c", f"discard -q 0 {SIZE // 2}", img)
    raw[None] = export(img, None, os.path.join(d, "active.raw"))
    before = os.path.getsize(img)
    run(IMG, "compact", "-q", img)
    after = os.path.getsize(img)
    check_clean(img)
    for s, content in raw.items():
        if export(img, s, os.path.join(d, "after.raw")) != content:
            sys.exit(f"FAIL seed {seed}: compact changed {'active' if s is None else s}")
    if after > before:
        sys.exit(f"FAIL seed {seed}: compact grew the file {before} -> {after}")
    print(f"seed {seed} ({opts}): diff/split ok; compact {before} -> {after} bytes")


def main():
    seeds = range(1, 13) if os.environ.get("COWTREE_TEST_LONG") == "1" else range(1, 4)
    with tempfile.TemporaryDirectory() as d:
        for s in seeds:
            one_seed(s, d)


main()
