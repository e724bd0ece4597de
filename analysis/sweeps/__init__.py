"""Parameter sweeps on dask.distributed: many ``simulate`` runs reduced to a few metrics.

Python API::

    from analysis.sweeps import sweep, plot_sweep      # or: analysis.sweep(...)
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
                        with ``progress=True`` the link of its dask dashboard is printed;
    ``"tcp://host:port"`` connect to a running dask scheduler (its workers must have krause-sync
                        installed); an address that does not answer as a dask scheduler within
                        ``connect_timeout`` seconds (default 10) is an error; a
                        ``distributed.Client`` is used as is;
    ``"sync"``          run in this process without dask (tests, quick figures).
Scripts that use a LocalCluster need the usual ``if __name__ == "__main__":`` guard.

Store: with ``store="results.zarr"`` every finished point is written at once, atomically (see
``analysis.sweeps.store``: one zarr group per point, staged and moved in with one rename). Rerunning
the same sweep skips the finished points, so a run killed at any moment (SIGKILL included) is
resumed by running it again, and the final Dataset equals that of an uninterrupted run. A store
made for a different specification is refused with a message listing the differences. When
every point is done the assembled Dataset is also written at the root of the store
(``xr.open_zarr(path)``; its attrs then include the store's own) and as the group ``result``
(``xr.open_zarr(path, group="result", consolidated=False)``); :func:`open_sweep` assembles
whatever is finished. One sweep process per store at a time: the store is locked while a sweep
writes it, and a second sweep started on the same store is refused with a message naming the
first one's pid (a lock left by a killed sweep is taken over). A path that is not a sweep store
(a folder we did not write, a trajectory store) is refused, never emptied (``particles.store``).
The whole specification (steps, dt and every axis value) is validated before the store is created.

Metrics: the names of :mod:`analysis.sweeps.registry` (final_clusters, time_to_one_cluster,
effective_rank_curve, …; options such as eps overridable per metric); :func:`register_metric`
adds more (the function must be importable or picklable on workers).

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

Axis names: any parameter of ``particles.simulate`` described in ``particles.params.PARAMS``
(beta, sigma, radius, window, causal, top_k, Q, K, V, geometry, noise, n, d, dt, steps,
save_every, integrator, dtype, backend, …), "model" and "x0". "seed" is the ``seeds`` entry;
"samples", "return_weights", "progress", "store" and "overwrite" are not allowed.

Modules, one job each: :mod:`~analysis.sweeps.registry` (metrics), :mod:`~analysis.sweeps.spec`
(validation, plan, SPEC.toml), :mod:`~analysis.sweeps.execution` (points on dask workers),
:mod:`~analysis.sweeps.assembly` (the Dataset), :mod:`~analysis.sweeps.store` (the zarr store),
:mod:`~analysis.sweeps.run` (the driver); the plot is ``analysis.figures.sweep.plot_sweep``.
``analysis.sweep`` is the same API as a module that can also be called: ``analysis.sweep(...)``.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .assembly import open_sweep
from .execution import LOOPBACK_HTTP, SweepError, run_point
from .registry import METRICS, Metric, register_metric
from .run import sweep
from .spec import PARAMETERS, Plan, Point, load_spec, make_plan

__all__ = ["sweep", "plot_sweep", "open_sweep", "load_spec", "make_plan", "register_metric", "METRICS",
           "Metric", "SweepError", "Plan", "Point", "PARAMETERS", "LOOPBACK_HTTP", "run_point"]

if TYPE_CHECKING:  # annotations only: xarray and matplotlib are imported where they are used
    import xarray as xr
    from matplotlib.axes import Axes


def plot_sweep(ds: xr.Dataset, metric: str, axis: str, ax: Axes | None = None, **kwargs: Any) -> Axes:
    """Plot ``metric`` against the sweep axis ``axis``: mean over seeds with a ± sd band (see
    ``analysis.figures.sweep.plot_sweep``; imported on first use, with matplotlib). Returns the Axes."""
    from analysis.figures.sweep import plot_sweep as plot

    return plot(ds, metric, axis, ax=ax, **kwargs)
