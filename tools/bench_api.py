"""Per-call cost of the Python API around the decode kernel (not a test).

Times, on a batch small enough that the kernel itself is short (float32, 32/8 heads, head_dim 128, page 16):
the compiled kernel called directly; ``ops.run_decode`` with a plan built once (what a serving loop does per
layer), with a new output tensor per call and with ``out=`` reused (no allocation, as the direct call); ``tp.paged_decode`` (validation and planning on every call); and ``ops.plan_decode`` alone. The
differences are the API's overhead per call. Medians of ``--rounds`` rounds of ``--calls`` calls each.

    python tools/bench_api.py [--batch 8] [--pages 4] [--calls 300] [--rounds 7]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import tvm_paged as tp
from tvm_paged import ops
from tvm_paged.plan import kernel_for
from tvm_paged.config import KernelConfig

HQ, HKV, D, PAGE = 32, 8, 128, 16


def per_call_us(fn, calls: int, rounds: int) -> float:
    fn()
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - t0) / calls * 1e6)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--pages", type=int, default=4, help="pages per sequence")
    ap.add_argument("--calls", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    batch, pages = args.batch, args.pages
    num_pages = batch * pages
    gen = torch.Generator().manual_seed(0)
    k_cache = torch.randn(num_pages, PAGE, HKV, D, generator=gen)
    v_cache = torch.randn(num_pages, PAGE, HKV, D, generator=gen)
    block_table = torch.randperm(num_pages, generator=gen).view(batch, pages).int()
    seq_lens = torch.full((batch,), pages * PAGE - 3, dtype=torch.int32)
    q = torch.randn(batch, HQ, D, generator=gen)

    plan = ops.plan_decode(block_table, seq_lens, page_size=PAGE, num_pages=num_pages)
    cfg = KernelConfig("decode", "float32", HQ, HKV, D, PAGE)
    kernel = kernel_for(cfg, q.device, plan)
    out, lse = torch.empty_like(q), torch.empty(batch, HQ)
    o_part = torch.empty(batch, plan.num_splits, HQ, D)
    ms_part = torch.empty(batch, plan.num_splits, HQ, 2)

    def raw():
        kernel(q, k_cache, v_cache, plan.block_table, plan.seq_lens, out, lse, o_part, ms_part, D ** -0.5, 0)

    rows = [
        ("kernel called directly", per_call_us(raw, args.calls, args.rounds)),
        ("ops.run_decode (plan reused)", per_call_us(lambda: ops.run_decode(plan, q, k_cache, v_cache),
                                                     args.calls, args.rounds)),
        ("ops.run_decode (plan and out= reused)",
         per_call_us(lambda: ops.run_decode(plan, q, k_cache, v_cache, out=out), args.calls, args.rounds)),
        ("tp.paged_decode (validate + plan + run)",
         per_call_us(lambda: tp.paged_decode(q, k_cache, v_cache, block_table, seq_lens), args.calls, args.rounds)),
        ("ops.plan_decode alone", per_call_us(lambda: ops.plan_decode(block_table, seq_lens, page_size=PAGE,
                                                                      num_pages=num_pages), args.calls, args.rounds)),
    ]
    print(f"decode float32, batch {batch} x {pages} pages of {PAGE} ({HQ}/{HKV} heads, head_dim {D}), "
          f"median of {args.rounds} rounds x {args.calls} calls")
    print("| call | us per call | over the kernel |")
    print("| --- | --- | --- |")
    base = rows[0][1]
    for name, us in rows:
        extra = "" if name.startswith("kernel") or name.startswith("ops.plan") else f"+{us - base:.0f}"
        print(f"| {name} | {us:.0f} | {extra} |")


if __name__ == "__main__":
    main()
