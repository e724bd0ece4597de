"""Numba kernels behind :func:`particles.simulate`, and the choice of the fastest path.

:func:`velocity_field` returns a callable x ↦ v with v_i = Σ_j a_ij V x_j for one configuration
(n, d). Every path computes the same maths as :mod:`particles.reference` (checked in tests); the
row maths lives once, in :mod:`.rows`. Paths (``VelocityField.path``):

* ``"hk1d"``       flat score, d = 1, radius, no window/causal/top-k (1-D Hegselmann–Krause):
                   sorted two-pointer sweep over prefix sums, O(n) per step (:mod:`.hk1d`).
* ``"neighbours"`` radius, no window, d ≤ 3, n ≥ 2048, and a sampled neighbour fraction ≤ 10 %:
                   cKDTree neighbour lists (CSR) + the row kernel over the lists, decided per call
                   (:mod:`.neighbours`); otherwise the call falls back to "range".
* ``"symmetric"``  d ≤ 4, no restriction, Q = K, softmax or rbf score, n ≥ SYMMETRIC_MIN_N: the
                   scores are symmetric, so each exp(s_ij − shift) is computed once for the pair
                   i < j and used by both rows, with one shift bounding every score
                   (:func:`.dense.velocity_symmetric`); a row whose sum underflows that shared
                   bound is redone by the fused kernel with its exact max.
* ``"fused"``      d ≤ 4 and no top-k (dense, causal or windowed, radius masked): one fused
                   vectorised pass per row (scores, exp, Σ w·v) with a bound of the row max as the
                   shift (:func:`.dense.velocity_fused`) — the dense softmax/RBF fast path.
* ``"blas"``       softmax score, d > 4, no restriction: row blocks of BLAS matmuls around the
                   shared row weights (:mod:`.blas`).
* ``"range"``      everything else (top-k, or d > 4 with another score or a restriction): each
                   row scans one contiguous key range — all keys (dense), 0..i (causal) or the
                   window (O(n·w)); radius masks, top-k selects inside the range (:func:`.dense.rows_range`).

Windowed rows cost O(w) whatever n, so "fused" and "range" are linear in n with a window; no path
allocates an n×n array (only ``weights`` returns one, on request).
"""

from __future__ import annotations

from contextlib import contextmanager

import numba
import numpy as np

from ..interaction import Interaction, radius_bound_sq
from . import blas, dense, hk1d, neighbours, rows

PATHS = ("hk1d", "neighbours", "symmetric", "fused", "blas", "range")

#: Below this many scored pairs a call runs on one thread: waking the second numba thread costs more
#: than it saves, and on a busy machine the wait for it can take a whole scheduler tick (4 ms).
SERIAL_WORK = 1 << 21
HK1D_WORK_PER_OPINION = 16  # the sweep's cost per opinion, in the same units
RANGE_TOP_K_COST = 4  # a scored pair of the range kernel with top-k, in the same units


@contextmanager
def threads_for(work: int):
    """Run the enclosed kernels on one numba thread when `work` (pairs) is small."""
    if work >= SERIAL_WORK:
        yield
        return
    previous = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        yield
    finally:
        numba.set_num_threads(previous)


def choose_path(it: Interaction, n: int, d: int) -> str:
    """The static choice; "neighbours" is confirmed per call from the sampled neighbour density."""
    plain = it.window is None and not it.causal and it.top_k is None
    if it.score == "flat" and d == 1 and it.radius is not None and plain and it.normalise:
        return "hk1d"
    if it.radius is not None and it.window is None and d <= neighbours.MAX_DIM and n >= neighbours.MIN_N:
        return "neighbours"
    return _dense_path(it, d, n)


SYMMETRIC_MIN_N = 512


def symmetric_scores(it: Interaction, d: int) -> bool:
    """s_ij = s_ji for every pair: Q = K, a softmax or rbf score and no restriction."""
    if it.restricted or it.score == "flat" or d > rows.FUSED_MAX_DIM:
        return False
    Q, K, _ = it.matrices(d)
    return (it.Q is None and it.K is None) or np.array_equal(Q, K)


