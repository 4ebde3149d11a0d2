#!/usr/bin/env python
"""Decode benchmark: tvm_paged against the peers on the same inputs, DRAM-honest.

Cases (fp32 and fp16; 32 query heads, 8 KV heads, head_dim 128, page 16, fragmented page tables):
batch 8 x 1024 tokens and batch 1 x 16384 tokens. Rows, all in one process:
- tvm_paged with its default schedule, and with the committed tuned schedule when one exists;
- torch: gather each sequence's pages, then scaled_dot_product_attention;
- TVM/MLC-LLM's shipped CPU paged decode kernel (tvm.relax.frontend.nn.llm), on the same pages in its layout;
- the machine's read bandwidth: a reduction over a 512 MB array (torch.sum on every core).
Each timed call rotates through page tables over a pool several times larger than the L3 cache, and the
bandwidth roof is taken in rounds interleaved with the kernels (it swings from round to round on a shared
VM), with the row order alternating between rounds; each row reports its median time and its median
fraction of the same round's roof.

    python tools/bench_decode.py [--dtypes float32,float16] [--rounds 5] [--cases b8,b1x16k] [--no-mlc]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from tvm_paged import build, ops, reference, schedules
from tvm_paged.config import KernelConfig
from tvm_paged.tvm_compat import allowed_cores, host_cpu

HQ, HKV, D, PAGE = 32, 8, 128, 16
L3_BYTES = 32 << 20
CASES = {"b8": (8, 1024), "b1x16k": (1, 16384)}


def make_inputs(batch, length, dtype, copies_over_l3=4, seed=0):
    """A pool ``copies`` times the working set (and at least 4x L3), and one disjoint table per copy."""
    torch.manual_seed(seed)
    pages = length // PAGE
    work = 2 * batch * length * HKV * D * dtype.itemsize
    copies = max(copies_over_l3, -(-copies_over_l3 * L3_BYTES // work))
    num_pages = batch * pages * copies
    k = torch.randn(num_pages, PAGE, HKV, D, dtype=dtype)
    v = torch.randn(num_pages, PAGE, HKV, D, dtype=dtype)
    perm = torch.randperm(num_pages).int()
    tables = [perm[i * batch * pages:(i + 1) * batch * pages].view(batch, pages).contiguous() for i in range(copies)]
    seq_lens = torch.full((batch,), length, dtype=torch.int32)
    q = torch.randn(batch, HQ, D, dtype=dtype)
    return q, k, v, tables, seq_lens


def tvm_paged_runner(cfg, q, k, v, tables, seq_lens, knobs):
    fn = build.compile_kernel(cfg, build.local_target(), knobs=knobs).mod[cfg.name]
    plans = [ops.plan_decode(t, seq_lens, page_size=PAGE, num_pages=k.shape[0]) for t in tables]
    batch, splits = q.shape[0], plans[0].num_splits
    out = torch.empty_like(q)
    lse = torch.empty(batch, HQ)
    o_part = torch.empty(batch, splits, HQ, D)
    lse_part = torch.empty(batch, splits, HQ)

    def run(i):
        p = plans[i % len(plans)]
        fn(q, k, v, p.block_table, p.seq_lens, out, lse, o_part, lse_part, D ** -0.5)
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


def mlc_runner(q, k, v, tables, seq_lens, dtype_name):
    """TVM's own CPU paged decode (MLC-LLM): pages [num_pages, 2, num_kv_heads, page_size, head_dim], CSR table."""
    from tvm.relax.frontend.nn.llm._decode_kernels import _attention_decode_cpu

    from tvm_paged.tvm_compat import compile_module

    func = _attention_decode_cpu(HKV, HQ, D, dtype_name, False, {}, PAGE)
    fn = compile_module(func, build.local_target()).mod["batch_decode_paged_kv_cpu"]
    pages = torch.stack([k.transpose(1, 2), v.transpose(1, 2)], dim=1).contiguous()
    batch, length = q.shape[0], int(seq_lens[0])
    n = length // PAGE
    indptr = torch.arange(0, batch * n + 1, n, dtype=torch.int32)
    last = torch.full((batch,), PAGE, dtype=torch.int32)
    zeros = torch.zeros(batch, dtype=torch.int32)
    out = torch.empty_like(q)
    lse = torch.empty(batch, HQ)

    def run(i):
        values = tables[i % len(tables)].flatten().contiguous()
        fn(q, pages, indptr, values, last, zeros, zeros, out, lse, 0, 1.0, 1e4, D ** -0.5)
        return out

    return run


