#!/usr/bin/env bash
# Bad-input suite: runs cowtree-img info/check and cowtree-io read/write on every malformed image
# that gen.py builds and checks, for each case and operation, what gen.py says must happen:
#   - exit status as expected (fail / ok / any), never a signal (rc >= 128) or a timeout (124);
#   - a failure prints exactly one stderr line `cowtree-img: FILE: msg` / `cowtree-io: msg`
#     (a `check` that reports corruption, rc 2, may print its report instead) whose message
#     matches every keyword regex of the case (paths of the corpus are masked before matching);
#   - no "out of memory" errors (memory is bounded, an unbounded allocation must not happen);
#   - no file of the case directory changes (sha256 before/after every operation).
# Each command runs under `timeout -k 5 20` and `ulimit -v 2000000` (for ASan builds the address-space
# limit is replaced by ASAN_OPTIONS=max_allocation_size_mb=2000:allocator_may_return_null=1).
#
# usage: tests/malformed/test-malformed.sh [CASE-REGEX]
# env:   COWTREE_BUILD (build dir), MALFORMED_KEEP=DIR (build the corpus in DIR and keep it),
#        MALFORMED_VERBOSE=1 (show stderr of every failed operation)
. "$(cd "$(dirname "${BASH_SOURCE[0]}")/../lib" && pwd)/common.sh"
set +e
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
filter=${1:-}

requires python3 qemu-img qemu-io sha256sum timeout
if ! [ -x "$CT_IMG" ] || ! [ -x "$CT_IO" ]; then skip "cowtree-img/cowtree-io not built in $COWTREE_BUILD"; fi

corpus=${MALFORMED_KEEP:-$T/corpus}
mkdir -p "$corpus"
corpus=$(cd "$corpus" && pwd)
gen_out=$(python3 "$here/gen.py" "$corpus" 2>&1) || die "gen.py failed: $gen_out"
[ -s "$corpus/manifest.tsv" ] || die "gen.py wrote no manifest"

asan=0
if grep -qa -e __asan_init -e __ubsan_handle "$CT_IMG" "$CT_IO" 2>/dev/null; then
    asan=1
    export ASAN_OPTIONS="max_allocation_size_mb=2000:allocator_may_return_null=1${ASAN_OPTIONS:+:$ASAN_OPTIONS}"
    export UBSAN_OPTIONS="print_stacktrace=1${UBSAN_OPTIONS:+:$UBSAN_OPTIONS}"
fi

out=$T/op.out
err=$T/op.err

# cmd_for OP FMT IMG -> sets the array cmd
cmd_for() {
    local op=$1 fmt=$2 img=$3
    case "$op" in
    info) cmd=("$CT_IMG" info -f "$fmt" "$img") ;;
    info-chain) cmd=("$CT_IMG" info -f "$fmt" --backing-chain "$img") ;;
    check) cmd=("$CT_IMG" check -f "$fmt" "$img") ;;
    read) cmd=("$CT_IO" -f "$fmt" -c 'read 0 64k' "$img") ;;
    read-ro) cmd=("$CT_IO" -f "$fmt" -r -c 'read 0 64k' "$img") ;;
    write) cmd=("$CT_IO" -f "$fmt" -c 'write 0 4k' "$img") ;;
    *) die "unknown op $op in manifest" ;;
    esac
}

# sha256 of every file of a case directory; a file that grew past 64 MiB (e.g. a write 1 TiB past
# EOF made it sparse-huge) is listed by size only, hashing it would take forever.
digest() {
    (
        cd "$1" || exit
        find . -type f -printf '%s\t%p\n' | LC_ALL=C sort -t$'\t' -k2 | while IFS=$'\t' read -r sz p; do
            if [ "$sz" -le 67108864 ]; then sha256sum "$p"; else echo "size=$sz  $p"; fi
        done
    )
}

declare -A cell verdict why desc base
while IFS=$'\t' read -r n b d; do desc[$n]=$d base[$n]=$b; done <"$corpus/cases.tsv"
cases=()
ops_seen=(info info-chain check read-ro read write)
nops=0
nbad=0

