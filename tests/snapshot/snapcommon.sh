# Shared helpers of the snapshot shell tests. Source after tests/lib/common.sh.
#
# Every image the tests touch has a model in $T/st/<basename>/: the qemu-io commands that made
# its active state (cur.script) and its virtual size (cur.size), and the same for each snapshot
# taken (snap.<name>.script / snap.<name>.size). Expected content is derived from the scripts by
# tests/lib/diffrand.py's shadow model (class Layer); snaplib.py `verify` does the checking.
#
# Non-fatal assertions go through `fail`, which counts; `finish` exits 1 if any failed, so one
# wrong detail does not hide the rest of the run. Structural failures use `die`.

# Sanitizer builds: a UBSan report must fail the command, not just print.
export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1${UBSAN_OPTIONS:+:$UBSAN_OPTIONS}"

SNAP_HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
SNAPLIB="python3 $SNAP_HERE/snaplib.py"
nfail=0
step="start"

fail() { echo "FAIL [$step]: $*" >&2; nfail=$((nfail + 1)); }
# fail_once KEY MSG: like fail, but a failure of the same kind is printed only the first time.
declare -A failed_kinds=()
fail_once() {
    local k=$1
    shift
    nfail=$((nfail + 1))
    if [ -z "${failed_kinds[$k]+x}" ]; then
        failed_kinds[$k]=1
        echo "FAIL [$step]: $* (further failures of this kind are counted, not shown)" >&2
    fi
}
finish() {
    if [ "$nfail" -ne 0 ]; then
        echo "$nfail assertion(s) failed" >&2
        exit 1
    fi
    echo "all assertions passed"
    exit 0
}
at() { step="$*"; echo "== $step"; }

snap_requirements() {
    requires qemu-img qemu-io python3 sha256sum cmp
    [ -x "$CT_IMG" ] && [ -x "$CT_IO" ] || skip "cowtree-img/cowtree-io not built in $COWTREE_BUILD"
    local usage
    usage=$("$CT_IMG" 2>&1 || true)
    grep -q '^  snapshot ' <<<"$usage" || skip "$COWTREE_BUILD/cowtree-img has no snapshot verb (stale build)"
}

st() { echo "$T/st/$(basename "$1")"; }

# register IMG: start a model for an image whose active state is all zero (or, with a script
# file as $2, the result of that script).
register() {
    local img=$1 d
    d=$(st "$img")
    rm -rf "$d"
    mkdir -p "$d"
    if [ $# -ge 2 ]; then cp "$2" "$d/cur.script"; else : >"$d/cur.script"; fi
    qemu-img info -U --output=json "$img" >"$d/info.json" || die "qemu-img info $img"
    python3 - "$d" <<'EOF' || die "cannot read geometry of $img"
import json, sys
d = sys.argv[1]
j = json.load(open(d + "/info.json"))
compat = j.get("format-specific", {}).get("data", {}).get("compat", "0.10")
open(d + "/geom", "w").write("%s %d\n" % (compat, j["cluster-size"]))
open(d + "/cur.size", "w").write("%d\n" % j["virtual-size"])
EOF
}

# mk TOOL IMG SIZE OPTS: create a qcow2 image with qemu-img (TOOL=q) or cowtree-img (TOOL=c).
mk() {
    local tool=$1 img=$2 size=$3 opts=$4
    rm -f "$img"
    if [ "$tool" = q ]; then
        ok qemu-img create -q -f qcow2 -o "$opts" "$img" "$size"
    else
        ok "$CT_IMG" create -q -f qcow2 -o "$opts" "$img" "$size" >/dev/null
    fi
    register "$img"
}

# io TOOL IMG CMD...: run data commands with qemu-io (q) or cowtree-io (c) in one process and
# record them in the model.
io() {
    local tool=$1 img=$2 d args=() c out
    shift 2
    d=$(st "$img")
    for c in "$@"; do args+=(-c "$c"); done
    if [ "$tool" = q ]; then
        out=$(qemu-io -f qcow2 "${args[@]}" "$img" 2>&1) || die "qemu-io failed: $* on $img: $out"
    else
        out=$("$CT_IO" -f qcow2 "${args[@]}" "$img" 2>&1) || die "cowtree-io failed: $* on $img: $out"
    fi
    if grep -qiE 'error|failed' <<<"$out"; then die "data command reported an error: $out"; fi
    for c in "$@"; do echo "$c" >>"$d/cur.script"; done
}

# everything IMG: (snaplib.py verify)
#   - qemu-img check exits 0 with no leak/corruption, and cowtree-img check exits 0 too;
#   - cowtree's snapshot listings (snapshot -l --output=json, info --output=json, the human
#     snapshot -l and info sections) equal qemu-img's, and name the model's snapshots;
#   - the active state reads back as modelled with qemu-io -r and cowtree-io -r (read -P over
#     every byte) and has the modelled virtual size;
#   - every snapshot, extracted by qemu-img convert -l snapshot.name=N -O raw, has the
#     modelled size and bytes.
everything() {
    local n=0
    SNAP_STEP=$step $SNAPLIB verify "$1" "$(st "$1")" "$T/failed-kinds" "$T" || n=$?
    nfail=$((nfail + n))
}

# snap TOOL OP IMG NAME: snapshot -c/-a/-d with qemu-img (q) or cowtree-img (c); updates the model.
snap() {
    local tool=$1 op=$2 img=$3 name=$4 d out
    d=$(st "$img")
    if [ "$tool" = q ]; then
        out=$(qemu-img snapshot "$op" "$name" "$img" 2>&1) || die "qemu-img snapshot $op $name $img: $out"
    else
        out=$("$CT_IMG" snapshot "$op" "$name" "$img" 2>&1) || die "cowtree-img snapshot $op $name $img: $out"
    fi
    case "$op" in
    -c) cp "$d/cur.script" "$d/snap.$name.script"; cp "$d/cur.size" "$d/snap.$name.size" ;;
    -a) cp "$d/snap.$name.script" "$d/cur.script"; cp "$d/snap.$name.size" "$d/cur.size" ;;
    -d) rm -f "$d/snap.$name.script" "$d/snap.$name.size" ;;
    esac
}

# resize TOOL IMG SIZE (growing only; the model's new area is zero)
resize() {
    local tool=$1 img=$2 size=$3 d
    d=$(st "$img")
    if [ "$tool" = q ]; then
        ok qemu-img resize -q -f qcow2 "$img" "$size"
    else
        ok "$CT_IMG" resize -f qcow2 "$img" "$size" >/dev/null
    fi
    echo "$size" >"$d/cur.size"
}

sha() { sha256sum "$1" | cut -d' ' -f1; }

# refused IMG REGEX CMD...: the cowtree command must fail (non-zero, message on stderr) and leave $img
# byte-for-byte unchanged and clean. $1 is a regex the message must match.
refused() {
    local img=$1 re=$2 before after out rc
    shift 2
    before=$(sha "$img")
    set +e
    out=$("$@" 2>&1)
    rc=$?
    set -e
    after=$(sha "$img")
    [ $rc -ne 0 ] || fail "$img: '$*' succeeded, must be refused"
    [ $rc -lt 128 ] || fail "$img: '$*' died with signal $((rc - 128))"
    ! grep -qE 'Sanitizer|runtime error' <<<"$out" || fail "$img: '$*' sanitizer report: $out"
    grep -qiE "$re" <<<"$out" || fail "$img: '$*' message does not match /$re/: $out"
    [ "$before" = "$after" ] || fail "$img: refused '$*' changed the image file"
}

