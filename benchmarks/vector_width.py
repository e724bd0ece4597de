"""256- against 512-bit vectors for the numba kernels, timed: python benchmarks/vector_width.py

Each case runs in a fresh process twice per round, once with ``KSYNC_VECTOR_BITS=256`` (LLVM's
default on Intel AVX-512 cores: ymm registers) and once with the package default (512-bit vectors
where the CPU has AVX-512, see particles/vectors.py), alternating over 3 rounds; each process
compiles (own numba cache directory per width), warms up, and reports its best time. Cases: one
dense velocity evaluation (n = 4096, one thread, CPU time of the thread) for SA and Krause, fp32 and
fp64, d = 3 and 4; and whole trajectories through simulate at 2 threads (wall time): the
2048 × 32 × 2 SA ensemble (100 steps, fp32 and fp64) and one n = 64, d = 3 system (500 steps).
Writes benchmarks/vector_width.json with the machine, the load average, and every measurement.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import json, sys, time
import numpy as np
case = json.loads(sys.argv[1])
import numba
from particles import make_interaction, simulate
from particles.kernels import velocity_field
from particles.vectors import vector_bits

def best(fn, repeats, clock):
    fn()
    times = []
    for _ in range(repeats):
        t0 = clock(); fn(); times.append(clock() - t0)
    return min(times)

rng = np.random.default_rng(0)
if case["kind"] == "step":
    numba.set_num_threads(1)
    x = rng.standard_normal((case["n"], case["d"]))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(case["dtype"])
    field = velocity_field(make_interaction(case["model"], **case["params"]), case["n"], case["d"],
                           case["dtype"])
    seconds = best(lambda: field(x), 7, time.thread_time)
else:
    shape = (case["samples"], case["n"], case["d"]) if case["samples"] else (case["n"], case["d"])
    x = rng.standard_normal(shape)
    x = (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(case["dtype"])
    run = dict(steps=case["steps"], dt=0.1, dtype=case["dtype"], **case["params"])
    seconds = best(lambda: simulate(case["model"], x, **run), 5, time.perf_counter)
print(json.dumps(dict(seconds=seconds, vector_bits=vector_bits())))
"""


def cases():
    out = []
    for model, params in (("sa", {"beta": 1.0}), ("krause", {"sigma": 1.0})):
        for dtype in ("float32", "float64"):
            for d in (3, 4):
                out.append(dict(kind="step", name=f"{model} dense step n=4096 d={d} {dtype} (1 thread)",
                                model=model, params=params, n=4096, d=d, dtype=dtype))
    for dtype in ("float64", "float32"):
        out.append(dict(kind="trajectory", name=f"SA ensemble 2048x32x2 {dtype}, 100 steps (2 threads)",
                        model="sa", params={"beta": 4.0}, samples=2048, n=32, d=2, steps=100, dtype=dtype))
    out.append(dict(kind="trajectory", name="SA n=64 d=3 float64, 500 steps (2 threads)", model="sa",
                    params={"beta": 1.0}, samples=None, n=64, d=3, steps=500, dtype="float64"))
    return out


def measure(case, bits, cache_dir):
    env = {k: v for k, v in os.environ.items() if k not in ("NUMBA_CPU_NAME", "NUMBA_CPU_FEATURES")}
    env.update(NUMBA_CACHE_DIR=cache_dir, KSYNC_VECTOR_BITS=str(bits), NUMBA_NUM_THREADS="2")
    out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(case)], capture_output=True, text=True,
                         check=True, env=env, cwd=Path(__file__).resolve().parent.parent)
    return json.loads(out.stdout.strip().splitlines()[-1])


def machine():
    info = Path("/proc/cpuinfo").read_text().splitlines()
    cpu = next((ln.split(":", 1)[1].strip() for ln in info if ln.startswith("model name")), "")
    flags = next((ln.split(":", 1)[1].split() for ln in info if ln.startswith("flags")), [])
    return dict(cpu=cpu, isa=[f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags],
                cpus=os.cpu_count())


def main(rounds=3) -> int:
    from tqdm.auto import tqdm

    res = dict(machine=machine(), date=time.strftime("%Y-%m-%d %H:%M"), rounds=rounds,
               loadavg_before=os.getloadavg()[0], cases=[])
    todo = cases()
    with tempfile.TemporaryDirectory() as tmp, tqdm(total=rounds * len(todo) * 2, desc="vector width") as bar:
        records = [dict(case=c["name"], seconds={}, vector_bits={}) for c in todo]
        for _ in range(rounds):
            for case, rec in zip(todo, records):
                for bits in (256, 512):
                    got = measure(case, bits, os.path.join(tmp, str(bits)))
                    rec["seconds"].setdefault(str(bits), []).append(got["seconds"])
                    rec["vector_bits"][str(bits)] = got["vector_bits"]
                    bar.update()
    for rec in records:
        rec["best_ms"] = {k: 1e3 * min(v) for k, v in rec["seconds"].items()}
        rec["speedup_512"] = rec["best_ms"]["256"] / rec["best_ms"]["512"]
    res.update(cases=records, loadavg_after=os.getloadavg()[0])
    path = Path(__file__).with_name("vector_width.json")
    path.write_text(json.dumps(res, indent=1) + "\n")
    for rec in records:
        ms = rec["best_ms"]
        print(f"{rec['case']:55s} 256-bit {ms['256']:8.2f} ms  512-bit {ms['512']:8.2f} ms  "
              f"× {rec['speedup_512']:.2f}")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
