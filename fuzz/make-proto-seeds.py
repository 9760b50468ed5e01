#!/usr/bin/env python3
"""Seed corpora for the protocol and document fuzzers.

usage: fuzz/make-proto-seeds.py TOP     (writes TOP/tests/fuzz/corpus-{nbd,qmp,xml}/)

corpus-nbd: client byte streams for fuzz-nbd. Most start with a valid fixed-newstyle handshake
  (client flags, NBD_OPT_STRUCTURED_REPLY, NBD_OPT_SET_META_CONTEXT for base:allocation and
  qemu:allocation-depth, NBD_OPT_GO) so that mutations reach the transmission phase, followed
  by requests of every kind: reads and writes (some at the export's odd error offsets), block
  status with and without REQ_ONE, zero writes, trims, flushes, cache, out-of-range and
  oversized requests, then NBD_CMD_DISC.
corpus-qmp: QMP message sequences for fuzz-qmp (the node "disk0" on disk.qcow2 exists; raw.img
  and base.qcow2 are there to add).
corpus-xml: libvirt <domain> and <domainsnapshot> documents for fuzz-xml (images disk.qcow2,
  base.qcow2 and top.qcow2 exist in its directory).
"""
import json
import os
import struct
import sys

NBD_OPTS_MAGIC = 0x49484156454F5054
NBD_REQUEST_MAGIC = 0x25609513
OPT = dict(EXPORT_NAME=1, ABORT=2, LIST=3, STARTTLS=5, INFO=6, GO=7, STRUCTURED_REPLY=8,
           LIST_META_CONTEXT=9, SET_META_CONTEXT=10)
CMD = dict(READ=0, WRITE=1, DISC=2, FLUSH=3, TRIM=4, CACHE=5, WRITE_ZEROES=6, BLOCK_STATUS=7)
F_FUA, F_NO_HOLE, F_DF, F_REQ_ONE, F_FAST_ZERO = 1, 2, 4, 8, 16
SIZE = (1 << 20) + 1536  # fuzz-nbd's export size


def opt(code, data=b""):
    return struct.pack(">QII", NBD_OPTS_MAGIC, code, len(data)) + data


def s32(s):
    b = s.encode()
    return struct.pack(">I", len(b)) + b


def go(name, infos=(), code=OPT["GO"]):
    return opt(code, s32(name) + struct.pack(">H", len(infos)) +
               b"".join(struct.pack(">H", i) for i in infos))


def meta(name, queries, code=OPT["SET_META_CONTEXT"]):
    return opt(code, s32(name) + struct.pack(">I", len(queries)) + b"".join(s32(q) for q in queries))


def req(cmd, off=0, length=0, flags=0, cookie=None, payload=b""):
    req.n += 1
    c = cookie if cookie is not None else 0x1000 + req.n
    return struct.pack(">IHHQQI", NBD_REQUEST_MAGIC, flags, CMD[cmd], c, off, length) + payload


req.n = 0


def handshake(structured=True, export="disk", no_zeroes=True, contexts=("base:allocation",
                                                                         "qemu:allocation-depth")):
    b = struct.pack(">I", 1 | (2 if no_zeroes else 0))
    if structured:
        b += opt(OPT["STRUCTURED_REPLY"])
        if contexts:
            b += meta(export, list(contexts))
    return b + go(export, (1, 2, 3))


def data(n, seed):
    return bytes((seed + i * 7) & 0xFF for i in range(n))


