"""The comparison API in one place (each job lives in its own module):

* :mod:`.layer_metrics` — per-layer metrics, :func:`compare` side by side, :func:`format_table`;
* :mod:`.simulated` — :func:`simulate_like` (own attention / SA / Krause presets from the layer-0
  tokens), :func:`matched_dt`, :func:`restrictions`, :func:`as_interaction`;
* :mod:`.fitting` — :func:`fit_preset`;
* :mod:`.distance` — Wasserstein distances between token clouds on the sphere.
"""

from __future__ import annotations

from .distance import layer_distances, sphere_wasserstein
from .fitting import FIT_METRICS, GRIDS, QUICK_GRIDS, fit_preset
from .layer_metrics import TABLE_COLUMNS, compare, format_table, layer_metrics
from .simulated import (
    GEOMETRIES,
    MODES,
    as_interaction,
    layer0_tokens,
    matched_dt,
    restrictions,
    simulate_like,
)

__all__ = [
    "layer_metrics",
    "compare",
    "format_table",
    "TABLE_COLUMNS",
    "simulate_like",
    "matched_dt",
    "restrictions",
    "as_interaction",
    "layer0_tokens",
    "GEOMETRIES",
    "MODES",
    "fit_preset",
    "FIT_METRICS",
    "GRIDS",
    "QUICK_GRIDS",
    "layer_distances",
    "sphere_wasserstein",
]
