"""Range kernel: every query row scans one contiguous key range — dense, causal or windowed.

Three drivers: :func:`velocity_fused` (d ≤ 4, no top-k: one fused pass per row, no scores buffer),
:func:`velocity_symmetric` (its variant for symmetric scores, Q = K without restrictions: one exp
per pair i < j, used by both rows — the fast path for dense softmax/RBF) and :func:`rows_range`
(any d, top-k: the buffered row of :mod:`.rows`).

Dense (no window): keys 0..n−1 (causal: 0..i), O(n²) pairs in total; with a window w the range has
at most 2w − 1 keys (w if causal), so the cost is O(n·w) — linear in n. A radius masks keys in the
range; top-k selects inside it. Rows are processed in parallel tasks of ROWS_PER_TASK rows with
per-task scratch buffers of the range length (never an n×n array).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .fastexp import LOG2E, exp2_sat
from .rows import (
    FASTMATH,
    ROWS_PER_TASK,
    SOFTMAX,
    _dot4,
    _sqdist4,
    accumulate,
    buffer_len,
    candidate_range,
    fused_range,
    keep_top,
    mask_radius,
    row_min_max,
    row_scores,
    row_weights,
    scatter_weights,
    scores_range,
    sqdist_range,
    store_row,
    top_k_threshold,
    weighted_sum_range,
)


@njit(parallel=True, cache=True)
def rows_range(dims, spec, xT, qT, kT, vT, dense_weights, out):
    """All rows with the buffered row kernel (arrays component-major (d, n); spec: rows.RowSpec);
    tasks of ROWS_PER_TASK rows run in parallel (:func:`range_task`).

    dense_weights False: out (n, d) ← v_i = Σ_{j∈N(i)} a_ij V x_j; for d = len(dims) ≤ 4 (dims = ()
    otherwise) a row without a top-k tie finishes in one pass (:func:`.rows.weighted_sum_range`).
    True: out (n, n) ← a_ij, zero outside N(i) — for inspection and sink metrics, not for stepping.
    """
    n = xT.shape[1]
    m_max = buffer_len(n, spec.window, spec.causal)
    tasks = (n + ROWS_PER_TASK - 1) // ROWS_PER_TASK
    for task in prange(tasks):
        s = np.empty(m_max, xT.dtype)
        dist = np.empty(m_max if spec.use_radius else 1, xT.dtype)
        idx = np.empty(m_max, np.int64)
        range_task(dims, spec, task * ROWS_PER_TASK, min(n, (task + 1) * ROWS_PER_TASK), xT, qT, kT, vT,
                   dense_weights, s, idx, dist, out)
    return out


@njit(cache=True, fastmath=FASTMATH)
def range_task(dims, spec, first, last, xT, qT, kT, vT, dense_weights, s, idx, dist, out):
    """Rows first..last−1 of :func:`rows_range`. row_scores and weighted_sum_range are inlined
    (numba inline="always", under this function's fastmath flags): for short windowed rows the
    calls cost as much as the work."""
    n = xT.shape[1]
    D = len(dims)
    top_k, normalise = spec.top_k, spec.normalise
    for i in range(first, last):
        lo, hi = candidate_range(i, n, spec.window, spec.causal)
        m, mn, mx = row_scores(dims, i, lo, hi - lo, True, xT, qT, kT, spec.score, spec.beta, spec.inv2s2,
                               spec.r2, spec.use_radius, s, idx, dist)
        thr, exact = xT.dtype.type(-np.inf), True
        if top_k > 0 and m > top_k:
            thr, exact = top_k_threshold(s, m, top_k, mn, mx)
        if D > 0 and exact and not dense_weights:
            tot, a0, a1, a2, a3 = weighted_sum_range(dims, s, lo, m, thr, mx, normalise, vT)
            store_row(out, i, D, 1.0 / tot if normalise else 1.0 / n, a0, a1, a2, a3)
            continue
        c, contiguous = m, True
        if top_k > 0 and m > top_k:
            c, contiguous = keep_top(s, idx, m, lo, True, top_k, thr, exact)
        factor = row_weights(s, c, normalise, n)
        if dense_weights:
            scatter_weights(i, lo, c, contiguous, factor, s, idx, out)
        else:
            accumulate(i, lo, c, contiguous, factor, s, idx, vT, out)


@njit(parallel=True, cache=True)
def velocity_fused(dims, score_s, radius_s, spec, which, xT, qT, kT, vT, qnorm, kmax, out):
    """Rows which[r] (dense, causal or windowed, no top-k; d = len(dims) ≤ 4) into out[r], one fused
    pass per row (score code = len(score_s) − 1 and use_radius = len(radius_s) − 1 are
    compile-time, see rows.static; the rest comes from spec); tasks of ROWS_PER_TASK rows run in
    parallel (:func:`fused_task`). qnorm: ‖q_i‖ per row, kmax: max_j ‖k_j‖ (the shift bound).
    """
    n = xT.shape[1]
    m_max = buffer_len(n, spec.window, spec.causal)
    count = which.shape[0]
    tasks = (count + ROWS_PER_TASK - 1) // ROWS_PER_TASK
    for task in prange(tasks):
        s = np.empty(m_max, xT.dtype)
        dist = np.empty(m_max if len(radius_s) > 1 else 1, xT.dtype)
        first, last = task * ROWS_PER_TASK, min(count, (task + 1) * ROWS_PER_TASK)
        fused_task(dims, score_s, radius_s, spec, first, last, which, xT, qT, kT, vT, qnorm, kmax, s, dist,
                   out)
    return out


@njit(cache=True, fastmath=FASTMATH)
def fused_task(dims, score_s, radius_s, spec, first, last, which, xT, qT, kT, vT, qnorm, kmax, s, dist, out):
    """Rows which[first:last] of :func:`velocity_fused`.

    The shift is an upper bound of the row max instead of the max itself (no extra pass):
    |β|·‖q_i‖·max_j‖k_j‖ for softmax (Cauchy–Schwarz), 0 for rbf and flat. If the bound is so loose
    that Σ exp(s − shift) < tiny (= n²·e^{lo+40}, lo the log of the smallest normal float, i.e. the
    bound exceeds the max by more than ≈ 40 − 2 ln n below underflow), the row is redone with the
    exact row max, so no weight that matters can underflow. usa rows use no shift (exp(s)/n).

    (The parallel drivers carry no fastmath flags and call task functions like this one: numba
    code compiled with parallel=True and fastmath gave results that differed in the last bit
    between a fresh compile and a load from the on-disk cache. The fused and range drivers still
    show such last-bit differences, see benchmarks/README.md.)
    """
    n = xT.shape[1]
    D, score, use_radius = len(dims), len(score_s) - 1, len(radius_s) - 1
    beta, inv2s2, r2, normalise = spec.beta, spec.inv2s2, spec.r2, spec.normalise
    for r in range(first, last):
        i = which[r]
        lo, hi = candidate_range(i, n, spec.window, spec.causal)
        shift = xT.dtype.type(0.0) if score != SOFTMAX or not normalise else abs(beta) * qnorm[i] * kmax
        tot, a0, a1, a2, a3 = fused_range(dims, score_s, radius_s, i, lo, hi - lo, shift, xT, qT, kT,
                                          vT, beta, inv2s2, r2)
        if normalise and tot < spec.tiny:  # loose bound: redo with the exact row max
            shift = scores_range(dims, i, lo, hi - lo, qT, kT, score, beta, inv2s2, s)[1]
            if use_radius:
                sqdist_range(i, lo, hi - lo, xT, dist)
                mask_radius(s, dist, hi - lo, r2)
                shift = row_min_max(s, hi - lo)[1]
            tot, a0, a1, a2, a3 = fused_range(dims, score_s, radius_s, i, lo, hi - lo, shift, xT, qT,
                                              kT, vT, beta, inv2s2, r2)
        store_row(out, r, D, 1.0 / tot if normalise else 1.0 / n, a0, a1, a2, a3)


SYMMETRIC_BLOCK = 512  # keys per column block of the symmetric kernel (its column sums stay in L1)


@njit(cache=True, fastmath=FASTMATH, inline="always")
def _symmetric_block(dims, score_s, qT, vT, b, g, y_shift, j0, j1, col, acc):
    """All pairs i < j with j in the column block [j0, j1): w_ij = 2^(y_ij) computed once, added to
    row i (Σ_j w, Σ_j w·v_j, into acc) and to column j (Σ_i w, Σ_i w·v_i, into col[:, j − j0])."""
    D, score = len(dims), len(score_s) - 1
    e1, e2 = min(1, D - 1), min(2, D - 1)
    e3 = min(3, D - 1)
    zero = b - b
    for i in range(j1 - 1):
        lo = max(j0, i + 1)
        m = j1 - lo
        k0, k1, k2, k3 = qT[0, lo:j1], qT[e1, lo:j1], qT[e2, lo:j1], qT[e3, lo:j1]
        v0, v1, v2, v3 = vT[0, lo:j1], vT[e1, lo:j1], vT[e2, lo:j1], vT[e3, lo:j1]
        c0, c1, c2, c3, c4 = (col[0, lo - j0:j1 - j0], col[1, lo - j0:j1 - j0], col[1 + e1, lo - j0:j1 - j0],
                              col[1 + e2, lo - j0:j1 - j0], col[1 + e3, lo - j0:j1 - j0])
        q0, q1, q2, q3 = qT[0, i], qT[e1, i], qT[e2, i], qT[e3, i]
        bq0, bq1, bq2, bq3 = b * q0, b * q1, b * q2, b * q3
        u0, u1, u2, u3 = vT[0, i], vT[e1, i], vT[e2, i], vT[e3, i]
        tot, a0, a1, a2, a3 = zero, zero, zero, zero, zero
        for t in range(m):
            if score == SOFTMAX:
                y = _dot4(D, t, bq0, bq1, bq2, bq3, k0, k1, k2, k3) + y_shift
            else:
                y = g * _sqdist4(D, t, q0, q1, q2, q3, k0, k1, k2, k3) + y_shift
            w = exp2_sat(y)
            tot += w
            c0[t] += w
            a0 += w * v0[t]
            c1[t] += w * u0
            if D > 1:
                a1 += w * v1[t]
                c2[t] += w * u1
            if D > 2:
                a2 += w * v2[t]
                c3[t] += w * u2
            if D > 3:
                a3 += w * v3[t]
                c4[t] += w * u3
        acc[0, i] += tot
        acc[1, i] += a0
        if D > 1:
            acc[2, i] += a1
        if D > 2:
            acc[3, i] += a2
        if D > 3:
            acc[4, i] += a3


@njit(cache=True, fastmath=FASTMATH)
def _symmetric_column(dims, score_s, qT, vT, b, g, y_shift, blk, col, acc):
    """Column block blk: its pairs with every earlier row, column sums added into acc at the end."""
    n = qT.shape[1]
    j0, j1 = blk * SYMMETRIC_BLOCK, min(n, (blk + 1) * SYMMETRIC_BLOCK)
    col[:, :] = 0.0
    _symmetric_block(dims, score_s, qT, vT, b, g, y_shift, j0, j1, col, acc)
    for c in range(col.shape[0]):
        for j in range(j0, j1):
            acc[c, j] += col[c, j - j0]


@njit(parallel=True, cache=True)
def velocity_symmetric(dims, score_s, spec, qT, vT, shift, partial, sums):
    """Dense rows with symmetric scores (Q = K, no restriction), d = len(dims) ≤ 4: each w_ij =
    exp(s_ij − shift) is computed once for i < j and used for both rows; shift is one bound of
    every score (|β|·max‖q‖² for softmax, 0 for rbf and usa). Returns sums (D + 1, n) ← (Σ_j w_ij,
    Σ_j w_ij v_j) per row (diagonal included); the caller normalises and checks for underflow.

    Column blocks of SYMMETRIC_BLOCK keys, paired first with last so that every pair of blocks
    holds the same share of the triangle, are dealt round-robin to T = partial.shape[0] tasks; each
    task adds into its own partial (T, D + 1, n), reduced at the end.
    """
    D, score = len(dims), len(score_s) - 1
    n = qT.shape[1]
    t = qT.dtype.type
    b, g = t(spec.beta) * t(LOG2E), -t(spec.inv2s2) * t(LOG2E)
    y_shift = -t(shift) * t(LOG2E) if spec.normalise else t(0.0)
    blocks = (n + SYMMETRIC_BLOCK - 1) // SYMMETRIC_BLOCK
    pairs = (blocks + 1) // 2
    T = partial.shape[0]
    for task in prange(T):
        acc = partial[task]
        acc[:, :] = 0.0
        col = np.empty((D + 1, SYMMETRIC_BLOCK), qT.dtype)
        for pair in range(task, pairs, T):
            _symmetric_column(dims, score_s, qT, vT, b, g, y_shift, pair, col, acc)
            if blocks - 1 - pair != pair:
                _symmetric_column(dims, score_s, qT, vT, b, g, y_shift, blocks - 1 - pair, col, acc)
    for i in prange(n):  # the diagonal w_ii, then the tasks' partial sums
        w = _diagonal_weight(score, D, qT, b, y_shift, i)
        sums[0, i] = w
        for c in range(D):
            sums[1 + c, i] = w * vT[c, i]
        for task in range(T):
            for c in range(D + 1):
                sums[c, i] += partial[task, c, i]
    return sums


@njit(cache=True, inline="always")
def _diagonal_weight(score, D, qT, b, y_shift, i):
    """w_ii = 2^(y_ii) of the symmetric kernels (softmax: y = b‖q_i‖² + y_shift; rbf: y_shift)."""
    y = y_shift
    if score == SOFTMAX:
        for c in range(D):
            y += b * qT[c, i] * qT[c, i]
    return exp2_sat(y)


@njit(cache=True)
def symmetric_serial(dims, score_s, spec, qT, vT, shift, sums, col):
    """:func:`velocity_symmetric` for one system on the calling thread (one task, every column
    block in order): sums (D + 1, n) ← (Σ_j w_ij, Σ_j w_ij v_j), diagonal included; col is the
    (D + 1, SYMMETRIC_BLOCK) column scratch."""
    D, score = len(dims), len(score_s) - 1
    n = qT.shape[1]
    t = qT.dtype.type
    b, g = t(spec.beta) * t(LOG2E), -t(spec.inv2s2) * t(LOG2E)
    y_shift = -t(shift) * t(LOG2E) if spec.normalise else t(0.0)
    sums[:, :] = 0.0
    for blk in range((n + SYMMETRIC_BLOCK - 1) // SYMMETRIC_BLOCK):
        _symmetric_column(dims, score_s, qT, vT, b, g, y_shift, blk, col, sums)
    for i in range(n):
        w = _diagonal_weight(score, D, qT, b, y_shift, i)
        sums[0, i] += w
        for c in range(D):
            sums[1 + c, i] += w * vT[c, i]
    return sums
