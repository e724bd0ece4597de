"""Range kernel: every query row scans one contiguous key range — dense, causal or windowed.

Two drivers: :func:`velocity_fused` (d ≤ 4, no top-k: one fused pass per row, no scores buffer —
the fast path for dense softmax/RBF) and :func:`rows_range` (any d, top-k: the buffered row
of :mod:`.rows`). Dense (no window): keys 0..n−1 (causal: 0..i), O(n²) pairs in total; with a
window w the range has at most 2w − 1 keys (w if causal), so the cost is O(n·w) — linear in n.
A radius masks keys in the range; top-k selects inside it. Rows are processed in parallel tasks
of ROWS_PER_TASK rows with
per-task scratch buffers of the range length (never an n×n array).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .rows import (
    ROWS_PER_TASK,
    SOFTMAX,
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
    top_k_threshold,
    weighted_sum_range,
)


@njit(parallel=True, cache=True)
def rows_range(dims, xT, qT, kT, vT, score, beta, inv2s2, r2, use_radius, window, causal, top_k, normalise,
               dense_weights, out):
    """All rows with the buffered row kernel (arrays component-major (d, n)).

    dense_weights False: out (n, d) ← v_i = Σ_{j∈N(i)} a_ij V x_j; for d = len(dims) ≤ 4 (dims = ()
    otherwise) a row without a top-k tie finishes in one pass (:func:`.rows.weighted_sum_range`).
    True: out (n, n) ← a_ij, zero outside N(i) — for inspection and sink metrics, not for stepping.
    """
    n = xT.shape[1]
    D = len(dims)
    m_max = buffer_len(n, window, causal)
    tasks = (n + ROWS_PER_TASK - 1) // ROWS_PER_TASK
    for task in prange(tasks):
        s = np.empty(m_max, xT.dtype)
        dist = np.empty(m_max if use_radius else 1, xT.dtype)
        idx = np.empty(m_max, np.int64)
        for i in range(task * ROWS_PER_TASK, min(n, (task + 1) * ROWS_PER_TASK)):
            lo, hi = candidate_range(i, n, window, causal)
            m = row_scores(dims, i, lo, hi - lo, True, xT, qT, kT, score, beta, inv2s2, r2, use_radius,
                           s, idx, dist)
            thr, exact, mx = xT.dtype.type(-np.inf), True, xT.dtype.type(0.0)
            if top_k > 0 and m > top_k:
                thr, exact, mx = top_k_threshold(s, m, top_k)
            elif normalise:
                mx = row_min_max(s, m)[1]
            if D > 0 and exact and not dense_weights:
                tot, a0, a1, a2, a3 = weighted_sum_range(dims, s, lo, m, thr, mx, normalise, vT)
                f = 1.0 / tot if normalise else 1.0 / n
                out[i, 0] = a0 * f
                if D > 1:
                    out[i, 1] = a1 * f
                if D > 2:
                    out[i, 2] = a2 * f
                if D > 3:
                    out[i, 3] = a3 * f
                continue
            c, contiguous = m, True
            if top_k > 0 and m > top_k:
                c, contiguous = keep_top(s, idx, m, lo, True, top_k, thr, exact)
            factor = row_weights(s, c, normalise, n)
            if dense_weights:
                scatter_weights(i, lo, c, contiguous, factor, s, idx, out)
            else:
                accumulate(i, lo, c, contiguous, factor, s, idx, vT, out)
    return out


@njit(parallel=True, cache=True)
def velocity_fused(dims, score_s, radius_s, xT, qT, kT, vT, beta, inv2s2, r2, window, causal,
                   normalise, qnorm, kmax, tiny, out):
    """Dense/causal/windowed rows without top-k for d = len(dims) ≤ 4, one fused pass per row
    (score code = len(score_s) − 1 and use_radius = len(radius_s) − 1 are compile-time, see rows.static).

    The shift is an upper bound of the row max instead of the max itself (no extra pass):
    |β|·‖q_i‖·max_j‖k_j‖ for softmax (Cauchy–Schwarz), 0 for rbf and flat. If the bound is so loose
    that Σ exp(s − shift) < tiny (= n²·e^{lo+40}, lo the log of the smallest normal float, i.e. the
    bound exceeds the max by more than ≈ 40 − 2 ln n below underflow), the row is redone with the
    exact row max, so no weight that matters can underflow. usa rows use no shift (exp(s)/n).
    """
    n = xT.shape[1]
    D, score, use_radius = len(dims), len(score_s) - 1, len(radius_s) - 1
    m_max = buffer_len(n, window, causal)
    tasks = (n + ROWS_PER_TASK - 1) // ROWS_PER_TASK
    for task in prange(tasks):
        s = np.empty(m_max, xT.dtype)
        dist = np.empty(m_max if use_radius else 1, xT.dtype)
        for i in range(task * ROWS_PER_TASK, min(n, (task + 1) * ROWS_PER_TASK)):
            lo, hi = candidate_range(i, n, window, causal)
            shift = xT.dtype.type(0.0) if score != SOFTMAX or not normalise else abs(beta) * qnorm[i] * kmax
            tot, a0, a1, a2, a3 = fused_range(dims, score_s, radius_s, i, lo, hi - lo, shift, xT, qT, kT,
                                              vT, beta, inv2s2, r2)
            if normalise and tot < tiny:  # loose bound: redo with the exact row max
                scores_range(dims, i, lo, hi - lo, qT, kT, score, beta, inv2s2, s)
                if use_radius:
                    sqdist_range(i, lo, hi - lo, xT, dist)
                    mask_radius(s, dist, hi - lo, r2)
                shift = row_min_max(s, hi - lo)[1]
                tot, a0, a1, a2, a3 = fused_range(dims, score_s, radius_s, i, lo, hi - lo, shift, xT, qT,
                                                  kT, vT, beta, inv2s2, r2)
            f = 1.0 / tot if normalise else 1.0 / n
            out[i, 0] = a0 * f
            if D > 1:
                out[i, 1] = a1 * f
            if D > 2:
                out[i, 2] = a2 * f
            if D > 3:
                out[i, 3] = a3 * f
    return out
