"""The baselines and the head-dimension section of ``ksync bench`` compute the same steps as our kernels."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from analysis import bench
from particles import make_interaction, reference


@pytest.mark.parametrize("model,params", [("sa", {"beta": 2.0}), ("krause", {"sigma": 0.7}),
                                          ("sa", bench.general_qkv(6)), ("krause", bench.general_qkv(6))])
def test_sdpa_baseline_is_the_same_velocity(model, params):
    it = make_interaction(model, **params)
    x = bench.sphere_state(70, 6, "float64", seed=1)
    want = reference.velocity(x, it)
    assert np.abs(bench.sdpa_dense(torch.from_numpy(x), it).numpy() - want).max() < 1e-12
    batch = torch.from_numpy(np.stack([x, x[::-1].copy()]))  # (S, n, d): batched like the ensembles
    got = bench.sdpa_dense(batch, it).numpy()
    assert np.abs(got[1] - reference.velocity(x[::-1], it)).max() < 1e-12


@pytest.mark.skipif(not bench.keops_available(), reason="pykeops not installed")
def test_keops_baseline_is_the_same_velocity():
    x = bench.sphere_state(50, 3, "float32")
    for model in ("sa", "krause"):
        it = make_interaction(model)
        got = bench.keops_dense(torch.from_numpy(x), it).numpy()
        assert np.abs(got - reference.velocity(x.astype(np.float64), it)).max() < 1e-5


@pytest.mark.parametrize("case", [bench.StepCase("softmax", "float64", 300, 3),
                                  bench.StepCase("rbf", "float64", 300, 16),
                                  bench.StepCase("softmax", "float64", 300, 8, "general"),
                                  bench.StepCase("rbf", "float32", 300, 5, "general")], ids=lambda c: c.name)
def test_head_dimension_candidates_take_the_same_step(case):
    x = bench.sphere_state(case.n, case.d, case.dtype)
    it = case.interaction()
    v = reference.velocity(x.astype(np.float64), it)
    y = x + bench.STEP_DT * (v - (v * x).sum(1, keepdims=True) * x)
    want = y / np.linalg.norm(y, axis=1, keepdims=True)
    candidates, _ = bench.headdim_candidates(case, x)
    assert {"auto", "sdpa"} <= set(candidates) and ("headdim" in candidates) == (case.d > 4)
    tol = 1e-10 if case.dtype == "float64" else 1e-5
    for name, step in candidates.items():
        got = step()
        got = got.numpy() if isinstance(got, torch.Tensor) else got
        assert np.abs(got - want).max() < tol, name


def test_state_as_simulated_is_the_fields_own_prepare(monkeypatch):
    """The bench times the state as simulate holds it: what the velocity field's prepare makes of it
    (the 1-D HK ordering lives there, and nowhere else)."""
    from particles.kernels import VelocityField

    case = bench.Case("hk", "hk", 200, 1, "float64", dict(radius=0.1), kind="hk1d")
    x = bench.initial(case)
    np.testing.assert_array_equal(bench.state_as_simulated(case, x), np.sort(x, axis=0))
    dense = bench.Case("sa", "sa", 20, 3, "float64")
    y = bench.initial(dense)
    assert bench.state_as_simulated(dense, y) is y
    monkeypatch.setattr(VelocityField, "order", lambda self, x: np.arange(len(x))[::-1])
    np.testing.assert_array_equal(bench.state_as_simulated(case, x), x[::-1])


def test_crossover_is_the_smallest_n_from_which_headdim_wins():
    def rec(n, fastest, d=16):
        return dict(score="softmax", qkv="identity", dtype="float32", d=d, n=n, fastest=fastest,
                    headdim_s=1.0)

    records = [rec(256, "numba-dense"), rec(1024, "headdim"), rec(4096, "headdim"), rec(16384, "headdim"),
               rec(256, "headdim", 64), rec(4096, "sdpa", 64), rec(256, "headdim", 128)]
    assert bench.headdim_crossover(records) == {("softmax", "identity", "float32", 16): 1024,
                                                ("softmax", "identity", "float32", 64): None,
                                                ("softmax", "identity", "float32", 128): 256}
    assert "| softmax | identity | float32 | 64 | never" in bench.crossover_markdown(records)


def test_headdim_target_grid_is_the_issue_sizes():
    full, targets = bench.headdim_cases(), bench.headdim_cases(targets=True)
    identity = {(c.score, c.dtype, c.n, c.d) for c in targets if c.qkv == "identity"}
    assert identity == {(s, t, n, d) for s in ("softmax", "rbf") for t in ("float32", "float64")
                        for n in (4096, 16384) for d in (3, 4, 16, 32, 64, 128)}
    assert [c for c in targets if c.qkv == "general"] == [c for c in full if c.qkv == "general"]


def test_ksync_bench_headdim_writes_json_and_markdown(tmp_path, monkeypatch):
    import numba

    from analysis.cli import main

    cases = [bench.StepCase("softmax", "float32", 200, 8), bench.StepCase("rbf", "float64", 200, 3)]
    monkeypatch.setattr(bench, "headdim_cases", lambda quick=False, targets=False: cases)
    out, md = tmp_path / "h.json", tmp_path / "h.md"
    threads = torch.get_num_threads(), numba.get_num_threads()
    try:
        assert main(["bench", "--headdim", "--quick", "--repeats", "1", "--threads", "1", "--cpu-time",
                     "--json", str(out), "--markdown", str(md)]) == 0
    finally:
        torch.set_num_threads(threads[0])
        numba.set_num_threads(threads[1])
    data = json.loads(out.read_text())
    assert data["complete"] and data["clock"].startswith("CPU time") and len(data["cases"]) == 2
    first = data["cases"][0]
    assert {"auto_s", "headdim_s", "numba-dense_s", "sdpa_s", "x_sdpa", "fastest", "rounds"} <= set(first)
    assert first["x_sdpa"] == pytest.approx(first["sdpa_s"] / first["ours_s"])
    assert data["machine"]["isa"] and data["machine"]["torch_threads"] == 1
    text = md.read_text()
    assert "## Crossover" in text and "| softmax | float32 | identity | 200 | 8 |" in text
    args = ["bench", "--headdim", "--quick", "--repeats", "1", "--threads", "1", "--cpu-time"]
    try:  # its own outputs are replaced; a file it did not write never is
        assert main(args + ["--json", str(out), "--markdown", str(md)]) == 0
        for flag, name in (("--json", "notes.json"), ("--markdown", "notes.md"), ("--figure", "mine.png")):
            mine = tmp_path / name
            mine.write_text('{"notes": 1}' if name == "notes.json" else "mine")
            before = mine.read_bytes()
            command = ["bench", "--quick"] if flag == "--figure" else args  # refused before measuring
            assert main(command + [flag, str(mine)]) == 2
            assert mine.read_bytes() == before
    finally:
        torch.set_num_threads(threads[0])
        numba.set_num_threads(threads[1])


def test_device_section_smoke_on_cpu(tmp_path):
    """``ksync bench --device`` (run on a GPU by benchmarks/gpu.sh) works end to end on the CPU."""
    import numba

    from analysis.cli import main

    out = tmp_path / "d.json"
    threads = torch.get_num_threads(), numba.get_num_threads()
    try:
        assert main(["bench", "--device", "cpu", "--quick", "--repeats", "1", "--json", str(out),
                     "--markdown", str(tmp_path / "d.md")]) == 0
    finally:
        torch.set_num_threads(threads[0])
        numba.set_num_threads(threads[1])
    cases = json.loads(out.read_text())["cases"]
    assert [c["path"] for c in cases] == ["sdpa", "sdpa", "rows"]
    assert "x_sdpa" in cases[0] and "x_sdpa" not in cases[2]
    assert "| krause |" in (tmp_path / "d.md").read_text()


def test_measured_dispatch_from_records():
    def rec(n, fastest, d=16, qkv="identity", score="softmax", dtype="float32", sdpa=2.0, headdim=1.0):
        return dict(score=score, qkv=qkv, dtype=dtype, d=d, n=n, fastest=fastest, headdim_s=headdim,
                    sdpa_s=sdpa)

    records = [rec(256, "auto"), rec(1024, "headdim"), rec(256, "headdim", 64), rec(1024, "headdim", 64),
               rec(4096, "sdpa", 16, "general", sdpa=0.9), rec(4096, "sdpa", 64, "general", sdpa=0.9),
               rec(4096, "headdim", 16, "general", "rbf")]
    assert bench.measured_dispatch(records) == dict(min_n=1024, general_via_sdpa={("softmax", "float32")})


def test_headdim_dispatch_constants_come_from_the_recorded_measurements():
    """particles.kernels.headdim's MIN_N and GENERAL_VIA_SDPA are what benchmarks/headdim*.json
    measured (the 2-thread wall-time run when there is one, else the 1-thread CPU-time run)."""
    from pathlib import Path

    from particles.kernels import headdim

    root = Path(__file__).resolve().parents[1] / "benchmarks"
    files = [p for p in (root / "headdim.json", root / "headdim_1thread.json") if p.exists()]
    if not files:
        pytest.skip("no head-dimension measurements recorded")
    data = json.loads(files[0].read_text())
    if not data.get("complete"):
        pytest.skip(f"{files[0].name} is a partial run")
    measured = bench.measured_dispatch(data["cases"])
    assert headdim.MIN_N == measured["min_n"], files[0].name
    assert headdim.GENERAL_VIA_SDPA == measured["general_via_sdpa"], files[0].name


def test_ksync_bench_ensembles_writes_json_and_markdown(tmp_path, monkeypatch):
    """``ksync bench --ensembles``: simulate against the batched baselines, every case in the JSON."""
    import numba

    from analysis.cli import main

    tiny = [dict(name="SA ensemble 8x6x2", model="sa", n=6, d=2, samples=8, steps=5, dt=0.1, beta=4.0,
                 dtype="float64", baselines=("torch", "numpy")),
            dict(name="HK 1-D", model="hk", n=200, d=1, samples=None, steps=3, dt=1.0, radius=0.05,
                 dtype="float64", baselines=("numpy",))]
    monkeypatch.setattr(bench, "ensemble_cases", lambda quick=False: tiny)
    out, md = tmp_path / "e.json", tmp_path / "e.md"
    threads = torch.get_num_threads(), numba.get_num_threads()
    try:
        assert main(["bench", "--ensembles", "--quick", "--repeats", "1", "--json", str(out),
                     "--markdown", str(md)]) == 0
    finally:
        torch.set_num_threads(threads[0])
        numba.set_num_threads(threads[1])
    data = json.loads(out.read_text())
    assert [c["case"] for c in data["cases"]] == ["SA ensemble 8x6x2", "HK 1-D"] and data["machine"]["isa"]
    assert data["machine"]["numpy_simd"] == bench.numpy_simd()
    assert data["machine"]["torch_cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    first = data["cases"][0]
    assert first["x_torch"] == pytest.approx(first["torch_s"] / first["ours_s"])
    text = md.read_text()
    assert "| SA ensemble 8x6x2 |" in text and "written by `ksync bench --ensembles" in text
    assert f"numpy {bench.numpy_simd()}, torch {torch.backends.cpu.get_cpu_capability()}." in text


def test_numpy_simd_names_the_dispatch_target_numpy_runs():
    """numpy_simd: the widest dispatch target enabled in this process; with every target disabled
    through NPY_DISABLE_CPU_FEATURES (read when numpy is imported) numpy runs its baseline code."""
    from numpy._core._multiarray_umath import __cpu_dispatch__, __cpu_features__

    enabled = [t for t in __cpu_dispatch__ if __cpu_features__.get(t)]
    assert bench.numpy_simd() == (enabled[-1] if enabled else "baseline")
    code = "from analysis.bench import numpy_simd; print(numpy_simd())"
    env = dict(os.environ, NPY_DISABLE_CPU_FEATURES=" ".join(__cpu_dispatch__))
    got = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert got.stdout.strip() == "baseline"


def test_interleaved_best_times_alternate_and_keep_the_minimum():
    """interleaved_best_times: each function once per round (a fast one until `fast` seconds), at
    least `rounds` rounds, the best time of each; the order of calls alternates between them."""
    calls = []
    ticks = iter(range(10**6))

    def clock():  # a fake clock: every reading is one tick later
        return float(next(ticks))

    fns = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    best = bench.interleaved_best_times(fns, rounds=3, budget=0.0, fast=0.5, settle=0.0, clock=clock)
    assert best == {"a": 1.0, "b": 1.0}
    assert calls == ["a", "b"] + ["a", "b"] * 3  # the warm-up, then three alternating rounds
