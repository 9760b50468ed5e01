#!/usr/bin/env python3
"""Model-checked random test: seeded sequences of writes, snapshot creation (internal,
external, mixed, partial), revert and delete on a two-disk domain, against a Python model of
the bytes every snapshot and the current state must hold. After every step every snapshot's
view and the current state are extracted and compared with the model, every image passes
`qemu-img check`, reconcile finds nothing, no file leaks, and the snapshot tree matches."""

import os
import sys

sys.dont_write_bytecode = True  # no __pycache__ in the source tree
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import mlib  # noqa: E402
from mlib import Failure  # noqa: E402

SIZE = 1 << 20
DISKS = ("vda", "vdb")


class Model:
    def __init__(self):
        self.cur = {d: bytearray(SIZE) for d in DISKS}
        self.snaps = {}     # name -> {disk: bytes|None}
        self.parent = {}    # name -> parent|None
        self.current = None

    def dirty(self, t):
        """Disks a revert to t changes whose state no snapshot captured (needs --force)."""
        out = []
        for d in DISKS:
            if self.snaps[t][d] is None:
                continue
            c = self.current
            if c is None or self.snaps[c][d] is None or bytes(self.cur[d]) != self.snaps[c][d]:
                out.append(d)
        return out

    def descendants(self, s):
        out = []
        for n, p in self.parent.items():
            if p == s:
                out += self.descendants(n) + [n]
        return out

    def remove(self, s):
        p = self.parent.pop(s)
        del self.snaps[s]
        for n in self.parent:
            if self.parent[n] == s:
                self.parent[n] = p
        if self.current == s:
            self.current = p


def verify(env, m, dom, step, rng):
    views = env.all_views(dom)
    names = set(views) - {"@current"}
    if names != set(m.snaps):
        raise Failure("[%s] snapshots %s, model has %s" % (step, sorted(names), sorted(m.snaps)))
    for s, dv in views.items():
        want = {d: bytes(m.cur[d]) for d in DISKS} if s == "@current" else m.snaps[s]
        for d in DISKS:
            got = dv.get(d)
            if (got is None) != (want[d] is None):
                raise Failure("[%s] %s/%s: captured=%s, model says %s" % (
                    step, s, d, got is not None, want[d] is not None))
            if got is not None and got != want[d]:
                bad = next(i for i in range(min(len(got), len(want[d])))
                           if got[i] != want[d][i]) if len(got) == len(want[d]) else -1
                raise Failure("[%s] %s/%s differs from the model (first at %d: %s vs %s)" % (
                    step, s, d, bad, got[bad] if bad >= 0 else len(got),
                    want[d][bad] if bad >= 0 else len(want[d])))
    lst = {s["name"]: s for s in env.json("snapshot-list", dom)}
    for s, info in lst.items():
        if info["parent"] != m.parent[s]:
            raise Failure("[%s] parent of %s is %s, model says %s" % (step, s, info["parent"],
                                                                     m.parent[s]))
        if info["current"] != (s == m.current):
            raise Failure("[%s] current flag of %s is %s" % (step, s, info["current"]))
    env.check_images(dom)
    env.check_reconcile(dom)
    env.check_no_stray_files([dom])
    if m.snaps and rng.random() < 0.25:
        env.validate_xml(dom, rng.choice(sorted(m.snaps)))


