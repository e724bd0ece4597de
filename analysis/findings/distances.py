"""Trained vs simulated, per run: Wasserstein distances on the sphere and the matched time step.

For one trained model and S held-out inputs, every simulated counterpart starts from the model's
layer-0 tokens and runs one layer per block:

* ``frozen`` — the tokens never move (the baseline every simulation must beat);
* ``own residual`` — x ← x + attn_ℓ(norm1_ℓ(x)): the model with its MLPs removed;
* ``own sphere dt=1`` — the same attention as velocity on the unit sphere, one unit of time per layer
  (4 Euler steps), Geshkovski et al.'s idealisation as used before;
* ``own sphere matched`` — the same with dt matched to the model
  (:func:`analysis.bridge.simulated.matched_dt`: the first simulated layer turns the tokens by the
  model's first-block mean angle);
* ``SA fit`` / ``Krause fit`` — the identity-map presets with β / σ fitted to the per-layer
  effective-rank and cluster curves (:func:`analysis.bridge.fitting.fit_preset`), on the sphere.

:func:`run_distances` returns, per series and layer, the mean over inputs of W₁ between the model's
unit-sphere token cloud and the simulated one, its standard error, and the simulated cluster count
(ε = 0.5 on the sphere); plus the matched dt, the first-block angle and the fitted values.
"""

from __future__ import annotations

import numpy as np
import xarray as xr

SERIES = ("frozen", "own residual", "own sphere dt=1", "own sphere matched", "SA fit", "Krause fit")


def run_distances(model, inputs, *, eps: float = 0.5, steps_per_layer: int = 4) -> xr.Dataset:
    from analysis.bridge import extract
    from analysis.bridge.distance import layer_distances
    from analysis.bridge.fitting import fit_preset
    from analysis.bridge.layer_metrics import layer_metrics
    from analysis.bridge.simulated import matched_dt, restrictions, simulate_like

    ds = extract(model, inputs, attention=False)
    L = len(model.blocks)
    dt, theta = matched_dt(model, ds, steps_per_layer=steps_per_layer)
    sims = {
        "own residual": simulate_like(model, ds, mode="own", geometry="residual", attention=False),
        "own sphere dt=1": simulate_like(
            model, ds, mode="own", steps_per_layer=steps_per_layer, attention=False
        ),
        "own sphere matched": simulate_like(
            model, ds, mode="own", dt=dt, steps_per_layer=steps_per_layer, attention=False
        ),
    }
    restrict = restrictions(model)
    fits = {}
    for preset, label in (("sa", "SA fit"), ("krause", "Krause fit")):
        fit = fit_preset(ds, preset, eps=eps, progress=False, **restrict)
        fits[label] = fit
        sims[label] = simulate_like(
            None,
            ds,
            mode=preset,
            n_layers=L,
            steps_per_layer=steps_per_layer,
            attention=False,
            **{fit["param"]: fit["value"]},
            **restrict,
        )
    dist = layer_distances(ds, sims)
    clusters = [
        layer_metrics(ds.drop_vars([v for v in ds.data_vars if v != "x"]), eps=eps)["clusters"].values
    ]
    clusters = {"trained": clusters[0]}
    for name, sim in sims.items():
        clusters[name] = layer_metrics(sim, eps=eps)["clusters"].values
    out = dist.assign(
        clusters=(("model_series", "layer"), np.array(list(clusters.values()))),
        matched_dt=dt,
        first_block_angle=theta,
        sa_beta=fits["SA fit"]["value"],
        sa_residual=fits["SA fit"]["residual"],
        sa_at_boundary=int(fits["SA fit"]["at_boundary"]),
        krause_sigma=fits["Krause fit"]["value"],
        krause_residual=fits["Krause fit"]["residual"],
        krause_at_boundary=int(fits["Krause fit"]["at_boundary"]),
    ).assign_coords(model_series=list(clusters))
    out.attrs.update(eps=eps, steps_per_layer=steps_per_layer, n_inputs=int(ds.sizes["sample"]))
    return out
