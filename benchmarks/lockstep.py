"""One system on the threads in lockstep against one thread, timed: python benchmarks/lockstep.py

For each case, simulate is timed twice in one process, the two calls interleaved round by round
(analysis.bench.interleaved_best_times): once with lockstep on every numba thread when the run
qualifies (particles.kernels.lockstep, with the symmetric tiles' higher threshold lowered to
LOCKSTEP_MIN_PAIRS, so that the n = 64 case shows why it is there) and once with lockstep switched
off (LOCKSTEP_MIN_ROWS raised, so the run takes its one-thread plan). The numbers of both runs are
checked to agree. Then two processes run the n = 64 case side by side, with and without lockstep,
and report their mean time per call (more threads than cores). Writes benchmarks/lockstep.json and
lockstep.md.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import time
from pathlib import Path

import numpy as np

from particles.kernels import LOCKSTEP_MIN_PAIRS_TILES as _TILES_DEFAULT

OUT = Path(__file__).resolve().parent

CASES = [  # (label, model, params, n, d, steps)
    ("SA d = 3", "sa", {"beta": 1.0}, 32, 3, 2000),
    ("SA d = 3", "sa", {"beta": 1.0}, 64, 3, 500),
    ("SA d = 3", "sa", {"beta": 1.0}, 128, 3, 200),
    ("SA d = 3", "sa", {"beta": 1.0}, 256, 3, 100),
    ("SA d = 3", "sa", {"beta": 1.0}, 400, 3, 50),
    ("SA d = 3", "sa", {"beta": 1.0}, 700, 3, 20),
    ("SA d = 3", "sa", {"beta": 1.0}, 1000, 3, 10),
    ("Krause top-k 8, d = 3", "krause", {"sigma": 0.5, "top_k": 8}, 64, 3, 300),
    ("Krause top-k 8, d = 3", "krause", {"sigma": 0.5, "top_k": 8}, 256, 3, 50),
    ("Krause top-k 8, d = 3", "krause", {"sigma": 0.5, "top_k": 8}, 700, 3, 10),
    ("SA d = 8 (range rows)", "sa", {"beta": 1.0}, 128, 8, 100),
]


def _switch(on: bool):
    import particles.kernels as kernels

    kernels.LOCKSTEP_MIN_ROWS = 24 if on else 10**9
    kernels.LOCKSTEP_MIN_PAIRS_TILES = kernels.LOCKSTEP_MIN_PAIRS if on else _TILES_DEFAULT


def measure(case, rounds=5):
    from analysis.bench import interleaved_best_times
    from particles import simulate

    label, model, params, n, d, steps = case
    x0 = np.random.default_rng(0).standard_normal((n, d))

    def run(on):
        _switch(on)
        try:
            return simulate(model, x0, steps=steps, dt=0.1, **params)
        finally:
            _switch(True)

    np.testing.assert_allclose(run(True).x.values, run(False).x.values, rtol=0, atol=1e-12)
    best = interleaved_best_times({"one": lambda: run(False), "lockstep": lambda: run(True)}, rounds=rounds,
                                  budget=4.0)
    return dict(case=label, model=model, n=n, d=d, steps=steps, one_thread_s=best["one"],
                lockstep_s=best["lockstep"], speedup=best["one"] / best["lockstep"])


def _side_by_side(on, calls, queue):
    from particles import simulate

    _switch(on)
    x0 = np.random.default_rng(0).standard_normal((64, 3))
    simulate("sa", x0, steps=500, dt=0.1, beta=1.0)
    start = time.perf_counter()
    for _ in range(calls):
        simulate("sa", x0, steps=500, dt=0.1, beta=1.0)
    queue.put((time.perf_counter() - start) / calls)


def side_by_side(processes=2, calls=100):
    out = {}
    for on in (False, True):
        queue = mp.get_context("spawn").Queue()
        procs = [mp.get_context("spawn").Process(target=_side_by_side, args=(on, calls, queue))
                 for _ in range(processes)]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        out["lockstep" if on else "one"] = float(np.mean([queue.get() for _ in procs]))
    return dict(processes=processes, calls=calls, mean_s=out)


def main():
    import numba

    from analysis.bench import machine_summary

    records = []
    for case in CASES:
        records.append(measure(case))
        r = records[-1]
        print(f"{r['case']} n={r['n']}: one thread {1e3 * r['one_thread_s']:.2f} ms, lockstep "
              f"{1e3 * r['lockstep_s']:.2f} ms, {r['speedup']:.2f}x", flush=True)
    crowd = side_by_side()
    print(f"2 processes side by side, n = 64: {crowd['mean_s']}")
    machine = machine_summary()
    data = dict(date=time.strftime("%Y-%m-%d %H:%M"), machine=machine, numba_threads=numba.get_num_threads(),
                cases=records, side_by_side=crowd)
    (OUT / "lockstep.json").write_text(json.dumps(data, indent=1))
    lines = [f"<!-- written by `python benchmarks/lockstep.py`, {data['date']} -->", "",
             f"Machine: {machine['cpu']} ({machine['isa']}), {machine['cores']} cores, 1-min load "
             f"{machine['load_average_1min']:.1f}; numba threads {data['numba_threads']}. One system "
             "through `simulate` (every step saved), lockstep on all threads against one thread, the "
             "two interleaved in one process; best of at least 5 rounds (wall).", "",
             "| case | n | steps | one thread [ms] | lockstep [ms] | speed-up |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    lines += [f"| {r['case']} | {r['n']} | {r['steps']} | {1e3 * r['one_thread_s']:.2f} | "
              f"{1e3 * r['lockstep_s']:.2f} | {r['speedup']:.2f} |" for r in records]
    m = crowd["mean_s"]
    lines += ["", f"Two processes running the n = 64 case side by side ({crowd['calls']} calls each, mean "
              f"per call): {1e3 * m['one']:.2f} ms with one thread each, {1e3 * m['lockstep']:.2f} ms "
              "with lockstep (more threads than cores: the waiting threads yield, and a run whose "
              "threads keep waiting finishes on thread 0 alone).", ""]
    (OUT / "lockstep.md").write_text("\n".join(lines))
    print(f"wrote {OUT / 'lockstep.json'} and {OUT / 'lockstep.md'}")


if __name__ == "__main__":
    main()
