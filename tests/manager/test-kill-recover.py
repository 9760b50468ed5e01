#!/usr/bin/env python3
"""kill -9 at every step of multi-disk create, revert and delete: at each journal point
(COWTREE_MANAGER_KILL_AT_STEP=N) and at each write or flush the image engine makes
(COWTREE_FAULT=write:K:kill / flush:K:kill). After `cowtree recover` the catalog and the files
agree (reconcile, qemu-img check, no stray file), no snapshot's content changed, and the
operation is complete with exactly the result an uninterrupted run gives. An I/O error in the
middle of an all-or-nothing step list rolls back to the state before."""

import os
import shutil
import subprocess
import sys

sys.dont_write_bytecode = True  # no __pycache__ in the source tree
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import mlib  # noqa: E402
from mlib import Failure  # noqa: E402

SIZE = 1 << 20


def w(env, disk, pat, off, ln="64k"):
    top = env.disks("d")[disk]["source"]
    env.io(top, "write -P %d %s %s" % (pat, off, ln))


def base(env):
    a = env.create("a.qcow2")
    b = env.create("b.qcow2")
    env.run("define", "d", "--disk", "vda=" + a, "--disk", "vdb=" + b)
    w(env, "vda", 1, "0", "192k")
    w(env, "vdb", 2, "64k", "128k")


def ext(env, name):
    env.run("snapshot-create-as", "d", name, "--disk-only")


def internal(env, name):
    env.run("snapshot-create-as", "d", name)


SCENARIOS = {}


def scenario(name, op):
    def deco(fn):
        SCENARIOS[name] = (fn, op)
        return fn
    return deco


@scenario("create-external", ["snapshot-create-as", "d", "x", "--disk-only", "--atomic"])
def s_create_ext(env):
    base(env)
    internal(env, "s0")
    w(env, "vda", 3, "64k")


@scenario("create-mixed", ["snapshot-create-as", "d", "x", "--diskspec", "vda,snapshot=internal",
                           "--diskspec", "vdb,snapshot=external"])
def s_create_mixed(env):
    base(env)
    ext(env, "s0")
    w(env, "vdb", 3, "0")


@scenario("create-internal", ["snapshot-create-as", "d", "x"])
def s_create_int(env):
    base(env)
    internal(env, "s0")
    w(env, "vda", 4, "128k")


@scenario("revert-external", ["snapshot-revert", "d", "s1", "--force"])
def s_revert_ext(env):
    base(env)
    ext(env, "s1")
    w(env, "vda", 5, "0")
    w(env, "vdb", 5, "0")
    ext(env, "s2")
    w(env, "vda", 6, "64k")
    w(env, "vdb", 6, "128k")


@scenario("revert-internal-materialize", ["snapshot-revert", "d", "s1", "--force"])
def s_revert_mat(env):
    base(env)
    internal(env, "s1")
    w(env, "vda", 5, "0")
    w(env, "vdb", 5, "64k")
    ext(env, "s2")
    w(env, "vda", 6, "64k")


@scenario("revert-internal-inplace", ["snapshot-revert", "d", "s1", "--force"])
def s_revert_inplace(env):
    base(env)
    internal(env, "s1")
    w(env, "vda", 5, "0")
    internal(env, "s2")
    w(env, "vdb", 6, "64k")


@scenario("delete-external", ["snapshot-delete", "d", "s1"])
def s_delete_ext(env):
    base(env)
    ext(env, "s1")
    w(env, "vda", 5, "0", "128k")
    w(env, "vdb", 5, "0")
    ext(env, "s2")
    w(env, "vda", 6, "64k")


@scenario("delete-branch-point", ["snapshot-delete", "d", "s1"])
def s_delete_branch(env):
    base(env)
    ext(env, "s1")
    w(env, "vda", 5, "0")
    w(env, "vdb", 5, "0")
    ext(env, "s2")
    w(env, "vda", 6, "64k")
    env.run("snapshot-revert", "d", "s1", "--force")
    w(env, "vdb", 7, "128k")
    ext(env, "s3")


@scenario("delete-children-mixed", ["snapshot-delete", "d", "s1", "--children"])
def s_delete_children(env):
    base(env)
    internal(env, "s0")
    ext(env, "s1")
    w(env, "vda", 5, "0")
    internal(env, "s2")
    w(env, "vdb", 6, "0")
    env.run("snapshot-create-as", "d", "s3", "--diskspec", "vda,snapshot=external",
            "--diskspec", "vdb,snapshot=internal")
    w(env, "vda", 7, "128k")


def template_chain(env):
    """base <- mid <- top, defined as d's two disks (the first two files are not owned)."""
    for disk in ("a", "b"):
        base = env.create(disk + "-base.qcow2")
        env.io(base, "write -P 1 0 512k")
        mid = env.create(disk + "-mid.qcow2", size=None, backing=base)
        env.io(mid, "write -P 2 128k 256k")
        top = env.create(disk + ".qcow2", size=None, backing=mid)
        env.io(top, "write -P 3 320k 128k")
    env.run("define", "d", "--disk", "vda=" + env.path("a.qcow2"),
            "--disk", "vdb=" + env.path("b.qcow2"))


