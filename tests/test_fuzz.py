"""Property-based fuzzing (hypothesis) of the command line and the public API (issue 14).

CLI: argv is generated from the parsers' own actions (every option of every subcommand, values
drawn from pools of good, edge and hostile values: NaN, inf, negative counts, junk and pickled
.npy files, hostile checkpoint cards, foreign output folders, …) and ``analysis.cli.main`` runs
in-process in a sandbox folder. Properties: exit status 0 or 2, no traceback, a failure is one
line; nothing in the sandbox changes except the output path (a foreign output path never
changes); a written trajectory holds only finite numbers. Commands that would start long work
(training, benchmarks, figures) have that work replaced by a stub that raises, so their argument
handling is fuzzed and the run stays short.

API: ``simulate`` and the metrics with generated arguments either raise ValueError / TypeError /
ArithmeticError or return finite results.

Derandomised (the same examples on every run), bounded: well under a minute in all.
"""

import argparse
import importlib
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from test_cli import time_limit  # tests/ is on sys.path (as for conftest)

import analysis
from analysis.cli import build_parser, main
from particles import simulate
from particles.nn.checkpoint import shipped_dir
from particles.store import store_kind, write_dataset

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINT = shipped_dir() / "recall-krause"
SETTINGS = dict(derandomize=True, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
PARSER = build_parser()
SUBPARSERS = next(a for a in PARSER._actions if isinstance(a, argparse._SubParsersAction)).choices
LIMIT_S = 600  # a hang guard only: a cold numba cache compiles a trajectory driver in ~1 min under load


class Stubbed(RuntimeError):
    """Raised in place of long work (training, benchmarks, figures)."""


def _stub(*args, **kwargs):
    raise Stubbed("long work replaced by the fuzz test")


# -- the sandbox: inputs of every kind, foreign and own outputs ------------------------------------
SPEC = 'model = "hk"\nsteps = 3\ndt = 1.0\nseeds = 2\nmetrics = ["final_clusters"]\n' \
       '[fixed]\nn = 8\nd = 1\n[axes]\nradius = [0.1, 0.3]\n'


def _make_sandbox(root: Path) -> None:
    (root / "in").mkdir()
    (root / "out").mkdir()
    i = root / "in"
    np.save(i / "x0.npy", np.random.default_rng(0).standard_normal((5, 3)))
    np.save(i / "ens.npy", np.random.default_rng(1).standard_normal((2, 4, 3)))
    np.save(i / "nan.npy", np.array([[np.nan, 1.0, 0.0], [0.0, 1.0, 0.0]]))
    np.save(i / "flat.npy", np.arange(6.0))
    np.save(i / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    np.save(i / "ids.npy", np.random.default_rng(2).integers(0, 32, (2, 8)))
    np.save(i / "eye.npy", np.eye(3))
    (i / "junk.npy").write_bytes(os.urandom(256))
    (i / "spec.toml").write_text(SPEC)
    (i / "bad_steps.toml").write_text(SPEC.replace("steps = 3", 'steps = "ten"'))
    (i / "neg_steps.toml").write_text(SPEC.replace("steps = 3", "steps = -5"))
    no_name = SPEC.replace('metrics = ["final_clusters"]\n', "") + "[[metrics]]\neps = 1\n"
    (i / "no_name.toml").write_text(no_name)
    (i / "junk.toml").write_bytes(os.urandom(64))
    for name in ("recall-krause.pt", "recall-krause.json"):
        shutil.copy(CHECKPOINT.parent / name, i / name)
    card = json.loads(CHECKPOINT.with_suffix(".json").read_text())
    for name, bad in (("list", [card]), ("huge", dict(card, config=dict(card["config"], d_model=10**12)))):
        shutil.copy(CHECKPOINT.with_suffix(".pt"), i / f"{name}.pt")
        (i / f"{name}.json").write_text(json.dumps(bad))
    traj = simulate("sa", n=5, d=3, steps=2, dt=0.1)
    write_dataset(traj, i / "traj.nc", kind="trajectory")
    assert main(["extract", "--checkpoint", str(i / "recall-krause"), "--samples", "2",
                 "-o", str(i / "ex.nc")]) == 0
    o = root / "out"
    (o / "foreign.zarr").mkdir()
    (o / "foreign.zarr" / "notes.txt").write_text("mine\n")
    (o / "foreign.nc").write_text("my notes\n")
    write_dataset(traj, o / "ours.nc", kind="trajectory")
    write_dataset(traj, o / "ours.zarr", kind="trajectory")


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    _make_sandbox(root)
    return root


def snapshot(root: Path) -> dict:
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = p.read_bytes() if p.is_file() else None
    return out


# -- values for every action: (good values, hostile values) ------------------------------------------
INTS = (["1", "2", "3"], ["-5", "-1", "0", "8", "2.5", "ten", ""])
FLOATS = (["0.05", "0.5", "1"], ["-1", "0", "1e-300", "4", "1e3", "1e300", "nan", "inf", "-inf", "x"])
BAD_INPUTS = ["in/nan.npy", "in/flat.npy", "in/obj.npy", "in/junk.npy", "in/missing.npy", "in", "in/traj.nc"]
POOLS = {
    "output": (["out/new.nc", "out/new.zarr", "out/deep/er/new.nc"],
               ["out/new.txt", "out/foreign.zarr", "out/foreign.nc", "out/ours.nc", "out/ours.zarr", "out"]),
    "json": (["out/b.json"], ["out/foreign.nc"]), "figure": (["out/s.png"], ["out/foreign.zarr"]),
    "markdown": (["out/b.md"], ["out/foreign.nc"]),
    "out": (["out/ck"], ["out/foreign.zarr"]),
    "x0": (["in/x0.npy", "in/ens.npy"], BAD_INPUTS), "input": (["in/ids.npy"], BAD_INPUTS + ["in/x0.npy"]),
    "Q": (['[[1,0,0],[0,1,0],[0,0,1]]', "in/eye.npy"], ["[[1]]", "[1, 2]", '[[NaN]]', "junk", "in/junk.npy"]),
    "spec": (["in/spec.toml"], ["in/bad_steps.toml", "in/neg_steps.toml", "in/no_name.toml", "in/junk.toml",
                               "in/missing.toml"]),
    "checkpoint": (["in/recall-krause", "in/recall-krause.pt"], ["in/list", "in/huge", "in/missing", "in"]),
    "hf": ([], ["in", "in/missing"]),
    "trajectories": (["in/ex.nc", "in/traj.nc"], ["in/junk.npy", "in/missing.nc", "in/x0.npy"]),
    "names": (["a", "b"], [""]), "text": (["hello"], [""]), "ids": (["1,2,3"], ["a,b", ""]),
    "task": (["recall", "ablations"], ["bogus"]), "attention": (["krause", "softmax"], ["bogus"]),
    "seeds": (["0", "1"], ["-1", "x"]), "only": (["sa_clusters"], ["bogus"]),
    "scheduler": (["sync"], ["tcp://127.0.0.1:9", "bogus://x", ""]),
    "connect_timeout": (["0.3"], ["0", "-1", "nan", "x"]),
    "workers": (["1"], ["0", "x"]),
    "d": (["3"], INTS[1]),  # simulate: the matrices of the Q/K/V pool are 3 × 3
    "dtype": (["float64"], ["bogus"]),  # float32: another compile of every kernel (see SIM_OPTIONS)
}
POOLS["K"] = POOLS["V"] = POOLS["Q"]
#: always given (an absent --scheduler starts a LocalCluster; an absent --connect-timeout waits 10 s)
FORCED = {"sweep": ("scheduler", "connect_timeout")}
#: modes "clean" and "one-bad": options given / left out together, one variant per example
VARIANTS = {"simulate": [dict(force=("n", "d"), skip=("x0",)),
                         dict(force=("x0",), skip=("n", "d", "samples"))]}
#: long work replaced by a stub that raises: training, every function of analysis.bench, the figures
STUBS = ("particles.nn.train", "analysis.figures.make_all")


def _kind(action):
    if action.type is None:
        return None
    ok = []
    for text in ("1", "0.5"):
        try:
            action.type(text)
            ok.append(text)
        except (argparse.ArgumentTypeError, TypeError, ValueError, OSError):
            pass
    return {("1", "0.5"): "float", ("1",): "int"}.get(tuple(ok))


def _pools(action):
    if action.dest in POOLS:
        return POOLS[action.dest]
    if action.choices:
        return [str(c) for c in action.choices], ["bogus"]
    return {"float": FLOATS, "int": INTS}.get(_kind(action), (["x"], ["", "in/x0.npy"]))


@st.composite
def argvs(draw):
    """argv of one subcommand. mode "clean": good values only; "one-bad": one hostile value; "wild":
    any value, any option."""
    command = draw(st.sampled_from(sorted(SUBPARSERS)))
    mode = draw(st.sampled_from(["clean", "one-bad", "wild"]))
    parser = SUBPARSERS[command]
    groups = [g for g in parser._mutually_exclusive_groups]
    required_groups = {g._group_actions[0] for g in groups if g.required}
    variant = draw(st.sampled_from(VARIANTS.get(command, [{}]))) if mode != "wild" else {}
    chosen = []
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction) or action.dest in ("debug", *variant.get("skip", ())):
            continue
        must = action.required or action in required_groups or action.dest in FORCED.get(command, ()) \
            or action.dest in variant.get("force", ())
        if not must:
            if draw(st.integers(0, 3)) != 0:  # optional options: given one time in four
                continue
            exclusive = [g for g in groups if action in g._group_actions]
            if mode != "wild" and any(a in chosen for g in exclusive for a in g._group_actions):
                continue
        chosen.append(action)
    bad = draw(st.sampled_from(chosen)) if mode == "one-bad" and chosen else None
    argv = [command]
    for action in chosen:
        if action.nargs == 0:
            argv.append(action.option_strings[0])
            continue
        good, hostile = _pools(action)
        pool = {"clean": good, "one-bad": hostile if action is bad else good, "wild": good + hostile}[mode]
        if action.dest in OUTPUT_DESTS:  # the data-safety property: foreign and own outputs in every mode
            pool = good + hostile
        pool = pool or hostile
        count = draw(st.integers(1, 2)) if action.nargs in ("+", "*") else 1
        values = [draw(st.sampled_from(pool)) for _ in range(count)]
        argv += ([action.option_strings[0]] if action.option_strings else []) + values
    if mode == "wild" and draw(st.integers(0, 4)) == 0:
        argv.append(draw(st.sampled_from(["--no-such-option", "--debug", "extra"])))
    if ("--no-progress" not in argv and "--no-progress" in parser._option_string_actions
            and draw(st.booleans())):
        argv.append("--no-progress")
    return argv


OUTPUT_DESTS = ("output", "out", "json", "figure", "markdown")


def _outputs(argv) -> list[str]:
    """The output paths of argv: the values of its output options, or those options' defaults."""
    parser = SUBPARSERS[argv[0]]
    found = []
    for action in parser._actions:
        if action.dest not in OUTPUT_DESTS:
            continue
        given = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a in action.option_strings]
        found += given or ([action.default] if isinstance(action.default, str) else [])
    return found


