"""Reliability pass (issue 14): no data loss, one writer per store, one-line CLI failures.

Each data-loss case of the issue is reproduced first (a folder or file we did not write given as
an output), then the rules of ``particles.store`` are checked one by one: foreign paths refused
and left byte-identical, ours replaced only with overwrite/--force and only by the same kind,
one writer per store (a lock naming its holder; a stale lock after SIGKILL taken over), output
written under a temporary name and moved into place (a writer SIGKILLed mid-write leaves the old
output). Lock tests use real subprocesses.
"""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from analysis.cli import main
from analysis.sweep import open_sweep, sweep
from analysis.sweeps.store import SweepStore
from particles import simulate
from particles.nn.checkpoint import shipped_dir
from particles.store import (
    MARKER,
    StoreLock,
    StoreLocked,
    TrajectoryStore,
    lock_path,
    prepare_output,
    store_kind,
    write_dataset,
)

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINT = shipped_dir() / "recall-krause"
SIM = ["simulate", "--model", "sa", "--n", "6", "--d", "3", "--steps", "2", "--dt", "0.1", "--no-progress"]
HK_SPEC = 'model = "hk"\nsteps = 3\ndt = 1.0\nseeds = 2\nmetrics = ["final_clusters"]\n' \
          '[fixed]\nn = 10\nd = 1\n[axes]\nradius = [0.1, 0.2]\n'


def run_cli(argv, capsys):
    capsys.readouterr()
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as exc:
        rc = exc.code
    out = capsys.readouterr()
    return rc, out.err


def assert_one_line(rc, err, command):
    assert rc == 2, f"exit status {rc}, stderr {err!r}"
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"ksync {command}: error:"), err


