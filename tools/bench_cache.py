"""Bookkeeping cost of a decode step and KV waste of the paged cache.

1. Per decode step at ``--seqs`` running sequences (default 256): append one token to each sequence
   (``PageAllocator.append_slots``), the block table of all of them, and ``plan_decode``'s validation; then the
   same through ``PagedKVCache.begin_step``, which does all of it plus copy-on-write and positions. No kernel
   runs. Goal: under 1 ms per step.
2. KV waste under the demo's workload (its default requests, served by the demo's scheduler with a tiny model:
   the pages a workload takes do not depend on the model's size): pages held against tokens held, against
   contiguous allocation of the longest admissible sequence per sequence (vLLM's comparison) and of each
   sequence's own final length (an oracle). Goal: under one page per sequence.

    python tools/bench_cache.py [--seqs 256] [--steps 500] [--skip-waste]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from tvm_paged.allocator import PageAllocator
from tvm_paged.cache import PagedKVCache
from tvm_paged.ops import plan_decode


def _time_ms(fns: dict, steps: int, rounds: int = 5) -> dict:
    """name -> (wall, CPU) milliseconds per call: the best over ``rounds`` interleaved rounds of each round's
    median, so a burst of load from other processes on a shared machine does not decide the number. CPU time is
    the cost; wall time adds waiting for a core."""
    best = {name: (float("inf"), float("inf")) for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            wall, cpu = [], []
            for _ in range(max(1, steps // rounds)):
                t0, c0 = time.perf_counter(), time.thread_time()
                fn()
                wall.append(time.perf_counter() - t0)
                cpu.append(time.thread_time() - c0)
            w, c = 1e3 * statistics.median(wall), 1e3 * statistics.median(cpu)
            best[name] = (min(best[name][0], w), min(best[name][1], c))
    return best


def bookkeeping(num_seqs: int, steps: int, page_size: int = 16, seed: int = 0) -> list[tuple[str, tuple]]:
    rng = np.random.default_rng(seed)
    lens = rng.integers(64, 2048, num_seqs)
    num_pages = int(sum(-(-(n + steps + 1) // page_size) for n in lens)) + 16
    ids = list(range(num_seqs))

    alloc = PageAllocator(num_pages, page_size)
    # a minimal cache: without copy-on-write, begin_step does no per-layer work
    cache = PagedKVCache(1, 1, 8, page_size, num_pages)
    for a in (alloc, cache.allocator):
        for sid, n in zip(ids, lens):
            a.add_sequence(sid)
            a.append_slots(sid, int(n))
    tok = [[1]] * num_seqs

    def append():
        for sid in ids:
            alloc.append_slots(sid, 1, [1])

    def table():
        alloc.block_table(ids)

    def plan():
        plan_decode(torch.from_numpy(alloc.block_table(ids)), torch.from_numpy(alloc.seq_lens(ids)),
                    page_size=page_size, num_pages=num_pages)

    names = [f"append_slots x {num_seqs} (1 token each)",
             f"block_table [{num_seqs}, {alloc.block_table(ids).shape[1]}+] + seq_lens",
             "plan_decode (validation, split choice)", "PagedKVCache.begin_step (all of it)"]
    fns = (append, lambda: (table(), alloc.seq_lens(ids)), plan, lambda: cache.begin_step(ids, 1, token_ids=tok))
    times = _time_ms(dict(zip(names, fns)), steps)
    rows = [(name, times[name]) for name in names[:3]]
    rows.append(("sum of the above", tuple(sum(t[i] for _, t in rows) for i in range(2))))
    rows.append((names[3], times[names[3]]))
    return rows


def waste() -> dict:
    from tvm_paged.demo import engine, serve

    p = argparse.ArgumentParser()
    serve.add_arguments(p)
    tiny = ["--model", "synthetic", "--num-layers", "1", "--hidden", "64", "--num-qo-heads", "4", "--num-kv-heads", "2", "--head-dim", "16",
            "--intermediate", "64", "--check-every", "0", "--no-progress"]
    out = {}
    for label, extra in (("demo default pool", []), ("pool with room (no preemption)", ["--num-pages", "512"])):
        args = serve.fill_defaults(p.parse_args(tiny + extra))
        eng = engine.Engine(args)
        eng._check = lambda *a: None  # the logits checks do not change pages
        out[label] = eng.run()
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seqs", type=int, default=256)
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--skip-waste", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(1)

    print(f"Decode-step bookkeeping at {args.seqs} sequences (page 16; best of 5 interleaved rounds of "
          f"{args.steps // 5} steps, each round's median)")
    rows = bookkeeping(args.seqs, args.steps)
    w = max(len(r) for r, _ in rows)
    print(f"  {'':<{w}}  {'wall ms':>8}  {'CPU ms':>8}  CPU us/seq")
    for name, (wall, cpu) in rows:
        print(f"  {name:<{w}}  {wall:8.3f}  {cpu:8.3f}  {1e3 * cpu / args.seqs:6.2f}")
    if args.skip_waste:
        return 0
    print("\nKV waste under the demo's workload (time-averaged over steps)")
    hdr = ("workload", "peak pages", "paged waste", "pages/seq", "contig. max-len", "contig. oracle")
    print("  " + " | ".join(hdr))
    for label, s in waste().items():
        print("  " + " | ".join([label, f"{s['peak_pages_used']}/{s['num_pages']}", f"{s['kv_waste_pct']:.1f}%",
                                  f"{s['kv_waste_pages_per_seq']:.2f}", f"{s['contiguous_waste_pct']:.1f}%",
                                  f"{s['contiguous_oracle_waste_pct']:.1f}%"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
