"""Dense softmax and RBF attention at head dimensions d > 4: blocks of BLAS products around a vectorised exp.

Entry point (plain arrays, no Interaction)::

    velocity_headdim(q, k, v, *, score, beta=1.0, inv2s2=0.5, normalise=True, symmetric=False,
                     out=None) -> out

* q, k, v: (n, d) C-contiguous arrays of one dtype (float32 or float64) — the projected queries
  Q x_i, keys K x_j and values V x_j; out: (n, d) of that dtype (allocated when None).
* score "softmax": s_ij = β⟨q_i, k_j⟩;  "rbf": s_ij = −‖q_i − k_j‖²·inv2s2 (inv2s2 = 1/(2σ²)).
* normalise True: a_ij = exp(s_ij)/Σ_l exp(s_il);  False (usa): a_ij = exp(s_ij)/n, and an
  overflow raises OverflowError (never inf/NaN).
* symmetric True promises q == k (Q = K): each exp is then computed once per pair i ≤ j.
* returns out with out_i = Σ_j a_ij v_j.

For the path table of particles.kernels: ``applies(it, n, d)`` (dense softmax/rbf, d ≥ 5),
``auto(it, n, d)`` (also n ≥ MIN_N, the measured crossover), ``work(n, d)`` (for threads_for) and
``run_field(field, x, out)`` (a VelocityField's interaction and matrices; symmetric when Q = K; the
general cases listed in GENERAL_VIA_SDPA go to torch's fused attention, :func:`velocity_sdpa`,
where it measured faster).

Method. Scores are the BLAS product of a block of queries with a block of keys, written as log2
weights y_ij = log2(e)·(s_ij − shift_i) through one scale and additive row/column terms:

* softmax:  y_ij = (β·log2e)⟨q_i, k_j⟩ + r_i + c_j,  r_i + c_j = −log2e·shift;
* rbf:      −‖q − k‖²/(2σ²) = ⟨q, k⟩/σ² − ‖q‖²/(2σ²) − ‖k‖²/(2σ²), so r_i = −log2e‖q_i‖²/(2σ²),
            c_j = −log2e‖k_j‖²/(2σ²) and y ≤ 0 without any shift (the ‖q‖² term would cancel in
            the softmax; keeping it makes the symmetric weights exactly exp(−‖x_i − x_j‖²/(2σ²))).

w = 2^y is :func:`.fastexp.exp2_sat` in one vectorised pass over the block, which also adds the row
and column sums of w; then out_I += W V_J (and, symmetric, out_J += Wᵀ V_I) by BLAS. Symmetric
calls visit the block pairs I ≤ J of the upper triangle only: half the score products and half
the exps of a general call. The shift of a symmetric softmax is one bound of every score,
|β|·max‖q‖²; of a general one the Cauchy–Schwarz bound |β|·‖q_i‖·max‖k‖ of each row (0 for rbf).
A row whose weight sum falls below 2^LOOSE_LOG2 (the bound was too loose: weights that matter might
have underflowed) is redone with its exact row max by :func:`exact_rows` (a first pass of
score products for the maxima, then the weighted sums).

Threads: blocks are dealt to T = numba.get_num_threads() tasks of one numba parallel loop; each
task calls a single-threaded BLAS (MKL's sgemm_/dgemm_ exported by torch's libtorch_cpu when
present, otherwise scipy's cython_blas) through its address, with its own score buffer and (for
symmetric calls) its own partial sums, added in task order at the end. No Python runs per block.

Accuracy (tests/test_headdim.py against particles.reference, d = 5…128): float64 within 1e-10 of
max|v|, float32 within 1e-5 (β ≤ 3, σ ≥ 0.5 on the sphere; measured ≤ 8e-7). The float32 error
grows with the scores: the exp polynomial and BLAS sums are relative, but the ⟨q, k⟩ identity of
the rbf distance cancels for close points, an absolute error ~eps·‖q‖²/σ² in the exponent.
"""

from __future__ import annotations

import ctypes
import os

