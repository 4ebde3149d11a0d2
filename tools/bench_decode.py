#!/usr/bin/env python
"""Decode benchmark: tvm_paged against the peers on the same inputs, DRAM-honest.

Cases (fp32 and fp16; 32 query heads, 8 KV heads, head_dim 128, page 16, fragmented page tables):
batch 8 x 1024 tokens and batch 1 x 16384 tokens. Rows, all in one process:
- tvm_paged with its default schedule, with the committed tuned schedule when one exists, and with the default
  changed by each ``--knobs`` dict (A/B rows timed in the same rounds);
- torch: gather each sequence's pages, then scaled_dot_product_attention;
- TVM/MLC-LLM's shipped CPU paged decode kernel (tvm.relax.frontend.nn.llm), on the same pages in its layout;
- the machine's read bandwidth: a reduction (torch.sum on every core) over an array of the pools' size: at least
  4x the last-level cache the OS reports (and 512 MB), within a quarter of the memory available;
- with ``--hand-c`` (CPU, needs a C compiler): tools/hand_decode.c (float16 and float32), the same algorithm
  hand-written with AVX2 intrinsics, as a ceiling for what the TensorIR kernel could reach on this CPU; and
  tools/page_walk.c, read-only passes over the same pages in table order (plain, with every line of the
  next block prefetched as the kernels do, and with only each 4 KB's first line prefetched): the rates these
  fragmented pages can be read at with no arithmetic.
Each timed call rotates through page tables over a pool several times larger than the last-level cache, and
the bandwidth roof is taken in rounds interleaved with the kernels (it swings from round to round on a shared
VM), with the row order alternating between rounds; each row reports its median time and its median
fraction of the same round's roof.

``--device cuda`` runs the same rows on the GPU (TVM/MLC's CUDA decode kernel in place of its CPU one): the
roof is then a reduction over a 4 GB array on the GPU, the device-to-device copy rate (bytes read plus
written) is printed beside it, the pool is sized against the GPU's L2, and a call's time is the mean of many
back-to-back calls between two synchronizations (Python launch overhead included, as a serving loop sees it).
``b64x4k`` (batch 64 x 4096 tokens) is a case long enough that launch overhead does not count.

    python tools/bench_decode.py [--dtypes float32,float16] [--rounds 5] [--cases b8,b1x16k] [--no-mlc] [--hand-c]
                                 [--knobs '{"prefetch": "kv"}' ...]
    python tools/bench_decode.py --device cuda --cases b8,b1x16k,b64x4k
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import json
import os
import statistics
import subprocess
import tempfile
import time

import torch

from tvm_paged import build, hostinfo, ops, reference, targets, tuned_knobs
from tvm_paged.config import KernelConfig
from tvm_paged.tuning.measure import read_rate
from tvm_paged.tvm_compat import allowed_cores, compile_module, cpu_has_feature, host_cpu, runtime_library

HQ, HKV, D, PAGE = 32, 8, 128, 16
# ISA features named on the machine line (those LLVM reports for the local target).
FEATURES = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512fp16", "avx512bf16", "amx-tile",
            "amx-bf16", "neon", "fullfp16")
CASES = {"b8": (8, 1024), "b1x16k": (1, 16384), "b64x4k": (64, 4096), "b8x4k": (8, 4096)}
# Sequences checked against the float64 reference before timing (the reference is slow at batch 64).
CHECKED_SEQS = 4


def last_level_cache(device) -> int:
    """The GPU's L2, or the CPU's last-level cache as the OS reports it."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).L2_cache_size)
    return hostinfo.last_level_cache_bytes() or hostinfo.FALLBACK_CACHE_BYTES


def pool_bytes(device) -> int:
    """What each case's pool (and the CPU roof's array) spans: DRAM-honest for this machine (a GPU: 4x its L2)."""
    if device.type == "cuda":
        return 4 * last_level_cache(device)
    return hostinfo.dram_pool_bytes()


