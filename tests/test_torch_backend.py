"""particles.backends.torch against the numpy reference and the numba backend (CPU; GPU tests skip
without a GPU: select them with ``-k gpu``)."""

import numpy as np
import pytest
import torch
from conftest import PRESETS, RESTRICTIONS, random_qkv, sphere_points

from particles import make_interaction, reference, simulate
from particles.backends import torch as tb

FP32_RTOL = 1e-4  # float32 against the float64 reference, relative to max|v|
CASES = [(m, {**p, **r}) for m, p in PRESETS for r in RESTRICTIONS]
GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU (torch.cuda.is_available() is False)")


def interaction(model, params):
    params = dict(params)
    if model == "hk":
        params.setdefault("radius", 0.8)
    return make_interaction(model, **params)


def batch(n, d, samples=2, seed=0):
    return np.stack([sphere_points(n, d, seed=seed + s) for s in range(samples)])


def velocity(it, x, device="cpu"):
    S, n, d = x.shape
    field = tb.TorchField(it, n, d, tb.DTYPES[x.dtype], torch.device(device))
    return field, field(torch.from_numpy(x).to(device)).cpu().numpy()


def rel(got, want):
    return np.abs(got - want).max() / np.abs(want).max()


@pytest.mark.parametrize("model,params", CASES, ids=[f"{m}-{'-'.join(p) or 'dense'}" for m, p in CASES])
def test_velocity_and_weights_match_reference(model, params):
    it = interaction(model, params)
    x = batch(37, 3)
    field, v = velocity(it, x)
    assert field.path == ("sdpa" if it.normalise and it.score != "flat" and not (
        it.radius or it.window or it.top_k) else "rows")
    for s in range(len(x)):
        assert rel(v[s], reference.velocity(x[s], it)) < 1e-10
    w = field.weights(torch.from_numpy(x)).numpy()
    for s in range(len(x)):
        assert np.abs(w[s] - reference.weights(x[s], it)).max() < 1e-12
    _, v32 = velocity(it, x.astype(np.float32))
    assert v32.dtype == np.float32
    assert max(rel(v32[s], reference.velocity(x[s], it)) for s in range(len(x))) < FP32_RTOL


@pytest.mark.parametrize("d", [8, 64])
@pytest.mark.parametrize("restriction", [{}, {"causal": True}, {"window": 6, "top_k": 3}, {"radius": 1.1}])
def test_head_dimension_and_general_qkv(d, restriction):
    for model, params in PRESETS[:3]:
        it = make_interaction(model, **params, **restriction, **random_qkv(d, seed=d))
        x = batch(29, d, seed=3)
        _, v = velocity(it, x)
        for s in range(len(x)):
            assert rel(v[s], reference.velocity(x[s], it)) < 1e-10


def test_top_k_ties_go_to_the_smaller_key():
    """Flat scores tie everywhere: the k kept keys of each row are the first k in its support."""
    it = make_interaction("hk", radius=10.0, top_k=4)
    x = batch(12, 2)
    field, v = velocity(it, x)
    w = field.weights(torch.from_numpy(x)).numpy()
    assert np.array_equal(w[0] > 0, np.broadcast_to(np.arange(12) < 4, (12, 12)))
    assert rel(v[1], reference.velocity(x[1], it)) < 1e-12


@pytest.mark.parametrize("integrator,noise", [("euler", 0.0), ("rk4", 0.0), ("euler", 0.3)])
@pytest.mark.parametrize("model,params", [("sa", {"beta": 3.0}), ("krause", {"sigma": 0.5, "window": 5}),
                                          ("usa", {"beta": 1.0, "top_k": 4}),
                                          ("hk", {"radius": 0.3, "geometry": "euclidean"})])
def test_trajectory_matches_numba_backend(model, params, integrator, noise):
    """simulate(backend="torch") against backend="numba" for an ensemble: same x0, same noise keys."""
    kw = dict(n=24, d=3, samples=3, steps=12, save_every=4, dt=0.05, seed=2, integrator=integrator,
              noise=noise, **params)
    ours = simulate(model, backend="torch", **kw)
    want = simulate(model, backend="numba", **kw)
    assert ours.x.dims == want.x.dims and ours.x.shape == (3, 4, 24, 3)
    assert np.abs(ours.x.values - want.x.values).max() < 1e-10
    if integrator == "euler" and noise == 0:
        ours32 = simulate(model, backend="torch", dtype="float32", **kw)
        assert ours32.x.dtype == np.float32
        assert np.abs(ours32.x.values - want.x.values).max() < 1e-4


