"""Paged decode attention for CUDA GPUs (one query token per sequence), as a thread-bound TVMScript program.

Same parameters (:data:`tvm_paged.spec.DECODE`'s) and semantics as :mod:`tvm_paged.kernels.decode_cpu`:
split-KV over the ``NS`` splits of each sequence's visible pages (``split_pages`` pages per split, or
``chunk = ceil(visible / NS)`` when it is 0; empty splits allowed), online softmax from a true minus infinity in
the log2 domain, splits merged by their log-sum-exp.

Kernel 1 (attention), one thread block per (sequence, split, KV head, query-head group), the block index fused
into ``blockIdx.x`` with the head group fastest, so the blocks that share a K/V row run side by side:

* ``threadIdx.x`` (``bdx`` lanes, a power of two <= warp): each lane owns a ``vec``-element slice of head_dim.
  ``ceil(head_dim / vec)`` lanes are active; the rest (head_dim 80, 96) hold zeros. A row of K or V is read by
  one lane group with 16-byte vector loads, once per block, for every query head of the group (FlashInfer's
  GQA trick: the block serves ``heads_per_block`` query heads held in registers).
* ``threadIdx.y`` (``bdy`` token groups): group ``ty`` walks tokens ``tile`` at a time
  (``tokens_per_iter``), with all K and V loads of its tile issued before any use (bytes in flight). Scores
  are reduced over head_dim with a warp-shuffle butterfly inside the lane group; each group keeps its own
  online-softmax state, rescaled once per tile.
* The ``bdy`` states are merged by a tree in shared memory; group 0 writes the split's result: straight to
  ``out``/``lse`` when ``num_splits == 1``, else to ``o_part``/``ms_part``.

Kernel 2 (merge, a second launch in the same PrimFunc): one thread per (sequence, head, 4 head_dim elements)
combines the splits by their log-sum-exp in split order (an empty split adds exactly 0); it does nothing when
``num_splits == 1``.

Variants (compiled in only for the configs that have them; a plain config's code has none of this):

* 8-bit caches (``kv_dtype`` e4m3 / e5m2): the caches are bytes, loaded 16 per lane per load and widened in
  registers (:func:`~tvm_paged.kernels.common.kv_to_f32`); ``widen factor * k_scale[kvh]`` is folded into the
  scaled q and ``widen factor * v_scale[kvh]`` into the output normalisation.
* ``window``: the query at ``p = seq_len - 1`` sees keys ``j >= lo = max(0, p - window_left)``; the splits cover
  the pages from ``lo``'s on (pages before it are never read) and tokens before ``lo`` are skipped.
* ``soft_cap``: q is scaled by ``scale / cap`` and a score becomes ``cap * log2(e) * tanh(q.k)``; ``alibi``: plus
  ``slope[h] * log2(e) * (j - p)``.
* ``sinks``: the sink ``e^sink[h]`` joins the denominator once, in the merge, which then always runs (the
  attention kernel always writes ``o_part`` / ``ms_part``).

Only tokens ``< seq_len`` are read (unused slots may hold NaN). ``exp2(-inf - -inf)`` never happens: the
running max is replaced by 0 while it is still minus infinity. Vector loads assume 16-byte aligned base
pointers (CUDA allocations are; every supported head_dim keeps rows 16-byte aligned). A sequence's result
depends on its own data only: with ``split_pages > 0`` it is bitwise the same whatever else is in the batch.
"""

from __future__ import annotations

import itertools

from ..config import KernelConfig
from ..spec import DECODE
from ..tvm_compat import T
from .common import (
    LN2, LOG2E, from_f32, is_pow2, kv_to_f32, kv_widen_factor, largest_divisor_at_most, online_softmax_update,
    q_multiplier, to_f32, variant_logit, warp_allreduce_sum,
)
from .signatures import decode_args, finish

_NEG_INF = float("-inf")


