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


def test_sidecar_values_make_sense(quick_run):
    _, out = quick_run
    with xr.open_dataset(out / "sa_sphere.nc") as ds:  # SA on S² collapses to one cluster
        assert int(ds["cluster_count"][-1]) == 1 and float(ds["mean_cosine"][-1]) > 0.99
    with xr.open_dataset(out / "energy_staircase.nc") as ds:  # a staircase: energy non-decreasing
        e = ds["energy"].values
        assert np.all(np.diff(e) > -1e-9) and 0 < e[0] < e[-1] <= 1
    with xr.open_dataset(out / "collapse_vs_clustering.nc") as ds:
        final = ds.isel(time=-1)
        assert float(final["effective_rank"][0]) < 1.1  # softmax collapses
        assert float(final["effective_rank"][1:].min()) > 2  # Krause keeps clusters
    with xr.open_dataset(out / "causal_sink.nc") as ds:
        assert np.all((ds["sink_rate"] >= 0) & (ds["sink_rate"] <= 1))


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


def test_cli_rejects_unknown_figure(capsys):
    assert main(["figures", "--only", "no_such_figure", "--out", "unused"]) == 2
    assert "no_such_figure" in capsys.readouterr().err


def test_cli_lists_figures(capsys):
    assert main(["figures", "--list"]) == 0
    listed = capsys.readouterr().out
    assert all(name in listed for name in PLOTTED)
