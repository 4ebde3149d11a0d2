"""A small Llama-architecture decoder in plain torch: RMSNorm, RoPE, grouped-query attention, SwiGLU.

Random weights from a fixed seed (the demo checks the serving machinery, not the text). The attention itself is
pluggable: :meth:`TinyLlama.forward` hands each layer's ``q``, ``k``, ``v`` (RoPE applied) to a callable, which
is the paged cache in the engine and plain contiguous attention in :func:`contiguous_logits`, the reference.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

# attention(layer, q [T, num_qo_heads, head_dim], k [T, num_kv_heads, head_dim], v) -> [T, num_qo_heads, head_dim]
AttentionFn = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class ModelConfig:
    num_layers: int = 4
    hidden: int = 512
    num_qo_heads: int = 8
    num_kv_heads: int = 2
    head_dim: int = 64
    intermediate: int = 1024
    vocab: int = 1000
    rope_theta: float = 10000.0
    eps: float = 1e-5
    seed: int = 0

    def __post_init__(self):
        if self.num_qo_heads % self.num_kv_heads:
            raise ValueError(f"num_qo_heads ({self.num_qo_heads}) must be a multiple of num_kv_heads "
                             f"({self.num_kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")


class TinyLlama:
    """Weights (float32 unless ``dtype``) drawn from ``cfg.seed``; linear weights stored ``[out, in]``."""

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype = torch.float32):
        self.cfg = cfg
        g = torch.Generator().manual_seed(cfg.seed)
        H, Hq, Hkv, D, I = cfg.hidden, cfg.num_qo_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate

        def linear(out_features, in_features):
            return (torch.randn(out_features, in_features, generator=g) * in_features ** -0.5).to(dtype)

        self.embed = torch.randn(cfg.vocab, H, generator=g).to(dtype)  # [vocab, hidden]
        self.layers = [
            dict(attn_norm=torch.ones(H, dtype=dtype), wq=linear(Hq * D, H), wk=linear(Hkv * D, H),
                 wv=linear(Hkv * D, H), wo=linear(H, Hq * D), mlp_norm=torch.ones(H, dtype=dtype),
                 w_gate=linear(I, H), w_up=linear(I, H), w_down=linear(H, I))
            for _ in range(cfg.num_layers)
        ]
        self.final_norm = torch.ones(H, dtype=dtype)
        self.lm_head = linear(cfg.vocab, H)
        self.inv_freq = cfg.rope_theta ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)  # [head_dim / 2]

    def _rms_norm(self, x, weight):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.cfg.eps) * weight

    def _rope(self, x, positions):
        """x [T, heads, head_dim] rotated by position (rotate-half convention)."""
        angles = positions.to(torch.float64)[:, None] * self.inv_freq[None, :]  # [T, head_dim / 2]
        cos, sin = angles.cos().to(x.dtype)[:, None, :], angles.sin().to(x.dtype)[:, None, :]
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)

    @torch.no_grad()
    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, attention: AttentionFn,
                logit_rows: torch.Tensor | None = None) -> torch.Tensor:
        """``tokens``, ``positions`` [T] int64 -> logits [len(logit_rows) or T, vocab] float32.

        ``attention`` is called once per layer, in order, with that layer's new q/k/v rows.
        """
        cfg = self.cfg
        T = tokens.shape[0]
        x = self.embed[tokens]  # [T, hidden]
        for i, w in enumerate(self.layers):
            h = self._rms_norm(x, w["attn_norm"])
            q = self._rope((h @ w["wq"].T).view(T, cfg.num_qo_heads, cfg.head_dim), positions)
            k = self._rope((h @ w["wk"].T).view(T, cfg.num_kv_heads, cfg.head_dim), positions)
            v = (h @ w["wv"].T).view(T, cfg.num_kv_heads, cfg.head_dim)
            o = attention(i, q.contiguous(), k.contiguous(), v.contiguous())  # [T, Hq, D]
            x = x + o.reshape(T, -1) @ w["wo"].T
            h = self._rms_norm(x, w["mlp_norm"])
            x = x + (F.silu(h @ w["w_gate"].T) * (h @ w["w_up"].T)) @ w["w_down"].T
        if logit_rows is not None:
            x = x[logit_rows]
        return (self._rms_norm(x, self.final_norm) @ self.lm_head.T).float()


def contiguous_attention(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal attention of one whole sequence with torch's SDPA: q [T, Hq, D], k, v [T, Hkv, D]."""
    out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                                         is_causal=True, enable_gqa=True)
    return out[0].transpose(0, 1)


def contiguous_logits(model: TinyLlama, tokens) -> torch.Tensor:
    """The reference: the last position's logits [vocab] for a token history recomputed from scratch."""
    tokens = torch.as_tensor(tokens, dtype=torch.long)
    positions = torch.arange(tokens.shape[0])
    return model.forward(tokens, positions, contiguous_attention, logit_rows=torch.tensor([-1]))[0]
