"""Pluggable dynamics (issue 17): geometry objects, the integrator registry, custom velocity fields,
the parameter table; and the reliability fixes of issue 14 that live in simulate."""

import pickle

import numpy as np
import pytest
import torch
from conftest import sphere_points

from particles import make_interaction, reference, simulate
from particles.fields import ALiBiCausal, Sinkhorn
from particles.geometry import EUCLIDEAN, GEOMETRIES, SPHERE, get_geometry
from particles.integrate import INTEGRATORS, get_integrator, register_integrator, rk4
from particles.params import PARAMS, check


# -- geometry --------------------------------------------------------------------------------------
@pytest.mark.parametrize("lib", ["numpy", "torch"])
def test_geometry_objects(lib):
    rng = np.random.default_rng(0)
    x, v = SPHERE.retract(rng.standard_normal((2, 7, 3))), rng.standard_normal((2, 7, 3))
    if lib == "torch":
        x, v = torch.from_numpy(x), torch.from_numpy(v)
    t = SPHERE.tangent(x, v)
    assert np.abs(np.asarray((t * x).sum(-1))).max() < 1e-15  # P_x v ⊥ x
    np.testing.assert_allclose(np.asarray(SPHERE.tangent(x, t)), np.asarray(t), atol=1e-15)  # a projection
    norms = np.linalg.norm(np.asarray(SPHERE.retract(3.0 * v)), axis=-1)
    np.testing.assert_allclose(norms, 1.0, atol=1e-15)
    np.testing.assert_array_equal(np.asarray(EUCLIDEAN.tangent(x, v)), np.asarray(v - x))
    assert EUCLIDEAN.retract(v) is v
    gen = np.random.default_rng(1) if lib == "numpy" else torch.Generator().manual_seed(1)
    dtype = np.float32 if lib == "numpy" else torch.float32
    s = np.asarray(SPHERE.sample(gen, (4000, 3), dtype))
    assert s.dtype == np.float32 and s.shape == (4000, 3)
    np.testing.assert_allclose(np.linalg.norm(s, axis=-1), 1.0, atol=1e-6)
    assert np.abs(s.mean(0)).max() < 0.05  # uniform on the sphere: mean ≈ 0
    c = np.asarray(EUCLIDEAN.sample(gen, (4000, 2), dtype))
    assert c.min() >= 0 and c.max() <= 1 and abs(c.mean() - 0.5) < 0.02


def test_geometry_registry():
    assert get_geometry("sphere") is SPHERE and get_geometry(EUCLIDEAN) is EUCLIDEAN
    assert set(GEOMETRIES) == {"sphere", "euclidean"}
    assert pickle.loads(pickle.dumps(SPHERE)) is SPHERE
    with pytest.raises(ValueError, match="geometry"):
        get_geometry("torus")
    assert make_interaction("sa", geometry=EUCLIDEAN).geometry == "euclidean"


def test_geometry_operations_have_one_home():
    """Tangent, retraction and projection are methods of particles.geometry's objects; the steppers
    keep no copies of them."""
    import particles.integrate as integrate

    assert not {"tangent", "normalise_rows", "retract", "project"} & set(vars(integrate))


# -- integrators -----------------------------------------------------------------------------------
@pytest.mark.parametrize("extra", [{}, {"top_k": 4}, {"window": 5, "causal": True}])
def test_krause_equals_sa_with_beta_one_over_sigma_squared_under_rk4(extra):
    """On the sphere −‖x_i − x_j‖²/(2σ²) = (⟨x_i, x_j⟩ − 1)/σ²: the same weights as SA at β = 1/σ²,
    provided every point where the field is evaluated (rk4's stage points included) is on the
    sphere. Top-k ranks the same pairs then too."""
    sigma = 0.6
    x0 = sphere_points(24, 3, seed=3)
    kw = dict(steps=60, dt=0.05, save_every=20, integrator="rk4", **extra)
    kr = simulate("krause", x0, sigma=sigma, **kw).x.values
    sa = simulate("sa", x0, beta=1 / sigma**2, **kw).x.values
    np.testing.assert_allclose(kr, sa, rtol=0, atol=1e-12)


def test_radius_two_keeps_antipodal_pairs_under_rk4():
    """‖x_i − x_j‖ ≤ 2 on the unit sphere: radius 2 restricts nothing, also at rk4 stage points."""
    x0 = sphere_points(10, 3, seed=5)
    x0 = np.concatenate([x0, -x0 + 1e-9])  # near-antipodal pairs
    kw = dict(steps=40, dt=0.1, integrator="rk4", sigma=0.8)
    np.testing.assert_allclose(simulate("krause", x0, radius=2.0, **kw).x.values,
                               simulate("krause", x0, **kw).x.values, rtol=0, atol=1e-13)


