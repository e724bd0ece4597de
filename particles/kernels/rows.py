"""The row maths shared by every kernel path: scores, support, top-k, weights, v_i = Σ a_ij V x_j.

One query row i at a time, over either a contiguous key range [lo, lo + m) (dense, causal,
windowed) or an explicit ascending key list idx[:m] (neighbour lists). Arrays are component-major
(d, n) so the inner loops run over keys with unit stride and vectorise. Arithmetic is in the
storage dtype (float32 or float64); the exp is :func:`fastexp.fexp`.

* scores      s_ij = β⟨q_i, k_j⟩ (softmax), −‖q_i − k_j‖²·inv2s2 (rbf) or 0 (flat);
* radius      ‖x_i − x_j‖² ≤ r2 = radius_bound_sq(r, dtype) (documented tolerance): keys outside get
              s = −inf, which gives weight exactly 0 (or, in list mode, are dropped);
* top-k       the k largest scores (ties to the smaller j) by bisection on the integer order keys
              of the floats — exact, O(m) per pass, no sort, no allocation;
* weights     exp(s − max s)/Σ (normalised) or exp(s)/n (usa); the 1/Σ or 1/n factor is applied once
              per row, in :func:`accumulate`.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .fastexp import LOG2E, exp2_sat, fexp, float_key, key_float

SOFTMAX, RBF, FLAT = 0, 1, 2
SCORE_CODE = {"softmax": SOFTMAX, "rbf": RBF, "flat": FLAT}
FASTMATH = {"contract", "arcp", "nsz", "reassoc"}  # no nnan/ninf: −inf masks and usa overflow stay exact
VALUE_BISECTIONS = 12  # top-k: value-space halvings before the exact integer-key bisection
ROWS_PER_TASK = 32  # rows per parallel task (per-task scratch buffers are allocated once)


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
def buffer_len(n, window, causal):
    """Longest candidate range of any row."""
    if window <= 0:
        return n
    return min(n, window if causal else 2 * window - 1)


@njit(cache=True, fastmath=FASTMATH)
def scores_range(i, lo, m, qT, kT, score, beta, inv2s2, s):
    """s[t] = s_{i, lo+t} for t < m (slices keep the indices provably ≥ 0, so the loops vectorise)."""
    d = qT.shape[0]
    if score == FLAT:
        for t in range(m):
            s[t] = 0.0
        return
    k0 = kT[0, lo:lo + m]
    if score == SOFTMAX:
        q0 = qT[0, i] * beta
        for t in range(m):
            s[t] = q0 * k0[t]
        for a in range(1, d):
            qa = qT[a, i] * beta
            ka = kT[a, lo:lo + m]
            for t in range(m):
                s[t] += qa * ka[t]
        return
    q0 = qT[0, i]
    for t in range(m):
        u = q0 - k0[t]
        s[t] = u * u
    for a in range(1, d):
        qa = qT[a, i]
        ka = kT[a, lo:lo + m]
        for t in range(m):
            u = qa - ka[t]
            s[t] += u * u
    for t in range(m):
        s[t] *= -inv2s2


@njit(cache=True, fastmath=FASTMATH)
def scores_list(i, idx, m, qT, kT, score, beta, inv2s2, s):
    """s[t] = s_{i, idx[t]} for t < m."""
    d = qT.shape[0]
    for t in range(m):
        j = idx[t]
        acc = s.dtype.type(0.0)
        if score == SOFTMAX:
            for a in range(d):
                acc += qT[a, i] * kT[a, j]
            acc *= beta
        elif score == RBF:
            for a in range(d):
                u = qT[a, i] - kT[a, j]
                acc += u * u
            acc *= -inv2s2
        s[t] = acc


@njit(cache=True, fastmath=FASTMATH)
def sqdist_range(i, lo, m, xT, dist):
    """dist[t] = ‖x_i − x_{lo+t}‖²."""
    d = xT.shape[0]
    x0, k0 = xT[0, i], xT[0, lo:lo + m]
    for t in range(m):
        u = x0 - k0[t]
        dist[t] = u * u
    for a in range(1, d):
        xa, ka = xT[a, i], xT[a, lo:lo + m]
        for t in range(m):
            u = xa - ka[t]
            dist[t] += u * u


@njit(cache=True, fastmath=FASTMATH)
def sqdist_pair(xT, i, j):
    d2 = xT.dtype.type(0.0)
    for a in range(xT.shape[0]):
        u = xT[a, i] - xT[a, j]
        d2 += u * u
    return d2


@njit(cache=True)
def mask_radius(s, dist, m, r2):
    """s[t] = −inf where the pair is outside the radius (weight exactly 0)."""
    for t in range(m):
        if dist[t] > r2:
            s[t] = -np.inf


@njit(cache=True, fastmath={"contract", "arcp", "nsz", "reassoc"})
def _count_ge(s, m, thr):
    c = 0
    for t in range(m):
        c += s[t] >= thr
    return c


@njit(cache=True)
def top_k(s, idx, m, lo, contiguous, k):
    """Keep the k largest s[:m] (ties to the smaller key); returns (c, contiguous).

    Usually every score equal to the k-th largest is kept: then the others are set to −inf in
    place (weight exactly 0) and the row stays as it was (c = m). Otherwise (a tie split by the
    k slots) the kept entries are compacted into s[:k], idx[:k] ascending (contiguous False).

    The k-th largest value is found exactly by bisection — a few halvings in value space (usually
    enough to isolate exactly k values), then on the integer order keys of the floats (exact, at
    most 32/64 vectorised counting passes); then one branch-free forward pass keeps every
    s > threshold and the first (smallest-j) entries equal to it.
    """
    mn, mx = -row_max(s, m, -1), row_max(s, m)
    if _count_ge(s, m, mx) >= k:  # ties at the maximum fill the k slots
        lo_key = hi_key = float_key(mx)
    else:
        # value-space bisection first (usually isolates exactly k values within a few passes);
        # invariant: count(≥ a) ≥ k > count(≥ b)
        a, b, half = mn, mx, s.dtype.type(0.5)  # stay in the storage dtype (keys depend on it)
        for _ in range(VALUE_BISECTIONS):
            mid = a + (b - a) * half
            if not (a < mid < b):
                break
            cnt = _count_ge(s, m, mid)
            if cnt >= k:
                a = mid
                if cnt == k:
                    b = a
                    break
            else:
                b = mid
        # exact finish on the integer order keys: largest key with count(≥ key) ≥ k
        lo_key, hi_key = float_key(a), (float_key(b) - 1 if b > a else float_key(a))
        while lo_key < hi_key:
            mid = (lo_key >> 1) + (hi_key >> 1) + ((lo_key & 1) | (hi_key & 1))  # ceil, no overflow
            cnt = _count_ge(s, m, key_float(mid, mx))
            if cnt >= k:
                lo_key = mid
                if cnt == k:
                    break
            else:
                hi_key = mid - 1
    thr = key_float(lo_key, mx)
    n_ge, n_gt = _count_ge(s, m, thr), 0
    for t in range(m):
        n_gt += s[t] > thr
    ties = k - n_gt
    if ties == n_ge - n_gt:  # every score equal to the threshold is kept (always, without ties):
        for t in range(m):  # mask the rest to −inf (weight exactly 0), no compaction, no gather
            s[t] = s[t] if s[t] >= thr else -np.inf
        return m, contiguous
    c = 0
    if contiguous:  # branch-free compaction (the keep pattern is random: branches would mispredict)
        for t in range(m):
            v = s[t]
            eq = np.int64(v == thr) & np.int64(ties > 0)
            keep = np.int64(v > thr) | eq
            ties -= eq
            s[c] = v
            idx[c] = lo + t
            c += keep
    else:
        for t in range(m):
            v, j = s[t], idx[t]
            eq = np.int64(v == thr) & np.int64(ties > 0)
            keep = np.int64(v > thr) | eq
            ties -= eq
            s[c] = v
            idx[c] = j
            c += keep
    return c, False


@njit(cache=True, fastmath=FASTMATH | {"nnan"})
def row_max(s, c, sign=1):
    """max s[:c] (sign = −1: −min s[:c]) with eight independent lanes (a plain max reduction does
    not vectorise)."""
    f = s.dtype.type(sign)
    a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = f * s[0]
    t = 0
    while t + 8 <= c:
        a0, a1 = max(a0, f * s[t]), max(a1, f * s[t + 1])
        a2, a3 = max(a2, f * s[t + 2]), max(a3, f * s[t + 3])
        a4, a5 = max(a4, f * s[t + 4]), max(a5, f * s[t + 5])
        a6, a7 = max(a6, f * s[t + 6]), max(a7, f * s[t + 7])
        t += 8
    mx = max(max(max(a0, a1), max(a2, a3)), max(max(a4, a5), max(a6, a7)))
    while t < c:
        mx = max(mx, f * s[t])
        t += 1
    return mx


@njit(cache=True, fastmath=FASTMATH)
def row_weights(s, c, normalise, n):
    """s[:c] ← exp(s − max) (normalised) or exp(s); returns the row factor 1/Σ or 1/n."""
    if normalise:
        mx = row_max(s, c)
        tot = s.dtype.type(0.0)
        for t in range(c):
            e = fexp(s[t] - mx)
            s[t] = e
            tot += e
        return 1.0 / tot
    for t in range(c):
        s[t] = fexp(s[t])
    return 1.0 / n


@njit(cache=True)
def row(i, lo, m, contiguous, xT, qT, kT, score, beta, inv2s2, r2, use_radius, top_k_, normalise,
        s, idx, dist):
    """Scores, support and weights of query row i; returns (c, contiguous, factor).

    contiguous: keys lo..lo+m−1 on entry; else idx[:m] (ascending). On return the weights are
    factor·s[:c] for keys lo + t (contiguous) or idx[t].
    """
    n = xT.shape[1]
    if contiguous:
        scores_range(i, lo, m, qT, kT, score, beta, inv2s2, s)
        if use_radius:
            sqdist_range(i, lo, m, xT, dist)
            mask_radius(s, dist, m, r2)
    else:
        if use_radius:  # list mode: drop keys outside the radius (the list may be a superset)
            c = 0
            for t in range(m):
                if sqdist_pair(xT, i, idx[t]) <= r2:
                    idx[c] = idx[t]
                    c += 1
            m = c
        scores_list(i, idx, m, qT, kT, score, beta, inv2s2, s)
    if top_k_ > 0 and m > top_k_:
        m, contiguous = top_k(s, idx, m, lo, contiguous, top_k_)
    factor = row_weights(s, m, normalise, n)
    return m, contiguous, factor


@njit(cache=True, fastmath=FASTMATH)
def accumulate(i, lo, c, contiguous, factor, s, idx, vT, out):
    """out[i, a] = factor · Σ_t s[t] vT[a, key_t]."""
    d = vT.shape[0]
    for a in range(d):
        acc = s.dtype.type(0.0)
        if contiguous:
            va = vT[a, lo:lo + c]
            for t in range(c):
                acc += s[t] * va[t]
        else:
            for t in range(c):
                acc += s[t] * vT[a, idx[t]]
        out[i, a] = acc * factor


@njit(cache=True)
def scatter_weights(i, lo, c, contiguous, factor, s, idx, out):
    """Dense row out[i, :] of a_ij (zero outside N(i))."""
    for j in range(out.shape[1]):
        out[i, j] = 0.0
    for t in range(c):
        out[i, lo + t if contiguous else idx[t]] = s[t] * factor


# --- fused single pass for small d (no top-k): scores, exp and Σ w·v without a scores buffer -----

FUSED_MAX_DIM = 4


def static(code: int) -> tuple:
    """(0,)·(code + 1): numba sees a tuple's length as a compile-time constant, so a kernel taking
    static(code) and reading ``len(t) − 1`` is compiled once per code with its branches folded."""
    return (0,) * (int(code) + 1)


@njit(cache=True, fastmath=FASTMATH, inline="always")
def _dot4(D, t, a0, a1, a2, a3, b0, b1, b2, b3):
    """Σ_{c<D} a_c·b_c[t] for D ≤ 4 (D constant after inlining: the branches fold away)."""
    s = a0 * b0[t]
    if D > 1:
        s += a1 * b1[t]
    if D > 2:
        s += a2 * b2[t]
    if D > 3:
        s += a3 * b3[t]
    return s


@njit(cache=True, fastmath=FASTMATH, inline="always")
def _sqdist4(D, t, a0, a1, a2, a3, b0, b1, b2, b3):
    """Σ_{c<D} (a_c − b_c[t])² for D ≤ 4."""
    u = a0 - b0[t]
    s = u * u
    if D > 1:
        u = a1 - b1[t]
        s += u * u
    if D > 2:
        u = a2 - b2[t]
        s += u * u
    if D > 3:
        u = a3 - b3[t]
        s += u * u
    return s


@njit(cache=True, fastmath=FASTMATH)
def fused_range(dims, score_s, radius_s, i, lo, m, shift, xT, qT, kT, vT, beta, inv2s2, r2):
    """One pass over keys lo..lo+m−1: (Σ w, Σ w·v_0, …, Σ w·v_3) with w = exp(s_ij − shift) (0 outside
    the radius). d = len(dims) ≤ 4, the score code and use_radius are compile-time constants
    (:func:`static`), so the component loops unroll, the branches fold and the key loop vectorises
    (the same score formulas as scores_range, written per component).

    log2(e) is folded into the query and the shift, w = 2^y with y = log2(e)·(s_ij − shift), and the
    exp is :func:`fastexp.exp2_sat` (a term that underflows counts as 2^-126 instead of 0: at most
    2^-126 of the row sum, which ``velocity_fused`` keeps ≥ its ``tiny``).
    """
    D, score, use_radius = len(dims), len(score_s) - 1, len(radius_s) - 1
    e1, e2, e3 = min(1, D - 1), min(2, D - 1), min(3, D - 1)
    hi = lo + m
    k0, k1, k2, k3 = kT[0, lo:hi], kT[e1, lo:hi], kT[e2, lo:hi], kT[e3, lo:hi]
    v0, v1, v2, v3 = vT[0, lo:hi], vT[e1, lo:hi], vT[e2, lo:hi], vT[e3, lo:hi]
    x0, x1, x2, x3 = xT[0, lo:hi], xT[e1, lo:hi], xT[e2, lo:hi], xT[e3, lo:hi]
    q0, q1, q2, q3 = qT[0, i], qT[e1, i], qT[e2, i], qT[e3, i]
    y0, y1, y2, y3 = xT[0, i], xT[e1, i], xT[e2, i], xT[e3, i]
    zero = q0 - q0
    log2e = xT.dtype.type(LOG2E)
    b = beta * log2e  # softmax: y = Σ_c (b·q_c)·k_c − log2(e)·shift
    bq0, bq1, bq2, bq3 = b * q0, b * q1, b * q2, b * q3
    y_shift = -shift * log2e
    g = -inv2s2 * log2e  # rbf: y = g·‖q − k‖² − log2(e)·shift
    tot, a0, a1, a2, a3 = zero, zero, zero, zero, zero
    for t in range(m):
        if score == SOFTMAX:
            y = _dot4(D, t, bq0, bq1, bq2, bq3, k0, k1, k2, k3) + y_shift
        elif score == RBF:
            y = g * _sqdist4(D, t, q0, q1, q2, q3, k0, k1, k2, k3) + y_shift
        else:
            y = y_shift
        w = exp2_sat(y)
        if use_radius:
            w = zero if _sqdist4(D, t, y0, y1, y2, y3, x0, x1, x2, x3) > r2 else w
        tot += w
        a0 += w * v0[t]
        if D > 1:
            a1 += w * v1[t]
        if D > 2:
            a2 += w * v2[t]
        if D > 3:
            a3 += w * v3[t]
    return tot, a0, a1, a2, a3