def _stub_bench(monkeypatch):
    import inspect

    bench = importlib.import_module("analysis.bench")
    for name, fn in inspect.getmembers(bench, inspect.isfunction):
        if fn.__module__ == bench.__name__:
            monkeypatch.setattr(bench, name, _stub)


@settings(max_examples=160, **SETTINGS)
@given(argv=argvs())
def test_cli_fuzz(argv, sandbox, capsys, monkeypatch):
    for target in STUBS:
        monkeypatch.setattr(target, _stub)
    _stub_bench(monkeypatch)
    monkeypatch.chdir(sandbox)
    before = snapshot(sandbox)
    # outputs that may change: absent ones, or ours (a foreign output path must never change)
    allowed = [o.rstrip("/") for o in _outputs(argv)
               if not (sandbox / o).exists() or store_kind(sandbox / o) is not None]
    capsys.readouterr()
    start = time.perf_counter()
    try:
        with time_limit(LIMIT_S):
            try:
                rc = main(argv)
            except SystemExit as exc:  # argparse: --help, --version, usage errors
                rc = exc.code
        after = snapshot(sandbox)
        finite = _written_finite(argv, sandbox / _outputs(argv)[0]) if rc == 0 and argv[0] == "simulate" \
            else True
    finally:  # examples stay independent: what this one created is removed (a replaced output stays)
        for key in sorted(set(snapshot(sandbox)) - set(before), key=len, reverse=True):
            path = sandbox / key
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    err = capsys.readouterr().err
    event(f"{argv[0]} exit {rc}")
    event(f"{argv[0]} took {'< 1' if time.perf_counter() - start < 1 else '>= 1'} s")
    assert rc in (0, 2), (argv, rc, err)
    if "--debug" not in argv:
        assert "Traceback" not in err, (argv, err)
    if rc == 2 and "--debug" not in argv:  # what a terminal shows: a progress bar redraws its line (\r)
        shown = "\n".join(line.split("\r")[-1] for line in err.split("\n"))
        assert len(shown.strip().splitlines()) == 1 and "error" in shown, (argv, err)
    changed = {k for k in set(before) | set(after) if before.get(k, 0) != after.get(k, 0)}
    stray = {k for k in changed if not any(k == a or k.startswith(a + "/") or a.startswith(k + "/")
                                           for a in allowed)}
    assert not stray, (argv, sorted(stray)[:5])
    assert finite, argv


