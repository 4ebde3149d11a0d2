"""The functional API: validate, then call the compiled kernel through a plan's bound arguments.

Cache layout, one for the whole project: ``k_cache``, ``v_cache`` ``[num_pages, page_size, num_kv_heads,
head_dim]``. Arguments may be torch tensors (zero copy) or numpy arrays; results come back in the type of ``q``.
Attention is split FlashInfer-style into a plan (``tvm_paged.plan``: built once per batch, it checks the page
table and lengths, picks the KV split and, at its first run, binds the kernel and its scratch) and a run (once per
layer). ``paged_decode`` / ``paged_prefill`` do both. Which arguments are read, written in place or written, and
in what order the kernel takes them, is each family's spec (``tvm_paged.spec``).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from . import validate as V
from .config import KernelConfig
from .spec import COPY_PAGES, WRITE_KV
from .plan import AttentionPlan, BoundKernel, bind, choose_num_splits, kernel_for, operand_key, plan_decode, \
    plan_prefill, use_kernels

__all__ = ["AttentionPlan", "plan_decode", "plan_prefill", "run_decode", "run_prefill", "paged_decode",
           "paged_prefill", "write_kv", "copy_pages", "use_kernels", "choose_num_splits"]


def _check_q(q: torch.Tensor, k_cache: torch.Tensor, rows: int | None, rows_name: str):
    """q against the (already checked) caches: rank, heads, head_dim, dtype (the caches', or any of q's dtypes
    for 8-bit caches), device, row count."""
    V.check_rank(q, 3, "q", f"[{rows_name}, num_qo_heads, head_dim]")
    _, _, num_kv_heads, head_dim = k_cache.shape
    if q.shape[2] != head_dim:
        raise ValueError(f"q: head_dim {q.shape[2]} does not match the caches' head_dim {head_dim}")
    if q.shape[1] % num_kv_heads:
        raise ValueError(f"q: num_qo_heads {q.shape[1]} is not a multiple of the caches' num_kv_heads {num_kv_heads}")
    if V.is_fp8(k_cache):
        V.dtype_name(q, "q")
    elif q.dtype != k_cache.dtype:
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


def _config(kernel: str, q: torch.Tensor, k_cache: torch.Tensor, variants: tuple) -> KernelConfig:
    _, page_size, num_kv_heads, head_dim = k_cache.shape
    window, soft_cap, alibi, sinks = variants
    return KernelConfig(kernel, V.dtype_name(q, "q"), int(q.shape[1]), int(num_kv_heads), int(head_dim),
                        int(page_size), V.cache_dtype_name(k_cache, "k_cache"), window=window, soft_cap=soft_cap,
                        alibi=alibi, sinks=sinks)


class _Options:
    """A run's attention options, checked (before any kernel) against the operands: the variant they select and
    the kernel arguments they add."""

    __slots__ = ("variants", "args")

    def __init__(self, plan: AttentionPlan, q: torch.Tensor, kc: torch.Tensor, logits_soft_cap, alibi_slopes,
                 sinks, k_scale, v_scale):
        args = {}
        cap = V.check_soft_cap(logits_soft_cap) if logits_soft_cap else 0.0
        if cap > 0:
            args["logits_soft_cap"] = cap
        if alibi_slopes is not None:
            args["alibi_slopes"] = V.check_head_vector(alibi_slopes, "alibi_slopes", q.shape[1], "num_qo_heads",
                                                       kc.device)
        if sinks is not None:
            args["sinks"] = V.check_head_vector(sinks, "sinks", q.shape[1], "num_qo_heads", kc.device)
        fp8 = V.is_fp8(kc)
        if fp8 or not (_is_one(k_scale) and _is_one(v_scale)):
            num_kv_heads = kc.shape[2] if kc.dim() == 4 else 0
            for name, value in (("k_scale", k_scale), ("v_scale", v_scale)):
                t = V.check_kv_scale(value, name, num_kv_heads, fp8, kc.device)
                if t is not None:
                    args[name] = t
        self.variants = (plan.window_left >= 0, cap > 0, alibi_slopes is not None, sinks is not None)
        self.args = args


def _is_one(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x == 1.0


def _check_written(spec, given: dict, tensors: dict) -> None:
    """The spec's in-place and output arguments are writable and share memory with no other argument (a read-only
    numpy array would be written through its pointer; ``k_cache is v_cache`` would let V overwrite K)."""
    written = {p.name: tensors[p.name] for p in spec.with_role("inplace", "output")}
    for name in written:
        V.check_writable(given[name], name)
    V.check_disjoint(written, {n: t for n, t in tensors.items() if n not in written})


def _scale(scale, bound: BoundKernel) -> float:
    if scale is None:
        return bound.default_scale
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


def _binding(plan: AttentionPlan, kernel: str, q, k_cache, v_cache, rows_of, options: dict) -> tuple:
    """(q, k_cache, v_cache as the kernel takes it, bound kernel, option arguments) for a run of ``plan``: the
    plan's binding for operands and options of this kind, made (after full validation) the first time.
    ``rows_of(plan)``: q's expected row count; ``options``: the run's attention options."""
    q, kc, vc = V.as_tensor(q, "q"), V.as_tensor(k_cache, "k_cache"), V.as_tensor(v_cache, "v_cache")
    opts = _Options(plan, q, kc, **options)
    key = (*operand_key(q, kc, vc), opts.variants)
    bound = plan.bindings.get(key)
    if bound is None:
        def validate() -> KernelConfig:
            _operands(plan, q, kc, vc, rows_of(plan), "total_q" if kernel == "prefill" else "batch")
            return _config(kernel, q, kc, opts.variants)

        bound = bind(plan, key, validate)
    elif not (kc.is_contiguous() and vc.is_contiguous()):  # the only property the key does not pin
        V.check_cache_pair(kc, vc)
    return q.contiguous(), V.kernel_view(kc), V.kernel_view(vc), bound, opts.args


def _result(q: torch.Tensor, out, inputs: dict) -> torch.Tensor:
    """The output tensor of a run: ``out`` if the caller gave one (checked: q's shape, dtype and device,
    contiguous, writable, sharing memory with no input), else a new one."""
    if out is None:
        return torch.empty_like(q)
    V.check_writable(out, "out")
    t = V.as_tensor(out, "out")
    if t.shape != q.shape or t.dtype != q.dtype or t.device != q.device or not t.is_contiguous():
        raise ValueError(f"out: expected a contiguous {tuple(q.shape)} {q.dtype} tensor on {q.device}, got "
                         f"{tuple(t.shape)} {t.dtype} on {t.device}{'' if t.is_contiguous() else ' (strided)'}")
    V.check_disjoint({"out": t}, inputs)
    return t


def _finish(out: torch.Tensor, lse: torch.Tensor, q_in, return_lse: bool):
    out = _output(out, q_in)
    return (out, _output(lse, q_in)) if return_lse else out


def run_decode(plan: AttentionPlan, q, k_cache, v_cache, *, scale=None, logits_soft_cap=0.0, alibi_slopes=None,
               sinks=None, k_scale=1.0, v_scale=1.0, return_lse=False, out=None):
    """Decode attention for a planned batch. ``q`` [batch, num_qo_heads, head_dim] -> out, same shape and dtype
    (and ``lse`` [batch, num_qo_heads] float32 when ``return_lse``). ``out``: write the result there instead of a
    new tensor (a serving loop or a CUDA graph reuses one buffer). The options are :func:`paged_decode`'s; the
    sliding window and batch invariance are the plan's."""
    q_in = q
    q, kc, vc, bound, extra = _binding(plan, "decode", q, k_cache, v_cache, _batch_rows, dict(
        logits_soft_cap=logits_soft_cap, alibi_slopes=alibi_slopes, sinks=sinks, k_scale=k_scale, v_scale=v_scale))
    out = _result(q, out, {"q": q, "k_cache": kc, "v_cache": vc, **_tensors(extra)})
    lse = torch.empty(q.shape[:2], dtype=torch.float32, device=q.device) if return_lse else bound.lse
    bound.fn(*bound.binder(q=q, k_cache=kc, v_cache=vc, out=out, lse=lse, scale=_scale(scale, bound), **extra))
    return _finish(out, lse, q_in, return_lse)


