"""The sweep metric registry: name → ``fn(ds, **options)`` evaluated on each simulated point.

Built-in metrics (options with defaults, overridable per metric in a sweep specification):
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
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from analysis.clusters import count_clusters, time_to_clusters
from analysis.metrics import effective_rank, mean_cosine, rank_collapse
from analysis.sinks import attention_entropy, first_token_mass


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
