"""Every kernel path against the numpy reference (issue 4); no wall-clock assertions here."""

import numpy as np
import pytest
from conftest import PRESETS, RESTRICTIONS, random_qkv, sphere_points
from numba import njit

from particles import make_interaction, reference
from particles.kernels import PATHS, choose_path, hk1d, tiles, trajectory, velocity_field
from particles.kernels.fastexp import WINDOW_LANES, count_far_left, count_near, exp2_sat, fexp
from particles.kernels.hk1d import CHUNK, PARALLEL_SORT_MIN, SortedSweep, argsort
from particles.kernels.neighbours import neighbour_lists
from particles.kernels.simd import (
    lanes,
    vadd,
    vdot4,
    vexp2,
    vfma,
    vload,
    vmul,
    vsplat,
    vsqdist4,
    vstore,
    vsub,
    vtranspose,
    vzero_above,
)


def applicable_paths(it, n, d):
    out = []
    for path in PATHS:
        try:
            velocity_field(it, n, d, np.float64, path=path)
        except ValueError:
            continue
        out.append(path)
    return out


def build(model, base, restriction, general_qkv, d):
    params = {**base, **restriction}
    if model == "hk":
        params["radius"] = restriction.get("radius", base["radius"])
    if general_qkv:
        params.update(random_qkv(d))
    return make_interaction(model, **params)


@pytest.mark.parametrize("model, base", PRESETS)
@pytest.mark.parametrize("restriction", RESTRICTIONS)
@pytest.mark.parametrize("general_qkv", [False, True])
@pytest.mark.parametrize("d", [3, 6])
def test_every_path_matches_reference(model, base, restriction, general_qkv, d):
    n = 37
    it = build(model, base, restriction, general_qkv, d)
    x = sphere_points(n, d)
    ref_v, ref_w = reference.velocity(x, it), reference.weights(x, it)
    paths = applicable_paths(it, n, d)
    assert "range" in paths
    for path in paths:
        field = velocity_field(it, n, d, np.float64, path=path)
        np.testing.assert_allclose(field(x), ref_v, rtol=0, atol=1e-10, err_msg=path)
        np.testing.assert_allclose(field.weights(x), ref_w, rtol=0, atol=1e-10, err_msg=path)
        v32 = velocity_field(it, n, d, np.float32, path=path)(x.astype(np.float32))
        assert v32.dtype == np.float32
        np.testing.assert_allclose(v32, ref_v, rtol=0, atol=1e-5, err_msg=path)


def test_automatic_choice():
    assert choose_path(make_interaction("sa"), 4096, 3) == "symmetric"
    assert choose_path(make_interaction("krause", Q=np.eye(3) * 2, K=np.eye(3) * 2), 4096, 3) == "symmetric"
    assert choose_path(make_interaction("sa", Q=np.eye(3) * 2), 4096, 3) == "fused"  # Q ≠ K
    assert choose_path(make_interaction("sa"), 100, 3) == "fused"
    assert choose_path(make_interaction("sa"), 4096, 64) == "headdim"
    assert choose_path(make_interaction("sa"), 100, 64) == "blas"
    assert choose_path(make_interaction("krause"), 4096, 64) == "headdim"
    assert choose_path(make_interaction("krause", window=9), 4096, 64) == "range"
    assert choose_path(make_interaction("sa", causal=True), 4096, 64) == "range"
    assert choose_path(make_interaction("krause", window=128, causal=True, top_k=32), 10**6, 3) == "range"
    assert choose_path(make_interaction("krause", window=128, causal=True), 10**6, 3) == "fused"
    assert choose_path(make_interaction("hk", radius=0.1), 10**6, 1) == "hk1d"
    assert choose_path(make_interaction("hk", radius=0.1), 10**5, 2) == "neighbours"
    assert choose_path(make_interaction("hk", radius=0.1), 100, 2) == "fused"
    assert choose_path(make_interaction("hk", radius=0.1, window=3), 10**5, 1) == "fused"
    with pytest.raises(ValueError, match="path"):
        velocity_field(make_interaction("sa"), 10, 3, path="hk1d")
    with pytest.raises(ValueError, match="path"):
        velocity_field(make_interaction("sa", top_k=2), 10, 3, path="fused")


@pytest.mark.parametrize("d", [1, 2, 4])
def test_fused_dimensions(d):
    n = 29
    for model, base in PRESETS:
        it = make_interaction(model, **base)
        x = sphere_points(n, d, seed=d)
        field = velocity_field(it, n, d, np.float64, path="fused")
        np.testing.assert_allclose(field(x), reference.velocity(x, it), rtol=0, atol=1e-10)


def test_fused_falls_back_to_exact_max_when_the_bound_is_loose():
    """Large β with Q ≠ K: β‖q_i‖ max‖k‖ exceeds the row max by far more than the float range."""
    d, n = 3, 40
    rng = np.random.default_rng(5)
    Q, K = rng.standard_normal((d, d)), rng.standard_normal((d, d)) * 3.0
    it = make_interaction("sa", beta=300.0, Q=Q, K=K)
    x = sphere_points(n, d, seed=6)
    for dtype, atol in ((np.float64, 1e-10), (np.float32, 1e-4)):
        v = velocity_field(it, n, d, dtype, path="fused")(x.astype(dtype))
        assert np.all(np.isfinite(v))
        np.testing.assert_allclose(v, reference.velocity(x, it), rtol=0, atol=atol)


