"""The experiment plans behind benchmarks/bridge.md (run with ``python -m analysis.findings.experiments``).

In priority order (one background process runs them in this order, resuming finished runs):

a. ``vit-ablation``: digits-vit, the 2 × 2 × 2 cells (score dot/RBF × patch-grid locality × top-k),
   3 seeds, 40 epochs (1680 steps), measured on 256 held-out test images.
b. ``sink``: text-bos (character LM, BOS at every window start), plain softmax ("dot") and the full
   Krause attention ("rbf+window+topk": window 16, top-k 8, σ per head init 2.5), 3 seeds each,
   2500 steps, α₀ per layer on 64 fixed held-out windows every 100 steps; measured on 256 windows.
f. ``sink-long``: the plain softmax cell of b trained 8000 steps (its ≤ 10-minute budget on a quiet
   machine), seed 0 — added when no sink had formed by 2500 steps (α₀ below uniform from step ~600
   on); g: seeds 1 and 2 of it, last (the shared machine made each run take 24 minutes).
c. ``causal-ablation``: the other six cells of the same 2 × 2 × 2 on text-bos, same budget (so b ∪ c
   is the full causal ablation).
e. trained vs simulated (:mod:`analysis.findings.distances`) for the runs of ``DISTANCE_CELLS``, on 128
   held-out inputs, written as ``distances.nc`` beside the run (after a for the ViT, after c for the LM).
d. ``recall``: one-factor-at-a-time around a base Krause config (window 16, top-k 8, σ init 2.5,
   lr 3e-3): top-k none / 16, window 64 (= the whole sequence), σ init 1 / 5, lr 1e-3; plus
   softmax at the base lr; 3 seeds; 2000 steps. Run variant by variant (all seeds of one before the
   next) in the order of ``RECALL_ORDER``, so a sweep cut short by the compute budget has complete
   seeds for the variants that decide the question (is the task learnable at all, capacity = window,
   top-k, optimisation = lr, σ init) and none for the last ones.
h. ``sink-backcopy``: Bigram-Backcopy with a BOS token (Guo et al., 2024; task ``backcopy``: one
   block, one head, d = 64), where attention is needed only after a trigger token — the setting in
   which a softmax head learns to park its dormant rows on BOS. All 8 cells of the causal ablation
   (window 16, top-k 8), 5 seeds, 3000 steps, the backcopy probe (α₀ on dormant / active rows, the
   dormant rows' self-weight) every 100 steps; measured on 256 held-out sequences. ``h`` runs
   seeds 0, 2, 4 and ``i`` seeds 1, 3, so the two can run side by side on 2 cores.

On the shared machine (load 4-8) ``d`` runs in a second process beside ``c e g``
(``--parts d`` and ``--parts ceg``: the plans touch different experiments, so they never train the
same run).
"""

from __future__ import annotations

import argparse
import os
import sys

from .runs import Run, measure_missing, run_plan

SEEDS = (0, 1, 2)
VIT_CELLS = ("dot", "dot+topk", "dot+grid", "dot+grid+topk", "rbf", "rbf+topk", "rbf+grid", "rbf+grid+topk")
CAUSAL_CELLS = tuple(c.replace("grid", "window") for c in VIT_CELLS)
SINK_CELLS = ("dot", "rbf+window+topk")
#: cells whose runs get the trained-vs-simulated distances: the two corners and the two single changes
DISTANCE_CELLS = ("dot", "dot+grid", "rbf", "rbf+grid+topk", "dot+window", "rbf+window+topk")
VIT_TRAIN = dict(epochs=40)
TEXT_TRAIN = dict(steps=2500, probe_every=100)
RECALL_STEPS = 2000  # 3000 planned; the shared machine (load 4-8) made it ~5 h for 24 runs
RECALL_BASE = dict(window=16, top_k=8, sigma=2.5, lr=3e-3)
RECALL_VARIANTS = {
    "base": {},
    "topk-none": dict(top_k=None),
    "topk-16": dict(top_k=16),
    "window-64": dict(window=64),
    "sigma-1": dict(sigma=1.0),
    "sigma-5": dict(sigma=5.0),
    "lr-1e-3": dict(lr=1e-3),
}
#: recall variants in the order they run (softmax = the reference that the task is learnable in budget)
RECALL_ORDER = ("base", "softmax", "window-64", "topk-none", "lr-1e-3", "sigma-5", "sigma-1", "topk-16")


def recall_spec(window, top_k, sigma) -> dict:
    spec = dict(kind="krause", causal=True, window=window, sigma=sigma, sigma_per_head=True)
    if top_k is not None:
        spec["top_k"] = top_k
    return spec


