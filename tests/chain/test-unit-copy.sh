#!/usr/bin/env bash
# The parallel copy unit test (tests/chain/unit-copy.c). Once meson builds it as
# tests/unit/unit-copy, run.sh runs that binary and this wrapper skips; until then it is
# compiled here against the build's internal library, with the build's sanitizers.
. "$(dirname "$0")/../lib/common.sh"
[ -x "$COWTREE_BUILD/tests/unit/unit-copy" ] && skip "built by meson as tests/unit/unit-copy"
lib=$COWTREE_BUILD/libcowtree-internal.a
[ -f "$lib" ] || skip "no $lib"
cc=${CC:-cc}
requires "$cc"
flags=()
if grep -q -- "-fsanitize=address" "$COWTREE_BUILD/compile_commands.json" 2>/dev/null; then
    flags+=(-fsanitize=address,undefined -fno-sanitize-recover=all)
fi
ok "$cc" -std=gnu11 -D_GNU_SOURCE -g -Wall -Wextra -Werror -Wno-unused-parameter "${flags[@]}" \
    -I"$COWTREE_TOP/include" -I"$COWTREE_TOP/src" "$COWTREE_TOP/tests/chain/unit-copy.c" "$lib" \
    -lz -lzstd -lpthread -lm -o "$T/unit-copy"
"$T/unit-copy"
