"""Whole trajectories in compiled code (issue 20): every plan of kernels/trajectory.py against the
Python stepper around the numpy reference, ensembles against per-sample runs, thread counts."""

import numba
import numpy as np
import pytest
from conftest import sphere_points

from particles import make_interaction, reference, simulate
from particles.kernels import tiles, trajectory, velocity_field

# (model, params, n, d, samples, plan kind the ensemble takes)
CASES = [
    ("sa", dict(beta=2.0), 20, 3, 1, trajectory.SYMMETRIC_TILES),  # a ragged last block of keys
    ("usa", dict(beta=1.0), 13, 2, 3, trajectory.SYMMETRIC_TILES),
    ("krause", dict(sigma=0.7), 9, 4, 1, trajectory.SYMMETRIC_TILES),
    ("krause", dict(sigma=0.5), 16, 1, 2, trajectory.SYMMETRIC_TILES),
    ("sa", dict(beta=300.0, Q=np.diag([1.0, 2.0, 3.0]), K=np.diag([1.0, 2.0, 3.0])), 10, 3, 1,
     trajectory.SYMMETRIC_TILES),  # the shared shift is loose: rows redone with their exact max
    ("sa", dict(beta=2.0, K=np.diag([1.0, 2.0, 3.0])), 20, 3, 1, trajectory.FUSED),
    ("krause", dict(sigma=0.5, top_k=4), 15, 3, 3, trajectory.RANGE),
    ("hk", dict(radius=0.2), 40, 1, 2, trajectory.HK1D),
    ("krause", dict(sigma=0.6, window=5, causal=True), 13, 3, 17, trajectory.LANES),
    ("krause", dict(sigma=0.5, radius=0.9, window=6), 12, 4, 17, trajectory.LANES),  # a radius mask
    ("hk", dict(radius=0.3), 12, 2, 17, trajectory.LANES),  # flat scores
    ("sa", dict(beta=2.0), 12, 2, 17, trajectory.SYMMETRIC_LANES),
    ("usa", dict(beta=1.0), 12, 2, 17, trajectory.SYMMETRIC_LANES),
    ("sa", dict(beta=2.0), 12, 3, 17, trajectory.SYMMETRIC_LANES),
    ("krause", dict(sigma=0.7), 9, 4, 17, trajectory.SYMMETRIC_LANES),
    ("krause", dict(sigma=0.5), 11, 1, 17, trajectory.SYMMETRIC_LANES),
    ("sa", dict(beta=300.0, Q=np.diag([1.0, 2.0, 3.0]), K=np.diag([3.0, 1.0, 0.5])), 10, 3, 17,
     trajectory.LANES),  # the shift bound is loose: rows redone with their exact max
    ("sa", dict(beta=1.0), 520, 3, 1, trajectory.SYMMETRIC_TILES),
]


def _x0(it, n, d, samples, seed=1):
    rng = np.random.default_rng(seed)
    return rng.random((samples, n, d)) if it.geometry == "euclidean" else rng.standard_normal((samples, n, d))


@pytest.mark.parametrize("model, params, n, d, samples, kind", CASES)
def test_compiled_trajectories_match_the_python_stepper(model, params, n, d, samples, kind):
    """The compiled loop (integrator stages, retraction, noise, saving) = the Python stepper around
    the numpy reference, to round-off, for Euler, RK4 and Euler–Maruyama."""
    it = make_interaction(model, **params)
    field = velocity_field(it, n, d)
    assert field.trajectory_plan(False, samples).kind == (0,) * kind
    x0 = _x0(it, n, d, samples)
    steps = 3 if n > 100 else 8
    for integrator, noise in (("euler", 0.0), ("rk4", 0.0), ("euler", 0.1)):
        kw = dict(steps=steps, dt=0.1, save_every=3, integrator=integrator, noise=noise, seed=5)
        ours = simulate(model, x0, **kw, **params).x.values
        ref = simulate(lambda x: reference.velocity(x, it), x0, geometry=it.geometry, **kw).x.values
        np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-12, err_msg=f"{integrator} noise={noise}")


