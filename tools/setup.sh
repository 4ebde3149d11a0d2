#!/usr/bin/env bash
# Creates .venv/ at the repository root and installs tvm_paged with its test and tuning extras.
# torch is pinned to the 2.13.0 CPU build first: an unpinned torch would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[test,tune]"
# Cross toolchain for aarch64 (Jetson) exports, when this machine can install Debian packages.
if [ -x tools/setup_cross.sh ]; then tools/setup_cross.sh || echo "setup: aarch64 cross toolchain not installed; edge export tests will skip"; fi