def nbd_seeds():
    s = {}
    body = (req("WRITE", 0, 4096, payload=data(4096, 1)) +
            req("READ", 0, 8192) +
            req("BLOCK_STATUS", 0, SIZE) +
            req("BLOCK_STATUS", 8192, 200000, F_REQ_ONE) +
            req("WRITE_ZEROES", 65536, 8192) +
            req("WRITE_ZEROES", 81920, 4096, F_NO_HOLE | F_FUA) +
            req("TRIM", 98304, 12288) +
            req("BLOCK_STATUS", 0, 131072) +
            req("FLUSH") +
            req("CACHE", 0, 4096) +
            req("READ", 7 * 4096 + 5, 100) +             # the export's EIO offset
            req("WRITE_ZEROES", 3 * 4096 + 1, 10) +       # the export's ENOSPC offset
            req("READ", SIZE - 512, 1024) +               # crosses the end
            req("WRITE", SIZE - 100, 100, F_FUA, payload=data(100, 9)) +
            req("READ", SIZE - 1536, 1536, F_DF) +
            req("WRITE_ZEROES", 0, 4096, F_FAST_ZERO) +
            req("DISC"))
    s["structured-all-commands"] = handshake() + body
    s["structured-base-only"] = handshake(contexts=("base:allocation",)) + (
        req("BLOCK_STATUS", 0, SIZE) + req("READ", 4000, 300) + req("DISC"))
    s["structured-depth-only"] = handshake(contexts=("qemu:allocation-depth",)) + (
        req("BLOCK_STATUS", 100000, 400000) + req("BLOCK_STATUS", 0, 1, F_REQ_ONE) + req("DISC"))
    s["simple-replies"] = handshake(structured=False) + (
        req("WRITE", 512, 1024, payload=data(1024, 3)) + req("READ", 0, 4096) +
        req("READ", 7 * 4096 + 5, 1) + req("BLOCK_STATUS", 0, 4096) + req("TRIM", 0, 4096) +
        req("FLUSH") + req("DISC"))
    s["read-only-export"] = handshake(export="ro") + (
        req("READ", 0, 65536) + req("WRITE", 0, 512, payload=data(512, 5)) +
        req("TRIM", 0, 4096) + req("WRITE_ZEROES", 0, 4096) + req("BLOCK_STATUS", 0, SIZE) +
        req("DISC"))
    s["export-name"] = struct.pack(">I", 1) + opt(OPT["STRUCTURED_REPLY"]) + \
        opt(OPT["EXPORT_NAME"], b"disk") + req("READ", 0, 512) + req("WRITE", 0, 1, payload=b"x") + \
        req("DISC")
    s["export-name-no-zeroes-default"] = struct.pack(">I", 3) + opt(OPT["EXPORT_NAME"], b"") + \
        req("READ", 1000, 24) + req("FLUSH") + req("DISC")
    s["negotiation-options"] = (struct.pack(">I", 3) + opt(OPT["LIST"]) + opt(OPT["LIST"], b"x") +
                                go("ro", (0, 1, 2, 3), code=OPT["INFO"]) +
                                go("nosuch", (), code=OPT["INFO"]) +
                                meta("disk", [], code=OPT["LIST_META_CONTEXT"]) +
                                meta("disk", ["base:", "qemu:"], code=OPT["LIST_META_CONTEXT"]) +
                                meta("disk", ["base:allocation"]) +   # before STRUCTURED_REPLY
                                opt(OPT["STARTTLS"]) + opt(77, b"abc") +
                                opt(OPT["STRUCTURED_REPLY"], b"x") +
                                opt(OPT["ABORT"]))
    s["oversized"] = handshake() + (
        req("READ", 0, (32 << 20) + 1) + req("BLOCK_STATUS", 0, 0) +
        req("READ", 1 << 40, 10) + req("TRIM", SIZE, 1) + req("CACHE", SIZE + 1, 1) +
        req("WRITE", 0, (32 << 20) + 1))
    s["option-too-big"] = struct.pack(">I", 3) + struct.pack(">QII", NBD_OPTS_MAGIC, 7, 65537) + \
        bytes(65537) + go("disk") + req("READ", 0, 16) + req("DISC")
    s["bad-request-magic"] = handshake() + req("READ", 0, 16) + b"\x00" * 28
    s["unknown-command"] = handshake() + struct.pack(">IHHQQI", NBD_REQUEST_MAGIC, 0, 99, 5, 0, 0) + \
        req("READ", 0, 16, cookie=0) + req("DISC")
    return s


