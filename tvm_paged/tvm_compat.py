"""The one module that spells Apache TVM's moving API names.

TVM 0.27 renamed ``tvm.tir`` to ``tvm.tirx``, moved schedulable TIR to ``tvm.s_tir`` and dropped
``tvm.nd``. Everything else in tvm_paged imports TVM through the names below, so the next rename is a
one-file change. Importing this module also sizes TVM's CPU thread pool (see ``_size_thread_pool``).
"""

from __future__ import annotations

import contextlib as _contextlib
import logging as _logging
import os


def _allowed_cores() -> int:
    """Cores this process may run on (cgroup/affinity aware), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


# TVM's runtime thread pool was seen starting with a single worker on 2-core VMs unless told otherwise.
# The variable must be set before the pool is first used; a user's own setting wins.
os.environ.setdefault("TVM_NUM_THREADS", str(_allowed_cores()))

import tvm  # noqa: E402
import tvm_ffi  # noqa: E402
from tvm import tirx  # noqa: E402
from tvm.script import tirx as T  # noqa: E402  (TVMScript: T.prim_func, T.parallel, ...)
from tvm.target import Target  # noqa: E402
from tvm.target import codegen as _codegen  # noqa: E402

TVM_VERSION: str = tvm.__version__
FFI_VERSION: str = getattr(tvm_ffi, "__version__", "unknown")

__all__ = [
    "T",
    "tirx",
    "tvm",
    "Target",
    "TVM_VERSION",
    "FFI_VERSION",
    "allowed_cores",
    "host_cpu",
    "host_triple",
    "compile_module",
    "load_module",
    "cpu_device",
    "cuda_device",
    "prefetch",
    "size_thread_pool",
]

allowed_cores = _allowed_cores


def host_cpu() -> str:
    """LLVM's name for this machine's CPU (e.g. ``znver3``), the ``mcpu`` a local target needs."""
    return str(_codegen.llvm_get_system_cpu())


def host_triple() -> str:
    return str(_codegen.llvm_get_system_triple())


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


def prefetch(address):
    """A TIR statement that prefetches one cache line for reading (locality 1). 0.27 has no T.prefetch."""
    return T.evaluate(T.call_intrin("void", "tirx.prefetch", address, 0, 1, 1))


def shape_var(name: str):
    """A fresh symbolic int64 dimension named ``name`` (a kernel's batch, pool size, ...)."""
    return tirx.Var(name, "int64")


def runtime_num_threads() -> int:
    """Workers in TVM's CPU thread pool."""
    return int(tvm.get_global_func("runtime.NumThreads")())


def size_thread_pool(num_threads: int | None = None) -> int:
    """(Re)size TVM's CPU thread pool; defaults to every core this process may use."""
    n = num_threads or _allowed_cores()
    tvm.get_global_func("runtime.config_threadpool")(0, n)
    return n


# ----------------------------------------------------------------------------------- export and load
# Appended for tvm_paged.export / tvm_paged.loader: shipping compiled libraries, cross compiling, and
# compiling CUDA device code to a binary on a machine with no GPU.
import contextlib  # noqa: E402
import re as _re  # noqa: E402
from pathlib import Path as _Path  # noqa: E402

CUDA_COMPILE_CALLBACK = "tvm_callback_cuda_compile"
# What the CUDA runtime plugin registers: deserializing a CUDA module from a library needs the first; turning
# generated CUDA source into an embedded binary at build time needs the second.
_CUDA_LOADER = "ffi.Module.load_from_bytes.cuda"
_CUDA_CREATOR = "ffi.Module.create.cuda"


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
    from tvm.support import cc as _cc  # noqa: PLC0415

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


def nvcc_fatbin(code: str, gencode: list[str]) -> bytes:
    """Compile CUDA source with nvcc into a fatbin for the explicit ``-gencode`` list (needs a CUDA target in
    scope: ``with target:``)."""
    from tvm.support import nvcc as _nvcc  # noqa: PLC0415

    return bytes(_nvcc.compile_cuda(code, target_format="fatbin", arch=list(gencode), compiler="nvcc"))


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
# Appended for tvm_paged.tune / tvm_paged.tuning: specializing a kernel to one workload, MetaSchedule's parts
# and TVM's RPC tracker and server. MetaSchedule is imported on first use only: it is slow to import and nothing
# but the tuner needs it.


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


def meta_schedule():
    """TVM's MetaSchedule package (``tvm.s_tir.meta_schedule``)."""
    from tvm.s_tir import meta_schedule as _ms  # noqa: PLC0415

    return _ms


_DEVNULL = None


@_contextlib.contextmanager
def meta_schedule_logging(quiet: bool = False):
    """Around a ``tune_tir`` call: MetaSchedule 0.27 rebuilds its logging config from the names of its logger's
    handlers and fails (``'NoneType' object has no attribute 'format'``) when one has no name, as the capture
    handlers pytest attaches do after a first run in the same process. Unnamed handlers are detached for the call
    and put back after. ``quiet``: its console log (a task table per round, on stdout) is dropped; the log files
    in the work directory keep everything."""
    logger = _logging.getLogger("tvm.s_tir.meta_schedule")
    unnamed = [h for h in logger.handlers if h.get_name() is None]
    for h in unnamed:
        logger.removeHandler(h)
    try:
        if quiet:
            # Kept open: MetaSchedule's console handler holds on to the stream it was configured with, and its
            # runner and builder log through it again when the next bucket starts.
            global _DEVNULL
            if _DEVNULL is None:
                _DEVNULL = open(os.devnull, "w")  # noqa: SIM115
            with _contextlib.redirect_stdout(_DEVNULL):
                yield
        else:
            yield
    finally:
        for h in unnamed:
            logger.addHandler(h)


def measure_callbacks(on_results):
    """MetaSchedule's default measure callbacks plus one that calls ``on_results(run_secs)`` after each batch of
    measurements: one list of seconds per candidate (empty when the candidate failed)."""
    from tvm.ir.utils import derived_object  # noqa: PLC0415
    from tvm.s_tir.meta_schedule.measure_callback import MeasureCallback, PyMeasureCallback  # noqa: PLC0415

    @derived_object
    class _Results(PyMeasureCallback):
        def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results):
            on_results([[float(x) for x in (r.run_secs or [])] if r.error_msg is None else []
                        for r in runner_results])

    return [*MeasureCallback.create("default"), _Results()]


