"""The CPU's arithmetic roof, measured with kernels TVM compiles for the local target (the same code generator the
attention kernels go through), on every core:

- ``fma``: float32 fused multiply-adds on the widest vectors the target has (16 lanes on AVX-512, 8 on AVX2, 4 on
  NEON), enough independent accumulator chains to cover the FMA latency, everything in registers. 2 FLOP per
  lane per FMA.

- ``amx``: AMX-BF16 tile products (``tdpbf16ps``: 16 x 16 float32 accumulators += 16 x 32 by 32 x 16
  bfloat16, 16384 FLOP each) into four independent accumulator tiles, operands held in tiles, on every core;
  only where the target has ``amx-bf16``.

AVX512-BF16's ``vdpbf16ps`` (bfloat16 pair dot products on vector registers) is not measured: TVM 0.27's bfloat16
legalization (always on for LLVM targets) turns every bfloat16 value into a float32 before code generation, so
``T.call_llvm_pure_intrin`` passes ``<32 x float>`` where ``llvm.x86.avx512bf16.dpbf16ps.512`` takes
``<32 x bfloat>`` and LLVM's verifier rejects the module
(``tests/test_build.py::test_tvm_cannot_feed_bfloat16_vectors_to_llvm`` keeps that fact checked). AMX's
register-numbered intrinsics take memory addresses and tile numbers, no bfloat16 values, so they escape it.

Used by ``tools/bench_prefill.py`` (prefill is judged against the FMA roof) and runnable alone::

    python tools/compute_roof.py
"""

from __future__ import annotations

import functools
import time

import numpy as np

from tvm_paged import targets
from tvm_paged import tvm_compat as tc
from tvm_paged.tvm_compat import AMX, T


def _fma_func(threads: int, chains: int, lanes: int):
    @T.prim_func
    def fma(a: T.Buffer((threads, chains, lanes), "float32", align=4), b: T.Buffer((lanes,), "float32", align=4),
            c: T.Buffer((lanes,), "float32", align=4), n: T.int32):
        T.func_attr({"global_symbol": "fma", "tir.noalias": True})
        for t in T.parallel(threads):
            acc = T.alloc_buffer((chains, lanes), "float32")
            for j in T.unroll(chains):
                for lane in T.vectorized(lanes):
                    acc[j, lane] = a[t, j, lane]
            for _ in range(n):
                for j in T.unroll(chains):
                    for lane in T.vectorized(lanes):
                        acc[j, lane] = acc[j, lane] * b[lane] + c[lane]
            for j in T.unroll(chains):
                for lane in T.vectorized(lanes):
                    a[t, j, lane] = acc[j, lane]

    return fma


# Buffers are aligned to their element size only (numpy's arrays are not 64-byte aligned).


def _time(fn, args, n_iters: int, repeat: int) -> float:
    fn(*args, 1)
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn(*args, n_iters)
        best = min(best, time.perf_counter() - start)
    return best


@functools.lru_cache(maxsize=None)
def _fma_kernel():
    """The compiled FMA kernel for the local target and its arguments (built once per process: the benchmarks
    take the roof every round)."""
    target = targets.local_target()
    lanes = targets.cpu_vector_lanes(target)
    # Independent accumulators (the FMA latency times its ports is about 8 here); a local buffer stays in registers
    # only below TVM's 1 KiB stack-buffer limit, so 12 vectors of 16 lanes at most.
    chains = 12 if lanes == 16 else 10
    threads = tc.allowed_cores()
    fn = tc.compile_module(_fma_func(threads, chains, lanes), target).mod["fma"]
    rng = np.random.default_rng(0)
    a = tc.from_numpy(rng.standard_normal((threads, chains, lanes), dtype=np.float32))
    b = tc.from_numpy(np.full(lanes, 0.999, np.float32))
    c = tc.from_numpy(np.full(lanes, 1e-3, np.float32))
    return fn, (a, b, c), {"lanes": lanes, "chains": chains, "threads": threads}


def fma_roof(repeat: int = 5, n_iters: int = 2_000_000) -> dict:
    """``{"gflops", "lanes", "chains", "threads"}``: float32 FMA throughput of every core (best of ``repeat``)."""
    fn, args, shape = _fma_kernel()
    secs = _time(fn, args, n_iters, repeat)
    return {"gflops": 2 * shape["lanes"] * shape["chains"] * shape["threads"] * n_iters / secs / 1e9, **shape}


def _amx_func(threads: int):
    @T.prim_func
    def amx(a: T.Buffer((16, 32), "uint16"), b: T.Buffer((16, 32), "uint16"), c: T.Buffer((threads, 4, 16, 16),
            "float32"), n: T.int32):
        T.func_attr({"global_symbol": "amx", "tir.noalias": True})
        AMX.request_permission()
        for t in T.parallel(threads):
            cfg = T.alloc_buffer((64,), "uint8")
            AMX.configure_full(cfg, 6)
            for j in T.unroll(4):
                AMX.zero(j)
            AMX.load(4, T.address_of(a[0, 0]), 64)
            AMX.load(5, T.address_of(b[0, 0]), 64)
            for _ in range(n):
                for j in T.unroll(4):
                    AMX.dot_bf16(j, 4, 5)
            for j in T.unroll(4):
                AMX.store(j, T.address_of(c[t, j, 0, 0]), 64)
            AMX.release()

    return amx


@functools.lru_cache(maxsize=None)
def _amx_kernel():
    threads = tc.allowed_cores()
    fn = tc.compile_module(_amx_func(threads), targets.local_target()).mod["amx"]
    # Small bfloat16 values (0.001 = 0x3A83) keep the accumulators finite over the run.
    a = tc.from_numpy(np.full((16, 32), 0x3A83, np.uint16))
    b = tc.from_numpy(np.full((16, 32), 0x3A83, np.uint16))
    c = tc.from_numpy(np.zeros((threads, 4, 16, 16), np.float32))
    return fn, (a, b, c), threads


def amx_roof(repeat: int = 5, n_iters: int = 200_000) -> dict | None:
    """``{"gflops", "threads"}``: AMX-BF16 tile-product throughput of every core, or None without ``amx-bf16``."""
    if not targets.cpu_has_feature("amx-bf16", targets.local_target()):
        return None
    fn, args, threads = _amx_kernel()
    secs = _time(fn, args, n_iters, repeat)
    return {"gflops": 2 * 16 * 16 * 32 * 4 * threads * n_iters / secs / 1e9, "threads": threads}


def main() -> None:
    fma = fma_roof()
    print(f"float32 FMA roof: {fma['gflops']:.1f} GFLOP/s ({fma['threads']} cores, {fma['lanes']} lanes, "
          f"{fma['chains']} chains)")
    amx = amx_roof()
    if amx is not None:
        print(f"AMX-BF16 roof: {amx['gflops']:.1f} GFLOP/s ({amx['threads']} cores)")


if __name__ == "__main__":
    main()
