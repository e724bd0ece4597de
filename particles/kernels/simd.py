"""Explicit 512-bit vectors inside numba code, for the loops that LLVM's loop vectoriser leaves scalar.

A :class:`VecType` value is one LLVM vector, <16 x float> or <8 x double>: a zmm register with
AVX-512, two ymm registers with AVX2; LLVM splits it the same way on any other target. The few
operations below act lane by lane on it: vload/vstore (contiguous 1-D arrays; the caller keeps
start + width inside the array, nothing is checked), vsplat, vadd, vsub, vmul, vfma, vexp2, vmax,
vsqrt, the never-contracted exact_add, exact_sub, exact_mul and exact_div, vzero_above (a masked
lane), and the sums vdot4 and vsqdist4 over up to four components; vtranspose exchanges lanes and
vectors of a square tile.

Why: a loop that writes several arrays needs run-time checks that they do not overlap before LLVM
vectorises it. Past a few such arrays LLVM gives up and the loop stays scalar. That happens when
one exp per pair is added to both rows of the pair. Written with these values, the loop is
vector code by construction. Accumulators stay in registers across the loop, and the memory
traffic is what the code says (trajectory._symmetric_lanes_velocity).
"""

from __future__ import annotations

from llvmlite import ir
from numba import njit, types
from numba.core.extending import intrinsic, register_jitable
from numba.extending import models, register_model

from .fastexp import _EXP2_MINIMAX5, _EXP2_MINIMAX11

VECTOR_BITS = 512
FAST = ("contract", "reassoc", "nsz", "arcp")  # rows.FASTMATH: no nnan/ninf


@register_jitable
def lanes(a) -> int:
    """Lanes of one vector of a's dtype (a: an array or a numpy dtype; 16 float32, 8 float64)."""
    return VECTOR_BITS // (8 * a.itemsize)


class VecType(types.Type):
    """VECTOR_BITS of float32 or float64 lanes as one numba value."""

    def __init__(self, dtype):
        self.dtype = dtype
        self.width = VECTOR_BITS // dtype.bitwidth
        super().__init__(name=f"Vec({dtype} x {self.width})")


def _ir_vector(vec: VecType) -> ir.VectorType:
    return ir.VectorType(ir.FloatType() if vec.dtype == types.float32 else ir.DoubleType(), vec.width)


@register_model(VecType)
class _VecModel(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, _ir_vector(fe_type))


def _float_type(t) -> bool:
    return t in (types.float32, types.float64)


def _flat(array) -> bool:
    return (isinstance(array, types.Array) and array.ndim == 1 and array.layout == "C"
            and _float_type(array.dtype))


def _llvm(builder, name, vt, nargs):
    """The LLVM intrinsic `name` for vectors of type vt (llvm.fma.v8f64, …)."""
    bits = 32 if isinstance(vt.element, ir.FloatType) else 64
    full = f"{name}.v{vt.count}f{bits}"
    existing = builder.module.globals.get(full)
    return existing or ir.Function(builder.module, ir.FunctionType(vt, [vt] * nargs), full)


def _pointer(context, builder, array_t, array, index_t, index, vt):
    data = context.make_array(array_t)(context, builder, array).data
    element = builder.gep(data, [context.cast(builder, index, index_t, types.intp)])
    return builder.bitcast(element, vt.as_pointer())


