"""``plot_sweep``: a sweep metric against one axis, mean over seeds with a ± sd band."""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING, Any

import xarray as xr

if TYPE_CHECKING:
    from matplotlib.axes import Axes


def plot_sweep(ds: xr.Dataset, metric: str, axis: str, ax: Axes | None = None, **kwargs: Any) -> Axes:
    """Plot ``metric`` against the sweep axis ``axis``: mean over seeds with a ± sd band.

    Every other sweep axis gives one line per value combination. A curve metric (with "time")
    must be reduced first, e.g. ``ds.isel(time=-1)``. Returns the matplotlib Axes.
    """
    import matplotlib.pyplot as plt

    if metric not in ds:
        raise ValueError(f"metric: {metric!r} is not in the Dataset ({', '.join(ds.data_vars)})")
    da = ds[metric]
    if axis not in da.dims or axis == "seed":
        raise ValueError(f"axis: {axis!r} is not a sweep axis of {metric!r} {da.dims}")
    if "time" in da.dims:
        raise ValueError(f"{metric!r} is a curve over time; select a time first, e.g. ds.isel(time=-1)")
    if ax is None:
        ax = plt.gca()
    da = da.astype(float)
    mean = da.mean("seed")
    sd = da.std("seed", ddof=1) if da.sizes.get("seed", 1) > 1 else xr.zeros_like(mean)
    others = [d for d in mean.dims if d != axis]
    x = ds[axis].values
    combos = itertools.product(*(range(mean.sizes[d]) for d in others)) if others else [()]
    for combo in combos:
        sel = dict(zip(others, combo))
        m, s = mean.isel(sel).transpose(axis).values, sd.isel(sel).transpose(axis).values
        label = ", ".join(f"{d}={ds[d].values[i]}" for d, i in sel.items()) or None
        (line,) = ax.plot(x, m, marker="o", label=label, **kwargs)
        ax.fill_between(x, m - s, m + s, color=line.get_color(), alpha=0.2, linewidth=0)
    ax.set_xlabel(axis)
    ax.set_ylabel(metric)
    if others:
        ax.legend()
    return ax
