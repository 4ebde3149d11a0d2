"""Dense float64 attention over a paged cache, written independently of the kernels: the one reference every
test and benchmark checks against. Slow and simple on purpose (gather each sequence's tokens, then softmax)."""

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


def gather_kv(cache: torch.Tensor, block_table, seq_len: int) -> torch.Tensor:
    """The first ``seq_len`` tokens of one sequence: ``[seq_len, num_kv_heads, head_dim]`` float64.

    ``cache`` [num_pages, page_size, num_kv_heads, head_dim]; ``block_table`` this sequence's row of page ids.
    """
    page_size = cache.shape[1]
    n_pages = -(-seq_len // page_size)
    pages = torch.as_tensor(np.asarray(block_table)[:n_pages], dtype=torch.long)
    return cache[pages].reshape(-1, *cache.shape[2:])[:seq_len].double()


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, q_positions=None,
              causal: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``q`` [rows, num_qo_heads, head_dim]; ``k``, ``v`` [kv_len, num_kv_heads, head_dim] -> (out float64
    [rows, num_qo_heads, head_dim], lse float64 [rows, num_qo_heads]); causal masks keys after
    ``q_positions[i]``."""
    q = q.double()
    group = q.shape[1] // k.shape[1]
    k = k.double().repeat_interleave(group, dim=1)
    v = v.double().repeat_interleave(group, dim=1)
    s = torch.einsum("qhd,khd->hqk", q, k) * scale
    if causal:
        pos = torch.as_tensor(q_positions, dtype=torch.long)
        mask = torch.arange(k.shape[0])[None, :] > pos[:, None]
        s = s.masked_fill(mask[None], float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse[..., None])
    return torch.einsum("hqk,khd->qhd", p, v), lse.transpose(0, 1)


def decode(q, k_cache, v_cache, block_table, seq_lens, *, scale=None):
    """Reference for :func:`tvm_paged.paged_decode`: (out, lse) float64 on the CPU (inputs on any device)."""
    q, k_cache, v_cache, block_table, lens = _on_host(q, k_cache, v_cache, block_table, seq_lens)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    outs, lses = [], []
    for b, n in enumerate(lens):
        k = gather_kv(k_cache, block_table[b], n)
        v = gather_kv(v_cache, block_table[b], n)
        o, l = attention(q[b : b + 1], k, v, scale=scale)
        outs.append(o)
        lses.append(l)
    return torch.cat(outs), torch.cat(lses)


def prefill(q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q, *, scale=None, causal=True):
    """Reference for :func:`tvm_paged.paged_prefill`: (out, lse) float64 on the CPU (inputs on any device)."""
    q, k_cache, v_cache, block_table, lens = _on_host(q, k_cache, v_cache, block_table, seq_lens)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    cu = _host(cu_seqlens_q).numpy().tolist()
    outs, lses = [], []
    for b, n in enumerate(lens):
        q_b = q[cu[b] : cu[b + 1]]
        if q_b.shape[0] == 0:
            continue
        k = gather_kv(k_cache, block_table[b], n)
        v = gather_kv(v_cache, block_table[b], n)
        positions = np.arange(n - q_b.shape[0], n)
        o, l = attention(q_b, k, v, scale=scale, q_positions=positions, causal=causal)
        outs.append(o)
        lses.append(l)
    return torch.cat(outs), torch.cat(lses)