def run_prefill(plan: AttentionPlan, q, k_cache, v_cache, *, scale=None, causal=True, logits_soft_cap=0.0,
                alibi_slopes=None, sinks=None, k_scale=1.0, v_scale=1.0, return_lse=False, out=None):
    """Prefill attention for a planned batch. ``q`` [total_q, num_qo_heads, head_dim] -> out, same shape (and
    ``lse`` [total_q, num_qo_heads] float32 when ``return_lse``); ``out`` and the options as in
    :func:`run_decode`."""
    if not plan.is_prefill:
        raise ValueError("plan: a decode plan was given to run_prefill (use plan_prefill)")
    q_in = q
    q, kc, vc, bound, extra = _binding(plan, "prefill", q, k_cache, v_cache, _query_rows, dict(
        logits_soft_cap=logits_soft_cap, alibi_slopes=alibi_slopes, sinks=sinks, k_scale=k_scale, v_scale=v_scale))
    out = _result(q, out, {"q": q, "k_cache": kc, "v_cache": vc, **_tensors(extra)})
    lse = torch.empty(q.shape[:2], dtype=torch.float32, device=q.device) if return_lse else bound.lse
    bound.fn(*bound.binder(q=q, k_cache=kc, v_cache=vc, out=out, lse=lse, scale=_scale(scale, bound),
                           causal=int(bool(causal)), **extra))
    return _finish(out, lse, q_in, return_lse)