def _written_finite(argv, path) -> bool:
    import xarray as xr

    with xr.open_dataset(path, engine="zarr" if path.suffix == ".zarr" else None) as ds:
        return bool(np.all(np.isfinite(ds.x.values)))


# -- the public API --------------------------------------------------------------------------------
GOOD_NUMBERS = [0.05, 0.3, 1.0, 4.0]
BAD_NUMBERS = [-1.0, 0.0, 1e-300, 9.0, 1e3, 1e300, np.nan, np.inf, -np.inf, "1", None]
GOOD_COUNTS, BAD_COUNTS = [1, 2, 3], [-1, 0, 7, 2.5, True, "3"]


@st.composite
def x0s(draw, good):
    kinds = ["none", "good", "ensemble"] if good else ["nan", "inf", "empty", "complex", "strings", "ragged",
                                                      "flat", "zero-row", "object"]
    kind = draw(st.sampled_from(kinds))
    rng = np.random.default_rng(draw(st.integers(0, 3)))
    return {"none": None, "good": rng.standard_normal((5, 3)), "ensemble": rng.standard_normal((2, 4, 3)),
            "nan": np.array([[np.nan, 0, 1.0], [0, 1.0, 0]]),
            "inf": np.array([[np.inf, 0, 1.0], [0, 1.0, 0]]),
            "empty": np.zeros((0, 3)), "complex": rng.standard_normal((4, 3)) + 1j,
            "strings": [["a", "b"], ["c", "d"]], "ragged": [[1.0, 2.0], [3.0]], "flat": np.ones(4),
            "zero-row": np.array([[0.0, 0, 0], [0, 1.0, 0]]),
            "object": np.array([[{}, 1.0], [2.0, 3.0]], dtype=object)}[kind]


