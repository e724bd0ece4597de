"""`ksync compare`: per-layer metrics of extracted trajectories side by side (+ preset fits).

``-o`` follows the data-safety rules of ``particles.store`` (``--force`` replaces an earlier
comparison; nothing ksync did not write is ever replaced).
"""

from __future__ import annotations

from . import UsageError
from ._args import add_force, nonnegative_int, positive_float


def register(sub):
    p = sub.add_parser(
        "compare", help="compare per-layer clusters, collapse and sinks of extracted trajectories"
    )
    p.add_argument("trajectories", nargs="+", help=".nc/.zarr files written by `ksync extract`")
    p.add_argument("--names", nargs="+", help="one label per trajectory")
    p.add_argument("--eps", type=positive_float, default=0.5,
                   help="cluster distance on the unit sphere (default 0.5)")
    p.add_argument("--sink-eps", type=positive_float, default=0.3, help="ε of Sink_k^ε, > 0 (default 0.3)")
    p.add_argument("--sink-k", type=nonnegative_int, default=0,
                   help="key k of the sink score α_k behind the sink rate (default 0, the first token)")
    p.add_argument("--fit", action="store_true", help="fit SA(β) and Krause(σ) presets to each trajectory")
    p.add_argument("--quick", action="store_true", help="coarse fit grids")
    p.add_argument("-o", "--output", help="write the comparison Dataset (.nc or .zarr)")
    add_force(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from analysis.bridge import compare, fit_preset, format_table
    from analysis.bridge.data import load, save

    if args.names and len(args.names) != len(args.trajectories):
        raise UsageError(f"--names: expected {len(args.trajectories)} names, got {len(args.names)}")
    if args.output:
        from particles.store import check_output

        if not args.output.endswith((".nc", ".zarr")):
            raise UsageError(f"--output must end in .nc or .zarr, got {args.output!r}")
        check_output(args.output, kind="comparison", overwrite=args.force)  # refuse before computing
    dss = [load(p) for p in args.trajectories]
    names = args.names or _unique([_label(ds, p) for ds, p in zip(dss, args.trajectories)])
    cmp = compare(dict(zip(names, dss)), eps=args.eps, sink_eps=args.sink_eps, sink_k=args.sink_k)
    print(format_table(cmp))
    if args.fit:
        print()
        for name, ds in zip(names, dss):
            for preset in ("sa", "krause"):
                fit = fit_preset(ds, preset, eps=args.eps, quick=args.quick)
                edge = " (at the grid boundary)" if fit["at_boundary"] else ""
                value, res = fit["value"], fit["residual"]
                print(f"{name}: fitted {preset} {fit['param']} = {value:.3g}, residual {res:.3f}{edge}")
                cmp.attrs[f"fit_{name}_{preset}"] = (
                    f"{fit['param']}={fit['value']:.6g} residual={fit['residual']:.6g}"
                )
    if args.output:
        from particles.store import mark, prepare_output

        with prepare_output(args.output, overwrite=args.force, kind="comparison") as tmp:
            save(mark(cmp, "comparison"), tmp)
        print(f"wrote {args.output}")
    return 0


def _label(ds, path):
    from pathlib import Path

    a = ds.attrs
    kind = a.get("attention_kind", "")
    base = a.get("task") or Path(path).stem
    return f"{base}/{kind}" if kind else base


def _unique(names):
    seen, out = {}, []
    for n in names:
        seen[n] = seen.get(n, 0) + 1
        out.append(n if seen[n] == 1 else f"{n}#{seen[n]}")
    return out
