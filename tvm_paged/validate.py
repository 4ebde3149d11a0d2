"""Argument checks for the functional API. Every check runs before any kernel and raises ``ValueError``
naming the offending argument, so bad input never reaches compiled code (no crash, no out-of-bounds read)."""

from __future__ import annotations

import math

import numpy as np

from . import arrays as A
from .config import DTYPES, FP8_DTYPES, check_int


def dtype_name(t, name: str) -> str:
    """The dtype name of q, out, or k and v written: one of ``DTYPES``."""
    found = A.dtype_name(t)
    if found not in DTYPES:
        raise ValueError(f"{name}: dtype {t.dtype} is not supported (one of {tuple(DTYPES)})")
    return found


def cache_dtype_name(t, name: str) -> str:
    """The dtype name of a cache: one of q's dtypes or an 8-bit one."""
    found = A.dtype_name(t)
    if found not in DTYPES and found not in FP8_DTYPES:
        raise ValueError(f"{name}: dtype {t.dtype} is not supported (one of {tuple(DTYPES) + tuple(FP8_DTYPES)})")
    return found


is_fp8 = A.is_fp8


def kernel_view(cache):
    """A cache as its kernels take it: 8-bit caches as their bytes (``uint8``, zero copy), others unchanged."""
    return A.byte_view(cache) if A.is_fp8(cache) else cache


def check_window_left(window_left) -> int:
    """``window_left``: an int >= -1 (-1: no window; ``w``: each query sees ``w + 1`` keys at most)."""
    if isinstance(window_left, bool) or not isinstance(window_left, (int, np.integer)):
        raise ValueError(f"window_left: expected an int (-1 for no window), got {window_left!r}")
    if window_left < -1:
        raise ValueError(f"window_left: must be -1 (no window) or >= 0, got {window_left}")
    if window_left > 2**31 - 1:
        raise ValueError(f"window_left: {window_left} does not fit int32")
    return int(window_left)


def float32_value(x, name: str, positive: bool = False) -> float:
    """A plain number that the kernels take as a float32 argument: finite there (1e39 is not), and with
    ``positive`` still > 0 there (1e-50 rounds to 0)."""
    if not _is_real(x):
        raise ValueError(f"{name}: expected a float, got {x!r}")
    try:
        value = float(x)
    except OverflowError:
        value = math.inf
    with np.errstate(over="ignore", under="ignore"):
        as_f32 = float(np.float32(value))
    if not math.isfinite(as_f32):
        raise ValueError(f"{name}: must be finite as a float32 (the kernels' type), got {x!r}")
    if positive and not as_f32 > 0:
        raise ValueError(f"{name}: must be positive as a float32 (the kernels' type), got {x!r}")
    return value


def check_scale(scale) -> float:
    """``scale``, the factor on q.k: a number finite as a float32."""
    return float32_value(scale, "scale")


def check_soft_cap(cap) -> float:
    """``logits_soft_cap``: a float >= 0 (0: off), finite as a float32 and, when on, positive there."""
    value = float32_value(cap, "logits_soft_cap")
    if value < 0:
        raise ValueError(f"logits_soft_cap: must be >= 0 (0 = off), got {cap!r}")
    return float32_value(cap, "logits_soft_cap", positive=True) if value else 0.0


def check_head_vector(x, name: str, heads: int, heads_name: str, device):
    """An optional ``[heads]`` float32 array of finite values on ``device`` (ALiBi slopes, sink logits), in the
    call's library (see :mod:`tvm_paged.arrays`)."""
    if x is None:
        return None
    t = A.as_array(x, name, A.on_torch(device))
    if A.dtype_name(t) != "float32":
        raise ValueError(f"{name}: expected float32 [{heads_name}], got dtype {t.dtype}")
    if t.ndim != 1 or t.shape[0] != heads:
        raise ValueError(f"{name}: expected shape [{heads_name}] = [{heads}], got {tuple(t.shape)}")
    if not A.same_device(A.device(t), device):
        raise ValueError(f"{name}: device {A.device(t)} differs from the caches' {device}")
    if not A.all_finite(t):
        raise ValueError(f"{name}: every value must be finite")
    return A.contiguous(t)


