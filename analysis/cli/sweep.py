"""`ksync sweep SPEC.toml -o results.zarr`: a resumable parameter sweep (see analysis.sweeps)."""

from __future__ import annotations

from pathlib import Path

from . import UsageError


def _positive_int(text):
    import argparse

    try:
        value = int(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from err
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def register(sub):
    p = sub.add_parser("sweep", help="run a parameter sweep on dask.distributed (resumable zarr store)",
                       description="Run the sweep described by SPEC.toml (format: the docstring of "
                                   "analysis.sweeps, or examples/sweep_*.toml). Rerunning the same "
                                   "command resumes an interrupted sweep.")
    p.add_argument("spec", metavar="SPEC.toml", help="sweep specification (TOML)")
    p.add_argument("-o", "--output", required=True, help="zarr store for the results, e.g. results.zarr")
    p.add_argument("--scheduler", help="address of a running dask scheduler (tcp://host:port), or 'sync' "
                                       "to run in this process; default: start a LocalCluster")
    p.add_argument("--workers", type=_positive_int, help="worker processes of the LocalCluster "
                                                         "(default: min(#CPUs, #points))")
    p.add_argument("--connect-timeout", type=float, default=10.0, metavar="SECONDS",
                   help="how long to wait for --scheduler to answer as a dask scheduler (default: 10)")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar and no dask dashboard link on stderr")
    p.set_defaults(func=run)


def run(args) -> int:
    from analysis.sweeps import SweepError, load_spec, make_plan, sweep
    from analysis.sweeps.store import SweepStore

    if args.workers is not None and args.scheduler is not None:
        raise UsageError("--workers only applies to the LocalCluster started without --scheduler")
    if not 0 < args.connect_timeout < float("inf"):
        raise UsageError(f"--connect-timeout must be a number of seconds > 0, got {args.connect_timeout}")
    out = Path(args.output)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--output {args.output!r} exists and is not a directory (zarr store)")
    spec = load_spec(args.spec)
    plan = make_plan(**spec)
    total = len(list(plan.points()))
    if out.exists():  # read-only look: sweep() below refuses foreign paths and checks the spec
        try:
            store = SweepStore.open(out)
            if store.spec == plan.spec():
                print(f"{args.output}: {len(store.done())} of {total} points already done, resuming",
                      flush=True)
        except (ValueError, OSError):
            pass
    try:
        ds = sweep(**spec, store=args.output, scheduler=args.scheduler, workers=args.workers,
                   connect_timeout=args.connect_timeout, progress=not args.no_progress)
    except SweepError as err:
        raise SweepError(f"{err}; finished points are kept in {args.output}") from err
    shapes = ", ".join(f"{name}{tuple(ds[name].dims)}" for name in ds.data_vars)
    print(f"wrote {args.output}: {total} points; {shapes}")
    return 0
