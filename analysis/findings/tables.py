"""Markdown tables of the experiments, read from the collected data files (``benchmarks/findings/``).

``python -m analysis.findings.tables DIR`` prints every table; benchmarks/bridge.md quotes them.
Every entry is mean ± 95 % t-interval half-width over training seeds (n in the header).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import xarray as xr

from . import stats
from .collect import cell_factors, effect_rows

VIT_ORDER = ("dot", "dot+topk", "dot+grid", "dot+grid+topk", "rbf", "rbf+topk", "rbf+grid", "rbf+grid+topk")
LM_ORDER = tuple(v.replace("grid", "window") for v in VIT_ORDER)


def fmt(values, digits: int = 2) -> str:
    mean, half, n = stats.mean_ci(np.asarray(values, float))
    if not np.isfinite(mean):
        return "–"
    return f"{mean:.{digits}f} ± {half:.{digits}f}" if np.isfinite(half) else f"{mean:.{digits}f}"


def _order(ds, order):
    return [v for v in order if v in ds["variant"].values] + [
        str(v) for v in ds["variant"].values if str(v) not in order
    ]


def responses(ds: xr.Dataset) -> dict[str, xr.DataArray]:
    """Scalar responses over (variant, seed) used for the per-cell and effects tables."""
    L = int(ds.sizes["layer"]) - 1
    c = ds["clusters"].sel(eps=0.5)
    out = {
        "clusters, layer 0": c.isel(layer=0),
        f"clusters, layer {L}": c.isel(layer=L),
        f"Δ clusters 0→{L}": c.isel(layer=L) - c.isel(layer=0),
        f"eff. rank, layer {L}": ds["effective_rank"].isel(layer=L),
        f"Δ eff. rank 0→{L}": ds["effective_rank"].isel(layer=L) - ds["effective_rank"].isel(layer=0),
    }
    last = int(ds.sizes["attn_layer"]) - 1
    if ds.attrs.get("task") == "digits-vit":
        out["α₀ − uniform, CLS row, last block"] = ds["alpha0_excess_out"].isel(attn_layer=last)
        out["α₀ − uniform, all rows, last block"] = ds["alpha0_excess"].isel(attn_layer=last)
        out["α₀ − uniform, blocks 1–3"] = (
            ds["alpha0_excess"].isel(attn_layer=slice(0, last)).mean("attn_layer")
        )
        out["test accuracy"] = ds["test_accuracy"]
    else:
        out["α₀, mean over blocks"] = ds["alpha0"].mean("attn_layer")
        out["α₀ − uniform, mean over blocks"] = ds["alpha0_excess"].mean("attn_layer")
        out["α₀ − uniform, max over blocks"] = ds["alpha0_excess"].max("attn_layer")
        out["test bits/char"] = ds["test_bits_per_char"]
    return out


def cell_table(ds: xr.Dataset, order) -> str:
    resp = responses(ds)
    head = "| cell | " + " | ".join(resp) + " |"
    rows = [head, "|---" * (len(resp) + 1) + "|"]
    for v in _order(ds, order):
        digits = {k: (4 if "accuracy" in k or "bits" in k else 3 if "α₀" in k else 2) for k in resp}
        rows.append(
            f"| {v} | " + " | ".join(fmt(r.sel(variant=v).values, digits[k]) for k, r in resp.items()) + " |"
        )
    return "\n".join(rows)


def complete(ds: xr.Dataset) -> bool:
    """All eight cells of the 2 × 2 × 2 present."""
    return len({cell_factors(str(v)) for v in ds["variant"].values if str(v)[:3] in ("dot", "rbf")}) == 8


def effects_table(ds: xr.Dataset, keys=None, resp=None) -> str:
    """One row per response (default :func:`responses`), one column per factorial effect of the
    2 × 2 × 2 (estimate ± 95 % CI); ** marks an interval that excludes 0. Empty until every cell has runs."""
    if not complete(ds):
        return ""
    resp = resp or responses(ds)
    keys = keys or [k for k in resp if "layer 0" not in k]
    names = None
    rows = []
    for k in keys:
        eff = effect_rows(resp[k])
        if names is None:
            names = [e["effect"] for e in eff]
            rows += ["| response | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
        rows.append(f"| {k} | " + " | ".join(_effect(e) for e in eff) + " |")
    return "\n".join(rows)


def _effect(e: dict) -> str:
    if not np.isfinite(e["ci"]):
        return f"{e['estimate']:+.3f}"
    mark = "**" if abs(e["estimate"]) > e["ci"] else ""
    return f"{mark}{e['estimate']:+.3f} ± {e['ci']:.3f}{mark}"


def square_table(ds: xr.Dataset, key: str) -> str:
    """The score × locality 2 × 2 at each top-k level: main effects and interaction of one response."""
    if not complete(ds):
        return ""
    r = responses(ds)[key]
    rows = [
        f"| {key}: top-k | score (RBF − dot) | locality (on − off) | score × locality |",
        "|---|---|---|---|",
    ]
    for topk in (False, True):
        eff = {e["effect"]: e for e in effect_rows(r, topk=topk)}
        cells = [_effect(eff[k]) for k in ("score", "locality", "score×locality")]
        rows.append(f"| {'on' if topk else 'off'} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def probe_table(ds: xr.Dataset, variants=("dot", "rbf+window+topk"), steps=None) -> str:
    """α₀ (mean over heads and queries) per layer at chosen training steps (mean ± CI over seeds)."""
    if "probe_alpha0" not in ds:
        return ""
    all_steps = ds["probe_step"].values
    steps = steps or [s for s in all_steps if s in (0, 250, 500, 1000, 1500, 2000) or s == all_steps.max()]
    L = int(ds.sizes["attn_layer"])
    rows = [
        "| cell | step | "
        + " | ".join(f"α₀ block {b + 1}" for b in range(L))
        + " | max-head α₀ (any block) |",
        "|---" * (L + 3) + "|",
    ]
    for v in variants:
        if v not in ds["variant"].values:
            continue
        for s in steps:
            a = ds["probe_alpha0"].sel(variant=v, probe_step=s)
            m = ds["probe_alpha0_max_head"].sel(variant=v, probe_step=s).max("attn_layer")
            rows.append(
                f"| {v} | {int(s)} | "
                + " | ".join(fmt(a.isel(attn_layer=b).values, 3) for b in range(L))
                + f" | {fmt(m.values, 3)} |"
            )
    return "\n".join(rows)


def distance_table(ds: xr.Dataset, variants) -> str:
    if "w_distance" not in ds:
        return ""
    L = int(ds.sizes["layer"]) - 1
    series = [str(s) for s in ds["series"].values]
    rows = [
        "| cell | " + " | ".join(f"W₁ layer {L}: {s}" for s in series) + " | matched dt | block-1 angle |",
        "|---" * (len(series) + 3) + "|",
    ]
    variants = [
        v
        for v in variants
        if v in ds["variant"].values and np.isfinite(ds["matched_dt"].sel(variant=v)).any()
    ]
    for v in variants:
        d = ds["w_distance"].sel(variant=v).isel(layer=L)
        rows.append(
            f"| {v} | "
            + " | ".join(fmt(d.sel(series=s).values, 3) for s in series)
            + f" | {fmt(ds['matched_dt'].sel(variant=v).values, 2)}"
            + f" | {fmt(ds['first_block_angle'].sel(variant=v).values, 2)} |"
        )
    rows.append("")
    ms = [str(s) for s in ds["model_series"].values]
    rows.append(
        "| cell | "
        + " | ".join(f"clusters layer {L}: {s}" for s in ms)
        + " | SA β (edge) | Krause σ (edge) |"
    )
    rows.append("|---" * (len(ms) + 3) + "|")
    for v in variants:
        c = ds["sim_clusters"].sel(variant=v).isel(layer=L)
        sub = ds.sel(variant=v)
        rows.append(
            f"| {v} | "
            + " | ".join(fmt(c.sel(model_series=s).values, 2) for s in ms)
            + f" | {fmt(sub['sa_beta'].values, 2)} ({int(np.nansum(sub['sa_at_boundary']))}/"
            f"{int(np.isfinite(sub['sa_at_boundary']).sum())})"
            + f" | {fmt(sub['krause_sigma'].values, 2)} ({int(np.nansum(sub['krause_at_boundary']))}/"
            f"{int(np.isfinite(sub['krause_at_boundary']).sum())}) |"
        )
    return "\n".join(rows)


def sink_metric_table(ds: xr.Dataset, order, eps: float = 0.3) -> str:
    """Why a fixed ε is unfair across support sizes: per cell, the first token's uniform baseline,
    the fraction of (block, head) with α₀ > ε (the fixed threshold), with α₀ − uniform > ε·(1 − uniform)
    (the same threshold taken relative to the baseline), and with some *other* key k ≥ 1 holding a
    mean weight > ε (a sink on a non-first token)."""
    if "key_mass" not in ds:
        return ""
    rows = [
        f"| cell | uniform baseline of token 0 | heads α₀ > {eps} | heads α₀ − u > {eps}(1 − u) "
        f"| heads with a key k ≥ 1 above {eps} |",
        "|---|---|---|---|---|",
    ]
    for v in _order(ds, order):
        sub = ds.sel(variant=v)
        a0 = sub["a0"].mean("query")  # (seed, attn_layer, head)
        u = sub["a0_uniform"].mean("query")
        fixed = (a0 > eps).mean(("attn_layer", "head"))
        rel = ((a0 - u) > eps * (1 - u)).mean(("attn_layer", "head"))
        other = (sub["key_mass"].isel(key=slice(1, None)).max("key") > eps).mean(("attn_layer", "head"))
        rows.append(
            f"| {v} | {fmt(u.mean(('attn_layer', 'head')).values, 3)} | {fmt(fixed.values, 2)} | "
            f"{fmt(rel.values, 2)} | {fmt(other.values, 2)} |"
        )
    return "\n".join(rows)


def intervention_table(ds: xr.Dataset) -> str:
    rows = [
        "| cell | " + " | ".join(str(c) for c in ds["case"].values) + " |",
        "|---" * (ds.sizes["case"] + 1) + "|",
    ]
    for v in ds["variant"].values:
        vals = ds["max_abs_logit_change"].sel(variant=v)
        rows.append(
            f"| {v} | " + " | ".join(fmt(vals.sel(case=c).values, 3) for c in ds["case"].values) + " |"
        )
    return "\n".join(rows)


def training_table(ds: xr.Dataset, metric: str, order=()) -> str:
    """Per cell: the held-out metric (mean ± 95 % CI over seeds), the final training loss, the
    optimiser steps and the range of wall-clock training times (shared machine: only indicative)."""
    rows = [
        f"| cell | {metric} | final train loss (last 50 steps) | steps | train time (s), min–max |",
        "|---|---|---|---|---|",
    ]
    for v in _order(ds, order):
        sub = ds.sel(variant=v)
        t = sub["train_time_s"].values
        loss = sub["train_loss"].isel(loss_step=-1).values
        rows.append(
            f"| {v} | {fmt(sub[metric].values, 4)} | {fmt(loss, 3)} | {int(np.nanmax(sub['steps']))} | "
            f"{np.nanmin(t):.0f}–{np.nanmax(t):.0f} |"
        )
    return "\n".join(rows)


def recall_table(ds: xr.Dataset) -> str:
    keys = ("test_accuracy", "accuracy_inside_window", "accuracy_outside_window")
    rows = [
        "| variant | window | all queries | inside the window | outside | final train loss |",
        "|---" * 6 + "|",
    ]
    for v in ds["variant"].values:
        sub = ds.sel(variant=v)
        loss = sub["train_loss"].isel(loss_step=-1).values
        w = sub["model_window"].values if "model_window" in sub else [np.nan]
        w = "all" if not np.isfinite(np.nanmax(w)) else int(np.nanmax(w))
        rows.append(
            f"| {v} | {w} | " + " | ".join(fmt(sub[k].values, 3) for k in keys) + f" | {fmt(loss, 3)} |"
        )
    return "\n".join(rows)


SINK_AT = 0.5  # a dormant-row α₀ above this marks the step at which the sink formed


def backcopy_responses(ds: xr.Dataset) -> dict[str, xr.DataArray]:
    """Scalar responses of the Bigram-Backcopy sink experiment over (variant, seed), block 1, from
    the probe at the end of training (64 held-out sequences) and the held-out metrics."""
    end = {
        k: ds[f"probe_{k}"].isel(probe_step=-1, attn_layer=0)
        for k in (
            "alpha0_dormant",
            "alpha0_dormant_uniform",
            "alpha0_active",
            "self_dormant",
            "previous_active",
            "alpha0",
        )
    }
    a = ds["probe_alpha0_dormant"].isel(attn_layer=0)
    formed = (a > SINK_AT).values
    first = np.where(formed.any(-1), ds["probe_step"].values[formed.argmax(-1)], np.nan)
    return {
        "α₀, dormant rows that see BOS": end["alpha0_dormant"],
        "α₀ − uniform, those rows": end["alpha0_dormant"] - end["alpha0_dormant_uniform"],
        "α₀, active rows": end["alpha0_active"],
        "self-weight a_ii, dormant rows": end["self_dormant"],
        "previous-token weight, active rows": end["previous_active"],
        "α₀, all rows": end["alpha0"],
        f"step α₀ (dormant) > {SINK_AT}": xr.DataArray(
            first, dims=a.dims[:2], coords={d: a[d] for d in a.dims[:2]}
        ),
        "copy accuracy": ds["copy_accuracy"],
        "bigram bits above the optimum": ds["bigram_bits"] - ds["bigram_bits_optimal"],
    }


def backcopy_table(ds: xr.Dataset, order=LM_ORDER) -> str:
    """Per cell: the sink numbers of :func:`backcopy_responses`, mean ± 95 % CI over seeds; the
    formation step is the number of seeds that formed a sink and their median step."""
    resp = backcopy_responses(ds)
    rows = ["| cell | " + " | ".join(resp) + " |", "|---" * (len(resp) + 1) + "|"]
    for v in _order(ds, order):
        cells = []
        for k, r in resp.items():
            x = r.sel(variant=v).values
            if k.startswith("step"):
                ok = x[np.isfinite(x)]
                cells.append(
                    f"{len(ok)}/{len(x)} seeds" + (f", median {np.median(ok):.0f}" if len(ok) else "")
                )
            else:
                cells.append(fmt(x, 4 if "accuracy" in k or "bits" in k else 3))
        rows.append(f"| {v} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def _open(path) -> xr.Dataset:
    from particles.conventions import decode

    with xr.open_dataset(path) as ds:
        return decode(ds.load())


def main(argv=None) -> int:
    d = Path((argv or sys.argv[1:] or ["benchmarks/findings"])[0])
    for name, order in (("vit-ablation", VIT_ORDER), ("causal-ablation", LM_ORDER)):
        path = d / f"{name}.nc"
        if not path.exists():
            continue
        ds = _open(path)
        print(f"## {name} (seeds: {[int(s) for s in ds['seed'].values]})\n")
        print(cell_table(ds, order), "\n")
        print(effects_table(ds), "\n")
        for key in responses(ds):
            if "Δ" in key or "α₀ − uniform" in key:
                print(square_table(ds, key), "\n")
        print(sink_metric_table(ds, order), "\n")
        print(probe_table(ds), "\n")
        print(distance_table(ds, order), "\n")
    print("## training\n")
    for name, metric, order in (
        ("vit-ablation", "test_accuracy", VIT_ORDER),
        ("causal-ablation", "test_bits_per_char", LM_ORDER),
        ("sink-long", "test_bits_per_char", ()),
    ):
        if (d / f"{name}.nc").exists():
            print(f"### {name}\n")
            print(training_table(_open(d / f"{name}.nc"), metric, order), "\n")
    if (d / "sink-long.nc").exists():
        ds = _open(d / "sink-long.nc")
        print(f"## sink-long (seeds: {[int(s) for s in ds['seed'].values]})\n")
        steps = [s for s in ds["probe_step"].values if s % 1000 == 0 or s == ds["probe_step"].values.max()]
        print(probe_table(ds, variants=("dot",), steps=steps), "\n")
        print(cell_table(ds, ("dot",)), "\n")
    if (d / "vit-interventions.nc").exists():
        print("## vit-interventions (max |Δ logits| with rows set to uniform)\n")
        print(intervention_table(_open(d / "vit-interventions.nc")), "\n")
    if (d / "sink-backcopy.nc").exists():
        ds = _open(d / "sink-backcopy.nc")
        print(f"## sink-backcopy (seeds: {[int(s) for s in ds['seed'].values]})\n")
        print(backcopy_table(ds), "\n")
        resp = backcopy_responses(ds)
        keys = [k for k in resp if not k.startswith("step") and "accuracy" not in k]
        print(effects_table(ds, keys, resp), "\n")
    if (d / "recall.nc").exists():
        print("## recall\n")
        print(recall_table(_open(d / "recall.nc")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
