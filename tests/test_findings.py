"""analysis.findings: the resumable run driver, the statistics over seeds, the per-run measurements."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from analysis.findings import stats  # noqa: E402
from analysis.findings.runs import Run, load_runs, run_plan  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(epochs=1, subset=64, overrides=dict(d_model=8, n_heads=2, n_layers=1))


def tiny_plan():
    return [
        Run("tiny", cell, seed, "digits-vit", cell, dict(TINY), n_measure=16)
        for seed in (0, 1)
        for cell in ("dot", "rbf+grid+topk")
    ]


DRIVER = textwrap.dedent(
    """
    import sys, torch
    torch.set_num_threads(1)
    sys.path.insert(0, {tests!r})
    from test_findings import tiny_plan
    from analysis.findings.runs import run_plan
    run_plan(tiny_plan(), sys.argv[1], log=lambda m: print(m, flush=True))
    """
)


def _results(root):
    out = {}
    for r in load_runs(root, "tiny"):
        card = r["card"]
        out[r["path"].name] = (card["sha256"], card["metrics"]["test_accuracy"], r["measure"])
    return out


def test_driver_resumes_after_kill_with_identical_results(tmp_path):
    killed, whole = tmp_path / "killed", tmp_path / "whole"
    script = tmp_path / "driver.py"
    script.write_text(DRIVER.format(tests=str(ROOT / "tests")))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        [sys.executable, str(script), str(killed)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while time.time() < deadline and not list((killed / "tiny").glob("*/model.json")):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = len(list((killed / "tiny").glob("*/model.json")))
    assert 1 <= finished < 4, "the kill must land mid-plan"
    first = {d.name: (d / "model.json").stat().st_mtime_ns for d in (killed / "tiny").glob("*-s*")}
    subprocess.run(
        [sys.executable, str(script), str(killed)], cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL
    )
    for name, mtime in first.items():  # finished runs are skipped, not redone
        assert (killed / "tiny" / name / "model.json").stat().st_mtime_ns == mtime
    run_plan(tiny_plan(), whole, log=lambda m: None)
    a, b = _results(killed), _results(whole)
    assert sorted(a) == sorted(b) and len(a) == 4
    for name in a:
        assert a[name][:2] == b[name][:2]  # same weights (sha256), same accuracy
        for var in ("effective_rank", "a0", "clusters"):
            np.testing.assert_array_equal(a[name][2][var].values, b[name][2][var].values)


def test_mean_ci_known_numbers():
    mean, half, n = stats.mean_ci([1.0, 2.0, 3.0])
    assert mean == 2.0 and n == 3
    assert half == pytest.approx(4.302652729911275 / np.sqrt(3))  # t_{2, 0.975} · s/√n, s = 1
    mean, half, n = stats.mean_ci([[1.0, 10.0], [3.0, np.nan], [5.0, 12.0]])
    np.testing.assert_allclose(mean, [3.0, 11.0])
    assert list(n) == [3, 2]
    assert half[0] == pytest.approx(4.302652729911275 * 2 / np.sqrt(3))
    assert half[1] == pytest.approx(12.706204736174698 * np.sqrt(2) / np.sqrt(2))
    assert np.isnan(stats.mean_ci([1.0])[1])


def test_factorial_effects_recover_known_contrasts():
    # y = 1 + 2·A + 3·B + 4·A·B (+ noise ±1 per cell, mean 0)
    cells = {(a, b): [1 + 2 * a + 3 * b + 4 * a * b + e for e in (-1.0, 1.0)] for a in (0, 1) for b in (0, 1)}
    cells = {(bool(a), bool(b)): v for (a, b), v in cells.items()}
    got = {e["effect"]: e for e in stats.effects(cells, ("A", "B"))}
    assert got["A"]["estimate"] == pytest.approx(2 + 4 / 2)  # mean over B of the A effect
    assert got["B"]["estimate"] == pytest.approx(3 + 4 / 2)
    assert got["A×B"]["estimate"] == pytest.approx(4)
    # every cell has s² = 2, n = 2: var(main) = 4 · (1/2)² · 2/2 = 1, dof = 4 (Welch, equal cells)
    assert got["A"]["dof"] == pytest.approx(4)
    assert got["A"]["ci"] == pytest.approx(2.7764451051977987 * 1.0)
    assert got["A×B"]["ci"] == pytest.approx(2.7764451051977987 * 2.0)
    with pytest.raises(ValueError, match="cells"):
        stats.effects({(False, False): [1.0]}, ("A", "B"))


# --- trained vs simulated: distances and time steps ----------------------------------------------
def _circle(n, shift=0.0):
    phi = 2 * np.pi * np.arange(n) / n + shift
    return np.c_[np.cos(phi), np.sin(phi)]


@pytest.mark.parametrize("theta", [0.05, 0.2])
def test_sphere_wasserstein_rotation_on_the_circle(theta):
    """n equally spaced points and the same cloud rotated by θ ≤ π/n: every point's nearest target is
    its own rotation, so W₁ = θ (geodesic) and 2 sin(θ/2) (chordal), whatever the radius of the input."""
    from analysis.bridge.distance import sphere_wasserstein

    a, b = 3.0 * _circle(12), _circle(12, theta)
    assert sphere_wasserstein(a, b) == pytest.approx(theta, abs=1e-9)
    assert sphere_wasserstein(a, b, cost="chordal") == pytest.approx(2 * np.sin(theta / 2), abs=1e-9)
    assert sphere_wasserstein(a, a) == pytest.approx(0.0, abs=1e-12)
    # two antipodal-free clusters: half the mass at angle 0, half at π/2 vs all at 0 → W₁ = π/4
    c = np.r_[np.tile([[1.0, 0.0]], (5, 1)), np.tile([[0.0, 1.0]], (5, 1))]
    assert sphere_wasserstein(c, np.tile([[1.0, 0.0]], (4, 1))) == pytest.approx(np.pi / 4)
    with pytest.raises(ValueError, match="cost"):
        sphere_wasserstein(a, b, cost="l2")


def test_layer_distances_frozen_baseline_and_mask():
    import xarray as xr

    from analysis.bridge.distance import layer_distances

    theta = 0.1
    x = np.stack([_circle(8, layer * theta) for layer in range(3)])[None]  # (1, 3, 8, 2): rotates θ per layer
    target = xr.Dataset({"x": (("sample", "layer", "token", "component"), x)})
    still = xr.Dataset({"x": (target["x"].dims, np.broadcast_to(x[:, :1], x.shape).copy())})
    d = layer_distances(target, {"still": still, "same": target})
    np.testing.assert_allclose(d["distance"].sel(series="frozen").values, [0, theta, 2 * theta], atol=1e-9)
    np.testing.assert_allclose(d["distance"].sel(series="still").values, d["distance"].sel(series="frozen"))
    np.testing.assert_allclose(d["distance"].sel(series="same").values, 0.0, atol=1e-9)
    masked = target.assign_coords(token_mask=(("sample", "token"), np.r_[[True] * 4, [False] * 4][None]))
    other = target.copy()
    other["x"] = other["x"].copy()
    other["x"].values[:, :, 4:] = -other["x"].values[:, :, 4:]  # only padding differs
    np.testing.assert_allclose(
        layer_distances(masked, {"o": other})["distance"].sel(series="o"), 0, atol=1e-9
    )


def test_matched_dt_reproduces_the_first_block_angle():
    from analysis.bridge import extract
    from analysis.bridge.simulated import matched_dt, mean_angle, simulate_like
    from particles.nn.train import TASKS, build_model

    torch.manual_seed(0)
    model = build_model(TASKS["digits-vit"]().config("rbf+grid+topk", d_model=16, n_layers=2)).eval()
    ds = extract(model, torch.rand(6, 8, 8) * 16)
    dt, theta = matched_dt(model, ds, steps_per_layer=2)
    sim = simulate_like(model, ds, mode="own", dt=dt, steps_per_layer=2, attention=False)
    assert theta == pytest.approx(mean_angle(ds["x"].values[:, 0], ds["x"].values[:, 1]))
    assert mean_angle(sim["x"].values[:, 0], sim["x"].values[:, 1]) == pytest.approx(theta, rel=1e-2)


def test_compare_table_shows_simulation_time_not_layer():
    """A simulation compared with an extraction: rows aligned by saved step, the time in its own column
    (issue: simulation time was printed as "layer")."""
    from analysis.bridge import compare, format_table
    from particles import simulate

    sim = simulate("sa", n=6, d=3, steps=4, dt=0.25, save_every=2, beta=1.0, return_weights=True)
    ext = sim.rename(time="layer", particle="token").assign_coords(layer=np.arange(3))
    cmp = compare({"sim": sim, "ext": ext})
    np.testing.assert_allclose(cmp["time"].sel(model="sim").values, [0.0, 0.5, 1.0])
    assert np.isnan(cmp["time"].sel(model="ext").values).all()
    rows = [line.split() for line in format_table(cmp).splitlines() if line.startswith("sim ")]
    assert [(r[1], r[2]) for r in rows if r[1].isdigit()] == [("0", "0"), ("1", "0.5"), ("2", "1")]


def test_layer_metrics_ignore_padding_and_token_scale():
    """An extracted Dataset with padding tokens (token_mask False) gives the metrics of its real tokens
    alone, and scaling the tokens changes nothing (sphere); the first-token excess is
    analysis.sink_excess (uniform attention over the visible keys has excess 0)."""
    import xarray as xr

    import analysis
    from analysis.bridge import layer_metrics
    from analysis.bridge.core import build_dataset

    rng = np.random.default_rng(0)
    S, L, T, D, H, pad = 2, 2, 6, 4, 2, 3
    hidden = rng.normal(size=(S, L + 1, T, D))
    logits = rng.normal(size=(S, L, H, T, T)) * 2
    causal = np.tril(np.ones((T, T), bool))
    a = np.where(causal, np.exp(logits), 0.0)
    a[:, 1] = causal  # layer 1: uniform over the visible keys
    a /= a.sum(-1, keepdims=True)

    def dataset(hidden, a, mask):
        attn = np.concatenate([a, np.full((S, 1, H) + a.shape[-2:], np.nan)], 1)  # layer L: none
        dims = ("sample", "layer", "head", "query", "key")
        return build_dataset(hidden, {"attention": (dims, attn)}, {}, {"n_attention_layers": L}, mask)

    big = np.concatenate([hidden, rng.normal(size=(S, L + 1, pad, D)) * 50], 2)
    big_a = np.zeros((S, L, H, T + pad, T + pad))
    big_a[..., :T, :T] = a
    big_a[..., T:, :] = 1.0 / (T + pad)  # padding rows: anything
    mask = np.arange(T + pad) < T
    plain = layer_metrics(dataset(hidden, a, None))
    padded = layer_metrics(dataset(big * 7.0, big_a, np.broadcast_to(mask, (S, T + pad))))
    for v in (
        "clusters",
        "effective_rank",
        "mean_cosine",
        "rank_collapse",
        "first_token_mass",
        "first_token_excess",
        "first_token_uniform",
        "attention_entropy",
    ):
        np.testing.assert_allclose(padded[v].values, plain[v].values, rtol=1e-10, err_msg=v)
    excess = analysis.sink_excess(xr.DataArray(a, dims=("sample", "layer", "head", "query", "key")), 0)
    np.testing.assert_allclose(plain["first_token_excess"].values[:L], excess.mean("sample").values)
    np.testing.assert_allclose(plain["first_token_excess"].sel(layer=1), 0.0, atol=1e-15)
    assert plain["first_token_excess"].sel(layer=0) > 0.05  # random causal rows favour key 0


def test_rows_that_reach_the_output():
    """The ViT's last block: only the CLS row reaches the logits (uniform patch rows change them by
    exactly 0); an earlier block's patch rows do reach them. measure() marks the same rows."""
    from analysis.findings.measure import measure, reaching_rows, uniform_rows_effect
    from particles.nn.train import TASKS, build_model

    torch.manual_seed(0)
    model = build_model(TASKS["digits-vit"]().config("dot+grid", d_model=16, n_layers=2)).eval()
    x = torch.rand(5, 8, 8) * 16
    patches = list(range(1, 17))
    assert uniform_rows_effect(model, x, 1, patches) == 0.0
    assert uniform_rows_effect(model, x, 1, [0]) > 1e-4
    assert uniform_rows_effect(model, x, 0, patches) > 1e-4
    keep = reaching_rows(model, 2, 17)
    assert keep[0].all() and keep[1, 0] and not keep[1, 1:].any()
    m = measure(model, x, eps=(0.5,))
    assert m["key_mass"].shape == (2, 4, 17)
    np.testing.assert_allclose(m["key_mass"].sum("key"), 1.0, atol=1e-6)  # each row sums to 1
    np.testing.assert_allclose(m["key_mass"].isel(key=0), m["a0"].mean("query"), atol=1e-12)
    assert (m["support_size"].isel(attn_layer=0, query=slice(1, None)) <= 6).all()  # grid: ≤ 4 + self + CLS


