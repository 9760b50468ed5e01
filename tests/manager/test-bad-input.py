#!/usr/bin/env python3
"""Bad input from the spec, each with a clear error, its exit status (2 usage, 3 not found,
4 refused, 5 catalog and files disagree) and nothing changed: unknown domain, disk or
snapshot; duplicate names; a file that exists without --reuse-external or is missing with it;
a backing chain that does not match the catalog; deleting the base of other branches without
--children; protected snapshots; invalid names and flags."""

import hashlib
import os
import sys

sys.dont_write_bytecode = True  # no __pycache__ in the source tree
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import mlib  # noqa: E402
from mlib import Failure  # noqa: E402

N = 0


def fingerprint(env):
    h = hashlib.sha256()
    for dom in [d["name"] for d in env.json("list", "--all")]:
        for args in (["snapshot-list", dom], ["domblklist", dom], ["images", dom],
                     ["dominfo", dom]):
            h.update(env.run(*(args + ["--output=json"])).stdout.encode())
    for f in sorted(os.listdir(env.img)):
        h.update(f.encode())
        with open(os.path.join(env.img, f), "rb") as fh:
            h.update(hashlib.sha256(fh.read()).digest())
    return h.hexdigest()


def bad(env, rc, words, *args):
    """Run a command that must fail with rc, mention every word, and change nothing."""
    global N
    before = fingerprint(env)
    r = env.run(*args, rc=None)
    if r.returncode != rc:
        raise Failure("cowtree %s: rc=%d, want %d\n%s%s" % (" ".join(args), r.returncode, rc,
                                                            r.stdout, r.stderr))
    for w in words:
        if w not in r.stderr:
            raise Failure("cowtree %s: error does not mention %r: %s" % (" ".join(args), w,
                                                                       r.stderr))
    if fingerprint(env) != before:
        raise Failure("cowtree %s failed but changed something" % " ".join(args))
    N += 1
    print("ok %d - %s -> rc %d: %s" % (N, " ".join(a.replace(env.img + "/", "")
                                                    for a in args), rc, r.stderr.strip()))