#: good runs stay within float64 and d = 3: every other dtype / dimension is another numba compile
#: of the trajectory drivers (about a minute each on a cold cache); hostile values fail validation
SIM_OPTIONS = {  # name: (good values, hostile values)
    "beta": (GOOD_NUMBERS, BAD_NUMBERS), "sigma": (GOOD_NUMBERS, BAD_NUMBERS),
    "radius": ([0.5, 1.5], BAD_NUMBERS), "window": (GOOD_COUNTS, BAD_COUNTS),
    "top_k": (GOOD_COUNTS, BAD_COUNTS),
    "causal": ([True, False], ["yes", 1]), "noise": ([0.0, 0.1], BAD_NUMBERS),
    "integrator": (["euler", "rk4"], ["banana"]), "dtype": (["float64"], ["banana", "int64"]),
    "seed": ([0, 1], [-1, 2.5, "x"]), "save_every": (GOOD_COUNTS, BAD_COUNTS),
    "samples": ([None, 2], [0, -1]), "geometry": (["sphere", "euclidean"], ["torus"]),
    "return_weights": ([True, False], ["no"]), "progress": ([False], ["no"]),
}


@st.composite
def simulate_kwargs(draw):
    mode = draw(st.sampled_from(["clean", "one-bad", "wild"]))
    names = ["model", "x0", "steps", "dt"] + [k for k in SIM_OPTIONS if draw(st.integers(0, 2)) == 0]
    bad = draw(st.sampled_from(names)) if mode == "one-bad" else None

    def good(name):
        if mode == "wild":
            return draw(st.booleans())
        return mode == "clean" or name != bad

    models = ["sa", "usa", "krause", "hk"] if good("model") else ["bogus", ["sa"]]
    kw = {"model": draw(st.sampled_from(models)),
          "x0": draw(x0s(good("x0"))),
          "steps": draw(st.sampled_from([0, 1, 3, 5] if good("steps") else [-5, 2.5, "ten", np.inf])),
          "dt": draw(st.sampled_from([0.05, 0.1, 0.5] if good("dt") else BAD_NUMBERS))}
    if kw["model"] == "hk":
        kw["radius"] = 0.5
    if kw["x0"] is None:
        kw.update(n=draw(st.sampled_from(GOOD_COUNTS + [5])), d=3)
    for name in names[4:]:
        kw[name] = draw(st.sampled_from(SIM_OPTIONS[name][0 if good(name) else 1]))
    return kw


API_ERRORS = (ValueError, TypeError, ArithmeticError)


