"""Helpers shared by the kernel builders: planning arithmetic, exp2, float32 casts, row sums, CUDA macros.

Planning: the cache-line size and divisor / power-of-two arithmetic the builders size their tiles with.
TVMScript: a vectorizable exp2, the float32 widening and narrowing of loads and stores, shuffle-tree row sums
(CPU), and the CUDA kernels' per-thread online-softmax update and warp reduction (``T.macro``)."""

from __future__ import annotations

import math

from ..tvm_compat import T

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)
CACHE_LINE_BYTES = 64  # the CPU kernels' software-prefetch granularity


def largest_divisor_at_most(n: int, cap: int) -> int:
    """The largest divisor of ``n`` that is at most ``cap`` (1 when ``cap < 1``)."""
    for d in range(max(1, min(n, cap)), 0, -1):
        if n % d == 0:
            return d
    return 1


def is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


# Cephes exp2f minimax polynomial for 2**f on [-0.5, 0.5]: relative error about 2e-7.
_EXP2_P = (
    1.535336188319500e-4,
    1.339887440266574e-3,
    9.618437357674640e-3,
    5.550332471162809e-2,
    2.402264791363012e-1,
    6.931472028550421e-1,
)


def exp2(x):
    """2**x for a float32 expression, in straight-line code so LLVM can vectorize it (libm's exp2f cannot be).

    Inputs are clamped to [-126, 126]: -inf gives 2**-126 (about 1e-38), which is only ever multiplied by a zero
    running sum or accumulator, so a true minus-infinity start of the online softmax is exact.
    """
    x = T.min(T.max(x, T.float32(-126.0)), T.float32(126.0))
    xi = T.floor(x + T.float32(0.5))
    f = x - xi
    p = T.float32(_EXP2_P[0])
    for c in _EXP2_P[1:]:
        p = p * f + T.float32(c)
    p = p * f + T.float32(1.0)
    # 2**xi assembled from the exponent bits.
    return p * T.reinterpret("float32", T.shift_left(T.Cast("int32", xi) + 127, 23))


def to_f32(value, dtype: str):
    """Widen a loaded element to float32 (no-op for float32)."""
    return value if dtype == "float32" else T.Cast("float32", value)


def from_f32(value, dtype: str):
    """Narrow a float32 value to the storage dtype (no-op for float32)."""
    return value if dtype == "float32" else T.Cast(dtype, value)


def row_sums(rows: list, lanes: int):
    """Horizontal sums of ``len(rows)`` float32 vectors of ``lanes`` lanes each, as one vector whose lane ``r`` is
    the sum of ``rows[r]`` (a scalar for one row).

    A transpose-and-add tree of ``T.Shuffle``s: each level pairs two vectors and adds the low halves of their
    rows to the high halves, so R rows of L lanes cost about 2(R - 1) + 2 log2(L/R) shuffles and half as many
    adds. A vectorized loop cannot express this reduction, and the scalar chain it replaces costs about L
    dependent adds (plus lane extracts) per row. ``len(rows)`` must be a power of two no larger than ``lanes``.
    """
    count = len(rows)
    if count & (count - 1) or not 1 <= count <= max(lanes, 1):
        raise ValueError(f"row_sums needs a power-of-two number of rows up to {lanes}, got {count}")
    if lanes == 1:
        return rows[0]
    seg = lanes  # lanes of each row still to be added, within every vector
    while len(rows) > 1:
        half = seg // 2
        lo, hi = [], []
        for src in (0, 1):
            for r in range(lanes // seg):
                base = src * lanes + r * seg
                lo += [base + i for i in range(half)]
                hi += [base + half + i for i in range(half)]
        rows = [T.Shuffle([rows[i], rows[i + 1]], lo) + T.Shuffle([rows[i], rows[i + 1]], hi)
                for i in range(0, len(rows), 2)]
        seg = half
    vec = rows[0]  # count rows of seg lanes each
    while seg > 1:
        half = seg // 2
        vec = (T.Shuffle([vec], [r * seg + i for r in range(count) for i in range(half)])
               + T.Shuffle([vec], [r * seg + half + i for r in range(count) for i in range(half)]))
        seg = half
    return vec


def row_chunk(rows: int, lanes: int) -> int:
    """Rows summed per :func:`row_sums` call: the largest power of two dividing ``rows``, at most ``lanes``."""
    chunk = 1
    while rows % (chunk * 2) == 0 and chunk * 2 <= max(lanes, 1):
        chunk *= 2
    return chunk


def lanes_at(start, count: int):
    """Index of ``count`` consecutive elements from ``start``: a ramp, or the scalar index for one element."""
    return start if count == 1 else T.ramp(start, 1, count)


_FULL_MASK = 0xFFFFFFFF


@T.macro
def warp_allreduce_sum(red, tx, width, log_width):
    """``red[0]`` summed over the ``width`` lanes (a power of two) of ``tx``'s lane group, left in every lane by an
    XOR butterfly; control flow must be uniform over the group (every lane shuffles)."""
    for k in T.unroll(log_width):
        red[0] = red[0] + T.tvm_warp_shuffle(
            T.uint32(_FULL_MASK), red[0], T.bitwise_xor(tx, T.shift_right(width // 2, k)), width, 32,
        )


@T.macro
def online_softmax_update(m, lsum, acc, sc, tmp, row, cols, vec):
    """One online-softmax step of ``row``, in the log2 domain (CUDA kernels, per thread, registers).

    ``sc[row, 0:cols]``: the new scores (-inf where masked), replaced by their weights 2**(score - max);
    ``m[row]``, ``lsum[row]``: the running max and weight sum, updated; ``acc[row, 0:vec]``: the thread's output
    slice, rescaled to the new max (the caller then adds the weighted V rows). ``tmp``: >= 3 float32 scratch.
    A row that has seen only -inf keeps max -inf and sum 0: its safe max (0) keeps exp2 finite.
    """
    tmp[0] = m[row]
    for j in T.unroll(cols):
        tmp[0] = T.max(tmp[0], sc[row, j])
    tmp[1] = T.if_then_else(tmp[0] == T.float32(float("-inf")), T.float32(0), tmp[0])
    tmp[2] = T.exp2(m[row] - tmp[1])
    m[row] = tmp[0]
    lsum[row] = lsum[row] * tmp[2]
    for j in T.unroll(cols):
        sc[row, j] = T.exp2(sc[row, j] - tmp[1])
        lsum[row] = lsum[row] + sc[row, j]
    for v in T.unroll(vec):
        acc[row, v] = acc[row, v] * tmp[2]
