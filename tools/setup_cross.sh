#!/usr/bin/env bash
# Install Debian's aarch64 cross toolchain, used by `tvm-paged export --target nvidia/jetson-*` to link the
# host side of a Jetson library on an x86-64 machine. Idempotent: does nothing when the compiler is present.
# Usage (root, or through sudo; fine in CI):  tools/setup_cross.sh
set -euo pipefail

CC=aarch64-linux-gnu-gcc
if command -v "$CC" >/dev/null 2>&1 && [ -e /usr/aarch64-linux-gnu/lib/libc.so.6 ]; then
    echo "setup_cross: $CC already installed ($("$CC" -dumpversion))"
    exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null 2>&1 || { echo "setup_cross: run as root or install sudo" >&2; exit 1; }
    SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends gcc-aarch64-linux-gnu libc6-dev-arm64-cross
echo "setup_cross: installed $CC ($("$CC" -dumpversion))"