@scenario("blockpull", ["blockpull", "d", "vda"])
def s_blockpull(env):
    template_chain(env)
    internal(env, "s1")
    env.run("snapshot-delete", "d", "s1", "--metadata")  # leaves an internal snapshot
    env.qemu_img("snapshot", "-d", "s1", env.path("a.qcow2"))
    env.qemu_img("snapshot", "-d", "s1", env.path("b.qcow2"))


@scenario("blockcommit", ["blockcommit", "d", "vdb", "--top", "@img/b-mid.qcow2", "--delete"])
def s_blockcommit(env):
    template_chain(env)


def state(env):
    views = env.all_views("d")
    tree = {s["name"]: (s["parent"], s["current"]) for s in env.json("snapshot-list", "d")}
    return views, tree


def checks(env, where, allow_leaks=False):
    try:
        env.check_images("d", allow_leaks)
        env.check_reconcile("d")
        env.check_no_stray_files(["d"])
    except Failure as e:
        raise Failure("%s: %s" % (where, e))


def restore(template, live):
    shutil.rmtree(live, ignore_errors=True)
    shutil.copytree(template, live, symlinks=True)


def run_op(env, op, extra):
    return env.run(*op, rc=None, extra_env=extra)


def scenario_run(name, stride):
    setup, op = SCENARIOS[name]
    env = mlib.Env("kill-" + name)
    template = env.dir + ".template"
    counts = {"killed": 0, "rolled-back": 0}
    try:
        setup(env)
        before_views, before_tree = state(env)
        # Files cowtree does not own (templates) may be forgotten once nothing uses them.
        env.tolerated |= {im["path"] for im in env.images("d") if not im["owned"]}
        op = [a.replace("@img", env.img) for a in op]
        shutil.copytree(env.dir, template, symlinks=True)
        r = run_op(env, op, None)
        if r.returncode != 0:
            raise Failure("%s: uninterrupted run failed: %s" % (name, r.stderr))
        want_views, want_tree = state(env)
        checks(env, name + " uninterrupted")

        kinds = [("COWTREE_MANAGER_KILL_AT_STEP", "%d")]
        kinds += [("COWTREE_FAULT", "write:%d:kill"), ("COWTREE_FAULT", "flush:%d:kill")]
        for var, fmt in kinds:
            k = 1
            while True:
                restore(template, env.dir)
                spec = fmt % k
                r = run_op(env, op, {var: spec})
                where = "%s with %s=%s" % (name, var, spec)
                if r.returncode == 0:
                    break  # ran to the end: every point of this kind was visited
                if r.returncode != -9:
                    raise Failure("%s: rc=%d %s" % (where, r.returncode, r.stderr))
                counts["killed"] += 1
                rec = env.run("recover", rc=None)
                if rec.returncode != 0:
                    raise Failure("%s: recover failed: %s" % (where, rec.stderr))
                views, tree = state(env)
                if (views, tree) == (want_views, want_tree):
                    pass
                elif (views, tree) == (before_views, before_tree) and var != \
                        "COWTREE_MANAGER_KILL_AT_STEP":
                    counts["rolled-back"] += 1
                else:
                    bad = [s for s in set(views) | set(want_views)
                           if views.get(s) != want_views.get(s)]
                    raise Failure("%s: after recovery the state differs from an uninterrupted "
                                  "run in %s (tree %s, want %s)" % (where, bad, tree, want_tree))
                checks(env, where)
                k += 1 if k < 40 else stride
        # An I/O error at each write: all or nothing, or pending and finished by the next
        # command; never a half state.
        k = 1
        while k < 400:
            restore(template, env.dir)
            spec = "write:%d:eio" % k
            r = run_op(env, op, {"COWTREE_FAULT": spec})
            if r.returncode == 0:
                break
            env.run("recover", rc=None)
            views, tree = state(env)
            if (views, tree) == (want_views, want_tree):
                pass
            elif (views, tree) == (before_views, before_tree):
                counts["rolled-back"] += 1
            else:
                raise Failure("%s with %s: half-done state after an I/O error" % (name, spec))
            # The engine's contract: a failed write leaks nothing.
            checks(env, "%s with %s" % (name, spec))
            k += 1 if k < 16 else 2 * stride + 1
        for s, v in before_views.items():
            if s != "@current" and s in want_views and want_views[s] != v:
                raise Failure("%s changed the content of snapshot %s" % (name, s))
        print("%s: %s" % (name, counts))
        return counts
    finally:
        shutil.rmtree(template, ignore_errors=True)
        env.cleanup()


def test():
    mlib.requirements("qemu-img")
    stride = 1 if mlib.LONG else 9
    only = os.environ.get("SCENARIOS")
    names = only.split(",") if only else sorted(SCENARIOS)
    total = 0
    for i, n in enumerate(names):
        c = scenario_run(n, stride)
        total += c["killed"]
        print("ok %d - %s: %d kills recovered" % (i + 1, n, c["killed"]))
    print("%d kills recovered in %d scenarios" % (total, len(names)))


if __name__ == "__main__":
    mlib.main(test)
