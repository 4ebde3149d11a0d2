"""The functional API: validate, plan, then call the compiled kernel.

Cache layout, one for the whole project: ``k_cache``, ``v_cache`` ``[num_pages, page_size, num_kv_heads,
head_dim]``. Arguments may be torch tensors (zero copy) or numpy arrays; results come back in the type of ``q``.
Attention is split FlashInfer-style into a plan (built once per batch: checks the page table and lengths,
picks the KV split) and a run (once per layer). ``paged_decode`` / ``paged_prefill`` do both.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from dataclasses import dataclass

import numpy as np
import torch

from . import build, targets
from . import validate as V
from .config import KernelConfig

# Split-KV: a task never gets fewer than this many pages' worth of tokens (merging has a cost).
_MIN_SPLIT_TOKENS = 256
# Rows of queries one prefill task handles (the CPU kernel's tile; see kernels/prefill_cpu.py).
PREFILL_Q_TILE = 16


@dataclass(frozen=True)
class AttentionPlan:
    """A validated batch: page table, lengths and the work split, reusable across layers.

    ``block_table`` [batch, max_pages_per_seq] int32, ``seq_lens`` [batch] int32 (contiguous, on the caches'
    device). Decode: ``num_splits`` KV splits per sequence. Prefill: ``cu_seqlens_q`` [batch + 1] int32 and
    ``tiles`` [num_tiles, 3] int32 rows of (sequence, first query row, end query row) relative to the sequence.
    """

    block_table: torch.Tensor
    seq_lens: torch.Tensor
    page_size: int
    num_pages: int
    num_splits: int = 1
    cu_seqlens_q: torch.Tensor | None = None
    tiles: torch.Tensor | None = None

    @property
    def batch(self) -> int:
        return int(self.block_table.shape[0])


# Where run_* / write_kv / copy_pages get their compiled kernel: ``provider(cfg, device) -> callable``. None (the
# default) compiles on demand through build.get_kernel; tvm_paged.loader installs a library's kernels instead.
_KERNEL_PROVIDER: contextvars.ContextVar = contextvars.ContextVar("tvm_paged_kernel_provider", default=None)


@contextlib.contextmanager
def use_kernels(provider):
    """Within the block (this thread/context only), kernels come from ``provider(cfg, device)`` instead of
    being compiled; validation is unchanged."""
    token = _KERNEL_PROVIDER.set(provider)
    try:
        yield
    finally:
        _KERNEL_PROVIDER.reset(token)


def _kernel(cfg: KernelConfig, device: torch.device, plan: AttentionPlan | None = None):
    provider = _KERNEL_PROVIDER.get()
    if provider is not None:
        return provider(cfg, device)
    if plan is None:
        return build.get_kernel(cfg, targets.target_for_device(device))
    # Attention kernels take the schedule tuned for the bucket nearest this batch.
    return build.get_kernel(cfg, targets.target_for_device(device), batch=plan.batch,
                            max_pages=int(plan.block_table.shape[1]))


def _num_threads() -> int:
    import os

    try:
        return max(1, int(os.environ.get("TVM_NUM_THREADS", "0")))
    except ValueError:
        return 1


def choose_num_splits(seq_lens: np.ndarray, page_size: int, device: torch.device) -> int:
    """Enough (sequence, split) tasks to keep every core busy, none shorter than ``_MIN_SPLIT_TOKENS``."""
    if device.type != "cpu":
        workers = 132  # streaming multiprocessors of a large GPU; over-splitting a small one is harmless
    else:
        workers = _num_threads()
    batch = len(seq_lens)
    want = math.ceil(2 * workers / batch) if batch < 2 * workers else 1
    longest = int(seq_lens.max())
    cap = max(1, longest // max(_MIN_SPLIT_TOKENS, page_size))
    return int(max(1, min(want, cap)))


def plan_decode(block_table, seq_lens, *, page_size: int, num_pages: int, device=None) -> AttentionPlan:
    """Validate a decode batch against a pool of ``num_pages`` pages of ``page_size`` tokens."""
    bt = V.index_array(block_table, "block_table", 2, "[batch, max_pages_per_seq]")
    sl = V.index_array(seq_lens, "seq_lens", 1, "[batch]")
    V.check_block_table(bt, sl, page_size, num_pages)
    device = torch.device(device) if device is not None else bt.device
    splits = choose_num_splits(sl.cpu().numpy(), page_size, device)
    return AttentionPlan(bt.to(device), sl.to(device), page_size, num_pages, num_splits=splits)


def plan_prefill(block_table, seq_lens, cu_seqlens_q, total_q: int, *, page_size: int, num_pages: int,
                 device=None) -> AttentionPlan:
    """Validate a (chunked) prefill batch; ``total_q`` is the number of query rows."""
    bt = V.index_array(block_table, "block_table", 2, "[batch, max_pages_per_seq]")
    sl = V.index_array(seq_lens, "seq_lens", 1, "[batch]")
    cu = V.index_array(cu_seqlens_q, "cu_seqlens_q", 1, "[batch + 1]")
    V.check_block_table(bt, sl, page_size, num_pages)
    q_lens = V.check_cu_seqlens(cu, bt.shape[0], total_q, sl)
    tiles = [(b, r, min(r + PREFILL_Q_TILE, n)) for b, n in enumerate(q_lens) for r in range(0, n, PREFILL_Q_TILE)]
    # An empty tensor built from an empty array gets zero strides, which TVM rejects: build it directly.
    tiles_t = torch.tensor(tiles, dtype=torch.int32) if tiles else torch.zeros((0, 3), dtype=torch.int32)
    device = torch.device(device) if device is not None else bt.device
    return AttentionPlan(bt.to(device), sl.to(device), page_size, num_pages,
                         cu_seqlens_q=cu.to(device), tiles=tiles_t.to(device))


def _check_q(q: torch.Tensor, k_cache: torch.Tensor, rows: int | None, rows_name: str):
    """q against the (already checked) caches: rank, heads, head_dim, dtype, device, row count."""
    V.check_rank(q, 3, "q", f"[{rows_name}, num_qo_heads, head_dim]")
    _, _, num_kv_heads, head_dim = k_cache.shape
    if q.shape[2] != head_dim:
        raise ValueError(f"q: head_dim {q.shape[2]} does not match the caches' head_dim {head_dim}")
    if q.shape[1] % num_kv_heads:
        raise ValueError(f"q: num_qo_heads {q.shape[1]} is not a multiple of the caches' num_kv_heads {num_kv_heads}")
    if q.dtype != k_cache.dtype:
        raise ValueError(f"q: dtype {q.dtype} differs from the caches' {k_cache.dtype}")
    if q.device != k_cache.device:
        raise ValueError(f"q: device {q.device} differs from the caches' {k_cache.device}")
    if rows is not None and q.shape[0] != rows:
        raise ValueError(f"q: expected {rows} rows ({rows_name}), got {q.shape[0]}")


def _operands(plan: AttentionPlan, q, k_cache, v_cache, rows: int, rows_name: str):
    """q and the caches as tensors, checked against each other and the plan -> (q, k_cache, v_cache, head_dim)."""
    q, kc, vc = V.as_tensor(q, "q"), V.as_tensor(k_cache, "k_cache"), V.as_tensor(v_cache, "v_cache")
    num_pages, page_size, _, head_dim = V.check_cache_pair(kc, vc)
    _check_q(q, kc, rows, rows_name)
    if (num_pages, page_size) != (plan.num_pages, plan.page_size):
        raise ValueError(f"k_cache: pool ({num_pages} pages of {page_size}) differs from the plan's "
                         f"({plan.num_pages} of {plan.page_size})")
    if plan.block_table.device != kc.device:
        raise ValueError(f"plan: built for {plan.block_table.device}, the caches are on {kc.device}")
    return q, kc, vc, head_dim


def _config(kernel: str, q: torch.Tensor, k_cache: torch.Tensor) -> KernelConfig:
    _, page_size, num_kv_heads, head_dim = k_cache.shape
    return KernelConfig(kernel, V.dtype_name(q, "q"), int(q.shape[1]), int(num_kv_heads), int(head_dim),
                        int(page_size))


def _scale(scale, head_dim: int) -> float:
    if scale is None:
        return head_dim ** -0.5
    scale = float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"scale: must be finite, got {scale}")
    return scale


def _output(result: torch.Tensor, like) -> torch.Tensor | np.ndarray:
    if isinstance(like, np.ndarray):
        if result.dtype == torch.bfloat16:
            return result  # numpy has no bfloat16 of its own
        return result.numpy()
    return result


def run_decode(plan: AttentionPlan, q, k_cache, v_cache, *, scale=None, return_lse=False):
    """Decode attention for a planned batch. ``q`` [batch, num_qo_heads, head_dim] -> out, same shape and dtype
    (and ``lse`` [batch, num_qo_heads] float32 when ``return_lse``)."""
    q_in = q
    q, kc, vc, head_dim = _operands(plan, q, k_cache, v_cache, plan.batch, "batch")
    cfg = _config("decode", q, kc)
    fn = _kernel(cfg, q.device, plan)
    q = q.contiguous()
    batch, hq, _ = q.shape
    out = torch.empty_like(q)
    lse = torch.empty(batch, hq, dtype=torch.float32, device=q.device)
    o_part = torch.empty(batch, plan.num_splits, hq, head_dim, dtype=torch.float32, device=q.device)
    lse_part = torch.empty(batch, plan.num_splits, hq, dtype=torch.float32, device=q.device)
    fn(q, kc, vc, plan.block_table, plan.seq_lens, out, lse, o_part, lse_part, _scale(scale, head_dim))
    out = _output(out, q_in)
    return (out, _output(lse, q_in)) if return_lse else out


def run_prefill(plan: AttentionPlan, q, k_cache, v_cache, *, scale=None, causal=True, return_lse=False):
    """Prefill attention for a planned batch. ``q`` [total_q, num_qo_heads, head_dim] -> out, same shape."""
    q_in = q
    if plan.cu_seqlens_q is None:
        raise ValueError("plan: a decode plan was given to run_prefill (use plan_prefill)")
    q, kc, vc, head_dim = _operands(plan, q, k_cache, v_cache, int(plan.cu_seqlens_q[-1]), "total_q")
    cfg = _config("prefill", q, kc)
    fn = _kernel(cfg, q.device, plan)
    q = q.contiguous()
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[0], q.shape[1], dtype=torch.float32, device=q.device)
    fn(q, kc, vc, plan.block_table, plan.seq_lens, plan.cu_seqlens_q, plan.tiles, out, lse,
       _scale(scale, head_dim), int(bool(causal)))
    out = _output(out, q_in)
    return (out, _output(lse, q_in)) if return_lse else out


def paged_decode(q, k_cache, v_cache, block_table, seq_lens, *, scale=None, return_lse=False):
    """Decode attention over a paged KV cache: one query token per sequence.

    Args:
        q: ``[batch, num_qo_heads, head_dim]`` float32/float16/bfloat16.
        k_cache, v_cache: ``[num_pages, page_size, num_kv_heads, head_dim]``, q's dtype, contiguous.
        block_table: ``[batch, max_pages_per_seq]`` int32; entries past a sequence's last page are ignored.
        seq_lens: ``[batch]`` int32, tokens in the cache (the query's own token included), each >= 1.
        scale: softmax scale, default ``head_dim ** -0.5``.
        return_lse: also return ``lse`` ``[batch, num_qo_heads]`` float32 (natural log of the softmax
            denominator, max folded in).
    Returns:
        ``out`` ``[batch, num_qo_heads, head_dim]`` in q's dtype, or ``(out, lse)``.
    """
    kc = V.as_tensor(k_cache, "k_cache")
    num_pages, page_size, _, _ = V.check_cache_pair(kc, V.as_tensor(v_cache, "v_cache"))
    plan = plan_decode(block_table, seq_lens, page_size=page_size, num_pages=num_pages, device=kc.device)
    return run_decode(plan, q, k_cache, v_cache, scale=scale, return_lse=return_lse)


def paged_prefill(q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q, *, scale=None, causal=True,
                  return_lse=False):
    """Prefill (or chunked prefill) attention over a paged KV cache.

    Args:
        q: ``[total_q, num_qo_heads, head_dim]``; rows ``cu_seqlens_q[b]:cu_seqlens_q[b+1]`` belong to sequence
            ``b``, and its query ``i`` sits at position ``seq_lens[b] - q_len_b + i`` (the last ``q_len_b`` tokens
            of the cache), so prefill against an already cached prefix is the same call.
        k_cache, v_cache, block_table, seq_lens, scale: as in :func:`paged_decode`.
        cu_seqlens_q: ``[batch + 1]`` int32, monotone, from 0 to ``total_q``.
        causal: a query sees only keys at or before its own position (default); otherwise every cached key.
        return_lse: also return ``lse`` ``[total_q, num_qo_heads]`` float32.
    """
    kc = V.as_tensor(k_cache, "k_cache")
    num_pages, page_size, _, _ = V.check_cache_pair(kc, V.as_tensor(v_cache, "v_cache"))
    qt = V.as_tensor(q, "q")
    V.check_rank(qt, 3, "q", "[total_q, num_qo_heads, head_dim]")
    plan = plan_prefill(block_table, seq_lens, cu_seqlens_q, int(qt.shape[0]), page_size=page_size,
                        num_pages=num_pages, device=kc.device)
    return run_prefill(plan, q, k_cache, v_cache, scale=scale, causal=causal, return_lse=return_lse)


def write_kv(k, v, k_cache, v_cache, slot_mapping) -> None:
    """Write new tokens' keys and values into their slots, in place.

    Args:
        k, v: ``[num_tokens, num_kv_heads, head_dim]``, the caches' dtype.
        k_cache, v_cache: ``[num_pages, page_size, num_kv_heads, head_dim]``, contiguous (written).
        slot_mapping: ``[num_tokens]`` int32 or int64, slot = page * page_size + offset; -1 skips a token
            (padding). Slots must be distinct.
    """
    kt, vt = V.as_tensor(k, "k"), V.as_tensor(v, "v")
    kc, vc = V.as_tensor(k_cache, "k_cache"), V.as_tensor(v_cache, "v_cache")
    num_pages, page_size, num_kv_heads, head_dim = V.check_cache_pair(kc, vc)
    for t, name in ((kt, "k"), (vt, "v")):
        V.check_rank(t, 3, name, "[num_tokens, num_kv_heads, head_dim]")
        if tuple(t.shape[1:]) != (num_kv_heads, head_dim):
            raise ValueError(f"{name}: shape {tuple(t.shape)} does not match the caches' "
                             f"[*, {num_kv_heads}, {head_dim}]")
        if t.dtype != kc.dtype:
            raise ValueError(f"{name}: dtype {t.dtype} differs from the caches' {kc.dtype}")
        if t.device != kc.device:
            raise ValueError(f"{name}: device {t.device} differs from the caches' {kc.device}")
    if kt.shape[0] != vt.shape[0]:
        raise ValueError(f"v: {vt.shape[0]} tokens, k has {kt.shape[0]}")
    slots = V.as_tensor(slot_mapping, "slot_mapping")
    V.check_rank(slots, 1, "slot_mapping", "[num_tokens]")
    if slots.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"slot_mapping: expected int32 or int64, got {slots.dtype}")
    if slots.shape[0] != kt.shape[0]:
        raise ValueError(f"slot_mapping: {slots.shape[0]} slots for {kt.shape[0]} tokens")
    s = slots.cpu().numpy().astype(np.int64)
    capacity = num_pages * page_size
    bad = (s < -1) | (s >= capacity)
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(f"slot_mapping: slot_mapping[{i}] = {s[i]} is outside [0, {capacity}) (or -1 to skip)")
    live = s[s >= 0]
    if len(np.unique(live)) != len(live):
        raise ValueError("slot_mapping: two tokens map to the same slot")
    if kt.shape[0] == 0:
        return
    cfg = KernelConfig.for_pages("write_kv", V.dtype_name(kc, "k_cache"), num_kv_heads, head_dim, page_size)
    fn = _kernel(cfg, kc.device)
    fn(kt.contiguous(), vt.contiguous(), kc, vc, slots.to(device=kc.device, dtype=torch.int64).contiguous())


def copy_pages(k_cache, v_cache, src_pages, dst_pages) -> None:
    """Copy whole pages ``src_pages[i] -> dst_pages[i]`` in both caches, in place (copy-on-write).

    ``src_pages``, ``dst_pages``: ``[num_copies]`` int32 in ``[0, num_pages)``; destinations distinct and
    disjoint from the sources, so the result does not depend on copy order.
    """
    kc, vc = V.as_tensor(k_cache, "k_cache"), V.as_tensor(v_cache, "v_cache")
    num_pages, page_size, num_kv_heads, head_dim = V.check_cache_pair(kc, vc)
    src = V.index_array(src_pages, "src_pages", 1, "[num_copies]")
    dst = V.index_array(dst_pages, "dst_pages", 1, "[num_copies]")
    if src.shape != dst.shape:
        raise ValueError(f"dst_pages: {dst.shape[0]} entries, src_pages has {src.shape[0]}")
    s, d = src.cpu().numpy(), dst.cpu().numpy()
    for arr, name in ((s, "src_pages"), (d, "dst_pages")):
        bad = (arr < 0) | (arr >= num_pages)
        if bad.any():
            i = int(np.argmax(bad))
            raise ValueError(f"{name}: {name}[{i}] = {arr[i]} is outside [0, num_pages = {num_pages})")
    if len(np.unique(d)) != len(d):
        raise ValueError("dst_pages: destinations must be distinct")
    if np.intersect1d(s, d).size:
        raise ValueError("dst_pages: a destination is also a source")
    if len(s) == 0:
        return
    cfg = KernelConfig.for_pages("copy_pages", V.dtype_name(kc, "k_cache"), num_kv_heads, head_dim, page_size)
    fn = _kernel(cfg, kc.device)
    fn(kc, vc, src.to(kc.device), dst.to(kc.device))
