"""Per-layer metrics of extracted trajectories, simulated counterparts and preset fits.

* :func:`layer_metrics` — per layer (mean over samples): cluster count, effective rank, mean cosine and
  rank-collapse residual of the tokens (projected to the unit sphere by default, so trained and
  simulated trajectories are measured alike), first-token mass (and its uniform baseline
  mean_i 1[a_i0 > 0]/m_i over the m_i visible keys — locality/top-k change it), the per-layer sink rate
  (fraction of heads with α_k > ε) and attention entropy; Sink_k^ε over all layers and heads in attrs.
* :func:`simulate_like` — particle dynamics started from the model's layer-0 tokens:
  ``mode="own"``: the model's own attention sub-layers ``block.attn(block.norm1(x))`` (learned
  q/k/v/o maps, σ, window/grid, top-k; no MLP) as the velocity field, one unit of time per layer;
  ``mode="sa"``/``"krause"``: the presets of ``particles.simulate`` (Q = K = V = I) with β or σ.
* :func:`fit_preset` — the one parameter (β for SA, σ for Krause) that best matches the trained
  per-layer effective-rank and cluster-count curves (grid search), with its residual.
"""

from __future__ import annotations

import contextlib
import json

import numpy as np
import torch
import xarray as xr

import analysis

from .core import attention_layers, build_dataset

GEOMETRIES = ("sphere", "residual")
MODES = ("own", "sa", "krause")
#: Default grids of the fitted parameter (log-spaced).
GRIDS = {"sa": np.geomspace(0.05, 50.0, 13), "krause": np.geomspace(0.05, 5.0, 13)}
QUICK_GRIDS = {"sa": np.geomspace(0.1, 30.0, 7), "krause": np.geomspace(0.1, 3.0, 7)}


# --- metrics ------------------------------------------------------------------------------------
def _project(x: xr.DataArray) -> xr.DataArray:
    norm = np.sqrt((x**2).sum("component"))
    return x / norm.where(norm > 0, 1.0)


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
    if "time" in ds.dims:  # a particles.simulate trajectory: time plays the part of the layer
        ds = ds.rename(time="layer")
    if "particle" in ds.dims:
        ds = ds.rename(particle="token")
    x = ds["x"].astype(float)
    if "sample" not in x.dims:
        x = x.expand_dims(sample=[0])
    if project:
        x = _project(x)
    out = xr.Dataset()
    out["clusters"] = analysis.count_clusters(x, eps, method=method).mean("sample")
    out["effective_rank"] = analysis.effective_rank(x).mean("sample")
    out["mean_cosine"] = analysis.mean_cosine(x).mean("sample")
    out["rank_collapse"] = analysis.rank_collapse(x).mean("sample")
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
    for prefix in ("", "branch_"):
        if prefix + "attention" in ds:
            a = attention_layers(ds[prefix + "attention"])
            if "head" not in a.dims:
                a = a.expand_dims(head=[0], axis=-3)
            ftm = analysis.first_token_mass(a)
            alpha = analysis.sink_scores(a, sink_k)
            ent = analysis.attention_entropy(a)
            out[prefix + "first_token_uniform"] = _uniform_first_token(a)
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


def _uniform_first_token(a: xr.DataArray) -> xr.DataArray:
    """Baseline of the first-token mass: what it would be if every query spread its weight uniformly
    over its visible keys (a_ij > 0): mean_i 1[a_i0 > 0] / m_i, averaged over samples and heads."""
    vis = a > 0
    m = vis.sum("key")
    base = (vis.isel(key=0) / m.where(m > 0)).mean("query")
    return base.mean([d for d in ("sample", "head") if d in base.dims])


def compare(sources, **metric_kw) -> xr.Dataset:
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


