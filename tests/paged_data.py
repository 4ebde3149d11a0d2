"""Random paged pools for the tests: fragmented page tables, NaN in every slot no sequence uses, and the
one tolerance table.

``TVM_PAGED_TEST_DEVICE=cuda`` puts the pools and queries on the GPU, so the same grids check the CUDA kernels
on a machine that has one (``tools/gpu_check.sh``); the reference always runs on the CPU in float64.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

DEVICE = torch.device(os.environ.get("TVM_PAGED_TEST_DEVICE", "cpu"))
# Tests of CPU-only paths (numpy in and out, calling a compiled CPU kernel directly, the CPU builders' knobs).
cpu_only = pytest.mark.skipif(DEVICE.type != "cpu", reason="a CPU path; TVM_PAGED_TEST_DEVICE selects another")

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

# Absolute tolerance against the float64 reference, for outputs of unit-scale random data (vLLM and FlashInfer
# test at 1e-3 against fp32; fp16/bf16 lose bits in q, K and V storage and in the output cast).
ATOL = {"float32": 2e-5, "float16": 4e-3, "bfloat16": 3e-2}
LSE_ATOL = {"float32": 2e-5, "float16": 3e-3, "bfloat16": 2e-2}


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


def assert_close(actual, expected, atol, what="out"):
    actual = torch.as_tensor(actual).double().cpu()
    expected = torch.as_tensor(expected).cpu()
    assert not torch.isnan(actual).any(), f"{what}: NaN in the kernel's output"
    err = (actual - expected).abs().max().item()
    assert err <= atol, f"{what}: max abs error {err:.3g} > {atol:.3g}"
