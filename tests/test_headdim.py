"""particles.kernels.headdim (dense softmax / rbf at d > 4) against the numpy reference."""

import numpy as np
import pytest
from conftest import sphere_points

from particles import make_interaction, reference
from particles.kernels import headdim

#: float32 agreement with the float64 reference, relative to max|v| (β ≤ 3, σ ≥ 0.5 on the sphere)
FP32_RTOL = 1e-5
MODELS = [("sa", {"beta": 2.0}), ("usa", {"beta": 1.5}), ("krause", {"sigma": 0.7})]


def call(q, k, v, it, symmetric):
    return headdim.velocity_headdim(q, k, v, score=it.score, beta=it.beta, inv2s2=1.0 / (2.0 * it.sigma**2),
                                    normalise=it.normalise, symmetric=symmetric)


def relative_error(got, want):
    return np.abs(got - want).max() / np.abs(want).max()


@pytest.fixture(params=[None, 48], ids=["block-default", "block-48"])
def block(request, monkeypatch):
    """The default block sizes, and blocks of 48 keys (many blocks and ragged edges at small n)."""
    if request.param:
        monkeypatch.setattr(headdim, "BLOCK", {dt: request.param for dt in headdim.BLOCK})
    return request.param


@pytest.mark.parametrize("d", [5, 16, 64, 128])
@pytest.mark.parametrize("model,params", MODELS, ids=[m for m, _ in MODELS])
@pytest.mark.parametrize("symmetric", [True, False], ids=["symmetric", "general"])
def test_matches_reference(d, model, params, symmetric, block):
    n = 131 if block else 37
    it = make_interaction(model, **params)
    x = sphere_points(n, d, seed=d)
    want = reference.velocity(x, it)
    assert relative_error(call(x, x, x, it, symmetric), want) < 1e-10
    x32 = x.astype(np.float32)
    got32 = call(x32, x32, x32, it, symmetric)
    assert got32.dtype == np.float32
    assert relative_error(got32, want) < FP32_RTOL


@pytest.mark.parametrize("d", [5, 64])
def test_general_qkv_matches_reference(d):
    """Projected q = Qx, k = Kx, v = Vx with Q ≠ K (the general path), softmax and rbf."""
    rng = np.random.default_rng(d)
    Q, K, V = (np.eye(d) + 0.3 * rng.standard_normal((d, d)) for _ in range(3))
    x = sphere_points(90, d, seed=3)
    for model, params in MODELS:
        it = make_interaction(model, Q=Q, K=K, V=V, **params)
        q, k, v = (np.ascontiguousarray(x @ M.T) for M in (Q, K, V))
        assert relative_error(call(q, k, v, it, False), reference.velocity(x, it)) < 1e-10
    it = make_interaction("krause", Q=Q, K=Q, sigma=0.8)  # Q = K ≠ I: symmetric scores
    q = np.ascontiguousarray(x @ Q.T)
    assert relative_error(call(q, q, x, it, True), reference.velocity(x, it)) < 1e-10


@pytest.mark.parametrize("symmetric", [True, False], ids=["symmetric", "general"])
def test_rows_whose_shift_underflows_are_redone_exactly(symmetric, monkeypatch):
    """Query norms from 0.05 to 3 and β = 40: the shared bound |β|·max‖q‖² (symmetric) or
    |β|·‖q_i‖·max‖k‖ (general) leaves many rows' sums below `tiny`; they must be redone."""
    d, n = 8, 200
    x = sphere_points(n, d, seed=5) * np.linspace(0.05, 3.0, n)[:, None]
    it = make_interaction("sa", beta=40.0, geometry="euclidean")
    redone = []
    original = headdim.exact_rows
    monkeypatch.setattr(headdim, "exact_rows", lambda q, *a: redone.append(len(q)) or original(q, *a))
    for dtype, tol in ((np.float64, 1e-10), (np.float32, 1e-4)):
        xd = x.astype(dtype)
        got = call(xd, xd, xd, it, symmetric)
        assert np.all(np.isfinite(got))
        assert relative_error(got, reference.velocity(x, it)) < tol
    assert redone and min(redone) > 10


def test_usa_overflow_raises():
    x = sphere_points(50, 8) * 3.0
    with pytest.raises(OverflowError, match="beta"):
        headdim.velocity_headdim(x, x, x, score="softmax", beta=200.0, normalise=False, symmetric=True)


def test_bad_input_names_the_parameter():
    x = sphere_points(20, 6)
    with pytest.raises(ValueError, match="score"):
        headdim.velocity_headdim(x, x, x, score="flat")
    with pytest.raises(ValueError, match="^k "):
        headdim.velocity_headdim(x, x[:10], x, score="softmax")
    with pytest.raises(ValueError, match="^v "):
        headdim.velocity_headdim(x, x, x.astype(np.float32), score="softmax")
    with pytest.raises(ValueError, match="^out "):
        headdim.velocity_headdim(x, x, x, score="softmax", out=np.empty((20, 6), order="F"))
    with pytest.raises(ValueError, match="symmetric"):
        headdim.velocity_headdim(x, x[::-1].copy(), x, score="softmax", symmetric=True)


