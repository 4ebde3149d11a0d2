"""Paged decode attention for CPUs (one query token per sequence), as a hand-scheduled TVMScript program.

Work is split over (sequence, KV split) pairs run in parallel; each task walks its pages in order and, inside a
page, tokens outer and heads inner, so the page's ``[page_size, num_kv_heads, head_dim]`` block is read
contiguously and every query head of a group reuses each K/V row from L1. The softmax is online, rescaled once
per page, started from a true minus infinity. Partial states of the splits are merged by their log-sum-exp in a
second parallel loop of the same function, so one long sequence still uses every core.

The builder's macros are the algorithm's phases: ``init_state`` (scaled q, empty softmax state), then per page
``page_scores`` (q.k: ``prefetch_rows`` and ``tile_scores``), ``softmax_rescale`` (the online-softmax update) and
``page_pv`` (P.V accumulation, with ``prefetch_next_k`` or ``prefetch_next_k_token``); ``store_split`` writes a
split's partial state and ``merge_splits`` combines the splits.

Variants (compiled in only when the configuration has them): ``adjust_scores`` applies the soft-cap, the ALiBi
bias and the sliding window's mask to a page's scores; a window also starts each sequence at its first visible
page, so pages wholly behind it are never read; the sinks enter once, in the merge; 8-bit caches are widened in
registers (``common.kv_to_f32``) with the K scale folded into q and the V scale into the split's normalization.
"""

from __future__ import annotations

from ..config import KernelConfig
from ..tvm_compat import T
from ..tvm_compat import prefetch as prefetch_line
from ..spec import DECODE
from .common import (
    CACHE_LINE_BYTES, LN2, LOG2E, exp2, from_f32, kv_to_f32, kv_widen_factor, lanes_at, row_chunk, row_sums, tanh,
    to_f32,
)
from .signatures import decode_args, finish


def _group_tiles(group_size: int) -> list[int]:
    """Query heads per register tile that divide the group, nearest to 4 first (the default; ties go to the
    larger tile, so a group of 7 is one tile of 7 rather than 7 tiles of 1 that would each reload K)."""
    return sorted({t for t in (8, 4, 2, 1, group_size) if t <= group_size and group_size % t == 0},
                  key=lambda t: (abs(t - 4), -t))