def run_seed(seed, steps):
    rng = mlib.random.Random(seed)
    env = mlib.Env("model%d" % seed)
    stats = {"write": 0, "create": 0, "revert": 0, "forced": 0, "delete": 0, "refused": 0}
    try:
        a = env.create("a.qcow2")
        b = env.create("b.qcow2")
        env.run("define", "d", "--disk", "vda=" + a, "--disk", "vdb=" + b)
        m = Model()
        counter = 0
        nsnap = 0
        for step in range(steps):
            op = rng.choices(["write", "create", "revert", "delete"], [40, 22, 18, 20])[0]
            if op in ("revert", "delete") and not m.snaps:
                op = "create"
            if op == "create" and len(m.snaps) >= 9:
                op = "delete"
            desc = op
            if op == "write":
                d = rng.choice(DISKS)
                top = env.disks("d")[d]["source"]
                counter += 1
                mlib.pattern_write(env, top, m.cur[d], rng, SIZE, counter)
                desc = "write %s" % d
                stats["write"] += 1
            elif op == "create":
                nsnap += 1
                name = "s%d" % nsnap
                kind = rng.choice(["internal", "external", "mixed", "mixed2", "partial"])
                args = ["snapshot-create-as", "d", name]
                kinds = {}
                if kind == "internal":
                    kinds = {"vda": "internal", "vdb": "internal"}
                elif kind == "external":
                    args.append("--disk-only")
                    if rng.random() < 0.5:
                        args.append("--atomic")
                    kinds = {"vda": "external", "vdb": "external"}
                elif kind == "mixed":
                    kinds = {"vda": "internal", "vdb": "external"}
                elif kind == "mixed2":
                    kinds = {"vda": "external", "vdb": "internal"}
                else:
                    kinds = {d: rng.choice(["internal", "external"]) for d in DISKS}
                    kinds[rng.choice(DISKS)] = "no"
                if kind != "internal" and kind != "external":
                    for d in DISKS:
                        args += ["--diskspec", "%s,snapshot=%s" % (d, kinds[d])]
                env.run(*args)
                m.snaps[name] = {d: (bytes(m.cur[d]) if kinds[d] != "no" else None)
                                 for d in DISKS}
                m.parent[name] = m.current
                m.current = name
                desc = "create %s %s" % (name, kinds)
                stats["create"] += 1
            elif op == "revert":
                t = rng.choice(sorted(m.snaps))
                dirty = m.dirty(t)
                desc = "revert %s (dirty %s)" % (t, dirty)
                if dirty:
                    before = env.all_views("d")
                    r = env.run("snapshot-revert", "d", t, rc=4)
                    if "--force" not in r.stderr:
                        raise Failure("[%d] refusal does not mention --force: %s" % (step, r.stderr))
                    if env.all_views("d") != before:
                        raise Failure("[%d] a refused revert changed data" % step)
                    env.run("snapshot-revert", "d", t, "--force")
                    stats["forced"] += 1
                else:
                    env.run("snapshot-revert", "d", t)
                for d in DISKS:
                    if m.snaps[t][d] is not None:
                        m.cur[d][:] = m.snaps[t][d]
                m.current = t
                stats["revert"] += 1
            else:
                t = rng.choice(sorted(m.snaps))
                mode = rng.choices(["", "--children", "--children-only", "--metadata"],
                                   [80, 8, 7, 5])[0]
                desc = "delete %s %s" % (t, mode)
                before = env.all_views("d")
                if mode == "--metadata":
                    # The files the snapshot names stay (for a later --redefine), even once
                    # cowtree forgets them.
                    for dk in env.json("snapshot-info", "d", t)["disks"]:
                        for k in ("image", "materialized"):
                            if dk[k] and (k == "materialized" or dk["snapshot"] == "external"):
                                env.tolerated.add(dk[k])
                args = ["snapshot-delete", "d", t] + ([mode] if mode else []) + ["--output=json"]
                r = env.run(*args, rc=None)
                if r.returncode == 0:
                    plan = mlib.json.loads(r.stdout)
                    desc += " %s" % [(st["action"], os.path.basename(st["path"] or ""),
                                      os.path.basename(st["other"] or ""))
                                     for st in plan["steps"] if st["action"] != "catalog"]
                if r.returncode == 4 and "cannot merge" in r.stderr:
                    stats["refused"] += 1
                    if env.all_views("d") != before:
                        raise Failure("[%d] a refused delete changed data" % step)
                    desc += " (refused: %s)" % r.stderr.strip()
                elif r.returncode != 0:
                    raise Failure("[%d] %s: rc=%d %s" % (step, desc, r.returncode, r.stderr))
                else:
                    if mode == "--children":
                        gone = m.descendants(t) + [t]
                    elif mode == "--children-only":
                        gone = m.descendants(t)
                    else:
                        gone = [t]
                    for s in gone:
                        m.remove(s)
                    stats["delete"] += 1
            print("seed %d step %d: %s" % (seed, step, desc))
            verify(env, m, "d", "seed %d step %d: %s" % (seed, step, desc), rng)
        for s in sorted(m.snaps):
            env.validate_xml("d", s)
        print("seed %d: %s" % (seed, stats))
        return stats
    finally:
        if os.environ.get("KEEP"):
            print("kept", env.dir)
        else:
            env.cleanup()


def test():
    mlib.requirements("qemu-img", "virt-xml-validate")
    seeds = [int(s) for s in os.environ.get("SEEDS", "").split(",") if s] or \
        (list(range(1, 13)) if mlib.LONG else [1, 2, 3])
    steps = int(os.environ.get("STEPS", "120" if mlib.LONG else "60"))
    total = {}
    for seed in seeds:
        for k, v in run_seed(seed, steps).items():
            total[k] = total.get(k, 0) + v
    print("total over %d seeds x %d steps: %s" % (len(seeds), steps, total))


if __name__ == "__main__":
    mlib.main(test)
