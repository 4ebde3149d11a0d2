"""Paged (chunked) prefill attention for CPUs, as a hand-scheduled TVMScript program.

Work is split over query tiles run in parallel: a tile is up to ``q_tile`` consecutive query rows of one
sequence (``tvm_paged.spec.PREFILL.constants["q_tile"]``; ``spec.prefill_tiles`` lists them). Inside a tile, for
each KV head in turn, the tile's rows times the group's query heads (``rows = tile_rows * group``) form one block
of queries that walks the keys in chunks of ``chunk`` tokens (independent of the page size, so one-token pages
cost no more than large ones). Each step is one of the builder's macros:

1. ``gather_chunk``: the chunk's K rows are read once, widened to float32 and stored transposed (``kt``:
   ``[chunk / lanes, D, lanes]``, transposed lanes x lanes at a time in registers), its V rows widened into
   ``vc [chunk, D]``; tokens past the tile's last visible key are not read (zero-filled).
   ``prefetch_next_chunk`` asks for the next chunk's rows meanwhile.
2. ``chunk_scores``: ``S = Qs . kt`` as a register-blocked outer product, ``rows_blk`` query rows by ``chunk``
   lanes, accumulated over head_dim (q is pre-scaled by ``scale * log2(e)``: scores are in the log2 domain).
3. ``softmax_update``: the online softmax, one rescale per chunk per (row, head): masked keys (causal, or past
   the sequence) get an exact zero weight; the running max starts at a true minus infinity (key 0 is visible to
   every row, so the first chunk always makes it finite).
4. ``pv_accumulate``: ``acc = acc * alpha + P . VC``, register-blocked ``pv_rows`` rows by ``pv_vecs`` vectors
   of ``lanes`` along head_dim, the rescale folded into the accumulator load.

``init_block`` loads the block's scaled queries and empties its softmax state before the first chunk;
``store_rows`` normalizes and writes the block after the last.

Every K/V element a tile needs is read once per tile and shared by all its rows and the group's query heads; the
cache is never read at or past ``seq_len``, nor, when causal, past the tile's last query position.
Tiles are visited in a zigzag order (first, last, second, ...) so the static split of ``T.parallel`` gives every
thread a similar share of short and long causal tiles.

Variants (compiled in only when the configuration has them): ``softmax_update`` applies the soft-cap and the
ALiBi bias to a chunk's scores and masks keys before each row's window; with a window the tile's walk starts at
its first row's first visible key, so pages wholly behind the window are never read; ``store_rows`` adds the sink
to the denominator; 8-bit caches are widened while gathered (``common.kv_to_f32``), the K scale folded into the
block's queries and the V scale into the normalization.

On a CPU with AMX-BF16, bfloat16 prefill (``amx=True``, chosen from the target) runs steps 2 and 4 on AMX tiles:
``amx_gather_chunk`` lays the chunk out as the tile multiply's B operand, ``amx_scores`` and ``amx_pv`` multiply
16-row query tiles on four accumulator tiles; the softmax stays on vector registers.

The parameters are :data:`tvm_paged.spec.PREFILL`'s (see :func:`build_prefill_cpu`).
"""

from __future__ import annotations

import math

from ..config import KernelConfig
from ..spec import PREFILL
from ..tvm_compat import AMX, T, prefetch
from .common import (
    CACHE_LINE_BYTES, LN2, LOG2E, bf16_bits, exp2, from_f32, kv_to_f32, kv_widen_factor, largest_divisor_at_most,
    lanes_at, row_sums, tanh, to_f32, transpose_vectors,
)
from .signatures import finish, prefill_args

_STACK_BYTES = 1024  # TVM's limit for a local buffer on the stack (runtime::kMaxStackAlloca)


