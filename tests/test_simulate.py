"""Simulator core against theory and the numpy reference (issue 3)."""

from fractions import Fraction

import numpy as np
import pytest
import xarray as xr
from conftest import PRESETS, RESTRICTIONS, random_qkv, sphere_points

from particles import make_interaction, reference, simulate
from particles.interaction import RADIUS_RTOL
from particles.kernels import velocity_field


@pytest.mark.parametrize("model, base", PRESETS)
@pytest.mark.parametrize("restriction", RESTRICTIONS)
@pytest.mark.parametrize("general_qkv", [False, True])
def test_kernel_matches_reference(model, base, restriction, general_qkv):
    n, d = 37, 3  # n not a multiple of anything
    params = {**base, **restriction}
    if model == "hk":
        params["radius"] = restriction.get("radius", base["radius"])
    if general_qkv:
        params.update(random_qkv(d))
    it = make_interaction(model, **params)
    x = sphere_points(n, d)
    field = velocity_field(it, n, d, np.float64)
    np.testing.assert_allclose(field(x), reference.velocity(x, it), rtol=0, atol=1e-10)
    np.testing.assert_allclose(field.weights(x), reference.weights(x, it), rtol=0, atol=1e-10)


@pytest.mark.parametrize("model, base", PRESETS)
def test_float32_close_to_float64_reference(model, base):
    n, d = 41, 4
    it = make_interaction(model, **base, window=9, top_k=5)
    x = sphere_points(n, d, seed=3)
    v32 = velocity_field(it, n, d, np.float32)(x.astype(np.float32))
    assert v32.dtype == np.float32
    np.testing.assert_allclose(v32, reference.velocity(x, it), atol=1e-5)


def test_reference_support_rules():
    """Window |i-j|<w, causal window 0<=i-j<w, causal alone j<=i; top-k keeps k entries per row."""
    x = sphere_points(10, 3)
    mask = reference.support(x, make_interaction("krause", window=3))
    i, j = np.indices(mask.shape)
    assert np.array_equal(mask, np.abs(i - j) < 3)
    mask = reference.support(x, make_interaction("krause", window=3, causal=True))
    assert np.array_equal(mask, (i - j >= 0) & (i - j < 3))
    mask = reference.support(x, make_interaction("krause", causal=True))
    assert np.array_equal(mask, j <= i)
    mask = reference.support(x, make_interaction("krause", top_k=4))
    assert (mask.sum(1) == 4).all() and mask[np.arange(10), np.arange(10)].all()


def test_sphere_norm_preserved_over_1e4_steps():
    ds = simulate("sa", n=16, d=3, steps=10_000, dt=0.01, save_every=2500, beta=3.0)
    norms = np.linalg.norm(ds.x.values, axis=-1)
    assert np.abs(norms - 1).max() < 1e-12
    ds = simulate("krause", n=16, d=3, steps=10_000, dt=0.01, save_every=5000, sigma=0.4, integrator="rk4")
    assert np.abs(np.linalg.norm(ds.x.values, axis=-1) - 1).max() < 1e-12


@pytest.mark.parametrize("integrator", ["euler", "rk4"])
def test_ensemble_equals_per_sample_runs(integrator):
    x0 = np.stack([sphere_points(20, 3, seed=s) for s in range(3)])
    ens = simulate("krause", x0, steps=30, dt=0.1, save_every=10, sigma=0.5, top_k=5, integrator=integrator)
    assert ens.x.dims == ("sample", "time", "particle", "component")
    for s in range(3):
        one = simulate("krause", x0[s], steps=30, dt=0.1, save_every=10, sigma=0.5, top_k=5,
                       integrator=integrator)
        np.testing.assert_array_equal(ens.x.values[s], one.x.values)


def test_time_coordinate_and_saved_steps():
    ds = simulate("sa", n=5, d=3, steps=10, dt=0.25, save_every=4)
    np.testing.assert_allclose(ds.time.values, [0.0, 1.0, 2.0, 2.5])
    assert list(ds.step.values) == [0, 4, 8, 10]


