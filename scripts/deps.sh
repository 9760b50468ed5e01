#!/usr/bin/env bash
# Installs what cowtree needs to build and test on Debian 12 (run as root).
set -euo pipefail
pkgs=(meson ninja-build gcc clang libclang-rt-14-dev pkg-config
      zlib1g-dev libzstd-dev libjson-c-dev libsqlite3-dev libxml2-dev libvirt-clients
      libnbd-bin fio qemu-system-common gnuplot-nox time
      qemu-utils python3 coreutils strace)
missing=()
for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
