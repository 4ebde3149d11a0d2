"""The toolchain behind export and CUDA tuning: nvcc, the aarch64 cross compiler, the libcuda stub, build_library.

:func:`build_library` compiles ``{symbol: PrimFunc}`` for a target (host included) into one shared library. CUDA
device code is compiled by nvcc into a fatbin for the target's SM only (:func:`gencode_flags`). On a machine with no
GPU, TVM's CUDA runtime plugin cannot load (it links ``libcuda.so.1``) and TVM silently falls back to embedding
source; :func:`run_python_with_cuda_stub` then runs the build in a child process that first loads a stub
``libcuda.so.1`` (built here with gcc, every function returning an error) so the plugin loads and the build calls
our nvcc callback. The stub lives in a temporary folder and is never shipped. Host code for another architecture
(Jetson: aarch64) is linked with Debian's cross gcc (``tools/setup_cross.sh``).
"""

from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

from . import targets
from . import tvm_compat as tc
from .binary import ElfFile, host_machine, normalize_arch


class ExportError(RuntimeError):
    """The export could not produce a library: a missing toolchain, or a build that would not be what was
    asked for (e.g. CUDA source instead of device code)."""


# ========================================================================================== nvcc
def require_nvcc() -> None:
    """Raise :class:`ExportError` unless nvcc is on the PATH."""
    if shutil.which("nvcc") is None:
        raise ExportError("a CUDA export needs nvcc on the PATH to compile device code")


def gencode_flags(arch: str) -> list[str]:
    """nvcc flags for exactly the target's SM: ``sm_90a`` -> ``-gencode arch=compute_90a,code=sm_90a``."""
    m = re.fullmatch(r"sm_(\d+[a-z]?)", arch or "")
    if not m:
        raise ExportError(f"target: CUDA arch {arch!r} is not of the form sm_XY")
    return ["-gencode", f"arch=compute_{m.group(1)},code=sm_{m.group(1)}"]


def nvcc_version() -> str:
    """nvcc's version (``13.0.48``), or ``"unknown"``."""
    try:
        out = subprocess.run(["nvcc", "--version"], capture_output=True, text=True).stdout
    except OSError:
        return "unknown"
    m = re.search(r"release [\d.]+, V([\d.]+)", out)
    return m.group(1) if m else "unknown"


# ========================================================================================== host code
def export_target(target):
    """The target a library is compiled for: a CUDA target keeps its tag's host (Jetson: aarch64) or gets a
    generic host for this machine's architecture (no ``mcpu``: the library runs on any CPU of that family)."""
    if targets.target_kind(target) == "cuda" and target.host is None:
        return tc.Target(target, targets.resolve_target({"kind": "llvm"}))
    return target


def host_arch(target) -> str:
    """Architecture of the target's host code (``x86-64``, ``aarch64``), from its ``mtriple``; this machine's
    when the target does not say."""
    host = target.host if target.host is not None else target
    triple = str(host.attrs.get("mtriple", "") or "")
    return normalize_arch(triple.split("-")[0]) if triple else host_machine()


def cross_compiler(target) -> str | None:
    """``aarch64-linux-gnu-gcc`` when the host code is for another architecture than this machine's."""
    arch = host_arch(target)
    if arch == host_machine():
        return None
    gnu = {"x86-64": "x86_64"}.get(arch, arch)
    cc = f"{gnu}-linux-gnu-gcc"
    if shutil.which(cc) is None:
        raise ExportError(f"target: host code for {arch} needs the cross compiler {cc} "
                          "(install it with tools/setup_cross.sh)")
    return cc


# ============================================================================= CUDA build without a GPU
_STUB_FALLBACK_SYMBOLS = (
    "cuDeviceGetName", "cuFuncSetAttribute", "cuGetErrorName", "cuGetErrorString", "cuLaunchKernelEx",
    "cuModuleGetFunction", "cuModuleLoadData", "cuModuleUnload", "cuTensorMapEncodeTiled",
)


