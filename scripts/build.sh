#!/usr/bin/env bash
# Builds cowtree into build/ (optimised with debug info) and, with --asan, build-asan/
# (AddressSanitizer + UndefinedBehaviorSanitizer, clang).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -d build ] || meson setup build --buildtype=debugoptimized -Dwerror=true >/dev/null
ninja -C build
if [ "${1:-}" = "--asan" ]; then
    [ -d build-asan ] || CC=clang meson setup build-asan --buildtype=debug -Dwerror=true \
        -Db_sanitize=address,undefined -Db_lundef=false \
        -Dc_args='-fno-sanitize-recover=all -fno-omit-frame-pointer' >/dev/null
    ninja -C build-asan
fi