def evolutionary_search(population: int = 512):
    """MetaSchedule's evolutionary search strategy keeping ``population`` candidates per round (the sample of
    random initial candidates shrinks with it)."""
    ms = meta_schedule()
    return ms.search_strategy.EvolutionarySearch(population_size=population,
                                                 init_min_unmeasured=min(50, population))


def python_runner(measure):
    """A MetaSchedule runner that calls ``measure(artifact_path) -> list of seconds`` for each built candidate
    in this process (an exception is the candidate's error): for measuring by other means than TVM's runners."""
    from tvm.ir.utils import derived_object  # noqa: PLC0415
    from tvm.s_tir.meta_schedule.runner import LocalRunnerFuture, PyRunner  # noqa: PLC0415

    @derived_object
    class _Runner(PyRunner):
        def run(self, runner_inputs):
            futures = []
            for ri in runner_inputs:
                try:
                    secs, err = [tvm.tirx.FloatImm("float64", float(x)) for x in measure(ri.artifact_path)], None
                except Exception as e:  # noqa: BLE001  (reported as the candidate's failure)
                    secs, err = None, f"{type(e).__name__}: {e}"
                futures.append(LocalRunnerFuture(secs, err))
            return futures

    return _Runner()


def empty_trace():
    """A schedule trace with no instructions: the record of a kernel measured exactly as its builder wrote it."""
    from tvm.s_tir import Trace  # noqa: PLC0415

    return Trace([], {})


def schedule(mod, seed: int | None = None):
    """A TensorIR schedule of ``mod`` (MetaSchedule measure candidates carry one); ``seed`` (>= 1) fixes the
    random decisions its sampling instructions take."""
    from tvm.s_tir import Schedule  # noqa: PLC0415

    return Schedule(mod) if seed is None else Schedule(mod, seed=seed)


def apply_postprocs(sch, target) -> list[str]:
    """Apply MetaSchedule's postprocessors for ``target``'s kind to ``sch`` in place, as its search does to each
    candidate (CUDA: cooperative fetch, unbound blocks, unroll, reduction blocks, GPU code verification); returns
    the names of those that rejected it (empty: a valid candidate)."""
    ms = meta_schedule()
    kind = "cuda" if target.kind.name == "cuda" else "llvm"
    ctx = ms.TuneContext(mod=sch.mod, target=target, task_name="postprocess", space_generator=ms.space_generator.
                         ScheduleFn(lambda _sch: None, sch_rules=[], postprocs=kind, mutator_probs=kind))
    return [type(p).__name__ for p in ctx.space_generator.postprocs if not p.apply(sch)]


