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


def bf16_bits(value):
    """The bfloat16 bits (uint16) of a finite float32 ``value``, rounded to nearest even: integer arithmetic, so
    it vectorizes and stays uint16 (TVM's own bfloat16 casts are legalized to float32 values)."""
    bits = T.reinterpret("uint32", value)
    rounded = bits + T.uint32(0x7FFF) + T.bitwise_and(T.shift_right(bits, T.uint32(16)), T.uint32(1))
    return T.Cast("uint16", T.shift_right(rounded, T.uint32(16)))


# Eigen's float tanh (generic_fast_tanh_float): a 13/6 rational minimax fit on [-7.9, 7.9], within a few ulp,
# straight-line code that vectorizes (TVM lowers T.tanh on LLVM to two libm exps per element).
_TANH_ALPHA = (-2.76076847742355e-16, 2.00018790482477e-13, -8.60467152213735e-11, 5.12229709037114e-08,
               1.48572235717979e-05, 6.37261928875436e-04, 4.89352455891786e-03)
_TANH_BETA = (1.19825839466702e-06, 1.18534705686654e-04, 2.26843463243900e-03, 4.89352518554385e-03)
_TANH_CLAMP = 7.90531110763549805  # tanh is 1.0f beyond this


def tanh(x):
    """tanh of a float32 expression (vectorizable; exact sign, |error| of a few ulp)."""
    x = T.min(T.max(x, T.float32(-_TANH_CLAMP)), T.float32(_TANH_CLAMP))
    x2 = x * x
    p = T.float32(_TANH_ALPHA[0])
    for c in _TANH_ALPHA[1:]:
        p = p * x2 + T.float32(c)
    q = T.float32(_TANH_BETA[0])
    for c in _TANH_BETA[1:]:
        q = q * x2 + T.float32(c)
    return x * p / q


# ------------------------------------------------------------------------------------------ 8-bit caches
# An 8-bit cache is read as bytes and widened by integer operations and one float16 conversion (vcvtph2ps on
# x86, fcvtl on Arm, cvt on CUDA): e5m2 is the top byte of a float16; e4m3's exponent and mantissa fields shifted
# into a float16's give the value times 2**-8 (subnormals included), which the kernels fold into the scales.
FP8_WIDEN_FACTOR = {"float8_e4m3fn": 256.0, "float8_e5m2": 1.0}
_F16_NAN = 0x7E00


def fp8_widen(byte, kv_dtype: str):
    """The float32 value of an 8-bit code ``byte`` (a uint8 expression), divided by
    ``FP8_WIDEN_FACTOR[kv_dtype]``; e4m3's NaN codes (0x7F, 0xFF) widen to NaN, e5m2's inf and NaN stay so."""
    b = T.Cast("uint16", byte)
    if kv_dtype == "float8_e5m2":
        bits = T.shift_left(b, T.uint16(8))
    elif kv_dtype == "float8_e4m3fn":
        mag = T.bitwise_and(b, T.uint16(0x7F))
        bits = T.bitwise_or(T.shift_left(T.bitwise_and(b, T.uint16(0x80)), T.uint16(8)),
                            T.Select(mag == T.uint16(0x7F), T.uint16(_F16_NAN), T.shift_left(mag, T.uint16(7))))
    else:
        raise ValueError(f"fp8_widen: {kv_dtype!r} is not an 8-bit dtype")
    return T.Cast("float32", T.reinterpret("float16", bits))


_FP8_FORMAT = {"float8_e4m3fn": (4, 3, 7), "float8_e5m2": (5, 2, 15)}  # exponent bits, mantissa bits, bias


def fp8_narrow(x, kv_dtype: str, fp8_max: float):
    """The 8-bit code (uint8) nearest a float32 expression ``x`` (ties to even), ``x`` clamped to
    ``[-fp8_max, fp8_max]`` first, so a large value (or an infinity) gives the largest finite code, never inf or
    NaN. Normal results round the float32 bits; subnormal ones (``|x|`` below the smallest normal) are
    ``nearbyint(|x| / smallest subnormal)``."""
    _, man, bias = _FP8_FORMAT[kv_dtype]
    a = T.min(T.fabs(x), T.float32(fp8_max))
    u = T.reinterpret("uint32", a)
    drop = 23 - man
    rounded = u + T.uint32((1 << (drop - 1)) - 1) + T.bitwise_and(T.shift_right(u, T.uint32(drop)), T.uint32(1))
    normal = T.shift_right(rounded, T.uint32(drop)) - T.uint32((127 - bias) << man)
    sub = T.Cast("uint32", T.nearbyint(a * T.float32(2.0 ** (bias - 1 + man))))
    code = T.Select(a >= T.float32(2.0 ** (1 - bias)), normal, sub)
    sign = T.shift_right(T.bitwise_and(T.reinterpret("uint32", x), T.uint32(0x80000000)), T.uint32(24))
    return T.Cast("uint8", T.bitwise_or(code, sign))


