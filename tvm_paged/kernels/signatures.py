"""The tensor arguments of each kernel family, defined once for its CPU and CUDA builders.

Each function returns the buffer types of one kernel's tensor parameters, in parameter order, plus its symbolic
dimensions (fresh variables per call: two kernels never share one). A builder annotates its ``@T.prim_func``
parameters with them (``def decode(Q: a.q, K: a.k_cache, ...)``) and uses the dimensions in its loops.

Every tensor is aligned to its element size only: torch.from_numpy and sliced tensors are not 64-byte aligned.

    decode:     q [B, Hq, D], k_cache / v_cache [P, S, Hkv, D] (dtype); block_table [B, M], seq_lens [B] int32;
                out [B, Hq, D] (dtype); lse [B, Hq], o_part [B, NS, Hq, D], lse_part [B, NS, Hq] float32
    prefill:    q [TQ, Hq, D], caches; block_table [B, M], seq_lens [B], cu_seqlens_q [B + 1],
                tiles [NT, 3] int32; out [TQ, Hq, D]; lse [TQ, Hq] float32
    write_kv:   k, v [N, Hkv, D]; caches; slot_mapping [N] int64
    copy_pages: caches; src_pages, dst_pages [C] int32
"""

from __future__ import annotations

from types import SimpleNamespace

from ..config import KernelConfig
from ..tvm_compat import T, shape_var


def _dims(*names: str) -> dict:
    return {n: shape_var(n) for n in names}


def _tensor(shape, dtype: str, itemsize: int):
    return T.Buffer(shape, dtype, align=itemsize)


def _caches(cfg: KernelConfig, P) -> dict:
    shape = (P, cfg.page_size, cfg.num_kv_heads, cfg.head_dim)
    return {"k_cache": _tensor(shape, cfg.dtype, cfg.itemsize), "v_cache": _tensor(shape, cfg.dtype, cfg.itemsize)}


def decode_args(cfg: KernelConfig) -> SimpleNamespace:
    """q, k_cache, v_cache, block_table, seq_lens, out, lse, o_part, lse_part; dims B, P, M, NS (splits)."""
    d = _dims("B", "P", "M", "NS")
    B, NS, Hq, D = d["B"], d["NS"], cfg.num_qo_heads, cfg.head_dim
    return SimpleNamespace(
        **d,
        q=_tensor((B, Hq, D), cfg.dtype, cfg.itemsize),
        **_caches(cfg, d["P"]),
        block_table=_tensor((B, d["M"]), "int32", 4),
        seq_lens=_tensor((B,), "int32", 4),
        out=_tensor((B, Hq, D), cfg.dtype, cfg.itemsize),
        lse=_tensor((B, Hq), "float32", 4),
        o_part=_tensor((B, NS, Hq, D), "float32", 4),
        lse_part=_tensor((B, NS, Hq), "float32", 4),
    )


def prefill_args(cfg: KernelConfig) -> SimpleNamespace:
    """q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q, tiles, out, lse; dims TQ (query rows), P, B, M,
    NT (tiles)."""
    d = _dims("TQ", "P", "B", "M", "NT")
    TQ, B, Hq, D = d["TQ"], d["B"], cfg.num_qo_heads, cfg.head_dim
    return SimpleNamespace(
        **d,
        q=_tensor((TQ, Hq, D), cfg.dtype, cfg.itemsize),
        **_caches(cfg, d["P"]),
        block_table=_tensor((B, d["M"]), "int32", 4),
        seq_lens=_tensor((B,), "int32", 4),
        cu_seqlens_q=_tensor((B + 1,), "int32", 4),
        tiles=_tensor((d["NT"], 3), "int32", 4),
        out=_tensor((TQ, Hq, D), cfg.dtype, cfg.itemsize),
        lse=_tensor((TQ, Hq), "float32", 4),
    )


def write_kv_args(cfg: KernelConfig) -> SimpleNamespace:
    """k, v, k_cache, v_cache, slot_mapping; dims N (tokens), P."""
    d = _dims("N", "P")
    rows = (d["N"], cfg.num_kv_heads, cfg.head_dim)
    return SimpleNamespace(
        **d,
        k=_tensor(rows, cfg.dtype, cfg.itemsize),
        v=_tensor(rows, cfg.dtype, cfg.itemsize),
        **_caches(cfg, d["P"]),
        slot_mapping=_tensor((d["N"],), "int64", 8),
    )


def copy_pages_args(cfg: KernelConfig) -> SimpleNamespace:
    """k_cache, v_cache, src_pages, dst_pages; dims P, C (copies)."""
    d = _dims("P", "C")
    return SimpleNamespace(
        **d,
        **_caches(cfg, d["P"]),
        src_pages=_tensor((d["C"],), "int32", 4),
        dst_pages=_tensor((d["C"],), "int32", 4),
    )
