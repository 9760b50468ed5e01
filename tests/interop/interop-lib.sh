# Helpers shared by the interop tests (sourced, not run: the name does not start with test-).
# shellcheck shell=bash
. "${COWTREE_TOP:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}/tests/lib/common.sh"
requires qemu-img qemu-io python3
DIFFRAND="$COWTREE_TOP/tests/lib/diffrand.py"
# the interpreter itself (a pyenv shim in front of it costs a lot per call)
PY=$(python3 -c "import sys; print(sys.executable)")
[ -x "$CT_IMG" ] || die "missing $CT_IMG"
[ -x "$CT_IO" ] || die "missing $CT_IO"
LONG=${COWTREE_TEST_LONG:-0}

# Image configurations: NAME BASE-FORMAT CREATE-OPTIONS. The options apply to every qcow2 layer
# of the chain; OPTS1|OPTS2|OPTS3 gives base, middle and top layer their own options.
CONFIGS=(
    "v2-512      qcow2 compat=0.10,cluster_size=512"
    "v2-4k       raw   compat=0.10,cluster_size=4096"
    "v2-64k      qcow2 compat=0.10,cluster_size=65536"
    "v2-2M       qcow2 compat=0.10,cluster_size=2097152"
    "v3-512      qcow2 compat=1.1,cluster_size=512"
    "v3-4k       raw   compat=1.1,cluster_size=4096"
    "v3-64k      qcow2 compat=1.1,cluster_size=65536"
    "v3-2M       qcow2 compat=1.1,cluster_size=2097152"
    "rc1-512     qcow2 compat=1.1,cluster_size=512,refcount_bits=1"
    "rc64-512    qcow2 compat=1.1,cluster_size=512,refcount_bits=64"
    "rc1-64k     raw   compat=1.1,cluster_size=65536,refcount_bits=1"
    "rc64-64k    qcow2 compat=1.1,cluster_size=65536,refcount_bits=64"
    "lazy-64k    qcow2 compat=1.1,cluster_size=65536,lazy_refcounts=on"
    "lazy-4k     raw   compat=1.1,cluster_size=4096,lazy_refcounts=on,refcount_bits=1"
    "xl2-16k     qcow2 compat=1.1,cluster_size=16384,extended_l2=on"
    "xl2-64k     raw   compat=1.1,cluster_size=65536,extended_l2=on"
    "xl2-2M      qcow2 compat=1.1,cluster_size=2097152,extended_l2=on"
    "zstd-64k    qcow2 compat=1.1,cluster_size=65536,compression_type=zstd"
    "mixed       qcow2 compat=1.1,cluster_size=65536,extended_l2=on|compat=0.10,cluster_size=512|compat=1.1,cluster_size=4096,refcount_bits=64"
)

# Value of KEY in a comma separated option string, or $3.
opt() { local kv; IFS=, read -ra kv <<<"$1"; for x in "${kv[@]}"; do [ "${x%%=*}" = "$2" ] && { echo "${x#*=}"; return; }; done; echo "$3"; }
compat_of() { opt "$1" compat 1.1; }
cluster_of() { opt "$1" cluster_size 65536; }
layer_opts() { # OPTS INDEX
    local o; IFS='|' read -ra o <<<"$1"
    if [ "${#o[@]}" -eq 1 ]; then echo "${o[0]}"; else echo "${o[$2]}"; fi
}

# Layer sizes for a cluster size: base < middle < top; none is cluster aligned (C > 512).
sizes_for() { # C -> "SB SM ST"
    local c=$1 sb
    sb=$((16 * c > 1048576 ? 16 * c : 1048576))
    sb=$((sb + 1024))
    echo "$sb $((sb + 3 * c + 1536)) $((sb + 7 * c + 3584))"
}

