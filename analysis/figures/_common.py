"""Shared pieces of the figure functions: running ensembles/sweeps, saving, captions, style.

Every figure saves ``<out>/<name>.png``, ``.pdf`` and ``.nc`` (the plotted arrays, with the
title and caption in the attrs) through :func:`save`; ``out=None`` writes nothing.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import matplotlib.pyplot as plt  # headless machines fall back to Agg by themselves
import numpy as np
import xarray as xr

from particles import simulate
from particles.conventions import encode

#: dask scheduler for the sweeps behind the figures: "sync" (in this process), None (a local
#: dask cluster) or a scheduler address; ``ksync figures --scheduler`` sets it.
SCHEDULER = "sync"
COLORS = plt.rcParams["axes.prop_cycle"].by_key()["color"]


def run_sweep(model, axes, *, seeds, metrics, steps, dt, progress=True, x0=None, **fixed) -> xr.Dataset:
    """``analysis.sweep.sweep`` over ``axes`` × seeds (scheduler :data:`SCHEDULER`).

    x0: None (simulate draws the initial state from the seed), or a function seed → (n, d) for
    seed-dependent custom starts; these enter the sweep as an axis "x0", renamed to "seed" here.
    Returns a Dataset with dims axes + "seed" (+ "time" for curve metrics).
    """
    from analysis.sweep import sweep

    seeds = list(range(seeds)) if isinstance(seeds, int) else list(seeds)
    kw = dict(metrics=metrics, steps=steps, dt=dt, scheduler=SCHEDULER, progress=progress, **fixed)
    if x0 is None:
        return sweep(model, axes, seeds=seeds, **kw)
    ds = sweep(model, {**axes, "x0": [x0(s) for s in seeds]}, seeds=[0], **kw)
    return ds.isel(seed=0, drop=True).rename(x0="seed").assign_coords(seed=seeds)


def compare_runs(specs, x0, reduce, **kw) -> xr.Dataset:
    """Run each (label, model, params) of ``specs`` from the same ``x0`` (extra simulate keywords
    ``kw``), reduce each trajectory with ``reduce(ds) -> Dataset``, and stack along "run" (labels)."""
    rows = []
    for _, model, params in specs:
        rows.append(reduce(simulate(model, x0, **kw, **params)).drop_vars("step", errors="ignore"))
    return xr.concat(rows, "run").assign_coords(run=[label for label, _, _ in specs])


def caption_text(text: str, width: int = 150) -> str:
    return "\n".join(textwrap.wrap(" ".join(text.split()), width))


def new_figure(ncols=2, nrows=1, size=(12, 4.6), **kw):
    fig, axes = plt.subplots(nrows, ncols, figsize=size, squeeze=False, **kw)
    return fig, axes.ravel()


def save(fig, ds: xr.Dataset, name: str, out, title: str, caption: str, width: int = 150) -> xr.Dataset:
    """Title and caption on the figure; write ``<out>/<name>.{png,pdf,nc}``; close the figure.

    The caption goes under the axes; the layout leaves room for it. Returns ``ds`` with
    ``attrs`` title, caption and figure name.
    """
    text = caption_text(caption, width)
    lines = text.count("\n") + 1
    height = fig.get_figheight()
    bottom = (0.12 + 0.17 * lines) / height
    fig.suptitle(title, fontsize=13, fontweight="bold")
    fig.text(0.5, 0.012, text, ha="center", va="bottom", fontsize=9, color="0.15")
    fig.tight_layout(rect=(0, bottom, 1, 1 - 0.3 / height))
    ds = ds.assign_attrs(figure=name, title=title, caption=" ".join(caption.split()))
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        fig.savefig(out / f"{name}.png", dpi=130)
        fig.savefig(out / f"{name}.pdf")
        encode(ds).to_netcdf(out / f"{name}.nc")
    plt.close(fig)
    return ds


def on_circle(theta) -> np.ndarray:
    """Points (cos θ, sin θ) on S¹, shape θ.shape + (2,)."""
    theta = np.asarray(theta, dtype=float)
    return np.stack([np.cos(theta), np.sin(theta)], axis=-1)


def log_frames(times, count: int = 80) -> np.ndarray:
    """Indices of about ``count`` saved times spread evenly in log-time (t > 0), plus index 0."""
    times = np.asarray(times)
    positive = np.flatnonzero(times > 0)
    if len(positive) == 0:
        return np.array([0])
    grid = np.geomspace(times[positive[0]], times[-1], count)
    idx = np.unique(np.clip(np.searchsorted(times, grid), 0, len(times) - 1))
    return np.unique(np.concatenate([[0], idx]))
