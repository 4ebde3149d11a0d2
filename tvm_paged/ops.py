"""The functional API: validate, then call the compiled kernel through a plan's bound arguments.

Cache layout, one for the whole project: ``k_cache``, ``v_cache`` ``[num_pages, page_size, num_kv_heads,
head_dim]``. Arguments are torch tensors or numpy arrays, and the library follows them (:mod:`tvm_paged.arrays`):
a call on numpy arrays alone runs on numpy end to end and returns numpy arrays (bfloat16 as ``ml_dtypes``'), with
no torch call at all, so TVM's runtime and numpy are all a device needs to run an exported library; a call with
any torch tensor runs on torch, its numpy arrays viewed as torch tensors (zero copy), and returns torch tensors.
Attention is split FlashInfer-style into a plan (``tvm_paged.plan``: built once per batch, it checks the page
table and lengths, picks the KV split and, at its first run, binds the kernel and its scratch) and a run (once per
layer). ``paged_decode`` / ``paged_prefill`` do both. Which arguments are read, written in place or written, and
in what order the kernel takes them, is each family's spec (``tvm_paged.spec``).
"""

from __future__ import annotations


import numpy as np

from . import arrays as A
from . import validate as V
from .config import KernelConfig
from .spec import COPY_PAGES, WRITE_KV
from .plan import AttentionPlan, BoundKernel, bind, choose_num_splits, kernel_for, operand_key, plan_decode, \
    plan_prefill, use_kernels

__all__ = ["AttentionPlan", "plan_decode", "plan_prefill", "run_decode", "run_prefill", "paged_decode",
           "paged_prefill", "write_kv", "copy_pages", "use_kernels", "choose_num_splits"]


def _check_q(q, k_cache, rows: int | None, rows_name: str):
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
    if A.device(q) != A.device(k_cache):
        raise ValueError(f"q: device {A.device(q)} differs from the caches' {A.device(k_cache)}")
    if rows is not None and q.shape[0] != rows:
        raise ValueError(f"q: expected {rows} rows ({rows_name}), got {q.shape[0]}")


def _operands(plan: AttentionPlan, q, kc, vc, rows: int, rows_name: str) -> int:
    """q and the caches (arrays of one library) checked against each other and the plan -> head_dim."""
    num_pages, page_size, _, head_dim = V.check_cache_pair(kc, vc)
    _check_q(q, kc, rows, rows_name)
    if (num_pages, page_size) != (plan.num_pages, plan.page_size):
        raise ValueError(f"k_cache: pool ({num_pages} pages of {page_size}) differs from the plan's "
                         f"({plan.num_pages} of {plan.page_size})")
    if not A.same_device(plan.device, A.device(kc)):
        raise ValueError(f"plan: built for {plan.device}, the caches are on {A.device(kc)}")
    return head_dim


def _config(kernel: str, q, k_cache, variants: tuple) -> KernelConfig:
    _, page_size, num_kv_heads, head_dim = k_cache.shape
    window, soft_cap, alibi, sinks = variants
    return KernelConfig(kernel, V.dtype_name(q, "q"), int(q.shape[1]), int(num_kv_heads), int(head_dim),
                        int(page_size), V.cache_dtype_name(k_cache, "k_cache"), window=window, soft_cap=soft_cap,
                        alibi=alibi, sinks=sinks)


