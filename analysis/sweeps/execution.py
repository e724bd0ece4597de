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

#: the scheduler's HTTP server (dashboard, with bokeh installed) on a free loopback port
#: (by default it tries port 8787, which a second cluster on the machine finds taken)
LOOPBACK_HTTP = {"dashboard_address": "127.0.0.1:0"}


class SweepError(RuntimeError):
    """A point of the sweep failed (the finished points stay in the store)."""


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