def _fake_ablation(task, rng, seeds=3):
    import xarray as xr

    from analysis.findings.experiments import CAUSAL_CELLS, VIT_CELLS

    cells = VIT_CELLS if task == "digits-vit" else CAUSAL_CELLS
    V, S, L = len(cells), seeds, 4
    shape = (V, S)
    return xr.Dataset(
        {
            "clusters": (("variant", "seed", "eps", "layer"), rng.uniform(1, 17, shape + (1, L + 1))),
            "effective_rank": (("variant", "seed", "layer"), rng.uniform(1, 12, shape + (L + 1,))),
            "alpha0_excess_out": (("variant", "seed", "attn_layer"), rng.normal(0, 0.05, shape + (L,))),
            "entropy_out": (("variant", "seed", "attn_layer"), rng.uniform(0, 1, shape + (L,))),
        },
        coords={
            "variant": list(cells),
            "seed": np.arange(S),
            "eps": [0.5],
            "layer": np.arange(L + 1),
            "attn_layer": np.arange(L),
        },
        attrs={"task": task},
    )


def test_ablation_figure_plots_mean_and_t_interval(tmp_path, monkeypatch):
    import xarray as xr

    import analysis.figures.ablation as ab

    rng = np.random.default_rng(0)
    vit, lm = _fake_ablation("digits-vit", rng), _fake_ablation("text-bos", rng)
    vit.to_netcdf(tmp_path / "vit-ablation.nc")
    lm.to_netcdf(tmp_path / "causal-ablation.nc")
    monkeypatch.setattr(ab, "DATA", tmp_path)
    out = ab.make_ablation_bridge(out=tmp_path / "fig")
    for ext in ("png", "pdf", "nc"):
        assert (tmp_path / f"fig/ablation_bridge.{ext}").stat().st_size > 0
    saved = xr.open_dataset(tmp_path / "fig/ablation_bridge.nc")
    got = saved.sel(task="digits-vit", variant="rbf+grid", metric="effective_rank")
    x = vit["effective_rank"].sel(variant="rbf+grid").values  # (seed, layer)
    np.testing.assert_allclose(got["mean"].values, x.mean(0))
    np.testing.assert_allclose(got["ci"].values, 4.302652729911275 * x.std(0, ddof=1) / np.sqrt(3))
    exc = saved.sel(task="text-bos", variant="dot+window+topk", metric="alpha0_excess_out")
    np.testing.assert_allclose(exc["depth"].values[np.isfinite(exc["mean"].values)], [1, 2, 3, 4])
    assert out.attrs["figure"] == "ablation_bridge"


