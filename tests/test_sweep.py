"""Parameter sweeps (issue 9): equality with direct simulate calls, the resumable zarr store,
kill-and-resume, a worker killed mid-sweep, refused spec changes.

A real ``distributed.LocalCluster`` of 2 worker processes (1 thread each) on 127.0.0.1 is shared
by the module; simulations are small.
"""

import importlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

import analysis
from analysis.cli import main
from analysis.sweep import LOOPBACK_HTTP, SweepError, load_spec, make_plan, open_sweep, plot_sweep, sweep
from analysis.sweeps import execution
from analysis.sweeps import store as _store
from particles import simulate

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("sweep_*.toml"))

# 2 axes (order matters) × a non-range seed list; curves, weights-based and option-carrying metrics
SPEC = dict(model="krause", axes={"sigma": [0.3, 1.0], "top_k": [2, 8]}, seeds=[3, 7],
            metrics={"final_clusters": {"eps": 0.05}, "time_to_one_cluster": {"eps": 0.05},
                     "effective_rank_curve": {}, "final_first_token_mass": {}, "mean_cosine_curve": {}},
            steps=30, dt=0.2, n=8, d=3, save_every=10)

# a slower sweep (≈0.1 s per point) for the kill tests: 16 points
SLOW = dict(model="sa", axes={"beta": [0.5, 1.0, 2.0, 4.0]}, seeds=4,
            metrics=["final_clusters", "time_to_one_cluster", "effective_rank_curve"],
            steps=1000, dt=0.05, n=64, d=3, save_every=100)
SLOW_TOML = """\
model = "sa"
steps = 1000
dt = 0.05
seeds = 4
metrics = ["final_clusters", "time_to_one_cluster", "effective_rank_curve"]
[fixed]
n = 64
d = 3
save_every = 100
[axes]
beta = [0.5, 1.0, 2.0, 4.0]
"""




def _warm():
    simulate("sa", n=4, d=3, steps=2, dt=0.1, return_weights=True)
    return os.getpid()


@pytest.fixture(scope="module")
def cluster():
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=None, env={"NUMBA_NUM_THREADS": "1"},
                      scheduler_kwargs=LOOPBACK_HTTP) as lc, Client(lc) as client:
        client.run(_warm)  # imports and numba caches loaded once per worker
        yield client


@pytest.fixture(scope="module")
def reference():
    return sweep(**SPEC, scheduler="sync", progress=False)


@pytest.fixture(scope="module")
def slow_reference():
    return sweep(**SLOW, scheduler="sync", progress=False)


def _points(store) -> set:
    return _store.SweepStore(store).done()


# -- results -------------------------------------------------------------------------------------
def test_sync_equals_direct_simulate_and_metric_calls(reference):
    ds = reference
    assert ds["final_clusters"].dims == ("sigma", "top_k", "seed")
    assert ds["effective_rank_curve"].dims == ("sigma", "top_k", "seed", "time")
    assert ds.sizes == {"sigma": 2, "top_k": 2, "seed": 2, "time": 4}
    np.testing.assert_allclose(ds["time"], [0, 2, 4, 6])
    assert list(ds["seed"].values) == [3, 7] and list(ds["top_k"].values) == [2, 8]
    for sigma in (0.3, 1.0):
        for top_k in (2, 8):
            for seed in (3, 7):
                run = simulate("krause", n=8, d=3, steps=30, dt=0.2, save_every=10, seed=seed, sigma=sigma,
                               top_k=top_k, return_weights=True)
                at = ds.sel(sigma=sigma, top_k=top_k, seed=seed)
                last = run["x"].isel(time=-1).values
                assert at["final_clusters"].item() == analysis.count_clusters(last, eps=0.05)
                np.testing.assert_equal(at["time_to_one_cluster"].item(),
                                        analysis.time_to_clusters(run["x"], 1, eps=0.05))
                np.testing.assert_array_equal(at["effective_rank_curve"], analysis.effective_rank(run["x"]))
                np.testing.assert_array_equal(at["mean_cosine_curve"], analysis.mean_cosine(run["x"]))
                assert at["final_first_token_mass"].item() == analysis.first_token_mass(
                    run["attention"].isel(time=-1).values)
    # the sweep is not trivially constant: parameters and seeds matter
    assert ds["final_first_token_mass"].std() > 0
    assert ds["final_clusters"].attrs["eps"] == 0.05


