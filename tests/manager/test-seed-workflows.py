#!/usr/bin/env python3
"""The seed workflows end to end: seed 000's one -> two / one -> three hierarchy, seed 001's
snapshot a, b, revert a, create c (internal and external: the external revert is a new branch
that never writes b's files), and seed 002/003's disk-only external snapshot of a two-disk
domain with --diskspec and --atomic (names, backing links, all-or-nothing, --reuse-external),
plus --print-xml, snapshot-create from XML and --redefine."""

import hashlib
import os
import sys

sys.dont_write_bytecode = True  # no __pycache__ in the source tree
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import mlib  # noqa: E402
from mlib import Failure  # noqa: E402

SIZE = 1 << 20


def expect(cond, msg):
    if not cond:
        raise Failure(msg)


def sha(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def fill(n, byte):
    return bytes([byte]) * n


def seed000(external):
    """one -> two and one -> three: qemu-img's internal hierarchy, and the same tree with
    external snapshots (the revert to one makes the branch three hangs from)."""
    env = mlib.Env("seed000")
    try:
        a = env.create("vm.qcow2")
        env.run("define", "vm", "--disk", "vda=" + a)
        flags = ["--disk-only"] if external else []
        top = lambda: env.disks("vm")["vda"]["source"]  # noqa: E731
        env.io(top(), "write -P 1 0 64k")
        env.run("snapshot-create-as", "vm", "one", *flags)
        env.io(top(), "write -P 2 0 64k")
        env.run("snapshot-create-as", "vm", "two", *flags)
        # No unsaved changes since "two": no --force needed.
        env.run("snapshot-revert", "vm", "one")
        env.io(top(), "write -P 3 64k 64k")
        env.run("snapshot-create-as", "vm", "three", *flags)
        tree = env.run("snapshot-list", "vm", "--tree").stdout
        want = "one\n  |\n  +- three\n  +- two\n    \n\n"
        expect(tree == want, "tree:\n%r\nwant\n%r" % (tree, want))
        expect(env.run("snapshot-parent", "vm", "three").stdout == "one\n", "parent of three")
        expect(env.run("snapshot-parent", "vm", "two").stdout == "one\n", "parent of two")
        expect(env.run("snapshot-current", "vm", "--name").stdout == "three\n", "current")
        views = env.all_views("vm")
        expect(views["one"]["vda"] == fill(65536, 1) + bytes(SIZE - 65536), "one's content")
        expect(views["two"]["vda"] == fill(65536, 2) + bytes(SIZE - 65536), "two's content")
        expect(views["three"]["vda"] == fill(65536, 1) + fill(65536, 3) + bytes(SIZE - 131072),
               "three's content")
        if not external:
            names = env.qemu_img("snapshot", "-l", "-U", a)
            for n in ("one", "two", "three"):
                expect(n in names, "qemu-img snapshot -l misses %s:\n%s" % (n, names))
        info = env.json("snapshot-info", "vm", "one")
        expect(info["children"] == 2 and info["descendants"] == 2, "one has 2 children")
        expect(info["location"] == ("external" if external else "internal"), "location")
        for s in ("one", "two", "three"):
            env.validate_xml("vm", s)
        env.check_images("vm")
        env.check_reconcile("vm")
        env.check_no_stray_files(["vm"])
        # --dot renders the same tree.
        dot = env.run("snapshot-list", "vm", "--dot").stdout
        expect('"one" -> "two"' in dot and '"one" -> "three"' in dot, "dot edges:\n" + dot)
    finally:
        env.cleanup()


def seed001(external):
    """snapshot a, b, revert a, create c; b's files are never written by the revert."""
    env = mlib.Env("seed001")
    try:
        a = env.create("vm.qcow2")
        env.run("define", "vm", "--disk", "vda=" + a)
        flags = ["--disk-only"] if external else []
        top = lambda: env.disks("vm")["vda"]["source"]  # noqa: E731
        env.io(top(), "write -P 0xa 0 64k")
        env.run("snapshot-create-as", "vm", "a", *flags)
        env.io(top(), "write -P 0xb 0 64k")
        env.run("snapshot-create-as", "vm", "b", *flags)
        b_files = []
        if external:
            b_info = env.json("snapshot-info", "vm", "b")
            b_files = [dk["image"] for dk in b_info["disks"]]
        sums = {f: sha(f) for f in b_files}
        env.io(top(), "write -P 0xbb 128k 64k")  # unsaved changes after b
        r = env.run("snapshot-revert", "vm", "a", rc=4)
        expect("--force" in r.stderr, "revert over unsaved changes must ask for --force")
        dry = env.json("snapshot-revert", "vm", "a", "--force", "--dry-run")
        expect(dry["dry_run"] and dry["steps"], "dry-run plan")
        expect(env.run("snapshot-current", "vm", "--name").stdout == "b\n", "dry run changed")
        env.run("snapshot-revert", "vm", "a", "--force")
        for f, h in sums.items():
            expect(sha(f) == h, "revert wrote b's file %s" % f)
        expect(env.current_view("vm", "vda")[:65536] == fill(65536, 0xa), "state after revert")
        env.io(top(), "write -P 0xc 64k 64k")
        env.run("snapshot-create-as", "vm", "c", *flags)
        expect(env.run("snapshot-parent", "vm", "c").stdout == "a\n", "c's parent is a")
        views = env.all_views("vm")
        expect(views["b"]["vda"][:65536] == fill(65536, 0xb), "b intact")
        expect(views["b"]["vda"][131072:196608] == bytes(65536), "b without unsaved data")
        expect(views["c"]["vda"][:131072] == fill(65536, 0xa) + fill(65536, 0xc), "c")
        # Back to b and forward again: every branch stays valid.
        env.run("snapshot-revert", "vm", "b")
        expect(env.current_view("vm", "vda")[:65536] == fill(65536, 0xb), "revert to b")
        env.run("snapshot-revert", "vm", "c")
        expect(env.all_views("vm")["c"] == views["c"], "c after going back and forth")
        for s in ("a", "b", "c"):
            env.validate_xml("vm", s)
        env.check_images("vm")
        env.check_reconcile("vm")
        env.check_no_stray_files(["vm"])
    finally:
        env.cleanup()


def seed003():
    """Disk-only external snapshot of a two-disk domain with --diskspec and --atomic."""
    env = mlib.Env("seed003")
    try:
        a = env.create("vda.qcow2")
        b = env.create("vdb.img", fmt="raw")
        env.run("define", "vm", "--disk", "vda=" + a, "--disk", "vdb=" + b)
        env.io(a, "write -P 1 0 64k")
        env.io(b, "write -P 2 0 64k")
        # Internal needs every disk in qcow2: refused, nothing changed.
        r = env.run("snapshot-create-as", "vm", "x", rc=1)
        expect("qcow2" in r.stderr and "--disk-only" in r.stderr, r.stderr)
        fa = env.path("vda.snap1")
        fb = env.path("vdb.snap1.qcow2")
        # All or nothing: the second overlay's file exists -> no overlay at all.
        open(fb, "w").close()
        r = env.run("snapshot-create-as", "vm", "snap1", "--disk-only", "--atomic",
                    "--diskspec", "vda,snapshot=external,file=" + fa,
                    "--diskspec", "vdb,snapshot=external,file=" + fb, rc=4)
        expect("exists" in r.stderr and "--reuse-external" in r.stderr, r.stderr)
        expect(not os.path.exists(fa), "atomic create left %s" % fa)
        expect(env.json("snapshot-list", "vm") == [], "atomic create left a snapshot")
        os.unlink(fb)
        env.run("snapshot-create-as", "vm", "snap1", "first disk-only", "--disk-only", "--atomic",
                "--diskspec", "vda,snapshot=external,file=" + fa,
                "--diskspec", "vdb,file=" + fb)
        disks = env.disks("vm")
        expect(disks["vda"]["source"] == fa and disks["vdb"]["source"] == fb, "new tops")
        expect(disks["vda"]["chain"] == [fa, a] and disks["vdb"]["chain"] == [fb, b], "chains")
        for ov, base, bfmt in ((fa, a, "qcow2"), (fb, b, "raw")):
            info = mlib.json.loads(env.qemu_img("info", "-U", "--output=json", ov))
            expect(info["format"] == "qcow2", "%s format" % ov)
            expect(info["full-backing-filename"] == base, "%s backing %s" % (ov, info))
            expect(info.get("backing-filename-format") == bfmt, "%s backing format" % ov)
            expect(os.stat(ov).st_mode & 0o077 == 0, "%s is readable by others" % ov)
        xml = env.run("snapshot-dumpxml", "vm", "snap1").stdout
        expect("<source file='%s'/>" % fa in xml and "<source file='%s'/>" % fb in xml, xml)
        expect("<description>first disk-only</description>" in xml, xml)
        expect("<state>shutoff</state>" in xml, xml)
        env.validate_xml("vm", "snap1")
        expect(env.json("snapshot-list", "vm", "--disk-only")[0]["name"] == "snap1", "filter")
        expect(env.json("snapshot-list", "vm", "--internal") == [], "--internal filter")
        # Default names beside each image, as libvirt names them: vda.snap1 -> vda.snap2.
        env.run("snapshot-create-as", "vm", "snap2", "--disk-only")
        disks = env.disks("vm")
        expect(disks["vda"]["source"] == env.path("vda.snap2"), disks["vda"]["source"])
        expect(disks["vdb"]["source"] == env.path("vdb.snap1.snap2"), disks["vdb"]["source"])
        # --reuse-external: an existing file with the right backing is taken as the overlay.
        good = env.create("vda.pre", size=None, backing=env.path("vda.snap2"))
        wrong = env.create("vdb.pre", size=None, backing=fa)
        r = env.run("snapshot-create-as", "vm", "snap3", "--disk-only", "--reuse-external",
                    "--diskspec", "vda,file=" + good, "--diskspec", "vdb,file=" + wrong, rc=1)
        expect("backing" in r.stderr, r.stderr)
        r = env.run("snapshot-create-as", "vm", "snap3", "--disk-only", "--reuse-external",
                    "--diskspec", "vda,file=" + good,
                    "--diskspec", "vdb,file=" + env.path("nothere"), rc=3)
        expect("does not exist" in r.stderr, r.stderr)
        os.unlink(wrong)
        env.run("snapshot-create-as", "vm", "snap3", "--disk-only", "--reuse-external",
                "--diskspec", "vda,file=" + good, "--diskspec", "vdb,snapshot=no")
        expect(env.disks("vm")["vda"]["source"] == good, "reused overlay is the top")
        env.check_images("vm")
        env.check_reconcile("vm")
        env.check_no_stray_files(["vm"])
        # Deleting everything merges every layer away and keeps the current data.
        cur = env.all_views("vm")["@current"]
        env.run("snapshot-delete", "vm", "snap1", "--children")
        expect(env.all_views("vm")["@current"] == cur, "current state after deleting all")
        expect(all(len(d["chain"]) == 1 for d in env.json("domblklist", "vm")), "flat chains")
        env.check_images("vm")
        env.check_reconcile("vm")
        env.check_no_stray_files(["vm"])
    finally:
        env.cleanup()


def print_xml_and_redefine():
    env = mlib.Env("xml")
    try:
        a = env.create("vm.qcow2")
        b = env.create("vm2.qcow2")
        env.run("define", "vm", "--disk", "vda=" + a, "--disk", "vdb=" + b)
        out = env.run("snapshot-create-as", "vm", "three", "--print-xml", "--disk-only",
                      "--diskspec", "vda,snapshot=external,file=/x/y",
                      "--diskspec", "vdb,snapshot=no").stdout
        want = ("<domainsnapshot>\n  <name>three</name>\n  <disks>\n"
                "    <disk name='vda' snapshot='external'>\n      <source file='/x/y'/>\n"
                "    </disk>\n    <disk name='vdb' snapshot='no'/>\n  </disks>\n"
                "</domainsnapshot>\n")
        expect(out == want, "--print-xml:\n%s" % out)
        expect(env.json("snapshot-list", "vm") == [], "--print-xml created something")
        # snapshot-create from a <domainsnapshot> document: vda external, vdb internal.
        doc = os.path.join(env.dir, "s.xml")
        with open(doc, "w") as f:
            f.write("<domainsnapshot><name>fromxml</name><description>d</description>"
                    "<disks><disk name='vda' snapshot='external'>"
                    "<source file='%s'/></disk><disk name='vdb' snapshot='internal'/>"
                    "</disks></domainsnapshot>" % env.path("vm.fromxml"))
        env.io(a, "write -P 7 0 4k")
        env.run("snapshot-create", "vm", doc)
        info = env.json("snapshot-info", "vm", "fromxml")
        kinds = {dk["target"]: dk["snapshot"] for dk in info["disks"]}
        expect(kinds == {"vda": "external", "vdb": "internal"}, kinds)
        env.run("snapshot-create-as", "vm", "later")
        dumped = env.run("snapshot-dumpxml", "vm", "fromxml").stdout
        views = env.all_views("vm")
        # Forget it, then teach it back with --redefine --current.
        env.run("snapshot-delete", "vm", "fromxml", "--metadata")
        expect([s["name"] for s in env.json("snapshot-list", "vm")] == ["later"], "forgotten")
        expect(env.run("snapshot-parent", "vm", "later", rc=3).returncode == 3, "reparented")
        with open(doc, "w") as f:
            f.write(dumped)
        env.run("snapshot-create", "vm", doc, "--redefine", "--current")
        expect(env.run("snapshot-current", "vm", "--name").stdout == "fromxml\n", "current")
        expect(env.all_views("vm")["fromxml"] == views["fromxml"], "redefined view")
        env.validate_xml("vm", "fromxml")
        # Redefining what the files do not hold is refused.
        with open(doc, "w") as f:
            f.write("<domainsnapshot><name>ghost</name><disks>"
                    "<disk name='vdb' snapshot='internal'/></disks></domainsnapshot>")
        r = env.run("snapshot-create", "vm", doc, "--redefine", rc=5)
        expect("ghost" in r.stderr, r.stderr)
        env.check_reconcile("vm")
    finally:
        env.cleanup()


def test():
    mlib.requirements("qemu-img", "virt-xml-validate")
    n = 0
    for ext in (False, True):
        seed000(ext)
        n += 1
        print("ok %d - seed 000 hierarchy (%s)" % (n, "external" if ext else "internal"))
        seed001(ext)
        n += 1
        print("ok %d - seed 001 a, b, revert a, c (%s)" % (n, "external" if ext else "internal"))
    seed003()
    n += 1
    print("ok %d - seed 002/003 disk-only --diskspec --atomic on two disks" % n)
    print_xml_and_redefine()
    n += 1
    print("ok %d - --print-xml, snapshot-create XML, --redefine --current" % n)


if __name__ == "__main__":
    mlib.main(test)
