"""Hegselmann–Krause opinion dynamics: the 2R conjecture (docs/maths.md)."""

from __future__ import annotations

import numpy as np
import xarray as xr

from analysis import cluster_sizes, count_clusters
from analysis.figures._common import COLORS, new_figure, run_sweep, save
from analysis.figures._registry import register
from analysis.sweep import register_metric
from particles import simulate

#: HK clusters are exact (finite-time convergence): opinions closer than this are one cluster
HK_EPS = 1e-6
#: a "major" cluster holds at least this fraction of the opinions
MAJOR = 0.01


def final_major_clusters(ds, eps=HK_EPS, fraction=MAJOR):
    """Number of clusters at the final time holding at least ``fraction`` of the particles."""
    sizes = np.asarray(cluster_sizes(ds["x"].isel(time=-1).values, eps=eps))
    return int(np.sum(sizes >= fraction * ds.sizes["particle"]))


def final_movement(ds):
    """max_i |x_i(T) − x_i(T − save)|: 0 once the HK map has converged."""
    x = ds["x"].values
    return float(np.abs(x[-1] - x[-2]).max()) if len(x) > 1 else np.nan


register_metric("figures_final_major_clusters", final_major_clusters,
                description="clusters holding >= fraction of the particles at the final time",
                eps=HK_EPS, fraction=MAJOR)
register_metric("figures_final_movement", final_movement, description="largest move over the last saved step")


@register()
def make_hk_2r(quick=False, out=None, progress=True) -> xr.Dataset:
    """Hegselmann–Krause: final number of opinion clusters vs 1/R against the 1/(2R) rule, and the
    classic opinion-vs-time plot."""
    n = 300 if quick else 1000
    if quick:
        inv_r, seeds, steps = [2.0, 5.0, 10.0, 20.0], 2, 20
    else:
        inv_r = [2.0, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0, 13.0, 16.0, 20.0, 25.0, 32.0, 40.0, 50.0]
        seeds, steps = 10, 100
    radii = [1.0 / v for v in inv_r]
    sw = run_sweep("hk", {"radius": radii}, seeds=seeds, steps=steps, dt=1.0, n=n, d=1, save_every=1,
                   metrics={"final_clusters": {"eps": HK_EPS}, "figures_final_major_clusters": {},
                            "figures_final_movement": {}}, progress=progress)
    sw = sw.assign_coords(inv_radius=("radius", inv_r)).swap_dims(radius="inv_radius")
    demo_r, demo_steps = 0.05, 20
    demo = simulate("hk", n=n, d=1, steps=demo_steps, dt=1.0, radius=demo_r, seed=0)
    order = np.argsort(demo["x"].isel(time=0, component=0).values)[:: 4 if not quick else 8]
    paths = demo["x"].isel(component=0, particle=order).drop_vars("step")
    ds = xr.Dataset({
        "clusters": sw["final_clusters"], "major_clusters": sw["figures_final_major_clusters"],
        "clusters_mean": sw["final_clusters"].mean("seed"),
        "clusters_sd": sw["final_clusters"].std("seed", ddof=1),
        "major_mean": sw["figures_final_major_clusters"].mean("seed"),
        "major_sd": sw["figures_final_major_clusters"].std("seed", ddof=1),
        "reference_1_over_2R": ("inv_radius", np.asarray(inv_r) / 2),
        "final_movement": sw["figures_final_movement"],
        "opinions": paths.rename(particle="shown_particle"),
    })
    # the demo's final clusters, counted from the data: among all n opinions, those holding >= MAJOR of
    # them, and those that contain a drawn opinion (the left panel shows every 4th / 8th opinion only)
    demo_sizes = np.asarray(cluster_sizes(demo["x"].isel(time=-1).values, eps=HK_EPS))
    demo_sizes = demo_sizes[demo_sizes > 0]
    shown_clusters = int(count_clusters(paths.isel(time=-1).values[:, None], eps=HK_EPS))
    ds.attrs.update(n=n, steps=steps, seeds=seeds, eps=HK_EPS, major_fraction=MAJOR, demo_radius=demo_r,
                    demo_clusters=len(demo_sizes), demo_major_clusters=int(np.sum(demo_sizes >= MAJOR * n)),
                    demo_shown_clusters=shown_clusters)

    fig, (a, b) = new_figure(2, size=(13, 5))
    t = paths["time"].values
    colours = paths.isel(time=0).values
    import matplotlib.pyplot as plt

    cmap = plt.get_cmap("viridis")
    for k in range(paths.sizes["particle"]):
        a.plot(t, paths.isel(particle=k).values, color=cmap(colours[k]), lw=0.5, alpha=0.7)
    a.set(xlabel="step t (synchronous HK map)", ylabel="opinion x_i(t)",
          title=f"opinions vs time, R = {demo_r:g}, n = {n} ({len(order)} shown): "
                f"{shown_clusters} clusters shown")
    x = ds["inv_radius"].values
    b.errorbar(x, ds["clusters_mean"], yerr=ds["clusters_sd"], fmt="o-", color=COLORS[0], capsize=3,
               label=f"all clusters (mean ± sd, {seeds} seeds)")
    b.errorbar(x, ds["major_mean"], yerr=ds["major_sd"], fmt="s--", color=COLORS[1], capsize=3, ms=4,
               label=f"clusters with ≥ {MAJOR:.0%} of the opinions")
    b.plot(x, x / 2, color="k", ls=":", label="1/(2R)")
    b.set(xlabel="1/R", ylabel="final number of clusters", title=f"final clusters after {steps} steps vs 1/R")
    b.legend(fontsize=8)
    ratio = ds["clusters_mean"] / ds["reference_1_over_2R"]
    small = ratio.sel(inv_radius=x[x >= 10]) if np.any(x >= 10) else ratio
    still = int((ds["final_movement"] > 0).sum())
    consensus = x[(ds["clusters"] == 1).all("seed").values]
    consensus = f"every run reaches consensus for R ≥ {1 / consensus.max():.2g}; " if len(consensus) else ""
    caption = (f"Hegselmann–Krause x_i ← mean{{x_j : |x_j − x_i| ≤ R}}, n = {n} opinions uniform on [0, 1]. "
               f"Left: finite-time convergence to separated clusters; at R = {demo_r:g} the {n} opinions end "
               f"in {len(demo_sizes)} clusters, {ds.attrs['demo_major_clusters']} of them holding "
               f"≥ {MAJOR:.0%} of the opinions, {shown_clusters} containing a drawn opinion. "
               f"Right: the final count grows linearly "
               f"in 1/R but below the 1/(2R) line: count·2R = {float(small.min()):.2f}–"
               f"{float(small.max()):.2f} for 1/R ≥ 10 (cluster spacing ≈ {1 / float(small.mean()):.1f}·2R "
               f"> 2R); {consensus}"
               f"runs not yet frozen at the last step: {still} of {ds['final_movement'].size}.")
    return save(fig, ds, "hk_2r", out, "Hegselmann–Krause opinion clusters and the 2R conjecture", caption)
