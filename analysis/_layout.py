"""The one layout helper: lift a function of a single item to trajectories and ensembles.

An *item* is the 2-D array a metric is defined on: a configuration (n, d) with axes
("particle" or "token", "component"), or an attention/interaction matrix with axes ("query", "key").
Inputs may carry any leading axes besides the item: ("time",), ("sample", "layer"),
("sample", "layer", "head"), … They may be

* an ``xarray.DataArray``: its item axes are found by name, in any position (a DataArray whose item
  axes cannot be identified is refused); the other dims and their coordinates are the leading axes;
* an ``xarray.Dataset``: its variable "x" (configurations) or "attention" (attention), and its
  token mask (below);
* a numpy array: axes named right-aligned, the last two being the item and the leading ones taken
  from ``Layout.leading``, e.g. a (T, n, d) array gets ("time",) and an (S, T, n, d) array
  ("sample", "time"); wrap it in a DataArray to call them "layer" or anything else.

Lifted functions run through ``xarray.apply_ufunc(..., dask="parallelized")``: a dask-backed input
(e.g. a trajectory opened lazily from zarr) gives a dask-backed result, computed chunk by chunk
over the leading axes (each chunk holds whole items); numpy input is computed at once.

Common rules of every lifted metric:

* **Token mask.** Padding is never a particle. The mask is the boolean coordinate ``token_mask``
  (True = a real token) with dims ("sample", "token") or ("token",): on ``x`` itself, on the
  Dataset passed, or given as ``token_mask=``. Configurations keep only their real tokens;
  attention keeps the rows and the keys of real tokens (so key index k counts real tokens).
* **Non-finite input** (NaN, ±inf among the real entries) is a ValueError naming the argument, except
  that an attention item that is entirely NaN counts as missing (the last layer of an extraction has
  no attention) and gives NaN. Attention must also be ≥ 0 with some positive weight in each matrix.
  With dask input the checks run when the result is computed.
* Output: a Python scalar for a single item, otherwise a DataArray over the leading axes (plus the
  function's own output axes) with the coordinates that live on them.
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
MASK = "token_mask"


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
        da = x.transpose(..., *item_axes(x, layout, param))
    else:
        arr = np.asarray(x)
        lead = arr.ndim - 2
        if not 0 <= lead <= len(layout.leading):
            names = ", ".join(layout.leading + layout.core)
            raise ValueError(f"{param}: expected 2 to {2 + len(layout.leading)} axes ({names}, leading ones "
                             f"optional), got ndim={arr.ndim}")
        da = xr.DataArray(arr, dims=layout.leading[len(layout.leading) - lead:] + layout.core)
    if (not (np.issubdtype(da.dtype, np.number) or da.dtype == bool)
            or np.issubdtype(da.dtype, np.complexfloating)):
        raise TypeError(f"{param}: expected real numbers, got dtype {da.dtype}")
    return da


def find_token_mask(x, da: xr.DataArray, layout: Layout, given=None) -> xr.DataArray | None:
    """The token mask that applies to ``da`` (from ``given``, else ``da``'s or the Dataset ``x``'s
    ``token_mask``) as a bare boolean DataArray over (leading…, first item axis), or None."""
    mask = given
    if mask is None:
        mask = da.coords.get(MASK)
    if mask is None and isinstance(x, xr.Dataset) and MASK in x.variables:
        mask = x[MASK]
    if mask is None:
        return None
    rows, cols = da.dims[-2:]
    if not isinstance(mask, xr.DataArray):
        mask = np.asarray(mask)
        if mask.ndim not in (1, 2):
            raise ValueError(f"token_mask: expected dims (token,) or (sample, token), got shape {mask.shape}")
        mask = xr.DataArray(mask, dims=("sample", rows)[2 - mask.ndim:])
    mask = xr.DataArray(mask.variable)  # no coordinates (they are da's)
    item = [d for d in mask.dims if d in ("token", "particle", rows)]
    if len(item) != 1:
        raise ValueError(f"token_mask: expected one 'token' axis, got dims {mask.dims}")
    mask = mask.rename({item[0]: rows}) if item[0] != rows else mask
    if not set(mask.dims) <= set(da.dims):
        raise ValueError(f"token_mask: dims {mask.dims} are not among the data's dims {da.dims}")
    if mask.sizes[rows] != da.sizes[rows] or (layout is ATTENTION and da.sizes[cols] != da.sizes[rows]):
        raise ValueError(f"token_mask: {mask.sizes[rows]} tokens, but the data has {rows}={da.sizes[rows]}"
                         f" and {cols}={da.sizes[cols]}")
    if mask.dtype != bool:
        if not np.issubdtype(mask.dtype, np.integer):
            raise TypeError(f"token_mask: expected booleans (or 0/1 integers), got dtype {mask.dtype}")
        mask = mask != 0
    return mask


def query_rows(queries, da: xr.DataArray) -> xr.DataArray | None:
    """The query selector as a boolean DataArray over "query" (or leading dims + "query"), or None.

    ``queries`` is an int (negative counts from the end), a slice, a sequence of ints, a boolean
    array of length n_query, or a boolean DataArray with a "query" axis (e.g. per sample).
    """
    if queries is None:
        return None
    n = da.sizes["query"]
    if isinstance(queries, xr.DataArray):
        if "query" not in queries.dims or queries.dtype != bool or not set(queries.dims) <= set(da.dims):
            raise ValueError(f"queries: a DataArray selector must be boolean with a 'query' axis among the "
                             f"attention's dims {da.dims}, got dims {queries.dims} dtype {queries.dtype}")
        if queries.sizes["query"] != n:
            raise ValueError(f"queries: {queries.sizes['query']} rows, the attention has {n} queries")
        return xr.DataArray(queries.variable)
    rows = np.zeros(n, dtype=bool)
    if isinstance(queries, slice):
        rows[queries] = True
        return xr.DataArray(rows, dims=("query",))
    sel = np.asarray(queries)
    if sel.dtype == bool:
        if sel.shape != (n,):
            raise ValueError(f"queries: a boolean selector needs shape ({n},), got {sel.shape}")
        return xr.DataArray(sel, dims=("query",))
    if sel.ndim > 1 or not np.issubdtype(sel.dtype, np.integer):
        raise ValueError("queries: expected an int, a slice, int indices or a boolean array, "
                         f"got {queries!r}")
    if np.any((sel < -n) | (sel >= n)):
        raise ValueError(f"queries: indices must lie in [{-n}, {n}), got {queries!r}")
    rows[sel] = True
    return xr.DataArray(rows, dims=("query",))


def check_finite(values: np.ndarray, param: str) -> None:
    """ValueError naming ``param`` if ``values`` holds NaN or ±inf."""
    finite = np.isfinite(values)
    if not finite.all():
        raise ValueError(f"{param}: contains {finite.size - int(finite.sum())} NaN or infinite value(s); "
                         "metrics need finite input")


def _project(block: np.ndarray) -> np.ndarray:
    """Each row divided by its norm (zero rows stay zero): tokens on the unit sphere."""
    norms = np.linalg.norm(block, axis=-1, keepdims=True)
    return block / np.where(norms > 0, norms, 1.0)


@dataclass(frozen=True)
class _Spec:
    """What ``per_item`` knows about one lifted function."""

    f: object
    layout: Layout
    param: str  # the name of f's first argument
    item_dims: tuple
    dtype: object
    fill: object
    packed: bool
    stacked: bool
    wants: frozenset  # which of "real", "queries" f takes

    def out_shape(self, item_shape) -> tuple:
        return tuple(item_shape[d] if isinstance(d, int) else d[1] for d in self.item_dims)


def per_item(layout: Layout, item_dims: tuple = (), dtype=float, fill=None, packed=False, check=None,
             stacked=False):
    """Decorator: ``f(item, *args, **kw)`` on one 2-D item becomes a function of any layout.

    ``item_dims`` names the axes of ``f``'s output (empty for a scalar): an integer entry stands for
    the input's item axis of that index (so per-particle labels keep the name "particle" or
    "token"), a pair (name, size) for a new axis. Along an item axis, the outputs of the real tokens
    are put back at their positions (``packed=False``) or first (``packed=True``), the rest being
    ``fill`` (default NaN, -1 for integers). ``dtype`` is the output's type. ``stacked=True``: ``f``
    takes a stack of items (N, n, m) (and ``queries`` (N, n)) and returns N outputs at once; it is
    then called on the whole block when there is no token mask (one item at a time otherwise).

    ``check(shape, arguments)`` validates and normalises ``f``'s other arguments (a dict, changed in
    place) once, before any item is computed, given the stored item shape.

    Parameters of ``f`` with these names are resolved by the decorator:
    ``sphere`` (configurations: None → True iff the item axis is "token", i.e. an extracted
    trajectory; when true, items are divided row-wise by their norms before ``f`` sees them),
    ``queries`` (attention: the selector, given to ``f`` as a boolean array over the real rows),
    ``real`` (the boolean array of real tokens among the stored ones; hidden from the signature).
    Every lifted function takes ``token_mask=`` (see the module docstring).
    """
    if fill is None:
        fill = -1 if np.issubdtype(dtype, np.integer) else np.nan

    def decorate(f):
        sig = inspect.signature(f)
        param = next(iter(sig.parameters))
        names = set(sig.parameters)
        spec = _Spec(f, layout, param, tuple(item_dims), dtype, fill, packed, stacked,
                     frozenset(names & {"real", "queries"}))

        @functools.wraps(f)
        def lifted(x, *args, token_mask=None, **kwargs):
            bound = sig.bind(None, *args, **kwargs)
            bound.apply_defaults()
            arguments = dict(bound.arguments)
            del arguments[param]
            da = as_dataarray(x, layout, param)
            core = da.dims[-2:]
            if check is not None:
                check(da.shape[-2:], arguments)
            if "sphere" in names:
                sphere = arguments["sphere"]
                if sphere is not None and not isinstance(sphere, (bool, np.bool_)):
                    raise TypeError(f"sphere must be None, True or False, got {sphere!r}")
                arguments["sphere"] = core[0] == "token" if sphere is None else bool(sphere)
            mask = find_token_mask(x, da, layout, token_mask)
            rows = query_rows(arguments["queries"], da) if "queries" in names else None
            inputs = [v for v in (da, mask, rows) if v is not None]
            if any(v.chunks is not None for v in inputs):
                inputs = [v.chunk({d: -1 for d in v.dims if d in core}) for v in inputs]
            sizes = {d[0]: d[1] for d in item_dims if not isinstance(d, int)}
            result = xr.apply_ufunc(
                functools.partial(_over_block, spec, arguments, mask is not None, rows is not None),
                *inputs,
                input_core_dims=[list(core)] + [[core[0]]] * (len(inputs) - 1),
                output_core_dims=[[core[d] if isinstance(d, int) else d[0] for d in item_dims]],
                dask="parallelized", output_dtypes=[dtype],
                dask_gufunc_kwargs={"output_sizes": sizes} if sizes else None,
            )
            return result.values.item() if not result.dims else result.rename(f.__name__)

        params = [p for p in sig.parameters.values() if p.name != "real"]
        params.append(inspect.Parameter("token_mask", inspect.Parameter.KEYWORD_ONLY, default=None))
        lifted.__signature__ = sig.replace(parameters=params)
        return lifted

    return decorate


def _over_block(spec: _Spec, arguments: dict, has_mask: bool, has_rows: bool, block, *extra):
    """``spec.f`` on every item of a block (..., n, m); ``extra``: the mask and/or the row selector
    (..., n), broadcastable against the block's leading axes."""
    lead = np.broadcast_shapes(block.shape[:-2], *(e.shape[:-1] for e in extra))
    block = np.broadcast_to(np.asarray(block, dtype=float), lead + block.shape[-2:])
    mask = extra[0] if has_mask else None
    missing = _check_block(block, mask, spec.layout, spec.param).reshape(-1)
    if arguments.get("sphere"):
        block = _project(block)
    n, items = block.shape[-2], block.reshape(-1, *block.shape[-2:])

    def per_row(e):
        return None if e is None else np.broadcast_to(e, lead + e.shape[-1:]).reshape(len(items), -1)

    masks, queries = per_row(mask), per_row(extra[-1] if has_rows else None)
    if queries is None and "queries" in spec.wants:
        queries = np.ones((len(items), n), bool)
    if spec.stacked and masks is None:
        kw = dict(arguments, queries=queries) if "queries" in spec.wants else arguments
        return np.asarray(spec.f(items, **kw), dtype=spec.dtype).reshape(
            lead + spec.out_shape(block.shape[-2:]))
    out = np.full((len(items),) + spec.out_shape(block.shape[-2:]), spec.fill, dtype=spec.dtype)
    for i, item in enumerate(items):
        if missing[i]:
            continue  # a missing item (no attention at this layer)
        real = None if masks is None else masks[i]
        kw = dict(arguments)
        if real is not None:
            item = item[real] if spec.layout is POINTS else item[np.ix_(real, real)]
        if "real" in spec.wants:
            kw["real"] = np.ones(n, bool) if real is None else real
        if "queries" in spec.wants:
            kw["queries"] = queries[i] if real is None else queries[i][real]
        if spec.stacked:  # a stack of one
            item = item[None]
            if "queries" in kw:
                kw["queries"] = kw["queries"][None]
        value = np.asarray(spec.f(item, **kw))
        _store(out, i, value[0] if spec.stacked else value, spec.item_dims, real, spec.packed)
    return out.reshape(lead + out.shape[1:])


