"""CF-style metadata and netCDF-safe values for every Dataset the library writes.

``encode(ds)`` before writing (netCDF or zarr), ``decode(ds)`` after reading: ::

    from particles import conventions
    conventions.encode(ds).to_netcdf("run.nc")
    ds2 = conventions.decode(xr.open_dataset("run.nc"))   # == conventions.decode(conventions.encode(ds))

What ``encode`` does (on a shallow copy; data are not copied):

* global attributes (CF-1.10): ``Conventions = "CF-1.10"``; ``history`` gains a line
  ``<UTC time, ISO 8601> <command>`` (the ``ksync`` command line, else the calling function;
  earlier lines are kept); ``source`` (kept if present, else ``"krause-sync <version>"``) and
  ``krause_sync_version`` (kept if present).
* per variable, where absent: ``long_name``, and ``units`` for quantities (all of ours are
  dimensionless: ``units = "1"``; index coordinates such as "particle" or "layer" get none). Time
  is in the model's own unit (t = step · dt of the dimensionless ODE), so "time" has
  ``units = "1"`` and ``long_name = "time (model units)"``; it is not a calendar time.
* booleans (e.g. the token mask) are stored as int8 0/1 with ``flag_values = [0, 1]`` and
  ``flag_meanings`` (``"padding token"`` for ``token_mask``, else ``"false true"``), plus the
  attribute ``dtype = "bool"`` by which xarray (and ``decode``) restore them to bool on read.
* attributes netCDF cannot hold: True/False → 1/0; None, dicts, and lists that are not numeric
  vectors of length ≥ 2 → JSON strings (netCDF reads a length-1 vector back as a scalar);
  numeric lists → 1-D arrays. The attribute ``krause_sync_encoded_attrs``
  (a JSON object {name: "bool" | "json"}) says which ones ``decode`` restores.
* object-dtype variables (e.g. a sweep axis [None, 4, 8]) → one JSON string per element, marked by
  ``krause_sync_encoding = "json"``; text stays text, as variable-length strings.
"""

from __future__ import annotations

import datetime
import inspect
import json
import os
import sys

import numpy as np
import xarray as xr

CONVENTIONS = "CF-1.10"
MARKER = "krause_sync_encoded_attrs"  # {attribute name: "bool" | "json"}
VALUES = "krause_sync_encoding"  # "json" on an object variable stored as JSON strings
FLAG_MEANINGS = {"token_mask": "padding token"}

#: long_name and units of our variables and coordinates (units None: an index, no units)
METADATA = {
    "time": ("time (model units)", "1"),
    "step": ("integration step", None),
    "layer": ("layer (0: embeddings, l: output of block l)", None),
    "sample": ("sample", None),
    "particle": ("particle", None),
    "token": ("token position", None),
    "component": ("component of the state", None),
    "component_out": ("output component of the matrix", None),
    "head": ("attention head", None),
    "query": ("query token position", None),
    "key": ("key token position", None),
    "branch": ("attention branch", None),
    "attention": ("attention weight of the query on the key", "1"),
    "branch_attention": ("attention weight of the query on the key, per branch", "1"),
    "gate": ("gate weight of each branch", "1"),
    "token_mask": ("real token (1) or padding (0)", None),
    "token_id": ("token id", None),
    "token_str": ("token string", None),
    "label": ("class label", None),
    "Q": ("query matrix Q", "1"),
    "K": ("key matrix K", "1"),
    "V": ("value matrix V", "1"),
    "clusters": ("number of clusters", "1"),
    "effective_rank": ("effective rank of the token cloud", "1"),
    "mean_cosine": ("mean pairwise cosine similarity", "1"),
    "rank_collapse": ("relative rank-collapse residual", "1"),
    "first_token_mass": ("mean attention weight on the first key", "1"),
    "sink_score": ("sink score alpha_k (mean weight on key k over queries i >= k)", "1"),
    "sink_excess": ("sink score above the uniform-over-visible-keys baseline", "1"),
    "sink_rate": ("fraction of heads whose key k is a sink", "1"),
    "attention_entropy": ("normalised attention entropy", "1"),
}


def _x_metadata(var: xr.Variable) -> tuple[str, str]:
    if "token" in var.dims:
        return "token representation (hidden state)", "1"
    return "particle position", "1"


def _metadata(name: str, var: xr.Variable):
    if name == "x":
        return _x_metadata(var)
    if name in METADATA:
        return METADATA[name]
    for prefix, text in (("branch_", "{} per branch"), ("final_", "{} at the final time")):
        if name.startswith(prefix) and name[len(prefix):] in METADATA:
            long_name, units = METADATA[name[len(prefix):]]
            return text.format(long_name), units
    if name.endswith("_curve") and name[:-6] in METADATA:
        long_name, units = METADATA[name[:-6]]
        return f"{long_name} per saved time", units
    return None


# -- attributes ------------------------------------------------------------------------------------
def _numeric_vector(v) -> bool:
    a = np.asarray(v) if isinstance(v, (list, tuple, np.ndarray)) else None
    return (a is not None and a.ndim == 1 and a.size > 1 and a.dtype != bool
            and (np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.floating)))


def _json_default(obj):
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return str(obj)


