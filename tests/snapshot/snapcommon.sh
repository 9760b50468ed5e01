# Shared helpers of the snapshot shell tests. Source after tests/lib/common.sh.
#
# Every image the tests touch has a model in $T/st/<basename>/: the qemu-io commands that made
# its active state (cur.script) and its virtual size (cur.size), and the same for each snapshot
# taken (snap.<name>.script / snap.<name>.size). Expected content is derived from the scripts by
# tests/lib/diffrand.py's shadow model (`expect` mode: read -P commands covering every byte).
#
# Non-fatal assertions go through `fail`, which counts; `finish` exits 1 if any failed, so one
# wrong detail does not hide the rest of the run. Structural failures use `die`.

SNAP_HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
SNAPLIB="python3 $SNAP_HERE/snaplib.py"
DIFFRAND="$SNAP_HERE/../lib/diffrand.py"
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

# expect_reads IMG KEY: read -P commands verifying the model state KEY (cur or snap.NAME)
expect_reads() {
    local d compat cl size
    d=$(st "$1")
    read -r compat cl <"$d/geom"
    size=$(cat "$d/$2.size")
    python3 "$DIFFRAND" expect --layer "fmt=qcow2,compat=$compat,cluster=$cl,size=$size,script=$d/$2.script"
}

# run_reads FMT FILE < reads: verify content with qemu-io -r (and cowtree-io -r with CT=1)
run_reads() {
    local fmt=$1 file=$2 tool=${3:-q} args=() line out rc
    while IFS= read -r line; do [ -n "$line" ] && args+=(-c "$line"); done
    set +e
    if [ "$tool" = q ]; then
        out=$(qemu-io -r -f "$fmt" "${args[@]}" "$file" 2>&1)
    else
        out=$("$CT_IO" -r -f "$fmt" "${args[@]}" "$file" 2>&1)
    fi
    rc=$?
    set -e
    if [ $rc -ne 0 ] || grep -qiE 'verification failed|error|failed' <<<"$out"; then
        echo "$(grep -iE 'verification failed|error|failed' <<<"$out" | head -5)"
        return 1
    fi
    return 0
}

# verify_active IMG: active state equals the model, read by qemu-io and by cowtree-io.
verify_active() {
    local img=$1 d reads msg vs
    d=$(st "$img")
    reads=$(expect_reads "$img" cur)
    vs=$(qemu-img info -U --output=json "$img" | python3 -c 'import json,sys; print(json.load(sys.stdin)["virtual-size"])')
    [ "$vs" = "$(cat "$d/cur.size")" ] || fail "$img: virtual size $vs, expected $(cat "$d/cur.size")"
    msg=$(run_reads qcow2 "$img" q <<<"$reads") || fail "$img: active state wrong (qemu-io): $msg"
    msg=$(run_reads qcow2 "$img" c <<<"$reads") || fail "$img: active state wrong (cowtree-io): $msg"
}

# verify_snap IMG NAME: qemu-img convert -l of the snapshot equals the model (content and size).
verify_snap() {
    local img=$1 name=$2 d raw msg
    d=$(st "$img")
    raw=$T/snap.raw
    rm -f "$raw"
    if ! msg=$(qemu-img convert -f qcow2 -l "snapshot.name=$name" -O raw "$img" "$raw" 2>&1); then
        fail "$img: qemu-img convert -l $name failed: $msg"
        return
    fi
    local sz
    sz=$(stat -c %s "$raw")
    [ "$sz" = "$(cat "$d/snap.$name.size")" ] || fail "$img: snapshot $name has size $sz, expected $(cat "$d/snap.$name.size")"
    msg=$(expect_reads "$img" "snap.$name" | run_reads raw "$raw" q) || fail "$img: snapshot '$name' content wrong: $msg"
    rm -f "$raw"
}

model_snaps() {
    local d f
    d=$(st "$1")
    for f in "$d"/snap.*.script; do
        [ -e "$f" ] || continue
        f=${f##*/snap.}
        echo "${f%.script}"
    done
}

# clean IMG: qemu-img check exits 0 and reports no leak/corruption; cowtree-img check agrees.
clean() {
    local img=$1 out rc
    set +e
    out=$(qemu-img check -f qcow2 --output=json "$img" 2>&1)
    rc=$?
    set -e
    if [ $rc -ne 0 ]; then
        fail "$img: qemu-img check rc=$rc: $(qemu-img check -f qcow2 "$img" 2>&1 | head -12)"
        return
    fi
    python3 -c '
import json, sys
j = json.load(sys.stdin)
bad = {k: j.get(k, 0) for k in ("leaks", "corruptions", "check-errors")}
sys.exit(1 if any(bad.values()) else 0)' <<<"$out" || fail "$img: qemu-img check reports problems: $out"
    set +e
    out=$("$CT_IMG" check -f qcow2 "$img" 2>&1)
    rc=$?
    set -e
    [ $rc -eq 0 ] || fail "$img: cowtree-img check rc=$rc on an image qemu-img finds clean: $(head -5 <<<"$out")"
}

# lists IMG: cowtree's snapshot listings (snapshot -l human/json, info json/human) equal
# qemu-img's, and the names are those of the model.
lists() {
    local img=$1 q c
    qemu-img info -U --output=json "$img" >"$T/q.json" || die "qemu-img info $img"
    "$CT_IMG" snapshot -l --output=json "$img" >"$T/c.json" || { fail "$img: cowtree-img snapshot -l --output=json failed"; return; }
    "$CT_IMG" info --output=json "$img" >"$T/ci.json" || { fail "$img: cowtree-img info --output=json failed"; return; }
    local msg
    msg=$($SNAPLIB listings-equal "$T/q.json" "$T/c.json" "$T/ci.json") || fail "$img: $msg"
    q=$(qemu-img snapshot -l "$img")
    c=$("$CT_IMG" snapshot -l "$img")
    [ "$q" = "$c" ] || fail_once human-list "$img: 'snapshot -l' human listing differs from qemu-img's:
--- qemu-img
$q
--- cowtree-img
$c"
    q=$(qemu-img info -U "$img" | sed -n '/^Snapshot list:/,/^Format specific/p')
    c=$("$CT_IMG" info "$img" | sed -n '/^Snapshot list:/,/^Format specific/p')
    [ "$q" = "$c" ] || fail_once human-info "$img: 'info' snapshot section differs from qemu-img's:
--- qemu-img info
$q
--- cowtree-img info
$c"
    local want got
    want=$(model_snaps "$img" | sort)
    got=$(python3 -c 'import json,sys; [print(s["name"]) for s in json.load(sys.stdin)]' <"$T/c.json" | sort)
    [ "$want" = "$got" ] || fail "$img: snapshots listed: [$got], expected [$want]"
}

# everything IMG: clean, listings, active state and every snapshot as modelled.
everything() {
    local img=$1 s
    clean "$img"
    lists "$img"
    verify_active "$img"
    for s in $(model_snaps "$img"); do verify_snap "$img" "$s"; done
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
