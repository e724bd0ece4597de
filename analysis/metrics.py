"""Collapse and energy metrics per configuration, and the public list of every metric (docs/metrics.md).

Each metric takes one configuration x (n, d) or a trajectory with leading "time"/"layer" and
optional "sample" axes (numpy, DataArray, or Dataset with variable "x"); it returns a float for
one configuration and otherwise a DataArray over the leading axes (see ``analysis._layout``).
"""

from __future__ import annotations

import numpy as np
import xarray as xr
from scipy.special import logsumexp

from analysis._layout import POINTS, check_finite, per_item
from analysis.clusters import (
    cluster_labels,
    cluster_sizes,
    count_clusters,
    time_to_clusters,
    time_to_consensus,
)
from analysis.sinks import (
    attention_entropy,
    first_token_mass,
    massive_activations,
    sink_excess,
    sink_rate,
    sink_scores,
)
from analysis.spectral import spectral_summary

__all__ = [
    "count_clusters", "cluster_labels", "cluster_sizes", "time_to_clusters", "time_to_consensus",
    "rank_collapse", "effective_rank", "mean_cosine", "dirichlet_energy", "interaction_energy",
    "normalised_energy", "mean_sd",
    "first_token_mass", "sink_scores", "sink_excess", "sink_rate", "attention_entropy", "massive_activations",
    "spectral_summary",
]


SPHERE_DOC = """``sphere`` (default: True for extracted trajectories, whose item axis is "token"; False for
    simulated ones) first divides each token by its norm; padding tokens (``token_mask``) are left out."""


@per_item(POINTS)
def rank_collapse(
    x: np.ndarray | xr.DataArray | xr.Dataset, *, sphere: bool | None = None,
) -> float | xr.DataArray:
    """Relative rank-collapse residual r = ‖X − 1 x̄ᵀ‖_F / ‖X‖_F, x̄ = (1/n) Σ_i x_i
    (Dong, Cordonnier, Loukas 2021, "Attention is not all you need", relative form).

    0 iff all rows are equal; NaN for X = 0.

    {sphere}
    """
    norm = np.linalg.norm(x)
    return np.linalg.norm(x - x.mean(axis=0)) / norm if norm > 0 else np.nan


@per_item(POINTS)
def effective_rank(
    x: np.ndarray | xr.DataArray | xr.Dataset, *, sphere: bool | None = None,
) -> float | xr.DataArray:
    """exp(H(p)), p = σ/‖σ‖₁ over the singular values σ of X, H(p) = −Σ p log p
    (Roy & Vetterli 2007, "The effective rank").

    Between 1 (rank one) and min(n, d) (equal singular values); NaN for X = 0.

    {sphere}
    """
    s = np.linalg.svd(x, compute_uv=False)
    if s.sum() == 0:
        return np.nan
    p = s[s > 0] / s.sum()
    return np.exp(-np.sum(p * np.log(p)))


@per_item(POINTS)
def mean_cosine(
    x: np.ndarray | xr.DataArray | xr.Dataset, *, sphere: bool | None = None,
) -> float | xr.DataArray:
    """Mean of cos(x_i, x_j) over ordered pairs i ≠ j (diagonal excluded), in O(n·d):
    with u_i = x_i/‖x_i‖, Σ_{{i≠j}} ⟨u_i, u_j⟩ = ‖Σ_i u_i‖² − Σ_i ‖u_i‖², divided by n(n − 1).

    A zero row counts as cosine 0 with every other row; NaN for n < 2. A standard anisotropy
    measure of token representations (Ethayarajh 2019, "How contextual are contextualized word
    representations?"). Scale-free already.

    {sphere}
    """
    n = len(x)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    u = x / np.where(norms > 0, norms, 1.0)
    total = np.sum(u.sum(axis=0) ** 2) - np.sum(u**2)
    return total / (n * (n - 1)) if n > 1 else np.nan


def _weights(shape, arguments):
    if arguments.get("weights") is not None:
        w = np.asarray(arguments["weights"], dtype=float)
        if w.shape != (shape[0], shape[0]):
            raise ValueError(f"weights: expected shape ({shape[0]}, {shape[0]}), got {w.shape}")
        check_finite(w, "weights")
        arguments["weights"] = w


