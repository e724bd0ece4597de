"""Two custom velocity fields written the way a user would, for ``simulate(field, geometry=...)``.

A velocity field is any callable v(x): (n, d) → (n, d), the velocity before the tangent
projection (docs/custom-dynamics.md). Both fields here are plain numpy, with a ``weights(x)``
method so that ``return_weights=True`` works too:

* :class:`ALiBiCausal` — causal softmax with a linear distance bias (ALiBi, Press et al. 2022):
  s_ij = β⟨x_i, x_j⟩ − m·(i − j) for j ≤ i, a_ij = softmax_j s_ij, v_i = Σ_j a_ij x_j. Tokens far
  back in the sequence are damped by e^{−m(i−j)}; m = 0 is causal SA.
* :class:`Sinkhorn` — doubly stochastic attention (Sinkformers, Sander et al. 2022): the kernel
  K_ij = exp(β⟨x_i, x_j⟩) scaled by Sinkhorn's alternating row/column normalisation to
  P = diag(u) K diag(w) with every row and column summing to 1; v_i = Σ_j P_ij x_j.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.special import logsumexp


@dataclass(frozen=True)
class ALiBiCausal:
    """v_i = Σ_{j ≤ i} softmax_j(β⟨x_i, x_j⟩ − slope·(i − j)) x_j."""

    beta: float = 1.0
    slope: float = 0.0

    def weights(self, x: np.ndarray) -> np.ndarray:
        n = x.shape[0]
        i, j = np.indices((n, n))
        s = np.where(j <= i, self.beta * (x @ x.T) - self.slope * (i - j), -np.inf)
        e = np.exp(s - s.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.weights(x) @ x


@dataclass(frozen=True)
class Sinkhorn:
    """v = P x with P the Sinkhorn scaling of exp(β x xᵀ) (rows and columns sum to 1).

    Iterates in the log domain (no overflow for large β) until every row and column sum is
    within `tol` of 1, at most `max_iter` rounds."""

    beta: float = 1.0
    tol: float = 1e-12
    max_iter: int = 10_000

    def weights(self, x: np.ndarray) -> np.ndarray:
        log_k = self.beta * (x @ x.T)
        log_u = np.zeros(x.shape[0])
        log_w = np.zeros(x.shape[0])
        for _ in range(self.max_iter):
            log_u = -logsumexp(log_k + log_w[None, :], axis=1)  # rows sum to 1
            log_w = -logsumexp(log_k + log_u[:, None], axis=0)  # columns sum to 1
            p = np.exp(log_k + log_u[:, None] + log_w[None, :])
            if np.abs(p.sum(axis=1) - 1).max() <= self.tol:
                return p
        raise RuntimeError(f"Sinkhorn did not reach tol={self.tol} in {self.max_iter} iterations")

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.weights(x) @ x
