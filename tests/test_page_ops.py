"""write_kv and copy_pages against plain torch indexing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import tvm_paged as tp
from paged_data import DEVICE, DTYPES, cpu_only


@pytest.mark.parametrize("dtype,hkv,d,p", [("float32", 2, 64, 5), ("float16", 8, 128, 16), ("bfloat16", 1, 80, 1),
                                          ("float32", 4, 256, 32)])
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_write_kv(dtype, hkv, d, p, index_dtype):
    torch.manual_seed(0)
    num_pages = 11
    kc = torch.full((num_pages, p, hkv, d), float("nan"), dtype=DTYPES[dtype], device=DEVICE)
    vc = kc.clone()
    n = 17 if p > 1 else 9
    slots = torch.randperm(num_pages * p)[:n]
    slots[3] = -1  # a padding token is skipped
    k = torch.randn(n, hkv, d).to(kc.dtype).to(DEVICE)
    v = torch.randn(n, hkv, d).to(kc.dtype).to(DEVICE)
    expect_k, expect_v = kc.clone(), vc.clone()
    live = slots >= 0
    expect_k.view(-1, hkv, d)[slots[live].to(DEVICE)] = k[live.to(DEVICE)]
    expect_v.view(-1, hkv, d)[slots[live].to(DEVICE)] = v[live.to(DEVICE)]
    tp.write_kv(k, v, kc, vc, slots.to(index_dtype).to(DEVICE))
    assert torch.equal(kc.nan_to_num(7.0), expect_k.nan_to_num(7.0))
    assert torch.equal(vc.nan_to_num(7.0), expect_v.nan_to_num(7.0))


@pytest.mark.parametrize("dtype,hkv,d,p", [("float32", 2, 64, 5), ("float16", 8, 128, 16), ("bfloat16", 3, 80, 1)])
def test_copy_pages(dtype, hkv, d, p):
    """Pages copied whole, a source copied twice; the pages not written keep their values, NaN slots included
    (a NaN in a copied page's unused slot travels with it)."""
    torch.manual_seed(1)
    kc = torch.randn(13, p, hkv, d).to(DTYPES[dtype]).to(DEVICE)
    vc = torch.randn(13, p, hkv, d).to(DTYPES[dtype]).to(DEVICE)
    kc[4, -1], vc[6, 0] = float("nan"), float("nan")  # an unused slot of a source page and of an untouched page
    src = torch.tensor([0, 4, 4, 9], dtype=torch.int32)
    dst = torch.tensor([12, 1, 2, 3], dtype=torch.int32)
    expect_k, expect_v = kc.clone(), vc.clone()
    expect_k[dst.long()] = kc[src.long()]
    expect_v[dst.long()] = vc[src.long()]
    tp.copy_pages(kc, vc, src.to(DEVICE), dst.to(DEVICE))
    assert torch.equal(kc.nan_to_num(7.0), expect_k.nan_to_num(7.0))
    assert torch.equal(vc.nan_to_num(7.0), expect_v.nan_to_num(7.0))
    assert torch.isnan(kc[1, -1]).all() and torch.isnan(kc[2, -1]).all() and torch.isnan(vc[6, 0]).all()


@cpu_only
def test_numpy_caches_are_written_in_place():
    kc = np.zeros((4, 5, 2, 64), dtype=np.float32)
    vc = np.zeros_like(kc)
    k = np.ones((2, 2, 64), dtype=np.float32)
    tp.write_kv(k, 2 * k, kc, vc, np.array([0, 19], dtype=np.int64))
    assert kc[0, 0].min() == 1 and vc[3, 4].min() == 2 and kc.sum() == 2 * 2 * 64
    tp.copy_pages(kc, vc, np.array([3], dtype=np.int32), np.array([1], dtype=np.int32))
    assert (vc[1] == vc[3]).all()