def qmp(*msgs, raw=""):
    return ("".join(json.dumps(m) + "\r\n" for m in msgs) + raw).encode()


CAPS = {"execute": "qmp_capabilities"}


def qmp_seeds():
    s = {}
    s["queries"] = qmp(CAPS, {"execute": "query-version", "id": 1},
                       {"execute": "query-block", "id": "two"},
                       {"execute": "query-named-block-nodes"},
                       {"execute": "query-block-jobs"}, {"execute": "query-jobs"})
    s["blockdev-add"] = qmp(
        CAPS,
        {"execute": "blockdev-add", "arguments": {"driver": "raw", "node-name": "r0",
                                                  "file": "raw.img"}},
        {"execute": "blockdev-add", "arguments": {"driver": "qcow2", "node-name": "b0",
                                                  "file": {"driver": "file",
                                                           "filename": "base.qcow2"},
                                                  "read-only": True}},
        {"execute": "blockdev-add", "arguments": {"driver": "qcow2", "node-name": "b0",
                                                  "file": "base.qcow2"}},
        {"execute": "block-export-add", "arguments": {"type": "nbd", "node-name": "b0",
                                                      "name": "exp", "writable": True}},
        {"execute": "block-export-add", "arguments": {"type": "nbd", "device": "disk0",
                                                      "writable": True}},
        {"execute": "block-export-add", "arguments": {"node-name": "r0", "name": "exp"}},
        {"execute": "query-named-block-nodes"})
    s["snapshots"] = qmp(
        CAPS,
        {"execute": "blockdev-snapshot-sync", "arguments": {"node-name": "disk0",
                                                            "snapshot-file": "s1.qcow2",
                                                            "format": "qcow2"}},
        {"execute": "blockdev-snapshot-internal-sync", "arguments": {"device": "disk0",
                                                                     "name": "snap"}},
        {"execute": "blockdev-snapshot-internal-sync", "arguments": {"device": "disk0",
                                                                     "name": "snap"}},
        {"execute": "blockdev-snapshot-delete-internal-sync", "arguments": {"device": "disk0",
                                                                           "name": "snap"}},
        {"execute": "blockdev-snapshot-delete-internal-sync", "arguments": {"device": "disk0",
                                                                           "id": "1"}},
        {"execute": "blockdev-snapshot-sync", "arguments": {"device": "disk0",
                                                            "snapshot-file": "s1.qcow2",
                                                            "mode": "existing"}},
        {"execute": "query-block"})
    s["transaction"] = qmp(
        CAPS,
        {"execute": "transaction", "arguments": {"actions": [
            {"type": "blockdev-snapshot-sync", "data": {"node-name": "disk0",
                                                        "snapshot-file": "t1.qcow2"}},
            {"type": "blockdev-snapshot-internal-sync", "data": {"device": "disk0",
                                                                 "name": "i1"}}]}},
        {"execute": "transaction", "arguments": {"actions": [
            {"type": "blockdev-snapshot-internal-sync", "data": {"device": "disk0",
                                                                 "name": "i2"}},
            {"type": "blockdev-snapshot-sync", "data": {"node-name": "disk0",
                                                        "snapshot-file": "t2.qcow2"}},
            {"type": "abort", "data": {}}]}},
        {"execute": "transaction", "arguments": {"actions": [
            {"type": "blockdev-snapshot-sync", "data": {"node-name": "disk0",
                                                        "snapshot-file": "t1.qcow2",
                                                        "mode": "existing", "format": "raw"}}]}},
        {"execute": "transaction", "arguments": {"actions": [{"data": {}}, {"type": "x"}]}},
        {"execute": "query-block"})
    s["block-jobs"] = qmp(
        CAPS,
        {"execute": "blockdev-snapshot-sync", "arguments": {"node-name": "disk0",
                                                            "snapshot-file": "o1.qcow2"}},
        {"execute": "block-stream", "arguments": {"device": "disk0", "job-id": "j1"}},
        {"execute": "block-commit", "arguments": {"device": "disk0", "job-id": "j2"}},
        {"execute": "drive-mirror", "arguments": {"device": "disk0", "target": "m.qcow2",
                                                  "sync": "full", "format": "qcow2",
                                                  "job-id": "j3"}},
        {"execute": "query-block-jobs"},
        {"execute": "block-job-cancel", "arguments": {"device": "j3", "force": True}},
        {"execute": "block-job-complete", "arguments": {"device": "j1"}},
        {"execute": "block-job-pause", "arguments": {"device": "j2"}},
        {"execute": "block-job-resume", "arguments": {"device": "j2"}},
        {"execute": "block-job-set-speed", "arguments": {"device": "j2", "speed": 1024}},
        {"execute": "job-dismiss", "arguments": {"id": "j1"}})
    s["malformed"] = qmp({"execute": "query-block"}, CAPS, CAPS, {"execute": 5},
                         {"arguments": {}}, {"execute": "nosuch"},
                         {"execute": "blockdev-add", "arguments": []},
                         {"execute": "blockdev-snapshot-internal-sync",
                          "arguments": {"device": "disk0", "name": ""}},
                         {"execute": "block-export-add", "arguments": {"type": "vhost"}},
                         raw='[1,2]\r\n{"execute":\r\n"query-version"} {bad json}\r\n"str"\r\n'
                             '{"execute":"query-block","id":{"a":[1,2,{"b":null}]}}\r\n'
                             '{"execute":"qu\\u0065ry-version"}\r\n{"a":1e999}\r\n{')
    s["quit"] = qmp(CAPS, {"execute": "quit"}, {"execute": "query-block"})
    return s