def test_symmetric_kernel_redoes_rows_the_shared_shift_underflows():
    """Q = K with very unequal ‖q_i‖: one shift |β|·max‖q‖² for every row underflows the rows of
    short queries in float32; those rows are redone with their exact max. Also several blocks
    and tasks (n > SYMMETRIC_BLOCK, odd block count)."""
    from particles.kernels import dense

    n, d = 2 * dense.SYMMETRIC_BLOCK + 37, 3
    Q = np.diag([1.0, 1.0, 12.0])
    x = sphere_points(n, d, seed=8)
    for model, params in (("sa", dict(beta=4.0, Q=Q, K=Q)), ("krause", dict(sigma=0.4, Q=Q, K=Q)),
                          ("usa", dict(beta=0.05)), ("sa", dict(beta=1.0))):
        it = make_interaction(model, **params)
        ref = reference.velocity(x, it)
        for dtype, atol in ((np.float64, 1e-10), (np.float32, 2e-5)):
            field = velocity_field(it, n, d, dtype)
            v = field(x.astype(dtype))
            assert field.last_path == "symmetric"
            np.testing.assert_allclose(v, ref, rtol=0, atol=atol * max(1.0, np.abs(ref).max()),
                                       err_msg=f"{model} {dtype}")


def test_top_k_ties_go_to_the_smaller_index():
    """Repeated points give exactly equal scores; every path keeps the smaller j."""
    base = sphere_points(5, 3, seed=2)
    x = np.concatenate([base, base, base])  # each score appears three times per row
    n = x.shape[0]
    for model, params in (("krause", {"sigma": 0.7}), ("sa", {"beta": 1.0}), ("hk", {"radius": 5.0})):
        it = make_interaction(model, top_k=4, **params)
        for dtype in (np.float64, np.float32):
            xd = x.astype(dtype)
            field = velocity_field(it, n, 3, dtype, path="range")
            np.testing.assert_array_equal(field.weights(xd) > 0, reference.support(x, it))
        np.testing.assert_allclose(velocity_field(it, n, 3)(x), reference.velocity(x, it), atol=1e-12)


def test_radius_ties_count_in_every_path():
    """Opinions on a lattice with spacing exactly R: the neighbours at distance R are inside."""
    R, n = 0.125, 33
    x = (np.arange(n) * R)[:, None]
    it = make_interaction("hk", radius=R)
    expected = reference.velocity(x, it)
    for path in ("hk1d", "neighbours", "fused", "range"):
        v = velocity_field(it, n, 1, np.float64, path=path)(x)
        np.testing.assert_allclose(v, expected, rtol=0, atol=1e-12, err_msg=path)
    x2 = np.stack([x[:, 0], np.zeros(n)], axis=1)
    for path in ("neighbours", "fused", "range"):
        v = velocity_field(it, n, 2, np.float64, path=path)(x2)
        np.testing.assert_allclose(v, reference.velocity(x2, it), rtol=0, atol=1e-12, err_msg=path)


def test_hk1d_keeps_the_order_and_resorts_when_needed():
    rng = np.random.default_rng(0)
    n, R = 500, 0.05
    x = rng.random((n, 1))
    it = make_interaction("hk", radius=R)
    field = velocity_field(it, n, 1)
    assert field.path == "hk1d"
    for _ in range(5):  # dt = 1: exactly the HK map, order preserved, sorted once
        v = field(x)
        np.testing.assert_allclose(v, reference.velocity(x, it), rtol=0, atol=1e-12)
        x = v
    assert field.sweep.resorts == 1
    np.testing.assert_allclose(field(x[:50]), reference.hk_map(x[:50], R), rtol=0, atol=1e-12)
    y = rng.random((n, 1))  # a new, unrelated state: the stale order is detected
    np.testing.assert_allclose(field(y), reference.velocity(y, it), rtol=0, atol=1e-12)
    assert field.sweep.resorts == 3


def test_hk1d_matches_a_direct_sum_for_many_opinions():
    rng = np.random.default_rng(3)
    n, R = 20000, 0.01
    x = rng.random(n)
    v = SortedSweep()(x[:, None], (R * (1 + 1e-9)) ** 2)[:, 0]
    sample = rng.choice(n, 50, replace=False)
    for i in sample:
        near = x[(x - x[i]) ** 2 <= (R * (1 + 1e-9)) ** 2]
        assert abs(v[i] - near.mean()) < 1e-13


@pytest.mark.parametrize("n, dtype", [(1, np.float64), (5, np.float64), (CHUNK + 3, np.float64),
                                      (2 * CHUNK, np.float64), (3 * CHUNK + 17, np.float64),
                                      (2 * CHUNK + 9, np.float32)])
