"""1-D Hegselmann–Krause: sorted two-pointer sweep over compensated prefix sums, O(n) per step.

The synchronous HK map preserves the order of opinions (x_i ≤ x_j ⇒ x_i' ≤ x_j', and Euler with
dt ≤ 1 keeps it), so the permutation sorting x is computed once and reused: each call gathers
x in that order, checks it is still non-decreasing (re-sorting if not — noise, dt > 1, or a new
state), and sweeps. For the sorted opinions the neighbourhood {j : (x_j − x_i)² ≤ r2} is an index
interval [lo, hi] whose ends only move forward, with the same predicate (and the same r2 =
radius_bound_sq) as every other path. The mean over it is (P[hi+1] − P[lo])/(hi − lo + 1) with
prefix sums P kept in float64 as an unevaluated sum hi + lo (TwoSum), so the window sums keep full
relative accuracy even for 10⁶ opinions.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

CHUNK = 4096  # positions per parallel task in the sweep


@njit(parallel=True, cache=True)
def gather_sorted(x, perm, xs):
    """xs = x[perm]; returns the number of order violations xs[p] < xs[p − 1]."""
    n = x.shape[0]
    bad = 0
    for p in prange(n):
        xs[p] = x[perm[p]]
        if p > 0 and x[perm[p]] < x[perm[p - 1]]:
            bad += 1
    return bad


@njit(cache=True)
def prefix_sums(xs, p_hi, p_lo):
    """P[k] = Σ_{p<k} xs[p] in float64 as p_hi[k] + p_lo[k] (TwoSum compensation; no fastmath)."""
    s, c = 0.0, 0.0
    p_hi[0], p_lo[0] = 0.0, 0.0
    for p in range(xs.shape[0]):
        v = np.float64(xs[p])
        t = s + v
        bb = t - s
        c += (s - (t - bb)) + (v - bb)
        s = t
        p_hi[p + 1] = s
        p_lo[p + 1] = c


@njit(cache=True)
def _near(xs, p, j, r2):
    u = xs[j] - xs[p]
    return u * u <= r2


@njit(parallel=True, cache=True)
def sweep(xs, perm, p_hi, p_lo, r2, out):
    """out[perm[p]] = mean{xs[j] : (xs[j] − xs[p])² ≤ r2} for sorted xs."""
    n = xs.shape[0]
    tasks = (n + CHUNK - 1) // CHUNK
    for task in prange(tasks):
        start = task * CHUNK
        # first neighbour of `start` by bisection (the predicate is monotone on a sorted array)
        a, b = 0, start
        while a < b:
            mid = (a + b) // 2
            if _near(xs, start, mid, r2):
                b = mid
            else:
                a = mid + 1
        lo, hi = a, start
        for p in range(start, min(n, start + CHUNK)):
            while not _near(xs, p, lo, r2):
                lo += 1
            if hi < p:
                hi = p
            while hi + 1 < n and _near(xs, p, hi + 1, r2):
                hi += 1
            total = (p_hi[hi + 1] - p_hi[lo]) + (p_lo[hi + 1] - p_lo[lo])
            out[perm[p]] = total / (hi - lo + 1)


class SortedSweep:
    """Callable x (n, 1) ↦ v (n, 1), v_i = mean of x_j within the radius; keeps the sort between calls."""

    def __init__(self):
        self.perm = None
        self.resorts = 0

    def __call__(self, x: np.ndarray, r2) -> np.ndarray:
        flat = np.ascontiguousarray(x[:, 0])
        n = flat.shape[0]
        xs = np.empty_like(flat)
        if self.perm is None or self.perm.shape[0] != n or gather_sorted(flat, self.perm, xs) > 0:
            self.perm = np.argsort(flat, kind="stable")
            self.resorts += 1
            gather_sorted(flat, self.perm, xs)
        p_hi, p_lo = np.empty(n + 1), np.empty(n + 1)
        prefix_sums(xs, p_hi, p_lo)
        out = np.empty_like(flat)
        sweep(xs, self.perm, p_hi, p_lo, r2, out)
        return out[:, None]
