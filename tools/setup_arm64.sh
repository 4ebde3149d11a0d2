#!/usr/bin/env bash
# An arm64 (aarch64) Debian root that runs under qemu-user-static, with Python, numpy, ml_dtypes and TVM's runtime
# from PyPI's manylinux aarch64 wheels (no torch, like an edge device): where aarch64 exports are loaded with
# tvm_paged and checked without an Arm machine.
#
#   bash tools/setup_arm64.sh            # builds $ARM64_ROOT (default ~/.cache/tvm_paged/arm64-root) once
#   sudo chroot "$ARM64_ROOT" python3 -c 'import tvm_ffi, numpy'
#
# Steps: Debian's qemu-user-static and debootstrap on the host; binfmt_misc mounted so the kernel runs aarch64
# binaries through qemu; a minimal bookworm arm64 root with python3 and pip (about 4 minutes); the wheels of
# apache-tvm, apache-tvm-ffi, numpy and ml_dtypes (numpy's bfloat16 and float8) downloaded on the host (pip inside
# the root cannot verify the index's certificate) and installed in the root from files. A finished root is marked by .tvm_paged-ready and reused.
set -euo pipefail
root=${ARM64_ROOT:-$HOME/.cache/tvm_paged/arm64-root}
suite=${ARM64_SUITE:-bookworm}
tvm_version=${TVM_VERSION:-0.27.0.post1}
ffi_version=${TVM_FFI_VERSION:-0.1.14.post1}
log() { echo "setup_arm64: $*"; }

if [ -f "$root/.tvm_paged-ready" ]; then
  log "$root ready"
  exit 0
fi
if ! command -v qemu-aarch64-static >/dev/null || ! command -v debootstrap >/dev/null; then
  log "installing qemu-user-static and debootstrap"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q qemu-user-static debootstrap binfmt-support >/dev/null
fi
if [ ! -e /proc/sys/fs/binfmt_misc/register ]; then
  mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
fi
if [ ! -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ]; then
  update-binfmts --enable qemu-aarch64 2>/dev/null || true
fi
if [ ! -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ]; then
  # The interpreter is opened at registration (flag F), so it also works inside the chroot.
  echo ':qemu-aarch64:M::\x7fELF\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\xb7\x00:\xff\xff\xff\xff\xff\xff\xff\x00\xff\xff\xff\xff\xff\xff\xff\xff\xfe\xff\xff\xff:/usr/bin/qemu-aarch64-static:F' \
    > /proc/sys/fs/binfmt_misc/register
fi

if [ ! -x "$root/usr/bin/python3" ]; then
  log "debootstrap $suite arm64 into $root"
  rm -rf "$root"
  mkdir -p "$(dirname "$root")"
  debootstrap --arch=arm64 --variant=minbase --include=python3,python3-venv,libstdc++6 "$suite" "$root" \
    http://deb.debian.org/debian >/dev/null
fi

wheels=$(mktemp -d)
trap 'rm -rf "$wheels"' EXIT
py_version=$(chroot "$root" python3 -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
log "downloading aarch64 wheels for Python $py_version"
python3 -m pip download -q --disable-pip-version-check --only-binary=:all: --platform manylinux_2_28_aarch64 --python-version "$py_version" \
  -d "$wheels" "apache-tvm==$tvm_version" "apache-tvm-ffi==$ffi_version" numpy ml_dtypes
mkdir -p "$root/tmp/wheels"
cp "$wheels"/*.whl "$root/tmp/wheels/"
log "installing them in the root"
chroot "$root" python3 -m venv /opt/venv
chroot "$root" sh -c '/opt/venv/bin/python -m pip install -q --no-index --no-deps /tmp/wheels/*.whl'
rm -rf "$root/tmp/wheels"
chroot "$root" /opt/venv/bin/python -c 'import ml_dtypes, numpy, tvm_ffi, tvm; print("arm64 root:", tvm.__version__, numpy.__version__)'
touch "$root/.tvm_paged-ready"
log "$root ready"
