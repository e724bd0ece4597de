"""One-call plots of trajectories and attention, each returning a matplotlib ``Figure``.

Works for a simulation (``particles.simulate``: leading axis "time", particles "particle") and for
an extracted model trajectory (``analysis.bridge.extract``: leading axis "layer", particles
"token"; padded tokens, where the ``token_mask`` coordinate is False, are left out)::

    from analysis import plot

    plot.trajectory(ds)              # the particles at the last saved time next to the cluster count
    plot.state(ds, frame=0)          # d = 2: the circle; d = 3: the sphere S²; d > 3: the first two
                                     # principal directions; d = 1: every opinion over time
    plot.cluster_count(ds, eps=0.05) # count vs time/layer (mean ± sd over "sample" if present)
    plot.attention(ds, frame=-1)     # the attention/interaction matrix a_ij as an image

Drawing is done by the notebook helpers of :mod:`analysis.explore` (``plot_state``, ``project``);
this module picks the frame, the sample and the axes. Set the matplotlib backend yourself
(``matplotlib.use("Agg")`` for files only).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import xarray as xr

from analysis import explore

if TYPE_CHECKING:  # annotations only: matplotlib is imported on first use
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["trajectory", "state", "cluster_count", "attention"]

LEADING = ("time", "layer")
PARTICLES = ("particle", "token")


def _leading(da: xr.DataArray) -> str:
    for dim in LEADING:
        if dim in da.dims:
            return dim
    raise ValueError(f"ds: expected a 'time' or 'layer' axis, got dims {da.dims}")


def _points(ds, sample: int) -> xr.DataArray:
    """``x`` of one sample with dims (time|layer, particle, component), padding dropped."""
    if isinstance(ds, xr.DataArray):
        x = ds
    elif isinstance(ds, xr.Dataset) and "x" in ds:
        x = ds["x"]
    else:
        raise ValueError("ds: expected a Dataset with variable 'x' or its DataArray")
    if "sample" in x.dims:
        x = x.isel(sample=sample)
    lead = _leading(x)
    item = next((d for d in PARTICLES if d in x.dims), None)
    if item is None or "component" not in x.dims:
        raise ValueError(f"ds: expected axes (particle or token, component), got dims {x.dims}")
    if "token_mask" in x.coords:
        keep = np.asarray(x.coords["token_mask"].values, dtype=bool)
        x = x.isel({item: np.flatnonzero(keep)})
    return x.drop_vars([c for c in x.coords if c not in (lead,)]).transpose(lead, item, "component")


def _sphere(ds, x: xr.DataArray) -> bool:
    attrs = ds.attrs if isinstance(ds, (xr.Dataset, xr.DataArray)) else {}
    if "geometry" in attrs:
        return attrs["geometry"] == "sphere"
    return "layer" in x.dims  # extracted tokens are compared on the unit sphere (docs/metrics.md)


def _as_simulation(x: xr.DataArray, sphere: bool, attrs: dict) -> tuple[xr.Dataset, str]:
    """The layout :func:`analysis.explore.plot_state` draws: x (time, particle, component)."""
    lead = x.dims[0]
    values = np.asarray(x.values, dtype=float)
    if sphere and lead == "layer":
        norms = np.linalg.norm(values, axis=-1, keepdims=True)
        values = values / np.where(norms > 0, norms, 1.0)
    ds = xr.Dataset({"x": (("time", "particle", "component"), values)},
                    coords={"time": np.asarray(x[lead].values, dtype=float)})
    ds.attrs.update({k: v for k, v in attrs.items() if k in ("model", "radius")},
                    geometry="sphere" if sphere else "euclidean")
    return ds, lead


def trajectory(ds: xr.Dataset | xr.DataArray, frame: int = -1, *, sample: int = 0,
               eps: float | None = None) -> Figure:
    """The particles at saved step ``frame`` next to the cluster count over time (or layer).

    ``eps``: the ε-graph threshold of the count (default 0.05 on the sphere, a tenth of the radius
    for HK). Returns the Figure.
    """
    x = _points(ds, sample)
    sim, lead = _as_simulation(x, _sphere(ds, x), getattr(ds, "attrs", {}))
    fig = explore.plot_state(sim, frame=frame, eps=eps)
    if lead == "layer":
        for ax in fig.axes:
            if ax.get_xlabel() == "time":
                ax.set_xlabel("layer")
    return fig


def state(ds: xr.Dataset | xr.DataArray, frame: int = -1, *, sample: int = 0,
          ax: Axes | None = None) -> Figure:
    """The particles at saved step ``frame``: on the circle (d = 2), on the sphere S² (d = 3), on the
    first two principal directions of the whole trajectory (d > 3; uncentred, through the origin;
    on the sphere normalised back onto the circle), or every opinion over time (d = 1).

    ``ax``: a 2-D matplotlib Axes to draw into (d ≠ 3), default a new figure. Returns the Figure.
    """
    import matplotlib.pyplot as plt

    x = _points(ds, sample)
    sphere = _sphere(ds, x)
    sim, lead = _as_simulation(x, sphere, getattr(ds, "attrs", {}))
    values, times = sim["x"].values, sim["time"].values
    n, d = values.shape[1:]
    frame = int(frame) % len(times)
    colors = plt.cm.viridis(np.linspace(0, 1, n))
    if d == 3:
        if ax is not None:
            raise ValueError("ax: a d = 3 state is drawn on its own 3-D axes; leave ax=None")
        fig = plt.figure(figsize=(5.2, 5.0))
        ax = explore._particles_axes(fig, 3, sphere, 111)
        explore._draw_particles(ax, values[frame], 3, colors)
        where = "S²" if sphere else "R³"
    else:
        fig, ax = (plt.subplots(figsize=(5.2, 5.0)) if ax is None else (ax.figure, ax))
        if d == 1:
            ax.plot(times, values[:, :, 0], color="0.3", lw=0.6)
            ax.axvline(times[frame], color="C3", lw=1)
            ax.set(xlabel=lead, ylabel="x")
            where = "R"
        else:
            y = explore.project(values, sphere=sphere)[0][..., :2] if d > 2 else values
            if sphere and d > 2:
                y = y / np.where((r := np.linalg.norm(y, axis=-1, keepdims=True)) > 0, r, 1.0)
            if sphere:
                t = np.linspace(0, 2 * np.pi, 200)
                ax.plot(np.cos(t), np.sin(t), color="0.85", lw=0.8)
            ax.scatter(y[frame, :, 0], y[frame, :, 1], c=colors, s=14)
            ax.set_aspect("equal")
            ax.set(xlabel="PC 1" if d > 2 else "x₁", ylabel="PC 2" if d > 2 else "x₂")
            where = ("S¹" if sphere else "R²") if d == 2 else f"first two principal directions of R^{d}"
    ax.set_title(f"n = {n} on {where}, {lead} = {times[frame]:g}", fontsize=10)
    return fig


def cluster_count(ds: xr.Dataset | xr.DataArray, eps: float | None = None, *, ax: Axes | None = None,
                  label: str | None = None) -> Figure:
    """Cluster count (ε-graph components, :func:`analysis.count_clusters`) against time or layer; with
    a "sample" axis the mean ± sd over samples. ``ds`` may also be a DataArray of counts.

    ``eps`` default: 0.05 on the sphere, a tenth of the radius for HK. Returns the Figure.
    """
    import matplotlib.pyplot as plt

    import analysis

    if isinstance(ds, xr.DataArray) and "component" not in ds.dims:
        counts = ds
    else:
        if eps is None:
            eps = explore.default_eps(ds) if isinstance(ds, xr.Dataset) else 0.05
        counts = analysis.count_clusters(ds, eps=eps)
    if not isinstance(counts, xr.DataArray):
        raise ValueError("ds: expected a trajectory with a 'time' or 'layer' axis")
    lead = _leading(counts)
    fig, ax = (plt.subplots(figsize=(5.5, 3.6)) if ax is None else (ax.figure, ax))
    t = counts[lead].values
    if "sample" in counts.dims:
        m, s = counts.mean("sample").values, counts.std("sample").values
        ax.plot(t, m, drawstyle="steps-post", label=label or f"mean ± sd, {counts.sizes['sample']} samples")
        ax.fill_between(t, np.maximum(m - s, 0), m + s, step="post", alpha=0.25)
    else:
        ax.plot(t, counts.values, drawstyle="steps-post", label=label)
    ax.set(xlabel=lead, ylabel="clusters" + (f" (ε = {eps:g})" if eps else ""), ylim=(0, None),
           title="cluster count")
    if label or "sample" in counts.dims:
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return fig


def attention(ds: xr.Dataset | xr.DataArray, frame: int = -1, *, sample: int = 0, head: int = 0,
              ax: Axes | None = None, log: bool = False) -> Figure:
    """The attention (interaction) matrix a_ij at saved step / layer ``frame`` as an image: rows are
    queries i, columns keys j. ``ds``: a Dataset with variable "attention" or that DataArray;
    ``head`` and ``sample`` pick one when those axes exist; ``log=True`` colours log10 a_ij.
    Returns the Figure.
    """
    import matplotlib.pyplot as plt

    a = ds["attention"] if isinstance(ds, xr.Dataset) and "attention" in ds else ds
    if not isinstance(a, xr.DataArray) or not {"query", "key"} <= set(a.dims):
        raise ValueError("ds: expected attention with axes (query, key): a Dataset with variable "
                         "'attention' (simulate(..., return_weights=True) or analysis.bridge.extract) "
                         "or that DataArray")
    has_head = "head" in a.dims
    for dim, index in (("sample", sample), ("head", head)):
        if dim in a.dims:
            a = a.isel({dim: index})
    lead = _leading(a)
    where = a[lead].values[int(frame) % a.sizes[lead]] if lead in a.coords else int(frame)
    m = np.asarray(a.isel({lead: frame}).transpose("query", "key").values, dtype=float)
    if np.all(np.isnan(m)):
        raise ValueError(f"frame: no attention at {lead} {where} (no block reads the last layer)")
    fig, ax = (plt.subplots(figsize=(5.4, 4.6)) if ax is None else (ax.figure, ax))
    shown = np.log10(np.where(m > 0, m, np.nan)) if log else m
    im = ax.imshow(shown, cmap="magma", interpolation="nearest", aspect="auto")
    fig.colorbar(im, ax=ax, label="log10 a_ij" if log else "a_ij")
    ax.set(xlabel="key j", ylabel="query i",
           title=f"attention at {lead} {where:g}" + (f", head {head}" if has_head else ""))
    return fig