# The qemu-io script one layer gets. Args: CLUSTER SIZE PATTERN SHIFT FORMAT BACKING-SIZE.
# Offsets are expressed in clusters so that every cluster size exercises the same cases.
workload() {
    local c=$1 s=$2 p=$3 sh=$4 fmt=$5 b=$6 sub=$(($1 / 32))
    echo "write -P $p $sh $c                            # full cluster when SHIFT=0"
    echo "write -P $((p + 1)) $((c + c / 2 + sh)) $((2 * c))  # crosses two cluster boundaries"
    echo "write -P $((p + 2)) $((4 * c - 100 + sh)) 300      # small, crosses a boundary"
    echo "write -P $((p + 3)) $((5 * c + 7 + sh)) 13          # tiny, byte-unaligned"
    echo "write -P $((p + 4)) $((6 * c)) $((3 * c))            # aligned, three clusters"
    echo "write -z $((6 * c + c / 2 + sh)) $c                 # zeroes over data, unaligned"
    if [ "$fmt" = qcow2 ]; then
        echo "discard $((8 * c)) $c                           # whole cluster of data"
        echo "discard $((7 * c + 1 + sh)) $c                  # partial clusters only"
    fi
    echo "write -z $((10 * c + sh)) $((2 * c))                # zeroes over unallocated space"
    echo "write -P $((p + 5)) $((12 * c + 3 * sub)) $sub      # one subcluster (extended L2)"
    echo "write -P $((p + 6)) $((12 * c + 5 * sub + 1)) 10    # part of a subcluster"
    echo "write -z $((12 * c + 7 * sub)) $((2 * sub))         # two zero subclusters"
    echo "write -P $((p + 7)) $((s / 2 + sh)) 4097            # mid-disk, other L2 table"
    echo "write -P $((p + 8)) $((s - c - 333)) $((c + 333))   # up to the end of the image"
    if [ "$b" -gt 0 ]; then
        echo "write -P $((p + 9)) $((b + 100)) 50             # just past the backing file's end"
        echo "write -P $((p + 10)) $((b - 30)) 60             # across the backing file's end"
    fi
}

# chain_scripts C0 C1 C2 SB SM ST BASE-FORMAT: write base.w, mid.w, top.w (the commands for the
# three layers of a chain; Cn cluster sizes, Sx image sizes) in the current directory.
chain_scripts() {
    local c0=$1 c1=$2 c2=$3 sb=$4 sm=$5 st=$6 bfmt=$7
    workload "$c0" "$sb" 0x10 0 "$bfmt" 0 >base.w
    {
        # first a long discard over base data (zero clusters over a backing file on v3;
        # ignored on v2), then the middle layer's own writes land partly on top of it
        echo "discard $((2 * c1 + 1)) $((sb - 2 * c1))"
        workload "$c1" "$sm" 0x40 $((c1 / 3 + 5)) qcow2 "$sb"
        echo "write -z $((c0 / 2)) $((2 * c0))           # zeroes over base data"
        echo "write -z $((sb - 1000)) 2000               # zeroes across the base end"
    } >mid.w
    {
        workload "$c2" "$st" 0x70 $((2 * c2 / 3 + 11)) qcow2 "$sm"
        echo "discard $((sm + c2 / 2)) $((st - sm - c2 / 2))  # up to the end of the image"
        echo "write -P 0x7e $((st - 100)) 100            # reallocate the last cluster"
        echo "write -P 0x7f $((sm - 2 * c2 - 7)) $((3 * c2 + 1))  # over the backing end"
    } >top.w
}

