#!/bin/sh
# cowtreed --home DIR, played by qemu-storage-daemon (interop runs of the manager's tests).
[ "$1" = "--home" ] || { echo "usage: $0 --home DIR" >&2; exit 2; }
dir=$2
mkdir -p "$dir"
exec qemu-storage-daemon \
    --chardev socket,id=qmp0,path="$dir/qmp.sock",server=on,wait=off \
    --monitor chardev=qmp0 \
    --nbd-server addr.type=unix,addr.path="$dir/nbd.sock" \
    --pidfile "$dir/cowtreed.pid" --daemonize
