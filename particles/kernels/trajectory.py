"""Whole trajectories in compiled code: stepping loop, integrator stages, noise and saving in numba.

:func:`run` integrates S systems (an ensemble, or one system) from x0 (S, n, d) to every saved
step of `keep` and returns their states, with no Python per step:

* tiles of samples (one sample, or `lanes` of them for the LANES plans), each tile's whole
  trajectory on one thread with the serial kernels, the tiles shared out to
  numba.get_num_threads() threads (integrate_one releases the GIL) — ensembles, small systems;
* one sample after the other with every field evaluation parallel over rows (the kernels of
  VelocityField) — a single large system.

Both call :func:`integrate_one` (the one compiled entry point, from Python once per tile and
block of saved steps): the state is held component-major (d, n); per stage, v = Σ_j a_ij
V x_j by the path's kernel, then one fused pass per particle does the tangent projection, the
stage combination and the retraction (the arithmetic of particles/integrate.py, in the same
order): Euler x ← R(x + dt f), RK4 with retracted stage points, Euler–Maruyama with the
counter-based normals of :mod:`.noise` (the same numbers as the Python stepper).

The kernel path is a *plan*, a named tuple whose type tells the compiler which velocity
implementation to use (:func:`velocity` is a numba overload chosen at compile time from the plan
type; :func:`workspace` allocates its scratch once per sample). Results do not depend on the
number of threads: a sample is integrated by one thread (samples), or rows are split into fixed
tasks (steps; the symmetric kernel's per-task partial sums differ in the last bit only).
"""

from __future__ import annotations

import threading
from typing import NamedTuple

import numba
import numpy as np
from numba import njit, prange
from numba.extending import overload

from . import hk1d, tiles
from .dense import (
    SYMMETRIC_BLOCK,
    fused_task,
    range_task,
    rows_range,
    symmetric_serial,
    velocity_fused,
    velocity_symmetric,
)
from .fastexp import LOG2E, exp2_sat
from .noise import normal, step_key
from .rows import FASTMATH, RBF, SOFTMAX, buffer_len, candidate_range
from .simd import lanes, vadd, vdot4, vexp2, vfma, vload, vmul, vsplat, vsqdist4, vstore, vzero_above
from .sync import ABORT, arrive, atomic_add, new_sync, run_group

SPHERE, EUCLIDEAN = 0, 1  # geometry codes (particles.geometry: Geometry.code)
EULER, RK4 = 0, 1
OK, USA_OVERFLOW, NONFINITE = 0, 1, 2  # status codes (also flag bits of the lockstep barriers)
SOLO = 4  # lockstep barrier flag: from this round on thread 0 alone (see _meet)
SLOW_WAITS = 3  # slow barrier waits (sync.arrive) after which a lockstep thread asks for SOLO
SERIAL, PARALLEL = (0,), (0, 0)  # compile-time modes of the velocity (see velocity)


FUSED, SYMMETRIC, RANGE, HK1D, LANES, SYMMETRIC_LANES, SYMMETRIC_TILES = 1, 2, 3, 4, 5, 6, 7  # plan kinds
# Bytes after each (component, particle) row of lanes in the symmetric-lanes sums: without them
# every row is 2^k bytes long, so the six rows a pair updates (Σw, Σw·v for rows i and j) sit at
# the same address modulo 4 KiB and the core holds each load back behind an unrelated store
# (4K aliasing): fp64 ensemble 1.3x faster with them on an AMD EPYC (AVX2).
LANE_ROW_PAD = 64


class Plan(NamedTuple):
    """A kernel path for the compiled trajectories. Its numba type selects the velocity
    implementation at compile time: kind = (0,)·code with code FUSED (dense.fused_task rows: no
    top-k, d ≤ 4), SYMMETRIC (Q = K without restriction: one exp per pair), RANGE (range_task
    rows: top-k, or any d with dims = ()), HK1D (the sorted 1-D sweep, v = vscale·mean) or LANES
    (what FUSED computes, for `lanes` samples at once: the innermost, vectorised loop runs over the
    samples of an ensemble instead of over keys — :func:`_lanes_velocity`) or SYMMETRIC_LANES (the
    same for symmetric scores, one exp per pair — :func:`_symmetric_lanes_velocity`) or
    SYMMETRIC_TILES (one system with symmetric scores in square tiles of explicit vectors, each exp
    once — :mod:`.tiles`; on lockstep threads too). dims,
    score_s, radius_s are the rows.static tuples (canonical (0,) where the kind ignores them, so
    that they add no compiled specialisations).

    (numba's parallel loops cannot capture a tuple holding tuples, so the drivers take the fields
    one by one and rebuild the Plan inside the loop body.)"""

    kind: tuple
    dims: tuple
    score_s: tuple
    radius_s: tuple
    vscale: float
    lanes: int  # samples per tile (LANES), else 1


def make_plan(kind: int, dims=(), score_s=(0,), radius_s=(0,), vscale=1.0, lanes=1) -> Plan:
    return Plan((0,) * kind, tuple(dims), tuple(score_s), tuple(radius_s), float(vscale), int(lanes))


class Stepping(NamedTuple):
    """The integrator's numbers, in the storage dtype as numpy would round them."""

    geometry: int
    integrator: int
    dt: float
    half: float  # dt/2
    sixth: float  # dt/6
    noise_scale: float  # √dt·noise
    noisy: bool
    identity: bool  # Q = K = V = I: no projections


# -- per-plan workspace and velocity (compile-time dispatch on the plan type) ----------------------
def workspace(plan, mode, spec, xT, lanes, threads):  # pragma: no cover - numba overload below
    """Scratch arrays of the plan's velocity for systems shaped like xT (d, n), with `threads` numba threads
    (the row-parallel symmetric kernel's partial sums: the thread count is an argument, as numba code that
    asks for it cannot be cached on disk)."""
    raise NotImplementedError


def velocity(plan, mode, spec, ws, lanes, xT, qT, kT, vT, out):  # pragma: no cover - numba overload below
    """out (n, d) ← v_i = Σ_j a_ij V x_j for the component-major projections (d, n)."""
    raise NotImplementedError


def _plan_kind(plan):
    """The kind code of a Plan's numba type (the length of its first field)."""
    if getattr(plan, "instance_class", None) is not Plan:
        return None
    return plan.types[0].count


@njit(cache=True)
def _norms(qT, kT, qnorm):
    """qnorm[i] ← ‖q_i‖; returns max_j ‖k_j‖²."""
    d, n = qT.shape
    kmax2 = qT.dtype.type(0.0)
    for i in range(n):
        a = qT.dtype.type(0.0)
        b = qT.dtype.type(0.0)
        for c in range(d):
            a += qT[c, i] * qT[c, i]
            b += kT[c, i] * kT[c, i]
        qnorm[i] = np.sqrt(a)
        kmax2 = max(kmax2, b)
    return kmax2


