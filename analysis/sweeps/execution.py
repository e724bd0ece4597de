"""Running the points of a sweep: one point on a worker (:func:`run_point`), the dask client
(LocalCluster, a scheduler address probed with a timeout, or a given Client) and the loop over
finished futures."""

from __future__ import annotations

import numbers
import os
import socket
import time

import numpy as np

from .registry import METRICS
from .spec import params_label

#: the scheduler's HTTP server (dashboard, with bokeh installed) on a free loopback port
#: (by default it tries port 8787, which a second cluster on the machine finds taken)
LOOPBACK_HTTP = {"dashboard_address": "127.0.0.1:0"}


class SweepError(RuntimeError):
    """A point of the sweep failed (the finished points stay in the store)."""


def run_point(params: dict, seeds: list[int], metrics: dict) -> list[tuple[dict, dict]]:
    """Simulate one parameter point for every seed of ``seeds`` and reduce each run to the metrics
    (this runs on a worker).

    The seeds run as one ensemble, ``simulate(seed=[s_0, s_1, …])``: one compiled call whose sample k
    is the run ``simulate(seed=s_k)`` (with a given start x0 (n, d), every sample starts there and the
    seeds draw the noise).
    params: simulate keyword arguments with "model"; metrics: name → (Metric, options).
    Returns one (values, info) per seed, values[name] a numpy scalar or 1-D array; info["seconds"] is
    the call's time shared equally among its seeds.
    """
    from particles import simulate

    params = dict(params)
    model = params.pop("model")
    weights = any(m.needs_weights for m, _ in metrics.values())
    x0 = params.pop("x0", None)
    if x0 is not None:
        x0 = np.broadcast_to(np.asarray(x0), (len(seeds),) + np.shape(x0))
    start = time.perf_counter()
    ds = simulate(model, x0, seed=list(seeds), return_weights=weights, progress=False, **params)
    runs = [ds.isel(sample=k).assign_attrs(seed=s) for k, s in enumerate(seeds)]
    values = [{name: np.asarray(m.fn(run, **opts)) for name, (m, opts) in metrics.items()} for run in runs]
    info = {"seconds": (time.perf_counter() - start) / len(seeds), "seeds_per_call": len(seeds),
            "host": socket.gethostname(), "pid": os.getpid()}
    return [(v, dict(info)) for v in values]


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


def _connect(scheduler, workers, ntasks, connect_timeout=10.0, announce=None):
    """(client, close) for scheduler None (LocalCluster), an address, or a Client.

    A LocalCluster serves the dask dashboard on a free loopback port; ``announce(text)`` (e.g.
    print) is told its link.
    """
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
                               host="127.0.0.1", dashboard_address=LOOPBACK_HTTP["dashboard_address"],
                               env={"NUMBA_NUM_THREADS": "1"}, scheduler_kwargs=LOOPBACK_HTTP)
        client = Client(cluster)
        if announce is not None:
            announce(f"dask dashboard: {client.dashboard_link} ({int(workers)} worker process(es))")

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


def _by_parameter_point(todo) -> list[list]:
    """The points of ``todo`` grouped by their parameter values (all seeds of one point together)."""
    groups: dict = {}
    for p in todo:
        groups.setdefault(p.index[:-1], []).append(p)
    return list(groups.values())


def _execute(plan, todo, client, on_result):
    """Run the points in ``todo`` (in-process when ``client`` is None), the seeds of one parameter
    point in one call, calling ``on_result(point, values, info)`` as each finishes."""
    tasks = {name: (METRICS[name], opts) for name, opts in plan.metrics.items()}
    groups = _by_parameter_point(todo)

    def failed(group, err):
        return SweepError(f"point {_group_label(group)} failed: {type(err).__name__}: {err}")

    if client is None:
        for group in groups:
            try:
                results = run_point(plan.run_params(group[0]), [p.seed for p in group], tasks)
            except Exception as err:
                raise failed(group, err) from err
            for p, (values, info) in zip(group, results):
                on_result(p, values, info)
        return
    from distributed import as_completed

    futures = {}
    try:
        for group in groups:
            seeds = [p.seed for p in group]
            futures[client.submit(run_point, plan.run_params(group[0]), seeds, tasks, pure=False)] = group
        for fut in as_completed(list(futures)):
            group = futures.pop(fut)
            try:
                results = fut.result()
            except Exception as err:
                raise failed(group, err) from err
            for p, (values, info) in zip(group, results):
                on_result(p, values, info)
            fut.release()
    finally:
        if futures:
            client.cancel(list(futures))


def _group_label(group) -> str:
    """'beta=1.0, seed=0' for one point, 'beta=1.0, seeds=[0, 1, 2]' for the seeds run together."""
    if len(group) == 1:
        return group[0].label
    seeds = f"seeds={[p.seed for p in group]}"
    return f"{params_label(group[0].params)}, {seeds}" if group[0].params else seeds
