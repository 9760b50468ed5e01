#!/usr/bin/env python3
"""Live block jobs while an NBD client writes: cowtreed, and the same QMP script against
qemu-storage-daemon (the oracle) for equivalent results.

Each scenario builds a chain base <- mid <- top (qcow2, data in every layer), serves top over
NBD, writes through the export from qemu-io while the job runs (a deterministic batch while
the job is paused midway, and a concurrent batch while it runs), and checks:
  - the QMP events in QEMU's order (JOB_STATUS_CHANGE statuses, BLOCK_JOB_READY/COMPLETED/
    CANCELLED);
  - the export reads exactly the model (every layer's data and every write, in order) after
    the job, and after the pivot the new writes land in the new top;
  - after shutdown: the expected backing chain on disk, `qemu-img check` clean on every image,
    and `qemu-img compare` of the active image with the model;
  - error cases: busy node, duplicate job id, complete before READY, unknown job.
Scenarios: intermediate commit, active commit + pivot, stream (to base and whole chain),
mirror full + pivot, mirror top + pivot, mirror cancelled after READY (point-in-time copy,
COMPLETED), and each job cancelled midway (CANCELLED, nothing changed).

usage: test-live-jobs.py [--daemon cowtreed|qsd|both] [-k SUBSTR] [-v]
Default: both when qemu-storage-daemon exists. Exit 0 pass, 1 fail, 77 skip.
"""

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
TOP = os.environ.get("COWTREE_TOP") or os.path.dirname(os.path.dirname(HERE))
BUILD = os.environ.get("COWTREE_BUILD") or os.path.join(TOP, "build")
CTD = os.path.join(BUILD, "cowtreed")
MiB = 1 << 20
SIZE = 24 * MiB
TIMEOUT = 120.0
VERBOSE = False


class Failure(Exception):
    pass


def log(*a):
    if VERBOSE:
        print(*a, flush=True)


def run(cmd, check=True):
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out = p.stdout.decode(errors="replace")
    if check and p.returncode != 0:
        raise Failure("command failed (rc=%d): %s\n%s" % (p.returncode, " ".join(cmd), out[-2000:]))
    return p.returncode, out


class QMP:
    def __init__(self, path):
        self.s = socket.socket(socket.AF_UNIX)
        self.s.connect(path)
        # Read-only binary file: a text-mode "rw" file drops its read-ahead on every write,
        # which would lose events that arrived with a reply.
        self.f = self.s.makefile("rb")
        self.events = []
        g = self._read(TIMEOUT)
        if "QMP" not in g:
            raise Failure("no QMP greeting: %r" % g)
        r = self.cmd("qmp_capabilities")
        if r != {}:
            raise Failure("qmp_capabilities: %r" % r)

    def _read(self, timeout):
        self.s.settimeout(timeout)
        try:
            line = self.f.readline()
        except socket.timeout:
            raise Failure("QMP: no message within %.0f s" % timeout)
        if not line:
            raise Failure("QMP connection closed")
        return json.loads(line)

    def execute(self, _name, **args):
        name = _name
        msg = {"execute": name}
        if args:
            msg["arguments"] = args
        log(">>", json.dumps(msg))
        self.s.sendall((json.dumps(msg) + "\n").encode())
        while True:
            m = self._read(TIMEOUT)
            if "event" in m:
                log("<< event", m["event"], m.get("data"))
                self.events.append(m)
                continue
            log("<<", json.dumps(m)[:300])
            return m

    def cmd(self, _name, **args):
        name = _name
        m = self.execute(name, **args)
        if "error" in m:
            raise Failure("%s failed: %s" % (name, m["error"]))
        return m["return"]

    def error(self, name, **args):
        m = self.execute(name, **args)
        if "error" not in m:
            raise Failure("%s %s was accepted, expected an error" % (name, args))
        return m["error"]

    def wait_event(self, name, pred=lambda d: True):
        """Wait for an event (already received or coming); returns its data."""
        deadline = time.monotonic() + TIMEOUT
        i = 0
        while True:
            while i < len(self.events):
                e = self.events[i]
                i += 1
                if e["event"] == name and pred(e.get("data", {})):
                    return e.get("data", {})
            left = deadline - time.monotonic()
            if left <= 0:
                raise Failure("event %s not received within %.0f s (got: %s)"
                              % (name, TIMEOUT, [e["event"] for e in self.events]))
            m = self._read(left)
            if "event" in m:
                log("<< event", m["event"], m.get("data"))
                self.events.append(m)

    def job_statuses(self, job):
        out = []
        for e in self.events:
            d = e.get("data", {})
            if e["event"] == "JOB_STATUS_CHANGE" and d.get("id") == job:
                out.append(d["status"])
            elif e["event"].startswith("BLOCK_JOB_") and (d.get("device") == job or
                                                          d.get("id") == job):
                out.append(e["event"])
        return out

    def close(self):
        self.s.close()


