"""Paged decode attention in TensorIR block form, for MetaSchedule's generic design space (comparison only).

The shipped kernels (``decode_cpu``, ``decode_cuda``) are hand-scheduled programs that schedule primitives cannot
express (software prefetch, loops that stop at each sequence's own length). This one is the textbook
formulation that MetaSchedule's generic rules (auto-inline, multi-level tiling, parallel/vectorize/unroll,
random compute location) are written for: a chain of compute blocks with a two-pass softmax,

    score[b, h, j] = sum_d q[b, h, d] * K[block_table[b, j // S], j % S, h // G, d] * scale * log2(e)
    mx[b, h]       = max_j  (j < seq_lens[b] ? score : -inf)
    p(b, h, j)     = j < seq_lens[b] ? 2 ** (score - mx) : 0      (recomputed where used, not stored)
    den[b, h]      = sum_j p
    acc[b, h, d]   = sum_j p / den[b, h] * V[block_table[b, j // S], j % S, h // G, d]
    out[b, h, d]   = acc   (cast to the output dtype)

over static shapes (one tuning bucket): every sequence's loop runs to ``max_pages * page_size`` and masks, so
page-table entries up to ``max_pages`` are read: the tuning workload fills the whole table with valid pages.
``tvm-paged tune --space generic`` tunes it to show what the generic space reaches next to the knob space.

With ``weights=True`` the weights are a block of their own and the output is normalized at the end,

    p[b, h, j]     = j < seq_lens[b] ? 2 ** (score - mx) : 0
    den[b, h]      = sum_j p
    acc[b, h, d]   = sum_j (j < seq_lens[b] ? p * V[...] : 0)   (a slot past the length may hold NaN)
    out[b, h, d]   = acc / den

the form the paged-attention design space (``tuning.paged_space``) schedules: each weight is computed once, not
once per use. MetaSchedule's generic rules cannot schedule this form (their ``reverse_compute_at`` of the
elementwise ``p``, which reads two producers, raises), hence the recomputing form above for them.

Signature (static): q [B, Hq, D], k_cache / v_cache [P, S, Hkv, D], block_table [B, M] int32, seq_lens [B]
int32, out [B, Hq, D]; the softmax scale is bound at build time.
"""

from __future__ import annotations

from ..config import KernelConfig
from ..tvm_compat import T
from .common import LOG2E, exp2, from_f32, to_f32