def _rows_blk(chunk: int, lanes: int) -> int:
    """Default score register block: 8 accumulators (measured best) of ``lanes``, ``chunk / lanes`` per row."""
    return max(1, 8 // max(1, chunk // lanes))


def _pv_vecs(head_dim: int, lanes: int, pv_rows: int) -> int:
    """Default P.V register block width for ``pv_rows`` rows: the most head_dim vectors (a divisor of
    ``head_dim / lanes``) within the accumulator registers and the stack-buffer limit.

    Accumulators a register block may use (the other vector registers hold loads and broadcasts): a P.V block of
    4 rows x 3 vectors (12 of 16 AVX2 registers) spilled and ran 4x slower than 4 x 2. A register block is a
    local buffer, and TVM keeps a local buffer on the stack (where LLVM can promote it to registers) only when it
    is smaller than _STACK_BYTES; a larger one becomes a heap workspace and every update goes to memory.
    """
    acc_regs = 10 if lanes < 16 else 14
    cap = min(acc_regs // pv_rows, (_STACK_BYTES // 4 - 1) // (pv_rows * lanes))
    return largest_divisor_at_most(head_dim // lanes, max(1, cap))


def _defaults(cfg: KernelConfig, lanes: int) -> tuple[int, int, int, int, int]:
    """(lanes, chunk, rows_blk, pv_rows, pv_vecs) that :func:`build_prefill_cpu` picks when not told."""
    if cfg.head_dim % lanes:
        lanes = largest_divisor_at_most(cfg.head_dim, lanes)
    chunk = -(-max(32, 2 * lanes) // lanes) * lanes  # a multiple of the lanes: 36 for head_dim 36's 6 lanes
    pv_rows = 4 if lanes < 16 else 2
    return lanes, chunk, _rows_blk(chunk, lanes), pv_rows, _pv_vecs(cfg.head_dim, lanes, pv_rows)


AMX_TILE = 16  # rows of an AMX tile, and float32 columns of an accumulator tile
AMX_CHUNK = 64  # keys per step on AMX: four accumulator tiles of 16 keys


def amx_applies(cfg: KernelConfig) -> bool:
    """Whether the AMX-BF16 path can run ``cfg``: bfloat16 queries and cache (AMX multiplies bfloat16 pairs;
    other dtypes would have to be rounded to it) and head_dim a multiple of 64 (two 32-element A tiles per
    score step, four 16-column accumulator tiles per P.V step)."""
    return cfg.dtype == "bfloat16" and not cfg.is_fp8 and cfg.head_dim % 64 == 0


def knob_space(cfg: KernelConfig, lanes: int, amx: bool = False) -> dict[str, list]:
    """Tunable knobs of :func:`build_prefill_cpu` (first value of each list = the default).

    ``chunk``: keys per online-softmax step (a multiple of the lanes); ``rows_blk``: query rows of the score
    register block; ``pv_rows`` x ``pv_vecs``: the P.V register block; ``use_prefetch``: software prefetch of the
    next chunk's K/V rows. Every combination builds a correct kernel; blocks too large for the registers (or for a
    stack buffer) are legal and merely slow, which is what the search finds out.
    """
    if amx:  # the register blocks are AMX tiles: only the chunk and the prefetch are free
        return {"chunk": [AMX_CHUNK, 2 * AMX_CHUNK], "use_prefetch": [True, False]}
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
                      pv_rows: int | None = None, pv_vecs: int | None = None, use_prefetch: bool = True,
                      amx: bool = False):
    """Return the prefill PrimFunc for ``cfg`` (kernel ``prefill``) on an LLVM CPU target.

    Its parameters are :data:`tvm_paged.spec.PREFILL`'s (C-contiguous; ``TQ``, ``P``, ``B``, ``M``, ``NT``
    symbolic; ``dtype`` = ``cfg.dtype``):

        q [TQ, Hq, D], k_cache / v_cache [P, S, Hkv, D]: dtype    block_table [B, M], seq_lens [B] (>= 1): int32
        cu_seqlens_q [B + 1]: int32 (q_len_b <= seq_lens[b])    tiles [NT, 3]: int32 (b, row_start, row_end),
        rows relative to sequence b, at most ``q_tile`` of them
        out [TQ, Hq, D]: dtype, lse [TQ, Hq]: float32 (natural log)  (written)
        scale: float32    causal: int32, 1 = key j visible to query i iff j <= seq_len - q_len + i

    Knobs (defaults sized for the vector register file: 16 registers below 16 lanes, 32 with AVX-512):
    ``lanes`` float32 SIMD lanes; ``chunk`` keys per online-softmax step, a multiple of ``lanes`` (default
    ``max(32, 2 * lanes)`` rounded up to one); ``rows_blk`` query rows per register block of the scores
    (``rows_blk * chunk / lanes`` accumulators, default 8 of them); ``pv_rows`` x ``pv_vecs`` query rows x
    head_dim vectors per register block of P.V (default 4 x 2 on AVX2, 2 x up to 7 on AVX-512; ``pv_vecs`` must
    divide ``head_dim / lanes``); ``use_prefetch`` software prefetch of the next chunk's K/V rows. Register
    blocks of 1 KiB or more are legal but slow (see ``_STACK_BYTES``).

    ``amx`` (bfloat16 only, see :func:`amx_applies`; the target must have ``amx-bf16``): the two products run on
    AMX tiles instead of FMAs. Each chunk (``chunk`` a multiple of 64) is gathered as bfloat16 in the layouts
    the tile multiply reads (K transposed in pairs of head_dim elements, V in pairs of tokens); the scores come
    out in float32 and the softmax stays on vector registers; the weights are rounded to bfloat16 for P.V (as
    the GPU kernels do), accumulated in float32. ``rows_blk``, ``pv_rows`` and ``pv_vecs`` do not apply.
    """
    if cfg.kernel != "prefill":
        raise ValueError(f"build_prefill_cpu needs a prefill config, got {cfg.name}")
    Hkv, D, S, G = cfg.num_kv_heads, cfg.head_dim, cfg.page_size, cfg.group_size
    dt = cfg.dtype
    E = cfg.kv_itemsize
    widen = kv_widen_factor(cfg)
    QT = PREFILL.constants["q_tile"]
    lanes, d_chunk, _, d_pv_rows, _ = _defaults(cfg, lanes)
    C = int(chunk) if chunk is not None else (AMX_CHUNK if amx else d_chunk)
    if amx and not amx_applies(cfg):
        raise ValueError(f"prefill knobs: amx needs bfloat16 q and cache and head_dim a multiple of 64, got "
                         f"{cfg.dtype} / {cfg.kv_dtype} and head_dim {D}")
    if amx and C % AMX_CHUNK:
        raise ValueError(f"prefill knobs: chunk={C} must be a multiple of {AMX_CHUNK} with amx")
    cvec = C // lanes
    RS = int(rows_blk) if rows_blk is not None else _rows_blk(C, lanes)  # for the chunk actually used
    RP = int(pv_rows) if pv_rows is not None else d_pv_rows
    nvec = D // lanes
    DV = int(pv_vecs) if pv_vecs is not None else _pv_vecs(D, lanes, RP)
    if C <= 0 or C % lanes or RS <= 0 or RP <= 0 or DV <= 0 or nvec % DV:
        raise ValueError(f"prefill knobs: chunk={C}, rows_blk={RS}, pv_rows={RP}, pv_vecs={DV} (chunk must be a "
                         f"multiple of lanes = {lanes}, pv_vecs must divide head_dim / lanes = {nvec})")
    if cfg.window and C < QT:
        # A tile's walk starts at its first row's first visible key; every later row's first visible key must
        # fall in the first chunk, so that no row meets a chunk with no visible key before its first.
        raise ValueError(f"prefill knobs: chunk={C} must be at least q_tile = {QT} with a sliding window")
    DB = DV * lanes  # head_dim elements per P.V register block
    NDB = D // DB
    # Rows are padded to a multiple of both register blocks (of the AMX tile with amx).
    RB = AMX_TILE if amx else RS * RP // math.gcd(RS, RP)
    ROWS = (QT * G + RB - 1) // RB * RB  # query rows of one KV head in a full tile, padded
    line = max(1, CACHE_LINE_BYTES // E)  # elements per cache line
    row_lines = (D + line - 1) // line  # cache lines per K (or V) row of one head
    neg_inf = T.float32(float("-inf"))

    a = prefill_args(cfg)
    NT = a.NT

    def q_factor(KS, kvh, scale):
        """What q is multiplied by: the softmax scale and log2(e) (scores in the log2 domain), and an 8-bit
        cache's K scale and widening factor."""
        if cfg.is_fp8:
            return scale * T.float32(LOG2E * widen) * KS[kvh]
        return scale * T.float32(LOG2E)

    def window_start(pos, window_left):
        """The first key a query at ``pos`` sees: ``pos - window_left`` (at least 0) with a window, else 0."""
        if cfg.window:
            return T.max(pos - T.Cast("int64", window_left), T.int64(0))
        return T.int64(0)

    def visible(key, lo, limit):
        """Whether ``key`` is visible to a row whose keys are ``[lo, limit)`` (``lo`` only with a window)."""
        if cfg.window:
            return T.And(key < limit, key >= lo)
        return key < limit

    @T.macro
    def init_block(qf, qb, acc, m, lsum, Q, Qu, KS, q_start, r0, kvh, rows, n_pad, scale):
        """The block's queries (row ``i``: tile row ``i // G``, head ``kvh * G + i % G``), zero past ``rows``, and
        an empty online-softmax state for every row. FMA path: ``qf`` in float32, scaled into the log2 domain.
        AMX path: ``qb``, their bfloat16 bits unscaled (scaling would round them; the scores are scaled in
        float32). Every vectorized loop is exactly ``lanes`` wide: LLVM splits <80 x float> and the like badly."""
        for i in range(n_pad):
            if i < rows:
                for dv in range(nvec):
                    for dl in T.vectorized(lanes):
                        if amx:
                            qb[i, dv * lanes + dl] = Qu[q_start + r0 + i // G, kvh * G + i % G, dv * lanes + dl]
                        else:
                            qf[i, dv * lanes + dl] = to_f32(
                                Q[q_start + r0 + i // G, kvh * G + i % G, dv * lanes + dl], dt
                            ) * q_factor(KS, kvh, scale)
            else:
                for dv in range(nvec):
                    for dl in T.vectorized(lanes):
                        if amx:
                            qb[i, dv * lanes + dl] = T.uint16(0)
                        else:
                            qf[i, dv * lanes + dl] = T.float32(0)
            for dv in range(nvec):
                for dl in T.vectorized(lanes):
                    acc[i, dv * lanes + dl] = T.float32(0)
            m[i] = neg_inf
            lsum[i] = T.float32(0)

    # K is transposed in lanes x lanes blocks of register shuffles when lanes is a power of two (else by element).
    block_t = lanes > 1 and not lanes & (lanes - 1)

    def kt_base(d, cb):
        """Index in ``kt`` of element ``d`` of token block ``cb``'s first token. ``kt`` is laid out
        ``[C / lanes, D, lanes]``: the score loop reads ``lanes`` tokens of one ``d`` as a vector, and a
        lanes x lanes block of tokens and ``d`` is contiguous."""
        return (cb * D + d) * lanes

    def kt_at(d, c):
        """Index in ``kt`` of K element (token ``c``, ``d``)."""
        return kt_base(d, c // lanes) + c % lanes

    def kt_block(kr, cb, db):
        """``kt``'s lanes x lanes block of tokens ``cb * lanes ...`` and head_dim ``db * lanes ...`` (contiguous
        there), from the widened rows ``kr``: one vector of lanes * lanes."""
        rows = [kr[cb * lanes + i, lanes_at(db * lanes, lanes)] for i in range(lanes)]
        return T.Shuffle(transpose_vectors(rows, lanes), list(range(lanes * lanes)))

    @T.macro
    def gather_chunk(kt, kr, vc, K, V, BT, b, kvh, c0, kv_end):
        """K (transposed into ``kt``, see ``kt_base``) and V (``vc [C, D]``) of the chunk's tokens from ``c0``,
        widened to float32 (K through ``kr [C, D]`` when transposed by blocks); tokens at or past ``kv_end`` are
        not read (zeros)."""
        for c in range(C):
            if c0 + c < kv_end:
                page: T.let[T.int64] = T.Cast("int64", BT[b, (c0 + c) // S])
                slot: T.let[T.int64] = (c0 + c) % S
                for dv in range(nvec):
                    for dl in T.vectorized(lanes):
                        if block_t:
                            kr[c, dv * lanes + dl] = kv_to_f32(K[page, slot, kvh, dv * lanes + dl], cfg)
                        vc[c, dv * lanes + dl] = kv_to_f32(V[page, slot, kvh, dv * lanes + dl], cfg)
                if not block_t:
                    for d in range(D):
                        kt[kt_at(d, c)] = kv_to_f32(K[page, slot, kvh, d], cfg)
            else:
                for dv in range(nvec):
                    for dl in T.vectorized(lanes):
                        if block_t:
                            kr[c, dv * lanes + dl] = T.float32(0)
                        vc[c, dv * lanes + dl] = T.float32(0)
                if not block_t:
                    for d in range(D):
                        kt[kt_at(d, c)] = T.float32(0)
        if block_t:
            for cb in range(cvec):
                for db in range(nvec):
                    kt[T.ramp(kt_base(db * lanes, cb), 1, lanes * lanes)] = kt_block(kr, cb, db)

    @T.macro
    def prefetch_next_chunk(K, V, BT, b, kvh, c0, kv_end):
        """Prefetch the next chunk's K and V rows (scattered over pages) during this chunk's math."""
        for c in range(C):
            if c0 + C + c < kv_end:
                npage: T.let[T.int64] = T.Cast("int64", BT[b, (c0 + C + c) // S])
                nslot: T.let[T.int64] = (c0 + C + c) % S
                for ln in range(row_lines):
                    prefetch(T.address_of(K[npage, nslot, kvh, ln * line]))
                    prefetch(T.address_of(V[npage, nslot, kvh, ln * line]))

    @T.macro
    def chunk_scores(sc, sreg, qf, kt, n_pad):
        """``sc = qf . kt`` for the ``n_pad`` rows, ``rows_blk`` rows x ``chunk`` keys in registers (``sreg``)."""
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
                                sreg[ii, cb * lanes + cl] + qf[ib * RS + ii, d] * kt[kt_base(d, cb) + cl]
                            )
            for ii in T.unroll(RS):
                for cb in T.unroll(cvec):
                    for cl in T.vectorized(lanes):
                        sc[ib * RS + ii, cb * lanes + cl] = sreg[ii, cb * lanes + cl]

    def lane_reduce(part, combine):
        """``part[0] combine ... combine part[lanes - 1]``: a shuffle tree for a power-of-two lane count, else a
        chain."""
        if lanes & (lanes - 1) == 0:
            return row_sums([part[lanes_at(0, lanes)]], lanes, combine)
        acc = part[0]
        for ln in range(1, lanes):
            acc = combine(acc, part[ln])
        return acc

    @T.macro
    def softmax_update(sc, m, lsum, alpha, part, red, AS, rows, n_pad, c0, pos0, kv_end, causal, kvh, window_left,
                       cap):
        """The online-softmax update of one chunk per row: keys ``lo_i <= c0 + c < limit`` are visible to row
        ``i`` (masked ones get an exact zero weight; ``lo_i`` is the window's first key, 0 without one). ``m``
        the new running max, ``alpha`` the factor that rescales the row's old state to it, ``sc`` replaced by
        the weights, ``lsum`` rescaled and increased by them. The soft-cap and ALiBi variants first change the
        scores (in the log2 domain). Padding rows get zero weights and ``alpha``. Row max and sum use lanes-wide
        partials (``part``) reduced by a shuffle tree (``row_sums``): a scalar chain is ``lanes`` dependent steps."""
        for i in range(n_pad):
            if i < rows:
                limit: T.let[T.int64] = T.Select(causal != 0, T.min(kv_end, pos0 + i // G + 1), kv_end)
                lo: T.let[T.int64] = window_start(pos0 + i // G, window_left)
                if cfg.soft_cap or cfg.alibi:
                    for cb in range(cvec):
                        for ln in T.vectorized(lanes):
                            if cfg.soft_cap:
                                sc[i, cb * lanes + ln] = tanh(
                                    sc[i, cb * lanes + ln] / (cap * T.float32(LOG2E))
                                ) * (cap * T.float32(LOG2E))
                            if cfg.alibi:
                                sc[i, cb * lanes + ln] = sc[i, cb * lanes + ln] + AS[kvh * G + i % G] * T.float32(
                                    LOG2E
                                ) * T.Cast("float32", c0 + cb * lanes + ln - (pos0 + i // G))
                for ln in T.vectorized(lanes):
                    part[ln] = m[i]
                for cb in range(cvec):
                    for ln in T.vectorized(lanes):
                        part[ln] = T.max(part[ln], T.Select(visible(c0 + cb * lanes + ln, lo, limit),
                                                            sc[i, cb * lanes + ln], neg_inf))
                red[0] = lane_reduce(part, T.max)
                alpha[i] = exp2(m[i] - red[0])
                m[i] = red[0]
                for ln in T.vectorized(lanes):
                    part[ln] = T.float32(0)
                for cb in range(cvec):
                    for ln in T.vectorized(lanes):
                        sc[i, cb * lanes + ln] = T.Select(
                            visible(c0 + cb * lanes + ln, lo, limit), exp2(sc[i, cb * lanes + ln] - red[0]),
                            T.float32(0),
                        )
                        part[ln] = part[ln] + sc[i, cb * lanes + ln]
                red[0] = lane_reduce(part, lambda x, y: x + y)
                lsum[i] = lsum[i] * alpha[i] + red[0]
            else:  # padding rows of the last register block
                alpha[i] = T.float32(0)
                for cb in range(cvec):
                    for ln in T.vectorized(lanes):
                        sc[i, cb * lanes + ln] = T.float32(0)

    @T.macro
    def pv_accumulate(acc, preg, sc, vc, alpha, n_pad, c0, kv_end):
        """``acc = acc * alpha + P . V`` over the chunk's visible keys, ``pv_rows`` rows x ``pv_vecs`` vectors
        in registers (``preg``), the rescale folded into the accumulator load."""
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

    KB = AMX_CHUNK // AMX_TILE  # accumulator tiles per AMX step: tiles 0..KB-1; A is tile KB, B tile KB + 1
    A_TILE, B_TILE = KB, KB + 1

    # The AMX path moves bfloat16 values as their bits (uint16 and uint32 buffers and views): TVM legalizes
    # bfloat16 arithmetic and local buffers to float32, which the tile loads would misread.
    @T.macro
    def amx_gather_chunk(ktv, vv, krow, K32, Vu, BT, b, kvh, c0, kv_end):
        """The chunk's K and V from ``c0`` in the layouts of AMX's B operand, as 32-bit pairs of bfloat16:
        ``ktv[p, c]`` = K[token c, 2p : 2p + 2] (K transposed in pairs of head_dim elements) and ``vv[p, d]`` =
        V[tokens 2p and 2p + 1, d] (pairs of keys, the even one low); tokens at or past ``kv_end`` are not read:
        their V is zero and their K column repeats the chunk's first key (finite; the softmax masks its scores).
        The V pairs are built on vectors, the K transpose by gathers along the keys."""
        # Each key's row offset first, then the transpose as one gather loop per head_dim pair.
        for c in range(C):
            key: T.let[T.int64] = T.Select(c0 + c < kv_end, c0 + c, c0)
            krow[c] = ((T.Cast("int64", BT[b, key // S]) * S + key % S) * Hkv + kvh) * (D // 2)
        for dp in range(D // 2):
            for c in range(C):
                ktv[dp, c] = K32[krow[c] + dp]
        for tp in range(C // 2):
            if c0 + 2 * tp + 1 < kv_end:
                p0: T.let[T.int64] = T.Cast("int64", BT[b, (c0 + 2 * tp) // S])
                p1: T.let[T.int64] = T.Cast("int64", BT[b, (c0 + 2 * tp + 1) // S])
                for dv in range(nvec):
                    for dl in T.vectorized(lanes):
                        vv[tp, dv * lanes + dl] = T.bitwise_or(
                            T.Cast("uint32", Vu[p0, (c0 + 2 * tp) % S, kvh, dv * lanes + dl]),
                            T.shift_left(T.Cast("uint32", Vu[p1, (c0 + 2 * tp + 1) % S, kvh, dv * lanes + dl]),
                                         T.uint32(16)),
                        )
            elif c0 + 2 * tp < kv_end:
                p0: T.let[T.int64] = T.Cast("int64", BT[b, (c0 + 2 * tp) // S])
                for dv in range(nvec):
                    for dl in T.vectorized(lanes):
                        vv[tp, dv * lanes + dl] = T.Cast("uint32", Vu[p0, (c0 + 2 * tp) % S, kvh, dv * lanes + dl])
            else:
                for dv in range(nvec):
                    for dl in T.vectorized(lanes):
                        vv[tp, dv * lanes + dl] = T.uint32(0)

    @T.macro
    def amx_tile_product(c, c_stride, a, a_stride, b, b_stride, ib, col0, n_k, accumulate):
        """Rows ``16 ib ...`` and ``KB`` 16-column tiles from column tile ``col0`` of float32 ``c`` (+)= ``a``
        (bfloat16 bits, 32 per row and step) times ``b`` (its B layout, 16 rows of pairs per step), over ``n_k``
        steps, on accumulator tiles 0..KB-1 (loaded from ``c`` when ``accumulate``, else zeroed); strides in
        bytes."""
        for t in T.unroll(KB):
            if accumulate:
                AMX.load(t, T.address_of(c[ib * AMX_TILE, (col0 + t) * AMX_TILE]), c_stride)
            else:
                AMX.zero(t)
        for kk in range(n_k):
            AMX.load(A_TILE, T.address_of(a[ib * AMX_TILE, kk * 32]), a_stride)
            for t in T.unroll(KB):
                AMX.load(B_TILE, T.address_of(b[kk * 16, (col0 + t) * AMX_TILE]), b_stride)
                AMX.dot_bf16(t, A_TILE, B_TILE)
        for t in T.unroll(KB):
            AMX.store(t, T.address_of(c[ib * AMX_TILE, (col0 + t) * AMX_TILE]), c_stride)

    @T.macro
    def amx_scores(sc, qb, ktv, n_pad, qscale):
        """``sc = (qb . K^T) * qscale`` for the ``n_pad`` rows: per 16 rows and 64 keys, four accumulator tiles
        summed over head_dim 32 elements (one A tile of queries, one B tile of keys per product) at a time."""
        for ib in range(n_pad // AMX_TILE):
            for kg in range(C // AMX_CHUNK):
                amx_tile_product(sc, C * 4, qb, D * 2, ktv, C * 4, ib, kg * KB, D // 32, False)
        for i in range(n_pad):
            for cb in range(C // lanes):
                for cl in T.vectorized(lanes):
                    sc[i, cb * lanes + cl] = sc[i, cb * lanes + cl] * qscale

    @T.macro
    def amx_pv(acc, pb, sc, vv, alpha, n_pad):
        """``acc = acc * alpha + P . V``: the weights rounded to bfloat16 (``pb``), the rescale done in place on
        vector registers, then per 16 rows and 64 head_dim columns four accumulator tiles loaded from ``acc``,
        summed over the chunk 32 keys at a time, and stored back."""
        for i in range(n_pad):
            for cb in range(C // lanes):
                for cl in T.vectorized(lanes):
                    pb[i, cb * lanes + cl] = bf16_bits(sc[i, cb * lanes + cl])
            for dv in range(nvec):
                for dl in T.vectorized(lanes):
                    acc[i, dv * lanes + dl] = acc[i, dv * lanes + dl] * alpha[i]
        for ib in range(n_pad // AMX_TILE):
            for dg in range(D // (KB * AMX_TILE)):
                amx_tile_product(acc, D * 4, pb, C * 2, vv, D * 4, ib, dg * KB, C // 32, True)

    @T.macro
    def store_rows(O, LSE, VS, SK, acc, m, lsum, red, q_start, r0, kvh, rows):
        """The block's ``rows`` normalized outputs (times an 8-bit cache's V scale) and natural-log lse; a sink
        logit joins the denominator here (``red``: the row's max with it, then its factor and total)."""
        for i in range(rows):
            if cfg.sinks:
                red[0] = T.max(m[i], SK[kvh * G + i % G] * T.float32(LOG2E))
                red[1] = T.exp2(m[i] - red[0])
                red[2] = lsum[i] * red[1] + T.exp2(SK[kvh * G + i % G] * T.float32(LOG2E) - red[0])
                red[1] = red[1] / red[2]  # acc's factor: rescale to the new max, then normalize
            else:
                red[0] = m[i]
                red[1] = T.float32(1) / lsum[i]
                red[2] = lsum[i]
            if cfg.is_fp8:
                red[1] = red[1] * VS[kvh] * T.float32(widen)
            for dv in range(nvec):
                for dl in T.vectorized(lanes):
                    O[q_start + r0 + i // G, kvh * G + i % G, dv * lanes + dl] = from_f32(
                        acc[i, dv * lanes + dl] * red[1], dt
                    )
            LSE[q_start + r0 + i // G, kvh * G + i % G] = (red[0] + T.log2(red[2])) * T.float32(LN2)

    @T.prim_func
    def prefill(
        Q: a.q, K: a.k_cache, V: a.v_cache, BT: a.block_table, SL: a.seq_lens, CU: a.cu_seqlens_q,
        TL: a.tiles, KS: a.k_scale, VS: a.v_scale, AS: a.alibi_slopes, SK: a.sinks, O: a.out, LSE: a.lse,
        scale: T.float32, causal: T.int32, window_left: T.int32, logits_soft_cap: T.float32,
    ):
        T.func_attr({"global_symbol": cfg.name, "tirx.noalias": True})

        # uint16 views of the bfloat16 q and caches for the AMX path (unused otherwise).
        Qu = T.decl_buffer(Q.shape, "uint16", data=Q.data)
        K32 = T.decl_buffer((K.shape[0] * (S * Hkv * D // 2),), "uint32", data=K.data)
        Vu = T.decl_buffer(V.shape, "uint16", data=V.data)
        if amx:
            AMX.request_permission()
        for task in T.parallel(NT):
            # Each path allocates only its own buffers (one element for the other's).
            qf = T.alloc_buffer((1, 1) if amx else (ROWS, D), "float32")
            acc = T.alloc_buffer((ROWS, D), "float32")
            sc = T.alloc_buffer((ROWS, C), "float32")
            kt = T.alloc_buffer((1,) if amx else (C * D,), "float32")
            kr = T.alloc_buffer((C, D) if block_t and not amx else (1, 1), "float32")
            vc = T.alloc_buffer((1, 1) if amx else (C, D), "float32")
            qb = T.alloc_buffer((ROWS, D) if amx else (1, 1), "uint16")
            pb = T.alloc_buffer((ROWS, C) if amx else (1, 1), "uint16")
            ktv = T.alloc_buffer((D // 2, C) if amx else (1, 1), "uint32")
            vv = T.alloc_buffer((C // 2, D) if amx else (1, 1), "uint32")
            tcfg = T.alloc_buffer((64 if amx else 1,), "uint8")
            krow = T.alloc_buffer((C if amx else 1,), "int64")
            m = T.alloc_buffer((ROWS,), "float32")
            lsum = T.alloc_buffer((ROWS,), "float32")
            alpha = T.alloc_buffer((ROWS,), "float32")
            red = T.alloc_buffer((3,), "float32")
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
            kv_begin: T.let[T.int64] = window_start(pos0, window_left)  # the tile's first visible key
            if amx:
                AMX.configure_full(tcfg, KB + 2)
            for kvh in range(Hkv):
                init_block(qf, qb, acc, m, lsum, Q, Qu, KS, q_start, r0, kvh, rows, n_pad, scale)
                for ch in range((kv_end - kv_begin + C - 1) // C):
                    c0: T.let[T.int64] = kv_begin + ch * C
                    if amx:
                        amx_gather_chunk(ktv, vv, krow, K32, Vu, BT, b, kvh, c0, kv_end)
                    else:
                        gather_chunk(kt, kr, vc, K, V, BT, b, kvh, c0, kv_end)
                    if use_prefetch:
                        prefetch_next_chunk(K, V, BT, b, kvh, c0, kv_end)
                    if amx:
                        amx_scores(sc, qb, ktv, n_pad, q_factor(KS, kvh, scale))
                    else:
                        chunk_scores(sc, sreg, qf, kt, n_pad)
                    softmax_update(sc, m, lsum, alpha, part, red, AS, rows, n_pad, c0, pos0, kv_end, causal, kvh,
                                   window_left, logits_soft_cap)
                    if amx:
                        amx_pv(acc, pb, sc, vv, alpha, n_pad)
                    else:
                        pv_accumulate(acc, preg, sc, vc, alpha, n_pad, c0, kv_end)
                store_rows(O, LSE, VS, SK, acc, m, lsum, red, q_start, r0, kvh, rows)
            if amx:
                AMX.release()

    return finish(PREFILL, cfg, prefill)
