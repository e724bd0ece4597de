"""Markdown tables of the shipped checkpoints' cards: ``python -m particles.nn.report [DIR]``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

METRIC = {
    "digits-vit": ("test_accuracy", "test accuracy ↑"),
    "digits-ar": ("test_bits_per_pixel", "bits/pixel ↓"),
    "text-lm": ("test_bits_per_char", "bits/char ↓"),
    "recall": ("test_accuracy", "accuracy (all distances) ↑"),
}
ORDER = ("krause", "softmax", "hybrid")


def cards(directory) -> dict:
    from .checkpoint import list_cards

    return {(card["task"], card.get("attention")): card for _, card in list_cards(directory)}


def main_table(c: dict) -> str:
    rows = [
        "| task | metric | Krause | softmax | hybrid | train time K / S / H (s) | params (K) |",
        "|---|---|---|---|---|---|---|",
    ]
    for task, (key, label) in METRIC.items():
        got = [c.get((task, a)) for a in ORDER]
        if not any(got):
            continue
        vals = [f"{g['metrics'][key]:.4f}" if g else "–" for g in got]
        times = " / ".join(f"{g['train_time_s']:.0f}" if g else "–" for g in got)
        params = next(g for g in got if g)["n_params"]
        rows.append(f"| {task} | {label} | {' | '.join(vals)} | {times} | {params / 1e3:.0f} |")
    return "\n".join(rows)


def sampling_table(c: dict) -> str:
    rows = ["| digits-ar sampler | cached (ms/image) | uncached (ms/image) |", "|---|---|---|"]
    for a in ORDER:
        g = c.get(("digits-ar", a))
        if g:
            m = g["metrics"]
            rows.append(
                f"| {a} | {m['sample_ms_per_image_cached']:.2f} | {m['sample_ms_per_image_uncached']:.2f} |"
            )
    return "\n".join(rows)


def recall_table(c: dict) -> str:
    got = {a: c[("recall", a)] for a in ORDER if ("recall", a) in c}
    if not got:
        return ""
    bins = list(next(iter(got.values()))["metrics"]["accuracy_by_distance_bin"])
    rows = [
        "| recall: accuracy at distance | " + " | ".join(bins) + " | all |",
        "|---" * (len(bins) + 2) + "|",
    ]
    for a, g in got.items():
        m = g["metrics"]
        rows.append(
            f"| {a} | "
            + " | ".join(f"{m['accuracy_by_distance_bin'][b]:.3f}" for b in bins)
            + f" | {m['test_accuracy']:.3f} |"
        )
    return "\n".join(rows)


def ablation_table(path) -> str:
    path = Path(path)
    if not path.exists():
        return ""
    r = json.loads(path.read_text())
    rows = [
        f"| digits-vit variant ({len(r['seeds'])} seeds, {r['epochs']} epochs) | test accuracy mean ± sd "
        "| runs |",
        "|---|---|---|",
    ]
    for name, v in r["results"].items():
        runs = ", ".join(f"{x['test_accuracy']:.4f}" for x in v["runs"])
        rows.append(f"| {name} | {v['mean']:.4f} ± {v['sd']:.4f} | {runs} |")
    return "\n".join(rows)


def report(directory="checkpoints") -> str:
    c = cards(directory)
    parts = [
        main_table(c),
        sampling_table(c),
        recall_table(c),
        ablation_table(Path(directory) / "ablations.json"),
    ]
    return "\n\n".join(p for p in parts if p) + "\n"


if __name__ == "__main__":  # pragma: no cover
    print(report(sys.argv[1] if len(sys.argv) > 1 else "checkpoints"), end="")