def test_results_are_the_datasets_the_public_constructor_builds():
    """simulate builds its Dataset from the variables directly (simulate.dataset); rebuilt with
    xr.Dataset from the same parts it is identical: names, dims and their order, the time index,
    attributes, for one system, an ensemble, attention weights and Q, K, V."""
    x0 = np.stack([sphere_points(6, 3, seed=s) for s in range(2)])
    runs = [simulate("sa", x0[0], steps=4, dt=0.1, beta=2.0),
            simulate("sa", x0, steps=4, dt=0.1, save_every=2, beta=2.0, return_weights=True,
                     Q=np.diag([1.0, 2.0, 3.0]))]
    for ds in runs:
        data = {k: (v.dims, v.values) for k, v in ds.data_vars.items()}
        rebuilt = xr.Dataset(data, coords={"time": ds.time.values, "step": ("time", ds.step.values)},
                             attrs=ds.attrs)
        xr.testing.assert_identical(ds, rebuilt)
        assert list(ds.sizes) == list(rebuilt.sizes) and list(ds.variables) == list(rebuilt.variables)
        assert ds.indexes["time"].equals(rebuilt.indexes["time"])
    again = simulate("sa", x0[0], steps=4, dt=0.1, beta=2.0)  # the same time index, reused
    assert again.xindexes["time"] is runs[0].xindexes["time"]
    again.time.attrs["units"] = "s"  # its own variables: nothing leaks into the other Dataset
    assert again.time.attrs["units"] == "s"
    assert "units" not in runs[0].time.attrs and not runs[0].time.values.flags.writeable
    xr.testing.assert_identical(runs[0], simulate("sa", x0[0], steps=4, dt=0.1, beta=2.0))


def test_x0_is_step_zero_and_seed_reproducible():
    x0 = sphere_points(8, 3)
    ds = simulate("sa", x0, steps=3, dt=0.1)
    np.testing.assert_array_equal(ds.x.values[0], x0)
    a = simulate("sa", n=8, d=3, steps=3, dt=0.1, seed=7, noise=0.1)
    b = simulate("sa", n=8, d=3, steps=3, dt=0.1, seed=7, noise=0.1)
    c = simulate("sa", n=8, d=3, steps=3, dt=0.1, seed=8, noise=0.1)
    np.testing.assert_array_equal(a.x.values, b.x.values)
    assert not np.allclose(a.x.values, c.x.values)
    assert np.abs(np.linalg.norm(a.x.values, axis=-1) - 1).max() < 1e-12


def test_x0_none_draws_uniform_cube_for_euclidean():
    ds = simulate("hk", n=500, d=2, steps=0, dt=1.0, radius=0.1)
    x = ds.x.values[0]
    assert x.min() >= 0 and x.max() <= 1 and abs(x.mean() - 0.5) < 0.05


def test_hk_dt1_is_the_synchronous_hk_map():
    x0 = np.random.default_rng(2).random((60, 2))
    ds = simulate("hk", x0, steps=3, dt=1.0, radius=0.2)
    x = x0
    for t in range(1, 4):
        x = reference.hk_map(x, 0.2)
        np.testing.assert_allclose(ds.x.values[t], x, atol=1e-12)


def test_hk_1d_is_integrated_in_sorted_order_and_saved_in_particle_order():
    """The 1-D HK field's prepare hook sorts the opinions (the compiled sweep then needs no
    gather/scatter) and restore puts them back; the saved trajectory is the HK map applied in the
    caller's particle order."""
    from particles.kernels import trajectory

    x0 = np.random.default_rng(7).random((300, 1))
    field = velocity_field(make_interaction("hk", radius=0.05), 300, 1)
    xs, order = field.prepare(x0)
    assert np.all(np.diff(xs[:, 0]) >= 0) and np.array_equal(field.restore(xs, order), x0)
    assert field.trajectory_plan().kind == (0,) * trajectory.HK1D
    ds = simulate("hk", x0, steps=6, dt=1.0, save_every=2, radius=0.05)
    x = x0
    for t in range(1, 7):
        x = reference.hk_map(x, 0.05)
        if t % 2 == 0:
            np.testing.assert_allclose(ds.x.sel(time=float(t)).values, x, rtol=0, atol=1e-12)