def build_decode_generic(cfg: KernelConfig, batch: int, max_pages: int, num_pages: int, scale: float | None = None,
                         *, weights: bool = False):
    """The block-form decode PrimFunc of ``cfg`` for one bucket (``batch`` x ``max_pages``) over ``num_pages``;
    ``weights``: store the softmax weights in a block of their own (see the module docstring)."""
    if cfg.kernel != "decode":
        raise ValueError(f"build_decode_generic needs a decode config, got {cfg.name}")
    Hq, Hkv, D, S, G = cfg.num_qo_heads, cfg.num_kv_heads, cfg.head_dim, cfg.page_size, cfg.group_size
    B, M, P, N = int(batch), int(max_pages), int(num_pages), int(max_pages) * cfg.page_size
    dt = cfg.dtype
    qscale = T.float32((cfg.head_dim ** -0.5 if scale is None else float(scale)) * LOG2E)
    neg_inf = T.float32(float("-inf"))
    symbol = cfg.name + ("_blocks" if weights else "_generic")

    # The `if weights:` tests are Python values: TVMScript resolves them while parsing, so each form holds only
    # its own blocks.
    @T.prim_func(s_tir=True)  # a schedulable (block-form) function
    def decode_generic(
        Q: T.Buffer((B, Hq, D), dt), K: T.Buffer((P, S, Hkv, D), dt), V: T.Buffer((P, S, Hkv, D), dt),
        BT: T.Buffer((B, M), "int32"), SL: T.Buffer((B,), "int32"), O: T.Buffer((B, Hq, D), dt),
    ):
        T.func_attr({"global_symbol": symbol, "tirx.noalias": True})
        # Intermediates belong to the root block, where MetaSchedule's compute-location rules can move them.
        with T.sblock("root"):
            score = T.sblock_alloc_buffer((B, Hq, N), "float32")
            mx = T.sblock_alloc_buffer((B, Hq), "float32")
            if weights:
                p = T.sblock_alloc_buffer((B, Hq, N), "float32")
            den = T.sblock_alloc_buffer((B, Hq), "float32")
            acc = T.sblock_alloc_buffer((B, Hq, D), "float32")
            for b, h, j, d in T.grid(B, Hq, N, D):
                with T.sblock("score"):
                    vb, vh, vj, vd = T.axis.remap("SSSR", [b, h, j, d])
                    with T.init():
                        score[vb, vh, vj] = T.float32(0)
                    score[vb, vh, vj] = score[vb, vh, vj] + to_f32(Q[vb, vh, vd], dt) * qscale * to_f32(
                        K[BT[vb, vj // S], vj % S, vh // G, vd], dt)
            for b, h, j in T.grid(B, Hq, N):
                with T.sblock("max"):
                    vb, vh, vj = T.axis.remap("SSR", [b, h, j])
                    with T.init():
                        mx[vb, vh] = T.min_value("float32")  # not -inf: rfactor needs a finite identity
                    mx[vb, vh] = T.max(mx[vb, vh], T.Select(vj < SL[vb], score[vb, vh, vj], neg_inf))
            if weights:
                for b, h, j in T.grid(B, Hq, N):
                    with T.sblock("p"):
                        vb, vh, vj = T.axis.remap("SSS", [b, h, j])
                        p[vb, vh, vj] = T.Select(vj < SL[vb], exp2(score[vb, vh, vj] - mx[vb, vh]), T.float32(0))
                for b, h, j in T.grid(B, Hq, N):
                    with T.sblock("sum"):
                        vb, vh, vj = T.axis.remap("SSR", [b, h, j])
                        with T.init():
                            den[vb, vh] = T.float32(0)
                        den[vb, vh] = den[vb, vh] + p[vb, vh, vj]
                for b, h, d, j in T.grid(B, Hq, D, N):
                    with T.sblock("pv"):
                        vb, vh, vd, vj = T.axis.remap("SSSR", [b, h, d, j])
                        with T.init():
                            acc[vb, vh, vd] = T.float32(0)
                        # Masked as a product, not only through p = 0: a slot past the length may hold NaN.
                        acc[vb, vh, vd] = acc[vb, vh, vd] + T.Select(
                            vj < SL[vb], p[vb, vh, vj] * to_f32(V[BT[vb, vj // S], vj % S, vh // G, vd], dt),
                            T.float32(0))
                for b, h, d in T.grid(B, Hq, D):
                    with T.sblock("out"):
                        vb, vh, vd = T.axis.remap("SSS", [b, h, d])
                        O[vb, vh, vd] = from_f32(acc[vb, vh, vd] / den[vb, vh], dt)
            else:
                # The weights are recomputed where they are used (in the sum and in P.V) rather than stored by a
                # block of their own: MetaSchedule's tiling rules move an elementwise consumer of a reduction under
                # the reduction's loops, which fails when it also reads another producer (here `score`).
                for b, h, j in T.grid(B, Hq, N):
                    with T.sblock("sum"):
                        vb, vh, vj = T.axis.remap("SSR", [b, h, j])
                        with T.init():
                            den[vb, vh] = T.float32(0)
                        den[vb, vh] = den[vb, vh] + T.Select(vj < SL[vb], exp2(score[vb, vh, vj] - mx[vb, vh]),
                                                             T.float32(0))
                for b, h, d, j in T.grid(B, Hq, D, N):
                    with T.sblock("pv"):
                        vb, vh, vd, vj = T.axis.remap("SSSR", [b, h, d, j])
                        with T.init():
                            acc[vb, vh, vd] = T.float32(0)
                        acc[vb, vh, vd] = acc[vb, vh, vd] + T.Select(
                            vj < SL[vb], exp2(score[vb, vh, vj] - mx[vb, vh]) / den[vb, vh], T.float32(0)
                        ) * to_f32(V[BT[vb, vj // S], vj % S, vh // G, vd], dt)
                for b, h, d in T.grid(B, Hq, D):
                    with T.sblock("out"):
                        vb, vh, vd = T.axis.remap("SSS", [b, h, d])
                        O[vb, vh, vd] = from_f32(acc[vb, vh, vd], dt)

    return decode_generic
