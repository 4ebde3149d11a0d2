"""MetaSchedule design spaces written for paged attention: ``ScheduleFn`` bodies over the block-form kernels.

:func:`decode_space` is described here; :func:`prefill_space` applies the same structure per query tile.

MetaSchedule's generic rules treat the block-form decode (:func:`~tvm_paged.kernels.decode_generic.
build_decode_generic`, ``weights=True``) as five unrelated loop nests and reach a small fraction of the
bandwidth (see ``tuning.block_spaces``). This space fixes the structure a paged kernel needs and samples only the
factors, so every candidate is a sensible program and the search spends its trials on the numbers:

1. **K phase** (``score``), parallel over (sequence, KV split): tokens walked as (page, slot) with every KV head
   inside, so each page block is read front to back and each K row once for all query heads of its group. The
   head_dim reduction is ``rfactor``ed into SIMD lanes (a vector FMA per head, the group's heads unrolled as
   independent chains), then summed across lanes per (token, head).
2. **Softmax** (``max``, ``p``, ``sum``), parallel over sequences, on the scores (no K/V traffic); ``p`` is
   vectorized over tokens (the polynomial ``exp2`` vectorizes).
3. **V phase** (``pv``), parallel over (sequence, KV split): pages walked in the same order, the accumulator
   tile ``[group heads, head_dim]`` in vectors; the splits' partial sums (``rfactor`` over the split loop) are
   added and normalized per sequence (``out``).

Sampled decisions (``pv_tile`` by ``sample_perfect_tile``, which MetaSchedule's tile-size mutator moves between
generations; the others by ``sample_categorical``, uniform over their candidates):

- ``kv_splits``: a divisor of the bucket's pages per sequence (up to 16): the parallelism of long contexts with
  few sequences, shared by the K and V phases;
- ``lanes``: head_dim elements per q.k vector (the rfactor width);
- ``pv_tile``: head_dim as (chunks, vectors per head, lanes) in P.V;
- ``unroll``: MetaSchedule's explicit-unroll step on the whole program (0, 16, 64, 512).

Not expressible with schedule primitives, so absent here and present in the shipped kernels: software prefetch,
and loops that stop at each sequence's own length (static loops run to the bucket's ``max_pages`` and mask).

:func:`decode_space_cuda` is the same decode for CUDA targets, thread-bound (see its docstring).
"""

from __future__ import annotations

from ..config import KernelConfig

UNROLL_STEPS = (0, 16, 64, 512)
LANES = (4, 8, 16)  # head_dim elements per q.k vector (16: two AVX2 registers of float32)
MAX_LANES = 16
MAX_SPLITS = 16  # KV splits per sequence: enough to fill 16 cores with one sequence
MAX_Q_TILE = 8  # prefill query rows per task: rows x group heads accumulators must stay near the register file


def _uniform(sch, candidates):
    """A categorical decision, uniform over ``candidates``."""
    return sch.sample_categorical(candidates=list(candidates), probs=[1 / len(candidates)] * len(candidates))


def _sample_unroll(sch, block=None) -> None:
    """The unroll step, applied by MetaSchedule's postprocessor (and moved by its mutator) to the loops of
    ``block`` (default: the whole program)."""
    block = sch.get_sblock("root") if block is None else block
    sch.annotate(block, "meta_schedule.unroll_explicit", _uniform(sch, UNROLL_STEPS))


def _vectorize_innermost(sch, block, lanes: int) -> None:
    """Split ``block``'s innermost loop by ``lanes`` and vectorize the inner part."""
    *_, inner = sch.get_loops(block)
    sch.vectorize(sch.split(inner, [None, lanes])[1])


