"""A vectorisable exp for numba loops: polynomial on [−ln2/2, ln2/2], 2^k built in the exponent bits.

numba's ``np.exp`` calls libm one value at a time (no SVML here), which keeps the softmax loops
scalar. ``fexp(x)`` writes e^x = 2^k · e^f with k = round(x/ln2), f = x − k·ln2 (Cody–Waite split
of ln2 in two parts) and e^f from its Taylor polynomial (degree 6 for float32, 12 for float64);
the factor 2^k is the integer (k + bias) shifted into the exponent field and reinterpreted as a
float. Every step is branch-free, so LLVM vectorises loops that call it.

Accuracy (measured inside fastmath loops): relative error ≤ 5e-7 (float32) and ≤ 4e-15 (float64)
on the normal range. Below the normal range the result is 0 (flush to zero, −inf included);
above x = 88 (float32) or 709 (float64) it is +inf (so usa overflow is still detected, slightly
before the true overflow).

The same module holds the other bit-level helpers of the kernels: float ↔ order-preserving integer
bits (vectorised min/max, exact top-k bisection) and :func:`count_ge_block` (a count as compare mask
+ popcount).
"""

from __future__ import annotations

import math

import numpy as np
from llvmlite import ir
from numba import types
from numba.core.extending import intrinsic, overload, register_jitable

LOG2E = 1.4426950408889634
_LN2_POW = tuple(math.log(2.0) ** k / math.factorial(k) for k in range(13))  # Taylor coefficients of 2^f
# 2^f ≈ 1 + Σ_{k=1..5} c_k f^k on |f| ≤ 1/2 with the largest relative error minimised (Lawson's
# iteration on a fine grid, c_0 = 1 so that 2^0 is exact): truncation 9.2e-8, below the 1.2e-7 of the
# degree-6 Taylor polynomial it replaces, with one FMA less per exp (float32 softmax loops)
_EXP2_MINIMAX5 = (1.0, 0.6931470036506653, 0.24022242426872253, 0.05550733581185341, 0.009671506471931934,
                  0.001326469937339425)
# 2^f ≈ 1 + Σ_{k=1..11} c_k f^k on |f| ≤ 1/2 (float64): f times the Chebyshev fit of degree 10 to
# (2^f − 1)/f (mpmath.chebyfit, 50 digits), so 2^0 is exact. Truncation 2.0e-17 relative; 1.6e-16
# evaluated in float64 by Horner's rule, against 2.4e-17 and 3.5e-16 for the degree-12 Taylor
# polynomial, with one FMA and three products less per exp
_EXP2_MINIMAX11 = (1.0, 0.6931471805599453, 0.24022650695910097, 0.0555041086648216, 0.009618129107606888,
                   0.0013333558146416936, 0.0001540353044173605, 1.525273382983612e-05, 1.321544258792169e-06,
                   1.0178062445845774e-07, 7.072585949269223e-09, 4.4549605981865186e-10)


def _bitcast(mapping, doc):
    """A numba intrinsic reinterpreting the bits of a scalar as the type mapping[its type]."""

    def typer(typingctx, value):
        target = mapping.get(value)
        if target is None:
            return None

        def codegen(context, builder, signature, args):
            return builder.bitcast(args[0], context.get_value_type(target))

        return target(value), codegen

    typer.__doc__ = doc
    return intrinsic(typer)


_bits_to_float = _bitcast({types.int32: types.float32, types.int64: types.float64},
                          "Reinterpret int32 → float32 or int64 → float64 (LLVM bitcast, vectorises).")
_float_to_bits = _bitcast({types.float32: types.int32, types.float64: types.int64},
                          "Reinterpret float32 → int32 or float64 → int64.")


def order_bits(x):  # pragma: no cover - numba overload below
    """The bits of float x as a signed integer of its width, in the order of the floats (−0 just
    below +0): non-negative patterns as they are, negative ones with the magnitude bits flipped.
    Branch-free, so integer min/max/count loops over it vectorise. An involution on the bits."""
    raise NotImplementedError


def order_float(b):  # pragma: no cover - numba overload below
    """Inverse of order_bits: int32 → float32, int64 → float64."""
    raise NotImplementedError