@pytest.mark.parametrize("start", ["drawn", "fixed x0"])
def test_the_seeds_of_a_point_are_one_compiled_call(start, monkeypatch):
    """All seeds of a parameter point run as one simulate(seed=[...]) ensemble (with a fixed x0 the
    seeds draw the noise); the values are those of one run per seed. An ensemble x0 is refused."""
    from conftest import sphere_points

    import particles

    x0 = sphere_points(7, 3, seed=5) if start == "fixed x0" else None
    kw = dict(steps=12, dt=0.1, noise=0.3, save_every=4) | ({"n": 7, "d": 3} if x0 is None else {"x0": x0})
    calls, real = [], particles.simulate
    monkeypatch.setattr(particles, "simulate",
                        lambda *a, **k: (k["steps"] and calls.append(k["seed"])) or real(*a, **k))
    metrics = {"final_clusters": {"eps": 0.05}, "mean_cosine_curve": {}}
    ds = sweep("sa", {"beta": [1.0, 4.0]}, seeds=[2, 9, 4], metrics=metrics, scheduler="sync", progress=False,
               **kw)
    assert calls == [[2, 9, 4]] * 2  # (the steps=0 trial runs of the spec check are not counted)
    monkeypatch.undo()
    for beta in (1.0, 4.0):
        for seed in (2, 9, 4):
            run = simulate("sa", seed=seed, beta=beta, **kw)
            at = ds.sel(beta=beta, seed=seed)
            np.testing.assert_allclose(at["mean_cosine_curve"], analysis.mean_cosine(run["x"]),
                                       rtol=0, atol=1e-12)
            assert at["final_clusters"] == analysis.count_clusters(run["x"].isel(time=-1).values, eps=0.05)
    assert ds["mean_cosine_curve"].sel(beta=4.0).std("seed").max() > 1e-3  # the seeds' noise differs
    with pytest.raises(ValueError, match="x0: a sweep point starts one system"):
        sweep("sa", {"beta": [1.0]}, seeds=2, metrics=metrics, scheduler="sync", progress=False, steps=2,
              dt=0.1, x0=np.stack([sphere_points(7, 3, seed=s) for s in (5, 6)]))


def _metrics_of(run):
    """The sweep's metrics of one simulate run (the options the sweeps below use)."""
    last = run["x"].isel(time=-1).values
    return dict(final_clusters=analysis.count_clusters(last, eps=0.05),
                effective_rank_curve=analysis.effective_rank(run["x"]),
                final_first_token_mass=analysis.first_token_mass(run["attention"].isel(time=-1).values))


CUSTOM_METRICS = {"final_clusters": {"eps": 0.05}, "effective_rank_curve": {}, "final_first_token_mass": {}}


def test_custom_velocity_field_sweeps_like_simulate(tmp_path):
    """A sweep takes any model simulate takes: here particles.fields.ALiBiCausal (a velocity field
    v(x)); every point equals the direct simulate call, the spec records the field by its repr, and
    the store resumes it and refuses another field."""
    from particles.fields import ALiBiCausal

    alibi = ALiBiCausal(beta=2.0, slope=0.5)
    kw = dict(seeds=[0, 4], metrics=CUSTOM_METRICS, steps=20, dt=0.1, n=8, d=3, save_every=10,
              geometry="sphere", scheduler="sync", progress=False)
    store = tmp_path / "r.zarr"
    ds = sweep(alibi, {"noise": [0.0, 0.3]}, store=store, **kw)
    for noise in (0.0, 0.3):
        for seed in (0, 4):
            run = simulate(alibi, n=8, d=3, steps=20, dt=0.1, save_every=10, seed=seed, noise=noise,
                           geometry="sphere", return_weights=True)
            at = ds.sel(noise=noise, seed=seed)
            for name, want in _metrics_of(run).items():
                np.testing.assert_array_equal(at[name].values, want, err_msg=f"{name} {noise=} {seed=}")
    assert ds["final_first_token_mass"].std() > 0
    assert ds.attrs["model"] == "ALiBiCausal(beta=2.0, slope=0.5)"
    xr.testing.assert_identical(sweep(ALiBiCausal(beta=2.0, slope=0.5), {"noise": [0.0, 0.3]}, store=store,
                                      **kw), ds)  # an equal field resumes the store: nothing left to run
    xr.testing.assert_identical(open_sweep(store), ds)
    with pytest.raises(ValueError, match=r"model: stored 'ALiBiCausal\(beta=2.0, slope=0.5\)', "
                                         r"requested 'ALiBiCausal\(beta=2.0, slope=1.0\)'"):
        sweep(ALiBiCausal(beta=2.0, slope=1.0), {"noise": [0.0, 0.3]}, store=store, **kw)
    with pytest.raises(TypeError, match="model must be a preset name"):
        make_plan(3, steps=5, dt=0.1)