def _kv_split_loops(sch, score, group_size: int, page_size: int, split_counts):
    """Split the score block's (sequence, query head, key, head_dim) loops into (sequence, KV head, group head,
    split, page within the split, slot, head_dim), sampling the split count; returns those loops and the count.

    Categorical over the divisors of max_pages: a perfect-tile sample favours the largest inner factor, i.e. one
    split, which leaves a batch-1 bucket on one core (or a few blocks) until mutation happens to move it."""
    b, h, j, d = sch.get_loops(score)
    hk, g = sch.split(h, [None, group_size])
    page, slot = sch.split(j, [None, page_size])
    splits = _uniform(sch, split_counts)
    jo, ji = sch.split(page, [splits, None])
    return b, hk, g, jo, ji, slot, d, splits


def decode_space(cfg: KernelConfig, max_pages: int, vector_lanes: int = 8):
    """The ``ScheduleFn`` body for ``cfg``'s weights-form block decode over buckets of ``max_pages`` pages:
    a function that schedules a ``tvm.s_tir.Schedule`` in place, sampling its decisions in the schedule's trace.
    ``vector_lanes``: float32 lanes of the target's SIMD registers (the softmax and output loops' vector width)."""
    G, S = cfg.group_size, cfg.page_size
    split_counts = [n for n in range(1, min(max_pages, MAX_SPLITS) + 1) if max_pages % n == 0]

    def schedule(sch) -> None:
        score, mx, p, den, pv, out = (sch.get_sblock(n) for n in ("score", "max", "p", "sum", "pv", "out"))

        # -- K phase: (sequence, split) parallel; pages, slots, KV heads, then lanes of head_dim.
        b, hk, g, jo, ji, slot, d, splits = _kv_split_loops(sch, score, G, S, split_counts)
        # Categorical, not a perfect tile: a width of 1 would drop a loop from the rfactor write-back and change
        # the trace's shape between candidates. Every supported head_dim is a multiple of 16.
        lanes = _uniform(sch, LANES)
        do, di = sch.split(d, [None, lanes])
        sch.reorder(b, jo, ji, slot, hk, do, g, di)
        score_rf = sch.rfactor(di, factor_axis=3)  # score_rf[b, h, j, lane]: one vector FMA chain per head
        # The write-back (lane sum) keeps the original loop order without ``do``: put the partial sums under it.
        b, jo, ji, slot, hk, g, _ = sch.get_loops(score)
        sch.compute_at(score_rf, hk, preserve_unit_loops=True)
        sch.parallel(sch.fuse(b, jo))
        # Under hk: (lane, sequence: unit, group heads, key: unit, head_dim / lanes); unit loops are kept
        # (preserve_unit_loops) so the loop count, and the trace's shape, never depend on a decision.
        *_, di_rf, _, g_rf, _, do_rf = sch.get_loops(score_rf)
        sch.reorder(do_rf, g_rf, di_rf)
        sch.unroll(g_rf)
        # parallel / vectorize before decompose_reduction: loops over an init-less update block cannot take them
        sch.vectorize(di_rf)
        sch.decompose_reduction(score_rf, do_rf)

        # -- Softmax over the scores, one sequence per task.
        b = sch.get_loops(p)[0]
        sch.compute_at(mx, b, preserve_unit_loops=True)
        sch.reverse_compute_at(den, b, preserve_unit_loops=True)
        sch.parallel(b)
        _vectorize_innermost(sch, p, vector_lanes)  # a head's scores are contiguous

        # -- V phase: the same (sequence, split) walk; the splits' partial sums are added in ``out``'s loop.
        b, h, d, j = sch.get_loops(pv)
        hk, g = sch.split(h, [None, G])
        page, slot = sch.split(j, [None, S])
        jo, ji = sch.split(page, [splits, None])
        tile = sch.sample_perfect_tile(d, n=3, max_innermost_factor=MAX_LANES)
        dc, dv, dl = sch.split(d, tile)
        sch.reorder(b, jo, ji, slot, hk, g, dc, dv, dl)
        pv_rf = sch.rfactor(jo, factor_axis=1)  # acc_rf[b, split, h, d]: head_dim stays contiguous
        b, jo, ji, slot, hk, g, dc, dv, dl = sch.get_loops(pv_rf)
        sch.parallel(sch.fuse(b, jo))
        sch.unroll(dv)
        sch.vectorize(dl)
        sch.decompose_reduction(pv_rf, ji)
        b_out = sch.get_loops(out)[0]
        sch.compute_at(pv, b_out, preserve_unit_loops=True)  # the split sum, per sequence
        sch.parallel(b_out)
        _vectorize_innermost(sch, out, vector_lanes)

        _sample_unroll(sch)

    return schedule


