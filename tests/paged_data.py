"""Random paged pools for the tests: fragmented page tables, NaN in every slot no sequence uses, and the
one tolerance table.

``TVM_PAGED_TEST_DEVICE=cuda`` puts the pools and queries on the GPU, so the same grids check the CUDA kernels
on a machine that has one (``tools/gpu_check.sh``); the reference always runs on the CPU in float64.
"""

from __future__ import annotations

import functools
import os

import numpy as np
import pytest
import torch

DEVICE = torch.device(os.environ.get("TVM_PAGED_TEST_DEVICE", "cpu"))
# Tests of CPU-only paths (numpy in and out, calling a compiled CPU kernel directly, the CPU builders' knobs).
cpu_only = pytest.mark.skipif(DEVICE.type != "cpu", reason="a CPU path; TVM_PAGED_TEST_DEVICE selects another")

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

# Absolute error the kernels' float32 arithmetic may add to the float64 reference, for outputs of unit-scale random
# data (vLLM and FlashInfer test at 1e-3). The reference reads the same stored q, K and V, and products of fp16 or
# bf16 values are exact in float32, so every dtype gets the same bound; an fp16 or bf16 output may in addition be
# off by the final rounding to its dtype, half a unit in the last place, which assert_close allows. The LSE is
# float32 in every dtype.
ATOL = {"float32": 2e-5, "float16": 2e-5, "bfloat16": 2e-5}
LSE_ATOL = {"float32": 2e-5, "float16": 2e-5, "bfloat16": 2e-5}