def tree(root: Path) -> dict:
    """{relative path: bytes (files) or None (folders)} of everything under root."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None)
            for p in sorted(root.rglob("*"))}


def foreign(tmp_path, name):
    """A folder (or, for .nc, a file) the user made, with content the library must not touch."""
    path = tmp_path / name
    if name.endswith(".nc"):
        path.write_text("my notes, not a netCDF file\n")
    else:
        path.mkdir()
        (path / "notes.txt").write_text("x\n")
    return path


def python(code, *args):
    """A child Python process running ``code`` (stdout piped), started from the repository root."""
    return subprocess.Popen([sys.executable, "-c", code, *map(str, args)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=dict(os.environ, NUMBA_NUM_THREADS="1"))


def wait_for_line(proc, text, timeout=60):
    """Block until the child prints a line containing text (its stdout is line-buffered)."""
    result = {}

    def read():
        for line in proc.stdout:
            if text in line:
                result["line"] = line
                return

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout)
    if "line" not in result:
        status = proc.poll()
        raise AssertionError(f"child did not print {text!r} (exit {status}): "
                             f"{proc.stderr.read() if status is not None else ''}")
    return result["line"]


# -- 1. data loss: the cases first ---------------------------------------------------------
@pytest.mark.parametrize("name", ["d.zarr", "d.nc"])
def test_simulate_cli_refuses_a_path_it_did_not_write(name, tmp_path, capsys):
    path = foreign(tmp_path, name)
    before = tree(tmp_path)
    for extra in ([], ["--force"]):
        rc, err = run_cli([*SIM, "-o", path, *extra], capsys)
        assert_one_line(rc, err, "simulate")
        assert "not a krause-sync output" in err and str(path) in err
        assert tree(tmp_path) == before


def test_simulate_store_refuses_foreign_and_sweep_stores(tmp_path):
    path = foreign(tmp_path, "d.zarr")
    before = tree(tmp_path)
    with pytest.raises(FileExistsError, match="not a krause-sync output"):
        simulate("sa", n=6, d=3, steps=2, dt=0.1, store=path)
    for overwrite in (False, True):
        with pytest.raises(FileExistsError, match="not a krause-sync output"):
            TrajectoryStore(path, (1, 2, 6, 3), "float64", False, overwrite=overwrite)
    assert tree(tmp_path) == before
    # a sweep store is never replaced by a trajectory, and a trajectory store never swept into
    swept = tmp_path / "s.zarr"
    sweep("hk", {"radius": [0.1]}, metrics=["final_clusters"], steps=2, dt=1.0, n=5, d=1,
          scheduler="sync", store=swept, progress=False)
    before = tree(tmp_path)
    for overwrite in (False, True):
        with pytest.raises(FileExistsError, match="sweep store, not a trajectory"):
            TrajectoryStore(swept, (1, 2, 6, 3), "float64", False, overwrite=overwrite)
    traj = tmp_path / "t.zarr"
    simulate("sa", n=6, d=3, steps=2, dt=0.1, store=traj)
    assert store_kind(traj) == "trajectory"
    before = tree(tmp_path)
    with pytest.raises(FileExistsError, match="trajectory store, not a sweep"):
        sweep("hk", {"radius": [0.1]}, metrics=["final_clusters"], steps=2, dt=1.0, n=5, d=1,
              scheduler="sync", store=traj, progress=False)
    assert tree(tmp_path) == before


def test_extract_and_compare_refuse_paths_they_did_not_write(tmp_path, capsys):
    for command in ("extract", "compare"):
        for name in ("out.zarr", "out.nc"):
            (tmp_path / command).mkdir(exist_ok=True)
            path = foreign(tmp_path / command, name)
            before = tree(tmp_path)
            argv = ["extract", "--checkpoint", CHECKPOINT, "--samples", "2"] if command == "extract" \
                else ["compare", tmp_path / "missing.nc"]
            for extra in ([], ["--force"]):
                rc, err = run_cli([*argv, "-o", path, *extra], capsys)
                assert_one_line(rc, err, command)
                assert "not a krause-sync output" in err
                assert tree(tmp_path) == before


def test_outputs_are_replaced_only_with_force_and_by_the_same_kind(tmp_path, capsys):
    ex, cmp = tmp_path / "ex.nc", tmp_path / "cmp.zarr"
    assert run_cli(["extract", "--checkpoint", CHECKPOINT, "--samples", "2", "-o", ex], capsys)[0] == 0
    assert store_kind(ex) == "extraction"
    rc, err = run_cli(["extract", "--checkpoint", CHECKPOINT, "--samples", "2", "-o", ex], capsys)
    assert_one_line(rc, err, "extract")
    assert "--force" in err
    first = ex.read_bytes()
    argv = ["extract", "--checkpoint", CHECKPOINT, "--samples", "3", "-o", ex, "--force"]
    assert run_cli(argv, capsys)[0] == 0
    assert ex.read_bytes() != first and xr.open_dataset(ex).sizes["sample"] == 3
    assert run_cli(["compare", ex, "-o", cmp], capsys)[0] == 0
    assert store_kind(cmp) == "comparison"
    rc, err = run_cli(["compare", ex, "-o", cmp], capsys)
    assert_one_line(rc, err, "compare")
    assert run_cli(["compare", ex, "-o", cmp, "--force", "--sink-eps", "0.5"], capsys)[0] == 0
    assert xr.open_zarr(cmp).attrs[MARKER] == "comparison"
    # a comparison never replaces an extraction, even with --force
    rc, err = run_cli(["compare", ex, "-o", ex, "--force"], capsys)
    assert_one_line(rc, err, "compare")
    assert "extraction store, not a comparison" in err
    # simulate: the same rules for netCDF and zarr; leftovers: none
    for name in ("t.nc", "t.zarr"):
        out = tmp_path / name
        assert run_cli([*SIM, "-o", out], capsys)[0] == 0
        rc, err = run_cli([*SIM, "-o", out], capsys)
        assert_one_line(rc, err, "simulate")
        assert run_cli([*SIM, "--seed", "3", "-o", out, "--force"], capsys)[0] == 0
        assert xr.open_dataset(out, engine="zarr" if name.endswith("zarr") else None).attrs["seed"] == 3
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_trajectory_store_overwrite(tmp_path):
    path = tmp_path / "run.zarr"
    first = simulate("sa", n=6, d=3, steps=2, dt=0.1, store=path)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        TrajectoryStore(path, (1, 3, 6, 3), "float64", False)
    ref = simulate("sa", n=6, d=3, steps=2, dt=0.1, seed=1)
    with TrajectoryStore(path, (1, 3, 6, 3), "float64", False, overwrite=True) as sink:
        assert json.loads(lock_path(path).read_text())["pid"] == os.getpid()
        for slot in range(3):
            sink[0, slot] = ref.x.values[slot]
        assert xr.open_zarr(path, consolidated=False).x.values.tolist() == first.x.values.tolist()  # old one
        ds = sink.finish(ref)
    np.testing.assert_array_equal(ds.x.values, ref.x.values)
    assert not lock_path(path).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.zarr"]


def test_failed_write_leaves_the_old_output_and_no_leftovers(tmp_path):
    ds = simulate("sa", n=6, d=3, steps=2, dt=0.1)
    for name in ("a.nc", "a.zarr"):
        out = tmp_path / name
        write_dataset(ds, out, kind="trajectory")
        before = tree(tmp_path)
        with pytest.raises(RuntimeError, match="disk full"):
            with prepare_output(out, overwrite=True, kind="trajectory") as tmp:
                ds.to_netcdf(tmp) if name.endswith(".nc") else ds.to_zarr(tmp, consolidated=False)
                raise RuntimeError("disk full")
        assert tree(tmp_path) == before
        # a block that forgets the marker does not replace anything
        with pytest.raises(RuntimeError, match="marker"):
            with prepare_output(out, overwrite=True, kind="trajectory") as tmp:
                ds.to_netcdf(tmp) if name.endswith(".nc") else ds.to_zarr(tmp, consolidated=False)
        assert tree(tmp_path) == before


KILLED_WRITER = """
import sys, time
from particles import simulate
from particles.store import prepare_output, mark
ds = simulate("sa", n=6, d=3, steps=2, dt=0.1, seed=5)
with prepare_output(sys.argv[1], overwrite=True, kind="trajectory") as tmp:
    mark(ds, "trajectory").to_netcdf(tmp)
    print("written", tmp, flush=True)
    time.sleep(120)