def _dense_path(it: Interaction, d: int, n: int = 0) -> str:
    if n >= SYMMETRIC_MIN_N and symmetric_scores(it, d):
        return "symmetric"
    if it.top_k is None and d <= rows.FUSED_MAX_DIM:
        return "fused"
    if it.score == "softmax" and not it.restricted:
        return "blas"
    return "range"


class VelocityField:
    """v(x) for a fixed interaction, size, dimension and dtype; ``path`` names the kernel used."""

    def __init__(self, it: Interaction, n: int, d: int, dtype, path: str | None = None):
        self.interaction = it
        self.dtype = np.dtype(dtype)
        self.path = choose_path(it, n, d) if path is None else path
        if self.path not in PATHS:
            raise ValueError(f"path must be one of {PATHS}, got {path!r}")
        if (self.path == "hk1d" and choose_path(it, n, d) != "hk1d") or (
                self.path == "neighbours" and it.radius is None) or (
                self.path in ("fused", "blas") and _dense_path(it, d) != self.path) or (
                self.path == "symmetric" and not symmetric_scores(it, d)):
            raise ValueError(f"path {self.path!r} does not apply to this interaction (d={d})")
        self.forced = path is not None
        self.Q, self.K, self.V = it.matrices(d, self.dtype)
        t = self.dtype.type
        self.r2 = t(radius_bound_sq(it.radius, self.dtype)) if it.radius is not None else t(0.0)
        self.score = rows.SCORE_CODE[it.score]
        self.beta, self.inv2s2 = t(it.beta), t(1.0 / (2.0 * it.sigma**2))
        self.sweep = hk1d.SortedSweep() if self.path == "hk1d" else None
        self.dense_path = self.path if self.path in ("range", "symmetric") else _dense_path(it, d)
        self.dims = (0,) * d  # compile-time constants of the fused kernel (rows.static)
        self.small_dims = self.dims if d <= rows.FUSED_MAX_DIM else ()
        self.score_s, self.radius_s = rows.static(self.score), rows.static(it.radius is not None)
        # Σ exp(s − bound) below this means the bound of the row max was too loose (see velocity_fused)
        self.tiny = t(float(n) ** 2 * np.finfo(self.dtype).tiny * np.exp(40.0))
        self.last_path = None  # the path the last call actually took

    def project(self, x):
        """Component-major (xᵀ, (Qx)ᵀ, (Kx)ᵀ, (Vx)ᵀ), each (d, n) contiguous; identity costs one copy."""
        xT = np.ascontiguousarray(x.T, dtype=self.dtype)
        if self.interaction.identity_qkv:
            return xT, xT, xT, xT
        return (xT,) + tuple(np.ascontiguousarray(M @ xT) for M in (self.Q, self.K, self.V))

    def _row_args(self):
        it = self.interaction
        return (self.score, self.beta, self.inv2s2, self.r2, it.radius is not None, it.window or 0,
                bool(it.causal), it.top_k or 0, bool(it.normalise))

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x)
        if self.path == "hk1d":
            self.last_path = "hk1d"
            with threads_for(HK1D_WORK_PER_OPINION * x.shape[0]):
                v = self.sweep(x.astype(self.dtype, copy=False), self.r2)
            return v if self.interaction.V is None else v * self.V[0, 0]
        xT, qT, kT, vT = self.project(x)
        out = np.empty(x.shape, dtype=self.dtype)
        nbrs = None
        if self.path == "neighbours":
            nbrs = neighbours.neighbour_lists(x, self.r2, 1.0 if self.forced else neighbours.MAX_FRACTION)
        it = self.interaction
        n = x.shape[0]
        if nbrs is not None:
            self.last_path = "neighbours"
            with threads_for(int(nbrs[0][-1])):
                neighbours.velocity_lists(*nbrs, xT, qT, kT, vT, *self._row_args(), out)
        elif self.dense_path == "symmetric":
            self.last_path = "symmetric"
            self._symmetric(xT, qT, vT, out)
        elif self.dense_path == "fused":
            self.last_path = "fused"
            qnorm = np.sqrt(np.einsum("dn,dn->n", qT, qT))
            kmax = self.dtype.type(np.sqrt(np.einsum("dn,dn->n", kT, kT).max()))
            with threads_for(n * rows.buffer_len(n, it.window or 0, bool(it.causal))):
                dense.velocity_fused(self.dims, self.score_s, self.radius_s, np.arange(n), xT, qT, kT, vT,
                                     self.beta, self.inv2s2, self.r2, it.window or 0, bool(it.causal),
                                     bool(it.normalise), qnorm, kmax, self.tiny, out)
        elif self.dense_path == "blas":
            self.last_path = "blas"
            with threads_for(n * n):
                blas.velocity_blas(qT.T, kT.T, vT.T, self.beta, bool(it.normalise), out)
        else:
            self.last_path = "range"
            pairs = n * rows.buffer_len(n, it.window or 0, bool(it.causal))
            with threads_for(pairs * (RANGE_TOP_K_COST if it.top_k else 1)):
                dense.rows_range(self.small_dims, xT, qT, kT, vT, *self._row_args(), False, out)
        if not self.interaction.normalise and not np.all(np.isfinite(out)):
            raise OverflowError(f"usa weights exp(beta⟨Qx_i, Kx_j⟩)/n overflow {self.dtype} "
                                f"(beta={self.interaction.beta}); lower beta or use model 'sa'")
        return out

    def _symmetric(self, xT, qT, vT, out):
        """out ← v via velocity_symmetric; rows whose Σ w fell below `tiny` under the shared shift
        are redone one by one by the fused kernel with their exact row max."""
        it, n = self.interaction, xT.shape[1]
        sq = np.einsum("dn,dn->n", qT, qT)
        shift = abs(it.beta) * sq.max() if it.score == "softmax" else 0.0
        sums = np.empty((len(self.dims) + 1, n), dtype=self.dtype)
        with threads_for(n * n // 2):
            blocks = -(-n // dense.SYMMETRIC_BLOCK)
            tasks = max(1, min((blocks + 1) // 2, 2 * numba.get_num_threads()))
            partial = np.empty((tasks, len(self.dims) + 1, n), dtype=self.dtype)
            dense.velocity_symmetric(self.dims, self.score_s, qT, vT, self.beta, self.inv2s2, shift,
                                     bool(it.normalise), partial, sums)
        factor = 1.0 / sums[0] if it.normalise else np.full(n, 1.0 / n, dtype=self.dtype)
        out[:] = (sums[1:] * factor).T
        loose = np.flatnonzero(sums[0] < self.tiny) if it.normalise else ()
        if len(loose):
            redo = np.empty((len(loose), xT.shape[0]), dtype=self.dtype)
            qnorm, kmax = np.sqrt(sq), self.dtype.type(np.sqrt(sq.max()))
            dense.velocity_fused(self.dims, self.score_s, self.radius_s, loose, xT, qT, qT, vT, self.beta,
                                 self.inv2s2, self.r2, 0, False, True, qnorm, kmax, self.tiny, redo)
            out[loose] = redo

    def weights(self, x: np.ndarray) -> np.ndarray:
        """Dense interaction matrix a_ij (n, n)."""
        xT, qT, kT, _ = self.project(np.asarray(x))
        n = xT.shape[1]
        return dense.rows_range(self.small_dims, xT, qT, kT, xT, *self._row_args(), True,
                                np.empty((n, n), dtype=self.dtype))


def velocity_field(it: Interaction, n: int, d: int, dtype=np.float64,
                   path: str | None = None) -> VelocityField:
    """The fastest available implementation of x ↦ v for this interaction and shape.

    path forces one of PATHS (for tests and benchmarks); None chooses automatically.
    """
    return VelocityField(it, n, d, dtype, path)