def make_pool(seq_lens, *, page_size, num_kv_heads, head_dim, dtype="float32", extra_pages=3, nan_fill=True,
              with_replacement=False, num_pages=None, seed=0):
    """A pool holding ``len(seq_lens)`` sequences on shuffled pages.

    Returns ``k_cache, v_cache`` [num_pages, page_size, num_kv_heads, head_dim] (``dtype``), ``block_table``
    [batch, max_pages] int32 (-1 past each sequence's last page), ``seq_lens`` [batch] int32.
    Distinct pages (default): slots past each sequence's length and unused pages hold NaN (``nan_fill``).
    ``with_replacement``: table entries drawn with replacement from a pool of ``num_pages`` (vLLM's test);
    then every slot of a referenced page holds data and only unreferenced pages hold NaN.
    """
    gen = torch.Generator().manual_seed(seed)
    seq_lens = np.asarray(seq_lens, dtype=np.int64)
    pages_per_seq = -(-seq_lens // page_size)
    max_pages = int(pages_per_seq.max())
    needed = int(pages_per_seq.sum())
    if num_pages is None:
        num_pages = needed + extra_pages
    shape = (num_pages, page_size, num_kv_heads, head_dim)
    k = torch.randn(shape, generator=gen, dtype=torch.float64)
    v = torch.randn(shape, generator=gen, dtype=torch.float64)
    table = np.full((len(seq_lens), max_pages), -1, dtype=np.int32)
    rng = np.random.default_rng(seed)
    if with_replacement:
        flat = rng.integers(0, num_pages, size=needed)
    else:
        flat = rng.permutation(num_pages)[:needed]
    used = np.zeros(shape[:2], dtype=bool)
    pos = 0
    for b, n in enumerate(pages_per_seq):
        table[b, :n] = flat[pos:pos + n]
        pos += n
        if with_replacement:
            used[table[b, :n]] = True
        else:
            for i, page in enumerate(table[b, :n]):
                used[page, : min(page_size, seq_lens[b] - i * page_size)] = True
    if nan_fill:
        k[~torch.from_numpy(used)] = float("nan")
        v[~torch.from_numpy(used)] = float("nan")
    dt = DTYPES[dtype]
    return (k.to(dt).to(DEVICE), v.to(dt).to(DEVICE), torch.from_numpy(table).to(DEVICE),
            torch.from_numpy(seq_lens.astype(np.int32)).to(DEVICE))


def random_q(rows, num_qo_heads, head_dim, dtype="float32", seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(rows, num_qo_heads, head_dim, generator=gen, dtype=torch.float64).to(DTYPES[dtype]).to(DEVICE)


# On a CPU with AMX-BF16, bfloat16 prefill (bfloat16 cache, head_dim a multiple of 64) multiplies P.V on tiles whose
# inputs are bfloat16: each softmax weight is rounded to 8 bits first, a relative error up to 2^-9 of each term
# of the weighted sum of V, so its outputs get the bound bfloat16 storage had before they were checked in ulps.
AMX_BF16_ATOL = 3e-2


@functools.lru_cache(maxsize=None)
def _host_has_amx_bf16() -> bool:
    from tvm_paged import targets

    return targets.cpu_has_feature("amx-bf16", targets.local_target())


def prefill_atol(dtype: str, head_dim: int, kv_dtype: str | None = None) -> float:
    """``ATOL[dtype]``, or :data:`AMX_BF16_ATOL` where this host runs the prefill configuration on AMX tiles."""
    import tvm_paged as tp
    from tvm_paged.kernels.prefill_cpu import amx_applies

    cfg = tp.KernelConfig("prefill", dtype, 1, 1, head_dim, 1, kv_dtype)
    if DEVICE.type == "cpu" and amx_applies(cfg) and _host_has_amx_bf16():
        return AMX_BF16_ATOL
    return ATOL[dtype]


# Mantissa bits and smallest normal exponent of the dtypes an output is rounded to.
_ROUNDING = {torch.float16: (10, -14), torch.bfloat16: (7, -126)}


def half_ulp(expected: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Per element, half a unit in the last place of ``expected`` stored in ``dtype`` (0 for float32 and wider):
    the most that rounding the exact value to ``dtype`` changes it."""
    if dtype not in _ROUNDING:
        return torch.zeros_like(expected, dtype=torch.float64)
    mantissa, min_exp = _ROUNDING[dtype]
    _, exp = torch.frexp(expected.double())  # |x| in [2^(exp-1), 2^exp)
    return torch.pow(2.0, torch.clamp(exp - 1, min=min_exp).double() - mantissa - 1)


def assert_close(actual, expected, atol, what="out"):
    """``actual`` (the kernel's output) within ``atol`` of the float64 ``expected`` in every element, plus, for an
    fp16 or bf16 ``actual``, half a unit in the last place of ``expected`` in that dtype. Shapes must match."""
    actual = torch.as_tensor(actual).cpu()
    expected = torch.as_tensor(expected).cpu().double()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)}, expected {tuple(expected.shape)}"
    assert not torch.isnan(actual).any(), f"{what}: NaN in the kernel's output"
    bound = atol + half_ulp(expected, actual.dtype)
    err = (actual.double() - expected).abs()
    worst = int(torch.argmax(err - bound))
    excess = (err - bound).flatten()[worst].item()
    assert excess <= 0, (f"{what}: {int((err > bound).sum())} elements off; the worst by "
                         f"{err.flatten()[worst].item():.3g} > {bound.flatten()[worst].item():.3g} at expected value "
                         f"{expected.flatten()[worst].item():.6g}")


# ===================================================================================== attention variants
FP8_DTYPES = {"float8_e4m3fn": torch.float8_e4m3fn, "float8_e5m2": torch.float8_e5m2}


def alibi_slopes(num_heads: int, device=None) -> torch.Tensor:
    """The standard ALiBi slopes (Press et al.; HF ``build_alibi_tensor``) as a float32 ``[num_heads]`` tensor:
    ``2^(-8(h+1)/n)`` for ``n`` a power of two; otherwise those of the largest power of two below ``n`` followed by
    every other slope of twice that power."""
    closest = 2 ** int(np.floor(np.log2(num_heads)))
    base = 2.0 ** (-(2.0 ** -(np.log2(closest) - 3)))
    slopes = [base ** p for p in range(1, closest + 1)]
    if closest != num_heads:
        extra_base = 2.0 ** (-(2.0 ** -(np.log2(2 * closest) - 3)))
        remaining = min(closest, num_heads - closest)
        slopes += [extra_base ** p for p in range(1, 2 * remaining, 2)]
    return torch.tensor(slopes, dtype=torch.float32, device=DEVICE if device is None else device)


def quantize_pool(k_cache, v_cache, kv_dtype, k_scale=1.0, v_scale=1.0):
    """Caches of any float dtype quantized the way write_kv stores them (``reference.quantize_kv``), on DEVICE.
    NaN slots stay NaN codes (both 8-bit formats have NaN)."""
    from tvm_paged import reference

    kv_dtype = FP8_DTYPES.get(kv_dtype, kv_dtype)
    out = []
    for cache, scale in ((k_cache, k_scale), (v_cache, v_scale)):
        flat = cache.reshape(-1, *cache.shape[2:])
        q = reference.quantize_kv(flat, kv_dtype, scale).reshape(cache.shape)
        assert torch.equal(torch.isnan(q.float()), torch.isnan(cache.float().cpu())), "quantize_pool: NaN moved"
        out.append(q.to(DEVICE))
    return tuple(out)


def make_variant_pool(seq_lens, *, page_size, num_kv_heads, head_dim, dtype="float32", kv_dtype=None,
                      k_scale=1.0, v_scale=1.0, bound=3.0, seed=0, **pool_kw):
    """:func:`make_pool` with K and V clamped to ``[-bound, bound]`` (random, never zero, NaN in every unused slot;
    the bound keeps a peaked softmax's output where the out dtype's rounding is below ``ATOL``), the caches in
    ``dtype`` or, with ``kv_dtype`` (a float8 name or dtype), quantized from float32 data divided by the scales.
    Returns ``k_cache, v_cache, block_table, seq_lens`` as make_pool."""
    base = "float32" if kv_dtype is not None else dtype
    k, v, bt, sl = make_pool(seq_lens, page_size=page_size, num_kv_heads=num_kv_heads, head_dim=head_dim,
                             dtype=base, seed=seed, **pool_kw)
    k, v = k.clamp(-bound, bound), v.clamp(-bound, bound)  # clamp keeps NaN
    if kv_dtype is not None:
        k, v = quantize_pool(k, v, kv_dtype, k_scale, v_scale)
    return k, v, bt, sl


def pool_from_sequences(kvs, *, page_size, cache_dtype, extra_pages=3, seed=0):
    """A pool holding the given sequences, each on its own shuffled pages (``seed`` picks the placement), NaN in
    every other slot. ``kvs``: ``(k, v)`` pairs ``[n, num_kv_heads, head_dim]`` whose values ``cache_dtype`` (a
    torch dtype, float8 included) holds exactly. Returns ``k_cache, v_cache, block_table, seq_lens`` on DEVICE."""
    lens = [int(k.shape[0]) for k, _ in kvs]
    hkv, d = kvs[0][0].shape[1:]
    pages_per_seq = [-(-n // page_size) for n in lens]
    num_pages = sum(pages_per_seq) + extra_pages
    order = np.random.default_rng(seed).permutation(num_pages)
    kc = torch.full((num_pages, page_size, hkv, d), float("nan"), dtype=torch.float32)
    vc = kc.clone()
    table = np.full((len(kvs), max(pages_per_seq)), -1, dtype=np.int32)
    pos = 0
    for b, ((k, v), n) in enumerate(zip(kvs, pages_per_seq)):
        table[b, :n] = order[pos:pos + n]
        pos += n
        for i in range(n):
            rows = slice(i * page_size, min((i + 1) * page_size, lens[b]))
            kc[table[b, i], : rows.stop - rows.start] = k[rows].float().cpu()
            vc[table[b, i], : rows.stop - rows.start] = v[rows].float().cpu()
    kc, vc = kc.to(cache_dtype), vc.to(cache_dtype)
    for (k, _), n in zip(kvs, lens):  # the values must survive the round trip exactly
        assert k.dtype == cache_dtype or torch.equal(k.to(cache_dtype).float(), k.float()), "not exact in cache"
    return (kc.to(DEVICE), vc.to(DEVICE), torch.from_numpy(table).to(DEVICE),
            torch.tensor(lens, dtype=torch.int32, device=DEVICE))


def dense_table(lens):
    """A page-size-1 table over tokens stored back to back (sequence b's tokens after those of b - 1)."""
    table = torch.full((len(lens), max(lens)), -1, dtype=torch.int32)
    start = 0
    for b, n in enumerate(lens):
        table[b, :n] = torch.arange(start, start + n)
        start += n
    return table