"""


def test_writer_sigkilled_mid_write_keeps_the_old_output(tmp_path):
    out = tmp_path / "a.nc"
    old = simulate("sa", n=6, d=3, steps=2, dt=0.1, seed=1)
    write_dataset(old, out, kind="trajectory")
    content = out.read_bytes()
    proc = python(KILLED_WRITER, out)
    try:
        wait_for_line(proc, "written")
        # while it runs: its lock names it, a second writer is refused with its pid
        with pytest.raises(StoreLocked, match=f"pid {proc.pid}"):
            write_dataset(old, out, kind="trajectory", overwrite=True)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
    assert out.read_bytes() == content  # the killed writer never moved its output into place
    leftovers = sorted(p.name for p in tmp_path.iterdir() if p.name != "a.nc")
    assert leftovers and all(n.startswith(".a.nc.") for n in leftovers)
    new = simulate("sa", n=6, d=3, steps=2, dt=0.1, seed=2)
    write_dataset(new, out, kind="trajectory", overwrite=True)  # stale lock taken over, partial removed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.nc"]
    np.testing.assert_array_equal(xr.open_dataset(out).x.values, new.x.values)


LOCK_HOLDER = """
import sys, time
from particles.store import StoreLock
lock = StoreLock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(120)
"""


def test_lock_names_its_holder_and_a_sigkilled_holder_is_taken_over(tmp_path):
    store = tmp_path / "s.zarr"
    proc = python(LOCK_HOLDER, store)
    try:
        wait_for_line(proc, "locked")
        record = json.loads(lock_path(store).read_text())
        assert record["pid"] == proc.pid and record["host"] == socket.gethostname()
        with pytest.raises(StoreLocked, match=rf"pid {proc.pid} on {socket.gethostname()}.*one writer"):
            StoreLock(store).acquire()
        with pytest.raises(StoreLocked, match=f"pid {proc.pid}"):
            sweep("hk", {"radius": [0.1]}, metrics=["final_clusters"], steps=2, dt=1.0, n=5, d=1,
                  scheduler="sync", store=store, progress=False)
        assert not store.exists()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
    assert json.loads(lock_path(store).read_text())["pid"] == proc.pid  # left behind: stale
    with StoreLock(store) as lock:
        assert lock.stale["pid"] == proc.pid
        assert json.loads(lock_path(store).read_text())["pid"] == os.getpid()
        with pytest.raises(StoreLocked, match="this process"):
            StoreLock(store).acquire()
    assert not lock_path(store).exists()


# -- 2. two sweeps on one store --------------------------------------------------------------------
SWEEP_TOML = """\
model = "sa"
steps = 400
dt = 0.05
seeds = 4
metrics = ["final_clusters", "effective_rank_curve"]
[fixed]
n = 32
d = 3
save_every = 100
[axes]
beta = [0.5, 1.0, 2.0, 4.0]
"""


def test_second_sweep_on_a_store_is_refused_and_the_store_stays_whole(tmp_path, capsys):
    spec, store = tmp_path / "spec.toml", tmp_path / "s.zarr"
    spec.write_text(SWEEP_TOML)
    argv = ["sweep", spec, "-o", store, "--scheduler", "sync", "--no-progress"]
    first = python("import sys; from analysis.cli import main; sys.exit(main())", *argv)
    try:
        deadline = time.monotonic() + 60
        while not (store / "points").is_dir() or not SweepStore(store).done():
            assert first.poll() is None, first.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.01)
        first.send_signal(signal.SIGSTOP)  # frozen mid-sweep, holding the lock
        rc, err = run_cli(argv, capsys)
        assert_one_line(rc, err, "sweep")
        assert f"pid {first.pid}" in err and "one writer" in err
    finally:
        first.send_signal(signal.SIGCONT)
    out, err = first.communicate(timeout=120)
    assert first.returncode == 0, err
    points = sorted(p for p in (store / "points").iterdir() if p.is_dir())
    assert len(points) == 16
    for p in points:  # every point whole: arrays and attributes, not just zarr.json
        assert {"final_clusters", "effective_rank_curve", "zarr.json"} <= {c.name for c in p.iterdir()}
    ds = open_sweep(store)
    assert ds.attrs["points_done"] == 16 and not np.isnan(ds["effective_rank_curve"]).any()
    assert run_cli(argv, capsys)[0] == 0  # resumable: nothing left to do


def test_damaged_points_are_recomputed(tmp_path):
    """A store damaged by an unlocked older version (points holding only zarr.json) is repaired."""
    store = tmp_path / "s.zarr"
    kw = dict(model="hk", axes={"radius": [0.1, 0.2]}, seeds=2, metrics=["final_clusters"], steps=3, dt=1.0,
              n=10, d=1, scheduler="sync", progress=False)
    ref = sweep(**kw, store=store)
    for key in ("0_1", "1_0"):
        point = store / "points" / key
        for child in point.iterdir():
            if child.name != "zarr.json":
                shutil.rmtree(child)
        (point / "zarr.json").write_text(json.dumps({"zarr_format": 3, "node_type": "group",
                                                     "attributes": {}}))
    assert SweepStore(store).done() == {"0_0", "1_1"}
    assert open_sweep(store).attrs["points_done"] == 2  # still opens
    xr.testing.assert_identical(sweep(**kw, store=store), ref)
    assert SweepStore(store).done() == {"0_0", "0_1", "1_0", "1_1"}


# -- 3. every CLI failure: exit 2, one line -------------------------------------------------------
def _spec(tmp_path, text):
    path = tmp_path / "spec.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("case", ["usa-overflow", "floating-point", "tiny-sigma",
    "steps-negative",
                                  "steps-inf", "steps-text", "dt-text", "axis-value"])
def test_cli_failures_are_one_line(case, tmp_path, capsys):
    out = tmp_path / "a.nc"
    argv = {
        "usa-overflow": ["simulate", "--model", "usa", "--n", "50", "--d", "3", "--steps", "5", "--dt", "0.1",
                         "--beta", "1e3", "-o", out],
        "floating-point": ["simulate", "--model", "sa", "--geometry", "euclidean", "--n", "5", "--d", "2",
                           "--steps", "5", "--dt", "1e300", "-o", out],
        "tiny-sigma": ["simulate", "--model", "krause", "--n", "5", "--d", "3", "--steps", "5", "--dt", "0.1",
                       "--sigma", "1e-300", "-o", out],
    }.get(case)
    command = "simulate"
    if argv is None:
        command, store = "sweep", tmp_path / "r.zarr"
        text = {"steps-negative": HK_SPEC.replace("steps = 3", "steps = -5"),
                "steps-inf": HK_SPEC.replace("steps = 3", "steps = inf"),
                "steps-text": HK_SPEC.replace("steps = 3", 'steps = "ten"'),
                "dt-text": HK_SPEC.replace("dt = 1.0", 'dt = "one"'),
                "axis-value": HK_SPEC.replace("radius = [0.1, 0.2]", "radius = [0.1, nan]")}[case]
        argv = ["sweep", _spec(tmp_path, text), "-o", store, "--scheduler", "sync", "--no-progress"]
    rc, err = run_cli([*argv, "--no-progress"] if command == "simulate" else argv, capsys)
    assert_one_line(rc, err, command)
    assert not out.exists() and not (tmp_path / "r.zarr").exists()
    key = {"usa-overflow": "beta", "floating-point": "dt", "tiny-sigma": "sigma", "steps-negative": "steps",
           "steps-inf": "steps", "steps-text": "steps", "dt-text": "dt", "axis-value": "radius"}[case]
    assert key in err


def test_debug_shows_the_traceback(tmp_path, capsys):
    rc, err = run_cli(["--debug", "simulate", "--model", "usa", "--n", "50", "--d", "3", "--steps", "5",
                       "--dt", "0.1", "--beta", "1e3", "-o", tmp_path / "a.nc", "--no-progress"], capsys)
    assert rc == 2 and "Traceback" in err
    assert err.strip().splitlines()[-1].startswith("ksync simulate: error:")


def test_bad_spec_leaves_nothing_and_the_corrected_spec_runs(tmp_path, capsys):
    store = tmp_path / "r.zarr"
    for bad in ('steps = "ten"', "steps = -5", "steps = inf"):
        argv = ["sweep", _spec(tmp_path, HK_SPEC.replace("steps = 3", bad)), "-o", store,
                "--scheduler", "sync", "--no-progress"]
        assert_one_line(*run_cli(argv, capsys), "sweep")
        assert sorted(p.name for p in tmp_path.iterdir()) == ["spec.toml"]
    argv = ["sweep", _spec(tmp_path, HK_SPEC), "-o", store, "--scheduler", "sync", "--no-progress"]
    assert run_cli(argv, capsys)[0] == 0
    assert open_sweep(store).attrs["points_done"] == 4
    # the API too: steps as an axis value
    with pytest.raises(ValueError, match="steps must be >= 0.*steps=-1"):
        sweep("hk", {"steps": [2, -1]}, radius=0.1, dt=1.0, n=5, d=1, scheduler="sync",
              store=tmp_path / "api.zarr", metrics=["final_clusters"])
    assert not (tmp_path / "api.zarr").exists()


def _inputs(tmp_path, name, arr):
    path = tmp_path / f"{name}.npy"
    np.save(path, arr)
    return path


@pytest.mark.parametrize("arr, message", [
    (np.zeros((2, 5, 5)), "shape"),               # images for a token model
    (np.zeros((2, 65), dtype=np.int64), "T <= 64"),
    (np.full((1, 4), 10**6), "0..31"),
    (np.full((1, 4), 0.5), "integers"),
    (np.zeros(5, dtype=np.int64), "shape"),
])
def test_extract_refuses_wrong_inputs(arr, message, tmp_path, capsys):
    rc, err = run_cli(["extract", "--checkpoint", CHECKPOINT, "--input", _inputs(tmp_path, "x", arr),
                       "-o", tmp_path / "o.nc"], capsys)
    assert_one_line(rc, err, "extract")
    assert "--input" in err and message in err
    assert not (tmp_path / "o.nc").exists()


def _hostile(tmp_path, name, card):
    shutil.copy(CHECKPOINT.with_suffix(".pt"), tmp_path / f"{name}.pt")
    (tmp_path / f"{name}.json").write_text(json.dumps(card))
    return tmp_path / name


def test_hostile_checkpoint_cards_are_refused_before_allocation(tmp_path, capsys, monkeypatch):
    import importlib

    import torch

    from particles.nn import CheckpointError, load_checkpoint

    train_module = importlib.import_module("particles.nn.train")  # (particles.nn.train is the function)

    built = []  # devices on which a model was built
    real_build = train_module.build_model

    def recording_build(config):
        built.append(str(torch.get_default_device()))
        return real_build(config)

    monkeypatch.setattr(train_module, "build_model", recording_build)
    card = json.loads(CHECKPOINT.with_suffix(".json").read_text())
    cases = {
        "a-list": ([card], "JSON object"),
        "huge-width": (dict(card, config=dict(card["config"], d_model=10**12)), "d_model"),
        "many-layers": (dict(card, config=dict(card["config"], n_layers=50_000)), "n_layers"),
        "wider": (dict(card, config=dict(card["config"], d_model=128, n_heads=4)), "shape"),
        "text-width": (dict(card, config=dict(card["config"], d_model="64")), "config"),
        "no-config": (dict(card, config=[1, 2]), "config"),
        "inf": (dict(card, config=dict(card["config"], mlp_ratio=float("inf"))), "finite"),
    }
    for name, (bad, message) in cases.items():
        path = _hostile(tmp_path, name, bad)
        built.clear()
        with pytest.raises(CheckpointError, match=message):
            load_checkpoint(path)
        assert all(device == "meta" for device in built), f"{name}: a model was built on {built}"
        rc, err = run_cli(["extract", "--checkpoint", path, "-o", tmp_path / f"{name}.nc"], capsys)
        assert_one_line(rc, err, "extract")
    built.clear()
    assert load_checkpoint(_hostile(tmp_path, "fine", card)).config == card["config"]
    assert built == ["meta", "cpu"]  # checked on the meta device first, then built for real


# -- 5. a scheduler address that is not dask -------------------------------------------------------
def test_scheduler_that_says_nothing_times_out(tmp_path, capsys):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    port = server.getsockname()[1]
    conns = []

    def accept():
        try:
            while True:
                conns.append(server.accept()[0])
        except OSError:
            pass

    threading.Thread(target=accept, daemon=True).start()
    try:
        start = time.monotonic()
        rc, err = run_cli(["sweep", _spec(tmp_path, HK_SPEC), "-o", tmp_path / "r.zarr", "--scheduler",
                           f"tcp://127.0.0.1:{port}", "--connect-timeout", "1.5", "--no-progress"], capsys)
        elapsed = time.monotonic() - start
    finally:
        server.close()
        for c in conns:
            c.close()
    assert_one_line(rc, err, "sweep")
    assert f"127.0.0.1:{port}" in err and "1.5 s" in err
    assert not (tmp_path / "r.zarr").exists(), "a failed scheduler left an empty store behind"
    assert elapsed < 10
    assert conns, "the sweep never connected to the server"
    with pytest.raises(ValueError, match="connect_timeout"):
        sweep("hk", {"radius": [0.1]}, steps=2, dt=1.0, n=5, d=1, connect_timeout=0)


# -- 6. messages -----------------------------------------------------------------------------------
def test_messages(tmp_path, capsys):
    # a missing output folder is created, never reported as "Permission denied"
    out = tmp_path / "new" / "sub" / "a.nc"
    assert run_cli([*SIM, "-o", out], capsys)[0] == 0 and out.exists()
    # a random file given as .npy: not "pickled data"
    junk = tmp_path / "junk.npy"
    junk.write_bytes(os.urandom(300))
    rc, err = run_cli([*SIM, "--x0", junk, "-o", tmp_path / "b.nc"], capsys)
    assert_one_line(rc, err, "simulate")
    assert "not a .npy array file" in err and "pickle" not in err
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    rc, err = run_cli([*SIM, "--x0", tmp_path / "obj.npy", "-o", tmp_path / "b.nc"], capsys)
    assert_one_line(rc, err, "simulate")
    assert "Python objects" in err
    # a metric entry without a name
    text = HK_SPEC.replace('metrics = ["final_clusters"]\n', "") + "[[metrics]]\neps = 0.1\n"
    rc, err = run_cli(["sweep", _spec(tmp_path, text), "-o", tmp_path / "r.zarr", "--scheduler", "sync"],
                      capsys)
    assert_one_line(rc, err, "sweep")
    assert "'name' key" in err


@pytest.mark.parametrize("argv, message", [
    (["train", "digits-vit", "--name", "../../x"], "--name"),
    (["train", "digits-vit", "--name", "sub/x"], "--name"),
    (["train", "digits-vit", "--subset", "0"], "--subset"),
    (["train", "digits-vit", "--subset", "-5"], "--subset"),
    (["bench", "--repeats", "0"], "--repeats"),
    (["compare", "x.nc", "--sink-eps", "-1"], "--sink-eps"),
    (["compare", "x.nc", "--eps", "nan"], "--eps"),
])
def test_bad_option_values(argv, message, capsys):
    rc, err = run_cli(argv, capsys)
    assert_one_line(rc, err, argv[0])
    assert message in err


def test_train_refuses_to_overwrite_a_checkpoint(tmp_path, capsys):
    shutil.copy(CHECKPOINT.with_suffix(".json"), tmp_path / "recall-krause.json")
    before = tree(tmp_path)
    rc, err = run_cli(["train", "recall", "--attention", "krause", "--out", tmp_path], capsys)
    assert_one_line(rc, err, "train")
    assert "--force" in err and "recall-krause" in err
    (tmp_path / "ablations.json").write_text("{}")
    rc, err = run_cli(["train", "ablations", "--out", tmp_path], capsys)
    assert_one_line(rc, err, "train")
    assert tree(tmp_path) == {**before, "ablations.json": b"{}"}


# -- the one checkpoint-card scanner ---------------------------------------------------------------
def test_list_cards_skips_what_is_not_a_card(tmp_path):
    from particles.nn.checkpoint import list_cards

    card = json.loads(CHECKPOINT.with_suffix(".json").read_text())
    shutil.copy(CHECKPOINT.with_suffix(".pt"), tmp_path / "a.pt")
    (tmp_path / "a.json").write_text(json.dumps(card))
    (tmp_path / "b.json").write_text(json.dumps(dict(card, task="digits-vit")))  # no weights
    (tmp_path / "ablations.json").write_text(json.dumps({"task": "digits-vit", "results": {}}))
    (tmp_path / "list.json").write_text(json.dumps([card]))
    (tmp_path / "junk.json").write_bytes(os.urandom(40))
    assert [p.name for p, _ in list_cards(tmp_path)] == ["a.json", "b.json"]
    assert [p.name for p, _ in list_cards(tmp_path, with_weights=True)] == ["a.json"]
    assert [p.name for p, _ in list_cards(tmp_path, task="digits-vit")] == ["b.json"]
    assert list_cards(tmp_path / "missing") == []


def test_checkpoint_folders_are_scanned_in_one_place():
    """Every listing of checkpoint cards goes through particles.nn.checkpoint.list_cards."""
    scanners = [str(p.relative_to(ROOT)) for folder in ("analysis", "particles")
                for p in (ROOT / folder).rglob("*.py")
                if re.search(r'glob\("[^"]*\.json"\)', p.read_text())]
    assert scanners == ["particles/nn/checkpoint.py"]


def test_failed_streaming_simulate_leaves_nothing(tmp_path):
    """A run that fails half-way releases the lock and removes its partial store: a retry is not
    refused as 'being written by this process'."""
    path = tmp_path / "ov.zarr"
    for _ in range(2):
        with pytest.raises(OverflowError, match="beta"):
            simulate("usa", n=50, d=3, steps=5, dt=0.1, beta=1e3, store=path)
        assert list(tmp_path.iterdir()) == []
    ds = simulate("usa", n=5, d=3, steps=2, dt=0.1, store=path)
    assert store_kind(path) == "trajectory" and ds.sizes["time"] == 3


def test_failing_run_with_its_progress_bar_leaves_one_line(tmp_path, capsys):
    """With the bar on, a run that fails inside it clears the bar: the terminal shows the error alone."""
    rc, err = run_cli(["simulate", "--model", "usa", "--n", "50", "--d", "3", "--steps", "5", "--dt", "0.1",
                       "--beta", "1e3", "-o", tmp_path / "a.nc"], capsys)
    assert err.count("\n") == 1, err  # the bar never ends its line
    assert_one_line(rc, err.split("\r")[-1], "simulate")
    assert not (tmp_path / "a.nc").exists()


def test_compare_names_what_it_cannot_read(tmp_path, capsys):
    """A text file and a sweep store given to ``ksync compare``: one line saying what the file is not."""
    text = tmp_path / "notes.txt"
    text.write_text("hello\n")
    rc, err = run_cli(["compare", text], capsys)
    assert_one_line(rc, err, "compare")
    assert "not a netCDF file or zarr store" in err and "notes.txt" in err
    assert main(["sweep", str(_spec(tmp_path, HK_SPEC)), "-o", str(tmp_path / "s.zarr"),
                 "--scheduler", "sync", "--no-progress"]) == 0
    rc, err = run_cli(["compare", tmp_path / "s.zarr"], capsys)
    assert_one_line(rc, err, "compare")
    assert "sweep store" in err and "open_sweep" in err
    assert text.read_text() == "hello\n"
