"""`ksync simulate`: run particles.simulate and save the trajectory as netCDF or zarr.

The output follows the data-safety rules of ``particles.store``: an existing path that ksync did
not write is refused, one of ours is replaced only with ``--force``; it is written under a
temporary name and moved into place when complete.
"""

from __future__ import annotations

from . import UsageError
from ._args import (
    add_force,
    finite_float,
    load_npy,
    matrix,
    nonnegative_float,
    nonnegative_int,
    positive_float,
    positive_int,
)


def register(sub):
    p = sub.add_parser("simulate", help="simulate SA / USA / Krause / HK particle dynamics")
    p.add_argument("--model", required=True, choices=["sa", "usa", "krause", "hk"])
    p.add_argument("--x0", help="initial state, .npy of shape (n, d) or (sample, n, d)")
    p.add_argument("--n", type=positive_int)
    p.add_argument("--d", type=positive_int)
    p.add_argument("--samples", type=positive_int, help="ensemble size when x0 is drawn")
    p.add_argument("--steps", type=nonnegative_int, required=True)
    p.add_argument("--dt", type=positive_float, required=True)
    p.add_argument("--save-every", type=positive_int, default=1)
    p.add_argument("--seed", type=nonnegative_int, default=0)
    p.add_argument("--integrator", default="euler", choices=["euler", "rk4"])
    p.add_argument("--dtype", default="float64", choices=["float32", "float64"])
    p.add_argument("--beta", type=finite_float)
    p.add_argument("--sigma", type=positive_float)
    p.add_argument("--radius", type=nonnegative_float)
    p.add_argument("--window", type=positive_int)
    p.add_argument("--causal", action="store_true")
    p.add_argument("--top-k", type=positive_int)
    p.add_argument("--noise", type=nonnegative_float, default=0.0)
    p.add_argument("--geometry", choices=["sphere", "euclidean"])
    for name in ("Q", "K", "V"):
        p.add_argument(f"--{name}", type=matrix, help=f"{name} as JSON nested lists or a .npy file")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("-o", "--output", required=True, help="output path, .nc (netCDF) or .zarr")
    add_force(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from particles import simulate
    from particles.store import check_output, write_dataset

    if not args.output.endswith((".nc", ".zarr")):
        raise UsageError(f"--output must end in .nc or .zarr, got {args.output!r}")
    check_output(args.output, kind="trajectory", overwrite=args.force)  # refuse before computing
    params = {k: getattr(args, k) for k in ("beta", "sigma", "radius", "window", "top_k", "Q", "K", "V",
                                            "geometry") if getattr(args, k) is not None}
    x0 = load_npy(args.x0, "--x0") if args.x0 else None
    ds = simulate(args.model, x0, n=args.n, d=args.d, samples=args.samples, steps=args.steps, dt=args.dt,
                  save_every=args.save_every, seed=args.seed, integrator=args.integrator, dtype=args.dtype,
                  noise=args.noise, causal=args.causal, progress=not args.no_progress, **params)
    write_dataset(ds, args.output, kind="trajectory", overwrite=args.force)
    print(f"wrote {args.output}: x{tuple(ds['x'].shape)} dims {ds['x'].dims}")
    return 0
