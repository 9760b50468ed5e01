#!/usr/bin/env python3
"""blockcommit, blockpull and blockcopy on a domain that is not running, with the catalog kept
true (snapshots whose data a commit changes are refused, or marked invalid with --force);
--dry-run plans that change nothing; linked clones (protected base, --flatten, blockpull makes
the clone independent); reconcile reporting files changed behind cowtree's back."""

import hashlib
import os
import subprocess
import sys

sys.dont_write_bytecode = True  # no __pycache__ in the source tree
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import mlib  # noqa: E402
from mlib import Failure  # noqa: E402

SIZE = 1 << 20


def expect(cond, msg):
    if not cond:
        raise Failure(msg)


def tree_sums(env):
    out = {}
    for f in sorted(os.listdir(env.img)):
        with open(os.path.join(env.img, f), "rb") as fh:
            out[f] = hashlib.sha256(fh.read()).hexdigest()
    return out


def setup_chain(env):
    """base.qcow2 (a template, not owned) <- vm.qcow2, defined as domain d."""
    base = env.create("base.qcow2")
    env.io(base, "write -P 1 0 256k")
    vm = env.create("vm.qcow2", size=None, backing=base)
    env.io(vm, "write -P 2 64k 64k")
    env.run("define", "d", "--disk", "vda=" + vm)
    return base, vm