def encode_attrs(attrs: dict) -> dict:
    """A netCDF-safe copy of ``attrs`` (see the module docstring), with its ``krause_sync_encoded_attrs``."""
    kinds = json.loads(attrs.get(MARKER, "{}"))
    out = {}
    for key, v in attrs.items():
        if key == MARKER:
            continue
        if isinstance(v, (bool, np.bool_)):
            out[key], kinds[key] = np.int8(v), "bool"
        elif isinstance(v, (str, bytes, int, float, np.integer, np.floating)):
            out[key] = v
            still_encoded = {"bool": (int, np.integer), "json": str}.get(kinds.get(key), ())
            if not isinstance(v, still_encoded):
                kinds.pop(key, None)  # not (or no longer) an encoded value
        elif _numeric_vector(v):
            out[key] = np.asarray(v)
            kinds.pop(key, None)
        else:
            out[key], kinds[key] = json.dumps(v, default=_json_default), "json"
    kinds = {k: kind for k, kind in kinds.items() if k in out}
    if kinds:
        out[MARKER] = json.dumps(kinds, sort_keys=True)
    return out


def decode_attrs(attrs: dict) -> dict:
    """The inverse of ``encode_attrs``: marked attributes back to bool / their JSON value."""
    attrs = dict(attrs)
    kinds = json.loads(attrs.pop(MARKER, "{}"))
    for key, kind in kinds.items():
        if key in attrs:
            v = attrs[key]
            attrs[key] = bool(v) if kind == "bool" else json.loads(v) if isinstance(v, str) else v
    return attrs


# -- variables -------------------------------------------------------------------------------------
def _encode_variable(name: str, var: xr.Variable) -> xr.Variable:
    attrs = dict(var.attrs)
    meta = _metadata(name, var)
    if meta is not None:
        attrs.setdefault("long_name", meta[0])
        if meta[1] is not None and var.dtype != bool:
            attrs.setdefault("units", meta[1])
    data, encoding = var.data, dict(var.encoding)
    if var.dtype == bool:
        data = data.astype(np.int8)
        encoding.pop("dtype", None)
        attrs.update(dtype="bool", flag_values=np.array([0, 1], dtype=np.int8),
                     flag_meanings=attrs.get("flag_meanings", FLAG_MEANINGS.get(name, "false true")))
    elif var.dtype.kind == "U":
        data = var.values.astype(object)  # variable-length strings (zarr v3 has no fixed-width unicode)
    elif var.dtype == object and not all(isinstance(v, str) for v in var.values.flat):
        data = np.vectorize(lambda v: json.dumps(v, default=_json_default), otypes=[object])(var.values)
        attrs[VALUES] = "json"
    return xr.Variable(var.dims, data, encode_attrs(attrs), encoding)


def _decode_variable(var: xr.Variable) -> xr.Variable:
    attrs = decode_attrs(var.attrs)
    data = var.data
    if attrs.get("dtype") == "bool" and np.issubdtype(var.dtype, np.integer):
        del attrs["dtype"]
        data = var.data != 0
    if attrs.pop(VALUES, None) == "json":
        data = np.vectorize(json.loads, otypes=[object])(var.values)
    return xr.Variable(var.dims, data, attrs, var.encoding)


# -- Datasets --------------------------------------------------------------------------------------
def _command() -> str:
    if os.path.basename(sys.argv[0] or "") == "ksync":
        return " ".join(["ksync", *sys.argv[1:]])
    frame = inspect.currentframe()
    while frame is not None and frame.f_globals.get("__name__") == __name__:
        frame = frame.f_back
    if frame is None:
        return "python"
    return f"{frame.f_globals.get('__name__', '?')}.{frame.f_code.co_name}"


def encode(ds: xr.Dataset, *, command: str | None = None) -> xr.Dataset:
    """A CF-style, netCDF-safe copy of ``ds`` (see the module docstring); ``command`` is the
    history entry (default: the ``ksync`` command line, else the calling function)."""
    if not isinstance(ds, xr.Dataset):
        raise TypeError(f"ds must be an xarray.Dataset, got {type(ds).__name__}")
    if command is not None and not isinstance(command, str):
        raise TypeError(f"command must be a string, got {command!r}")
    from particles import __version__

    variables = {name: _encode_variable(str(name), var) for name, var in ds.variables.items()}
    out = xr.Dataset({k: v for k, v in variables.items() if k not in ds.coords},
                     coords={k: v for k, v in variables.items() if k in ds.coords})
    attrs = dict(ds.attrs)
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    line = f"{stamp} {command or _command()}"
    attrs["history"] = f"{attrs['history']}\n{line}" if attrs.get("history") else line
    attrs["Conventions"] = CONVENTIONS
    attrs.setdefault("source", f"krause-sync {__version__}")
    attrs.setdefault("krause_sync_version", __version__)
    out.attrs = encode_attrs(attrs)
    return out


def decode(ds: xr.Dataset) -> xr.Dataset:
    """``ds`` as it was before ``encode`` (booleans, JSON attributes and object values restored);
    the CF attributes ``encode`` added stay. Safe on a Dataset that was never encoded."""
    if not isinstance(ds, xr.Dataset):
        raise TypeError(f"ds must be an xarray.Dataset, got {type(ds).__name__}")
    variables = {name: _decode_variable(var) for name, var in ds.variables.items()}
    out = xr.Dataset({k: v for k, v in variables.items() if k not in ds.coords},
                     coords={k: v for k, v in variables.items() if k in ds.coords})
    out.attrs = decode_attrs(ds.attrs)
    return out
