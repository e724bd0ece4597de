"""Explicit vectors (kernels/simd.py) against the loop vectoriser: python benchmarks/explicit_simd.py

Two experiments for issue 20, one thread unless stated:

A. One system, n = 32…512, d = 3, one velocity evaluation of SA on the unit sphere (β = 1). The
   fused row kernel as the loop vectoriser compiles it (each ordered pair, n² exps), against two
   symmetric kernels written with the explicit vectors, each w_ij = 2^(β·log2(e)·(⟨x_i, x_j⟩ − 1))
   computed once: the first experiment, 8 × 8 blocks with row i's sums in registers and block J's
   column sums in memory, and the square tiles that `simulate` runs (particles/kernels/tiles.py:
   both sides' sums in registers, a transpose per tile; pad, two shares and the finish included).
   `--single` runs only this part and prints its table.
B. Ensembles through simulate (20 Euler steps, every 20th saved, 2 threads): the SYMMETRIC_LANES
   tiles, which are now written with the explicit vectors, against the LANES tiles (both rows of
   each pair scored separately; the plan that d = 3, 4 took before).

Times are the best of interleaved rounds. The results are checked to agree. Writes
benchmarks/explicit_simd.json and explicit_simd.md.
"""

from __future__ import annotations

import json
import time
from functools import partial
from pathlib import Path

import numpy as np
from numba import njit

from particles.kernels import tiles, trajectory, velocity_field
from particles.kernels.fastexp import LOG2E, exp2_sat
from particles.kernels.rows import FASTMATH
from particles.kernels.simd import vadd, vexp2, vfma, vload, vmul, vsplat, vstore

OUT = Path(__file__).resolve().parent
W = 8  # float64 lanes


@njit(fastmath=FASTMATH)
def rows_auto(xT, b, v):
    """v_i = Σ_j w_ij x_j / Σ_j w_ij row by row; the key loop vectorised by LLVM."""
    n = xT.shape[1]
    for i in range(n):
        q0, q1, q2 = b * xT[0, i], b * xT[1, i], b * xT[2, i]
        tot = a0 = a1 = a2 = 0.0
        for t in range(n):
            w = exp2_sat(q0 * xT[0, t] + q1 * xT[1, t] + q2 * xT[2, t] - b)
            tot += w
            a0 += w * xT[0, t]
            a1 += w * xT[1, t]
            a2 += w * xT[2, t]
        v[0, i], v[1, i], v[2, i] = a0 / tot, a1 / tot, a2 / tot


