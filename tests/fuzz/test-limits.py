#!/usr/bin/env python3
"""cowtreed enforces its documented input limits (docs/reliability.md, "Limits") with clear
errors: a QMP message over 1 MiB gets a GenericError naming the limit and the connection is
closed (one just under the limit is served); an NBD READ over 32 MiB gets EOVERFLOW with a
message and the connection goes on (a 32 MiB READ succeeds); an NBD WRITE over 32 MiB gets
EOVERFLOW with a message and then the server hangs up (its payload cannot be skipped).

Exit 0 pass, 1 fail, 77 skip (no cowtreed or cowtree-img in the build).
"""

import json
import os
import socket
import struct
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
TOP = os.environ.get("COWTREE_TOP") or os.path.dirname(os.path.dirname(HERE))
BUILD = os.environ.get("COWTREE_BUILD") or os.path.join(TOP, "build")
CTD = os.path.join(BUILD, "cowtreed")
IMG = os.path.join(BUILD, "cowtree-img")
MiB = 1 << 20
MAX_QMP = 1 * MiB
MAX_REQ = 32 * MiB
EOVERFLOW = 75


def fail(msg):
    print("FAIL: " + msg)
    sys.exit(1)


def recv_exact(s, n):
    b = b""
    while len(b) < n:
        d = s.recv(n - len(b))
        if not d:
            raise EOFError("connection closed after %d of %d bytes" % (len(b), n))
        b += d
    return b


class Qmp:
    def __init__(self, path):
        self.s = socket.socket(socket.AF_UNIX)
        self.s.connect(path)
        self.f = self.s.makefile("rb")
        greeting = self.read()
        if "QMP" not in greeting:
            fail("no QMP greeting: %r" % greeting)
        self.cmd({"execute": "qmp_capabilities"})

    def read(self):
        while True:
            try:
                line = self.f.readline()
            except ConnectionResetError:  # closed with our unread bytes in its buffer
                return None
            if not line:
                return None
            m = json.loads(line)
            if "event" not in m:
                return m

    def send_raw(self, data):
        self.s.sendall(data)

    def cmd(self, obj):
        self.send_raw(json.dumps(obj).encode() + b"\r\n")
        return self.read()


def check_qmp(sock):
    q = Qmp(sock)
    # Just under the limit: served.
    pad = "x" * (MAX_QMP - 4096)
    r = q.cmd({"execute": "query-version", "arguments": {"pad": pad}})
    if not r or "return" not in r:
        fail("a QMP message of %d bytes was not served: %r" % (len(pad), r))
    # Over the limit: a clear error, then the connection closes.
    big = b'{"execute":"query-version","arguments":{"pad":"' + b"y" * (MAX_QMP + 8192)
    try:
        q.send_raw(big)
    except (BrokenPipeError, ConnectionResetError):
        pass
    r = q.read()
    if not r or "error" not in r or "1 MiB" not in r["error"].get("desc", ""):
        fail("an oversized QMP message got %r, not an error naming the limit" % (r,))
    print("ok: QMP over 1 MiB: %s" % r["error"]["desc"])
    if q.read() is not None:
        fail("the QMP connection stayed open after the oversized message")
    print("ok: QMP connection closed after it")


def nbd_connect(sock, export):
    s = socket.socket(socket.AF_UNIX)
    s.connect(sock)
    hello = recv_exact(s, 18)
    if hello[:8] != b"NBDMAGIC":
        fail("bad NBD greeting")
    s.sendall(struct.pack(">I", 3))

    def option(code, data=b""):
        s.sendall(struct.pack(">QII", 0x49484156454F5054, code, len(data)) + data)
        while True:
            _, opt, typ, n = struct.unpack(">QIII", recv_exact(s, 20))
            recv_exact(s, n)
            if typ == 1:
                return
            if typ & 0x80000000:
                fail("option %d refused (%#x)" % (code, typ))

    option(8)  # structured replies
    name = export.encode()
    option(7, struct.pack(">I", len(name)) + name + struct.pack(">H", 0))  # GO
    return s


