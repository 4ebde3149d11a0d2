"""The paged KV cache of a whole model: per-layer K/V pools sharing one :class:`PageAllocator`.

One model step over a batch of sequences::

    step = cache.begin_step(seq_ids, num_new_tokens, token_ids=...)  # slots, copy-on-write, table, plan: once
    for layer in range(num_layers):
        cache.write(layer, step, k, v)          # the new tokens' K/V into their slots
        out = cache.attention(layer, step, q)   # causal attention over everything the sequence holds

``begin_step`` is the only call that takes pages for tokens, and it is atomic: when the pool cannot hold the step
it raises :class:`OutOfPages` and nothing changed (the caller preempts a sequence and tries again). Add, fork and
free sequences between steps, never between a step's ``begin_step`` and its last ``write``: a fork or a prefix hit
reads pages as they are.

Variants: ``kv_dtype`` stores K/V in 8 bits (``torch.float8_e4m3fn`` / ``torch.float8_e5m2``; q, k and v stay in
``dtype``) with per-layer ``k_scale`` / ``v_scale``; ``window_left`` makes every step's attention a sliding window,
and the allocator then drops pages wholly behind it (a long generation holds a bounded number of pages; see
:mod:`tvm_paged.allocator`). ``attention`` forwards the per-run options (soft cap, ALiBi, sinks).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Hashable, Sequence

import numpy as np
import torch

from . import arrays as A
from . import ops
from . import validate as V
from .allocator import OutOfPages, PageAllocator
from .config import check_int

__all__ = ["PagedKVCache", "Step", "OutOfPages"]


@dataclass(frozen=True)
class Step:
    """The bookkeeping of one model step, shared by every layer. Rows of ``q``/``k``/``v`` are the new tokens
    of ``seq_ids[0]``, then of ``seq_ids[1]``, ... (``cu_seqlens_q`` delimits them).

    ``q_lens`` [batch] int64 new tokens per sequence (numpy); ``slot_mapping`` [num_tokens] int64;
    ``positions`` [num_tokens] int64, each new token's position in its sequence (for RoPE);
    ``block_table`` [batch, max_pages] int32 padded with -1; ``seq_lens`` [batch] int32 (new tokens included);
    ``cu_seqlens_q`` [batch + 1] int32; ``plan`` the attention plan (decode when every ``q_lens`` is 1);
    ``copied_pages`` how many copy-on-write page copies the step did.
    """

    seq_ids: tuple
    q_lens: np.ndarray
    slot_mapping: torch.Tensor
    positions: torch.Tensor
    block_table: torch.Tensor
    seq_lens: torch.Tensor
    cu_seqlens_q: torch.Tensor
    plan: ops.AttentionPlan
    is_decode: bool
    copied_pages: int = 0

    @property
    def num_tokens(self) -> int:
        return int(self.slot_mapping.shape[0])


class PagedKVCache:
    """K/V caches of ``num_layers`` layers, each ``[num_pages, page_size, num_kv_heads, head_dim]`` in ``kv_dtype``
    on ``device`` (``k_caches[layer]``, ``v_caches[layer]``), and the allocator that maps sequences to pages.

    A page id means the same page in every layer: one allocator serves them all.

    Args:
        dtype: of q, k and v (float32, float16, bfloat16).
        kv_dtype: of the caches: None (``dtype``) or 8-bit, ``torch.float8_e4m3fn`` / ``torch.float8_e5m2``.
        window_left: sliding window of every step's attention (a query at ``p`` sees keys ``>= p - window_left``;
            -1, the default: none). Pages wholly behind it are dropped from their sequences (block table -1).
        k_scale, v_scale: 8-bit caches only: the cache holds ``k / k_scale`` (and reads back ``code * k_scale``):
            a float, a ``[num_kv_heads]`` float32 tensor, or a list with one of those per layer
            (``k_scales[layer]``, ``v_scales[layer]``).
    """

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, page_size: int, num_pages: int,
                 dtype: torch.dtype = torch.float32, device="cpu", *, kv_dtype: torch.dtype | None = None,
                 window_left: int = -1, k_scale=1.0, v_scale=1.0):
        self.num_layers, self.head_dim = check_int(num_layers, "num_layers"), check_int(head_dim, "head_dim")
        self.num_kv_heads = check_int(num_kv_heads, "num_kv_heads")
        self.page_size, self.num_pages = check_int(page_size, "page_size"), check_int(num_pages, "num_pages")
        if dtype in A.TORCH_FP8_NAMES:
            raise ValueError(f"dtype: {dtype} is the dtype of q, k and v (float32, float16, bfloat16); give an "
                             "8-bit cache as kv_dtype")
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"dtype: expected torch.float32, torch.float16 or torch.bfloat16, got {dtype!r}")
        try:
            self.dtype, self.device = dtype, torch.device(device)
        except (TypeError, RuntimeError) as exc:
            raise ValueError(f"device: {device!r} is not a device ({exc})") from None
        kv_dtype = dtype if kv_dtype is None else kv_dtype
        if kv_dtype != dtype and kv_dtype not in A.TORCH_FP8_NAMES:
            raise ValueError(f"kv_dtype: expected None (dtype {dtype}) or one of {list(A.TORCH_FP8_NAMES)}, "
                             f"got {kv_dtype}")
        self.kv_dtype = kv_dtype
        fp8 = kv_dtype in A.TORCH_FP8_NAMES
        self.k_scales = self._layer_scales(k_scale, "k_scale", fp8)
        self.v_scales = self._layer_scales(v_scale, "v_scale", fp8)
        self.allocator = PageAllocator(num_pages, page_size, window_left=window_left)
        self.window_left = self.allocator.window_left
        shape = (self.num_pages, self.page_size, self.num_kv_heads, self.head_dim)
        self.k_caches = [torch.zeros(shape, dtype=kv_dtype, device=self.device) for _ in range(self.num_layers)]
        self.v_caches = [torch.zeros(shape, dtype=kv_dtype, device=self.device) for _ in range(self.num_layers)]

    def _layer_scales(self, value, name: str, fp8: bool) -> list:
        """One checked scale per layer (a float, or a [num_kv_heads] float32 tensor on the cache's device)."""
        if isinstance(value, (list, tuple)):
            if len(value) != self.num_layers:
                raise ValueError(f"{name}: {len(value)} entries for {self.num_layers} layers")
            named = [(v, f"{name}[{i}]") for i, v in enumerate(value)]
        else:
            named = [(value, name)] * self.num_layers
        scales = []
        for v, label in named:
            if isinstance(v, np.ndarray):
                v = torch.from_numpy(v)
            if isinstance(v, torch.Tensor):
                v = v.to(self.device)
                scales.append(V.check_kv_scale(v, label, self.num_kv_heads, fp8, self.device))
            else:
                V.check_kv_scale(v, label, self.num_kv_heads, fp8, self.device)
                scales.append(float(v))
        return scales

    # -- sequences (between steps) ---------------------------------------------------------------
    def add_sequence(self, seq_id: Hashable, prompt_token_ids: Sequence[int] | None = None) -> int:
        """Register a sequence; returns how many leading prompt tokens are already cached (whole pages, never
        the whole prompt). The sequence starts at that length: feed ``prompt[cached:]`` through steps."""
        return self.allocator.add_sequence(seq_id, prompt_token_ids)

    def fork(self, parent_id: Hashable, child_id: Hashable) -> None:
        """The child starts as a copy of the parent, sharing its pages (copy-on-write at the first write)."""
        self.allocator.fork(parent_id, child_id)

    def free(self, seq_id: Hashable) -> None:
        """Drop the sequence; its pages return to the pool (full pages of known tokens stay prefix-cached)."""
        self.allocator.free(seq_id)

    def seq_len(self, seq_id: Hashable) -> int:
        return self.allocator.seq_len(seq_id)

    @property
    def num_free_pages(self) -> int:
        return self.allocator.num_free_pages

    def pages_needed(self, seq_ids: Sequence[Hashable], num_new_tokens) -> int:
        """Net pages a step appending ``num_new_tokens`` (an int or one count per sequence) to ``seq_ids``
        would take from the free pool, copy-on-write copies included and, with a window, the pages its drops
        return subtracted (so it may be negative); changes nothing."""
        seq_ids = list(seq_ids)
        if not seq_ids:
            return 0
        return self.allocator.pages_needed(seq_ids, self._q_lens(seq_ids, num_new_tokens).tolist())

    def can_begin_step(self, seq_ids: Sequence[Hashable], num_new_tokens) -> bool:
        """Whether :meth:`begin_step` would succeed; changes nothing."""
        return self.pages_needed(seq_ids, num_new_tokens) <= self.allocator.num_free_pages

    @staticmethod
    def _q_lens(seq_ids: list, num_new_tokens) -> np.ndarray:
        value = num_new_tokens.tolist() if hasattr(num_new_tokens, "tolist") else num_new_tokens  # numpy, torch
        counts = list(value) if isinstance(value, (list, tuple)) else [value] * len(seq_ids)
        if any(isinstance(n, bool) or not isinstance(n, (int, np.integer)) for n in counts):
            raise ValueError(f"num_new_tokens: expected an int or a list of ints, got {num_new_tokens!r}")
        q_lens = np.asarray(counts, dtype=np.int64)
        if not seq_ids:
            raise ValueError("seq_ids: a step needs at least one sequence")
        if q_lens.shape != (len(seq_ids),):
            raise ValueError(f"num_new_tokens: {q_lens.shape[0]} counts for {len(seq_ids)} sequences")
        if (q_lens < 1).any():
            raise ValueError(f"num_new_tokens: every sequence in a step needs >= 1 new token, got {q_lens.tolist()}")
        if len(set(seq_ids)) != len(seq_ids):
            raise ValueError("seq_ids: a sequence appears twice in one step")
        return q_lens

    # -- one step -------------------------------------------------------------------------------
    def begin_step(self, seq_ids: Sequence[Hashable], num_new_tokens, token_ids=None) -> Step:
        """Reserve slots for the new tokens of every sequence, do the copy-on-write page copies they owe (in
        every layer), and build the block table and the attention plan once for all layers.

        Args:
            seq_ids: the batch, distinct live sequences.
            num_new_tokens: an int for all (1 = decode) or one count >= 1 per sequence (prefill chunks).
            token_ids: optional, one list of token ids per sequence (the new tokens'): lets full pages enter
                the prefix cache. Without it the sequences' later pages cannot be reused by other prompts.
        Raises:
            OutOfPages: the pool cannot hold the step; nothing changed.
        """
        alloc = self.allocator
        seq_ids = list(seq_ids)
        q_lens = self._q_lens(seq_ids, num_new_tokens)
        q_list = q_lens.tolist()
        old_lens = alloc.seq_lens(seq_ids).astype(np.int64)
        slots = alloc.append_slots_batch(seq_ids, q_list, token_ids)  # all or nothing
        src, dst = alloc.pop_copies()
        if len(src):
            src_t, dst_t = torch.from_numpy(src), torch.from_numpy(dst)
            for kc, vc in zip(self.k_caches, self.v_caches):
                ops.copy_pages(kc, vc, src_t, dst_t)

        batch = len(seq_ids)
        seq_lens = (old_lens + q_lens).astype(np.int32)
        block_table = torch.from_numpy(alloc.block_table(seq_ids))
        is_decode = max(q_list) == 1
        if is_decode:  # each new token sits at its sequence's old length
            cu = np.arange(batch + 1, dtype=np.int32)
            total, positions = batch, old_lens
        else:
            cu = np.zeros(batch + 1, dtype=np.int32)
            cu[1:] = np.cumsum(q_lens)
            total = int(cu[-1])
            positions = np.repeat(old_lens - cu[:-1], q_lens) + np.arange(total, dtype=np.int64)
        slot_mapping = torch.from_numpy(slots).to(self.device)
        seq_lens_t, cu_t = torch.from_numpy(seq_lens), torch.from_numpy(cu)
        if is_decode:
            plan = ops.plan_decode(block_table, seq_lens_t, page_size=self.page_size, num_pages=self.num_pages,
                                   device=self.device, window_left=self.window_left)
        else:
            plan = ops.plan_prefill(block_table, seq_lens_t, cu_t, total, page_size=self.page_size,
                                    num_pages=self.num_pages, device=self.device, window_left=self.window_left)
        return Step(tuple(seq_ids), q_lens, slot_mapping, torch.from_numpy(positions), block_table, seq_lens_t,
                    cu_t, plan, is_decode, len(src))

    def write(self, layer: int, step: Step, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write the step's new keys and values of one layer. ``k``, ``v`` [step.num_tokens, num_kv_heads,
        head_dim] in ``dtype`` (quantized with the layer's scales into an 8-bit cache)."""
        layer = self._layer(layer)
        ops.write_kv(k, v, self.k_caches[layer], self.v_caches[layer], step.slot_mapping,
                     k_scale=self.k_scales[layer], v_scale=self.v_scales[layer])

    def _layer(self, layer) -> int:
        """``layer`` checked: an int in [0, num_layers) (-1 does not mean the last layer)."""
        if check_int(layer, "layer", 0) >= self.num_layers:
            raise ValueError(f"layer: expected an int in [0, {self.num_layers}), got {layer!r}")
        return int(layer)

    def attention(self, layer: int, step: Step, q: torch.Tensor, *, scale: float | None = None,
                  logits_soft_cap: float = 0.0, alibi_slopes=None, sinks=None) -> torch.Tensor:
        """Causal attention of the new tokens over all their sequence holds (within the cache's window), after
        :meth:`write` of this layer. ``q`` [step.num_tokens, num_qo_heads, head_dim] -> the same shape and dtype.
        ``scale``, ``logits_soft_cap``, ``alibi_slopes``, ``sinks``: as in :func:`tvm_paged.paged_decode`."""
        layer = self._layer(layer)
        kc, vc = self.k_caches[layer], self.v_caches[layer]
        options = dict(scale=scale, logits_soft_cap=logits_soft_cap, alibi_slopes=alibi_slopes, sinks=sinks,
                       k_scale=self.k_scales[layer], v_scale=self.v_scales[layer])
        if step.is_decode:
            return ops.run_decode(step.plan, q, kc, vc, **options)
        return ops.run_prefill(step.plan, q, kc, vc, causal=True, **options)
