"""Parameter sweeps on dask.distributed: many ``simulate`` runs reduced to a few metrics.

Python API::

    from analysis.sweep import sweep, plot_sweep
    ds = sweep("sa", axes={"beta": [0.5, 1, 4, 9]}, seeds=8,
               metrics=["final_clusters", "time_to_one_cluster", "effective_rank_curve"],
               steps=400, dt=0.1, n=64, d=3, store="results.zarr")
    plot_sweep(ds, "final_clusters", "beta")          # mean ± sd over seeds

Every combination of the axis values (the Cartesian product, in the order the axes are given) is
run once per seed with ``particles.simulate(model, seed=seed, steps=…, dt=…, **fixed, **point)``
and reduced to the requested metrics on the worker; only the metric values travel back. The result
is an ``xarray.Dataset`` with dims = the sweep axes + "seed", one variable per metric; curves
(``*_curve``) have an extra trailing "time" dim (coordinate "time" = step · dt, and "step").

Scheduler:
    ``None``            start a ``distributed.LocalCluster`` on 127.0.0.1 (``workers`` processes,
                        one thread each; default min(#CPUs, #points)) and close it at the end;
    ``"tcp://host:port"`` connect to a running dask scheduler (its workers must have krause-sync
                        installed); an address that does not answer as a dask scheduler within
                        ``connect_timeout`` seconds (default 10) is an error; a
                        ``distributed.Client`` is used as is;
    ``"sync"``          run in this process without dask (tests, quick figures).
Scripts that use a LocalCluster need the usual ``if __name__ == "__main__":`` guard.

Store: with ``store="results.zarr"`` every finished point is written at once, atomically (see
``analysis._store``: one zarr group per point, staged and moved in with one rename). Rerunning
the same sweep skips the finished points, so a run killed at any moment (SIGKILL included) is
resumed by running it again, and the final Dataset equals that of an uninterrupted run. A store
made for a different specification is refused with a message listing the differences. When
every point is done the assembled Dataset is also written as the group ``result``
(``xr.open_zarr(path, group="result", consolidated=False)``); :func:`open_sweep` assembles
whatever is finished. One sweep process per store at a time: the store is locked while a sweep
writes it, and a second sweep started on the same store is refused with a message naming the
first one's pid (a lock left by a killed sweep is taken over). A path that is not a sweep store
(a folder we did not write, a trajectory store) is refused, never emptied (``particles.store``).
The whole specification (steps, dt and every axis value) is validated before the store is created.

Metrics (name → value per point; options with defaults, overridable per metric):
    final_clusters          count_clusters(x(T), eps, method)           eps=1e-2, method="graph"
    cluster_count_curve     count_clusters(x(t), eps, method) per saved time
    time_to_one_cluster     first saved time with one cluster, NaN if never (eps, method)
    time_to_clusters        first saved time with ≤ k clusters (k=1, eps, method)
    final_effective_rank, effective_rank_curve
    final_rank_collapse, rank_collapse_curve
    final_mean_cosine, mean_cosine_curve
    final_first_token_mass, first_token_mass_curve     (runs simulate with return_weights=True)
    final_attention_entropy, attention_entropy_curve   (idem)
:func:`register_metric` adds more (the function must be importable or picklable on workers).

SPEC.toml (``ksync sweep SPEC.toml -o results.zarr [--scheduler ADDRESS|sync] [--workers N]``)::

    model = "sa"                # "sa" | "usa" | "krause" | "hk"
    steps = 400                 # steps and dt: here, or as an axis
    dt = 0.1
    seeds = 8                   # 8 → seeds 0..7; or a list [0, 3, 7]; or {start = 10, stop = 20}
    metrics = ["final_clusters", "time_to_one_cluster"]   # or tables with options, see below

    [fixed]                     # any other simulate parameter, the same at every point
    n = 64
    d = 3
    save_every = 10

    [axes]                      # the swept simulate parameters, in this order
    beta = [0.5, 1.0, 4.0, 9.0]                      # an explicit list
    # sigma = {start = 0.2, stop = 1.0, num = 5}     # linspace, both ends included
    # beta = {start = 0.1, stop = 100, num = 7, log = true}   # geomspace
    # window = {start = 2, stop = 10, step = 2}      # like range(): 2, 4, 6, 8

    # metrics with options instead of the list form:
    # [metrics.final_clusters]
    # eps = 0.05
    # [metrics.effective_rank_curve]

Axis names: any ``simulate`` parameter (beta, sigma, radius, window, causal, top_k, noise,
geometry, n, d, dt, steps, save_every, integrator, dtype, Q, K, V) and "model". "seed" is the
``seeds`` entry; "samples", "return_weights" and "progress" are not allowed.
"""

