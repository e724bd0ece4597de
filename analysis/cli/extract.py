"""`ksync extract`: token trajectories (and attention) of a checkpoint or a local Hugging Face model."""

from __future__ import annotations

from pathlib import Path

from . import UsageError


def register(sub):
    p = sub.add_parser("extract", help="extract per-layer tokens and attention of a trained model as netCDF")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="our checkpoint (NAME, NAME.pt or NAME.json)")
    src.add_argument("--hf", metavar="DIR", help="local Hugging Face model directory (offline)")
    p.add_argument(
        "--input",
        help=".npy inputs: images (B, 8, 8) or token ids (B, T) (default: the task's held-out examples)",
    )
    p.add_argument("--samples", type=int, default=16, help="number of held-out examples (default 16)")
    p.add_argument("--text", action="append", help="text for --hf (repeat for a batch; padded)")
    p.add_argument("--ids", help="comma-separated token ids for --hf, instead of --text")
    p.add_argument("--representation", choices=["residual", "normalised"], default="residual")
    p.add_argument("--reduce", action="store_true", help="keep per-layer attention metrics, not the T×T maps")
    p.add_argument("--sink-k", type=int, default=0, help="key k of the stored sink score (with --reduce)")
    p.add_argument("--no-attention", action="store_true", help="hidden states only")
    p.add_argument("-o", "--output", required=True, help="output .nc or .zarr")
    p.set_defaults(func=run)


def run(args) -> int:
    from analysis.bridge import extract
    from analysis.bridge.data import save, task_inputs

    if not args.output.endswith((".nc", ".zarr")):
        raise UsageError(f"--output must end in .nc or .zarr, got {args.output!r}")
    if args.samples < 1:
        raise UsageError(f"--samples must be >= 1, got {args.samples}")
    kw = dict(
        representation=args.representation,
        reduce=args.reduce or None,
        sink_k=args.sink_k,
        attention=not args.no_attention,
    )
    if args.checkpoint:
        import numpy as np
        import torch

        from particles.nn import load_checkpoint

        model = load_checkpoint(args.checkpoint)
        labels = None
        if args.input:
            if not Path(args.input).exists():
                raise FileNotFoundError(f"--input {args.input} not found")
            inputs = torch.from_numpy(np.load(args.input))
        else:
            task = model.card.get("task")
            if not task:
                raise UsageError("the checkpoint card names no task: pass --input FILE.npy")
            inputs, labels = task_inputs(task, args.samples)
        ds = extract(model, inputs, labels=labels, **kw)
        ds.attrs["checkpoint_path"] = str(args.checkpoint)
    else:
        from analysis.bridge import load_hf

        if not args.text and not args.ids:
            raise UsageError("--hf needs --text or --ids")
        model, tokenizer = load_hf(args.hf, attn_implementation="eager")
        if args.ids:
            try:
                inputs = [int(t) for t in args.ids.split(",")]
            except ValueError:
                raise UsageError(f"--ids must be comma-separated integers, got {args.ids!r}") from None
        else:
            if tokenizer is None:
                raise UsageError(f"{args.hf} has no tokenizer: pass --ids")
            inputs = args.text if len(args.text) > 1 else args.text[0]
        ds = extract(model, inputs, tokenizer=tokenizer, **kw)
    path = save(ds, args.output)
    print(
        f"wrote {path}: x {dict(ds['x'].sizes)}"
        + (f", attention {dict(ds['attention'].sizes)}" if "attention" in ds else "")
    )
    return 0
