"""``ksync train TASK --attention NAME [--epochs N | --steps N] [--lr LR] [--seed S] [--out DIR]``.

TASK is one of digits-vit, digits-ar, text-lm, text-bos, recall, backcopy (writes OUT/NAME.pt + .json, NAME
defaulting to TASK-ATTENTION; an existing checkpoint is replaced only with --force), or
``ablations``: the digits-vit controls (RBF alone, dot-product + locality, dot-product + top-k,
full Krause, softmax) over several seeds, summarised as mean ± sd in OUT/ablations.json.
Attention names: krause, softmax, hybrid and the ablation cells dot, dot+topk, dot+grid (ViT) or
dot+window (causal tasks), …, rbf+grid+topk / rbf+window+topk (= krause).
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from . import UsageError
from ._args import add_force, output_name, positive_float, positive_int

TASK_NAMES = ("digits-vit", "digits-ar", "text-lm", "text-bos", "recall", "backcopy", "ablations", "smollm2")


def register(subparsers):
    p = subparsers.add_parser(
        "train",
        help="train a small Krause/softmax transformer and save a checkpoint",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument("task", metavar="TASK", help=f"one of {', '.join(TASK_NAMES)}")
    p.add_argument(
        "--attention",
        default="krause",
        help="krause | softmax | hybrid | an ablation cell: dot, dot+topk, dot+grid (ViT) / dot+window, "
        "..., rbf+grid+topk / rbf+window+topk (= krause); digits-vit also rbf, dot-local, dot-topk "
        "(default: krause)",
    )
    p.add_argument("--epochs", type=positive_int, default=None, help="default: the task's own")
    p.add_argument("--steps", type=positive_int, default=None, help="optimiser steps instead of --epochs")
    p.add_argument("--lr", type=positive_float, default=None, help="peak learning rate (default: the task's)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the model init, batch order and synthetic data (default: 0); "
                        "not for ablations")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                   help="the seeds of every ablation cell, TASK ablations only (default: 0 1 2)")
    p.add_argument("--out", default="checkpoints", help="output directory (default: checkpoints)")
    p.add_argument(
        "--name",
        type=output_name,
        default=None,
        help="checkpoint file name inside --out, no folders (default: TASK-ATTENTION)",
    )
    p.add_argument("--threads", type=positive_int, default=1, help="torch threads (default 1)")
    p.add_argument(
        "--subset", type=positive_int, default=None, help="use only the first N training examples (N >= 1)"
    )
    add_force(p)
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=run)
    return p


def _summary(card: dict) -> str:
    m = {k: v for k, v in card["metrics"].items() if isinstance(v, float)}
    return ", ".join(f"{k}={v:.4f}" for k, v in m.items()) + f" ({card['train_time_s']:.0f} s)"


def run(args) -> int:
    from particles.nn import ABLATIONS, TASKS, save_checkpoint, train

    if args.task not in TASK_NAMES:
        raise UsageError(f"TASK must be one of {', '.join(TASK_NAMES)}, got {args.task!r}")
    if args.task == "smollm2":  # owner: llm
        return _smollm2(args)
    if args.epochs is not None and args.epochs < 1:
        raise UsageError(f"--epochs must be >= 1, got {args.epochs}")
    if args.threads < 1:
        raise UsageError(f"--threads must be >= 1, got {args.threads}")
    if args.steps is not None and args.epochs is not None:
        raise UsageError("--steps and --epochs are exclusive")
    out = Path(args.out)
    kw = dict(epochs=args.epochs, subset=args.subset, progress=not args.no_progress, threads=args.threads)
    if args.task == "ablations":
        return _ablations(args, out, kw, ABLATIONS, train)
    if args.attention not in TASKS[args.task].attentions:
        raise UsageError(
            f"--attention for {args.task} must be one of {', '.join(TASKS[args.task].attentions)}, "
            f"got {args.attention!r}"
        )
    from particles.nn.checkpoint import checkpoint_files

    target = out / (args.name or f"{args.task}-{args.attention}")
    _refuse_existing(checkpoint_files(target), args.force)
    model, card = train(args.task, args.attention, seed=args.seed, steps=args.steps, lr=args.lr, **kw)
    card = save_checkpoint(model, card, target)
    print(f"{args.task}/{args.attention}: {_summary(card)} -> {out / card['file']}")
    return 0


def _refuse_existing(files, force: bool) -> None:
    """UsageError if one of ``files`` exists and --force was not given (checked before training)."""
    existing = [f for f in files if f.exists()]
    if existing and not force:
        raise UsageError(
            f"{existing[0]} already exists: pass --force to replace it, or --name / --out to write elsewhere"
        )


def _ablations(args, out: Path, kw: dict, variants, train) -> int:
    """Every variant × seed; OUT/ablations.json is rewritten after each run (partial results survive)."""
    _refuse_existing([out / "ablations.json"], args.force)
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    for variant in variants:
        runs = []
        for seed in args.seeds:
            _, card = train("digits-vit", variant, seed=seed, **kw)
            runs.append(
                dict(
                    seed=seed,
                    test_accuracy=card["metrics"]["test_accuracy"],
                    train_time_s=card["train_time_s"],
                )
            )
            print(f"{variant} seed {seed}: {_summary(card)}", flush=True)
            accs = [r["test_accuracy"] for r in runs]
            results[variant] = dict(
                attention=card["config"]["attention"],
                runs=runs,
                mean=statistics.mean(accs),
                sd=statistics.stdev(accs) if len(accs) > 1 else 0.0,
            )
            summary = dict(
                task="digits-vit",
                epochs=card["epochs"],
                seeds=args.seeds,
                results=results,
                machine=card["machine"],
            )
            (out / "ablations.json").write_text(json.dumps(summary, indent=1) + "\n")
    for variant, r in results.items():
        print(f"{variant:10s} {r['mean']:.4f} ± {r['sd']:.4f}")
    return 0


def _smollm2(args) -> int:
    """LoRA fine-tune of SmolLM2-135M: --attention krause (krausified) or softmax (the matched control);
    OUT/smollm2-ATTENTION-sSEED.pt + .json (an existing one is kept unless --force). Owner: llm."""
    from particles.nn.llm_train import DEFAULTS, train_smollm2

    if args.attention not in ("krause", "softmax"):
        raise UsageError(f"--attention for smollm2 must be krause or softmax, got {args.attention!r}")
    card = train_smollm2(
        args.attention,
        args.seed,
        steps=args.steps or DEFAULTS["steps"],
        out=args.out,
        threads=args.threads,
        progress=not args.no_progress,
        force=args.force,
    )
    m = card["metrics"]
    target = Path(args.out) / card["file"]
    print(f"smollm2/{args.attention} seed {args.seed}: held-out ppl {m['heldout_ppl']:.3f} -> {target}")
    return 0