@njit
def symmetric_blocks(xT, b, v, cols, rows, lane_sums):
    """The same v from 8 × 8 blocks: row i against its own block (both orders, row side only) and
    against every later block J (w once: row i's register sums and block J's column vectors
    cols[32J:32J + 32] = (Σ w, Σ w·x_0, Σ w·x_1, Σ w·x_2) per lane). rows (4, n): the row sums
    (lane_sums: 8 scratch floats)."""
    n = xT.shape[1]
    X0, X1, X2 = xT[0], xT[1], xT[2]
    shift = vsplat(-b)
    cols[:] = 0.0
    for I in range(n // W):
        for r in range(W):
            i = W * I + r
            q0, q1, q2 = vsplat(b * X0[i]), vsplat(b * X1[i]), vsplat(b * X2[i])
            u0, u1, u2 = vsplat(X0[i]), vsplat(X1[i]), vsplat(X2[i])
            t = W * I
            k0, k1, k2 = vload(X0, t), vload(X1, t), vload(X2, t)
            w = vexp2(vfma(q0, k0, vfma(q1, k1, vfma(q2, k2, shift))))
            tot, a0, a1, a2 = w, vmul(w, k0), vmul(w, k1), vmul(w, k2)
            for J in range(I + 1, n // W):
                t, o = W * J, 4 * W * J
                k0, k1, k2 = vload(X0, t), vload(X1, t), vload(X2, t)
                w = vexp2(vfma(q0, k0, vfma(q1, k1, vfma(q2, k2, shift))))
                tot, a0, a1, a2 = vadd(tot, w), vfma(w, k0, a0), vfma(w, k1, a1), vfma(w, k2, a2)
                vstore(cols, o, vadd(vload(cols, o), w))
                vstore(cols, o + W, vfma(w, u0, vload(cols, o + W)))
                vstore(cols, o + 2 * W, vfma(w, u1, vload(cols, o + 2 * W)))
                vstore(cols, o + 3 * W, vfma(w, u2, vload(cols, o + 3 * W)))
            for c, part in enumerate((tot, a0, a1, a2)):
                vstore(lane_sums, 0, part)
                rows[c, i] = lane_sums.sum()
    for i in range(n):
        o = 4 * W * (i // W) + i % W
        f = 1.0 / (rows[0, i] + cols[o])
        for c in range(3):
            v[c, i] = (rows[1 + c, i] + cols[o + (c + 1) * W]) * f


@njit
def _repeat_tiles(plan, spec, ws, x, out, calls):
    for _ in range(calls):
        tiles.velocity(plan, spec, ws, x, x, x, out)


@njit
def _repeat_rows(x, b, v, calls):
    for _ in range(calls):
        rows_auto(x, b, v)


@njit
def _repeat_blocks(x, b, v, cols, rows, lane_sums, calls):
    for _ in range(calls):
        symmetric_blocks(x, b, v, cols, rows, lane_sums)


def single_system(sizes=(32, 64, 128, 256, 512), pairs_per_round=2_000_000, rounds=7):
    from analysis.bench import interleaved_best_times
    from particles import make_interaction

    rng = np.random.default_rng(0)
    records = []
    for n in sizes:
        x = rng.standard_normal((3, n))
        x /= np.linalg.norm(x, axis=0)
        rows_v, sym_v, tiles_v = np.empty((3, n)), np.empty((3, n)), np.empty((n, 3))
        scratch = np.empty(4 * n), np.empty((4, n)), np.empty(W)
        field = velocity_field(make_interaction("sa", beta=1.0), n, 3)
        plan = trajectory.make_plan(trajectory.SYMMETRIC_TILES, field.dims, field.score_s, field.radius_s)
        ws = tiles.workspace(3, x)
        calls = max(1, pairs_per_round // (n * n))
        fns = {"rows": partial(_repeat_rows, x, LOG2E, rows_v, calls),  # β = 1
               "blocks": partial(_repeat_blocks, x, LOG2E, sym_v, *scratch, calls),
               "tiles": partial(_repeat_tiles, plan, field.spec, ws, x, tiles_v, calls)}
        best = interleaved_best_times(fns, rounds=rounds)
        np.testing.assert_allclose(sym_v, rows_v, rtol=0, atol=1e-14)
        np.testing.assert_allclose(tiles_v.T, rows_v, rtol=0, atol=1e-14)
        rec = dict(n=n, **{f"{k}_us": 1e6 * t / calls for k, t in best.items()})
        rec["x_blocks"] = rec["rows_us"] / rec["blocks_us"]
        rec["x_tiles"] = rec["rows_us"] / rec["tiles_us"]
        records.append(rec)
        print(rec, flush=True)
    return records


def single_table(records):
    lines = ["| n | rows, loop-vectorised | 8 × 8 blocks | speed-up | square tiles (simulate's) | speed-up |",
             "| ---: | ---: | ---: | ---: | ---: | ---: |"]
    return lines + [f"| {r['n']} | {r['rows_us']:.2f} | {r['blocks_us']:.2f} | {r['x_blocks']:.2f} | "
                    f"{r['tiles_us']:.2f} | {r['x_tiles']:.2f} |" for r in records]


def ensembles(dims=(2, 3, 4), sizes=(16, 32, 96), rounds=3):
    import particles.kernels as kernels
    from analysis.bench import interleaved_best_times
    from particles import simulate

    rng = np.random.default_rng(0)
    symmetric_scores = kernels.symmetric_scores
    records = []
    for d in dims:
        for n in sizes:
            for dtype in ("float32", "float64"):
                S = 1024 if n < 96 else 128
                x = rng.standard_normal((S, n, d))
                x = (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(dtype)

                def run(symmetric, x=x, dtype=dtype):
                    kernels.symmetric_scores = symmetric_scores if symmetric else (lambda it, d: False)
                    try:
                        return simulate("sa", x, steps=20, dt=0.1, beta=4.0, dtype=dtype, save_every=20)
                    finally:
                        kernels.symmetric_scores = symmetric_scores

                gap = float(np.abs(run(True).x.values - run(False).x.values).max())
                assert gap < (1e-5 if dtype == "float32" else 1e-12), gap
                best = interleaved_best_times({"lanes": lambda: run(False), "symmetric": lambda: run(True)},
                                              rounds=rounds, budget=3.0)
                rec = dict(d=d, n=n, samples=S, dtype=dtype, lanes_ms=1e3 * best["lanes"],
                           symmetric_ms=1e3 * best["symmetric"], x=best["lanes"] / best["symmetric"])
                records.append(rec)
                print(rec, flush=True)
    return records


def main():
    from analysis.bench import machine_summary

    single, ens = single_system(), ensembles()
    info = machine_summary()
    record = dict(machine=info, single_system=single, ensembles=ens)
    (OUT / "explicit_simd.json").write_text(json.dumps(record, indent=1))
    stamp = time.strftime("%Y-%m-%d %H:%M")
    lines = [f"<!-- written by `python benchmarks/explicit_simd.py`, {stamp} -->", "",
             f"Machine: {info['cpu']} ({info['isa']}), {info['cores']} cores, 1-min load "
             f"{info['load_average_1min']:.1f}. Best of interleaved rounds.", "",
             "A. One velocity evaluation of one system, SA on the unit sphere, d = 3, β = 1, one thread "
             "(µs):", "",
             ] + single_table(single)
    lines += ["", "B. Ensembles through simulate, SA β = 4 on the sphere, 20 Euler steps, 2 threads (ms):",
              "",
              "| d | n | samples | dtype | LANES tiles | SYMMETRIC_LANES tiles (explicit vectors) "
              "| speed-up |",
              "| ---: | ---: | ---: | --- | ---: | ---: | ---: |"]
    lines += [f"| {r['d']} | {r['n']} | {r['samples']} | {r['dtype']} | {r['lanes_ms']:.2f} | "
              f"{r['symmetric_ms']:.2f} | {r['x']:.2f} |" for r in ens]
    (OUT / "explicit_simd.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    import sys

    if "--single" in sys.argv:  # part A again: its table printed, its records replaced in the json
        from analysis.bench import machine_summary

        single = single_system()
        print("\n".join(single_table(single)))
        stored = json.loads((OUT / "explicit_simd.json").read_text())
        stored.update(single_system=single, single_system_machine=machine_summary())
        (OUT / "explicit_simd.json").write_text(json.dumps(stored, indent=1))
    else:
        main()