def test_forced_symmetric_plan_matches_the_reference():
    """A forced "symmetric" path keeps its own plan (SYMMETRIC: the row-block kernel, serial and
    parallel, finished by tiles.finish_rows with one slot) = the numpy reference, with rows whose Σ w
    underflows the shared shift (β = 300, ‖q‖ from 1 to 3) redone with their exact max."""
    it = make_interaction("sa", beta=300.0, Q=np.diag([1.0, 2.0, 3.0]), K=np.diag([1.0, 2.0, 3.0]))
    n, d = 40, 3
    field = velocity_field(it, n, d, path="symmetric")
    x0 = sphere_points(n, d, seed=3)[None]
    keep = np.array([0, 1, 2])
    st = trajectory.stepping(0, "euler", 0.01, 0.0, False, np.float64)
    x = x0[0].copy()
    for _ in range(2):
        v = reference.velocity(x, it)
        x = x + 0.01 * (v - (v * x).sum(1, keepdims=True) * x)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
    for parallel in (False, True):
        plan = field.trajectory_plan(parallel)
        assert plan.kind == (0,) * trajectory.SYMMETRIC
        out = np.empty((1, len(keep), n, d))
        status = trajectory.run(field, plan, st, x0, keep, np.zeros(1, np.uint64), out, parallel=parallel)
        assert not status.any()
        np.testing.assert_allclose(out[0, -1], x, rtol=0, atol=1e-12)


def test_float32_ensembles_match_the_reference():
    it = make_interaction("sa", beta=4.0)
    x0 = np.stack([sphere_points(16, 2, seed=s) for s in range(20)]).astype(np.float32)
    ours = simulate("sa", x0, steps=10, dt=0.1, beta=4.0, dtype="float32")
    ref = simulate(lambda x: reference.velocity(x, it), x0.astype(np.float64), steps=10, dt=0.1,
                   geometry="sphere")
    assert ours.x.dtype == np.float32
    np.testing.assert_allclose(ours.x.values, ref.x.values, rtol=0, atol=2e-5)


@pytest.mark.parametrize("model, params", [("sa", dict(beta=2.0)),
                                           ("krause", dict(sigma=0.6, window=5, causal=True))])
def test_ensemble_equals_per_sample_runs(model, params):
    """An ensemble integrated in tiles vectorised over its samples = each sample on its own."""
    x0 = np.stack([sphere_points(13, 3, seed=s) for s in range(19)])
    kw = dict(steps=30, dt=0.1, save_every=10, integrator="rk4", **params)
    ens = simulate(model, x0, **kw).x.values
    for s in (0, 7, 18):
        np.testing.assert_allclose(ens[s], simulate(model, x0[s], **kw).x.values, rtol=0, atol=1e-12)


@pytest.mark.parametrize("x0_given", [False, True])
def test_a_list_of_seeds_is_one_run_per_seed(x0_given):
    """seed=[s_0, s_1, …]: sample k is the run simulate(seed=s_k) — its random start and its noise
    stream (with x0 given: its noise) — in one compiled call."""
    seeds = [4, 0, 11]
    kw = dict(steps=6, dt=0.1, beta=2.0, noise=0.2)
    x0 = np.stack([sphere_points(9, 3, seed=s) for s in range(3)]) if x0_given else None
    many = simulate("sa", x0, n=None if x0_given else 9, d=None if x0_given else 3, seed=seeds, **kw)
    assert many.x.dims[0] == "sample" and many.sizes["sample"] == 3
    for k, s in enumerate(seeds):
        one = simulate("sa", x0[k] if x0_given else None, n=None if x0_given else 9,
                       d=None if x0_given else 3, seed=s, **kw)
        np.testing.assert_allclose(many.x.values[k], one.x.values, rtol=0, atol=1e-12)
    other = simulate("sa", x0, n=None if x0_given else 9, d=None if x0_given else 3, seed=[4, 1, 11], **kw)
    assert np.abs(other.x.values[1] - many.x.values[1]).max() > 1e-3  # another seed, another run
    np.testing.assert_array_equal(other.x.values[0], many.x.values[0])


