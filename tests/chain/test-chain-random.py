#!/usr/bin/env python3
"""Randomized differential test of the chain verbs against qemu-img.

Each round builds a random backing chain with qemu-io (layer sizes, cluster sizes from 512 B to
2 MiB, extended L2, compat 0.10 layers, unaligned writes, zero writes, discards), a sibling
branch and an unrelated image, then runs one of: safe rebase onto an ancestor, a sibling, an
unrelated image or nothing; commit of a random top into a random base (with the image above
repointed); pull down to a random base; convert -B. Our result must read like the image did
before, equal qemu-img's result on a twin directory (where qemu-img has the operation), and
check clean. Seeded: prints the seed of a failing round. COWTREE_TEST_LONG=1 runs more rounds.
"""
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile

TOP = os.environ.get("COWTREE_TOP", os.path.join(os.path.dirname(__file__), "..", ".."))
BUILD = os.environ.get("COWTREE_BUILD", os.path.join(TOP, "build"))
CT_IMG = os.path.join(BUILD, "cowtree-img")
LONG = os.environ.get("COWTREE_TEST_LONG", "0") == "1"

if not shutil.which("qemu-img") or not shutil.which("qemu-io"):
    print("skip: needs qemu-img and qemu-io")
    sys.exit(77)


class Fail(Exception):
    pass


def run(*args, cwd, ok=True):
    p = subprocess.run(list(args), cwd=cwd, capture_output=True, text=True)
    if ok and p.returncode != 0:
        raise Fail(f"{' '.join(args)}: rc={p.returncode}: {p.stdout}{p.stderr}")
    return p