from __future__ import annotations

import itertools
import json
import math
import numbers
import os
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import xarray as xr

from analysis.clusters import count_clusters, time_to_clusters
from analysis.metrics import effective_rank, mean_cosine, rank_collapse
from analysis.sinks import attention_entropy, first_token_mass
from particles.conventions import encode

__all__ = ["sweep", "plot_sweep", "open_sweep", "load_spec", "register_metric", "METRICS", "SweepError"]

#: simulate parameters that may be swept or fixed
PARAMETERS = ("model", "beta", "sigma", "radius", "window", "causal", "top_k", "Q", "K", "V", "geometry",
              "noise", "n", "d", "dt", "steps", "save_every", "integrator", "dtype", "x0")
MAX_VALUES = 10**6  # per axis, seeds, and points in all: a larger plan is refused before it is built
RESERVED = {"seed": "use seeds=…", "samples": "use seeds=… for repetitions",
            "return_weights": "it is set when a metric needs the weights",
            "progress": "it is the sweep's own progress bar"}


#: the scheduler's HTTP (metrics) server on a free loopback port, without the dashboard
#: (by default it tries port 8787, which a second cluster on the machine finds taken)
LOOPBACK_HTTP = {"dashboard_address": "127.0.0.1:0"}


class SweepError(RuntimeError):
    """A point of the sweep failed (the finished points stay in the store)."""


# -- metric registry ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Metric:
    """``fn(ds, **options)`` → a scalar, or (curve=True) a 1-D array over the saved times."""

    name: str
    fn: Callable
    curve: bool = False
    needs_weights: bool = False
    defaults: dict = field(default_factory=dict)
    description: str = ""


METRICS: dict[str, Metric] = {}


def register_metric(name: str, fn: Callable, *, curve: bool = False, needs_weights: bool = False,
                    description: str = "", **defaults) -> Metric:
    """Add a metric ``fn(ds, **options)`` (ds: the Dataset returned by ``simulate``)."""
    METRICS[name] = Metric(name, fn, curve, needs_weights, dict(defaults), description or name)
    return METRICS[name]


def _last(ds):
    return ds["x"].isel(time=-1).values


def _final_clusters(ds, eps, method):
    return count_clusters(_last(ds), eps=eps, method=method)


def _cluster_curve(ds, eps, method):
    return count_clusters(ds["x"], eps=eps, method=method).values


def _time_to_clusters(ds, k, eps, method):
    return time_to_clusters(ds["x"], k, eps, method=method)


def _time_to_one(ds, eps, method):
    return time_to_clusters(ds["x"], 1, eps, method=method)


@dataclass(frozen=True)
class _OnX:
    """A per-configuration metric applied at the final time (``curve=False``) or at every time."""

    fn: Callable
    var: str = "x"
    curve: bool = False

    def __call__(self, ds):
        if self.curve:
            return np.asarray(self.fn(ds[self.var]).values)
        return self.fn(ds[self.var].isel(time=-1).values)


_CLUSTER_OPTS = {"eps": 1e-2, "method": "graph"}
register_metric("final_clusters", _final_clusters, description="clusters at the final time", **_CLUSTER_OPTS)
register_metric("cluster_count_curve", _cluster_curve, curve=True, description="clusters per saved time",
                **_CLUSTER_OPTS)
register_metric("time_to_one_cluster", _time_to_one, description="first time with one cluster (NaN: never)",
                **_CLUSTER_OPTS)