def test_interactions_as_a_model_axis(tmp_path):
    """Interaction objects on a "model" axis: the coordinate and the spec hold their descriptions
    (matrices included, so two interactions that differ only in Q are two values)."""
    from particles import make_interaction
    from particles.simulate import describe_model

    Q = np.eye(3) + 0.3 * np.random.default_rng(0).standard_normal((3, 3))
    models = [make_interaction("sa", beta=2.0), make_interaction("sa", beta=2.0, Q=Q), "krause"]
    store = tmp_path / "r.zarr"
    ds = sweep(None, {"model": models}, seeds=[1], metrics=CUSTOM_METRICS, steps=20, dt=0.1, n=8, d=3,
               save_every=10, scheduler="sync", progress=False, store=store)
    labels = [describe_model(m) for m in models]
    assert list(ds["model"].values) == labels and "Q=[[" in labels[1] and labels[2] == "krause"
    for model, label in zip(models, labels):
        run = simulate(model, n=8, d=3, steps=20, dt=0.1, save_every=10, seed=1, return_weights=True)
        for name, want in _metrics_of(run).items():
            np.testing.assert_array_equal(ds.sel(model=label, seed=1)[name].values, want, err_msg=name)
    xr.testing.assert_identical(open_sweep(store), ds)


def assert_same_across_processes(ds, ref):
    """Identical structure, coordinates and attributes; values equal to the last bits. Kernels that
    numba compiled in a process and kernels loaded from its on-disk cache can differ in the last
    bit (parallel numba code), so results computed in other processes are equal to 1e-12, not
    bit for bit."""
    xr.testing.assert_identical(ds.copy(data={k: np.zeros_like(v) for k, v in ds.data_vars.items()}),
                                ref.copy(data={k: np.zeros_like(v) for k, v in ref.data_vars.items()}))
    xr.testing.assert_allclose(ds, ref, rtol=0, atol=1e-12)


def test_localcluster_equals_sync_and_store_round_trips(cluster, reference, tmp_path):
    store = tmp_path / "r.zarr"
    ds = sweep(**SPEC, scheduler=cluster, store=store, progress=False)
    assert_same_across_processes(ds, reference)
    xr.testing.assert_identical(open_sweep(store), ds)
    written = xr.open_zarr(store, group="result", consolidated=False).load()
    xr.testing.assert_equal(written, ds)
    assert len(_points(store)) == 8 and not any((store / ".tmp").iterdir())
    # a rerun computes nothing and returns the same Dataset
    ds2 = sweep(**SPEC, scheduler=cluster.scheduler.address, store=store, progress=False)
    xr.testing.assert_identical(ds2, ds)


def test_scheduler_none_starts_and_closes_a_local_cluster(capsys):
    import psutil

    def children():  # worker/nanny processes (multiprocessing's resource tracker lives on by design)
        return {p.pid for p in psutil.Process().children(recursive=True)
                if p.is_running() and "resource_tracker" not in " ".join(p.cmdline())}

    before = children()
    kw = dict(model="hk", axes={"radius": [0.1, 0.3]}, metrics=["final_clusters"], steps=5, dt=1.0,
              n=20, d=1)
    ds = sweep(**kw, scheduler=None, workers=1, progress=True)
    assert_same_across_processes(ds, sweep(**kw, scheduler="sync", progress=False))
    assert children() <= before
    # the dashboard link is printed, and serves the dask dashboard while the cluster runs
    assert re.search(r"dask dashboard: http://127\.0\.0\.1:\d+/status", capsys.readouterr().err)
    said = []
    client, close = execution._connect(None, 1, 1, announce=said.append)
    try:
        link = re.search(r"http://\S+", said[0]).group()
        assert urllib.request.urlopen(link, timeout=30).status == 200
    finally:
        close()


