"""Paged (chunked) prefill attention for CPUs, as a hand-scheduled TVMScript program.

Work is split over query tiles run in parallel: a tile is up to ``PREFILL_Q_TILE`` consecutive query rows of
one sequence (``ops.plan_prefill`` lists them). Inside a tile, for each KV head in turn, the tile's rows times
the group's query heads (``rows = tile_rows * group``) form one block of queries that walks the keys in chunks
of ``chunk`` tokens (independent of the page size, so one-token pages cost no more than large ones):

1. gather: the chunk's K rows are read once, widened to float32 and stored transposed (``KT [D, chunk]``), its V
   rows widened into ``VC [chunk, D]``; tokens past the tile's last visible key are not read (zero-filled).
2. scores: ``S = Qs . KT`` as a register-blocked outer product, ``rows_blk`` query rows by ``chunk`` lanes,
   accumulated over head_dim (q is pre-scaled by ``scale * log2(e)``: scores are in the log2 domain).
3. online softmax, one rescale per chunk per (row, head): masked keys (causal, or past the sequence) get an exact
   zero weight; the running max starts at a true minus infinity (key 0 is visible to every row, so the first
   chunk always makes it finite).
4. ``acc = acc * alpha + P . VC``, register-blocked ``pv_rows`` rows by ``pv_vecs`` vectors of ``lanes`` along
   head_dim, the rescale folded into the accumulator load.

Every K/V element a tile needs is read once per tile and shared by all its rows and the group's query heads; the
cache is never read at or past ``seq_len``, nor, when causal, past the tile's last query position.
Tiles are visited in a zigzag order (first, last, second, ...) so the static split of ``T.parallel`` gives every
thread a similar share of short and long causal tiles.

Signature (all arrays C-contiguous; ``TQ``, ``P``, ``B``, ``M``, ``NT`` symbolic int64):

    q            [TQ, num_qo_heads, head_dim]                     dtype
    k_cache      [P, page_size, num_kv_heads, head_dim]           dtype
    v_cache      [P, page_size, num_kv_heads, head_dim]           dtype
    block_table  [B, M]                                           int32
    seq_lens     [B]                                              int32 (>= 1)
    cu_seqlens_q [B + 1]                                          int32, q_len_b <= seq_lens[b]
    tiles        [NT, 3]                                          int32 (b, row_start, row_end), rows relative to
                                                                  sequence b, row_end - row_start <= 16
    out          [TQ, num_qo_heads, head_dim]                     dtype   (written)
    lse          [TQ, num_qo_heads]                               float32, natural log (written)
    scale        float32 scalar: softmax scale
    causal       int32 scalar: 1 = key j visible to query i iff j <= seq_len - q_len + i
"""

from __future__ import annotations

import math

from ..config import KernelConfig
from ..tvm_compat import T, prefetch
from .common import LN2, LOG2E, exp2, from_f32, to_f32
from .signatures import prefill_args

# Query rows per tile; must equal ops.PREFILL_Q_TILE (the planner's tile), checked by the tests.
PREFILL_Q_TILE = 16
_CACHE_LINE = 64
_STACK_BYTES = 1024  # TVM's limit for a local buffer on the stack (runtime::kMaxStackAlloca)


def _largest_divisor_at_most(n: int, cap: int) -> int:
    return max(d for d in range(1, min(n, cap) + 1) if n % d == 0)


