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
from .simd import lanes, vadd, vdot4, vexp2, vfma, vload, vsplat, vsqdist4, vstore, vtranspose, vzero_above

SLOTS = 2  # shares of the tiles, each with its own partial sums (at most this many lockstep threads)


@njit(cache=True)
def workspace(D, xT):
    """Scratch for systems shaped like xT (d, n): the padded copies keys (D, n_pad) (q, or the splat
    factors of the rows), scaled (D, n_pad) (log2(e)·β·q for softmax), values (D, n_pad), the slots
    of partial sums (SLOTS, D + 1, n_pad), the lane numbers of one vector, and the redo scratch of
    finish_rows (which, redo, s, dist, qnorm)."""
    n = xT.shape[1]
    W = lanes(xT)
    n_pad = -(-n // W) * W
    t = xT.dtype
    keys, scaled, values = np.zeros((D, n_pad), t), np.zeros((D, n_pad), t), np.zeros((D, n_pad), t)
    return (keys, scaled, values, np.zeros((SLOTS, D + 1, n_pad), t), np.arange(W).astype(t),
            np.empty(n, np.int64), np.empty((n, D), t), np.empty(n, t), np.empty(1, t), np.empty(n, t))


@njit(cache=True, fastmath=FASTMATH)
def pad(D, score, spec, qT, vT, ws):
    """Copy q and v into the padded arrays of ws (pad entries stay 0); returns (the log2-scaled shift,
    max_i ‖q_i‖²) and leaves ‖q_i‖ in ws's qnorm (for the redo of loose rows)."""
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
    shift = abs(spec.beta) * max_sq if score == SOFTMAX and spec.normalise else t(0.0)
    return -shift * t(LOG2E), max_sq


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
def _weigh(values, r, w, tot, a0, a1, a2, a3):
    """(Σ w, Σ w·v_c) with the vector w times the values of particle r added (components past
    D repeat the last one: unused)."""
    D = values.shape[0]
    e1, e2, e3 = min(1, D - 1), min(2, D - 1), min(3, D - 1)
    return (vadd(tot, w), vfma(w, vsplat(values[0, r]), a0), vfma(w, vsplat(values[e1, r]), a1),
            vfma(w, vsplat(values[e2, r]), a2), vfma(w, vsplat(values[e3, r]), a3))


@njit(cache=True, inline="always")
def _add(D, sums, p, tot, a0, a1, a2, a3):
    """sums[:, p:p + W] += (Σ w, Σ w·v_0, …, Σ w·v_{D−1}) (D ≤ 4, a compile-time constant)."""
    vstore(sums[0], p, vadd(vload(sums[0], p), tot))
    vstore(sums[1], p, vadd(vload(sums[1], p), a0))
    if D > 1:
        vstore(sums[2], p, vadd(vload(sums[2], p), a1))
    if D > 2:
        vstore(sums[3], p, vadd(vload(sums[3], p), a2))
    if D > 3:
        vstore(sums[4], p, vadd(vload(sums[4], p), a3))


@njit(cache=True, fastmath=FASTMATH)
def share_sums(D, score, spec, ws, slots, n, y_shift, share):
    """slots[share] ← Σ w, Σ w·v_c over the tiles of share number `share` of SLOTS (the tiles (I, J ≥ I)
    numbered row block by row block, cut into equal runs); ws: the padded copies (pad)."""
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
        rt, r0, r1, r2, r3 = zero, zero, zero, zero, zero
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
                    rt, r0, r1, r2, r3 = _weigh(values, r, w, rt, r0, r1, r2, r3)
                continue
            ct, c0, c1, c2, c3 = zero, zero, zero, zero, zero
            rows = _tile_weights(D, score, scaled, o, k0, k1, k2, k3, g, ysh)
            for r in range(W):
                w = vzero_above(lane_ids, last, rows[r]) if mask else rows[r]
                ct, c0, c1, c2, c3 = _weigh(values, o + r, w, ct, c0, c1, c2, c3)
            cols = vtranspose(rows)  # vector s: key p + s against the rows (the padded keys' zeroed)
            for s in range(W):
                w = vzero_above(vsplat(keys.dtype.type(s)), last, cols[s]) if mask else cols[s]
                rt, r0, r1, r2, r3 = _weigh(values, p + s, w, rt, r0, r1, r2, r3)
            _add(D, sums, p, ct, c0, c1, c2, c3)
        _add(D, sums, o, rt, r0, r1, r2, r3)


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
        tot = slots[0, 0, i]
        for k in range(1, slots.shape[0]):
            tot += slots[k, 0, i]
        f = t(1.0) / tot if spec.normalise else t(1.0 / n)
        for c in range(D):
            a = slots[0, 1 + c, i]
            for k in range(1, slots.shape[0]):
                a += slots[k, 1 + c, i]
            out[i, c] = a * f
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
def velocity(plan, spec, ws, xT, qT, vT, out):
    """out (n, d) ← v for one system: every share of the tiles in turn, then every row."""
    D, score, n = len(plan.dims), len(plan.score_s) - 1, xT.shape[1]
    y_shift, max_sq = pad(D, score, spec, qT, vT, ws)
    for share in range(SLOTS):
        share_sums(D, score, spec, ws, ws[3], n, y_shift, share)
    finish(plan, spec, ws, ws[3], max_sq, 0, n, xT, qT, vT, out)
