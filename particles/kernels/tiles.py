"""Symmetric scores of one system in square tiles of explicit vectors: each exp once, both rows' sums in
registers.

For Q = K without restriction (softmax or rbf score, d ≤ 4) the weight w_ij = 2^(log2(e)·(s_ij − shift))
of the pair is the same for rows i and j (shift = |β|·max_i‖q_i‖² for a normalised softmax, else 0).
The particles are cut into blocks of W (the vector width, simd.lanes: 8 float64, 16 float32). Tile
(I, J) with I < J computes the W vectors w_r = (w_{o+r, p+s})_s, row o + r of block I against the
W keys p + s of block J; it adds them to block J's sums (lanes = keys), transposes them in registers
(simd.vtranspose) and adds the transposed vectors to block I's sums (lanes = rows). A diagonal tile
(I, I) is symmetric itself, so its key sums are its row sums. The sums are Σ w and Σ w·v_c:

    v_i = Σ_j w_ij v_j / Σ_j w_ij   (normalised),   v_i = Σ_j w_ij v_j / n   (usa, shift 0).

The tiles, numbered row block by row block, are dealt into SLOTS contiguous shares of about the same
size; each share sums into its own slot of the partial sums, and a row's total adds the slots in
order. So the numbers are the same whether one thread runs every share or several threads run them
in lockstep (kernels.trajectory.integrate_rows). A row whose Σ w underflowed the shared shift is
redone by the fused row kernel with its exact row max.

One thread, SA on the sphere, d = 3, float64: 1.1-1.8x the fused row kernel at n = 32-512 over
three runs (benchmarks/explicit_simd.md).
"""

from __future__ import annotations

import numpy as np
from numba import njit, types
from numba.extending import overload

from .dense import fused_task
from .fastexp import LOG2E
from .rows import FASTMATH, SOFTMAX
from .simd import (
    exact_add,
    exact_div,
    exact_mul,
    exact_sub,
    lanes,
    vadd,
    vdot4,
    vexp2,
    vfma,
    vload,
    vmax,
    vsplat,
    vsqdist4,
    vsqrt,
    vstore,
    vtranspose,
    vzero_above,
)

SLOTS = 2  # shares of the tiles, each with its own partial sums (at most this many lockstep threads)


