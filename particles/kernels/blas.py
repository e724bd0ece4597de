"""Dense softmax in higher dimension: row blocks of BLAS matmuls around the shared row weights.

For d > 4 the scores β⟨q_i, k_j⟩ of a block of rows are one sgemm/dgemm (numpy's BLAS), the
weights are computed in place by :func:`.rows.row_weights` (stable row max, polynomial exp, in
parallel over rows), and v = (weights @ Vx) · factor is a second matmul. Blocks hold at most
BLOCK_ENTRIES scores, so memory stays O(n·block) rather than n×n for large n. Used for the
softmax score without window, radius, causal mask or top-k (those go through the range kernel).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .rows import row_weights

BLOCK_ENTRIES = 1 << 24  # scores per block (64 MB in float32)


@njit(parallel=True, cache=True)
def weights_in_place(S, normalise, n, factor):
    """Each row of S: scores → exp(s − max) (or exp(s)); factor[r] = 1/Σ (or 1/n)."""
    for r in prange(S.shape[0]):
        factor[r] = row_weights(S[r], S.shape[1], normalise, n)


def velocity_blas(q, k, v, beta, normalise, out):
    """out = softmax-weighted Vx for row-major q, k, v (n, d) of one dtype."""
    n = q.shape[0]
    block = int(max(1, min(n, BLOCK_ENTRIES // n)))
    kt = np.ascontiguousarray(k.T)
    factor = np.empty(block, dtype=q.dtype)
    beta = q.dtype.type(beta)
    for a in range(0, n, block):
        b = min(n, a + block)
        S = (q[a:b] * beta) @ kt
        weights_in_place(S, normalise, n, factor[:b - a])
        np.multiply(S @ v, factor[:b - a, None], out=out[a:b])
    return out