register_metric("time_to_clusters", _time_to_clusters, description="first time with <= k clusters", k=1,
                **_CLUSTER_OPTS)
for _name, _fn, _var in (("effective_rank", effective_rank, "x"), ("rank_collapse", rank_collapse, "x"),
                         ("mean_cosine", mean_cosine, "x"),
                         ("first_token_mass", first_token_mass, "attention"),
                         ("attention_entropy", attention_entropy, "attention")):
    register_metric(f"final_{_name}", _OnX(_fn, _var), needs_weights=_var == "attention",
                    description=f"{_name} at the final time")
    register_metric(f"{_name}_curve", _OnX(_fn, _var, curve=True), curve=True,
                    needs_weights=_var == "attention", description=f"{_name} per saved time")


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
        return ", ".join([f"{k}={v!r}" for k, v in self.params.items()] + [f"seed={self.seed}"])


@dataclass
class Plan:
    model: str
    axes: dict
    seeds: list
    metrics: dict  # name → options (defaults filled in)
    steps: object
    dt: object
    fixed: dict

    def spec(self) -> dict:
        from analysis._store import json_roundtrip

        return json_roundtrip(dict(model=self.model, axes=self.axes, seeds=self.seeds, metrics=self.metrics,
                                   steps=self.steps, dt=self.dt, fixed=self.fixed))

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
    seen, unhashable = set(), []
    for v in values:
        try:
            key = (type(v), v)
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
    if "model" not in axes and not isinstance(model, str):
        raise ValueError(f"model must be a model name, got {model!r}")
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


def _check_steps(kw: dict) -> None:
    """steps: an integer >= 0 (validated here: the trial runs of :func:`_check_points` use 0)."""
    steps = kw.get("steps")
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral):
        raise TypeError(f"steps must be an integer >= 0, got {steps!r}")
    if steps < 0:
        raise ValueError(f"steps must be an integer >= 0, got {steps!r}")


def _check_points(plan: Plan) -> None:
    """Build every axis combination with steps=0 so that bad parameters fail before any work."""
    from particles import simulate

    for _, params in plan.combos():
        kw = plan.run_params(Point((), params, plan.seeds[0]))
        model = kw.pop("model")
        try:
            _check_steps(kw)
            kw["steps"] = 0
            simulate(model, seed=plan.seeds[0], progress=False, **kw)
        except (ValueError, TypeError) as err:
            where = ", ".join(f"{k}={v!r}" for k, v in params.items())
            raise type(err)(f"{err} (at {where})" if where else str(err)) from err


# -- running one point ----------------------------------------------------------------------------
def run_point(params: dict, seed: int, metrics: dict) -> tuple[dict, dict]:
    """Simulate one point and reduce it to the metrics (this runs on a worker).

    params: simulate keyword arguments with "model"; metrics: name → (Metric, options).
    Returns (values, info) with values[name] a numpy scalar or 1-D array.
    """
    from particles import simulate

    params = dict(params)
    model = params.pop("model")
    weights = any(m.needs_weights for m, _ in metrics.values())
    start = time.perf_counter()
    ds = simulate(model, seed=seed, return_weights=weights, progress=False, **params)
    values = {name: np.asarray(m.fn(ds, **opts)) for name, (m, opts) in metrics.items()}
    info = {"seconds": time.perf_counter() - start, "host": socket.gethostname(), "pid": os.getpid()}
    return values, info


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


