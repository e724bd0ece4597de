"""From the run store to one data file per experiment, and the tables read from it.

:func:`collect` gathers every finished run of an experiment into a Dataset over (variant, seed):
the per-layer summaries of :func:`~analysis.findings.measure.summarise`, the raw per-(layer, head,
query) first-token weights (so other thresholds or row restrictions can be computed later without
the models), the test metric, the training-loss curve, the training probes (α₀ during training) and,
where computed, the trained-vs-simulated distances (``w_distance`` over series × layer, the
simulated cluster counts ``sim_clusters``, the matched dt and the preset fits).
``python -m analysis.findings.collect ROOT OUTDIR`` writes ``OUTDIR/<experiment>.nc`` for each.

:func:`curves` gives mean and 95 % t-interval over seeds; :func:`effect_rows` the factorial effects
of the ablation's components on a scalar response.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import xarray as xr

from particles.conventions import decode, encode

from . import stats
from .measure import summarise
from .runs import load_runs

#: test metric per task (name in the card, short label)
TEST_METRIC = {
    "digits-vit": ("test_accuracy", "test accuracy"),
    "text-bos": ("test_bits_per_char", "bits/char"),
    "recall": ("test_accuracy", "accuracy"),
    "backcopy": ("test_bits_per_token", "bits/token"),
}
RECALL_METRICS = ("test_accuracy", "accuracy_inside_window", "accuracy_outside_window")
DISTANCE_SCALARS = (
    "matched_dt",
    "first_block_angle",
    "sa_beta",
    "sa_residual",
    "sa_at_boundary",
    "krause_sigma",
    "krause_residual",
    "krause_at_boundary",
)
RAW = ("a0", "a0_uniform", "entropy", "key_mass", "reaches_output", "support_size")


def _stack(rows: list, key, fill=np.nan) -> np.ndarray:
    width = max((len(r) for r in rows if r is not None), default=0)
    out = np.full((len(rows), width), fill, dtype=float)
    for i, r in enumerate(rows):
        if r is not None:
            out[i, : len(r)] = r
    return out


def collect(root, experiment: str) -> xr.Dataset:
    """Dataset over (variant, seed) of every finished run of ``experiment`` in the store ``root``."""
    runs = load_runs(root, experiment)
    if not runs:
        raise FileNotFoundError(f"no finished runs of {experiment!r} under {root}")
    variants = list(dict.fromkeys(r["card"]["run"]["variant"] for r in runs))
    seeds = sorted({r["card"]["seed"] for r in runs})
    index = {(r["card"]["run"]["variant"], r["card"]["seed"]): r for r in runs}
    task = runs[0]["card"]["task"]
    parts = []
    for v in variants:
        row = []
        for s in seeds:
            r = index.get((v, s))
            row.append(_one(r) if r is not None else None)
        template = next(x for x in row if x is not None)
        row = [x if x is not None else xr.full_like(template, np.nan) for x in row]
        parts.append(xr.concat(row, "seed", join="outer"))
    ds = xr.concat(parts, "variant", join="outer").assign_coords(variant=variants, seed=seeds)
    ds.attrs.update(
        experiment=experiment,
        task=task,
        n_runs=len(runs),
        definition="per-run measurements on held-out inputs; see analysis.findings.measure",
    )
    spec = {
        v: str(index[next(k for k in index if k[0] == v)]["card"]["config"]["attention"]) for v in variants
    }
    ds["attention_spec"] = ("variant", [spec[v] for v in variants])
    return ds


def _one(r) -> xr.Dataset:
    card, meas = r["card"], r["measure"]
    out = xr.Dataset()
    if meas is not None:
        out = summarise(meas)
        out.attrs = {}
        for name in RAW:
            out[name] = meas[name].astype(float)
        out.attrs["n_inputs"] = int(meas.attrs["n_inputs"])
    m = card["metrics"]
    for k, v in m.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out[k] = float(v)
    out["train_time_s"] = float(card["train_time_s"])
    out["lr"] = float(card["lr"])
    out["steps"] = float(card["steps"])
    curve = card.get("train_loss_curve") or []
    out["train_loss"] = ("loss_step", np.asarray(curve, float))
    out = out.assign_coords(loss_step=np.asarray(card.get("train_loss_steps") or [], float))
    dist = r["path"] / "distances.nc"
    if dist.exists():
        with xr.open_dataset(dist) as d:
            d = decode(d.load())
        out["w_distance"] = d["distance"]
        out["w_distance_se"] = d["distance_se"]
        out["sim_clusters"] = d["clusters"]
        for k in DISTANCE_SCALARS:
            out[k] = float(d[k])
    probes = card.get("probes")
    if probes:
        steps = np.array([p["step"] for p in probes], float)
        for k in (k for k in probes[0] if k != "step"):  # every per-layer number of the probe
            out[f"probe_{k}"] = (("probe_step", "attn_layer"), np.array([p[k] for p in probes], float))
        out = out.assign_coords(probe_step=steps)
    return out


def curves(da: xr.DataArray, level: float = 0.95) -> xr.Dataset:
    """Mean, 95 % t-interval half-width and n over the "seed" axis of ``da``."""
    axis = da.dims.index("seed")
    mean, half, n = stats.mean_ci(da.values, axis=axis, level=level)
    dims = tuple(d for d in da.dims if d != "seed")
    coords = {k: v for k, v in da.coords.items() if "seed" not in v.dims}
    return xr.Dataset({"mean": (dims, mean), "ci": (dims, half), "n": (dims, n)}, coords=coords)


def cell_factors(variant: str) -> tuple[bool, bool, bool]:
    """(RBF score, locality, top-k) of an ablation cell name such as "rbf+grid" or "dot+window+topk"."""
    parts = variant.split("+")
    if parts[0] not in ("dot", "rbf"):
        raise ValueError(f"variant: not an ablation cell name: {variant!r}")
    return parts[0] == "rbf", ("grid" in parts or "window" in parts), "topk" in parts


def effect_rows(values: xr.DataArray, *, topk: bool | None = None) -> list[dict]:
    """Factorial effects of (score, locality[, top-k]) on a scalar response over (variant, seed).

    topk None: the 2 × 2 × 2 design; True/False: the 2 × 2 (score × locality) at that top-k level.
    Each row: effect name, estimate, 95 % CI half-width, Welch dof, and the cell means."""
    cells = {}
    for v in values["variant"].values:
        rbf, local, k = cell_factors(str(v))
        key = (rbf, local, k) if topk is None else (rbf, local)
        if topk is not None and k != topk:
            continue
        cells[key] = values.sel(variant=v).values
    factors = ("score", "locality", "top-k") if topk is None else ("score", "locality")
    return stats.effects(cells, factors)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="collect finished runs into one .nc per experiment")
    ap.add_argument("root")
    ap.add_argument("out")
    ap.add_argument(
        "--experiments", nargs="+", default=["vit-ablation", "causal-ablation", "sink-long", "recall"]
    )
    ap.add_argument(
        "--keep-other-variants",
        action="store_true",
        help="keep the variants of an existing OUTDIR/<experiment>.nc that the store does not hold "
        "(runs collected from an earlier store); default: off (the file is the store's runs only)",
    )
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for exp in args.experiments:
        try:
            ds = collect(args.root, exp)
        except FileNotFoundError as err:
            print(err)
            continue
        path = out / f"{exp}.nc"
        if args.keep_other_variants and path.exists():
            with xr.open_dataset(path) as old:
                ds = merge_variants(decode(old.load()), ds)
        tmp = path.with_name(f".{path.name}.tmp")
        encode(ds).to_netcdf(tmp)
        tmp.replace(path)
        print(f"{exp}: {ds.attrs['n_runs']} runs -> {path}")
    return 0


def merge_variants(old: xr.Dataset, new: xr.Dataset) -> xr.Dataset:
    """``new`` plus the variants of ``old`` that ``new`` lacks (old ones first, in their order); a
    variant in both is taken from ``new``. Seeds and per-run axes are joined (missing → NaN)."""
    kept = [v for v in old["variant"].values if v not in set(new["variant"].values)]
    if not kept:
        return new
    merged = xr.concat([old.sel(variant=kept), new], "variant", join="outer", data_vars="all",
                       coords="different", compat="equals", combine_attrs="override")
    merged.attrs = dict(new.attrs, n_runs=int(old.sel(variant=kept)["steps"].notnull().sum())
                        + int(new.attrs["n_runs"]))
    return merged


if __name__ == "__main__":
    sys.exit(main())


def interventions(root, experiment: str = "vit-ablation", cells=None, n: int = 256) -> xr.Dataset:
    """Which attention rows reach the ViT's prediction, measured: max |Δ logits| over ``n`` held-out
    images when one block's rows are set to uniform weights over their support
    (:func:`~analysis.findings.measure.uniform_rows_effect`) — the last block's patch rows, its CLS
    row, and the previous block's patch rows — for every finished run of ``cells``."""
    import torch

    from particles.nn import load_checkpoint

    from .measure import uniform_rows_effect
    from .runs import held_out

    x = held_out("digits-vit", n)
    cases = ("last block, patch rows", "last block, CLS row", "block L-1, patch rows")
    runs = [r for r in load_runs(root, experiment) if cells is None or r["card"]["run"]["variant"] in cells]
    variants = list(dict.fromkeys(r["card"]["run"]["variant"] for r in runs))
    seeds = sorted({r["card"]["seed"] for r in runs})
    out = np.full((len(variants), len(seeds), len(cases)), np.nan)
    with torch.no_grad():
        for r in runs:
            model = load_checkpoint(r["path"] / "model")
            L, T = len(model.blocks), model.embed(x[:1]).shape[1]
            patches = list(range(1, T))
            vals = (
                uniform_rows_effect(model, x, L - 1, patches),
                uniform_rows_effect(model, x, L - 1, [0]),
                uniform_rows_effect(model, x, L - 2, patches),
            )
            out[variants.index(r["card"]["run"]["variant"]), seeds.index(r["card"]["seed"])] = vals
    return xr.Dataset(
        {"max_abs_logit_change": (("variant", "seed", "case"), out)},
        coords={"variant": variants, "seed": seeds, "case": list(cases)},
        attrs=dict(n_inputs=int(len(x)), definition=interventions.__doc__.split("\n\n")[0]),
    )