# io_script TOOL FORMAT IMAGE SCRIPT [TOOL OPTIONS...]: run every command of SCRIPT (one per
# line, # comments) in one TOOL process; fail on a non-zero exit or a verification failure.
io_script() {
    local tool=$1 fmt=$2 img=$3 script=$4 line out rc
    shift 4
    local args=()
    while IFS= read -r line; do
        line=${line%%#*}
        if [[ $line =~ [^[:space:]] ]]; then args+=(-c "$line"); fi
    done <"$script"
    set +e
    out=$("$tool" -f "$fmt" "$@" "${args[@]}" "$img" 2>&1)
    rc=$?
    set -e
    if [ "$rc" -ne 0 ] || grep -qi 'verification failed' <<<"$out"; then
        {
            echo "--- $(basename "$tool") -f $fmt $* <$((${#args[@]} / 2)) commands> $img: rc=$rc"
            grep -iE 'fail|error|abort|lock|corrupt|invalid|not ' <<<"$out" | head -20
            echo "--- commands ($script):"
            grep -v '^ *#' "$script" | sed 's/ *#.*//' | head -80
        } >&2
        die "$(basename "$tool") on $img: rc=$rc (see above)"
    fi
}

# Expected-content read scripts for a chain: PREFIX0, PREFIX1, ... verify every byte of the
# view of layer 0, 1, ... Args: PREFIX LAYERSPEC... (see diffrand.py)
expect() {
    local prefix=$1
    shift
    local a=()
    for l in "$@"; do a+=(--layer "$l"); done
    "$PY" "$DIFFRAND" expect --all-views "$prefix" "${a[@]}" || die "diffrand.py expect failed"
}

# json_fields QEMU.json:OTHER.json[,QEMU2.json:OTHER2.json...] FIELD...: in each pair of JSON
# files the dotted FIELDs must be equal (or absent from both).
json_fields() {
    "$PY" - "$@" <<'EOF' || die "info --output=json differs from the reference (see above)"
import json, sys
pairs, fields = sys.argv[1], sys.argv[2:]
MISSING = "<absent>"
def get(d, path):
    for k in path.split("."):
        if not isinstance(d, dict) or k not in d:
            return MISSING
        d = d[k]
    return d
bad = 0
for pair in pairs.split(","):
    a_path, b_path = pair.split(":")
    try:
        a = json.load(open(a_path))
        b = json.load(open(b_path))
    except ValueError as e:
        print("%s: not JSON: %s" % (b_path, e), file=sys.stderr)
        bad = 1
        continue
    for f in fields:
        x, y = get(a, f), get(b, f)
        if x != y:
            print("field %s: %r in %s (reference), %r in %s" % (f, x, a_path, y, b_path),
                  file=sys.stderr)
            bad = 1
sys.exit(bad)
EOF
}

# qemu-img check must be clean (exit 0) and not mention leaks or errors.
qcheck_clean() {
    local out rc
    set +e
    out=$(qemu-img check "$@" 2>&1)
    rc=$?
    set -e
    [ "$rc" -eq 0 ] || die "qemu-img check $*: rc=$rc: $(head -20 <<<"$out")"
}

# Some text that compresses, but not to nothing, and is no single byte pattern.
text_file() { # FILE BYTES SEED
    "$PY" -c '
import base64, random, sys
r = random.Random(int(sys.argv[3]))
n = int(sys.argv[2])
data = base64.b64encode(bytes(r.randrange(256) for _ in range(n * 3 // 4 + 3)))[:n]
open(sys.argv[1], "wb").write(data)' "$@"
}

# make_compressed CLUSTER CREATE-OPTIONS: in the current directory, src.raw (the workload
# src.w written by qemu-io plus TLEN bytes of text at TXT) and comp.qcow2, its
# `qemu-img convert -c`. Sets SIZE, TXT, TLEN and NCOMP (compressed clusters made).
make_compressed() {
    local c=$1 opts=$2
    read -r SIZE _ <<<"$(sizes_for "$c")"
    TXT=$((14 * c)) TLEN=$((c > 65536 ? c : 65536))
    ok qemu-img create -q -f raw src.raw "$SIZE"
    workload "$c" "$SIZE" 0x21 0 raw 0 >src.w
    io_script qemu-io raw src.raw src.w
    text_file text.bin "$TLEN" "$c"
    ok dd if=text.bin of=src.raw bs=4096 seek="$TXT" oflag=seek_bytes conv=notrunc status=none
    ok qemu-img convert -c -f raw -O qcow2 -o "$opts" src.raw comp.qcow2
    NCOMP=$(compressed_clusters comp.qcow2)
    [ "$NCOMP" -gt 0 ] || die "qemu-img convert -c -o $opts made no compressed cluster"
}

# Count of compressed clusters that qemu-img check --output=json reports.
compressed_clusters() {
    qemu-img check --output=json "$1" | "$PY" -c 'import json,sys; print(json.load(sys.stdin).get("compressed-clusters", 0))'
}

# run_case NAME COMMAND...: run one test case in a subshell (its own cwd, `set -e` active);
# a failing case is recorded and the next one still runs. finish fails if any case failed.
FAILED=()
run_case() {
    local name=$1 rc
    shift
    set +e
    (
        set -e
        "$@"
    )
    rc=$?
    set -e
    if [ "$rc" -ne 0 ]; then
        FAILED+=("$name")
        echo "FAILED case $name" >&2
    fi
}
finish() {
    [ "${#FAILED[@]}" -eq 0 ] || die "${#FAILED[@]} failed case(s): ${FAILED[*]}"
    echo "all cases passed"
}
