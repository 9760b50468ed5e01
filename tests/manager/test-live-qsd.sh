#!/bin/sh
# The live-domain and live-job tests with qemu-storage-daemon playing cowtreed (through
# qsd-home.sh, which takes cowtreed's --home DIR): the manager's QMP use is QEMU's.
here=$(cd "$(dirname "$0")" && pwd)
command -v qemu-storage-daemon >/dev/null || { echo "skip: needs qemu-storage-daemon"; exit 77; }
export COWTREE_DAEMON="$here/qsd-home.sh"
rc=0
for t in test-live-domain.py test-live-jobs.py; do
    echo "== $t with qemu-storage-daemon"
    python3 "$here/$t"
    r=$?
    [ $r -eq 77 ] && exit 77
    [ $r -ne 0 ] && rc=1
done
exit $rc