@pytest.mark.parametrize("bad, match", [([], "seed"), ([[1, 2]], "seed"), ([1, -1], "seed"),
                                        ([1, 2.5], "seed")])
def test_bad_seed_lists_name_the_parameter(bad, match):
    with pytest.raises((ValueError, TypeError), match=match):
        simulate("sa", n=5, d=3, steps=1, dt=0.1, seed=bad)
    with pytest.raises(ValueError, match="samples"):
        simulate("sa", n=5, d=3, steps=1, dt=0.1, seed=[1, 2], samples=3)


def test_results_do_not_depend_on_the_thread_count():
    """Tiles are integrated by one thread each, row-parallel kernels split rows into fixed tasks:
    1 and 2 threads give the same numbers (also with noise)."""
    x0 = np.stack([sphere_points(12, 3, seed=s) for s in range(40)])
    hk0 = np.random.default_rng(3).random((1, 150_000, 1))
    it = make_interaction("hk", radius=0.002)
    field = velocity_field(it, hk0.shape[1], 1)
    runs = []
    previous = numba.get_num_threads()
    try:
        for threads in (1, min(2, numba.config.NUMBA_NUM_THREADS)):
            numba.set_num_threads(threads)
            ens = simulate("sa", x0, steps=20, dt=0.1, beta=3.0, noise=0.05, seed=2).x.values
            keep = np.arange(4)
            st = trajectory.stepping(1, "euler", 1.0, 0.0, True, np.float64)
            out = np.empty((1, len(keep), hk0.shape[1], 1))
            trajectory.run(field, field.trajectory_plan(True), st, hk0, keep, np.zeros(1, np.uint64), out,
                           parallel=True)
            runs.append((ens, out))
    finally:
        numba.set_num_threads(previous)
    np.testing.assert_allclose(runs[0][0], runs[1][0], rtol=0, atol=1e-12)
    np.testing.assert_allclose(runs[0][1], runs[1][1], rtol=0, atol=1e-12)
    x, bound = hk0[0, :, 0], (0.002 * (1 + 1e-9)) ** 2
    for i in range(0, len(x), 15_000):  # the row-parallel sweep is the HK map (dt = 1)
        assert abs(runs[0][1][0, 1, i, 0] - x[(x - x[i]) ** 2 <= bound].mean()) < 1e-12


def _run_single(field, x0, steps=3):
    """One system through trajectory.run with the row-parallel kernels (PARALLEL mode)."""
    euclidean = field.interaction.geometry == "euclidean"
    st = trajectory.stepping(1 if euclidean else 0, "euler", 1.0 if euclidean else 0.1, 0.0, True, x0.dtype)
    keep = np.arange(steps + 1)
    out = np.empty((1, len(keep)) + x0.shape[1:])
    status = trajectory.run(field, field.trajectory_plan(True), st, x0, keep, np.zeros(1, np.uint64), out,
                            parallel=True)
    assert not status.any()
    return out


def test_single_system_buffers_are_reused_with_the_same_numbers(monkeypatch):
    """A large single system keeps its state buffers for the next call of that shape (per thread):
    the same numbers on reuse, after another shape, and from two threads at once; none kept above
    REUSED_BUFFER_BYTES."""
    import threading

    hk0 = np.random.default_rng(3).random((1, 150_000, 1))
    hk1 = np.random.default_rng(4).random((1, 150_000, 1))
    sa0 = sphere_points(700, 3, seed=1)[None]
    hk_field = velocity_field(make_interaction("hk", radius=0.002), hk0.shape[1], 1)
    sa_field = velocity_field(make_interaction("sa", beta=2.0), sa0.shape[1], 3)
    trajectory._reused.buffers = None
    first = _run_single(hk_field, hk0)
    kept = trajectory._reused.buffers[1]
    np.testing.assert_array_equal(_run_single(hk_field, hk0), first)
    assert trajectory._reused.buffers[1] is kept
    sa_first = _run_single(sa_field, sa0)
    assert trajectory._reused.buffers[1] is not kept
    np.testing.assert_array_equal(_run_single(hk_field, hk0), first)
    np.testing.assert_array_equal(_run_single(sa_field, sa0), sa_first)
    other = {}
    worker = threading.Thread(target=lambda: other.update(hk1=_run_single(hk_field, hk1)))
    worker.start()
    mine = _run_single(hk_field, hk0)
    worker.join()
    np.testing.assert_array_equal(mine, first)
    trajectory._reused.buffers = None
    np.testing.assert_array_equal(other["hk1"], _run_single(hk_field, hk1))
    monkeypatch.setattr(trajectory, "REUSED_BUFFER_BYTES", 0)
    trajectory._reused.buffers = None
    np.testing.assert_array_equal(_run_single(hk_field, hk0), first)
    assert trajectory._reused.buffers is None


