"""Packaging: shipped checkpoints resolve by name from any folder, `ksync --version`, py.typed.

A real `pip install .` into a fresh virtual environment is too slow for the default suite; it was
tried by hand (see CHANGELOG / docs/index.md for the route).
"""

from __future__ import annotations

from fnmatch import fnmatch
from pathlib import Path

import pytest

import analysis
import particles
from analysis.cli import main
from particles.nn import load_checkpoint, read_card, save_checkpoint
from particles.nn.checkpoint import resolve_checkpoint, shipped_dir

ROOT = Path(__file__).resolve().parent.parent


def test_shipped_checkpoints_load_by_bare_name_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("digits-vit-krause", "digits-vit-krause.pt", "digits-vit-krause.json",
                 "checkpoints/digits-vit-krause.pt"):  # the last: a repository-relative path
        model = load_checkpoint(name)
        assert model.card["task"] == "digits-vit" and model.card["attention"] == "krause"
        assert not model.training
    assert read_card("digits-ar-softmax")["task"] == "digits-ar"


def test_a_path_that_exists_wins_over_the_shipped_checkpoint(tmp_path, monkeypatch):
    shipped = load_checkpoint("digits-vit-softmax")
    card = dict(shipped.card, seed=12345)
    monkeypatch.chdir(tmp_path)
    save_checkpoint(shipped, card, tmp_path / "digits-vit-softmax")
    assert resolve_checkpoint("digits-vit-softmax") == Path("digits-vit-softmax")
    assert load_checkpoint("digits-vit-softmax").card["seed"] == 12345  # the local one


def test_unknown_name_is_a_clear_error_and_only_the_file_name_is_looked_up(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="no shipped checkpoint is named 'no-such-model'"):
        load_checkpoint("no-such-model")
    # a path that escapes upwards is looked up by its last component only, inside the shipped folder
    assert resolve_checkpoint("../../../digits-vit-krause.pt") == shipped_dir() / "digits-vit-krause.pt"


def test_every_shipped_checkpoint_is_package_data():
    """The globs of [tool.setuptools.package-data] match every card and weights file of the shipped
    folder, which lives inside the package, so `pip install .` installs them."""
    folder = shipped_dir()
    files = sorted(p for p in folder.iterdir() if p.suffix in (".pt", ".json"))
    assert files, f"no shipped checkpoints in {folder}"
    package_root = Path(particles.__file__).resolve().parent.parent
    assert folder.is_relative_to(Path(particles.__file__).resolve().parent), folder
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    for path in files:
        rel = path.relative_to(package_root)
        package = ".".join(rel.parts[:-2]) if len(rel.parts) > 2 else rel.parts[0]
        inside = "/".join(rel.parts[len(package.split(".")):])
        patterns = data.get(package, []) + data.get("*", [])
        assert any(fnmatch(inside, p) for p in patterns), f"{rel} is not package data ({package}: {patterns})"


def test_version_flag(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0
    assert capsys.readouterr().out.strip() == f"ksync (krause-sync) {particles.__version__}"


def test_both_packages_are_typed():
    for package in (particles, analysis):
        assert (Path(package.__file__).parent / "py.typed").is_file()


def _unannotated(fn, every_parameter: bool) -> list[str]:
    """The parameters of ``fn`` without a type hint (all, or only the first) and "return" if it has none."""
    import inspect

    sig = inspect.signature(fn)
    params = list(sig.parameters.values())
    missing = [p.name for p in (params if every_parameter else params[:1])
               if p.annotation is inspect.Parameter.empty]
    if sig.return_annotation is inspect.Signature.empty:
        missing.append("return")
    return missing


def test_public_api_is_annotated():
    """The public entry points carry type hints (py.typed): the metrics of ``analysis.__all__`` on their
    data argument and their result, the entry points below on every parameter and their result."""

    from analysis import bridge, plot, sweeps
    from particles import make_interaction, nn, simulate

    metrics = [getattr(analysis, name) for name in analysis.__all__ if name not in ("sweep", "plot_sweep",
                                                                                   "open_sweep")]
    full = [make_interaction, nn.krausify, nn.train, load_checkpoint, read_card, save_checkpoint,
            plot.trajectory, plot.state, plot.cluster_count, plot.attention,
            sweeps.sweep, analysis.open_sweep, analysis.plot_sweep,
            bridge.extract, bridge.compare, bridge.simulate_like, bridge.fit_preset, bridge.make_compare,
            bridge.load_hf, bridge.load_smollm2]
    assert {fn.__name__ for fn in (plot.trajectory, plot.state, plot.cluster_count, plot.attention)} \
        == set(plot.__all__)
    # first argument and result only: simulate's **params are described in particles.params.PARAMS
    partial = [simulate, *metrics]
    missing = {f"{fn.__module__}.{fn.__qualname__}": m for fn in full if (m := _unannotated(fn, True))}
    missing |= {f"{fn.__module__}.{fn.__qualname__}": m for fn in partial if (m := _unannotated(fn, False))}
    assert not missing, f"add type hints to {missing}"
    assert analysis.sweep.sweep is sweeps.sweep  # the callable module analysis.sweep runs this function
