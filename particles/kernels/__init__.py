"""Numba kernels behind :func:`particles.simulate`, and the choice of the fastest path.

:func:`velocity_field` returns a callable x ↦ v with v_i = Σ_j a_ij V x_j for one configuration
(n, d). Every path computes the same maths as :mod:`particles.reference` (checked in tests).
"""

from __future__ import annotations

import numpy as np

from ..interaction import Interaction, radius_bound_sq
from . import rows


class VelocityField:
    """v(x) for a fixed interaction, dimension and dtype, using the row-wise kernel."""

    def __init__(self, it: Interaction, d: int, dtype):
        self.interaction = it
        self.dtype = np.dtype(dtype)
        self.Q, self.K, self.V = it.matrices(d, self.dtype)
        self.args = (
            rows.SCORE_CODE[it.score],
            float(it.beta),
            1.0 / (2.0 * it.sigma**2),
            radius_bound_sq(it.radius, self.dtype) if it.radius is not None else 0.0,
            it.radius is not None,
            it.window or 0,
            bool(it.causal),
            it.top_k or 0,
            bool(it.normalise),
        )

    def project(self, x):
        """(Qx, Kx, Vx) row-wise; the identity costs nothing."""
        if self.interaction.identity_qkv:
            return x, x, x
        return tuple(np.ascontiguousarray(x @ M.T) for M in (self.Q, self.K, self.V))

    def __call__(self, x: np.ndarray) -> np.ndarray:
        q, k, vx = self.project(x)
        v = rows.velocity_rows(x, q, k, vx, *self.args, np.empty_like(x))
        if not self.interaction.normalise and not np.all(np.isfinite(v)):
            raise OverflowError(f"usa weights exp(beta⟨Qx_i, Kx_j⟩)/n overflow {self.dtype} "
                                f"(beta={self.interaction.beta}); lower beta or use model 'sa'")
        return v

    def weights(self, x: np.ndarray) -> np.ndarray:
        """Dense interaction matrix a_ij (n, n)."""
        q, k, _ = self.project(x)
        n = x.shape[0]
        return rows.weights_rows(x, q, k, *self.args, np.empty((n, n), dtype=x.dtype))


def velocity_field(it: Interaction, n: int, d: int, dtype=np.float64) -> VelocityField:
    """The fastest available implementation of x ↦ v for this interaction and shape."""
    return VelocityField(it, d, dtype)
