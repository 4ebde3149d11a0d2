"""The CPU kernels touch no memory outside their arguments: every array a kernel reads or writes (the caches, q,
out, the plan's tables) sits against an inaccessible guard page (``mprotect(PROT_NONE)``), so one element read or
written past its end, or a page id of -1 followed (the entry after a sequence's last page), kills the process.

NaN in unused slots shows a stray read only when it reaches the output; the kernels mask keys with a select, so a
read of one key too many inside a page is invisible there, and a read through the table entry after a
sequence's last page (-1: the bytes before the pool) or past the table's last row is an out-of-bounds read that
may or may not crash in an ordinary run. Here it always does. The kernels run in a child process (this file run
as a script) so a crash fails the test instead of the test session; the child also checks every result against
the float64 reference. Sequences end exactly at page boundaries, use the pool's first and last pages, and the last
one fills its table row.
"""

from __future__ import annotations

import ctypes
import math
import mmap
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from paged_data import DEVICE

PAGE = mmap.PAGESIZE
PROT_NONE = 0  # <sys/mman.h>; Python's mmap module names only PROT_READ, PROT_WRITE and PROT_EXEC
_KEEP = []  # the mappings behind the guarded tensors live as long as the process


def guarded(shape, dtype: torch.dtype, fill=None) -> torch.Tensor:
    """A contiguous tensor whose first byte follows an inaccessible page and whose last byte precedes one when
    its size is a multiple of the OS page; otherwise only its end is guarded (a gap below one page precedes it)."""
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    body = -(-nbytes // PAGE) * PAGE
    m = mmap.mmap(-1, body + 2 * PAGE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    base = ctypes.addressof(ctypes.c_char.from_buffer(m))
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    for start in (base, base + PAGE + body):
        if libc.mprotect(start, PAGE, PROT_NONE) != 0:
            raise OSError(ctypes.get_errno(), "mprotect")
    _KEEP.append(m)
    t = torch.frombuffer(m, dtype=torch.uint8, count=nbytes, offset=PAGE + body - nbytes).view(dtype).view(shape)
    if fill is not None:
        t.copy_(fill)
    return t


def _guard_plan(plan):
    """The plan's own tables moved into guarded memory (a plan copies the caller's tables)."""
    for name in ("block_table", "seq_lens", "cu_seqlens_q", "tiles"):
        table = getattr(plan, name)
        if table is not None:
            setattr(plan, name, guarded(tuple(table.shape), table.dtype, torch.as_tensor(table)))


def _pool_and_table(dtype, num_kv_heads, head_dim, page_size, seed):
    """A guarded pool (its size a multiple of the OS page, so page -1 and page num_pages both fall in a guard),
    and lengths and a table whose sequences end at page boundaries next to -1 entries, hold pages 0 and
    num_pages - 1, and whose last row is full."""
    page_bytes = page_size * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()
    num_pages = PAGE // math.gcd(PAGE, page_bytes)
    while num_pages < 12:
        num_pages *= 2
    gen = torch.Generator().manual_seed(seed)
    shape = (num_pages, page_size, num_kv_heads, head_dim)
    k = guarded(shape, dtype, torch.randn(shape, generator=gen).to(dtype))
    v = guarded(shape, dtype, torch.randn(shape, generator=gen).to(dtype))
    last = num_pages - 1
    rows = [[0, 5, -1, -1], [7, 3, 9, last], [1, 2, 4, 8]]
    lens = [2 * page_size, 3 * page_size + 2, 4 * page_size]
    table = torch.tensor(rows, dtype=torch.int32)
    return k, v, table, torch.tensor(lens, dtype=torch.int32), gen


def _close(got, want, dtype, what):
    from paged_data import ATOL, LSE_ATOL, assert_close

    assert_close(got, want, (LSE_ATOL if what == "lse" else ATOL)[dtype], what)


def _run_attention(dtype: str):
    import tvm_paged as tp
    from tvm_paged import reference

    dt = getattr(torch, dtype)
    hq, hkv, d, p = 8, 2, 64, 5
    k, v, table, lens, gen = _pool_and_table(dt, hkv, d, p, seed=1)
    batch = len(lens)
    q = guarded((batch, hq, d), dt, torch.randn(batch, hq, d, generator=gen).to(dt))
    out = guarded((batch, hq, d), dt)
    plan = tp.plan_decode(table, lens, page_size=p, num_pages=k.shape[0])
    _guard_plan(plan)
    got, lse = tp.run_decode(plan, q, k, v, out=out, return_lse=True)
    ref, ref_lse = reference.decode(q, k, v, table, lens)
    _close(got, ref, dtype, f"decode {dtype} out")
    _close(lse, ref_lse, dtype, "lse")

    q_lens = [p, 3, 4 * p]  # a whole page, a chunk ending inside one, a whole sequence
    total = sum(q_lens)
    cu = torch.tensor([0, q_lens[0], q_lens[0] + q_lens[1], total], dtype=torch.int32)
    q = guarded((total, hq, d), dt, torch.randn(total, hq, d, generator=gen).to(dt))
    out = guarded((total, hq, d), dt)
    for causal in (True, False):
        plan = tp.plan_prefill(table, lens, cu, total, page_size=p, num_pages=k.shape[0])
        _guard_plan(plan)
        got, lse = tp.run_prefill(plan, q, k, v, causal=causal, out=out, return_lse=True)
        ref, ref_lse = reference.prefill(q, k, v, table, lens, cu, causal=causal)
        _close(got, ref, dtype, f"prefill {dtype} causal={causal} out")
        _close(lse, ref_lse, dtype, "lse")


def _run_page_ops(dtype: str):
    import tvm_paged as tp

    dt = getattr(torch, dtype)
    k, v, _, _, gen = _pool_and_table(dt, 2, 64, 5, seed=2)
    num_pages, p = k.shape[0], k.shape[1]
    slots = guarded((3,), torch.int64, torch.tensor([0, p - 1, num_pages * p - 1]))  # first and last slots
    new_k = guarded((3, 2, 64), dt, torch.randn(3, 2, 64, generator=gen).to(dt))
    new_v = guarded((3, 2, 64), dt, torch.randn(3, 2, 64, generator=gen).to(dt))
    tp.write_kv(new_k, new_v, k, v, slots)
    for i, slot in enumerate(slots.tolist()):
        assert torch.equal(k[slot // p, slot % p], new_k[i]) and torch.equal(v[slot // p, slot % p], new_v[i])
    last = num_pages - 1
    for src_pages, dst_pages in (([0, last], [1, 2]), ([3, 4], [0, last])):  # read, then write, both end pages
        before_k, before_v = k.clone(), v.clone()
        src = guarded((2,), torch.int64, torch.tensor(src_pages))
        dst = guarded((2,), torch.int64, torch.tensor(dst_pages))
        tp.copy_pages(k, v, src, dst)
        for s, d in zip(src_pages, dst_pages):
            assert torch.equal(k[d], before_k[s]) and torch.equal(v[d], before_v[s])


CASES = {"attention-float32": lambda: _run_attention("float32"),
         "attention-bfloat16": lambda: _run_attention("bfloat16"),
         "page-ops-float16": lambda: _run_page_ops("float16")}


@pytest.mark.skipif(DEVICE.type != "cpu", reason="guards host memory: the CPU kernels")
@pytest.mark.skipif(not hasattr(mmap, "PROT_READ"), reason="needs mmap with protections (POSIX)")
@pytest.mark.parametrize("case", list(CASES))
def test_kernels_touch_nothing_outside_their_arguments(case):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, __file__, case], capture_output=True, text=True, env=env, timeout=600)
    if run.returncode < 0:
        pytest.fail(f"{case}: the child died of signal {-run.returncode} (a read or write in a guard page: out of "
                    f"bounds)\n{run.stderr[-3000:]}")
    assert run.returncode == 0 and "ok" in run.stdout, f"{case}:\n{run.stdout[-2000:]}\n{run.stderr[-3000:]}"


if __name__ == "__main__":
    CASES[sys.argv[1]]()
    print("ok")
