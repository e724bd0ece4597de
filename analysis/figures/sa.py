"""Softmax self-attention (SA) on the sphere: collapse, metastability, energy staircase, and SA vs
Krause (Geshkovski, Letrouit, Polyanskiy, Rigollet, arXiv 2312.10794)."""

from __future__ import annotations

import numpy as np
import xarray as xr
from scipy.special import ive

from analysis import count_clusters, effective_rank, normalised_energy
from analysis.figures._common import (
    COLORS,
    compare_runs,
    log_frames,
    new_figure,
    on_circle,
    run_sweep,
    save,
)
from analysis.figures._registry import register
from particles import simulate


# ------------------------------------------------------------------------------------------ sa_sphere
def _sphere_wire(ax):
    u, v = np.meshgrid(np.linspace(0, 2 * np.pi, 25), np.linspace(0, np.pi, 13))
    ax.plot_wireframe(np.cos(u) * np.sin(v), np.sin(u) * np.sin(v), np.cos(v), color="0.85", lw=0.4)
    ax.set_box_aspect((1, 1, 1))
    ax.set(xlim=(-1, 1), ylim=(-1, 1), zlim=(-1, 1), xticks=[], yticks=[], zticks=[])


@register()
def make_sa_sphere(quick=False, out=None, progress=True) -> xr.Dataset:
    """SA on S²: snapshots of the particles at several times; they collapse to one cluster."""
    n, beta, dt, T, eps = (64 if quick else 200), 1.0, 0.1, 20.0, 0.1
    snaps = [0.0, 3.0, 6.0, 8.0, 10.0, 20.0]
    traj = simulate("sa", n=n, d=3, steps=int(round(T / dt)), dt=dt, beta=beta, seed=0, save_every=1,
               progress=progress)
    x = traj["x"].drop_vars("step")
    counts = count_clusters(x, eps=eps)
    from analysis import mean_cosine

    ds = xr.Dataset({"x_snapshots": x.sel(time=snaps, method="nearest").rename(time="snapshot_time"),
                     "cluster_count": counts, "mean_cosine": mean_cosine(x)})
    ds.attrs.update(n=n, beta=beta, dt=dt, eps=eps, seed=0)

    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(15, 7.6))
    grid = fig.add_gridspec(2, 4, width_ratios=(1, 1, 1, 1.25))
    colour = x.isel(time=0).values[:, 2]
    centre = x.isel(time=-1).values.mean(axis=0)  # face the final cluster
    elev, azim = np.degrees(np.arcsin(np.clip(centre[2] / np.linalg.norm(centre), -1, 1))), \
        np.degrees(np.arctan2(centre[1], centre[0]))
    for i, t in enumerate(snaps):
        ax = fig.add_subplot(grid[i // 3, i % 3], projection="3d")
        _sphere_wire(ax)
        p = ds["x_snapshots"].isel(snapshot_time=i).values
        front = p @ (centre / np.linalg.norm(centre)) > 0
        for part, alpha in ((~front, 0.2), (front, 1.0)):
            ax.scatter(*p[part].T, c=colour[part], cmap="viridis", vmin=-1, vmax=1, s=12, alpha=alpha,
                       depthshade=False)
        ax.set_title(f"t = {t:g}: {int(counts.sel(time=t, method='nearest'))} cluster(s)", fontsize=10)
        ax.view_init(elev=elev, azim=azim)
    ax = fig.add_subplot(grid[:, 3])
    times = x["time"].values
    ax.plot(times, counts, color=COLORS[0], label=f"clusters (ε-graph, ε = {eps})")
    ax.set(yscale="log", xlabel="time t", ylabel="cluster count", title="clusters and mean cosine")
    for t in snaps:
        ax.axvline(t, color="0.8", lw=0.8, zorder=0)
    ax2 = ax.twinx()
    ax2.plot(times, ds["mean_cosine"], color=COLORS[1], label="mean cosine")
    ax2.set(ylabel="mean cosine", ylim=(-0.05, 1.05))
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    # after the collapse the count sits at 1 (bottom) and the cosine at 1 (top): the band between is empty
    ax2.legend(h1 + h2, l1 + l2, fontsize=8, loc="center right", bbox_to_anchor=(1.0, 0.62))
    t1 = float(counts["time"].where(counts == 1).min())
    caption = (f"Softmax self-attention dynamics (SA, Q=K=V=I, β = {beta:g}) on S², n = {n} particles drawn "
               f"uniformly, Euler dt = {dt}; colour = initial height z; the view faces the final cluster "
               f"(far side faded). The cloud contracts (stragglers join last) into a single cluster from "
               f"t ≈ {t1:g} on; the mean cosine rises to 1 (Geshkovski et al. 2023).")
    return save(fig, ds, "sa_sphere", out, "Softmax attention on the sphere S² collapses to one cluster",
                caption)


# ----------------------------------------------------------------------------------- metastability
def k_star(beta, kmax: int = 200) -> int:
    """Linear-stability prediction for the number of clusters that first form from the uniform
    state on the circle: argmax_k k²·I_k(β) (I_k: modified Bessel function; the growth rate of
    Fourier mode k is k² I_k(β) / (β I_0(β))). ``ive`` avoids overflow; the argmax is the same."""
    k = np.arange(1, kmax + 1)
    return int(k[np.argmax(k**2 * ive(k, float(beta)))])


def perturbed_grid(n: int, seed: int, jitter: float = 0.1) -> np.ndarray:
    """n points on S¹ at angles 2πi/n + jitter·(2π/n)·ξ_i, ξ standard normal, with a random rotation."""
    rng = np.random.default_rng([seed, 2])
    theta = 2 * np.pi * (np.arange(n) + jitter * rng.standard_normal(n)) / n + rng.uniform(0, 2 * np.pi)
    return on_circle(theta)


def first_plateau(counts: np.ndarray, times: np.ndarray, n: int) -> float:
    """The first cluster count (below n/2) that stays unchanged from some time t to time 2t; NaN if none."""
    for i, t in enumerate(times):
        if t <= 0 or counts[i] >= n / 2:
            continue
        j = np.searchsorted(times, 2 * t, side="right")
        if times[j - 1] < 2 * t * 0.999:
            break
        if np.all(counts[i:j] == counts[i]):
            return float(counts[i])
    return np.nan


def _count_curves(betas, *, n, seeds, T, dt, eps, save_every, progress):
    ds = run_sweep("sa", {"beta": list(betas)}, seeds=seeds, steps=int(round(T / dt)), dt=dt,
                   save_every=save_every, metrics={"cluster_count_curve": {"eps": eps}},
                   x0=lambda s: perturbed_grid(n, s), progress=progress)
    return ds["cluster_count_curve"]


@register()
def make_metastability(quick=False, out=None, progress=True) -> xr.Dataset:
    """SA on the circle from a near-uniform start: long multi-cluster plateaus; first plateau count
    vs β against the linear-stability prediction k*(β) = argmax_k k² I_k(β) ≈ √(2β)."""
    if quick:
        n, seeds, T, betas, extra = 48, 3, 40.0, [4.0, 16.0], []
    else:
        n, seeds, T, betas, extra = 200, 10, 400.0, [4.0, 9.0, 16.0, 25.0, 36.0], \
            [2.0, 6.0, 12.0, 20.0, 30.0, 49.0]
    dt, save_every, eps = 0.1, 10, 0.02
    curves = _count_curves(betas, n=n, seeds=seeds, T=T, dt=dt, eps=eps, save_every=save_every,
                           progress=progress)
    times = curves["time"].values
    plateau = xr.apply_ufunc(first_plateau, curves, input_core_dims=[["time"]], vectorize=True,
                             kwargs={"times": times, "n": n})
    if extra:
        short = _count_curves(extra, n=n, seeds=seeds, T=min(T, 120.0), dt=dt, eps=eps,
                              save_every=save_every, progress=progress)
        p2 = xr.apply_ufunc(first_plateau, short, input_core_dims=[["time"]], vectorize=True,
                            kwargs={"times": short["time"].values, "n": n})
        plateau = xr.concat([plateau, p2], "beta").sortby("beta")
    plateau = plateau.rename(beta="beta_plateau")
    beta_fine = np.linspace(1.0, plateau["beta_plateau"].values.max() * 1.05, 300)
    ds = xr.Dataset({
        "count": curves, "count_mean": curves.mean("seed"), "count_sd": curves.std("seed", ddof=1),
        "plateau_count": plateau,
        "plateau_mean": plateau.mean("seed"), "plateau_sd": plateau.std("seed", ddof=1),
        "k_star": ("beta_plateau", [k_star(b) for b in plateau["beta_plateau"].values]),
        "k_star_curve": ("beta_fine", [k_star(b) for b in beta_fine]),
        "sqrt_2beta": ("beta_fine", np.sqrt(2 * beta_fine)),
    }, coords={"beta_fine": beta_fine})
    ds.attrs.update(n=n, seeds=seeds, dt=dt, T=T, eps=eps, jitter=0.1)

    fig, (a, b) = new_figure(2, size=(13, 5))
    cm = ds["count_mean"]
    for c, beta in zip(COLORS, cm["beta"].values):
        m, s = cm.sel(beta=beta).values, ds["count_sd"].sel(beta=beta).values
        keep = times > 0
        a.plot(times[keep], m[keep], color=c, lw=1.8, label=f"β = {beta:g}  (k* = {k_star(beta)})")
        a.fill_between(times[keep], np.maximum(m - s, 0.8)[keep], (m + s)[keep], color=c, alpha=0.2)
        a.plot(times[keep], curves.sel(beta=beta).isel(seed=0).values[keep], color=c, lw=0.8, ls="--")
        a.axhline(k_star(beta), color=c, ls=":", lw=1)
    a.plot([], [], color="0.4", ls="--", lw=0.8, label="one seed (same colour)")
    a.plot([], [], color="0.4", ls=":", lw=1, label="k*(β) (same colour)")
    a.set(xscale="log", yscale="log", xlabel="time t", ylabel=f"cluster count (ε-graph, ε = {eps})",
          title=f"cluster count vs time, n = {n}, mean ± sd over {seeds} seeds")
    top = min(n * 1.3, 5 * max(k_star(b) for b in betas))
    a.set_ylim(0.9, top)
    a.set_xlim(3, T * 1.05)
    ticks = [t for t in (1, 2, 3, 4, 5, 6, 8, 10, 15, 20, 30, 40, 60, 100, 200) if t <= top]
    a.set_yticks(ticks, [str(t) for t in ticks])
    a.minorticks_off()
    a.legend(fontsize=7.5, loc="upper right", ncol=2)
    if top < n:
        a.text(0.02, 0.02, f"(before clusters form the count is up to n = {n}, off the top)",
               transform=a.transAxes, ha="left", va="bottom", fontsize=8)

    b.plot(beta_fine, ds["k_star_curve"], color="k", lw=1.5, drawstyle="steps-post",
           label="k*(β) = argmax_k k² I_k(β)")
    b.plot(beta_fine, ds["sqrt_2beta"], color="0.5", ls="--", label="√(2β)")
    pb = ds["beta_plateau"].values
    b.errorbar(pb, ds["plateau_mean"], yerr=ds["plateau_sd"], fmt="o", color=COLORS[3], capsize=3,
               label=f"simulated first plateau (mean ± sd, {seeds} seeds)")
    b.set(xlabel="β", ylabel="number of clusters", title="first plateau count vs β")
    b.legend(fontsize=8, loc="upper left")
    rows = ", ".join(f"β={bb:g}: {m:.1f} vs {k_star(bb)}" for bb, m in zip(pb, ds["plateau_mean"].values))
    caption = (f"SA (Q=K=V=I) on S¹, n = {n} particles on a uniform grid perturbed by 10% of the spacing, "
               f"Euler dt = {dt}. Left: clusters form after t ≈ 10 and then sit on long plateaus "
               f"(log time) before rare merges. Right: first plateau count (first count unchanged from t to "
               f"2t) vs the linear-stability prediction; {rows}.")
    return save(fig, ds, "metastability", out, "Metastability of softmax attention dynamics on the circle",
                caption)


# ---------------------------------------------------------------------------------- energy_staircase
def satellite_start(masses, polar, seed: int = 0, spread: float = 0.01) -> np.ndarray:
    """A heavy cluster at the north pole and satellite clusters at the given polar angles, at
    azimuths 90° apart (so satellites mostly interact with the heavy cluster, not each other)."""
    rng = np.random.default_rng(seed)
    pts = []
    for k, (m, p) in enumerate(zip(masses, polar)):
        a = (k - 1) * np.pi / 2
        centre = np.array([np.sin(p) * np.cos(a), np.sin(p) * np.sin(a), np.cos(p)])
        pts.append(centre + spread * rng.standard_normal((m, 3)))
    x = np.concatenate(pts)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _plateaus(sizes: xr.DataArray, n: int, times) -> list[tuple[float, float, tuple]]:
    """(start time, Σ m_a²/n², sizes) of each new partition along the trajectory."""
    out, last = [], None
    for t, row in zip(times, sizes.values):
        m = tuple(int(v) for v in row if v > 0)
        if m != last:
            out.append((float(t), float(np.sum(np.square(m))) / n**2, m))
            last = m
    return out


@register()
def make_energy_staircase(quick=False, out=None, progress=True) -> xr.Dataset:
    """Normalised interaction energy of SA at large β from well-separated clusters: a staircase whose
    plateaus sit at Σ_a m_a²/n² for the current cluster sizes m_a."""
    from analysis import cluster_sizes

    beta, dt, eps = 15.0, 0.2, 0.05
    T = 60.0 if quick else 3000.0
    masses, polar = (40, 10, 10, 10, 10), (0.0, 0.7, 1.0, 1.2, 1.3)
    x0 = satellite_start(masses, polar)
    n = len(x0)
    traj = simulate("sa", x0, steps=int(round(T / dt)), dt=dt, beta=beta, save_every=1, progress=progress)
    x = traj["x"].drop_vars("step")
    x = x.isel(time=log_frames(x["time"].values, 400))
    energy = normalised_energy(x, beta)
    counts = count_clusters(x, eps=eps)
    sizes = cluster_sizes(x, eps=eps)
    steps = _plateaus(sizes, n, x["time"].values)
    ds = xr.Dataset({"energy": energy, "cluster_count": counts, "cluster_sizes": sizes,
                     "reference_level": ("plateau", [s[1] for s in steps]),
                     "plateau_start": ("plateau", [s[0] for s in steps])})
    ds.attrs.update(beta=beta, dt=dt, eps=eps, n=n, masses=list(masses), polar_angles=list(polar))

    fig, (a, b) = new_figure(2, size=(13, 5), gridspec_kw={"width_ratios": (1.6, 1)})
    t = x["time"].values
    keep = t > 0
    a.plot(t[keep], energy[keep], color=COLORS[0], lw=2, label="(1/(n² e^β)) Σ_ij exp(β⟨x_i, x_j⟩)")
    for k, (_, level, m) in enumerate(steps):
        a.axhline(level, color=COLORS[1 + k % 6], ls="--", lw=1,
                  label=f"Σ m_a²/n² = {level:.3f}, sizes {m}" if len(m) > 1 else f"one cluster: {level:.0f}")
    a.set(xscale="log", xlabel="time t", ylabel="normalised energy", ylim=(0, 1.05),
          title=f"energy vs time (SA, β = {beta:g}, n = {n})")
    a.legend(fontsize=7.5, loc="lower right", ncol=2)  # under the lowest level Σ m_a²/n²: no data there
    b.plot(t[keep], counts[keep], color=COLORS[0], drawstyle="steps-post")
    b.set(xscale="log", xlabel="time t", ylabel=f"cluster count (ε-graph, ε = {eps})",
          title="cluster count", ylim=(0, len(masses) + 0.5))
    merges = ", ".join(f"{s[0]:.0f}" for s in steps[1:])
    angles = ", ".join(f"{p:g}" for p in polar[1:])
    caption = (f"SA (Q=K=V=I) on S² at β = {beta:g}, Euler dt = {dt}: a cluster of {masses[0]} particles at "
               f"the north pole and satellites of {masses[1]} at polar angles {angles}. "
               f"Each merge lifts the energy to the next dashed level Σ_a m_a²/n² (cluster sizes m_a); "
               f"merges at t ≈ {merges or 'none within T'} (log time): nearer satellites merge "
               f"exponentially sooner.")
    return save(fig, ds, "energy_staircase", out, "Energy staircase of softmax attention at large β", caption)


# --------------------------------------------------------------------------- collapse_vs_clustering
#: (label, model, parameters) of the collapse_vs_clustering curves
CVC_RUNS = (
    ("SA softmax, β = 1", "sa", {"beta": 1.0}),
    ("Krause σ = 0.5, top-k = 8", "krause", {"sigma": 0.5, "top_k": 8}),
    ("Krause σ = 0.5, radius = 1", "krause", {"sigma": 0.5, "radius": 1.0}),
    ("Krause σ = 0.5, window = 8", "krause", {"sigma": 0.5, "window": 8}),
)


def _window_note(ds: xr.Dataset, run: str) -> str:
    """Caption sentence on the non-monotone count of the window-only run (empty if it is monotone)."""
    count = ds["cluster_count"].sel(run=run).values.astype(float)
    low = np.minimum.accumulate(count)
    k = int(np.argmax(count / low))  # the largest rise on the figure's log axis
    if count[k] <= low[k]:
        return ""
    t, after = ds["time"].values, count[k:].min()
    back = f", back to {after:.0f} by t = {t[-1]:g}" if after < count[k] else ""
    return (f"Its count is not monotone (up from {low[k]:.0f} to {count[k]:.0f} at t ≈ {t[k]:.0f}{back}): "
            f"a sequence "
            f"window fixes each particle's neighbours by index, not by position, so a group whose members "
            f"are pulled by neighbours in different clusters stretches beyond ε on its way and is counted as "
            f"several clusters until it has joined one.")


@register()
def make_collapse_vs_clustering(quick=False, out=None, progress=True) -> xr.Dataset:
    """Softmax SA vs Krause dynamics from the same start: cluster count and effective rank vs time."""
    n, d = (64, 8) if quick else (256, 8)
    dt, T, eps = 0.1, (30.0 if quick else 100.0), 0.1
    steps = int(round(T / dt))
    x0 = simulate("sa", n=n, d=d, steps=0, dt=dt, seed=0)["x"].isel(time=0).values
    ds = compare_runs(CVC_RUNS, x0, lambda tr: xr.Dataset({"cluster_count": count_clusters(tr["x"], eps=eps),
                                                           "effective_rank": effective_rank(tr["x"])}),
                      steps=steps, dt=dt, save_every=5, progress=progress)
    runs = list(ds["run"].values)
    ds.attrs.update(n=n, d=d, dt=dt, eps=eps, seed=0,
                    runs="; ".join(f"{lab}: {m} {p}" for lab, m, p in CVC_RUNS))

    fig, (a, b) = new_figure(2, size=(13, 5))
    t = ds["time"].values
    for c, run_name in zip(COLORS, runs):
        a.plot(t, ds["cluster_count"].sel(run=run_name), color=c, lw=1.8, label=run_name)
        b.plot(t, ds["effective_rank"].sel(run=run_name), color=c, lw=1.8, label=run_name)
    a.set(yscale="log", xlabel="time t", ylabel=f"cluster count (ε-graph, ε = {eps})",
          title="cluster count vs time")
    b.set(xlabel="time t", ylabel="effective rank exp H(σ/‖σ‖₁)", title="effective rank of X vs time",
          ylim=(0, d + 0.5))
    b.legend(fontsize=8, loc="lower right", bbox_to_anchor=(1.0, 0.14))  # between rank 1 (SA) and the rest
    final = ds.isel(time=-1)
    summary = "; ".join(f"{r.split(',')[0] if r.startswith('SA') else r.removeprefix('Krause ')}: "
                        f"clusters {int(final['cluster_count'].sel(run=r))}, effective rank "
                        f"{float(final['effective_rank'].sel(run=r)):.2f}" for r in runs)
    caption = (f"Same start (n = {n} points uniform on S^{d - 1}, d = {d}), Euler dt = {dt}, Q=K=V=I. "
               f"At t = {T:g}: {summary}. Softmax attention collapses to one point (rank 1); Krause with "
               f"top-k or a radius freezes into several synchronised clusters spanning the space; with only "
               f"a sequence window the clusters keep merging slowly. {_window_note(ds, runs[-1])}")
    title = "Representation collapse (softmax) vs clustering (Krause)"
    return save(fig, ds, "collapse_vs_clustering", out, title, caption)
