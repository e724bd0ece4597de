"""`ksync figures --quick` (issue 5 item 3): every figure writes PNG + PDF + a netCDF file holding the
plotted arrays; plus the registry and the CLI's argument handling."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

from analysis import figures
from analysis.cli import main

#: the arrays each theory figure plots (more may be stored)
PLOTTED = {
    "sa_sphere": ["x_snapshots", "cluster_count", "mean_cosine"],
    "metastability": ["count_mean", "count_sd", "plateau_mean", "plateau_sd", "k_star_curve", "sqrt_2beta"],
    "energy_staircase": ["energy", "cluster_count", "reference_level"],
    "collapse_vs_clustering": ["cluster_count", "effective_rank"],
    "hk_2r": ["opinions", "clusters_mean", "clusters_sd", "major_mean", "major_sd", "reference_1_over_2R"],
    "krause_phase": ["topk_mean", "topk_sd", "window_mean", "window_sd"],
    "causal_sink": ["alpha0_mean", "alpha0_sd", "sink_rate", "distance_to_first_mean", "cluster_count_mean"],
}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("figures")
    status = main(["figures", "--quick", "--out", str(out), "--no-progress"])
    return status, out


def test_quick_run_writes_every_figure(quick_run):
    status, out = quick_run
    assert status == 0
    assert set(PLOTTED) <= set(figures.FIGURES)
    for name in figures.FIGURES:
        for ext in ("png", "pdf", "nc"):
            path = out / f"{name}.{ext}"
            assert path.is_file() and path.stat().st_size > 1000, path
        assert (out / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert (out / f"{name}.pdf").read_bytes()[:5] == b"%PDF-"


@pytest.mark.parametrize("name", list(PLOTTED))
def test_sidecar_holds_the_plotted_arrays(quick_run, name):
    _, out = quick_run
    with xr.open_dataset(out / f"{name}.nc") as ds:
        assert ds.attrs["figure"] == name
        assert ds.attrs["title"] and len(ds.attrs["caption"]) > 40
        for var in PLOTTED[name]:
            assert var in ds, f"{name}.nc lacks {var}"
            values = np.asarray(ds[var].values, dtype=float)
            assert values.size > 0 and np.isfinite(values).any(), f"{name}.nc: {var} is empty or all NaN"


def _open(out, name) -> xr.Dataset:
    with xr.open_dataset(out / f"{name}.nc") as ds:
        return ds.load()


def _in_range(values, low, high) -> bool:
    values = np.asarray(values, dtype=float)
    return bool(np.all(np.isfinite(values)) and np.all((values >= low) & (values <= high)))


def test_sidecar_sa_sphere_collapses_on_the_sphere(quick_run):
    ds = _open(quick_run[1], "sa_sphere")
    n = ds.attrs["n"]
    np.testing.assert_allclose(np.linalg.norm(ds["x_snapshots"].values, axis=-1), 1.0, atol=1e-12)
    assert _in_range(ds["cluster_count"], 1, n) and int(ds["cluster_count"][0]) > 10
    assert int(ds["cluster_count"][-1]) == 1 and float(ds["mean_cosine"][-1]) > 0.99
    assert _in_range(ds["mean_cosine"], -1, 1)


def test_sidecar_metastability_plateaus_follow_k_star(quick_run):
    from analysis.figures.sa import k_star

    ds = _open(quick_run[1], "metastability")
    assert _in_range(ds["count_mean"], 1, ds.attrs["n"])
    betas, plateau = ds["beta_plateau"].values, ds["plateau_mean"].values
    assert list(ds["k_star"].values) == [k_star(b) for b in betas]
    # the first plateau sits at (or, for large beta, somewhat below) the most unstable mode k*
    assert np.all(np.abs(plateau - ds["k_star"].values) <= 1.6), (betas, plateau)
    assert np.all(plateau <= ds["k_star"].values + 0.5)


def test_sidecar_energy_staircase_levels(quick_run):
    ds = _open(quick_run[1], "energy_staircase")
    e, n = ds["energy"].values, ds.attrs["n"]
    assert np.all(np.diff(e) > -1e-9) and 0 < e[0] < e[-1] <= 1 + 1e-12  # a staircase: never down
    assert _in_range(ds["cluster_count"], 1, len(ds.attrs["masses"]))
    levels = ds["reference_level"].values
    assert np.all(np.diff(levels) > 0)  # every merge lifts the level
    for start, level in zip(ds["plateau_start"].values, levels):  # level = Σ m_a²/n² of that partition
        sizes = ds["cluster_sizes"].sel(time=start).values
        assert sizes.sum() == n and np.isclose(np.sum(sizes.astype(float) ** 2) / n**2, level)
    assert abs(e[-1] - levels[-1]) < 0.02  # the energy sits on the level of the final partition


def test_sidecar_collapse_vs_clustering(quick_run):
    ds = _open(quick_run[1], "collapse_vs_clustering")
    n, d = ds.attrs["n"], ds.attrs["d"]
    assert _in_range(ds["cluster_count"], 1, n) and _in_range(ds["effective_rank"], 1 - 1e-9, d + 1e-9)
    final = ds.isel(time=-1)
    sa, topk, radius = (str(r) for r in ds["run"].values[:3])
    assert int(final["cluster_count"].sel(run=sa)) == 1 and float(final["effective_rank"].sel(run=sa)) < 1.1
    for run in (topk, radius):  # Krause with top-k or a radius keeps several clusters spanning the space
        assert int(final["cluster_count"].sel(run=run)) >= 2
        assert float(final["effective_rank"].sel(run=run)) > 2


def test_sidecar_hk_counts_sit_in_the_2r_band(quick_run):
    ds = _open(quick_run[1], "hk_2r")
    assert int(ds["clusters"].min()) >= 1 and bool((ds["major_clusters"] <= ds["clusters"]).all())
    assert float(ds["final_movement"].max()) == 0  # every run has frozen (finite-time convergence)
    ratio = (ds["clusters_mean"] / ds["reference_1_over_2R"]).sel(inv_radius=slice(5, None))
    assert ratio.size >= 2 and _in_range(ratio, 0.6, 1.0), ratio.values  # below the 1/(2R) line
    assert _in_range(ds["opinions"], 0, 1)


def test_sidecar_krause_phase(quick_run):
    ds = _open(quick_run[1], "krause_phase")
    n = ds.attrs["n"]
    assert _in_range(ds["clusters_topk"], 1, n) and _in_range(ds["clusters_window"], 1, n)
    assert ds.sizes["seed"] == ds.attrs["seeds"] >= 2
    m = ds["topk_mean"]
    # the sparsest support keeps the most clusters; everything visible at the largest σ the fewest
    assert float(m.isel(top_k=0).min()) >= float(m.isel(sigma=-1, top_k=-1))
    assert float(m.isel(sigma=-1, top_k=-1)) <= 2


def test_sidecar_causal_sink_no_sink(quick_run):
    ds = _open(quick_run[1], "causal_sink")
    assert _in_range(ds["sink_rate"], 0, 1) and float(ds["sink_rate"].max()) == 0  # the caption's claim
    assert float(ds["alpha0_mean"].max()) <= float(ds["alpha0_uniform_causal"]) + 1e-6
    assert _in_range(ds["alpha0_mean"], 0, 1) and float(ds["distance_to_first_mean"].min()) >= 0
    end = ds.isel(time=-1)
    runs = [str(r) for r in ds["run"].values]
    assert float(end["distance_to_first_mean"].sel(run=runs[0])) < 0.1  # causal SA β = 1 collapses onto x_0


def test_k_star_is_near_sqrt_2beta():
    from analysis.figures.sa import k_star

    assert [k_star(b) for b in (2, 4, 9, 16, 25, 36)] == [2, 3, 4, 6, 7, 8]
    for beta in (10.0, 50.0, 200.0):
        assert abs(k_star(beta) - np.sqrt(2 * beta)) <= 1.5


def test_register_adds_a_figure_and_refuses_duplicates():
    @figures.register("test_dummy", group="test")
    def make_test_dummy(quick=False, out=None, progress=True):
        """A dummy figure."""
        return xr.Dataset({"y": ("x", [1.0, 2.0])})

    try:
        assert figures.FIGURES["test_dummy"].description == "A dummy figure."
        assert figures.make_all(["test_dummy"], out=None, progress=False)["test_dummy"]["y"].size == 2
        with pytest.raises(ValueError, match="already registered"):
            figures.register("test_dummy")(lambda quick=False, out=None, progress=True: None)
    finally:
        figures.FIGURES.pop("test_dummy")


def test_cli_rejects_unknown_figure_and_lists_the_valid_names(capsys):
    assert main(["figures", "--only", "no_such_figure", "--out", "unused"]) == 2
    err = capsys.readouterr().err
    assert "no_such_figure" in err and all(name in err for name in figures.FIGURES)


def test_registry_lists_every_figure_module():
    """_registry.MODULES is the one list of figure modules: every tracked module of analysis/figures
    that registers a figure is in it, and every listed module exists."""
    import importlib.util
    import subprocess
    from pathlib import Path

    folder = Path(figures.__file__).parent
    try:
        tracked = subprocess.run(["git", "ls-files", "*.py"], cwd=folder, capture_output=True, text=True,
                                 check=True, timeout=60).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        tracked = [p.name for p in folder.glob("*.py")]
    registering = {f"analysis.figures.{Path(p).stem}" for p in tracked
                   if not Path(p).stem.startswith("_") and "register" in (folder / p).read_text()}
    missing = registering - set(figures.MODULES)
    assert not missing, f"add to analysis.figures._registry.MODULES: {sorted(missing)}"
    assert all(importlib.util.find_spec(m) is not None for m in figures.MODULES)


def test_cli_lists_figures(capsys):
    assert main(["figures", "--list"]) == 0
    listed = capsys.readouterr().out
    assert all(name in listed for name in PLOTTED)


def test_hk_2r_cluster_counts_in_the_text_come_from_the_data(tmp_path, monkeypatch):
    """The demo panel's title and the caption count the clusters of the plotted data (the panel draws
    every 4th / 8th opinion only, so a small cluster can be in the data and not in the drawing)."""
    import re

    import matplotlib

    matplotlib.use("Agg")
    from analysis.figures import hk
    from particles import simulate

    titles = []
    real_save = hk.save

    def keep_title(fig, *args, **kwargs):
        titles.append(fig.axes[0].get_title())
        return real_save(fig, *args, **kwargs)

    monkeypatch.setattr(hk, "save", keep_title)
    ds = hk.make_hk_2r(quick=True, out=tmp_path, progress=False)
    drawn = np.sort(ds["opinions"].isel(time=-1).values)
    shown = 1 + int(np.sum(np.diff(drawn) > hk.HK_EPS))  # distinct final opinions among the drawn ones
    assert ds.attrs["demo_shown_clusters"] == shown
    assert re.search(r": (\d+) clusters shown$", titles[0]).group(1) == str(shown)
    demo = simulate("hk", n=ds.attrs["n"], d=1, steps=int(ds["opinions"]["time"].max()), dt=1.0,
                    radius=ds.attrs["demo_radius"], seed=0)
    final, counts = np.unique(np.round(demo["x"].isel(time=-1, component=0).values, 9), return_counts=True)
    major = int(np.sum(counts >= hk.MAJOR * ds.attrs["n"]))
    assert (ds.attrs["demo_clusters"], ds.attrs["demo_major_clusters"]) == (len(final), major)
    assert shown <= len(final)
    with xr.open_dataset(tmp_path / "hk_2r.nc") as written:
        caption = " ".join(written.attrs["caption"].split())
    assert f"end in {len(final)} clusters, {major} of them holding" in caption
    assert f"{shown} containing a drawn opinion" in caption
