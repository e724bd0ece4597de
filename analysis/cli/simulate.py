"""`ksync simulate`: run particles.simulate and save the trajectory as netCDF or zarr."""

from __future__ import annotations

import argparse
import json

import numpy as np

from . import UsageError


def _matrix(text):
    """A d×d matrix given as JSON nested lists or a .npy file."""
    try:
        if text.endswith(".npy"):
            return np.load(text)
        return np.asarray(json.loads(text), dtype=float)
    except (OSError, json.JSONDecodeError, ValueError) as err:
        raise argparse.ArgumentTypeError(
            f"expected JSON nested lists or a readable .npy file: {err}") from err


def register(sub):
    p = sub.add_parser("simulate", help="simulate SA / USA / Krause / HK particle dynamics")
    p.add_argument("--model", required=True, choices=["sa", "usa", "krause", "hk"])
    p.add_argument("--x0", help="initial state, .npy of shape (n, d) or (sample, n, d)")
    p.add_argument("--n", type=int)
    p.add_argument("--d", type=int)
    p.add_argument("--samples", type=int, help="ensemble size when x0 is drawn")
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--dt", type=float, required=True)
    p.add_argument("--save-every", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--integrator", default="euler", choices=["euler", "rk4"])
    p.add_argument("--dtype", default="float64", choices=["float32", "float64"])
    p.add_argument("--beta", type=float)
    p.add_argument("--sigma", type=float)
    p.add_argument("--radius", type=float)
    p.add_argument("--window", type=int)
    p.add_argument("--causal", action="store_true")
    p.add_argument("--top-k", type=int)
    p.add_argument("--noise", type=float, default=0.0)
    p.add_argument("--geometry", choices=["sphere", "euclidean"])
    for name in ("Q", "K", "V"):
        p.add_argument(f"--{name}", type=_matrix, help=f"{name} as JSON nested lists or a .npy file")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("-o", "--output", required=True, help="output path, .nc (netCDF) or .zarr")
    p.set_defaults(func=run)


def run(args) -> int:
    from particles import simulate

    if not args.output.endswith((".nc", ".zarr")):
        raise UsageError(f"--output must end in .nc or .zarr, got {args.output!r}")
    params = {k: getattr(args, k) for k in ("beta", "sigma", "radius", "window", "top_k", "Q", "K", "V",
                                            "geometry") if getattr(args, k) is not None}
    x0 = np.load(args.x0) if args.x0 else None
    ds = simulate(args.model, x0, n=args.n, d=args.d, samples=args.samples, steps=args.steps, dt=args.dt,
                  save_every=args.save_every, seed=args.seed, integrator=args.integrator, dtype=args.dtype,
                  noise=args.noise, causal=args.causal, progress=not args.no_progress, **params)
    if args.output.endswith(".zarr"):
        ds.to_zarr(args.output, mode="w")
    else:
        ds.to_netcdf(args.output)
    print(f"wrote {args.output}: x{tuple(ds['x'].shape)} dims {ds['x'].dims}")
    return 0