import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.core.extending import intrinsic

from ..interaction import usa_overflow_message
from .fastexp import LOG2E, exp2_sat
from .rows import FASTMATH

SCORES = ("softmax", "rbf")
MIN_DIM = 5  # d ≤ 4 has its own fused and symmetric kernels (kernels/dense.py)
#: From this n on the path is the automatic choice: the largest crossover n over the Q = K = I cases
#: of the recorded measurement (benchmarks/headdim_1thread.md; softmax fp32 loses at n = 512 and wins
#: from 1024; below the crossover the fixed cost of a call loses to the row kernels).
MIN_N = 1024
BLOCK = {np.dtype(np.float32): 256, np.dtype(np.float64): 256}  # keys per block: W (b × b) stays in L2


# --- BLAS through its address ----------------------------------------------------------------


@intrinsic
def _gemm(typingctx, address, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc):
    """Fortran ?gemm_(ta, tb, m, n, k, α, A, lda, B, ldb, β, C, ldc) at `address` (column-major
    C ← α·op(A)·op(B) + β·C; A, B, C given as arrays whose data pointer starts the matrix)."""
    if not (isinstance(c, types.Array) and c.dtype in (types.float32, types.float64)):
        return None
    dtype = c.dtype

    def codegen(context, builder, signature, args):
        fl = context.get_value_type(dtype)

        def by_reference(index, ty):  # Fortran passes every scalar by reference
            value = context.cast(builder, args[index], signature.args[index], ty)
            value = builder.trunc(value, ir.IntType(8)) if index in (1, 2) else value  # 'N' / 'T'
            return cgutils.alloca_once_value(builder, value)

        def data(index):
            array = context.make_array(signature.args[index])(context, builder, args[index])
            return builder.bitcast(array.data, fl.as_pointer())

        operands = [by_reference(i, types.int32) for i in (1, 2, 3, 4, 5)]
        operands += [by_reference(6, dtype), data(7), by_reference(8, types.int32), data(9),
                     by_reference(10, types.int32), by_reference(11, dtype), data(12),
                     by_reference(13, types.int32)]
        fnty = ir.FunctionType(ir.VoidType(), [op.type for op in operands])
        fn = builder.inttoptr(context.cast(builder, args[0], signature.args[0], types.int64),
                              fnty.as_pointer())
        builder.call(fn, operands)
        return context.get_dummy_value()

    return types.void(address, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc), codegen


@intrinsic
def _call_int(typingctx, address, value):
    """int f(int *) at `address` (MKL's mkl_set_num_threads_local, which torch's libtorch_cpu
    exports with the Fortran convention: the argument by reference)."""

    def codegen(context, builder, signature, args):
        i32 = ir.IntType(32)
        fn = builder.inttoptr(context.cast(builder, args[0], signature.args[0], types.int64),
                              ir.FunctionType(i32, [i32.as_pointer()]).as_pointer())
        value = context.cast(builder, args[1], signature.args[1], types.int32)
        result = builder.call(fn, [cgutils.alloca_once_value(builder, value)])
        return context.cast(builder, result, types.int32, types.int64)

    return types.int64(address, value), codegen


_ADDRESSES: dict = {}


def blas_addresses() -> dict:
    """{"float32": sgemm_, "float64": dgemm_, "threads": mkl_set_num_threads_local or 0, "library"}.

    MKL from torch's libtorch_cpu when it exports the Fortran symbols (x86 wheels), otherwise
    scipy's cython_blas (OpenBLAS), which numba's own np.dot uses too."""
    if _ADDRESSES:
        return _ADDRESSES
    found = None
    try:
        import torch

        lib = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"))
        found = dict(float32=ctypes.cast(lib.sgemm_, ctypes.c_void_p).value,
                     float64=ctypes.cast(lib.dgemm_, ctypes.c_void_p).value,
                     threads=ctypes.cast(lib.mkl_set_num_threads_local, ctypes.c_void_p).value,
                     library="mkl (torch)")
    except (ImportError, OSError, AttributeError):
        from numba.extending import get_cython_function_address

        found = dict(float32=get_cython_function_address("scipy.linalg.cython_blas", "sgemm"),
                     float64=get_cython_function_address("scipy.linalg.cython_blas", "dgemm"),
                     threads=0, library="scipy cython_blas")
    _ADDRESSES.update(found)
    return _ADDRESSES