def prefill_space(cfg: KernelConfig, q_len: int, vector_lanes: int = 8):
    """The ``ScheduleFn`` body for ``cfg``'s block-form causal prefill (:func:`~tvm_paged.kernels.prefill_blocks.
    build_prefill_blocks`) with ``q_len`` query rows per sequence.

    Structure: parallel over (sequence, query tile), everything for a tile under that loop. K phase: pages walked
    front to back, every KV head inside, the head_dim reduction ``rfactor``ed into SIMD lanes with the tile's
    (rows x group heads) as independent FMA chains sharing each K vector; softmax per row; V phase in the same
    walk. Sampled: ``q_tile`` (rows per task, a perfect tile of ``q_len``, innermost up to 8), ``lanes``,
    ``pv_tile`` and ``unroll`` as in :func:`decode_space`.
    """
    G, S = cfg.group_size, cfg.page_size

    def schedule(sch) -> None:
        score, mx, p, den, pv, out = (sch.get_sblock(n) for n in ("score", "max", "p", "sum", "pv", "out"))

        # The score's lanes first, on its own nest (as in decode).
        lanes = _uniform(sch, LANES)
        *_, d = sch.get_loops(score)
        do, di = sch.split(d, [None, lanes])
        score_rf = sch.rfactor(di, factor_axis=4)  # score_rf[b, i, h, j, lane]

        # One task per (sequence, query tile); every block of the tile under it.
        r, h, d = sch.get_loops(out)
        b, i = sch.split(r, [None, q_len])
        q_tile = sch.sample_perfect_tile(i, n=2, max_innermost_factor=MAX_Q_TILE)
        io, ii = sch.split(i, q_tile)
        task = sch.fuse(b, io)
        for blk in (pv, den, p, mx, score):
            sch.compute_at(blk, task, preserve_unit_loops=True)
        sch.parallel(task)

        # K phase: (page, slot, KV head) outer, the tile's rows x group heads as FMA chains on each K vector.
        _, lane, _, ii, h, j = sch.get_loops(score)  # (task, lane, sequence: unit, rows, heads, keys)
        hk, g = sch.split(h, [None, G])
        page, slot = sch.split(j, [None, S])
        sch.reorder(page, slot, hk, ii, g, lane)
        sch.compute_at(score_rf, hk, preserve_unit_loops=True)
        # Under hk: (lane, sequence: unit, rows, group heads, key: unit, head_dim / lanes); unit loops are kept
        # (preserve_unit_loops) so the loop count, and the trace's shape, never depend on a decision.
        *_, lane_rf, _, ii_rf, g_rf, _, do_rf = sch.get_loops(score_rf)
        sch.reorder(do_rf, ii_rf, g_rf, lane_rf)
        sch.unroll(ii_rf)
        sch.unroll(g_rf)
        sch.vectorize(lane_rf)
        sch.decompose_reduction(score_rf, do_rf)

        # Softmax per row; the weights vectorized over keys.
        _vectorize_innermost(sch, p, vector_lanes)

        # V phase: the same page walk, head_dim as (chunks, vectors, lanes).
        _, _, ii, h, d, j = sch.get_loops(pv)  # (task, sequence: unit, rows, heads, head_dim, keys)
        hk, g = sch.split(h, [None, G])
        page, slot = sch.split(j, [None, S])
        tile = sch.sample_perfect_tile(d, n=3, max_innermost_factor=MAX_LANES)
        dc, dv, dl = sch.split(d, tile)
        sch.reorder(page, slot, hk, ii, g, dc, dv, dl)
        sch.unroll(dv)
        sch.vectorize(dl)
        sch.decompose_reduction(pv, page)

        _vectorize_innermost(sch, out, vector_lanes)

        _sample_unroll(sch)

    return schedule