# -- execution ------------------------------------------------------------------------------------
def _probe(address: str, timeout: float) -> None:
    """Ask ``address`` for its identity; TimeoutError/OSError unless a dask scheduler answers in time.

    ``distributed.Client`` waits forever on a service that accepts the connection and says nothing.
    """
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    async def ask():
        from distributed.comm import connect

        comm = await connect(address, timeout=timeout)
        try:
            await comm.write({"op": "identity", "reply": True})
            reply = await comm.read()
        finally:
            comm.abort()
        if not isinstance(reply, dict) or reply.get("type") != "Scheduler":
            raise OSError(f"{address} answered, but not as a dask scheduler")

    async def bounded():
        await asyncio.wait_for(ask(), timeout)

    with ThreadPoolExecutor(1) as pool:  # its own event loop: works under a running loop (Jupyter) too
        try:
            pool.submit(asyncio.run, bounded()).result()
        except (asyncio.TimeoutError, TimeoutError):
            raise TimeoutError(f"scheduler {address}: no answer from a dask scheduler within {timeout:g} s "
                               "(is it a dask scheduler address? see connect_timeout)") from None
        except OSError as err:
            raise OSError(f"scheduler {address}: cannot connect ({err})") from None


def _connect(scheduler, workers, ntasks, connect_timeout=10.0):
    """(client, close) for scheduler None (LocalCluster), an address, or a Client."""
    from distributed import Client, LocalCluster

    if isinstance(scheduler, Client):
        if workers is not None:
            raise ValueError("workers: only for a LocalCluster started by the sweep (scheduler=None)")
        return scheduler, lambda: None
    if scheduler is None:
        if workers is None:
            workers = max(1, min(os.cpu_count() or 1, ntasks))
        if isinstance(workers, bool) or not isinstance(workers, numbers.Integral) or workers < 1:
            raise ValueError(f"workers must be an integer >= 1, got {workers!r}")
        # one thread per worker process, numba's parallel kernels included (env of the workers)
        cluster = LocalCluster(n_workers=int(workers), threads_per_worker=1, processes=True,
                               host="127.0.0.1", dashboard_address=None, env={"NUMBA_NUM_THREADS": "1"},
                               scheduler_kwargs=LOOPBACK_HTTP)
        client = Client(cluster)

        def close():
            client.close()
            cluster.close()

        return client, close
    if not isinstance(scheduler, str):
        raise TypeError(f"scheduler must be None, 'sync', an address or a distributed.Client, "
                        f"got {scheduler!r}")
    if workers is not None:
        raise ValueError("workers: only for a LocalCluster started by the sweep (scheduler=None); "
                         "an existing scheduler has its own workers")
    _probe(scheduler, connect_timeout)
    client = Client(scheduler, timeout=connect_timeout)
    return client, client.close


def _execute(plan, todo, client, on_result):
    """Run the points in ``todo`` (in-process when ``client`` is None), calling
    ``on_result(point, values, info)`` as each finishes."""
    tasks = {name: (METRICS[name], opts) for name, opts in plan.metrics.items()}
    if client is None:
        for p in todo:
            try:
                values, info = run_point(plan.run_params(p), p.seed, tasks)
            except Exception as err:
                raise SweepError(f"point {p.label} failed: {type(err).__name__}: {err}") from err
            on_result(p, values, info)
        return
    from distributed import as_completed

    futures = {}
    try:
        for p in todo:
            futures[client.submit(run_point, plan.run_params(p), p.seed, tasks, pure=False)] = p
        for fut in as_completed(list(futures)):
            p = futures.pop(fut)
            try:
                values, info = fut.result()
            except Exception as err:
                raise SweepError(f"point {p.label} failed: {type(err).__name__}: {err}") from err
            on_result(p, values, info)
            fut.release()
    finally:
        if futures:
            client.cancel(list(futures))