_N, _T = ord("N"), ord("T")


# --- the exp pass ------------------------------------------------------------------------------


@njit(cache=True, fastmath=FASTMATH)
def exp_block(S, rows, cols, r, c, floor, row_sum, col_sum, with_cols):
    """S[:rows, :cols] ← w = 2^y, y = S + r_i + c_j, in place (0 where y < floor); row_sum[i] += Σ_j w,
    col_sum[j] += Σ_i w (if with_cols). The floor keeps W free of the tiny values that would make
    the BLAS products denormal (100× slower); what it drops is below the rounding of any row kept."""
    cv, csv = c[:cols], col_sum[:cols]
    zero = S.dtype.type(0.0)
    for i in range(rows):
        ri = r[i]
        w_row = S[i, :cols]
        tot = zero
        if with_cols:
            for j in range(cols):
                y = w_row[j] + ri + cv[j]
                w = exp2_sat(y)
                w = w if y >= floor else zero  # (a select: both sides computed)
                w_row[j] = w
                tot += w
                csv[j] += w
        else:
            for j in range(cols):
                y = w_row[j] + ri + cv[j]
                w = exp2_sat(y)
                w = w if y >= floor else zero  # (a select: both sides computed)
                w_row[j] = w
                tot += w
        row_sum[i] += tot


@njit(cache=True)
def _pair(gemm, I, J, block, qs, k, v, r, c, floor, S, acc, sums, symmetric):
    """Block pair (I, J): S = qs_I k_Jᵀ, W = 2^(S + r + c); acc_I += W v_J (and acc_J += Wᵀ v_I)."""
    d = qs.shape[1]
    i0, j0 = I * block, J * block
    bi, bj = min(block, qs.shape[0] - i0), min(block, k.shape[0] - j0)
    one, zero = qs.dtype.type(1.0), qs.dtype.type(0.0)
    ld = S.shape[1]
    # column-major view: Sᵀ (bj × bi) = k_J (bj × d) · qs_Iᵀ
    _gemm(gemm, _T, _N, bj, bi, d, one, k[j0:], d, qs[i0:], d, zero, S, ld)
    both = symmetric and I != J
    exp_block(S, bi, bj, r[i0:i0 + bi], c[j0:j0 + bj], floor, sums[i0:i0 + bi], sums[j0:j0 + bj], both)
    # acc_Iᵀ (d × bi) += v_Jᵀ (d × bj) · Wᵀ (bj × bi)
    _gemm(gemm, _N, _N, d, bi, bj, one, v[j0:], d, S, ld, one, acc[i0:], d)
    if both:  # acc_Jᵀ (d × bj) += v_Iᵀ (d × bi) · W (bi × bj)
        _gemm(gemm, _N, _T, d, bj, bi, one, v[i0:], d, S, ld, one, acc[j0:], d)


@njit(cache=True, fastmath=FASTMATH)
def _max_block(S, rows, cols, c, m):
    """m[i] ← max(m[i], max_j S[i, j] + c_j) over the block."""
    cv = c[:cols]
    for i in range(rows):
        row = S[i, :cols]
        best = m[i]
        for j in range(cols):
            best = max(best, row[j] + cv[j])
        m[i] = best


