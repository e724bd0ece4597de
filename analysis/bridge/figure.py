"""Figure ``figures/compare_<task>.png`` (+ .pdf, .nc): trained Krause vs softmax (vs hybrid) per layer,
with their simulated counterparts (own attention without MLP; SA(β) and Krause(σ) presets fitted)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import xarray as xr

from .data import save, task_inputs
from .fitting import fit_preset
from .layer_metrics import compare, format_table
from .simulated import matched_dt, restrictions, simulate_like

ATTENTIONS = ("softmax", "krause", "hybrid")
STYLES = {
    "trained": dict(ls="-", marker="o", lw=2.2, color="k"),
    "own residual": dict(ls="-", marker="D", lw=1.4, ms=4, color="C2"),
    "own sphere": dict(ls="--", marker="s", lw=1.4, ms=4, color="C1"),
    "own sphere matched": dict(ls="-.", marker="s", lw=1.4, ms=4, color="C4"),
    "SA fit": dict(ls=":", marker="^", lw=1.4, ms=5, color="C0"),
    "Krause fit": dict(ls=":", marker="v", lw=1.4, ms=5, color="C3"),
}
LABELS = {
    "trained": "trained model",
    "own residual": "own attention, residual (model minus MLPs)",
    "own sphere": "own attention on the sphere, dt = 1 per layer",
    "own sphere matched": "own attention on the sphere, dt matched to block 1",
    "SA fit": "SA(β) preset, Q = K = V = I, β fitted",
    "Krause fit": "Krause(σ) preset, σ fitted",
}
#: (variable, y label); the first-token row plots α₀ minus its uniform baseline (analysis.sink_excess)
PANELS = (
    ("clusters", "clusters (ε-graph, unit sphere)"),
    ("effective_rank", "effective rank (unit sphere)"),
    ("first_token_excess", "first-token mass − uniform"),
    ("attention_entropy", "attention entropy / log(#keys)"),
)


def find_checkpoints(task: str, root="checkpoints") -> dict:
    """{attention: path} of the checkpoints whose card names ``task`` (lowest seed per attention)."""
    from particles.nn.checkpoint import list_cards

    found = {}
    for card_path, card in list_cards(root, task=task, with_weights=True):
        att = card.get("attention")
        if att not in ATTENTIONS:
            continue
        seed = card.get("seed", 0)
        if att not in found or seed < found[att][0]:
            found[att] = (seed, card_path.with_suffix(".pt"))
    return {a: found[a][1] for a in ATTENTIONS if a in found}


def make_compare(
    task: str,
    quick: bool = False,
    out: str | os.PathLike[str] = "figures",
    progress: bool = True,
    *,
    checkpoints: str | os.PathLike[str] = "checkpoints",
    n_samples: int | None = None,
    eps: float = 0.5,
) -> xr.Dataset:
    """Compare the trained models of ``task`` with the particle dynamics; writes
    ``out/compare_<task>.png``, ``.pdf`` and ``.nc`` and returns the plotted Dataset (model, layer)
    — one "model" entry per series: "<attention> trained", "<attention> own-attn sphere" (the model's
    attention sub-layers as velocity on the unit sphere, one unit of time per layer),
    "<attention> own-attn sphere-matched" (the same with dt matched to the first block's mean angular
    step, :func:`~analysis.bridge.simulated.matched_dt`),
    "<attention> own-attn residual" (x ← x + attn(norm1(x)): the model without its MLPs),
    "<attention> SA fit", "<attention> Krause fit" — with the fitted values in attrs and the printed
    table in ``attrs["table"]``. Inputs: 256 held-out images (digits-vit) or 64 sequences.
    quick: 8 inputs, coarse fit grids, one Euler step per layer. Figure: one column per attention
    kind, one row per metric that has data; fits at the edge of their grid drawn hollow and named.
    """
    import matplotlib.pyplot as plt

    from particles.nn import load_checkpoint

    from . import extract

    paths = find_checkpoints(task, checkpoints)
    if not paths:
        raise FileNotFoundError(
            f"no checkpoints for task {task!r} under {checkpoints}/ (train them first: ksync train)"
        )
    n = n_samples or (8 if quick else (256 if task == "digits-vit" else 64))
    spl = 1 if quick else 4
    inputs, labels = task_inputs(task, n)
    series, fits, matched_dts = {}, {}, {}
    for att, path in paths.items():
        model = load_checkpoint(path)
        ds = extract(model, inputs, labels=labels)
        series[f"{att} trained"] = ds
        series[f"{att} own-attn sphere"] = simulate_like(model, ds, mode="own", steps_per_layer=spl)
        dt, _ = matched_dt(model, ds, steps_per_layer=spl)
        matched_dts[att] = dt
        series[f"{att} own-attn sphere-matched"] = simulate_like(
            model, ds, mode="own", dt=dt, steps_per_layer=spl
        )
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

    cmp.attrs["matched_dt"] = json.dumps(matched_dts)
    fig = _plot(cmp, list(paths), fits, matched_dts, task, n, eps)
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        for ext in ("png", "pdf"):
            fig.savefig(out / f"compare_{task}.{ext}", dpi=130)
        save(cmp, out / f"compare_{task}.nc")
    plt.close(fig)
    return cmp


def _kind(name: str) -> tuple[str, str]:
    att, kind = str(name).split(" ", 1)
    kind = {
        "own-attn sphere": "own sphere",
        "own-attn sphere-matched": "own sphere matched",
        "own-attn residual": "own residual",
    }.get(kind, kind)
    return att, kind


def _fit_label(kind, fit) -> str:
    sym = "β" if fit["param"] == "beta" else "σ"
    edge = ", grid edge" if fit["at_boundary"] else ""
    return f"{kind}: {sym} = {fit['value']:.2g} (residual {fit['residual']:.2f}{edge})"


def _plot(cmp, attentions, fits, matched_dts, task, n, eps):
    """One column per trained attention kind, one row per metric with data; ≤ 6 curves per panel."""
    import matplotlib.pyplot as plt

    rows = [(v, label) for v, label in PANELS if v in cmp and np.isfinite(cmp[v].values).any()]
    fig, axes = plt.subplots(
        len(rows), len(attentions), figsize=(4.6 * len(attentions), 2.6 * len(rows) + 1.6), squeeze=False
    )
    layers = cmp["layer"].values
    for c, att in enumerate(attentions):
        for r, (var, ylabel) in enumerate(rows):
            ax = axes[r, c]
            drawn = 0
            for name in cmp["model"].values:
                a, kind = _kind(name)
                if a != att:
                    continue
                y = cmp[var].sel(model=name).values
                if np.all(np.isnan(y)):
                    continue
                style = dict(STYLES[kind])
                if kind in ("SA fit", "Krause fit") and fits[f"{att} {kind}"]["at_boundary"]:
                    style["mfc"] = "none"  # hollow markers: the fit sits at the edge of its grid
                ax.plot(layers, y, **style)
                drawn += 1
            if var == "first_token_excess":
                ax.axhline(0, color="0.5", lw=0.8)
            if not drawn:
                ax.text(0.5, 0.5, "no attention here", transform=ax.transAxes, ha="center", color="0.5")
            ax.set_xticks(layers)
            ax.set_xlabel("layer")
            ax.set_ylabel(ylabel, fontsize=9)
            ax.grid(alpha=0.3)
        notes = [_fit_label(k.split(" ", 1)[1], f) for k, f in fits.items() if k.split()[0] == att]
        notes.append(f"matched dt = {matched_dts[att]:.2g}")
        axes[0, c].set_title(f"{att}\n" + "\n".join(notes), fontsize=8)
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], **STYLES[k], label=LABELS[k]) for k in STYLES]
    handles.append(
        Line2D([], [], color="0.3", marker="^", mfc="none", ls=":", label="hollow: fit at its grid edge")
    )
    fig.legend(handles=handles, loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.suptitle(f"{task}: trained models vs particle dynamics ({n} held-out inputs, ε = {eps})", fontsize=11)
    height = fig.get_figheight()
    fig.tight_layout(rect=(0, 0.75 / height, 1, 1 - 0.35 / height))
    return fig