def machine_line(device) -> str:
    """The CPU by name, its LLVM name and features, the cache size the pools are sized from."""
    target = targets.local_target()
    features = [f for f in FEATURES if cpu_has_feature(f, target)]
    llc = hostinfo.last_level_cache_bytes()
    return (f"machine: {hostinfo.cpu_model_name() or 'unknown CPU'}, {allowed_cores()} cores, LLVM {host_cpu()} "
            f"({' '.join(features) or 'no SIMD features found'}), last-level cache "
            f"{'%d MB' % (llc >> 20) if llc else 'not reported'}, pools and roof array "
            f"{pool_bytes(device) >> 20} MB; torch {torch.__version__}")


def target_of(device):
    """The compile target for ``device``: the local CPU, or the GPU's own architecture."""
    return targets.target_for_device(device) or targets.local_target()


def make_inputs(batch, length, dtype, device, copies_over_cache=4, seed=0, item_bytes=None):
    """A pool of at least ``copies_over_cache`` copies of the working set that spans :func:`pool_bytes`, and one
    disjoint table per copy. ``item_bytes``: the bytes per element the pool will be stored in (an 8-bit cache
    made from these values needs twice the copies to span the same bytes)."""
    torch.manual_seed(seed)
    pages = length // PAGE
    work = 2 * batch * length * HKV * D * (item_bytes or dtype.itemsize)
    copies = max(copies_over_cache, -(-pool_bytes(device) // work))
    num_pages = batch * pages * copies
    k = torch.randn(num_pages, PAGE, HKV, D, dtype=dtype, device=device)
    v = torch.randn(num_pages, PAGE, HKV, D, dtype=dtype, device=device)
    perm = torch.randperm(num_pages).int()
    tables = [perm[i * batch * pages:(i + 1) * batch * pages].view(batch, pages).contiguous().to(device)
              for i in range(copies)]
    seq_lens = torch.full((batch,), length, dtype=torch.int32, device=device)
    q = torch.randn(batch, HQ, D, dtype=dtype, device=device)
    return q, k, v, tables, seq_lens


def tvm_paged_runner(cfg, q, k, v, tables, seq_lens, knobs):
    fn = build.compile_kernel(cfg, target_of(q.device), knobs=knobs).mod[cfg.name]
    plans = [ops.plan_decode(t, seq_lens, page_size=PAGE, num_pages=k.shape[0]) for t in tables]
    batch, splits = q.shape[0], plans[0].num_splits
    out = torch.empty_like(q)
    lse = torch.empty(batch, HQ, device=q.device)
    o_part = torch.empty(batch, splits, HQ, D, device=q.device)
    ms_part = torch.empty(batch, splits, HQ, 2, device=q.device)

    def run(i):
        p = plans[i % len(plans)]
        fn(q, k, v, p.block_table, p.seq_lens, out, lse, o_part, ms_part, D ** -0.5, 0)
        return out

    return run


def torch_runner(q, k, v, tables, seq_lens):
    batch, length = q.shape[0], int(seq_lens[0])

    def run(i):
        t = tables[i % len(tables)].long()
        kk = k[t].view(batch, length, HKV, D).transpose(1, 2)
        vv = v[t].view(batch, length, HKV, D).transpose(1, 2)
        o = torch.nn.functional.scaled_dot_product_attention(q[:, :, None], kk, vv, enable_gqa=True)
        return o[:, :, 0]

    return run


@functools.lru_cache(maxsize=None)
def native_library(name, defines=()):
    """Build ``tools/<name>.c`` once per process and set of ``defines`` (macro names) with the system C compiler
    (for this CPU, linked to TVM's runtime for its thread pool) and load it."""
    src = os.path.join(os.path.dirname(os.path.abspath(__file__)), f"{name}.c")
    lib_path = os.path.join(tempfile.mkdtemp(prefix="tvm_paged_bench_"), f"{name}.so")
    rt = runtime_library()
    subprocess.run([os.environ.get("CC", "cc"), "-O3", "-march=native", *(f"-D{d}" for d in defines), "-shared",
                    "-fPIC", src, "-o", lib_path, str(rt), f"-Wl,-rpath,{rt.parent}"], check=True)
    return ctypes.CDLL(lib_path)


def native_function(name, symbol, argtypes, defines=()):
    """Function ``symbol`` of ``tools/<name>.c`` (see ``native_library``), taking ``argtypes`` (ctypes types)."""
    fn = getattr(native_library(name, tuple(defines)), symbol)
    fn.argtypes = argtypes
    return fn


WALK_PREFETCH = {"none": 0, "lines": 1, "4k-starts": 2}


def page_walk_runner(k, v, tables, prefetch="none"):
    """``tools/page_walk.c``: a read-only pass over the same pages in table order, on TVM's thread pool: the
    rate these fragmented tables can be read at, with no arithmetic. ``prefetch`` (``WALK_PREFETCH``): "none"
    leaves it to the hardware; "lines" also asks in software for every line of the next block ahead, as the
    kernels do; "4k-starts" asks only for the first line of each 4 KB of the next block, which starts the
    hardware's stream prefetcher there (on a Zen 3 EPYC the fastest of the three in most runs, median 1.04x the
    plain walk, so the plain walk is not a ceiling). ``run(i)`` returns the sum of everything read (the caches'
    bytes taken as float32), for a test; the benchmark does not check it."""
    if prefetch not in WALK_PREFETCH:
        raise ValueError(f"prefetch must be one of {sorted(WALK_PREFETCH)}, got {prefetch!r}")
    i32, ptr = ctypes.c_int, ctypes.c_void_p
    walk = native_function("page_walk", "walk", [i32, i32, i32, ctypes.c_long, ptr, ptr, ptr, ptr, i32])
    sums = torch.zeros(256)  # one per worker of TVM's pool
    page_bytes = k[0].numel() * k.element_size()

    def run(i):
        t = tables[i % len(tables)]
        sums.zero_()
        walk(t.shape[0], t.shape[1], t.shape[1], page_bytes, k.data_ptr(), v.data_ptr(), t.data_ptr(),
             sums.data_ptr(), WALK_PREFETCH[prefetch])
        return sums.sum()

    return run


def hand_c_runner(q, k, v, tables, seq_lens):
    """``tools/hand_decode.c`` (float16 or float32 K/V and q, on this CPU only): the same algorithm as
    tvm_paged's CPU decode written by hand with AVX2 intrinsics, built with the system C compiler, run on TVM's
    thread pool. The splits are merged in torch inside the call, as tvm_paged's kernel merges them inside its
    own."""
    if not (q.dtype == k.dtype == v.dtype and q.dtype in (torch.float16, torch.float32)):
        raise ValueError(f"the hand-written decode takes float16 or float32 q, k and v, got {q.dtype}, {k.dtype}, "
                         f"{v.dtype}")
    i32, ptr = ctypes.c_int, ctypes.c_void_p
    decode = native_function("hand_decode", "decode",
                             [i32, i32, ptr, ptr, ptr, ptr, i32, ptr, ptr, ptr, ctypes.c_float],
                             defines=("KV_F32",) if q.dtype == torch.float32 else ())
    plans = [ops.plan_decode(t, seq_lens, page_size=PAGE, num_pages=k.shape[0]) for t in tables]
    batch, splits = q.shape[0], plans[0].num_splits
    o_part = torch.empty(batch, splits, HQ, D)
    lse_part = torch.empty(batch, splits, HQ)

    def run(i):
        p = plans[i % len(plans)]
        decode(batch, splits, q.data_ptr(), k.data_ptr(), v.data_ptr(), p.block_table.data_ptr(),
               p.block_table.shape[1], p.seq_lens.data_ptr(), o_part.data_ptr(), lse_part.data_ptr(), D ** -0.5)
        if splits == 1:
            return o_part[:, 0]
        w = torch.exp2(lse_part - lse_part.amax(1, keepdim=True))  # the splits' LSEs are in the log2 domain
        return (o_part * (w / w.sum(1, keepdim=True))[..., None]).sum(1)

    return run


def mlc_runner(q, k, v, tables, seq_lens, dtype_name):
    """TVM's own paged decode (MLC-LLM; its CPU or its CUDA kernel): pages [num_pages, 2, num_kv_heads,
    page_size, head_dim], CSR table."""
    from tvm.relax.frontend.nn.llm import _decode_kernels as mlc

    device = q.device
    target = target_of(device)
    if device.type == "cuda":
        func, symbol = mlc._attention_decode(HKV, HQ, D, dtype_name, False, {}, target, PAGE), "batch_decode_paged_kv"
    else:
        func, symbol = mlc._attention_decode_cpu(HKV, HQ, D, dtype_name, False, {}, PAGE), "batch_decode_paged_kv_cpu"
    target = targets.with_host(target)
    with target:
        fn = compile_module(func, target).mod[symbol]
    pages = torch.stack([k.transpose(1, 2), v.transpose(1, 2)], dim=1).contiguous()
    batch, length = q.shape[0], int(seq_lens[0])
    n = length // PAGE
    indptr = torch.arange(0, batch * n + 1, n, dtype=torch.int32, device=device)
    last = torch.full((batch,), PAGE, dtype=torch.int32, device=device)
    zeros = torch.zeros(batch, dtype=torch.int32, device=device)
    out = torch.empty_like(q)
    lse = torch.empty(batch, HQ, device=device)

    def run(i):
        values = tables[i % len(tables)].flatten().contiguous()
        fn(q, pages, indptr, values, last, zeros, zeros, out, lse, 0, 1.0, 1e4, D ** -0.5)
        return out

    return run


def reference_rows(q, k, v, table, seq_lens, n):
    """The float64 reference for the first ``n`` sequences, copying only their pages to the host."""
    pages = table[:n].flatten().long().unique()
    local = torch.searchsorted(pages, table[:n].long()).int()
    ref, _ = reference.decode(q[:n], k[pages], v[pages], local, seq_lens[:n])
    return ref


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(buf):
    """Device-to-device copy rate, counting the bytes read and the bytes written."""
    dst = torch.empty_like(buf)
    dst.copy_(buf)
    synchronize(buf.device)
    t0 = time.perf_counter()
    for _ in range(5):
        dst.copy_(buf)
    synchronize(buf.device)
    return 2 * 5 * buf.numel() * buf.element_size() / (time.perf_counter() - t0) / 1e9


def bench_case(name, dtype, rounds, with_mlc, device, with_hand_c=False, extra_knobs=()):
    batch, length = CASES[name]
    q, k, v, tables, seq_lens = make_inputs(batch, length, dtype, device)
    bytes_kv = 2 * batch * length * HKV * D * dtype.itemsize
    cfg = KernelConfig("decode", str(dtype).split(".")[1], HQ, HKV, D, PAGE)
    gpu = device.type == "cuda"
    runners = {"tvm_paged (default)": tvm_paged_runner(cfg, q, k, v, tables, seq_lens, knobs={})}
    # The knobs a served call of this shape gets: the committed schedule's nearest bucket.
    tuned = tuned_knobs.lookup(cfg, target_of(device), batch=batch, max_pages=length // PAGE)
    if tuned is not None:
        runners["tvm_paged (tuned)"] = tvm_paged_runner(cfg, q, k, v, tables, seq_lens, knobs=tuned.knobs)
        print(f"tuned: {cfg.name} bucket {tuned.bucket[0]}x{tuned.bucket[1]}, knobs {tuned.knobs}")
    for knobs in extra_knobs:  # the default schedule with these knobs changed: A/B rows in the same rounds
        label = ", ".join(f"{key}={val}" for key, val in knobs.items())
        runners[f"tvm_paged ({label})"] = tvm_paged_runner(cfg, q, k, v, tables, seq_lens, knobs=knobs)
    runners["torch gather + SDPA"] = torch_runner(q, k, v, tables, seq_lens)
    if with_hand_c and device.type == "cpu":
        runners["hand-written AVX2 C (same algorithm)"] = hand_c_runner(q, k, v, tables, seq_lens)
    # Timed like the kernels but computes nothing to check: the read rate of these very pages.
    unchecked = set()
    if with_hand_c and device.type == "cpu":
        for prefetch, row in (("none", "read-only walk of the same pages"),
                              ("lines", "read-only walk, software prefetch"),
                              ("4k-starts", "read-only walk, 4 KB starts prefetched")):
            unchecked.add(row)
            runners[row] = page_walk_runner(k, v, tables, prefetch)
    if with_mlc:
        runners[f"TVM/MLC {'CUDA' if gpu else 'CPU'} decode"] = mlc_runner(q, k, v, tables, seq_lens, cfg.dtype)
    # Correctness of every row against the float64 reference before timing anything.
    nchk = min(batch, CHECKED_SEQS)
    ref = reference_rows(q, k, v, tables[0], seq_lens, nchk)
    tol = 1e-4 if dtype == torch.float32 else 1e-2
    for row, run in runners.items():
        if row in unchecked:
            continue
        err = (run(0)[:nchk].double().cpu() - ref).abs().max().item()
        if not err < tol:
            raise SystemExit(f"{row}: max error {err:.3g} against the float64 reference")
    print_table(f"{cfg.dtype}, batch {batch} x {length} tokens ({bytes_kv / 1e6:.0f} MB of K+V per call)",
                runners, {row: bytes_kv for row in runners}, rounds, device)


def settle_threads():
    """Wait for torch's OpenMP workers to stop spinning. After a parallel region (a sum, an SDPA call) they spin
    for a while and take the cores from whatever runs next: on a 2-core VM, 15% of a 2 ms float16 decode call
    timed right after the SDPA row. Called before every timed row and every roof."""
    time.sleep(0.3)


def print_table(title, runners, bytes_read, rounds, device):
    """Time every row in ``rounds`` rounds interleaved with the read roof (row order alternating) and print the
    table: median ms, GB/s of ``bytes_read[row]`` (the bytes that row's calls actually read) and the median
    fraction of the same round's roof."""
    gpu = device.type == "cuda"
    # CPU: an array as large as the pools; GPU: 4 GB.
    roof_buf = torch.ones((1 << 30) if gpu else pool_bytes(device) // 4, dtype=torch.float32, device=device)
    copy_rate = copy_bandwidth(roof_buf) if gpu else None
    times = {row: [] for row in runners}
    fracs = {row: [] for row in runners}
    roofs = []
    calls = 0
    order = list(runners)
    for r in range(rounds):
        roof = read_rate(roof_buf, reads=3)
        roofs.append(roof)
        # Alternate the row order between rounds.
        for row in order if r % 2 == 0 else order[::-1]:
            if not gpu:
                settle_threads()  # after the roof's sum or the SDPA row
            run = runners[row]
            reps = 100 if gpu else 3 if row.startswith("TVM/MLC") else 10
            run(calls)  # untimed: the previous row's threads settle, instruction caches warm
            calls += 1
            synchronize(device)
            t0 = time.perf_counter()
            for _ in range(reps):
                run(calls)
                calls += 1
            synchronize(device)
            dt = (time.perf_counter() - t0) / reps
            times[row].append(dt)
            fracs[row].append(bytes_read[row] / dt / 1e9 / roof)
    copy_note = f"; device-to-device copy {copy_rate:.0f} GB/s (read + written)" if copy_rate else ""
    print(f"\n{title}, read-bandwidth roof median {statistics.median(roofs):.1f} GB/s "
          f"(range {min(roofs):.1f}-{max(roofs):.1f}){copy_note}")
    print("| kernel | ms | GB/s | of roof |\n| --- | --- | --- | --- |")
    for row in runners:
        ms = statistics.median(times[row]) * 1e3
        print(f"| {row} | {ms:.3f} | {bytes_read[row] / ms / 1e6:.1f} | {100 * statistics.median(fracs[row]):.0f}% |",
              flush=True)
    del roof_buf
    return {row: statistics.median(times[row]) for row in runners}


# ============================================================================ 8-bit caches and the window
FP8 = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}


def api_runner(q, k, v, tables, seq_lens, **options):
    """tvm_paged through the public API (plans made once, as a serving loop's layers see them): the rows whose
    kernels take variant arguments. ``window_left`` goes to the plans, the rest to each run."""
    window_left = options.pop("window_left", -1)
    plans = [ops.plan_decode(t, seq_lens, page_size=PAGE, num_pages=k.shape[0], window_left=window_left)
             for t in tables]
    out = torch.empty_like(q)

    def run(i):
        return ops.run_decode(plans[i % len(plans)], q, k, v, out=out, **options)

    return run


def check_row(run, q, k, v, table, seq_lens, dtype, **options):
    """A row's first sequences against the float64 reference with the same options (8-bit caches dequantized)."""
    n = min(q.shape[0], CHECKED_SEQS)
    pages = table[:n].flatten().long().unique()
    local = torch.searchsorted(pages, table[:n].long()).int()
    ref, _ = reference.decode(q[:n], k[pages], v[pages], local, seq_lens[:n], **options)
    err = (run(0)[:n].double().cpu() - ref).abs().max().item()
    tol = 1e-4 if dtype == torch.float32 else 1e-2
    if not err < tol:
        raise SystemExit(f"max error {err:.3g} against the float64 reference ({options})")


def quantized(cache, kv_dtype, scale, pages_per_chunk=4096):
    """``cache`` as write_kv would store it in an 8-bit cache, converted a few thousand pages at a time (a
    float32 copy of a whole DRAM-sized pool would not fit)."""
    out = torch.empty(cache.shape, dtype=kv_dtype, device=cache.device)
    for p0 in range(0, cache.shape[0], pages_per_chunk):
        part = cache[p0:p0 + pages_per_chunk]
        out[p0:p0 + pages_per_chunk] = reference.quantize_kv(part.reshape(-1, HKV, D), kv_dtype,
                                                             scale.cpu()).view(part.shape).to(cache.device)
    return out


def bench_fp8(name, rounds, device):
    """float16 decode from a float16 cache against e4m3 and e5m2 caches of the same values (q and out float16),
    per-head scales, each pool DRAM-sized for its own bytes: ms per call and GB/s of the bytes actually read."""
    batch, length = CASES[name]
    runners, bytes_read = {}, {}
    q, k, v, tables, seq_lens = make_inputs(batch, length, torch.float16, device)
    runners["float16 cache"] = api_runner(q, k, v, tables, seq_lens)
    check_row(runners["float16 cache"], q, k, v, tables[0], seq_lens, torch.float16)
    bytes_read["float16 cache"] = 2 * batch * length * HKV * D * 2
    del k, v
    for tag, kv_dtype in FP8.items():
        q, k16, v16, tables, seq_lens = make_inputs(batch, length, torch.float16, device, item_bytes=1)
        scale = torch.full((HKV,), 0.05, device=device) + 0.01 * torch.arange(HKV, device=device)
        k, v = quantized(k16, kv_dtype, scale), quantized(v16, kv_dtype, scale)
        del k16, v16
        row = f"{tag} cache (per-head scales)"
        runners[row] = api_runner(q, k, v, tables, seq_lens, k_scale=scale, v_scale=scale)
        check_row(runners[row], q, k, v, tables[0], seq_lens, torch.float16, k_scale=scale, v_scale=scale)
        bytes_read[row] = 2 * batch * length * HKV * D
    return print_table(f"8-bit KV caches, q float16, batch {batch} x {length} tokens", runners, bytes_read,
                       rounds, device)


def bench_window(rounds, device, window=4096):
    """A ``window``-token sliding window over batch 8 x 16K against the full 16K context and against a plain
    ``window``-token context (float16): the window reads only its own pages."""
    runners, bytes_read = {}, {}
    q, k, v, tables, seq_lens = make_inputs(8, 16384, torch.float16, device)
    runners[f"{window // 1024}K window over 8 x 16K"] = api_runner(q, k, v, tables, seq_lens,
                                                                  window_left=window - 1)
    check_row(runners[f"{window // 1024}K window over 8 x 16K"], q, k, v, tables[0], seq_lens, torch.float16,
              window_left=window - 1)
    bytes_read[f"{window // 1024}K window over 8 x 16K"] = 2 * 8 * window * HKV * D * 2
    runners["full 8 x 16K"] = api_runner(q, k, v, tables, seq_lens)
    bytes_read["full 8 x 16K"] = 2 * 8 * 16384 * HKV * D * 2
    q4, k4, v4, tables4, seq_lens4 = make_inputs(8, window, torch.float16, device)
    runners[f"plain 8 x {window // 1024}K"] = api_runner(q4, k4, v4, tables4, seq_lens4)
    bytes_read[f"plain 8 x {window // 1024}K"] = 2 * 8 * window * HKV * D * 2
    return print_table("Sliding window, float16", runners, bytes_read, rounds, device)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtypes", default="float32,float16")
    ap.add_argument("--cases", default="b8,b1x16k")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--no-mlc", action="store_true", help="skip TVM/MLC's kernel (slow on CPU: serial over the batch)")
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    ap.add_argument("--hand-c", action="store_true",
                    help="CPU, needs a C compiler: add the hand-written AVX2 decode and read-only walks "
                         "of the same pages")
    ap.add_argument("--kv", action="store_true",
                    help="instead of the peers' tables: 8-bit caches (e4m3, e5m2) against float16 on b8x4k and "
                         "b1x16k, and a 4K sliding window over 8 x 16K against the full context and a plain 4K one")
    ap.add_argument("--knobs", action="append", default=[], type=json.loads, metavar="JSON",
                    help='an extra tvm_paged row: the default schedule with these builder knobs, e.g. '
                         '\'{"prefetch": "kv"}\' (repeatable)')
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    torch.set_num_threads(allowed_cores())
    print(machine_line(device))
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        print(f"GPU: {props.name}, {props.multi_processor_count} SMs, {props.total_memory / 2**30:.0f} GiB, "
              f"L2 {last_level_cache(device) / 2**20:.0f} MiB, target {target_of(device)}")
    if args.kv:
        for case in ("b8x4k", "b1x16k"):
            t = bench_fp8(case, args.rounds, device)
            base = t["float16 cache"]
            print("speed-up over float16: " + ", ".join(f"{row.split()[0]} {base / v:.2f}x" for row, v in t.items()
                                                       if row != "float16 cache"))
        t = bench_window(args.rounds, device)
        rows = list(t)
        print(f"window / plain 4K context: {t[rows[0]] / t[rows[2]]:.2f}x; window / full context: "
              f"{t[rows[0]] / t[rows[1]]:.2f}x")
        return 0
    for dt in args.dtypes.split(","):
        for case in args.cases.split(","):
            bench_case(case, getattr(torch, dt), args.rounds, not args.no_mlc, device, args.hand_c, args.knobs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