DOMAIN = """<domain type='kvm'>
  <name>{name}</name>
  <uuid>{uuid}</uuid>
  <memory unit='KiB'>1048576</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <devices>
{disks}  </devices>
</domain>
"""

DISK = """    <disk type='file' device='{device}'>
      <driver name='qemu' type='{fmt}'/>
      <source file='{src}'/>
      <target dev='{tgt}' bus='virtio'/>
    </disk>
"""

SNAP = """<domainsnapshot>
  <name>{name}</name>
  <description>{desc}</description>
  <state>shutoff</state>
  <parent>
    <name>{parent}</name>
  </parent>
  <creationTime>1700000000</creationTime>
  <memory snapshot='no'/>
  <disks>
{disks}  </disks>
  <domain type='kvm'>
    <name>vm1</name>
    <uuid>6c8a9a5e-1f43-4c6b-8a5e-0a9f3f2b1c11</uuid>
    <devices>
      <disk type='file' device='disk'>
        <driver name='qemu' type='qcow2'/>
        <source file='/var/lib/cowtree/vm1-vda.s1.qcow2'/>
        <target dev='vda'/>
      </disk>
      <disk type='file' device='disk'>
        <driver name='qemu' type='qcow2'/>
        <source file='disk.qcow2'/>
        <target dev='vdb'/>
      </disk>
    </devices>
  </domain>
</domainsnapshot>
"""


