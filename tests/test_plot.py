"""analysis.plot: one call per plot, a matplotlib Figure back, showing the data it was given."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import xarray as xr  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

import analysis  # noqa: E402
from analysis import plot  # noqa: E402
from particles import simulate  # noqa: E402


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _scatter_points(fig) -> np.ndarray:
    """The 2-D points of the (single) scatter in the figure's first axes."""
    return np.asarray(fig.axes[0].collections[-1].get_offsets())


@pytest.mark.parametrize("d", [1, 2, 3, 8])
def test_state_returns_a_figure_for_every_dimension(d):
    model, kw = ("hk", dict(radius=0.2)) if d == 1 else ("sa", dict(beta=1.0))
    ds = simulate(model, n=12, d=d, steps=6, dt=0.5 if d == 1 else 0.1, seed=1, **kw)
    fig = plot.state(ds, frame=-1)
    assert isinstance(fig, Figure)
    assert "n = 12" in fig.axes[0].get_title()
    if d in (2, 8):  # on the circle: the drawn points are unit vectors, one per particle
        pts = _scatter_points(fig)
        assert pts.shape == (12, 2)
        np.testing.assert_allclose(np.linalg.norm(pts, axis=1), 1.0, atol=1e-12)
    if d == 2:  # the circle shows the state itself
        np.testing.assert_allclose(_scatter_points(fig), ds.x.isel(time=-1).values)
    if d == 1:  # every opinion's trajectory is drawn
        assert len(fig.axes[0].lines) == 12 + 1  # + the frame marker


def test_state_first_two_principal_directions_in_euclidean_space():
    rng = np.random.default_rng(0)
    x0 = rng.standard_normal((20, 5)) * np.array([5.0, 2.0, 0.1, 0.1, 0.1])  # most spread in e1, e2
    ds = simulate("hk", x0, steps=0, dt=1.0, radius=0.5)
    pts = _scatter_points(plot.state(ds))
    # uncentred PCA onto the two leading directions keeps the norm of these nearly planar points
    np.testing.assert_allclose(np.linalg.norm(pts, axis=1), np.linalg.norm(x0[:, :2], axis=1), rtol=0.05)


def test_trajectory_and_cluster_count_show_the_count():
    ds = simulate("sa", n=16, d=3, steps=40, dt=0.2, beta=1.0, seed=0, save_every=4)
    counts = analysis.count_clusters(ds, eps=0.05)
    fig = plot.trajectory(ds, frame=0)
    assert isinstance(fig, Figure) and len(fig.axes) == 2
    line = plot.cluster_count(ds, eps=0.05).axes[0].lines[0]
    np.testing.assert_array_equal(line.get_ydata(), counts.values)
    np.testing.assert_allclose(line.get_xdata(), ds.time.values)


def test_cluster_count_of_an_ensemble_is_the_mean_over_samples():
    ens = simulate("krause", n=10, d=3, samples=3, steps=10, dt=0.2, sigma=0.5, seed=0, save_every=5)
    counts = analysis.count_clusters(ens, eps=0.05)
    fig = plot.cluster_count(counts)
    np.testing.assert_allclose(fig.axes[0].lines[0].get_ydata(), counts.mean("sample").values)
    assert "3 samples" in fig.axes[0].get_legend().get_texts()[0].get_text()


def test_attention_shows_the_matrix_of_the_frame():
    ds = simulate("sa", n=8, d=3, steps=4, dt=0.1, seed=0, causal=True, return_weights=True)
    fig = plot.attention(ds, frame=2)
    shown = fig.axes[0].images[0].get_array()
    np.testing.assert_allclose(shown, ds.attention.isel(time=2).values)
    assert np.all(np.triu(np.asarray(shown), 1) == 0)  # causal: nothing above the diagonal
    with pytest.raises(ValueError, match="attention"):
        plot.attention(ds.drop_vars("attention"))


def _extracted_like(pad: int = 2) -> xr.Dataset:
    """The layout of analysis.bridge.extract: (sample, layer, token, component), a token mask, the
    attention of the last layer NaN."""
    rng = np.random.default_rng(3)
    S, L, T, D = 2, 3, 7, 6
    mask = np.ones((S, T), dtype=bool)
    mask[:, T - pad:] = False
    att = rng.random((S, L + 1, 2, T, T))
    att /= att.sum(-1, keepdims=True)
    att[:, L] = np.nan
    return xr.Dataset(
        {"x": (("sample", "layer", "token", "component"), 5 * rng.standard_normal((S, L + 1, T, D))),
         "attention": (("sample", "layer", "head", "query", "key"), att)},
        coords={"layer": np.arange(L + 1), "token_mask": (("sample", "token"), mask)},
    )


def test_extracted_trajectory_drops_padding_and_names_the_layer():
    ds = _extracted_like(pad=2)
    fig = plot.state(ds, frame=-1)
    assert _scatter_points(fig).shape == (5, 2)  # 7 tokens, 2 of them padding
    assert "layer = 3" in fig.axes[0].get_title()
    fig = plot.trajectory(ds)
    assert fig.axes[1].get_xlabel() == "layer"
    fig = plot.attention(ds, frame=1, head=1, sample=1)
    shown = fig.axes[0].images[0].get_array()
    np.testing.assert_allclose(shown, ds.attention.isel(sample=1, layer=1, head=1))
    assert "head 1" in fig.axes[0].get_title()
    with pytest.raises(ValueError, match="frame"):
        plot.attention(ds, frame=-1)  # the last layer has no attention


def test_bad_input_names_the_argument():
    with pytest.raises(ValueError, match="ds"):
        plot.state(xr.Dataset({"y": ("a", [1.0])}))
    with pytest.raises(ValueError, match="ds"):
        plot.trajectory(xr.DataArray(np.zeros((3, 4)), dims=("particle", "component")))