def commit_pull_copy():
    env = mlib.Env("block")
    try:
        base, vm = setup_chain(env)
        imgs = {i["path"]: i for i in env.images("d")}
        expect(not imgs[base]["owned"] and imgs[vm]["owned"], "template is not owned")
        env.run("snapshot-create-as", "d", "s1", "--disk-only")
        top = env.disks("d")["vda"]["source"]
        env.io(top, "write -P 3 128k 64k")
        cur = env.current_view("d", "vda")
        s1 = env.all_views("d")["s1"]
        # A commit that changes s1's data is refused, and changes nothing.
        sums = tree_sums(env)
        r = env.run("blockcommit", "d", "vda", "--shallow", rc=4)
        expect("s1" in r.stderr and "--force" in r.stderr, r.stderr)
        plan = env.json("blockcommit", "d", "vda", "--shallow", "--force", "--dry-run")
        expect(plan["dry_run"] and plan["bytes"] > 0, plan)
        expect([s["action"] for s in plan["steps"]] == ["commit", "catalog"], plan)
        expect(tree_sums(env) == sums, "dry run changed files")
        env.run("blockcommit", "d", "vda", "--shallow", "--force", "--delete", "--wait",
                "--verbose")
        expect(env.current_view("d", "vda") == cur, "commit changed the current state")
        info = env.json("snapshot-info", "d", "s1")
        expect(not info["valid"], "s1 must be marked invalid")
        expect(not os.path.exists(top), "--delete kept the committed layer")
        r = env.run("snapshot-revert", "d", "s1", "--force", rc=4)
        expect("invalid" in r.stderr, r.stderr)
        env.check_images("d")
        env.check_reconcile("d")
        env.check_no_stray_files(["d"])
        env.run("snapshot-delete", "d", "s1")
        # blockcommit down to the template (written on the user's request).
        env.run("blockcommit", "d", "vda", "--base", base)
        expect(env.disks("d")["vda"]["source"] == base, "pivot to the base")
        expect(os.path.exists(vm), "without --delete the committed layer stays")
        env.tolerated.add(vm)
        expect(env.current_view("d", "vda") == cur, "commit to base changed the data")
        env.check_reconcile("d")
        # blockpull: the top absorbs its chain.
        r = env.run("define", "x", "--disk", "vda=" + env.create("x.qcow2", size=None,
                                                                  backing=base), rc=4)
        expect("already used by domain d" in r.stderr, r.stderr)
        os.unlink(env.path("x.qcow2"))
        base2 = env.create("base2.qcow2")
        env.io(base2, "write -P 1 0 256k")
        vm2 = env.create("vm2.qcow2", size=None, backing=base2)
        env.io(vm2, "write -P 4 512k 64k")
        env.run("define", "e", "--disk", "vda=" + vm2)
        cur2 = env.current_view("e", "vda")
        plan = env.json("blockpull", "e", "vda", "--dry-run")
        expect(plan["bytes"] > 0 and plan["written"] == [vm2], plan)
        r = env.run("blockpull", "d", "vda", "--base", env.path("nothere"), rc=3)
        env.run("blockpull", "e", "vda", "--bandwidth", "100")
        env.tolerated.add(base2)  # the template nothing uses any more: forgotten, kept
        expect(env.disks("e")["vda"]["chain"] == [vm2], "pull left a backing file")
        expect(env.current_view("e", "vda") == cur2, "pull changed the data")
        info = mlib.json.loads(env.qemu_img("info", "-U", "--output=json", vm2))
        expect("backing-filename" not in info, "vm2 still links to a backing file")
        env.check_reconcile("e")
        # blockcopy: a point-in-time copy, then a copy that becomes the disk (--pivot).
        dest = env.path("copy.qcow2")
        env.run("blockcopy", "e", "vda", dest, "--finish", "--wait")
        expect(env.read_view(dest, "qcow2") == cur2, "blockcopy content")
        expect(env.disks("e")["vda"]["source"] == vm2, "--finish must not pivot")
        os.unlink(dest)
        r = env.run("blockcopy", "e", "vda", vm, rc=4)  # an image of another domain
        env.run("snapshot-create-as", "e", "t1", "--disk-only")
        env.io(env.disks("e")["vda"]["source"], "write -P 5 0 4k")
        cur3 = env.current_view("e", "vda")
        shallow = env.path("shallow.qcow2")
        env.run("blockcopy", "e", "vda", shallow, "--shallow", "--pivot")
        expect(env.disks("e")["vda"]["source"] == shallow, "pivot")
        expect(env.disks("e")["vda"]["chain"][1] == vm2, "shallow copy keeps the backing file")
        expect(env.current_view("e", "vda") == cur3, "shallow copy content")
        expect(env.all_views("e")["t1"]["vda"] == cur2, "t1 intact after the copy")
        raw = env.path("flat.raw")
        env.run("blockcopy", "e", "vda", raw, "--format", "raw", "--pivot")
        expect(env.current_view("e", "vda") == cur3, "raw copy content")
        expect(env.disks("e")["vda"]["format"] == "raw", "raw")
        env.check_images("e")
        env.check_reconcile("e")
        env.check_reconcile("d")
        env.check_no_stray_files(["d", "e"])
    finally:
        env.cleanup()