_MAGNITUDE = {32: (np.int32(31), np.int32(0x7FFFFFFF)), 64: (np.int64(63), np.int64(0x7FFFFFFFFFFFFFFF))}


def _flip_negative(bits):
    sign, magnitude = _MAGNITUDE[bits]
    if bits == 32:  # numba widens int32 arithmetic to int64: narrow the result
        return lambda b: np.int32(b ^ ((b >> sign) & magnitude))
    return lambda b: b ^ ((b >> sign) & magnitude)


@overload(order_bits)
def _order_bits_overload(x):
    if x in (types.float32, types.float64):
        flip = register_jitable(_flip_negative(x.bitwidth))
        return lambda x: flip(_float_to_bits(x))
    return None


@overload(order_float)
def _order_float_overload(b):
    if b in (types.int32, types.int64):
        flip = register_jitable(_flip_negative(b.bitwidth))
        return lambda b: _bits_to_float(flip(b))
    return None


def float_key(x):  # pragma: no cover - numba overload below
    """int64 key with the order of the float x (order_bits widened; compare floats for ties)."""
    raise NotImplementedError


def key_float(k, like):  # pragma: no cover - numba overload below
    """Inverse of float_key, returning the float type of `like`."""
    raise NotImplementedError


@overload(float_key)
def _float_key_overload(x):
    if x in (types.float32, types.float64):
        return lambda x: np.int64(order_bits(x))
    return None


@overload(key_float)
def _key_float_overload(k, like):
    if like == types.float32:
        return lambda k, like: order_float(np.int32(k))
    if like == types.float64:
        return lambda k, like: order_float(np.int64(k))
    return None


def _splat(builder, value, vector_t):
    """A vector with `value` in every lane."""
    lanes = vector_t.count
    undefined, lane0 = ir.Constant(vector_t, ir.Undefined), ir.Constant(ir.IntType(32), 0)
    return builder.shuffle_vector(builder.insert_element(undefined, value, lane0), undefined,
                                  ir.Constant(ir.VectorType(ir.IntType(32), lanes), [0] * lanes))


def _block_args(array, start, value):
    """The argument types of the block intrinsics: a C-contiguous 1-D float32/float64 array, an
    integer start and a float."""
    return (isinstance(array, types.Array) and array.ndim == 1 and array.layout == "C"
            and array.dtype in (types.float32, types.float64) and isinstance(start, types.Integer)
            and isinstance(value, types.Float))


