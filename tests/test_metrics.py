"""Metric values on constructed inputs with known answers (design.md §4, issue 5 item 3)."""

import numpy as np
import pytest
import xarray as xr
from scipy.sparse.csgraph import connected_components
from scipy.spatial.distance import cdist

import analysis

RNG = np.random.default_rng(7)


def blobs(k, n_per=20, d=3, spread=1e-3, seed=0):
    """k tight blobs around well-separated unit vectors (k ≤ d: orthogonal ones)."""
    rng = np.random.default_rng(seed)
    centres = np.eye(d)[:k] if k <= d else rng.normal(size=(k, d))
    x = np.repeat(centres, n_per, axis=0) + spread * rng.normal(size=(k * n_per, d))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


# --- clusters -------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_k_blobs_give_k_clusters_by_both_methods(k):
    x = blobs(k, d=5)
    assert analysis.count_clusters(x, eps=0.1, method="graph") == k
    assert analysis.count_clusters(x, eps=0.1, method="gram") == k
    sizes = analysis.cluster_sizes(x, eps=0.1)
    assert sizes.values.tolist() == [20] * k


def test_graph_labels_match_dense_components():
    """The cell-compressed neighbour search equals the dense ε-graph, ties and bands included."""
    # two 1-D cells whose first points are 1.45 apart, while 0.2 and 1.1 are within ε = 1
    assert analysis.count_clusters(np.array([[0.0], [1.45], [0.2], [1.1]]), eps=1.0) == 1
    for seed in range(6):
        rng = np.random.default_rng(seed)
        d = 1 + seed % 3
        blobs_ = rng.normal(size=(8, d)).repeat(15, axis=0) + 0.3 * rng.normal(size=(120, d))
        x = np.concatenate([blobs_, rng.uniform(0, 3, size=(200, d)) ** 2])
        for eps in (0.05, 0.2, 0.5, 1.0):
            n_ref, ref = connected_components(cdist(x, x) <= eps, directed=False)
            labels = analysis.cluster_labels(x, eps=eps).values
            assert labels.max() + 1 == n_ref
            same = labels[:, None] == labels[None, :]
            assert np.array_equal(same, ref[:, None] == ref[None, :])
            assert labels[0] == 0 and np.all(np.diff(np.maximum.accumulate(labels)) <= 1)