def check_kv_scale(x, name: str, num_kv_heads: int, fp8: bool, device):
    """``k_scale`` / ``v_scale``: for 8-bit caches a positive finite float or ``[num_kv_heads]`` float32 array,
    returned as a ``[num_kv_heads]`` float32 array on ``device``; caches in q's dtype take none (the default
    1.0), and get None."""
    if A.is_array(x):
        t = A.as_array(x, name, A.on_torch(device))
        if not fp8:
            raise ValueError(f"{name}: scales apply to 8-bit caches only (these caches hold values unscaled)")
        if A.dtype_name(t) != "float32" or t.ndim != 1 or t.shape[0] != num_kv_heads:
            raise ValueError(f"{name}: expected a float or a float32 [num_kv_heads] = [{num_kv_heads}] tensor, got "
                             f"{t.dtype} {tuple(t.shape)}")
        if not A.same_device(A.device(t), device):
            raise ValueError(f"{name}: device {A.device(t)} differs from the caches' {device}")
        if not A.all_finite(t, positive=True):
            raise ValueError(f"{name}: every scale must be positive and finite")
        return A.contiguous(t)
    if not _is_real(x):
        raise ValueError(f"{name}: expected a float or a float32 [num_kv_heads] tensor, got {x!r}")
    if not fp8:
        if float32_value(x, name) != 1.0:
            raise ValueError(f"{name}: scales apply to 8-bit caches only, got {x!r} for caches in q's dtype")
        return None
    return _broadcast_scale(float32_value(x, name, positive=True), num_kv_heads, device)


def _is_real(x) -> bool:
    """A plain number (a Python or numpy int or float; not a bool, a string or a tensor)."""
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, (bool, np.bool_))


_SCALES: dict = {}


def _broadcast_scale(value: float, heads: int, device):
    """A per-tensor scale as the ``[heads]`` float32 array the kernels take (one per value, kept: a serving loop
    passes the same scales every layer)."""
    key = (value, heads, device)
    t = _SCALES.get(key)
    if t is None:
        if len(_SCALES) >= 256:
            _SCALES.clear()
        t = _SCALES[key] = A.full((heads,), value, "float32", device)
    return t


def check_rank(t, rank: int, name: str, shape_doc: str) -> None:
    if t.ndim != rank:
        raise ValueError(f"{name}: expected rank {rank} {shape_doc}, got shape {tuple(t.shape)}")


def check_contiguous_cache(t, name: str) -> None:
    if not A.is_contiguous(t):
        raise ValueError(f"{name}: the cache must be contiguous (it is written in place)")


def check_cache_pair(k_cache, v_cache) -> tuple[int, int, int, int]:
    """Two caches ``[num_pages, page_size, num_kv_heads, head_dim]`` of one shape, dtype and device, contiguous
    -> (num_pages, page_size, num_kv_heads, head_dim)."""
    doc = "[num_pages, page_size, num_kv_heads, head_dim]"
    check_rank(k_cache, 4, "k_cache", doc)
    check_rank(v_cache, 4, "v_cache", doc)
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"v_cache: shape {tuple(v_cache.shape)} differs from k_cache {tuple(k_cache.shape)}")
    if k_cache.dtype != v_cache.dtype:
        raise ValueError(f"v_cache: dtype {v_cache.dtype} differs from k_cache {k_cache.dtype}")
    cache_dtype_name(k_cache, "k_cache")
    if A.device(k_cache) != A.device(v_cache):
        raise ValueError(f"v_cache: device {A.device(v_cache)} differs from k_cache {A.device(k_cache)}")
    check_contiguous_cache(k_cache, "k_cache")
    check_contiguous_cache(v_cache, "v_cache")
    if min(k_cache.shape) <= 0:
        raise ValueError(f"k_cache: every dimension must be positive, got {tuple(k_cache.shape)}")
    return tuple(int(s) for s in k_cache.shape)


def index_array(x, name: str, rank: int, shape_doc: str, torch_call: bool):
    """An integer array of the given rank, a torch tensor (``torch_call``) or numpy array on its own device, as
    int32 contiguous (int64 accepted and narrowed when the values fit)."""
    t = A.as_array(x, name, torch_call)
    check_rank(t, rank, name, shape_doc)
    found = A.dtype_name(t)
    if found not in ("int32", "int64"):
        raise ValueError(f"{name}: expected int32 {shape_doc}, got dtype {t.dtype}")
    if found == "int64":
        if A.numel(t) and (int(t.max()) > 2**31 - 1 or int(t.min()) < -(2**31)):
            raise ValueError(f"{name}: values do not fit int32")
        t = A.cast(t, "int32")
    return A.contiguous(t)


