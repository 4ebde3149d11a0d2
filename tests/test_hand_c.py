"""The benchmark's hand-written AVX2 decode (tools/hand_decode.c, float16 and float32) against the float64
reference, so the ceiling it reports is a correct kernel's: odd lengths, pages shuffled, NaN in every slot no
sequence uses."""

from __future__ import annotations

import functools
import importlib.util
import shutil
from pathlib import Path

import pytest
import torch

from tvm_paged import build, targets, reference
from tvm_paged.tvm_compat import cpu_has_feature
from paged_data import ATOL, assert_close, cpu_only, make_pool, random_q

BENCH = Path(__file__).resolve().parent.parent / "tools" / "bench_decode.py"


@functools.lru_cache(maxsize=None)
def _bench_module():
    spec = importlib.util.spec_from_file_location("bench_decode", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _has_avx2_f16c() -> bool:
    target = targets.local_target()
    return all(cpu_has_feature(f, target) for f in ("avx2", "f16c", "fma"))


@cpu_only
@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler")
@pytest.mark.skipif(not _has_avx2_f16c(), reason="the hand-written kernel needs AVX2, FMA and F16C")
@pytest.mark.parametrize("dtype", ["float16", "float32"])
@pytest.mark.parametrize("seq_lens", [[1, 16, 17, 97, 54, 512, 33], [2048, 5]], ids=["batch7", "long+short"])
def test_hand_written_kernel_matches_float64(seq_lens, dtype):
    bench = _bench_module()
    k, v, table, lens = make_pool(seq_lens, page_size=bench.PAGE, num_kv_heads=bench.HKV, head_dim=bench.D,
                                  dtype=dtype, seed=len(seq_lens))
    q = random_q(len(seq_lens), bench.HQ, bench.D, dtype)
    run = bench.hand_c_runner(q, k, v, [table], lens)
    out = run(0)
    ref, _ = reference.decode(q, k, v, table, lens)
    assert torch.isfinite(out.double()).all()
    assert_close(out, ref, ATOL[dtype])


@cpu_only
def test_hand_written_kernel_refuses_other_dtypes():
    bench = _bench_module()
    k, v, table, lens = make_pool([5], page_size=bench.PAGE, num_kv_heads=bench.HKV, head_dim=bench.D,
                                  dtype="float16", seed=1)
    with pytest.raises(ValueError, match="float16 or float32"):
        bench.hand_c_runner(random_q(1, bench.HQ, bench.D, "float32"), k, v, [table], lens)


@cpu_only
@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler")
@pytest.mark.skipif(not _has_avx2_f16c(), reason="the page walk is written with AVX intrinsics")
@pytest.mark.parametrize("prefetch", ["none", "lines", "4k-starts"])
def test_page_walk_reads_exactly_the_tables_pages(prefetch):
    """The benchmark's read-only walk: every page of the table once, nothing else (the rest of the pool is NaN)."""
    bench = _bench_module()
    num_pages, pages_per_seq, batch = 41, 5, 3
    shape = (num_pages, bench.PAGE, bench.HKV, bench.D)
    k = torch.full(shape, float("nan"))
    v = torch.full(shape, float("nan"))
    table = torch.randperm(num_pages, generator=torch.Generator().manual_seed(3))[:batch * pages_per_seq]
    table = table.int().view(batch, pages_per_seq).contiguous()
    used = table.flatten().long()
    k[used] = 1.0
    v[used] = 2.0
    total = bench.page_walk_runner(k, v, [table], prefetch)(0).item()
    assert total == 3.0 * used.numel() * k[0].numel()
