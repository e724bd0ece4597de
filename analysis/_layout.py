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
    axes: tuple[tuple[str, ...], tuple[str, ...]]  # accepted names of the two item axes
    var: str  # the Dataset variable holding the data
    leading: tuple[str, ...]  # names of a numpy input's leading axes, right-aligned

    @property
    def core(self) -> tuple[str, str]:
        """Item axis names given to a numpy input."""
        return self.axes[0][0], self.axes[1][0]


POINTS = Layout((("particle", "token"), ("component",)), "x", ("sample", "time"))
ATTENTION = Layout((("query",), ("key",)), "attention", ("sample", "layer", "head"))


def _expected(layout: Layout) -> str:
    return " and ".join(" or ".join(repr(n) for n in names) for names in layout.axes)


def item_axes(da: xr.DataArray, layout: Layout, param: str) -> tuple[str, str]:
    """The names of ``da``'s two item axes, found by name; ValueError naming ``param`` otherwise."""
    found = []
    for names in layout.axes:
        hits = [d for d in da.dims if d in names]
        if len(hits) != 1:
            why = "has none of them" if not hits else f"has several ({', '.join(map(repr, hits))})"
            raise ValueError(f"{param}: cannot identify the item axes of dims {da.dims}: expected an axis "
                             f"named {_expected(layout)} (in any order, after leading axes such as "
                             f"{', '.join(map(repr, layout.leading))}); it {why} of {names}")
        found.append(hits[0])
    return tuple(found)


def as_dataarray(x, layout: Layout, param: str) -> xr.DataArray:
    """``x`` as a DataArray whose last two axes are the item axes; ValueError naming ``param``.

    A DataArray's item axes are found by name, whatever their position (the others keep their order);
    a numpy array's axes are named right-aligned: leading axes from ``layout.leading``, then the item.
    """
    if isinstance(x, xr.Dataset):
        if layout.var not in x:
            raise ValueError(f"{param}: the Dataset has no variable {layout.var!r}")
        x = x[layout.var]
    if isinstance(x, xr.DataArray):
        return x.transpose(..., *item_axes(x, layout, param))
    arr = np.asarray(x)
    lead = arr.ndim - 2
    if not 0 <= lead <= len(layout.leading):
        names = ", ".join(layout.leading + layout.core)
        raise ValueError(f"{param}: expected 2 to {2 + len(layout.leading)} axes ({names}, leading ones "
                         f"optional), got ndim={arr.ndim}")
    if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool) or np.iscomplexobj(arr):
        raise TypeError(f"{param}: expected real numbers, got dtype {arr.dtype}")
    return xr.DataArray(arr, dims=layout.leading[len(layout.leading) - lead:] + layout.core)


def check_finite(values: np.ndarray, param: str) -> None:
    """ValueError naming ``param`` if ``values`` holds NaN or ±inf."""
    if not np.isfinite(values).all():
        bad = np.size(values) - int(np.isfinite(values).sum())
        raise ValueError(f"{param}: contains {bad} NaN or infinite value(s); metrics need finite input")


def per_item(layout: Layout, item_dims: tuple = ()):
    """Decorator: ``f(item, *args, **kw)`` on one 2-D item becomes a function of any layout.

    ``item_dims`` names the axes of ``f``'s output (empty for a scalar); an integer entry stands for
    the input's item axis of that index (so per-particle labels keep the name "particle" or "token").
    Non-finite input is refused (ValueError naming the argument), except that an attention item that
    is entirely NaN counts as missing (e.g. the last layer of an extraction, which has no attention)
    and gives NaN.
    """

    def decorate(f):
        param = next(iter(inspect.signature(f).parameters))

        @functools.wraps(f)
        def lifted(x, *args, **kwargs):
            da = as_dataarray(x, layout, param)
            lead, item_shape = da.dims[:-2], da.shape[-2:]
            items = np.asarray(da.values).reshape(-1, *item_shape)
            missing = np.isnan(items).all(axis=(1, 2)) if layout is ATTENTION and items.size else None
            if missing is None:
                missing = np.zeros(len(items), dtype=bool)
            check_finite(items[~missing], param)
            out = [None if m else np.asarray(f(item.astype(float), *args, **kwargs)) for item, m in zip(items, missing)]
            shape = next((o.shape for o in out if o is not None), ())
            out = np.stack([np.full(shape, np.nan) if o is None else o for o in out])
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