def _check_block(block, mask, layout, param) -> np.ndarray:
    """ValueError naming ``param`` for NaN/±inf among the real entries of a block; for attention also
    for negative weights and for a matrix without any positive weight. Returns which items are
    missing (all-NaN attention), over the block's leading axes."""
    lo, hi = block.min(axis=(-2, -1), initial=np.inf), block.max(axis=(-2, -1), initial=-np.inf)
    ok = np.isfinite(lo) & np.isfinite(hi) | (block.shape[-1] * block.shape[-2] == 0)
    if layout is ATTENTION:
        ok &= (lo >= 0) & (hi > 0)
    if ok.all():  # the common case, in two reductions (min and max propagate NaN)
        return np.zeros(block.shape[:-2], bool)
    real = True
    if mask is not None:
        mask = np.broadcast_to(mask, block.shape[:-1])
        real = mask[..., :, None] & (mask[..., None, :] if layout is ATTENTION else True)
    bad = ~np.isfinite(block) & real
    missing = np.zeros(block.shape[:-2], bool)
    if layout is ATTENTION:
        missing = np.isnan(block).all(axis=(-2, -1))
        bad &= ~missing[..., None, None]
        with np.errstate(invalid="ignore"):
            negative = (block < 0) & real
            empty = ~missing & ~np.any((block > 0) & real, axis=(-2, -1))
        if negative.any():
            raise ValueError(f"{param}: attention weights must be >= 0, got {int(negative.sum())} "
                             "negative value(s)")
        if mask is not None:  # a sample of padding only is not an error: its metrics are NaN
            empty &= mask.any(axis=-1)
        if empty.any():
            raise ValueError(f"{param}: {int(empty.sum())} attention matrix(es) without any positive weight")
    if bad.any():
        raise ValueError(f"{param}: contains {int(bad.sum())} NaN or infinite value(s); metrics need "
                         "finite input")
    return missing


def _store(out, i, value, item_dims, real, packed):
    """out[i] = value, with item-axis outputs of the real tokens put back (or first, if packed)."""
    index = [slice(0, s) for s in value.shape]
    if real is not None:
        for k, d in enumerate(item_dims):
            if isinstance(d, int):
                index[k] = slice(0, int(real.sum())) if packed else np.flatnonzero(real)
    out[(i, *index)] = value


def check_positive(name: str, value) -> float:
    """``value`` as a float; ValueError naming ``name`` unless it is finite and > 0."""
    if isinstance(value, (bool, np.bool_, str, bytes)):
        raise TypeError(f"{name} must be a number, got {value!r}")
    value = float(value)
    if not (np.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return value


def check_index(name: str, value, size: int) -> int:
    """``value`` as an int in [0, size); ValueError naming ``name`` otherwise."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer, float)) \
            or not float(value).is_integer() or not 0 <= value < size:
        raise ValueError(f"{name} must be an integer in [0, {size}), got {value!r}")
    return int(value)
