#!/usr/bin/env python3
"""Driver for test-fault-errors.sh: the kill test's workload with one write or fdatasync call
failing (COWTREE_FAULT=write:K:eio, write:K:enospc, flush:K:eio).

usage: fault_errors.py WORKDIR   (same environment knobs as kill_random.py)
For every injected error:
 - cowtree-io exits 1 (not 0: the error must not be swallowed; not a signal, rc < 128), prints
   a message naming the error (strerror text), and has no sanitizer report on stderr;
 - every workload command still reports (a line per command), so the driver knows which
   commands and which flushes succeeded;
 - (a) qemu-img check finds no corruption (leaks allowed), (b) a read-write open by cowtree-io
   works and leaves the image clean (v2: clean after `cowtree-img check -r leaks`), (c) every
   command acknowledged before a successful flush reads back; the failed command and anything
   not followed by a successful flush is old-or-new per sector (crashlib's oracle).
"""
import os
import sys

sys.dont_write_bytecode = True  # no __pycache__ in the source tree
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import crashlib as cl  # noqa: E402

ERRTEXT = {"eio": "Input/output error", "enospc": "No space left on device"}


def choose(scn):
    W, F = scn.total_writes, scn.total_flushes
    if cl.long_mode():
        return ([("write", k, "eio") for k in range(1, W + 1)] +
                [("write", k, "enospc") for k in range(1, W + 1)] +
                [("flush", k, "eio") for k in range(1, F + 1)])
    eio = set(cl.spread(1, W, 30))
    for i in scn.flush_indices():  # the calls right around segment ends
        w = scn.counts[i][0]
        eio.update(k for k in (w - 1, w, w + 1) if 1 <= k <= W)
    enospc = set(cl.spread(2, W, 20)) - eio or {W}
    fl = set(cl.spread(1, F, 30))
    return ([("write", k, "eio") for k in sorted(eio)] +
            [("write", k, "enospc") for k in sorted(enospc)] +
            [("flush", k, "eio") for k in sorted(fl)])


def error_trial(scn, op, k, act):
    d = scn.new_trial_dir("%s%d%s" % (op, k, act))
    env = {"COWTREE_FAULT": "%s:%d:%s" % (op, k, act)}
    label = "%s %s" % (scn.v.name, env["COWTREE_FAULT"])
    r = cl.run(scn.workload_argv(), env, cwd=d)
    problems = []
    if not isinstance(r.rc, int) or r.rc < 0 or r.rc >= 128:
        problems.append("cowtree-io crashed or hung instead of failing cleanly: " + r.describe())
    elif r.rc == 0:
        problems.append("the injected error was swallowed: cowtree-io exited 0\n  stdout: " +
                        cl.tail(r.out) + "\n  stderr: " + cl.tail(r.err))
    elif r.rc != 1:
        problems.append("cowtree-io exited %d (the contract says 1 when a command fails)" % r.rc)
    san = r.sanitizer()
    if san:
        problems.append("sanitizer report:\n    " + san.replace("\n", "\n    "))
    if ERRTEXT[act] not in r.out + r.err:
        problems.append("no message names the error (%r): %s" % (ERRTEXT[act], r.describe()))
    st = cl.parse_progress(r.out)
    first_fail = next((i + 1 for i, ok in enumerate(st) if not ok), None)
    if len(st) != scn.n:
        problems.append("%d of %d commands reported; cannot tell which succeeded: %s" % (
            len(st), scn.n, r.describe()))
        where = "?"
    else:
        where = ("first failing command: %s" % scn.describe_cmd(first_fail) if first_fail
                 else "every command succeeded; the error hit the close")
        # A command is certain when it succeeded and a later flush succeeded.
        last_ok_flush = max([i for i in scn.flush_indices() if st[i - 1]], default=0)
        modes = [(i, st[i - 1] and i <= last_ok_flush) for i in range(1, scn.n + 1)]
        problems += cl.post_fault_checks(scn, d, modes)
    cl.done_with(d, bool(problems))
    if problems:
        return label, ["%s (exit %s)" % (where, r.rc)] + problems, scn.repro(env), where
    return label, None, None, where


def main():
    work = sys.argv[1]
    tools = cl.Tools(os.environ.get("COWTREE_BUILD", "build"))
    rep = cl.Report("test-fault-errors")
    cl.log("build: %s; long mode: %s; jobs: %d" % (tools.build, cl.long_mode(), tools.jobs))
    for v in cl.default_variants():
        scn = cl.Scenario(tools, v, work)
        scn.build_start()
        if scn.setup_problems:
            rep.fail("%s setup" % v.name, scn.setup_problems, scn.repro({}))
        problems = scn.analyse()
        if problems:
            rep.fail("%s clean analysis" % v.name, problems, scn.repro({}))
            continue
        if scn.soft_problems:
            rep.fail("%s clean workload" % v.name, scn.soft_problems, scn.repro({}))
        pts = choose(scn)
        cl.log("%s (-o %s): %d commands; clean run makes %d writes, %d flushes; trying %d "
               "write:eio, %d write:enospc, %d flush:eio points" % (
                   v.name, v.create_opts, scn.n, scn.total_writes, scn.total_flushes,
                   sum(1 for p in pts if p[0] == "write" and p[2] == "eio"),
                   sum(1 for p in pts if p[2] == "enospc"),
                   sum(1 for p in pts if p[0] == "flush")))
        results = cl.parallel(tools, lambda p: error_trial(scn, *p), pts)
        nfail = 0
        for label, problems, repro, where in results:
            rep.tried += 1
            if problems:
                nfail += 1
                rep.fail(label, problems, repro)
        cl.log("%s: %d error points, %d failed" % (v.name, len(pts), nfail))
    rep.print_failures()
    return rep.finish()


if __name__ == "__main__":
    sys.exit(main())
