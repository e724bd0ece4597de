"""Per-layer metrics of extracted (or simulated) trajectories, side by side.

* :func:`layer_metrics` — per layer (mean over samples): cluster count, effective rank, mean cosine and
  rank-collapse residual of the tokens (projected to the unit sphere by default, so trained and
  simulated trajectories are measured alike; padding tokens never count), first-token mass, its
  excess over uniform weights on the visible keys (``analysis.sink_excess``: α₀ − mean_i 1[a_i0 > 0]/m_i
  over the m_i visible keys — locality/top-k change the baseline) and that baseline, the per-layer sink rate
  (fraction of heads with α_k > ε) and attention entropy; Sink_k^ε over all layers and heads in attrs.
  A ``particles.simulate`` trajectory is indexed by its saved steps 0, 1, … on the "layer" axis, with
  their times in the variable ``time``.
* :func:`compare` — several of them along a "model" axis; :func:`format_table` — a text table.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import xarray as xr

from analysis.clusters import count_clusters
from analysis.metrics import effective_rank, mean_cosine, rank_collapse
from analysis.sinks import attention_entropy, first_token_mass, sink_excess, sink_scores

from .core import attention_layers


def layer_metrics(
    ds: xr.Dataset,
    *,
    eps: float = 0.5,
    method: str = "graph",
    project: bool = True,
    sink_eps: float = 0.3,
    sink_k: int = 0,
) -> xr.Dataset:
    """Per-layer metrics of one extracted (or simulated) Dataset, averaged over samples.

    Token metrics (layers 0..L) on x/‖x‖ when ``project`` (``eps`` is then a distance on the unit
    sphere: ‖u_i − u_j‖ ≤ 0.5 ⇔ cos ≥ 0.875). Attention metrics on the layers that have attention:
    from "attention" (averaged over heads) or from the in-hook reductions of ``extract(reduce=...)``;
    hybrid models add ``branch_*`` variables over a "branch" axis.
    """
    try:  # per-item SVDs of (T, D) matrices: BLAS threads only add overhead (10x on a loaded machine)
        from threadpoolctl import threadpool_limits

        limit = threadpool_limits(limits=1, user_api="blas")
    except ImportError:  # pragma: no cover - threadpoolctl comes with scikit-learn
        limit = contextlib.nullcontext()
    with limit:
        return _layer_metrics(ds, eps, method, project, sink_eps, sink_k)


def _layer_metrics(ds, eps, method, project, sink_eps, sink_k):
    times = None
    if "time" in ds.dims:  # a particles.simulate trajectory: saved step s plays the part of layer s
        times = ds["time"].values
        ds = ds.rename(time="layer").assign_coords(layer=np.arange(ds.sizes["time"]))
    if "particle" in ds.dims:
        ds = ds.rename(particle="token")
    x = ds["x"].astype(float)
    if "sample" not in x.dims:
        x = x.expand_dims(sample=[0])
    sphere = bool(project)  # the metrics divide each token by its norm (padding left out by the mask)
    out = xr.Dataset()
    out["clusters"] = count_clusters(x, eps, method=method, sphere=sphere).mean("sample")
    out["effective_rank"] = effective_rank(x, sphere=sphere).mean("sample")
    out["mean_cosine"] = mean_cosine(x, sphere=sphere).mean("sample")
    out["rank_collapse"] = rank_collapse(x, sphere=sphere).mean("sample")
    if times is not None:
        out["time"] = ("layer", np.asarray(times, dtype=float))
    attn = _attention_metrics(ds, sink_eps, sink_k)
    for name, da in attn.items():
        out[name] = da
    out = out.drop_vars([c for c in out.coords if c not in ("layer", "branch")])
    out.attrs.update(
        eps=eps,
        method=method,
        project=int(project),
        sink_eps=sink_eps,
        sink_k=sink_k,
        n_tokens=int(x.sizes["token"]),
        n_samples=int(x.sizes["sample"]),
    )
    if "sink_rate" in out:
        out.attrs["sink_rate_overall"] = float(attn["_overall"]) if "_overall" in attn else np.nan
    out = out.drop_vars("_overall", errors="ignore")
    return out


def _attention_metrics(ds, sink_eps, sink_k) -> dict:
    out = {}
    mask = ds.get("token_mask")  # attention_layers(ds[...]) leaves the Dataset's token mask behind
    mask = None if mask is None else mask.variable  # its dims only: (sample, token) or (token,)
    for prefix in ("", "branch_"):
        if prefix + "attention" in ds:
            a = attention_layers(ds[prefix + "attention"])
            if "head" not in a.dims:
                a = a.expand_dims(head=[0], axis=-3)
            ftm = first_token_mass(a, token_mask=mask)
            alpha = sink_scores(a, sink_k, token_mask=mask)
            ent = attention_entropy(a, token_mask=mask)
            excess = sink_excess(a, 0, over=(), token_mask=mask)
            excess = excess.mean([d for d in ("sample", "head") if d in excess.dims])
            out[prefix + "first_token_excess"] = excess
            mean_ftm = ftm.mean([d for d in ("sample", "head") if d in ftm.dims])
            out[prefix + "first_token_uniform"] = mean_ftm - excess
        elif prefix + "first_token_mass" in ds or prefix + "sink_score" in ds:
            if ds.attrs.get("sink_k", sink_k) != sink_k and prefix + "sink_score" in ds:
                raise ValueError(
                    f"sink_k={sink_k} differs from the k={ds.attrs['sink_k']} reduced at extraction"
                )
            ftm, alpha, ent = (
                attention_layers(ds[prefix + n]) if prefix + n in ds else None
                for n in ("first_token_mass", "sink_score", "attention_entropy")
            )
        else:
            continue
        if "sample" not in (ftm if ftm is not None else alpha).dims:
            ftm, alpha, ent = (
                v.expand_dims(sample=[0]) if v is not None else None for v in (ftm, alpha, ent)
            )
        if ftm is not None:
            out[prefix + "first_token_mass"] = ftm.mean(("sample", "head"))
        if alpha is not None:
            above = (alpha > sink_eps).astype(float)
            out[prefix + "sink_score"] = alpha.mean(("sample", "head"))
            out[prefix + "sink_rate"] = above.mean(("sample", "head"))
            if not prefix:
                out["_overall"] = above.mean(("layer", "head")).mean("sample")
        if ent is not None:
            out[prefix + "attention_entropy"] = ent.mean(("sample", "head"))
    return out


def compare(sources: Mapping[str, xr.Dataset] | Sequence[xr.Dataset], **metric_kw: Any) -> xr.Dataset:
    """Per-layer metrics of several Datasets side by side along a "model" axis.

    sources: {name: Dataset} (or a list, named by attrs/position). Returns a Dataset (model, layer);
    layers missing in a shorter model are NaN. ``metric_kw`` go to :func:`layer_metrics`.
    """
    if not isinstance(sources, dict):
        sources = {_name(ds, i): ds for i, ds in enumerate(sources)}
    if not sources:
        raise ValueError("sources: nothing to compare")
    parts = []
    for name, ds in sources.items():
        m = layer_metrics(ds, **metric_kw)
        m = m.expand_dims(model=[name])
        sr = m.attrs.get("sink_rate_overall", np.nan)
        m["sink_rate_overall"] = ("model", [sr])
        parts.append(m)
    out = xr.concat(
        parts, "model", join="outer", coords="minimal", data_vars="all", combine_attrs="drop_conflicts"
    )
    out.attrs.pop("sink_rate_overall", None)
    return out


def _name(ds, i):
    a = ds.attrs
    base = a.get("task") or a.get("name_or_path") or a.get("model_class") or f"model{i}"
    kind = a.get("attention_kind") or a.get("model", "")
    return f"{base}/{kind}" if kind else str(base)


TABLE_COLUMNS = (
    ("clusters", "clusters", "{:7.2f}"),
    ("effective_rank", "eff.rank", "{:8.2f}"),
    ("mean_cosine", "mean cos", "{:8.3f}"),
    ("first_token_mass", "1st-tok", "{:7.3f}"),
    ("first_token_uniform", "uniform", "{:7.3f}"),
    ("sink_rate", "sink@eps", "{:8.2f}"),
    ("attention_entropy", "entropy", "{:7.3f}"),
)


def format_table(cmp: xr.Dataset) -> str:
    """Plain-text table: one row per (model, layer); '-' where a metric does not exist."""
    cols = [c for c in TABLE_COLUMNS if c[0] in cmp]
    if "time" in cmp:  # a simulation among the sources: its "layer" is the saved step, time beside it
        cols = [("time", "time", "{:8.3g}")] + cols
    width = max(12, *(len(str(m)) for m in cmp["model"].values))
    head = f"{'model':<{width}} {'layer':>5} " + " ".join(
        f"{label:>{len(fmt.format(0.0))}}" for _, label, fmt in cols
    )

    lines = [head, "-" * len(head)]
    for m in cmp["model"].values:
        for layer in cmp["layer"].values:
            row = cmp.sel(model=m, layer=layer)
            if np.isnan(float(row["effective_rank"])):
                continue
            cells = []
            for name, _, fmt in cols:
                v = float(row[name])
                cells.append(fmt.format(v) if np.isfinite(v) else f"{'-':>{len(fmt.format(0.0))}}")
            lines.append(f"{str(m):<{width}} {int(layer):>5} " + " ".join(cells))
        if "branch" in cmp.dims and "branch_first_token_mass" in cmp:
            for b in cmp["branch"].values:
                row = cmp.sel(model=m, branch=b)
                for layer in cmp["layer"].values:
                    r = row.sel(layer=layer)
                    vals = [
                        float(r[f"branch_{n}"]) if f"branch_{n}" in r else np.nan
                        for n in ("first_token_mass", "sink_rate", "attention_entropy")
                    ]
                    if np.all(np.isnan(vals)):
                        continue
                    lines.append(
                        f"{str(m):<{width}} {int(layer):>5} [{b} branch] 1st-tok {vals[0]:.3f} "
                        f"sink@eps {vals[1]:.2f} entropy {vals[2]:.3f}"
                    )
        if "sink_rate_overall" in cmp:
            eps = cmp.attrs.get("sink_eps", 0.3)
            k = cmp.attrs.get("sink_k", 0)
            v = float(cmp["sink_rate_overall"].sel(model=m))
            if np.isfinite(v):
                lines.append(f"{str(m):<{width}} Sink_{k}^{eps} over layers and heads = {v:.2f}")
    return "\n".join(lines)