def test_hk1d_prefix_sums_in_blocks_are_exact_sums(n, dtype):
    """The blocked compensated prefix sums: P[k] = p_hi[k] + p_lo[k] is Σ_{p<k} xs[p] within the
    cascaded-sum bound (k·eps)²·Σ|xs[p]| (the residual by math.fsum, exact), at every block boundary
    and anywhere, for lengths that leave some of a task's blocks short or empty; the serial and the
    parallel versions give the same bits."""
    import math

    rng = np.random.default_rng(n)
    xs = np.sort(rng.normal(size=n) * 10.0 ** rng.integers(-3, 4, n)).astype(dtype)
    p_hi, p_lo = np.empty(n + 1), np.empty(n + 1)
    q_hi, q_lo = np.full(n + 1, np.nan), np.full(n + 1, np.nan)
    hk1d.prefix_sums(xs, n, p_hi, p_lo)
    hk1d.prefix_sums_parallel(xs, n, q_hi, q_lo)
    np.testing.assert_array_equal(p_hi, q_hi)
    np.testing.assert_array_equal(p_lo, q_lo)
    B = CHUNK
    ks = {0, n, *range(0, n + 1, B), *(k + d for k in range(0, n + 1, B) for d in (-1, 1)),
          *rng.integers(0, n + 1, 50)}
    eps = np.finfo(np.float64).eps
    for k in sorted(k for k in ks if 0 <= k <= n):
        residual = math.fsum([*xs[:k].astype(np.float64), -p_hi[k], -p_lo[k]])
        assert abs(residual) <= 4 * (k * eps) ** 2 * np.abs(xs[:k]).sum(dtype=np.float64), k
    assert abs(math.fsum([*xs.astype(np.float64), -p_hi[n]])) > 0 or n < 3  # p_hi alone is not the sum


@njit
def _window_counts(xs, starts, centres, r2):
    out = np.empty((starts.shape[0], 2), np.int64)
    for k in range(starts.shape[0]):
        out[k, 0] = count_near(xs, starts[k], centres[k], r2)
        out[k, 1] = count_far_left(xs, starts[k], centres[k], r2)
    return out


@pytest.mark.parametrize("dtype, r2_dtype", [(np.float64, np.float64), (np.float32, np.float64),
                                             (np.float32, np.float32)])
def test_window_counts_match_the_scalar_predicate(dtype, r2_dtype):
    """The vector counts of the 1-D HK sweep = the scalar counts over WINDOW_LANES keys: u² ≤ r2,
    and u < 0 with u² > r2, u = x_j − c in the storage dtype and u² compared in r2's type (ties,
    keys on both sides of c, +inf padding)."""
    rng = np.random.default_rng(7)
    xs = np.concatenate([np.round(rng.normal(size=500), 1), np.full(WINDOW_LANES, np.inf)]).astype(dtype)
    starts = rng.integers(0, 500, 300)
    centres = xs[rng.integers(0, 500, 300)]
    r2 = r2_dtype(0.15**2)
    got = _window_counts(xs, starts, centres, r2)
    for (start, c), (near, far_left) in zip(zip(starts, centres), got):
        u = xs[start:start + WINDOW_LANES] - c
        square = (u * u).astype(r2_dtype)
        assert near == np.count_nonzero(square <= r2)
        assert far_left == np.count_nonzero((u < 0) & ~(square <= r2))


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_hk1d_sweep_across_tasks_and_clusters(dtype):
    """Several parallel tasks, ties, jumps of both window ends longer than the vector lookahead
    (clusters of equal opinions with gaps wider than the radius), windows of one or two opinions
    (an end that stays behind the position two back): every checked position is the
    mean over the predicate (x_j − x_i)² ≤ r2, evaluated as the kernels do."""
    rng = np.random.default_rng(5)
    n, R = 2 * CHUNK + 123, 0.01
    isolated = 2.0 + 3 * R * np.arange(300)  # windows of one opinion, and of two (the pairs)
    pairs = 4.0 + 3 * R * np.repeat(np.arange(100), 2) + np.tile([0, R / 2], 100)
    x = np.concatenate([np.repeat(rng.random(40), 1000), isolated, pairs,
                        rng.random(n - 40500)]).astype(dtype)
    rng.shuffle(x)
    r2 = np.float64(R * R)
    v = SortedSweep()(x[:, None], r2)[:, 0]
    order = np.argsort(x, kind="stable")
    edges = np.flatnonzero(np.diff(x[order]) > R)
    checks = np.concatenate([order[[0, n - 1, CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK]], order[edges],
                             order[edges + 1], rng.choice(n, 100, replace=False), order[-500:]])
    tol = 1e-13 if dtype == np.float64 else 1e-6  # float32: the mean rounded to the output dtype
    for i in checks:
        u = x - x[i]
        near = x[(u * u).astype(np.float64) <= r2]
        assert abs(v[i] - near.astype(np.float64).mean()) <= tol