def test_blocks_of_saved_steps():
    keep = np.array([0, 3, 6, 9, 10])
    assert trajectory.blocks(keep) == [(0, 10, 0, 5)]
    assert trajectory.blocks(keep, max_slots=2) == [(0, 3, 0, 2), (3, 9, 2, 4), (9, 10, 4, 5)]
    ticks = trajectory.blocks(np.array([0, 100]), ticks=4)
    assert ticks == [(0, 25, 0, 1), (25, 50, 1, 1), (50, 75, 1, 1), (75, 100, 1, 2)]
    assert trajectory.blocks(np.array([0])) == [(0, 0, 0, 1)]


def test_progress_and_blocks_give_the_same_trajectory():
    x0 = np.stack([sphere_points(10, 3, seed=s) for s in range(17)])
    kw = dict(steps=40, dt=0.1, save_every=15, beta=2.0, noise=0.1)
    np.testing.assert_array_equal(simulate("sa", x0, progress=True, **kw).x.values,
                                  simulate("sa", x0, **kw).x.values)
    # 1-D HK works in sorted order: a block's end state is copied from its last saved step when that
    # is the block's end (save_every=1: blocks of 2 steps, 2 saved each), else unsorted again (15)
    x0 = np.random.default_rng(4).random((3000, 1))
    for save_every in (1, 15):
        kw = dict(steps=40, dt=0.5, save_every=save_every, radius=0.05)
        np.testing.assert_array_equal(simulate("hk", x0, progress=True, **kw).x.values,
                                      simulate("hk", x0, **kw).x.values)


def test_weights_of_ensembles_and_overflow_in_compiled_runs():
    x0 = np.stack([sphere_points(9, 3, seed=s) for s in range(17)])
    ds = simulate("krause", x0, steps=4, dt=0.1, sigma=0.5, window=3, return_weights=True)
    it = make_interaction("krause", sigma=0.5, window=3)
    np.testing.assert_allclose(ds.attention.values[5, 2], reference.weights(ds.x.values[5, 2], it),
                               atol=1e-12)
    with pytest.raises(OverflowError, match="step 0.*beta is too large"):
        simulate("usa", x0, steps=3, dt=0.1, beta=800.0)


def test_phase_diagram():
    from analysis.phase import configuration_stats, phase_diagram

    angles = np.array([0.0, 1.0, 1.0 + 1e-3, 3.0, 1e-3, 5.0])  # on S¹: {0, 4}, {1, 2}, {3}, {5}
    x = np.stack([np.cos(angles), np.sin(angles)], -1)[None]
    close, counts = configuration_stats(x, eps=1e-4, cluster_eps=1e-4)
    assert counts[0] == 4 and close == 2 / 15  # ⟨u_i, u_j⟩ = cos(1e-3) > 1 − 1e-4 for 2 of 15 pairs
    ds = phase_diagram("sa", {"beta": [0.0, 9.0]}, n=8, d=2, samples=64, times=[0.0, 2.0, 40.0])
    assert ds["close_pairs"].dims == ("beta", "time") and ds.sizes["clusters"] == 8
    np.testing.assert_allclose(ds["cluster_fraction"].sum("clusters"), 1.0)
    start = ds["close_pairs"].sel(time=0.0).values
    assert np.all(start < 0.05) and start[0] == start[1]  # the same initial states in every row
    assert float(ds["close_pairs"].sel(beta=0.0, time=40.0)) == 1.0  # β = 0: the mean pulls all together
    assert float(ds["median_clusters"].sel(beta=0.0, time=40.0)) == 1.0
    assert ds.attrs["model"] == "sa" and ds.attrs["samples"] == 64
    topk = phase_diagram("krause", {"top_k": [1, 8]}, n=8, d=2, samples=32, times=[0.0, 3.0], sigma=1.0)
    assert list(topk["top_k"].values) == [1, 8] and topk.attrs["sigma"] == 1.0
    with pytest.raises(ValueError, match="axis"):
        phase_diagram("sa", {"beta": [1.0], "sigma": [1.0]})
    with pytest.raises(ValueError, match="times"):
        phase_diagram("sa", {"beta": [1.0]}, times=[0.05], dt=0.1)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("geometry", [trajectory.SPHERE, trajectory.EUCLIDEAN])
