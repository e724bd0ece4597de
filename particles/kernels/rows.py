"""The row maths shared by every kernel path: scores, support, top-k, weights, v_i = Σ a_ij V x_j.

One query row i at a time, over either a contiguous key range [lo, lo + m) (dense, causal,
windowed) or an explicit ascending key list idx[:m] (neighbour lists). Arrays are component-major
(d, n) so the inner loops run over keys with unit stride and vectorise. Arithmetic is in the
storage dtype (float32 or float64); the exp is :func:`fastexp.fexp`.

* scores      s_ij = β⟨q_i, k_j⟩ (softmax), −‖q_i − k_j‖²·inv2s2 (rbf) or 0 (flat);
* radius      ‖x_i − x_j‖² ≤ r2 = radius_bound_sq(r, dtype) (documented tolerance): keys outside get
              s = −inf, which gives weight exactly 0 (or, in list mode, are dropped);
* top-k       the k largest scores (ties to the smaller j): a threshold found by counting passes
              (interpolation, halving, then bisection on the floats' integer order keys) — exact,
              O(m) per pass, no sort, no allocation;
* weights     exp(s − max s)/Σ (normalised) or exp(s)/n (usa); the 1/Σ or 1/n factor is applied once
              per row, in :func:`accumulate`.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numba import njit

from .fastexp import (
    BLOCK_BYTES,
    LOG2E,
    count_ge_block,
    exp2_sat,
    fexp,
    float_key,
    key_float,
    order_bits,
    order_float,
)

SOFTMAX, RBF, FLAT = 0, 1, 2
SCORE_CODE = {"softmax": SOFTMAX, "rbf": RBF, "flat": FLAT}
FASTMATH = {"contract", "arcp", "nsz", "reassoc"}  # no nnan/ninf: −inf masks and usa overflow stay exact
VALUE_SEARCHES = 12  # top-k: value-space passes before the exact integer-key bisection
ROWS_PER_TASK = 128  # rows per parallel task (per-task scratch buffers are allocated once)


class RowSpec(NamedTuple):
    """The run-time parameters of one interaction as every kernel reads them (built once per
    VelocityField; the floats in the storage dtype). Compile-time choices (the dimension for d ≤ 4,
    the score code and the radius flag of the fused kernels) travel separately as :func:`static`
    tuples, so that the kernels that branch on them at run time are compiled once per dtype."""

    score: int  # SOFTMAX, RBF or FLAT
    beta: float  # softmax: s = β⟨q, k⟩
    inv2s2: float  # rbf: s = −‖q − k‖²·inv2s2, inv2s2 = 1/(2σ²)
    r2: float  # radius_bound_sq(radius) (0 without a radius)
    use_radius: bool
    window: int  # 0: no window
    causal: bool
    top_k: int  # 0: no top-k
    normalise: bool  # False: usa weights exp(s)/n
    tiny: float  # fused kernels: Σ exp(s − bound) below this → redo the row with its exact max


@njit(cache=True, inline="always")
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


@njit(cache=True, fastmath=FASTMATH, inline="always")
def scores_range(dims, i, lo, m, qT, kT, score, beta, inv2s2, s):
    """s[t] = s_{i, lo+t} for t < m (slices keep the indices provably ≥ 0, so the loops vectorise);
    returns (min, max) of s[:m] (m ≥ 1). d = len(dims) ≤ 4: one pass over the keys, the min and max
    kept on the way; dims = (): one pass per component (any d), then row_min_max."""
    d, D = qT.shape[0], len(dims)
    if score == FLAT:
        for t in range(m):
            s[t] = 0.0
        return s[0], s[0]
    k0 = kT[0, lo:lo + m]
    if D > 0:
        e1, e2, e3 = min(1, D - 1), min(2, D - 1), min(3, D - 1)
        k1, k2, k3 = kT[e1, lo:lo + m], kT[e2, lo:lo + m], kT[e3, lo:lo + m]
        q0, q1, q2, q3 = qT[0, i], qT[e1, i], qT[e2, i], qT[e3, i]
        inf = s.dtype.type(np.inf)
        bits_lo, bits_hi = order_bits(inf), order_bits(-inf)
        if score == SOFTMAX:
            q0, q1, q2, q3 = q0 * beta, q1 * beta, q2 * beta, q3 * beta
            for t in range(m):
                v = _dot4(D, t, q0, q1, q2, q3, k0, k1, k2, k3)
                s[t] = v
                b = order_bits(v)
                bits_lo, bits_hi = min(bits_lo, b), max(bits_hi, b)
        else:
            for t in range(m):
                v = _sqdist4(D, t, q0, q1, q2, q3, k0, k1, k2, k3) * -inv2s2
                s[t] = v
                b = order_bits(v)
                bits_lo, bits_hi = min(bits_lo, b), max(bits_hi, b)
        return order_float(bits_lo), order_float(bits_hi)
    if score == SOFTMAX:
        q0 = qT[0, i] * beta
        for t in range(m):
            s[t] = q0 * k0[t]
        for a in range(1, d):
            qa = qT[a, i] * beta
            ka = kT[a, lo:lo + m]
            for t in range(m):
                s[t] += qa * ka[t]
        return row_min_max(s, m)
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
    return row_min_max(s, m)


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


@njit(cache=True, fastmath=FASTMATH)
def _count_ge(s, m, thr):
    """#{t < m : s[t] ≥ thr}: whole 512-bit blocks by :func:`fastexp.count_ge_block` (compare mask +
    popcount; the top-k search waits on each count in turn, and a vector horizontal sum at the end
    of a counting loop made each count ~1.2× slower), then the tail one value at a time."""
    block = BLOCK_BYTES // s.itemsize
    full = m - m % block
    c = 0
    for t in range(0, full, block):
        c += count_ge_block(s, t, thr)
    for t in range(full, m):
        c += s[t] >= thr
    return c


# --- top-k ----------------------------------------------------------------------------------------

EXACT, TIE = True, False  # count(≥ thr) = k exactly; or thr is a k-th largest value shared by a tie


@njit(cache=True)
def _bisect_keys(s, m, k, a, b):
    """Bisection on the floats' integer order keys in [a, b], given count(≥ a) ≥ k: the largest
    threshold with count ≥ k, which is the k-th largest value (exact, at most 32/64 passes).
    Returns (thr, state)."""
    lo_key, hi_key = float_key(a), float_key(b)
    while lo_key < hi_key:
        mid = (lo_key >> 1) + (hi_key >> 1) + ((lo_key & 1) | (hi_key & 1))  # ceil, no overflow
        c = _count_ge(s, m, key_float(mid, a))
        if c >= k:
            lo_key = mid
            if c == k:
                return key_float(mid, a), EXACT
        else:
            hi_key = mid - 1
    thr = key_float(lo_key, a)
    return thr, _count_ge(s, m, thr) == k


@njit(cache=True)
def top_k_threshold(s, m, k, mn, mx):
    """(thr, state) for the k largest of s[:m], m > k, given mn, mx = min, max s[:m]: count(≥ thr) = k
    (state EXACT), or thr is the k-th largest value and more than k values are ≥ it (TIE).

    A root search on f(t) = count(s ≥ t) − k − ½, each evaluation one vectorised count, keeping
    f(a) > 0 > f(b) from [a, b] = [min, max] (min raised to the finite range past radius-masked
    −inf entries; at the max, f = 1 − k − ½ is a guess: ties at the max are left to the bisection):
    regula falsi t = b − (b − a)·f(b)/(f(b) − f(a)) with the Illinois rule (an end kept twice in a
    row has its f halved), which lands on a count of exactly k in ~4 passes for evenly spread
    scores; when the floats run out, bisection on their integer order keys (exact).
    """
    big, half = s.dtype.type(np.finfo(s.dtype).max), s.dtype.type(0.5)
    a, ca, b = mn, m, mx
    if a < -big:  # radius-masked −inf entries
        c = _count_ge(s, m, -big)
        if c == k:  # exactly k finite scores (f(−big) = −½ too: no secant through a and b)
            return -big, EXACT
        if c > k:
            a, ca = -big, c
    fa, fb = s.dtype.type(ca - k) - half, s.dtype.type(1 - k) - half
    kept = 0  # +1: a was moved last, −1: b was
    for _ in range(VALUE_SEARCHES):
        t = b - (b - a) * (fb / (fb - fa))
        if not (a < t < b):
            break
        c = _count_ge(s, m, t)
        if c == k:
            return t, EXACT
        fc, above = s.dtype.type(c - k) - half, c > k  # (selects, not branches: a coin toss)
        fb = fb * half if above and kept > 0 else fb
        fa = fa * half if not above and kept < 0 else fa
        a, fa = (t, fc) if above else (a, fa)
        b, fb = (b, fb) if above else (t, fc)
        kept = 1 if above else -1
    return _bisect_keys(s, m, k, a, b)


@njit(cache=True)
def keep_top(s, idx, m, lo, contiguous, k, thr, state):
    """Keep the k largest s[:m] given their threshold (ties to the smaller key); returns (c, contiguous).

    EXACT: the others are set to −inf in place (weight exactly 0) and the row stays as it was
    (c = m). TIE: the kept entries — every s > thr, then the first (smallest-j) ones equal to it —
    are compacted into s[:k], idx[:k] ascending (contiguous False) by one branch-free pass.
    """
    if state:  # EXACT: no compaction, no gather
        for t in range(m):
            s[t] = s[t] if s[t] >= thr else -np.inf
        return m, contiguous
    ties = k
    for t in range(m):
        ties -= s[t] > thr
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


@njit(cache=True, fastmath=FASTMATH)
def row_min_max(s, c):
    """(min s[:c], max s[:c]) as integer min/max over the floats' order_bits (numba's float max
    reduction stays scalar; the integer one vectorises)."""
    lo = hi = order_bits(s[0])
    for t in range(1, c):
        b = order_bits(s[t])
        lo, hi = min(lo, b), max(hi, b)
    return order_float(lo), order_float(hi)


@njit(cache=True, fastmath=FASTMATH)
def row_weights(s, c, normalise, n):
    """s[:c] ← exp(s − max s) (normalised) or exp(s); returns the row factor 1/Σ or 1/n."""
    if normalise:
        mx = row_min_max(s, c)[1]
        tot = s.dtype.type(0.0)
        for t in range(c):
            e = fexp(s[t] - mx)
            s[t] = e
            tot += e
        return 1.0 / tot
    for t in range(c):
        s[t] = fexp(s[t])
    return 1.0 / n


@njit(cache=True, inline="always")
def row_scores(dims, i, lo, m, contiguous, xT, qT, kT, score, beta, inv2s2, r2, use_radius, s, idx, dist):
    """Scores of query row i into s[:m]; returns (m, min, max). contiguous: keys lo..lo+m−1, keys
    outside the radius get −inf; else keys idx[:m] (ascending), those outside the radius are dropped."""
    if contiguous:
        mn, mx = scores_range(dims, i, lo, m, qT, kT, score, beta, inv2s2, s)
        if use_radius:
            sqdist_range(i, lo, m, xT, dist)
            mask_radius(s, dist, m, r2)
            mn, mx = row_min_max(s, m)
        return m, mn, mx
    if use_radius:  # the list may be a superset of the radius neighbours
        c = 0
        for t in range(m):
            if sqdist_pair(xT, i, idx[t]) <= r2:
                idx[c] = idx[t]
                c += 1
        m = c
    scores_list(i, idx, m, qT, kT, score, beta, inv2s2, s)
    mn, mx = row_min_max(s, m)
    return m, mn, mx


@njit(cache=True, fastmath=FASTMATH)
def row(spec, i, lo, m, contiguous, xT, qT, kT, s, idx, dist):
    """Scores, support and weights of query row i; returns (c, contiguous, factor).

    contiguous: keys lo..lo+m−1 on entry; else idx[:m] (ascending). On return the weights are
    factor·s[:c] for keys lo + t (contiguous) or idx[t].
    """
    m, mn, mx = row_scores((), i, lo, m, contiguous, xT, qT, kT, spec.score, spec.beta, spec.inv2s2, spec.r2,
                           spec.use_radius, s, idx, dist)
    top_k = spec.top_k
    if top_k > 0 and m > top_k:
        thr, state = top_k_threshold(s, m, top_k, mn, mx)
        m, contiguous = keep_top(s, idx, m, lo, contiguous, top_k, thr, state)
    factor = row_weights(s, m, spec.normalise, xT.shape[1])
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


@njit(cache=True, inline="always")
def _add_weighted4(D, t, w, v0, v1, v2, v3, tot, a0, a1, a2, a3):
    """(Σw, Σw·v_0, …, Σw·v_3) with the weight w of key t added; the first D ≤ 4 components count."""
    a1 = a1 + w * v1[t] if D > 1 else a1
    a2 = a2 + w * v2[t] if D > 2 else a2
    a3 = a3 + w * v3[t] if D > 3 else a3
    return tot + w, a0 + w * v0[t], a1, a2, a3


@njit(cache=True, inline="always")
def store_row(out, r, D, f, a0, a1, a2, a3):
    """out[r, c] = f·a_c for the first D ≤ 4 components (f = 1/Σw, or 1/n for usa)."""
    out[r, 0] = a0 * f
    if D > 1:
        out[r, 1] = a1 * f
    if D > 2:
        out[r, 2] = a2 * f
    if D > 3:
        out[r, 3] = a3 * f


@njit(cache=True, fastmath=FASTMATH, inline="always")
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
        tot, a0, a1, a2, a3 = _add_weighted4(D, t, w, v0, v1, v2, v3, tot, a0, a1, a2, a3)
    return tot, a0, a1, a2, a3


@njit(cache=True, fastmath=FASTMATH, inline="always")
def weighted_sum_range(dims, s, lo, m, thr, mx, normalise, vT):
    """(Σ w, Σ w·v_0, …, Σ w·v_3) over the scores s[:m] of keys lo..lo+m−1 in one pass, with
    w_t = exp(s_t − mx) (normalised; exp(s_t) for usa) where s_t ≥ thr and s_t > −inf, 0 elsewhere:
    the top-k mask, the weights and Σ a_ij V x_j of :func:`keep_top`, :func:`row_weights` and
    :func:`accumulate` without writing the row back (d = len(dims) ≤ 4). The exp is exp2_sat, as
    in :func:`fused_range`."""
    D = len(dims)
    e1, e2, e3 = min(1, D - 1), min(2, D - 1), min(3, D - 1)
    hi = lo + m
    v0, v1, v2, v3 = vT[0, lo:hi], vT[e1, lo:hi], vT[e2, lo:hi], vT[e3, lo:hi]
    zero = mx - mx
    log2e = s.dtype.type(LOG2E)
    y_shift = -mx * log2e if normalise else zero
    floor = max(thr, s.dtype.type(-np.finfo(s.dtype).max))  # −inf entries (radius-masked) never count
    tot, a0, a1, a2, a3 = zero, zero, zero, zero, zero
    for t in range(m):
        w = exp2_sat(s[t] * log2e + y_shift)
        w = w if s[t] >= floor else zero
        tot, a0, a1, a2, a3 = _add_weighted4(D, t, w, v0, v1, v2, v3, tot, a0, a1, a2, a3)
    return tot, a0, a1, a2, a3
