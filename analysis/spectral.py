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


def _tol(shape, arguments):
    arguments["tol"] = check_positive("tol", arguments["tol"])
    if shape[0] != shape[1]:
        raise ValueError(f"A: expected square (query, key) matrices, got {tuple(shape)}")


@per_item(ATTENTION, item_dims=(("quantity", len(QUANTITIES)),), check=_tol)
def _summary(A, tol):
    blocks = connected_components(csr_matrix(np.abs(A) + np.abs(A.T) > tol), directed=False)[0]
    lam = np.linalg.eigvals(A)
    moduli = np.sort(np.abs(lam))[::-1]
    gap = 1.0 - moduli[1] if len(lam) > 1 else np.nan
    return blocks, np.sum(np.abs(lam - 1.0) < tol), gap


def spectral_summary(
    A: np.ndarray | xr.DataArray | xr.Dataset, tol: float = 1e-6, *, token_mask=None,
) -> xr.Dataset:
    """Dataset over the leading axes of A with

    * ``blocks``: weakly connected components of the support graph |A_ij| + |A_ji| > tol;
    * ``unit_eigenvalues``: number of eigenvalues λ of A with |λ − 1| < tol;
    * ``spectral_gap``: 1 − |λ₂|, λ₂ the eigenvalue of second-largest modulus (NaN for 1×1).

    For a row-stochastic A (Perron–Frobenius): each closed block of the support contributes an
    eigenvalue 1, and an irreducible aperiodic A has a simple eigenvalue 1 and gap > 0.

    Padding rows and keys (``token_mask``) are dropped first. Dense eigenvalues: O(n³) per matrix.
    A single matrix gives a Dataset of 0-d variables; a missing (all-NaN) matrix gives counts -1
    and a NaN gap.
    """
    out = (_summary(A, tol, token_mask=token_mask)
           .assign_coords(quantity=list(QUANTITIES)).to_dataset("quantity"))
    return out.assign(blocks=out.blocks.fillna(-1).astype(int),
                      unit_eigenvalues=out.unit_eigenvalues.fillna(-1).astype(int))
