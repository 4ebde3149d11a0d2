"""The synthetic demo model: a small Llama-architecture decoder with random weights from a fixed seed (it checks
the serving machinery, not the text; ``tvm-paged demo`` serves a real model by default). The forward and the
contiguous-attention reference are :mod:`tvm_paged.models.llama`'s.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..models.llama import LlamaModel, contiguous_attention, contiguous_logits

__all__ = ["ModelConfig", "TinyLlama", "contiguous_attention", "contiguous_logits"]


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


class TinyLlama(LlamaModel):
    """The synthetic model: weights (float32 unless ``dtype``) drawn from ``cfg.seed``, in
    :class:`~tvm_paged.models.llama.LlamaModel`'s layout."""

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype = torch.float32):
        self.cfg = cfg
        g = torch.Generator().manual_seed(cfg.seed)
        H, Hq, Hkv, D, I = cfg.hidden, cfg.num_qo_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate

        def linear(out_features, in_features):
            return (torch.randn(out_features, in_features, generator=g) * in_features ** -0.5).to(dtype)

        embed = torch.randn(cfg.vocab, H, generator=g).to(dtype)  # [vocab, hidden]
        layers = [
            dict(attn_norm=torch.ones(H, dtype=dtype), wq=linear(Hq * D, H), wk=linear(Hkv * D, H),
                 wv=linear(Hkv * D, H), wo=linear(H, Hq * D), mlp_norm=torch.ones(H, dtype=dtype),
                 w_gate=linear(I, H), w_up=linear(I, H), w_down=linear(H, I))
            for _ in range(cfg.num_layers)
        ]
        weights = dict(embed=embed, layers=layers, final_norm=torch.ones(H, dtype=dtype), lm_head=linear(cfg.vocab, H))
        super().__init__(weights, num_qo_heads=Hq, num_kv_heads=Hkv, head_dim=D, rope_theta=cfg.rope_theta,
                         rms_eps=cfg.eps, max_positions=8192)