def check_block_table(block_table, seq_lens, page_size: int, num_pages: int, first_key=None) -> np.ndarray:
    """Lengths positive and within the table; every page a sequence uses inside ``[0, num_pages)``.
    Entries past a sequence's last page are ignored (they may be -1), and so are those of pages wholly before
    ``first_key(lens)`` (a function of the lengths giving each sequence's first visible key: a sliding window's
    freed pages). Returns the lengths (int64 numpy)."""
    check_int(page_size, "page_size"), check_int(num_pages, "num_pages")
    batch, max_pages = block_table.shape
    if seq_lens.shape[0] != batch:
        raise ValueError(f"seq_lens: length {seq_lens.shape[0]} does not match block_table's batch {batch}")
    if batch == 0:
        raise ValueError("block_table: batch must be at least 1")
    lens = A.host_numpy(seq_lens).astype(np.int64)
    lo, hi = int(np.min(lens)), int(np.max(lens))
    if lo <= 0:
        b = int(np.argmax(lens <= 0))
        raise ValueError(f"seq_lens: every length must be positive, seq_lens[{b}] = {lens[b]}")
    capacity = max_pages * page_size
    if hi > capacity:
        b = int(np.argmax(lens > capacity))
        raise ValueError(
            f"seq_lens: seq_lens[{b}] = {lens[b]} exceeds what block_table holds "
            f"({max_pages} pages x page_size {page_size} = {capacity})"
        )
    table = A.host_numpy(block_table)
    if 0 <= table.min() and table.max() < num_pages:  # every entry valid, used or not: nothing to mask
        return lens
    used = np.arange(max_pages)[None, :] < ((lens + page_size - 1) // page_size)[:, None]
    if first_key is not None:
        used &= np.arange(max_pages)[None, :] >= (first_key(lens) // page_size)[:, None]
    bad = used & ((table < 0) | (table >= num_pages))
    if bad.any():
        b, p = (int(i) for i in np.argwhere(bad)[0])
        raise ValueError(
            f"block_table: block_table[{b}, {p}] = {table[b, p]} is outside [0, num_pages = {num_pages}) "
            f"and sequence {b} uses it"
        )
    return lens


def check_cu_seqlens(cu_seqlens_q, batch: int, total_q: int, seq_lens) -> np.ndarray:
    """``cu_seqlens_q`` [batch + 1]: starts at 0, monotone, ends at ``total_q``, each query count at most its
    sequence's length. Returns the per-sequence query counts."""
    if cu_seqlens_q.shape[0] != batch + 1:
        raise ValueError(f"cu_seqlens_q: expected {batch + 1} entries (batch + 1), got {cu_seqlens_q.shape[0]}")
    cu = A.host_numpy(cu_seqlens_q).astype(np.int64)
    if cu[0] != 0:
        raise ValueError(f"cu_seqlens_q: must start at 0, got {cu[0]}")
    q_lens = np.diff(cu)
    if (q_lens < 0).any():
        raise ValueError("cu_seqlens_q: must be monotone non-decreasing")
    if cu[-1] != total_q:
        raise ValueError(f"cu_seqlens_q: last entry {cu[-1]} does not match q's {total_q} rows")
    lens = A.host_numpy(seq_lens).astype(np.int64)
    if (q_lens > lens).any():
        b = int(np.argmax(q_lens > lens))
        raise ValueError(
            f"cu_seqlens_q: sequence {b} has {q_lens[b]} queries but seq_lens[{b}] = {lens[b]} "
            "(queries are part of the cached length)"
        )
    return q_lens


def check_writable(x, name: str) -> None:
    """An argument the kernel writes must be writable: a read-only numpy array (a view of a file, a broadcast,
    ``flags.writeable = False``) would be written anyway through its data pointer. ``x``: the argument as
    given (a torch view of it would not say)."""
    if not A.is_writable(x):
        raise ValueError(f"{name}: the array is read-only, and it is written in place")


def check_disjoint(written: dict, others: dict) -> None:
    """No tensor in ``written`` (name -> tensor the kernel writes) shares memory with another written one or with
    any tensor in ``others`` (name -> tensor it reads). Overlap is judged on the byte ranges, so it also catches a
    view of the same storage (``k_cache`` and ``k_cache[:]``) and interleaved views (conservatively)."""
    items = list(written.items())
    arrays = {n: t for n, t in (*items, *others.items()) if t is not None}
    spans = {n: A.byte_span(t) for n, t in arrays.items()}
    for i, (name, t) in enumerate(items):
        span = spans[name]
        if span is None:
            continue
        for other in [n for n, _ in items[:i]] + [n for n in others if n not in written]:
            ospan = spans.get(other)
            # Addresses on two devices may coincide: only arrays on one device can alias.
            if ospan is not None and span[0] < ospan[1] and ospan[0] < span[1] and \
                    A.device(t) == A.device(arrays[other]):
                raise ValueError(f"{name}: shares memory with {other}; an argument that is written may not "
                                 "alias another argument")
