"""Row-wise numba kernel for the whole family: any score, radius/window/causal/top-k support.

For query i the candidate keys are the index range allowed by the window/causal restriction
(O(w) per row with a window, O(n) otherwise, never an n×n array); the radius test
‖x_i − x_j‖² ≤ r²(1 + rtol)² and then top-k (ties to the smaller j) prune them; the weights are
a_ij = exp(s_ij − max_l s_il)/Σ_l exp(s_il − max) (normalised) or exp(s_ij)/n (usa).
Scores and sums accumulate in float64 whatever the storage dtype.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

SOFTMAX, RBF, FLAT = 0, 1, 2
SCORE_CODE = {"softmax": SOFTMAX, "rbf": RBF, "flat": FLAT}


@njit(cache=True)
def candidate_range(i, n, window, causal):
    """[lo, hi) of keys j allowed by the window (|i − j| < w, or 0 ≤ i − j < w if causal) and causality."""
    lo, hi = 0, n
    if causal:
        hi = i + 1
    if window > 0:
        lo = max(0, i - window + 1)
        if not causal:
            hi = min(n, i + window)
    return lo, hi


@njit(cache=True)
def row_support(i, x, q, k, score, beta, inv2s2, r2, use_radius, window, causal, top_k, s, idx):
    """Fill s[:c], idx[:c] with the scores and key indices of N(i); return c (keys ascending)."""
    n, d = x.shape
    lo, hi = candidate_range(i, n, window, causal)
    c = 0
    for j in range(lo, hi):
        if use_radius:
            d2 = 0.0
            for a in range(d):
                t = np.float64(x[i, a]) - np.float64(x[j, a])
                d2 += t * t
            if d2 > r2:
                continue
        acc = 0.0
        if score == SOFTMAX:
            for a in range(d):
                acc += np.float64(q[i, a]) * np.float64(k[j, a])
            acc *= beta
        elif score == RBF:
            for a in range(d):
                t = np.float64(q[i, a]) - np.float64(k[j, a])
                acc += t * t
            acc *= -inv2s2
        s[c] = acc
        idx[c] = j
        c += 1
    if top_k > 0 and c > top_k:
        order = np.argsort(-s[:c], kind="mergesort")  # stable: ties keep the smaller j first
        keep = np.sort(order[:top_k])
        for t in range(top_k):  # keep[t] >= t, so the in-place forward copy is safe
            s[t] = s[keep[t]]
            idx[t] = idx[keep[t]]
        c = top_k
    return c


@njit(cache=True)
def row_weights(s, c, normalise, n):
    """Turn scores s[:c] into weights in place; normalised rows subtract the row max first."""
    if normalise:
        mx = s[0]
        for t in range(1, c):
            mx = max(mx, s[t])
        tot = 0.0
        for t in range(c):
            s[t] = np.exp(s[t] - mx)
            tot += s[t]
        for t in range(c):
            s[t] /= tot
    else:
        for t in range(c):
            s[t] = np.exp(s[t]) / n


@njit(cache=True)
def _buffer_len(n, window, causal):
    if window <= 0:
        return n
    return min(n, window if causal else 2 * window - 1)


@njit(parallel=True, cache=True)
def velocity_rows(x, q, k, vx, score, beta, inv2s2, r2, use_radius, window, causal, top_k, normalise, out):
    """out_i = Σ_{j∈N(i)} a_ij vx_j."""
    n, d = x.shape
    m = _buffer_len(n, window, causal)
    for i in prange(n):
        s = np.empty(m)
        idx = np.empty(m, np.int64)
        c = row_support(i, x, q, k, score, beta, inv2s2, r2, use_radius, window, causal, top_k, s, idx)
        row_weights(s, c, normalise, n)
        for a in range(d):
            acc = 0.0
            for t in range(c):
                acc += s[t] * vx[idx[t], a]
            out[i, a] = acc
    return out


@njit(parallel=True, cache=True)
def weights_rows(x, q, k, score, beta, inv2s2, r2, use_radius, window, causal, top_k, normalise, out):
    """Dense a_ij (zero outside N(i)) — for inspection and sink metrics, not for stepping."""
    n = x.shape[0]
    m = _buffer_len(n, window, causal)
    for i in prange(n):
        s = np.empty(m)
        idx = np.empty(m, np.int64)
        c = row_support(i, x, q, k, score, beta, inv2s2, r2, use_radius, window, causal, top_k, s, idx)
        row_weights(s, c, normalise, n)
        for j in range(n):
            out[i, j] = 0.0
        for t in range(c):
            out[i, idx[t]] = s[t]
    return out