class _Options:
    """A run's attention options, checked (before any kernel) against the operands: the variant they select and
    the kernel arguments they add."""

    __slots__ = ("variants", "args")

    def __init__(self, plan: AttentionPlan, q, kc, logits_soft_cap, alibi_slopes, sinks, k_scale, v_scale):
        args = {}
        cap = V.check_soft_cap(logits_soft_cap) if logits_soft_cap else 0.0
        if cap > 0:
            args["logits_soft_cap"] = cap
        if alibi_slopes is not None:
            args["alibi_slopes"] = V.check_head_vector(alibi_slopes, "alibi_slopes", q.shape[1], "num_qo_heads",
                                                       A.device(kc))
        if sinks is not None:
            args["sinks"] = V.check_head_vector(sinks, "sinks", q.shape[1], "num_qo_heads", A.device(kc))
        fp8 = V.is_fp8(kc)
        if fp8 or not (_is_one(k_scale) and _is_one(v_scale)):
            num_kv_heads, device = kc.shape[2] if kc.ndim == 4 else 0, A.device(kc)
            for name, value in (("k_scale", k_scale), ("v_scale", v_scale)):
                t = V.check_kv_scale(value, name, num_kv_heads, fp8, device)
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
    return bound.default_scale if scale is None else V.check_scale(scale)


def _binding(plan: AttentionPlan, kernel: str, q, k_cache, v_cache, out, rows_of, options: dict) -> tuple:
    """(q, k_cache, v_cache as the kernel takes it, out, bound kernel, option arguments) for a run of ``plan``:
    the plan's binding for operands and options of this kind, made (after full validation) the first time.
    ``rows_of(plan)``: q's expected row count; ``options``: the run's attention options; ``out``: the caller's
    output array or None (a new one)."""
    # Decided by q alone when it is a torch tensor: the serving loop's run pays one check.
    torch_call = isinstance(q, A.Tensor) or A.uses_torch(k_cache, v_cache, out, options["alibi_slopes"],
                                                         options["sinks"], options["k_scale"], options["v_scale"])
    q, kc, vc = A.as_array(q, "q", torch_call), A.as_array(k_cache, "k_cache", torch_call), \
        A.as_array(v_cache, "v_cache", torch_call)
    opts = _Options(plan, q, kc, **options)
    key = (*operand_key(q, kc, vc), opts.variants)
    bound = plan.bindings.get(key)
    if bound is None:
        def validate() -> KernelConfig:
            _operands(plan, q, kc, vc, rows_of(plan), "total_q" if kernel == "prefill" else "batch")
            return _config(kernel, q, kc, opts.variants)

        bound = bind(plan, key, validate, A.device(kc))
    # The one property the key does not pin; bind skips validate() for a plan of a shape checked before.
    if not (A.is_contiguous(kc) and A.is_contiguous(vc)):
        V.check_cache_pair(kc, vc)
    q, kc, vc = A.contiguous(q), V.kernel_view(kc), V.kernel_view(vc)
    out = _result(q, out, torch_call, kc, vc, opts.args)
    return q, kc, vc, out, bound, opts.args


def _result(q, out, torch_call: bool, kc, vc, args: dict):
    """The output array of a run: ``out`` if the caller gave one (checked: q's shape, dtype and device,
    contiguous, writable, sharing memory with no input: q, the caches or an option array in ``args``), else a new
    one in q's library."""
    if out is None:
        return A.empty_like(q)
    V.check_writable(out, "out")
    t = A.as_array(out, "out", torch_call)
    if t.shape != q.shape or t.dtype != q.dtype or (torch_call and t.device != q.device) or not A.is_contiguous(t):
        raise ValueError(f"out: expected a contiguous {tuple(q.shape)} {q.dtype} tensor on {A.device(q)}, got "
                         f"{tuple(t.shape)} {t.dtype} on {A.device(t)}"
                         f"{'' if A.is_contiguous(t) else ' (strided)'}")
    V.check_disjoint({"out": t}, {"q": q, "k_cache": kc, "v_cache": vc, **_arrays(args)})
    return t


def _lse(q):
    """A new LSE array ``[rows, num_qo_heads]`` float32 for the caller (without ``return_lse``, the kernel writes
    the binding's scratch)."""
    return A.empty(tuple(q.shape[:2]), "float32", A.device(q))