def _tensors(args: dict) -> dict:
    return {n: t for n, t in args.items() if isinstance(t, torch.Tensor)}


def _batch_rows(plan: AttentionPlan) -> int:
    return plan.batch


def _query_rows(plan: AttentionPlan) -> int:
    return plan.dims["TQ"]


def paged_decode(q, k_cache, v_cache, block_table, seq_lens, *, scale=None, window_left=-1, logits_soft_cap=0.0,
                 alibi_slopes=None, sinks=None, k_scale=1.0, v_scale=1.0, return_lse=False, batch_invariant=False,
                 out=None):
    """Decode attention over a paged KV cache: one query token per sequence, at position ``p = seq_len - 1``.

    Args:
        q: ``[batch, num_qo_heads, head_dim]`` float32/float16/bfloat16.
        k_cache, v_cache: ``[num_pages, page_size, num_kv_heads, head_dim]``, q's dtype or 8-bit
            (``torch.float8_e4m3fn``, ``torch.float8_e5m2``), contiguous.
        block_table: ``[batch, max_pages_per_seq]`` int32; entries past a sequence's last page (and, with a
            window, those of pages wholly behind it) are ignored.
        seq_lens: ``[batch]`` int32, tokens in the cache (the query's own token included), each >= 1.
        scale: softmax scale, default ``head_dim ** -0.5``: the logit of key ``j`` is ``scale * q.k_j``.
        window_left: sliding window: keys ``j < p - window_left`` are masked and their pages not read (HF's
            ``sliding_window = W`` is ``window_left = W - 1``); -1 (default) for none.
        logits_soft_cap: ``> 0``: logit = ``cap * tanh(logit / cap)`` (Gemma 2); 0 (default) off.
        alibi_slopes: ``[num_qo_heads]`` float32: logit += ``slope[h] * (j - p)``.
        sinks: ``[num_qo_heads]`` float32 sink logits: ``e^sink[h]`` joins the softmax denominator (no value).
        k_scale, v_scale: 8-bit caches only: ``K = float(k_cache) * k_scale`` (a float, or ``[num_kv_heads]``
            float32 per head), the same for V.
        return_lse: also return ``lse`` ``[batch, num_qo_heads]`` float32 (natural log of the softmax
            denominator, max and sink folded in).
        batch_invariant: split each sequence's keys by its own length only, so its output is bitwise the same
            whatever else is in the batch (default: split for speed).
        out: optional ``[batch, num_qo_heads, head_dim]`` tensor to write the result into.
    Returns:
        ``out`` ``[batch, num_qo_heads, head_dim]`` in q's dtype, or ``(out, lse)``.
    """
    kc = V.as_tensor(k_cache, "k_cache")
    num_pages, page_size, _, _ = V.check_cache_pair(kc, V.as_tensor(v_cache, "v_cache"))
    plan = plan_decode(block_table, seq_lens, page_size=page_size, num_pages=num_pages, device=kc.device,
                       window_left=window_left, batch_invariant=batch_invariant)
    return run_decode(plan, q, k_cache, v_cache, scale=scale, logits_soft_cap=logits_soft_cap,
                      alibi_slopes=alibi_slopes, sinks=sinks, k_scale=k_scale, v_scale=v_scale,
                      return_lse=return_lse, out=out)


