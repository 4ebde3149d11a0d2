"""The one module that spells Apache TVM's moving API names.

TVM 0.27 renamed ``tvm.tir`` to ``tvm.tirx``, moved schedulable TIR to ``tvm.s_tir`` and dropped
``tvm.nd``. Everything else in tvm_paged imports TVM through the names below, so the next rename is a
one-file change. Importing this module also sizes TVM's CPU thread pool (``TVM_NUM_THREADS``, below).

Only name spelling lives here, with the smallest wrapper where an API changed (``specialize``,
``buffer_signature``); what is built on these names lives with its users (MetaSchedule glue in
``tvm_paged.tuning.ms_glue``). Names only the tuner needs are resolved on first use (``__getattr__``, below).
"""

from __future__ import annotations

import importlib as _importlib
import os


def allowed_cores() -> int:
    """Cores this process may run on (cgroup/affinity aware), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


# TVM's runtime thread pool was seen starting with a single worker on 2-core VMs unless told otherwise.
# The variable must be set before the pool is first used; a user's own setting wins.
os.environ.setdefault("TVM_NUM_THREADS", str(allowed_cores()))

import tvm  # noqa: E402
import tvm_ffi  # noqa: E402
from tvm import tirx  # noqa: E402
from tvm.script import tirx as T  # noqa: E402  (TVMScript: T.prim_func, T.parallel, ...)
from tvm.target import Target  # noqa: E402
from tvm.support import cc as _cc  # noqa: E402
from tvm.support import nvcc as _nvcc  # noqa: E402
from tvm.target import codegen as _codegen  # noqa: E402
from tvm.tirx.build import codegen_build, split_host_device_mods  # noqa: E402

TVM_VERSION: str = tvm.__version__
FFI_VERSION: str = getattr(tvm_ffi, "__version__", "unknown")


def host_cpu() -> str:
    """LLVM's name for this machine's CPU (e.g. ``znver3``), the ``mcpu`` a local target needs."""
    return str(_codegen.llvm_get_system_cpu())


def host_cpu_features() -> dict[str, bool]:
    """The ISA features LLVM detects on this machine's CPU (CPUID on x86): feature name -> present. Unlike the
    features of :func:`host_cpu`'s name, these are what the chip (or the VM) really offers."""
    detect = tvm_ffi.get_global_func("tvm.codegen.llvm.GetHostCPUFeatures")
    return {str(name): bool(present) for name, present in detect().items()}


def host_triple() -> str:
    return str(_codegen.llvm_get_system_triple())


def llvm_arches() -> set[str]:
    """The architectures (a triple's first part) this build of LLVM can generate code for."""
    return {str(name) for name in _codegen.llvm_get_targets()}


def llvm_knows_cpu(mcpu: str, mtriple: str) -> bool:
    return bool(_codegen.llvm_is_valid_cpu(mcpu, mtriple))


def cpu_features(target: Target) -> set[str]:
    """The ISA and tuning features LLVM enables for a CPU target (its ``mcpu``, ``mattr`` applied)."""
    return {str(name) for name in _codegen.llvm_get_cpu_features(target)}


def cpu_has_feature(feature: str, target: Target) -> bool:
    """Whether an LLVM CPU target has an ISA feature (``avx2``, ``avx512f``); False for foreign architectures."""
    try:
        return bool(_codegen.llvm_cpu_has_features(feature, target))
    except Exception:  # a feature name LLVM does not know for this architecture
        return False


def compile_module(func, target: Target):
    """Compile a PrimFunc or IRModule for ``target``; returns TVM's executable."""
    return tvm.compile(func, target=target)


def load_module(path: str):
    return tvm.runtime.load_module(path)


def cpu_device():
    return tvm.cpu(0)


def cuda_device(index: int = 0):
    return tvm.cuda(index)


def from_numpy(array):
    """A TVM tensor over a C-contiguous numpy array's memory (zero copy: a kernel writes through it).

    tvm-ffi takes an object with ``__dlpack__`` as is, but numpy's legacy export refuses read-only arrays and
    knows no ml_dtypes dtype (bfloat16, float8), and numpy gives empty arrays zero strides, which compiled
    kernels reject. So: DLPack 1.0 (which flags read-only, ignored here: the API refuses read-only arrays it
    writes), ml_dtypes' arrays exported as unsigned integers of their size, and a compact view
    (``runtime.TVMTensorCreateView``, which keeps the tensor it views alive) in the dtype the kernel checks."""
    bits = array.view(f"uint{8 * array.itemsize}") if array.dtype.kind == "V" else array
    try:
        tensor = tvm_ffi.from_dlpack(bits.__dlpack__(max_version=(1, 0)))
    except TypeError:  # numpy < 2.1: legacy DLPack (a read-only array is copied: the kernel only reads it)
        tensor = tvm_ffi.from_dlpack(bits if bits.flags.writeable else bits.copy())
    if bits is array and tuple(tensor.strides) == _compact_strides(array.shape):
        return tensor
    return _TENSOR_VIEW(tensor, tvm_ffi.Shape(array.shape), tvm_ffi.dtype(array.dtype.name), 0)


