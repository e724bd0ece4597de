"""1-D Hegselmann–Krause: sorted two-pointer sweep with compensated window sums, O(n) per step.

The synchronous HK map preserves the order of opinions (x_i ≤ x_j ⇒ x_i' ≤ x_j', and Euler with
dt ≤ 1 keeps it), so the permutation sorting x is computed once and reused: each call gathers
x in that order, checks it is still non-decreasing (re-sorting if not — noise, dt > 1, or a new
state), and sweeps. For the sorted opinions the neighbourhood {j : (x_j − x_i)² ≤ r2} is an index
interval [lo, hi] whose ends only move forward, with the same predicate (and the same r2 =
radius_bound_sq) as every other path. The mean over it is (P[hi+1] − P[lo])/(hi − lo + 1) with prefix
sums P kept in float64 as an unevaluated sum hi + lo (TwoSum), so window sums keep full relative
accuracy even for 10⁶ opinions.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

CHUNK = 1 << 16  # positions per parallel task in the sweep


@njit(cache=True)
def gather_sorted(x, perm, xs):
    """xs = x[perm]; returns the number of order violations xs[p] < xs[p − 1]."""
    n = x.shape[0]
    bad = 0
    for p in range(n):  # serial: on 2 shared cores a parallel random gather was slower
        xs[p] = x[perm[p]]
        if p > 0 and x[perm[p]] < x[perm[p - 1]]:
            bad += 1
    return bad


@njit(cache=True)
def _two_sum_add(s, c, v):
    """(s, c) ← s + c + v with the rounding error of s + v kept in c (TwoSum; no fastmath here)."""
    t = s + v
    bb = t - s
    c += (s - (t - bb)) + (v - bb)
    return t, c


@njit(cache=True)
def _near(xs, p, j, r2):
    u = xs[j] - xs[p]
    return u * u <= r2


@njit(cache=True)
def _first_near(xs, p, r2):
    """Smallest j ≤ p with (xs[j] − xs[p])² ≤ r2 (the predicate is monotone on a sorted array)."""
    a, b = 0, p
    while a < b:
        mid = (a + b) // 2
        if _near(xs, p, mid, r2):
            b = mid
        else:
            a = mid + 1
    return a


@njit(cache=True)
def _last_near(xs, p, r2):
    """Largest j ≥ p with (xs[j] − xs[p])² ≤ r2."""
    a, b = p, xs.shape[0] - 1
    while a < b:
        mid = (a + b + 1) // 2
        if _near(xs, p, mid, r2):
            a = mid
        else:
            b = mid - 1
    return a


@njit(cache=True)
def prefix_sums(xs, p_hi, p_lo):
    """P[k] = Σ_{p<k} xs[p] in float64 as the unevaluated sum p_hi[k] + p_lo[k] (TwoSum)."""
    s, c = 0.0, 0.0
    p_hi[0], p_lo[0] = 0.0, 0.0
    for p in range(xs.shape[0]):
        s, c = _two_sum_add(s, c, np.float64(xs[p]))
        p_hi[p + 1] = s
        p_lo[p + 1] = c


@njit(parallel=True, cache=True)
def sweep(xs, perm, p_hi, p_lo, r2, out):
    """out[perm[p]] = mean{xs[j] : (xs[j] − xs[p])² ≤ r2} for sorted xs.

    Each task finds the neighbour interval [lo, hi] of its first position by bisection, then both
    ends only move forward; the window sum is the difference of the compensated prefix sums.
    """
    n = xs.shape[0]
    tasks = (n + CHUNK - 1) // CHUNK
    for task in prange(tasks):
        start = task * CHUNK
        lo, hi = _first_near(xs, start, r2), _last_near(xs, start, r2)
        for p in range(start, min(n, start + CHUNK)):
            # the ends typically move by about one per position: two branch-free conditional steps,
            # then loops that are rarely entered (so the branches predict well)
            for _ in range(2):
                nxt = min(hi + 1, n - 1)
                hi += np.int64(_near(xs, p, nxt, r2)) * (nxt - hi)
                lo += 1 - np.int64(_near(xs, p, lo, r2))
            while hi + 1 < n and _near(xs, p, hi + 1, r2):
                hi += 1
            while not _near(xs, p, lo, r2):
                lo += 1
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