def test_vectorised_euler_step_is_the_general_one_bit_for_bit(dtype, geometry):
    """The noiseless d ≤ 4 Euler step (_euler_plain, vectorised) = the general per-column loop, to
    the last bit, for every d ≤ 4 and both geometries."""
    rng = np.random.default_rng(4)
    for d in (1, 2, 3, 4):
        N = 131  # not a multiple of any vector width
        x = rng.standard_normal((d, N)).astype(dtype)
        if geometry == trajectory.SPHERE:
            x /= np.sqrt((x * x).sum(0))
        v = rng.standard_normal((N, d)).astype(dtype)
        st = trajectory.stepping(geometry, "euler", 0.1, 0.0, True, dtype)
        keys, order, xi = np.zeros(1, np.uint64), np.empty(0, np.int64), np.empty(d, dtype)
        general, plain = x.copy(), x.copy()
        trajectory._euler_update((), st, general, v, keys, 1, 0, order, xi, np.empty((0, 0), dtype), 0, N)
        trajectory._euler_update((0,) * d, st, plain, v, keys, 1, 0, order, xi, np.empty((d, N), dtype), 0, N)
        assert d == 1 and geometry == trajectory.SPHERE or not np.array_equal(general, x)  # S⁰ = {±1}
        np.testing.assert_array_equal(plain, general)
        part, vt = x.copy(), np.empty((d, N), dtype)  # a range of columns (a lockstep thread's share)
        trajectory._euler_update((0,) * d, st, part, v, keys, 1, 0, order, xi, vt, 40, 97)
        np.testing.assert_array_equal(part[:, 40:97], general[:, 40:97])
        np.testing.assert_array_equal(np.delete(part, np.s_[40:97], 1), np.delete(x, np.s_[40:97], 1))


@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
def test_finite_check_sees_every_non_finite_entry(bad):
    x = np.zeros((3, 257))
    assert trajectory._finite(x, 0, 257)
    for c, p in ((0, 0), (2, 256), (1, 100)):
        y = x.copy()
        y[c, p] = bad
        assert not trajectory._finite(y, 0, 257)
        assert not trajectory._finite(y.astype(np.float32), 0, 257)
        assert trajectory._finite(y, 0, p) and trajectory._finite(y, p + 1, 257)  # only the columns asked


LOCKSTEP_CASES = [  # (model, params, n, d, integrator, noise): four compiled variants cover the paths
    ("sa", dict(beta=2.0), 67, 3, "euler", 0.0),  # SYMMETRIC_TILES softmax
    ("sa", dict(beta=2.0, Q=np.diag([1.0, 2.0, 0.5])), 70, 3, "euler", 0.0),  # FUSED softmax
    ("sa", dict(beta=3.0, Q=np.diag([1.0, 2.0, 0.5]), K=np.diag([0.5, 1.0, 2.0]), V=-np.eye(3)), 33, 3, "rk4",
     0.0),  # projections, RK4 stages
    ("krause", dict(sigma=0.5, window=9, causal=True, radius=1.5, geometry="euclidean"), 41, 4, "rk4", 0.0),
    ("krause", dict(sigma=0.5, top_k=7), 45, 6, "euler", 0.05),  # RANGE rows (top-k, d > 4), noise
]


