"""Paged (chunked) prefill attention for CUDA GPUs, as a thread-bound TVMScript program.

The parameters are :data:`tvm_paged.spec.PREFILL`'s (see :func:`build_prefill_cuda`), as on the CPU.

Query ``i`` of sequence ``b`` (row ``cu_seqlens_q[b] + i``) sits at position ``seq_lens[b] - q_len_b + i``; causal:
key ``j`` visible iff ``j <= position``; otherwise all ``seq_lens[b]`` keys.

One thread block per (tile, KV head, query-head group); the tile's rows are taken ``q_tile`` at a time
(``tvm_paged.spec.PREFILL.constants["q_tile"]``, the planner's tile height; a taller tile takes several passes).
The block's queries are (row, head) pairs, ``queries_per_group`` of them per lane group:

* ``threadIdx.x`` (``bdx`` lanes): each lane owns a ``vec``-element slice of head_dim (as in the decode kernel).
* ``threadIdx.y``: lane groups; group ``ty`` holds its queries' q slices and output accumulators in registers.
* Keys and values are staged ``kv_tile`` tokens at a time in shared memory (16-byte loads, only tokens below
  the block's visible limit are read); every group then scores its queries against the staged rows
  (partial dot per lane + warp-shuffle butterfly), ``tokens_per_step`` tokens per online-softmax rescale.

The softmax runs in the log2 domain from a true minus infinity; a still-infinite running max is replaced by 0
before any ``exp2`` so ``-inf - -inf`` never occurs. This kernel uses CUDA cores only (no tensor cores): simple,
and correct for every head_dim / group size; not a peak-FLOP prefill.

Variants (compiled in only for the configs that have them), as in :mod:`tvm_paged.kernels.decode_cuda`: 8-bit
caches staged as bytes and widened from shared memory (scales folded into q and the output normalisation);
``window``: query ``i`` sees keys ``j >= pos_i - window_left`` and a pass stages keys from its first row's
window start on (keys before it are never read); ``soft_cap`` and ``alibi`` on each score; ``sinks`` in each
row's denominator at the end.
"""

from __future__ import annotations

from ..config import KernelConfig
from ..spec import PREFILL
from ..tvm_compat import T
from .common import (
    LN2, LOG2E, from_f32, kv_to_f32, kv_widen_factor, online_softmax_update, q_multiplier, to_f32,
    variant_logit, warp_allreduce_sum,
)
from .decode_cuda import feasible_space, head_dim_lanes, target_limits
from .signatures import finish, prefill_args


def _floor_pow2(n: int) -> int:
    return 1 << (max(1, n).bit_length() - 1)


