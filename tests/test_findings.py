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
