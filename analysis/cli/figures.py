"""`ksync figures`: make the registered figures (PNG, PDF and a netCDF file of the plotted data)."""

from __future__ import annotations

import time

from . import UsageError


def register(sub):
    p = sub.add_parser("figures", help="make the figures: <out>/<name>.png, .pdf and .nc (plotted data)")
    p.add_argument("--quick", action="store_true",
                   help="small, fast versions (about 2.5 minutes in all on 2 cores)")
    p.add_argument("--out", default="figures", help="output folder (default: figures)")
    p.add_argument("--only", nargs="+", metavar="NAME", help="make only these figures")
    p.add_argument("--list", action="store_true", help="list the figures and exit")
    p.add_argument("--scheduler", default="sync",
                   help="where the parameter sweeps run: 'sync' (this process, default), 'local' "
                        "(a local dask cluster) or a dask scheduler address")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args) -> int:
    import matplotlib

    matplotlib.use("Agg")  # files only; the library itself leaves the backend to the user (notebooks)
    from analysis import figures
    from analysis.figures import _common

    if args.list:
        for name, entry in figures.FIGURES.items():
            print(f"{name:28s} {entry.description}")
        return 0
    try:
        names = figures.select(args.only)
    except ValueError as err:
        raise UsageError(str(err)) from err
    _common.SCHEDULER = None if args.scheduler == "local" else args.scheduler
    start = time.perf_counter()
    results = figures.make_all(names, quick=args.quick, out=args.out, progress=not args.no_progress)
    for name, ds in results.items():
        print(f"{name:28s} {ds.attrs['seconds']:7.1f} s  -> {args.out}/{name}.png, .pdf, .nc")
    print(f"{len(results)} figure(s) in {time.perf_counter() - start:.1f} s")
    return 0
