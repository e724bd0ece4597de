"""Phase diagrams over (parameter, time): SA over β, Krause over σ and over top-k (Geshkovski,
Letrouit, Polyanskiy, Rigollet, "A mathematical perspective on Transformers", arXiv 2312.10794)."""

from __future__ import annotations

import numpy as np
import xarray as xr

from analysis.figures._common import new_figure, save
from analysis.figures._registry import register
from analysis.phase import phase_diagram

EPS = 1e-3  # pairs with ⟨u_i, u_j⟩ > 1 − EPS count as close (the paper's 0.999)


@register()
def make_phase_diagram(quick=False, out=None, progress=True) -> xr.Dataset:
    """Phase diagrams on the circle (d = 2, n = 32, an ensemble per row): fraction of close pairs
    over (β, t) for SA, over (σ, t) and over (top-k, t) for Krause, with the median cluster count."""
    if quick:
        samples, T, n = 128, 10.0, 16
        betas, sigmas, top_ks = [0.0, 1.0, 4.0, 9.0], [0.2, 0.5, 1.0], [1, 4, 16]
    else:  # the top-k rows run the per-sample range kernel (no vectorisation over samples): fewer
        samples, T, n = 2048, 30.0, 32
        betas = np.linspace(0.0, 9.0, 10).tolist()
        sigmas = np.geomspace(0.15, 1.5, 8).round(3).tolist()
        top_ks = [1, 2, 4, 8, 16, 32]
    dt, d = 0.1, 2
    times = np.arange(0.0, T + 1e-9, 1.0 if not quick else 2.0)
    common = dict(n=n, d=d, samples=samples, times=times, dt=dt, eps=EPS, progress=progress)
    sa = phase_diagram("sa", {"beta": betas}, **common)
    kr = phase_diagram("krause", {"sigma": sigmas}, **common)
    tk = phase_diagram("krause", {"top_k": top_ks}, sigma=1.0, **{**common, "samples": samples // 4})
    ds = xr.Dataset({
        "sa_close_pairs": sa["close_pairs"], "sa_median_clusters": sa["median_clusters"],
        "sa_cluster_fraction": sa["cluster_fraction"],
        "krause_sigma_close_pairs": kr["close_pairs"], "krause_sigma_median_clusters": kr["median_clusters"],
        "krause_topk_close_pairs": tk["close_pairs"], "krause_topk_median_clusters": tk["median_clusters"],
    })
    ds.attrs.update(n=n, d=d, samples=samples, topk_samples=samples // 4, dt=dt, T=T, eps=EPS,
                    cluster_eps=sa.attrs["cluster_eps"], topk_sigma=1.0, integrator="euler")

    fig, axes = new_figure(3, size=(17, 5.4))
    panels = ((sa, "beta", "β (softmax inverse temperature)", "SA: close pairs over (β, t)"),
              (kr, "sigma", "σ (RBF width)", "Krause: close pairs over (σ, t)"),
              (tk, "top_k", "top-k (keys kept per query), σ = 1", "Krause: close pairs over (top-k, t)"))
    for ax, (part, name, label, title) in zip(axes, panels):
        values = np.arange(part.sizes[name])
        mesh = ax.pcolormesh(part["time"].values, values, part["close_pairs"].values, cmap="RdBu_r",
                             vmin=0.0, vmax=1.0, shading="nearest", rasterized=True)
        ax.contour(part["time"].values, values, part["median_clusters"].values, levels=[1.5, 2.5],
                   colors=["k", "0.4"], linewidths=1.0, linestyles=["-", "--"])
        ax.set_yticks(values[:: max(1, len(values) // 10)],
                      [f"{v:g}" for v in part[name].values[:: max(1, len(values) // 10)]])
        ax.set(xlabel="time t", ylabel=label, title=title)
        fig.colorbar(mesh, ax=ax, label=f"fraction of pairs with ⟨u_i, u_j⟩ > 1 − {EPS:g}")

    def final(part, name, value):
        row = part.sel({name: value}).isel(time=-1)
        return f"{float(row['close_pairs']):.2f} (median {float(row['median_clusters']):g} clusters)"

    b0, b1, s0, s1 = betas[0], betas[-1], sigmas[0], sigmas[-1]
    frozen = [k for k in top_ks if float(tk["close_pairs"].sel(top_k=k).isel(time=-1))
              == float(tk["close_pairs"].sel(top_k=k).isel(time=0))]
    caption = (
        f"{samples} systems ({samples // 4} for top-k) of n = {n} particles uniform on the circle S¹ per row "
        f"(the same initial states in every row), Euler dt = {dt}, Q = K = V = I. Colour: fraction of pairs "
        f"i ≠ j with ⟨u_i, u_j⟩ > 1 − {EPS:g}; black line: median cluster count 1.5 (one cluster to its "
        f"right), dashed: 2.5. At t = {T:g} the fraction is {final(sa, 'beta', b0)} for SA at β = {b0:g} and "
        f"{final(sa, 'beta', b1)} at β = {b1:g}; Krause {final(kr, 'sigma', s0)} at σ = {s0:g} and "
        f"{final(kr, 'sigma', s1)} at σ = {s1:g}; with top-k (σ = 1) {final(tk, 'top_k', top_ks[0])} at "
        f"k = {top_ks[0]} and {final(tk, 'top_k', top_ks[-1])} at k = {top_ks[-1]}"
        + (f" (k = {', '.join(map(str, frozen))}: no pair changed — a particle's largest score is its own "
           "s_ii = 0, so k = 1 keeps only itself)." if frozen else "."))
    return save(fig, ds, "phase_diagram", out, "Clustering phase diagrams over (parameter, time)", caption)

