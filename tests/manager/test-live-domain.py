#!/usr/bin/env python3
"""Running domains: `start` serves every disk through cowtreed over NBD, `domstate`/`list`
say so, a second start and a second daemon are refused, `shutdown` flushes and closes; live
snapshots go through QMP: an external snapshot of two disks taken while an NBD client writes
is crash-consistent (each disk's frozen image shows a prefix of the sequential writes) and the
writes after it land in the new overlays; internal snapshots are created and deleted live;
revert and file-rewriting verbs are refused while running with the reason. kill -9 of the
daemon is reported as "shut off (crashed)" and `start` works again; a snapshot journaled
before the daemon died is finished offline. After every phase the catalog and the files agree
(reconcile) and every image passes `qemu-img check`."""

import os
import signal
import subprocess
import sys

sys.dont_write_bytecode = True  # no __pycache__ in the source tree
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import mlib  # noqa: E402
from mlib import Failure  # noqa: E402

SIZE = 4 << 20
CHUNK = 64 << 10
n_ok = 0


def ok(desc):
    global n_ok
    n_ok += 1
    print("ok %d - %s" % (n_ok, desc))


def expect(cond, what):
    if not cond:
        raise Failure(str(what))


def uri(env, dom, disk):
    return "nbd+unix:///%s/%s?socket=%s/run/nbd.sock" % (dom, disk, env.home)


def nbd_io(env, dom, disk, *cmds):
    args = ["qemu-io", "-f", "raw"]
    for c in cmds:
        args += ["-c", c]
    r = subprocess.run(args + [uri(env, dom, disk)], capture_output=True, text=True, timeout=120)
    if r.returncode != 0 or "error" in (r.stdout + r.stderr).lower():
        raise Failure("qemu-io %s on %s/%s: %s%s" % (cmds, dom, disk, r.stdout, r.stderr))
    return r.stdout


def nbd_read(env, dom, disk):
    out = os.path.join(env.dir, "nbd.raw")
    r = subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "raw", uri(env, dom, disk), out],
                       capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        raise Failure("qemu-img convert from NBD: %s" % r.stderr)
    with open(out, "rb") as f:
        data = f.read()
    os.unlink(out)
    return data


def daemon_pid(env):
    with open(os.path.join(env.home, "run", "cowtreed.pid")) as f:
        return int(f.read().split()[0])


def state(env, dom):
    return env.run("domstate", dom, "--reason").stdout.strip()


def prefix_shaped(data, pat, old):
    """Chunks 0..k-1 hold pat and the rest old: the state of a sequential writer at some k."""
    n = len(data) // CHUNK
    k = 0
    while k < n and data[k * CHUNK:(k + 1) * CHUNK] == bytes([pat]) * CHUNK:
        k += 1
    rest = all(data[i * CHUNK:(i + 1) * CHUNK] == bytes([old]) * CHUNK for i in range(k, n))
    return rest, k


def check_all(env, dom):
    env.check_reconcile(dom)
    env.check_images(dom)