def read_bandwidth(buf):
    t0 = time.perf_counter()
    buf.sum()
    return buf.numel() * buf.element_size() / (time.perf_counter() - t0) / 1e9


def bench_case(name, dtype, rounds, with_mlc):
    batch, length = CASES[name]
    q, k, v, tables, seq_lens = make_inputs(batch, length, dtype)
    bytes_kv = 2 * batch * length * HKV * D * dtype.itemsize
    cfg = KernelConfig("decode", str(dtype).split(".")[1], HQ, HKV, D, PAGE)
    runners = {"tvm_paged (default)": tvm_paged_runner(cfg, q, k, v, tables, seq_lens, knobs={})}
    tuned = schedules.lookup(cfg, build.local_target())
    if tuned is not None:
        runners["tvm_paged (tuned)"] = tvm_paged_runner(cfg, q, k, v, tables, seq_lens, knobs=tuned.knobs)
    runners["torch gather + SDPA"] = torch_runner(q, k, v, tables, seq_lens)
    if with_mlc:
        runners["TVM/MLC CPU decode"] = mlc_runner(q, k, v, tables, seq_lens, cfg.dtype)
    # Correctness of every row against the float64 reference before timing anything.
    ref, _ = reference.decode(q, k, v, tables[0], seq_lens)
    tol = 1e-4 if dtype == torch.float32 else 1e-2
    for row, run in runners.items():
        err = (run(0).double() - ref).abs().max().item()
        if not err < tol:
            raise SystemExit(f"{row}: max error {err:.3g} against the float64 reference")
    roof_buf = torch.ones(128 << 20, dtype=torch.float32)  # 512 MB
    times = {row: [] for row in runners}
    fracs = {row: [] for row in runners}
    roofs = []
    calls = 0
    order = list(runners)
    for r in range(rounds):
        roof = max(read_bandwidth(roof_buf) for _ in range(3))
        roofs.append(roof)
        # torch's OpenMP workers spin for a while after a parallel region and would steal the cores from
        # whichever row runs next: let them sleep, and alternate the row order between rounds.
        time.sleep(0.3)
        for row in order if r % 2 == 0 else order[::-1]:
            run = runners[row]
            reps = 3 if row.startswith("TVM/MLC") else 10
            run(calls)  # untimed: the previous row's threads settle, instruction caches warm
            calls += 1
            t0 = time.perf_counter()
            for _ in range(reps):
                run(calls)
                calls += 1
            dt = (time.perf_counter() - t0) / reps
            times[row].append(dt)
            fracs[row].append(bytes_kv / dt / 1e9 / roof)
    print(f"\n{cfg.dtype}, batch {batch} x {length} tokens ({bytes_kv / 1e6:.0f} MB of K+V per call), "
          f"read-bandwidth roof median {statistics.median(roofs):.1f} GB/s (range {min(roofs):.1f}-{max(roofs):.1f})")
    print("| kernel | ms | GB/s | of roof |\n| --- | --- | --- | --- |")
    for row in runners:
        ms = statistics.median(times[row]) * 1e3
        print(f"| {row} | {ms:.2f} | {bytes_kv / ms / 1e6:.1f} | {100 * statistics.median(fracs[row]):.0f}% |")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtypes", default="float32,float16")
    ap.add_argument("--cases", default="b8,b1x16k")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--no-mlc", action="store_true", help="skip TVM/MLC's kernel (slow: serial over the batch)")
    args = ap.parse_args(argv)
    torch.set_num_threads(allowed_cores())
    print(f"machine: {host_cpu()}, {allowed_cores()} cores, torch {torch.__version__}")
    for dt in args.dtypes.split(","):
        for case in args.cases.split(","):
            bench_case(case, getattr(torch, dt), args.rounds, not args.no_mlc)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