@pytest.mark.parametrize("parts", [None, 1, 2, 3, 4])
def test_hk1d_argsort_sorts_in_parallel_parts(parts):
    """Sorted runs of 1-4 parts merged (an odd count leaves a run for the next round): a permutation
    with x[perm] equal to np.sort(x), ties and float32 included."""
    rng = np.random.default_rng(parts or 0)
    n = 4 * PARALLEL_SORT_MIN + 7
    tied, single = np.round(rng.normal(size=n), 1), rng.random(n).astype(np.float32)
    for x in (rng.random(n), tied, single, rng.random(99)):
        perm = argsort(x, parts)
        assert perm.dtype == np.int64
        np.testing.assert_array_equal(np.sort(perm), np.arange(x.shape[0]))
        np.testing.assert_array_equal(x[perm], np.sort(x))


def test_radix_sorted_run_sorts_any_float_range():
    """hk1d.radix_sorted_run = np.sort of x[start:stop] with indices into x: negative numbers, ±0,
    ±inf, subnormals, huge and tied values, float32, an empty range; stable (ties keep their order)."""
    rng = np.random.default_rng(4)
    special = np.array([0.0, -0.0, -1.5, 2.0, -np.inf, np.inf, 5e-324, -5e-324, 1e308, -1e308, 2.0])
    for x in (rng.random(5000), rng.normal(size=3001) * 1e200, np.round(rng.normal(size=4000), 1), special,
              rng.normal(size=2000).astype(np.float32)):
        for start, stop in ((0, x.size), (3, x.size - 2), (4, 4)):
            values, idx = radix_sorted_run(x, start, stop)
            assert idx.dtype == np.int64 and values.dtype == x.dtype
            np.testing.assert_array_equal(np.sort(idx), np.arange(start, stop))
            np.testing.assert_array_equal(values, x[idx])
            np.testing.assert_array_equal(values, np.sort(x[start:stop]))
            bits = values.view(f"i{values.itemsize}")
            assert np.all(np.diff(idx)[bits[1:] == bits[:-1]] > 0)  # stable
    assert np.signbit(radix_sorted_run(special, 0, 11)[0][4])  # −0 before +0


def radix_sorted_run(x, start, stop):
    """hk1d.radix_sorted_run into fresh buffers: (sorted values, their indices)."""
    m = stop - start
    values, idx = np.empty(m, x.dtype), np.empty(m, np.int64)
    hk1d.radix_sorted_run(x, start, stop, np.empty(m, np.int64), np.empty(m, np.int64), np.empty(m, np.int64),
                          values, idx)
    return values, idx


def test_merge_tasks_cut_anywhere_give_the_serial_merge():
    """hk1d.merge_tasks: a merge of two sorted runs cut into pieces at any output positions (merge
    path splits) equals the serial stable merge (ties: the first run first), with heavy ties."""
    rng = np.random.default_rng(6)
    for la, lb in ((500, 300), (0, 40), (40, 0), (1, 1), (257, 1000)):
        runs = [np.sort(rng.integers(0, 20, m)) for m in (la, lb)]
        values = np.concatenate(runs).astype(float)
        ids = np.arange(la + lb)
        expect = np.argsort(values, kind="stable")  # runs sorted and ties by index: the stable merge
        for cuts in ([0, la + lb], [0, 1, la + lb], sorted({0, la + lb, *rng.integers(0, la + lb + 1, 5)})):
            tasks = np.array([(0, la, la + lb, a, b) for a, b in zip(cuts[:-1], cuts[1:])], np.int64)
            to_values, to_ids = np.full(la + lb, np.nan), np.full(la + lb, -1)
            for t in rng.permutation(len(tasks)):
                hk1d.merge_tasks(values, ids, to_values, to_ids, True, tasks[t:t + 1])
            np.testing.assert_array_equal(to_ids, expect)
            np.testing.assert_array_equal(to_values, values[expect])


def test_neighbour_lists_and_density_switch():
    rng = np.random.default_rng(1)
    x = rng.random((3000, 2))
    r2 = 0.02**2
    indptr, indices = neighbour_lists(x, r2, max_fraction=1.0)
    for i in (0, 17, 2999):
        row = indices[indptr[i]:indptr[i + 1]]
        assert np.all(np.diff(row) > 0) and i in row
        exact = np.flatnonzero(((x - x[i]) ** 2).sum(1) <= r2)
        assert set(exact) <= set(row)
    assert neighbour_lists(x, 0.5**2) is None  # too dense: the caller uses the dense kernel
    it = make_interaction("hk", radius=0.02)
    field = velocity_field(it, 3000, 2)
    v = field(x)
    assert field.last_path == "neighbours"
    sub = rng.choice(3000, 40, replace=False)
    for i in sub:
        near = ((x - x[i]) ** 2).sum(1) <= (0.02 * (1 + 1e-9)) ** 2
        np.testing.assert_allclose(v[i], x[near].mean(0), atol=1e-12)
    field(rng.random((3000, 2)) * 0.05)  # everything within the radius: dense is faster
    assert field.last_path == "fused"


def test_windowed_top_k_is_linear_memory():
    """n = 200 000 with a window: an n×n array (160 GB) could never be allocated."""
    n, d = 200_000, 3
    it = make_interaction("krause", sigma=0.5, window=16, causal=True, top_k=4)
    x = sphere_points(n, d, seed=4).astype(np.float32)
    v = velocity_field(it, n, d, np.float32)(x)
    assert v.shape == (n, d) and np.all(np.isfinite(v))
    sub = x[-300:].astype(np.float64)  # the last rows only see the last 16 keys
    ref = reference.velocity(sub, it)
    np.testing.assert_allclose(v[-200:], ref[-200:], atol=1e-5)


