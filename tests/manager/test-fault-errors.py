#!/usr/bin/env python3
"""I/O errors under the manager's multi-disk create, revert and delete: an EIO or ENOSPC at
the K-th storage write, or an EIO at the K-th flush (directory syncs included), for every K
the operation makes (COWTREE_FAULT=count tells how many; CI samples them, COWTREE_TEST_LONG=1
takes every K). Each run either succeeds with the uninterrupted run's result, or fails with a
clear error naming the I/O error and a non-zero exit; then, after the next command (which
finishes or rolls back a pending journal plan), the snapshot tree and every view are either
the state before or the state after the operation, never in between, the catalog and the
files agree (reconcile), every image passes `qemu-img check` without leaks, and no file is
left that the catalog does not know."""

import importlib.util
import os
import re
import shutil
import sys

sys.dont_write_bytecode = True  # no __pycache__ in the source tree
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import mlib  # noqa: E402
from mlib import Failure  # noqa: E402

# The scenarios (setups and operations) are the kill test's.
_spec = importlib.util.spec_from_file_location("kill_recover",
                                               os.path.join(HERE, "test-kill-recover.py"))
kr = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(kr)

SCENARIOS = ["create-external", "create-mixed", "create-internal", "revert-external",
             "revert-internal-materialize", "revert-internal-inplace", "delete-external",
             "delete-branch-point", "delete-children-mixed"]
MESSAGES = ("Input/output error", "No space left on device")


def counts(env, op):
    r = env.run(*op, rc=0, extra_env={"COWTREE_FAULT": "count", "COWTREE_FAULT_REPORT": "1"})
    m = re.search(r"fault-counts: writes=(\d+) flushes=(\d+)", r.stderr)
    if not m:
        raise Failure("no fault-counts report: %s" % r.stderr)
    return int(m.group(1)), int(m.group(2))


def sample(n, long_mode):
    """Every K in long mode; else the first 6, the last 3 and a spread in between."""
    if long_mode or n <= 12:
        return list(range(1, n + 1))
    ks = set(range(1, 7)) | set(range(n - 2, n + 1))
    step = max(1, (n - 9) // 6)
    ks |= set(range(7, n - 2, step))
    return sorted(ks)


def scenario_run(name, long_mode):
    setup, op = kr.SCENARIOS[name]
    env = mlib.Env("fault-" + name)
    template = env.dir + ".template"
    stats = {"runs": 0, "failed": 0, "rolled-back": 0, "finished": 0, "tolerated": 0}
    try:
        setup(env)
        before = kr.state(env)
        env.tolerated |= {im["path"] for im in env.images("d") if not im["owned"]}
        op = [a.replace("@img", env.img) for a in op]
        shutil.copytree(env.dir, template, symlinks=True)
        nw, nf = counts(env, op)
        want = kr.state(env)
        kr.checks(env, name + " uninterrupted")
        faults = [("write:%d:eio", nw), ("write:%d:enospc", nw), ("flush:%d:eio", nf)]
        for fmt, n in faults:
            for k in sample(n, long_mode):
                kr.restore(template, env.dir)
                spec = fmt % k
                where = "%s with COWTREE_FAULT=%s" % (name, spec)
                r = env.run(*op, rc=None, extra_env={"COWTREE_FAULT": spec})
                stats["runs"] += 1
                if r.returncode == 0:
                    # The fault hit a call whose failure is retried or harmless: the result
                    # must be the full one.
                    if kr.state(env) != want:
                        raise Failure("%s: succeeded with a different result" % where)
                    stats["tolerated"] += 1
                    kr.checks(env, where)
                    continue
                if r.returncode < 0 or r.returncode > 5:
                    raise Failure("%s: rc=%d (crash?) %s" % (where, r.returncode, r.stderr))
                err = r.stderr.strip()
                if "error:" not in err or not any(msg in err for msg in MESSAGES):
                    raise Failure("%s: unclear error message: %r" % (where, err))
                stats["failed"] += 1
                rec = env.run("recover", rc=None)
                if rec.returncode != 0:
                    raise Failure("%s: recover failed: %s" % (where, rec.stderr))
                got = kr.state(env)
                if got == before:
                    stats["rolled-back"] += 1
                elif got == want:
                    stats["finished"] += 1
                else:
                    raise Failure("%s: half-done state after the error (tree %s)" % (where,
                                                                                     got[1]))
                kr.checks(env, where)
        print("%s: writes=%d flushes=%d %s" % (name, nw, nf, stats))
        return stats
    finally:
        shutil.rmtree(template, ignore_errors=True)
        env.cleanup()


def test():
    mlib.requirements("qemu-img")
    only = os.environ.get("SCENARIOS")
    names = only.split(",") if only else SCENARIOS
    total = 0
    for i, n in enumerate(names):
        s = scenario_run(n, mlib.LONG)
        total += s["runs"]
        print("ok %d - %s: %d faults (%d failed cleanly, %d tolerated)" % (
            i + 1, n, s["runs"], s["failed"], s["tolerated"]))
    print("%d injected faults in %d scenarios" % (total, len(names)))


if __name__ == "__main__":
    mlib.main(test)