# --- simulated counterparts ---------------------------------------------------------------------
def restrictions(ds_or_model) -> dict:
    """Support restrictions the particle simulator can express (causal, window, top_k), read from a
    model or an extracted Dataset's attrs; for a hybrid the Krause branch's, top_k of the first layer.
    A patch-grid locality (ViT) has no counterpart in ``particles.simulate`` and is left out."""
    if isinstance(ds_or_model, xr.Dataset):
        a = ds_or_model.attrs
        causal, window, top_k = bool(a.get("causal", 0)), _parse(a.get("window")), _parse(a.get("top_k"))
    else:
        attn = ds_or_model.blocks[0].attn
        attn = attn.krause if getattr(attn, "kind", "") == "hybrid" else attn
        causal, window = bool(attn.causal), attn.window
        top_k = [(b.attn.krause if b.attn.kind == "hybrid" else b.attn).top_k for b in ds_or_model.blocks]
    if isinstance(window, dict):
        window = window.get("krause")
    if isinstance(top_k, (list, tuple)):
        top_k = top_k[0] if top_k else None
    if isinstance(top_k, dict):
        top_k = top_k.get("krause")
    return {"causal": causal, "window": window, "top_k": top_k}


def _parse(v):
    if isinstance(v, str):
        try:
            return json.loads(v)
        except json.JSONDecodeError:
            return None
    if isinstance(v, np.ndarray):
        return v.tolist()
    return v


def _x0(x0) -> np.ndarray:
    if isinstance(x0, xr.Dataset):
        x0 = x0["x"]
    if isinstance(x0, xr.DataArray):
        if "layer" in x0.dims:
            x0 = x0.isel(layer=0)
        x0 = x0.values
    x0 = x0.detach().cpu().numpy() if isinstance(x0, torch.Tensor) else np.asarray(x0)
    if x0.ndim == 2:
        x0 = x0[None]
    if x0.ndim != 3:
        raise ValueError(
            f"x0: expected (token, component) or (sample, token, component), got shape {x0.shape}"
        )
    return x0