def test_hk_converges_in_finite_time_to_clusters_further_apart_than_R():
    R = 0.1
    x0 = np.random.default_rng(4).random((200, 1))
    ds = simulate("hk", x0, steps=60, dt=1.0, radius=R)
    x = ds.x.values
    frozen = [t for t in range(1, len(x)) if np.array_equal(x[t], x[t - 1])]
    assert frozen, "HK did not reach a fixed point in 60 steps"
    centres = np.unique(np.round(x[-1, :, 0], 9))
    assert len(centres) >= 2
    assert np.diff(centres).min() > R
    assert np.all(np.diff(x[:, np.argsort(x0[:, 0]), 0], axis=1) >= -1e-15)  # order preserved


def exact_hk_lattice(m, steps):
    """HK on opinions k/m, k = 0..m, confidence R = 1/m, in exact rational arithmetic."""
    x = [Fraction(k, m) for k in range(m + 1)]
    R = Fraction(1, m)
    for _ in range(steps):
        x = [sum(nb) / len(nb) for nb in ([y for y in x if abs(y - xi) <= R] for xi in x)]
    return x


@pytest.mark.parametrize("m", [7, 10, 13])
def test_hk_lattice_ties_count_as_inside(m):
    """Equally spaced opinions at distance exactly R are neighbours despite round-off."""
    steps = 40
    exact = np.array([float(v) for v in exact_hk_lattice(m, steps)])
    x0 = (np.arange(m + 1) / m)[:, None]
    ds = simulate("hk", x0, steps=steps, dt=1.0, radius=1.0 / m, save_every=steps)
    np.testing.assert_allclose(ds.x.values[-1, :, 0], exact, atol=1e-9)
    assert RADIUS_RTOL[np.dtype(np.float64)] <= 1e-8  # small: no genuine neighbour is invented


def test_hk_lattice_needs_the_tolerance():
    """Without the tolerance a float implementation drops lattice neighbours (so the test above can fail)."""
    m = 10
    x = np.arange(m + 1) / m
    d = np.abs(x[:, None] - x[None, :])
    exact_neighbours = 3 * (m + 1) - 2
    assert (d <= 1.0 / m).sum() != exact_neighbours
    bound = (1.0 / m) * (1 + RADIUS_RTOL[np.dtype(np.float64)])
    assert (d <= bound).sum() == exact_neighbours


def count_clusters(x, eps=1e-2):
    """Connected components of ‖x_i − x_j‖ ≤ eps (kept local so the core tests stand alone)."""
    from scipy.sparse.csgraph import connected_components

    adj = np.linalg.norm(x[:, None] - x[None], axis=-1) <= eps
    return connected_components(adj, directed=False)[0]


def test_sa_d3_collapses_to_one_cluster():
    ds = simulate("sa", n=64, d=3, steps=400, dt=0.2, save_every=400, beta=1.0, seed=0)
    x = ds.x.values[-1]
    assert count_clusters(x, 1e-3) == 1
    assert count_clusters(ds.x.values[0], 1e-3) > 1


def interaction_energy(x, beta):
    return np.exp(beta * x @ x.T).sum() / (2 * beta * len(x) ** 2)


def test_usa_energy_non_decreasing():
    beta = 2.0
    ds = simulate("usa", n=30, d=3, steps=300, dt=0.01, beta=beta, seed=5)
    energy = np.array([interaction_energy(x, beta) for x in ds.x.values])
    assert np.all(np.diff(energy) >= -1e-12)
    assert energy[-1] > energy[0] + 1e-3


def test_krause_keeps_clusters_where_sa_collapses():
    x0 = sphere_points(48, 3, seed=11)
    kw = dict(steps=600, dt=0.2, save_every=600)
    sa = simulate("sa", x0, beta=1.0, **kw).x.values[-1]
    kr = simulate("krause", x0, sigma=0.15, radius=0.5, **kw).x.values[-1]
    assert count_clusters(sa, 1e-2) == 1
    assert count_clusters(kr, 1e-2) >= 3


def test_causal_first_particle_is_fixed():
    """Under a causal mask particle 0 only sees itself: P_{x_0} x_0 = 0."""
    ds = simulate("sa", n=12, d=3, steps=50, dt=0.1, causal=True, beta=2.0)
    np.testing.assert_allclose(ds.x.values[-1, 0], ds.x.values[0, 0], atol=1e-14)
    assert not np.allclose(ds.x.values[-1, 5], ds.x.values[0, 5])