def prefill_plan(cfg: KernelConfig, target=None, *, vec: int | None = None, heads_per_block: int | None = None,
                 queries_per_group: int | None = None, kv_tile: int | None = None,
                 tokens_per_step: int = 4, max_threads: int = 256) -> dict:
    """Resolve the prefill kernel's knobs; raise ValueError when they cannot fit the target.

    Knobs:
      ``vec``               head_dim elements per lane (power of two dividing head_dim; default one 16-byte load)
      ``heads_per_block``   query heads of a group per block, a divisor of the group size (default: the most
                            that fit ``max_threads`` with ``queries_per_group`` <= 32 / vec)
      ``queries_per_group`` (row, head) pairs per lane group, a divisor of q_tile * heads_per_block (their q
                            slices and accumulators live in registers)
      ``kv_tile``           tokens staged in shared memory per step (default: 64, or what 32 KiB holds)
      ``tokens_per_step``   tokens per online-softmax rescale, divides kv_tile (default 4)
      ``max_threads``       cap on threads per block used by the defaults (default 256)
    """
    if cfg.kernel != "prefill":
        raise ValueError(f"prefill kernel needs a prefill config, got {cfg.name}")
    lim = target_limits(target)
    D, G, E, KE = cfg.head_dim, cfg.group_size, cfg.itemsize, cfg.kv_itemsize
    QR = PREFILL.constants["q_tile"]  # query rows per pass
    # Lanes are sized by the cache's element (16-byte staging loads: 16 elements of an 8-bit cache).
    vec, lanes, bdx, active = head_dim_lanes(D, KE, vec, lim["warp"])
    q_lanes = min(vec, max(1, 16 // E))  # elements per vector load of q and store of out
    if max_threads < lim["warp"]:
        raise ValueError(f"max_threads ({max_threads}) must be at least a warp ({lim['warp']})")
    max_threads = min(lim["max_threads"], max_threads)
    nq_cap = max(1, 32 // vec)

    def group_count(gq, nq):
        qn = QR * gq
        if qn % nq:
            return None
        bdy = qn // nq
        threads = bdx * bdy
        if threads % lim["warp"] or threads > lim["max_threads"]:
            return None
        return bdy

    if heads_per_block is None:
        # The largest divisor of the group whose QR rows fit one block with nq_cap queries per lane group.
        heads_per_block = 1
        for gq in range(G, 0, -1):
            if G % gq == 0 and QR * gq * bdx <= max_threads * nq_cap:
                heads_per_block = gq
                break
    if G % heads_per_block:
        raise ValueError(f"heads_per_block ({heads_per_block}) must divide the group size ({G})")
    gq = heads_per_block
    qn = QR * gq
    if queries_per_group is None:
        for nq in range(min(nq_cap, qn), 0, -1):
            bdy = group_count(gq, nq)
            if bdy is not None and bdx * bdy <= max_threads:
                queries_per_group = nq
                break
        if queries_per_group is None:
            for nq in range(1, qn + 1):
                if group_count(gq, nq) is not None:
                    queries_per_group = nq
                    break
        if queries_per_group is None:
            raise ValueError(f"prefill {cfg.name}: no queries_per_group gives full warps within the thread limit")
    nq = queries_per_group
    bdy = group_count(gq, nq)
    if bdy is None:
        raise ValueError(f"prefill {cfg.name}: queries_per_group {nq} must divide {qn} and give a block of whole "
                         f"warps within {lim['max_threads']} threads (bdx {bdx})")
    if kv_tile is None:
        kv_tile = max(tokens_per_step, min(64, _floor_pow2(min(lim["max_shared"], 32 * 1024) // (2 * D * KE))))
    if kv_tile < 1 or tokens_per_step < 1 or kv_tile % tokens_per_step:
        raise ValueError(f"kv_tile ({kv_tile}) must be a positive multiple of tokens_per_step ({tokens_per_step})")
    shared = 2 * kv_tile * D * KE
    if shared > lim["max_shared"]:
        raise ValueError(f"prefill {cfg.name}: K/V tiles need {shared} bytes of shared memory, the target allows "
                         f"{lim['max_shared']}: lower kv_tile")
    return {
        "vec": vec, "lanes": lanes, "q_lanes": q_lanes, "bdx": bdx, "active": active, "bdy": bdy, "gq": gq,
        "head_groups": G // gq,
        "nq": nq, "kv_tile": kv_tile, "step": tokens_per_step, "shared_bytes": shared, "num_threads": bdx * bdy,
    }


def knob_space(cfg: KernelConfig, target=None) -> dict[str, list]:
    """Tunable knobs of :func:`build_prefill_cuda` (first value of each list = the default); every combination
    fits the target. ``heads_per_block`` and ``queries_per_group`` follow from ``max_threads``."""
    base = prefill_plan(cfg, target)
    tiles = [base["kv_tile"]] + [t for t in (16, 32, 64) if t <= base["kv_tile"] * 2]
    space = {"max_threads": [256, 128, 512], "kv_tile": tiles, "tokens_per_step": [base["step"], 2, 8]}
    return feasible_space(space, lambda **k: prefill_plan(cfg, target, **k))


def build_prefill_cuda(cfg: KernelConfig, target=None, **knobs):
    """Return the prefill PrimFunc for ``cfg`` on a CUDA target (knobs: see :func:`prefill_plan`).

    Its parameters are :data:`tvm_paged.spec.PREFILL`'s for ``cfg`` (its variants' only), as on the CPU
    (``dtype`` = ``cfg.dtype``; ``TQ``, ``P``, ``B``, ``M``, ``NT`` symbolic): q [TQ, Hq, D] dtype, k_cache /
    v_cache [P, S, Hkv, D] (``cfg.kv_storage``: uint8 for 8-bit caches); block_table [B, M], seq_lens [B],
    cu_seqlens_q [B + 1], tiles [NT, 3] (b, row_start, row_end) int32; k_scale / v_scale [Hkv] (8-bit),
    alibi_slopes / sinks [Hq] float32; out [TQ, Hq, D] dtype and lse [TQ, Hq] float32 (written); scale float32,
    causal int32, window_left int32, logits_soft_cap float32.
    """
    plan = prefill_plan(cfg, target, **knobs)
    Hkv, D, S, G = cfg.num_kv_heads, cfg.head_dim, cfg.page_size, cfg.group_size
    dt, kvt = cfg.dtype, cfg.kv_storage
    VEC, LANES, BDX, ACT, BDY = (plan[k] for k in ("vec", "lanes", "bdx", "active", "bdy"))
    QL = plan["q_lanes"]
    GQ, HG, NQ, KT, C = plan["gq"], plan["head_groups"], plan["nq"], plan["kv_tile"], plan["step"]
    NCH = VEC // LANES  # vector loads per lane per staged cache row
    NQC = VEC // QL  # vector loads per lane per q row (stores per out row)
    LOG_BDX = BDX.bit_length() - 1
    QR = PREFILL.constants["q_tile"]
    ROWS_PER_PASS = (KT + BDY - 1) // BDY  # staged rows each lane group loads
    BLOCKS_PER_TILE = Hkv * HG
    neg_inf = T.float32(float("-inf"))
    fp8, window, soft_cap, alibi, sinks = cfg.is_fp8, cfg.window, cfg.soft_cap, cfg.alibi, cfg.sinks
    WIDEN = kv_widen_factor(cfg)
    kv_zero = T.uint8(0) if fp8 else T.Cast(kvt, T.float32(0))

    # Expressions of the variants (Python helpers: a plain config's code is the base kernel's).
    def q_mult(scale, cap, KS, kvh):
        return q_multiplier(cfg, scale, cap, KS, kvh)

    def logit(x, cap, slope, i, rel):
        return variant_logit(cfg, x, cap, slope, i, rel)

    def visible(window_left, key, pos):
        """The window's part of the mask (the rest: a real row, key < kv_hi, causal)."""
        return key >= pos - T.Cast("int64", window_left) if window else True

    def out_mult(VS, kvh):
        return T.float32(WIDEN) * VS[kvh] if fp8 else T.float32(1)

    a = prefill_args(cfg)
    NT = a.NT

    @T.prim_func
    def prefill(
        Q: a.q, K: a.k_cache, V: a.v_cache, BT: a.block_table, SL: a.seq_lens, CU: a.cu_seqlens_q,
        TILES: a.tiles, KS: a.k_scale, VS: a.v_scale, ALIBI: a.alibi_slopes, SINKS: a.sinks, O: a.out,
        LSE: a.lse, scale: T.float32, causal: T.int32, window_left: T.int32, logits_soft_cap: T.float32,
    ):
        T.func_attr({"global_symbol": cfg.name, "tirx.noalias": True})

        for bid in T.thread_binding(T.max(NT, T.int64(1)) * BLOCKS_PER_TILE, thread="blockIdx.x"):
            for ty in T.thread_binding(BDY, thread="threadIdx.y"):
                for tx in T.thread_binding(BDX, thread="threadIdx.x"):
                    qf = T.alloc_buffer((NQ, VEC), "float32", scope="local")
                    acc = T.alloc_buffer((NQ, VEC), "float32", scope="local")
                    m = T.alloc_buffer((NQ,), "float32", scope="local")
                    lsum = T.alloc_buffer((NQ,), "float32", scope="local")
                    sc = T.alloc_buffer((NQ, C), "float32", scope="local")
                    kf = T.alloc_buffer((VEC,), "float32", scope="local")
                    stage = T.alloc_buffer((VEC,), dt, scope="local")
                    if alibi:  # the queries' slopes, log2 domain
                        slope = T.alloc_buffer((NQ,), "float32", scope="local")
                    else:
                        slope = T.meta_var(None)
                    red = T.alloc_buffer((1,), "float32", scope="local")
                    tmp = T.alloc_buffer((5 if sinks else 3,), "float32", scope="local")
                    Ks = T.alloc_buffer((KT, D), kvt, scope="shared")
                    Vs = T.alloc_buffer((KT, D), kvt, scope="shared")

                    hg: T.int64 = bid % HG
                    kvh: T.int64 = (bid // HG) % Hkv
                    t: T.int64 = bid // BLOCKS_PER_TILE
                    if t < NT:
                        b: T.int64 = T.Cast("int64", TILES[t, 0])
                        r0: T.int64 = T.Cast("int64", TILES[t, 1])
                        r1: T.int64 = T.Cast("int64", TILES[t, 2])
                        q_start: T.int64 = T.Cast("int64", CU[b])
                        seq_len: T.int64 = T.Cast("int64", SL[b])
                        # Position of query row r is q_off + r.
                        q_off: T.int64 = seq_len - (T.Cast("int64", CU[b + 1]) - q_start)
                        h0: T.int64 = kvh * G + hg * GQ
                        if alibi:
                            for i in T.unroll(NQ):
                                slope[i] = ALIBI[h0 + (ty * NQ + i) % GQ] * T.float32(LOG2E)
                        for rc in range((r1 - r0 + (QR - 1)) // QR):
                            rb: T.int64 = r0 + rc * QR  # first row of this pass
                            r_end: T.int64 = T.min(rb + QR, r1)
                            # Keys any query of the pass may see: [kv_lo, kv_hi).
                            kv_hi: T.int64 = T.if_then_else(causal != 0, T.min(seq_len, q_off + r_end), seq_len)
                            if window:  # the pass's first row sees the earliest keys
                                kv_lo: T.int64 = T.max(q_off + rb - T.Cast("int64", window_left), T.int64(0))
                                k0 = T.meta_var(kv_lo)
                            else:
                                k0 = T.meta_var(0)
                            # Query i of this group: pair (row rb + qi // GQ, head h0 + qi % GQ), qi = ty*NQ + i.
                            for i in T.unroll(NQ):
                                if rb + (ty * NQ + i) // GQ < r_end and tx < ACT:
                                    for c in T.unroll(NQC):
                                        for v in T.vectorized(QL):
                                            stage[c * QL + v] = Q[
                                                q_start + rb + (ty * NQ + i) // GQ, h0 + (ty * NQ + i) % GQ,
                                                tx * VEC + c * QL + v,
                                            ]
                                    for v in T.unroll(VEC):
                                        qf[i, v] = to_f32(stage[v], dt) * q_mult(scale, logits_soft_cap, KS, kvh)
                                else:
                                    for v in T.unroll(VEC):
                                        qf[i, v] = T.float32(0)
                                for v in T.unroll(VEC):
                                    acc[i, v] = T.float32(0)
                                m[i] = neg_inf
                                lsum[i] = T.float32(0)

                            for kt in range((kv_hi - k0 + (KT - 1)) // KT):
                                # Stage KT rows of K and V (rows outside [kv_lo, kv_hi) are never read from the
                                # cache).
                                for rr in T.unroll(ROWS_PER_PASS):
                                    if ty + rr * BDY < KT and tx < ACT:
                                        if k0 + kt * KT + ty + rr * BDY < kv_hi:
                                            for c in T.unroll(NCH):
                                                for v in T.vectorized(LANES):
                                                    Ks[ty + rr * BDY, tx * VEC + c * LANES + v] = K[
                                                        T.Cast("int64", BT[b, (k0 + kt * KT + ty + rr * BDY) // S]),
                                                        (k0 + kt * KT + ty + rr * BDY) % S, kvh,
                                                        tx * VEC + c * LANES + v,
                                                    ]
                                            for c in T.unroll(NCH):
                                                for v in T.vectorized(LANES):
                                                    Vs[ty + rr * BDY, tx * VEC + c * LANES + v] = V[
                                                        T.Cast("int64", BT[b, (k0 + kt * KT + ty + rr * BDY) // S]),
                                                        (k0 + kt * KT + ty + rr * BDY) % S, kvh,
                                                        tx * VEC + c * LANES + v,
                                                    ]
                                        else:
                                            for v in T.unroll(VEC):
                                                Ks[ty + rr * BDY, tx * VEC + v] = kv_zero
                                                Vs[ty + rr * BDY, tx * VEC + v] = kv_zero
                                T.tvm_storage_sync("shared")
                                for js in range(KT // C):
                                    # Scores of C staged tokens for each of this group's queries.
                                    for j in T.unroll(C):
                                        if tx < ACT:
                                            for v in T.unroll(VEC):
                                                kf[v] = kv_to_f32(Ks[js * C + j, tx * VEC + v], cfg)
                                        else:
                                            for v in T.unroll(VEC):
                                                kf[v] = T.float32(0)
                                        for i in T.unroll(NQ):
                                            red[0] = T.float32(0)
                                            for v in T.unroll(VEC):
                                                red[0] = red[0] + qf[i, v] * kf[v]
                                            warp_allreduce_sum(red, tx, BDX, LOG_BDX)
                                            # Visible: a real query row, a key below seq_len (and below the
                                            # pass limit), (causal) at or before the query's position and (window)
                                            # at most window_left before it.
                                            sc[i, j] = T.if_then_else(
                                                rb + (ty * NQ + i) // GQ < r_end
                                                and k0 + kt * KT + js * C + j < kv_hi
                                                and (
                                                    causal == 0
                                                    or k0 + kt * KT + js * C + j <= q_off + rb + (ty * NQ + i) // GQ
                                                )
                                                and visible(window_left, k0 + kt * KT + js * C + j,
                                                            q_off + rb + (ty * NQ + i) // GQ),
                                                logit(red[0], logits_soft_cap, slope, i,
                                                      k0 + kt * KT + js * C + j - (q_off + rb + (ty * NQ + i) // GQ)),
                                                neg_inf,
                                            )
                                    # Online softmax update, once per C tokens.
                                    for i in T.unroll(NQ):
                                        online_softmax_update(m, lsum, acc, sc, tmp, i, C, VEC)
                                    if tx < ACT:
                                        for j in T.unroll(C):
                                            for v in T.unroll(VEC):
                                                kf[v] = kv_to_f32(Vs[js * C + j, tx * VEC + v], cfg)
                                            for i in T.unroll(NQ):
                                                for v in T.unroll(VEC):
                                                    acc[i, v] = acc[i, v] + sc[i, j] * kf[v]
                                T.tvm_storage_sync("shared")

                            for i in T.unroll(NQ):
                                if rb + (ty * NQ + i) // GQ < r_end:
                                    if sinks:
                                        # The sink joins the denominator: tmp[1] the max with it, tmp[4] the
                                        # total weight in its units, tmp[0] the output's factor, tmp[3] the lse.
                                        tmp[3] = SINKS[h0 + (ty * NQ + i) % GQ] * T.float32(LOG2E)
                                        tmp[1] = T.max(m[i], tmp[3])
                                        tmp[1] = T.if_then_else(tmp[1] == neg_inf, T.float32(0), tmp[1])
                                        tmp[2] = T.exp2(m[i] - tmp[1])
                                        tmp[4] = lsum[i] * tmp[2] + T.exp2(tmp[3] - tmp[1])
                                        tmp[0] = tmp[2] * out_mult(VS, kvh) / tmp[4]
                                        tmp[3] = (tmp[1] + T.log2(tmp[4])) * T.float32(LN2)
                                    else:
                                        tmp[0] = T.if_then_else(
                                            lsum[i] > T.float32(0), out_mult(VS, kvh) / lsum[i], T.float32(0)
                                        )
                                    if tx < ACT:
                                        for v in T.unroll(VEC):
                                            stage[v] = from_f32(acc[i, v] * tmp[0], dt)
                                        for c in T.unroll(NQC):
                                            for v in T.vectorized(QL):
                                                O[
                                                    q_start + rb + (ty * NQ + i) // GQ, h0 + (ty * NQ + i) % GQ,
                                                    tx * VEC + c * QL + v,
                                                ] = stage[c * QL + v]
                                    if tx == 0:
                                        if sinks:
                                            LSE[q_start + rb + (ty * NQ + i) // GQ, h0 + (ty * NQ + i) % GQ] = tmp[3]
                                        else:
                                            LSE[q_start + rb + (ty * NQ + i) // GQ, h0 + (ty * NQ + i) % GQ] = (
                                                T.if_then_else(
                                                    lsum[i] > T.float32(0),
                                                    (m[i] + T.log2(lsum[i])) * T.float32(LN2), neg_inf,
                                                )
                                            )

    return finish(PREFILL, cfg, prefill)
