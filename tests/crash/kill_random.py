#!/usr/bin/env python3
"""Driver for test-kill-random.sh: SIGKILL cowtree-io at chosen write/fdatasync calls of a
mixed workload (COWTREE_FAULT=write:K:kill / flush:K:kill) and check what is left.

usage: kill_random.py WORKDIR   (COWTREE_BUILD, COWTREE_TEST_LONG, COWTREE_CRASH_SEED,
                                 COWTREE_CRASH_VARIANTS, COWTREE_CRASH_JOBS are honoured)
After every kill:
 (a) qemu-img check finds no corruption (exit 0, or 3 = leaks only);
 (b) `cowtree-io -c 'read 0 4k'` (read-write open, repairs a dirty image) succeeds, and then
     qemu-img check exits 0 (v2 images have no dirty bit: leaks may stay until
     `cowtree-img check -r leaks`, which must then leave the image clean);
 (c) every command acknowledged before the last completed flush reads back exactly, sectors
     written in the interrupted segment hold old-or-new content (see crashlib's oracle), and
     nothing else changed.
"""
import os
import sys

sys.dont_write_bytecode = True  # no __pycache__ in the source tree
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import crashlib as cl  # noqa: E402


def choose_ks(scn):
    W, F = scn.total_writes, scn.total_flushes
    if cl.long_mode():
        return [("write", k) for k in range(1, W + 1)] + [("flush", k) for k in range(1, F + 1)]
    ks = set(cl.spread(1, W, 60))
    # Around every segment end: the prefix count includes the close's writes, so the first
    # write after the flush is within a few calls of it.
    for i in scn.flush_indices():
        w = scn.counts[i][0]
        ks.update(k for k in range(w - 2, w + 2) if 1 <= k <= W)
    return [("write", k) for k in sorted(ks)] + [("flush", k) for k in range(1, F + 1)]


def kill_trial(scn, kind, k):
    d = scn.new_trial_dir("%s%d" % (kind, k))
    env = {"COWTREE_FAULT": "%s:%d:kill" % (kind, k)}
    r = cl.run(scn.workload_argv(), env, cwd=d)
    label = "%s %s" % (scn.v.name, env["COWTREE_FAULT"])
    if r.rc == 0:
        cl.shutil.rmtree(d)
        return label, None, "not-reached", None
    if r.rc != -9:
        cl.done_with(d, True)
        return label, ["the workload run should have been killed by SIGKILL at %s %d but "
                       "ended with %s" % (kind, k, r.describe())], "bad-exit", scn.repro(env)
    st = cl.parse_progress(r.out)
    m = len(st)
    problems = []
    if not all(st):
        problems.append("a workload command failed before the kill: " + cl.tail(r.out))
    # Harness sanity: the kill cannot come later than the clean prefix run of m+1 commands
    # (which includes its close) would have reached.
    if m < scn.n:
        cap = scn.counts[m + 1][0 if kind == "write" else 1]
        if k > cap:
            problems.append("harness: kill %s %d reported after %d commands, but a clean run of "
                            "%d commands makes only %d such calls" % (kind, k, m, m + 1, cap))
    durable = max([i for i in scn.flush_indices() if i <= m], default=0)
    last = min(m + 1, scn.n)
    modes = [(i, True) for i in range(1, durable + 1)] + \
            [(i, False) for i in range(durable + 1, last + 1)]
    problems += cl.post_fault_checks(scn, d, modes)
    where = "killed during %s; durable through command %d" % (scn.describe_cmd(m + 1), durable)
    cl.done_with(d, bool(problems))
    if problems:
        return label, [where] + problems, "fail", scn.repro(env)
    return label, None, "ok", None


def main():
    work = sys.argv[1]
    tools = cl.Tools(os.environ.get("COWTREE_BUILD", "build"))
    rep = cl.Report("test-kill-random")
    cl.log("build: %s; long mode: %s; jobs: %d" % (tools.build, cl.long_mode(), tools.jobs))
    for v in cl.default_variants():
        scn = cl.Scenario(tools, v, work)
        scn.build_start()
        if scn.setup_problems:
            rep.fail("%s setup" % v.name, scn.setup_problems, scn.repro({}))
        problems = scn.analyse()
        if problems:
            rep.fail("%s clean analysis" % v.name, problems, scn.repro({}))
            cl.log("%s: the clean workload itself misbehaves; skipping its kill points" % v.name)
            continue
        if scn.soft_problems:
            rep.fail("%s clean workload" % v.name, scn.soft_problems, scn.repro({}))
        ks = choose_ks(scn)
        cl.log("%s (-o %s): %d commands in %d segments (%s); clean run makes %d writes, "
               "%d flushes; trying %d write and %d flush kill points" % (
                   v.name, v.create_opts, scn.n, len(scn.flush_indices()), scn.coverage,
                   scn.total_writes,
                   scn.total_flushes, sum(1 for x in ks if x[0] == "write"),
                   sum(1 for x in ks if x[0] == "flush")))
        results = cl.parallel(tools, lambda x: kill_trial(scn, *x), ks)
        nfail = 0
        for label, problems, status, repro in results:
            if status == "not-reached":
                continue
            rep.tried += 1
            if problems:
                nfail += 1
                rep.fail(label, problems, repro)
        cl.log("%s: %d kill points, %d failed" % (v.name, len(ks), nfail))
    rep.print_failures()
    return rep.finish()


if __name__ == "__main__":
    sys.exit(main())