def test_sweep_module_is_callable_and_not_shadowed():
    import analysis.sweeps

    module = importlib.import_module("analysis.sweep")
    assert analysis.sweep is module and callable(module)
    assert module.sweep is analysis.sweeps.sweep and module.open_sweep is analysis.open_sweep
    ds = analysis.sweep("hk", {"radius": [0.1, 0.3]}, metrics=["final_clusters"], steps=3, dt=1.0, n=8, d=1,
                        scheduler="sync", progress=False)
    xr.testing.assert_identical(ds, sweep("hk", {"radius": [0.1, 0.3]}, metrics=["final_clusters"], steps=3,
                                          dt=1.0, n=8, d=1, scheduler="sync", progress=False))


def test_progress_bar_counts_points(capsys):
    sweep("hk", {"radius": [0.1, 0.3]}, seeds=2, metrics=["final_clusters"], steps=5, dt=1.0, n=20, d=1,
          scheduler="sync", progress=True)
    assert "4/4" in capsys.readouterr().err


# -- store: resume, kill, spec changes --------------------------------------------------------------
def test_resume_skips_finished_points_and_discards_unfinished_writes(tmp_path, reference, monkeypatch):
    store = tmp_path / "r.zarr"
    calls = []
    real = execution.run_point

    def fail_after_two_calls(params, seeds, metrics):
        if len(calls) == 2:
            raise KeyboardInterrupt  # stands in for the process dying mid-sweep
        calls.append(list(seeds))
        return real(params, seeds, metrics)

    monkeypatch.setattr(execution, "run_point", fail_after_two_calls)
    with pytest.raises(KeyboardInterrupt):
        sweep(**SPEC, scheduler="sync", store=store, progress=False)
    done = sum(len(seeds) for seeds in calls)  # one call runs all seeds of a parameter point
    assert len(_points(store)) == done and all(seeds == [3, 7] for seeds in calls)
    # a write killed halfway leaves only a staging directory, which is not a finished point
    (store / ".tmp" / "0_0_0-dead").mkdir()
    (store / ".tmp" / "0_0_0-dead" / "zarr.json").write_text("{")
    monkeypatch.setattr(execution, "run_point", real)
    counted = []
    monkeypatch.setattr(execution, "run_point",
                        lambda p, seeds, m: counted.extend(seeds) or real(p, seeds, m))
    ds = sweep(**SPEC, scheduler="sync", store=store, progress=False)
    assert len(counted) == 8 - done
    xr.testing.assert_identical(ds, reference)
    assert not any((store / ".tmp").iterdir())


# the tiny sweep of tests/test_reliability.py (HK_SPEC) with a curve: 4 points, milliseconds each
TINY = dict(model="hk", axes={"radius": [0.1, 0.2]}, seeds=2,
            metrics=["final_clusters", "cluster_count_curve"], steps=3, dt=1.0, n=10, d=1)