def knob_space(cfg: KernelConfig, lanes: int) -> dict[str, list]:
    """Tunable knobs of :func:`build_decode_cpu` (first value of each list = the default).

    ``lanes``: float32 SIMD lanes per vector op; ``group_tile``: query heads of a group accumulated together
    (register pressure vs K reuse); ``prefetch``: software prefetch of this page's V rows during q.k ("v"),
    plus the next page's K spread over P.V's tiles ("v+k"), over P.V's tokens ("v+k/token") or over q.k ("kv"),
    or none; ``qk_tokens`` and ``pv_vecs``: the register tiles of the two products (``pv_vecs`` up to a whole
    head_dim row; values that do not divide the row's vectors fall back to 1).
    """
    lane_opts = [n for n in (lanes, lanes * 2, lanes // 2) if n >= 4 and cfg.head_dim % n == 0]
    # A P.V tile as wide as the whole head_dim row (8 vectors of head_dim 128 at 16 lanes) reads each V row in
    # one pass: narrower tiles revisit a page's rows at a stride of num_kv_heads * head_dim elements (4 KB for
    # 8 x 128 float32), which maps all of a page's rows onto the same few L1 sets.
    row_vecs = cfg.head_dim // lanes if lanes and cfg.head_dim % lanes == 0 else 1
    pv_opts = [2, 1, 4] + ([row_vecs] if row_vecs > 4 and row_vecs <= 8 else [])
    return {"lanes": lane_opts or [1], "group_tile": _group_tiles(cfg.group_size),
            "prefetch": ["v+k", "v", "kv", "none", "v+k/token"], "qk_tokens": [1, 2, 4], "pv_vecs": pv_opts}


def build_decode_cpu(cfg: KernelConfig, *, lanes: int = 8, group_tile: int | None = None, prefetch: str = "v+k",
                     qk_tokens: int = 1, pv_vecs: int = 2):
    """Return the decode PrimFunc for ``cfg`` (kernel ``decode``) on an LLVM CPU target.

    Its parameters are :data:`tvm_paged.spec.DECODE`'s (C-contiguous; ``B``, ``P``, ``M``, ``NS`` symbolic;
    ``dtype`` = ``cfg.dtype``; ``seq_lens >= 1``, validated by the caller):

        q [B, Hq, D], k_cache / v_cache [P, S, Hkv, D]: dtype     block_table [B, M], seq_lens [B]: int32
        out [B, Hq, D]: dtype, lse [B, Hq]: float32 (natural log)  (written)
        o_part [B, NS, Hq, D], ms_part [B, NS, Hq, 2]: float32 scratch (max, sum)    scale: float32

    ``lanes`` float32 lanes per vector (8 for AVX2, 16 for AVX-512); ``group_tile`` query heads accumulated
    together (default: the divisor of the group size nearest to 4, see ``_group_tiles``); ``prefetch`` "v+k",
    "v+k/token", "v", "kv" or "none"; ``qk_tokens`` tokens scored together (sharing q loads) and ``pv_vecs``
    head_dim vectors per P.V register tile. The q.k tile keeps one accumulator per (token, head): its GT heads
    are the independent FMA chains (a split of each chain would be merged back by LLVM under the target's
    fast-math reassociation anyway).
    """
    if cfg.kernel != "decode":
        raise ValueError(f"build_decode_cpu needs a decode config, got {cfg.name}")
    Hq, Hkv, D, S, G = cfg.num_qo_heads, cfg.num_kv_heads, cfg.head_dim, cfg.page_size, cfg.group_size
    dt = cfg.dtype
    E = cfg.kv_itemsize
    widen = kv_widen_factor(cfg)
    L = lanes if D % lanes == 0 else 1
    if group_tile is None:
        group_tile = _group_tiles(G)[0]
    if G % group_tile:
        raise ValueError(f"group_tile {group_tile} must divide the group size {G}")
    GT = group_tile
    NGT = G // GT
    NDC = D // L
    TT = qk_tokens
    PVV = pv_vecs if NDC % pv_vecs == 0 else 1
    if prefetch not in ("v", "v+k", "v+k/token", "kv", "none"):
        raise ValueError(f"prefetch must be 'v', 'v+k', 'v+k/token', 'kv' or 'none', got {prefetch!r}")
    # Elements per cache line, and cache lines per head slice of a token row ([head_dim]).
    line = max(1, CACHE_LINE_BYTES // E)
    lines_per_head = (D + line - 1) // line
    pf_k = prefetch == "kv"
    pf_v = prefetch in ("kv", "v", "v+k", "v+k/token")
    pf_k_pv = prefetch == "v+k"
    pf_k_token = prefetch == "v+k/token"
    # P.V tiles per page, the next page's K cache lines each of them asks for, and (v+k/token) how many of them
    # each of its tokens asks for.
    pv_tiles = Hkv * NGT * (NDC // PVV)
    k_lines_per_tile = (S * Hkv * D // line + pv_tiles - 1) // pv_tiles
    k_lines_per_token = (k_lines_per_tile + S - 1) // S
    # Scores of a tile are summed over head_dim CH heads at a time by a shuffle tree.
    CH = row_chunk(GT, L)

    def score_rows(qk, u, row0):
        # [CH] float32 vector: lane r = q.k of tile row row0 + r.
        return row_sums([qk[u, row0 + r, lanes_at(0, L)] for r in range(CH)], L)

    neg_inf = T.float32(float("-inf"))

    a = decode_args(cfg)
    B, NS = a.B, a.NS

    def load(x):
        return kv_to_f32(x, cfg)

    def window_start(pos, window_left):
        """The first key a query at ``pos`` sees: ``pos - window_left`` (at least 0) with a window, else 0."""
        if cfg.window:
            return T.max(pos - T.Cast("int64", window_left), T.int64(0))
        return T.int64(0)

    def split_chunk(n_pages, first, split_pages):
        """Pages per split of a sequence whose visible pages are [first, n_pages): ``split_pages`` when fixed,
        else the visible pages in NS equal parts. Its splits with pages are a prefix of the NS."""
        return T.Select(split_pages > 0, T.Cast("int64", split_pages), (n_pages - first + NS - 1) // NS)

    @T.macro
    def init_state(qf, acc, m, lsum, Q, KS, b, scale):
        """Sequence ``b``'s q in float32 with the softmax scale and log2(e) folded in (scores come out in the
        log2 domain; with an 8-bit cache also its K scale and widening factor), and an empty online-softmax
        state: zero accumulator, max -inf, sum 0."""
        for h, d in T.grid(Hq, D):
            if cfg.is_fp8:
                qf[h, d] = to_f32(Q[b, h, d], dt) * (scale * T.float32(LOG2E * widen) * KS[h // G])
            else:
                qf[h, d] = to_f32(Q[b, h, d], dt) * (scale * T.float32(LOG2E))
            acc[h, d] = T.float32(0)
        for h in range(Hq):
            m[h] = neg_inf
            lsum[h] = T.float32(0)

    @T.macro
    def adjust_scores(sc, slope, n, key0, pos, lo, cap):
        """The variants' changes to the page's scores ``sc[0:n, :]`` (keys ``key0 ...``, query position ``pos``),
        in the log2 domain: soft-cap ``cap * tanh(l / cap)``, ALiBi ``+ slope * (j - pos)`` (``slope`` already
        times log2 e), keys before ``lo`` (the window's first) masked."""
        for t in range(n):
            for h in range(Hq):
                if cfg.soft_cap:
                    sc[t, h] = tanh(sc[t, h] / (cap * T.float32(LOG2E))) * (cap * T.float32(LOG2E))
                if cfg.alibi:
                    sc[t, h] = sc[t, h] + slope[h] * T.Cast("float32", key0 + t - pos)
                if cfg.window:
                    sc[t, h] = T.Select(key0 + t < lo, neg_inf, sc[t, h])

    @T.macro
    def prefetch_rows(K, V, page, nxt, n, tt, kvh):
        """Prefetch KV head ``kvh``'s slice of the V rows of tokens ``tt * TT ...`` (and, with "kv", the next
        page's K rows): P.V walks the page's V in head_dim-tile order, which the hardware prefetcher cannot
        follow. One head's slice per call, during the scores, so the requests never queue up."""
        for u in range(TT):
            if pf_v:
                for c in range(lines_per_head):
                    prefetch_line(T.address_of(V[page, T.min(tt * TT + u, n - 1), kvh, c * line]))
            if pf_k:
                for c in range(lines_per_head):
                    prefetch_line(T.address_of(K[nxt, T.min(tt * TT + u, n - 1), kvh, c * line]))

    @T.macro
    def tile_scores(sc, qk, qf, K, page, n, tt, kvh, gt):
        """``sc[t, h]`` = q.k of the TT tokens ``t`` from ``tt * TT`` (those below ``n``) and the GT heads ``h``
        of head tile ``gt`` of KV head ``kvh``, accumulated in the register tile ``qk``."""
        for u, g, l in T.grid(TT, GT, L):
            qk[u, g, l] = T.float32(0)
        # TT tokens at once share each q load; a short last step re-reads token n - 1 (inside the sequence) and
        # drops the duplicate score below.
        for dc in T.unroll(NDC):
            for g in T.unroll(GT):
                for u in T.unroll(TT):
                    for l in T.vectorized(L):
                        qk[u, g, l] = qk[u, g, l] + qf[
                            kvh * G + gt * GT + g, dc * L + l
                        ] * load(K[page, T.min(tt * TT + u, n - 1), kvh, dc * L + l])
        # Horizontal sums over head_dim by a shuffle tree, CH heads per vector store.
        for u in T.unroll(TT):
            for ch in T.unroll(GT // CH):
                if tt * TT + u < n:
                    sc[tt * TT + u, lanes_at(kvh * G + gt * GT + ch * CH, CH)] = score_rows(qk, u, ch * CH)

    @T.macro
    def page_scores(sc, qk, qf, K, V, page, nxt, n):
        """``sc[0:n, :]``: the scores of the page's ``n`` tokens (only those are read), tokens outer and heads
        inner: the page is read contiguously and each K row is shared by the GT heads of a tile."""
        for tt in range((n + TT - 1) // TT):
            for kvh in range(Hkv):
                prefetch_rows(K, V, page, nxt, n, tt, kvh)
                for gt in range(NGT):
                    tile_scores(sc, qk, qf, K, page, n, tt, kvh, gt)

    @T.macro
    def softmax_rescale(sc, m, mnew, lsum, alpha, n):
        """The online-softmax update of one page, vectorized over heads: ``m`` the new running max, ``alpha``
        the factor that rescales the old state to it, ``sc[0:n, :]`` replaced by the weights and ``lsum``
        rescaled and increased by them."""
        for h in range(Hq):
            mnew[h] = m[h]
        for t in range(n):
            for h in range(Hq):
                mnew[h] = T.max(mnew[h], sc[t, h])
        for h in range(Hq):
            alpha[h] = exp2(m[h] - mnew[h])
            m[h] = mnew[h]
            lsum[h] = lsum[h] * alpha[h]
        for t in range(n):
            for h in range(Hq):
                sc[t, h] = exp2(sc[t, h] - mnew[h])
                lsum[h] = lsum[h] + sc[t, h]

    @T.macro
    def prefetch_next_k(K, nxt, kvh, gt, dv):
        """Prefetch P.V tile ``(kvh, gt, dv)``'s share of the next page's K while P.V works from cache: the
        memory system fetches it during compute instead of stalling the next page's q.k."""
        for c in range(k_lines_per_tile):
            elem: T.let[T.int32] = (((kvh * NGT + gt) * (NDC // PVV) + dv) * k_lines_per_tile + c) * line
            if elem < S * Hkv * D:
                prefetch_line(T.address_of(K[nxt, elem // (Hkv * D), elem // D % Hkv, elem % D]))

    @T.macro
    def prefetch_next_k_token(K, sc, nxt, kvh, gt, dv, t):
        """Token ``t``'s share of P.V tile ``(kvh, gt, dv)``'s lines of the next page's K (``k_lines_per_token``
        of them), asked for while the tile works on that token: requests leave at the rate P.V reads V instead of
        in a burst per tile (on CPUs whose prefetches hold an L1 miss buffer until the line arrives, a burst
        stalls P.V's own reads of V behind it). Each address carries a zero offset made from the token's weight,
        ``min(0, bits)`` (a weight is never negative): without that data dependence LLVM hoists the requests of
        the tokens it unrolls together to the top of the block, a burst again. A NaN weight's offset only moves
        the hint, and a prefetch never faults."""
        for c in range(k_lines_per_token):
            idx: T.let[T.int64] = t * k_lines_per_token + c
            elem: T.let[T.int64] = (((kvh * NGT + gt) * (NDC // PVV) + dv) * k_lines_per_tile + idx) * line
            if idx < k_lines_per_tile and elem < S * Hkv * D:
                prefetch_line(T.address_of(K[nxt, elem // (Hkv * D), elem // D % Hkv, elem % D + T.min(
                    T.int64(0), T.Cast("int64", T.reinterpret("int32", sc[t, kvh * G + gt * GT])))]))

    @T.macro
    def page_pv(acc, ov, sc, alpha, K, V, page, nxt, n, has_next):
        """``acc = acc * alpha + P . V`` over the page's ``n`` tokens, each GT heads x PVV vectors tile of the
        accumulator held in registers (``ov``) across the page; ``has_next``: a next page to prefetch."""
        for kvh in range(Hkv):
            for gt in range(NGT):
                for dv in range(NDC // PVV):
                    if pf_k_pv:
                        if has_next:
                            prefetch_next_k(K, nxt, kvh, gt, dv)
                    for g in T.unroll(GT):
                        for c in T.unroll(PVV):
                            for l in T.vectorized(L):
                                ov[g, c, l] = acc[kvh * G + gt * GT + g, (dv * PVV + c) * L + l] * alpha[
                                    kvh * G + gt * GT + g
                                ]
                    for t in range(n):
                        if pf_k_token:
                            if has_next:
                                prefetch_next_k_token(K, sc, nxt, kvh, gt, dv, t)
                        for g in T.unroll(GT):
                            for c in T.unroll(PVV):
                                for l in T.vectorized(L):
                                    ov[g, c, l] = ov[g, c, l] + sc[t, kvh * G + gt * GT + g] * load(
                                        V[page, t, kvh, (dv * PVV + c) * L + l]
                                    )
                    for g in T.unroll(GT):
                        for c in T.unroll(PVV):
                            for l in T.vectorized(L):
                                acc[kvh * G + gt * GT + g, (dv * PVV + c) * L + l] = ov[g, c, l]

    @T.macro
    def store_split(OP, LP, VS, acc, m, lsum, b, s):
        """Split ``s``'s normalized output (times the V scale of an 8-bit cache), running max and weight sum into
        the scratch (zeros, -inf and 0 when empty)."""
        for h in range(Hq):
            LP[b, s, h, 0] = m[h]
            LP[b, s, h, 1] = lsum[h]
            if lsum[h] > T.float32(0):
                for d in range(D):
                    if cfg.is_fp8:
                        OP[b, s, h, d] = acc[h, d] * (VS[h // G] * T.float32(widen) / lsum[h])
                    else:
                        OP[b, s, h, d] = acc[h, d] / lsum[h]
            else:  # an empty split (more splits than pages)
                for d in range(D):
                    OP[b, s, h, d] = T.float32(0)

    @T.macro
    def merge_splits(O, LSE, OP, LP, SK, mx, tot, w, o, b, h, used):
        """``out[b, h]`` and ``lse[b, h]`` from the first ``used`` partial states (the splits with pages): split
        ``s`` weighs ``sum_s * 2^(max_s - max)`` (the difference of two maxima is exact, where a difference of two
        log-sum-exps near 7e5 is not); a sink logit joins the denominator here, once. A lone split's weight over
        the total is exactly 1. The sums run over the sequence's own splits only, never the batch's NS: under
        fast-math reassociation LLVM vectorizes a sum by its trip count, so trailing empty splits would change
        its rounding and a sequence's result would follow the longest one in the batch."""
        mx[0] = neg_inf
        for s in range(used):
            mx[0] = T.max(mx[0], LP[b, s, h, 0])
        if cfg.sinks:
            mx[0] = T.max(mx[0], SK[h] * T.float32(LOG2E))
        tot[0] = T.float32(0)
        for s in range(used):
            w[s] = LP[b, s, h, 1] * T.exp2(LP[b, s, h, 0] - mx[0])
            tot[0] = tot[0] + w[s]
        if cfg.sinks:
            tot[0] = tot[0] + T.exp2(SK[h] * T.float32(LOG2E) - mx[0])
        for d in range(D):
            o[d] = T.float32(0)
        for s in range(used):
            for d in range(D):
                o[d] = o[d] + OP[b, s, h, d] * (w[s] / tot[0])
        for d in range(D):
            O[b, h, d] = from_f32(o[d], dt)
        LSE[b, h] = (mx[0] + T.log2(tot[0])) * T.float32(LN2)

    @T.prim_func
    def decode(
        Q: a.q, K: a.k_cache, V: a.v_cache, BT: a.block_table, SL: a.seq_lens, KS: a.k_scale, VS: a.v_scale,
        AS: a.alibi_slopes, SK: a.sinks, O: a.out, LSE: a.lse, OP: a.o_part, LP: a.ms_part, scale: T.float32,
        split_pages: T.int32, window_left: T.int32, logits_soft_cap: T.float32,
    ):
        T.func_attr({"global_symbol": cfg.name, "tirx.noalias": True})

        for task in T.parallel(B * NS):
            qf = T.alloc_buffer((Hq, D), "float32")
            acc = T.alloc_buffer((Hq, D), "float32")
            sc = T.alloc_buffer((S, Hq), "float32")
            m = T.alloc_buffer((Hq,), "float32")
            mnew = T.alloc_buffer((Hq,), "float32")
            lsum = T.alloc_buffer((Hq,), "float32")
            alpha = T.alloc_buffer((Hq,), "float32")
            # Register tiles: GT heads x L lanes, promoted to vector registers once the loops unroll.
            qk = T.alloc_buffer((TT, GT, L), "float32")
            ov = T.alloc_buffer((GT, PVV, L), "float32")
            slope = T.alloc_buffer((Hq,), "float32")
            b: T.let[T.int64] = task // NS
            s: T.let[T.int64] = task % NS
            seq_len: T.let[T.int64] = T.Cast("int64", SL[b])
            n_pages: T.let[T.int64] = (seq_len + S - 1) // S
            # The window's first key and page (pages before it are never read); 0 without a window.
            lo: T.let[T.int64] = window_start(seq_len - 1, window_left)
            first: T.let[T.int64] = lo // S
            chunk: T.let[T.int64] = split_chunk(n_pages, first, split_pages)
            p_begin: T.let[T.int64] = first + T.min(s * chunk, n_pages - first)
            p_end: T.let[T.int64] = T.min(p_begin + chunk, n_pages)  # split s: pages [p_begin, p_end)
            init_state(qf, acc, m, lsum, Q, KS, b, scale)
            if cfg.alibi:
                for h in range(Hq):
                    slope[h] = AS[h] * T.float32(LOG2E)
            for pi in range(p_end - p_begin):
                # The page, the next one (prefetched; the page itself on the last) and its tokens in use.
                page: T.let[T.int64] = T.Cast("int64", BT[b, p_begin + pi])
                nxt: T.let[T.int64] = T.Cast("int64", BT[b, T.min(p_begin + pi + 1, p_end - 1)])
                n: T.let[T.int64] = T.min(T.int64(S), seq_len - (p_begin + pi) * S)
                page_scores(sc, qk, qf, K, V, page, nxt, n)
                if cfg.soft_cap or cfg.alibi or cfg.window:
                    adjust_scores(sc, slope, n, (p_begin + pi) * S, seq_len - 1, lo, logits_soft_cap)
                softmax_rescale(sc, m, mnew, lsum, alpha, n)
                page_pv(acc, ov, sc, alpha, K, V, page, nxt, n, pi + 1 < p_end - p_begin)
            store_split(OP, LP, VS, acc, m, lsum, b, s)

        # Merge the splits of each (sequence, head) by their log-sum-exp.
        for bh in T.parallel(B * Hq):
            mx = T.alloc_buffer((1,), "float32")
            tot = T.alloc_buffer((1,), "float32")
            w = T.alloc_buffer((NS,), "float32")
            o = T.alloc_buffer((D,), "float32")
            b: T.let[T.int64] = bh // Hq
            h: T.let[T.int64] = bh % Hq
            n_pages: T.let[T.int64] = (T.Cast("int64", SL[b]) + S - 1) // S
            first: T.let[T.int64] = window_start(T.Cast("int64", SL[b]) - 1, window_left) // S
            chunk: T.let[T.int64] = split_chunk(n_pages, first, split_pages)
            used: T.let[T.int64] = T.min(T.int64(NS), (n_pages - first + chunk - 1) // chunk)
            merge_splits(O, LSE, OP, LP, SK, mx, tot, w, o, b, h, used)

    return finish(DECODE, cfg, decode)