@njit(parallel=True, cache=True)
def blocks_symmetric(gemm, set_threads, qs, k, v, r, floor, block, partial, partial_sums):
    """Upper-triangle block pairs I ≤ J (k = the unscaled queries), dealt round-robin to
    T = partial.shape[0] tasks; task t accumulates Σ_j w_ij v_j into partial[t] and Σ_j w_ij into
    partial_sums[t] (both zeroed here). Pairs are numbered row by row, so consecutive pairs share
    their row block I."""
    n = qs.shape[0]
    nb = (n + block - 1) // block
    T = partial.shape[0]
    for t in prange(T):
        previous = _call_int(set_threads, 1) if set_threads != 0 else 0
        partial[t] = 0.0
        partial_sums[t] = 0.0
        S = np.empty((block, block), qs.dtype)
        p = 0
        for I in range(nb):
            for J in range(I, nb):
                if p % T == t:
                    _pair(gemm, I, J, block, qs, k, v, r, r, floor, S, partial[t], partial_sums[t], True)
                p += 1
        if set_threads != 0:
            _call_int(set_threads, previous)
    return partial


@njit(parallel=True, cache=True)
def blocks_rows(gemm, set_threads, qs, k, v, r, c, floor, block, tasks, out, sums):
    """General rows (q ≠ k; nq queries, nk keys): row block I = t, t + T, … of task t against every
    key block; out (nq, d) ← Σ_j w_ij v_j and sums (nq,) ← Σ_j w_ij (both zeroed here)."""
    nb, kb = (qs.shape[0] + block - 1) // block, (k.shape[0] + block - 1) // block
    T = min(nb, tasks)
    for t in prange(T):
        previous = _call_int(set_threads, 1) if set_threads != 0 else 0
        S = np.empty((block, block), qs.dtype)
        for I in range(t, nb, T):
            i0, i1 = I * block, min(qs.shape[0], I * block + block)
            out[i0:i1] = 0.0
            sums[i0:i1] = 0.0
            for J in range(kb):
                _pair(gemm, I, J, block, qs, k, v, r, c, floor, S, out, sums, False)
        if set_threads != 0:
            _call_int(set_threads, previous)
    return out


@njit(parallel=True, cache=True)
def blocks_rowmax(gemm, set_threads, qs, k, c, block, tasks, m):
    """m (nq,) ← max_j (qs_i·k_j + c_j): the exact row maxima of the log2 scores."""
    nb, kb = (qs.shape[0] + block - 1) // block, (k.shape[0] + block - 1) // block
    T = min(nb, tasks)
    one, zero = qs.dtype.type(1.0), qs.dtype.type(0.0)
    d = qs.shape[1]
    for t in prange(T):
        previous = _call_int(set_threads, 1) if set_threads != 0 else 0
        S = np.empty((block, block), qs.dtype)
        for I in range(t, nb, T):
            i0 = I * block
            bi = min(block, qs.shape[0] - i0)
            m[i0:i0 + bi] = -np.inf
            for J in range(kb):
                j0 = J * block
                bj = min(block, k.shape[0] - j0)
                _gemm(gemm, _T, _N, bj, bi, d, one, k[j0:], d, qs[i0:], d, zero, S, S.shape[1])
                _max_block(S, bi, bj, c[j0:j0 + bj], m[i0:i0 + bi])
        if set_threads != 0:
            _call_int(set_threads, previous)
    return m


# --- the path-table hooks (particles.kernels.PATH_TABLE) ---------------------------------------


def applies(it, n: int, d: int) -> bool:
    """Dense softmax or rbf (any Q, K, V, normalised or usa) without radius, window, causal or top-k."""
    return it.score in SCORES and not it.restricted and d >= MIN_DIM


def auto(it, n: int, d: int) -> bool:
    return applies(it, n, d) and n >= MIN_N


def work(n: int, d: int) -> int:
    """One call's work in the units of kernels.SERIAL_WORK (a d ≤ 4 scored pair): n²·d/16."""
    return n * n * d // 16