def test_usa_overflow_is_reported_on_fast_paths():
    x = sphere_points(30, 3)
    for path in ("fused", "range"):
        with pytest.raises(OverflowError, match="beta"):
            velocity_field(make_interaction("usa", beta=2000.0), 30, 3, np.float32, path=path)(
                x.astype(np.float32))


def test_usa_overflow_message_has_one_home():
    """The kernels, the head-dim kernel and simulate all say it with particles.interaction's helper."""
    from particles import simulate
    from particles.interaction import usa_overflow_message
    from particles.kernels import headdim

    x = sphere_points(30, 3).astype(np.float32)
    with pytest.raises(OverflowError) as err:
        velocity_field(make_interaction("usa", beta=2000.0), 30, 3, np.float32, path="fused")(x)
    assert str(err.value) == usa_overflow_message(2000.0, np.float32)
    y = sphere_points(50, 8) * 3.0
    with pytest.raises(OverflowError) as err:
        headdim.velocity_headdim(y, y, y, score="softmax", beta=200.0, normalise=False, symmetric=True)
    assert str(err.value) == usa_overflow_message(200.0, np.float64)
    with pytest.raises(OverflowError) as err:
        simulate("usa", n=10, d=3, steps=5, dt=0.1, beta=1e3)
    assert str(err.value) == usa_overflow_message(1e3, np.float64, 0, 0.1)


@njit(cache=True)
def _fexp_array(x):
    out = np.empty_like(x)
    for i in range(x.size):
        out[i] = fexp(x[i])
    return out


@pytest.mark.parametrize("dtype, rtol", [(np.float32, 1e-6), (np.float64, 1e-14)])
def test_polynomial_exp(dtype, rtol):
    x = np.linspace(-80, 80, 100_001).astype(dtype)
    np.testing.assert_allclose(_fexp_array(x), np.exp(x.astype(np.float64)), rtol=rtol)
    special = _fexp_array(np.array([-np.inf, -1e4, 0.0, 1e4, np.inf], dtype))
    np.testing.assert_array_equal(special, [0.0, 0.0, 1.0, np.inf, np.inf])


@njit(cache=True)
def _exp2_sat_array(y):
    out = np.empty_like(y)
    for i in range(y.size):
        out[i] = exp2_sat(y[i])
    return out


@pytest.mark.parametrize("dtype, rtol, floor, top",
                         [(np.float32, 3e-7, -125, 128), (np.float64, 1e-15, -1021, 1024)])
def test_saturating_exp2(dtype, rtol, floor, top):
    """2^y to the documented accuracy in its range, 2^floor below it (never 0), +inf from `top` on."""
    y = np.linspace(floor, top - 1, 200_001).astype(dtype)
    np.testing.assert_allclose(_exp2_sat_array(y), np.exp2(y.astype(np.float64)), rtol=rtol)
    special = _exp2_sat_array(np.array([-np.inf, floor - 50.5, 0.0, 1.0, top, np.inf], dtype))
    np.testing.assert_array_equal(special, [2.0**floor, 2.0**floor, 1.0, 2.0, np.inf, np.inf])


@njit(cache=True)
def _simd_ops(a, b, c, out):
    """Every explicit-vector operation once per vector of a, b, c (1-D, a whole number of vectors)."""
    for s in range(0, a.shape[0], lanes(a)):
        x, y, z = vload(a, s), vload(b, s), vload(c, s)
        vstore(out[0], s, vadd(x, y))
        vstore(out[1], s, vsub(x, y))
        vstore(out[2], s, vmul(x, y))
        vstore(out[3], s, vfma(x, y, z))
        vstore(out[4], s, vexp2(x))
        vstore(out[5], s, vsplat(c[s]))
        vstore(out[6], s, vzero_above(x, y, z))


@pytest.mark.parametrize("dtype, rtol, floor, top",
                         [(np.float32, 3e-7, -125, 128), (np.float64, 1e-15, -1021, 1024)])
def test_explicit_vectors_compute_what_numpy_does(dtype, rtol, floor, top):
    """kernels.simd: lane-wise +, −, ·, fma, splat, the mask as numpy computes them, and vexp2 = exp2_sat's
    2^y to the same accuracy with the same saturation (2^floor below the range, +inf from `top`)."""
    rng = np.random.default_rng(0)
    special = [-np.inf, floor - 50.5, 0.0, 1.0, top, np.inf, floor, top - 1]
    m = 4096 - len(special)
    a = np.concatenate([np.linspace(floor, top - 1, m), special]).astype(dtype)
    b, c = rng.standard_normal((2, a.size)).astype(dtype)
    out = np.empty((7, a.size), dtype)
    _simd_ops(a, b, c, out)
    np.testing.assert_array_equal(out[0], a + b)
    np.testing.assert_array_equal(out[1], a - b)
    np.testing.assert_array_equal(out[2], a * b)
    exact = a[:m].astype(np.float64) * b[:m] + c[:m]
    np.testing.assert_allclose(out[3][:m], exact, rtol=0, atol=2 * np.finfo(dtype).eps * np.abs(exact).max())
    np.testing.assert_allclose(out[4][:m], np.exp2(a[:m].astype(np.float64)), rtol=rtol)
    np.testing.assert_array_equal(out[4][m:], [2.0**floor, 2.0**floor, 1.0, 2.0, np.inf, np.inf, 2.0**floor,
                                               2.0 ** (top - 1)])
    width = 64 // a.itemsize  # 512-bit vectors
    np.testing.assert_array_equal(out[5], np.repeat(c[::width], width))
    np.testing.assert_array_equal(out[6], np.where(a > b, 0, c))