def simulate_like(
    model,
    x0,
    *,
    mode: str = "own",
    geometry: str = "sphere",
    dt: float = 1.0,
    steps_per_layer: int = 1,
    n_layers: int | None = None,
    layers=None,
    beta: float | None = None,
    sigma: float | None = None,
    attention: bool = True,
    **restrict,
) -> xr.Dataset:
    """Particle dynamics from the layer-0 tokens ``x0`` (an extracted Dataset, or (sample, T, D)).

    mode "own": velocity v = ``block.attn(block.norm1(x))`` of block ℓ during layer ℓ (the model's
      learned attention; MLP and final norm left out). geometry "sphere": x ← normalise(x + h P_x v),
      x0 projected to the unit sphere (Geshkovski et al.); "residual": x ← x + h v, so one step with
      dt = 1 is exactly the block's attention sub-layer h + attn(norm1(h)). h = dt/steps_per_layer.
      ``layers`` picks the blocks (default all).
    mode "sa"/"krause": ``particles.simulate`` preset on the sphere with Q = K = V = I and β/σ, for
      ``n_layers`` (default: the model's) units of time; ``restrict`` (causal, window, top_k) default
      to :func:`restrictions` of the model.
    Returns the extracted layout: "x" (sample, layer, token, component), "attention" (sample, layer,
    head, query, key) computed from x[layer] at each layer (NaN at the last one).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if geometry not in GEOMETRIES:
        raise ValueError(f"geometry must be one of {GEOMETRIES}, got {geometry!r}")
    if not (isinstance(steps_per_layer, int) and steps_per_layer >= 1):
        raise ValueError(f"steps_per_layer must be an integer >= 1, got {steps_per_layer!r}")
    if not (np.isfinite(dt) and dt > 0):
        raise ValueError(f"dt must be a finite number > 0, got {dt!r}")
    x0 = _x0(x0)
    if mode == "own":
        return _simulate_own(model, x0, geometry, dt, steps_per_layer, layers, attention)
    if geometry != "sphere":
        raise ValueError("the presets 'sa' and 'krause' run on the sphere (geometry='sphere')")
    if n_layers is None:
        if model is None:
            raise ValueError("n_layers is required without a model")
        n_layers = len(model.blocks)
    if model is not None and not restrict:
        restrict = restrictions(model)
    return _simulate_preset(mode, x0, n_layers, dt, steps_per_layer, beta, sigma, attention, restrict)


def _simulate_own(model, x0, geometry, dt, spl, layers, attention):
    if not hasattr(model, "blocks"):
        raise ValueError("mode='own' needs a particles.nn model (blocks with norm1 and attn)")
    blocks = list(model.blocks) if layers is None else [model.blocks[i] for i in layers]
    param = next(model.parameters())
    x = torch.as_tensor(x0, dtype=param.dtype, device=param.device)
    if geometry == "sphere":
        x = x / x.norm(dim=-1, keepdim=True)
    h = dt / spl
    states, maps = [x], []
    with torch.no_grad():
        for block in blocks:
            for s in range(spl):
                v, a = block.attn(block.norm1(x), return_attention=True)
                if s == 0:
                    maps.append(a)
                if geometry == "residual":
                    x = x + h * v if h != 1 else x + v
                else:
                    x = x + h * (v - (v * x).sum(-1, keepdim=True) * x)
                    x = x / x.norm(dim=-1, keepdim=True)
            states.append(x)
    attn_vars = {}
    if attention:
        a = torch.stack(maps, 1).cpu().numpy()
        a = np.concatenate([a, np.full_like(a[:, :1], np.nan)], 1)
        attn_vars["attention"] = (("sample", "layer", "head", "query", "key"), a)
    return build_dataset(
        states,
        attn_vars,
        {},
        dict(
            source="simulate_like",
            mode="own",
            geometry=geometry,
            dt=float(dt),
            steps_per_layer=spl,
            attention_kind=",".join(sorted({b.attn.kind for b in blocks})),
            note="velocity = the model's own attention sub-layer attn(norm1(x)); no MLP, no final norm",
        ),
    )


def _simulate_preset(mode, x0, n_layers, dt, spl, beta, sigma, attention, restrict):
    from particles import simulate

    params = {k: v for k, v in restrict.items() if v is not None and v is not False}
    if mode == "sa":
        params["beta"] = 1.0 if beta is None else float(beta)
    else:
        params["sigma"] = 1.0 if sigma is None else float(sigma)
    sim = simulate(
        mode,
        x0.astype(np.float64),
        steps=n_layers * spl,
        dt=dt / spl,
        save_every=spl,
        return_weights=attention,
        **params,
    )
    x = sim["x"].values  # (S, L+1, T, D)
    attn_vars = {}
    if attention:
        a = sim["attention"].values[:, :, None]  # (S, L+1, 1, T, T)
        a[:, -1] = np.nan
        attn_vars["attention"] = (("sample", "layer", "head", "query", "key"), a)
    states = [torch.from_numpy(x[:, i]) for i in range(x.shape[1])]
    return build_dataset(
        states,
        attn_vars,
        {},
        dict(
            source="simulate_like",
            mode=mode,
            geometry="sphere",
            dt=float(dt),
            steps_per_layer=spl,
            attention_kind={"sa": "softmax", "krause": "krause"}[mode],
            **{k: v for k, v in params.items()},
        ),
    )


# --- preset fit ---------------------------------------------------------------------------------
FIT_METRICS = ("effective_rank", "clusters")


def _curves(ds, eps):
    m = layer_metrics(ds.drop_vars([v for v in ds.data_vars if v != "x"]), eps=eps)
    return np.asarray(m["effective_rank"].values, float), np.asarray(m["clusters"].values, float)


def fit_preset(
    target: xr.Dataset,
    preset: str = "sa",
    *,
    grid=None,
    eps: float = 0.5,
    steps_per_layer: int = 4,
    dt: float = 1.0,
    quick: bool = False,
    progress: bool = False,
    **restrict,
) -> dict:
    """Fit β (preset "sa") or σ (preset "krause") to ``target``'s per-layer curves.

    The simulation starts from target's layer-0 tokens projected to the sphere and runs one unit of
    time per layer. residual(p) = sqrt(mean over layers 1..L of [((r_sim − r)/r_0)² + ((c_sim − c)/T)²]/2)
    with r the effective rank and c the cluster count of the (projected) tokens, r_0 = r at layer 0.
    Returns dict(preset, param ("beta"/"sigma"), value, residual, at_boundary, grid, residuals,
    curves (sim effective rank and clusters at the best value), restrictions).
    """
    if preset not in ("sa", "krause"):
        raise ValueError(f"preset must be 'sa' or 'krause', got {preset!r}")
    grid = np.asarray((QUICK_GRIDS if quick else GRIDS)[preset] if grid is None else grid, dtype=float)
    if grid.ndim != 1 or grid.size == 0 or np.any(grid <= 0):
        raise ValueError("grid must be a non-empty 1-D array of positive values")
    restrict = restrict or restrictions(target)
    L = int(target.sizes["layer"]) - 1
    T = int(target.sizes["token"])
    r_t, c_t = _curves(target, eps)
    x0 = _x0(target)
    key = "beta" if preset == "sa" else "sigma"
    residuals, curves = [], []
    from tqdm.auto import tqdm

    for value in tqdm(grid, desc=f"fit {preset}", disable=not progress, leave=False):
        sim = simulate_like(
            None,
            x0,
            mode=preset,
            n_layers=L,
            dt=dt,
            steps_per_layer=steps_per_layer,
            attention=False,
            **{key: value},
            **restrict,
        )
        r_s, c_s = _curves(sim, eps)
        err = np.concatenate([(r_s[1:] - r_t[1:]) / r_t[0], (c_s[1:] - c_t[1:]) / T])
        residuals.append(float(np.sqrt(np.mean(err**2))))
        curves.append((r_s, c_s))
    best = int(np.nanargmin(residuals))
    return dict(
        preset=preset,
        param=key,
        value=float(grid[best]),
        residual=residuals[best],
        at_boundary=best in (0, len(grid) - 1),
        grid=grid.tolist(),
        residuals=residuals,
        effective_rank=curves[best][0].tolist(),
        clusters=curves[best][1].tolist(),
        restrictions=dict(restrict),
    )


def as_interaction(attn):
    """The ``particles`` Interaction equal to a single-head, bias-free attention module on its input:
    softmax → "sa" with β = 1/√d, Q = W_q, K = W_k; Krause → "krause" with σ, Q, K; V = W_o W_v (so
    v_i = Σ_j a_ij V x_j is the module's output), with its causal/window/top-k restrictions.

    The model's LayerNorm is not part of it (apply it to x first). A patch grid, biases or several
    heads have no counterpart in the kernel family: ValueError.
    """
    from particles import make_interaction

    kind = getattr(attn, "kind", None)
    if kind not in ("softmax", "krause"):
        raise ValueError(f"attn: needs a softmax or Krause attention module, got {kind!r}")
    if attn.n_heads != 1 or attn.grid is not None:
        raise ValueError("attn: only a single head without grid locality maps onto the kernel family")
    if any(p.bias is not None for p in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj)):
        raise ValueError("attn: projections with biases do not map onto the kernel family (Q x, K x, V x)")
    w = {n: getattr(attn, f"{n}_proj").weight.detach().double().cpu().numpy() for n in "qkvo"}
    params = dict(
        Q=w["q"], K=w["k"], V=w["o"] @ w["v"], causal=attn.causal, window=attn.window, top_k=attn.top_k
    )
    if kind == "softmax":
        return make_interaction("sa", beta=float(attn.beta), **params)
    return make_interaction("krause", sigma=float(attn.sigma[0]), **params)