@per_item(POINTS, check=_weights)
def dirichlet_energy(
    x: np.ndarray | xr.DataArray | xr.Dataset, weights: np.ndarray | None = None, *,
    sphere: bool | None = None, real=None,
) -> float | xr.DataArray:
    """Dirichlet energy E = ½ Σ_ij w_ij ‖x_i − x_j‖², the over-smoothing measure of graph neural
    networks (Cai & Wang 2020, "A note on over-smoothing for graph neural networks", arXiv 2006.13318).

    ``weights`` is one (n, n) matrix over the stored tokens (e.g. an adjacency or attention matrix)
    used for every configuration, restricted to the real tokens; the default w_ij = 1/n gives
    E = Σ_i ‖x_i − x̄‖², computed in O(n·d).

    {sphere}
    """
    if len(x) == 0:
        return np.nan
    if weights is None:
        return np.sum((x - x.mean(axis=0)) ** 2)
    w = weights[np.ix_(real, real)]
    sq = np.sum(x**2, axis=1)
    return 0.5 * ((w.sum(1) + w.sum(0)) @ sq) - np.sum(x * (w @ x))


def _beta(shape, arguments):
    beta = arguments["beta"]
    if isinstance(beta, (bool, str)) or not np.isfinite(float(beta)):
        raise ValueError(f"beta must be a finite number, got {beta!r}")
    arguments["beta"] = float(beta)


@per_item(POINTS, check=_beta)
def interaction_energy(
    x: np.ndarray | xr.DataArray | xr.Dataset, beta: float, *, sphere: bool | None = None,
) -> float | xr.DataArray:
    """USA interaction energy E_β = (1/(2βn²)) Σ_ij exp(β⟨x_i, x_j⟩) (Geshkovski, Letrouit,
    Polyanskiy, Rigollet 2023, arXiv 2312.10794: non-decreasing along USA trajectories).

    β = 0: E_β diverges like 1/(2β); returned is the limit of E_β − 1/(2β), namely
    (1/(2n²)) Σ_ij ⟨x_i, x_j⟩ = ½‖x̄‖², the energy of the β = 0 dynamics.
    Overflow of float64 raises OverflowError (use ``normalised_energy``).

    {sphere}
    """
    n = len(x)
    if n == 0:
        return np.nan
    if beta == 0:
        return 0.5 * np.sum(x.mean(axis=0) ** 2)
    log_e = logsumexp(beta * (x @ x.T)) - np.log(2 * abs(beta) * n**2)
    if log_e > np.log(np.finfo(float).max):
        raise OverflowError(f"interaction_energy overflows float64 at beta={beta}")
    return np.sign(beta) * np.exp(log_e)


@per_item(POINTS, check=_beta)
def normalised_energy(
    x: np.ndarray | xr.DataArray | xr.Dataset, beta: float, *, sphere: bool | None = None,
) -> float | xr.DataArray:
    """(1/(n² e^β)) Σ_ij exp(β⟨x_i, x_j⟩) = mean_ij exp(β(⟨x_i, x_j⟩ − 1)) = 2β E_β / e^β, the USA
    energy of ``interaction_energy`` (Geshkovski et al. 2023) scaled to (0, 1] on the sphere.

    For unit vectors it lies in (0, 1]; with well-separated, collapsed clusters of sizes m_a it
    tends to Σ_a m_a²/n² as β → ∞ (the plateaus of the energy staircase).

    {sphere}
    """
    return np.mean(np.exp(beta * (x @ x.T - 1.0))) if len(x) else np.nan


for _f in (rank_collapse, effective_rank, mean_cosine, dirichlet_energy, interaction_energy,
           normalised_energy):
    _f.__doc__ = _f.__doc__.format(sphere=SPHERE_DOC)


def mean_sd(da: xr.DataArray, dim: str = "sample") -> xr.Dataset:
    """Dataset with "mean" and "sd" (sample standard deviation, ddof = 1) of ``da`` over ``dim``."""
    if dim not in da.dims:
        raise ValueError(f"dim: {dim!r} is not an axis of the data {da.dims}")
    return xr.Dataset({"mean": da.mean(dim), "sd": da.std(dim, ddof=1)})