def test_stable_softmax_large_beta():
    x = sphere_points(50, 3)
    it = make_interaction("sa", beta=1e4)
    v = velocity_field(it, 50, 3)(x)
    assert np.all(np.isfinite(v))
    ds = simulate("sa", x, steps=5, dt=0.01, beta=1e4)
    assert np.all(np.isfinite(ds.x.values))


def test_usa_overflow_is_a_clear_error():
    with pytest.raises(OverflowError, match="beta"):
        simulate("usa", n=10, d=3, steps=2, dt=0.1, beta=1e4)


def test_rk4_is_fourth_order():
    x0 = sphere_points(10, 3, seed=9)
    exact = simulate("sa", x0, steps=1600, dt=1 / 1600, save_every=1600, integrator="rk4", beta=2.0).x[-1]
    errs = [float(np.abs(simulate("sa", x0, steps=s, dt=1 / s, save_every=s, integrator="rk4",
                                  beta=2.0).x[-1] - exact).max()) for s in (10, 20)]
    assert 10 < errs[0] / errs[1] < 40  # 2^4 = 16 up to the renormalisation


def test_netcdf_round_trip(tmp_path):
    ds = simulate("krause", n=9, d=3, steps=4, dt=0.1, sigma=0.5, window=3, causal=True, top_k=2,
                  return_weights=True, **random_qkv(3))
    assert ds.attrs["window"] == 3 and ds.attrs["top_k"] == 2 and ds.attrs["causal"] == 1
    assert ds.attrs["krause_sync_version"]
    np.testing.assert_allclose(ds.attention.values.sum(-1), 1.0)
    path = tmp_path / "run.nc"
    ds.to_netcdf(path)
    back = xr.load_dataset(path)
    xr.testing.assert_identical(ds, back)
    assert back.attrs == ds.attrs


BAD = [
    (dict(model="xx"), "model"),
    (dict(x0=np.full((4, 3), np.nan)), "x0"),
    (dict(x0=np.ones(3)), "x0"),
    (dict(sigma=0.0), "sigma"),
    (dict(sigma=-1.0), "sigma"),
    (dict(radius=-0.1), "radius"),
    (dict(window=0), "window"),
    (dict(top_k=0), "top_k"),
    (dict(dt=0.0), "dt"),
    (dict(dt=-1.0), "dt"),
    (dict(steps=-1), "steps"),
    (dict(integrator="leapfrog"), "integrator"),
    (dict(geometry="torus"), "geometry"),
    (dict(dtype="float16"), "dtype"),
    (dict(save_every=0), "save_every"),
    (dict(noise=-1.0), "noise"),
    (dict(Q=np.ones((2, 2))), "Q"),
    (dict(model="hk", radius=None), "radius"),
    (dict(n=None), "n"),
]


@pytest.mark.parametrize("change, name", BAD)
def test_bad_input_names_the_parameter(change, name):
    kw = dict(model="krause", x0=None, n=6, d=3, steps=2, dt=0.1)
    kw.update(change)
    model = kw.pop("model")
    with pytest.raises((ValueError, TypeError), match=name):
        simulate(model, **kw)


def test_unknown_keyword_is_rejected():
    with pytest.raises(TypeError, match="sigmaa"):
        simulate("krause", n=4, d=3, steps=1, dt=0.1, sigmaa=1.0)


def test_cli_simulate(tmp_path):
    from analysis.cli import main

    out = tmp_path / "run.nc"
    assert main(["simulate", "--model", "krause", "--n", "32", "--d", "3", "--steps", "20", "--dt", "0.05",
                 "--sigma", "0.5", "--top-k", "4", "--no-progress", "-o", str(out)]) == 0
    ds = xr.load_dataset(out)
    assert ds.x.shape == (21, 32, 3) and ds.attrs["sigma"] == 0.5 and ds.attrs["top_k"] == 4
    assert main(["simulate", "--model", "krause", "--n", "4", "--d", "3", "--steps", "2", "--dt", "0",
                 "-o", str(out)]) == 2