def clones():
    env = mlib.Env("clone")
    try:
        a = env.create("a.qcow2")
        b = env.create("b.qcow2")
        env.run("define", "d", "--disk", "vda=" + a, "--disk", "vdb=" + b)
        env.io(a, "write -P 1 0 64k")
        env.io(b, "write -P 2 0 64k")
        env.run("snapshot-create-as", "d", "gold", "--diskspec", "vda,snapshot=internal",
                "--diskspec", "vdb,snapshot=external")
        env.io(a, "write -P 9 0 64k")
        gold = env.all_views("d")["gold"]
        env.run("clone", "d", "gold", "c1")
        expect(env.all_views("c1")["@current"] == gold, "linked clone reads gold")
        expect(env.json("snapshot-info", "d", "gold")["protected"], "gold protected by c1")
        r = env.run("snapshot-delete", "d", "gold", rc=4)
        expect("c1" in r.stderr, r.stderr)
        env.run("snapshot-unprotect", "d", "gold", rc=4)
        env.run("clone", "d", "gold", "c1", rc=4)  # duplicate name
        # The clone lives its own life: writes and snapshots do not touch gold.
        env.io(env.disks("c1")["vda"]["source"], "write -P 7 64k 64k")
        env.run("snapshot-create-as", "c1", "c1s", "--disk-only")
        expect(env.all_views("d")["gold"] == gold, "gold after clone writes")
        # A flattened clone depends on nothing.
        env.run("clone", "d", "gold", "c2", "--flatten")
        expect(all(len(x["chain"]) == 1 for x in env.json("domblklist", "c2")), "flat")
        expect(env.all_views("c2")["@current"] == gold, "flattened clone reads gold")
        # blockpull makes c1 independent; then gold can be unprotected and deleted.
        for t in ("vda", "vdb"):
            env.run("blockpull", "c1", t)
        # c1s's overlay chain still reads through gold's state? It was pulled into the top
        # only: the snapshot c1s keeps gold's state image alive, so gold stays protected.
        env.run("snapshot-delete", "c1", "c1s")
        expect(not env.json("snapshot-info", "d", "gold")["protected"], "c1 independent")
        c1cur = env.all_views("c1")["@current"]
        env.run("snapshot-delete", "d", "gold")
        expect(env.all_views("c1")["@current"] == c1cur, "c1 after deleting gold")
        expect(env.all_views("c2")["@current"] == gold, "c2 after deleting gold")
        for dom in ("d", "c1", "c2"):
            env.check_images(dom)
            env.check_reconcile(dom)
        env.check_no_stray_files(["d", "c1", "c2"])
        env.run("undefine", "c2", "--remove-all-storage")
        expect(not any(f.startswith("c2-") for f in os.listdir(env.img)), "storage removed")
    finally:
        env.cleanup()


def reconcile():
    env = mlib.Env("reconcile")
    try:
        a = env.create("a.qcow2")
        env.run("define", "d", "--disk", "vda=" + a)
        env.run("snapshot-create-as", "d", "s1", "--disk-only")
        env.run("snapshot-create-as", "d", "s2")
        env.check_reconcile("d")
        top = env.disks("d")["vda"]["source"]
        # Edited behind cowtree's back: the internal snapshot disappears.
        env.qemu_img("snapshot", "-d", "s2", top)
        r = env.run("reconcile", "d", rc=5)
        expect("s2" in r.stdout, r.stdout)
        r = env.run("snapshot-revert", "d", "s1", "--force", rc=5)
        expect("reconcile" in r.stderr, r.stderr)
        r = env.run("reconcile", "d", "--fix", "--output=json", rc=0)
        rep = mlib.json.loads(r.stdout)
        expect(rep["unresolved"] == 0 and rep["findings"][0]["fixed"], rep)
        expect(not env.json("snapshot-info", "d", "s2")["valid"], "s2 marked invalid")
        # A backing link changed behind cowtree's back: reported, never guessed.
        other = env.create("other.qcow2")
        env.qemu_img("rebase", "-u", "-b", other, "-F", "qcow2", top)
        r = env.run("reconcile", "d", rc=5)
        expect("other.qcow2" in r.stdout, r.stdout)
        r = env.run("reconcile", "d", "--fix", rc=5)
        r = env.run("snapshot-create-as", "d", "s3", "--disk-only", rc=5)
        expect("disagree" in r.stderr, r.stderr)
        env.qemu_img("rebase", "-u", "-b", a, "-F", "qcow2", top)
        env.check_reconcile("d")
        # A moved file.
        os.rename(a, a + ".moved")
        r = env.run("reconcile", "d", rc=5)
        expect("missing" in r.stdout, r.stdout)
        env.run("snapshot-delete", "d", "s1", rc=5)
        os.rename(a + ".moved", a)
        env.check_reconcile("d")
    finally:
        env.cleanup()


def test():
    mlib.requirements("qemu-img")
    commit_pull_copy()
    print("ok 1 - blockcommit / blockpull / blockcopy keep the catalog true")
    clones()
    print("ok 2 - linked clones, protection, --flatten, blockpull")
    reconcile()
    print("ok 3 - reconcile reports and fixes without guessing")


if __name__ == "__main__":
    mlib.main(test)