def f32_quotient(x, scale, cap: float):
    """``min(|x / scale|, cap)`` rounded to float32 as IEEE division rounds (to nearest, ties to even), with
    ``x``'s sign: a float32 expression, for targets compiled with fast-math (LLVM may turn ``x / scale`` into
    ``x * (1 / scale)``, which rounds a quotient that lands near a halfway point between two 8-bit codes the other
    way).

    The quotient is taken in float64 (with a reciprocal or not, within 2**-52 of the exact quotient, which is never
    closer than about 2**-49 to a float32 halfway point) and rounded to float32 with integer operations on its bits:
    ``fptrunc`` of a float64 division of two widened floats would be narrowed back to a float32 division by LLVM.
    Magnitudes below 2**-100 (far below any 8-bit code) come out as zero."""
    a = T.min(T.fabs(T.Cast("float64", x) / T.Cast("float64", scale)), T.float64(cap))
    u = T.reinterpret("uint64", a)
    rounded = u + T.uint64((1 << 28) - 1) + T.bitwise_and(T.shift_right(u, T.uint64(29)), T.uint64(1))
    bits = T.Cast("uint32", T.shift_right(rounded, T.uint64(29)) - T.uint64((1023 - 127) << 23))
    mag = T.Select(a < T.float64(2.0 ** -100), T.uint32(0), bits)
    sign = T.bitwise_and(T.reinterpret("uint32", T.Cast("float32", x)), T.uint32(0x80000000))
    return T.reinterpret("float32", T.bitwise_or(mag, sign))


def kv_to_f32(value, cfg):
    """Widen a loaded cache element to float32: a cast for float16 / bfloat16 caches, :func:`fp8_widen` for
    8-bit ones (the value divided by ``FP8_WIDEN_FACTOR``)."""
    if cfg.is_fp8:
        return fp8_widen(value, cfg.kv_dtype)
    return to_f32(value, cfg.kv_dtype)


def kv_widen_factor(cfg) -> float:
    """What :func:`kv_to_f32` leaves to be multiplied back (1.0 for caches that are not 8-bit)."""
    return FP8_WIDEN_FACTOR.get(cfg.kv_dtype, 1.0)


def row_sums(rows: list, lanes: int, combine=None):
    """Horizontal sums of ``len(rows)`` float32 vectors of ``lanes`` lanes each, as one vector whose lane ``r`` is
    the sum of ``rows[r]`` (a scalar for one row); ``combine(a, b)`` instead of ``a + b`` gives other reductions
    (``T.max``: the row maxima).

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
    if combine is None:
        combine = lambda a, b: a + b  # noqa: E731
    seg = lanes  # lanes of each row still to be added, within every vector
    while len(rows) > 1:
        half = seg // 2
        lo, hi = [], []
        for src in (0, 1):
            for r in range(lanes // seg):
                base = src * lanes + r * seg
                lo += [base + i for i in range(half)]
                hi += [base + half + i for i in range(half)]
        rows = [combine(T.Shuffle([rows[i], rows[i + 1]], lo), T.Shuffle([rows[i], rows[i + 1]], hi))
                for i in range(0, len(rows), 2)]
        seg = half
    vec = rows[0]  # count rows of seg lanes each
    while seg > 1:
        half = seg // 2
        vec = combine(T.Shuffle([vec], [r * seg + i for r in range(count) for i in range(half)]),
                      T.Shuffle([vec], [r * seg + half + i for r in range(count) for i in range(half)]))
        seg = half
    return vec


def transpose_vectors(rows: list, lanes: int) -> list:
    """The transpose of a ``lanes`` x ``lanes`` block held as ``lanes`` vectors (``rows[r]``: row ``r``): its
    columns, as ``lanes`` vectors. ``lanes`` must be a power of two.

    log2(lanes) rounds of two-input ``T.Shuffle``s: round ``k`` pairs rows ``r`` and ``r | k`` (bit ``k`` of ``r``
    clear) and exchanges bit ``k`` of the row index with bit ``k`` of the lane index, so once every bit is
    exchanged element ``(r, c)`` sits at ``(c, r)``. A loop that transposes by element compiles to a lane extract
    and a scalar store per element instead.
    """
    if lanes & (lanes - 1) or len(rows) != lanes:
        raise ValueError(f"transpose_vectors needs a power-of-two count of rows equal to lanes, got {len(rows)} "
                         f"rows of {lanes}")
    rows = list(rows)
    k = 1
    while k < lanes:
        lo = [c if not c & k else lanes + (c ^ k) for c in range(lanes)]
        hi = [c ^ k if not c & k else lanes + c for c in range(lanes)]
        for r in range(lanes):
            if not r & k:
                pair = [rows[r], rows[r | k]]
                rows[r], rows[r | k] = T.Shuffle(pair, lo), T.Shuffle(pair, hi)
        k <<= 1
    return rows


def row_chunk(rows: int, lanes: int) -> int:
    """Rows summed per :func:`row_sums` call: the largest power of two dividing ``rows``, at most ``lanes``."""
    chunk = 1
    while rows % (chunk * 2) == 0 and chunk * 2 <= max(lanes, 1):
        chunk *= 2
    return chunk


def lanes_at(start, count: int):
    """Index of ``count`` consecutive elements from ``start``: a ramp, or the scalar index for one element."""
    return start if count == 1 else T.ramp(start, 1, count)


def q_multiplier(cfg, scale, cap, KS, kvh):
    """What the CUDA kernels multiply q by: the scale into the log2 domain, or (soft-cap) into the tanh's
    argument; an 8-bit cache's widening factor and K scale folded in."""
    mult = scale / cap if cfg.soft_cap else scale * T.float32(LOG2E)
    return mult * (T.float32(kv_widen_factor(cfg)) * KS[kvh]) if cfg.is_fp8 else mult


def variant_logit(cfg, x, cap, slope, head, rel):
    """A reduced q.k ``x`` (scaled by :func:`q_multiplier`) as the log2-domain logit of key offset ``rel`` =
    key position - query position, for query head ``head``: the soft-cap's tanh and the ALiBi bias (mask
    aside)."""
    if cfg.soft_cap:
        x = (cap * T.float32(LOG2E)) * tanh(x)
    if cfg.alibi:
        x = x + slope[head] * T.Cast("float32", rel)
    return x


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