def paged_prefill(q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q, *, causal=True, scale=None,
                  window_left=-1, logits_soft_cap=0.0, alibi_slopes=None, sinks=None, k_scale=1.0, v_scale=1.0,
                  return_lse=False, batch_invariant=False, out=None):
    """Prefill (or chunked prefill) attention over a paged KV cache.

    Args:
        q: ``[total_q, num_qo_heads, head_dim]``; rows ``cu_seqlens_q[b]:cu_seqlens_q[b+1]`` belong to sequence
            ``b``, and its query ``i`` sits at position ``p = seq_lens[b] - q_len_b + i`` (the last ``q_len_b``
            tokens of the cache), so prefill against an already cached prefix is the same call.
        k_cache, v_cache, block_table, seq_lens: as in :func:`paged_decode`.
        cu_seqlens_q: ``[batch + 1]`` int32, monotone, from 0 to ``total_q``.
        causal: a query sees only keys at or before its own position (default); otherwise every cached key.
        scale, window_left, logits_soft_cap, alibi_slopes, sinks, k_scale, v_scale, batch_invariant, out: as in
            :func:`paged_decode`, per query position ``p``.
        return_lse: also return ``lse`` ``[total_q, num_qo_heads]`` float32.
    """
    kc = V.as_tensor(k_cache, "k_cache")
    num_pages, page_size, _, _ = V.check_cache_pair(kc, V.as_tensor(v_cache, "v_cache"))
    qt = V.as_tensor(q, "q")
    V.check_rank(qt, 3, "q", "[total_q, num_qo_heads, head_dim]")
    plan = plan_prefill(block_table, seq_lens, cu_seqlens_q, int(qt.shape[0]), page_size=page_size,
                        num_pages=num_pages, device=kc.device, window_left=window_left,
                        batch_invariant=batch_invariant)
    return run_prefill(plan, q, k_cache, v_cache, scale=scale, causal=causal, logits_soft_cap=logits_soft_cap,
                       alibi_slopes=alibi_slopes, sinks=sinks, k_scale=k_scale, v_scale=v_scale,
                       return_lse=return_lse, out=out)


