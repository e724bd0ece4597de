"""Phase diagrams of clustering over (parameter, time), as in Geshkovski et al.'s figures.

For each value of one parameter (β, σ, top_k, …) an ensemble of `samples` systems of n particles
is integrated from the same initial states (common random numbers: the diagram's rows differ only
by the parameter) in one compiled call (particles.simulate with an ensemble x0), and at each time
t of `times` two statistics of the configurations are kept:

* ``close_pairs``       the fraction of pairs i ≠ j with ⟨u_i, u_j⟩ > 1 − ε, u = x/‖x‖, over all
                        systems (Geshkovski et al., "A mathematical perspective on Transformers",
                        arXiv 2312.10794, phase diagrams: the density of the pair correlation at 1);
* ``cluster_fraction``  the distribution over the systems of the number of clusters, the
                        connected components of the graph ⟨u_i, u_j⟩ > 1 − ε_c (union-find; equal to
                        the rank of the thresholded Gram matrix, the paper's count, when the clusters
                        are well separated), with its mean and median.
"""

from __future__ import annotations

from collections.abc import Sequence
from math import gcd

import numpy as np
import xarray as xr
from numba import njit
from tqdm.auto import tqdm


@njit(cache=True, nogil=True)
def _stats(x, eps, cluster_eps, counts):
    """Over systems x (S, n, d): the number of pairs i < j with ⟨u_i, u_j⟩ > 1 − eps, and
    counts[s] ← the number of connected components of ⟨u_i, u_j⟩ > 1 − cluster_eps (union-find)."""
    S, n, d = x.shape
    u = np.empty((n, d))
    parent = np.empty(n, np.int64)
    close = 0
    for s in range(S):
        for i in range(n):
            norm = 0.0
            for c in range(d):
                norm += x[s, i, c] * x[s, i, c]
            norm = np.sqrt(norm)
            for c in range(d):
                u[i, c] = x[s, i, c] / norm
            parent[i] = i
        for i in range(n):
            for j in range(i + 1, n):
                g = 0.0
                for c in range(d):
                    g += u[i, c] * u[j, c]
                close += g > 1.0 - eps
                if g > 1.0 - cluster_eps:
                    a, b = i, j
                    while parent[a] != a:
                        a = parent[a]
                    while parent[b] != b:
                        b = parent[b]
                    if a != b:
                        parent[max(a, b)] = min(a, b)
        roots = 0
        for i in range(n):
            roots += parent[i] == i
        counts[s] = roots
    return close


def configuration_stats(x: np.ndarray, eps: float, cluster_eps: float) -> tuple[float, np.ndarray]:
    """(fraction of pairs i ≠ j with ⟨u_i, u_j⟩ > 1 − eps, cluster counts (S,)) of x (S, n, d)."""
    x = np.ascontiguousarray(x, dtype=np.float64)
    S, n, _ = x.shape
    counts = np.empty(S, np.int64)
    close = _stats(x, float(eps), float(cluster_eps), counts)
    return (close / (S * n * (n - 1) / 2) if n > 1 else 1.0), counts


def phase_diagram(model: str = "sa", axis: dict[str, Sequence[float]] | None = None, *, n: int = 32,
                  d: int = 2, samples: int = 2048, times: Sequence[float] | np.ndarray | None = None,
                  dt: float = 0.1, seed: int = 0, eps: float = 1e-3, cluster_eps: float = 1e-4,
                  integrator: str = "euler", dtype: str = "float64", progress: bool = False,
                  **params) -> xr.Dataset:
    """Dataset over (parameter, time) of the close-pair fraction and the cluster-count distribution.

    axis: {name: values}, one simulate parameter (e.g. {"beta": [0, 1, …, 9]}); times: the saved
    times (multiples of dt; default 0, 0.5, …, 30); params: fixed simulate parameters. Each value
    runs one ensemble x0 (samples, n, d) drawn once with `seed` (uniform on the sphere, or the
    cube for euclidean models) and shared by every value.
    """
    from particles import __version__, simulate
    from particles.interaction import make_interaction
    from particles.params import check

    if not isinstance(axis, dict) or len(axis) != 1:
        raise ValueError(f"axis must be one {{parameter: values}} entry, got {axis!r}")
    (name, values), = axis.items()
    values = list(np.atleast_1d(values).tolist())
    if not values:
        raise ValueError(f"axis {name!r} has no values")
    check(name, values[0])  # the parameter exists and the value is valid
    n, d, samples, dt = check("n", n), check("d", d), check("samples", samples), check("dt", dt)
    times = np.arange(0.0, 30.0 + 1e-9, 0.5) if times is None else np.asarray(times, dtype=float)
    steps_at = np.rint(times / dt).astype(int)
    off_grid = np.abs(steps_at * dt - times) > 1e-9 * np.maximum(1, times)
    if times.ndim != 1 or len(times) == 0 or np.any(steps_at < 0) or np.any(off_grid):
        raise ValueError(f"times must be a 1-D list of multiples of dt={dt} >= 0, got {times!r}")
    steps = int(steps_at.max())
    save_every = max(1, gcd(*steps_at.tolist(), steps)) if steps else 1
    geometry = make_interaction(model, **{name: values[0]}, **params).space
    x0 = geometry.sample(np.random.default_rng(seed), (samples, n, d), np.dtype(dtype))

    close = np.empty((len(values), len(times)))
    counts = np.zeros((len(values), len(times), n))
    median = np.empty((len(values), len(times)))
    mean = np.empty((len(values), len(times)))
    for a, value in enumerate(tqdm(values, disable=not progress, desc=f"phase diagram {model} {name}")):
        ds = simulate(model, x0, steps=steps, dt=dt, save_every=save_every, seed=seed, integrator=integrator,
                      dtype=dtype, **{name: value}, **params)
        slots = np.searchsorted(ds["step"].values, steps_at)
        traj = ds["x"].values
        for b, slot in enumerate(slots):
            close[a, b], k = configuration_stats(traj[:, slot].astype(np.float64), eps, cluster_eps)
            counts[a, b] = np.bincount(k - 1, minlength=n)[:n] / samples
            median[a, b], mean[a, b] = np.median(k), k.mean()
    coords = {name: values, "time": times, "clusters": np.arange(1, n + 1)}
    out = xr.Dataset({
        "close_pairs": ((name, "time"), close, dict(
            long_name=f"fraction of pairs i != j with <u_i, u_j> > 1 - {eps:g}", units="1")),
        "cluster_fraction": ((name, "time", "clusters"), counts, dict(
            long_name="fraction of systems with this many clusters", units="1")),
        "median_clusters": ((name, "time"), median, dict(long_name="median number of clusters", units="1")),
        "mean_clusters": ((name, "time"), mean, dict(long_name="mean number of clusters", units="1")),
    }, coords=coords)
    out["time"].attrs.update(long_name="time t = step * dt", units="1")
    out["clusters"].attrs.update(long_name="number of clusters (components of <u_i, u_j> > 1 - cluster_eps)")
    fixed = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in params.items()}
    out.attrs.update(model=model, parameter=name, n=n, d=d, samples=samples, dt=dt, seed=seed, eps=eps,
                     cluster_eps=cluster_eps, integrator=integrator, dtype=str(np.dtype(dtype)),
                     krause_sync_version=__version__,
                     **{k: (int(v) if isinstance(v, bool) else v) for k, v in fixed.items()
                        if isinstance(v, (int, float, str, bool))})
    return out