class Round:
    def __init__(self, seed, d):
        self.r = random.Random(seed)
        self.d = d
        self.n = 0

    def create(self, name, size, backing=None, v2=False, relink=True):
        r = self.r
        # An image whose link may be rewritten avoids 512-byte clusters: the engine cannot yet
        # rewrite such a header with a backing file (see test-link-rewrite.sh).
        cs = r.choice(([] if relink else [512]) + [4096, 65536, 65536, 65536, 2 << 20])
        opts = [f"cluster_size={cs}"]
        if v2:
            opts.append("compat=0.10")
        elif cs >= 16384 and r.random() < 0.25:
            opts.append("extended_l2=on")
        args = ["qemu-img", "create", "-q", "-f", "qcow2", "-o", ",".join(opts)]
        if backing:
            args += ["-b", backing, "-F", "qcow2"]
        run(*args, name, str(size), cwd=self.d)

    def scribble(self, name, size, count):
        r = self.r
        cmds = []
        for _ in range(count):
            kind = r.random()
            if r.random() < 0.5:
                off = r.randrange(0, size // 65536) * 65536
                ln = r.choice([65536, 131072, 1 << 20, 3 << 20])
            else:
                off = r.randrange(0, size - 1)
                ln = r.randrange(1, 300000)
            ln = max(1, min(ln, size - off))
            if kind < 0.65:
                cmds += ["-c", f"write -P {r.randrange(1, 255)} {off} {ln}"]
            elif kind < 0.85:
                cmds += ["-c", f"write -z {off} {ln}"]
            else:
                cmds += ["-c", f"discard {off} {ln}"]
        if cmds:
            run("qemu-io", "-f", "qcow2", *cmds, name, cwd=self.d)

    def size(self, base):
        return base + self.r.randrange(-4, 5) * 65536 if self.r.random() < 0.3 else base


def info(path):
    p = subprocess.run(["qemu-img", "info", "-U", "--output=json", path], capture_output=True,
                       text=True, check=True)
    return json.loads(p.stdout)


def compare(a, b, cwd):
    p = run("qemu-img", "compare", "-U", a, b, cwd=cwd, ok=False)
    if p.returncode != 0:
        raise Fail(f"compare {a} {b}: {p.stdout}{p.stderr}")


def check(path, cwd):
    p = run("qemu-img", "check", "-U", path, cwd=cwd, ok=False)
    if p.returncode != 0:
        raise Fail(f"qemu-img check {path}: {p.stdout}")
    p = run(CT_IMG, "check", "-U", path, cwd=cwd, ok=False)
    if p.returncode != 0:
        raise Fail(f"cowtree-img check {path}: {p.stdout}{p.stderr}")


def one_round(seed, root):
    d = os.path.join(root, f"r{seed}")
    os.makedirs(d)
    rd = Round(seed, d)
    r = rd.r
    size = r.randrange(16, 200) * 65536 + r.choice([0, 0, 512 * r.randrange(1, 100)])
    depth = r.randrange(1, 4)
    names, v2 = [], set()
    for i in range(depth + 1):
        name = f"l{i}.qcow2"
        if i < depth and r.random() < 0.2:
            v2.add(name)
        rd.create(name, rd.size(size), names[-1] if names else None, v2=name in v2,
                  relink=i == depth or (name not in v2 and i > 0))
        rd.scribble(name, info(os.path.join(d, name))["virtual-size"], r.randrange(0, 8))
        names.append(name)
    # A sibling of a random layer, and an unrelated image.
    anc = r.randrange(0, depth)
    rd.create("sib.qcow2", rd.size(size), names[anc], relink=False)
    rd.scribble("sib.qcow2", info(os.path.join(d, "sib.qcow2"))["virtual-size"], r.randrange(0, 6))
    rd.create("other.qcow2", rd.size(size), relink=False)
    rd.scribble("other.qcow2", info(os.path.join(d, "other.qcow2"))["virtual-size"], r.randrange(0, 6))
    top = names[-1]
    # The top must be v3: the engine cannot yet rewrite a v2 image's link (test-link-rewrite.sh).
    run("qemu-img", "convert", "-U", "-O", "raw", top, "top.raw", cwd=d)
    ct, q = os.path.join(d, "ct"), os.path.join(d, "q")
    for x in (ct, q):
        os.makedirs(x)
        for f in os.listdir(d):
            if f.endswith(".qcow2"):
                shutil.copy(os.path.join(d, f), x)
    op = r.choice(["rebase", "rebase", "commit", "pull", "convert-B"])
    desc = op
    if op == "rebase":
        nb = r.choice(names[:-1] + ["sib.qcow2", "other.qcow2", ""])
        desc += f" onto '{nb}'"
        fa = ["-F", "qcow2"] if nb else []
        run(CT_IMG, "rebase", "-q", "-b", nb, *fa, top, cwd=ct)
        run("qemu-img", "rebase", "-q", "-b", nb, *fa, top, cwd=q)
        compare(top, "../top.raw", ct)
        compare(os.path.join(ct, top), os.path.join(q, top), d)
        check(top, ct)
    elif op == "commit":
        t = r.randrange(1, depth + 1)  # committed top: names[t]
        b = r.randrange(0, t)  # base: names[b]
        ov = names[t + 1] if t + 1 < len(names) else None
        if ov in v2:
            ov = None  # the engine cannot rewrite a v2 image's link yet (test-link-rewrite.sh)
        desc += f" {names[t]} into {names[b]}"
        withb = b != t - 1 or r.random() < 0.5
        args = [CT_IMG, "commit", "-q"] + (["-b", names[b]] if withb else []) + [names[t]]
        if ov:
            args += ["--rebase-overlays", ov]
        run(*args, cwd=ct)
        run("qemu-img", "commit", "-q", *(["-b", names[b]] if withb else []), names[t], cwd=q)
        if ov:
            run("qemu-img", "rebase", "-q", "-u", "-b", names[b], "-F", "qcow2", ov, cwd=q)
        if ov or t == depth:
            compare(top, "../top.raw", ct)
        for f in (names[b], names[t]):
            compare(os.path.join(ct, f), os.path.join(q, f), d)
        for f in names[b:]:
            check(f, ct)
    elif op == "pull":
        b = r.choice([None] + list(range(0, depth)))
        desc += f" down to {names[b] if b is not None else 'nothing'}"
        run(CT_IMG, "pull", "-q", *(["-b", names[b]] if b is not None else []), top, cwd=ct)
        nb = names[b] if b is not None else ""
        run("qemu-img", "rebase", "-q", "-b", nb, *(["-F", "qcow2"] if nb else []), top, cwd=q)
        compare(top, "../top.raw", ct)
        compare(os.path.join(ct, top), os.path.join(q, top), d)
        check(top, ct)
    else:
        nb = r.choice(names[:-1] + ["sib.qcow2", "other.qcow2"])
        desc += f" onto {nb}"
        run(CT_IMG, "convert", "-O", "qcow2", "-B", nb, "-F", "qcow2", top, "out.qcow2", cwd=ct)
        compare("out.qcow2", "../top.raw", ct)
        check("out.qcow2", ct)
    shutil.rmtree(d)
    return desc


def main():
    rounds = 150 if LONG else 25
    base_seed = int(os.environ.get("CHAIN_RANDOM_SEED", "1000"))
    root = tempfile.mkdtemp(prefix="ct-chain-random.")
    failed = 0
    try:
        for i in range(rounds):
            seed = base_seed + i
            try:
                desc = one_round(seed, root)
                print(f"seed {seed}: {desc}: ok")
            except Fail as e:
                failed += 1
                print(f"seed {seed}: FAIL: {e}")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"{rounds - failed} rounds ok, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