def _defaults(cfg: KernelConfig, lanes: int) -> tuple[int, int, int, int, int]:
    """(lanes, chunk, rows_blk, pv_rows, pv_vecs) that :func:`build_prefill_cpu` picks when not told."""
    if cfg.head_dim % lanes:
        lanes = _largest_divisor_at_most(cfg.head_dim, lanes)
    acc_regs = 10 if lanes < 16 else 14
    chunk = max(32, 2 * lanes)
    rows_blk = max(1, 8 // max(1, chunk // lanes))
    pv_rows = 4 if lanes < 16 else 2
    cap = min(acc_regs // pv_rows, (_STACK_BYTES // 4 - 1) // (pv_rows * lanes))
    pv_vecs = _largest_divisor_at_most(cfg.head_dim // lanes, max(1, cap))
    return lanes, chunk, rows_blk, pv_rows, pv_vecs


def knob_space(cfg: KernelConfig, lanes: int) -> dict[str, list]:
    """Tunable knobs of :func:`build_prefill_cpu` (first value of each list = the default).

    ``chunk``: keys per online-softmax step (a multiple of the lanes); ``rows_blk``: query rows of the score
    register block; ``pv_rows`` x ``pv_vecs``: the P.V register block; ``use_prefetch``: software prefetch of the
    next chunk's K/V rows. Every combination builds a correct kernel; blocks too large for the registers (or for a
    stack buffer) are legal and merely slow, which is what the search finds out.
    """
    lanes, chunk, rows_blk, pv_rows, pv_vecs = _defaults(cfg, lanes)
    nvec = cfg.head_dim // lanes
    chunks = [chunk, 2 * chunk] + ([chunk // 2] if chunk // 2 >= lanes and (chunk // 2) % lanes == 0 else [])
    return {
        "chunk": chunks,
        "rows_blk": [rows_blk] + [r for r in (1, 2, 4) if r != rows_blk],
        "pv_rows": [pv_rows] + [r for r in (2, 4, 8) if r != pv_rows],
        "pv_vecs": [pv_vecs] + [v for v in (1, 2, 4) if v != pv_vecs and nvec % v == 0],
        "use_prefetch": [True, False],
    }


def build_prefill_cpu(cfg: KernelConfig, *, lanes: int = 8, chunk: int | None = None, rows_blk: int | None = None,
                      pv_rows: int | None = None, pv_vecs: int | None = None, use_prefetch: bool = True):
    """Return the prefill PrimFunc for ``cfg`` (kernel ``prefill``) on an LLVM CPU target.

    Knobs (defaults sized for the vector register file: 16 registers below 16 lanes, 32 with AVX-512):
    ``lanes`` float32 SIMD lanes; ``chunk`` keys per online-softmax step, a multiple of ``lanes`` (default
    ``max(32, 2 * lanes)``); ``rows_blk`` query rows per register block of the scores (``rows_blk * chunk / lanes``
    accumulators, default 8 of them); ``pv_rows`` x ``pv_vecs`` query rows x head_dim vectors per register block
    of P.V (default 4 x 2 on AVX2, 2 x up to 7 on AVX-512; ``pv_vecs`` must divide ``head_dim / lanes``);
    ``use_prefetch`` software prefetch of the next chunk's K/V rows. Register blocks of 1 KiB or more are legal
    but slow (see ``_STACK_BYTES``).
    """
    if cfg.kernel != "prefill":
        raise ValueError(f"build_prefill_cpu needs a prefill config, got {cfg.name}")
    Hkv, D, S, G = cfg.num_kv_heads, cfg.head_dim, cfg.page_size, cfg.group_size
    dt = cfg.dtype
    E = cfg.itemsize
    QT = PREFILL_Q_TILE
    d_lanes, d_chunk, d_rows_blk, d_pv_rows, _ = _defaults(cfg, lanes)
    lanes = d_lanes
    # Accumulators a register block may use (the other vector registers hold loads and broadcasts): a P.V block of
    # 4 rows x 3 vectors (12 of 16 AVX2 registers) spilled and ran 4x slower than 4 x 2. A register block is a
    # local buffer, and TVM keeps a local buffer on the stack (where LLVM can promote it to registers) only when it
    # is smaller than _STACK_BYTES; a larger one becomes a heap workspace and every update goes to memory.
    acc_regs = 10 if lanes < 16 else 14
    C = int(chunk) if chunk is not None else d_chunk
    cvec = C // lanes
    # Default: 8 score accumulators (measured best), for the chunk actually used.
    RS = int(rows_blk) if rows_blk is not None else (d_rows_blk if chunk is None else max(1, 8 // max(1, cvec)))
    RP = int(pv_rows) if pv_rows is not None else d_pv_rows
    nvec = D // lanes
    if pv_vecs is None:
        cap = min(acc_regs // RP, (_STACK_BYTES // 4 - 1) // (RP * lanes))
        pv_vecs = _largest_divisor_at_most(nvec, max(1, cap))
    DV = int(pv_vecs)
    if C <= 0 or C % lanes or RS <= 0 or RP <= 0 or DV <= 0 or nvec % DV:
        raise ValueError(f"prefill knobs: chunk={C}, rows_blk={RS}, pv_rows={RP}, pv_vecs={DV} (chunk must be a "
                         f"multiple of lanes = {lanes}, pv_vecs must divide head_dim / lanes = {nvec})")
    DB = DV * lanes  # head_dim elements per P.V register block
    NDB = D // DB
    RB = RS * RP // math.gcd(RS, RP)  # rows are padded to a multiple of both register blocks
    ROWS = (QT * G + RB - 1) // RB * RB  # query rows of one KV head in a full tile, padded
    line = max(1, _CACHE_LINE // E)  # elements per cache line
    row_lines = (D + line - 1) // line  # cache lines per K (or V) row of one head
    neg_inf = T.float32(float("-inf"))

    a = prefill_args(cfg)
    NT = a.NT

    @T.prim_func
    def prefill(
        Q: a.q, K: a.k_cache, V: a.v_cache, BT: a.block_table, SL: a.seq_lens, CU: a.cu_seqlens_q,
        TL: a.tiles, O: a.out, LSE: a.lse, scale: T.float32, causal: T.int32,
    ):
        T.func_attr({"global_symbol": cfg.name, "tirx.noalias": True})

        for task in T.parallel(NT):
            qf = T.alloc_buffer((ROWS, D), "float32")
            acc = T.alloc_buffer((ROWS, D), "float32")
            sc = T.alloc_buffer((ROWS, C), "float32")
            kt = T.alloc_buffer((D, C), "float32")
            vc = T.alloc_buffer((C, D), "float32")
            m = T.alloc_buffer((ROWS,), "float32")
            lsum = T.alloc_buffer((ROWS,), "float32")
            alpha = T.alloc_buffer((ROWS,), "float32")
            red = T.alloc_buffer((1,), "float32")
            part = T.alloc_buffer((lanes,), "float32")
            sreg = T.alloc_buffer((RS, C), "float32")
            preg = T.alloc_buffer((RP, DB), "float32")
            # Scalars are `x: T.let[T.int64] = ...` (a LetStmt, a register): in TVM 0.27 `x: T.int64 = ...` is a
            # mutable one-element buffer, heap-allocated per task (TVMBackendAllocWorkspace) and reloaded per use.
            # Zigzag: task 0, 1, 2, 3, ... -> tile 0, NT-1, 1, NT-2, ...
            tile: T.let[T.int64] = T.Select(task % 2 == 0, task // 2, NT - 1 - task // 2)
            b: T.let[T.int64] = T.Cast("int64", TL[tile, 0])
            r0: T.let[T.int64] = T.Cast("int64", TL[tile, 1])
            nr: T.let[T.int64] = T.Cast("int64", TL[tile, 2]) - r0
            q_start: T.let[T.int64] = T.Cast("int64", CU[b])
            q_len: T.let[T.int64] = T.Cast("int64", CU[b + 1]) - q_start
            seq_len: T.let[T.int64] = T.Cast("int64", SL[b])
            pos0: T.let[T.int64] = seq_len - q_len + r0  # position of the tile's first row
            kv_end: T.let[T.int64] = T.Select(causal != 0, T.min(seq_len, pos0 + nr), seq_len)
            rows: T.let[T.int64] = nr * G
            n_pad: T.let[T.int64] = (rows + RB - 1) // RB * RB
            for kvh in range(Hkv):
                # The block's queries (row i = tile row i // G, head kvh * G + i % G), scaled into the log2 domain.
                # Every vectorized loop is exactly `lanes` wide: LLVM splits <80 x float> and the like badly.
                for i in range(n_pad):
                    if i < rows:
                        for dv in range(nvec):
                            for dl in T.vectorized(lanes):
                                qf[i, dv * lanes + dl] = to_f32(
                                    Q[q_start + r0 + i // G, kvh * G + i % G, dv * lanes + dl], dt
                                ) * (scale * T.float32(LOG2E))
                    else:
                        for dv in range(nvec):
                            for dl in T.vectorized(lanes):
                                qf[i, dv * lanes + dl] = T.float32(0)
                    for dv in range(nvec):
                        for dl in T.vectorized(lanes):
                            acc[i, dv * lanes + dl] = T.float32(0)
                    m[i] = neg_inf
                    lsum[i] = T.float32(0)
                for ch in range((kv_end + C - 1) // C):
                    c0: T.let[T.int64] = ch * C
                    # 1. gather K (transposed) and V of the chunk's visible tokens, widened to float32.
                    for c in range(C):
                        if c0 + c < kv_end:
                            page: T.let[T.int64] = T.Cast("int64", BT[b, (c0 + c) // S])
                            slot: T.let[T.int64] = (c0 + c) % S
                            for d in range(D):
                                kt[d, c] = to_f32(K[page, slot, kvh, d], dt)
                            for dv in range(nvec):
                                for dl in T.vectorized(lanes):
                                    vc[c, dv * lanes + dl] = to_f32(V[page, slot, kvh, dv * lanes + dl], dt)
                        else:
                            for d in range(D):
                                kt[d, c] = T.float32(0)
                            for dv in range(nvec):
                                for dl in T.vectorized(lanes):
                                    vc[c, dv * lanes + dl] = T.float32(0)
                    if use_prefetch:
                        # The next chunk's K and V rows (scattered over pages) are on their way during this one's math.
                        for c in range(C):
                            if c0 + C + c < kv_end:
                                npage: T.let[T.int64] = T.Cast("int64", BT[b, (c0 + C + c) // S])
                                nslot: T.let[T.int64] = (c0 + C + c) % S
                                for ln in range(row_lines):
                                    prefetch(T.address_of(K[npage, nslot, kvh, ln * line]))
                                    prefetch(T.address_of(V[npage, nslot, kvh, ln * line]))
                    # 2. scores, rows_blk rows x chunk keys in registers.
                    for ib in range(n_pad // RS):
                        for ii in T.unroll(RS):
                            for cb in T.unroll(cvec):
                                for cl in T.vectorized(lanes):
                                    sreg[ii, cb * lanes + cl] = T.float32(0)
                        for d in range(D):
                            for ii in T.unroll(RS):
                                for cb in T.unroll(cvec):
                                    for cl in T.vectorized(lanes):
                                        sreg[ii, cb * lanes + cl] = (
                                            sreg[ii, cb * lanes + cl] + qf[ib * RS + ii, d] * kt[d, cb * lanes + cl]
                                        )
                        for ii in T.unroll(RS):
                            for cb in T.unroll(cvec):
                                for cl in T.vectorized(lanes):
                                    sc[ib * RS + ii, cb * lanes + cl] = sreg[ii, cb * lanes + cl]
                    # 3. online softmax: keys c0 + c < limit are visible to row i.
                    for i in range(n_pad):
                        if i < rows:
                            limit: T.let[T.int64] = T.Select(causal != 0, T.min(kv_end, pos0 + i // G + 1), kv_end)
                            # Row max and sum with lanes-wide partials (a scalar loop would not vectorize).
                            for ln in T.vectorized(lanes):
                                part[ln] = m[i]
                            for cb in range(cvec):
                                for ln in T.vectorized(lanes):
                                    part[ln] = T.max(part[ln], T.Select(c0 + cb * lanes + ln < limit,
                                                                        sc[i, cb * lanes + ln], neg_inf))
                            red[0] = part[0]
                            for ln in range(1, lanes):
                                red[0] = T.max(red[0], part[ln])
                            alpha[i] = exp2(m[i] - red[0])
                            m[i] = red[0]
                            for ln in T.vectorized(lanes):
                                part[ln] = T.float32(0)
                            for cb in range(cvec):
                                for ln in T.vectorized(lanes):
                                    sc[i, cb * lanes + ln] = T.Select(
                                        c0 + cb * lanes + ln < limit, exp2(sc[i, cb * lanes + ln] - red[0]),
                                        T.float32(0),
                                    )
                                    part[ln] = part[ln] + sc[i, cb * lanes + ln]
                            red[0] = part[0]
                            for ln in range(1, lanes):
                                red[0] = red[0] + part[ln]
                            lsum[i] = lsum[i] * alpha[i] + red[0]
                        else:  # padding rows of the last register block
                            alpha[i] = T.float32(0)
                            for cb in range(cvec):
                                for ln in T.vectorized(lanes):
                                    sc[i, cb * lanes + ln] = T.float32(0)
                    # 4. acc = acc * alpha + P . V, pv_rows rows x pv_vecs vectors in registers.
                    for ib in range(n_pad // RP):
                        for db in range(NDB):
                            for ii in T.unroll(RP):
                                for dv in T.unroll(DV):
                                    for dl in T.vectorized(lanes):
                                        preg[ii, dv * lanes + dl] = (
                                            acc[ib * RP + ii, db * DB + dv * lanes + dl] * alpha[ib * RP + ii]
                                        )
                            for c in range(T.min(T.int64(C), kv_end - c0)):
                                for ii in T.unroll(RP):
                                    for dv in T.unroll(DV):
                                        for dl in T.vectorized(lanes):
                                            preg[ii, dv * lanes + dl] = (
                                                preg[ii, dv * lanes + dl]
                                                + sc[ib * RP + ii, c] * vc[c, db * DB + dv * lanes + dl]
                                            )
                            for ii in T.unroll(RP):
                                for dv in T.unroll(DV):
                                    for dl in T.vectorized(lanes):
                                        acc[ib * RP + ii, db * DB + dv * lanes + dl] = preg[ii, dv * lanes + dl]
                # Normalize and write this KV head's rows.
                for i in range(rows):
                    for dv in range(nvec):
                        for dl in T.vectorized(lanes):
                            O[q_start + r0 + i // G, kvh * G + i % G, dv * lanes + dl] = from_f32(
                                acc[i, dv * lanes + dl] / lsum[i], dt
                            )
                    LSE[q_start + r0 + i // G, kvh * G + i % G] = (m[i] + T.log2(lsum[i])) * T.float32(LN2)

    return prefill