def sweep(model, axes=None, *, seeds=1, metrics=None, store=None, scheduler=None, steps=None, dt=None,
          progress=True, workers=None, connect_timeout=10.0, **fixed) -> xr.Dataset:
    """Run ``simulate`` over the Cartesian product of ``axes`` × ``seeds`` and reduce to ``metrics``.

    model: "sa", "usa", "krause" or "hk" (or an axis "model"). axes: {parameter: [values]}.
    seeds: n (seeds 0..n-1) or a list. metrics: names, or {name: {option: value}} (see the module
    docstring). store: a path for the resumable zarr store, or None (nothing written).
    scheduler: None (LocalCluster with ``workers`` processes on 127.0.0.1), "sync" (in-process),
    a scheduler address or a ``distributed.Client``. connect_timeout: seconds to wait for a
    scheduler address to answer. steps, dt and ``**fixed``: passed to every ``simulate`` call.
    Returns a Dataset with dims = axes + "seed" (+ "time" for curves).
    Raises ValueError/TypeError for a bad specification (before any work or store is created),
    FileExistsError for a ``store`` path that is not a sweep store, ``particles.store.StoreLocked``
    if another process is writing the store, SweepError if a point fails (finished points stay in
    the store).
    """
    plan = make_plan(model, axes, seeds=seeds, metrics=metrics, steps=steps, dt=dt, **fixed)
    if scheduler == "sync" and workers is not None:
        raise ValueError("workers: not used with scheduler='sync'")
    if isinstance(connect_timeout, bool) or not isinstance(connect_timeout, numbers.Real) \
            or not 0 < connect_timeout < math.inf:
        raise ValueError(f"connect_timeout must be a number of seconds > 0, got {connect_timeout!r}")
    _check_points(plan)
    if store is None:
        return _run(plan, None, scheduler, workers, connect_timeout, progress)
    from analysis._store import SweepStore

    with SweepStore.writer(store, plan.spec()) as db:
        return _run(plan, db, scheduler, workers, connect_timeout, progress)


def _run(plan: Plan, db, scheduler, workers, connect_timeout, progress) -> xr.Dataset:
    """Run the points of ``plan`` not yet in the store ``db`` (None: no store) and assemble."""
    from tqdm.auto import tqdm

    results = {key: db.read_point(key) for key in db.done()} if db is not None else {}
    points = list(plan.points())
    todo = [p for p in points if p.key not in results]
    kept = _times(plan)[0]
    ntime = None if kept is None else len(kept)

    client, close = None, None
    if scheduler != "sync" and todo:
        client, close = _connect(scheduler, workers, len(todo), connect_timeout)

    def on_result(p, values, info):
        _check_values(plan, p, values, ntime)
        if db is not None:
            db.write_point(p.key, values, {"index": list(p.index), "params": p.params, "seed": p.seed,
                                           "info": info})
        results[p.key] = values
        bar.update(1)

    try:
        with tqdm(total=len(points), initial=len(points) - len(todo), disable=not progress,
                  desc=f"sweep {plan.model}", unit="pt") as bar:
            if todo:
                _execute(plan, todo, client, on_result)
    finally:
        if close is not None:
            close()
    ds = _assemble(plan, results)
    if db is not None:
        db.write_result(encode(ds))
    return ds


# -- assembling the Dataset -----------------------------------------------------------------------
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
    coords = {name: _coord(values) for name, values in plan.axes.items()}
    coords["seed"] = np.asarray(plan.seeds)
    if any(v[0][-1:] == ("time",) for v in data.values()):
        coords["step"] = ("time", kept)
        if times is not None:
            coords["time"] = times
    from particles import __version__

    attrs = {"model": plan.model, "spec": json.dumps(plan.spec(), sort_keys=True),
             "points": len(points), "points_done": sum(p.key in results for p in points),
             "krause_sync_version": __version__}
    if plan.steps is not None:
        attrs["steps"] = plan.steps
    if plan.dt is not None:
        attrs["dt"] = plan.dt
    return xr.Dataset(data, coords=coords, attrs=attrs)


def open_sweep(store) -> xr.Dataset:
    """The Dataset of a sweep store, assembled from its finished points.

    Missing points are NaN (integer metrics then become float); ``attrs["points_done"]`` says how
    many are finished. Metrics registered only in another process are read as stored.
    """
    from analysis._store import SweepStore

    db = SweepStore.open(store)
    spec = db.spec
    plan = Plan(spec["model"], spec["axes"], spec["seeds"], spec["metrics"], spec["steps"], spec["dt"],
                spec["fixed"])
    return _assemble(plan, {key: db.read_point(key) for key in db.done()})


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


# -- plot -----------------------------------------------------------------------------------------
def plot_sweep(ds: xr.Dataset, metric: str, axis: str, ax=None, **kwargs):
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