def rpc_tracker(host: str = "127.0.0.1", port: int = 9190, port_end: int = 9199, silent: bool = True):
    """Start an RPC tracker in a subprocess (``.host``, ``.port``, ``.terminate()``); needs ``tornado``."""
    from tvm.rpc.tracker import Tracker  # noqa: PLC0415

    return Tracker(host, port=port, port_end=port_end, silent=silent)


def rpc_server(tracker_host: str, tracker_port: int, key: str, host: str = "127.0.0.1", port: int = 9091,
               port_end: int = 9199, silent: bool = True):
    """Start an RPC server in a subprocess, registered with a tracker under ``key`` (``.terminate()``)."""
    from tvm.rpc.server import Server  # noqa: PLC0415

    return Server(host, port=port, port_end=port_end, tracker_addr=(tracker_host, tracker_port), key=key,
                  silent=silent)


def device(kind: str, index: int = 0):
    """A runtime device by name (``"cpu"``, ``"cuda"``)."""
    return tvm.runtime.device(kind, index)


def empty(shape, dtype: str, dev):
    """An uninitialized tensor on ``dev`` (a local or an RPC session's device)."""
    return tvm.runtime.empty(tuple(int(s) for s in shape), dtype, dev)


def signature_only(func, attrs: dict):
    """``func``'s signature (parameters, buffers) with an empty body and extra attributes: a compact stand-in
    for a kernel in a MetaSchedule database (a full kernel serializes to hundreds of KB there)."""
    return func.with_body(tirx.Evaluate(0)).with_attrs(attrs)


def float_imm(value: float, dtype: str = "float64"):
    return tirx.FloatImm(dtype, float(value))


def compact_workload_file(path) -> None:
    """Rewrite a MetaSchedule ``database_workload.json`` without the indentation TVM serializes each module
    with (about half its size; the tuning logs are committed). Each line is ``[hash, base64(8-byte little-endian
    length + JSON)]``; a line in another format is kept as it is. Written to a temporary file, then renamed."""
    import base64  # noqa: PLC0415
    import json  # noqa: PLC0415
    import os  # noqa: PLC0415
    import struct  # noqa: PLC0415

    path = _Path(path)
    if not path.exists():
        return
    lines = []
    for line in path.read_text().splitlines():
        try:
            key, blob = json.loads(line)
            raw = base64.b64decode(blob)
            (size,) = struct.unpack("<Q", raw[:8])
            body = json.dumps(json.loads(raw[8:8 + size]), separators=(",", ":")).encode()
            line = json.dumps([key, base64.b64encode(struct.pack("<Q", len(body)) + body).decode()])
        except (ValueError, TypeError, struct.error):
            pass
        lines.append(line)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(ln + "\n" for ln in lines))
    os.replace(tmp, path)


def save_json(obj) -> str:
    """TVM's JSON serialization of an IR object (an IRModule)."""
    return tvm.ir.save_json(obj)


def load_json(text: str):
    return tvm.ir.load_json(text)


def lower_for_inspection(func, target):
    """(host TIR as TVMScript text, CUDA source) of ``func`` built for a CUDA target, host left uncompiled.
    Lets tests read the launches and emulate the device code without a GPU."""
    from tvm.tirx.build import codegen_build, split_host_device_mods  # noqa: PLC0415

    mod = tvm.tirx.transform.BindTarget(target)(tvm.IRModule.from_expr(func))
    pipeline, _, finalize_device = tvm.tirx.get_default_tir_pipeline(target)
    host, devices = split_host_device_mods(pipeline(mod))
    ((dev_target, dev_mod),) = devices.items()
    return host.script(), codegen_build(finalize_device()(dev_mod), dev_target).inspect_source("cuda")


def compile_cuda_with_nvcc(source: str, target, arch: str, target_format: str = "cubin") -> bytes:
    """nvcc-compile CUDA source for ``arch`` (needs the target in scope in 0.27)."""
    from tvm.support import nvcc  # noqa: PLC0415

    with target:
        return bytes(nvcc.compile_cuda(source, target_format=target_format, arch=arch, compiler="nvcc"))
