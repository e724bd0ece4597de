"""Stream saved steps of a trajectory to a zarr store instead of holding them in memory.

``simulate(..., store="run.zarr")`` writes each saved configuration as soon as it is computed
(one chunk per saved step, split along particles into ≈ 8 MB pieces), so a run with 10⁶
particles × d = 3 needs memory for a few configurations only. At the end the coordinates,
matrices and attributes are added and the Dataset is reopened lazily (dask) from the store::

    ds = simulate("hk", n=10**6, d=3, steps=200, dt=0.5, radius=0.05, save_every=10, store="hk.zarr")
    ds.x.isel(time=-1).values      # reads one saved step from disk

The interaction matrices requested with ``return_weights=True`` are n×n per saved step and stay in
memory; they are meant for small n.
"""

from __future__ import annotations

import os

import dask.array as da
import numpy as np
import xarray as xr
import zarr

CHUNK_BYTES = 8 * 2**20


class TrajectoryStore:
    """Write-through stand-in for the (sample, time, particle, component) trajectory array.

    ``store[s, slot] = x`` writes saved step `slot` of sample `s`; without an ensemble the stored
    variable has no sample axis. :meth:`lazy` gives the stored data as a dask array of the full
    (sample, time, particle, component) shape; :meth:`finish` completes the store from the final
    Dataset and reopens it.
    """

    def __init__(self, path, shape, dtype, ensemble: bool):
        self.path = os.fspath(path)
        self.ensemble = ensemble
        S, T, n, d = shape
        dtype = np.dtype(dtype)
        per_particle = d * dtype.itemsize
        chunk_n = int(max(1, min(n, CHUNK_BYTES // per_particle)))
        lead = (S,) if ensemble else ()
        dims = (("sample",) if ensemble else ()) + ("time", "particle", "component")
        chunks = (1,) * len(lead) + (1, chunk_n, d)
        template = da.zeros(lead + (T, n, d), chunks=chunks, dtype=dtype)
        xr.Dataset({"x": (dims, template)}).to_zarr(self.path, mode="w", compute=False, consolidated=False)
        self.array = zarr.open_group(self.path, mode="r+")["x"]

    def __setitem__(self, key, x):
        s, slot = key
        if self.ensemble:
            self.array[s, slot] = x
        else:
            self.array[slot] = x

    def lazy(self):
        """The stored trajectory as a dask array of shape (sample, time, particle, component)."""
        arr = da.from_zarr(self.array)
        return arr if self.ensemble else arr[None]

    def finish(self, ds: xr.Dataset) -> xr.Dataset:
        """Add everything but "x" (coordinates, matrices, weights, attributes); reopen lazily."""
        rest = ds.drop_vars("x")
        rest.attrs = dict(ds.attrs)
        rest.to_zarr(self.path, mode="a", consolidated=False)
        return xr.open_zarr(self.path, consolidated=False)