@overload(workspace)
def _workspace(plan, mode, spec, xT, lanes, threads):
    kind = _plan_kind(plan)
    if kind == FUSED:
        def impl(plan, mode, spec, xT, lanes, threads):
            n = xT.shape[1]
            m = buffer_len(n, spec.window, spec.causal)
            return (np.empty(m, xT.dtype), np.empty(m if spec.use_radius else 1, xT.dtype), np.arange(n),
                    np.empty(n, xT.dtype))
        return impl
    if kind == SYMMETRIC:
        def impl(plan, mode, spec, xT, lanes, threads):
            d, n = xT.shape
            tasks = 1
            if len(mode) == 2:  # the parallel kernel's per-task partial sums
                blocks = (n + SYMMETRIC_BLOCK - 1) // SYMMETRIC_BLOCK
                tasks = max(1, min((blocks + 1) // 2, 2 * threads))
            return (np.empty((d + 1, n), xT.dtype), np.empty((d + 1, SYMMETRIC_BLOCK), xT.dtype),
                    np.empty((tasks, d + 1, n), xT.dtype), np.empty(n, np.int64), np.empty((n, d), xT.dtype),
                    np.empty(n, xT.dtype), np.empty(1, xT.dtype), np.empty(n, xT.dtype))
        return impl
    if kind == RANGE:
        def impl(plan, mode, spec, xT, lanes, threads):
            m = buffer_len(xT.shape[1], spec.window, spec.causal)
            dist = np.empty(m if spec.use_radius else 1, xT.dtype)
            return np.empty(m, xT.dtype), np.empty(m, np.int64), dist
        return impl
    if kind == LANES:
        def impl(plan, mode, spec, xT, lanes, threads):
            d = xT.shape[0]
            return (np.empty(lanes, xT.dtype), np.empty(lanes, xT.dtype), np.empty(lanes, xT.dtype),
                    np.empty((d, lanes), xT.dtype))
        return impl
    if kind == SYMMETRIC_LANES:
        def impl(plan, mode, spec, xT, lanes, threads):
            d, N = xT.shape
            row = lanes + LANE_ROW_PAD // xT.itemsize
            return np.empty((d + 1, N // lanes, row), xT.dtype), np.empty(lanes, xT.dtype)
        return impl
    if kind == SYMMETRIC_TILES:
        return lambda plan, mode, spec, xT, lanes, threads: tiles.workspace(len(plan.dims), xT)
    if kind == HK1D:
        def impl(plan, mode, spec, xT, lanes, threads):
            n = xT.shape[1]
            xs = np.empty(n + hk1d.LOOKAHEAD, xT.dtype)
            xs[n:] = np.inf
            return xs, np.empty(n + 1), np.empty(n + 1), np.empty(n, xT.dtype), np.empty(n, np.int64)
        return impl
    return None


@njit(cache=True)
def _hk1d_velocity(plan, parallel, spec, ws, xT, out):
    """The sorted sweep on opinions xT[0]: directly if they are sorted (simulate holds them so),
    else through their sorting permutation."""
    xs, p_hi, p_lo, tmp, perm = ws
    n = xT.shape[1]
    x = xT[0]
    ordered = hk1d.copy_sorted(x, xs)
    if not ordered:
        perm[:] = np.argsort(x, kind="mergesort")
        hk1d.gather_sorted(x, perm, xs)
    means = out.reshape(n) if ordered else tmp  # sorted: the sweep writes v's one column itself
    if parallel:
        hk1d.prefix_sums_parallel(xs, n, p_hi, p_lo)
        hk1d.sweep(xs, n, p_hi, p_lo, spec.r2, means)
    else:
        hk1d.prefix_sums(xs, n, p_hi, p_lo)
        hk1d.sweep_serial(xs, n, p_hi, p_lo, spec.r2, means)
    if not ordered:
        for p in range(n):
            out[perm[p], 0] = tmp[p] * plan.vscale
    elif plan.vscale != 1.0:
        for p in range(n):
            means[p] = means[p] * plan.vscale


def _fused_serial(plan, mode, spec, ws, lanes, xT, qT, kT, vT, out):
    s, dist, which, qnorm = ws
    kmax = np.sqrt(_norms(qT, kT, qnorm))
    fused_task(plan.dims, plan.score_s, plan.radius_s, spec, 0, xT.shape[1], which, xT, qT, kT, vT, qnorm,
               kmax, s, dist, out)


def _fused_parallel(plan, mode, spec, ws, lanes, xT, qT, kT, vT, out):
    s, dist, which, qnorm = ws
    kmax = np.sqrt(_norms(qT, kT, qnorm))
    velocity_fused(plan.dims, plan.score_s, plan.radius_s, spec, which, xT, qT, kT, vT, qnorm, kmax, out)


@njit(cache=True)
def _symmetric_shift(spec, qT, qnorm):
    """(max_i ‖q_i‖², the shared shift |β|·max‖q‖² of a symmetric softmax, 0 otherwise); qnorm ← ‖q_i‖."""
    max_sq = _norms(qT, qT, qnorm)
    return max_sq, abs(spec.beta) * max_sq if spec.score == SOFTMAX else qT.dtype.type(0.0)


@njit(cache=True)
def _finish_symmetric(plan, spec, ws, max_sq, xT, qT, vT, out):
    """tiles.finish_rows of every row from the one slot of sums in the SYMMETRIC workspace ws."""
    sums, col, partial, which, redo, s, dist, qnorm = ws
    one_slot = sums.reshape((1,) + sums.shape)
    tiles.finish_rows(plan, spec, one_slot, which, redo, s, dist, qnorm, np.sqrt(max_sq), 0, xT.shape[1],
                      xT, qT, vT, out)


def _symmetric_serial(plan, mode, spec, ws, lanes, xT, qT, kT, vT, out):
    sums, col, partial, which, redo, s, dist, qnorm = ws
    max_sq, shift = _symmetric_shift(spec, qT, qnorm)
    symmetric_serial(plan.dims, plan.score_s, spec, qT, vT, shift, sums, col)
    _finish_symmetric(plan, spec, ws, max_sq, xT, qT, vT, out)


def _symmetric_parallel(plan, mode, spec, ws, lanes, xT, qT, kT, vT, out):
    sums, col, partial, which, redo, s, dist, qnorm = ws
    max_sq, shift = _symmetric_shift(spec, qT, qnorm)
    velocity_symmetric(plan.dims, plan.score_s, spec, qT, vT, shift, partial, sums)
    _finish_symmetric(plan, spec, ws, max_sq, xT, qT, vT, out)


def _range_serial(plan, mode, spec, ws, lanes, xT, qT, kT, vT, out):
    s, idx, dist = ws
    range_task(plan.dims, spec, 0, xT.shape[1], xT, qT, kT, vT, False, s, idx, dist, out)


def _range_parallel(plan, mode, spec, ws, lanes, xT, qT, kT, vT, out):
    rows_range(plan.dims, spec, xT, qT, kT, vT, False, out)


def _hk1d_serial(plan, mode, spec, ws, lanes, xT, qT, kT, vT, out):
    _hk1d_velocity(plan, False, spec, ws, xT, out)


def _hk1d_parallel(plan, mode, spec, ws, lanes, xT, qT, kT, vT, out):
    _hk1d_velocity(plan, True, spec, ws, xT, out)


@njit(cache=True, inline="always")
def _lane_score(score, D, q3, k3, i, j, lane, beta, inv2s2):
    """s_ij of sample `lane` (scalar; the exact-max redo of _lanes_velocity)."""
    acc = q3.dtype.type(0.0)
    if score == SOFTMAX:
        for c in range(D):
            acc += q3[c, i, lane] * k3[c, j, lane]
        return beta * acc
    if score == RBF:
        for c in range(D):
            u = q3[c, i, lane] - k3[c, j, lane]
            acc += u * u
        return -inv2s2 * acc
    return acc


@njit(cache=True, inline="always")
def _lane_sqdist(D, x3, i, j, lane):
    acc = x3.dtype.type(0.0)
    for c in range(D):
        u = x3[c, i, lane] - x3[c, j, lane]
        acc += u * u
    return acc


@njit(cache=True, fastmath=FASTMATH)
def _lanes_velocity(plan, spec, ws, L, xT, qT, kT, vT, out):
    """v for L samples at once (the rows of fused_task: dense, causal or windowed, radius-masked;
    d = len(dims) ≤ 4). Column p of the (d, n·L) arrays is particle p // L of sample p % L; for each
    query i the keys j run in explicit vectors of the samples (:mod:`.simd`; the row sums stay in
    registers), with w = 2^(log2(e)·(s_ij − shift_i)),
    shift_i = |β|·‖q_i‖·max_j‖k_j‖ per sample as in fused_task (0 for rbf, flat and usa); a sample
    whose Σ w falls below tiny is redone with its exact max."""
    D, score, use_radius = len(plan.dims), len(plan.score_s) - 1, len(plan.radius_s) - 1
    d, N = xT.shape
    n = N // L
    shape = (d, n, L)
    x3, q3, k3, v3 = xT.reshape(shape), qT.reshape(shape), kT.reshape(shape), vT.reshape(shape)
    kmax, ysh, tot, acc = ws
    t = xT.dtype.type
    log2e = t(LOG2E)
    beta, inv2s2, r2, normalise = spec.beta, spec.inv2s2, spec.r2, spec.normalise
    b, g = beta * log2e, -inv2s2 * log2e
    bounded = score == SOFTMAX and normalise
    row = np.empty(D + 1, xT.dtype)
    zero, vb, vg, vr2 = vsplat(t(0.0)), vsplat(t(b)), vsplat(t(g)), vsplat(t(r2))
    if bounded:
        _lane_max_sq(D, k3, kmax)
        for lane in range(L):
            kmax[lane] = np.sqrt(kmax[lane])
    for i in range(n):
        lo, hi = candidate_range(i, n, spec.window, spec.causal)
        for lane in range(L):
            q2 = t(0.0)
            for c in range(D):
                q2 += q3[c, i, lane] * q3[c, i, lane]
            ysh[lane] = -abs(beta) * np.sqrt(q2) * kmax[lane] * log2e if bounded else t(0.0)
        for lb in range(0, L, lanes(xT)):  # vectors of samples (simd): sums in registers
            q0, q1, q2_, q3_ = _vload4(q3, 0, i, lb, D)
            b0, b1, b2, b3 = vmul(vb, q0), vmul(vb, q1), vmul(vb, q2_), vmul(vb, q3_)
            y0, y1, y2, y3 = _vload4(x3, 0, i, lb, D)
            sh = vload(ysh, lb)
            s, a0, a1, a2, a3 = zero, zero, zero, zero, zero
            for j in range(lo, hi):
                k0, k1, k2, k3_ = _vload4(k3, 0, j, lb, D)
                y = sh
                if score == SOFTMAX:
                    y = vdot4(D, b0, b1, b2, b3, k0, k1, k2, k3_, sh)
                elif score == RBF:
                    y = vfma(vg, vsqdist4(D, q0, q1, q2_, q3_, k0, k1, k2, k3_), sh)
                w = vexp2(y)
                if use_radius:
                    x0, x1, x2, x3_ = _vload4(x3, 0, j, lb, D)
                    w = vzero_above(vsqdist4(D, y0, y1, y2, y3, x0, x1, x2, x3_), vr2, w)
                s = vadd(s, w)
                a0 = vfma(w, vload(v3[0, j], lb), a0)
                if D > 1:
                    a1 = vfma(w, vload(v3[1, j], lb), a1)
                if D > 2:
                    a2 = vfma(w, vload(v3[2, j], lb), a2)
                if D > 3:
                    a3 = vfma(w, vload(v3[3, j], lb), a3)
            vstore(tot, lb, s)
            vstore(acc[0], lb, a0)
            if D > 1:
                vstore(acc[1], lb, a1)
            if D > 2:
                vstore(acc[2], lb, a2)
            if D > 3:
                vstore(acc[3], lb, a3)
        for lane in range(L):
            if normalise and tot[lane] < spec.tiny:  # loose bound: this sample's row with its exact max
                _redo_lane(score, D, use_radius, spec, x3, q3, k3, v3, i, lo, hi, lane, row)
                tot[lane] = row[0]
                for c in range(D):
                    acc[c, lane] = row[1 + c]
            f = t(1.0) / tot[lane] if normalise else t(1.0 / n)
            for c in range(D):
                out[i * L + lane, c] = acc[c, lane] * f


@njit(cache=True)
def _lane_max_sq(D, a3, out):
    """out[lane] ← max_j ‖a_j‖² of each sample (a3: (d, n, L))."""
    out[:] = 0.0
    for j in range(a3.shape[1]):
        for lane in range(a3.shape[2]):
            s2 = a3.dtype.type(0.0)
            for c in range(D):
                s2 += a3[c, j, lane] * a3[c, j, lane]
            out[lane] = max(out[lane], s2)


@njit(cache=True)
def _redo_lane(score, D, use_radius, spec, x3, q3, k3, v3, i, lo, hi, lane, acc):
    """acc[0] ← Σ w, acc[1 + c] ← Σ w·v_c over keys lo..hi−1 of query i in sample `lane`, with
    w = exp(s_ij − max_j s_ij) (the exact row max: no underflow of the weights that matter)."""
    t = x3.dtype.type
    log2e = t(LOG2E)
    mx = t(-np.inf)
    for j in range(lo, hi):
        if not use_radius or _lane_sqdist(D, x3, i, j, lane) <= spec.r2:
            mx = max(mx, _lane_score(score, D, q3, k3, i, j, lane, spec.beta, spec.inv2s2))
    for c in range(D + 1):
        acc[c] = 0.0
    for j in range(lo, hi):
        if not use_radius or _lane_sqdist(D, x3, i, j, lane) <= spec.r2:
            w = exp2_sat((_lane_score(score, D, q3, k3, i, j, lane, spec.beta, spec.inv2s2) - mx) * log2e)
            acc[0] += w
            for c in range(D):
                acc[1 + c] += w * v3[c, j, lane]


@njit(cache=True, fastmath=FASTMATH)
def _symmetric_lanes_velocity(plan, spec, ws, L, xT, qT, vT, out):
    """v for L samples at once with symmetric scores (Q = K, no restriction; d = len(dims) ≤ 4):
    each w_ij = 2^(log2(e)·(s_ij − shift)) computed once for i > j and added to both rows;
    shift = |β|·max_i‖q_i‖² per sample (0 for rbf and usa), as in dense.velocity_symmetric. Rows
    whose Σ w falls below tiny are redone with their exact max. The pairs run in explicit vectors
    of the samples (:mod:`.simd`; L a multiple of their width): row i's sums in registers, row j's
    read and written once per pair (the loop vectoriser had kept this loop scalar)."""
    D, score = len(plan.dims), len(plan.score_s) - 1
    d, N = xT.shape
    n = N // L
    x3, q3, v3 = xT.reshape((d, n, L)), qT.reshape((d, n, L)), vT.reshape((d, n, L))
    acc, ysh = ws
    t = xT.dtype.type
    log2e = t(LOG2E)
    b, g = spec.beta * log2e, -spec.inv2s2 * log2e
    _lane_max_sq(D, q3, ysh)
    for lane in range(L):
        ysh[lane] = -abs(spec.beta) * ysh[lane] * log2e if score == SOFTMAX and spec.normalise else t(0.0)
    for i in range(n):
        for lane in range(L):  # the diagonal
            y = ysh[lane]
            if score == SOFTMAX:
                for c in range(D):
                    y += b * q3[c, i, lane] * q3[c, i, lane]
            w = exp2_sat(y)
            acc[0, i, lane] = w
            for c in range(D):
                acc[1 + c, i, lane] = w * v3[c, i, lane]
    vb, vg = vsplat(b), vsplat(g)
    for lb in range(0, L, lanes(xT)):
        sh = vload(ysh, lb)
        for i in range(n):
            qi0, qi1, qi2, qi3 = _vload4(q3, 0, i, lb, D)
            vi0, vi1, vi2, vi3 = _vload4(v3, 0, i, lb, D)
            bq0, bq1, bq2, bq3 = vmul(vb, qi0), vmul(vb, qi1), vmul(vb, qi2), vmul(vb, qi3)
            ti = vload(acc[0, i], lb)
            ai0, ai1, ai2, ai3 = _vload4(acc, 1, i, lb, D)
            for j in range(i):
                qj0, qj1, qj2, qj3 = _vload4(q3, 0, j, lb, D)
                if score == SOFTMAX:
                    y = vdot4(D, bq0, bq1, bq2, bq3, qj0, qj1, qj2, qj3, sh)
                else:
                    y = vfma(vg, vsqdist4(D, qi0, qi1, qi2, qi3, qj0, qj1, qj2, qj3), sh)
                w = vexp2(y)
                ti = vadd(ti, w)
                vstore(acc[0, j], lb, vadd(vload(acc[0, j], lb), w))
                ai0 = vfma(w, vload(v3[0, j], lb), ai0)
                vstore(acc[1, j], lb, vfma(w, vi0, vload(acc[1, j], lb)))
                if D > 1:
                    ai1 = vfma(w, vload(v3[1, j], lb), ai1)
                    vstore(acc[2, j], lb, vfma(w, vi1, vload(acc[2, j], lb)))
                if D > 2:
                    ai2 = vfma(w, vload(v3[2, j], lb), ai2)
                    vstore(acc[3, j], lb, vfma(w, vi2, vload(acc[3, j], lb)))
                if D > 3:
                    ai3 = vfma(w, vload(v3[3, j], lb), ai3)
                    vstore(acc[4, j], lb, vfma(w, vi3, vload(acc[4, j], lb)))
            vstore(acc[0, i], lb, ti)
            vstore(acc[1, i], lb, ai0)
            if D > 1:
                vstore(acc[2, i], lb, ai1)
            if D > 2:
                vstore(acc[3, i], lb, ai2)
            if D > 3:
                vstore(acc[4, i], lb, ai3)
    row = np.empty(D + 1, xT.dtype)
    for i in range(n):
        for lane in range(L):
            f = t(1.0 / n)
            if spec.normalise:
                if acc[0, i, lane] < spec.tiny:
                    _redo_lane(score, D, False, spec, x3, q3, q3, v3, i, 0, n, lane, row)
                    for c in range(D + 1):
                        acc[c, i, lane] = row[c]
                f = t(1.0) / acc[0, i, lane]
            for c in range(D):
                out[i * L + lane, c] = acc[1 + c, i, lane] * f


@njit(cache=True, inline="always")
def _vload4(a3, first, i, lb, D):
    """The vectors a3[first + c, i, lb:lb + width] of the components c < D ≤ 4 (the last one
    repeated for c ≥ D, as a placeholder that the caller never uses)."""
    return (vload(a3[first, i], lb), vload(a3[first + min(1, D - 1), i], lb),
            vload(a3[first + min(2, D - 1), i], lb), vload(a3[first + min(3, D - 1), i], lb))


def _symmetric_lanes(plan, mode, spec, ws, lanes, xT, qT, kT, vT, out):
    _symmetric_lanes_velocity(plan, spec, ws, lanes, xT, qT, vT, out)


def _lanes(plan, mode, spec, ws, lanes, xT, qT, kT, vT, out):
    _lanes_velocity(plan, spec, ws, lanes, xT, qT, kT, vT, out)


def _symmetric_tiles(plan, mode, spec, ws, lanes, xT, qT, kT, vT, out):
    tiles.velocity(plan, spec, ws, xT, qT, vT, out)


_VELOCITY = {LANES: (_lanes, _lanes), SYMMETRIC_LANES: (_symmetric_lanes, _symmetric_lanes),
             FUSED: (_fused_serial, _fused_parallel), SYMMETRIC: (_symmetric_serial, _symmetric_parallel),
             RANGE: (_range_serial, _range_parallel), HK1D: (_hk1d_serial, _hk1d_parallel),
             SYMMETRIC_TILES: (_symmetric_tiles, _symmetric_tiles)}


@overload(velocity)
def _velocity(plan, mode, spec, ws, lanes, xT, qT, kT, vT, out):
    impls = _VELOCITY.get(_plan_kind(plan))
    return None if impls is None else impls[len(mode) == 2]


def velocity_rows(plan, spec, ws, shared, xT, qT, kT, vT, out, first, last, sync, me, parties, round_):
    """out[i] ← v_i for the rows first..last−1 only, on thread `me` of `parties` in lockstep (FUSED,
    RANGE and SYMMETRIC_TILES plans; ws: this thread's workspace, shared: thread 0's); returns the
    next barrier round (SYMMETRIC_TILES meets the others once: its shares of the tiles, then the
    rows of every share's sums)."""
    raise NotImplementedError  # pragma: no cover - numba overload


def _fused_rows(plan, spec, ws, shared, xT, qT, kT, vT, out, first, last, sync, me, parties, round_):
    s, dist, which, qnorm = ws  # which = 0..n−1: row r of the task is row r
    kmax = np.sqrt(_norms(qT, kT, qnorm))
    fused_task(plan.dims, plan.score_s, plan.radius_s, spec, first, last, which, xT, qT, kT, vT, qnorm, kmax,
               s, dist, out)
    return round_


def _range_rows(plan, spec, ws, shared, xT, qT, kT, vT, out, first, last, sync, me, parties, round_):
    s, idx, dist = ws
    range_task(plan.dims, spec, first, last, xT, qT, kT, vT, False, s, idx, dist, out)
    return round_


def _tiles_rows(plan, spec, ws, shared, xT, qT, kT, vT, out, first, last, sync, me, parties, round_):
    n = xT.shape[1]
    slots = shared[3]  # every thread's shares sum into thread 0's slots
    y_shift, max_sq = tiles.pad(plan, spec, qT, vT, ws)
    for share in range(me, tiles.SLOTS, parties):
        tiles.share_sums(plan, spec, ws, slots, n, y_shift, share)
    if parties > 1:
        arrive(sync, me, parties, round_, 0)  # every share is summed
    tiles.finish(plan, spec, ws, slots, max_sq, first, last, xT, qT, vT, out)
    return round_ + 1


@overload(velocity_rows)
def _velocity_rows(plan, spec, ws, shared, xT, qT, kT, vT, out, first, last, sync, me, parties, round_):
    return {FUSED: _fused_rows, RANGE: _range_rows, SYMMETRIC_TILES: _tiles_rows}.get(_plan_kind(plan))


# -- one sample's trajectory -------------------------------------------------------------------------
@njit(cache=True)
def _project(M, src, dst, first, last):
    """dst ← M src for columns first..last−1 of component-major (d, n) arrays."""
    d = src.shape[0]
    for a in range(d):
        for i in range(first, last):
            acc = src.dtype.type(0.0)
            for b in range(d):
                acc += M[a, b] * src[b, i]
            dst[a, i] = acc


@njit(cache=True)
def _field(plan, mode, spec, st, ws, lanes, Q, K, V, src, qb, kb, vb, v):
    """v ← velocity at the state src; False when a usa weight overflowed (v not finite)."""
    if st.identity:
        velocity(plan, mode, spec, ws, lanes, src, src, src, src, v)
    else:
        n = src.shape[1]
        _project(Q, src, qb, 0, n)
        _project(K, src, kb, 0, n)
        _project(V, src, vb, 0, n)
        velocity(plan, mode, spec, ws, lanes, src, qb, kb, vb, v)
    if spec.normalise:
        return True
    chk = v.dtype.type(0.0)
    for i in range(v.shape[0]):
        for c in range(v.shape[1]):
            chk += v[i, c] * 0.0  # 0·inf and 0·NaN are NaN
    return chk == 0.0


@njit(cache=True, inline="always")
def _dim(dims, x):
    """d as a compile-time constant when the plan carries it (dims = (0,)·d for d ≤ 4)."""
    return len(dims) if len(dims) > 0 else x.shape[0]


@njit(cache=True, inline="always")
def _tangent_dot(st, x, v, i, d):
    """⟨x_i, v_i⟩ on the sphere (0 in euclidean space, where f = v − x)."""
    dot = x.dtype.type(0.0)
    if st.geometry == SPHERE:
        for c in range(d):
            dot += x[c, i] * v[i, c]
    return dot


@njit(cache=True, inline="always")
def _f(st, x, v, dot, i, c):
    """f_ic = (P_x v)_ic (sphere) or v_ic − x_ic (euclidean)."""
    if st.geometry == SPHERE:
        return v[i, c] - dot * x[c, i]
    return v[i, c] - x[c, i]


@njit(cache=True, inline="always")
def _retract(st, y, i, d):
    """y_i ← y_i/‖y_i‖ on the sphere (the identity in euclidean space)."""
    if st.geometry == SPHERE:
        nrm2 = y.dtype.type(0.0)
        for c in range(d):
            nrm2 += y[c, i] * y[c, i]
        nrm = np.sqrt(nrm2)
        for c in range(d):
            y[c, i] = y[c, i] / nrm


@njit(cache=True, error_model="numpy")
def _euler_plain(dims, st, x, v, vt, first, last):
    """The noiseless step of _euler_update for d = len(dims) ≤ 4, by the same operations in the same
    order (the same numbers): v copied component-major into vt (d > 1), then one loop over the
    columns on unit-stride 1-D views, which LLVM vectorises (numba's default division-by-zero
    check kept it scalar: 4.6× slower on a 64-sample tile)."""
    D, N = len(dims), x.shape[1]
    e1, e2, e3 = min(1, D - 1), min(2, D - 1), min(3, D - 1)
    x0, x1, x2, x3 = x[0], x[e1], x[e2], x[e3]
    if D == 1:  # v (N, 1) is one unit-stride column already (1-D HK: 16 MB less to move per step)
        v0 = v1 = v2 = v3 = v.reshape(N)
    else:
        for p in range(first, last):
            for c in range(D):
                vt[c, p] = v[p, c]
        v0, v1, v2, v3 = vt[0], vt[e1], vt[e2], vt[e3]
    dt = st.dt
    if st.geometry != SPHERE:
        for p in range(first, last):
            x0[p] = x0[p] + dt * (v0[p] - x0[p])
            if D > 1:
                x1[p] = x1[p] + dt * (v1[p] - x1[p])
            if D > 2:
                x2[p] = x2[p] + dt * (v2[p] - x2[p])
            if D > 3:
                x3[p] = x3[p] + dt * (v3[p] - x3[p])
        return
    zero = x.dtype.type(0.0)
    for p in range(first, last):
        a0, a1, a2, a3 = x0[p], x1[p], x2[p], x3[p]
        dot = zero + a0 * v0[p]
        if D > 1:
            dot += a1 * v1[p]
        if D > 2:
            dot += a2 * v2[p]
        if D > 3:
            dot += a3 * v3[p]
        y0 = a0 + dt * (v0[p] - dot * a0)
        y1 = a1 + dt * (v1[p] - dot * a1)
        y2 = a2 + dt * (v2[p] - dot * a2)
        y3 = a3 + dt * (v3[p] - dot * a3)
        nrm2 = zero + y0 * y0
        if D > 1:
            nrm2 += y1 * y1
        if D > 2:
            nrm2 += y2 * y2
        if D > 3:
            nrm2 += y3 * y3
        nrm = np.sqrt(nrm2)
        x0[p] = y0 / nrm
        if D > 1:
            x1[p] = y1 / nrm
        if D > 2:
            x2[p] = y2 / nrm
        if D > 3:
            x3[p] = y3 / nrm


@njit(cache=True)
def _euler_update(dims, st, x, v, keys, lanes, step, order, xi, vt, first, last):
    """x ← R(x + dt f(x) [+ √dt·noise·T_x ξ]) for columns first..last−1, f from the velocity v at x.
    Column p of x is particle p // lanes of sample p % lanes (its noise: keys[p % lanes], element
    particle·d + c). Without noise and for d ≤ 4: :func:`_euler_plain` (vt: its (d, N) scratch)."""
    if not st.noisy and len(dims) > 0:
        _euler_plain(dims, st, x, v, vt, first, last)
        return
    d = _dim(dims, x)
    t = x.dtype.type
    h = step_key(keys[0], step)
    for p in range(first, last):
        dot = _tangent_dot(st, x, v, p, d)
        if st.noisy:
            particle = p // lanes if order.shape[0] == 0 else order[p]
            if lanes > 1:
                h = step_key(keys[p % lanes], step)
            xdot = t(0.0)
            for c in range(d):
                xi[c] = t(normal(h, particle * d + c))
                xdot += x[c, p] * xi[c]
            for c in range(d):
                noise_c = xi[c] - xdot * x[c, p] if st.geometry == SPHERE else xi[c]
                x[c, p] = (x[c, p] + st.dt * _f(st, x, v, dot, p, c)) + st.noise_scale * noise_c
        else:
            for c in range(d):
                x[c, p] = x[c, p] + st.dt * _f(st, x, v, dot, p, c)
        _retract(st, x, p, d)


@njit(cache=True)
def _rk4_stage(dims, st, stage, x, src, v, acc, y, first, last):
    """Stage `stage` (0..3) of RK4 for columns first..last−1, f evaluated at src with velocity v:
    acc += w·f and the next stage point y ← R(x + c·f) (stages 0-2), or x ← R(x + dt/6·acc) (stage 3)."""
    d = _dim(dims, x)
    weight = x.dtype.type(1.0 if stage == 0 or stage == 3 else 2.0)
    step = st.half if stage < 2 else st.dt
    for p in range(first, last):
        dot = _tangent_dot(st, src, v, p, d)
        for c in range(d):
            f = _f(st, src, v, dot, p, c)
            if stage == 0:
                acc[c, p] = f
            else:
                acc[c, p] = acc[c, p] + weight * f
            if stage < 3:
                y[c, p] = x[c, p] + step * f
            else:
                x[c, p] = x[c, p] + st.sixth * acc[c, p]
        _retract(st, y if stage < 3 else x, p, d)


@njit(cache=True, fastmath=FASTMATH)
def _finite(x, first, last):
    """True if every entry of x's columns first..last−1 is finite (0·inf and 0·NaN are NaN; FASTMATH
    has no nnan/ninf, so the sum still sees them, and reassociation lets it vectorise: 6× faster)."""
    chk = x.dtype.type(0.0)
    for c in range(x.shape[0]):
        for p in range(first, last):
            chk += x[c, p] * 0.0
    return chk == 0.0


@njit(parallel=True, cache=True)
def _gather_parallel(src, order, x):
    """x[c, p] ← src[0, order[p], c] over the cores (a random gather of 10⁶ opinions: 2× faster
    than one core on 2 cores)."""
    for p in prange(order.shape[0]):
        for c in range(x.shape[0]):
            x[c, p] = src[0, order[p], c]


@njit(parallel=True, cache=True)
def _scatter_parallel(x, order, out):
    """out[0, order[p], c] ← x[c, p] over the cores (the inverse of _gather_parallel)."""
    for p in prange(order.shape[0]):
        for c in range(x.shape[0]):
            out[0, order[p], c] = x[c, p]


@njit(cache=True)
def _load(src, order, lanes, x, parallel=False):
    """x (d, n·L) ← the tile src (L, n, d): column row·L + lane holds particle row of sample lane, or,
    with an order (one sample), column p holds particle order[p] (parallel: over the cores)."""
    L, n, d = src.shape
    if order.shape[0] > 0:
        if parallel:
            _gather_parallel(src, order, x)
            return
        for p in range(n):
            for c in range(d):
                x[c, p] = src[0, order[p], c]
        return
    for row in range(n):
        for lane in range(L):
            for c in range(d):
                x[c, row * L + lane] = src[lane, row, c]


@njit(cache=True)
def _save(x, order, out, parallel=False):
    """out (L, n, d) ← the component-major state x in particle order (the inverse of _load)."""
    L, n, d = out.shape
    if order.shape[0] > 0:
        if parallel:
            _scatter_parallel(x, order, out)
            return
        for p in range(n):
            for c in range(d):
                out[0, order[p], c] = x[c, p]
        return
    if L == 1:
        for p in range(n):
            for c in range(d):
                out[0, p, c] = x[c, p]
        return
    for row in range(n):  # unit-stride reads of each row's lanes: 2.4× faster than lane-major
        for c in range(d):
            src = x[c, row * L:(row + 1) * L]
            for lane in range(L):
                out[lane, row, c] = src[lane]


@njit(cache=True, nogil=True)
def state_buffers(plan, mode, spec, st, x0, threads):
    """The arrays integrate_one works in for tiles shaped like x0 (L, n, d): the state x (d, n·L), RK4
    stage point y and sum acc, the projections qb, kb, vb, the velocity v (n·L, d), the noise xi, the
    component-major velocity vt and the plan's workspace. Each is either written before it is read in
    every call (as np.empty promises nothing) or set here once and only read afterwards (the +inf
    padding of the sorted 1-D HK opinions, the FUSED row list), so one set serves any number of
    tiles and calls of that shape."""
    L, n, d = x0.shape
    N = n * L
    x = np.empty((d, N), x0.dtype)
    y, acc = np.empty_like(x), np.empty_like(x)
    m = 0 if st.identity else N
    qb, kb, vb = np.empty((d, m), x0.dtype), np.empty((d, m), x0.dtype), np.empty((d, m), x0.dtype)
    v = np.empty((N, d), x0.dtype)
    xi = np.empty(d, x0.dtype)
    vt = np.empty((d, N) if len(plan.dims) > 0 else (0, 0), x0.dtype)
    return x, y, acc, qb, kb, vb, v, xi, vt, workspace(plan, mode, spec, x, L, threads)


@njit(cache=True, inline="always")
def _save_padded(padded, out):
    """out (n, d) ← the component-major padded copy (d, ≥ n) of a state."""
    for p in range(out.shape[0]):
        for c in range(out.shape[1]):
            out[p, c] = padded[c, p]


@njit(cache=True)
def _integrate_tiles_euler(plan, spec, st, x0, order, step0, stop, keep, out, x_end, status, bufs):
    """integrate_one for one sample, a SYMMETRIC_TILES plan, noiseless Euler, Q = K = V = I and a
    normalised field; False (nothing done) for any other run. The state lives in the tiles' padded
    copies (tiles.pad once): each step, the shares of the tiles and one tiles.euler_pass, which
    finishes the rows, steps them and refreshes the copies in one vector pass (SA, n = 64, d = 3,
    every step saved: 2.7 µs a step in simulate against 4.2 µs in the general loop). A step with
    a loose row goes the general way (finish_rows redoes the row, _euler_plain, pad). The same
    numbers as the general loop and as the lockstep threads, to the last bit."""
    if not (st.integrator == EULER and not st.noisy and st.identity and spec.normalise):
        return False
    x, v, vt, ws = bufs[0], bufs[6], bufs[8], bufs[9]
    n = x.shape[1]
    copy, slots = ws[0], ws[3]  # copy[:, :n] is the state
    _load(x0, order, 1, x)
    y_shift, max_sq = tiles.pad(plan, spec, x, x, ws)
    slot = 0
    if keep.shape[0] > 0 and keep[0] == step0:
        _save_padded(copy, out[0, 0])
        slot = 1
    for step in range(step0, stop):
        for share in range(tiles.SLOTS):
            tiles.share_sums(plan, spec, ws, slots, n, y_shift, share)
        if tiles.any_loose(spec, slots, n):
            x[:] = copy[:, :n]
            tiles.pad(plan, spec, x, x, ws)  # the norms of this state, for the redo
            tiles.finish(plan, spec, ws, slots, max_sq, 0, n, x, x, x, v)
            _euler_plain(plan.dims, st, x, v, vt, 0, n)
            y_shift, max_sq = tiles.pad(plan, spec, x, x, ws)
        else:
            y_shift, max_sq = tiles.euler_pass(plan, spec, ws, slots, n, st.dt, st.geometry == SPHERE)
        saving = slot < keep.shape[0] and step + 1 == keep[slot]
        if (saving or step + 1 == stop) and not _finite(copy, 0, n):
            status[0, 0], status[0, 1] = NONFINITE, step + 1
            return True
        if saving:
            _save_padded(copy, out[0, slot])
            slot += 1
    _save_padded(copy, x_end[0])
    return True


def _fast_path(plan, spec, st, x0, order, step0, stop, keep, out, x_end, status, bufs):  # pragma: no cover
    """A specialised whole-trajectory loop for this plan and run, if it has one (True: done)."""
    raise NotImplementedError


@overload(_fast_path)
def _fast_path_overload(plan, spec, st, x0, order, step0, stop, keep, out, x_end, status, bufs):
    if _plan_kind(plan) == SYMMETRIC_TILES:
        return lambda plan, spec, st, x0, order, step0, stop, keep, out, x_end, status, bufs: (
            _integrate_tiles_euler(plan, spec, st, x0, order, step0, stop, keep, out, x_end, status, bufs))
    return lambda plan, spec, st, x0, order, step0, stop, keep, out, x_end, status, bufs: False


@njit(cache=True, nogil=True)
def integrate_one(plan, mode, spec, st, Q, K, V, x0, order, step0, stop, keep, keys, out, x_end, status,
                  bufs):
    """A tile of L = x0.shape[0] samples (one, or the lanes of a LANES plan) from step0 to stop:
    out[lane, slot] ← the state at step keep[slot] (particle order), x_end[lane] ← the state at
    stop, status[lane] ← (code, step) on failure; bufs: its state_buffers.

    The tile is held as one component-major state (d, n·L), column p = particle p // L of sample
    p % L. order (n,) maps working columns to particles (the 1-D HK sweep holds them sorted, L = 1)
    or is empty. Finiteness is checked at saved steps (NaN and inf persist), usa weights at every
    evaluation (an overflow there is reported at the step it happened).
    """
    if _fast_path(plan, spec, st, x0, order, step0, stop, keep, out, x_end, status, bufs):
        return
    L = x0.shape[0]
    x, y, acc, qb, kb, vb, v, xi, vt, ws = bufs
    spread = len(mode) == len(PARALLEL)  # one sample, the kernels over the cores: so are the unsorted copies
    _load(x0, order, L, x, spread)
    slot = 0
    if keep.shape[0] > 0 and keep[0] == step0:
        out[:, 0] = x0  # what _save of the state just loaded gives, without unsorting it
        slot = 1
    for step in range(step0, stop):
        ok = True
        if st.integrator == EULER:
            ok = _field(plan, mode, spec, st, ws, L, Q, K, V, x, qb, kb, vb, v)
            if ok:
                _euler_update(plan.dims, st, x, v, keys, L, step, order, xi, vt, 0, x.shape[1])
        else:
            for stage in range(4):
                ok = _field(plan, mode, spec, st, ws, L, Q, K, V, x if stage == 0 else y, qb, kb, vb, v)
                if not ok:
                    break
                _rk4_stage(plan.dims, st, stage, x, x if stage == 0 else y, v, acc, y, 0, x.shape[1])
        saving = slot < keep.shape[0] and step + 1 == keep[slot]
        if not ok or ((saving or step + 1 == stop) and not _finite(x, 0, x.shape[1])):
            code, at = (USA_OVERFLOW, step) if not ok else (NONFINITE, step + 1)
            for lane in range(L):
                status[lane, 0], status[lane, 1] = code, at
            return
        if saving:
            _save(x, order, out[:, slot], spread)
            slot += 1
    if slot > 0 and keep[slot - 1] == stop:
        x_end[:] = out[:, slot - 1]  # the end state was just saved in particle order: copy it
    else:
        _save(x, order, x_end, spread)


@njit(cache=True)
def _field_rows(plan, spec, st, ws, shared, Q, K, V, src, qb, kb, vb, v, first, last, sync, me, parties,
                round_):
    """integrate_rows: v[first:last] ← the velocity of rows first..last−1 at the state src (ws: this
    thread's workspace, shared: thread 0's); projections of the own columns first, then a barrier
    (every thread reads every column of them). Returns (usa overflow flag, next round)."""
    if st.identity:
        round_ = velocity_rows(plan, spec, ws, shared, src, src, src, src, v, first, last, sync, me, parties,
                               round_)
    else:
        _project(Q, src, qb, first, last)
        _project(K, src, kb, first, last)
        _project(V, src, vb, first, last)
        if parties > 1:
            arrive(sync, me, parties, round_, 0)
        round_ = velocity_rows(plan, spec, ws, shared, src, qb, kb, vb, v, first, last, sync, me, parties,
                               round_ + 1)
    chk = v.dtype.type(0.0)
    if not spec.normalise:
        for i in range(first, last):
            for c in range(v.shape[1]):
                chk += v[i, c] * 0.0
    return (0 if chk == 0.0 else USA_OVERFLOW), round_


@njit(cache=True, nogil=True)
def integrate_rows(plan, spec, st, Q, K, V, x0, step0, stop, keep, keys, out, x_end, status, shared, ws, xi,
                   first, last, sync, me, parties, solo_after):
    """integrate_one for one sample (x0 (1, n, d), a FUSED, RANGE or SYMMETRIC_TILES plan) on
    `parties` threads in lockstep: thread `me` owns the particles first..last−1 (their velocity rows,
    state update, saving) and meets the others at a barrier (sync.arrive) after every field
    evaluation, when every thread has read the whole state, and after every update, when it is
    complete: two rounds per Euler step, eight per RK4 step (and one more per evaluation with
    projections, or with symmetric tiles: each thread sums its shares of the tiles, then its own
    rows). shared: one state_buffers set for
    all threads (each writes only its own columns); ws, xi: this thread's workspace and noise
    scratch. Every row is computed as integrate_one computes it, so the numbers are the same to the
    last bit; failures (a usa overflow, a non-finite state) are combined at the barriers, so all
    threads stop at the same step and thread 0 reports it. When the threads keep waiting for each
    other (more threads than cores), they agree at a barrier that thread 0 goes on alone (_meet;
    solo_after: a round from which they do so anyway, for tests)."""
    x, y, acc, qb, kb, vb, v, _, vt, shared_ws = shared
    order = np.empty(0, np.int64)
    d, n = x.shape
    for p in range(first, last):
        for c in range(d):
            x[c, p] = x0[0, p, c]
    slot = 0
    if keep.shape[0] > 0 and keep[0] == step0:
        _save_rows(x, out[0, 0], first, last)
        slot = 1
    round_, slow = 0, 0
    top, round_, slow = _meet(sync, me, parties, round_, 0, slow, solo_after)  # every column loaded
    if _next(top, me) < 0:
        return
    if top & SOLO:
        first, last, parties = 0, n, 1
    code, at = 0, 0
    for step in range(step0, stop):
        for stage in range(1 if st.integrator == EULER else 4):
            src = x if stage == 0 else y
            flag, round_ = _field_rows(plan, spec, st, ws, shared_ws, Q, K, V, src, qb, kb, vb, v, first,
                                       last, sync, me, parties, round_)
            # every thread has read src
            top, round_, slow = _meet(sync, me, parties, round_, flag, slow, solo_after)
            if _next(top, me) < 0:
                return
            if top & USA_OVERFLOW:
                code, at = USA_OVERFLOW, step
                break
            if top & SOLO:
                first, last, parties = 0, n, 1
            if st.integrator == EULER:
                _euler_update(plan.dims, st, x, v, keys, 1, step, order, xi, vt, first, last)
            else:
                _rk4_stage(plan.dims, st, stage, x, src, v, acc, y, first, last)
            if stage < 3 and st.integrator != EULER:
                # the stage point y is complete
                top, round_, slow = _meet(sync, me, parties, round_, 0, slow, solo_after)
                if _next(top, me) < 0:
                    return
                if top & SOLO:
                    first, last, parties = 0, n, 1
        if code != 0:
            break
        saving = slot < keep.shape[0] and step + 1 == keep[slot]
        bad = 0
        if (saving or step + 1 == stop) and not _finite(x, first, last):
            bad = NONFINITE
        # the state is complete (and finite?)
        top, round_, slow = _meet(sync, me, parties, round_, bad, slow, solo_after)
        if _next(top, me) < 0:
            return
        if top & NONFINITE:
            code, at = NONFINITE, step + 1
            break
        if top & SOLO:
            first, last, parties = 0, n, 1
        if saving:
            _save_rows(x, out[0, slot], first, last)
            slot += 1
    if code != 0:
        if me == 0:
            status[0, 0], status[0, 1] = code, at
        return
    _save_rows(x, x_end[0], first, last)


@njit(cache=True, inline="always")
def _next(top, me):
    """After a barrier round of integrate_rows: −1 if this thread stops here (the group was aborted,
    or the round carries SOLO and this is a helper), else 0."""
    return -1 if (top & ABORT) or (top & SOLO and me > 0) else 0


@njit(cache=True, inline="always")
def _meet(sync, me, parties, round_, flag, slow, solo_after):
    """A barrier round of integrate_rows: (the threads' flags OR'ed, the next round, this thread's
    slow waits so far). After SLOW_WAITS slow waits (the other threads keep losing their cores: more
    threads than cores) a thread adds SOLO to its flags: when a round carries SOLO, the helpers
    return and thread 0 integrates every particle from there on, with no more barriers (one party)."""
    if parties == 1:
        return flag, round_ + 1, slow
    solo = slow >= SLOW_WAITS or round_ >= solo_after
    top, waited = arrive(sync, me, parties, round_, flag | (SOLO if solo else 0))
    return top, round_ + 1, slow + waited


@njit(cache=True, inline="always")
def _save_rows(x, out, first, last):
    """out (n, d) rows first..last−1 ← the component-major state x."""
    for p in range(first, last):
        for c in range(x.shape[0]):
            out[p, c] = x[c, p]


def _tile_buffers(bufs, plan, mode, spec, st, x0):  # pragma: no cover - numba overload below
    """bufs if given, else a new state_buffers set for the tile x0."""
    raise NotImplementedError


@overload(_tile_buffers)
def _tile_buffers_overload(bufs, plan, mode, spec, st, x0):
    if len(bufs) == 0:
        return lambda bufs, plan, mode, spec, st, x0: state_buffers(plan, mode, spec, st, x0, 1)
    return lambda bufs, plan, mode, spec, st, x0: bufs


@njit(cache=True, nogil=True)
def integrate_tiles(plan, mode, spec, st, Q, K, V, x0, orders, step0, stop, keep, keys, out, x_end, status,
                    claim, count, bufs):
    """integrate_one for tiles of plan.lanes samples each, tiles 0..count−1 taken one at a time from
    the counter claim[0], shared by the threads that call this at once (a thread that runs slower,
    or loses its core for a while, takes fewer: each tile is still computed whole by one thread, so
    the numbers do not depend on who takes it); in the state_buffers `bufs` (one sample per tile),
    or in new ones per tile if bufs = ()."""
    S, L = x0.shape[0], plan.lanes
    while True:
        tile = atomic_add(claim, 0, 1)
        if tile >= count:
            break
        a, b = tile * L, min(S, (tile + 1) * L)
        tile_bufs = _tile_buffers(bufs, plan, mode, spec, st, x0[a:b])
        integrate_one(plan, mode, spec, st, Q, K, V, x0[a:b], orders[a], step0, stop, keep, keys[a:b],
                      out[a:b], x_end[a:b], status[a:b], tile_bufs)


# -- weights at saved steps ------------------------------------------------------------------------
@njit(parallel=True, cache=True)
def weights_all(dims, spec, identity, Q, K, traj, out):
    """out[s, t] ← a_ij of the saved state traj[s, t] (n, n) for every sample and saved step."""
    S, T, n, d = traj.shape
    m = buffer_len(n, spec.window, spec.causal)
    for job in prange(S * T):
        s, t = job // T, job % T
        xT = np.ascontiguousarray(traj[s, t].T)
        qT, kT = xT, xT
        if not identity:
            qT, kT = np.empty_like(xT), np.empty_like(xT)
            _project(Q, xT, qT, 0, n)
            _project(K, xT, kT, 0, n)
        range_task(dims, spec, 0, n, xT, qT, kT, xT, True, np.empty(m, xT.dtype), np.empty(m, np.int64),
                   np.empty(m if spec.use_radius else 1, xT.dtype), out[s, t])



# -- the Python side: blocks of saved steps, one compiled call each ----------------------------------
def stepping(geometry_code: int, integrator: str, dt: float, noise: float, identity: bool, dtype) -> Stepping:
    """The Stepping tuple, with dt/2, dt/6 and √dt·noise rounded to `dtype` as numpy would."""
    t = np.dtype(dtype).type
    return Stepping(geometry=int(geometry_code), integrator=EULER if integrator == "euler" else RK4,
                    dt=t(dt), half=t(0.5 * dt), sixth=t(dt / 6.0), noise_scale=t(np.sqrt(dt) * noise),
                    noisy=bool(noise > 0), identity=bool(identity))


def blocks(keep: np.ndarray, ticks: int = 1, max_slots: int | None = None):
    """[(step0, stop, a, b)]: compiled calls from step0 to stop saving slots a..b−1 (slot 0 in the
    first); at most `max_slots` slots per call, and at least `ticks` calls when steps allow (for a
    progress bar)."""
    steps = int(keep[-1])
    if ticks == 1 and max_slots is None:  # one call (the common case, without the set arithmetic)
        return [(0, steps, 0, len(keep))]
    ends = set(int(s) for s in np.linspace(0, steps, ticks + 1)[1:].round())
    if max_slots is not None:
        ends.update(int(e) for e in keep[max_slots - 1::max_slots])
    ends = sorted(e for e in ends | {steps} if e > 0) or [0]
    out, step0, a = [], 0, 0
    for stop in ends:
        b = int(np.searchsorted(keep, stop, side="right"))
        out.append((step0, stop, a, b))
        step0, a = stop, b
    return out


def run(field, plan, st: Stepping, x0: np.ndarray, keep: np.ndarray, keys: np.ndarray, sink, *,
        weights=None, parallel=False, lockstep=1, ticks=1, max_slots=None, bar=None):
    """Integrate x0 (S, n, d) to every step of keep with `plan`; sink[s, slot] ← the saved states
    (an array or a TrajectoryStore), weights[s, slot] ← a_ij if given. lockstep > 1: one sample (a
    FUSED plan) on that many threads in lockstep (integrate_rows). Returns status (S, 2): rows
    (code, step) with code OK, USA_OVERFLOW or NONFINITE."""
    S, n, d = x0.shape
    Q, K, V = field.Q, field.K, field.V
    x = np.ascontiguousarray(x0)
    keep = np.ascontiguousarray(keep, dtype=np.int64)
    x, keys = _full_tiles(x, np.asarray(keys), Plan(*plan).lanes)
    for step0, stop, a, b in blocks(keep, ticks, max_slots):
        orders = _orders(field, x)
        direct = x.shape[0] == S and isinstance(sink, np.ndarray) and sink[:, a:b].flags.c_contiguous
        out = sink[:, a:b] if direct else np.empty((x.shape[0], b - a, n, d), x0.dtype)
        x_end = np.empty_like(x)
        status = np.zeros((x.shape[0], 2), np.int64)
        args = (field.spec, st, Q, K, V, x, orders, np.int64(step0), np.int64(stop), keep[a:b], keys, out,
                x_end, status)
        if lockstep > 1:
            _integrate_rows(Plan(*plan), args, lockstep)
        else:
            _integrate(Plan(*plan), PARALLEL if parallel else SERIAL, args)
        if status[:S, 0].any():
            return status[:S]
        out = out[:S]
        if not direct:
            _write(sink, out, a)
        if weights is not None and b > a:
            w = np.empty((S, b - a, n, n), x0.dtype)
            weights_all(field.small_dims, field.spec, bool(st.identity), field.Q, field.K, out, w)
            weights[:, a:b] = w
        if bar is not None:
            bar.update(S * (stop - step0))
        x = x_end
    return np.zeros((S, 2), np.int64)


def _full_tiles(x, keys, lanes):
    """An ensemble padded with copies of its last sample to a multiple of `lanes` (LANES plans): the
    lane loops vectorise in full blocks only (a tile of 16 or 32 float32 lanes ran 4-5× slower than one
    of 64), and every sample is independent of the others, so the copies change nothing."""
    pad = -x.shape[0] % lanes
    if pad == 0:
        return x, keys
    return (np.concatenate([x, np.repeat(x[-1:], pad, axis=0)]),
            np.concatenate([keys, np.repeat(keys[-1:], pad)]))


def _integrate(plan, mode, args):
    """integrate_one over every tile of `plan.lanes` samples; SERIAL: the tiles taken one at a time by
    the threads (at most numba.get_num_threads(): this one and the persistent helpers of
    sync.run_group), each tile computed by one thread whatever the thread count;
    PARALLEL: the samples in turn, the kernels parallel, in the calling thread's reusable state
    buffers (_reused_buffers)."""
    S, L = args[5].shape[0], plan.lanes
    count = -(-S // L)
    claim = np.zeros(1, np.int64)
    if mode == PARALLEL:
        bufs = _reused_buffers(plan, mode, args[0], args[1], args[5])
        integrate_tiles(plan, mode, *args, claim, np.int64(count), bufs)
        return
    threads = max(1, min(numba.get_num_threads(), count))
    run_group(integrate_tiles, [(plan, mode, *args, claim, np.int64(count), ())] * threads)


_SOLO_AFTER = 1 << 62  # integrate_rows' solo_after (tests force a switch to one thread with it)


def _integrate_rows(plan, args, parties):
    """integrate_rows on `parties` threads (this one and persistent helpers, sync.run_group), the
    particles split into contiguous shares."""
    spec, st, Q, K, V, x, orders, step0, stop, keep, keys, out, x_end, status = args
    if x.shape[0] != 1 or len(plan.kind) not in (FUSED, RANGE, SYMMETRIC_TILES):  # (numba.typeof: 50 µs)
        raise ValueError("lockstep threads integrate one sample with a FUSED, RANGE or SYMMETRIC_TILES plan")
    n = x.shape[1]
    buffers = [state_buffers(plan, SERIAL, spec, st, x, 1) for _ in range(parties)]  # the first is shared
    words = new_sync(parties)
    bounds = np.linspace(0, n, parties + 1).round().astype(np.int64)
    calls = [(plan, spec, st, Q, K, V, x, step0, stop, keep, keys, out, x_end, status, buffers[0], own[-1],
              own[7], a, b, words, np.int64(me), np.int64(parties), np.int64(_SOLO_AFTER))
             for me, (own, a, b) in enumerate(zip(buffers, bounds[:-1], bounds[1:]))]
    run_group(integrate_rows, calls, words)


#: the most bytes of state buffers kept for reuse between calls (per thread; see _reused_buffers)
REUSED_BUFFER_BYTES = 256 * 2**20
_reused = threading.local()


def _reused_buffers(plan, mode, spec, st, x0):
    """The state_buffers of one sample of x0 (S, n, d), kept per thread for the next call with the
    same plan, numbers and shape when they take at most REUSED_BUFFER_BYTES: a large system's first
    touch of fresh pages costs a page fault per 4 KiB (about 3 ms per 8 MB here, 15-20 ms of a
    10-step 1-D HK run with 10⁶ opinions); reused pages are warm. Every buffer is written before it
    is read, so reuse gives the same numbers."""
    threads = numba.get_num_threads()
    key = (plan, mode, spec, st.identity, x0.shape[1:], x0.dtype.str, threads)
    cached = getattr(_reused, "buffers", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    bufs = state_buffers(plan, mode, spec, st, x0[:1], threads)
    size = sum(a.nbytes for a in bufs[:-1]) + sum(getattr(a, "nbytes", 0) for a in bufs[-1])
    _reused.buffers = (key, bufs) if size <= REUSED_BUFFER_BYTES else None
    return bufs


def _write(sink, out, a):
    if isinstance(sink, np.ndarray):
        sink[:, a:a + out.shape[1]] = out
        return
    for s in range(out.shape[0]):  # a TrajectoryStore takes one (sample, slot) at a time
        for k in range(out.shape[1]):
            sink[s, a + k] = out[s, k]


def _orders(field, x):
    """The working order of each sample (the field's prepare hook: sorted 1-D HK), or (S, 0)."""
    orders = [field.order(xs) for xs in x]
    if orders[0] is None:
        return np.empty((x.shape[0], 0), np.int64)
    return np.ascontiguousarray(np.stack(orders), dtype=np.int64)