def xml_seeds():
    s = {}
    s["domain-one-disk"] = DOMAIN.format(
        name="vm-one", uuid="6c8a9a5e-1f43-4c6b-8a5e-0a9f3f2b1c11",
        disks=DISK.format(device="disk", fmt="qcow2", src="disk.qcow2", tgt="vda"))
    s["domain-chain-and-cdrom"] = DOMAIN.format(
        name="vm-2", uuid="00000000-0000-0000-0000-0000000000ab",
        disks=DISK.format(device="disk", fmt="qcow2", src="top.qcow2", tgt="vda") +
        DISK.format(device="cdrom", fmt="raw", src="install.iso", tgt="hdc") +
        DISK.format(device="disk", fmt="qcow2", src="disk.qcow2", tgt="vdb"))
    s["domain-errors"] = DOMAIN.format(
        name="bad name", uuid="not-a-uuid",
        disks=DISK.format(device="disk", fmt="qcow2", src="missing.qcow2", tgt="vd a") +
        "    <disk type='block' device='disk'><source dev='sda'/><target dev='vdc'/></disk>\n"
        "    <disk><target dev='vdd'/></disk>\n")
    s["domain-minimal"] = ("<domain><name>m</name><devices><disk><source file='base.qcow2'/>"
                           "<target dev='vda'/></disk></devices></domain>")
    s["snapshot-full"] = SNAP.format(
        name="s1", desc="before &amp; after &lt;upgrade&gt;", parent="s0",
        disks="    <disk name='vda' snapshot='external' type='file'>\n"
              "      <driver type='qcow2'/>\n      <source file='vm1-vda.s1.qcow2'/>\n"
              "    </disk>\n    <disk name='vdb' snapshot='internal'/>\n"
              "    <disk name='vdc' snapshot='no'/>\n")
    s["snapshot-minimal"] = "<domainsnapshot><name>x</name></domainsnapshot>\n"
    s["snapshot-errors"] = ("<?xml version='1.0' encoding='UTF-8'?>\n<!DOCTYPE domainsnapshot [\n"
                            "<!ENTITY e 'entity text'>]>\n<domainsnapshot><name>&e;</name>"
                            "<creationTime>12x</creationTime><memory snapshot='internal' "
                            "file='m'/><disks><disk snapshot='bogus' type='block'/><disk/>"
                            "</disks><![CDATA[cdata]]><!-- comment --></domainsnapshot>")
    # Redefinitions on fuzz-xml's domain vm1 (vda = vm1.qcow2 with internal snapshot s1,
    # vdb = vm1-top.qcow2 on vm1-base.qcow2).
    s["redefine-internal"] = ("<domainsnapshot>\n  <name>s1</name>\n  <description>internal"
                              "</description>\n  <state>shutoff</state>\n  <creationTime>"
                              "1700000000</creationTime>\n  <memory snapshot='no'/>\n  <disks>\n"
                              "    <disk name='vda' snapshot='internal'/>\n"
                              "    <disk name='vdb' snapshot='no'/>\n  </disks>\n"
                              "</domainsnapshot>\n")
    s["redefine-external"] = ("<domainsnapshot>\n  <name>ext1</name>\n  <state>disk-snapshot"
                              "</state>\n  <memory snapshot='no'/>\n  <disks>\n"
                              "    <disk name='vdb' snapshot='external' type='file'>\n"
                              "      <driver type='qcow2'/>\n"
                              "      <source file='vm1-top.qcow2'/>\n    </disk>\n"
                              "  </disks>\n  <domain type='kvm'><name>vm1</name><devices>"
                              "<disk type='file' device='disk'><source file='vm1-base.qcow2'/>"
                              "<target dev='vdb'/></disk></devices></domain>\n"
                              "</domainsnapshot>\n")
    return s


def write(dirpath, seeds, binary):
    os.makedirs(dirpath, exist_ok=True)
    for f in os.listdir(dirpath):
        if f.startswith("seed-"):
            os.unlink(os.path.join(dirpath, f))
    for name, blob in seeds.items():
        with open(os.path.join(dirpath, "seed-" + name), "wb") as f:
            f.write(blob if binary else blob.encode())


def main():
    top = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "..")
    base = os.path.join(top, "tests", "fuzz")
    write(os.path.join(base, "corpus-nbd"), nbd_seeds(), True)
    write(os.path.join(base, "corpus-qmp"), qmp_seeds(), True)
    write(os.path.join(base, "corpus-xml"), xml_seeds(), False)


if __name__ == "__main__":
    main()