def vit_ablation(seeds=SEEDS):
    return [
        Run("vit-ablation", cell, s, "digits-vit", cell, dict(VIT_TRAIN)) for s in seeds for cell in VIT_CELLS
    ]


def sink(seeds=SEEDS):
    return [
        Run("causal-ablation", cell, s, "text-bos", cell, dict(TEXT_TRAIN), probe="first_token")
        for s in seeds
        for cell in SINK_CELLS
    ]


SINK_LONG_TRAIN = dict(steps=8000, probe_every=250)


def sink_long(seeds=SEEDS):
    return [
        Run("sink-long", "dot", s, "text-bos", "dot", dict(SINK_LONG_TRAIN), probe="first_token")
        for s in seeds
    ]


BACKCOPY_TRAIN = dict(steps=3000, probe_every=100)


def sink_backcopy(seeds=(0, 1, 2, 3, 4)):
    return [
        Run("sink-backcopy", cell, s, "backcopy", cell, dict(BACKCOPY_TRAIN), probe="backcopy")
        for s in seeds
        for cell in CAUSAL_CELLS
    ]


def causal_ablation(seeds=SEEDS):
    return [
        Run("causal-ablation", cell, s, "text-bos", cell, dict(TEXT_TRAIN), probe="first_token")
        for s in seeds
        for cell in CAUSAL_CELLS
        if cell not in SINK_CELLS
    ]


def recall(seeds=SEEDS, steps=RECALL_STEPS):
    runs = []
    for name in RECALL_ORDER:
        for s in seeds:
            if name == "softmax":
                spec, lr = dict(kind="softmax", causal=True), RECALL_BASE["lr"]
            else:
                cfg = dict(RECALL_BASE, **RECALL_VARIANTS[name])
                spec, lr = recall_spec(cfg["window"], cfg["top_k"], cfg["sigma"]), cfg["lr"]
            runs.append(Run("recall", name, s, "recall", spec, dict(steps=steps, lr=lr), n_measure=0))
    return runs


PLANS = {
    "a": vit_ablation,
    "b": sink,
    "f": lambda: sink_long((0,)),
    "c": causal_ablation,
    "d": recall,
    "g": lambda: sink_long((1, 2)),
    "h": lambda: sink_backcopy((0, 2, 4)),
    "i": lambda: sink_backcopy((1, 3)),
}
N_DISTANCES = 128


def full_plan(parts="abcd"):
    return [run for p in parts if p in PLANS for run in PLANS[p]()]


def distances_missing(runs, root, *, n: int = N_DISTANCES, log=print) -> int:
    """``distances.nc`` (trained vs simulated) for every finished run of ``runs`` that lacks it."""
    from particles.conventions import encode
    from particles.nn import load_checkpoint

    from .distances import run_distances
    from .runs import held_out, is_done

    count = 0
    for run in runs:
        d = run.path(root)
        if not is_done(run, root) or (d / "distances.nc").exists():
            continue
        ds = run_distances(load_checkpoint(d / "model"), held_out(run.task, n))
        ds.attrs.update(experiment=run.experiment, variant=run.variant, seed=run.seed)
        tmp = d / f".distances.nc.tmp-{os.getpid()}"
        encode(ds).to_netcdf(tmp)
        os.replace(tmp, d / "distances.nc")
        count += 1
        log(f"distances {run.experiment}/{run.run_id}: matched dt {float(ds.matched_dt):.3g}")
    return count


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("root", help="run store directory")
    ap.add_argument(
        "--parts", default="aebfcedghi", help="stages in order (default aebfcedghi; e = distances)"
    )
    args = ap.parse_args(argv)
    import numba
    import torch

    torch.set_num_threads(1)
    # numba.set_num_threads, not the NUMBA_NUM_THREADS variable: numba is imported by now, and a
    # variable that differs from the launched thread pool makes every later compile fail
    numba.set_num_threads(1)
    plan = full_plan(args.parts)
    log = lambda m: print(m, flush=True)  # noqa: E731
    measure_missing(plan, args.root, log=log)  # runs whose measurement failed earlier
    done = []
    for part in args.parts:
        if part == "e":  # trained vs simulated for the ablation runs trained so far
            runs = [r for r in done if r.experiment != "recall" and r.variant in DISTANCE_CELLS]
            distances_missing(runs, args.root, log=log)
            continue
        runs = PLANS[part]()
        run_plan(runs, args.root, log=log)
        done += runs
    print("all done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
