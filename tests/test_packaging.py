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
    folder, so `pip install .` installs them (only once they live inside the package)."""
    folder = shipped_dir()
    files = sorted(p for p in folder.iterdir() if p.suffix in (".pt", ".json"))
    assert files, f"no shipped checkpoints in {folder}"
    package_root = Path(particles.__file__).resolve().parent.parent
    if not folder.is_relative_to(Path(particles.__file__).resolve().parent):
        pytest.skip(f"checkpoints not moved into the package yet ({folder})")
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


def test_public_api_is_annotated():
    """The public entry points carry type hints on their data argument and their result (py.typed)."""
    import inspect

    from analysis.bridge import extract
    from particles import make_interaction, simulate

    functions = [simulate, make_interaction, extract, load_checkpoint, read_card, save_checkpoint,
                 *(getattr(analysis, name) for name in analysis.__all__ if name not in ("sweep", "plot_sweep",
                                                                                       "open_sweep"))]
    missing = []
    for fn in functions:
        sig = inspect.signature(fn)
        first = next(iter(sig.parameters.values()))
        if sig.return_annotation is inspect.Signature.empty or first.annotation is inspect.Parameter.empty:
            missing.append(fn.__name__)
    assert not missing, f"add type hints to {missing}"
