"""Paged causal prefill attention in TensorIR block form, for the paged-attention design space (comparison only).

The block-form counterpart of ``prefill_cpu`` that MetaSchedule's ``tune_tir`` schedules through
``tuning.paged_space.prefill_space``: a chain of compute blocks over static shapes (one tuning bucket), every
sequence with the same number ``q_len`` of query rows, the last ``q_len`` tokens of the sequence (so row ``i``
of sequence ``b`` sits at position ``seq_lens[b] - q_len + i``, as in ``tp.paged_prefill``):

    score[b, i, h, j] = sum_d q[b * q_len + i, h, d] * K[block_table[b, j // S], j % S, h // G, d] * scale * log2(e)
    vis(b, i, j)      = j <= seq_lens[b] - q_len + i        (causal; implies j < seq_lens[b])
    mx[b, i, h]       = max_j (vis ? score : -inf)
    p[b, i, h, j]     = vis ? 2 ** (score - mx) : 0
    den[b, i, h]      = sum_j p
    acc[b, i, h, d]   = sum_j (vis ? p * V[...] : 0)         (a slot past the length may hold NaN)
    out[b * q_len + i, h, d] = acc / den

Every row's key loop runs to ``max_pages * page_size`` and masks (the shipped kernel stops at each row's causal
bound), so page-table entries up to ``max_pages`` are read: the tuning workload fills the whole table.

Signature (static): q [B * q_len, Hq, D], k_cache / v_cache [P, S, Hkv, D], block_table [B, M] int32,
seq_lens [B] int32, out [B * q_len, Hq, D]; the softmax scale is bound at build time.
"""

from __future__ import annotations

from ..config import KernelConfig
from ..tvm_compat import T
from .common import LOG2E, exp2, from_f32, to_f32


def build_prefill_blocks(cfg: KernelConfig, batch: int, max_pages: int, num_pages: int, q_len: int,
                         scale: float | None = None):
    """The block-form causal prefill PrimFunc of ``cfg`` for one bucket (``batch`` x ``max_pages``, ``q_len``
    query rows per sequence) over ``num_pages``."""
    if cfg.kernel != "prefill":
        raise ValueError(f"build_prefill_blocks needs a prefill config, got {cfg.name}")
    if not 0 < q_len <= (max_pages - 1) * cfg.page_size + 1:
        raise ValueError(f"q_len: {q_len} query rows do not fit sequences of {max_pages} pages")
    Hq, Hkv, D, S, G = cfg.num_qo_heads, cfg.num_kv_heads, cfg.head_dim, cfg.page_size, cfg.group_size
    B, M, P, N, QL = int(batch), int(max_pages), int(num_pages), int(max_pages) * cfg.page_size, int(q_len)
    dt = cfg.dtype
    qscale = T.float32((cfg.head_dim ** -0.5 if scale is None else float(scale)) * LOG2E)
    neg_inf = T.float32(float("-inf"))

    @T.prim_func(s_tir=True)
    def prefill_blocks(
        Q: T.Buffer((B * QL, Hq, D), dt), K: T.Buffer((P, S, Hkv, D), dt), V: T.Buffer((P, S, Hkv, D), dt),
        BT: T.Buffer((B, M), "int32"), SL: T.Buffer((B,), "int32"), O: T.Buffer((B * QL, Hq, D), dt),
    ):
        T.func_attr({"global_symbol": cfg.name + "_blocks", "tirx.noalias": True})
        with T.sblock("root"):
            score = T.sblock_alloc_buffer((B, QL, Hq, N), "float32")
            mx = T.sblock_alloc_buffer((B, QL, Hq), "float32")
            p = T.sblock_alloc_buffer((B, QL, Hq, N), "float32")
            den = T.sblock_alloc_buffer((B, QL, Hq), "float32")
            acc = T.sblock_alloc_buffer((B, QL, Hq, D), "float32")
            for b, i, h, j, d in T.grid(B, QL, Hq, N, D):
                with T.sblock("score"):
                    vb, vi, vh, vj, vd = T.axis.remap("SSSSR", [b, i, h, j, d])
                    with T.init():
                        score[vb, vi, vh, vj] = T.float32(0)
                    score[vb, vi, vh, vj] = score[vb, vi, vh, vj] + to_f32(Q[vb * QL + vi, vh, vd], dt) * qscale * (
                        to_f32(K[BT[vb, vj // S], vj % S, vh // G, vd], dt))
            for b, i, h, j in T.grid(B, QL, Hq, N):
                with T.sblock("max"):
                    vb, vi, vh, vj = T.axis.remap("SSSR", [b, i, h, j])
                    with T.init():
                        mx[vb, vi, vh] = T.min_value("float32")  # not -inf: rfactor needs a finite identity
                    mx[vb, vi, vh] = T.max(mx[vb, vi, vh], T.Select(
                        vj <= SL[vb] - QL + vi, score[vb, vi, vh, vj], neg_inf))
            for b, i, h, j in T.grid(B, QL, Hq, N):
                with T.sblock("p"):
                    vb, vi, vh, vj = T.axis.remap("SSSS", [b, i, h, j])
                    p[vb, vi, vh, vj] = T.Select(vj <= SL[vb] - QL + vi,
                                                 exp2(score[vb, vi, vh, vj] - mx[vb, vi, vh]), T.float32(0))
            for b, i, h, j in T.grid(B, QL, Hq, N):
                with T.sblock("sum"):
                    vb, vi, vh, vj = T.axis.remap("SSSR", [b, i, h, j])
                    with T.init():
                        den[vb, vi, vh] = T.float32(0)
                    den[vb, vi, vh] = den[vb, vi, vh] + p[vb, vi, vh, vj]
            for b, i, h, d, j in T.grid(B, QL, Hq, D, N):
                with T.sblock("pv"):
                    vb, vi, vh, vd, vj = T.axis.remap("SSSSR", [b, i, h, d, j])
                    with T.init():
                        acc[vb, vi, vh, vd] = T.float32(0)
                    acc[vb, vi, vh, vd] = acc[vb, vi, vh, vd] + T.Select(
                        vj <= SL[vb] - QL + vi,
                        p[vb, vi, vh, vj] * to_f32(V[BT[vb, vj // S], vj % S, vh // G, vd], dt), T.float32(0))
            for r, h, d in T.grid(B * QL, Hq, D):
                with T.sblock("out"):
                    vr, vh, vd = T.axis.remap("SSS", [r, h, d])
                    O[vr, vh, vd] = from_f32(acc[vr // QL, vr % QL, vh, vd] / den[vr // QL, vr % QL, vh], dt)

    return prefill_blocks