def run(env):
    a = env.create("a.qcow2", size=str(SIZE))
    b = env.create("b.qcow2", size=str(SIZE))
    env.run("define", "d", "--disk", "vda=" + a, "--disk", "vdb=" + b)
    expect(state(env, "d") == "shut off (unknown)", state(env, "d"))

    # ---- start / list / domstate / second start / second daemon ----
    r = env.run("start", "d")
    expect(uri(env, "d", "vda") in r.stdout and uri(env, "d", "vdb") in r.stdout, r.stdout)
    expect(state(env, "d") == "running (booted)", state(env, "d"))
    lst = env.run("list").stdout.splitlines()
    expect(lst[0].split() == ["Id", "Name", "State"] and lst[2].split() == ["1", "d", "running"],
           lst)
    js = env.json("list", "--all")
    expect(js[0]["state"] == "running" and js[0]["id"] == 1, js)
    ok("start serves both disks; domstate, list and list --all say running")
    r = env.run("start", "d", rc=4)
    expect("already active" in r.stderr, r.stderr)
    if not os.environ.get("COWTREE_DAEMON"):  # another daemon (interop runs) has no lock
        d2 = subprocess.run([os.path.join(mlib.BUILD, "cowtreed"), "--home",
                             os.path.join(env.home, "run")], capture_output=True, text=True,
                            timeout=30)
        expect(d2.returncode == 1 and "already running" in d2.stderr, d2)
    ok("a second start is refused (as virsh: already active), so is a second daemon")

    nbd_io(env, "d", "vda", "write -P 1 0 %d" % SIZE, "flush")
    nbd_io(env, "d", "vdb", "write -P 2 0 %d" % SIZE, "flush")

    # ---- live external snapshot of both disks while a client writes ----
    cmds = []
    for i in range(SIZE // CHUNK):
        cmds += ["-c", "write -P 3 %d %d" % (i * CHUNK, CHUNK)]
    writer = subprocess.Popen(["qemu-io", "-f", "raw"] + cmds + [uri(env, "d", "vda")],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        env.run("snapshot-create-as", "d", "e1", "--disk-only", "--atomic")
    finally:
        _, err = writer.communicate(timeout=120)
    expect(writer.returncode == 0, "NBD writer failed: %s" % err)
    info = env.json("snapshot-info", "d", "e1")
    expect(info["state"] == "disk-snapshot" and info["location"] == "external", info)
    frozen = {dk["target"]: dk["image"] for dk in info["disks"]}
    expect(frozen == {"vda": a, "vdb": b}, frozen)
    tops = env.disks("d")
    expect(tops["vda"]["source"] != a and tops["vda"]["chain"][1:] == [a], tops)
    va = env.read_view(a, "qcow2")
    shaped, k = prefix_shaped(va, 3, 1)
    expect(shaped, "vda's frozen image is not a prefix of the sequential writes")
    expect(env.read_view(b, "qcow2") == bytes([2]) * SIZE, "vdb's frozen image changed")
    expect(nbd_read(env, "d", "vda") == bytes([3]) * SIZE, "vda after the writer")
    check_all(env, "d")
    ok("external snapshot of 2 disks during writes: crash-consistent (%d/%d chunks before), "
       "writes go to the new overlays" % (k, SIZE // CHUNK))

    # ---- live internal snapshot and live internal delete ----
    env.run("snapshot-create-as", "d", "i1")
    nbd_io(env, "d", "vda", "write -P 4 0 64k", "flush")
    nbd_io(env, "d", "vdb", "write -P 5 64k 64k", "flush")
    info = env.json("snapshot-info", "d", "i1")
    expect(info["location"] == "internal" and info["state"] == "running", info)
    tops = env.disks("d")
    expect(env.read_view(tops["vda"]["source"], "qcow2", snapshot="i1") == bytes([3]) * SIZE,
           "i1 on vda")
    expect(env.read_view(tops["vdb"]["source"], "qcow2", snapshot="i1") == bytes([2]) * SIZE,
           "i1 on vdb")
    env.run("snapshot-create-as", "d", "i2")
    env.run("snapshot-delete", "d", "i2")
    names = [s["name"] for s in env.json("snapshot-list", "d")]
    expect(names == ["e1", "i1"], names)
    check_all(env, "d")
    ok("internal snapshots created and deleted live (QMP), data as written")

    # ---- refusals while running ----
    r = env.run("undefine", "d", "--snapshots-metadata", rc=4)
    expect("running" in r.stderr, r.stderr)
    check_all(env, "d")
    ok("undefine is refused while running, with the reason")

    # ---- revert of a running domain: its disks are served again on the snapshot's state ----
    want = {t: env.read_view(v["source"], "qcow2", snapshot="i1") for t, v in env.disks("d").items()}
    nbd_io(env, "d", "vda", "write -P 12 0 64k", "flush")  # a change no snapshot holds
    r = env.run("snapshot-revert", "d", "i1", rc=None)
    expect(r.returncode != 0 and "--force" in r.stderr, r.stderr)
    expect(state(env, "d").startswith("running"), "still running after a refused revert: %s"
           % state(env, "d"))
    env.run("snapshot-revert", "d", "i1", "--force")
    expect(state(env, "d").startswith("running"), "running after the revert: %s" % state(env, "d"))
    for t in ("vda", "vdb"):
        got = nbd_read(env, "d", t)
        expect(got == want[t], "%s through NBD after the live revert reads i1's state" % t)
    cur = env.run("snapshot-current", "d", "--name").stdout.strip()
    expect(cur == "i1", cur)
    check_all(env, "d")
    ok("snapshot-revert of a running domain: served again, reading the snapshot's state")

    # ---- kill -9 of the daemon ----
    nbd_io(env, "d", "vdb", "write -P 6 1M 64k", "flush")
    os.kill(daemon_pid(env), signal.SIGKILL)
    expect(state(env, "d") == "shut off (crashed)", state(env, "d"))
    lst = env.run("list", "--all").stdout.splitlines()
    expect(lst[2].split() == ["-", "d", "shut", "off"], lst)
    expect(env.run("list").stdout.splitlines()[2:] == [""], "list shows no running domain")
    env.run("start", "d")
    expect(state(env, "d") == "running (booted)", state(env, "d"))
    vb = nbd_read(env, "d", "vdb")
    expect(vb[1 << 20:(1 << 20) + CHUNK] == bytes([6]) * CHUNK and
           vb[CHUNK:2 * CHUNK] == want["vdb"][CHUNK:2 * CHUNK], "flushed writes survive kill -9")
    ok("kill -9 of the daemon: shut off (crashed), start works again, flushed data kept")

    # ---- a snapshot journaled, then the manager and the daemon die: finished offline ----
    env.run("snapshot-create-as", "d", "e2", "--disk-only", rc=None,
            extra_env={"COWTREE_MANAGER_KILL_AT_STEP": "1"})
    os.kill(daemon_pid(env), signal.SIGKILL)
    expect(state(env, "d") == "shut off (crashed)", state(env, "d"))
    names = [s["name"] for s in env.json("snapshot-list", "d")]
    expect(sorted(names) == ["e1", "e2", "i1"], names)
    tops = env.disks("d")
    expect(tops["vda"]["source"].endswith(".e2"), tops)
    check_all(env, "d")
    ok("a live snapshot interrupted with the daemon is finished offline by the next command")

    # ---- a journaled live snapshot finished through QMP by the next command ----
    env.run("start", "d")
    env.run("snapshot-create-as", "d", "i3", rc=None,
            extra_env={"COWTREE_MANAGER_KILL_AT_STEP": "1"})
    env.run("recover")
    expect(state(env, "d") == "running (booted)", state(env, "d"))
    names = [s["name"] for s in env.json("snapshot-list", "d")]
    expect("i3" in names, names)
    nbd_io(env, "d", "vda", "write -P 7 0 64k", "flush")
    check_all(env, "d")
    ok("a live snapshot interrupted after its journal entry is finished through QMP")

    # ---- two domains in one daemon: one shuts down, the other keeps serving ----
    c = env.create("c.qcow2", size=str(SIZE))
    env.run("define", "e", "--disk", "vda=" + c)
    env.run("start", "e")
    nbd_io(env, "e", "vda", "write -P 8 0 64k", "flush")
    lst = [ln.split() for ln in env.run("list").stdout.splitlines()[2:] if ln.strip()]
    expect([x[1:] for x in lst] == [["d", "running"], ["e", "running"]], lst)
    env.run("shutdown", "e")
    expect(state(env, "e") == "shut off (shutdown)" and state(env, "d") == "running (booted)",
           (state(env, "e"), state(env, "d")))
    nbd_io(env, "d", "vda", "write -P 9 64k 64k", "flush")
    expect(nbd_read(env, "d", "vda")[64 << 10:128 << 10] == bytes([9]) * (64 << 10), "d")
    expect(env.read_view(c, "qcow2")[:64 << 10] == bytes([8]) * (64 << 10), "e's data")
    env.check_reconcile("e")
    env.check_images("e")
    ok("two domains in one daemon: shutting one down leaves the other serving")

    # ---- shutdown ----
    env.run("shutdown", "d")
    expect(state(env, "d") == "shut off (shutdown)", state(env, "d"))
    r = env.run("shutdown", "d", rc=4)
    expect("not running" in r.stderr, r.stderr)
    expect(not os.path.exists(os.path.join(env.home, "run", "cowtreed.pid")) or
           subprocess.run(["kill", "-0", str(daemon_pid(env))],
                          capture_output=True).returncode != 0, "daemon still running")
    tops = env.disks("d")
    expect(env.read_view(tops["vda"]["source"], "qcow2")[:CHUNK] == bytes([7]) * CHUNK, "vda")
    expect(env.read_view(tops["vda"]["source"], "qcow2")[CHUNK:2 * CHUNK] == bytes([9]) * CHUNK,
           "vda's write after e's shutdown")
    for im in env.images("d"):
        if im["format"] == "qcow2":
            r = subprocess.run(["qemu-img", "check", im["path"]], capture_output=True, text=True)
            expect(r.returncode == 0, "qemu-img check %s: %s" % (im["path"], r.stdout))
    env.run("snapshot-revert", "d", "i1", "--force")
    check_all(env, "d")
    ok("shutdown flushes and stops the daemon; offline verbs work again (revert)")


def main():
    mlib.requirements("qemu-img", "qemu-io")
    if not os.access(os.path.join(mlib.BUILD, "cowtreed"), os.X_OK):
        mlib.skip("cowtreed not built")
    env = mlib.Env("live")
    try:
        run(env)
    finally:
        for dom in ("e", "d"):
            subprocess.run([mlib.CT, "shutdown", dom], env=env.env, capture_output=True)
        env.cleanup()


mlib.main(main)