def run_field(field, x, out):
    """out ← v for a kernels.VelocityField (its interaction and dtype-cast Q, K, V) at the state x
    (n, d); symmetric when Q = K."""
    it = field.interaction
    x = np.ascontiguousarray(x, dtype=field.dtype)
    symmetric = (it.Q is None and it.K is None) or np.array_equal(field.Q, field.K)
    q = x if it.Q is None else _project(x, field.Q)
    k = q if symmetric else (x if it.K is None else _project(x, field.K))
    v = x if it.V is None else _project(x, field.V)
    inv2s2 = 1.0 / (2.0 * it.sigma**2)
    if not symmetric and it.normalise and (it.score, field.dtype.name) in GENERAL_VIA_SDPA:
        return velocity_sdpa(q, k, v, score=it.score, beta=it.beta, inv2s2=inv2s2, out=out)
    return velocity_headdim(q, k, v, score=it.score, beta=it.beta, inv2s2=inv2s2,
                            normalise=it.normalise, symmetric=symmetric, out=out)


def _project(x, M):
    """x Mᵀ by torch's BLAS (MKL, its own threads): numpy's OpenBLAS threads keep spinning after a
    product and took the cores from the kernel that follows (at 2 threads, a 0.5 ms projection
    before SDPA made the step 29.8 instead of 17.8 ms)."""
    import torch

    x, M = (a if a.flags.writeable else a.copy() for a in (x, np.ascontiguousarray(M)))  # torch warns
    return (torch.from_numpy(x) @ torch.from_numpy(M).T).numpy()


#: General (Q ≠ K) normalised cases that run_field sends to torch's fused attention: measured faster
#: than the general block kernel there (benchmarks/headdim.md, "general" rows).
GENERAL_VIA_SDPA = {("softmax", "float32")}


def velocity_sdpa(q, k, v, *, score, beta=1.0, inv2s2=0.5, out=None):
    """The same normalised rows by torch.nn.functional.scaled_dot_product_attention on zero-copy
    (1, 1, n, d) views: scale β, or for rbf scale 2·inv2s2 with the key bias −inv2s2·‖k‖² as mask."""
    import torch
    import torch.nn.functional as F

    qt, kt, vt = (torch.from_numpy(a)[None, None] for a in (q, k, v))
    if score == "softmax":
        res = F.scaled_dot_product_attention(qt, kt, vt, scale=beta)
    else:
        mask = (-inv2s2 * (kt * kt).sum(-1))[..., None, :]
        res = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, scale=2.0 * inv2s2)
    out = np.empty(q.shape, q.dtype) if out is None else out
    out[:] = res[0, 0].numpy()
    return out


# --- entry point -------------------------------------------------------------------------------


def _check(name, a, shape, dtype):
    if not isinstance(a, np.ndarray) or a.shape != shape or a.dtype != dtype or not a.flags.c_contiguous:
        raise ValueError(f"{name} must be a C-contiguous {dtype} array of shape {shape}, got "
                         f"{getattr(a, 'dtype', type(a))} {getattr(a, 'shape', '')}")


