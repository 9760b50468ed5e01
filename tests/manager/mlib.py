"""Helpers for the cowtree snapshot-manager tests (tests/manager/test-*.py).

Every test gets its own COWTREE_HOME under a private temporary directory. The helpers run the
`cowtree` tool, read its JSON listings, extract the bytes every snapshot and the current state
show (qemu-img convert: `-l snapshot.name=` for internal snapshots, the state image's chain for
external ones) and check images with `qemu-img check`.
"""

import json
import os
import random
import shutil
import subprocess
import sys
import tempfile

TOP = os.environ.get("COWTREE_TOP") or os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
BUILD = os.environ.get("COWTREE_BUILD") or os.path.join(TOP, "build")
CT = os.path.join(BUILD, "cowtree")
CT_IO = os.path.join(BUILD, "cowtree-io")
LONG = os.environ.get("COWTREE_TEST_LONG", "0") == "1"


def skip(msg):
    print("skip: " + msg)
    sys.exit(77)


def requirements(*tools):
    for t in tools:
        if not shutil.which(t):
            skip("needs " + t)
    for p in (CT, CT_IO):
        if not os.access(p, os.X_OK):
            skip(p + " not built")
    r = subprocess.run([CT, "help"], capture_output=True, text=True)
    if "snapshot-create-as" not in r.stdout:
        skip("cowtree has no snapshot commands (stale build)")


class Failure(Exception):
    pass