@pytest.mark.parametrize("model, params, n, d, integrator, noise", LOCKSTEP_CASES)
@pytest.mark.parametrize("parties", [2, 3])
def test_lockstep_threads_give_the_single_thread_numbers(model, params, n, d, integrator, noise, parties):
    """One system on 2 or 3 threads in lockstep (integrate_rows: each owns a share of the rows and
    meets the others at a spin barrier) = the same system on one thread, to the last bit: every row
    is computed by the same code, the symmetric tiles' shares summed in the same order; Euler, RK4,
    Euler–Maruyama, projections."""
    it = make_interaction(model, **params)
    field = velocity_field(it, n, d)
    plan = field.trajectory_plan(False, 1)
    symmetric = it.Q is None and it.K is None and not it.restricted
    kind = trajectory.SYMMETRIC_TILES if symmetric else trajectory.FUSED
    kind = trajectory.RANGE if it.top_k or d > 4 else kind
    assert plan.kind == (0,) * kind
    x0 = _x0(it, n, d, 1, seed=5)
    x0 = x0 if it.geometry == "euclidean" else x0 / np.linalg.norm(x0, axis=-1, keepdims=True)
    st = trajectory.stepping(1 if it.geometry == "euclidean" else 0, integrator, 0.05, noise, it.identity_qkv,
                             np.float64)
    keep = np.array([0, 3, 4, 9, 30])
    keys = np.array([12345], np.uint64)
    outs = []
    for lockstep in (1, parties):
        out = np.full((1, len(keep), n, d), np.nan)
        status = trajectory.run(field, plan, st, x0, keep, keys, out, lockstep=lockstep, ticks=2)
        assert not status.any()
        outs.append(out)
    assert not np.array_equal(outs[0][0, -1], x0[0])
    np.testing.assert_array_equal(outs[1], outs[0])


TILES_EULER_CASES = [  # (model, params, n, d, dtype): the symmetric tiles' own Euler loop
    ("sa", dict(beta=2.0), 67, 3, np.float64),  # sphere, a ragged last block
    ("sa", dict(beta=2.0), 37, 2, np.float32),  # 16 float32 lanes
    ("krause", dict(sigma=0.4, geometry="euclidean"), 45, 4, np.float64),  # rbf scores, x + dt·(v − x)
    ("krause", dict(sigma=0.3), 16, 1, np.float64),  # one component, a whole number of blocks
    ("sa", dict(beta=1.0, geometry="euclidean"), 24, 3, np.float64),  # loose rows: the general step
]


@pytest.mark.parametrize("model, params, n, d, dtype", TILES_EULER_CASES)
def test_symmetric_tiles_euler_loop_gives_the_general_loops_numbers(model, params, n, d, dtype):
    """Noiseless Euler with the symmetric tiles runs its own loop (the state in the tiles' padded
    copies, each step finished, stepped and copied by one tiles.euler_pass). It gives the numbers of
    the general loop (pad, finish_rows, _euler_plain; here reached by the identity projections),
    to the last bit: sphere and euclidean, softmax and rbf, float32 and float64, d = 1-4, saved
    steps over several calls, a step with loose rows, and a state that stops being finite."""
    it = make_interaction(model, **params)
    field = velocity_field(it, n, d, dtype)
    plan = field.trajectory_plan(False, 1)
    assert plan.kind == (0,) * trajectory.SYMMETRIC_TILES
    x0 = _x0(it, n, d, 1, seed=3)
    if model == "sa" and it.geometry == "euclidean":  # one far particle: the others' Σ w underflows
        x0[0, 0] = 40.0
    x0 = (x0 if it.geometry == "euclidean" else x0 / np.linalg.norm(x0, axis=-1, keepdims=True)).astype(dtype)
    st = trajectory.stepping(1 if it.geometry == "euclidean" else 0, "euler", 0.05, 0.0, True, dtype)
    general = st._replace(identity=False)  # Q = K = V = I projected: the same numbers, the general loop
    keep = np.array([0, 1, 3, 4, 9, 20])
    if model == "sa" and it.geometry == "euclidean":  # the first step has loose rows
        xT, ws = np.ascontiguousarray(x0[0].T), tiles.workspace(d, np.ascontiguousarray(x0[0].T))
        shift, _ = tiles.pad(plan, field.spec, xT, xT, ws)
        for share in range(tiles.SLOTS):
            tiles.share_sums(plan, field.spec, ws, ws[3], n, shift, share)
        assert tiles.any_loose(field.spec, ws[3], n)
    for start in (x0, np.where(np.arange(n)[:, None] == 5, np.inf, x0)[None].astype(dtype)[0]):
        runs = []
        for stepping in (st, general):
            out = np.full((1, len(keep), n, d), np.nan, dtype)
            status = trajectory.run(field, plan, stepping, start, keep, np.zeros(1, np.uint64), out, ticks=3)
            runs.append((status, out))
        np.testing.assert_array_equal(runs[0][0], runs[1][0])
        np.testing.assert_array_equal(runs[0][1], runs[1][1])
    assert runs[0][0][0, 0] == trajectory.NONFINITE