class Daemon:
    def __init__(self, kind, d, top):
        self.kind, self.d = kind, d
        self.qmp_path = os.path.join(d, "qmp.sock")
        self.nbd_path = os.path.join(d, "nbd.sock")
        pid = os.path.join(d, "daemon.pid")
        if os.path.exists(pid):
            os.unlink(pid)  # (left by a killed daemon)
        if kind == "cowtreed":
            cmd = [CTD, "--socket", self.qmp_path, "--nbd-unix", self.nbd_path, "--pidfile", pid,
                   "--blockdev", "node-name=vda,file=%s,driver=qcow2" % top,
                   "--export", "type=nbd,node-name=vda,name=vda,writable=on"]
        else:
            cmd = ["qemu-storage-daemon",
                   "--blockdev", "driver=qcow2,node-name=vda,file.driver=file,file.filename=%s" % top,
                   "--nbd-server", "addr.type=unix,addr.path=%s" % self.nbd_path,
                   "--export", "type=nbd,id=e0,node-name=vda,name=vda,writable=on",
                   "--chardev", "socket,path=%s,server=on,wait=off,id=qmp0" % self.qmp_path,
                   "--monitor", "chardev=qmp0", "--pidfile", pid]
        self.log = open(os.path.join(d, "daemon.log"), "w")
        self.p = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + TIMEOUT
        while not os.path.exists(pid):  # the pid file is the readiness signal
            if self.p.poll() is not None:
                raise Failure("%s exited at start: %s" % (kind, open(self.log.name).read()))
            if time.monotonic() > deadline:
                raise Failure("%s did not start" % kind)
            time.sleep(0.02)
        self.qmp = QMP(self.qmp_path)

    def uri(self):
        return "nbd+unix:///vda?socket=%s" % self.nbd_path

    def stop(self):
        self.qmp.execute("quit")
        self.qmp.close()
        try:
            rc = self.p.wait(TIMEOUT)
        except subprocess.TimeoutExpired:
            self.p.kill()
            raise Failure("%s did not exit after quit" % self.kind)
        if rc != 0:
            raise Failure("%s exited %d: %s" % (self.kind, rc, open(self.log.name).read()[-2000:]))

    def kill(self):
        if self.p.poll() is None:
            self.p.kill()
            self.p.wait()


class Model:
    """The guest view: bytes written in order."""

    def __init__(self):
        self.b = bytearray(SIZE)

    def write(self, pat, off, ln):
        self.b[off:off + ln] = bytes([pat]) * ln

    def zero(self, off, ln):
        self.b[off:off + ln] = bytes(ln)


def io_cmds(batch):
    out = []
    for kind, pat, off, ln in batch:
        if kind == "w":
            out += ["-c", "write -q -P 0x%02x %d %d" % (pat, off, ln)]
        else:
            out += ["-c", "write -q -z %d %d" % (off, ln)]
    return out


