"""Radius restriction in low dimension: cKDTree neighbour lists (CSR) + the row kernel over them.

The tree is queried with a radius slightly larger than √r2, so the lists are a superset of the
support; the row kernel then applies the exact test ‖x_i − x_j‖² ≤ r2 (the same predicate and
tolerance as every other path), and the window/causal range. Lists are sorted by j so top-k ties
still go to the smaller j. Cost O(n log n + #pairs) instead of O(n²).

Whether the lists pay off is decided per call from a sampled neighbour fraction: when the
particles have gathered into a few clusters most pairs are neighbours and the dense range kernel
is faster; then :func:`neighbour_lists` returns None.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange
from scipy.spatial import cKDTree

from .rows import ROWS_PER_TASK, accumulate, candidate_range, row

MAX_DIM = 3  # kd-trees lose their edge above this
MIN_N = 2048  # below this the dense kernel is as fast
MAX_FRACTION = 0.1  # sampled neighbour fraction above which the dense kernel wins
SAMPLE = (256, 2048)  # queries × keys for the density estimate


def neighbour_fraction(x: np.ndarray, r2, seed: int = 0) -> float:
    """Estimated fraction of pairs within the radius, from a fixed random sample of pairs."""
    n = x.shape[0]
    rng = np.random.default_rng(seed)
    a = x[rng.choice(n, min(n, SAMPLE[0]), replace=False)].astype(np.float64)
    b = x[rng.choice(n, min(n, SAMPLE[1]), replace=False)].astype(np.float64)
    d2 = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
    return float(np.mean(d2 <= float(r2)))


@njit(cache=True)
def _csr_from_pairs(pairs, n):
    """Symmetric CSR (with the diagonal) from i < j pairs; rows sorted ascending."""
    counts = np.ones(n, np.int64)
    for t in range(pairs.shape[0]):
        counts[pairs[t, 0]] += 1
        counts[pairs[t, 1]] += 1
    indptr = np.zeros(n + 1, np.int64)
    for i in range(n):
        indptr[i + 1] = indptr[i] + counts[i]
    fill = indptr[:-1].copy()
    indices = np.empty(indptr[n], np.int64)
    for i in range(n):
        indices[fill[i]] = i
        fill[i] += 1
    for t in range(pairs.shape[0]):
        i, j = pairs[t, 0], pairs[t, 1]
        indices[fill[i]] = j
        fill[i] += 1
        indices[fill[j]] = i
        fill[j] += 1
    return indptr, indices


@njit(parallel=True, cache=True)
def _sort_rows(indptr, indices):
    for i in prange(indptr.shape[0] - 1):
        indices[indptr[i]:indptr[i + 1]] = np.sort(indices[indptr[i]:indptr[i + 1]])


def neighbour_lists(x: np.ndarray, r2, max_fraction: float = MAX_FRACTION):
    """(indptr, indices) of a superset of the radius neighbours, or None when too dense to pay off."""
    if max_fraction < 1.0 and neighbour_fraction(x, r2) > max_fraction:
        return None
    n = x.shape[0]
    radius = float(np.sqrt(np.float64(r2))) * (1.0 + 1e-6) + 1e-300
    pairs = cKDTree(x.astype(np.float64)).query_pairs(radius, output_type="ndarray").astype(np.int64)
    indptr, indices = _csr_from_pairs(pairs, n)
    _sort_rows(indptr, indices)
    return indptr, indices


@njit(parallel=True, cache=True)
def velocity_lists(spec, indptr, indices, xT, qT, kT, vT, out):
    """out[i] = Σ_{j∈N(i)} a_ij V x_j with the candidates of row i = indices[indptr[i]:indptr[i+1]]."""
    n = xT.shape[1]
    m_max = 1
    for i in range(n):
        m_max = max(m_max, indptr[i + 1] - indptr[i])
    tasks = (n + ROWS_PER_TASK - 1) // ROWS_PER_TASK
    for task in prange(tasks):
        s = np.empty(m_max, xT.dtype)
        dist = np.empty(1, xT.dtype)
        idx = np.empty(m_max, np.int64)
        for i in range(task * ROWS_PER_TASK, min(n, (task + 1) * ROWS_PER_TASK)):
            lo, hi = candidate_range(i, n, spec.window, spec.causal)
            m = 0
            for t in range(indptr[i], indptr[i + 1]):
                j = indices[t]
                if lo <= j < hi:
                    idx[m] = j
                    m += 1
            c, contiguous, factor = row(spec, i, lo, m, False, xT, qT, kT, s, idx, dist)
            accumulate(i, lo, c, contiguous, factor, s, idx, vT, out)
    return out
