"""The one module that spells Apache TVM's moving API names.

TVM 0.27 renamed ``tvm.tir`` to ``tvm.tirx``, moved schedulable TIR to ``tvm.s_tir`` and dropped
``tvm.nd``. Everything else in tvm_paged imports TVM through the names below, so the next rename is a
one-file change. Importing this module also sizes TVM's CPU thread pool (see ``_size_thread_pool``).
"""

from __future__ import annotations

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


def size_thread_pool(num_threads: int | None = None) -> int:
    """(Re)size TVM's CPU thread pool; defaults to every core this process may use."""
    n = num_threads or _allowed_cores()
    tvm.get_global_func("runtime.config_threadpool")(0, n)
    return n