def apply(model, batch):
    for kind, pat, off, ln in batch:
        if kind == "w":
            model.write(pat, off, ln)
        else:
            model.zero(off, ln)


def batch_for(seed, n):
    """Deterministic writes spread over the disk (sector-aligned, some unaligned to clusters)."""
    out, x = [], seed * 7919 + 17
    for i in range(n):
        x = (x * 1103515245 + 12345) & 0x7FFFFFFF
        off = (x % (SIZE // 512 - 512)) * 512
        ln = 512 * (1 + (x >> 8) % 256)
        if i % 7 == 6:
            out.append(("z", 0, off, ln))
        else:
            out.append(("w", 1 + (x >> 4) % 254, off, ln))
    return out


class Scenario:
    def __init__(self, kind, name, workdir):
        self.kind, self.name = kind, name
        self.d = os.path.join(workdir, "%s-%s" % (kind, name))
        os.makedirs(self.d)
        self.base = os.path.join(self.d, "base.qcow2")
        self.mid = os.path.join(self.d, "mid.qcow2")
        self.top = os.path.join(self.d, "top.qcow2")
        self.model = Model()
        run(["qemu-img", "create", "-q", "-f", "qcow2", self.base, str(SIZE)])
        run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", self.base, "-F", "qcow2", self.mid])
        run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", self.mid, "-F", "qcow2", self.top])
        for img, seed in ((self.base, 1), (self.mid, 2), (self.top, 3)):
            b = batch_for(seed, 40)
            run(["qemu-io", "-f", "qcow2"] + io_cmds(b) + [img])
            apply(self.model, b)
        self.daemon = Daemon(kind, self.d, self.top)
        self.q = self.daemon.qmp

    def nbd_write(self, batch):
        run(["qemu-io", "-f", "raw"] + io_cmds(batch) + [self.daemon.uri()])
        apply(self.model, batch)

    def start_writer(self, batch):
        """A concurrent writer: a qemu-io process writing while the job runs."""
        apply(self.model, batch)
        return subprocess.Popen(["qemu-io", "-f", "raw"] + io_cmds(batch) + [self.daemon.uri()],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    def join_writer(self, p):
        out, _ = p.communicate(timeout=TIMEOUT)
        if p.returncode != 0:
            raise Failure("concurrent qemu-io failed: %s" % out.decode(errors="replace")[-1000:])

    def verify_export(self, what):
        out = os.path.join(self.d, "export.raw")
        run(["qemu-img", "convert", "-f", "raw", "-O", "raw", self.daemon.uri(), out])
        with open(out, "rb") as f:
            got = f.read()
        os.unlink(out)
        if got != bytes(self.model.b):
            i = next(i for i in range(SIZE) if got[i] != self.model.b[i])
            raise Failure("%s: export differs from the model at offset %d (got 0x%02x, want 0x%02x)"
                          % (what, i, got[i], self.model.b[i]))

    def wait_progress(self, job):
        """Until the job has copied something (it runs rate-limited), then pause it."""
        deadline = time.monotonic() + TIMEOUT
        while True:
            jobs = [j for j in self.q.cmd("query-block-jobs") if j["device"] == job]
            if not jobs:
                raise Failure("job %s vanished before it progressed" % job)
            if jobs[0]["offset"] > 0 or jobs[0].get("ready"):
                return jobs[0]
            if time.monotonic() > deadline:
                raise Failure("job %s made no progress" % job)
            time.sleep(0.01)

    def pause_midway(self, job):
        """Pause once the job is under way, write a batch, resume at full speed."""
        self.wait_progress(job)
        self.q.cmd("block-job-pause", device=job)
        self.nbd_write(batch_for(11, 30))
        self.q.cmd("block-job-set-speed", device=job, speed=0)
        self.q.cmd("block-job-resume", device=job)

    def finish(self, active, chain):
        """Stop the daemon; check images, the chain on disk and the active image's content."""
        self.daemon.stop()
        for img in (self.base, self.mid, self.top) + tuple(getattr(self, "extra", ())):
            if os.path.exists(img):
                rc, out = run(["qemu-img", "check", "-q", img], check=False)
                if rc != 0:
                    raise Failure("qemu-img check %s: rc %d\n%s" % (img, rc, out))
        _, out = run(["qemu-img", "info", "--backing-chain", "--output=json", active])
        got = [os.path.basename(i["filename"]) for i in json.loads(out)]
        if got != chain:
            raise Failure("chain of %s is %s, expected %s" % (active, got, chain))
        ref = os.path.join(self.d, "model.raw")
        with open(ref, "wb") as f:
            f.write(self.model.b)
        rc, out = run(["qemu-img", "compare", "-f", "qcow2", "-F", "raw", active, ref], check=False)
        if rc != 0:
            raise Failure("active image %s differs from the model: %s" % (active, out))


def expect_statuses(q, job, want):
    got = q.job_statuses(job)
    if got != want:
        raise Failure("job %s: events %s, expected %s" % (job, got, want))


DONE = ["BLOCK_JOB_COMPLETED", "concluded", "null"]


def sc_commit_intermediate(s):
    s.q.cmd("block-commit", device="vda", **{"job-id": "j1", "top": s.mid, "base": s.base,
                                             "speed": MiB})
    s.pause_midway("j1")
    s.q.wait_event("JOB_STATUS_CHANGE", lambda d: d["id"] == "j1" and d["status"] == "null")
    st = s.q.job_statuses("j1")
    # (paused/running pairs depend on timing; the rest is fixed)
    st = [x for x in st if x not in ("paused", "running")]
    if st != ["created", "waiting", "pending"] + DONE or s.q.job_statuses("j1")[1] != "running":
        raise Failure("commit events %s" % s.q.job_statuses("j1"))
    s.verify_export("after commit")
    w = batch_for(12, 20)
    s.nbd_write(w)
    s.verify_export("after commit and more writes")
    s.finish(s.top, ["top.qcow2", "base.qcow2"])


def sc_commit_active(s):
    s.q.cmd("block-commit", device="vda", **{"job-id": "j2", "speed": MiB})
    s.pause_midway("j2")
    s.q.wait_event("BLOCK_JOB_READY", lambda d: d["device"] == "j2")
    # A second job on the node is refused (cowtreed: "is busy"; QEMU: a permission error).
    s.q.error("block-commit", device="vda", **{"job-id": "j3"})
    w = s.start_writer(batch_for(13, 40))
    s.join_writer(w)  # writes while READY go to top and are mirrored into base
    s.verify_export("ready, before pivot")
    s.q.cmd("block-job-complete", device="j2")
    s.q.wait_event("BLOCK_JOB_COMPLETED", lambda d: d["device"] == "j2")
    if "error" in s.q.wait_event("BLOCK_JOB_COMPLETED", lambda d: d["device"] == "j2"):
        raise Failure("active commit failed")
    s.nbd_write(batch_for(14, 20))  # now written into base
    s.verify_export("after pivot")
    s.finish(s.base, ["base.qcow2"])


def sc_stream_base(s):
    s.q.cmd("block-stream", device="vda", **{"job-id": "j4", "base": s.base, "speed": MiB})
    s.pause_midway("j4")
    s.q.wait_event("BLOCK_JOB_COMPLETED", lambda d: d["device"] == "j4")
    s.verify_export("after stream")
    s.finish(s.top, ["top.qcow2", "base.qcow2"])


def sc_stream_all(s):
    s.q.cmd("block-stream", device="vda", **{"job-id": "j5"})
    w = s.start_writer(batch_for(15, 40))
    s.q.wait_event("BLOCK_JOB_COMPLETED", lambda d: d["device"] == "j5")
    s.join_writer(w)
    s.verify_export("after full stream")
    s.finish(s.top, ["top.qcow2"])


def sc_mirror_full(s):
    tgt = os.path.join(s.d, "copy.qcow2")
    s.extra = (tgt,)
    s.q.cmd("drive-mirror", device="vda", target=tgt, format="qcow2", sync="full",
            **{"job-id": "j6", "speed": MiB})
    s.pause_midway("j6")
    s.q.wait_event("BLOCK_JOB_READY", lambda d: d["device"] == "j6")
    w = s.start_writer(batch_for(16, 40))
    s.join_writer(w)
    s.q.cmd("block-job-complete", device="j6")
    d = s.q.wait_event("BLOCK_JOB_COMPLETED", lambda d: d["device"] == "j6")
    if "error" in d:
        raise Failure("mirror failed: %s" % d)
    s.nbd_write(batch_for(17, 20))
    s.verify_export("after mirror pivot")
    s.finish(tgt, ["copy.qcow2"])


def sc_mirror_top(s):
    tgt = os.path.join(s.d, "copy.qcow2")
    s.extra = (tgt,)
    s.q.cmd("drive-mirror", device="vda", target=tgt, format="qcow2", sync="top",
            **{"job-id": "j7"})
    s.q.wait_event("BLOCK_JOB_READY", lambda d: d["device"] == "j7")
    s.nbd_write(batch_for(18, 30))
    s.q.cmd("block-job-complete", device="j7")
    s.q.wait_event("BLOCK_JOB_COMPLETED", lambda d: d["device"] == "j7")
    s.nbd_write(batch_for(19, 10))
    s.verify_export("after mirror top pivot")
    s.finish(tgt, ["copy.qcow2", "mid.qcow2", "base.qcow2"])


def sc_blockdev_mirror(s):
    tgt = os.path.join(s.d, "copy.qcow2")
    s.extra = (tgt,)
    run(["qemu-img", "create", "-q", "-f", "qcow2", tgt, str(SIZE)])
    s.q.cmd("blockdev-add", driver="qcow2", **{"node-name": "tgt",
                                               "file": {"driver": "file", "filename": tgt}})
    s.q.error("blockdev-mirror", device="vda", target="nosuchnode", sync="full",
              **{"job-id": "j9x"})
    s.q.cmd("blockdev-mirror", device="vda", target="tgt", sync="full", **{"job-id": "j9"})
    s.q.wait_event("BLOCK_JOB_READY", lambda d: d["device"] == "j9")
    s.nbd_write(batch_for(22, 20))
    s.q.cmd("block-job-complete", device="j9")
    d = s.q.wait_event("BLOCK_JOB_COMPLETED", lambda d: d["device"] == "j9")
    if "error" in d:
        raise Failure("blockdev-mirror failed: %s" % d)
    s.nbd_write(batch_for(23, 10))
    s.verify_export("after blockdev-mirror pivot")
    s.finish(tgt, ["copy.qcow2"])


def sc_mirror_cancel_ready(s):
    tgt = os.path.join(s.d, "copy.qcow2")
    s.extra = (tgt,)
    e = s.q.error("block-job-complete", device="nosuchjob")
    s.q.cmd("drive-mirror", device="vda", target=tgt, format="qcow2", sync="full",
            **{"job-id": "j8", "speed": MiB})
    s.wait_progress("j8")
    e = s.q.error("block-job-complete", device="j8")  # not ready yet
    s.q.cmd("block-job-set-speed", device="j8", speed=0)
    s.q.wait_event("BLOCK_JOB_READY", lambda d: d["device"] == "j8")
    s.nbd_write(batch_for(20, 20))
    snapshot = bytes(s.model.b)
    s.q.cmd("block-job-cancel", device="j8")
    s.q.wait_event("JOB_STATUS_CHANGE", lambda d: d["id"] == "j8" and d["status"] == "null")
    evs = [x for x in s.q.job_statuses("j8") if x.startswith("BLOCK_JOB_")]
    if evs != ["BLOCK_JOB_READY", "BLOCK_JOB_COMPLETED"]:
        raise Failure("mirror cancelled after READY: events %s (QEMU: READY, COMPLETED)" % evs)
    s.nbd_write(batch_for(21, 10))  # still on the source
    s.verify_export("after cancel")
    ref = os.path.join(s.d, "pit.raw")
    with open(ref, "wb") as f:
        f.write(snapshot)
    s.finish(s.top, ["top.qcow2", "mid.qcow2", "base.qcow2"])
    rc, out = run(["qemu-img", "compare", "-f", "qcow2", "-F", "raw", tgt, ref], check=False)
    if rc != 0:
        raise Failure("the cancelled mirror's target is not the point-in-time copy: %s" % out)


def sc_cancel_midway(s):
    """Each job type cancelled while under way: CANCELLED, chain and content unchanged."""
    tgt = os.path.join(s.d, "copy.qcow2")
    s.extra = (tgt,)
    jobs = [("block-commit", {"top": s.mid, "base": s.base}),
            ("block-commit", {}),
            ("block-stream", {"base": s.base}),
            ("drive-mirror", {"target": tgt, "format": "qcow2", "sync": "full"})]
    for i, (cmd, args) in enumerate(jobs):
        jid = "c%d" % i
        if os.path.exists(tgt):
            os.unlink(tgt)
        s.q.cmd(cmd, device="vda", **dict(args, **{"job-id": jid, "speed": 512 * 1024}))
        s.wait_progress(jid)
        w = batch_for(30 + i, 10)
        s.nbd_write(w)
        s.q.cmd("block-job-cancel", device=jid, force=True)
        d = s.q.wait_event("JOB_STATUS_CHANGE", lambda d: d["id"] == jid and d["status"] == "null")
        evs = [x for x in s.q.job_statuses(jid) if x.startswith("BLOCK_JOB_")]
        if evs[-1:] != ["BLOCK_JOB_CANCELLED"]:
            raise Failure("%s cancelled midway: events %s" % (cmd, evs))
        s.verify_export("after cancelling %s" % cmd)
    s.finish(s.top, ["top.qcow2", "mid.qcow2", "base.qcow2"])


def sc_kill_midway(s):
    """kill -9 of the daemon in the middle of each job: after a restart the chain opens, every
    image checks without corruption (leaks at most, repaired on open), and every acknowledged
    write is there."""
    if s.kind != "cowtreed":
        s.daemon.stop()
        return False  # (a property of cowtreed's own engine)
    tgt = os.path.join(s.d, "copy.qcow2")
    s.extra = (tgt,)
    jobs = [("block-commit", {"top": s.mid, "base": s.base}),
            ("block-commit", {}),
            ("block-stream", {"base": s.base}),
            ("drive-mirror", {"target": tgt, "format": "qcow2", "sync": "full"})]
    for i, (cmd, args) in enumerate(jobs):
        jid = "k%d" % i
        if os.path.exists(tgt):
            os.unlink(tgt)
        s.q.cmd(cmd, device="vda", **dict(args, **{"job-id": jid, "speed": 512 * 1024}))
        s.wait_progress(jid)
        s.nbd_write(batch_for(40 + i, 10))  # acknowledged and flushed (qemu-io exits)
        s.daemon.kill()
        for img in (s.base, s.mid, s.top, tgt):
            if os.path.exists(img):
                rc, out = run(["qemu-img", "check", "-q", img], check=False)
                if rc not in (0, 3):  # 3 = leaked clusters only
                    raise Failure("after kill -9 during %s: qemu-img check %s rc %d\n%s"
                                  % (cmd, img, rc, out))
        s.daemon = Daemon(s.kind, s.d, s.top)
        s.q = s.daemon.qmp
        s.verify_export("restarted after kill -9 during %s" % cmd)
    s.finish(s.top, ["top.qcow2", "mid.qcow2", "base.qcow2"])


def sc_export_del(s):
    """block-export-del and blockdev-del, as a manager shuts one domain's disk down."""
    extra = os.path.join(s.d, "extra.qcow2")
    s.extra = (extra,)
    run(["qemu-img", "create", "-q", "-f", "qcow2", extra, str(SIZE)])
    s.q.cmd("blockdev-add", driver="qcow2", **{"node-name": "vdb",
                                               "file": {"driver": "file", "filename": extra}})
    s.q.cmd("block-export-add", type="nbd", id="e1", writable=True,
            **{"node-name": "vdb", "name": "vdb"})
    uri = "nbd+unix:///vdb?socket=%s" % s.daemon.nbd_path
    run(["qemu-io", "-f", "raw", "-c", "write -q -P 0x5a 0 1M", uri])
    s.q.error("blockdev-del", **{"node-name": "vdb"})  # still exported
    s.q.error("block-export-del", id="nosuchexport")
    s.q.cmd("block-export-del", id="e1")
    s.q.wait_event("BLOCK_EXPORT_DELETED", lambda d: d.get("id") == "e1")
    rc, _ = run(["qemu-io", "-f", "raw", "-c", "read -q 0 512", uri], check=False)
    if rc == 0:
        raise Failure("the deleted export still serves")
    s.q.cmd("blockdev-del", **{"node-name": "vdb"})
    s.q.error("blockdev-del", **{"node-name": "vdb"})  # gone
    s.finish(s.top, ["top.qcow2", "mid.qcow2", "base.qcow2"])
    rc, out = run(["qemu-io", "-f", "qcow2", "-c", "read -q -P 0x5a 0 1M", extra], check=False)
    if rc != 0 or "Pattern verification failed" in out:
        raise Failure("data written through the deleted export is not in the image: %s" % out)


SCENARIOS = [
    ("commit-intermediate", sc_commit_intermediate),
    ("commit-active", sc_commit_active),
    ("stream-base", sc_stream_base),
    ("stream-all", sc_stream_all),
    ("mirror-full", sc_mirror_full),
    ("mirror-top", sc_mirror_top),
    ("blockdev-mirror", sc_blockdev_mirror),
    ("mirror-cancel-ready", sc_mirror_cancel_ready),
    ("cancel-midway", sc_cancel_midway),
    ("kill-midway", sc_kill_midway),
    ("export-del", sc_export_del),
]


def main():
    global VERBOSE
    ap = argparse.ArgumentParser()
    ap.add_argument("--daemon", choices=["cowtreed", "qsd", "both"])
    ap.add_argument("-k", default="")
    ap.add_argument("-v", action="store_true")
    a = ap.parse_args()
    VERBOSE = a.v
    for tool in ("qemu-img", "qemu-io"):
        if not shutil.which(tool):
            print("skip: needs %s" % tool)
            return 77
    if not os.access(CTD, os.X_OK):
        print("skip: no %s" % CTD)
        return 77
    kinds = {"cowtreed": ["cowtreed"], "qsd": ["qsd"], "both": ["cowtreed", "qsd"]}[
        a.daemon or ("both" if shutil.which("qemu-storage-daemon") else "cowtreed")]
    work = tempfile.mkdtemp(prefix="ct-live-", dir=os.environ.get("TMPDIR"))
    failed = 0
    try:
        for name, fn in SCENARIOS:
            if a.k not in name:
                continue
            for kind in kinds:
                s = None
                try:
                    s = Scenario(kind, name, work)
                    if fn(s) is False:
                        continue
                    print("ok: %s on %s" % (name, kind), flush=True)
                except Failure as e:
                    failed += 1
                    print("FAIL: %s on %s: %s" % (name, kind, e), flush=True)
                    if s:
                        s.daemon.kill()
                        print("  daemon log: %s" % open(s.daemon.log.name).read()[-1500:])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("%d failed" % failed)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
