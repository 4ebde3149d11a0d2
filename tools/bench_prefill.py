#!/usr/bin/env python
"""Prefill benchmark: tvm_paged's paged prefill against this CPU's arithmetic roofs and torch's SDPA, one process.

Prefill is arithmetic-bound, so its rate is GFLOP/s (4 per query row, query head, visible key and head_dim
element: 2 for q.k, 2 for P.V; causal masking counted as the keys each row sees) and its yardstick is the FMA
roof that ``tools/compute_roof.py`` measures with a TVM-compiled kernel on every core; on a CPU with AMX-BF16 also
its tile-product roof, the yardstick of bfloat16 prefill, which runs on AMX tiles there. The roofs are taken in
every round, interleaved with the rows (a shared VM's arithmetic rate swings between moments too: one roof taken
once had rows above 100% of it), and each row reports its median fraction of the same round's roof.
Cases (32 query heads, 8 KV heads, head_dim 128, page 16, shuffled page tables):

- ``prompt``: batch 4 x 512-token prompts, every token a query (causal);
- ``chunk``: batch 4, 256 new queries each over 768 cached tokens (chunked prefill).

Rows: tvm_paged with its default knobs (bfloat16 with AMX: also with ``amx=False``, the FMA path), with the tuned
schedule when one exists for this target, and torch's
``scaled_dot_product_attention`` (causal, GQA) on the same keys already gathered into contiguous tensors (its
best case: the gather is not timed). Every row is checked against the float64 reference first.

    python tools/bench_prefill.py [--dtypes float32,float16,bfloat16] [--cases prompt,chunk] [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from tvm_paged import build, ops, reference, targets, tuned_knobs
from tvm_paged.config import KernelConfig
from tvm_paged.kernels import prefill_cpu
from tvm_paged.tvm_compat import allowed_cores

from bench_decode import machine_line, settle_threads
from compute_roof import amx_roof, fma_roof

HQ, HKV, D, PAGE = 32, 8, 128, 16
CASES = {"prompt": (4, 512, 512), "chunk": (4, 1024, 256)}  # batch, seq_len, queries per sequence
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def make_inputs(batch, seq_len, q_len, dtype, seed=0):
    """q [batch * q_len, HQ, D], a shuffled pool of exactly the pages needed, its table, lengths, cu_seqlens_q."""
    g = torch.Generator().manual_seed(seed)
    pages = -(-seq_len // PAGE)
    k = torch.randn(batch * pages, PAGE, HKV, D, generator=g).to(dtype)
    v = torch.randn(batch * pages, PAGE, HKV, D, generator=g).to(dtype)
    table = torch.randperm(batch * pages, generator=g).int().view(batch, pages).contiguous()
    seq_lens = torch.full((batch,), seq_len, dtype=torch.int32)
    cu = torch.arange(0, batch + 1, dtype=torch.int32) * q_len
    q = torch.randn(batch * q_len, HQ, D, generator=g).to(dtype)
    return q, k, v, table, seq_lens, cu


def flops(batch, seq_len, q_len) -> int:
    """Row i of the last q_len tokens sees seq_len - q_len + i + 1 keys."""
    pairs = batch * (q_len * (seq_len - q_len) + q_len * (q_len + 1) // 2)
    return 4 * pairs * HQ * D


def tvm_paged_runner(cfg, inputs, knobs):
    q, k, v, table, seq_lens, cu = inputs
    fn = build.compile_kernel(cfg, targets.local_target(), knobs=knobs).mod[cfg.name]
    plan = ops.plan_prefill(table, seq_lens, cu, q.shape[0], page_size=PAGE, num_pages=k.shape[0])
    out = torch.empty_like(q)

    def run():
        with ops.use_kernels(lambda c, device: fn):
            return ops.run_prefill(plan, q, k, v, out=out)

    return run


def sdpa_runner(inputs):
    q, k, v, table, seq_lens, cu = inputs
    batch, seq_len = table.shape[0], int(seq_lens[0])
    q_len = q.shape[0] // batch
    kk = k[table.long()].view(batch, -1, HKV, D)[:, :seq_len].transpose(1, 2).contiguous()
    vv = v[table.long()].view(batch, -1, HKV, D)[:, :seq_len].transpose(1, 2).contiguous()
    qq = q.view(batch, q_len, HQ, D).transpose(1, 2).contiguous()
    # Query i sits at seq_len - q_len + i: a bottom-right-aligned causal mask.
    mask = torch.ones(q_len, seq_len, dtype=torch.bool).tril(seq_len - q_len)

    def run():
        o = torch.nn.functional.scaled_dot_product_attention(qq, kk, vv, attn_mask=mask, enable_gqa=True)
        return o.transpose(1, 2).reshape(q.shape)

    return run


def check(run, inputs, dtype, row):
    q, k, v, table, seq_lens, cu = inputs
    n = 2  # sequences checked (the float64 reference is slow)
    rows = int(cu[n])
    ref, _ = reference.prefill(q[:rows], k, v, table[:n], seq_lens[:n], cu[:n + 1])
    err = (run()[:rows].double() - ref).abs().max().item()
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    if not err < tol:
        raise SystemExit(f"{row}: max error {err:.3g} against the float64 reference")


def bench_case(case, dtype_name, rounds, with_amx=False):
    batch, seq_len, q_len = CASES[case]
    dtype = DTYPES[dtype_name]
    inputs = make_inputs(batch, seq_len, q_len, dtype)
    cfg = KernelConfig("prefill", dtype_name, HQ, HKV, D, PAGE)
    runners = {"tvm_paged (default)": tvm_paged_runner(cfg, inputs, {})}
    uses_amx = with_amx and prefill_cpu.amx_applies(cfg)
    if uses_amx:
        runners = {"tvm_paged (default: AMX)": runners["tvm_paged (default)"],
                   "tvm_paged (amx=False: FMAs)": tvm_paged_runner(cfg, inputs, {"amx": False})}
    # The knobs a served call of this shape gets: the committed schedule's nearest bucket.
    tuned = tuned_knobs.lookup(cfg, targets.local_target(), batch=batch, max_pages=-(-seq_len // PAGE))
    if tuned is not None:
        runners["tvm_paged (tuned)"] = tvm_paged_runner(cfg, inputs, tuned.knobs)
        print(f"tuned: {cfg.name} bucket {tuned.bucket[0]}x{tuned.bucket[1]}, knobs {tuned.knobs}")
    runners["torch SDPA (pages pre-gathered)"] = sdpa_runner(inputs)
    for row, run in runners.items():
        check(run, inputs, dtype, row)
    work = flops(batch, seq_len, q_len)
    roofs = {"FMA": []} | ({"AMX": []} if uses_amx else {})
    times = {row: [] for row in runners}
    fracs = {(row, name): [] for row in runners for name in roofs}
    order = list(runners)
    for r in range(rounds):
        settle_threads()  # the roof would otherwise measure one core's worth after the previous round's SDPA
        now = {"FMA": fma_roof(repeat=3)["gflops"]} | ({"AMX": amx_roof(repeat=3)["gflops"]} if uses_amx else {})
        for name, value in now.items():
            roofs[name].append(value)
        for row in order if r % 2 == 0 else order[::-1]:
            settle_threads()
            runners[row]()
            t0 = time.perf_counter()
            reps = 3
            for _ in range(reps):
                runners[row]()
            sec = (time.perf_counter() - t0) / reps
            times[row].append(sec)
            for name, value in now.items():
                fracs[row, name].append(work / sec / 1e9 / value)
    roof_text = ", ".join(f"{name} roof median {statistics.median(v):.0f} GFLOP/s (range {min(v):.0f}-{max(v):.0f})"
                          for name, v in roofs.items())
    print(f"\n{dtype_name}, {case}: batch {batch}, {q_len} queries over {seq_len} tokens each "
          f"({work / 1e9:.1f} GFLOP per call), {roof_text}")
    print("| kernel | ms | GFLOP/s | of FMA roof |" + (" of AMX roof |" if uses_amx else "")
          + "\n| --- | --- | --- | --- |" + (" --- |" if uses_amx else ""))
    for row in runners:
        sec = statistics.median(times[row])
        cells = " ".join(f"{100 * statistics.median(fracs[row, name]):.0f}% |" for name in roofs)
        print(f"| {row} | {sec * 1e3:.2f} | {work / sec / 1e9:.1f} | {cells}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtypes", default="float32,float16,bfloat16")
    ap.add_argument("--cases", default="prompt,chunk")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(allowed_cores())
    print(machine_line(torch.device("cpu")))
    # The roofs themselves are taken in every round of each case (bench_case); here only whether there is an AMX one.
    with_amx = targets.cpu_has_feature("amx-bf16", targets.local_target())
    for dtype_name in args.dtypes.split(","):
        for case in args.cases.split(","):
            bench_case(case, dtype_name, args.rounds, with_amx=with_amx)


if __name__ == "__main__":
    main()