class Env:
    """A private directory with a catalog home and the images of one test."""

    def __init__(self, name="ct"):
        self.dir = tempfile.mkdtemp(prefix=name + ".", dir=os.environ.get("TMPDIR"))
        self.home = os.path.join(self.dir, "home")
        self.img = os.path.join(self.dir, "img")
        os.makedirs(self.img)
        self.env = dict(os.environ)
        self.env["COWTREE_HOME"] = self.home
        self.env["TZ"] = "UTC"
        for k in ("COWTREE_FAULT", "COWTREE_MANAGER_KILL_AT_STEP"):
            self.env.pop(k, None)
        self.log = []
        self.tolerated = set()  # files left on purpose (snapshot-delete --metadata)

    def cleanup(self):
        shutil.rmtree(self.dir, ignore_errors=True)

    def path(self, name):
        return os.path.join(self.img, name)

    def run(self, *args, rc=0, extra_env=None, check=True):
        env = self.env
        if extra_env:
            env = dict(env)
            env.update(extra_env)
        r = subprocess.run([CT] + [str(a) for a in args], capture_output=True, text=True, env=env)
        self.log.append((args, r.returncode))
        if check and rc is not None and r.returncode != rc:
            raise Failure("cowtree %s: rc=%d (want %d)\nstdout: %s\nstderr: %s" % (
                " ".join(map(str, args)), r.returncode, rc, r.stdout, r.stderr))
        return r

    def json(self, *args):
        r = self.run(*(list(args) + ["--output=json"]))
        return json.loads(r.stdout)

    def io(self, image, cmd):
        r = subprocess.run([CT_IO, "-c", cmd, image], capture_output=True, text=True)
        if r.returncode != 0 or "error" in r.stdout.lower():
            raise Failure("cowtree-io %s %s: %s %s" % (cmd, image, r.stdout, r.stderr))

    def qemu_img(self, *args):
        r = subprocess.run(["qemu-img"] + list(args), capture_output=True, text=True)
        if r.returncode != 0:
            raise Failure("qemu-img %s: %s" % (" ".join(args), r.stderr + r.stdout))
        return r.stdout

    def create(self, name, size="1M", fmt="qcow2", backing=None):
        p = self.path(name)
        args = ["create", "-q", "-f", fmt]
        if backing:
            args += ["-b", backing, "-F", "qcow2"]
        self.qemu_img(*(args + [p] + ([size] if size else [])))
        return p

    # ---- views ----

    def read_view(self, image, fmt=None, snapshot=None):
        out = os.path.join(self.dir, "view.raw")
        args = ["convert", "-U"]
        if fmt:
            args += ["-f", fmt]
        if snapshot:
            args += ["-l", "snapshot.name=" + snapshot]
        args += ["-O", "raw", image, out]
        self.qemu_img(*args)
        with open(out, "rb") as f:
            data = f.read()
        os.unlink(out)
        return data

    def fmt_of(self, image):
        info = json.loads(self.qemu_img("info", "-U", "--output=json", image))
        return info["format"]

    def disks(self, dom):
        return {d["target"]: d for d in self.json("domblklist", dom)}

    def current_view(self, dom, target):
        d = self.disks(dom)[target]
        return self.read_view(d["source"], d["format"])

    def snapshot_view(self, dom, snap, target, info=None):
        info = info or self.json("snapshot-info", dom, snap)
        for dk in info["disks"]:
            if dk["target"] != target:
                continue
            if dk["snapshot"] == "internal":
                return self.read_view(dk["image"], "qcow2", snapshot=snap)
            if dk["snapshot"] == "external":
                return self.read_view(dk["image"], self.fmt_of(dk["image"]))
            return None
        return None

    def all_views(self, dom):
        """{snapshot: {target: bytes|None}} plus {"@current": {...}}."""
        views = {}
        for s in self.json("snapshot-list", dom):
            info = s
            views[s["name"]] = {dk["target"]: self.snapshot_view(dom, s["name"], dk["target"], info)
                                for dk in info["disks"]}
        views["@current"] = {t: self.read_view(d["source"], d["format"])
                             for t, d in self.disks(dom).items()}
        return views

    def images(self, dom):
        return self.json("images", dom)

    def check_images(self, dom, allow_leaks=False):
        for im in self.images(dom):
            if not os.path.exists(im["path"]):
                raise Failure("catalog image %s does not exist" % im["path"])
            if im["format"] != "qcow2":
                continue
            r = subprocess.run(["qemu-img", "check", "-U", "-q", im["path"]], capture_output=True,
                               text=True)
            if r.returncode != 0 and not (allow_leaks and r.returncode == 3):
                raise Failure("qemu-img check %s: rc=%d %s" % (im["path"], r.returncode,
                                                               r.stdout + r.stderr))

    def check_reconcile(self, dom):
        r = self.run("reconcile", dom, check=False)
        if r.returncode != 0:
            raise Failure("reconcile %s: rc=%d\n%s%s" % (dom, r.returncode, r.stdout, r.stderr))

    def check_no_stray_files(self, doms):
        known = set()
        for d in doms:
            known |= {im["path"] for im in self.images(d)}
        for f in os.listdir(self.img):
            p = os.path.join(self.img, f)
            if p not in known and p not in self.tolerated:
                raise Failure("file %s is not in the catalog (leaked)" % p)

    def validate_xml(self, dom, snap):
        r = self.run("snapshot-dumpxml", dom, snap)
        p = os.path.join(self.dir, "snap.xml")
        with open(p, "w") as f:
            f.write(r.stdout)
        v = subprocess.run(["virt-xml-validate", p, "domainsnapshot"], capture_output=True,
                           text=True)
        if v.returncode != 0:
            raise Failure("snapshot-dumpxml %s %s does not validate: %s\n%s" % (
                dom, snap, v.stdout + v.stderr, r.stdout))


def pattern_write(env, image, model, rng, size, counter):
    """Write a fresh pattern at a random place; the pattern always changes the content."""
    off = rng.randrange(0, size // 512) * 512
    ln = min(rng.choice([512, 4096, 65536, 100 * 1024, 3 * 512]), size - off)
    pat = (counter % 254) + 1
    if model[off] == pat:
        pat = pat % 254 + 1
    env.io(image, "write -P %d %d %d" % (pat, off, ln))
    model[off:off + ln] = bytes([pat]) * ln


def main(fn):
    """Run fn(); print the failure and exit 1 on Failure."""
    try:
        fn()
    except Failure as e:
        print("FAIL: %s" % e, file=sys.stderr)
        sys.exit(1)
    print("all assertions passed")
    sys.exit(0)