@pytest.mark.parametrize("geometry", ["sphere", "euclidean"])
def test_euler_maruyama_step_is_the_formula(geometry):
    """x1 = R(x0 + dt·f(x0) + √dt·noise·T ξ), ξ = kernels.noise.normals(key_s, step 0); T = P_x on the
    sphere, the identity in euclidean space."""
    from particles.kernels.noise import normals

    it = make_interaction("krause", sigma=0.5, geometry=geometry)
    x0, keys, dt, noise = batch(16, 3), np.array([11, 12], np.uint64), 0.05, 0.4
    traj, _ = tb.trajectory(it, x0, keep=np.array([0, 1]), dt=dt, noise=noise, noise_seed=keys)
    for s in range(2):
        v, xi = reference.velocity(x0[s], it), normals(keys[s], 0, (16, 3))
        if geometry == "sphere":
            def tangent(u, x=x0[s]):
                return u - (u * x).sum(1, keepdims=True) * x

            y = x0[s] + dt * tangent(v) + np.sqrt(dt) * noise * tangent(xi)
            y /= np.linalg.norm(y, axis=1, keepdims=True)
        else:
            y = x0[s] + dt * (v - x0[s]) + np.sqrt(dt) * noise * xi
        assert np.abs(traj[s, 1] - y).max() < 1e-12


def test_noise_is_projected_by_the_geometry_object():
    """T_x ξ is the geometry's own project(): a Geometry subclass under another name integrates as its
    parent does (no branch on the geometry's name)."""
    from particles.geometry import EUCLIDEAN, Euclidean

    class Plane(Euclidean):
        name = "plane"

    it = make_interaction("krause", sigma=0.5, geometry="euclidean")
    kw = dict(keep=np.array([0, 1, 2]), dt=0.05, noise=0.4, noise_seed=np.array([11, 12], np.uint64))
    want, _ = tb.trajectory(it, batch(16, 3), geometry=EUCLIDEAN, **kw)
    got, _ = tb.trajectory(it, batch(16, 3), geometry=Plane(), **kw)
    np.testing.assert_array_equal(got, want)


def test_trajectory_weights_and_sdpa_rbf_causal():
    kw = dict(n=20, d=5, steps=3, dt=0.1, seed=1, sigma=0.7, causal=True, return_weights=True)
    ours, want = simulate("krause", backend="torch", **kw), simulate("krause", backend="numba", **kw)
    assert ours.attention.dims == ("time", "query", "key")
    assert np.abs(ours.attention.values - want.attention.values).max() < 1e-12
    assert np.abs(ours.x.values - want.x.values).max() < 1e-12


def test_chunked_rows_agree_with_one_chunk(monkeypatch):
    it = make_interaction("krause", sigma=0.6, radius=1.0, top_k=5)
    x = batch(40, 3)
    _, whole = velocity(it, x)
    monkeypatch.setattr(tb, "CHUNK", 2 * 40 * 3 * 7)  # 7 rows per chunk
    field, chunked = velocity(it, x)
    assert len(field._chunks(2)) == 6
    assert np.abs(chunked - whole).max() < 1e-14


def test_bad_device_and_arguments():
    it = make_interaction("sa")
    x0 = batch(5, 3)
    with pytest.raises(ValueError, match="device"):
        tb.trajectory(it, x0, keep=np.array([0, 1]), dt=0.1, device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device='cuda'"):
            tb.trajectory(it, x0, keep=np.array([0, 1]), dt=0.1, device="cuda")
    with pytest.raises(ValueError, match="integrator"):
        tb.trajectory(it, x0, keep=np.array([0, 1]), dt=0.1, integrator="heun")
    with pytest.raises(ValueError, match="x0"):
        tb.trajectory(it, x0[0], keep=np.array([0, 1]), dt=0.1)
    with pytest.raises(ValueError, match="noise_seed"):
        tb.trajectory(it, x0, keep=np.array([0, 1]), dt=0.1, noise=0.1, noise_seed=np.arange(3))


def test_usa_overflow_is_reported():
    with pytest.raises(OverflowError, match="beta"):
        simulate("usa", n=20, d=3, steps=2, dt=0.1, beta=800.0, backend="torch")


GPU_CASES = [("sa", {"beta": 2.0}), ("krause", {"sigma": 0.6}),
             ("krause", {"sigma": 0.6, "window": 16, "causal": True, "top_k": 4}),
             ("hk", {"radius": 0.3, "geometry": "euclidean"})]


@GPU
@pytest.mark.parametrize("model,params", GPU_CASES)
def test_gpu_matches_cpu(model, params):
    kw = dict(n=300, d=16, samples=2, steps=5, dt=0.05, seed=0, **params)
    gpu = simulate(model, backend="torch", device="cuda", **kw)
    cpu = simulate(model, backend="torch", device="cpu", **kw)
    assert np.abs(gpu.x.values - cpu.x.values).max() < 1e-10
    gpu32 = simulate(model, backend="torch", device="cuda", dtype="float32", **kw)
    assert np.abs(gpu32.x.values - cpu.x.values).max() < 1e-3
