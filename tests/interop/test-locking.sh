#!/usr/bin/env bash
# Image locking interoperates with qemu 7.2 (which takes byte-range locks on the image file):
# while cowtree-io holds an image open, qemu-io/qemu-img cannot open it for writing (nor read it
# without -U/force-share), nor write its backing file; and the reverse with qemu-io holding it.
# Once the holder exits (or dies by `abort`), the other side can open it, and the write that
# was refused did not happen.
#
# The holder is a cowtree-io or qemu-io reading commands from stdin (no -c), fed through a FIFO
# by this script; we synchronise on its answer to a `read` command (stdout through another FIFO)
# before trying the other tool, so there is no sleep. A 120 s read timeout only guards against
# a holder that never answers (that is reported as a failure, not waited out).
. "$(dirname "$0")/interop-lib.sh"
requires stdbuf mkfifo
ulimit -c 0
cd "$T"

HPID=""
cleanup() {
    if [ -n "$HPID" ]; then kill "$HPID" 2>/dev/null || true; fi
    rm -rf "$T"
}
trap cleanup EXIT

# hold NAME COMMAND...: start COMMAND (an io tool without -c) reading commands from a FIFO.
hold() {
    HOLDER=$1
    shift
    rm -f in out
    mkfifo in out
    # (the extra bash keeps the job-control "Aborted" notice out of the log)
    bash -c '"$@" 2>hold.err' _ stdbuf -oL "$@" <in >out 2>/dev/null &
    HPID=$!
    exec 3>in 4<out
}
# ask COMMAND ANSWER: send one command to the holder and wait for a line containing ANSWER.
ask() {
    local line
    echo "$1" >&3
    while IFS= read -r -t 120 line <&4; do
        case $line in *"$2"*) return 0 ;; esac
    done
    die "$HOLDER: no '$2' in the answer to '$1' (holder stderr: $(cat hold.err))"
}
# release [RC]: end the holder's input; it must exit with RC (default 0).
release() {
    local rc=0
    exec 3>&-
    cat <&4 >/dev/null
    exec 4<&-
    wait "$HPID" || rc=$?
    HPID=""
    [ "$rc" -eq "${1:-0}" ] || die "$HOLDER exited with rc=$rc, want ${1:-0}: $(cat hold.err)"
}
# holder_dies: make the holder abort (SIGABRT, no cleanup) and reap it.
holder_dies() {
    local rc=0
    echo abort >&3
    exec 3>&-
    cat <&4 >/dev/null
    exec 4<&-
    wait "$HPID" || rc=$?
    HPID=""
    [ "$rc" -ne 0 ] || die "$HOLDER: abort did not kill it"
}

# refused WHAT COMMAND...: COMMAND must fail (for qemu tools: with its lock error message).
refused() {
    local what=$1 out rc
    shift
    set +e
    out=$("$@" 2>&1)
    rc=$?
    set -e
    [ "$rc" -ne 0 ] || die "$what: succeeded while $HOLDER holds the image: $*"
    case "$1" in
    qemu-*) grep -qi 'lock' <<<"$out" || die "$what: failed, but not with a lock error: $out" ;;
    *) [ -n "$out" ] || die "$what: failed without a message: $*" ;;
    esac
    echo "ok refused: $what ($(head -1 <<<"$out"))"
}
# allowed WHAT COMMAND...: COMMAND must succeed.
allowed() {
    local what=$1 out rc
    shift
    set +e
    out=$("$@" 2>&1)
    rc=$?
    set -e
    [ "$rc" -eq 0 ] || die "$what: rc=$rc while $HOLDER holds the image: $* : $out"
    ! grep -qi 'verification failed' <<<"$out" || die "$what: $out"
    echo "ok allowed: $what"
}

new_chain() {
    rm -f base.qcow2 top.qcow2 r.raw
    ok qemu-img create -q -f qcow2 base.qcow2 4M
    ok qemu-io -f qcow2 -c 'write -q -P 0x0b 0 1M' base.qcow2
    ok qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 top.qcow2 4M
}