_TENSOR_VIEW = tvm_ffi.get_global_func("runtime.TVMTensorCreateView")


def _compact_strides(shape) -> tuple:
    """Row-major strides in elements (DLPack's unit)."""
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= int(size)
    return tuple(reversed(strides))


def prefetch(address):
    """A TIR statement that prefetches one cache line for reading (locality 1). 0.27 has no T.prefetch."""
    return T.evaluate(T.call_intrin("void", "tirx.prefetch", address, 0, 1, 1))


class AMX:
    """Intel AMX statements for TIR (0.27 has no AMX tensor intrinsic and no type for tile registers).

    LLVM's register-numbered AMX intrinsics take tile numbers as immediates, so they need no tile type: a
    ``tile`` argument must fold to a constant 0-7 (a Python int, or the variable of a ``T.unroll`` loop). A
    thread configures its tiles (``configure_full``: a 64-byte palette-1 record in memory) before using them and
    releases them after; the process asks Linux for the tile state's permission first (``request_permission``:
    ``arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)``, idempotent, without which the first tile
    instruction raises SIGILL).
    """

    @staticmethod
    def request_permission():
        return T.evaluate(T.call_extern("int64", "syscall", T.int64(158), T.int64(0x1023), T.int64(18)))

    @staticmethod
    @T.macro
    def configure_full(record, tiles: int):
        """Configure tiles ``0 .. tiles - 1`` at their full 16 rows x 64 bytes (16 float32 or 32 bfloat16 per row),
        palette 1, from ``record``: a 64-element uint8 buffer of the thread's own."""
        for i in range(64):
            record[i] = T.uint8(0)
        record[0] = T.uint8(1)
        for t in range(tiles):
            record[16 + 2 * t] = T.uint8(64)
            record[48 + t] = T.uint8(16)
        T.evaluate(T.call_llvm_intrin("void", "llvm.x86.ldtilecfg", T.address_of(record[0])))

    @staticmethod
    def release():
        return T.evaluate(T.call_llvm_intrin("void", "llvm.x86.tilerelease"))

    @staticmethod
    def zero(tile):
        return T.evaluate(T.call_llvm_intrin("void", "llvm.x86.tilezero", T.Cast("int8", tile)))

    @staticmethod
    def load(tile, address, stride_bytes: int):
        return T.evaluate(T.call_llvm_intrin("void", "llvm.x86.tileloadd64", T.Cast("int8", tile), address,
                                             T.int64(stride_bytes)))

    @staticmethod
    def store(tile, address, stride_bytes: int):
        return T.evaluate(T.call_llvm_intrin("void", "llvm.x86.tilestored64", T.Cast("int8", tile), address,
                                             T.int64(stride_bytes)))

    @staticmethod
    def dot_bf16(acc, a, b):
        """``acc[m, n] += sum_k a[m, 2k:2k+2] . b[k, 2n:2n+2]`` (bfloat16 pairs, float32 accumulators)."""
        return T.evaluate(T.call_llvm_intrin("void", "llvm.x86.tdpbf16ps", T.Cast("int8", acc), T.Cast("int8", a),
                                             T.Cast("int8", b)))


def shape_var(name: str):
    """A fresh symbolic int64 dimension named ``name`` (a kernel's batch, pool size, ...)."""
    return tirx.Var(name, "int64")


def runtime_num_threads() -> int:
    """Workers in TVM's CPU thread pool."""
    return int(tvm.get_global_func("runtime.NumThreads")())


def set_runtime_num_threads(num_threads: int) -> None:
    """Resize TVM's CPU thread pool (1: kernels run on the calling thread only)."""
    tvm.get_global_func("runtime.config_threadpool")(0, int(num_threads))


# ----------------------------------------------------------------------------------- export and load
# Appended for tvm_paged.toolchain / tvm_paged.export / tvm_paged.loader: shipping compiled libraries, cross
# compiling, and compiling CUDA device code to a binary on a machine with no GPU.
import contextlib  # noqa: E402
import re as _re  # noqa: E402
from pathlib import Path as _Path  # noqa: E402

CUDA_COMPILE_CALLBACK = "tvm_callback_cuda_compile"
# What the CUDA runtime plugin registers: deserializing a CUDA module from a library needs the first; turning
# generated CUDA source into an embedded binary at build time needs the second.
_CUDA_LOADER = "ffi.Module.load_from_bytes.cuda"
_CUDA_CREATOR = "ffi.Module.create.cuda"


