"""Assembling the sweep Dataset from the per-point metric values (dims: the axes + "seed",
+ "time" for curves), and :func:`open_sweep` for a store's finished points."""

from __future__ import annotations

import json
import numbers
import os

import numpy as np
import xarray as xr

from .execution import SweepError
from .registry import METRICS
from .spec import Plan, Point


def _check_values(plan: Plan, point: Point, values: dict, ntime: int | None) -> None:
    for name in plan.metrics:
        v = values[name]
        want = (ntime,) if METRICS[name].curve else ()
        if v.shape != want:
            raise SweepError(f"metric {name!r} returned shape {v.shape} at {point.label}, expected {want}")
        if v.dtype.kind not in "biuf":
            raise SweepError(f"metric {name!r} returned non-numeric {v.dtype} at {point.label}")


def _times(plan: Plan):
    """(step numbers, times or None) of the saved states, when the same at every point."""
    from particles.simulate import saved_steps

    steps = plan.steps
    save_every = plan.fixed.get("save_every", 1)
    if steps is None or "save_every" in plan.axes:
        return None, None
    kept = saved_steps(int(steps), int(save_every))
    return kept, (kept * float(plan.dt) if plan.dt is not None else None)


def _coord(values):
    if all(v is None or isinstance(v, (bool, numbers.Number, str)) for v in values):
        if any(v is None for v in values):
            return np.array(values, dtype=object)
        return np.asarray(values)
    return np.arange(len(values))  # matrices etc.: the index; the values are in attrs["spec"]


def _assemble(plan: Plan, results: dict) -> xr.Dataset:
    dims = tuple(plan.axes) + ("seed",)
    points = list(plan.points())
    complete = all(p.key in results for p in points)
    kept, times = _times(plan)
    data = {}
    for name, opts in plan.metrics.items():
        sample = next((results[p.key][name] for p in points if p.key in results), None)
        curve = METRICS[name].curve if name in METRICS else (sample is not None and sample.ndim == 1)
        extra = (len(kept),) if curve else ()
        dtype = sample.dtype if sample is not None else np.dtype(float)
        if not complete and dtype.kind in "biu":
            dtype = np.dtype(float)
        arr = np.full(plan.shape + extra, np.nan if dtype.kind == "f" else 0, dtype=dtype)
        for p in points:
            if p.key in results:
                arr[p.index] = results[p.key][name]
        attrs = {"description": METRICS[name].description if name in METRICS else name, **opts}
        data[name] = (dims + (("time",) if curve else ()), arr, attrs)
    coords = {name: _coord(values) for name, values in plan.recorded_axes.items()}
    coords["seed"] = np.asarray(plan.seeds)
    if any(v[0][-1:] == ("time",) for v in data.values()):
        coords["step"] = ("time", kept)
        if times is not None:
            coords["time"] = times
    from particles import __version__

    attrs = {"model": plan.model_description, "spec": json.dumps(plan.spec(), sort_keys=True),
             "points": len(points), "points_done": sum(p.key in results for p in points),
             "krause_sync_version": __version__}
    if plan.steps is not None:
        attrs["steps"] = plan.steps
    if plan.dt is not None:
        attrs["dt"] = plan.dt
    return xr.Dataset(data, coords=coords, attrs=attrs)


def open_sweep(store: str | os.PathLike[str]) -> xr.Dataset:
    """The Dataset of a sweep store, assembled from its finished points.

    Missing points are NaN (integer metrics then become float); ``attrs["points_done"]`` says how
    many are finished. Metrics registered only in another process are read as stored.
    """
    from .store import SweepStore

    db = SweepStore.open(store)
    spec = db.spec
    plan = Plan(spec["model"], spec["axes"], spec["seeds"], spec["metrics"], spec["steps"], spec["dt"],
                spec["fixed"])
    return _assemble(plan, {key: db.read_point(key) for key in db.done()})
