"""Dense float64 attention over a paged cache, written independently of the kernels: the one reference every
test and benchmark checks against. Slow and simple on purpose (gather each sequence's tokens, dequantize, then a
softmax over the full score matrix with every option applied as the contract states it)."""

from __future__ import annotations

import numpy as np
import torch


def _host(x):
    """``x`` (torch tensor on any device, or numpy array) as a CPU torch tensor: the reference runs on the host."""
    return torch.as_tensor(x).cpu() if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))


def _on_host(q, k_cache, v_cache, block_table, seq_lens):
    """The shared inputs on the host: q and the caches as CPU tensors, the table and lengths as numpy arrays."""
    return (_host(q), _host(k_cache), _host(v_cache), _host(block_table).numpy(),
            _host(seq_lens).numpy().tolist())


def _per_head(value, heads: int) -> torch.Tensor:
    """A scale given as a float or a ``[heads]`` tensor, as a float64 ``[heads]`` tensor."""
    t = torch.as_tensor(_host(value) if isinstance(value, (torch.Tensor, np.ndarray)) else value,
                        dtype=torch.float64)
    return t.expand(heads).clone() if t.dim() == 0 else t.double()


def gather_kv(cache: torch.Tensor, block_table, seq_len: int, scale=1.0) -> torch.Tensor:
    """The first ``seq_len`` tokens of one sequence: ``[seq_len, num_kv_heads, head_dim]`` float64, an 8-bit
    cache dequantized (``float(code) * scale[kv head]``).

    ``cache`` [num_pages, page_size, num_kv_heads, head_dim]; ``block_table`` this sequence's row of page ids
    (entries of pages it does not read may be anything).
    """
    page_size = cache.shape[1]
    n_pages = -(-seq_len // page_size)
    pages = np.asarray(block_table)[:n_pages].astype(np.int64)
    rows = torch.full((n_pages, page_size, *cache.shape[2:]), float("nan"), dtype=torch.float64)
    valid = pages >= 0  # pages freed behind a sliding window: never visible, filled with NaN
    rows[torch.from_numpy(valid)] = cache[torch.from_numpy(pages[valid])].double()
    return rows.reshape(-1, *cache.shape[2:])[:seq_len] * _per_head(scale, cache.shape[2])[None, :, None]


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, q_positions=None,
              causal: bool = False, window_left: int = -1, logits_soft_cap: float = 0.0, alibi_slopes=None,
              sinks=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``q`` [rows, num_qo_heads, head_dim]; ``k``, ``v`` [kv_len, num_kv_heads, head_dim] -> (out float64
    [rows, num_qo_heads, head_dim], lse float64 [rows, num_qo_heads]).

    Query ``i`` sits at position ``q_positions[i]`` (default: the last ``rows`` positions). Logits
    ``l = scale * q.k``, then ``cap * tanh(l / cap)`` when ``logits_soft_cap > 0``, plus
    ``alibi_slopes[h] * (j - position)``; keys after the query (``causal``) or more than ``window_left`` before
    it (``window_left >= 0``) are masked; ``sinks[h]`` adds ``e^sink`` to the softmax denominator only."""
    q = q.double()
    rows, heads = q.shape[0], q.shape[1]
    kv_len = k.shape[0]
    pos = torch.as_tensor(np.arange(kv_len - rows, kv_len) if q_positions is None else q_positions,
                          dtype=torch.float64)
    group = heads // k.shape[1]
    k = k.double().repeat_interleave(group, dim=1)
    v = v.double().repeat_interleave(group, dim=1)
    s = torch.einsum("qhd,khd->hqk", q, k) * scale
    if logits_soft_cap > 0:
        s = logits_soft_cap * torch.tanh(s / logits_soft_cap)
    j = torch.arange(kv_len, dtype=torch.float64)
    rel = j[None, :] - pos[:, None]  # [rows, kv_len]: key position - query position
    if alibi_slopes is not None:
        s = s + _host(alibi_slopes).double()[:, None, None] * rel[None]
    mask = torch.zeros(rows, kv_len, dtype=torch.bool)
    if causal:
        mask |= rel > 0
    if window_left >= 0:
        mask |= rel < -window_left
    # Masked keys get exactly zero weight, whatever they hold (NaN in unused or freed slots included).
    s = s.masked_fill(mask[None], float("-inf"))
    v = torch.where(torch.isnan(v), torch.zeros((), dtype=v.dtype), v)
    if sinks is not None:
        sink = _host(sinks).double()[:, None, None].expand(heads, rows, 1)
        lse = torch.logsumexp(torch.cat([s, sink], dim=-1), dim=-1)
    else:
        lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse[..., None])
    return torch.einsum("hqk,khd->qhd", p, v), lse.transpose(0, 1)


def _options(options: dict, q: torch.Tensor, k_cache: torch.Tensor):
    """(scale, k_scale, v_scale, options for :func:`attention`) from a call's keyword arguments."""
    options = dict(options)
    scale = options.pop("scale", None)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    k_scale, v_scale = options.pop("k_scale", 1.0), options.pop("v_scale", 1.0)
    unknown = set(options) - {"window_left", "logits_soft_cap", "alibi_slopes", "sinks"}
    if unknown:
        raise TypeError(f"reference: unknown options {sorted(unknown)}")
    return scale, k_scale, v_scale, options


def decode(q, k_cache, v_cache, block_table, seq_lens, **options):
    """Reference for :func:`tvm_paged.paged_decode` (same keyword options, ``batch_invariant`` aside): (out, lse)
    float64 on the CPU (inputs on any device; 8-bit caches as torch float8 tensors)."""
    q, k_cache, v_cache, block_table, lens = _on_host(q, k_cache, v_cache, block_table, seq_lens)
    scale, k_scale, v_scale, opts = _options(options, q, k_cache)
    outs, lses = [], []
    for b, n in enumerate(lens):
        k = gather_kv(k_cache, block_table[b], n, k_scale)
        v = gather_kv(v_cache, block_table[b], n, v_scale)
        o, l = attention(q[b : b + 1], k, v, scale=scale, q_positions=[n - 1], **opts)
        outs.append(o)
        lses.append(l)
    return torch.cat(outs), torch.cat(lses)


def prefill(q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q, *, causal=True, **options):
    """Reference for :func:`tvm_paged.paged_prefill` (same keyword options): (out, lse) float64 on the CPU."""
    q, k_cache, v_cache, block_table, lens = _on_host(q, k_cache, v_cache, block_table, seq_lens)
    scale, k_scale, v_scale, opts = _options(options, q, k_cache)
    cu = _host(cu_seqlens_q).numpy().tolist()
    outs, lses = [], []
    for b, n in enumerate(lens):
        q_b = q[cu[b] : cu[b + 1]]
        if q_b.shape[0] == 0:
            continue
        k = gather_kv(k_cache, block_table[b], n, k_scale)
        v = gather_kv(v_cache, block_table[b], n, v_scale)
        positions = np.arange(n - q_b.shape[0], n)
        o, l = attention(q_b, k, v, scale=scale, q_positions=positions, causal=causal, **opts)
        outs.append(o)
        lses.append(l)
    return torch.cat(outs), torch.cat(lses)


def quantize_kv(x, kv_dtype: torch.dtype, scale=1.0) -> torch.Tensor:
    """What :func:`tvm_paged.write_kv` stores for ``x`` [tokens, num_kv_heads, head_dim] in an 8-bit cache:
    ``x / scale[kv head]`` rounded to nearest even, clamped to the format's finite range."""
    fmax = torch.finfo(kv_dtype).max
    x = _host(x).float()
    s = _per_head(scale, x.shape[1]).float()[None, :, None]
    return (x / s).clamp(-fmax, fmax).to(kv_dtype)
