"""``ksync bench [--quick] [--json FILE] [--figure PNG]``: kernel timings against the strongest baselines;
``ksync bench --headdim [--quick] [--json FILE] [--markdown FILE]``: the head-dimension section (the
simulate step of our kernels against the SDPA step, d = 3…128, and the measured dispatch)."""

from __future__ import annotations

import json
import os
import time

from ._args import positive_int


def register(subparsers):
    p = subparsers.add_parser("bench", help="time the kernels against numpy and torch baselines",
                              description="Time one velocity evaluation (one Euler step) per case for "
                                          "our kernels, numpy and torch CPU, in the same process.")
    p.add_argument("--quick", action="store_true", help="small sizes, few repeats (a smoke run)")
    p.add_argument("--json", metavar="FILE", help="write the results (and the machine) as JSON")
    p.add_argument("--figure", metavar="PNG",
                   help="also measure scaling with n and write the log-log figure (PNG + PDF + .nc "
                        "data next to it); default figures/scaling.png for a full run")
    p.add_argument("--no-figure", action="store_true", help="skip the scaling measurement")
    p.add_argument("--repeats", type=positive_int, default=None,
                   help="repeats per timing, >= 1 (best is kept; default 5, --quick 2)")
    p.add_argument("--headdim", action="store_true",
                   help="run the head-dimension section instead: one simulate step of our kernels vs the "
                        "same step on torch's scaled_dot_product_attention, d = 3..128, n = 256..16384 "
                        "(about 90 minutes at 1 thread; --targets: about 30)")
    p.add_argument("--targets", action="store_true",
                   help="with --headdim: only the target grid, n = 4096 and 16384 at d = 3, 4, 16, 32, 64, "
                        "128 (general Q, K, V at n = 4096), without the crossover sizes")
    p.add_argument("--ensembles", action="store_true",
                   help="run the ensemble section instead: whole trajectories of many small systems "
                        "(2048 x 32 on the circle, fp64 and fp32; n = 64 for 500 steps; 1-D HK with 1e6 "
                        "agents) through simulate against batched torch and numpy loops (a few minutes)")
    p.add_argument("--markdown", metavar="FILE",
                   help="with --headdim, --ensembles or --device: also write the tables as markdown")
    p.add_argument("--device", metavar="DEVICE",
                   help="run the device section instead: the torch backend's step against the SDPA step "
                        "on DEVICE (cuda, or cpu for a smoke run), dense n up to 1e5")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="torch and numba threads (default: all cores)")
    p.add_argument("--cpu-time", action="store_true",
                   help="with --headdim and --threads 1: time by the CPU time of the calling thread, which "
                        "does all the work then (robust on a loaded machine: time descheduled is not "
                        "counted, nor other threads spinning)")
    p.set_defaults(func=run)


