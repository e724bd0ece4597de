"""Metric values on constructed inputs with known answers (docs/metrics.md, issue 5 item 3)."""

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
    """The cell-compressed neighbour search (and, from DIRECT_MIN_DIM dimensions, the direct one)
    equals the dense ε-graph, ties and bands included."""
    # two 1-D cells whose first points are 1.45 apart, while 0.2 and 1.1 are within ε = 1
    assert analysis.count_clusters(np.array([[0.0], [1.45], [0.2], [1.1]]), eps=1.0) == 1
    for seed in range(8):
        rng = np.random.default_rng(seed)
        d = [1, 2, 3, 16, 40][seed % 5]
        scale = min(1.0, np.sqrt(3 / d))  # distances as in three dimensions
        blobs_ = rng.normal(size=(8, d)).repeat(15, axis=0) + 0.3 * scale * rng.normal(size=(120, d))
        x = np.concatenate([blobs_, scale * rng.uniform(0, 3, size=(200, d)) ** 2])
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


# --- dims read by name (issue 14 item 4) ------------------------------------------------------------


def merging_trajectory(seed=0):
    """(time, particle, component) DataArray whose cluster count falls 8 → 4 → 2 → 1."""
    traj = [blobs(k, n_per=8 // k, d=8, seed=seed + k) for k in (8, 4, 2, 1)]
    return xr.DataArray(np.stack(traj), dims=("time", "particle", "component"),
                        coords={"time": [0.0, 1.0, 2.0, 3.0]})


def assert_same(got, expected):
    """Equal values (to round-off) and equal dims, whatever the order of the dims."""
    if not isinstance(expected, xr.DataArray):
        assert isinstance(got, (int, float)) or got.ndim == 0
        assert float(got) == pytest.approx(expected, rel=1e-12) or np.isnan(expected) and np.isnan(got)
        return
    xr.testing.assert_allclose(got.transpose(*expected.dims), expected, rtol=1e-12)


POINT_METRICS = {
    "count_clusters": lambda x: analysis.count_clusters(x, eps=0.05),
    "count_clusters_gram": lambda x: analysis.count_clusters(x, eps=0.05, method="gram"),
    "cluster_labels": lambda x: analysis.cluster_labels(x, eps=0.05),
    "cluster_sizes": lambda x: analysis.cluster_sizes(x, eps=0.05),
    "effective_rank": analysis.effective_rank,
    "rank_collapse": analysis.rank_collapse,
    "mean_cosine": analysis.mean_cosine,
    "dirichlet_energy": analysis.dirichlet_energy,
    "interaction_energy": lambda x: analysis.interaction_energy(x, 2.0),
    "normalised_energy": lambda x: analysis.normalised_energy(x, 2.0),
    "massive_activations": analysis.massive_activations,
}

ATTENTION_METRICS = {
    "first_token_mass": analysis.first_token_mass,
    "sink_scores": lambda a, **kw: analysis.sink_scores(a, 1, **kw),
    "sink_rate": lambda a, **kw: analysis.sink_rate(a, eps=0.2, **kw),
    "attention_entropy": analysis.attention_entropy,
    "spectral_summary": lambda a, **kw: analysis.spectral_summary(a, **kw).to_array("quantity"),
}


@pytest.mark.parametrize("name", sorted(POINT_METRICS))
def test_point_metrics_read_item_axes_by_name(name):
    f, x = POINT_METRICS[name], merging_trajectory()
    expected = f(x)
    for order in [("time", "component", "particle"), ("component", "particle", "time"),
                  ("particle", "time", "component")]:
        assert_same(f(x.transpose(*order)), expected)
    if name == "count_clusters":
        assert expected.values.tolist() == [8, 4, 2, 1]
    token = x.rename(particle="token", time="layer")
    np.testing.assert_allclose(f(token.transpose("component", "layer", "token")).values, expected.values)


def test_transposed_count_clusters_of_the_issue():
    """count_clusters(ds.x.transpose("time", "component", "particle")) returned 3 at every step."""
    x = merging_trajectory()
    counts = analysis.count_clusters(x.transpose("time", "component", "particle"), eps=0.05)
    assert counts.values.tolist() == [8, 4, 2, 1]
    assert analysis.mean_cosine(x.transpose("time", "component", "particle")).values == pytest.approx(
        analysis.mean_cosine(x.values).values)


@pytest.mark.parametrize("name", sorted(ATTENTION_METRICS))
def test_attention_metrics_read_query_and_key_by_name(name):
    f = ATTENTION_METRICS[name]
    a = RNG.random((3, 2, 6, 6))
    a[..., 1] += 2.0 * np.arange(6)  # key 1 gets more mass on later queries
    a /= a.sum(-1, keepdims=True)
    qk = xr.DataArray(a, dims=("layer", "head", "query", "key"))
    expected = f(qk)
    for order in [("layer", "head", "key", "query"), ("key", "layer", "query", "head")]:
        assert_same(f(qk.transpose(*order)), expected)
    kq = xr.DataArray(np.swapaxes(a, -1, -2), dims=("layer", "head", "key", "query"))  # (key, query) storage
    assert_same(f(kq), expected)


def test_key_query_attention_is_not_read_as_query_key():
    a = np.full((5, 5), 0.1)
    a[:, 0] = 0.6  # every query puts 0.6 on key 0: a first-token sink
    kq = xr.DataArray(a.T, dims=("key", "query"))
    assert analysis.first_token_mass(kq) == pytest.approx(0.6)
    assert analysis.sink_rate(kq) == 1.0
    assert analysis.first_token_mass(xr.DataArray(a.T, dims=("query", "key"))) == pytest.approx(0.2)


@pytest.mark.parametrize(
    "call, param, listed",
    [
        (lambda: analysis.count_clusters(xr.DataArray(np.zeros((2, 4, 3)), dims=("time", "a", "b")), eps=0.1),
         "x", "particle"),
        (lambda: analysis.mean_cosine(xr.DataArray(np.zeros((4, 3)))), "x", "component"),
        (lambda: analysis.effective_rank(xr.DataArray(np.zeros((2, 4, 3)), dims=("time", "particle", "dim"))),
         "x", "component"),
        (lambda: analysis.rank_collapse(
            xr.DataArray(np.zeros((4, 4, 3)), dims=("particle", "token", "component"))),
         "x", "several"),
        (lambda: analysis.first_token_mass(xr.DataArray(np.zeros((2, 4, 4)), dims=("layer", "q", "k"))),
         "attention", "query"),
        (lambda: analysis.spectral_summary(xr.DataArray(np.eye(3), dims=("query", "keys"))), "A", "key"),
    ],
)
def test_unidentifiable_layouts_are_refused(call, param, listed):
    with pytest.raises(ValueError, match=rf"^{param}\b.*{listed}"):
        call()


# --- non-finite input (issue 14 item 5) -------------------------------------------------------------


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("name", sorted(POINT_METRICS))
def test_non_finite_configurations_are_refused(name, bad):
    x = merging_trajectory().values
    x[2, 3, 1] = bad
    with pytest.raises(ValueError, match=r"^(x|h)\b.*(NaN|inf)"):
        POINT_METRICS[name](x)


def test_gram_count_of_a_nan_configuration_is_an_error():
    """count_clusters(x_with_nan, method="gram") returned 23."""
    x = blobs(3, n_per=10)
    x[4] = np.nan
    with pytest.raises(ValueError, match=r"^x: contains 3 NaN"):
        analysis.count_clusters(x, eps=0.1, method="gram")


@pytest.mark.parametrize("bad", [np.nan, np.inf])
@pytest.mark.parametrize("name", sorted(ATTENTION_METRICS))
def test_non_finite_attention_is_refused(name, bad):
    a = np.full((2, 5, 5), 0.2)
    a[1, 2, 3] = bad
    with pytest.raises(ValueError, match=r"^(attention|A)\b.*(NaN|inf)"):
        ATTENTION_METRICS[name](a)


@pytest.mark.parametrize("name", sorted(ATTENTION_METRICS))
def test_negative_or_empty_attention_is_refused(name):
    a = np.full((2, 5, 5), 0.2)
    a[1, 0, 0] = -0.1
    with pytest.raises(ValueError, match=r"^(attention|A)\b.*negative"):
        ATTENTION_METRICS[name](a)
    with pytest.raises(ValueError, match=r"^(attention|A)\b.*without any positive weight"):
        ATTENTION_METRICS[name](np.zeros((2, 5, 5)))


def test_an_all_nan_attention_layer_is_missing_not_an_error():
    """The extraction's last layer has no attention (all NaN): its metrics are NaN."""
    a = np.full((3, 4, 4), 0.25)
    a[0, :, 0] = 1.0
    a[0, :, 1:] = 0.0
    a[2] = np.nan
    ftm = analysis.first_token_mass(xr.DataArray(a, dims=("layer", "query", "key")))
    assert ftm.values[:2].tolist() == [1.0, 0.25] and np.isnan(ftm.values[2])
    ent = analysis.attention_entropy(a)
    assert ent.values[1] == pytest.approx(1.0) and np.isnan(ent.values[2])


# --- lazy, chunked input (issue 17 item 5) ------------------------------------------------------------


def _no_compute(dsk, keys, **kwargs):
    raise AssertionError("the metric computed its dask input")


def test_metrics_of_a_lazily_opened_zarr_trajectory_stay_lazy(tmp_path):
    dask = pytest.importorskip("dask")
    x = merging_trajectory().expand_dims(sample=[0, 1]).copy()
    x[1] = x[1].values[:, RNG.permutation(8)]
    a = RNG.random((2, 4, 8, 8))
    a /= a.sum(-1, keepdims=True)
    ds = xr.Dataset({"x": x, "attention": (("sample", "time", "query", "key"), a)})
    ds.chunk({"sample": 1, "time": 2, "particle": 4}).to_zarr(tmp_path / "t.zarr", consolidated=False)
    lazy = xr.open_zarr(tmp_path / "t.zarr", consolidated=False)
    assert lazy.x.chunks == ((1, 1), (2, 2), (4, 4), (8,))  # the item axis is split on disk
    calls = {
        "count_clusters": lambda d: analysis.count_clusters(d, eps=0.05),
        "gram": lambda d: analysis.count_clusters(d.x, eps=0.05, method="gram"),
        "labels": lambda d: analysis.cluster_labels(d, eps=0.05),
        "effective_rank": analysis.effective_rank,
        "mean_cosine": lambda d: analysis.mean_cosine(
            d.x.transpose("component", "sample", "time", "particle")),
        "first_token_mass": analysis.first_token_mass,
        "sink_excess": lambda d: analysis.sink_excess(d, k=1),
        "sink_rate": lambda d: analysis.sink_rate(d, eps=0.1, relative=True),
        "entropy": lambda d: analysis.attention_entropy(d, queries=[0, 3]),
        "spectral": lambda d: analysis.spectral_summary(d.attention).spectral_gap,
    }
    for name, f in calls.items():
        with dask.config.set(scheduler=_no_compute):
            out = f(lazy)
        assert isinstance(out.data, dask.array.Array), name
        eager = f(ds)
        assert_same(out.compute().transpose(*eager.dims), eager)
    assert analysis.count_clusters(lazy, eps=0.05).values.tolist() == [[8, 4, 2, 1]] * 2


def test_non_finite_lazy_input_fails_on_compute_naming_the_argument(tmp_path):
    pytest.importorskip("dask")
    x = merging_trajectory()
    x[1, 2, 0] = np.nan
    lazy = x.chunk({"time": 1})
    out = analysis.effective_rank(lazy)
    with pytest.raises(ValueError, match=r"^x: contains 1 NaN"):
        out.compute()


# --- token mask (padding is never a particle) ---------------------------------------------------------


def padded_extraction(left=False):
    """(sample=2, layer=3, token=6, component=5) hidden states and (…, head=2, query, key) attention;
    sample 1 has 2 padding tokens (at the end, or at the start with ``left``) filled with junk."""
    x = RNG.normal(size=(2, 3, 6, 5))
    mask = np.ones((2, 6), bool)
    pad = [0, 1] if left else [4, 5]
    mask[1, pad] = False
    x[1, :, pad] = 1e3 * RNG.normal(size=(2, 3, 5))  # junk tokens far from everything
    a = RNG.random((2, 3, 2, 6, 6)) * (RNG.random((2, 3, 2, 6, 6)) > 0.3)
    a[..., 2 if left else 0] += 1.0  # the first real key: a sink
    a[1, ..., pad] = 0.0  # padding keys get no weight ...
    a /= a.sum(-1, keepdims=True)
    a[1, :, :, pad, :] = 1 / 6  # ... but padding rows hold junk
    ds = xr.Dataset({"x": (("sample", "layer", "token", "component"), x),
                     "attention": (("sample", "layer", "head", "query", "key"), a)},
                    coords={"token_mask": (("sample", "token"), mask), "layer": [0, 1, 2]})
    real = [i for i in range(6) if i not in pad]
    return ds, real


MASKED_POINT_METRICS = {k: v for k, v in POINT_METRICS.items()
                        if k not in ("cluster_labels", "cluster_sizes")}
MASKED_POINT_METRICS["count_clusters"] = lambda x: analysis.count_clusters(x, eps=0.3)
MASKED_ATTENTION_METRICS = dict(
    ATTENTION_METRICS,
    sink_excess=lambda a, **kw: analysis.sink_excess(a, 1, **kw),
    rel_rate=lambda a, **kw: analysis.sink_rate(a, eps=0.2, relative=True, **kw),
    cls=lambda a, **kw: analysis.sink_excess(a, queries=0, **kw),
)


@pytest.mark.parametrize("left", [False, True])
@pytest.mark.parametrize("name", sorted(MASKED_POINT_METRICS))
def test_point_metrics_leave_padding_out(name, left):
    f = MASKED_POINT_METRICS[name]
    ds, real = padded_extraction(left)
    truncated = f(ds.x.isel(sample=1, token=real).drop_vars("token_mask"))
    for given in (ds, ds.x):  # the Dataset, or its x carrying the mask as a coordinate
        got = f(given)
        assert_same(got.sel(sample=1, drop=True), truncated)
        assert_same(got.sel(sample=0, drop=True), f(ds.x.isel(sample=0).drop_vars("token_mask")))
    stored_as_int8 = ds.assign_coords(token_mask=ds.token_mask.astype(np.int8))
    assert_same(f(stored_as_int8).sel(sample=1, drop=True), truncated)


@pytest.mark.parametrize("name", sorted(POINT_METRICS))
def test_a_sample_of_padding_only(name):
    x = xr.DataArray(
        RNG.normal(size=(2, 3, 4, 2)), dims=("sample", "layer", "token", "component"),
        coords={"token_mask": (("sample", "token"), np.array([[1, 1, 1, 1], [0, 0, 0, 0]], bool))})
    out = POINT_METRICS[name](x)
    if name.startswith("count") or name in ("massive_activations", "cluster_sizes"):
        assert (out.sel(sample=1) == 0).all()
    elif name == "cluster_labels":
        assert (out.sel(sample=1) == -1).all()
    else:
        assert out.sel(sample=1).isnull().all() and out.sel(sample=0).notnull().all()


def test_token_mask_keyword_and_labels_of_padding():
    ds, real = padded_extraction()
    bare = ds.x.drop_vars("token_mask")
    xr.testing.assert_identical(analysis.effective_rank(bare, token_mask=ds.token_mask),
                                analysis.effective_rank(ds))
    np.testing.assert_array_equal(analysis.effective_rank(bare, token_mask=ds.token_mask.values),
                                  analysis.effective_rank(ds))
    labels = analysis.cluster_labels(ds, eps=0.3)
    assert (labels.sel(sample=1).values[:, 4:] == -1).all() and (labels.values[0] >= 0).all()
    sizes = analysis.cluster_sizes(ds, eps=0.3)
    assert sizes.sum("cluster").values.tolist() == [[6] * 3, [4] * 3]
    with pytest.raises(ValueError, match=r"^token_mask\b"):
        analysis.effective_rank(bare, token_mask=np.ones(5, bool))


@pytest.mark.parametrize("name, left", [(name, left) for name in sorted(MASKED_ATTENTION_METRICS)
                                        for left in (False, True) if not (name == "cls" and left)])
def test_attention_metrics_leave_padding_out(name, left):
    """(queries= counts stored positions, so CLS with left padding: test_queries_count_stored_positions.)"""
    f = MASKED_ATTENTION_METRICS[name]
    ds, real = padded_extraction(left)
    a = ds.attention
    truncated = f(a.isel(sample=1, query=real, key=real))
    got = f(ds)
    assert_same(got.sel(sample=1, drop=True) if "sample" in got.dims else got, truncated)
    assert_same(f(a, token_mask=ds.token_mask), got)
    assert_same(got.sel(sample=0, drop=True), f(a.isel(sample=0)))


def test_queries_count_stored_positions():
    """With left padding the CLS row of sample 1 is stored at position 2; key k counts real tokens."""
    ds, real = padded_extraction(left=True)
    a = ds.attention
    truncated = analysis.sink_excess(a.isel(sample=1, query=real, key=real), queries=0)
    assert_same(analysis.sink_excess(a.isel(sample=1), queries=2, token_mask=ds.token_mask[1]), truncated)
    per_sample = xr.DataArray(np.eye(6, dtype=bool)[[0, 2]], dims=("sample", "query"))
    assert_same(analysis.sink_excess(ds, queries=per_sample).sel(sample=1, drop=True), truncated)
    assert np.isnan(analysis.sink_excess(ds, queries=0).sel(sample=1)).all()  # row 0 is padding there


# --- sphere by default for extracted trajectories --------------------------------------------------

SCALE_FREE = {k: v for k, v in POINT_METRICS.items() if k != "massive_activations"}


@pytest.mark.parametrize("name", sorted(SCALE_FREE))
def test_rescaling_extracted_tokens_changes_no_cluster_or_collapse_metric(name):
    f = SCALE_FREE[name]
    x = merging_trajectory().rename(time="layer", particle="token")
    x = x + 0.002 * xr.DataArray(RNG.normal(size=x.shape), dims=x.dims)
    factor = xr.DataArray(RNG.uniform(0.1, 10.0, size=x.shape[:2]), dims=("layer", "token"))
    assert_same(f(x * factor), f(x))
    if name == "count_clusters":
        assert f(x * factor).values.tolist() == [8, 4, 2, 1]


def test_sphere_opt_out_and_simulated_trajectories_unchanged():
    x = merging_trajectory()
    scaled = x * xr.DataArray(RNG.uniform(0.1, 10.0, size=x.shape[:2]), dims=("time", "particle"))
    for f in (analysis.effective_rank, analysis.rank_collapse, analysis.dirichlet_energy):
        xr.testing.assert_identical(f(scaled), f(scaled, sphere=False))  # simulated: raw by default
        assert not np.allclose(f(scaled).values, f(scaled, sphere=True).values)
        np.testing.assert_allclose(f(x, sphere=True).values, f(x).values, rtol=1e-12, atol=1e-15)
        extracted = scaled.rename(particle="token")
        np.testing.assert_array_equal(f(extracted, sphere=False).values, f(scaled).values)
    with pytest.raises(TypeError, match=r"^sphere\b"):
        analysis.effective_rank(x, sphere="yes")


# --- fair sink metrics -------------------------------------------------------------------------------


def uniform_over(support):
    return support / support.sum(-1, keepdims=True)


def test_sink_excess_is_zero_for_uniform_attention_over_any_support():
    n = 9
    causal = np.tril(np.ones((n, n)))
    window = (np.abs(np.subtract.outer(np.arange(n), np.arange(n))) < 3).astype(float)
    sparse = (RNG.random((n, n)) < 0.4) | np.eye(n, dtype=bool)
    for support in (np.ones((n, n)), causal, window, sparse.astype(float)):
        for k in (0, 1, 4):
            assert analysis.sink_excess(uniform_over(support), k) == pytest.approx(0.0, abs=1e-15)
            assert analysis.sink_rate(uniform_over(support), eps=1e-9, k=k, relative=True) == 0.0


def test_sink_excess_of_a_full_sink_and_head_average():
    n, delta = 8, 1e-6
    one_hot = np.eye(n)[[0] * n]
    assert analysis.sink_excess(one_hot) == 0.0  # the support is key 0 alone: nothing to exceed
    full = np.full((n, n), delta)
    full[:, 0] = 1 - (n - 1) * delta  # a softmax sink: every key visible, almost all mass on key 0
    assert analysis.sink_excess(full) == pytest.approx(1 - (n - 1) * delta - 1 / n)
    causal = np.tril(np.ones((n, n)))
    # a causal full sink is all of row i's mass on key 0: the support is only key 0, b_0 = 1, excess 0;
    # half the mass on key 0, the rest uniform over the causal window:
    half = 0.5 * uniform_over(causal)
    half[:, 0] += 0.5
    base = np.mean(1 / np.arange(1, n + 1))
    assert analysis.sink_scores(half) == pytest.approx(0.5 + 0.5 * base)
    assert analysis.sink_excess(half) == pytest.approx(0.5 - 0.5 * base)
    heads = xr.DataArray(np.stack([np.stack([full, uniform_over(np.ones((n, n)))])] * 3),
                         dims=("layer", "head", "query", "key"))
    out = analysis.sink_excess(heads)
    excess = (1 - (n - 1) * delta - 1 / n) / 2
    assert out.dims == ("layer",) and out.values == pytest.approx([excess] * 3)
    assert analysis.sink_excess(heads, over=("layer", "head")) == pytest.approx(excess)
    assert analysis.sink_excess(heads, over=()).dims == ("layer", "head")


def test_relative_sink_rate_threshold_is_the_normalised_excess():
    """α_k > b_k + ε(1 − b_k): the same ε on a 6-key and a 17-key support."""
    def one_row_sink(n_keys, alpha, n=20):
        a = np.zeros((n, n))
        a[:, :n_keys] = (1 - alpha) / (n_keys - 1)
        a[:, 0] = alpha
        return a

    for n_keys in (6, 17):
        b = 1 / n_keys
        threshold = b + 0.3 * (1 - b)
        assert analysis.sink_rate(one_row_sink(n_keys, threshold + 1e-9), eps=0.3, relative=True) == 1.0
        assert analysis.sink_rate(one_row_sink(n_keys, threshold - 1e-9), eps=0.3, relative=True) == 0.0
    # α_0 = 0.33 on 17 keys: a sink for Gu et al.'s fixed ε = 0.3, not relative to uniform (0.341)
    assert analysis.sink_rate(one_row_sink(17, 0.33)) == 1.0
    assert analysis.sink_rate(one_row_sink(17, 0.33), relative=True) == 0.0
    # uniform over 6 keys: α_0 = 1/6 > ε = 0.1 is a "sink" in absolute terms only
    assert analysis.sink_rate(one_row_sink(6, 1 / 6), eps=0.1) == 1.0
    assert analysis.sink_rate(one_row_sink(6, 1 / 6), eps=0.1, relative=True) == 0.0
    single = np.eye(5)[[0] * 5]  # one visible key: b_0 = 1, never a sink
    assert analysis.sink_rate(single, eps=1e-6, relative=True) == 0.0 and analysis.sink_rate(single) == 1.0
    with pytest.raises(TypeError, match=r"^relative\b"):
        analysis.sink_rate(single, relative="yes")


def test_queries_restrict_sink_metrics_to_the_rows_that_reach_the_output():
    n = 6
    a = uniform_over(np.ones((n, n)))
    a[0] = 0.5 / (n - 1)
    a[0, 0] = 0.5
    expected = 0.5 - 1 / n  # only the CLS row (0) has a sink; the patch rows are uniform
    assert analysis.sink_excess(a) == pytest.approx(expected / n)
    for sel in (0, [0], slice(0, 1), np.arange(n) == 0, -n):
        assert analysis.sink_excess(a, queries=sel) == pytest.approx(expected)
        assert analysis.first_token_mass(a, queries=sel) == pytest.approx(0.5)
    assert analysis.sink_excess(a, queries=slice(1, None)) == pytest.approx(0.0, abs=1e-15)
    assert analysis.attention_entropy(a, queries=slice(1, None)) == pytest.approx(1.0)
    per_sample = xr.DataArray(np.stack([np.arange(n) == 0, np.arange(n) > 0]), dims=("sample", "query"))
    out = analysis.sink_excess(xr.DataArray(np.stack([a, a]), dims=("sample", "query", "key")),
                               queries=per_sample)
    assert out.values == pytest.approx([expected, 0.0])
    for bad in (n, [0, n], np.ones(n - 1, bool), "cls", 1.5):
        with pytest.raises(ValueError, match=r"^queries\b"):
            analysis.sink_excess(a, queries=bad)
