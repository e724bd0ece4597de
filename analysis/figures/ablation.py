"""Figures of the controlled experiments, rebuilt in seconds from the per-run data files in
``benchmarks/findings/`` (written by ``python -m analysis.findings.collect``):

* ``ablation_bridge`` — the 2 × 2 × 2 ablation (score dot/RBF × locality × top-k) through the bridge:
  per-layer clusters, effective rank, first-token excess and attention entropy, mean and 95 %
  t-interval over training seeds, for digits-vit and the BOS character LM (text-bos).
* ``sink_training`` — first-token weight α₀ per layer during training, text-bos, every cell.
* ``sink_backcopy`` — Bigram-Backcopy: BOS weight and self-weight of the dormant rows during training.
* ``recall_sweep`` — the recall sweep: accuracy inside / outside the window and training loss.
* ``trained_vs_simulated`` — per-layer Wasserstein distance between the model's token cloud and its
  simulated counterparts, with the frozen "tokens never move" baseline.

A figure is registered only when its data file exists.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import xarray as xr

from analysis.figures._registry import register

DATA = Path(__file__).resolve().parents[2] / "benchmarks" / "findings"
SCORE_COLOR = {"dot": "C0", "rbf": "C3"}
TASK_LABEL = {"digits-vit": "digits-vit", "text-bos": "text-bos (char LM)"}


def _load(name: str) -> xr.Dataset:
    path = DATA / f"{name}.nc"
    if not path.exists():
        raise FileNotFoundError(
            f"{path} not found: run the experiments (python -m analysis.findings.experiments ROOT) "
            f"and python -m analysis.findings.collect ROOT {DATA}"
        )
    from particles.conventions import decode

    with xr.open_dataset(path) as ds:
        return decode(ds.load())


def _cells(topk: bool, local: str):
    """The four cells of the score × locality square at one top-k level, with their line style."""
    suffix = "+topk" if topk else ""
    return [
        (f"dot{suffix}", "dot", "--", "dot"),
        (f"dot+{local}{suffix}", "dot", "-", f"dot + {local}"),
        (f"rbf{suffix}", "rbf", "--", "RBF"),
        (f"rbf+{local}{suffix}", "rbf", "-", f"RBF + {local}"),
    ]


#: (variable, y label, x axis) of the ablation figure's rows
ROWS = (
    ("clusters", "clusters (ε = 0.5, unit sphere)", "layer"),
    ("effective_rank", "effective rank (unit sphere)", "layer"),
    ("alpha0_excess_out", "α₀ − uniform, output rows", "attn_layer"),
    ("entropy_out", "attention entropy / log|N(i)|, output rows", "attn_layer"),
)


def _ci_over_seeds(da):
    from analysis.findings.collect import curves

    return curves(da)


def _band(ax, x, ci: xr.Dataset, alpha: float = 0.15, **line):
    """The mean curve of ``ci`` with its 95 % interval shaded in the same colour."""
    ax.plot(x, ci["mean"], **line)
    ax.fill_between(
        x, ci["mean"] - ci["ci"], ci["mean"] + ci["ci"], color=line.get("color"), alpha=alpha, lw=0
    )


def _grid_with_legend(nrows: int, ncols: int, size):
    """Figure with an (nrows, ncols) array of axes and one axis-free row below them for a legend."""
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=size)
    gs = fig.add_gridspec(nrows + 1, ncols, height_ratios=[1] * nrows + [0.25])
    axes = np.array([[fig.add_subplot(gs[r, c]) for c in range(ncols)] for r in range(nrows)])
    legend_ax = fig.add_subplot(gs[nrows, :])
    legend_ax.axis("off")
    return fig, axes, legend_ax


def _combine(parts) -> xr.Dataset:
    """The plotted pieces in one Dataset (outer join over their labels)."""
    return xr.merge(parts, join="outer", compat="no_conflicts") if parts else xr.Dataset()


def _tag(ci: xr.Dataset, **labels) -> xr.Dataset:
    """``ci`` without its scalar coordinates, with new length-1 axes ``labels`` (for the .nc)."""
    ci = ci.drop_vars([c for c in ci.coords if c not in ci.dims])
    return ci.expand_dims({k: [v] for k, v in labels.items()})


def make_ablation_bridge(quick=False, out=None, progress=True) -> xr.Dataset:
    """Ablation through the bridge: which component (score, locality, top-k) moves each per-layer curve."""
    import matplotlib.pyplot as plt

    from analysis.figures._common import save

    data = {
        task: _load(name) for task, name in (("digits-vit", "vit-ablation"), ("text-bos", "causal-ablation"))
    }
    fig, axes = plt.subplots(len(ROWS), 4, figsize=(15, 12.5), squeeze=False)
    plotted = []
    for c, (task, topk) in enumerate([(t, k) for t in data for k in (False, True)]):
        ds = data[task]
        local = "grid" if task == "digits-vit" else "window"
        for r, (var, ylabel, xdim) in enumerate(ROWS):
            ax = axes[r, c]
            for name, score, ls, label in _cells(topk, local):
                if name not in ds["variant"].values:
                    continue
                da = ds[var].sel(variant=name)
                if var in ("clusters",):
                    da = da.sel(eps=0.5)
                ci = _ci_over_seeds(da)
                x = ci[xdim].values + (1 if xdim == "attn_layer" else 0)
                _band(ax, x, ci, color=SCORE_COLOR[score], ls=ls, marker="o", ms=3, label=label)
                plotted.append(
                    ci.rename({xdim: "depth"})
                    .assign_coords(depth=x)
                    .expand_dims(task=[task], variant=[name], metric=[var])
                )
            if var.startswith("alpha0"):
                ax.axhline(0, color="0.5", lw=0.8)
            ax.set_xlabel("layer (after block ℓ)" if xdim == "layer" else "block")
            ax.set_ylabel(ylabel, fontsize=9)
            ax.grid(alpha=0.3)
            if r == 0:
                n = int(ds.sizes["seed"])
                ax.set_title(
                    f"{TASK_LABEL[task]}, top-k {'on' if topk else 'off'} (n = {n} seeds)", fontsize=10
                )
    from matplotlib.lines import Line2D

    handles = [
        Line2D([], [], color=SCORE_COLOR[sc], ls=ls, marker="o", ms=3, label=lab)
        for sc, ls, lab in (
            ("dot", "--", "dot"),
            ("dot", "-", "dot + locality"),
            ("rbf", "--", "RBF"),
            ("rbf", "-", "RBF + locality"),
        )
    ]
    axes[1, 0].legend(handles=handles, fontsize=7.5, loc="best", framealpha=0.85)
    result = _combine(plotted)
    caption = (
        "Each curve: mean over training seeds (shaded: 95 % t-interval, n seeds) of the per-layer metric "
        "on 256 held-out inputs. Colour = score (blue dot product, red RBF), line = locality (dashed none, "
        "solid patch grid for the ViT / causal sliding window for the LM). Tokens are measured on the unit "
        "sphere. α₀ − uniform: first-token weight minus what uniform weights over the visible keys would "
        "give it, over the rows whose output reaches the prediction (ViT: every row except in the last "
        "block, where only CLS is read; LM: every row)."
    )
    return save(
        fig, result, "ablation_bridge", out, "Ablation: score × locality × top-k through the bridge", caption
    )


SIM_STYLE = {
    "frozen": dict(color="0.4", ls=(0, (1, 1)), lw=2.2, label="frozen: tokens never move (baseline)"),
    "own residual": dict(color="C2", ls="-", marker="D", label="own attention, residual (model minus MLPs)"),
    "own sphere dt=1": dict(color="C1", ls="--", marker="s", label="own attention on the sphere, dt = 1"),
    "own sphere matched": dict(
        color="C4", ls="-.", marker="s", label="own attention on the sphere, dt matched"
    ),
    "SA fit": dict(color="C0", ls=":", marker="^", label="SA(β) preset, β fitted"),
    "Krause fit": dict(color="C3", ls=":", marker="v", label="Krause(σ) preset, σ fitted"),
}
SIM_CELLS = {
    "digits-vit": ("dot", "dot+grid", "rbf", "rbf+grid+topk"),
    "text-bos": ("dot", "dot+window", "rbf", "rbf+window+topk"),
}


def make_trained_vs_simulated(quick=False, out=None, progress=True) -> xr.Dataset:
    """Trained vs simulated: per-layer Wasserstein distance of token clouds, against the frozen baseline."""

    from analysis.figures._common import save

    tasks = [
        (t, n)
        for t, n in (("digits-vit", "vit-ablation"), ("text-bos", "causal-ablation"))
        if (DATA / f"{n}.nc").exists()
    ]
    data = {t: _load(n) for t, n in tasks}
    data = {t: ds for t, ds in data.items() if "w_distance" in ds}
    # the cells whose runs have distances (a data file may join cells of stores without them)
    cells = {
        t: [
            c
            for c in SIM_CELLS[t]
            if c in ds["variant"].values and bool(np.isfinite(ds["w_distance"].sel(variant=c)).any())
        ]
        for t, ds in data.items()
    }
    ncols = max(len(c) for c in cells.values())
    nrows = 2 * len(data)
    fig, axes, legend_ax = _grid_with_legend(nrows, ncols, (4.4 * ncols, 3.6 * nrows + 2.6))
    plotted = []
    for t_index, (task, ds) in enumerate(data.items()):
        for c in range(len(cells[task]), ncols):
            axes[2 * t_index, c].set_visible(False)
            axes[2 * t_index + 1, c].set_visible(False)
        for c, cell in enumerate(cells[task]):
            ax, axc = axes[2 * t_index, c], axes[2 * t_index + 1, c]
            sub = ds.sel(variant=cell)
            for series in sub["series"].values:
                ci = _ci_over_seeds(sub["w_distance"].sel(series=series))
                style = dict(SIM_STYLE[str(series)], ms=3)
                _band(ax, ci["layer"].values, ci, alpha=0.12, **style)
                plotted.append(_tag(ci, task=task, variant=cell, series=str(series), metric="w1"))
            for series in sub["model_series"].values:
                ci = _ci_over_seeds(sub["sim_clusters"].sel(model_series=series))
                style = dict(
                    SIM_STYLE.get(str(series), dict(color="k", lw=2.2, marker="o", label="trained")), ms=3
                )
                _band(axc, ci["layer"].values, ci, alpha=0.12, **style)
                plotted.append(_tag(ci, task=task, variant=cell, series=str(series), metric="clusters"))
            dt = _ci_over_seeds(sub["matched_dt"])
            n = int(np.isfinite(sub["matched_dt"]).sum())
            ax.set_title(
                f"{TASK_LABEL[task]}: {cell}\nmatched dt = {float(dt['mean']):.2f} ± "
                f"{float(dt['ci']):.2f} (n = {n})",
                fontsize=9,
            )
            ax.set_ylabel("W₁ to the trained tokens (rad)", fontsize=9)
            axc.set_ylabel("clusters (ε = 0.5, unit sphere)", fontsize=9)
            for a in (ax, axc):
                a.set_xlabel("layer")
                a.grid(alpha=0.3)
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color="k", lw=2.2, marker="o", ms=3, label="trained model")]
    handles += [Line2D([], [], ms=3, **style) for style in SIM_STYLE.values()]
    legend_ax.legend(handles=handles, loc="center", ncol=4, frameon=False, fontsize=8.5)
    result = _combine(plotted)
    caption = (
        "Top row of each task: mean over held-out inputs of the optimal-transport distance W₁ (geodesic, "
        "radians) between the trained model's token cloud on the unit sphere and each simulated cloud "
        "started from the same layer-0 tokens; shaded: 95 % t-interval over training seeds. A simulation "
        "is informative only where it lies below the frozen baseline (dotted grey; a fitted preset at the "
        "edge of its grid lies on it). Bottom row: cluster counts. "
        "Matched dt: the sphere time step whose first simulated layer turns the tokens by the model's "
        "first-block mean angle."
    )
    return save(fig, result, "trained_vs_simulated", out, "Trained vs simulated token clouds", caption)


def make_recall_sweep(quick=False, out=None, progress=True) -> xr.Dataset:
    """Recall sweep: accuracy inside vs outside the window and training loss, one factor at a time."""
    import matplotlib.pyplot as plt

    from analysis.figures._common import save

    ds = _load("recall")
    variants = [str(v) for v in ds["variant"].values]
    fig, (ax, axl) = plt.subplots(1, 2, figsize=(15, 5.2), gridspec_kw=dict(width_ratios=(1.1, 1)))
    width = 0.38
    rows = []
    for k, (var, label, color) in enumerate(
        (
            ("accuracy_inside_window", "queries whose key is inside the window", "C2"),
            ("accuracy_outside_window", "outside the window", "C7"),
        )
    ):
        ci = _ci_over_seeds(ds[var])
        x = np.arange(len(variants)) + (k - 0.5) * width
        ax.bar(x, ci["mean"], width, yerr=ci["ci"], color=color, label=label, capsize=3)
        for xi, v in zip(x, ds[var].transpose("variant", "seed").values):
            ax.plot(np.full(len(v), xi), v, "k.", ms=3)
        rows.append(_tag(ci, metric=var))
    ax.axhline(1 / 16, color="0.3", ls=":", lw=1, label="chance (1/16)")
    ax.set_xticks(np.arange(len(variants)), variants, rotation=30, ha="right")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=8, loc="upper left")
    ax.grid(alpha=0.3, axis="y")
    cmap = plt.get_cmap("tab10")
    for i, v in enumerate(variants):
        ci = _ci_over_seeds(ds["train_loss"].sel(variant=v))
        x = ci["loss_step"].values
        _band(axl, x, ci, alpha=0.12, color=cmap(i % 10), label=v, lw=1.3)
    axl.set_xlabel("training step")
    axl.set_ylabel("training loss (mean of 50 steps)")
    axl.grid(alpha=0.3)
    axl.legend(fontsize=8, ncol=2)
    n = int(ds.sizes["seed"])
    caption = (
        f"Krause recall models around a base config (window 16, top-k 8, σ init 2.5, lr 3e-3), one factor "
        f"changed at a time, and softmax; {int(ds['steps'].max())} steps, n = {n} seeds (dots: single seeds, "
        "bars: mean ± 95 % t-interval). Inside the window the value is visible to the query: failing there "
        "is an optimisation failure; outside it no information can reach the query, so chance is the "
        "capacity limit."
    )
    return save(
        fig,
        xr.concat(rows, "metric"),
        "recall_sweep",
        out,
        "Associative recall: what the Krause model needs",
        caption,
    )


def make_sink_training(quick=False, out=None, progress=True) -> xr.Dataset:
    """Does a first-token sink form? α₀ per block during training of the BOS character LM, every cell."""
    import matplotlib.pyplot as plt

    from analysis.figures._common import save

    ds = _load("causal-ablation")
    long = _load("sink-long") if (DATA / "sink-long.nc").exists() else None
    L = int(ds.sizes["attn_layer"])
    rows = [
        ("probe_alpha0_excess", False, "α₀ − uniform (mean over heads)"),
        ("probe_alpha0_excess", True, "α₀ − uniform (mean over heads)"),
        ("probe_alpha0_max_head", False, "α₀ of the top head"),
        ("probe_alpha0_max_head", True, "α₀ of the top head"),
    ]
    fig, axes = plt.subplots(
        len(rows), L, figsize=(3.8 * L, 2.7 * len(rows) + 1.4), squeeze=False, sharex=True
    )
    plotted = []
    for r, (var, topk, ylabel) in enumerate(rows):
        for b in range(L):
            ax = axes[r, b]
            for name, score, ls, label in _cells(topk, "window"):
                if name not in ds["variant"].values:
                    continue
                ci = _ci_over_seeds(ds[var].sel(variant=name).isel(attn_layer=b))
                x = ci["probe_step"].values
                _band(ax, x, ci, color=SCORE_COLOR[score], ls=ls, lw=1.4, label=label)
                plotted.append(_tag(ci, variant=name, metric=var, block=b + 1))
            if long is not None and not topk and "dot" in long["variant"].values:
                ci = _ci_over_seeds(long[var].sel(variant="dot").isel(attn_layer=b))
                n_long = int(long.sizes["seed"])
                _band(
                    ax,
                    ci["probe_step"].values,
                    ci,
                    color="k",
                    lw=1.0,
                    label=f"dot, {int(long['steps'].max())} steps",
                )
                plotted.append(
                    _tag(ci.rename(probe_step="long_step"), variant="dot-long", metric=var, block=b + 1)
                )
            if "excess" in var:
                ax.axhline(0, color="0.5", lw=0.8)
            ax.grid(alpha=0.3)
            if r == 0:
                ax.set_title(f"block {b + 1}", fontsize=10)
            if b == 0:
                ax.set_ylabel(f"{ylabel}\ntop-k {'on' if topk else 'off'}", fontsize=9)
            if r == len(rows) - 1:
                ax.set_xlabel("training step")
    axes[0, 0].legend(fontsize=7.5, loc="best")
    axes[1, 0].legend(fontsize=7.5, loc="best")
    n = int(ds.sizes["seed"])
    caption = (
        "Character LM on the pydoc topics text with a BOS token at position 0 of every 64-character window. "
        "α₀ = mean over queries i of the weight a_i0 on BOS, measured on 64 fixed held-out windows every "
        "100 steps; uniform = what equal weights over each query's visible keys would give BOS (a window of "
        "16 hides BOS from queries i ≥ 16, so the windowed cells' uniform baseline is lower). Mean over "
        f"n = {n} training seeds, shaded 95 % t-interval. A sink would show as α₀ rising far above uniform."
        + (f" Black: the softmax cell trained longer (n = {n_long} seeds)." if long is not None else "")
    )
    return save(
        fig, _combine(plotted), "sink_training", out, "Does a first-token sink form during training?", caption
    )


def make_sink_backcopy(quick=False, out=None, progress=True) -> xr.Dataset:
    """A sink that forms: Bigram-Backcopy, BOS weight and self-weight of the dormant rows, every cell."""
    import matplotlib.pyplot as plt

    from analysis.figures._common import save

    ds = _load("sink-backcopy")
    rows = [
        ("probe_alpha0_dormant", "α₀ on BOS, dormant rows\nthat can see BOS"),
        ("probe_self_dormant", "self-weight a_ii,\ndormant rows"),
        ("probe_previous_active", "previous-token weight,\nactive (copy) rows"),
    ]
    fig, axes = plt.subplots(len(rows), 2, figsize=(9.5, 2.6 * len(rows) + 1.2), squeeze=False, sharex=True)
    plotted = []
    for r, (var, ylabel) in enumerate(rows):
        for c, topk in enumerate((False, True)):
            ax = axes[r, c]
            for name, score, ls, label in _cells(topk, "window"):
                if name not in ds["variant"].values:
                    continue
                ci = _ci_over_seeds(ds[var].sel(variant=name).isel(attn_layer=0))
                _band(ax, ci["probe_step"].values, ci, color=SCORE_COLOR[score], ls=ls, lw=1.4, label=label)
                plotted.append(_tag(ci, variant=name, metric=var))
            if var == "probe_alpha0_dormant":
                for name, label, ls in (("dot", "no window", ":"), ("dot+window", "window", "-.")):
                    if name in ds["variant"].values:
                        u = ds["probe_alpha0_dormant_uniform"].sel(variant=name).isel(attn_layer=0).mean()
                        ax.axhline(
                            float(u), color="0.4", ls=ls, lw=1, label=f"uniform over visible keys, {label}"
                        )
            ax.set_ylim(-0.03, 1.03)
            ax.grid(alpha=0.3)
            if r == 0:
                ax.set_title(f"top-k {'on (k = 8)' if topk else 'off'}", fontsize=10)
            if c == 0:
                ax.set_ylabel(ylabel, fontsize=9)
            if r == len(rows) - 1:
                ax.set_xlabel("training step")
    axes[0, 0].legend(fontsize=7.5, loc="center right")
    n = int(ds.sizes["seed"])
    caption = (
        "Bigram-Backcopy (Guo et al. 2024) with BOS at position 0: after one of 3 trigger tokens the next "
        "token copies the one before the trigger (an active row: attention must fetch the previous token); "
        "everywhere else the next token follows a fixed bigram table (a dormant row: attention has nothing "
        "to add). One block, one head, d = 64, 3000 steps; probes on 64 fixed held-out sequences every 100 "
        "steps. Top row: weight on BOS of the dormant rows that can see BOS (window 16: queries 1-15). "
        f"Mean over n = {n} training seeds, shaded 95 % t-interval (seeds split between two outcomes, hence "
        "the wide bands: benchmarks/bridge.md §5 counts them). Softmax without the window parks its dormant "
        "rows on BOS in every seed (a sink); with the window, and more often with RBF scores, they park on "
        "themselves instead."
    )
    return save(
        fig, _combine(plotted), "sink_backcopy", out, "A sink that forms, and where Krause puts it", caption
    )


def _register():
    if (DATA / "vit-ablation.nc").exists() and (DATA / "causal-ablation.nc").exists():
        register("ablation_bridge", group="findings")(make_ablation_bridge)
    if (DATA / "causal-ablation.nc").exists():
        register("sink_training", group="findings")(make_sink_training)
    if (DATA / "sink-backcopy.nc").exists():
        register("sink_backcopy", group="findings")(make_sink_backcopy)
    if (DATA / "vit-ablation.nc").exists():
        register("trained_vs_simulated", group="findings")(make_trained_vs_simulated)
    if (DATA / "recall.nc").exists():
        register("recall_sweep", group="findings")(make_recall_sweep)


_register()
