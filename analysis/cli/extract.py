"""`ksync extract`: token trajectories (and attention) of a checkpoint or a local Hugging Face model.

The output follows the data-safety rules of ``particles.store`` (refuses paths ksync did not
write, ``--force`` replaces an earlier extraction, temporary name then moved into place).
"""

from __future__ import annotations

import numpy as np

from . import UsageError
from ._args import add_force, load_npy, nonnegative_int, positive_int


def register(sub):
    p = sub.add_parser("extract", help="extract per-layer tokens and attention of a trained model as netCDF")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="our checkpoint (NAME, NAME.pt or NAME.json)")
    src.add_argument("--hf", metavar="DIR", help="local Hugging Face model directory (offline)")
    p.add_argument(
        "--input",
        help=".npy inputs: images (B, 8, 8) or token ids (B, T) (default: the task's held-out examples)",
    )
    p.add_argument("--samples", type=positive_int, default=16,
                   help="number of held-out examples (default 16)")
    p.add_argument("--text", action="append", help="text for --hf (repeat for a batch; padded)")
    p.add_argument("--ids", help="comma-separated token ids for --hf, instead of --text")
    p.add_argument("--representation", choices=["residual", "normalised"], default="residual",
                   help="residual: the residual stream; normalised: the LayerNorm output each attention "
                        "reads (default: residual)")
    p.add_argument("--reduce", action="store_true", help="keep per-layer attention metrics, not the T×T maps")
    p.add_argument("--sink-k", type=nonnegative_int, default=0,
                   help="key k of the stored sink score α_k (with --reduce; default 0, the first token)")
    p.add_argument("--no-attention", action="store_true", help="hidden states only")
    p.add_argument("--batch-size", type=positive_int, default=8,
                   help="inputs per forward pass; the progress bar counts them (default 8)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.add_argument("-o", "--output", required=True, help="output .nc or .zarr")
    add_force(p)
    p.set_defaults(func=run)


def check_inputs(arr: np.ndarray, config: dict) -> np.ndarray:
    """``arr`` checked against the model of a checkpoint ``config`` (ValueError naming --input):
    vit: images (B, S, S) (or (B, S·S)) of finite numbers, S = image_size; causal_lm: integer token
    ids (B, T) with 1 <= T <= seq_len and 0 <= id < vocab_size."""
    kind = config.get("model")
    if kind == "vit":
        size = int(config.get("image_size", 8))
        if arr.ndim not in (2, 3) or arr.shape[1:] not in ((size, size), (size * size,)) or not len(arr):
            raise ValueError(f"--input: this checkpoint reads images of shape (B, {size}, {size}), "
                             f"got shape {arr.shape}")
        if not np.all(np.isfinite(arr)):
            raise ValueError("--input: the images contain NaN or inf")
        return arr.astype(np.float32)
    if kind == "causal_lm":
        vocab, seq_len = int(config["vocab_size"]), int(config["seq_len"])
        if arr.ndim != 2 or not 1 <= arr.shape[1] <= seq_len or not len(arr):
            raise ValueError(f"--input: this checkpoint reads token ids of shape (B, T) with "
                             f"1 <= T <= {seq_len}, got shape {arr.shape}")
        if arr.dtype.kind == "f" and not np.all(np.isfinite(arr) & (arr == np.round(arr))):
            raise ValueError("--input: token ids must be integers")
        if arr.min() < 0 or arr.max() >= vocab:
            raise ValueError(f"--input: token ids must lie in 0..{vocab - 1}, got {arr.min()}..{arr.max()}")
        return arr.astype(np.int64)
    raise ValueError(f"--input: unknown model kind {kind!r} in the checkpoint card")


def run(args) -> int:
    from analysis.bridge import extract
    from analysis.bridge.data import save, task_inputs

    if not args.output.endswith((".nc", ".zarr")):
        raise UsageError(f"--output must end in .nc or .zarr, got {args.output!r}")
    from particles.store import check_output, mark, prepare_output

    check_output(args.output, kind="extraction", overwrite=args.force)  # refuse before computing
    kw = dict(
        representation=args.representation,
        reduce=args.reduce or None,
        sink_k=args.sink_k,
        attention=not args.no_attention,
        batch_size=args.batch_size,
        progress=not args.no_progress,
    )
    if args.checkpoint:
        import torch

        from particles.nn import load_checkpoint

        model = load_checkpoint(args.checkpoint)
        labels = None
        if args.input:
            inputs = torch.from_numpy(check_inputs(load_npy(args.input, "--input"), model.config))
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
    with prepare_output(args.output, overwrite=args.force, kind="extraction") as tmp:
        save(mark(ds, "extraction"), tmp)
    print(
        f"wrote {args.output}: x {dict(ds['x'].sizes)}"
        + (f", attention {dict(ds['attention'].sizes)}" if "attention" in ds else "")
    )
    return 0
