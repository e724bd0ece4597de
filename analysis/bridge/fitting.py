"""Fitting one preset parameter to a trained model's per-layer curves.

:func:`fit_preset` — the β of SA (or σ of Krause) on the sphere, Q = K = V = I, that best matches
the per-layer effective-rank and cluster-count curves of an extracted trajectory (grid search),
with its residual and whether the optimum sits at the edge of the grid.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import xarray as xr

from .layer_metrics import layer_metrics
from .simulated import layer0_tokens, restrictions, simulate_like

#: Default grids of the fitted parameter (log-spaced).
GRIDS = {"sa": np.geomspace(0.05, 50.0, 13), "krause": np.geomspace(0.05, 5.0, 13)}
QUICK_GRIDS = {"sa": np.geomspace(0.1, 30.0, 7), "krause": np.geomspace(0.1, 3.0, 7)}

FIT_METRICS = ("effective_rank", "clusters")


def _curves(ds, eps):
    m = layer_metrics(ds.drop_vars([v for v in ds.data_vars if v != "x"]), eps=eps)
    return np.asarray(m["effective_rank"].values, float), np.asarray(m["clusters"].values, float)


def fit_preset(
    target: xr.Dataset,
    preset: str = "sa",
    *,
    grid: Sequence[float] | np.ndarray | None = None,
    eps: float = 0.5,
    steps_per_layer: int = 4,
    dt: float = 1.0,
    quick: bool = False,
    progress: bool | None = None,
    **restrict: Any,
) -> dict[str, Any]:
    """Fit β (preset "sa") or σ (preset "krause") to ``target``'s per-layer curves.

    The simulation starts from target's layer-0 tokens projected to the sphere and runs one unit of
    time per layer. residual(p) = sqrt(mean over layers 1..L of [((r_sim − r)/r_0)² + ((c_sim − c)/T)²]/2)
    with r the effective rank and c the cluster count of the (projected) tokens, r_0 = r at layer 0.
    Returns dict(preset, param ("beta"/"sigma"), value, residual, at_boundary, grid, residuals,
    curves (sim effective rank and clusters at the best value), restrictions). ``progress``: a
    tqdm bar over the grid (None: only on an interactive terminal).
    """
    if preset not in ("sa", "krause"):
        raise ValueError(f"preset must be 'sa' or 'krause', got {preset!r}")
    grid = np.asarray((QUICK_GRIDS if quick else GRIDS)[preset] if grid is None else grid, dtype=float)
    if grid.ndim != 1 or grid.size == 0 or np.any(grid <= 0):
        raise ValueError("grid must be a non-empty 1-D array of positive values")
    restrict = restrict or restrictions(target)
    L = int(target.sizes["layer"]) - 1
    T = int(target.sizes["token"])
    r_t, c_t = _curves(target, eps)
    x0 = layer0_tokens(target)
    key = "beta" if preset == "sa" else "sigma"
    residuals, curves = [], []
    from tqdm.auto import tqdm

    # progress None: a bar on an interactive terminal only (the CLI's `compare --fit`), False: never
    bar = tqdm(grid, desc=f"fit {preset}", disable=None if progress is None else not progress, leave=False)
    for value in bar:
        sim = simulate_like(
            None,
            x0,
            mode=preset,
            n_layers=L,
            dt=dt,
            steps_per_layer=steps_per_layer,
            attention=False,
            **{key: value},
            **restrict,
        )
        r_s, c_s = _curves(sim, eps)
        err = np.concatenate([(r_s[1:] - r_t[1:]) / r_t[0], (c_s[1:] - c_t[1:]) / T])
        residuals.append(float(np.sqrt(np.mean(err**2))))
        curves.append((r_s, c_s))
    best = int(np.nanargmin(residuals))
    return dict(
        preset=preset,
        param=key,
        value=float(grid[best]),
        residual=residuals[best],
        at_boundary=best in (0, len(grid) - 1),
        grid=grid.tolist(),
        residuals=residuals,
        effective_rank=curves[best][0].tolist(),
        clusters=curves[best][1].tolist(),
        restrictions=dict(restrict),
    )