def _top_k_rows(rng, m, k):
    """Rows that exercise every branch of the threshold search: spread, clustered, tied, masked."""
    yield rng.random(m)
    yield np.concatenate([rng.normal(0, 1e-3, m // 2), rng.normal(5, 1e-3, m - m // 2)])  # two clumps
    yield rng.integers(0, 4, m).astype(float)  # massive ties at and below the k-th place
    yield np.full(m, 0.25)  # all equal
    row = rng.random(m)
    row[rng.random(m) < 0.5] = -np.inf  # radius-masked entries
    yield row
    yield np.where(rng.random(m) < 0.9, -np.inf, rng.random(m))  # fewer finite values than k
    yield np.where(np.arange(m) < m - k, -np.inf, rng.random(m))  # exactly k finite values
    yield np.nextafter(0.5, 1.0) ** np.arange(m)  # neighbours one ulp apart: the floats run out


@njit(cache=True)
def _transpose8(a, out):
    """out ← the transpose of the 8 × 8 float64 tile a (row-major), through vectors."""
    rows = (vload(a, 0), vload(a, 8), vload(a, 16), vload(a, 24), vload(a, 32), vload(a, 40), vload(a, 48),
            vload(a, 56))
    cols = vtranspose(rows)
    for s in range(8):
        vstore(out, 8 * s, cols[s])


@njit(cache=True)
def _transpose16(a, out):
    """out ← the transpose of the 16 × 16 float32 tile a (row-major), through vectors."""
    rows = (vload(a, 0), vload(a, 16), vload(a, 32), vload(a, 48), vload(a, 64), vload(a, 80), vload(a, 96),
            vload(a, 112), vload(a, 128), vload(a, 144), vload(a, 160), vload(a, 176), vload(a, 192),
            vload(a, 208), vload(a, 224), vload(a, 240))
    cols = vtranspose(rows)
    for s in range(16):
        vstore(out, 16 * s, cols[s])


@njit(cache=True)
def _component_sums(a, b, sums):
    """sums[0, D − 1] ← vdot4 and sums[1, D − 1] ← vsqdist4 of a's first four vectors against b's
    (c: b's fifth), for D = 1…4."""
    W = lanes(a)
    a0, a1, a2, a3 = vload(a, 0), vload(a, W), vload(a, 2 * W), vload(a, 3 * W)
    b0, b1, b2, b3 = vload(b, 0), vload(b, W), vload(b, 2 * W), vload(b, 3 * W)
    c = vload(b, 4 * W)
    vstore(sums[0, 0], 0, vdot4(1, a0, a1, a2, a3, b0, b1, b2, b3, c))
    vstore(sums[0, 1], 0, vdot4(2, a0, a1, a2, a3, b0, b1, b2, b3, c))
    vstore(sums[0, 2], 0, vdot4(3, a0, a1, a2, a3, b0, b1, b2, b3, c))
    vstore(sums[0, 3], 0, vdot4(4, a0, a1, a2, a3, b0, b1, b2, b3, c))
    vstore(sums[1, 0], 0, vsqdist4(1, a0, a1, a2, a3, b0, b1, b2, b3))
    vstore(sums[1, 1], 0, vsqdist4(2, a0, a1, a2, a3, b0, b1, b2, b3))
    vstore(sums[1, 2], 0, vsqdist4(3, a0, a1, a2, a3, b0, b1, b2, b3))
    vstore(sums[1, 3], 0, vsqdist4(4, a0, a1, a2, a3, b0, b1, b2, b3))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_vector_transpose_and_component_sums(dtype):
    """simd.vtranspose is the transpose of a square tile of vectors; vdot4 and vsqdist4 are the sums
    over the first D components, as numpy computes them (to an fma's rounding)."""
    W = 64 // np.dtype(dtype).itemsize
    rng = np.random.default_rng(2)
    a = rng.standard_normal(W * W).astype(dtype)
    b = rng.standard_normal(5 * W).astype(dtype)
    out, sums = np.empty(W * W, dtype), np.empty((2, 4, W), dtype)
    (_transpose8 if W == 8 else _transpose16)(a, out)
    _component_sums(a, b, sums)
    np.testing.assert_array_equal(out.reshape(W, W), a.reshape(W, W).T)
    A, B = a[:4 * W].reshape(4, W).astype(np.float64), b[:4 * W].reshape(4, W).astype(np.float64)
    tol = 8 * np.finfo(dtype).eps * 10
    for D in range(1, 5):
        np.testing.assert_allclose(sums[0, D - 1], b[4 * W:] + (A[:D] * B[:D]).sum(0), rtol=0, atol=tol)
        np.testing.assert_allclose(sums[1, D - 1], ((A[:D] - B[:D]) ** 2).sum(0), rtol=0, atol=tol)


TILE_CASES = [  # (model, params, points, dtype, dimensions): softmax, usa, rbf, loose rows; each compiled
    ("sa", dict(beta=2.0), "sphere", np.float64, (1, 2, 3, 4)),  # specialisation takes seconds
    ("sa", dict(beta=2.0), "sphere", np.float32, (3,)),
    ("usa", dict(beta=1.0), "sphere", np.float64, (2,)),
    ("krause", dict(sigma=0.6), "euclidean", np.float64, (1, 4)),
    ("krause", dict(sigma=0.6), "euclidean", np.float32, (2,)),
    ("sa", dict(beta=300.0), "scaled", np.float64, (3,)),  # ‖q_i‖ 0.05 to 2: the shared shift underflows rows
]


@pytest.mark.parametrize("model, params, points, dtype, dims", TILE_CASES)
def test_symmetric_tiles_match_the_reference(model, params, points, dtype, dims):
    """kernels.tiles: each w_ij once, in square tiles of explicit vectors with both rows' sums in
    registers (a transpose per tile), the tiles dealt into shares = the numpy reference for every
    d ≤ 4 and n (whole and ragged blocks, n smaller than one vector), softmax, usa and rbf scores,
    and rows whose Σ w underflowed the shared shift (redone with their exact max). The shares added in
    any order of computation give the same numbers: the lockstep threads' shares = one thread's."""
    it = make_interaction(model, **params)
    rng = np.random.default_rng(11)
    W = 64 // np.dtype(dtype).itemsize
    for d in dims:
        for n in (1, 5, W, W + 3, 3 * W, 5 * W - 1):
            x = rng.standard_normal((n, d))
            if points != "euclidean":
                x /= np.linalg.norm(x, axis=1, keepdims=True)
            if points == "scaled":
                x *= np.linspace(0.05, 2.0, n)[:, None]
            x = x.astype(dtype)
            field = velocity_field(it, n, d, dtype)
            plan = trajectory.make_plan(trajectory.SYMMETRIC_TILES, field.dims, field.score_s, field.radius_s)
            xT = np.ascontiguousarray(x.T)
            ws = tiles.workspace(d, xT)
            out = np.empty((n, d), dtype)
            tiles.velocity(plan, field.spec, ws, xT, xT, xT, out)
            ref = reference.velocity(x.astype(np.float64), it)
            tol = (1e-12 if dtype == np.float64 else 3e-5) * max(1.0, np.abs(ref).max())
            np.testing.assert_allclose(out, ref, rtol=0, atol=tol, err_msg=f"d={d} n={n}")
            again = np.empty_like(out)  # the shares in the other order, on a fresh workspace
            ws2 = tiles.workspace(d, xT)
            shift, max_sq = tiles.pad(plan, field.spec, xT, xT, ws2)
            for share in reversed(range(tiles.SLOTS)):
                tiles.share_sums(plan, field.spec, ws2, ws2[3], n, shift, share)
            tiles.finish(plan, field.spec, ws2, ws2[3], max_sq, 0, n, xT, xT, xT, again)
            np.testing.assert_array_equal(again, out)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_block_count_matches_numpy(dtype):
    """_count_ge (popcounted 512-bit blocks, then a tail) = numpy's count over s[:m] only, for
    every m around the block length, thresholds at, between and beyond the values, ±inf and NaN."""
    from particles.kernels.rows import _count_ge

    rng = np.random.default_rng(11)
    s = rng.integers(-3, 4, 50).astype(dtype)  # ties everywhere
    s[[3, 20]] = [np.inf, -np.inf]
    s[7] = np.nan  # never ≥ anything
    for m in range(len(s) + 1):
        for thr in (-np.inf, -3.0, -0.5, 0.0, 2.0, 3.5, np.inf, np.nan):
            assert _count_ge(s, m, dtype(thr)) == np.count_nonzero(s[:m] >= dtype(thr)), (m, thr)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_top_k_threshold_is_exact(dtype):
    """count(≥ thr) = k exactly (EXACT), else thr is the k-th largest value, shared by a tie."""
    from particles.kernels.rows import top_k_threshold

    rng = np.random.default_rng(5)
    for m, k in ((128, 32), (37, 5), (600, 599), (64, 1)):
        for row in _top_k_rows(rng, m, k):
            s = row.astype(dtype)
            thr, exact = top_k_threshold(s.copy(), m, k, s.min(), s.max())
            kth = np.sort(s)[::-1][k - 1]
            if exact:
                assert np.count_nonzero(s >= thr) == k
            else:
                assert thr == kth and np.count_nonzero(s >= thr) > k


@pytest.mark.parametrize("model, params", [("hk", {}), ("krause", {"sigma": 1.0}), ("sa", {"beta": 1.0})])
def test_top_k_one_with_isolated_particles(model, params):
    """top_k = 1 and a radius that leaves each particle alone (exactly k finite scores per row):
    the kernel's weights are the identity and agree with the reference (once a division by zero)."""
    x = np.array([[0.0], [1.0], [2.0]])
    it = make_interaction(model, radius=0.1, top_k=1, **params)
    field = velocity_field(it, 3, 1, np.float64)
    np.testing.assert_array_equal(field.weights(x), np.eye(3))
    np.testing.assert_allclose(field(x), reference.velocity(x, it), atol=1e-15)


def test_store_streams_the_same_trajectory(tmp_path):
    from particles import simulate

    kwargs = dict(n=50, d=3, steps=12, dt=0.1, save_every=5, sigma=0.7, window=8)
    ref = simulate("krause", **kwargs)
    ds = simulate("krause", store=tmp_path / "run.zarr", **kwargs)
    assert ds.x.chunks is not None  # lazy, from disk
    np.testing.assert_array_equal(ds.x.values, ref.x.values)
    np.testing.assert_array_equal(ds.time.values, ref.time.values)
    assert ds.attrs["model"] == "krause" and ds.attrs["window"] == 8
    ens = simulate("sa", n=20, d=3, samples=2, steps=4, dt=0.1, store=tmp_path / "ens.zarr")
    assert ens.x.dims == ("sample", "time", "particle", "component")
    ref_ens = simulate("sa", n=20, d=3, samples=2, steps=4, dt=0.1)
    np.testing.assert_array_equal(ens.x.values, ref_ens.x.values)


@pytest.mark.slow
def test_store_keeps_memory_bounded(tmp_path):
    """10⁶ particles × d = 3: 21 saved steps (504 MB in memory) cost no more than 1 saved step."""
    import tracemalloc

    from particles import simulate

    def peak(steps):
        tracemalloc.start()
        ds = simulate("krause", n=10**6, d=3, steps=steps, dt=0.1, window=4, causal=True,
                      store=tmp_path / f"big{steps}.zarr")
        out = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert ds.x.shape == (steps + 1, 10**6, 3)
        return out

    one, many = peak(1), peak(20)
    assert many < one + 2 * 24 * 2**20, (one, many)  # + at most two configurations, not 20


def test_bench_baselines_compute_the_same_step():
    """The numpy/torch baselines of `ksync bench` time the same maths as our kernels."""
    import torch

    from analysis import bench

    for case in bench.cases(quick=True):
        case.n = min(case.n, 600)
        if case.kind == "hk1d":
            case.quadratic_from = 300
        it, x = case.interaction(), bench.initial(case)
        ours = velocity_field(it, case.n, case.d, case.dtype)(x)
        tol = 1e-4 if case.dtype == "float32" else 1e-9
        if case.kind == "dense":
            np.testing.assert_allclose(bench.numpy_dense(x, it), ours, atol=tol, err_msg=case.name)
            np.testing.assert_allclose(bench.torch_dense(torch.from_numpy(x), it).numpy(), ours, atol=tol)
        elif case.kind == "window":
            np.testing.assert_allclose(bench.numpy_window_topk(x, it), ours, atol=tol, err_msg=case.name)
            np.testing.assert_allclose(bench.torch_window_topk(torch.from_numpy(x), it).numpy(), ours,
                                       atol=tol)
        elif case.kind == "hk1d":
            r = it.radius * (1 + 1e-9)
            np.testing.assert_allclose(bench.numpy_hk_sorted(x, r), ours, atol=1e-9)
            np.testing.assert_allclose(bench.numpy_hk_quadratic(x, r), ours, atol=1e-9)
            xs = bench.state_as_simulated(case, x)  # the sorted state our timed step sees
            assert np.all(np.diff(xs[:, 0]) >= 0)
            np.testing.assert_allclose(velocity_field(it, case.n, 1, case.dtype)(xs),
                                       bench.numpy_hk_sorted(xs, r), atol=1e-9)
    record = bench.run_case(bench.Case("t", "sa", 64, 3, "float32"), repeats=1, budget=0.0)
    assert {"ours_s", "numpy_s", "torch_s", "x_numpy", "x_torch", "pairs_per_s"} <= set(record)
    assert "sa dense fp32" in bench.format_table([record] + [dict(record, case="sa dense fp32")])
    merged = bench.keep_best(bench.keep_best(None, dict(record, ours_s=2.0, numpy_s=5.0)),
                             dict(record, ours_s=1.0, numpy_s=6.0))  # two rounds: each time's best
    assert merged["ours_s"] == 1.0 and merged["numpy_s"] == 5.0 and len(merged["rounds"]) == 2
    assert merged["pairs_per_s"] == record["pairs"] / 1.0


@pytest.mark.slow
def test_ksync_bench_quick(tmp_path):
    import json

    from analysis.cli import main

    out = tmp_path / "bench.json"
    assert main(["bench", "--quick", "--json", str(out), "--figure", str(tmp_path / "s.png")]) == 0
    data = json.loads(out.read_text())
    assert data["cases"] and data["machine"]["cores"] >= 1
    assert (tmp_path / "s.png").exists() and (tmp_path / "s.pdf").exists() and (tmp_path / "s.nc").exists()