def _open_plain(store) -> xr.Dataset:
    """``xr.open_zarr(store)`` with its defaults, and no warning (e.g. none about consolidated metadata)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return xr.open_zarr(store).load()


def test_plain_open_zarr_of_a_store_shows_the_result(tmp_path, monkeypatch):
    """The assembled result sits at the root of the store as well as in its group "result":
    ``xr.open_zarr(path)`` is the sweep's Dataset (plus the store's own attrs); resuming and
    :func:`open_sweep` are unchanged."""
    from particles.conventions import decode
    from particles.store import MARKER

    store = tmp_path / "s.zarr"
    ds = sweep(**TINY, scheduler="sync", store=store, progress=False)
    plain = _open_plain(store)
    assert set(plain.data_vars) == {"final_clusters", "cluster_count_curve"} and plain.sizes["radius"] == 2
    assert plain.attrs[MARKER] == "sweep"
    assert plain.attrs[_store.ATTR]["spec"] == _store.SweepStore(store).spec
    root = plain.copy()
    root.attrs = {k: v for k, v in plain.attrs.items() if k not in (MARKER, _store.ATTR)}
    group = xr.open_zarr(store, group="result", consolidated=False).load()
    xr.testing.assert_identical(root, group)
    xr.testing.assert_equal(decode(root), ds)
    assert {k: v for k, v in decode(root).attrs.items() if k in ds.attrs} == ds.attrs
    xr.testing.assert_identical(open_sweep(store), ds)
    assert not any((store / ".tmp").iterdir())
    # a rerun computes nothing and writes the same result again; a stale root array is removed
    (store / "stale").mkdir()
    (store / "stale" / "zarr.json").write_text('{"node_type": "array"}')
    monkeypatch.setattr(execution, "run_point", lambda *a: pytest.fail("a finished point was recomputed"))
    xr.testing.assert_identical(sweep(**TINY, scheduler="sync", store=store, progress=False), ds)
    monkeypatch.undo()
    xr.testing.assert_identical(_open_plain(store).drop_attrs(), plain.drop_attrs())
    assert not (store / "stale").exists()
    assert _points(store) == {p.key for p in make_plan(**TINY).points()}

    # resumed after a stop: no result at the root before, the whole one after
    resumed = tmp_path / "r.zarr"
    real = execution.run_point
    calls = []

    def stop_after_one_call(*args):  # one call: both seeds of the first radius
        if calls:
            raise KeyboardInterrupt  # stands in for the process dying mid-sweep
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(execution, "run_point", stop_after_one_call)
    with pytest.raises(KeyboardInterrupt):
        sweep(**TINY, scheduler="sync", store=resumed, progress=False)
    assert not (resumed / "result").exists() and not _open_plain(resumed).data_vars
    assert open_sweep(resumed).attrs["points_done"] == 2
    monkeypatch.setattr(execution, "run_point", real)
    xr.testing.assert_identical(sweep(**TINY, scheduler="sync", store=resumed, progress=False), ds)
    xr.testing.assert_identical(_open_plain(resumed).drop_attrs(), plain.drop_attrs())


def test_root_result_is_all_or_nothing(tmp_path, monkeypatch):
    """A run killed while it moves the result's arrays to the root leaves a root that shows no
    result (never a part of one) to ``xr.open_zarr``; the next run writes the whole of it."""
    real = _store._replace_dir
    complete = tmp_path / "complete.zarr"
    ds = sweep(**TINY, scheduler="sync", store=complete, progress=False)
    for path in (tmp_path / "fresh.zarr", complete):  # the first write of the result, a rewrite
        moved = []

        def die_after_one_root_array(src, dst, path=path, moved=moved):
            if dst.parent == path and len(moved) == 2:
                raise KeyboardInterrupt  # stands in for the process dying mid-move
            moved.append(dst.name)
            return real(src, dst)

        monkeypatch.setattr(_store, "_replace_dir", die_after_one_root_array)
        with pytest.raises(KeyboardInterrupt):
            sweep(**TINY, scheduler="sync", store=path, progress=False)
        assert moved[0] == "result" and len(moved) == 2  # the group, then one array at the root
        assert (path / moved[1]).is_dir()
        assert not _open_plain(path).data_vars  # and no warning: the root metadata lists no arrays
        monkeypatch.setattr(_store, "_replace_dir", real)
        xr.testing.assert_identical(sweep(**TINY, scheduler="sync", store=path, progress=False), ds)
        assert set(_open_plain(path).data_vars) == {"final_clusters", "cluster_count_curve"}


def test_changed_spec_is_refused(tmp_path):
    store = tmp_path / "r.zarr"
    small = dict(SPEC, axes={"sigma": [0.3], "top_k": [2]}, seeds=1)
    sweep(**small, scheduler="sync", store=store, progress=False)
    with pytest.raises(ValueError, match=r"different specification.*axes\.sigma: stored \[0\.3\], "
                                         r"requested \[0\.3, 1\.0\]"):
        sweep(**dict(small, axes={"sigma": [0.3, 1.0], "top_k": [2]}), scheduler="sync", store=store)
    with pytest.raises(ValueError, match=r"metrics\.final_clusters"):
        sweep(**dict(small, metrics={"final_clusters": {"eps": 0.1}}), scheduler="sync", store=store)
    with pytest.raises(ValueError, match=r"fixed\.n: stored 8, requested 9"):
        sweep(**dict(small, n=9), scheduler="sync", store=store)
    # the same spec written with other number types (1 vs 1.0, tuple vs list) is the same spec
    sweep(**dict(small, axes={"sigma": (0.3,), "top_k": [2.0]}), scheduler="sync", store=store,
          progress=False)
    other = tmp_path / "other"
    other.mkdir()
    (other / "file.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not a krause-sync output.*nothing was changed"):
        sweep(**small, scheduler="sync", store=other)
    assert [f.name for f in other.iterdir()] == ["file.txt"]


def test_bad_spec_fails_before_any_work(tmp_path):
    store = tmp_path / "r.zarr"
    with pytest.raises(ValueError, match="sigma must be > 0.*sigma=-1"):
        sweep("krause", {"sigma": [1.0, -1.0]}, steps=5, dt=0.1, n=4, d=3, scheduler="sync", store=store)
    assert not store.exists()
    for kwargs, message in [
        (dict(axes={"seed": [1, 2]}), "use seeds"),
        (dict(axes={"bogus": [1]}), "unknown simulate parameter 'bogus'"),
        (dict(axes={"beta": []}), "empty"),
        (dict(axes={"beta": [1, 1]}), "repeats"),
        (dict(axes={"beta": [1.0]}, beta=2.0), "both swept"),
        (dict(metrics=["nope"]), "unknown metric 'nope'"),
        (dict(metrics={"final_clusters": {"epsilon": 1}}), "unknown option"),
        (dict(seeds=0), "seeds"),
        (dict(seeds={"start": 2}), "seeds: a range"),
        (dict(seeds={"start": 2, "stop": 2}), "non-empty"),
        (dict(axes={"steps": [5, 10]}, steps=None, metrics=["effective_rank_curve"]), "same saved times"),
    ]:
        kw = dict(dict(model="sa", steps=5, dt=0.1, n=4, d=3), **kwargs)
        with pytest.raises(ValueError, match=message):
            make_plan(**kw)


def test_failing_point_raises_sweep_error_and_keeps_finished_points(tmp_path):
    store = tmp_path / "r.zarr"
    with pytest.raises(SweepError, match=r"beta=1000000\.0, seed=0 failed: OverflowError"):
        sweep("usa", {"beta": [1.0, 1e6]}, metrics=["final_clusters"], steps=3, dt=0.1, n=4, d=3,
              scheduler="sync", store=store, progress=False)
    assert _points(store) == {"0_0"}
    partial = open_sweep(store)
    assert partial.attrs["points_done"] == 1 and np.isnan(partial["final_clusters"].values[1, 0])


def test_kill_and_resume_cli(cluster, slow_reference, tmp_path, capsys):
    spec = tmp_path / "spec.toml"
    spec.write_text(SLOW_TOML)
    store = tmp_path / "r.zarr"
    cmd = [sys.executable, "-c", "import sys; from analysis.cli import main; sys.exit(main())",
           "sweep", str(spec), "-o", str(store), "--scheduler", cluster.scheduler.address, "--no-progress"]
    env = dict(os.environ, NUMBA_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not (store / "points").exists() or not _points(store):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no point finished within 60 s"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    finished = _points(store)
    assert 0 < len(finished) < 16, f"{len(finished)} points at kill: the kill did not land mid-sweep"
    inodes = {key: (store / "points" / key).stat().st_ino for key in finished}
    assert not (store / "result").exists()

    capsys.readouterr()
    assert main(cmd[3:]) == 0  # the same command again, in this process
    assert f"{len(finished)} of 16 points already done" in capsys.readouterr().out
    assert _points(store) == {p.key for p in make_plan(**SLOW).points()}
    # the points finished before the kill were kept, not recomputed or rewritten
    assert {key: (store / "points" / key).stat().st_ino for key in finished} == inodes
    assert_same_across_processes(open_sweep(store), slow_reference)
    xr.testing.assert_equal(xr.open_zarr(store, group="result", consolidated=False).load(),
                            open_sweep(store))


def test_worker_killed_mid_sweep_loses_and_duplicates_nothing(cluster, slow_reference, tmp_path, monkeypatch):
    store = tmp_path / "r.zarr"
    writes = []
    real_write = _store.SweepStore.write_point

    def counting_write(self, key, values, attrs):
        writes.append(key)
        return real_write(self, key, values, attrs)

    monkeypatch.setattr(_store.SweepStore, "write_point", counting_write)
    pids = cluster.run(os.getpid)
    killed = {}

    def kill_a_busy_worker():
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not killed:
            if writes:  # the sweep is running: kill a worker while it executes a task
                busy = {w: ts for w, ts in cluster.processing().items() if ts}
                if busy:
                    worker = sorted(busy)[0]
                    os.kill(pids[worker], signal.SIGKILL)
                    killed.update(worker=worker, tasks=len(busy[worker]), done=len(set(writes)))
            time.sleep(0.005)

    killer = threading.Thread(target=kill_a_busy_worker)
    killer.start()
    ds = sweep(**SLOW, scheduler=cluster, store=store, progress=False)
    killer.join()
    assert killed, "no worker was killed"
    assert killed["tasks"] >= 1 and killed["done"] < 16
    assert_same_across_processes(ds, slow_reference)
    assert sorted(writes) == sorted(p.key for p in make_plan(**SLOW).points())  # each point once
    assert len(_points(store)) == 16


# -- SPEC.toml, examples and the plot --------------------------------------------------------------
def test_spec_toml_ranges(tmp_path):
    path = tmp_path / "s.toml"
    path.write_text('model = "krause"\nsteps = 5\ndt = 0.1\nseeds = {start = 10, stop = 13}\n'
                    'metrics = ["final_clusters"]\n[fixed]\nn = 4\nd = 3\n'
                    '[axes]\nsigma = {start = 0.2, stop = 1.0, num = 5}\n'
                    'beta = {start = 0.1, stop = 10, num = 3, log = true}\n'
                    'window = {start = 2, stop = 9, step = 2}\n')
    spec = load_spec(path)
    np.testing.assert_allclose(spec["axes"]["sigma"], [0.2, 0.4, 0.6, 0.8, 1.0])
    np.testing.assert_allclose(spec["axes"]["beta"], [0.1, 1.0, 10.0])
    assert spec["axes"]["window"] == [2, 4, 6, 8]
    assert spec["n"] == 4 and spec["steps"] == 5
    plan = make_plan(**spec)
    assert plan.seeds == [10, 11, 12] and list(plan.axes) == ["sigma", "beta", "window"]
    path.write_text('model = "sa"\nsteps = 5\ndt = 0.1\nbeta = 2\n')
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['beta'\]"):
        load_spec(path)


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_specs_are_valid(path):
    plan = make_plan(**load_spec(path))
    assert len(list(plan.points())) >= 2


def test_examples_exist():
    assert len(EXAMPLES) >= 2


def test_plot_sweep_mean_and_sd(reference):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    plot_sweep(reference, "final_first_token_mass", "sigma", ax=ax)
    lines = ax.get_lines()
    assert len(lines) == 2  # one per top_k
    mean = reference["final_first_token_mass"].mean("seed")
    np.testing.assert_allclose(lines[0].get_ydata(), mean.isel(top_k=0).values)
    np.testing.assert_allclose(lines[1].get_xdata(), [0.3, 1.0])
    band = ax.collections[0].get_paths()[0].vertices[:, 1]
    sd = reference["final_first_token_mass"].std("seed", ddof=1).isel(top_k=0).values
    assert np.isclose(band.max(), (mean.isel(top_k=0).values + sd).max())
    with pytest.raises(ValueError, match="curve"):
        plot_sweep(reference, "effective_rank_curve", "sigma", ax=ax)
    plt.close(fig)