@njit(cache=True)
def workspace(D, xT):
    """Scratch for systems shaped like xT (d, n): the padded copies keys (D, n_pad) (q, or the splat
    factors of the rows), scaled (D, n_pad) (log2(e)·β·q for softmax), values (D, n_pad), the slots
    of partial sums (SLOTS, D + 1, n_pad), the lane numbers of one vector, the redo scratch of
    finish_rows (which, redo, s, dist, qnorm), and one vector's worth of scratch (euler_pass)."""
    n = xT.shape[1]
    W = lanes(xT)
    n_pad = -(-n // W) * W
    t = xT.dtype
    keys, scaled, values = np.zeros((D, n_pad), t), np.zeros((D, n_pad), t), np.zeros((D, n_pad), t)
    return (keys, scaled, values, np.zeros((SLOTS, D + 1, n_pad), t), np.arange(W).astype(t),
            np.empty(n, np.int64), np.empty((n, D), t), np.empty(n, t), np.empty(1, t), np.empty(n, t),
            np.empty(W, t))


@njit(cache=True, inline="always")
def log2_shift(plan, spec, max_sq, t):
    """−log2(e)·shift, the shift of the scores: |β|·max_i ‖q_i‖² for a normalised softmax, else 0 (t:
    the dtype's scalar type)."""
    shift = abs(spec.beta) * max_sq if len(plan.score_s) - 1 == SOFTMAX and spec.normalise else t(0.0)
    return -shift * t(LOG2E)


@njit(cache=True)
def pad(plan, spec, qT, vT, ws):
    """Copy q and v into the padded arrays of ws (pad entries stay 0); returns (the log2-scaled shift,
    max_i ‖q_i‖²) and leaves ‖q_i‖ in ws's qnorm (for the redo of loose rows). Without fastmath:
    ‖q_i‖² is summed in order and never contracted, as euler_pass sums it."""
    D, score = len(plan.dims), len(plan.score_s) - 1  # compile-time constants
    keys, scaled, values = ws[0], ws[1], ws[2]
    qnorm = ws[9]
    n = qT.shape[1]
    t = qT.dtype.type
    b = spec.beta * t(LOG2E)
    max_sq = t(0.0)
    for i in range(n):
        sq = t(0.0)
        for c in range(D):
            q = qT[c, i]
            keys[c, i] = q
            scaled[c, i] = b * q if score == SOFTMAX else q
            values[c, i] = vT[c, i]
            sq += q * q
        qnorm[i] = np.sqrt(sq)
        max_sq = max(max_sq, sq)
    return log2_shift(plan, spec, max_sq, t), max_sq


@njit(cache=True)
def _row_weight(D, score, scaled, r, k0, k1, k2, k3, g, y_shift):
    """The vector of w between row r and the key vectors k (lanes = keys). Inlined by LLVM, not by
    numba (inline="always"): numba's copies of it in every row of a tile took the first call's
    compile from 25 to 45 s (float64) and from 29 to 78 s (float32), at the same speed."""
    e1, e2, e3 = min(1, D - 1), min(2, D - 1), min(3, D - 1)
    a0, a1, a2, a3 = vsplat(scaled[0, r]), vsplat(scaled[e1, r]), vsplat(scaled[e2, r]), vsplat(scaled[e3, r])
    if score == SOFTMAX:
        return vexp2(vdot4(D, a0, a1, a2, a3, k0, k1, k2, k3, y_shift))
    return vexp2(vfma(g, vsqdist4(D, a0, a1, a2, a3, k0, k1, k2, k3), y_shift))


@njit(cache=True, inline="always")
def _eight_weights(D, score, scaled, o, k0, k1, k2, k3, g, y_shift):
    """The weights of rows o..o+7 against the key vectors, as a tuple."""
    return (_row_weight(D, score, scaled, o, k0, k1, k2, k3, g, y_shift),
            _row_weight(D, score, scaled, o + 1, k0, k1, k2, k3, g, y_shift),
            _row_weight(D, score, scaled, o + 2, k0, k1, k2, k3, g, y_shift),
            _row_weight(D, score, scaled, o + 3, k0, k1, k2, k3, g, y_shift),
            _row_weight(D, score, scaled, o + 4, k0, k1, k2, k3, g, y_shift),
            _row_weight(D, score, scaled, o + 5, k0, k1, k2, k3, g, y_shift),
            _row_weight(D, score, scaled, o + 6, k0, k1, k2, k3, g, y_shift),
            _row_weight(D, score, scaled, o + 7, k0, k1, k2, k3, g, y_shift))


def _tile_weights(D, score, scaled, o, k0, k1, k2, k3, g, y_shift):  # pragma: no cover - overload below
    """The W weight vectors of the rows o..o+W−1 of a tile, as a tuple (W = simd.lanes of the dtype)."""
    raise NotImplementedError


@overload(_tile_weights, inline="always")
def _tile_weights_overload(D, score, scaled, o, k0, k1, k2, k3, g, y_shift):
    if scaled.dtype == types.float64:
        return lambda D, score, scaled, o, k0, k1, k2, k3, g, y_shift: _eight_weights(
            D, score, scaled, o, k0, k1, k2, k3, g, y_shift)
    return lambda D, score, scaled, o, k0, k1, k2, k3, g, y_shift: (
        _eight_weights(D, score, scaled, o, k0, k1, k2, k3, g, y_shift)
        + _eight_weights(D, score, scaled, o + 8, k0, k1, k2, k3, g, y_shift))


@njit(cache=True, inline="always")
def _weigh(values, r, w, acc):
    """acc = (Σ w, Σ w·v_0, …, Σ w·v_3) with the vector w times the values of particle r added
    (components past D repeat the last one: unused)."""
    D = values.shape[0]
    e1, e2, e3 = min(1, D - 1), min(2, D - 1), min(3, D - 1)
    tot, a0, a1, a2, a3 = acc
    return (vadd(tot, w), vfma(w, vsplat(values[0, r]), a0), vfma(w, vsplat(values[e1, r]), a1),
            vfma(w, vsplat(values[e2, r]), a2), vfma(w, vsplat(values[e3, r]), a3))


@njit(cache=True, inline="always")
def _weigh_eight(values, o, w, acc):
    """_weigh of the 8 vectors w (a tuple) with particles o..o+7, in straight-line code: a tuple
    indexed by a loop counter compiles to a jump table over values kept on the stack."""
    acc = _weigh(values, o, w[0], acc)
    acc = _weigh(values, o + 1, w[1], acc)
    acc = _weigh(values, o + 2, w[2], acc)
    acc = _weigh(values, o + 3, w[3], acc)
    acc = _weigh(values, o + 4, w[4], acc)
    acc = _weigh(values, o + 5, w[5], acc)
    acc = _weigh(values, o + 6, w[6], acc)
    return _weigh(values, o + 7, w[7], acc)


@njit(cache=True, inline="always")
def _mask_eight(lane_ids, last, w):
    """The 8 vectors w with 0 in the lanes above `last` (the padded keys)."""
    return (vzero_above(lane_ids, last, w[0]), vzero_above(lane_ids, last, w[1]),
            vzero_above(lane_ids, last, w[2]), vzero_above(lane_ids, last, w[3]),
            vzero_above(lane_ids, last, w[4]), vzero_above(lane_ids, last, w[5]),
            vzero_above(lane_ids, last, w[6]), vzero_above(lane_ids, last, w[7]))


def _weigh_tile(values, o, w, acc):  # pragma: no cover - overload below
    """_weigh of the W vectors w (a tuple) with particles o..o+W−1."""
    raise NotImplementedError


@overload(_weigh_tile, inline="always")
def _weigh_tile_overload(values, o, w, acc):
    if w.count == 8:
        return lambda values, o, w, acc: _weigh_eight(values, o, w, acc)
    return lambda values, o, w, acc: _weigh_eight(values, o + 8, w[8:], _weigh_eight(values, o, w[:8], acc))


def _mask_tile(lane_ids, last, w):  # pragma: no cover - overload below
    """The W vectors w with 0 in the lanes above `last`."""
    raise NotImplementedError


@overload(_mask_tile, inline="always")
def _mask_tile_overload(lane_ids, last, w):
    if w.count == 8:
        return lambda lane_ids, last, w: _mask_eight(lane_ids, last, w)
    return lambda lane_ids, last, w: _mask_eight(lane_ids, last, w[:8]) + _mask_eight(lane_ids, last, w[8:])


@njit(cache=True, inline="always")
def _add(D, sums, p, acc):
    """sums[:, p:p + W] += acc = (Σ w, Σ w·v_0, …, Σ w·v_{D−1}) (D ≤ 4, a compile-time constant)."""
    tot, a0, a1, a2, a3 = acc
    vstore(sums[0], p, vadd(vload(sums[0], p), tot))
    vstore(sums[1], p, vadd(vload(sums[1], p), a0))
    if D > 1:
        vstore(sums[2], p, vadd(vload(sums[2], p), a1))
    if D > 2:
        vstore(sums[3], p, vadd(vload(sums[3], p), a2))
    if D > 3:
        vstore(sums[4], p, vadd(vload(sums[4], p), a3))


@njit(cache=True, fastmath=FASTMATH)
def share_sums(plan, spec, ws, slots, n, y_shift, share):
    """slots[share] ← Σ w, Σ w·v_c over the tiles of share number `share` of SLOTS (the tiles (I, J ≥ I)
    numbered row block by row block, cut into equal runs); ws: the padded copies (pad). d and the
    score come from the plan's tuple lengths, so they are compile-time constants and the branches on
    them fold (as int64 arguments they were not)."""
    D, score = len(plan.dims), len(plan.score_s) - 1
    keys, scaled, values = ws[0], ws[1], ws[2]
    lane_ids = vload(ws[4], 0)
    sums = slots[share]
    W = lanes(keys)
    e1, e2, e3 = min(1, D - 1), min(2, D - 1), min(3, D - 1)
    blocks = sums.shape[1] // W
    tiles = blocks * (blocks + 1) // 2
    lo, hi = tiles * share // SLOTS, tiles * (share + 1) // SLOTS
    sums[:] = 0.0
    zero, ysh = vsplat(keys.dtype.type(0.0)), vsplat(keys.dtype.type(y_shift))
    g = vsplat(-spec.inv2s2 * keys.dtype.type(LOG2E))
    last = vsplat(keys.dtype.type(n - (blocks - 1) * W) - keys.dtype.type(0.5))  # lanes above: padding
    ragged = n % W != 0
    tile = 0
    for I in range(blocks):
        if tile >= hi:
            break
        if tile + blocks - I <= lo:
            tile += blocks - I
            continue
        o = W * I
        row_acc = (zero, zero, zero, zero, zero)
        for J in range(I, blocks):
            if tile < lo or tile >= hi:
                tile += 1
                continue
            tile += 1
            p = W * J
            k0, k1, k2, k3 = vload(keys[0], p), vload(keys[e1], p), vload(keys[e2], p), vload(keys[e3], p)
            mask = ragged and J == blocks - 1
            if I == J:  # symmetric itself: its key sums are its row sums
                for r in range(o, min(n, o + W)):
                    w = _row_weight(D, score, scaled, r, k0, k1, k2, k3, g, ysh)
                    w = vzero_above(lane_ids, last, w) if mask else w
                    row_acc = _weigh(values, r, w, row_acc)
                continue
            rows = _tile_weights(D, score, scaled, o, k0, k1, k2, k3, g, ysh)
            if mask:  # the padded keys' lanes; their vectors after the transpose are then 0
                rows = _mask_tile(lane_ids, last, rows)
            _add(D, sums, p, _weigh_tile(values, o, rows, (zero, zero, zero, zero, zero)))
            # vector s of the transpose: key p + s against the rows
            row_acc = _weigh_tile(values, p, vtranspose(rows), row_acc)
        _add(D, sums, o, row_acc)


@njit(cache=True, inline="always")
def _total(slots, row, i):
    """slots[0, row, i] + slots[1, row, i] + …, added in slot order (the scalar twin of _summed)."""
    a = slots[0, row, i]
    for k in range(1, slots.shape[0]):
        a += slots[k, row, i]
    return a


@njit(cache=True)
def finish_rows(plan, spec, slots, which, redo, s, dist, qnorm, kmax, first, last, xT, qT, vT, out):
    """out[i] ← v_i for the rows first..last−1 from partial sums (slots, D + 1, ≥ n) of Σ w and Σ w·v_c,
    the slots added in order; rows whose Σ w is below spec.tiny are redone by fused_task with their
    exact row max (which, redo, s, dist: its scratch; qnorm: ‖q_i‖, kmax: max ‖q‖). Also the finish
    of the row-block symmetric kernel of dense.py (one slot)."""
    D, n = len(plan.dims), xT.shape[1]
    t = xT.dtype.type
    loose = 0
    for i in range(first, last):
        tot = _total(slots, 0, i)
        f = t(1.0) / tot if spec.normalise else t(1.0 / n)
        for c in range(D):
            out[i, c] = _total(slots, 1 + c, i) * f
        if spec.normalise and tot < spec.tiny:
            which[loose] = i
            loose += 1
    if loose:
        fused_task(plan.dims, plan.score_s, plan.radius_s, spec, 0, loose, which, xT, qT, qT, vT, qnorm, kmax,
                   s, dist, redo)
        for r in range(loose):
            for c in range(D):
                out[which[r], c] = redo[r, c]


@njit(cache=True)
def finish(plan, spec, ws, slots, max_sq, first, last, xT, qT, vT, out):
    """finish_rows with the scratch of ws and the norms that pad left there."""
    which, redo, s, dist, qnorm = ws[5], ws[6], ws[7], ws[8], ws[9]
    finish_rows(plan, spec, slots, which, redo, s, dist, qnorm, np.sqrt(max_sq), first, last, xT, qT, vT, out)


@njit(cache=True)
def any_loose(spec, slots, n):
    """Whether a row's Σ w (the slots added in order) is below spec.tiny: finish_rows would redo it."""
    loose = False
    for i in range(n):
        loose |= _total(slots, 0, i) < spec.tiny
    return loose


@njit(cache=True, inline="always")
def _summed(slots, row, p):
    """The vector slots[0, row, p:p + W] + slots[1, row, p:p + W] + …, added in slot order."""
    a = vload(slots[0, row], p)
    for k in range(1, SLOTS):
        a = exact_add(a, vload(slots[k, row], p))
    return a


@njit(cache=True, inline="always")
def _square_norm(D, zero, x0, x1, x2, x3):
    """‖x‖² lane by lane, summed in order from 0 and never contracted (as pad and _euler_plain)."""
    sq = exact_add(zero, exact_mul(x0, x0))
    sq = exact_add(sq, exact_mul(x1, x1)) if D > 1 else sq
    sq = exact_add(sq, exact_mul(x2, x2)) if D > 2 else sq
    return exact_add(sq, exact_mul(x3, x3)) if D > 3 else sq


@njit(cache=True, inline="always")
def _step(h, x, u, v):
    """x + h·(v − u), never contracted (u = ⟨x, v⟩x on the sphere, x in euclidean space)."""
    return exact_add(x, exact_mul(h, exact_sub(v, u)))


@njit(cache=True)
def euler_pass(plan, spec, ws, slots, n, dt, sphere):
    """One Euler step of a normalised field for the state held in ws's padded copies (Q = K = V = I:
    keys = values = x), from the partial sums `slots` of that state, with no row loose (any_loose):
    v_i = Σ_j w_ij x_j / Σ_j w_ij (finish_rows), then x ← (x + dt·(v − ⟨x, v⟩x)) / ‖…‖ (sphere) or
    x ← x + dt·(v − x), and the copies refreshed (pad). Vector by vector, each operation that of
    finish_rows, trajectory._euler_plain and pad, rounded alike and never fused: the same numbers.
    Returns (the log2-scaled shift, max_i ‖x_i‖²) of the new state."""
    D, score = len(plan.dims), len(plan.score_s) - 1
    keys, scaled, values, lane_ids, scratch = ws[0], ws[1], ws[2], vload(ws[4], 0), ws[10]
    t = keys.dtype.type
    W = lanes(keys)
    e1, e2, e3 = min(1, D - 1), min(2, D - 1), min(3, D - 1)
    blocks = -(-n // W)
    zero, one, h = vsplat(t(0.0)), vsplat(t(1.0)), vsplat(t(dt))
    last = vsplat(t(n - (blocks - 1) * W) - t(0.5))  # lanes above: padding, kept 0
    top = zero
    for B in range(blocks):
        p = W * B
        f = exact_div(one, _summed(slots, 0, p))
        v0, v1 = exact_mul(_summed(slots, 1, p), f), exact_mul(_summed(slots, 1 + e1, p), f)
        v2, v3 = exact_mul(_summed(slots, 1 + e2, p), f), exact_mul(_summed(slots, 1 + e3, p), f)
        x0, x1, x2, x3 = vload(keys[0], p), vload(keys[e1], p), vload(keys[e2], p), vload(keys[e3], p)
        if sphere:
            dot = exact_add(zero, exact_mul(x0, v0))
            dot = exact_add(dot, exact_mul(x1, v1)) if D > 1 else dot
            dot = exact_add(dot, exact_mul(x2, v2)) if D > 2 else dot
            dot = exact_add(dot, exact_mul(x3, v3)) if D > 3 else dot
            y0, y1 = _step(h, x0, exact_mul(dot, x0), v0), _step(h, x1, exact_mul(dot, x1), v1)
            y2, y3 = _step(h, x2, exact_mul(dot, x2), v2), _step(h, x3, exact_mul(dot, x3), v3)
            nrm = vsqrt(_square_norm(D, zero, y0, y1, y2, y3))
            x0, x1, x2, x3 = exact_div(y0, nrm), exact_div(y1, nrm), exact_div(y2, nrm), exact_div(y3, nrm)
        else:
            x0, x1 = _step(h, x0, x0, v0), _step(h, x1, x1, v1)
            x2, x3 = _step(h, x2, x2, v2), _step(h, x3, x3, v3)
        if B == blocks - 1:
            x0, x1 = vzero_above(lane_ids, last, x0), vzero_above(lane_ids, last, x1)
            x2, x3 = vzero_above(lane_ids, last, x2), vzero_above(lane_ids, last, x3)
        vstore(keys[0], p, x0)
        vstore(values[0], p, x0)
        if D > 1:
            vstore(keys[1], p, x1)
            vstore(values[1], p, x1)
        if D > 2:
            vstore(keys[2], p, x2)
            vstore(values[2], p, x2)
        if D > 3:
            vstore(keys[3], p, x3)
            vstore(values[3], p, x3)
        top = vmax(top, _square_norm(D, zero, x0, x1, x2, x3))
    b = spec.beta * t(LOG2E)
    for c in range(D):
        for i in range(n):
            scaled[c, i] = b * keys[c, i] if score == SOFTMAX else keys[c, i]
    vstore(scratch, 0, top)
    max_sq = t(0.0)
    for k in range(W):
        max_sq = max(max_sq, scratch[k])
    return log2_shift(plan, spec, max_sq, t), max_sq


@njit(cache=True)
def velocity(plan, spec, ws, xT, qT, vT, out):
    """out (n, d) ← v for one system: every share of the tiles in turn, then every row."""
    n = xT.shape[1]
    y_shift, max_sq = pad(plan, spec, qT, vT, ws)
    for share in range(SLOTS):
        share_sums(plan, spec, ws, ws[3], n, y_shift, share)
    finish(plan, spec, ws, ws[3], max_sq, 0, n, xT, qT, vT, out)
