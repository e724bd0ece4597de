"""Spectral diagnostics of an interaction/attention matrix A (rows summing to 1).

A row-stochastic A whose support graph splits into b blocks (after a permutation A is block
diagonal) has eigenvalue 1 with multiplicity ≥ b and spectral gap 1 − |λ₂| = 0; an irreducible,
aperiodic A (e.g. dense softmax attention) has a simple eigenvalue 1 and a positive gap. The paper's
claim — Krause attention becomes block diagonal with one block per cluster while softmax attention
stays irreducible — reads off as blocks == count_clusters and unit_eigenvalues == blocks.
"""

from __future__ import annotations

import numpy as np
import xarray as xr
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import connected_components

from analysis._layout import ATTENTION, check_positive, per_item

QUANTITIES = ("blocks", "unit_eigenvalues", "spectral_gap")


@per_item(ATTENTION, item_dims=("quantity",))
def _summary(A, tol):
    tol = check_positive("tol", tol)
    if A.shape[0] != A.shape[1]:
        raise ValueError(f"A: expected square (query, key) matrices, got {A.shape}")
    blocks = connected_components(csr_matrix(np.abs(A) + np.abs(A.T) > tol), directed=False)[0]
    lam = np.linalg.eigvals(A)
    moduli = np.sort(np.abs(lam))[::-1]
    gap = 1.0 - moduli[1] if len(lam) > 1 else np.nan
    return blocks, np.sum(np.abs(lam - 1.0) < tol), gap


def spectral_summary(A, tol=1e-6) -> xr.Dataset:
    """Dataset over the leading axes of A with

    * ``blocks``: weakly connected components of the support graph |A_ij| + |A_ji| > tol;
    * ``unit_eigenvalues``: number of eigenvalues λ of A with |λ − 1| < tol;
    * ``spectral_gap``: 1 − |λ₂|, λ₂ the eigenvalue of second-largest modulus (NaN for 1×1).

    Dense eigenvalues: O(n³) per matrix. A single matrix gives a Dataset of 0-d variables.
    """
    out = _summary(A, tol).assign_coords(quantity=list(QUANTITIES)).to_dataset("quantity")
    return out.assign(blocks=out.blocks.astype(int), unit_eigenvalues=out.unit_eigenvalues.astype(int))
