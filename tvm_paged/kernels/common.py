"""TVMScript helpers shared by the kernel builders: a vectorizable exp2 and dtype helpers."""

from __future__ import annotations

import math

from ..tvm_compat import T

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)

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
    return value if dtype == "float32" else T.Cast(dtype, value)
