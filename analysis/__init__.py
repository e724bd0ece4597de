"""Metrics on particle trajectories, model hidden states and attention (docs/metrics.md).

Every metric accepts one item — a configuration (n, d) or an attention matrix (query, key) — or a
stack of them with leading axes ("time" or "layer", optional "sample", "head", …) as a numpy array,
xarray DataArray or Dataset, and returns a scalar or a DataArray labelled over the leading axes.
DataArray axes are read by name (any order); padding tokens (the ``token_mask`` coordinate) are
left out; cluster and collapse metrics of extracted trajectories (axis "token") work on the unit
sphere unless ``sphere=False``; NaN/inf input is a ValueError; dask-backed input stays lazy.
Each metric's docstring gives its equation and reference.
"""

from analysis import metrics as _metrics
from analysis.metrics import *  # noqa: F403  (the names in analysis.metrics.__all__)

__all__ = list(_metrics.__all__)

# Parameter sweeps (dask.distributed): ``analysis.sweep`` is a module that can be called,
# ``analysis.sweep(model, axes=...)``; the package is analysis.sweeps.
from analysis import sweep  # noqa: E402
from analysis.sweeps import open_sweep, plot_sweep  # noqa: E402

__all__ += ["sweep", "plot_sweep", "open_sweep"]

# Phase diagrams over (parameter, time) of ensembles (issue 20)
from analysis.phase import phase_diagram  # noqa: E402

__all__ += ["phase_diagram"]