@settings(max_examples=150, **SETTINGS)
@given(kw=simulate_kwargs())
def test_simulate_fuzz(kw):
    kw = dict(kw)
    model = kw.pop("model")
    with time_limit(LIMIT_S):
        try:
            ds = simulate(model, **kw)
        except API_ERRORS as err:
            event(f"simulate raised {type(err).__name__}")
            return
    event("simulate returned")
    assert np.all(np.isfinite(ds.x.values)), kw
    if "attention" in ds:
        assert np.all(np.isfinite(ds.attention.values)), kw


@st.composite
def trajectories(draw):
    rng = np.random.default_rng(draw(st.integers(0, 3)))
    shape = draw(st.sampled_from([(6, 3), (4, 6, 3), (2, 4, 6, 3), (6,), (0, 3), (4, 0, 3)]))
    x = rng.standard_normal(shape)
    poison = draw(st.sampled_from([None, np.nan, np.inf]))
    if poison is not None and x.size:
        x.flat[draw(st.integers(0, x.size - 1))] = poison
    return x


@st.composite
def attentions(draw):
    rng = np.random.default_rng(draw(st.integers(0, 3)))
    shape = draw(st.sampled_from([(5, 5), (3, 5, 5), (2, 3, 5, 5), (5, 4), (5,)]))
    a = rng.random(shape)
    a = a / a.sum(-1, keepdims=True)
    if draw(st.booleans()):
        a = a * draw(st.sampled_from([-1.0, 2.0, 0.0]))
    poison = draw(st.sampled_from([None, np.nan, np.inf]))
    if poison is not None:
        a.flat[draw(st.integers(0, a.size - 1))] = poison
    return a


def _finite(result) -> bool:
    values = np.asarray(getattr(result, "values", result), dtype=float)
    return bool(np.all(np.isfinite(values)))


@settings(max_examples=120, **SETTINGS)
@given(x=trajectories(), metric=st.sampled_from(["count_clusters", "effective_rank", "mean_cosine",
                                                 "rank_collapse"]),
       eps=st.sampled_from([1e-2, 0.5, 0.0, -1.0, np.nan]), method=st.sampled_from(["graph", "gram"]))
def test_configuration_metrics_fuzz(x, metric, eps, method):
    kw = {"eps": eps, "method": method} if metric == "count_clusters" else {}
    try:
        result = getattr(analysis, metric)(x, **kw)
    except API_ERRORS as err:
        event(f"raised {type(err).__name__}")
        return
    event("returned")
    assert _finite(result), (metric, x.shape, kw, result)


@settings(max_examples=80, **SETTINGS)
@given(a=attentions(), metric=st.sampled_from(["first_token_mass", "sink_rate", "attention_entropy",
                                               "sink_excess"]))
def test_attention_metrics_fuzz(a, metric):
    try:
        result = getattr(analysis, metric)(a)
    except API_ERRORS as err:
        event(f"raised {type(err).__name__}")
        return
    event("returned")
    assert _finite(result), (metric, a.shape, result)



@settings(max_examples=40, **SETTINGS)
@given(seed=st.integers(0, 3), order=st.permutations(["time", "particle", "component"]),
       metric=st.sampled_from(["count_clusters", "effective_rank", "mean_cosine", "rank_collapse"]))
def test_metrics_read_dimension_names_not_order(seed, order, metric):
    """A labelled trajectory gives the same metric in any dimension order (the names say what is what)."""
    import xarray as xr

    x = xr.DataArray(np.random.default_rng(seed).standard_normal((4, 6, 3)),
                     dims=("time", "particle", "component"))
    kw = {"eps": 0.8} if metric == "count_clusters" else {}
    f = getattr(analysis, metric)
    np.testing.assert_allclose(np.asarray(f(x.transpose(*order), **kw)), np.asarray(f(x, **kw)))


@settings(max_examples=40, **SETTINGS)
@given(seed=st.integers(0, 3), order=st.permutations(["layer", "query", "key"]),
       metric=st.sampled_from(["first_token_mass", "sink_rate", "attention_entropy", "sink_excess"]))
def test_attention_metrics_read_dimension_names_not_order(seed, order, metric):
    import xarray as xr

    a = np.random.default_rng(seed).random((3, 5, 5))
    a = xr.DataArray(a / a.sum(-1, keepdims=True), dims=("layer", "query", "key"))
    f = getattr(analysis, metric)
    np.testing.assert_allclose(np.asarray(f(a.transpose(*order))), np.asarray(f(a)))
