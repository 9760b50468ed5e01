#!/usr/bin/env bash
# Live jobs in cowtreed start writeback of their target as they copy (write-behind, as the
# offline verbs do: docs/design.md), so that the flush at the end of a job finds little left to
# write. cowtreed runs under strace; a block-stream of 96 MiB into the top and a block-commit
# of 96 MiB into the base must each call sync_file_range on their target file (every 32 MiB
# written: at least twice), and never on a file the job only reads. The results must read as
# qemu-img's same operations and check clean.
. "$(dirname "$0")/../lib/common.sh"
. "$(dirname "$0")/daemon-lib.sh"
requires qemu-img qemu-io python3 strace

MiB=$((1 << 20))
# Wait on a QMP socket for the job's BLOCK_JOB_COMPLETED event after sending CMD; fail on a
# QMP error or a completion that carries one.
run_job() { # run_job CMD_JSON JOB_ID
    python3 - "$T/qmp.sock" "$1" "$2" <<'EOF'
import json, socket, sys
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
s.settimeout(300)
f = s.makefile("rw")
def msg():
    line = f.readline()
    if not line:
        sys.exit("qmp: connection closed")
    return json.loads(line)
assert "QMP" in msg()
for cmd in ('{"execute":"qmp_capabilities"}', sys.argv[2]):
    f.write(cmd + "\n")
    f.flush()
    while True:
        m = msg()
        if "error" in m:
            sys.exit("QMP error: %s" % m)
        if "return" in m:
            break
while True:
    m = msg()
    if m.get("event") == "BLOCK_JOB_COMPLETED" and m["data"]["device"] == sys.argv[3]:
        if "error" in m["data"]:
            sys.exit("job failed: %s" % m["data"])
        break
EOF
}

# cowtreed under strace; -y names each fd's file. start_daemon runs $CT_D with its arguments.
# LeakSanitizer cannot run under ptrace (it fails the exit of an ASan build): leaks are the
# other daemon tests' business, this one only counts syscalls.
cat >"$T/ctd-strace" <<EOF
#!/bin/sh
ASAN_OPTIONS="\${ASAN_OPTIONS:+\$ASAN_OPTIONS:}detect_leaks=0" exec strace -f -qq -y \
    -e trace=sync_file_range -o "$T/st.txt" "$COWTREE_BUILD/cowtreed" "\$@"
EOF
chmod +x "$T/ctd-strace"
CT_D="$T/ctd-strace"

# calls FILE: sync_file_range calls on FILE in the trace.
calls() { grep -c "sync_file_range([0-9]*<$(realpath "$1")>" "$T/st.txt" || true; }

# Stream: base holds 96 MiB; the top, one MiB of its own. Everything is copied into the top.
cd "$T"
qemu-img create -q -f qcow2 s-base.qcow2 96M
qemu-io -f qcow2 -c "write -q -P 0x31 0 96M" s-base.qcow2 >/dev/null
qemu-img create -q -f qcow2 -b s-base.qcow2 -F qcow2 s-top.qcow2
qemu-io -f qcow2 -c "write -q -P 0x32 $((40 * MiB)) 1M" s-top.qcow2 >/dev/null
cp s-base.qcow2 q-base.qcow2
qemu-img create -q -f qcow2 -b q-base.qcow2 -F qcow2 q-top.qcow2
qemu-io -f qcow2 -c "write -q -P 0x32 $((40 * MiB)) 1M" q-top.qcow2 >/dev/null
qemu-img rebase -q -f qcow2 -b "" q-top.qcow2

# Commit: base empty, mid 96 MiB, top one MiB; mid is committed into base.
qemu-img create -q -f qcow2 c-base.qcow2 96M
qemu-img create -q -f qcow2 -b c-base.qcow2 -F qcow2 c-mid.qcow2
qemu-io -f qcow2 -c "write -q -P 0x41 0 96M" c-mid.qcow2 >/dev/null
qemu-img create -q -f qcow2 -b c-mid.qcow2 -F qcow2 c-top.qcow2
qemu-io -f qcow2 -c "write -q -P 0x42 0 1M" c-top.qcow2 >/dev/null
qemu-img convert -f qcow2 -O qcow2 c-top.qcow2 c-expected.qcow2

start_daemon --blockdev node-name=s,file="$T/s-top.qcow2",driver=qcow2 \
    --blockdev node-name=c,file="$T/c-top.qcow2",driver=qcow2
run_job '{"execute":"block-stream","arguments":{"device":"s","job-id":"js"}}' js ||
    die "block-stream failed"
run_job '{"execute":"block-commit","arguments":{"device":"c","job-id":"jc","top":"'"$T"'/c-mid.qcow2","base":"'"$T"'/c-base.qcow2"}}' jc ||
    die "block-commit failed"
stop_daemon

n=$(calls "$T/s-top.qcow2")
[ "$n" -ge 2 ] || die "block-stream wrote 96 MiB into s-top.qcow2 with $n writeback starts (want >= 2)"
echo "block-stream: $n sync_file_range calls on the top"
n=$(calls "$T/c-base.qcow2")
[ "$n" -ge 2 ] || die "block-commit wrote 96 MiB into c-base.qcow2 with $n writeback starts (want >= 2)"
echo "block-commit: $n sync_file_range calls on the base"
for f in s-base.qcow2 c-mid.qcow2 c-top.qcow2; do
    n=$(calls "$T/$f")
    [ "$n" -eq 0 ] || die "writeback started $n times on $f, which the jobs only read"
done

for f in s-top.qcow2 c-base.qcow2 c-mid.qcow2 c-top.qcow2; do qemu_clean "$T/$f"; done
qemu-img compare -q q-top.qcow2 s-top.qcow2 || die "the streamed top differs from qemu-img's"
qemu-img info s-top.qcow2 | grep -q "^backing file" && die "the streamed top still has a backing file"
qemu-img compare -q c-expected.qcow2 c-top.qcow2 || die "the top reads differently after the commit"
qemu-img info c-top.qcow2 | grep -q "c-base.qcow2" || die "the top was not relinked to the base"
echo "ok"