def run(args) -> int:
    import numba
    import torch

    from analysis import bench
    threads = args.threads or os.cpu_count() or 1
    if args.cpu_time and threads != 1:
        raise ValueError("--cpu-time needs --threads 1 (it times the calling thread only)")
    torch.set_num_threads(threads)
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    if args.threads:  # numpy's and scipy's OpenBLAS too (their idle threads spin for ~0.1 s)
        import threadpoolctl

        threadpoolctl.threadpool_limits(threads)
    for flag in ("json", "markdown"):  # --figure (or its default) is checked where it is used
        if getattr(args, flag):
            refuse_foreign(getattr(args, flag), f"--{flag}")
    repeats = args.repeats or (2 if args.quick else 5)
    if repeats < 1:
        raise ValueError("--repeats must be >= 1")
    budget = 0.5 if args.quick else 3.0
    start = time.time()
    if args.headdim:
        return run_headdim(args, bench, repeats, budget, start)
    if args.device:
        return run_device(args, bench, repeats, budget)
    if args.ensembles:
        return run_ensembles(args, bench, repeats, budget, start)
    cases = bench.cases(quick=args.quick)
    figure = args.figure or (None if args.quick else os.path.join("figures", "scaling.png"))
    figure = None if args.no_figure else figure
    if figure:
        refuse_foreign(figure, "--figure")
    # all of our kernels first, then every baseline (torch's spinning OpenMP threads would
    # otherwise slow down the numba threads measured right after them, and vice versa)
    # a full run measures everything in two rounds and keeps each case's best: on a shared machine
    # one round can land on a busy second (both rounds' times are in the JSON)
    rounds = 1 if args.quick else 2
    records = [None] * len(cases)
    for r in range(rounds):
        for i, case in enumerate(cases):
            rec = bench.run_case(case, repeats=repeats, budget=budget, baselines=False)
            records[i] = bench.keep_best(records[i], rec)
            print(f"  measured ours (round {r + 1}): {case.name} (n={case.n})", flush=True)
    rows = bench.scaling_rows("ours", args.quick, max(2, repeats // 2), budget / 2) if figure else []
    time.sleep(1.0)
    for r in range(rounds):
        for case, rec in zip(cases, records):
            bench.add_baselines(rec, case, repeats=repeats, budget=budget)
            print(f"  measured baselines (round {r + 1}): {case.name}", flush=True)
    bench.compare_window_dense(records)
    print(bench.format_table(records))
    machine = bench.machine_summary()
    print_machine(machine)
    scaling = None
    if figure:
        rows += bench.scaling_rows("baselines", args.quick, max(2, repeats // 2), budget / 2)
        ds = bench.scaling_dataset(rows)
        os.makedirs(os.path.dirname(figure) or ".", exist_ok=True)
        from particles.conventions import encode

        encode(ds).to_netcdf(os.path.splitext(figure)[0] + ".nc")
        bench.plot_scaling(ds, figure)
        t = ds.seconds_per_step
        scaling = {str(s): {int(n): float(v) for n, v in zip(ds.n.values, t.sel(series=s).values) if v == v}
                   for s in ds.series.values}
        print(f"scaling figure: {figure} (windowed top-k log-log slope "
              f"{ds.attrs['windowed_loglog_slope']:.2f})")
    if args.json:
        write_json(args.json, start, machine=machine, quick=bool(args.quick), repeats=repeats, cases=records,
                   scaling=scaling)
        print(f"wrote {args.json}")
    return 0


def write_json(path: str, start: float | None, **fields) -> None:
    """``fields`` as the JSON file ``path`` (folders created), with the run's start and duration when
    ``start`` (a time.time()) is given."""
    if start is not None:
        fields.update(started=time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(start)),
                      seconds=time.time() - start)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as fh:
        json.dump(fields, fh, indent=1, default=float)


def written_by_bench(path: str) -> bool:
    """Whether the file at ``path`` is one that ``ksync bench`` writes (its JSON, markdown or figure)."""
    try:
        if path.endswith(".json"):
            with open(path) as fh:
                return "cases" in json.load(fh)
        if path.endswith(".md"):
            with open(path) as fh:
                return "written by `ksync bench" in fh.read(4096)
        if path.endswith(".nc"):
            import xarray as xr

            with xr.open_dataset(path) as ds:
                return "windowed_loglog_slope" in ds.attrs
    except (OSError, ValueError, UnicodeDecodeError):
        return False
    return False


def refuse_foreign(path: str, flag: str) -> None:
    """FileExistsError unless ``path`` (for --figure: its PNG, PDF and .nc) is absent or ours to replace."""
    stem = os.path.splitext(path)[0]
    paths = [stem + e for e in (".png", ".pdf", ".nc")] if flag == "--figure" else [path]
    if not any(os.path.exists(p) for p in paths):
        return
    mark = stem + ".nc" if flag == "--figure" else path
    if not (os.path.isfile(mark) and written_by_bench(mark)):
        raise FileExistsError(f"{flag}: {path!r} exists and was not written by ksync bench; "
                              "choose another name or move it away (it is never replaced)")


def run_ensembles(args, bench, repeats, budget, start) -> int:
    records = bench.run_ensembles(args.quick, repeats=repeats, budget=budget)
    machine = bench.machine_summary()
    print_machine(machine)
    command = " ".join(["ksync bench --ensembles"] + ["--quick"] * args.quick)
    if args.json:
        write_json(args.json, start, machine=machine, quick=bool(args.quick), repeats=repeats,
                   command=command, cases=records)
        print(f"wrote {args.json}")
    if args.markdown:
        with open(args.markdown, "w") as fh:
            fh.write(f"<!-- written by `{command}`, {time.strftime('%Y-%m-%d %H:%M')} -->\n\n"
                     f"Machine: {machine['cpu']} ({machine['isa']}), {machine['cores']} cores, 1-min load "
                     f"{machine['load_average_1min']:.1f}; numba {machine.get('numba_vector_bits', '?')}-bit "
                     f"vectors, numpy {machine.get('numpy_simd', '?')}, torch "
                     f"{machine.get('torch_cpu_capability', '?')}. Times: best of at least {repeats} "
                     "interleaved rounds (wall; each round times ours and every baseline once, fast ones "
                     "until 0.25 s, after a 20 ms pause).\n\n"
                     + bench.ensemble_table(records) + "\n")
        print(f"wrote {args.markdown}")
    return 0


def print_machine(machine):
    print(f"machine: {machine['cpu']} ({machine['isa']}), {machine['cores']} cores, load "
          f"{machine['load_average_1min']:.1f}; threads numba {machine['numba_threads']} torch "
          f"{machine['torch_threads']}; numba {machine['numba']} "
          f"({machine.get('numba_vector_bits', '?')}-bit vectors), numpy {machine['numpy']} "
          f"({machine.get('numpy_simd', '?')}), torch {machine['torch']} "
          f"({machine.get('torch_cpu_capability', '?')}), headdim BLAS {machine['headdim_blas']}")


def run_headdim(args, bench, repeats, budget, start) -> int:
    cases = bench.headdim_cases(quick=args.quick, targets=args.targets)
    rounds = 1 if args.quick else 3
    clock = time.thread_time if args.cpu_time else time.perf_counter
    clock_name = "CPU time of the calling thread (1 thread)" if args.cpu_time else "wall time"
    command = " ".join(["ksync bench --headdim"] + ["--quick"] * args.quick + ["--targets"] * args.targets
                       + ["--cpu-time"] * args.cpu_time
                       + ([f"--threads {args.threads}"] if args.threads else []))

    def write(records, final=False):
        machine = bench.machine_summary()
        if args.json:
            write_json(args.json, start, machine=machine, quick=bool(args.quick), rounds=rounds,
                       complete=final, clock=clock_name, command=command, cases=records)
        if args.markdown:
            with open(args.markdown, "w") as fh:
                fh.write(bench.headdim_markdown(records, machine, command=command, clock=clock_name))
        return machine

    records = bench.run_headdim(cases, rounds=rounds, repeats=min(repeats, 3), budget=budget / 2, clock=clock,
                                on_record=write if (args.json or args.markdown) else None)
    machine = write(records, final=True)
    print(bench.headdim_table(records))
    print(bench.crossover_markdown(records))
    print_machine(machine)
    for path in (args.json, args.markdown):
        if path:
            print(f"wrote {path}")
    return 0


def run_device(args, bench, repeats, budget) -> int:
    import torch

    from particles.backends.torch import resolve_device

    dev = resolve_device(args.device)  # a clear error when the device is absent
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else bench.machine_summary()["cpu"]
    records = []
    for model, params, dtype, n, d in bench.device_cases(quick=args.quick):
        try:
            records.append(bench.run_device_case(model, params, dtype, n, d, args.device, repeats=repeats,
                                                 budget=min(budget, 1.0)))
        except torch.OutOfMemoryError as err:  # recorded, the rest still runs
            records.append(dict(model=model, params=params, dtype=dtype, n=n, d=d, error=str(err)[:200]))
            torch.cuda.empty_cache()
            continue
        print(f"  {model} {params or ''} {dtype} n={n} d={d}: {1e3 * records[-1]['ours_s']:.2f} ms",
              flush=True)
    done = [r for r in records if "error" not in r]
    table = bench.device_markdown(done, name)
    print(table)
    if args.json:
        write_json(args.json, None, device=name, torch=torch.__version__, cases=records)
    if args.markdown:
        with open(args.markdown, "w") as fh:
            fh.write(table + "\n")
    return 0