def test_rk4_with_retracted_stages_is_fourth_order():
    """Error at t = 1 against a fine run, halving dt: ratio 2⁴ = 16 (Krause with a restriction)."""
    x0 = sphere_points(12, 3, seed=9)
    kw = dict(integrator="rk4", sigma=0.7, window=6)
    exact = simulate("krause", x0, steps=1024, dt=1 / 1024, save_every=1024, **kw).x.values[-1]
    errs = [np.abs(simulate("krause", x0, steps=s, dt=1 / s, save_every=s, **kw).x.values[-1] - exact).max()
            for s in (8, 16, 32)]
    orders = np.log2(np.array(errs[:-1]) / np.array(errs[1:]))
    assert np.all((orders > 3.6) & (orders < 4.4)), orders


def test_callable_integrator_and_registry():
    x0 = sphere_points(9, 3, seed=1)

    def my_euler(f, x, dt):
        return x + dt * f(x)

    ours = simulate("sa", x0, steps=10, dt=0.1, beta=2.0, integrator=my_euler)
    ref = simulate("sa", x0, steps=10, dt=0.1, beta=2.0)
    np.testing.assert_allclose(ours.x.values, ref.x.values, rtol=0, atol=1e-14)
    assert ours.attrs["integrator"] == "my_euler"
    assert get_integrator("rk4")[1] is rk4
    register_integrator("rk4_again", rk4)
    try:
        again = simulate("sa", x0, steps=10, dt=0.1, beta=2.0, integrator="rk4_again")
        np.testing.assert_allclose(again.x.values, simulate("sa", x0, steps=10, dt=0.1, beta=2.0,
                                                           integrator="rk4").x.values, atol=1e-14)
    finally:
        INTEGRATORS.pop("rk4_again")
    with pytest.raises(ValueError, match="integrator"):
        simulate("sa", x0, steps=2, dt=0.1, integrator=lambda f, x, dt: x[:3])


# -- custom velocity fields ------------------------------------------------------------------------
def test_alibi_with_zero_slope_is_causal_sa():
    x0 = sphere_points(16, 3, seed=2)
    for integrator in ("euler", "rk4"):
        ours = simulate(ALiBiCausal(beta=2.0, slope=0.0), x0, steps=30, dt=0.1, geometry="sphere",
                        integrator=integrator)
        compiled = simulate("sa", x0, steps=30, dt=0.1, beta=2.0, causal=True, integrator=integrator)
        np.testing.assert_allclose(ours.x.values, compiled.x.values, rtol=0, atol=1e-12)
    assert ours.attrs["model"] == "custom" and "ALiBiCausal" in ours.attrs["field"]
    biased = simulate(ALiBiCausal(beta=2.0, slope=1.0), x0, steps=5, dt=0.1, geometry="sphere",
                      return_weights=True)
    w = biased.attention.values[0]
    np.testing.assert_allclose(w.sum(1), 1.0, atol=1e-14)
    assert np.all(np.triu(w, 1) == 0)  # causal
    assert w[-1, 0] < w[-1, -1] * np.exp(-10)  # slope 1 over 15 positions: the far past is damped


def test_sinkhorn_weights_are_doubly_stochastic():
    x0 = sphere_points(20, 3, seed=4)
    ds = simulate(Sinkhorn(beta=3.0), x0, steps=10, dt=0.1, geometry="sphere", return_weights=True)
    w = ds.attention.values
    np.testing.assert_allclose(w.sum(-1), 1.0, rtol=0, atol=1e-8)
    np.testing.assert_allclose(w.sum(-2), 1.0, rtol=0, atol=1e-8)
    assert np.all(w > 0) and np.all(np.isfinite(ds.x.values))
    np.testing.assert_allclose(np.linalg.norm(ds.x.values, axis=-1), 1.0, atol=1e-12)


def test_custom_field_gets_ensembles_noise_store_and_progress(tmp_path):
    """A numpy SA written by hand = the compiled SA, noise streams included (same seed)."""
    it = make_interaction("sa", beta=1.5)

    def sa(x):
        return reference.velocity(x, it)

    x0 = np.stack([sphere_points(10, 3, seed=s) for s in range(3)])
    kw = dict(steps=12, dt=0.05, save_every=4, noise=0.2, seed=11)
    ours = simulate(sa, x0, geometry="sphere", store=tmp_path / "custom.zarr", progress=True, **kw)
    ref = simulate("sa", x0, beta=1.5, **kw)
    assert ours.x.dims == ("sample", "time", "particle", "component") and ours.x.chunks is not None
    np.testing.assert_allclose(ours.x.values, ref.x.values, rtol=0, atol=1e-12)
    assert ours.attrs["model"] == "custom" and ours.attrs["geometry"] == "sphere"
    hk = simulate(lambda x: reference.velocity(x, make_interaction("hk", radius=0.2)), n=30, d=2,
                  steps=3, dt=1.0, geometry="euclidean")
    x = hk.x.values[0]
    for _ in range(3):
        x = reference.hk_map(x, 0.2)
    np.testing.assert_allclose(hk.x.values[-1], x, atol=1e-12)


