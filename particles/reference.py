"""Plain numpy reference of the interaction kernel (docs/maths.md), dense n×n, for tests only.

Every fast path (numba rows, neighbour lists, sorted 1-D HK sweep, torch attention) is checked
against these few lines. Top-k ties are broken towards the smaller key index j.
"""

from __future__ import annotations

import numpy as np

from .interaction import Interaction, radius_bound_sq


def _sqdist(a, b):
    return ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)


def scores(x: np.ndarray, it: Interaction) -> np.ndarray:
    """s_ij: β⟨Qx_i, Kx_j⟩, −‖Qx_i − Kx_j‖²/(2σ²) or 0."""
    Q, K, _ = it.matrices(x.shape[1], np.float64)
    q, k = x @ Q.T, x @ K.T
    if it.score == "softmax":
        return it.beta * (q @ k.T)
    if it.score == "rbf":
        return -_sqdist(q, k) / (2.0 * it.sigma**2)
    return np.zeros((x.shape[0], x.shape[0]))


def support(x: np.ndarray, it: Interaction, s: np.ndarray | None = None) -> np.ndarray:
    """Boolean mask of N(i): radius ∩ window ∩ causal, then the top-k largest scores inside."""
    n = x.shape[0]
    i, j = np.indices((n, n))
    mask = np.ones((n, n), dtype=bool)
    if it.radius is not None:
        mask &= _sqdist(x, x) <= radius_bound_sq(it.radius, x.dtype)
    if it.causal:
        mask &= j <= i
    if it.window is not None:
        mask &= (np.abs(i - j) < it.window) if not it.causal else (i - j < it.window)
    if it.top_k is not None:
        s = scores(x, it) if s is None else s
        keep = np.zeros_like(mask)
        for row in range(n):
            cand = np.flatnonzero(mask[row])
            order = np.argsort(-s[row, cand], kind="stable")[: it.top_k]
            keep[row, cand[order]] = True
        mask = keep
    return mask


def weights(x: np.ndarray, it: Interaction) -> np.ndarray:
    """a_ij: softmax of s_ij over N(i) (normalised), or exp(s_ij)/n on N(i) (usa)."""
    s = scores(x, it)
    mask = support(x, it, s)
    if it.normalise:
        s = np.where(mask, s, -np.inf)
        e = np.exp(s - s.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)
    with np.errstate(over="ignore"):
        return np.where(mask, np.exp(s), 0.0) / x.shape[0]


def velocity(x: np.ndarray, it: Interaction) -> np.ndarray:
    """v_i = Σ_j a_ij V x_j."""
    _, _, V = it.matrices(x.shape[1], np.float64)
    return weights(x, it) @ (x @ V.T)


def vector_field(x: np.ndarray, it: Interaction) -> np.ndarray:
    """ẋ_i = tangent(x_i, v_i): P_{x_i} v_i on the sphere, v_i − x_i in euclidean space."""
    return it.space.tangent(x, velocity(x, it))


def hk_map(x: np.ndarray, radius: float) -> np.ndarray:
    """Synchronous Hegselmann–Krause map x_i ← mean{x_j : ‖x_j − x_i‖ ≤ R}, written out by hand."""
    bound = radius_bound_sq(radius, x.dtype)
    out = np.empty_like(x)
    for i in range(len(x)):
        near = [x[j] for j in range(len(x)) if ((x[j] - x[i]) ** 2).sum() <= bound]
        out[i] = np.mean(near, axis=0)
    return out
