"""`ksync simulate`: run particles.simulate and save the trajectory as netCDF or zarr.

The flags are made from the one description of simulate's parameters, ``particles.params.PARAMS``
(name, kind, default, help text, validator): every run and interaction parameter is a flag
(``top_k`` → ``--top-k``), shown with its help text and default, and checked by the same validator
as ``simulate`` itself while the command line is parsed.

The output follows the data-safety rules of ``particles.store``: an existing path that ksync did
not write is refused, one of ours is replaced only with ``--force``; it is written under a
temporary name and moved into place when complete (a ``.zarr`` output is streamed to disk step by
step, like ``simulate(store=...)``).
"""

from __future__ import annotations

import argparse

from . import UsageError
from ._args import add_force, load_npy, matrix

#: parameters that are not flags: the output group has -o, --force and --no-progress instead
OMITTED_GROUPS = ("output",)
REQUIRED = ("steps", "dt")


def _parser_for(param):
    """An argparse type: the text read as ``param.kind``, then ``param``'s own validator."""
    read = {"int": int, "seed": int, "float": float, "matrix": matrix}.get(param.kind, str)

    def parse(text):
        try:
            return param.validate(read(text))
        except (TypeError, ValueError) as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    parse.__name__ = param.kind  # argparse names the type in "invalid <type> value"
    return parse


def _help(param) -> str:
    text = param.help + (", as JSON nested lists or a .npy file" if param.kind == "matrix" else "")
    if param.models:
        text += f"; models {', '.join(param.models)}"
    if param.name in REQUIRED:
        return text
    return text + (f" (default: {param.default})" if param.default is not None else " (default: off)")


def register(sub):
    from particles import MODELS
    from particles.params import PARAMS

    p = sub.add_parser("simulate", help="simulate SA / USA / Krause / HK particle dynamics",
                       description="Integrate one of the preset particle models and save the trajectory.")
    p.add_argument("--model", required=True, choices=list(MODELS), help="the preset interaction")
    p.add_argument("--x0", help="initial state, .npy of shape (n, d) or (sample, n, d) (default: drawn)")
    for name, param in PARAMS.items():
        if param.group in OMITTED_GROUPS:
            continue
        flag = "--" + name.replace("_", "-")
        if param.kind == "bool":
            p.add_argument(flag, action="store_true", help=_help(param))
        elif param.choices is not None:
            p.add_argument(flag, choices=[c for c in param.choices if c is not None], help=_help(param))
        else:
            p.add_argument(flag, type=_parser_for(param), required=name in REQUIRED,
                           metavar=name.upper() if param.kind != "matrix" else "JSON|NPY", help=_help(param))
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument("-o", "--output", required=True, help="output path, .nc (netCDF) or .zarr")
    add_force(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from particles import simulate
    from particles.params import PARAMS
    from particles.store import check_output, write_dataset

    if not args.output.endswith((".nc", ".zarr")):
        raise UsageError(f"--output must end in .nc or .zarr, got {args.output!r}")
    check_output(args.output, kind="trajectory", overwrite=args.force)  # refuse before computing
    given = {name: getattr(args, name) for name, param in PARAMS.items()
             if param.group not in OMITTED_GROUPS and getattr(args, name) not in (None, False)}
    x0 = load_npy(args.x0, "--x0") if args.x0 else None
    if args.output.endswith(".zarr"):  # streamed: saved steps go to disk as they are computed
        ds = simulate(args.model, x0, progress=not args.no_progress, store=args.output, overwrite=args.force,
                      **given)
    else:
        ds = simulate(args.model, x0, progress=not args.no_progress, **given)
        write_dataset(ds, args.output, kind="trajectory", overwrite=args.force)
    print(f"wrote {args.output}: x{tuple(ds['x'].shape)} dims {ds['x'].dims}")
    return 0