def _driver_symbols() -> list[str]:
    """The CUDA driver functions TVM's CUDA runtime plugin imports (read from the plugin itself)."""
    plugin = tc.cuda_runtime_plugin()
    if plugin is not None:
        try:
            names = [n for n in ElfFile(plugin.read_bytes()).undefined_symbols()
                     if n.startswith("cu") and not n.startswith("cuda")]
            if names:
                return names
        except (ValueError, struct.error, OSError):
            pass
    return list(_STUB_FALLBACK_SYMBOLS)


def build_cuda_stub(folder) -> Path:
    """Build a stub ``libcuda.so.1`` in ``folder``: the driver symbols TVM's CUDA plugin imports, each returning
    CUDA_ERROR_UNKNOWN. Only for building on a machine with no GPU; never ship it."""
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        raise ExportError("building CUDA device code on a machine without a GPU needs gcc (for a libcuda stub)")
    folder = Path(folder)
    src = folder / "cuda_stub.c"
    src.write_text("".join(f"int {name}(void) {{ return 999; }}\n" for name in _driver_symbols()))
    out = folder / "libcuda.so.1"
    proc = subprocess.run([cc, "-shared", "-fPIC", "-Wl,-soname,libcuda.so.1", "-o", str(out), str(src)],
                          capture_output=True, text=True)
    if proc.returncode:
        raise ExportError(f"could not build the libcuda stub: {proc.stderr.strip()}")
    return out


_STUB_PREAMBLE = (
    "import ctypes, sys\n"
    "ctypes.CDLL(sys.argv.pop(1), mode=ctypes.RTLD_GLOBAL)  # before `import tvm`: lets TVM's CUDA plugin load\n"
)


def run_python_with_cuda_stub(script: str, args=(), *, timeout=None) -> subprocess.CompletedProcess:
    """Run ``python -c script *args`` in a fresh process that loads a stub ``libcuda.so.1`` before anything
    imports TVM, so CUDA builds there embed device binaries. Output is captured (text)."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    with tempfile.TemporaryDirectory(prefix="tvm_paged_cuda_stub_") as tmp:
        stub = build_cuda_stub(tmp)
        return subprocess.run([sys.executable, "-c", _STUB_PREAMBLE + script, str(stub), *map(str, args)],
                              capture_output=True, text=True, env=env, timeout=timeout)


# ========================================================================================== the build
def build_library(funcs: dict, target, path) -> dict:
    """Compile ``{symbol: PrimFunc}`` for ``target`` (host included) into ONE shared library at ``path``.

    CUDA: device code is compiled by nvcc to a fatbin for the target's SM only; needs TVM's CUDA plugin loaded in
    this process (a real ``libcuda.so.1`` or the stub, see :func:`run_python_with_cuda_stub`). Returns
    ``{"cross_compiler": ..., "nvcc": ..., "gencode": ...}`` (the last two for CUDA)."""
    target = export_target(target)
    kind = targets.target_kind(target)
    cross_cc = cross_compiler(target)
    record: dict = {"cross_compiler": cross_cc}
    if kind == "cuda":
        require_nvcc()
        if not tc.cuda_codegen_available():
            raise ExportError("TVM's CUDA runtime plugin is not loaded in this process, so the build would embed "
                              "CUDA source; run the export through tvm_paged.export.export (which re-runs itself "
                              "with a libcuda stub) or on a machine with a CUDA driver")
        gencode = gencode_flags(str(target.attrs.get("arch", "")))
        record["nvcc"] = nvcc_version()
        record["gencode"] = gencode

        def compile_cuda(code):
            return tc.compile_cuda_with_nvcc(code, None, gencode, target_format="fatbin")

        with target, tc.cuda_compile_callback(compile_cuda):
            ex = tc.compile_module(tc.ir_module(funcs), target)
        if "cuda" not in tc.imported_module_kinds(ex):
            raise ExportError("the CUDA build holds no CUDA module: a kernel without thread bindings was compiled "
                              "to host code")
    else:
        with target:
            ex = tc.compile_module(tc.ir_module(funcs), target)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=path.parent)
    os.close(fd)
    try:
        tc.export_library(ex, tmp, cross_cc)
        os.chmod(tmp, 0o755)  # mkstemp made it private
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return record