# 1. cowtree-io holds the overlay read-write.
new_chain
hold "cowtree-io (read-write)" "$CT_IO" -f qcow2 top.qcow2
ask "write -P 0x22 0 512" "wrote 512/512 bytes at offset 0"
ask "read -P 0x22 0 512" "read 512/512 bytes at offset 0"
refused "qemu-io write" qemu-io -f qcow2 -c 'write -P 0x66 0 512' top.qcow2
refused "qemu-io -r read" qemu-io -f qcow2 -r -c 'read 0 512' top.qcow2
refused "qemu-img info" qemu-img info top.qcow2
refused "qemu-io write to the backing file" qemu-io -f qcow2 -c 'write -P 0x67 0 512' base.qcow2
allowed "qemu-io -U -r read" qemu-io -f qcow2 -U -r -c 'read 0 512' top.qcow2
allowed "qemu-img info -U" qemu-img info -U top.qcow2
allowed "qemu-io -r read of the backing file" qemu-io -f qcow2 -r -c 'read -P 0x0b 0 512' base.qcow2
refused "a second cowtree-io write" "$CT_IO" -f qcow2 -c 'write -P 0x68 0 512' top.qcow2
ask "read -P 0x22 0 512" "read 512/512 bytes at offset 0" # still alive and unchanged
release
allowed "qemu-io after release (the refused writes did not happen)" \
    qemu-io -f qcow2 -c 'read -P 0x22 0 512' -c 'read -P 0x0b 512 1024' -c 'write -P 0x23 512 512' top.qcow2
allowed "backing file unchanged" qemu-io -f qcow2 -r -c 'read -P 0x0b 0 1M' base.qcow2
qcheck_clean top.qcow2

# 2. cowtree-io holds it read-only: other readers are fine, writers are not.
hold "cowtree-io -r" "$CT_IO" -f qcow2 -r top.qcow2
ask "read -P 0x22 0 512" "read 512/512 bytes at offset 0"
refused "qemu-io write" qemu-io -f qcow2 -c 'write -P 0x66 0 512' top.qcow2
allowed "qemu-io -r read" qemu-io -f qcow2 -r -c 'read -P 0x23 512 512' top.qcow2
allowed "qemu-img info" qemu-img info top.qcow2
release
allowed "qemu-io write after release" qemu-io -f qcow2 -c 'write -P 0x24 1024 512' top.qcow2

# 3. qemu-io holds the overlay read-write.
hold "qemu-io (read-write)" qemu-io -f qcow2 top.qcow2
ask "write -P 0x33 0 512" "wrote 512/512 bytes at offset 0"
ask "read -P 0x33 0 512" "read 512/512 bytes at offset 0"
refused "cowtree-io write" "$CT_IO" -f qcow2 -c 'write -P 0x77 0 512' top.qcow2
refused "cowtree-io -r read" "$CT_IO" -f qcow2 -r -c 'read 0 512' top.qcow2
refused "cowtree-img info" "$CT_IMG" info top.qcow2
refused "cowtree-io write to the backing file" "$CT_IO" -f qcow2 -c 'write -P 0x78 0 512' base.qcow2
allowed "cowtree-io -U -r read" "$CT_IO" -f qcow2 -U -r -c 'read 0 512' top.qcow2
allowed "cowtree-img info -U" "$CT_IMG" info -U top.qcow2
allowed "cowtree-io -r read of the backing file" "$CT_IO" -f qcow2 -r -c 'read -P 0x0b 0 512' base.qcow2
release
allowed "cowtree-io after release (the refused writes did not happen)" \
    "$CT_IO" -f qcow2 -c 'read -P 0x33 0 512' -c 'read -P 0x24 1024 512' -c 'write -P 0x34 2048 512' top.qcow2
allowed "backing file unchanged" "$CT_IO" -f qcow2 -r -c 'read -P 0x0b 0 1M' base.qcow2
qcheck_clean top.qcow2

# 4. qemu-io holds it read-only.
hold "qemu-io -r" qemu-io -f qcow2 -r top.qcow2
ask "read -P 0x34 2048 512" "read 512/512 bytes at offset 2048"
refused "cowtree-io write" "$CT_IO" -f qcow2 -c 'write -P 0x77 0 512' top.qcow2
allowed "cowtree-io -r read" "$CT_IO" -f qcow2 -r -c 'read -P 0x34 2048 512' top.qcow2
release

# 5. A holder that dies (abort: no cleanup) leaves no lock behind.
hold "cowtree-io (dies)" "$CT_IO" -f qcow2 top.qcow2
ask "read -P 0x34 2048 512" "read 512/512 bytes at offset 2048"
refused "qemu-io write" qemu-io -f qcow2 -c 'write -P 0x66 0 512' top.qcow2
holder_dies
allowed "qemu-io write after the cowtree-io holder died" qemu-io -f qcow2 -c 'write -P 0x35 0 512' top.qcow2
hold "qemu-io (dies)" qemu-io -f qcow2 top.qcow2
ask "read -P 0x35 0 512" "read 512/512 bytes at offset 0"
refused "cowtree-io write" "$CT_IO" -f qcow2 -c 'write -P 0x77 0 512' top.qcow2
holder_dies
allowed "cowtree-io write after the qemu-io holder died" "$CT_IO" -f qcow2 -c 'write -P 0x36 0 512' -c 'read -P 0x36 0 512' top.qcow2

echo "all locking cases passed"