def test_scipy_blas_fallback_and_thread_count(monkeypatch):
    """The same results through scipy's cython_blas (used where torch exports no MKL) and on one
    numba thread (partial sums then come from one task: equal to rounding)."""
    import numba
    from numba.extending import get_cython_function_address

    x = sphere_points(300, 24, seed=2)
    it = make_interaction("krause", sigma=0.6)
    want = call(x, x, x, it, True)
    fallback = dict(float32=get_cython_function_address("scipy.linalg.cython_blas", "sgemm"),
                    float64=get_cython_function_address("scipy.linalg.cython_blas", "dgemm"),
                    threads=0, library="scipy cython_blas")
    monkeypatch.setattr(headdim, "_ADDRESSES", fallback)
    monkeypatch.setattr(headdim, "BLOCK", {dt: 64 for dt in headdim.BLOCK})
    for symmetric in (True, False):
        assert relative_error(call(x, x, x, it, symmetric), want) < 1e-13
    previous = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        assert relative_error(call(x, x, x, it, True), want) < 1e-13
    finally:
        numba.set_num_threads(previous)


def test_path_hooks_for_the_kernel_table():
    """applies/auto and run_field (symmetric exactly when Q = K) on a VelocityField-like object."""
    from types import SimpleNamespace

    rng = np.random.default_rng(4)
    d = 7
    M = np.eye(d) + 0.3 * rng.standard_normal((d, d))
    sa = make_interaction("sa")
    assert headdim.applies(sa, 10, 5) and not headdim.applies(sa, 10, 4)
    assert not headdim.applies(make_interaction("krause", top_k=3), 10, 8)
    assert not headdim.applies(make_interaction("hk", radius=1.0), 10, 8)
    assert headdim.auto(sa, headdim.MIN_N, 8) and not headdim.auto(sa, headdim.MIN_N - 1, 8)
    x = sphere_points(60, d, seed=6)
    seen = []
    original = headdim.velocity_headdim
    for params, symmetric in (({}, True), ({"Q": M, "K": M}, True), ({"Q": M, "V": M.T}, False)):
        it = make_interaction("krause", sigma=0.8, **params)
        field = SimpleNamespace(interaction=it, dtype=np.dtype(np.float64), Q=it.matrices(d)[0],
                                K=it.matrices(d)[1], V=it.matrices(d)[2])
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(headdim, "velocity_headdim",
                       lambda *a, **k: seen.append(k["symmetric"]) or original(*a, **k))
            got = headdim.run_field(field, x, np.empty((60, d)))
        assert seen[-1] is symmetric
        assert relative_error(got, reference.velocity(x, it)) < 1e-10
    for score in ("softmax", "rbf"):  # the SDPA route of general float32 cases, and directly
        it = make_interaction("sa" if score == "softmax" else "krause", Q=M, sigma=0.8)
        field = SimpleNamespace(interaction=it, dtype=np.dtype(np.float32), Q=M.astype(np.float32),
                                K=np.eye(d, dtype=np.float32), V=np.eye(d, dtype=np.float32))
        got = headdim.run_field(field, x.astype(np.float32), np.empty((60, d), np.float32))
        assert relative_error(got, reference.velocity(x, it)) < FP32_RTOL
        q = np.ascontiguousarray(x @ M.T)
        got = headdim.velocity_sdpa(q, x, x, score=score, beta=it.beta, inv2s2=1 / (2 * it.sigma**2))
        assert relative_error(got, reference.velocity(x, it)) < 1e-10


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_exp_block_floor_and_sums(dtype):
    """w = 2^(S + r_i + c_j), exactly 0 below the floor (no subnormal products in the BLAS), with
    the row and column sums added."""
    rng = np.random.default_rng(0)
    S = rng.uniform(-200 if dtype == np.float32 else -1000, 5, (7, 9)).astype(dtype)
    r, c = rng.uniform(-3, 0, 7).astype(dtype), rng.uniform(-3, 0, 9).astype(dtype)
    y = S.astype(np.float64) + r[:, None] + c[None, :]
    floor = headdim.weight_floor(9, dtype)
    want = np.where(y >= floor, np.exp2(y), 0.0)
    row, col = np.zeros(7, dtype), np.zeros(9, dtype)
    headdim.exp_block(S, 7, 9, r, c, dtype(floor), row, col, True)
    # (float32: y itself is rounded in float32, |y| ≤ 200 → relative 2e-5 in 2^y)
    np.testing.assert_allclose(S, want, rtol=1e-4 if dtype == np.float32 else 1e-12, atol=0)
    assert np.all(S[y < floor] == 0) and np.any(y < floor)
    np.testing.assert_allclose(row, want.sum(1), rtol=1e-4)
    np.testing.assert_allclose(col, want.sum(0), rtol=1e-4)
