"""Sweep specification: validation of the axes, seeds, metrics and fixed parameters, the
:class:`Plan` of points, and SPEC.toml (format: the docstring of :mod:`analysis.sweeps`).

Swept and fixed parameters are checked against the one description of simulate's parameters
(``particles.params.PARAMS``); every axis combination is then built by a trial ``simulate`` call
with ``steps=0``, so a bad specification fails before any work or store is created.
"""

from __future__ import annotations

import itertools
import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from particles.params import PARAMS
from particles.simulate import describe_model

from .registry import METRICS

MAX_VALUES = 10**6  # per axis, seeds, and points in all: a larger plan is refused before it is built
RESERVED = {"seed": "use seeds=…", "samples": "use seeds=… for repetitions",
            "return_weights": "it is set when a metric needs the weights",
            "progress": "it is the sweep's own progress bar",
            "store": "points are reduced to metrics; the sweep's own store= keeps them",
            "overwrite": "a sweep store is resumed, never overwritten"}
#: simulate parameters that may be swept or fixed: "model", "x0" and particles.params.PARAMS
PARAMETERS = ("model", "x0", *(name for name in PARAMS if name not in RESERVED))


# -- the plan: axes × seeds ----------------------------------------------------------------------
@dataclass(frozen=True)
class Point:
    index: tuple  # axis indices + seed index
    params: dict  # the swept parameter values
    seed: int

    @property
    def key(self) -> str:
        return "_".join(str(i) for i in self.index)

    @property
    def label(self) -> str:
        return f"{params_label(self.params)}, seed={self.seed}" if self.params else f"seed={self.seed}"


@dataclass
class Plan:
    model: object  # anything simulate accepts: a preset name, an Interaction, a velocity field v(x)
    axes: dict
    seeds: list
    metrics: dict  # name → options (defaults filled in)
    steps: object
    dt: object
    fixed: dict

    def spec(self) -> dict:
        from .store import json_roundtrip

        return json_roundtrip(dict(model=self.model_description, axes=self.recorded_axes, seeds=self.seeds,
                                   metrics=self.metrics, steps=self.steps, dt=self.dt, fixed=self.fixed))

    @property
    def model_description(self) -> str | None:
        """What the spec and the Dataset's attrs record of the model (particles.simulate.describe_model:
        a preset name as is, an Interaction or a custom velocity field by its repr or name)."""
        return None if self.model is None else describe_model(self.model)

    @property
    def recorded_axes(self) -> dict:
        """The axes as the spec, the store and the coordinates record them: a "model" axis by the
        descriptions of its models."""
        return {name: [recorded(name, v) for v in values] for name, values in self.axes.items()}

    @property
    def shape(self) -> tuple:
        return tuple(len(v) for v in self.axes.values()) + (len(self.seeds),)

    def combos(self):
        names = list(self.axes)
        for idx in itertools.product(*(range(len(v)) for v in self.axes.values())):
            yield idx, {name: self.axes[name][i] for name, i in zip(names, idx)}

    def points(self):
        for idx, params in self.combos():
            for s, seed in enumerate(self.seeds):
                yield Point(idx + (s,), params, seed)

    def run_params(self, point: Point) -> dict:
        """Keyword arguments of simulate for this point (model included)."""
        base = {"model": self.model, **self.fixed}
        if self.steps is not None:
            base["steps"] = self.steps
        if self.dt is not None:
            base["dt"] = self.dt
        return {**base, **point.params}


def params_label(params: dict) -> str:
    """'beta=1.0, top_k=4': the swept values of a point, as messages name it."""
    return ", ".join(f"{k}={v!r}" for k, v in params.items())


def recorded(name: str, value):
    """A parameter value as a sweep records it: a model by its description, anything else as is."""
    return describe_model(value) if name == "model" else value


def _values(name, values) -> list:
    if isinstance(values, np.ndarray):
        values = values.tolist()
    if isinstance(values, (str, bytes, Mapping)) or not hasattr(values, "__iter__"):
        raise ValueError(f"axes[{name!r}] must be a list of values, got {values!r}")
    if not isinstance(values, (list, tuple, range)):
        raise TypeError(f"axes[{name!r}] must be a list (or tuple) of values, got {type(values).__name__}")
    _check_count(f"axes[{name!r}]", len(values))
    values = [v.tolist() if isinstance(v, (np.ndarray, np.generic)) else v for v in values]
    if not values:
        raise ValueError(f"axes[{name!r}] is empty")
    if name == "model":
        for v in values:
            describe_model(v)  # TypeError for what simulate refuses
    seen, unhashable = set(), []
    for v in values:
        try:
            key = (type(v), recorded(name, v))
            repeated = key in seen
            seen.add(key)
        except TypeError:  # lists (matrices): compared one by one
            repeated = any(v == w for w in unhashable)
            unhashable.append(v)
        if repeated:
            raise ValueError(f"axes[{name!r}] repeats the value {v!r}")
    return values


