"""paged_decode against the float64 reference: odd sizes, fragmented tables, NaN in unused slots."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import tvm_paged as tp
from tvm_paged import reference
from paged_data import ATOL, DEVICE, LSE_ATOL, assert_close, cpu_only, make_pool, random_q

# (dtype, num_qo_heads, num_kv_heads, head_dim, page_size): every head_dim, page size, group size and dtype
# appears; one compile each.
CONFIGS = [
    ("float32", 4, 4, 64, 1),
    ("float32", 32, 8, 128, 16),
    ("float32", 6, 1, 80, 5),
    ("float32", 16, 2, 256, 8),
    ("float32", 12, 2, 96, 32),
    ("float16", 32, 8, 128, 16),
    ("float16", 8, 1, 64, 5),
    ("float16", 24, 4, 96, 1),
    ("float16", 4, 1, 256, 32),
    ("bfloat16", 32, 4, 128, 16),
    ("bfloat16", 8, 8, 80, 8),
]
LENGTHS = [1, 54, 97, 512, 2048]


def _lengths(batch, page_size, seed):
    """``batch`` lengths drawn from LENGTHS plus exact-page and page+1 edges."""
    rng = np.random.default_rng(seed)
    edges = [page_size, page_size + 1, 4 * page_size, 4 * page_size + 1]
    pick = rng.choice(LENGTHS + edges, size=batch)
    return [int(x) for x in pick]


def _check(dtype, hq, hkv, d, p, seq_lens, seed=0, **pool_kw):
    k, v, bt, sl = make_pool(seq_lens, page_size=p, num_kv_heads=hkv, head_dim=d, dtype=dtype, seed=seed, **pool_kw)
    q = random_q(len(seq_lens), hq, d, dtype, seed=seed + 1)
    out, lse = tp.paged_decode(q, k, v, bt, sl, return_lse=True)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert lse.shape == (len(seq_lens), hq) and lse.dtype == torch.float32
    ref_out, ref_lse = reference.decode(q, k, v, bt, sl)
    assert_close(out, ref_out, ATOL[dtype])
    assert_close(lse, ref_lse, LSE_ATOL[dtype], "lse")


@pytest.mark.parametrize("batch", [1, 12, 17])
@pytest.mark.parametrize("dtype,hq,hkv,d,p", CONFIGS, ids=lambda c: str(c))
def test_decode_grid(dtype, hq, hkv, d, p, batch):
    _check(dtype, hq, hkv, d, p, _lengths(batch, p, seed=batch * 7 + d), seed=batch)


@pytest.mark.parametrize("n", [1, 4, 5, 6, 97])
def test_decode_exact_page_edges(n):
    """Lengths at and around page boundaries, page size 5, batch 17."""
    _check("float32", 8, 2, 64, 5, [n + i % 3 for i in range(17)], seed=n)


def test_decode_long_context_uses_splits():
    """Batch 1 with 16K tokens: split over the KV range and merged by LSE."""
    seq = [16384 + 3]
    plan = tp.plan_decode(torch.zeros(1, 1026, dtype=torch.int32), torch.tensor(seq, dtype=torch.int32),
                          page_size=16, num_pages=1026)
    if tp.plan._num_threads() > 1 and DEVICE.type == "cpu":
        assert plan.num_splits > 1
    _check("float16", 32, 8, 128, 16, seq, seed=3)


def test_decode_vllm_style_pool():
    """vLLM's test: 4321-page pool, table entries drawn with replacement, one sequence at the maximum."""
    rng = np.random.default_rng(5)
    lens = [int(x) for x in rng.integers(1, 1000, size=6)] + [1024]
    _check("float32", 8, 2, 64, 16, lens, seed=5, with_replacement=True, num_pages=4321)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_extreme_logits_return_v(dtype):
    """Logits around -5e5: a -5e4 'minus infinity' start would return zeros or NaN; equal logits must give the
    mean of V (the reference's), a single token exactly that token's V."""
    hq, hkv, d, p = 4, 1, 64, 8
    lens = [1, 13]
    k, v, bt, sl = make_pool(lens, page_size=p, num_kv_heads=hkv, head_dim=d, dtype=dtype, seed=9)
    direction = torch.ones(d, dtype=torch.float64) / d ** 0.5
    q = (-(2 ** 10) * direction).expand(2, hq, d).to(k.dtype).contiguous().to(k.device)
    # q . k * d**-0.5 = -2**10 * 2**9 * 8 / 8 ... = about -5.2e5 for every key
    k_rows = (2 ** 9 * direction * d ** 0.5).to(k.dtype).to(k.device)
    used = ~torch.isnan(k[..., 0, 0])
    k[used] = k_rows
    out = tp.paged_decode(q, k, v, bt, sl)
    logit = float((q[0, 0].double() @ k_rows.double()) * d ** -0.5)
    assert logit < -4e5
    ref, _ = reference.decode(q, k, v, bt, sl)
    assert_close(out, ref, ATOL[dtype])
    first = int(bt[0, 0])
    assert torch.equal(out[0, 0], v[first, 0, 0])


@cpu_only
def test_numpy_and_unaligned_inputs():
    """numpy arrays in, numpy out; torch.from_numpy views and a 1-element-offset slice are not 64-byte aligned."""
    k, v, bt, sl = make_pool([7, 33, 5], page_size=5, num_kv_heads=2, head_dim=64, seed=11)
    q = random_q(3, 4, 64, seed=12)
    ref, _ = reference.decode(q, k, v, bt, sl)
    out = tp.paged_decode(q.numpy(), k.numpy(), v.numpy(), bt.numpy(), sl.numpy())
    assert isinstance(out, np.ndarray)
    assert_close(torch.from_numpy(out), ref, ATOL["float32"])
    big = torch.cat([torch.zeros(1), q.flatten()])[1:].view(q.shape)  # storage offset of 4 bytes
    out = tp.paged_decode(big, k, v, bt.long(), sl.long())  # int64 tables are narrowed
    assert_close(out, ref, ATOL["float32"])


def test_scale_and_plan_reuse():
    k, v, bt, sl = make_pool([9, 40], page_size=8, num_kv_heads=2, head_dim=64, seed=13)
    q = random_q(2, 4, 64, seed=14)
    plan = tp.plan_decode(bt, sl, page_size=8, num_pages=k.shape[0])
    for scale in (0.05, 0.3):
        out = tp.run_decode(plan, q, k, v, scale=scale)
        ref, _ = reference.decode(q, k, v, bt, sl, scale=scale)
        assert_close(out, ref, ATOL["float32"])


@cpu_only
def test_every_knob_value_is_correct():
    """Correctness never depends on tuning: each value of each tunable knob, against the reference."""
    from tvm_paged import build, targets
    from tvm_paged.kernels import knob_space

    cfg = tp.KernelConfig("decode", "float32", 8, 2, 64, 5)
    target = targets.local_target()
    k, v, bt, sl = make_pool([1, 17, 33, 97], page_size=5, num_kv_heads=2, head_dim=64, seed=21)
    q = random_q(4, 8, 64, seed=22)
    ref, _ = reference.decode(q, k, v, bt, sl)
    space = knob_space(cfg, target)
    assert space
    for knob, values in space.items():
        for value in values[1:]:
            fn = build.compile_kernel(cfg, target, knobs={knob: value}).mod[cfg.name]
            out = torch.empty_like(q)
            lse = torch.empty(4, 8)
            fn(q, k, v, bt, sl, out, lse, torch.empty(4, 2, 8, 64), torch.empty(4, 2, 8, 2), 64 ** -0.5, 0)
            assert_close(out, ref, ATOL["float32"], f"{knob}={value}")