def test():
    mlib.requirements("qemu-img")
    env = mlib.Env("bad")
    try:
        a = env.create("a.qcow2")
        b = env.create("b.qcow2")
        env.run("define", "d", "--disk", "vda=" + a, "--disk", "vdb=" + b)
        env.run("snapshot-create-as", "d", "e1", "--disk-only")
        env.run("snapshot-create-as", "d", "i2")
        env.run("snapshot-create-as", "d", "s1")
        # Unknown domain, disk, snapshot.
        bad(env, 3, ["nodom"], "snapshot-create-as", "nodom", "x")
        bad(env, 3, ["nodom"], "dominfo", "nodom")
        bad(env, 3, ["nodom"], "snapshot-list", "nodom")
        bad(env, 3, ["vdz"], "snapshot-create-as", "d", "x", "--diskspec", "vdz,snapshot=external")
        bad(env, 3, ["vdz"], "blockpull", "d", "vdz")
        for verb in ("snapshot-revert", "snapshot-delete", "snapshot-info", "snapshot-dumpxml",
                     "snapshot-parent", "snapshot-protect"):
            bad(env, 3, ["nosnap"], verb, "d", "nosnap")
        bad(env, 3, ["nosnap"], "snapshot-current", "d", "nosnap")
        bad(env, 3, ["nosnap"], "snapshot-list", "d", "--from", "nosnap")
        bad(env, 3, ["nosnap"], "clone", "d", "nosnap", "c")
        # Duplicates.
        bad(env, 4, ["already exists"], "define", "d", "--disk", "vda=" + env.create("c.qcow2"))
        bad(env, 4, ["already exists"], "snapshot-create-as", "d", "s1")
        bad(env, 4, ["already used"], "define", "d2", "--disk", "vda=" + a)
        bad(env, 4, ["twice"], "define", "d2", "--disk", "vda=" + env.path("c.qcow2"),
            "--disk", "vda=" + env.path("c.qcow2"))
        bad(env, 1, ["twice"], "snapshot-create-as", "d", "x", "--diskspec", "vda",
            "--diskspec", "vda")
        bad(env, 3, ["does not exist"], "define", "d2", "--disk", "vda=" + env.path("none"))
        # A file that exists without --reuse-external, or is missing with it.
        taken = env.path("taken.qcow2")
        open(taken, "w").close()
        bad(env, 4, ["exists", "--reuse-external"], "snapshot-create-as", "d", "x",
            "--disk-only", "--diskspec", "vda,file=" + taken)
        bad(env, 3, ["does not exist", "--reuse-external"], "snapshot-create-as", "d", "x",
            "--disk-only", "--reuse-external", "--diskspec", "vda,file=" + env.path("none"),
            "--diskspec", "vdb,snapshot=no")
        os.unlink(taken)
        env.run("snapshot-create-as", "d", "hidden", "--no-metadata")
        bad(env, 4, ["already holds an internal snapshot"], "snapshot-create-as", "d", "hidden")
        # Invalid names, kinds, formats and flags.
        bad(env, 1, ["'/'"], "snapshot-create-as", "d", "a/b")
        bad(env, 1, ["'.'"], "snapshot-create-as", "d", ".hidden")
        bad(env, 2, ["snapshot must be"], "snapshot-create-as", "d", "x", "--diskspec",
            "vda,snapshot=maybe")
        bad(env, 1, ["qcow2"], "snapshot-create-as", "d", "x", "--disk-only", "--diskspec",
            "vda,driver=raw")
        bad(env, 1, ["no disk"], "snapshot-create-as", "d", "x", "--diskspec",
            "vda,snapshot=no", "--diskspec", "vdb,snapshot=no")
        bad(env, 1, ["mutually exclusive"], "snapshot-delete", "d", "s1", "--children",
            "--children-only")
        bad(env, 2, ["usage"], "snapshot-revert", "d")
        bad(env, 2, ["unknown command"], "snapshot-frobnicate", "d")
        bad(env, 1, ["--redefine"], "snapshot-create", "d", "--current")
        xml = os.path.join(env.dir, "bad.xml")
        with open(xml, "w") as f:
            f.write("<domainsnapshot><name>m</name><memory snapshot='internal'/>"
                    "</domainsnapshot>")
        bad(env, 1, ["memory"], "snapshot-create", "d", xml)
        with open(xml, "w") as f:
            f.write("<domainsnapshot><name>m</")
        bad(env, 1, ["invalid snapshot XML"], "snapshot-create", "d", xml)
        # Deleting the base of other branches without --children: e1's state image is the
        # base of the image holding i2 (an internal snapshot that reads through it).
        bad(env, 4, ["cannot merge", "--children"], "snapshot-delete", "d", "e1")
        # Protected snapshots cannot be deleted or merged.
        env.run("snapshot-protect", "d", "s1")
        bad(env, 4, ["protected"], "snapshot-delete", "d", "s1")
        bad(env, 4, ["protected"], "snapshot-delete", "d", "s1", "--metadata")
        bad(env, 4, ["protected"], "snapshot-delete", "d", "s1", "--children")
        env.run("snapshot-unprotect", "d", "s1")
        # Unsaved changes without --force.
        env.io(env.disks("d")["vda"]["source"], "write -P 9 0 4k")
        bad(env, 4, ["--force", "vda"], "snapshot-revert", "d", "s1")
        # The catalog and the files disagree: detect, report, never guess.
        top = env.disks("d")["vdb"]["source"]
        other = env.create("other.qcow2")
        env.qemu_img("rebase", "-u", "-b", other, "-F", "qcow2", top)
        env.tolerated.add(other)
        bad(env, 5, ["disagree", "reconcile", "other.qcow2"], "snapshot-create-as", "d", "x")
        bad(env, 5, ["disagree"], "snapshot-revert", "d", "s1", "--force")
        bad(env, 5, ["disagree"], "snapshot-delete", "d", "i2")
        bad(env, 5, ["disagree"], "blockpull", "d", "vda")
        env.qemu_img("rebase", "-u", "-b", b, "-F", "qcow2", top)
        # A --no-metadata internal snapshot also pins its image: drop it by hand first.
        for dk in env.json("domblklist", "d"):
            env.qemu_img("snapshot", "-d", "hidden", dk["source"])
        # With --children the branch goes too, and everything stays consistent.
        env.run("snapshot-delete", "d", "e1", "--children")
        env.check_images("d")
        env.check_reconcile("d")
        # Undefine refuses while snapshots exist.
        env.run("snapshot-create-as", "d", "last")
        bad(env, 4, ["--snapshots-metadata"], "undefine", "d")
        env.run("undefine", "d", "--snapshots-metadata")
        bad(env, 3, ["d"], "dominfo", "d")
        print("%d bad inputs refused, nothing changed" % N)
    finally:
        env.cleanup()


if __name__ == "__main__":
    mlib.main(test)
