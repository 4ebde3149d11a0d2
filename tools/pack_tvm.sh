#!/usr/bin/env bash
# Packs the installed Apache TVM (compiler included) into .devkit/ for a GPU machine that has no package
# registry and takes a copy of this repository of limited size (tools/gpu_check.sh sources .devkit/activate.sh
# when it is there). That machine runs Python 3.12: TVM's own files are pure Python plus shared libraries, and
# apache-tvm-ffi goes along from its cp312 wheel.
#
#   bash tools/pack_tvm.sh            # repository root, the project's venv active; then prints what a copy weighs
#   LIMIT_MIB=64 bash tools/pack_tvm.sh --size   # only the size report
#   KIT_PYTHON=3.11 bash tools/pack_tvm.sh       # for a machine with another Python (default 3.12)
#
# The compiler library (about 250 MB, most of it LLVM's code) dominates. It is xz-compressed with the x86
# branch filter, which rewrites call and jump targets into a form LZMA compresses better: 55.2 MiB against 56.8
# MiB for plain `xz -9` (TVM 0.27.0.post1), about 3 minutes on 2 cores, done once and kept.
set -euo pipefail
top=$(git rev-parse --show-toplevel)
kit="$top/.devkit"
limit=${LIMIT_MIB:-64}
py_ver=${KIT_PYTHON:-3.12}  # the GPU machine's Python

size_report() {
  # What a copy of the working tree carries: tracked and untracked-not-ignored files, plus the kit.
  local tree kit_bytes logs
  tree=$(git -C "$top" ls-files -z -co --exclude-standard | (cd "$top" && xargs -0 stat -c %s 2>/dev/null || true) \
    | awk '{s += $1} END {print s + 0}')
  logs=$(git -C "$top" ls-files -z tuning_logs | (cd "$top" && xargs -0 stat -c %s 2>/dev/null || true) \
    | awk '{s += $1} END {print s + 0}')
  kit_bytes=$(du -sb "$kit" 2>/dev/null | cut -f1 || echo 0)
  awk -v t="$tree" -v l="$logs" -v k="$kit_bytes" -v lim="$limit" 'BEGIN {
    m = 1048576; total = (t + k) / m
    printf "working tree %.1f MiB (tuning_logs %.1f MiB) + .devkit %.1f MiB = %.1f MiB; limit %d MiB\n",
      t / m, l / m, k / m, total, lim
    if (total > lim) {
      printf "over the limit by %.1f MiB", total - lim
      # The GPU steps never read the tuning logs: moved out of the tree for the copy, they do not travel.
      if ((t + k - l) / m <= lim) printf "; %.1f MiB with tuning_logs/ moved out of the tree", (t + k - l) / m
      printf "\n"; exit 1
    }
  }'
}

if [ "${1:-}" = "--size" ]; then
  size_report
  exit $?
fi

site=$(python -c 'import tvm, os; print(os.path.dirname(os.path.dirname(tvm.__file__)))')
ffi_ver=$(python -c 'import importlib.metadata as m; print(m.version("apache-tvm-ffi"))')
mkdir -p "$kit"
lib="$site/tvm/lib/libtvm_compiler.so"
if [ ! -s "$kit/libtvm_compiler.so.xz" ] || [ "$lib" -nt "$kit/libtvm_compiler.so.xz" ]; then
  xz -T0 -c --x86 --lzma2=preset=9e,dict=64MiB "$lib" > "$kit/libtvm_compiler.so.xz.part"
  mv "$kit/libtvm_compiler.so.xz.part" "$kit/libtvm_compiler.so.xz"
fi
# apache-tvm-ffi's wheel for that Python, unpacked into the same archive as TVM's Python files: xz packs its shared
# libraries a third smaller than the wheel's zip, and the GPU machine then needs no pip step.
ffi=$(mktemp -d)
trap 'rm -rf "$ffi"' EXIT
python -m pip download -q --no-deps --only-binary=:all: --python-version "$py_ver" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
  -d "$ffi/wheel" "apache-tvm-ffi==$ffi_ver"
python -m zipfile -e "$ffi"/wheel/*.whl "$ffi/site"
rm -f "$kit"/*.whl
tar --exclude='__pycache__' -cf - -C "$site" --exclude='tvm/lib/libtvm_compiler.so' --exclude='tvm/3rdparty' \
    --exclude='tvm/src' tvm -C "$ffi/site" . | xz -9e -T0 > "$kit/tvm-py.tar.xz"
cat > "$kit/activate.sh" <<'EOF'
# source .devkit/activate.sh  -- unpacks TVM into /tmp/tvm-site and puts it on PYTHONPATH
_k=$(dirname "${BASH_SOURCE[0]}")
if [ ! -e /tmp/tvm-site/tvm/lib/libtvm_compiler.so ]; then
  mkdir -p /tmp/tvm-site
  tar -C /tmp/tvm-site -xJf "$_k/tvm-py.tar.xz"
  xz -dc "$_k/libtvm_compiler.so.xz" > /tmp/tvm-site/tvm/lib/libtvm_compiler.so
fi
export PYTHONPATH=/tmp/tvm-site:${PYTHONPATH:-}
EOF
ls -la "$kit"
size_report