def run_decode(plan: AttentionPlan, q, k_cache, v_cache, *, scale=None, logits_soft_cap=0.0, alibi_slopes=None,
               sinks=None, k_scale=1.0, v_scale=1.0, return_lse=False, out=None):
    """Decode attention for a planned batch. ``q`` [batch, num_qo_heads, head_dim] -> out, same shape and dtype
    (and ``lse`` [batch, num_qo_heads] float32 when ``return_lse``). ``out``: write the result there instead of a
    new tensor (a serving loop or a CUDA graph reuses one buffer). The options are :func:`paged_decode`'s; the
    sliding window and batch invariance are the plan's."""
    if plan.is_prefill:
        raise ValueError("plan: a prefill plan was given to run_decode (use plan_decode)")
    q, kc, vc, out, bound, extra = _binding(plan, "decode", q, k_cache, v_cache, out, _batch_rows, dict(
        logits_soft_cap=logits_soft_cap, alibi_slopes=alibi_slopes, sinks=sinks, k_scale=k_scale, v_scale=v_scale))
    lse = _lse(q) if return_lse else bound.lse
    bound.fn(*bound.binder(q=q, k_cache=kc, v_cache=vc, out=out, lse=lse, scale=_scale(scale, bound), **extra))
    return (out, lse) if return_lse else out


def run_prefill(plan: AttentionPlan, q, k_cache, v_cache, *, scale=None, causal=True, logits_soft_cap=0.0,
                alibi_slopes=None, sinks=None, k_scale=1.0, v_scale=1.0, return_lse=False, out=None):
    """Prefill attention for a planned batch. ``q`` [total_q, num_qo_heads, head_dim] -> out, same shape (and
    ``lse`` [total_q, num_qo_heads] float32 when ``return_lse``); ``out`` and the options as in
    :func:`run_decode`."""
    if not plan.is_prefill:
        raise ValueError("plan: a decode plan was given to run_prefill (use plan_prefill)")
    q, kc, vc, out, bound, extra = _binding(plan, "prefill", q, k_cache, v_cache, out, _query_rows, dict(
        logits_soft_cap=logits_soft_cap, alibi_slopes=alibi_slopes, sinks=sinks, k_scale=k_scale, v_scale=v_scale))
    lse = _lse(q) if return_lse else bound.lse
    bound.fn(*bound.binder(q=q, k_cache=kc, v_cache=vc, out=out, lse=lse, scale=_scale(scale, bound),
                           causal=int(bool(causal)), **extra))
    return (out, lse) if return_lse else out