def velocity_headdim(q, k, v, *, score, beta=1.0, inv2s2=0.5, normalise=True, symmetric=False, out=None):
    """out_i = Σ_j a_ij v_j for dense softmax or rbf weights (module docstring: the equations,
    the shift, the exactness of rows whose bound was loose)."""
    q = np.asarray(q)
    if q.ndim != 2 or q.dtype not in (np.float32, np.float64):
        raise ValueError(f"q must be a float32 or float64 array (n, d), got {q.dtype} {q.shape}")
    if score not in SCORES:
        raise ValueError(f"score must be one of {SCORES}, got {score!r}")
    n, d = q.shape
    dtype, t = q.dtype, q.dtype.type
    _check("q", q, (n, d), dtype)
    _check("k", k, (n, d), dtype)
    _check("v", v, (n, d), dtype)
    out = np.empty((n, d), dtype) if out is None else out
    _check("out", out, (n, d), dtype)
    if symmetric and k is not q and not np.array_equal(k, q):
        raise ValueError("symmetric=True needs k == q")
    blas = blas_addresses()
    block = min(BLOCK[dtype], n)
    scale, r, c = log2_terms(q, k, score, beta, inv2s2, normalise, symmetric)
    qs = q * t(scale)
    floor = weight_floor(n, dtype) if normalise else -np.inf
    if symmetric:
        nb = -(-n // block)
        T = max(1, min(numba.get_num_threads(), nb * (nb + 1) // 2))
        partial, partial_sums = np.empty((T, n, d), dtype), np.empty((T, n), dtype)
        blocks_symmetric(blas[dtype.name], blas["threads"], qs, q, v, r, floor, block, partial, partial_sums)
        acc, sums = partial.sum(0), partial_sums.sum(0)
    else:
        acc, sums = out, np.empty(n, dtype)
        blocks_rows(blas[dtype.name], blas["threads"], qs, k, v, r, c, floor, block, numba.get_num_threads(),
                    acc, sums)
    if normalise:
        with np.errstate(divide="ignore", invalid="ignore"):  # Σ w = 0: a loose row, redone below
            np.multiply(acc, (1.0 / sums)[:, None], out=out)
        loose = np.flatnonzero(~(sums >= 2.0 ** LOOSE_LOG2[dtype]))
        if len(loose):
            out[loose] = exact_rows(np.ascontiguousarray(q[loose]), k, v, score, beta, inv2s2)
        return out
    np.multiply(acc, t(1.0 / n), out=out)
    if not np.all(np.isfinite(out)):
        raise OverflowError(usa_overflow_message(beta, dtype))
    return out


def log2_terms(q, k, score, beta, inv2s2, normalise, symmetric):
    """(scale, r, c) of y_ij = scale·⟨q_i, k_j⟩ + r_i + c_j = log2(e)·(s_ij − shift_i) (module docstring)."""
    dtype = q.dtype
    sq = np.einsum("nd,nd->n", q, q)
    if score == "rbf":
        r = (-LOG2E * inv2s2 * sq).astype(dtype)
        c = r if symmetric else (-LOG2E * inv2s2 * np.einsum("nd,nd->n", k, k)).astype(dtype)
        return 2.0 * inv2s2 * LOG2E, r, c
    if not normalise:
        r = np.zeros(len(q), dtype)
    elif symmetric:
        r = np.full(len(q), -0.5 * LOG2E * abs(beta) * sq.max(), dtype)
    else:
        kmax = np.sqrt(np.einsum("nd,nd->n", k, k).max())
        r = (-LOG2E * abs(beta) * kmax * np.sqrt(sq)).astype(dtype)
    return beta * LOG2E, r, r if symmetric else np.zeros(len(k), dtype)


#: A row whose Σ w is below 2^LOOSE_LOG2 (w = 2^y, y ≤ 0 at the shift) had too loose a bound: its
#: weights may have underflowed, so it is redone with its exact row max.
LOOSE_LOG2 = {np.dtype(np.float32): -60.0, np.dtype(np.float64): -600.0}


def weight_floor(n, dtype) -> float:
    """log2 weights below this are set to 0: n of them add less than one rounding unit of any row sum
    ≥ 2^LOOSE_LOG2 (a row below that is redone anyway)."""
    return LOOSE_LOG2[np.dtype(dtype)] - np.finfo(dtype).nmant - 1 - np.log2(max(n, 1))


def exact_rows(q, k, v, score, beta, inv2s2):
    """Normalised rows of the queries q (m, d) against every key with the exact row max: a first
    pass of score products for max_j y_ij, then the weighted sums with r_i = −max (row sum ≥ 1).
    The redo of rows whose bound was too loose."""
    blas, dtype = blas_addresses(), q.dtype
    block, tasks = min(BLOCK[dtype], max(len(q), len(k))), numba.get_num_threads()
    scale, _, c = log2_terms(q, k, score, beta, inv2s2, True, False)
    qs = q * dtype.type(scale)
    m = blocks_rowmax(blas[dtype.name], blas["threads"], qs, k, c, block, tasks, np.empty(len(q), dtype))
    out, sums = np.empty(q.shape, dtype), np.empty(len(q), dtype)
    blocks_rows(blas[dtype.name], blas["threads"], qs, k, v, -m, c, weight_floor(len(k), dtype), block, tasks,
                out, sums)
    return out / sums[:, None]
