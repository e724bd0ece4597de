"""Trained vs simulated as a distance between token clouds on the unit sphere.

For each input and layer the two clouds u_i = x_i/‖x_i‖ and w_j = y_j/‖y_j‖ (T tokens each, equal
weights 1/T) are compared by the optimal-transport (Wasserstein-1) distance

    W(u, w) = min_{π ∈ Π(1/T, 1/T)} Σ_ij π_ij c(u_i, w_j),   c = ∠(u_i, w_j) (geodesic, default)
                                                               or ‖u_i − w_j‖ (chordal),

solved exactly by POT (``ot.emd2``). :func:`layer_distances` averages it over inputs for every
layer, and also reports the *frozen* baseline W(model layer ℓ, model layer 0) — the distance a
simulation that never moves the tokens would have — so that a simulation matching only that
baseline is seen as no better than standing still.
"""

from __future__ import annotations

import numpy as np
import xarray as xr

COSTS = ("geodesic", "chordal")


def _unit(x: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.where(n > 0, n, 1.0)


def sphere_wasserstein(a, b, *, cost: str = "geodesic", weights_a=None, weights_b=None) -> float:
    """W₁ between the point clouds a (n, d) and b (m, d), both projected to the unit sphere; uniform
    weights unless given (e.g. a token mask's real tokens)."""
    import ot

    if cost not in COSTS:
        raise ValueError(f"cost must be one of {COSTS}, got {cost!r}")
    a, b = _unit(np.asarray(a, dtype=float)), _unit(np.asarray(b, dtype=float))
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"a, b: expected (n, d) and (m, d) with the same d, got {a.shape} and {b.shape}")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("a, b: NaN or inf in the point clouds")
    from scipy.spatial.distance import cdist

    chord = cdist(a, b)  # exact near 0, where arccos⟨u, w⟩ loses half the digits
    M = 2.0 * np.arcsin(np.minimum(chord / 2.0, 1.0)) if cost == "geodesic" else chord
    wa = (
        np.full(len(a), 1.0 / len(a))
        if weights_a is None
        else np.asarray(weights_a, float) / np.sum(weights_a)
    )
    wb = (
        np.full(len(b), 1.0 / len(b))
        if weights_b is None
        else np.asarray(weights_b, float) / np.sum(weights_b)
    )
    return float(ot.emd2(wa, wb, M))


def layer_distances(target: xr.Dataset, others: dict, *, cost: str = "geodesic") -> xr.Dataset:
    """Per layer, mean over samples of W(target layer ℓ, other layer ℓ) for every Dataset in
    ``others`` ({name: Dataset with the same (sample, layer, token) layout}), plus ``frozen`` =
    W(target layer ℓ, target layer 0). Returns a Dataset with ``distance`` (series, layer) and the
    standard error over samples ``distance_se``; padding (``token_mask``) is left out of both clouds."""
    x = target["x"].values
    S, L1 = x.shape[0], x.shape[1]
    mask = target["token_mask"].values.astype(bool) if "token_mask" in target.coords else None
    series = {"frozen": np.broadcast_to(x[:, :1], x.shape)}
    for name, ds in others.items():
        y = ds["x"].values
        if y.shape[:3] != x.shape[:3]:
            raise ValueError(f"others[{name!r}]: shape {y.shape} does not match the target's {x.shape}")
        series[name] = y
    d = np.empty((len(series), S, L1))
    for k, y in enumerate(series.values()):
        for s in range(S):
            keep = mask[s] if mask is not None else slice(None)
            for layer in range(L1):
                d[k, s, layer] = sphere_wasserstein(x[s, layer][keep], y[s, layer][keep], cost=cost)
    return xr.Dataset(
        {
            "distance": (("series", "layer"), d.mean(1)),
            "distance_se": (
                ("series", "layer"),
                d.std(1, ddof=1) / np.sqrt(S) if S > 1 else np.full(d.shape[::2], np.nan),
            ),
        },
        coords={"series": list(series), "layer": np.arange(L1)},
        attrs=dict(
            cost=cost, n_samples=S, definition="mean over samples of W1 between unit-sphere token clouds"
        ),
    )
