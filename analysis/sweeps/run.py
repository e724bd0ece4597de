"""The sweep driver: validate, take the store (locked), run what is not done, assemble."""

from __future__ import annotations

import math
import numbers
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import xarray as xr

from particles.conventions import encode
from particles.progress import progress_bar

from .assembly import _assemble, _check_values, _times
from .execution import _connect, _execute, _probe
from .spec import Plan, _check_points, make_plan, recorded

if TYPE_CHECKING:
    import distributed
    import numpy as np

    from particles.interaction import Interaction


def sweep(model: str | Interaction | Callable[[np.ndarray], np.ndarray],
          axes: Mapping[str, Sequence[Any] | Mapping[str, Any]] | None = None, *,
          seeds: int | Sequence[int] | Mapping[str, int] = 1,
          metrics: Sequence[str] | Mapping[str, Mapping[str, Any]] | None = None,
          store: str | os.PathLike[str] | None = None,
          scheduler: str | distributed.Client | None = None,
          steps: int | None = None, dt: float | None = None, progress: bool = True,
          workers: int | None = None, connect_timeout: float = 10.0, **fixed: Any) -> xr.Dataset:
    """Run ``simulate`` over the Cartesian product of ``axes`` × ``seeds`` and reduce to ``metrics``.

    model: what simulate accepts, "sa", "usa", "krause" or "hk", an Interaction or a velocity field
    v(x) (with geometry= in ``**fixed``); the spec and the Dataset record it by name, repr or
    module.qualname (particles.simulate.describe_model); or an axis "model". axes: {parameter: [values]}.
    seeds: n (seeds 0..n-1) or a list; the seeds of one parameter point run as one ensemble,
    simulate(seed=[...]) (one compiled call; sample k is the run seed=s_k). metrics: names, or
    {name: {option: value}} (see the module docstring). store: a path for the resumable zarr
    store, or None (nothing written).
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
    if isinstance(scheduler, str) and scheduler != "sync":
        _probe(scheduler, connect_timeout)  # an unreachable scheduler fails before the store exists
    if store is None:
        return _run(plan, None, scheduler, workers, connect_timeout, progress)
    from .store import SweepStore

    with SweepStore.writer(store, plan.spec()) as db:
        return _run(plan, db, scheduler, workers, connect_timeout, progress)


def _run(plan: Plan, db, scheduler, workers, connect_timeout, progress) -> xr.Dataset:
    """Run the points of ``plan`` not yet in the store ``db`` (None: no store) and assemble."""
    results = {key: db.read_point(key) for key in db.done()} if db is not None else {}
    points = list(plan.points())
    todo = [p for p in points if p.key not in results]
    kept = _times(plan)[0]
    ntime = None if kept is None else len(kept)

    client, close = None, None
    if scheduler != "sync" and todo:
        client, close = _connect(scheduler, workers, len(todo), connect_timeout,
                                 announce=(lambda text: print(text, file=sys.stderr, flush=True)) if progress
                                 else None)

    def on_result(p, values, info):
        _check_values(plan, p, values, ntime)
        if db is not None:
            params = {k: recorded(k, v) for k, v in p.params.items()}
            db.write_point(p.key, values, {"index": list(p.index), "params": params, "seed": p.seed,
                                           "info": info})
        results[p.key] = values
        bar.update(1)

    try:
        with progress_bar(enabled=progress, total=len(points), initial=len(points) - len(todo),
                          desc=f"sweep {plan.model_description}", unit="pt") as bar:
            if todo:
                _execute(plan, todo, client, on_result)
    finally:
        if close is not None:
            close()
    ds = _assemble(plan, results)
    if db is not None:
        db.write_result(encode(ds))
    return ds