@pytest.mark.parametrize("K, kind", [(None, trajectory.FUSED),
                                     (np.diag([1.0, 2.0, 0.5]), trajectory.SYMMETRIC_TILES)])
def test_lockstep_threads_switch_to_one_with_the_same_numbers(monkeypatch, K, kind):
    """Threads that keep waiting for each other agree that thread 0 goes on alone (SOLO): from any
    barrier round on (loading, after a field evaluation or the tiles' shares, after an RK4 stage,
    after an update) the run gives the same numbers, saved steps and final state included."""
    it = make_interaction("sa", beta=2.0, Q=np.diag([1.0, 2.0, 0.5]), K=K)
    n, d = 50, 3
    field = velocity_field(it, n, d)
    plan = field.trajectory_plan(False, 1)
    assert plan.kind == (0,) * kind
    x0 = sphere_points(n, d, seed=7)[None]
    keep = np.array([0, 1, 2, 4])
    for integrator in ("euler", "rk4"):
        st = trajectory.stepping(0, integrator, 0.05, 0.0, False, np.float64)
        runs = []
        for lockstep, solo_after in [(1, 1 << 62)] + [(2, r) for r in range(0, 30, 3)]:
            monkeypatch.setattr(trajectory, "_SOLO_AFTER", solo_after)
            out = np.full((1, len(keep), n, d), np.nan)
            status = trajectory.run(field, plan, st, x0, keep, np.zeros(1, np.uint64), out, lockstep=lockstep)
            assert not status.any()
            runs.append(out)
        for out in runs[1:]:
            np.testing.assert_array_equal(out, runs[0])


def test_lockstep_threads_stop_together_at_a_failure():
    """A usa overflow found by one thread's rows stops every thread at the same step, as on one."""
    n, d = 40, 3
    it = make_interaction("usa", beta=800.0, geometry="euclidean")
    field = velocity_field(it, n, d)
    x0 = np.zeros((1, n, d))
    x0[0, :, 0] = 1.0
    x0[0, :30] = 0.1 * sphere_points(30, 3, seed=2)  # only rows 30-39 (the second thread's) overflow: s = 800
    st = trajectory.stepping(1, "euler", 0.01, 0.0, True, np.float64)
    keep = np.arange(6)
    statuses = []
    for lockstep in (1, 2):
        out = np.zeros((1, len(keep), n, d))
        statuses.append(trajectory.run(field, field.trajectory_plan(False, 1), st, x0, keep,
                                       np.zeros(1, np.uint64), out, lockstep=lockstep))
    assert statuses[0][0, 0] == trajectory.USA_OVERFLOW
    np.testing.assert_array_equal(statuses[1], statuses[0])


@pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2, reason="needs two numba threads")
def test_simulate_runs_one_system_in_lockstep_with_the_same_numbers(monkeypatch):
    """simulate puts one mid-sized system on the threads in lockstep (kernels.lockstep), and not a
    tiny one, an ensemble, or symmetric tiles below n = 192; one thread gives the same numbers, bit
    for bit (symmetric tiles: the general loop in lockstep, their own Euler loop on one thread)."""
    from particles import kernels

    seen = []
    real_run = trajectory.run
    monkeypatch.setattr(trajectory, "run", lambda *a, **k: (seen.append(k["lockstep"]), real_run(*a, **k))[1])
    x0 = sphere_points(192, 3, seed=3)
    previous = numba.get_num_threads()
    try:
        numba.set_num_threads(2)
        two = simulate("sa", x0, steps=300, dt=0.1, beta=2.0).x.values
        simulate("sa", x0, steps=1, dt=0.1, beta=2.0)  # too little work for the helpers
        simulate("sa", np.stack([x0, x0]), steps=300, dt=0.1, beta=2.0)  # samples go to threads instead
        simulate("sa", x0[:160], steps=300, dt=0.1, beta=2.0)  # one thread runs 160 particles' tiles faster
        numba.set_num_threads(1)
        one = simulate("sa", x0, steps=300, dt=0.1, beta=2.0).x.values
    finally:
        numba.set_num_threads(previous)
    assert seen == [2, 1, 1, 1, 1]
    np.testing.assert_array_equal(two, one)
    it = make_interaction("sa", beta=1.0)
    field = velocity_field(it, 600, 3)
    assert field.trajectory_plan(False, 1).kind == (0,) * trajectory.SYMMETRIC_TILES
    plan, threads = kernels.lockstep(field, field.trajectory_plan(False, 1), 1, 100)
    assert plan.kind == (0,) * trajectory.SYMMETRIC_TILES
    assert threads == min(numba.get_num_threads(), 600 // 24, kernels.tiles.SLOTS)
    forced = velocity_field(it, 600, 3, path="symmetric")  # the serial symmetric kernel: FUSED rows instead
    assert forced.trajectory_plan(False, 1).kind == (0,) * trajectory.SYMMETRIC
    plan, threads = kernels.lockstep(forced, forced.trajectory_plan(False, 1), 1, 100)
    assert plan.kind == (0,) * trajectory.FUSED and threads == min(numba.get_num_threads(), 600 // 24)
    x600 = sphere_points(600, 3, seed=4)  # the tiles' shares on 2 threads in lockstep, and on 1
    try:
        runs = []
        for t in (2, 1):
            numba.set_num_threads(t)
            runs.append(simulate("sa", x600, steps=5, dt=0.1, beta=1.0).x.values)
    finally:
        numba.set_num_threads(previous)
    assert seen[-2:] == [2, 1]
    np.testing.assert_array_equal(runs[0], runs[1])


@pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2, reason="needs two numba threads")
def test_lockstep_runs_side_by_side_finish_with_their_numbers():
    """Four lockstep runs started at once from four Python threads (more threads than cores: the
    helpers queue, waiting threads yield their core) all finish, each with its own numbers."""
    import threading

    x0s = [sphere_points(128, 3, seed=s) for s in range(4)]
    alone = [simulate("sa", x0, steps=300, dt=0.1, beta=2.0).x.values for x0 in x0s]
    together = [None] * 4

    def one(k):
        together[k] = simulate("sa", x0s[k], steps=300, dt=0.1, beta=2.0).x.values

    threads = [threading.Thread(target=one, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads)
    for a, b in zip(alone, together):
        np.testing.assert_array_equal(a, b)


@pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2, reason="needs two numba threads")
def test_tiles_taken_by_any_thread_give_the_same_numbers():
    """Ensemble tiles are taken one at a time by whichever thread is free (a shared counter): every
    tile exactly once, and the same numbers on 1 and 2 threads, for tiles of one sample (5 samples)
    and of 64 lanes (200 samples: four tiles, the last padded)."""
    previous = numba.get_num_threads()
    for samples in (5, 200):
        x0 = np.stack([sphere_points(10, 3, seed=s) for s in range(samples)])
        runs = []
        try:
            for threads in (1, 2):
                numba.set_num_threads(threads)
                runs.append(simulate("sa", x0, steps=15, dt=0.1, beta=3.0, noise=0.05, seed=4).x.values)
        finally:
            numba.set_num_threads(previous)
        assert np.isfinite(runs[1]).all() and not np.array_equal(runs[1][:, -1], x0)
        np.testing.assert_array_equal(runs[1], runs[0])