while IFS=$'\t' read -r -a f; do
    [ "${#f[@]}" -ge 4 ] || continue
    case "${f[0]}" in "#"*) continue ;; esac
    name=${f[0]} op=${f[1]} expect=${f[2]} fmt=${f[3]}
    kws=("${f[@]:4}")
    if [ -n "$filter" ] && ! [[ $name =~ $filter ]]; then continue; fi
    dir=$corpus/$name
    img=$dir/img.qcow2
    if [ -z "${verdict[$name]+x}" ]; then
        cases+=("$name")
        verdict[$name]=PASS
        why[$name]=""
    fi
    cmd_for "$op" "$fmt" "$img"
    before=$(digest "$dir")
    (
        cd "$dir" || exit 99
        [ "$asan" = 1 ] || ulimit -v 2000000 || exit 98
        exec timeout -k 5 20 "${cmd[@]}"
    ) >"$out" 2>"$err" </dev/null
    rc=$?
    after=$(digest "$dir")
    nops=$((nops + 1))

    # mask corpus paths so that case names and temp dir names cannot satisfy a keyword
    msg=$(sed -e "s|$dir|<DIR>|g" -e "s|$corpus|<CORPUS>|g" "$err")
    nlines=$(grep -c . "$err")
    problems=()
    if [ "$rc" -eq 124 ]; then
        problems+=("timed out after 20s (hang)")
    elif [ "$rc" -eq 137 ]; then
        problems+=("killed by SIGKILL (ignored SIGTERM after the 20s timeout, or OOM)")
    elif [ "$rc" -ge 128 ]; then
        problems+=("killed by signal $((rc - 128)) (crash)")
    fi
    if grep -qE 'Sanitizer|runtime error:' "$err"; then
        problems+=("sanitizer report")
    fi
    if [ "$before" != "$after" ]; then
        changed=$(diff <(echo "$before") <(echo "$after") | sed -n 's/^> [^ ]*  //p' | tr '\n' ' ')
        problems+=("file(s) modified: ${changed:-?}")
    fi
    if [ "$rc" -lt 124 ]; then
        case "$expect" in
        ok) [ "$rc" -eq 0 ] || problems+=("expected success, got rc=$rc") ;;
        fail)
            if [ "$rc" -eq 0 ]; then
                problems+=("expected failure, got rc=0")
            elif [ "$op" = check ] && [ "$rc" -eq 3 ]; then
                problems+=("check reported only leaks (rc=3), expected corruption or failure")
            fi
            ;;
        any) ;;
        *) die "bad expectation $expect" ;;
        esac
        if [ "$rc" -ne 0 ]; then
            if [ "$op" = check ] && { [ "$rc" -eq 2 ] || [ "$rc" -eq 3 ]; }; then
                text=$(cat "$out"; printf '%s\n' "$msg")
                text=$(printf '%s\n' "$text" | sed -e "s|$dir|<DIR>|g" -e "s|$corpus|<CORPUS>|g")
            else
                text=$msg
                case "$op" in
                read | read-ro | write) shape='^cowtree-io: .+' ;;
                *) shape='^cowtree-img: [^ ].*: .+' ;;
                esac
                if [ "$nlines" -ne 1 ]; then
                    problems+=("stderr has $nlines lines, expected exactly one")
                fi
                if ! grep -qE "$shape" <<<"$msg" || grep -vE "$shape" <<<"$msg" | grep -q .; then
                    problems+=("stderr not of the form /$shape/")
                fi
            fi
            for k in "${kws[@]}"; do
                [ -n "$k" ] || continue
                grep -Eiq -- "$k" <<<"$text" || problems+=("message lacks /$k/")
            done
            if grep -Eiq 'out of memory|cannot allocate memory|ENOMEM' <<<"$text"; then
                problems+=("allocation failure under the memory limit (unbounded allocation?)")
            fi
        fi
    fi

    mark=""
    [ "$rc" -eq 124 ] && rcs=T || rcs=$rc
    if [ "${#problems[@]}" -gt 0 ]; then
        mark="!"
        nbad=$((nbad + 1))
        verdict[$name]=FAIL
        cmd_for "$op" "$fmt" img.qcow2
        printf -v repro '%q ' "${cmd[@]}"
        why[$name]+="  $op (expect $expect, rc=$rc): $(IFS=';'; echo "${problems[*]}")"$'\n'
        why[$name]+="      stderr: $(head -c 300 "$err" | head -3 | tr '\n' '|')"$'\n'
        why[$name]+="      repro:  python3 tests/malformed/gen.py /tmp/mf && cd /tmp/mf/$name && $repro"$'\n'
    elif [ -n "${MALFORMED_VERBOSE:-}" ] && [ "$rc" -ne 0 ]; then
        why[$name]+="  $op rc=$rc: $(head -3 "$err" | tr '\n' '|')"$'\n'
    fi
    cell[$name/$op]="$rcs$mark"
done <"$corpus/manifest.tsv"

[ "${#cases[@]}" -gt 0 ] || die "no case matched '$filter'"

echo
for name in "${cases[@]}"; do
    if [ -n "${why[$name]}" ]; then
        echo "${verdict[$name]} $name [${base[$name]}]: ${desc[$name]}"
        printf '%s' "${why[$name]}"
    fi
done
echo
printf '%-26s' case
for op in "${ops_seen[@]}"; do printf ' %-10s' "$op"; done
printf ' %s\n' result
npass=0 nfail=0
for name in "${cases[@]}"; do
    printf '%-26s' "$name"
    for op in "${ops_seen[@]}"; do printf ' %-10s' "${cell[$name/$op]:--}"; done
    printf ' %s\n' "${verdict[$name]}"
    if [ "${verdict[$name]}" = PASS ]; then npass=$((npass + 1)); else nfail=$((nfail + 1)); fi
done
echo "(cells: exit status of the operation; T = timeout; ! = expectation not met; - = not run)"
echo "malformed: $npass cases passed, $nfail failed ($nops operations, $nbad unmet expectations)$([ "$asan" = 1 ] && echo ', sanitizer build')"
[ "$nfail" -eq 0 ]
