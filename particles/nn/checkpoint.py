"""Checkpoints: ``NAME.pt`` (a plain state dict of tensors) next to ``NAME.json`` (the card).

The card holds config, metrics, training time, seed and the sha256 of the weights file. Loading
checks the sha256 first and then reads tensors only (``torch.load(weights_only=True)``: no code
is ever unpickled).
"""

from __future__ import annotations

import hashlib
import json
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


def _paths(path) -> tuple[Path, Path]:
    path = Path(path)
    stem = path.with_suffix("") if path.suffix in (".pt", ".json") else path
    return stem.with_suffix(".pt"), stem.with_suffix(".json")


def save_checkpoint(model: torch.nn.Module, card: dict, path) -> dict:
    """Write ``path`` (.pt) and its card (.json); returns the card with ``file`` and ``sha256``."""
    weights, card_path = _paths(path)
    weights.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    torch.save(state, weights)
    card = dict(card, file=weights.name, sha256=sha256(weights), size_bytes=weights.stat().st_size)
    card_path.write_text(json.dumps(card, indent=1, sort_keys=False) + "\n")
    return card


def read_card(path) -> dict:
    _, card_path = _paths(path)
    if not card_path.exists():
        raise FileNotFoundError(f"checkpoint card {card_path} not found")
    try:
        return json.loads(card_path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"checkpoint card {card_path} is not valid JSON: {err}") from None


def load_checkpoint(path, *, verify: bool = True) -> torch.nn.Module:
    """Model from ``path`` (NAME, NAME.pt or NAME.json) in eval mode, with ``.config`` and ``.card``.

    Raises CheckpointError (a ValueError) if the weights do not match the sha256 recorded in the
    card, cannot be read as a tensor state dict, or do not fit the configured model.
    """
    from .train import build_model

    weights, _ = _paths(path)
    card = read_card(path)
    if not weights.exists():
        raise FileNotFoundError(f"checkpoint weights {weights} not found")
    if verify and sha256(weights) != card.get("sha256"):
        raise CheckpointError(f"checkpoint {weights} is damaged: its sha256 differs from the one in its card")
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many kinds for truncated/corrupt archives
        raise CheckpointError(f"checkpoint {weights} is damaged or not a weights file: {err}") from None
    model = build_model(card["config"])
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as err:
        raise CheckpointError(f"checkpoint {weights} does not match its config: {err}") from None
    model.config = card["config"]
    model.card = card
    return model.eval()
