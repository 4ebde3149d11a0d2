"""The Llama-family decoder forward in plain torch (RMSNorm, RoPE, grouped-query attention, SwiGLU; optional Q/K/V
biases for qwen2), with the attention itself handed to a callable: the paged KV cache when serving, contiguous
attention in the references.

Weights are a dict in one layout (linear weights ``[out, in]``, as ``torch.nn.Linear`` stores them), the one
:meth:`tvm_paged.models.GGUFFile.load_weights` returns and the synthetic demo model draws:
``embed`` [vocab, hidden], ``final_norm`` [hidden], ``lm_head`` [vocab, hidden], and per layer ``attn_norm``,
``wq`` [Hq * D, hidden], ``wk``/``wv`` [Hkv * D, hidden], ``wo`` [hidden, Hq * D], ``mlp_norm``, ``w_gate``/``w_up``
[intermediate, hidden], ``w_down`` [hidden, intermediate], and ``bq``/``bk``/``bv`` when the model has biases.
RoPE is the rotate-half convention (Hugging Face's): GGUF's interleaved Q/K rows are undone when loading.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

# attention(layer, q [T, num_qo_heads, head_dim], k [T, num_kv_heads, head_dim], v) -> [T, num_qo_heads, head_dim]
AttentionFn = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class Linear:
    """``y = x @ weight.T + bias`` for x [T, in] -> [T, out]. float32 weights are kept in oneDNN's blocked layout
    when torch has oneDNN: at this model's shapes (64 rows, 576 -> 3072 and -> 49152) oneDNN's prepacked GEMM ran
    1.3-1.6x faster than ``F.linear`` on a 2-core AMD EPYC (Zen 4), the conversions of x and y included."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        self.out_features = int(weight.shape[0])
        self.packed = weight.dtype == torch.float32 and torch.backends.mkldnn.is_available()
        self.weight = weight.contiguous().to_mkldnn() if self.packed else weight
        self.bias = bias

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed:
            return torch._C._nn.mkldnn_linear(x.contiguous().to_mkldnn(), self.weight, self.bias).to_dense()
        return F.linear(x, self.weight, self.bias)


class LlamaModel:
    """A decoder over ``weights`` (see the module docstring), float32 unless the weights are another dtype.

    Q, K and V projections are fused into one matmul per layer, and gate and up into another (fewer, larger
    matmuls: most of a CPU step is there)."""

    def __init__(self, weights: dict, *, num_qo_heads: int, num_kv_heads: int, head_dim: int, rope_theta: float,
                 rms_eps: float, max_positions: int = 32768):
        if num_qo_heads % num_kv_heads:
            raise ValueError(f"num_qo_heads ({num_qo_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        if head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {head_dim}")
        self.num_qo_heads, self.num_kv_heads, self.head_dim = num_qo_heads, num_kv_heads, head_dim
        self.eps = rms_eps
        self.embed = weights["embed"]
        self.final_norm = weights["final_norm"]
        self.lm_head = Linear(weights["lm_head"])
        self.num_layers = len(weights["layers"])
        self.layers = []
        for w in weights["layers"]:
            qkv_bias = None
            if "bq" in w:
                qkv_bias = torch.cat([w["bq"], w["bk"], w["bv"]])
            self.layers.append(dict(
                attn_norm=w["attn_norm"], qkv=Linear(torch.cat([w["wq"], w["wk"], w["wv"]]), qkv_bias),
                wo=Linear(w["wo"]), mlp_norm=w["mlp_norm"], gate_up=Linear(torch.cat([w["w_gate"], w["w_up"]])),
                down=Linear(w["w_down"])))
        self.intermediate = weights["layers"][0]["w_gate"].shape[0]
        # cos/sin per position, computed once (float64, then the weights' dtype).
        inv_freq = rope_theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)  # [head_dim / 2]
        angles = torch.arange(max_positions, dtype=torch.float64)[:, None] * inv_freq[None, :]
        dtype = self.embed.dtype
        self._cos, self._sin = angles.cos().to(dtype), angles.sin().to(dtype)  # [max_positions, head_dim / 2]

    @classmethod
    def from_gguf(cls, gguf_file, dtype: torch.dtype = torch.float32) -> "LlamaModel":
        """The model of an opened :class:`~tvm_paged.models.GGUFFile`, its weights dequantized to ``dtype``."""
        spec = gguf_file.spec
        return cls(gguf_file.load_weights(dtype), num_qo_heads=spec.num_qo_heads, num_kv_heads=spec.num_kv_heads,
                   head_dim=spec.head_dim, rope_theta=spec.rope_theta, rms_eps=spec.rms_eps,
                   max_positions=spec.context_length)

    @property
    def vocab_size(self) -> int:
        return int(self.embed.shape[0])

    @property
    def max_positions(self) -> int:
        return int(self._cos.shape[0])

    def _rms_norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * weight

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [T, heads, head_dim] rotated by position (rotate-half)."""
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)

    @torch.no_grad()
    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, attention: AttentionFn,
                logit_rows: torch.Tensor | None = None) -> torch.Tensor:
        """``tokens``, ``positions`` [T] int64 -> logits [len(logit_rows) or T, vocab] float32.

        ``attention`` is called once per layer, in order, with that layer's new q/k/v rows (RoPE applied).
        """
        T = tokens.shape[0]
        Hq, Hkv, D = self.num_qo_heads, self.num_kv_heads, self.head_dim
        cos, sin = self._cos[positions][:, None, :], self._sin[positions][:, None, :]
        x = self.embed[tokens]  # [T, hidden]
        for i, w in enumerate(self.layers):
            h = self._rms_norm(x, w["attn_norm"])
            qkv = w["qkv"](h)  # [T, (Hq + 2 Hkv) D]
            q, k, v = qkv.split([Hq * D, Hkv * D, Hkv * D], dim=-1)
            q = self._rope(q.view(T, Hq, D), cos, sin)
            k = self._rope(k.view(T, Hkv, D), cos, sin)
            o = attention(i, q, k, v.reshape(T, Hkv, D))  # [T, Hq, D]
            x = x + w["wo"](o.reshape(T, Hq * D))
            h = self._rms_norm(x, w["mlp_norm"])
            gate, up = w["gate_up"](h).split(self.intermediate, dim=-1)
            x = x + w["down"](F.silu(gate) * up)
        if logit_rows is not None:
            x = x[logit_rows]
        return self.lm_head(self._rms_norm(x, self.final_norm)).float()


def contiguous_attention(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal attention of one whole sequence with torch's SDPA: q [T, Hq, D], k, v [T, Hkv, D]."""
    out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                                         is_causal=True, enable_gqa=True)
    return out[0].transpose(0, 1)


def contiguous_logits(model: LlamaModel, tokens, rows: torch.Tensor | None = None) -> torch.Tensor:
    """The reference: logits for a token history recomputed from scratch with contiguous attention; the last
    position's [vocab] by default, else those of ``rows`` [len(rows), vocab]."""
    tokens = torch.as_tensor(tokens, dtype=torch.long)
    positions = torch.arange(tokens.shape[0])
    if rows is None:
        return model.forward(tokens, positions, contiguous_attention, logit_rows=torch.tensor([-1]))[0]
    return model.forward(tokens, positions, contiguous_attention, logit_rows=torch.as_tensor(rows))