# --------------------------------------------------------------------------------------------- shared helpers
def _pow2_ceil(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def target_limits(target) -> dict:
    """Thread / shared-memory / warp limits of a CUDA target (defaults: any CUDA GPU since Volta)."""
    attrs = target.attrs if target is not None else {}

    def get(key, default):
        value = attrs.get(key, None) if hasattr(attrs, "get") else None
        return int(value) if value is not None else default

    max_threads = get("max_num_threads", 1024)
    max_threads = max(max_threads, get("max_threads_per_block", max_threads))
    return {
        "max_threads": max_threads,
        "max_shared": get("max_shared_memory_per_block", 48 * 1024),
        "warp": get("thread_warp_size", 32),
    }


def head_dim_lanes(head_dim: int, itemsize: int, vec: int | None, warp: int) -> tuple[int, int, int, int]:
    """(vec, lanes, bdx, active lanes) for slicing head_dim over one lane group.

    ``vec`` elements per lane (default: one 16-byte load, doubled until the lanes fit a warp); ``bdx`` is the
    lane count rounded up to a power of two (warp shuffles need it); ``lanes`` the elements of one vector load.
    """
    if vec is None:
        vec = max(1, 16 // itemsize)
        while vec > 1 and head_dim % vec:
            vec //= 2
        while _pow2_ceil(head_dim // vec) > warp and head_dim % (vec * 2) == 0:
            vec *= 2
    if not is_pow2(vec) or head_dim % vec:
        raise ValueError(f"vec ({vec}) must be a power of two dividing head_dim ({head_dim})")
    active = head_dim // vec
    bdx = _pow2_ceil(active)
    if bdx > warp:
        raise ValueError(f"head_dim {head_dim} / vec {vec} needs {bdx} lanes, more than a warp ({warp}): raise vec")
    lanes = min(vec, max(1, 16 // itemsize))
    return vec, lanes, bdx, active


# --------------------------------------------------------------------------------------------- plan
def decode_plan(cfg: KernelConfig, target=None, *, vec: int | None = None, num_threads: int | None = None,
                tokens_per_iter: int | None = None, heads_per_block: int | None = None,
                merge_threads: int = 128) -> dict:
    """Resolve the decode kernel's knobs against ``cfg`` and the target; raise ValueError when they cannot fit.

    Knobs (the tuning space):
      ``vec``             head_dim elements per lane (power of two dividing head_dim; default one 16-byte load
                          of the cache: 16 elements of an 8-bit cache)
      ``num_threads``     threads per block, a power of two multiple of the warp (default 128)
      ``tokens_per_iter`` tokens a lane group loads per step before using them (default 4, 2 for big tiles)
      ``heads_per_block`` query heads of a group served by one block, a divisor of the group size
                          (default: the largest with heads_per_block * vec <= 32 registers of q)
      ``merge_threads``   target threads per block of the split-merge kernel (default 128)
    """
    if cfg.kernel != "decode":
        raise ValueError(f"decode kernel needs a decode config, got {cfg.name}")
    lim = target_limits(target)
    D, G, E = cfg.head_dim, cfg.group_size, cfg.itemsize
    # Lanes are sized by the cache (the bytes streamed): an 8-bit cache gets 16 elements per 16-byte load.
    vec, lanes, bdx, active = head_dim_lanes(D, cfg.kv_itemsize, vec, lim["warp"])
    q_lanes = min(vec, max(1, 16 // E))  # elements per vector load of q and store of out
    if heads_per_block is None:
        heads_per_block = largest_divisor_at_most(G, max(1, 32 // vec))
    if G % heads_per_block:
        raise ValueError(f"heads_per_block ({heads_per_block}) must divide the group size ({G})")
    gq = heads_per_block
    if num_threads is None:
        num_threads = max(min(128, lim["max_threads"]), bdx, lim["warp"])
    if not is_pow2(num_threads) or num_threads % lim["warp"] or num_threads < bdx:
        raise ValueError(f"num_threads ({num_threads}) must be a power of two, a multiple of the warp "
                         f"({lim['warp']}) and >= {bdx} lanes")
    if num_threads > lim["max_threads"]:
        raise ValueError(f"num_threads ({num_threads}) exceeds the target's {lim['max_threads']} threads per block")
    bdy = num_threads // bdx
    if tokens_per_iter is None:
        tokens_per_iter = 4 if gq * vec <= 16 else 2
    if tokens_per_iter < 1:
        raise ValueError(f"tokens_per_iter must be >= 1, got {tokens_per_iter}")
    half = max(1, bdy // 2)
    shared = half * gq * D * 4 + half * gq * 2 * 4
    if shared > lim["max_shared"]:
        raise ValueError(f"decode {cfg.name}: the cross-group merge needs {shared} bytes of shared memory, "
                         f"the target allows {lim['max_shared']}: lower num_threads or heads_per_block")
    # Merge kernel: mdx lanes of 4 float32 each over head_dim, mdy heads per block.
    mvec = 4 if D % 4 == 0 else (2 if D % 2 == 0 else 1)
    mdx = D // mvec
    if mdx > lim["max_threads"]:
        raise ValueError(f"head_dim {D} is too large for the merge kernel")
    mdy = largest_divisor_at_most(cfg.num_qo_heads, max(1, merge_threads // mdx))
    return {
        "vec": vec, "lanes": lanes, "q_lanes": q_lanes, "bdx": bdx, "active": active, "bdy": bdy,
        "tile": tokens_per_iter,
        "gq": gq, "head_groups": G // gq, "shared_bytes": shared, "mvec": mvec, "mdx": mdx, "mdy": mdy,
        "num_threads": num_threads,
    }


def feasible_space(space: dict[str, list], check) -> dict[str, list]:
    """Drop candidate values (never a list's first, the default) until every combination passes ``check``
    (which raises ValueError for an infeasible knob dict): a tuner may pick any point of the product."""
    space = {k: list(dict.fromkeys(v)) for k, v in space.items()}
    while True:
        bad: dict[tuple[str, object], int] = {}
        names = list(space)
        for combo in itertools.product(*space.values()):
            knobs = dict(zip(names, combo))
            try:
                check(**knobs)
            except ValueError:
                for k in names[:]:
                    if knobs[k] != space[k][0]:
                        bad[(k, knobs[k])] = bad.get((k, knobs[k]), 0) + 1
        if not bad:
            return space
        (k, v), _ = max(bad.items(), key=lambda kv: kv[1])
        space[k] = [x for x in space[k] if x != v]


def knob_space(cfg: KernelConfig, target=None) -> dict[str, list]:
    """Tunable knobs of :func:`build_decode_cuda` on ``target`` (first value of each list = the default); every
    combination fits the target's thread and shared-memory limits."""
    base = decode_plan(cfg, target)
    lim = target_limits(target)
    vecs = [base["vec"]] + [v for v in (base["vec"] * 2, base["vec"] // 2)
                            if v >= 1 and cfg.head_dim % v == 0 and _pow2_ceil(cfg.head_dim // v) <= lim["warp"]]
    threads = [base["num_threads"]] + [t for t in (64, 128, 256, 512) if t <= lim["max_threads"]]
    heads = [base["gq"]] + [h for h in (1, 2, 4, 8) if cfg.group_size % h == 0]
    tiles = [base["tile"]] + [1, 2, 4, 8]
    space = {"vec": vecs, "num_threads": threads, "heads_per_block": heads, "tokens_per_iter": tiles}
    return feasible_space(space, lambda **k: decode_plan(cfg, target, **k))


# --------------------------------------------------------------------------------------------- builder
def build_decode_cuda(cfg: KernelConfig, target=None, **knobs):
    """Return the decode PrimFunc for ``cfg`` on a CUDA target (knobs: see :func:`decode_plan`).

    Its parameters are :data:`tvm_paged.spec.DECODE`'s for ``cfg`` (its variants' only), as on the CPU
    (``dtype`` = ``cfg.dtype``; ``B``, ``P``, ``M``, ``NS`` symbolic): q [B, Hq, D] dtype, k_cache / v_cache
    [P, S, Hkv, D] (``cfg.kv_storage``: uint8 for 8-bit caches); block_table [B, M], seq_lens [B] int32;
    k_scale / v_scale [Hkv] (8-bit), alibi_slopes / sinks [Hq] float32; out [B, Hq, D] dtype and lse [B, Hq]
    float32 (written); o_part [B, NS, Hq, D] and ms_part [B, NS, Hq, 2] (max, sum) float32 scratch (unused
    when NS == 1, sinks aside); scale float32, split_pages int32, window_left int32, logits_soft_cap float32.
    """
    plan = decode_plan(cfg, target, **knobs)
    Hq, Hkv, D, S, G = cfg.num_qo_heads, cfg.num_kv_heads, cfg.head_dim, cfg.page_size, cfg.group_size
    dt, kvt = cfg.dtype, cfg.kv_storage
    VEC, LANES, BDX, ACT, BDY, TILE = (plan[k] for k in ("vec", "lanes", "bdx", "active", "bdy", "tile"))
    QL = plan["q_lanes"]
    GQ, HG = plan["gq"], plan["head_groups"]
    NCH = VEC // LANES  # vector loads per lane per cache row
    NQC = VEC // QL  # vector loads per lane per q row (stores per out row)
    F4 = min(VEC, 4)  # float32 elements per 16-byte store
    HALF = max(1, BDY // 2)
    LOG_BDX = BDX.bit_length() - 1
    LOG_BDY = BDY.bit_length() - 1
    STEP = BDY * TILE  # tokens per block per iteration
    MVEC, MDX, MDY = plan["mvec"], plan["mdx"], plan["mdy"]
    BLOCKS_PER_SPLIT = Hkv * HG
    neg_inf = T.float32(_NEG_INF)
    fp8, window, soft_cap, alibi, sinks = cfg.is_fp8, cfg.window, cfg.soft_cap, cfg.alibi, cfg.sinks
    WIDEN = kv_widen_factor(cfg)
    # Sinks enter the denominator once, in the merge: the split states always go through it.
    direct = not sinks
    kv_zero = T.uint8(0) if fp8 else T.Cast(kvt, T.float32(0))

    # Expressions of the variants (Python helpers: a plain config's code is the base kernel's).
    def q_mult(scale, cap, KS, kvh):
        return q_multiplier(cfg, scale, cap, KS, kvh)

    def logit(x, cap, slope, g, rel):
        return variant_logit(cfg, x, cap, slope, g, rel)

    def kv_val(widened, raw, j, v):
        """Element ``v`` of loaded cache row ``j`` in float32 (8-bit: widened once per row beforehand)."""
        return widened[j, v] if fp8 else to_f32(raw[j, v], dt)

    def out_mult(VS, kvh):
        return T.float32(WIDEN) * VS[kvh] if fp8 else T.float32(1)

    def use_direct(NS, split_pages):
        """A lone split writes out and lse itself; a batch-invariant plan (``split_pages > 0``) always merges,
        so a sequence's result takes the same operations whether or not its batch needs more splits."""
        return T.And(NS == T.int64(1), split_pages == 0)

    def merge_needed(NS, split_pages, mbat, B):
        return T.And(T.Not(use_direct(NS, split_pages)), mbat < B) if direct else mbat < B

    a = decode_args(cfg)
    B, NS = a.B, a.NS

    @T.prim_func
    def decode(
        Q: a.q, K: a.k_cache, V: a.v_cache, BT: a.block_table, SL: a.seq_lens, KS: a.k_scale, VS: a.v_scale,
        ALIBI: a.alibi_slopes, SINKS: a.sinks, O: a.out, LSE: a.lse, OP: a.o_part, LP: a.ms_part,
        scale: T.float32, split_pages: T.int32, window_left: T.int32, logits_soft_cap: T.float32,
    ):
        T.func_attr({"global_symbol": cfg.name, "tirx.noalias": True})

        # ---------------------------------------------------------------- kernel 1: attention per split
        for bid in T.thread_binding(T.max(B * NS, T.int64(1)) * BLOCKS_PER_SPLIT, thread="blockIdx.x"):
            for ty in T.thread_binding(BDY, thread="threadIdx.y"):
                for tx in T.thread_binding(BDX, thread="threadIdx.x"):
                    qf = T.alloc_buffer((GQ, VEC), "float32", scope="local")
                    acc = T.alloc_buffer((GQ, VEC), "float32", scope="local")
                    m = T.alloc_buffer((GQ,), "float32", scope="local")
                    lsum = T.alloc_buffer((GQ,), "float32", scope="local")
                    sc = T.alloc_buffer((GQ, TILE), "float32", scope="local")
                    kr = T.alloc_buffer((TILE, VEC), kvt, scope="local")
                    vr = T.alloc_buffer((TILE, VEC), kvt, scope="local")
                    if fp8:  # the tile's rows widened to float32
                        kw = T.alloc_buffer((TILE, VEC), "float32", scope="local")
                        vw = T.alloc_buffer((TILE, VEC), "float32", scope="local")
                    else:
                        kw = T.meta_var(None)
                        vw = T.meta_var(None)
                    if alibi:  # the group's slopes, log2 domain
                        slope = T.alloc_buffer((GQ,), "float32", scope="local")
                    else:
                        slope = T.meta_var(None)
                    qs = T.alloc_buffer((VEC,), dt, scope="local")
                    os = T.alloc_buffer((VEC,), dt, scope="local")
                    of = T.alloc_buffer((VEC,), "float32", scope="local")
                    red = T.alloc_buffer((1,), "float32", scope="local")
                    tmp = T.alloc_buffer((4,), "float32", scope="local")
                    sm_o = T.alloc_buffer((HALF, GQ, D), "float32", scope="shared")
                    sm_ml = T.alloc_buffer((HALF, GQ, 2), "float32", scope="shared")

                    hg: T.int64 = bid % HG
                    kvh: T.int64 = (bid // HG) % Hkv
                    bs: T.int64 = bid // BLOCKS_PER_SPLIT
                    if bs < B * NS:
                        b: T.int64 = bs // NS
                        s: T.int64 = bs % NS
                        h0: T.int64 = kvh * G + hg * GQ
                        seq_len: T.int64 = T.Cast("int64", SL[b])
                        n_pages: T.int64 = (seq_len + S - 1) // S
                        # Split s covers the pages [p_begin, p_end) of the visible ones.
                        if window:
                            # Keys before lo are outside the window; the pages before lo's are never read.
                            lo: T.int64 = T.max(seq_len - 1 - T.Cast("int64", window_left), T.int64(0))
                            first: T.int64 = lo // S
                            chunk: T.int64 = T.if_then_else(
                                split_pages > 0, T.Cast("int64", split_pages), (n_pages - first + NS - 1) // NS
                            )
                            p_begin: T.int64 = first + T.min(s * chunk, n_pages - first)
                        else:
                            chunk: T.int64 = T.if_then_else(
                                split_pages > 0, T.Cast("int64", split_pages), (n_pages + NS - 1) // NS
                            )
                            p_begin: T.int64 = T.min(s * chunk, n_pages)
                        p_end: T.int64 = T.min(p_begin + chunk, n_pages)
                        if window:
                            tok_begin: T.int64 = T.max(p_begin * S, lo)
                        else:
                            tok_begin: T.int64 = p_begin * S
                        tok_end: T.int64 = T.min(p_end * S, seq_len)
                        if alibi:
                            for g in T.unroll(GQ):
                                slope[g] = ALIBI[h0 + g] * T.float32(LOG2E)
                        # q pre-scaled by scale * log2(e): scores come out in the log2 domain.
                        for g in T.unroll(GQ):
                            if tx < ACT:
                                for c in T.unroll(NQC):
                                    for v in T.vectorized(QL):
                                        qs[c * QL + v] = Q[b, h0 + g, tx * VEC + c * QL + v]
                                for v in T.unroll(VEC):
                                    qf[g, v] = to_f32(qs[v], dt) * q_mult(scale, logits_soft_cap, KS, kvh)
                            else:
                                for v in T.unroll(VEC):
                                    qf[g, v] = T.float32(0)
                            for v in T.unroll(VEC):
                                acc[g, v] = T.float32(0)
                            m[g] = neg_inf
                            lsum[g] = T.float32(0)

                        for it in range((tok_end - tok_begin + (STEP - 1)) // STEP):
                            base: T.int64 = tok_begin + it * STEP + ty * TILE
                            # Issue every K and V load of the tile first; only tokens < seq_len are read.
                            for j in T.unroll(TILE):
                                if base + j < tok_end and tx < ACT:
                                    for c in T.unroll(NCH):
                                        for v in T.vectorized(LANES):
                                            kr[j, c * LANES + v] = K[
                                                T.Cast("int64", BT[b, (base + j) // S]), (base + j) % S, kvh,
                                                tx * VEC + c * LANES + v,
                                            ]
                                    for c in T.unroll(NCH):
                                        for v in T.vectorized(LANES):
                                            vr[j, c * LANES + v] = V[
                                                T.Cast("int64", BT[b, (base + j) // S]), (base + j) % S, kvh,
                                                tx * VEC + c * LANES + v,
                                            ]
                                else:
                                    for v in T.unroll(VEC):
                                        kr[j, v] = kv_zero
                                        vr[j, v] = kv_zero
                            if fp8:
                                for j in T.unroll(TILE):
                                    for v in T.unroll(VEC):
                                        kw[j, v] = kv_to_f32(kr[j, v], cfg)
                            # Scores: per-lane partial dot, then a butterfly over the lane group (uniform
                            # control flow: every lane of every warp shuffles).
                            for j in T.unroll(TILE):
                                for g in T.unroll(GQ):
                                    red[0] = T.float32(0)
                                    for v in T.unroll(VEC):
                                        red[0] = red[0] + qf[g, v] * kv_val(kw, kr, j, v)
                                    warp_allreduce_sum(red, tx, BDX, LOG_BDX)
                                    sc[g, j] = T.if_then_else(
                                        base + j < tok_end,
                                        logit(red[0], logits_soft_cap, slope, g, base + j - (seq_len - 1)), neg_inf
                                    )
                            if fp8:
                                for j in T.unroll(TILE):
                                    for v in T.unroll(VEC):
                                        vw[j, v] = kv_to_f32(vr[j, v], cfg)
                            # Online softmax, one rescale per tile, then this tile's weighted V rows.
                            for g in T.unroll(GQ):
                                online_softmax_update(m, lsum, acc, sc, tmp, g, TILE, VEC)
                                for j in T.unroll(TILE):
                                    for v in T.unroll(VEC):
                                        acc[g, v] = acc[g, v] + sc[g, j] * kv_val(vw, vr, j, v)

                        # Tree merge of the token groups' states through shared memory.
                        for k in T.unroll(LOG_BDY):
                            if ty >= T.shift_right(BDY // 2, k) and ty < T.shift_right(BDY, k):
                                for g in T.unroll(GQ):
                                    if tx < ACT:
                                        for c in T.unroll(VEC // F4):
                                            for v in T.vectorized(F4):
                                                sm_o[ty - T.shift_right(BDY // 2, k), g, tx * VEC + c * F4 + v] = acc[
                                                    g, c * F4 + v
                                                ]
                                    if tx == 0:
                                        sm_ml[ty - T.shift_right(BDY // 2, k), g, 0] = m[g]
                                        sm_ml[ty - T.shift_right(BDY // 2, k), g, 1] = lsum[g]
                            T.tvm_storage_sync("shared")
                            if ty < T.shift_right(BDY // 2, k):
                                for g in T.unroll(GQ):
                                    tmp[3] = sm_ml[ty, g, 0]
                                    tmp[0] = T.max(m[g], tmp[3])
                                    tmp[1] = T.if_then_else(tmp[0] == neg_inf, T.float32(0), tmp[0])
                                    tmp[2] = T.exp2(m[g] - tmp[1])
                                    tmp[3] = T.exp2(tmp[3] - tmp[1])
                                    m[g] = tmp[0]
                                    lsum[g] = lsum[g] * tmp[2] + sm_ml[ty, g, 1] * tmp[3]
                                    if tx < ACT:
                                        for v in T.unroll(VEC):
                                            acc[g, v] = acc[g, v] * tmp[2] + sm_o[ty, g, tx * VEC + v] * tmp[3]
                            T.tvm_storage_sync("shared")

                        # Group 0 holds the split's state.
                        if ty == 0:
                            for g in T.unroll(GQ):
                                tmp[0] = T.if_then_else(
                                    lsum[g] > T.float32(0), out_mult(VS, kvh) / lsum[g], T.float32(0)
                                )
                                tmp[1] = T.if_then_else(
                                    lsum[g] > T.float32(0), m[g] + T.log2(lsum[g]), neg_inf
                                )
                                if direct and use_direct(NS, split_pages):  # (sinks: always the merge)
                                    if tx < ACT:
                                        for v in T.unroll(VEC):
                                            os[v] = from_f32(acc[g, v] * tmp[0], dt)
                                        for c in T.unroll(NQC):
                                            for v in T.vectorized(QL):
                                                O[b, h0 + g, tx * VEC + c * QL + v] = os[c * QL + v]
                                    if tx == 0:
                                        LSE[b, h0 + g] = tmp[1] * T.float32(LN2)
                                else:
                                    if tx < ACT:
                                        for v in T.unroll(VEC):
                                            of[v] = acc[g, v] * tmp[0]
                                        for c in T.unroll(VEC // F4):
                                            for v in T.vectorized(F4):
                                                OP[b, s, h0 + g, tx * VEC + c * F4 + v] = of[c * F4 + v]
                                    if tx == 0:
                                        LP[b, s, h0 + g, 0] = m[g]
                                        LP[b, s, h0 + g, 1] = lsum[g]

        # ---------------------------------------------------------------- kernel 2: merge the splits
        for mb in T.thread_binding(T.max(B, T.int64(1)) * (Hq // MDY), thread="blockIdx.x"):
            for my in T.thread_binding(MDY, thread="threadIdx.y"):
                for mx in T.thread_binding(MDX, thread="threadIdx.x"):
                    w = T.alloc_buffer((4,), "float32", scope="local")
                    o = T.alloc_buffer((MVEC,), "float32", scope="local")
                    ov = T.alloc_buffer((MVEC,), "float32", scope="local")
                    os2 = T.alloc_buffer((MVEC,), dt, scope="local")
                    mbat: T.int64 = mb // (Hq // MDY)
                    mh: T.int64 = (mb % (Hq // MDY)) * MDY + my
                    if merge_needed(NS, split_pages, mbat, B):
                        # Split s weighs sum_s * 2^(max_s - max): a difference of two maxima is exact, where one
                        # of two log-sum-exps near 7e5 (float32 spacing 1/16) is not.
                        if sinks:  # the sink's logit, log2 domain, bounds the max from below
                            w[0] = SINKS[mh] * T.float32(LOG2E)
                        else:
                            w[0] = neg_inf
                        for s2 in range(NS):
                            w[0] = T.max(w[0], LP[mbat, s2, mh, 0])
                        w[1] = T.if_then_else(w[0] == neg_inf, T.float32(0), w[0])
                        w[2] = T.float32(0)
                        for s2 in range(NS):
                            w[2] = w[2] + LP[mbat, s2, mh, 1] * T.exp2(LP[mbat, s2, mh, 0] - w[1])
                        if sinks:  # in the denominator only
                            w[2] = w[2] + T.exp2(SINKS[mh] * T.float32(LOG2E) - w[1])
                        for v in T.unroll(MVEC):
                            o[v] = T.float32(0)
                        for s2 in range(NS):
                            w[3] = T.if_then_else(
                                w[2] > T.float32(0),
                                LP[mbat, s2, mh, 1] * T.exp2(LP[mbat, s2, mh, 0] - w[1]) / w[2], T.float32(0),
                            )
                            for v in T.vectorized(MVEC):
                                ov[v] = OP[mbat, s2, mh, mx * MVEC + v]
                            for v in T.unroll(MVEC):
                                o[v] = o[v] + ov[v] * w[3]
                        for v in T.unroll(MVEC):
                            os2[v] = from_f32(o[v], dt)
                        for v in T.vectorized(MVEC):
                            O[mbat, mh, mx * MVEC + v] = os2[v]
                        if mx == 0:
                            LSE[mbat, mh] = T.if_then_else(
                                w[2] > T.float32(0), (w[0] + T.log2(w[2])) * T.float32(LN2), neg_inf
                            )

    return finish(DECODE, cfg, decode)