def test_custom_field_errors():
    x0 = sphere_points(5, 3)
    with pytest.raises(ValueError, match="geometry"):
        simulate(lambda x: x, x0, steps=1, dt=0.1)
    with pytest.raises(TypeError, match="beta"):
        simulate(lambda x: x, x0, steps=1, dt=0.1, geometry="sphere", beta=2.0)
    with pytest.raises(ValueError, match="shape"):
        simulate(lambda x: x[:2], x0, steps=1, dt=0.1, geometry="sphere")
    with pytest.raises(ValueError, match="return_weights"):
        simulate(lambda x: x, x0, steps=1, dt=0.1, geometry="sphere", return_weights=True)
    it = make_interaction("krause", sigma=0.5)
    np.testing.assert_array_equal(simulate(it, x0, steps=3, dt=0.1).x.values,
                                  simulate("krause", x0, steps=3, dt=0.1, sigma=0.5).x.values)
    with pytest.raises(TypeError, match="make_interaction"):
        simulate(it, x0, steps=1, dt=0.1, sigma=0.2)


# -- bad input and clear messages (issue 14, items 5, 8, 9) ------------------------------------------
BAD = [
    (dict(x0=np.empty((0, 3))), ValueError, "x0 is empty"),
    (dict(x0=np.empty((4, 0))), ValueError, "x0 is empty"),
    (dict(dtype="banana"), ValueError, "dtype"),
    (dict(seed=-1), ValueError, "seed"),
    (dict(seed=1.5), TypeError, "seed"),
    (dict(Q=[["a", "b", "c"]] * 3), TypeError, "Q"),
    (dict(Q=np.eye(3) + 1j), TypeError, "Q"),
    (dict(model=["sa"]), TypeError, "model"),
    (dict(model="xx"), ValueError, "model"),
    (dict(x0=sphere_points(6, 3), n=None, samples=2), ValueError, "samples"),
    (dict(x0=np.stack([sphere_points(6, 3)] * 2), n=None, samples=3), ValueError, "samples"),
    (dict(x0=sphere_points(6, 3) + 1j), TypeError, "x0"),
    (dict(x0=np.array([["a", "b", "c"]] * 6)), TypeError, "x0"),
    (dict(return_weights="no"), TypeError, "return_weights"),
    (dict(progress="yes"), TypeError, "progress"),
    (dict(causal="yes"), TypeError, "causal"),
    (dict(sigma=1e-300), ValueError, "sigma"),
    (dict(integrator=3), ValueError, "integrator"),
    (dict(backend="jax"), ValueError, "backend"),
    (dict(device="tpu"), ValueError, "device"),
    (dict(device="cuda"), ValueError, "backend"),
    (dict(store=3), TypeError, "store"),
    (dict(overwrite="yes"), TypeError, "overwrite"),
    (dict(noise=0.1, integrator="rk4"), ValueError, "integrator"),
]


@pytest.mark.parametrize("change, error, match", BAD)
def test_bad_input_is_a_clear_error(change, error, match):
    kw = dict(model="krause", x0=None, n=6, d=3, steps=2, dt=0.1)
    kw.update(change)
    model = kw.pop("model")
    with pytest.raises(error, match=match):
        simulate(model, **kw)


def test_usa_overflow_names_the_real_cause():
    with pytest.raises(OverflowError, match="step 0.*beta is too large"):
        simulate("usa", n=10, d=3, steps=0, dt=0.1, beta=1e3, return_weights=True)
    with pytest.raises(OverflowError, match="step 0.*beta is too large"):
        simulate("usa", n=10, d=3, steps=5, dt=0.1, beta=1e3)
    # finite at step 0, then the euclidean state runs away within one step: dt (with beta) is the cause
    with pytest.raises(OverflowError, match=r"step 1 \(beta=9.0, dt=0.001\).*reduce dt or beta"):
        simulate("usa", n=10, d=3, steps=5, dt=1e-3, beta=9.0, geometry="euclidean")


def test_torch_backend_dispatch():
    try:
        import particles.backends.torch  # noqa: F401
    except ModuleNotFoundError:
        with pytest.raises(NotImplementedError, match="backend='torch'"):
            simulate("sa", n=5, d=3, steps=1, dt=0.1, backend="torch")
        return
    ds = simulate("sa", n=5, d=3, steps=3, dt=0.1, backend="torch", device="cpu")
    np.testing.assert_allclose(ds.x.values, simulate("sa", n=5, d=3, steps=3, dt=0.1).x.values, atol=1e-10)


def test_parameter_table_describes_simulate():
    import inspect

    sig = set(inspect.signature(simulate).parameters) - {"model", "x0", "params"}
    assert sig <= set(PARAMS), sig - set(PARAMS)
    assert {"beta", "sigma", "radius", "window", "causal", "top_k", "Q", "K", "V", "geometry"} <= set(PARAMS)
    for name, p in PARAMS.items():
        assert p.help and p.name == name
        if p.default is not None:
            assert p.validate(p.default) == p.default or name in ("dtype", "geometry")
    assert check("window", 4.0) == 4
    with pytest.raises(TypeError, match="unknown"):
        check("sigmaa", 1.0)
