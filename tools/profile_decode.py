#!/usr/bin/env python
"""Where the CPU decode kernel spends its time: Linux ``perf`` samples of the compiled kernel, by loop.

The kernel is built for the local CPU (default or given knobs), exported as a shared library so ``perf`` can map
its samples, and called on one of ``tools/bench_decode.py``'s cases (a DRAM-sized pool and rotating tables) or
on a pool that stays in cache (``--hot``: batch 2, the pages of one table only). ``perf record -e cpu-clock``
samples the process; every sample inside the kernel's library is attributed to its straight-line block of
machine code (the instructions up to a jump), and the blocks are listed hottest first with their instruction
mix, so a loop reads as e.g. ``32 vfmadd231ps, 16 vbroadcastss``: the q.k loop, the P.V loop, the prefetches
of the next page, the softmax. A timer's samples land on whatever instruction is waiting, so with a DRAM pool
the loops that wait for memory collect the time; the hot pool shows the arithmetic alone.

Needs ``perf`` (Debian's ``linux-perf``) and ``kernel.perf_event_paranoid`` at most 2; software events are
enough (a VM without hardware counters works).

    python tools/profile_decode.py [--dtype float32] [--case b8|b1x16k|hot] [--knobs '{"prefetch": "kv"}']
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def run_kernel(dtype_name: str, case: str, knobs: dict, seconds: float, lib_path: str) -> float:
    """Export the kernel to ``lib_path``, load it back, call it for ``seconds``; returns ms per call."""
    import torch

    sys.path.insert(0, HERE)
    import bench_decode as bd
    from tvm_paged import build, ops
    from tvm_paged.config import KernelConfig
    from tvm_paged.tvm_compat import load_module

    dtype = getattr(torch, dtype_name)
    if case == "hot":  # 2 x 256 tokens: 4 MB of float32 K+V, inside the last-level cache
        batch, length = 2, 256
        pages = batch * length // bd.PAGE
        k = torch.randn(pages, bd.PAGE, bd.HKV, bd.D, dtype=dtype)
        v = torch.randn_like(k)
        tables = [torch.arange(pages, dtype=torch.int32).view(batch, -1)]
        seq_lens = torch.full((batch,), length, dtype=torch.int32)
        q = torch.randn(batch, bd.HQ, bd.D, dtype=dtype)
    else:
        batch, length = bd.CASES[case]
        q, k, v, tables, seq_lens = bd.make_inputs(batch, length, dtype, torch.device("cpu"))
    cfg = KernelConfig("decode", dtype_name, bd.HQ, bd.HKV, bd.D, bd.PAGE)
    build.compile_kernel(cfg, bd.target_of(q.device), knobs=knobs).mod.export_library(lib_path)
    fn = load_module(lib_path)[cfg.name]
    plans = [ops.plan_decode(t, seq_lens, page_size=bd.PAGE, num_pages=k.shape[0]) for t in tables]
    splits = plans[0].num_splits
    out, lse = torch.empty_like(q), torch.empty(batch, bd.HQ)
    o_part, ms_part = torch.empty(batch, splits, bd.HQ, bd.D), torch.empty(batch, splits, bd.HQ, 2)
    calls, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        p = plans[calls % len(plans)]
        fn(q, k, v, p.block_table, p.seq_lens, out, lse, o_part, ms_part, bd.D ** -0.5, 0)
        calls += 1
    return (time.perf_counter() - t0) / calls * 1e3


def blocks(lib_path: str) -> list[list[tuple[int, str]]]:
    """The library's machine code as straight-line blocks of (file address, instruction), split after jumps."""
    dis = subprocess.run(["objdump", "-d", "--no-show-raw-insn", lib_path], check=True, capture_output=True,
                         text=True).stdout
    out, cur = [], []
    for line in dis.splitlines():
        m = re.match(r"\s*([0-9a-f]+):\s+(\S.*)", line)
        if not m:
            continue
        cur.append((int(m.group(1), 16), m.group(2)))
        if m.group(2).startswith(("j", "ret")):
            out.append(cur)
            cur = []
    return out + ([cur] if cur else [])


def samples(perf_data: str, lib_path: str) -> collections.Counter:
    """Samples per file address of ``lib_path`` (runtime addresses mapped back through its executable mapping)."""
    script = subprocess.run(["perf", "script", "-i", perf_data, "--show-mmap-events", "-F", "ip,dso"],
                            check=True, capture_output=True, text=True).stdout
    base = None
    counts: collections.Counter = collections.Counter()
    name = os.path.basename(lib_path)
    for line in script.splitlines():
        if "MMAP" in line and lib_path in line and "r-xp" in line:
            m = re.search(r"\[(0x[0-9a-f]+)\((0x[0-9a-f]+)\) @ (0x[0-9a-f]+)", line)
            if m:
                base = int(m.group(1), 16) - int(m.group(3), 16)
        elif name in line and base is not None:
            counts[int(line.split()[0], 16) - base] += 1
    return counts


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16"])
    ap.add_argument("--case", default="b8", choices=["b8", "b1x16k", "hot"])
    ap.add_argument("--knobs", default="{}", help="builder knobs as JSON ({} = the default schedule)")
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--top", type=int, default=8)
    ap.add_argument("--child", help=argparse.SUPPRESS)  # the profiled process: the library path to write
    args = ap.parse_args(argv)
    knobs = json.loads(args.knobs)
    if args.child:
        ms = run_kernel(args.dtype, args.case, knobs, args.seconds, args.child)
        print(f"{ms:.3f} ms per call")
        return
    work = tempfile.mkdtemp(prefix="tvm_paged_profile_")
    lib, data = os.path.join(work, "decode.so"), os.path.join(work, "perf.data")
    # 2 kHz: denser sampling slows a VM's calls measurably.
    subprocess.run(["perf", "record", "-q", "-e", "cpu-clock", "-F", "2000", "-o", data, sys.executable,
                    os.path.abspath(__file__), "--child", lib, "--dtype", args.dtype, "--case", args.case,
                    "--knobs", args.knobs, "--seconds", str(args.seconds)], check=True)
    counts = samples(data, lib)
    total = sum(counts.values())
    if not total:
        raise SystemExit("no samples in the kernel's library (is perf allowed to sample this process?)")
    ranked = sorted(blocks(lib), key=lambda b: -sum(counts[a] for a, _ in b))
    print(f"{args.dtype} {args.case}, knobs {knobs or 'default'}: {total} samples in the kernel; hottest blocks:")
    for block in ranked[:args.top]:
        share = sum(counts[a] for a, _ in block) / total
        mix = collections.Counter(ins.split()[0] for _, ins in block).most_common(6)
        print(f"  {100 * share:5.1f}%  {len(block):3d} instructions: {', '.join(f'{n} {op}' for op, n in mix)}")


if __name__ == "__main__":
    main()