def keep_params(func, keep: list[bool]):
    """``func`` with only the parameters whose ``keep`` entry is true, in order; its body must not use the
    others (a kernel variant's unused arguments)."""
    if len(keep) != len(func.params):
        raise ValueError(f"keep_params: {len(keep)} flags for {len(func.params)} parameters")
    if all(keep):
        return func
    return tirx.PrimFunc([p for p, k in zip(func.params, keep) if k], func.body, func.ret_type, attrs=func.attrs)


def ir_module(funcs: dict):
    """An IRModule of ``{symbol: PrimFunc}``."""
    return tvm.IRModule(dict(funcs))


def buffer_signature(func) -> list[dict]:
    """A PrimFunc's parameters in order: ``{"buffer", "shape", "dtype"}`` for tensors (symbolic dims as their
    variable names) and ``{"buffer", "dtype"}`` for scalars. (0.27 dropped ``buffer_map``: a tensor parameter
    is a Var whose ``ty`` is a BufferType.)"""
    out = []
    for p in func.params:
        ty = getattr(p, "ty", None)
        if isinstance(ty, tirx.buffer.BufferType):
            shape = [int(s) if isinstance(s, tvm.tirx.IntImm) else _re.sub(r"T\.int\d+\((-?\d+)\)", r"\1", str(s))
                     for s in ty.shape]
            out.append({"buffer": str(p), "shape": shape, "dtype": str(ty.dtype)})
        else:
            out.append({"buffer": str(p), "dtype": str(getattr(ty, "dtype", "unknown"))})
    return out


def export_library(executable, path: str, cross_cc: str | None = None) -> None:
    """Write a compiled executable as one shared library; ``cross_cc`` (``aarch64-linux-gnu-gcc``) links
    the host code for another architecture."""
    fcompile = _cc.cross_compiler(cross_cc) if cross_cc else None
    executable.export_library(path, fcompile=fcompile)


def imported_module_kinds(executable) -> list[str]:
    """Kinds of the modules the host module imports (``["cuda"]`` for a CUDA build)."""
    return [str(m.kind) for m in executable.mod.imports]


def cuda_codegen_available() -> bool:
    """Whether a CUDA build in this process embeds device binaries (the CUDA runtime plugin loaded). Without it
    TVM silently falls back to embedding CUDA source."""
    return tvm_ffi.get_global_func(_CUDA_CREATOR, allow_missing=True) is not None


def cuda_runtime_available() -> bool:
    """Whether this process can load a library holding CUDA kernels."""
    return tvm_ffi.get_global_func(_CUDA_LOADER, allow_missing=True) is not None


def _wheel_library(name: str) -> "_Path | None":
    """Path of one of the TVM wheel's shared libraries, or None when it has no such file."""
    for d in (_Path(tvm.__file__).parent / "lib", _Path(tvm.__file__).parent):
        if (d / name).exists():
            return d / name
    return None


def cuda_runtime_plugin() -> "_Path | None":
    """Path of TVM's CUDA runtime plugin (``libtvm_runtime_cuda.so``), or None when the wheel has none."""
    return _wheel_library("libtvm_runtime_cuda.so")


def runtime_library() -> _Path:
    """Path of TVM's runtime library (``libtvm_runtime.so``), for native code that runs its tasks on TVM's CPU
    thread pool through the pool's C entry point (``TVMBackendParallelLaunch``)."""
    path = _wheel_library("libtvm_runtime.so")
    if path is None:
        raise FileNotFoundError(f"libtvm_runtime.so not found beside {tvm.__file__}")
    return path


def compile_cuda_with_nvcc(source: str, target, arch, target_format: str = "cubin") -> bytes:
    """Compile CUDA source with nvcc into ``target_format`` (``cubin``, ``fatbin``, ``ptx``). ``arch``: ``"sm_90a"``
    or an explicit nvcc flag list (``["-gencode", "arch=compute_90a,code=sm_90a"]``). 0.27's wrapper needs a CUDA
    target in scope: ``target`` is entered here, or None when the caller is already inside ``with target:``
    (TVM's compile callback)."""
    arch = arch if isinstance(arch, str) else list(arch)
    with target if target is not None else contextlib.nullcontext():
        return bytes(_nvcc.compile_cuda(source, target_format=target_format, arch=arch, compiler="nvcc"))