@intrinsic
def vload(typingctx, array, start):
    """array[start:start + width] as one vector."""
    if not (_flat(array) and isinstance(start, types.Integer)):
        return None
    vec = VecType(array.dtype)

    def codegen(context, builder, sig, args):
        pointer = _pointer(context, builder, sig.args[0], args[0], sig.args[1], args[1], _ir_vector(vec))
        return builder.load(pointer, align=array.dtype.bitwidth // 8)

    return vec(array, start), codegen


@intrinsic
def vstore(typingctx, array, start, value):
    """array[start:start + width] ← value."""
    if not (_flat(array) and isinstance(start, types.Integer) and isinstance(value, VecType)
            and value.dtype == array.dtype):
        return None

    def codegen(context, builder, sig, args):
        pointer = _pointer(context, builder, sig.args[0], args[0], sig.args[1], args[1], _ir_vector(value))
        builder.store(args[2], pointer, align=array.dtype.bitwidth // 8)
        return context.get_dummy_value()

    return types.void(array, start, value), codegen


@intrinsic
def vsplat(typingctx, x):
    """(x, x, …, x) for a float32 or float64 scalar."""
    if not _float_type(x):
        return None
    vec = VecType(x)

    def codegen(context, builder, sig, args):
        vt = _ir_vector(vec)
        one = builder.insert_element(ir.Constant(vt, ir.Undefined), args[0], ir.Constant(ir.IntType(32), 0))
        zeros = ir.Constant(ir.VectorType(ir.IntType(32), vec.width), [0] * vec.width)
        return builder.shuffle_vector(one, one, zeros)

    return vec(x), codegen


def _binary(name, doc, flags=FAST):
    def typer(typingctx, a, b):
        if not (isinstance(a, VecType) and a == b):
            return None

        def codegen(context, builder, sig, args):
            return getattr(builder, name)(args[0], args[1], flags=flags)

        return a(a, b), codegen

    typer.__doc__ = doc
    return intrinsic(typer)


vadd = _binary("fadd", "a + b, lane by lane.")
vsub = _binary("fsub", "a − b, lane by lane.")
vmul = _binary("fmul", "a·b, lane by lane.")
# Each rounded once and never fused with its neighbours into an FMA: the numbers of scalar numba
# code compiled without fastmath, lane by lane (tiles.euler_pass repeats trajectory._euler_plain)
exact_add = _binary("fadd", "a + b, lane by lane, never contracted.", flags=())
exact_sub = _binary("fsub", "a − b, lane by lane, never contracted.", flags=())
exact_mul = _binary("fmul", "a·b, lane by lane, never contracted.", flags=())
exact_div = _binary("fdiv", "a / b, lane by lane, correctly rounded.", flags=())


@intrinsic
def vsqrt(typingctx, a):
    """√a, lane by lane, correctly rounded (as np.sqrt)."""
    if not isinstance(a, VecType):
        return None

    def codegen(context, builder, sig, args):
        return builder.call(_llvm(builder, "llvm.sqrt", _ir_vector(a), 1), args)

    return a(a), codegen


@intrinsic
def vmax(typingctx, a, b):
    """max(a, b), lane by lane (the other one where either is NaN, as llvm.maxnum)."""
    if not (isinstance(a, VecType) and a == b):
        return None

    def codegen(context, builder, sig, args):
        return builder.call(_llvm(builder, "llvm.maxnum", _ir_vector(a), 2), args)

    return a(a, b), codegen


@intrinsic
def vfma(typingctx, a, b, c):
    """a·b + c, lane by lane (one rounding)."""
    if not (isinstance(a, VecType) and a == b == c):
        return None

    def codegen(context, builder, sig, args):
        return builder.call(_llvm(builder, "llvm.fma", _ir_vector(a), 3), args)

    return a(a, b, c), codegen


@intrinsic
def vexp2(typingctx, y):
    """fastexp.exp2_sat lane by lane: 2^y saturating at 2^−125 / 2^−1021 below and +inf from 128 / 1024;
    y = k + f, k = rint(y), 2^f by a polynomial in Horner's form, the fewest FMAs (the symmetric tiles
    are bound by them; float32: exp2_sat's degree-5 minimax, float64: a degree-11 near-minimax one,
    fastexp._EXP2_MINIMAX11, as accurate as exp2_sat's Taylor 12), 2^k added into the exponent field."""
    if not isinstance(y, VecType):
        return None

    def codegen(context, builder, sig, args):
        vt, width, f32 = _ir_vector(y), y.width, y.dtype == types.float32

        def const(value):
            return ir.Constant(vt, [value] * width)

        def fma(a, b, c):
            return builder.call(_llvm(builder, "llvm.fma", vt, 3), [a, b, c])

        lo, hi = (-125.0, 128.0) if f32 else (-1021.0, 1024.0)
        clamped = builder.call(_llvm(builder, "llvm.maxnum", vt, 2), [args[0], const(lo)])
        clamped = builder.call(_llvm(builder, "llvm.minnum", vt, 2), [clamped, const(hi)])
        k = builder.call(_llvm(builder, "llvm.rint", vt, 1), [clamped])
        f = builder.fsub(clamped, k)
        ints = ir.VectorType(ir.IntType(32 if f32 else 64), width)
        c = _EXP2_MINIMAX5 if f32 else _EXP2_MINIMAX11
        p = const(c[-1])
        for coefficient in reversed(c[:-1]):  # Horner: the fewest FMAs (the tiles are bound by them)
            p = fma(p, f, const(coefficient))
        if f32:
            k_bits = builder.shl(builder.fptosi(k, ints), ir.Constant(ints, [23] * width))
        else:  # k << 52 from the low bits of k + 1.5·2^52 (as fastexp._shift_to_exponent64)
            k_bits = builder.shl(builder.bitcast(builder.fadd(k, const(1.5 * 2.0**52)), ints),
                                 ir.Constant(ints, [52] * width))
        return builder.bitcast(builder.add(builder.bitcast(p, ints), k_bits), vt)

    return y(y), codegen


@intrinsic
def vzero_above(typingctx, a, b, x):
    """x, with 0 in the lanes where a > b (an ordered compare: a NaN in a or b keeps x, as the
    scalar `0 if a > b else x` does)."""
    if not (isinstance(a, VecType) and a == b == x):
        return None

    def codegen(context, builder, sig, args):
        above = builder.fcmp_ordered(">", args[0], args[1])
        return builder.select(above, ir.Constant(_ir_vector(x), [0.0] * x.width), args[2])

    return x(a, b, x), codegen


@intrinsic
def vtranspose(typingctx, rows):
    """The transpose of a square tile held as a tuple of `width` vectors: out[s][r] = rows[r][s].
    log2(width) rounds of shuffles; round b swaps the off-diagonal b × b blocks of every 2b × 2b
    block (lanes l with bit b clear of vector k + b go to lanes l + b of vector k, and back)."""
    if not (isinstance(rows, types.UniTuple) and isinstance(rows.dtype, VecType)
            and rows.count == rows.dtype.width):
        return None
    width = rows.count

    def codegen(context, builder, sig, args):
        r = [builder.extract_value(args[0], k) for k in range(width)]
        masks = ir.VectorType(ir.IntType(32), width)
        b = 1
        while b < width:
            low = ir.Constant(masks, [lane if not lane & b else lane - b + width for lane in range(width)])
            high = ir.Constant(masks, [lane + b if not lane & b else lane + width for lane in range(width)])
            for k in range(width):
                if not k & b:
                    r[k], r[k + b] = (builder.shuffle_vector(r[k], r[k + b], low),
                                      builder.shuffle_vector(r[k], r[k + b], high))
            b *= 2
        return context.make_tuple(builder, sig.return_type, r)

    return rows(rows), codegen


@njit(cache=True, inline="always")
def vdot4(D, a0, a1, a2, a3, b0, b1, b2, b3, c):
    """c + Σ_{k<D} a_k·b_k, lane by lane (D ≤ 4, a compile-time constant: the branches fold)."""
    y = vfma(a0, b0, c)
    y = vfma(a1, b1, y) if D > 1 else y
    y = vfma(a2, b2, y) if D > 2 else y
    return vfma(a3, b3, y) if D > 3 else y


@njit(cache=True, inline="always")
def vsqdist4(D, a0, a1, a2, a3, b0, b1, b2, b3):
    """Σ_{k<D} (a_k − b_k)², lane by lane (D ≤ 4)."""
    u = vsub(a0, b0)
    s = vmul(u, u)
    u = vsub(a1, b1)
    s = vfma(u, u, s) if D > 1 else s
    u = vsub(a2, b2)
    s = vfma(u, u, s) if D > 2 else s
    u = vsub(a3, b3)
    return vfma(u, u, s) if D > 3 else s