WARP = 32
MAX_GPU_SPLITS = 32  # KV splits per sequence on a GPU: batch 1 x 8 KV heads x 32 splits fills 132 SMs twice
MAX_SCORE_TOKENS = 8  # tokens scored at once by a block's warps (threadIdx.y): a divisor of page_size up to 8
SOFTMAX_THREADS = (32, 64, 128, 256)


def decode_space_cuda(cfg: KernelConfig, max_pages: int):
    """The ``ScheduleFn`` body for ``cfg``'s weights-form block decode on a CUDA target, over buckets of
    ``max_pages`` pages. Four kernels, each block's work fixed and the numbers sampled:

    1. **K phase** (``score``): one thread block per (sequence, KV head, KV split). The group's q rows are staged
       in shared memory once per block; each warp scores one token at a time (``score_tokens`` warps, bound to
       ``threadIdx.y``, take a page's slots together, pages in order), its 32 lanes splitting head_dim into runs of
       ``score_vec`` contiguous elements (in-thread products, then a warp-shuffle sum); the group's heads reuse
       each K row from L1.
    2. **Softmax** (``max``, ``p``, ``sum``): one block of ``softmax_threads`` per (sequence, query head),
       block-wide reductions over the scores.
    3. **V phase** (``pv``): one block per (sequence, KV head, KV split); head_dim split over threads by
       ``pv_tile`` (threads, elements per thread), the group's heads x elements as register accumulators across
       the split's tokens (``cache_write`` to local), written once as the split's partial sum (``rfactor`` over
       the split loop).
    4. **Output**: one block per (sequence, query head) adds the splits' partial sums and divides by the sum.

    Sampled decisions, in order: ``kv_splits`` (a divisor of ``max_pages``, up to 32), ``score_tokens`` (a
    perfect tile of page_size, warps innermost, up to 8),
    ``score_vec`` (1, 2 or 4 with ``32 * score_vec <= head_dim``), ``softmax_threads``, ``pv_tile`` (a perfect
    tile of head_dim, innermost up to 8) and ``unroll`` (of the V phase's token loop). As on CPU, no decision
    changes the trace's shape, and
    MetaSchedule's CUDA postprocessors (``VerifyGPUCode`` among them) check every candidate.
    """
    G, S, D = cfg.group_size, cfg.page_size, cfg.head_dim
    split_counts = [n for n in range(1, min(max_pages, MAX_GPU_SPLITS) + 1) if max_pages % n == 0]
    vecs = [v for v in (1, 2, 4) if v == 1 or WARP * v <= D]

    def schedule(sch) -> None:
        score, mx, p, den, pv, out = (sch.get_sblock(n) for n in ("score", "max", "p", "sum", "pv", "out"))

        # -- K phase: block (sequence, KV head, split); warps over tokens, lanes over head_dim.
        b, hk, g, jo, ji, slot, d, splits = _kv_split_loops(sch, score, G, S, split_counts)
        # Warps over the slots of a page, a perfect tile of page_size: TVM 0.27's cross-thread reduction drops a
        # spatial loop's bound predicate from its write-back, so a token tile that did not divide the tokens
        # would write scores past the row's end (into the next head's).
        warps = sch.sample_perfect_tile(slot, n=2, max_innermost_factor=MAX_SCORE_TOKENS)
        so, ti = sch.split(slot, warps)
        vec = _uniform(sch, vecs)
        do, dt, dl = sch.split(d, [None, WARP, vec])
        sch.reorder(b, hk, jo, ji, so, ti, g, do, dt, dl)
        blk = sch.fuse(b, hk, jo)
        sch.bind(blk, "blockIdx.x")
        sch.bind(ti, "threadIdx.y")
        sch.bind(dt, "threadIdx.x")  # a reduction loop on threadIdx.x: lowered to a warp-shuffle sum
        q_shared = sch.cache_read(score, 0, "shared")
        sch.compute_at(q_shared, blk, preserve_unit_loops=True)
        *_, r0, r1 = sch.get_loops(q_shared)
        _, cy, cx = sch.split(sch.fuse(r0, r1), [None, warps[1], WARP])  # a cooperative copy by the block's threads
        sch.bind(cy, "threadIdx.y")
        sch.bind(cx, "threadIdx.x")

        # -- Softmax: block (sequence, query head), block-wide reductions over the scores.
        b, h, _ = sch.get_loops(p)
        bh = sch.fuse(b, h)
        sch.compute_at(mx, bh, preserve_unit_loops=True)
        sch.reverse_compute_at(den, bh, preserve_unit_loops=True)
        sch.bind(bh, "blockIdx.x")
        threads = _uniform(sch, SOFTMAX_THREADS)
        for blk_ in (mx, p, den):
            *_, jj = sch.get_loops(blk_)
            sch.bind(sch.split(jj, [None, threads])[1], "threadIdx.x")

        # -- V phase: block (sequence, KV head, split); threads over head_dim, accumulators in registers.
        b, h, d, j = sch.get_loops(pv)
        hk, g = sch.split(h, [None, G])
        page, slot = sch.split(j, [None, S])
        jo, ji = sch.split(page, [splits, None])
        dt, dl = sch.split(d, sch.sample_perfect_tile(d, n=2, max_innermost_factor=8))
        sch.reorder(b, hk, jo, dt, ji, slot, g, dl)
        pv_rf = sch.rfactor(jo, factor_axis=1)  # acc_rf[b, split, h, d]
        b, hk, jo, dt, ji, slot, g, dl = sch.get_loops(pv_rf)
        sch.bind(sch.fuse(b, hk, jo), "blockIdx.x")
        sch.bind(dt, "threadIdx.x")
        acc = sch.cache_write(pv_rf, 0, "local")
        sch.reverse_compute_at(acc, dt, preserve_unit_loops=True)
        sch.decompose_reduction(pv_rf, ji)

        # -- Output: block (sequence, query head): the splits' sum, normalized.
        b, h, d = sch.get_loops(out)
        sch.compute_at(pv, d, preserve_unit_loops=True)
        sch.bind(sch.fuse(b, h), "blockIdx.x")
        sch.bind(sch.split(d, [None, WARP])[1], "threadIdx.x")

        # Unrolled: the V phase's token loop (its heads x elements accumulators). Not the whole program: an
        # unrolled loop around a warp-shuffle reduction repeats its buffers, which TVM's lowering rejects.
        _sample_unroll(sch, pv_rf)

    return schedule


# In the order each space samples them.
DECISIONS = {"decode": ("kv_splits", "lanes", "pv_tile", "unroll"),
             "prefill": ("lanes", "q_tile", "pv_tile", "unroll"),
             "decode_cuda": ("kv_splits", "score_tokens", "score_vec", "softmax_threads", "pv_tile", "unroll")}


def decisions(trace, kernel: str = "decode") -> dict:
    """The sampled decisions of a schedule ``trace`` of a space (``kernel``: a key of ``DECISIONS``), by name:
    tile factors as lists, categorical choices as the chosen value (``{"kv_splits": 2, "lanes": 8, "pv_tile":
    [4, 4, 8], "unroll": 64}``)."""
    out = {}
    for (inst, value), name in zip(trace.decisions.items(), DECISIONS[kernel]):
        if inst.kind.name == "SampleCategorical":
            out[name] = int(inst.attrs[0][int(value)])
        else:
            out[name] = [int(v) for v in value]
    return out


__all__ = ["decode_space", "decode_space_cuda", "prefill_space", "decisions", "DECISIONS", "LANES", "UNROLL_STEPS",
           "SOFTMAX_THREADS"]