def _load_block(context, builder, array_t, array, start_t, start, lanes):
    """(vector type, array[start:start + lanes] as one unchecked vector load)."""
    vector_t = ir.VectorType(context.get_value_type(array_t.dtype), lanes)
    data = context.make_array(array_t)(context, builder, array).data
    first = context.cast(builder, start, start_t, types.intp)
    pointer = builder.bitcast(builder.gep(data, [first]), vector_t.as_pointer())
    return vector_t, builder.load(pointer, align=array_t.dtype.bitwidth // 8)


def _count_true(builder, mask, lanes):
    """The true lanes of a vector compare as an int64: the lane mask as an integer, popcounted."""
    return builder.zext(builder.ctpop(builder.bitcast(mask, ir.IntType(lanes))), ir.IntType(64))


BLOCK_BYTES = 64  # one 512-bit vector: the block of count_ge_block


@intrinsic
def count_ge_block(typingctx, s, start, thr):
    """#{l < 512 / bits : s[start + l] ≥ thr} for one 512-bit block (16 float32 or 8 float64) of a
    C-contiguous 1-D array, unchecked (start + block ≤ len(s) is the caller's promise). One vector
    compare whose lane mask is reinterpreted as an integer and popcounted: no horizontal vector sum,
    which is what a plain counting loop waits on."""
    if not _block_args(s, start, thr):
        return None
    lanes = BLOCK_BYTES * 8 // s.dtype.bitwidth

    def codegen(context, builder, signature, args):
        array_t, start_t, thr_t = signature.args
        array, first, threshold = args
        vector_t, block = _load_block(context, builder, array_t, array, start_t, first, lanes)
        splat = _splat(builder, context.cast(builder, threshold, thr_t, array_t.dtype), vector_t)
        return _count_true(builder, builder.fcmp_ordered(">=", block, splat), lanes)

    return types.int64(s, start, thr), codegen


WINDOW_LANES = 8  # keys tested at once by count_near / count_far_left (the 1-D HK lookahead)


def _window_count(left):
    """The intrinsic #{l < WINDOW_LANES : pred(u_l)}, u_l = xs[start + l] − c in xs's dtype, with
    pred u² ≤ r2 (left False) or u < 0 and not u² ≤ r2 (left True); u² is compared in r2's type
    (as numba compares u * u <= r2), unchecked (start + WINDOW_LANES ≤ len(xs) is the caller's)."""

    def typer(typingctx, xs, start, c, r2):
        if not (_block_args(xs, start, c) and r2 in (xs.dtype, types.float64)):
            return None

        def codegen(context, builder, signature, args):
            xs_t, start_t, c_t, r2_t = signature.args
            array, first, centre, bound = args
            vector_t, block = _load_block(context, builder, xs_t, array, start_t, first, WINDOW_LANES)
            u = builder.fsub(block, _splat(builder, context.cast(builder, centre, c_t, xs_t.dtype), vector_t))
            square = builder.fmul(u, u)
            bound_t = vector_t
            if r2_t != xs_t.dtype:
                bound_t = ir.VectorType(context.get_value_type(r2_t), WINDOW_LANES)
                square = builder.fpext(square, bound_t)
            bound = _splat(builder, bound, bound_t)
            if left:
                mask = builder.and_(builder.fcmp_ordered("<", u, ir.Constant(vector_t, 0.0)),
                                    builder.fcmp_unordered(">", square, bound))
            else:
                mask = builder.fcmp_ordered("<=", square, bound)
            return _count_true(builder, mask, WINDOW_LANES)

        return types.int64(xs, start, c, r2), codegen

    return typer


count_near = intrinsic(_window_count(False))
count_near.__doc__ = "#{l < WINDOW_LANES : (xs[start + l] − c)² ≤ r2}: keys in the radius (_window_count)."
count_far_left = intrinsic(_window_count(True))
count_far_left.__doc__ = ("#{l < WINDOW_LANES : xs[start + l] < c, (xs[start + l] − c)² > r2}: keys left "
                          "of the radius (_window_count).")


_ROUND_MAGIC = 6755399441055744.0  # 1.5·2^52: k + this has the integer k in its low mantissa bits


@register_jitable
def _shift_to_exponent64(k):
    """(k as int64) << 52 for an integer-valued double |k| < 2^51, without a float → int64
    conversion (AVX2 has none, so LLVM would go scalar): the low 52 bits of k + 1.5·2^52 hold
    2^51 + k, and shifting them up by 52 keeps exactly the bits of k << 52 (mod 2^64)."""
    return _float_to_bits(k + _ROUND_MAGIC) << 52


@register_jitable
def _exp32(x):
    hi = np.float32(88.0)  # k ≤ 127: one exponent-field factor suffices (exp(88) ≈ 1.65e38)
    lo = np.float32(-87.33654475)  # ln(FLT_MIN): smallest normal result
    xc = min(max(x, lo), hi)
    k = np.rint(xc * np.float32(LOG2E))
    f = xc - k * np.float32(0.693359375)
    f = f - k * np.float32(-2.12194440e-4)
    p = np.float32(1.0 / 720.0)
    p = p * f + np.float32(1.0 / 120.0)
    p = p * f + np.float32(1.0 / 24.0)
    p = p * f + np.float32(1.0 / 6.0)
    p = p * f + np.float32(0.5)
    p = p * f + np.float32(1.0)
    p = p * f + np.float32(1.0)
    # (numba widens int32 arithmetic to int64: narrow explicitly before the bitcast)
    r = p * _bits_to_float(np.int32((np.int32(k) + 127) << 23))
    r = np.float32(0.0) if x < lo else r
    r = np.float32(np.inf) if x > hi else r
    return r


@register_jitable
def _exp64(x):
    hi = 709.0  # k ≤ 1023: one exponent-field factor suffices
    lo = -708.3964185322641  # ln(DBL_MIN)
    xc = min(max(x, lo), hi)
    k = np.rint(xc * LOG2E)
    f = xc - k * 0.693145751953125
    f = f - k * 1.4286068203094172321e-6
    p = 1.0 / 479001600.0
    p = p * f + 1.0 / 39916800.0
    p = p * f + 1.0 / 3628800.0
    p = p * f + 1.0 / 362880.0
    p = p * f + 1.0 / 40320.0
    p = p * f + 1.0 / 5040.0
    p = p * f + 1.0 / 720.0
    p = p * f + 1.0 / 120.0
    p = p * f + 1.0 / 24.0
    p = p * f + 1.0 / 6.0
    p = p * f + 0.5
    p = p * f + 1.0
    p = p * f + 1.0
    r = p * _bits_to_float(_shift_to_exponent64(k) + (np.int64(1023) << 52))
    r = 0.0 if x < lo else r
    r = np.inf if x > hi else r
    return r


@register_jitable
def _exp2_sat32(y):
    yc = min(max(y, np.float32(-125.0)), np.float32(128.0))
    k = np.rint(yc)
    f = yc - k  # exact, |f| ≤ 1/2
    c = _EXP2_MINIMAX5
    # Estrin's scheme: 3 dependent FMAs instead of Horner's 5, so that the loops calling this
    # are not bound by the FMA latency chain
    f2 = f * f
    f4 = f2 * f2
    q0 = np.float32(c[1]) * f + np.float32(1.0)
    q1 = np.float32(c[3]) * f + np.float32(c[2])
    q2 = np.float32(c[5]) * f + np.float32(c[4])
    p = q2 * f4 + (q1 * f2 + q0)
    # p·2^k by adding k to p's exponent field (an integer add instead of a float multiply)
    return _bits_to_float(np.int32(_float_to_bits(p) + (np.int32(k) << 23)))


@register_jitable
def _exp2_sat64(y):
    yc = min(max(y, -1021.0), 1024.0)
    k = np.rint(yc)
    f = yc - k
    c = _LN2_POW
    # Estrin's scheme: 4 dependent FMAs instead of Horner's 12 (see _exp2_sat32)
    f2 = f * f
    f4 = f2 * f2
    f8 = f4 * f4
    q0 = c[1] * f + 1.0
    q1 = c[3] * f + c[2]
    q2 = c[5] * f + c[4]
    q3 = c[7] * f + c[6]
    q4 = c[9] * f + c[8]
    q5 = c[11] * f + c[10]
    r0 = q1 * f2 + q0
    r1 = q3 * f2 + q2
    r2 = q5 * f2 + q4
    s0 = r1 * f4 + r0
    s1 = c[12] * f4 + r2
    p = s1 * f8 + s0
    return _bits_to_float(_float_to_bits(p) + _shift_to_exponent64(k))


def exp2_sat(y):  # pragma: no cover - replaced by the numba overload below inside jitted code
    """2^y, saturating: 2^max(y, −125) (float32) / 2^max(y, −1021) (float64), +inf from y = 128 / 1024.

    Cheaper than fexp (no range reduction by ln 2, no selects, 2^k added into the exponent field of
    the polynomial): for loops that fold log2(e) into their inputs and can afford a tiny normal in
    place of 0 for underflowing terms (≤ 2^-125 of any term ≥ 1). y = k + f, k = rint(y), 2^f from
    a polynomial on |f| ≤ 1/2: degree 5 minimax (float32, truncation ≤ 9.2e-8) or Taylor 12 (float64,
    ≤ 1.7e-16), evaluated by Estrin's scheme (powers f², f⁴, f⁸ and independent pairs: a chain of
    3 or 4 FMAs instead of 5 or 12, which had bound the softmax loops by the FMA latency).
    """
    lo = -125.0 if np.asarray(y).dtype == np.float32 else -1021.0
    return np.exp2(np.maximum(y, lo))


@overload(exp2_sat)
def _exp2_sat_overload(y):
    if y == types.float32:
        return lambda y: _exp2_sat32(y)
    if y == types.float64:
        return lambda y: _exp2_sat64(y)
    return None


def fexp(x):  # pragma: no cover - replaced by the numba overload below inside jitted code
    """e^x for a float32/float64 scalar inside numba code (see module docstring)."""
    return np.exp(x)


@overload(fexp)
def _fexp_overload(x):
    if x == types.float32:
        return lambda x: _exp32(x)
    if x == types.float64:
        return lambda x: _exp64(x)
    return None