def nbd_request(s, cmd, off, length, cookie):
    s.sendall(struct.pack(">IHHQQI", 0x25609513, 0, cmd, cookie, off, length))


def nbd_chunks(s, cookie):
    """Chunks of one structured reply: [(type, payload)] until DONE."""
    out = []
    while True:
        magic, flags, typ, ck, n = struct.unpack(">IHHQI", recv_exact(s, 20))
        if magic != 0x668E33EF or ck != cookie:
            fail("bad structured reply (magic %#x, cookie %d)" % (magic, ck))
        out.append((typ, recv_exact(s, n)))
        if flags & 1:
            return out


def error_of(chunks):
    for typ, p in chunks:
        if typ & 0x8000:
            err, n = struct.unpack(">IH", p[:6])
            return err, p[6:6 + n].decode(errors="replace")
    return None


def check_nbd(sock):
    s = nbd_connect(sock, "disk")
    nbd_request(s, 0, 0, MAX_REQ + 1, 1)
    e = error_of(nbd_chunks(s, 1))
    if not e or e[0] != EOVERFLOW or "limit" not in e[1]:
        fail("an oversized NBD READ got %r, not EOVERFLOW with a message" % (e,))
    print("ok: NBD READ over 32 MiB: EOVERFLOW, %r" % e[1])
    nbd_request(s, 0, 0, MAX_REQ, 2)
    chunks = nbd_chunks(s, 2)
    got = sum(len(p) - 8 for t, p in chunks if t == 1)
    if error_of(chunks) or got != MAX_REQ:
        fail("a 32 MiB NBD READ failed or was short (%d bytes)" % got)
    print("ok: NBD READ of exactly 32 MiB served")
    nbd_request(s, 1, 0, MAX_REQ + 1, 3)
    e = error_of(nbd_chunks(s, 3))
    if not e or e[0] != EOVERFLOW or "limit" not in e[1]:
        fail("an oversized NBD WRITE got %r, not EOVERFLOW with a message" % (e,))
    print("ok: NBD WRITE over 32 MiB: EOVERFLOW, %r" % e[1])
    s.settimeout(10)
    try:
        if s.recv(1) != b"":
            fail("data after the oversized WRITE's error")
    except ConnectionResetError:
        pass
    print("ok: NBD connection closed after it")
    s.close()


def main():
    for p in (CTD, IMG):
        if not os.access(p, os.X_OK):
            print("skip: %s not built" % p)
            return 77
    with tempfile.TemporaryDirectory() as t:
        img = os.path.join(t, "disk.qcow2")
        subprocess.run([IMG, "create", "-f", "qcow2", img, "40M"], check=True,
                       stdout=subprocess.DEVNULL)
        qmp_sock, nbd_sock, pid = (os.path.join(t, n) for n in ("qmp.sock", "nbd.sock", "pid"))
        log = open(os.path.join(t, "daemon.log"), "w")
        d = subprocess.Popen([CTD, "--socket", qmp_sock, "--nbd-unix", nbd_sock, "--pidfile", pid],
                             stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.time() + 30
            while not os.path.exists(pid):
                if d.poll() is not None or time.time() > deadline:
                    fail("cowtreed did not start")
                time.sleep(0.05)
            q = Qmp(qmp_sock)
            for c in ({"execute": "blockdev-add", "arguments": {"driver": "qcow2",
                                                                "node-name": "disk",
                                                                "file": img}},
                      {"execute": "block-export-add", "arguments": {"type": "nbd",
                                                                    "node-name": "disk",
                                                                    "writable": True}}):
                r = q.cmd(c)
                if not r or "return" not in r:
                    fail("%s: %r" % (c["execute"], r))
            check_qmp(qmp_sock)
            check_nbd(nbd_sock)
            q.cmd({"execute": "quit"})
            d.wait(timeout=30)
        finally:
            if d.poll() is None:
                d.kill()
                d.wait()
    print("all limits enforced")
    return 0


if __name__ == "__main__":
    sys.exit(main())
