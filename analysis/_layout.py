"""The one layout helper: lift a function of a single item to trajectories and ensembles.

An *item* is the 2-D array a metric is defined on: a configuration (n, d) with axes
("particle" or "token", "component"), or an attention/interaction matrix with axes ("query", "key").
Inputs may carry any leading axes in front of the item: ("time",), ("sample", "layer"),
("sample", "layer", "head"), … They may be

* an ``xarray.DataArray``: its dims and coordinates name the leading axes;
* an ``xarray.Dataset``: its variable "x" (configurations) or "attention" (attention);
* a numpy array: leading axes are named right-aligned from ``Layout.leading``, e.g. a (T, n, d)
  array gets ("time",) and an (S, T, n, d) array ("sample", "time"); wrap it in a DataArray to
  call them "layer" or anything else.

``per_item`` returns a plain Python scalar for a single item and otherwise a DataArray over the
leading axes (plus the function's own output axes), keeping the coordinates that live on them.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass

import numpy as np
import xarray as xr


@dataclass(frozen=True)
class Layout:
    core: tuple[str, str]  # names of the two trailing (item) axes of a numpy input
    var: str  # the Dataset variable holding the data
    leading: tuple[str, ...]  # names of a numpy input's leading axes, right-aligned


POINTS = Layout(("particle", "component"), "x", ("sample", "time"))
ATTENTION = Layout(("query", "key"), "attention", ("sample", "layer", "head"))


def as_dataarray(x, layout: Layout, param: str) -> xr.DataArray:
    """``x`` as a DataArray whose last two axes are the item axes; ValueError naming ``param``."""
    if isinstance(x, xr.Dataset):
        if layout.var not in x:
            raise ValueError(f"{param}: the Dataset has no variable {layout.var!r}")
        x = x[layout.var]
    if isinstance(x, xr.DataArray):
        if x.ndim < 2:
            raise ValueError(f"{param}: expected at least 2 axes {layout.core}, got dims {x.dims}")
        return x
    arr = np.asarray(x)
    lead = arr.ndim - 2
    if not 0 <= lead <= len(layout.leading):
        names = ", ".join(layout.leading + layout.core)
        raise ValueError(f"{param}: expected 2 to {2 + len(layout.leading)} axes ({names}, leading ones "
                         f"optional), got ndim={arr.ndim}")
    return xr.DataArray(arr, dims=layout.leading[len(layout.leading) - lead:] + layout.core)


def per_item(layout: Layout, item_dims: tuple = ()):
    """Decorator: ``f(item, *args, **kw)`` on one 2-D item becomes a function of any layout.

    ``item_dims`` names the axes of ``f``'s output (empty for a scalar); an integer entry stands for
    the input's item axis of that index (so per-particle labels keep the name "particle" or "token").
    """

    def decorate(f):
        param = next(iter(inspect.signature(f).parameters))

        @functools.wraps(f)
        def lifted(x, *args, **kwargs):
            da = as_dataarray(x, layout, param)
            lead, item_shape = da.dims[:-2], da.shape[-2:]
            items = np.asarray(da.values).reshape(-1, *item_shape)
            out = np.stack([np.asarray(f(item.astype(float), *args, **kwargs)) for item in items])
            dims = lead + tuple(da.dims[-2 + d] if isinstance(d, int) else d for d in item_dims)
            if not dims:
                return out.item()
            coords = {k: c for k, c in da.coords.items() if set(c.dims) <= set(dims)}
            values = out.reshape(da.shape[:-2] + out.shape[1:])
            return xr.DataArray(values, dims=dims, coords=coords, name=f.__name__)

        return lifted

    return decorate


def check_positive(name: str, value) -> float:
    """``value`` as a float; ValueError naming ``name`` unless it is finite and > 0."""
    value = float(value)
    if not (np.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return value
