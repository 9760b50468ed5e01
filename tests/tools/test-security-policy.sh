#!/usr/bin/env bash
# The backing-file security policy: json: pseudo-filenames and protocol URLs in backing links
# are refused, a backing file without a recorded format is never probed (a raw disk whose
# content looks like qcow2 stays raw), COWTREE_BACKING_DIRS confines backing files, chains
# deeper than the limit or with loops are refused, and daemon sockets are mode 0600.
. "$(dirname "$0")/../lib/common.sh"
requires qemu-img python3

expect_fail() { # expect_fail WORD CMD...: non-zero exit, stderr names WORD, no crash
    local word=$1 rc
    shift
    set +e
    "$@" >"$T/out" 2>&1
    rc=$?
    set -e
    [ "$rc" -ne 0 ] && [ "$rc" -lt 128 ] || die "expected a clean failure (rc=$rc): $*"
    grep -qi -- "$word" "$T/out" || die "error for '$*' does not mention '$word': $(cat "$T/out")"
}

# json: and protocol backing names (written with qemu-img -u, which does not check them).
qemu-img create -q -f qcow2 -u -b 'json:{"driver":"raw","file":{"driver":"file","filename":"/etc/passwd"}}' \
    -F raw "$T/json.qcow2" 1M
expect_fail "pseudo-filename" "$CT_IO" -c 'read 0 512' "$T/json.qcow2"
qemu-img create -q -f qcow2 -u -b 'nbd://127.0.0.1:10809/x' -F raw "$T/proto.qcow2" 1M
expect_fail "protocol" "$CT_IO" -c 'read 0 512' "$T/proto.qcow2"

# No recorded backing format: refused, never probed. The raw "backing" holds a qcow2 header.
"$CT_IMG" create -q -f qcow2 "$T/looks-like-qcow2.raw" 1M
python3 - "$T/nofmt.qcow2" <<'PY'
import subprocess, sys
subprocess.check_call(["qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", "looks-like-qcow2.raw",
                       "-F", "raw", sys.argv[1], "1M"])
# Drop the backing-format extension by rewriting its type to an unknown extension.
data = bytearray(open(sys.argv[1], "rb").read())
i = data.find(bytes.fromhex("e2792aca"))
assert i > 0
data[i:i + 4] = bytes.fromhex("12345678")
open(sys.argv[1], "wb").write(data)
PY
expect_fail "format" "$CT_IO" -c 'read 0 512' "$T/nofmt.qcow2"
"$CT_IMG" create -q -f qcow2 -b looks-like-qcow2.raw -F raw "$T/raw-backed.qcow2"
"$CT_IO" -c 'read -q -P 0x51 0 1' "$T/raw-backed.qcow2" >/dev/null ||
    die "a raw backing file was not read as raw (first byte must be 'Q' of the magic)"

# Allowed directories.
mkdir -p "$T/ok" "$T/elsewhere"
"$CT_IMG" create -q -f qcow2 "$T/elsewhere/base.qcow2" 1M
"$CT_IMG" create -q -f qcow2 -b ../elsewhere/base.qcow2 -F qcow2 "$T/ok/top.qcow2"
COWTREE_BACKING_DIRS="$T/ok" expect_fail "allowed directories" "$CT_IO" -c 'read 0 512' "$T/ok/top.qcow2"
ln -s ../elsewhere/base.qcow2 "$T/ok/link.qcow2"
"$CT_IMG" create -q -f qcow2 -b link.qcow2 -F qcow2 "$T/ok/top2.qcow2"
COWTREE_BACKING_DIRS="$T/ok" expect_fail "allowed directories" "$CT_IO" -c 'read 0 512' "$T/ok/top2.qcow2"
COWTREE_BACKING_DIRS="$T/ok:$T/elsewhere" "$CT_IO" -c 'read -q 0 512' "$T/ok/top.qcow2"

# Loops and depth.
"$CT_IMG" create -q -f qcow2 "$T/a.qcow2" 1M
"$CT_IMG" create -q -f qcow2 -b a.qcow2 -F qcow2 "$T/b.qcow2"
qemu-img rebase -q -u -b b.qcow2 -F qcow2 "$T/a.qcow2"
expect_fail "loop" "$CT_IO" -c 'read 0 512' "$T/b.qcow2"
expect_fail "loop" "$CT_IMG" info --backing-chain "$T/b.qcow2"

# Daemon sockets are private.
if [ -x "$COWTREE_BUILD/cowtreed" ]; then
    "$COWTREE_BUILD/cowtreed" --socket "$T/q.sock" --nbd-unix "$T/n.sock" --pidfile "$T/pid" &
    pid=$!
    while [ ! -f "$T/pid" ]; do kill -0 "$pid" || die "cowtreed died"; sleep 0.05; done
    for s in q.sock n.sock; do
        [ "$(stat -c %a "$T/$s")" = 600 ] || die "$s has mode $(stat -c %a "$T/$s"), want 600"
    done
    kill "$pid"
    wait "$pid" || true
fi
echo "security policy holds"