def test_merge_variants_keeps_earlier_cells_and_prefers_the_new_runs():
    """collect --keep-other-variants: cells collected from an earlier run store stay in the data file
    beside the new store's cells; a cell in both comes from the new store; missing seeds are NaN."""
    import xarray as xr

    from analysis.findings.collect import merge_variants

    def runs(variants, seeds, value):
        shape = (len(variants), len(seeds))
        return xr.Dataset(
            {"steps": (("variant", "seed"), np.full(shape, 100.0)),
             "score": (("variant", "seed"), np.full(shape, value))},
            coords={"variant": variants, "seed": seeds},
            attrs={"n_runs": int(np.prod(shape)), "experiment": "x"},
        )

    old = runs(["dot", "rbf+window+topk"], [0, 1, 2], 1.0)
    new = runs(["dot", "rbf"], [0], 2.0)
    merged = merge_variants(old, new)
    assert list(merged["variant"].values) == ["rbf+window+topk", "dot", "rbf"]
    assert merged["score"].sel(variant="dot", seed=0) == 2.0  # the new store's run
    assert np.isnan(merged["score"].sel(variant="dot", seed=1))  # not carried over from the old one
    assert (merged["score"].sel(variant="rbf+window+topk") == 1.0).all()
    assert merged.attrs["n_runs"] == 3 + 2
    xr.testing.assert_identical(merge_variants(old.sel(variant=["dot"]), new), new)
