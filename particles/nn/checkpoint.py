"""Checkpoints: ``NAME.pt`` (a plain state dict of tensors) next to ``NAME.json`` (the card).

The card holds config, metrics, training time, seed and the sha256 of the weights file. Loading
checks the sha256 first and then reads tensors only (``torch.load(weights_only=True)``: no code
is ever unpickled). A card is never trusted further than its weights: it must be a JSON object
whose config describes a model with exactly the tensors of the weights file, which is checked on
torch's "meta" device (no memory) before the model is allocated — a card claiming a huge
``d_model`` is refused, not built. Both files are written under temporary names and moved into
place, so a killed save never leaves a half-written checkpoint.

:func:`list_cards` is the one scanner of a checkpoint folder (``NAME.json`` cards next to
``NAME.pt`` weights).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import uuid
from pathlib import Path

import torch


class CheckpointError(ValueError):
    """A checkpoint is missing its card, damaged, or does not match its card."""


def sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def checkpoint_files(path) -> tuple[Path, Path]:
    """(weights ``.pt``, card ``.json``) of checkpoint ``path`` given as NAME, NAME.pt or NAME.json."""
    return _paths(path)


def _paths(path) -> tuple[Path, Path]:
    path = Path(path)
    stem = path.with_suffix("") if path.suffix in (".pt", ".json") else path
    return stem.with_suffix(".pt"), stem.with_suffix(".json")


#: Where the shipped checkpoints live: package data (``particles/nn/checkpoints``), in a source checkout
#: and in an installed package alike.
_PACKAGE_DIR = Path(__file__).resolve().parent / "checkpoints"


def shipped_dir() -> Path:
    """The folder of the checkpoints shipped with krause-sync (package data)."""
    return _PACKAGE_DIR


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """The path of checkpoint ``path`` (its .pt, .json or stem, as given): ``path`` itself when its
    card exists (relative paths from the working directory), otherwise the shipped checkpoint with
    the same file name — so a bare name ("digits-vit-krause"), a file name or a repository-relative
    path ("checkpoints/digits-vit-krause.pt") works from any folder. Only the last path component
    is looked up among the shipped ones. FileNotFoundError naming both places when neither exists."""
    _, card = _paths(path)
    if card.exists():
        return Path(path)
    shipped = shipped_dir() / Path(path).name
    if _paths(shipped)[1].exists():
        return shipped
    raise FileNotFoundError(f"checkpoint card {card} not found, and no shipped checkpoint is named "
                            f"{card.stem!r} (shipped: {shipped_dir()})")


def save_checkpoint(model: torch.nn.Module, card: dict, path: str | os.PathLike) -> dict:
    """Write ``path`` (.pt) and its card (.json); returns the card with ``file`` and ``sha256``."""
    weights, card_path = _paths(path)
    weights.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    tag = uuid.uuid4().hex[:12]
    tmp_weights, tmp_card = (p.with_name(f".{p.name}.partial-{tag}") for p in (weights, card_path))
    try:
        torch.save(state, tmp_weights)
        card = dict(card, file=weights.name, sha256=sha256(tmp_weights),
                    size_bytes=tmp_weights.stat().st_size)
        tmp_card.write_text(json.dumps(card, indent=1, sort_keys=False) + "\n")
        os.replace(tmp_weights, weights)  # an old card next to new weights fails its sha256 check
        os.replace(tmp_card, card_path)
    finally:
        for tmp in (tmp_weights, tmp_card):
            tmp.unlink(missing_ok=True)
    return card


def read_card(path: str | os.PathLike) -> dict:
    """The JSON card of checkpoint ``path`` (a path or a shipped name, see :func:`resolve_checkpoint`)."""
    _, card_path = _paths(resolve_checkpoint(path))
    try:
        card = json.loads(card_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"checkpoint card {card_path} is not valid JSON: {err}") from None
    if not isinstance(card, dict):
        raise CheckpointError(f"checkpoint card {card_path} must be a JSON object, got {type(card).__name__}")
    return card


def list_cards(root: str | os.PathLike, *, task: str | None = None,
               with_weights: bool = False) -> list[tuple[Path, dict]]:
    """``[(card path, card)]`` of the checkpoint cards in folder ``root``, sorted by file name.

    A card is a JSON object with a "task" (string), a "config" (object; for the adapters of a
    pretrained model the "base" it applies to instead) and the "sha256" of its weights, as
    :func:`save_checkpoint` writes it; other JSON files (``ablations.json``) and
    unreadable files are skipped. ``task``: keep only that task; ``with_weights``: keep only
    cards whose ``.pt`` exists. A missing folder gives [].
    """
    root = Path(root)
    if not root.is_dir():
        return []
    out = []
    for card_path in sorted(root.glob("*.json")):
        try:
            card = json.loads(card_path.read_text())
        except (OSError, ValueError):
            continue
        if not (isinstance(card, dict) and isinstance(card.get("task"), str) and "sha256" in card
                and (isinstance(card.get("config"), dict) or isinstance(card.get("base"), dict))):
            continue
        if task is not None and card["task"] != task:
            continue
        if with_weights and not card_path.with_suffix(".pt").exists():
            continue
        out.append((card_path, card))
    return out


def _config(card: dict, weights: Path) -> dict:
    config = card.get("config")
    if not isinstance(config, dict) or not isinstance(config.get("model"), str):
        raise CheckpointError(f"checkpoint {weights}: its card has no valid config (a JSON object with a "
                              "'model' kind)")
    return config


def _check_plausible(config: dict, state: dict, weights: Path) -> None:
    """Every number in the config finite, every integer at most the number of stored weights (a
    dimension or count of the model cannot exceed its parameter count): refuses a card such as
    d_model = 10¹² before anything is built, even on the meta device."""
    total = sum(t.numel() for t in state.values())

    def walk(value, where):
        if isinstance(value, bool) or value is None or isinstance(value, str):
            return
        if isinstance(value, int):
            if abs(value) > total:
                raise CheckpointError(f"checkpoint {weights} does not match its config: {where} = {value} "
                                      f"exceeds the {total} stored weights")
        elif isinstance(value, float):
            if not math.isfinite(value):
                raise CheckpointError(f"checkpoint {weights}: config {where} = {value} is not finite")
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(v, f"{where}.{k}" if where else str(k))
        elif isinstance(value, list):
            for i, v in enumerate(value):
                walk(v, f"{where}[{i}]")
        else:
            raise CheckpointError(f"checkpoint {weights}: config {where} has an unexpected value {value!r}")

    walk(config, "")
    layers = config.get("n_layers")
    if isinstance(layers, int) and layers > len(state):  # each layer holds at least one tensor
        raise CheckpointError(f"checkpoint {weights} does not match its config: n_layers = {layers} "
                              f"exceeds the {len(state)} stored tensors")


def _check_shapes(config: dict, state: dict, weights: Path, build_model) -> None:
    """Build the configured model on the meta device (no memory) and compare its tensors with the
    stored ones, so a card that does not describe its weights is refused before allocation."""
    try:
        with torch.device("meta"):
            meta = build_model(config)
    except Exception as err:  # a config the model classes reject: any error is a bad card
        raise CheckpointError(f"checkpoint {weights}: its card's config cannot build a model "
                              f"({type(err).__name__}: {err})") from None
    want = {k: tuple(v.shape) for k, v in meta.state_dict().items()}
    have = {k: tuple(v.shape) for k, v in state.items()}
    if want != have:
        missing, extra = sorted(set(want) - set(have)), sorted(set(have) - set(want))
        differ = sorted(k for k in set(want) & set(have) if want[k] != have[k])
        detail = "; ".join(part for part in (
            f"missing {missing[:3]}" if missing else "", f"unexpected {extra[:3]}" if extra else "",
            f"shape of {differ[0]}: config {want[differ[0]]}, stored {have[differ[0]]}" if differ else "")
            if part)
        raise CheckpointError(f"checkpoint {weights} does not match its config: {detail}")


def load_checkpoint(path: str | os.PathLike, *, verify: bool = True) -> torch.nn.Module:
    """Model from ``path`` (NAME, NAME.pt or NAME.json; a shipped checkpoint by its bare name, e.g.
    "digits-vit-krause", from any folder) in eval mode, with ``.config`` and ``.card``.

    Raises CheckpointError (a ValueError) if the weights do not match the sha256 recorded in the
    card, cannot be read as a tensor state dict, or do not fit the configured model.
    """
    from .train import build_model

    path = resolve_checkpoint(path)
    weights, _ = _paths(path)
    card = read_card(path)
    if not weights.exists():
        raise FileNotFoundError(f"checkpoint weights {weights} not found")
    if verify and sha256(weights) != card.get("sha256"):
        raise CheckpointError(f"checkpoint {weights} is damaged: its sha256 differs from the one in its card")
    if card.get("format") == "hf-adapter":  # LoRA adapters on a Hugging Face base (owner: llm)
        return __import__("particles.nn.llm", fromlist=["llm"]).load_adapters(weights, card)
    config = _config(card, weights)
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many kinds for truncated/corrupt archives
        raise CheckpointError(f"checkpoint {weights} is damaged or not a weights file: {err}") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise CheckpointError(f"checkpoint {weights} is not a state dict of named tensors")
    _check_plausible(config, state, weights)
    _check_shapes(config, state, weights, build_model)
    model = build_model(config)
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as err:
        raise CheckpointError(f"checkpoint {weights} does not match its config: {err}") from None
    model.config = config
    model.card = card
    return model.eval()