@contextlib.contextmanager
def cuda_compile_callback(callback):
    """Within the block, TVM turns generated CUDA source into device code with ``callback(code) -> bytes``;
    the previous callback is restored afterwards."""
    previous = tvm_ffi.get_global_func(CUDA_COMPILE_CALLBACK, allow_missing=True)
    tvm_ffi.register_global_func(CUDA_COMPILE_CALLBACK, callback, override=True)
    try:
        yield
    finally:
        if previous is not None:
            tvm_ffi.register_global_func(CUDA_COMPILE_CALLBACK, previous, override=True)


# ------------------------------------------------------------------------------------------ tuning
# For tvm_paged.tuning: specializing a kernel to one workload, and the MetaSchedule, TensorIR-schedule and RPC
# names its glue (tuning/ms_glue.py, tuning/search.py) builds on. Those are resolved on first use (``__getattr__``
# below): TVM's RPC tracker needs tornado (the ``tune`` extra), and nothing but the tuner uses any of them.


def specialize(func, dims: dict | None, scalars: dict | None = None):
    """``func`` with its symbolic shape variables fixed (``dims``: variable name -> int, e.g. ``{"B": 8}``; None
    keeps every shape symbolic) and its scalar parameters bound (``scalars``: parameter name -> value); those
    parameters disappear from the signature. A tensor parameter whose shape holds an expression (``B + 1``) is left
    to follow from the others."""
    scalars = scalars or {}
    pmap = {}
    for p in func.params:
        ty = getattr(p, "ty", None)
        if isinstance(ty, tirx.buffer.BufferType):
            if dims is None:
                continue
            if not all(isinstance(s, (tirx.Var, tirx.IntImm)) for s in ty.shape):
                continue
            shape = []
            for s in ty.shape:
                if isinstance(s, tirx.Var):
                    if s.name not in dims:
                        raise KeyError(f"specialize: no value for the symbolic dimension {s.name!r} of {p}")
                    s = tirx.IntImm(str(s.ty.dtype), int(dims[s.name]))
                shape.append(s)
            pmap[p] = tirx.decl_buffer(shape, ty.dtype, name=str(p), data_alignment=int(ty.data_alignment),
                                       elem_offset=ty.elem_offset, offset_factor=int(ty.offset_factor))
        elif str(p) in scalars:
            pmap[p] = tirx.const(scalars[str(p)], str(p.ty.dtype))
    return func.specialize(pmap)


_META_SCHEDULE = "tvm.s_tir.meta_schedule"


def meta_schedule():
    """TVM's MetaSchedule package (``tvm.s_tir.meta_schedule``)."""
    return _importlib.import_module(_META_SCHEDULE)


# name -> (module, attribute): what the tuner's MetaSchedule glue subclasses or constructs, TensorIR's schedule
# and trace, and TVM's RPC tracker and server (each starts a subprocess: ``.terminate()``).
_LAZY = {
    "derived_object": ("tvm.ir.utils", "derived_object"),  # makes a Python subclass of a TVM object usable by C++
    "MeasureCallback": (_META_SCHEDULE + ".measure_callback", "MeasureCallback"),
    "PyMeasureCallback": (_META_SCHEDULE + ".measure_callback", "PyMeasureCallback"),
    "PyRunner": (_META_SCHEDULE + ".runner", "PyRunner"),
    "LocalRunnerFuture": (_META_SCHEDULE + ".runner", "LocalRunnerFuture"),
    "Schedule": ("tvm.s_tir", "Schedule"),
    "Trace": ("tvm.s_tir", "Trace"),
    "Tracker": ("tvm.rpc.tracker", "Tracker"),
    "Server": ("tvm.rpc.server", "Server"),
}


def __getattr__(name: str):
    """A name of ``_LAZY``, imported on first access and kept (module ``__getattr__``, PEP 562)."""
    try:
        module, attr = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    value = globals()[name] = getattr(_importlib.import_module(module), attr)
    return value


def empty(shape, dtype: str, dev):
    """An uninitialized tensor on ``dev`` (a local or an RPC session's device)."""
    return tvm.runtime.empty(tuple(int(s) for s in shape), dtype, dev)


def save_json(obj) -> str:
    """TVM's JSON serialization of an IR object (an IRModule)."""
    return tvm.ir.save_json(obj)


def load_json(text: str):
    return tvm.ir.load_json(text)


def lower_for_inspection(func, target):
    """(host TIR as TVMScript text, CUDA source) of ``func`` built for a CUDA target, host left uncompiled.
    Lets tests read the launches and emulate the device code without a GPU."""
    mod = tvm.tirx.transform.BindTarget(target)(tvm.IRModule.from_expr(func))
    pipeline, _, finalize_device = tvm.tirx.get_default_tir_pipeline(target)
    host, devices = split_host_device_mods(pipeline(mod))
    ((dev_target, dev_mod),) = devices.items()
    return host.script(), codegen_build(finalize_device()(dev_mod), dev_target).inspect_source("cuda")
