"""Trained-vs-simulated comparison figures: one ``compare_<task>`` per task with shipped checkpoints.

Each is :func:`analysis.bridge.make_compare` on the shipped checkpoints (package data,
``particles/nn/checkpoints``; found by their JSON cards).
"""

from __future__ import annotations

from analysis.figures._registry import register
from particles.nn.checkpoint import shipped_dir

CHECKPOINTS = shipped_dir()


def shipped_tasks(root=CHECKPOINTS) -> list[str]:
    """Tasks with at least two trained attention kinds under ``root`` (read from the JSON cards)."""
    from particles.nn.checkpoint import list_cards

    kinds: dict[str, set] = {}
    for _, meta in list_cards(root, with_weights=True):
        if meta.get("attention") and "config" in meta:  # our own models (adapter cards have a "base")
            kinds.setdefault(meta["task"], set()).add(meta["attention"])
    return [task for task, found in kinds.items() if len(found) >= 2]


def _register(task: str) -> None:
    def make(quick=False, out=None, progress=True):
        from analysis.bridge import make_compare

        return make_compare(task, quick=quick, out=out, progress=progress, checkpoints=CHECKPOINTS)

    make.__doc__ = f"{task}: trained Krause vs softmax per layer (clusters, collapse, sinks) vs simulation"
    register(f"compare_{task}", group="compare")(make)


for _task in shipped_tasks():
    _register(_task)

