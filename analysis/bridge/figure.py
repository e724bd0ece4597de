"""Figure ``figures/compare_<task>.png`` (+ .pdf, .nc): trained Krause vs softmax (vs hybrid) per layer,
with their simulated counterparts (own attention without MLP; SA(β) and Krause(σ) presets fitted)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import xarray as xr

from .data import save, task_inputs
from .fitting import fit_preset
from .layer_metrics import compare, format_table
from .simulated import restrictions, simulate_like

ATTENTIONS = ("softmax", "krause", "hybrid")
COLORS = {"softmax": "C0", "krause": "C3", "hybrid": "C2"}
STYLES = {
    "trained": dict(ls="-", marker="o", lw=2.0),
    "own": dict(ls="--", marker="s", lw=1.4, ms=4),
    "own residual": dict(ls=(0, (6, 2, 1, 2)), marker="D", lw=1.4, ms=4),
    "SA fit": dict(ls=":", marker="^", lw=1.2, ms=4),
    "Krause fit": dict(ls="-.", marker="v", lw=1.2, ms=4),
    "uniform": dict(ls=(0, (1, 1)), lw=2.5, alpha=0.3),
    "softmax branch": dict(ls="-", marker="x", lw=0.8, ms=5, alpha=0.7),
    "krause branch": dict(ls="-", marker="+", lw=0.8, ms=7, alpha=0.7),
}
PANELS = (
    ("clusters", "clusters (ε-graph on the sphere)"),
    ("effective_rank", "effective rank"),
    ("mean_cosine", "mean pairwise cosine"),
    ("first_token_mass", "first-token attention mass"),
    ("sink_rate", "sink rate (heads with α₀ > ε)"),
    ("attention_entropy", "attention entropy (normalised)"),
)


def find_checkpoints(task: str, root="checkpoints") -> dict:
    """{attention: path} of the checkpoints whose card names ``task`` (lowest seed per attention)."""
    from particles.nn import read_card

    found = {}
    for card_path in sorted(Path(root).glob("*.json")):
        try:
            card = read_card(card_path)
        except (OSError, ValueError):
            continue
        att = card.get("attention")
        if card.get("task") != task or att not in ATTENTIONS or not card_path.with_suffix(".pt").exists():
            continue
        seed = card.get("seed", 0)
        if att not in found or seed < found[att][0]:
            found[att] = (seed, card_path.with_suffix(".pt"))
    return {a: found[a][1] for a in ATTENTIONS if a in found}


def make_compare(
    task: str,
    quick: bool = False,
    out="figures",
    progress: bool = True,
    *,
    checkpoints="checkpoints",
    n_samples: int | None = None,
    eps: float = 0.5,
) -> xr.Dataset:
    """Compare the trained models of ``task`` with the particle dynamics; writes
    ``out/compare_<task>.png``, ``.pdf`` and ``.nc`` and returns the plotted Dataset (model, layer)
    — one "model" entry per series: "<attention> trained", "<attention> own-attn sphere" (the model's
    attention sub-layers as velocity on the unit sphere, one unit of time per layer),
    "<attention> own-attn residual" (x ← x + attn(norm1(x)): the model without its MLPs),
    "<attention> SA fit", "<attention> Krause fit" — with the fitted values in attrs and the printed
    table in ``attrs["table"]``. quick: 8 inputs, coarse fit grids, one Euler step per layer.
    """
    import matplotlib.pyplot as plt

    from particles.nn import load_checkpoint

    from . import extract

    paths = find_checkpoints(task, checkpoints)
    if not paths:
        raise FileNotFoundError(
            f"no checkpoints for task {task!r} under {checkpoints}/ (train them first: ksync train)"
        )
    n = n_samples or (8 if quick else (32 if task == "digits-vit" else 16))
    spl = 1 if quick else 4
    inputs, labels = task_inputs(task, n)
    series, fits = {}, {}
    for att, path in paths.items():
        model = load_checkpoint(path)
        ds = extract(model, inputs, labels=labels)
        series[f"{att} trained"] = ds
        series[f"{att} own-attn sphere"] = simulate_like(model, ds, mode="own", steps_per_layer=spl)
        series[f"{att} own-attn residual"] = simulate_like(model, ds, mode="own", geometry="residual")
        restrict = restrictions(model)
        for preset, label in (("sa", "SA fit"), ("krause", "Krause fit")):
            fit = fit_preset(ds, preset, eps=eps, quick=quick, progress=progress, **restrict)
            fits[f"{att} {label}"] = fit
            kw = {fit["param"]: fit["value"]}
            series[f"{att} {label}"] = simulate_like(
                None, ds, mode=preset, n_layers=len(model.blocks), steps_per_layer=4, **kw, **restrict
            )
        if progress:
            print(f"{task}/{att}: extracted {dict(ds['x'].sizes)} from {path}")
    cmp = compare(series, eps=eps)
    table = format_table(cmp)
    lines = [
        f"{k}: {f['param']} = {f['value']:.3g} (residual {f['residual']:.3f}"
        + (", at the grid boundary)" if f["at_boundary"] else ")")
        for k, f in fits.items()
    ]
    table += "\n\nfitted presets (one unit of time per layer, from the layer-0 tokens on the sphere):\n"
    table += "\n".join(lines)
    if progress:
        print(table)
    cmp.attrs.update(
        task=task,
        n_inputs=int(n),
        table=table,
        checkpoints=json.dumps({a: Path(p).name for a, p in paths.items()}),
        fits=json.dumps(
            {k: {x: f[x] for x in ("param", "value", "residual", "at_boundary")} for k, f in fits.items()}
        ),
    )
    for k, f in fits.items():
        cmp.attrs[f"fit {k}"] = f"{f['param']}={f['value']:.6g} residual={f['residual']:.6g}"

    fig, axes = plt.subplots(2, 3, figsize=(13, 7.2), constrained_layout=True)
    layers = cmp["layer"].values
    for ax, (var, title) in zip(axes.ravel(), PANELS):
        for name in cmp["model"].values:
            att, kind = str(name).split(" ", 1)
            kind = {"own-attn sphere": "own", "own-attn residual": "own residual"}.get(kind, kind)
            y = cmp[var].sel(model=name).values if var in cmp else np.full(len(layers), np.nan)
            if np.all(np.isnan(y)):
                continue
            ax.plot(layers, y, color=COLORS[att], **STYLES[kind], alpha=1.0 if kind == "trained" else 0.75)
            if var == "first_token_mass" and kind == "trained" and "first_token_uniform" in cmp:
                base = cmp["first_token_uniform"].sel(model=name).values
                ax.plot(layers, base, color=COLORS[att], **STYLES["uniform"])
            branch_var = f"branch_{var}"
            if kind == "trained" and att == "hybrid" and branch_var in cmp and "branch" in cmp.dims:
                for b in cmp["branch"].values:
                    yb = cmp[branch_var].sel(model=name, branch=b).values
                    if not np.all(np.isnan(yb)):
                        ax.plot(layers, yb, color=COLORS[att], **STYLES[f"{b} branch"])
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("layer")
        ax.set_xticks(layers)
        ax.grid(alpha=0.3)
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=COLORS[a], lw=2, label=a) for a in paths]
    handles += [
        Line2D([], [], color="0.3", **STYLES["trained"], label="trained model"),
        Line2D([], [], color="0.3", **STYLES["own"], label="own attention on the sphere"),
        Line2D(
            [], [], color="0.3", **STYLES["own residual"], label="own attention, residual (model minus MLPs)"
        ),
        Line2D([], [], color="0.3", **STYLES["SA fit"], label="SA(β) preset, β fitted"),
        Line2D([], [], color="0.3", **STYLES["Krause fit"], label="Krause(σ) preset, σ fitted"),
        Line2D([], [], color="0.3", **STYLES["uniform"], label="uniform over visible keys (trained)"),
    ]
    if "hybrid" in paths:
        handles += [
            Line2D([], [], color=COLORS["hybrid"], **STYLES[f"{b} branch"], label=f"hybrid: {b} branch")
            for b in ("softmax", "krause")
        ]
    fig.legend(handles=handles, loc="outside lower center", ncol=5, fontsize=8, frameon=False)
    fitted = "\n".join(
        f"{att}: "
        + ", ".join(
            f"{k.split(' ', 1)[1]} {'β' if f['param'] == 'beta' else 'σ'} = {f['value']:.2g}"
            f" (residual {f['residual']:.2f})"
            for k, f in fits.items()
            if k.split()[0] == att
        )
        for att in paths
    )
    fig.suptitle(
        f"{task}: trained models vs particle dynamics ({n} held-out inputs, ε = {eps})\n{fitted}", fontsize=10
    )
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        for ext in ("png", "pdf"):
            fig.savefig(out / f"compare_{task}.{ext}", dpi=130)
        save(cmp, out / f"compare_{task}.nc")
    plt.close(fig)
    return cmp