def test_graph_and_gram_agree_along_a_trajectory():
    traj = np.stack([blobs(k, n_per=12 // k, d=4, seed=k) for k in (4, 3, 2, 1)])
    graph = analysis.count_clusters(traj, eps=0.05)
    gram = analysis.count_clusters(traj, eps=0.05, method="gram")
    assert graph.values.tolist() == gram.values.tolist() == [4, 3, 2, 1]


def test_time_to_clusters_and_consensus():
    traj = xr.DataArray(np.stack([blobs(k, n_per=12 // k, d=4, seed=k) for k in (4, 3, 2, 1, 1)]),
                        dims=("time", "particle", "component"), coords={"time": [0.0, 0.5, 1.0, 1.5, 2.0]})
    assert analysis.time_to_clusters(traj, 2, eps=0.05) == 1.0
    assert analysis.time_to_consensus(traj, eps=0.05) == 1.5
    assert np.isnan(analysis.time_to_consensus(traj.isel(time=slice(0, 3)), eps=0.05))
    ens = xr.concat([traj, traj.isel(time=[0, 0, 0, 0, 0]).assign_coords(time=traj.time)], "sample")
    t = analysis.time_to_consensus(ens, eps=0.05)
    assert t.dims == ("sample",) and t.values[0] == 1.5 and np.isnan(t.values[1])


# --- collapse -------------------------------------------------------------------------------------


def test_identical_rows_collapse():
    x = np.tile(RNG.normal(size=6), (10, 1))
    assert analysis.effective_rank(x) == pytest.approx(1.0, abs=1e-9)
    assert analysis.rank_collapse(x) == pytest.approx(0.0, abs=1e-12)
    assert analysis.mean_cosine(x) == pytest.approx(1.0)
    assert analysis.dirichlet_energy(x) == pytest.approx(0.0, abs=1e-20)


def test_orthonormal_rows_have_full_effective_rank():
    q, _ = np.linalg.qr(RNG.normal(size=(8, 8)))
    assert analysis.effective_rank(q[:5]) == pytest.approx(5.0)
    assert analysis.rank_collapse(np.eye(4)) == pytest.approx(np.sqrt(3 / 4))


def test_mean_cosine_equals_brute_force():
    x = RNG.normal(size=(30, 4))
    u = x / np.linalg.norm(x, axis=1, keepdims=True)
    cos = u @ u.T
    brute = cos[~np.eye(30, dtype=bool)].mean()
    assert analysis.mean_cosine(x) == pytest.approx(brute, rel=1e-12)


def test_dirichlet_energy_default_and_weighted():
    x = RNG.normal(size=(7, 3))
    w = RNG.random(size=(7, 7))
    sq = np.sum((x[:, None] - x[None]) ** 2, axis=-1)
    assert analysis.dirichlet_energy(x) == pytest.approx(0.5 * np.sum(sq) / 7)
    assert analysis.dirichlet_energy(x, weights=w) == pytest.approx(0.5 * np.sum(w * sq))


@pytest.mark.parametrize("beta", [0.5, 1.0, 9.0])
def test_energy_closed_form_for_equal_particles(beta):
    x = np.tile([0.0, 0.6, 0.8], (12, 1))
    assert analysis.interaction_energy(x, beta) == pytest.approx(np.exp(beta) / (2 * beta))
    assert analysis.normalised_energy(x, beta) == pytest.approx(1.0)


def test_energy_beta_zero_limit_and_staircase_plateau():
    x = blobs(3, n_per=10, spread=0.0)
    finite_part = 0.5 * np.sum(x.mean(0) ** 2)  # lim_{β→0} E_β − 1/(2β)
    assert analysis.interaction_energy(x, 0.0) == pytest.approx(finite_part)
    assert analysis.interaction_energy(x, 1e-6) - 0.5e6 == pytest.approx(finite_part, abs=1e-5)
    assert analysis.normalised_energy(x, 200.0) == pytest.approx(3 * 10**2 / 30**2)


# --- sinks ----------------------------------------------------------------------------------------


def test_uniform_attention_entropy_is_one():
    assert analysis.attention_entropy(np.full((6, 6), 1 / 6)) == pytest.approx(1.0)
    one_hot = np.zeros((6, 6))
    one_hot[:, 2] = 1.0
    assert np.isnan(analysis.attention_entropy(one_hot))


def test_causal_uniform_attention_entropy_is_one():
    causal = np.tril(np.ones((8, 8)))
    causal /= causal.sum(axis=1, keepdims=True)
    assert analysis.attention_entropy(causal) == pytest.approx(1.0)
    peaked = causal.copy()
    peaked[1:] = 0.5 * peaked[1:]
    peaked[1:, 0] += 0.5
    assert analysis.attention_entropy(peaked) < 1.0


def test_first_token_attention_is_a_full_sink():
    a = np.zeros((2, 3, 4, 5, 5))  # (sample, layer, head, query, key)
    a[..., 0] = 1.0
    assert np.all(analysis.first_token_mass(a) == 1.0)
    rate = analysis.sink_rate(a)
    assert rate.dims == ("sample",) and np.all(rate == 1.0)
    assert analysis.sink_rate(np.full((5, 5), 0.2)) == 0.0
    assert analysis.first_token_mass(np.full((5, 5), 0.2)) == pytest.approx(0.2)


def test_sink_rate_counts_layer_head_pairs_and_keeps_time():
    a = xr.DataArray(np.full((2, 4, 6, 6), 1 / 6), dims=("layer", "head", "query", "key"))
    a[0, :3] = np.eye(6)[[0] * 6]
    assert analysis.sink_rate(a, eps=0.3) == pytest.approx(3 / 8)
    alpha = analysis.sink_scores(np.tril(np.ones((4, 4))) / np.arange(1, 5)[:, None], k=1)
    assert alpha == pytest.approx((1 / 2 + 1 / 3 + 1 / 4) / 3)
    sim = xr.DataArray(np.stack([np.eye(6)[[0] * 6], np.full((6, 6), 1 / 6)]), dims=("time", "query", "key"))
    assert analysis.sink_rate(sim).values.tolist() == [1.0, 0.0]


def test_massive_activations_per_layer():
    h = RNG.normal(size=(3, 10, 8)) * 0.01
    h[1, 0, 4] = 500.0
    h[2, 3, 2] = -50.0  # large relative to the median but under the absolute 100
    assert analysis.massive_activations(h).values.tolist() == [0, 1, 0]


# --- spectral -------------------------------------------------------------------------------------


@pytest.mark.parametrize("b", [1, 2, 4])
def test_block_diagonal_attention(b):
    sizes = RNG.integers(2, 6, size=b)
    a = np.zeros((sizes.sum(),) * 2)
    start = np.concatenate([[0], np.cumsum(sizes)])
    for s, e in zip(start[:-1], start[1:]):
        a[s:e, s:e] = RNG.random((e - s, e - s)) + 0.1
    perm = RNG.permutation(len(a))
    a = a[perm][:, perm] / a.sum(axis=1)[perm][:, None]
    s = analysis.spectral_summary(a)
    assert int(s.blocks) == int(s.unit_eigenvalues) == b
    assert (float(s.spectral_gap) > 1e-8) == (b == 1)


def test_dense_softmax_attention_is_irreducible():
    x = RNG.normal(size=(3, 10, 4))
    scores = np.einsum("tid,tjd->tij", x, x)
    a = np.exp(scores - scores.max(-1, keepdims=True))
    a /= a.sum(-1, keepdims=True)
    s = analysis.spectral_summary(xr.DataArray(a, dims=("time", "query", "key")))
    assert s.blocks.dims == ("time",)
    assert s.blocks.values.tolist() == s.unit_eigenvalues.values.tolist() == [1, 1, 1]
    assert np.all(s.spectral_gap > 1e-3)


# --- layout ---------------------------------------------------------------------------------------


def test_numpy_and_xarray_layouts_are_labelled():
    sim = RNG.normal(size=(4, 9, 3))  # (time, particle, component)
    out = analysis.effective_rank(sim)
    assert out.dims == ("time",) and out.shape == (4,)
    assert out.values[2] == pytest.approx(analysis.effective_rank(sim[2]))

    ens = RNG.normal(size=(2, 4, 9, 3))  # (sample, time, …) for numpy
    assert analysis.mean_cosine(ens).dims == ("sample", "time")

    model = xr.DataArray(ens, dims=("sample", "layer", "token", "component"),
                         coords={"layer": [0, 1, 2, 3], "sample": ["a", "b"]})
    for f in (analysis.rank_collapse, lambda v: analysis.count_clusters(v, eps=0.5)):
        out = f(xr.Dataset({"x": model}))
        assert out.dims == ("sample", "layer")
        assert out.layer.values.tolist() == [0, 1, 2, 3] and out.sample.values.tolist() == ["a", "b"]
    labels = analysis.cluster_labels(model, eps=0.5)
    assert labels.dims == ("sample", "layer", "token")

    ds = xr.Dataset({"x": xr.DataArray(sim, dims=("time", "particle", "component"),
                                       coords={"time": [0.0, 0.1, 0.2, 0.3]})})
    out = analysis.rank_collapse(ds)
    assert out.dims == ("time",) and out.time.values.tolist() == [0.0, 0.1, 0.2, 0.3]
    assert isinstance(analysis.rank_collapse(sim[0]), float)

    summary = analysis.mean_sd(analysis.rank_collapse(model))
    assert set(summary) == {"mean", "sd"} and summary["mean"].dims == ("layer",)


# --- bad inputs -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call, param",
    [
        (lambda: analysis.count_clusters(np.zeros(5), eps=0.1), "x"),
        (lambda: analysis.effective_rank(np.zeros((1, 2, 3, 4, 5))), "x"),
        (lambda: analysis.count_clusters(np.zeros((3, 2)), eps=0.0), "eps"),
        (lambda: analysis.count_clusters(np.zeros((3, 2)), eps=-1.0), "eps"),
        (lambda: analysis.count_clusters(np.zeros((3, 2)), eps=0.1, method="kmeans"), "method"),
        (lambda: analysis.sink_rate(np.zeros((4, 4)), eps=0.0), "eps"),
        (lambda: analysis.sink_scores(np.zeros((4, 4)), k=4), "k"),
        (lambda: analysis.attention_entropy(np.zeros(4)), "attention"),
        (lambda: analysis.spectral_summary(np.zeros((3, 4))), "A"),
        (lambda: analysis.massive_activations(np.zeros(3)), "h"),
        (lambda: analysis.rank_collapse(xr.Dataset({"y": (("a", "b"), np.zeros((2, 2)))})), "x"),
        (lambda: analysis.time_to_clusters(np.zeros((3, 2)), 1, eps=0.1), "x"),
        (lambda: analysis.time_to_clusters(np.zeros((2, 3, 2)), 0, eps=0.1), "k"),
    ],
)
def test_bad_inputs_raise_value_error_naming_the_parameter(call, param):
    with pytest.raises(ValueError, match=rf"^{param}\b"):
        call()