def write_kv(k, v, k_cache, v_cache, slot_mapping, *, k_scale=1.0, v_scale=1.0) -> None:
    """Write new tokens' keys and values into their slots, in place.

    Args:
        k, v: ``[num_tokens, num_kv_heads, head_dim]``, the caches' dtype (float32/float16/bfloat16 for 8-bit
            caches).
        k_cache, v_cache: ``[num_pages, page_size, num_kv_heads, head_dim]``, contiguous (written).
        slot_mapping: ``[num_tokens]`` int32 or int64, slot = page * page_size + offset; -1 skips a token
            (padding). Slots must be distinct.
        k_scale, v_scale: 8-bit caches store ``k / k_scale`` (a float, or ``[num_kv_heads]`` float32 per head)
            rounded to nearest even and clamped to the format's finite range (448 for e4m3, 57344 for e5m2):
            a large value never becomes inf or NaN. The same for v.
    """
    kt, vt = V.as_tensor(k, "k"), V.as_tensor(v, "v")
    kc, vc = V.as_tensor(k_cache, "k_cache"), V.as_tensor(v_cache, "v_cache")
    num_pages, page_size, num_kv_heads, head_dim = V.check_cache_pair(kc, vc)
    slots = V.as_tensor(slot_mapping, "slot_mapping")
    _check_written(WRITE_KV, dict(k=k, v=v, k_cache=k_cache, v_cache=v_cache, slot_mapping=slot_mapping),
                   dict(k=kt, v=vt, k_cache=kc, v_cache=vc, slot_mapping=slots))
    for t, name in ((kt, "k"), (vt, "v")):
        V.check_rank(t, 3, name, "[num_tokens, num_kv_heads, head_dim]")
        if tuple(t.shape[1:]) != (num_kv_heads, head_dim):
            raise ValueError(f"{name}: shape {tuple(t.shape)} does not match the caches' "
                             f"[*, {num_kv_heads}, {head_dim}]")
        if V.is_fp8(kc):
            V.dtype_name(t, name)
        elif t.dtype != kc.dtype:
            raise ValueError(f"{name}: dtype {t.dtype} differs from the caches' {kc.dtype}")
        if t.device != kc.device:
            raise ValueError(f"{name}: device {t.device} differs from the caches' {kc.device}")
    if kt.shape[0] != vt.shape[0]:
        raise ValueError(f"v: {vt.shape[0]} tokens, k has {kt.shape[0]}")
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
    fp8 = V.is_fp8(kc)
    scales = [V.check_kv_scale(x, name, num_kv_heads, fp8, kc.device) for x, name in ((k_scale, "k_scale"),
                                                                                     (v_scale, "v_scale"))]
    if fp8 and kt.dtype != vt.dtype:
        raise ValueError(f"v: dtype {vt.dtype} differs from k's {kt.dtype}")
    if kt.shape[0] == 0:
        return
    cfg = KernelConfig.for_pages("write_kv", V.dtype_name(kt, "k"), num_kv_heads, head_dim, page_size,
                                 V.cache_dtype_name(kc, "k_cache"))
    fn = kernel_for(cfg, kc.device)
    fn(kt.contiguous(), vt.contiguous(), V.kernel_view(kc), V.kernel_view(vc),
       slots.to(device=kc.device, dtype=torch.int64).contiguous(), *(s for s in scales if s is not None))


def copy_pages(k_cache, v_cache, src_pages, dst_pages) -> None:
    """Copy whole pages ``src_pages[i] -> dst_pages[i]`` in both caches, in place (copy-on-write).

    ``src_pages``, ``dst_pages``: ``[num_copies]`` int32 in ``[0, num_pages)``; destinations distinct and
    disjoint from the sources, so the result does not depend on copy order.
    """
    kc, vc = V.as_tensor(k_cache, "k_cache"), V.as_tensor(v_cache, "v_cache")
    num_pages, page_size, num_kv_heads, head_dim = V.check_cache_pair(kc, vc)
    src = V.index_array(src_pages, "src_pages", 1, "[num_copies]")
    dst = V.index_array(dst_pages, "dst_pages", 1, "[num_copies]")
    _check_written(COPY_PAGES, dict(k_cache=k_cache, v_cache=v_cache, src_pages=src_pages, dst_pages=dst_pages),
                   dict(k_cache=kc, v_cache=vc, src_pages=src, dst_pages=dst))
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
    cfg = KernelConfig.for_pages("copy_pages", V.cache_dtype_name(kc, "k_cache"), num_kv_heads, head_dim, page_size)
    fn = kernel_for(cfg, kc.device)
    fn(V.kernel_view(kc), V.kernel_view(vc), src.to(kc.device), dst.to(kc.device))