def _check_name(where, name):
    if name in RESERVED:
        raise ValueError(f"{where}: {name!r} cannot be set here ({RESERVED[name]})")
    if name not in PARAMETERS:
        raise ValueError(f"{where}: unknown simulate parameter {name!r} (known: {', '.join(PARAMETERS)})")


def _check_count(where, count) -> None:
    if count > MAX_VALUES:
        raise ValueError(f"{where}: {count} values is more than the {MAX_VALUES} a sweep allows")


def _int_entry(where, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{where} must be an integer, got {value!r}")
    return int(value)


def _seeds(seeds) -> list:
    if isinstance(seeds, bool):
        raise TypeError(f"seeds must be an int or a list of ints, got {seeds!r}")
    if isinstance(seeds, numbers.Integral):
        if seeds < 1:
            raise ValueError(f"seeds must be >= 1 (the number of seeds) or a list, got {seeds}")
        _check_count("seeds", seeds)
        return list(range(int(seeds)))
    if isinstance(seeds, Mapping):
        if "stop" not in seeds or set(seeds) - {"start", "stop"}:
            raise ValueError(f"seeds: a range is {{start, stop}} (stop excluded), got {dict(seeds)!r}")
        span = range(_int_entry("seeds.start", seeds.get("start", 0)),
                     _int_entry("seeds.stop", seeds["stop"]))
        _check_count("seeds", len(span))
        return _seeds(list(span))
    try:
        out = [int(s) for s in seeds if not isinstance(s, bool) and float(s).is_integer()]
    except TypeError as err:
        raise TypeError(f"seeds must be an int or a list of ints, got {seeds!r}") from err
    if len(out) != len(list(seeds)) or not out:
        raise ValueError(f"seeds must be a non-empty list of integers, got {seeds!r}")
    if len(set(out)) != len(out):
        raise ValueError(f"seeds repeats a value: {seeds!r}")
    return out


def _metrics(metrics) -> dict:
    if metrics is None:
        metrics = ["final_clusters", "time_to_one_cluster"]
    if isinstance(metrics, str):
        metrics = [metrics]
    if not isinstance(metrics, Mapping):
        items = []
        for m in metrics:
            if isinstance(m, Mapping):  # {"name": ..., **options}
                m = dict(m)
                if "name" not in m:
                    raise ValueError(f"metrics: an entry given as a table needs a 'name' key (the metric), "
                                     f"got {m!r}")
                items.append((m.pop("name"), m))
            else:
                items.append((m, {}))
        metrics = dict(items)
    if not metrics:
        raise ValueError("metrics: give at least one metric")
    out = {}
    for name, opts in metrics.items():
        if not isinstance(name, str):
            raise TypeError(f"metrics: a metric name must be a string, got {name!r}")
        if opts is not None and not isinstance(opts, Mapping):
            raise TypeError(f"metrics: the options of {name!r} must be a table, got {opts!r}")
        if name not in METRICS:
            raise ValueError(f"metrics: unknown metric {name!r} (known: {', '.join(sorted(METRICS))})")
        unknown = set(opts or {}) - set(METRICS[name].defaults)
        if unknown:
            raise ValueError(f"metrics: unknown option(s) {sorted(unknown)} for {name!r} "
                             f"(options: {sorted(METRICS[name].defaults) or 'none'})")
        out[name] = {**METRICS[name].defaults, **(opts or {})}
    return out


def make_plan(model, axes=None, *, seeds=1, metrics=None, steps=None, dt=None, **fixed) -> Plan:
    """Validate a sweep specification (no simulation is run) and return its :class:`Plan`."""
    axes = dict(axes or {})
    for name in axes:
        _check_name("axes", name)
    for name in fixed:
        _check_name("fixed parameters", name)
        if name in axes:
            raise ValueError(f"{name!r} is both swept (axes) and fixed")
    for name, value in (("steps", steps), ("dt", dt)):
        if value is None and name not in axes:
            raise ValueError(f"{name} is required (as a keyword or as an axis)")
        if value is not None and name in axes:
            raise ValueError(f"{name!r} is both swept (axes) and fixed")
    if "model" not in axes:
        describe_model(model)  # TypeError for what simulate refuses
    fixed = {k: (v.tolist() if isinstance(v, (np.ndarray, np.generic)) else v) for k, v in fixed.items()}
    plan = Plan(model, {k: _values(k, v) for k, v in axes.items()}, _seeds(seeds), _metrics(metrics),
                steps, dt, fixed)
    _check_count("points (axes × seeds)", math.prod(plan.shape))
    curves = [m for m in plan.metrics if METRICS[m].curve]
    clash = [a for a in ("steps", "save_every") if a in plan.axes]
    if curves and clash:
        raise ValueError(f"curve metrics {curves} need the same saved times at every point; "
                         f"{clash[0]!r} cannot be an axis with them")
    return plan


def _check_points(plan: Plan) -> None:
    """Build every axis combination with steps=0 so that bad parameters fail before any work."""
    from particles import simulate

    for _, params in plan.combos():
        kw = plan.run_params(Point((), params, plan.seeds[0]))
        model = kw.pop("model")
        try:
            PARAMS["steps"].validate(kw.get("steps"))  # the trial run below uses steps=0
            kw["steps"] = 0
            if kw.get("x0") is not None and np.ndim(kw["x0"]) != 2:
                raise ValueError(f"x0: a sweep point starts one system, shape (n, d), got shape "
                                 f"{np.shape(kw['x0'])}; its repetitions are the seeds (seeds=…)")
            simulate(model, seed=plan.seeds[0], progress=False, **kw)
        except (ValueError, TypeError) as err:
            where = params_label(params)
            raise type(err)(f"{err} (at {where})" if where else str(err)) from err


# -- SPEC.toml ------------------------------------------------------------------------------------
def _range(name, r: Mapping) -> list:
    keys = set(r)
    if keys - {"start", "stop", "num", "step", "log"} or not {"start", "stop"} <= keys \
            or ("num" in keys) == ("step" in keys):
        raise ValueError(f"axes.{name}: a range is {{start, stop, num[, log]}} or {{start, stop, step}}, "
                         f"got {dict(r)!r}")
    start, stop = r["start"], r["stop"]
    for key in ("start", "stop", "step"):
        v = r.get(key, 0)
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
            raise ValueError(f"axes.{name}: {key} must be a finite number, got {v!r}")
    if "num" in r:
        num = _int_entry(f"axes.{name}.num", r["num"])
        if num < 1:
            raise ValueError(f"axes.{name}: num must be >= 1, got {num}")
        _check_count(f"axes.{name}", num)
        if r.get("log", False):
            if start <= 0 or stop <= 0:
                raise ValueError(f"axes.{name}: a log range needs start, stop > 0")
            return np.geomspace(start, stop, num).tolist()
        return np.linspace(start, stop, num).tolist()
    step = r["step"]
    if step == 0:
        raise ValueError(f"axes.{name}: step must be non-zero")
    if all(isinstance(v, int) for v in (start, stop, step)):
        _check_count(f"axes.{name}", len(range(start, stop, step)))
        return list(range(start, stop, step))
    count = math.ceil((stop - start) / step - 1e-9)
    _check_count(f"axes.{name}", count)
    return [start + k * step for k in range(max(count, 0))]


SPEC_KEYS = ("model", "steps", "dt", "seeds", "metrics", "fixed", "axes", "description")


def load_spec(path) -> dict:
    """Read SPEC.toml into keyword arguments of :func:`sweep` (model, axes, seeds, metrics, steps,
    dt and the fixed parameters)."""
    try:
        import tomllib
    except ModuleNotFoundError:  # pragma: no cover - Python 3.10
        import tomli as tomllib

    path = Path(path)
    with open(path, "rb") as fh:
        try:
            raw = tomllib.load(fh)
        except tomllib.TOMLDecodeError as err:
            raise ValueError(f"{path}: not valid TOML: {err}") from err
    unknown = set(raw) - set(SPEC_KEYS)
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {sorted(unknown)} (allowed: {', '.join(SPEC_KEYS)}; "
                         "simulate parameters go under [fixed] or [axes])")
    if "model" not in raw:
        raise ValueError(f"{path}: missing 'model'")
    for table in ("fixed", "axes"):
        if not isinstance(raw.get(table, {}), Mapping):
            raise ValueError(f"{path}: [{table}] must be a table")
    axes = {name: _range(name, v) if isinstance(v, Mapping) else v for name, v in raw.get("axes", {}).items()}
    return dict(model=raw["model"], axes=axes, seeds=raw.get("seeds", 1), metrics=raw.get("metrics"),
                steps=raw.get("steps"), dt=raw.get("dt"), **raw.get("fixed", {}))