def _arrays(args: dict) -> dict:
    return {n: t for n, t in args.items() if A.is_array(t)}


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
            (``torch.float8_e4m3fn`` / ``torch.float8_e5m2``, numpy: ``ml_dtypes.float8_e4m3fn`` /
            ``ml_dtypes.float8_e5m2``), contiguous.
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
    torch_call = A.uses_torch(k_cache, v_cache, q, block_table, seq_lens, out, alibi_slopes, sinks, k_scale, v_scale)
    kc = A.as_array(k_cache, "k_cache", torch_call)
    num_pages, page_size, _, _ = V.check_cache_pair(kc, A.as_array(v_cache, "v_cache", torch_call))
    plan = plan_decode(block_table, seq_lens, page_size=page_size, num_pages=num_pages, device=A.device(kc),
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
    torch_call = A.uses_torch(k_cache, v_cache, q, block_table, seq_lens, cu_seqlens_q, out, alibi_slopes, sinks,
                              k_scale, v_scale)
    kc = A.as_array(k_cache, "k_cache", torch_call)
    num_pages, page_size, _, _ = V.check_cache_pair(kc, A.as_array(v_cache, "v_cache", torch_call))
    qt = A.as_array(q, "q", torch_call)
    V.check_rank(qt, 3, "q", "[total_q, num_qo_heads, head_dim]")
    plan = plan_prefill(block_table, seq_lens, cu_seqlens_q, int(qt.shape[0]), page_size=page_size,
                        num_pages=num_pages, device=A.device(kc), window_left=window_left,
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
    torch_call = A.uses_torch(k_cache, v_cache, k, v, slot_mapping, k_scale, v_scale)
    kt, vt = A.as_array(k, "k", torch_call), A.as_array(v, "v", torch_call)
    kc, vc = A.as_array(k_cache, "k_cache", torch_call), A.as_array(v_cache, "v_cache", torch_call)
    num_pages, page_size, num_kv_heads, head_dim = V.check_cache_pair(kc, vc)
    device = A.device(kc)
    slots = A.as_array(slot_mapping, "slot_mapping", torch_call)
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
        if A.device(t) != device:
            raise ValueError(f"{name}: device {A.device(t)} differs from the caches' {device}")
    if kt.shape[0] != vt.shape[0]:
        raise ValueError(f"v: {vt.shape[0]} tokens, k has {kt.shape[0]}")
    V.check_rank(slots, 1, "slot_mapping", "[num_tokens]")
    if A.dtype_name(slots) not in ("int32", "int64"):
        raise ValueError(f"slot_mapping: expected int32 or int64, got {slots.dtype}")
    if slots.shape[0] != kt.shape[0]:
        raise ValueError(f"slot_mapping: {slots.shape[0]} slots for {kt.shape[0]} tokens")
    s = A.host_numpy(slots).astype(np.int64)
    capacity = num_pages * page_size
    bad = (s < -1) | (s >= capacity)
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(f"slot_mapping: slot_mapping[{i}] = {s[i]} is outside [0, {capacity}) (or -1 to skip)")
    live = s[s >= 0]
    if len(np.unique(live)) != len(live):
        raise ValueError("slot_mapping: two tokens map to the same slot")
    fp8 = V.is_fp8(kc)
    scales = [V.check_kv_scale(x, name, num_kv_heads, fp8, device) for x, name in ((k_scale, "k_scale"),
                                                                                  (v_scale, "v_scale"))]
    if fp8 and kt.dtype != vt.dtype:
        raise ValueError(f"v: dtype {vt.dtype} differs from k's {kt.dtype}")
    if kt.shape[0] == 0:
        return
    cfg = KernelConfig.for_pages("write_kv", V.dtype_name(kt, "k"), num_kv_heads, head_dim, page_size,
                                 V.cache_dtype_name(kc, "k_cache"))
    fn = kernel_for(cfg, device)
    fn(A.contiguous(kt), A.contiguous(vt), V.kernel_view(kc), V.kernel_view(vc),
       A.indices_on(slots, device, "int64"), *(s for s in scales if s is not None))


def copy_pages(k_cache, v_cache, src_pages, dst_pages) -> None:
    """Copy whole pages ``src_pages[i] -> dst_pages[i]`` in both caches, in place (copy-on-write).

    ``src_pages``, ``dst_pages``: ``[num_copies]`` int32 in ``[0, num_pages)``; destinations distinct and
    disjoint from the sources, so the result does not depend on copy order.
    """
    torch_call = A.uses_torch(k_cache, v_cache, src_pages, dst_pages)
    kc, vc = A.as_array(k_cache, "k_cache", torch_call), A.as_array(v_cache, "v_cache", torch_call)
    num_pages, page_size, num_kv_heads, head_dim = V.check_cache_pair(kc, vc)
    src = V.index_array(src_pages, "src_pages", 1, "[num_copies]", torch_call)
    dst = V.index_array(dst_pages, "dst_pages", 1, "[num_copies]", torch_call)
    _check_written(COPY_PAGES, dict(k_cache=k_cache, v_cache=v_cache, src_pages=src_pages, dst_pages=dst_pages),
                   dict(k_cache=kc, v_cache=vc, src_pages=src, dst_pages=dst))
    if src.shape != dst.shape:
        raise ValueError(f"dst_pages: {dst.shape[0]} entries, src_pages has {src.shape[0]}")
    s, d = A.host_numpy(src), A.host_numpy(dst)
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
    device = A.device(kc)
    fn = kernel_for(cfg, device)
    fn(V.kernel_view(kc), V.kernel_view(vc), A.indices_on(src, device, "int32"), A.indices_on(dst, device, "int32"))
