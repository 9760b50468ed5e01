#!/usr/bin/env bash
# Rewriting a backing link where the header is awkward:
#  - version 2 (compat=0.10) images, which have no zero clusters: zeros that must keep hiding a
#    backing file after its link changes are written as data. Safe rebase and pull of a v2 image
#    whose old chain reads zero where the new backing has data; unsafe rebase of a v2 image.
#  - 512-byte clusters: header, backing format and name must fit in the first cluster (QEMU
#    leaves out the optional feature name table when it does not fit).
# Compared with qemu-img on a twin.
. "$(dirname "$0")/../lib/common.sh"
. "$(dirname "$0")/chainlib.sh"

w=$T/w
mkdir -p "$w"
cd "$w"
qemu-img create -q -f qcow2 base.qcow2 4M
qio -c 'write -P 0x11 0 4M' base.qcow2
qemu-img create -q -f qcow2 -o compat=0.10 -b base.qcow2 -F qcow2 mid.qcow2
qio -c 'write -z 1M 1M' -c 'write -P 0x22 3M 64k' mid.qcow2
qemu-img create -q -f qcow2 -o compat=0.10 -b mid.qcow2 -F qcow2 top.qcow2
qio -c 'write -P 0x33 0 64k' top.qcow2
# Zero data in mid over base: make mid's zero range explicit zeros over nothing in the new
# chain by giving top an empty v2 sibling as the new backing.
qemu-img create -q -f qcow2 -o compat=0.10 empty.qcow2 4M
snapshot_raw top.qcow2 "$T/top.raw"
cd - >/dev/null

case_dir() { mkdir -p "$T/$1" && cp "$w"/* "$T/$1"/; }

# Safe rebase of top (v2) from mid onto base: mid's zeros must land in top as zero data.
case_dir rb
case_dir rbq
(cd "$T/rb" && ok "$CT_IMG" rebase -q -b base.qcow2 -F qcow2 top.qcow2)
(cd "$T/rbq" && ok qemu-img rebase -q -b base.qcow2 -F qcow2 top.qcow2)
[ "$(backing_of "$T/rb/top.qcow2")" = base.qcow2 ] || die "v2 rebase: link is '$(backing_of "$T/rb/top.qcow2")'"
same_content "$T/rb/top.qcow2" "$T/top.raw"
same_images "$T/rb/top.qcow2" "$T/rbq/top.qcow2"
all_clean "$T/rb/top.qcow2"
echo "v2 safe rebase ok"

# Pull down to base.
case_dir pl
(cd "$T/pl" && ok "$CT_IMG" pull -q -b base.qcow2 top.qcow2)
[ "$(backing_of "$T/pl/top.qcow2")" = base.qcow2 ] || die "v2 pull: link is '$(backing_of "$T/pl/top.qcow2")'"
same_content "$T/pl/top.qcow2" "$T/top.raw"
all_clean "$T/pl/top.qcow2"
echo "v2 pull ok"

# Unsafe rebase: only the link.
case_dir u
(cd "$T/u" && ok "$CT_IMG" rebase -q -u -b empty.qcow2 -F qcow2 top.qcow2)
[ "$(backing_of "$T/u/top.qcow2")" = empty.qcow2 ] || die "v2 unsafe rebase: link is '$(backing_of "$T/u/top.qcow2")'"
all_clean "$T/u/top.qcow2"
echo "v2 unsafe rebase ok"

# 512-byte clusters with a backing file.
mkdir -p "$T/c512"
(
    cd "$T/c512"
    qemu-img create -q -f qcow2 b.qcow2 1M
    qemu-img create -q -f qcow2 b2.qcow2 1M
    qio -c 'write -P 0x44 0 512k' b2.qcow2
    qemu-img create -q -f qcow2 -o cluster_size=512 -b b.qcow2 -F qcow2 t.qcow2
    qio -c 'write -P 0x55 4096 8192' t.qcow2
    snapshot_raw t.qcow2 t.raw
    ok "$CT_IMG" rebase -q -b b2.qcow2 -F qcow2 t.qcow2
    [ "$(backing_of t.qcow2)" = b2.qcow2 ] || die "512-byte clusters: link is '$(backing_of t.qcow2)'"
    same_content t.qcow2 t.raw
    all_clean t.qcow2
)
echo "512-byte clusters ok"
