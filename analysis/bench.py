"""Benchmark cases for the kernels behind ``particles.simulate`` and their strongest baselines.

Every case times one velocity evaluation (the work of one Euler step) of our kernel and of the
baselines in the same process, best of several repeats (the machine is shared: ratios measured in
one run are what counts, not absolute times). ``ksync bench`` prints the table and writes JSON;
:func:`scaling` measures time per step against n for the log-log figure.

Baselines: torch's fused attention (``scaled_dot_product_attention``, "sdpa") for dense softmax and
rbf, torch unfold + topk for windowed top-k, vectorised numpy, KeOps (pykeops) where installed; the
plain torch softmax(XXᵀ)X ("naive torch") is kept as a labelled reference column only. The
head-dimension section (:func:`headdim_cases`, ``ksync bench --headdim``) times the whole simulate
step x ← R(x + dt·P_x v) of our kernels against the same step built on SDPA, d = 3…128.

"pairs" is the number of (query, key) pairs the method scores: n² for dense cases, n·w for a
window of w keys, and n² for 1-D HK (the all-pairs work the sorted sweep replaces).
"""

from __future__ import annotations

import os
import platform
import subprocess
import time
from dataclasses import dataclass, field

import numpy as np

from particles import make_interaction
from particles.kernels import velocity_field

# --- baselines -------------------------------------------------------------------------------


def numpy_dense(x, it, V=None):
    """Plain vectorised numpy step: scores matrix, stable softmax over rows, weighted sum."""
    Q, K, Vm = it.matrices(x.shape[1], x.dtype)
    q, k, v = (x, x, x) if it.identity_qkv else (x @ Q.T, x @ K.T, x @ Vm.T)
    if it.score == "softmax":
        s = it.beta * (q @ k.T)
    else:
        s = -((q * q).sum(1)[:, None] + (k * k).sum(1)[None, :] - 2.0 * (q @ k.T)) / (2 * it.sigma**2)
    s = np.exp(s - s.max(axis=1, keepdims=True))
    return (s @ v) / s.sum(axis=1, keepdims=True)


def torch_dense(x, it):
    """torch CPU step: matmul + softmax + matmul (the same maths, torch's own kernels)."""
    import torch

    q = k = v = x
    if not it.identity_qkv:
        Q, K, Vm = (torch.as_tensor(m) for m in it.matrices(x.shape[1], x.numpy().dtype))
        q, k, v = x @ Q.T, x @ K.T, x @ Vm.T
    if it.score == "softmax":
        s = it.beta * (q @ k.T)
    else:
        s = -torch.cdist(q, k).square() / (2 * it.sigma**2)
    return torch.softmax(s, dim=1) @ v


def sdpa_dense(x, it):
    """torch's fused attention (flash attention on CPU): softmax with scale β; rbf with scale 1/σ²
    and the key bias −‖k‖²/(2σ²) as additive attn_mask (−‖q − k‖²/(2σ²) = ⟨q, k⟩/σ² − ‖k‖²/(2σ²)
    − ‖q‖²/(2σ²), the last term cancels in the softmax). x: (n, d) or (S, n, d) tensor, called as
    (S, 1, n, d): with 2-D or 3-D inputs torch takes its unfused math path (4–6× slower on CPU)."""
    import torch
    import torch.nn.functional as F

    q = k = v = x
    if not it.identity_qkv:
        Q, K, Vm = (torch.tensor(m) for m in it.matrices(x.shape[-1], x.numpy().dtype))
        q, k, v = x @ Q.T, x @ K.T, x @ Vm.T
    q, k, v = (t.reshape((-1, 1) + t.shape[-2:]) for t in (q, k, v))  # (batch, head, n, d): the fused
    if it.score == "softmax":                                         # kernel (2-D/3-D: the math path)
        out = F.scaled_dot_product_attention(q, k, v, scale=it.beta)
    else:
        bias = (-(k * k).sum(-1) / (2 * it.sigma**2))[..., None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0 / it.sigma**2)
    return out.reshape(x.shape)


KEOPS_MAX_N = 16384  # KeOps on CPU takes ~0.5 s per step at n = 4096: larger cases are left out


def keops_available() -> bool:
    try:
        import pykeops.torch  # noqa: F401
    except Exception:  # not installed, or its run-time compiler is missing
        return False
    return True


def keops_dense(x, it):
    """KeOps (pykeops, CPU) dense step: a symbolic LazyTensor softmax reduction over keys, no n×n
    array (Q = K = V = I)."""
    from pykeops.torch import LazyTensor

    xi, xj = LazyTensor(x[:, None, :]), LazyTensor(x[None, :, :])
    s = it.beta * (xi * xj).sum() if it.score == "softmax" else -((xi - xj) ** 2).sum() / (2 * it.sigma**2)
    return s.sumsoftmaxweight(xj, axis=1)


def numpy_window_topk(x, it, block=65536):
    """Vectorised numpy causal window + top-k: sliding windows, argpartition, softmax (row blocks)."""
    n, d = x.shape
    w, kk = it.window, it.top_k
    pad = np.concatenate([np.full((w - 1, d), np.nan, x.dtype), x])
    win = np.lib.stride_tricks.sliding_window_view(pad, w, axis=0)  # (n, d, w): keys i−w+1..i
    out = np.empty_like(x)
    for a in range(0, n, block):
        b = min(n, a + block)
        keys = win[a:b]
        s = -np.nansum((x[a:b, :, None] - keys) ** 2, axis=1) / (2 * it.sigma**2)
        s[np.isnan(keys[:, 0, :])] = -np.inf
        kth = min(kk, w)
        top = np.argpartition(-s, kth - 1, axis=1)[:, :kth]
        st = np.take_along_axis(s, top, 1)
        e = np.exp(st - st.max(1, keepdims=True))
        vals = np.take_along_axis(np.nan_to_num(keys), top[:, None, :], 2)  # (rows, d, k)
        out[a:b] = (vals * e[:, None, :]).sum(2) / e.sum(1, keepdims=True)
    return out


def torch_window_topk(x, it):
    """torch CPU causal window + top-k: unfold, topk, softmax."""
    import torch

    n, d = x.shape
    w, kk = it.window, it.top_k
    pad = torch.cat([torch.zeros((w - 1, d), dtype=x.dtype), x])
    keys = pad.unfold(0, w, 1)  # (n, d, w): keys i−w+1..i, zero padding before 0
    s = -((x[:, :, None] - keys) ** 2).sum(1) / (2 * it.sigma**2)
    before = torch.arange(n)[:, None] - (w - 1) + torch.arange(w)[None, :] < 0
    s = s.masked_fill(before, -float("inf"))
    st, top = torch.topk(s, min(kk, w), dim=1)
    vals = torch.gather(keys, 2, top[:, None, :].expand(-1, d, -1))
    return (vals * torch.softmax(st, 1)[:, None, :]).sum(2)


def numpy_hk_sorted(x, radius):
    """Vectorised numpy 1-D HK step: argsort + cumsum + searchsorted (what a numpy user writes)."""
    col = x[:, 0]
    order = np.argsort(col)
    xs = col[order]
    csum = np.concatenate([[0.0], np.cumsum(xs, dtype=np.float64)])
    lo = np.searchsorted(xs, xs - radius, "left")
    hi = np.searchsorted(xs, xs + radius, "right")
    out = np.empty_like(col)
    out[order] = (csum[hi] - csum[lo]) / (hi - lo)
    return out[:, None]


def numpy_hk_quadratic(x, radius, block=2048):
    """Straightforward O(n²) HK step (broadcast distance test in row blocks)."""
    out = np.empty_like(x)
    for a in range(0, len(x), block):
        near = np.abs(x[a:a + block, None, 0] - x[None, :, 0]) <= radius
        out[a:a + block, 0] = (near @ x[:, 0]) / near.sum(1)
    return out


# --- timing ----------------------------------------------------------------------------------


def best_time(fn, *, repeats=5, budget=2.0, max_repeats=50, clock=time.perf_counter):
    """Best time of fn() (after a warm-up): at least `repeats` calls, more (up to max_repeats)
    while the total stays under `budget` seconds — fast calls get many tries on a noisy machine.
    clock: wall time by default; time.process_time gives the process's CPU time, which on a loaded
    machine is the robust measure of single-threaded runs (time spent descheduled is not counted)."""
    fn()
    times, start = [], time.perf_counter()
    while len(times) < repeats or (len(times) < max_repeats and time.perf_counter() - start < budget):
        t = clock()
        fn()
        times.append(clock() - t)
    return min(times)


def interleaved_best_times(fns: dict, *, rounds=3, budget=6.0, max_rounds=20, fast=0.25, settle=0.02,
                           clock=time.perf_counter) -> dict:
    """Best time of each fn() (after one warm-up each), the calls interleaved: every round calls
    each function once, and a fast one (a call under `fast` seconds) again until it has taken
    `fast` seconds in this round. At least `rounds` rounds, more (up to max_rounds) while the total
    stays under `budget` seconds. On a shared machine whose speed drifts by tens of percent over
    seconds, each function then sees the same stretches of it, so their ratio moves less than
    with one function timed after the other. Before each function's turn the caller sleeps
    `settle` seconds (untimed): the idle threads of torch's OpenMP or numpy's OpenBLAS spin for a
    while after their last call and would slow the function that follows."""
    for fn in fns.values():
        fn()
    best = {name: float("inf") for name in fns}
    start, done = time.perf_counter(), 0
    while done < rounds or (done < max_rounds and time.perf_counter() - start < budget):
        for name, fn in fns.items():
            if settle > 0:
                time.sleep(settle)
            spent = 0.0
            while True:
                t = clock()
                fn()
                elapsed = clock() - t
                best[name], spent = min(best[name], elapsed), spent + elapsed
                if elapsed >= fast or spent >= fast:
                    break
        done += 1
    return best


@dataclass
class Case:
    name: str
    model: str
    n: int
    d: int
    dtype: str
    params: dict = field(default_factory=dict)
    kind: str = "dense"  # dense | window | hk1d | radius
    quadratic_from: int | None = None  # hk1d: time the O(n²) baseline at this n and extrapolate

    def interaction(self):
        return make_interaction(self.model, **self.params)

    def pairs(self):
        if self.kind == "window":
            return self.n * self.params["window"]
        return self.n * self.n


def general_qkv(d, seed=1):
    rng = np.random.default_rng(seed)
    return {name: np.eye(d) + 0.3 * rng.standard_normal((d, d)) for name in "QKV"}


def cases(quick=False):
    """The benchmark table: targets of issue 4 (see benchmarks/README.md)."""
    n = 1024 if quick else 4096
    wn = 4096 if quick else 16384
    hn = 10**5 if quick else 10**6
    win = dict(sigma=1.0, window=128, causal=True, top_k=32)
    return [
        Case("sa dense fp32", "sa", n, 3, "float32"),
        Case("sa dense fp32 general QKV", "sa", n, 3, "float32", general_qkv(3)),
        Case("krause dense fp32", "krause", n, 3, "float32"),
        Case("sa dense fp64", "sa", n, 3, "float64"),
        Case("sa dense fp32 d=64", "sa", n, 64, "float32"),
        Case("krause window+top-k fp32", "krause", wn, 3, "float32", win, kind="window"),
        Case("krause dense fp32 (same n)", "krause", wn, 3, "float32"),
        Case("krause radius fp64 d=2", "krause", 10**4 if quick else 5 * 10**4, 2, "float64",
             dict(sigma=1.0, radius=0.02, geometry="euclidean"), kind="radius"),
        Case("hk 1-D fp64", "hk", hn, 1, "float64", dict(radius=0.01), kind="hk1d",
             quadratic_from=5000 if quick else 10**4),
        Case("hk 1-D fp64 (n=1e5)", "hk", 10**5, 1, "float64", dict(radius=0.01), kind="hk1d",
             quadratic_from=5000 if quick else 10**4),
    ]


def initial(case: Case, seed=0):
    rng = np.random.default_rng(seed)
    if case.kind in ("hk1d", "radius"):
        return rng.random((case.n, case.d)).astype(case.dtype)
    x = rng.standard_normal((case.n, case.d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(case.dtype)


def state_as_simulated(case: Case, x, field=None):
    """The state as particles.simulate holds it between steps: what the velocity field's own
    ``prepare`` makes of it (1-D HK opinions sorted, everything else as given). field: the case's
    velocity_field (built when None)."""
    if field is None:
        field = velocity_field(case.interaction(), case.n, case.d, case.dtype)
    return field.prepare(x)[0]


def run_case(case: Case, *, repeats=5, budget=2.0, baselines=True):
    """Time our kernel (and, if asked, the baselines) on one case; returns a JSON-ready dict."""
    it = case.interaction()
    x = initial(case)
    field_ = velocity_field(it, case.n, case.d, case.dtype)
    state = state_as_simulated(case, x, field_)
    ours = best_time(lambda: field_(state), repeats=repeats, budget=budget)
    rec = dict(case=case.name, model=case.model, n=case.n, d=case.d, dtype=case.dtype, kind=case.kind,
               path=field_.last_path, pairs=case.pairs(), ours_s=ours,
               params={k: v for k, v in case.params.items() if k not in "QKV"},
               general_qkv=not it.identity_qkv)
    rec["pairs_per_s"] = case.pairs() / ours
    if case.kind == "hk1d":  # the same call on opinions in particle order (cached sorting permutation)
        rec["ours_particle_order_s"] = best_time(lambda: field_(x), repeats=repeats, budget=budget)
    if baselines:
        add_baselines(rec, case, repeats=repeats, budget=budget)
    return rec


def keep_best(best, rec):
    """Merge two measurements of one case: each time the smaller; every measurement kept in "rounds"."""
    if best is None:
        return dict(rec, rounds=[{k: v for k, v in rec.items() if k.endswith("_s")}])
    merged = dict(best, rounds=best["rounds"] + [{k: v for k, v in rec.items() if k.endswith("_s")}])
    for key, value in rec.items():
        if key.endswith("_s"):
            merged[key] = min(best[key], value)
    merged["pairs_per_s"] = merged["pairs"] / merged["ours_s"]
    return merged


def add_baselines(rec, case: Case, *, repeats=5, budget=2.0):
    """Time the numpy / torch (or other) baselines of `case` into `rec`, with ratios to ours.

    ``ksync bench`` times all of our kernels first and the baselines afterwards: torch's OpenMP
    worker threads keep spinning for a while after each op and would otherwise slow down the
    numba threads measured next (and vice versa) on a 2-core machine.
    """
    import torch

    previous = {k: v for k, v in rec.items() if k.endswith("_s") and k != "ours_s"}
    it = case.interaction()
    x = initial(case)
    xt = torch.from_numpy(x)
    if case.kind == "dense":
        rec["numpy_s"] = best_time(lambda: numpy_dense(x, it), repeats=repeats, budget=budget)
        rec["sdpa_s"] = best_time(lambda: sdpa_dense(xt, it), repeats=repeats, budget=budget)
        rec["torch_s"] = best_time(lambda: torch_dense(xt, it), repeats=repeats, budget=budget)
        if keops_available() and it.identity_qkv and case.n <= KEOPS_MAX_N:
            rec["keops_s"] = best_time(lambda: keops_dense(xt, it), repeats=2, budget=budget)
    elif case.kind == "window":
        rec["numpy_s"] = best_time(lambda: numpy_window_topk(x, it), repeats=repeats, budget=budget)
        rec["torch_s"] = best_time(lambda: torch_window_topk(xt, it), repeats=repeats, budget=budget)
    elif case.kind == "radius":
        dense = velocity_field(it, case.n, case.d, case.dtype, path="fused")
        rec["dense_kernel_s"] = best_time(lambda: dense(x), repeats=repeats, budget=budget)
    elif case.kind == "hk1d":
        r = it.radius
        rec["numpy_s"] = best_time(lambda: numpy_hk_sorted(x, r), repeats=repeats, budget=budget)
        m = min(case.n, case.quadratic_from or case.n)
        xq = x[:m]
        tq = best_time(lambda: numpy_hk_quadratic(xq, r), repeats=2, budget=budget)
        rec["quadratic_n"] = m
        rec["quadratic_s"] = tq * (case.n / m) ** 2  # O(n²): extrapolated from n = m
    for key, value in list(rec.items()):  # a second call (round) keeps the faster baseline time
        if key in previous:
            rec[key] = min(value, previous[key])
    if case.kind == "hk1d":
        rec["x_numpy_particle_order"] = rec["numpy_s"] / rec["ours_particle_order_s"]
    for key in ("numpy_s", "sdpa_s", "torch_s", "keops_s", "quadratic_s", "dense_kernel_s"):
        if key in rec:
            rec["x_" + key[:-2]] = rec[key] / rec["ours_s"]
    return rec


def compare_window_dense(records):
    """Windowed/top-k vs dense Krause at the same n (target ≥ 20×)."""
    by = {r["case"]: r for r in records}
    w, dn = by.get("krause window+top-k fp32"), by.get("krause dense fp32 (same n)")
    if w and dn and w["n"] == dn["n"]:
        w["x_dense_kernel"] = dn["ours_s"] / w["ours_s"]


# --- scaling ---------------------------------------------------------------------------------

SCALING = {
    # series: (case factory, sizes, baselines)
    "dense softmax (ours, fp32)": ("sa", dict(), "dense", [256, 512, 1024, 2048, 4096, 8192, 16384]),
    "windowed top-k Krause (ours, fp32)": ("krause", dict(sigma=1.0, window=128, causal=True, top_k=32),
                                           "window", [10**3, 10**4, 10**5, 10**6]),
    "1-D HK sweep (ours, fp64)": ("hk", dict(radius=0.01), "hk1d", [10**3, 10**4, 10**5, 10**6]),
}
BASELINE_SIZES = {
    "dense softmax (numpy)": ("dense", "numpy", [256, 512, 1024, 2048, 4096]),
    "dense softmax (torch SDPA)": ("dense", "sdpa", [256, 512, 1024, 2048, 4096, 8192, 16384]),
    "dense softmax (naive torch, reference)": ("dense", "torch", [256, 512, 1024, 2048, 4096, 8192]),
    "windowed top-k Krause (torch)": ("window", "torch", [10**3, 10**4, 10**5]),
    "1-D HK (numpy argsort+searchsorted)": ("hk1d", "numpy", [10**3, 10**4, 10**5, 10**6]),
    "1-D HK (numpy O(n²))": ("hk1d", "quadratic", [10**3, 3 * 10**3, 10**4]),
}


def scaling_rows(part, quick=False, repeats=3, budget=1.0):
    """[(series, n, seconds)] for part "ours" (our kernels) or "baselines"."""
    cap = 10**5 if quick else None
    dtype_of = {"dense": "float32", "window": "float32", "hk1d": "float64"}
    specs = {kind: (model, params) for model, params, kind, _ in SCALING.values()}
    if part == "ours":
        todo = [(name, model, params, kind, "ours", sizes)
                for name, (model, params, kind, sizes) in SCALING.items()]
    else:
        todo = [(name, *specs[kind], kind, which, sizes)
                for name, (kind, which, sizes) in BASELINE_SIZES.items()]
    rows = []
    for name, model, params, kind, which, sizes in todo:
        for n in [s for s in sizes if cap is None or s <= cap]:
            case = Case(name, model, n, 1 if kind == "hk1d" else 3, dtype_of[kind], params, kind=kind)
            rows.append((name, n, best_time(_timed(which, case), repeats=repeats, budget=budget)))
    return rows


def scaling_dataset(rows):
    """Time per step against n for each series as an xarray Dataset (series × n, NaN if not run)."""
    import xarray as xr

    series = list(dict.fromkeys(r[0] for r in rows))
    ns = sorted({r[1] for r in rows})
    t = np.full((len(series), len(ns)), np.nan)
    for name, n, sec in rows:
        t[series.index(name), ns.index(n)] = sec
    ds = xr.Dataset({"seconds_per_step": (("series", "n"), t)}, coords={"series": series, "n": ns})
    ds.seconds_per_step.attrs["long_name"] = "best wall time of one velocity evaluation (one Euler step)"
    ds.attrs.update(machine_summary())
    ds.attrs["windowed_loglog_slope"] = loglog_slope(ds, "windowed top-k Krause (ours, fp32)")
    return ds


def scaling(quick=False, repeats=3, budget=1.0):
    """Our kernels first, then the baselines (see add_baselines); returns scaling_dataset."""
    ours = scaling_rows("ours", quick, repeats, budget)
    return scaling_dataset(ours + scaling_rows("baselines", quick, repeats, budget))


def _timed(which, case: Case):
    """A no-argument callable doing one step of `which` (ours, numpy, torch, quadratic) on case."""
    import torch

    x, it = initial(case), case.interaction()
    if which == "ours":
        f = velocity_field(it, case.n, case.d, case.dtype)
        state = state_as_simulated(case, x, f)
        return lambda: f(state)
    if which == "quadratic":
        return lambda: numpy_hk_quadratic(x, it.radius)
    if case.kind == "hk1d":
        return lambda: numpy_hk_sorted(x, it.radius)
    xt = torch.from_numpy(x)
    table = {("dense", "numpy"): lambda: numpy_dense(x, it), ("dense", "torch"): lambda: torch_dense(xt, it),
             ("dense", "sdpa"): lambda: sdpa_dense(xt, it),
             ("window", "numpy"): lambda: numpy_window_topk(x, it),
             ("window", "torch"): lambda: torch_window_topk(xt, it)}
    return table[case.kind, which]


def loglog_slope(ds, name):
    t = ds.seconds_per_step.sel(series=name)
    ok = np.isfinite(t.values)
    n, y = np.log(ds.n.values[ok]), np.log(t.values[ok])
    return float(np.polyfit(n, y, 1)[0]) if ok.sum() >= 2 else float("nan")


def plot_scaling(ds, path):
    """Log-log time per step vs n; writes path (.png) and the same name with .pdf."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10.0, 5.0))
    colours = {"dense": "C0", "window": "C1", "HK": "C2"}
    for name in ds.series.values:
        t = ds.seconds_per_step.sel(series=name)
        ok = np.isfinite(t.values)
        colour = colours["dense" if "dense" in name else "window" if "window" in name else "HK"]
        ours = "ours" in name
        ax.loglog(ds.n.values[ok], 1e3 * t.values[ok], marker="o" if ours else "s",
                  ls="-" if ours else "-." if "SDPA" in name else (
                      "--" if "numpy" in name and "O(n" not in name else ":"),
                  color=colour, lw=2 if ours else 1.2, ms=4, label=name)
    ax.set_xlabel("number of particles n")
    ax.set_ylabel("time per step [ms] (best of repeats)")
    slope = ds.attrs.get("windowed_loglog_slope", float("nan"))
    ax.set_title(f"krause-sync kernels vs baselines ({ds.attrs.get('cpu', '')}, "
                 f"{ds.attrs.get('cores', '?')} cores)\nwindowed top-k log-log slope {slope:.2f}",
                 fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7.5, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)  # off the data
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    fig.savefig(os.path.splitext(path)[0] + ".pdf")
    plt.close(fig)


# --- head dimension: the simulate step of our kernels against the SDPA step (issue 18) ---------

STEP_DT = 0.1
HEADDIM_DIMS = (3, 4, 5, 8, 16, 32, 64, 128)


@dataclass
class StepCase:
    """One simulate step x ← R(x + dt·P_x v) on the sphere: score, dtype, n, d, and whether Q = K = V = I
    (symmetric scores) or general projections (Q ≠ K)."""

    score: str  # "softmax" (model sa, β = 1) or "rbf" (model krause, σ = 1)
    dtype: str
    n: int
    d: int
    qkv: str = "identity"  # or "general"

    @property
    def name(self):
        return f"{self.score} {self.dtype} n={self.n} d={self.d} {self.qkv}"

    def interaction(self):
        model = "sa" if self.score == "softmax" else "krause"
        return make_interaction(model, **(general_qkv(self.d) if self.qkv == "general" else {}))


def headdim_cases(quick=False, targets=False):
    """The grid of the head-dimension section: d = 3…128 at n = 4096 and 16384 (d ≥ 16), smaller n
    for the crossover, both scores and dtypes, Q = K = I; general Q, K, V at n = 4096. targets: only
    the target sizes (n = 4096 and 16384, d = 3, 4 and 16…128), no crossover sizes."""
    if quick:
        return [StepCase(score, "float32", n, d) for score in ("softmax", "rbf") for n in (512, 2048)
                for d in (3, 16, 64)] + [StepCase("softmax", "float32", 2048, 64, "general")]
    if targets:
        grid = [(n, d) for n in (4096, 16384) for d in (3, 4, 16, 32, 64, 128)]
    else:
        grid = [(n, d) for n in (256, 512, 1024, 4096) for d in HEADDIM_DIMS]
        grid += [(16384, d) for d in (3, 16, 32, 64, 128)]
    out = [StepCase(score, dtype, n, d) for score in ("softmax", "rbf") for dtype in ("float32", "float64")
           for n, d in grid]
    return out + [StepCase(score, dtype, 4096, d, "general") for score in ("softmax", "rbf")
                  for dtype in ("float32", "float64") for d in (5, 16, 64, 128)]


def sphere_state(n, d, dtype, seed=0):
    x = np.random.default_rng(seed).standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(dtype)


def numpy_sphere_step(velocity, x, dt=STEP_DT):
    """x ← R(x + dt·P_x v(x)) with numpy (the step simulate takes around our kernels)."""
    v = velocity(x)
    y = x + dt * (v - np.einsum("nd,nd->n", x, v)[:, None] * x)
    return y / np.linalg.norm(y, axis=1, keepdims=True)


def sdpa_sphere_step(xt, it, dt=STEP_DT):
    """The same step in torch around :func:`sdpa_dense`."""
    v = sdpa_dense(xt, it)
    y = xt + dt * (v - (xt * v).sum(-1, keepdim=True) * xt)
    return y / y.norm(dim=-1, keepdim=True)


def headdim_candidates(case: StepCase, x):
    """{name: step()} for one case: "auto" (velocity_field's automatic path, what simulate runs),
    "headdim" (particles.kernels.headdim directly, d > 4), "numba-dense" (the d > 4 path before
    headdim: blas or range, n ≤ 4096) and "sdpa"."""
    import torch

    from particles.kernels import headdim, rows

    it = case.interaction()
    auto = velocity_field(it, case.n, case.d, case.dtype)
    out = {"auto": lambda: numpy_sphere_step(auto, x)}
    if case.d > rows.FUSED_MAX_DIM:
        Q, K, V = it.matrices(case.d, x.dtype)
        symmetric = it.identity_qkv

        def v_headdim(y):
            q, k, v = (y, y, y) if it.identity_qkv else (np.ascontiguousarray(y @ M.T) for M in (Q, K, V))
            return headdim.velocity_headdim(q, k, v, score=it.score, beta=it.beta,
                                            inv2s2=1.0 / (2.0 * it.sigma**2), symmetric=symmetric)

        out["headdim"] = lambda: numpy_sphere_step(v_headdim, x)
        if case.n <= 4096:
            before = "blas" if it.score == "softmax" else "range"
            old = velocity_field(it, case.n, case.d, case.dtype, path=before)
            out["numba-dense"] = lambda: numpy_sphere_step(old, x)
    xt = torch.from_numpy(x)
    out["sdpa"] = lambda: sdpa_sphere_step(xt, it)
    return out, auto


def run_step_case(case: StepCase, *, rounds=3, repeats=3, budget=2.0, clock=time.perf_counter):
    """Interleaved rounds of every candidate (a short pause when switching between torch and numba,
    whose idle OpenMP threads spin for a while); each candidate's best time over all rounds."""
    x = sphere_state(case.n, case.d, case.dtype)
    candidates, auto = headdim_candidates(case, x)
    best, every = {}, {k: [] for k in candidates}
    for _ in range(rounds):
        for name, fn in candidates.items():
            time.sleep(0.02)  # the last candidate's idle OpenMP threads stop spinning
            t = best_time(fn, repeats=repeats, budget=budget, clock=clock)
            if name == "numba-dense":
                time.sleep(0.15)  # numpy's OpenBLAS threads (its matmuls) spin for ~0.1 s
            every[name].append(t)
            best[name] = min(best.get(name, np.inf), t)
    ours = min(v for k, v in best.items() if k != "sdpa")
    fastest = min(best, key=best.get)
    rec = dict(case=case.name, score=case.score, dtype=case.dtype, n=case.n, d=case.d, qkv=case.qkv,
               auto_path=auto.last_path, fastest=fastest, ours_s=ours,
               **{f"{k}_s": v for k, v in best.items()}, rounds=every)
    rec["x_sdpa"] = best["sdpa"] / ours
    rec["x_sdpa_auto"] = best["sdpa"] / best["auto"]
    return rec


def run_headdim(cases, *, rounds=3, repeats=3, budget=2.0, progress=True, clock=time.perf_counter,
                on_record=None):
    """Every case through run_step_case; on_record(records) after each (to save partial results)."""
    from tqdm.auto import tqdm

    records = []
    for case in tqdm(cases, desc="head-dimension steps", disable=not progress):
        records.append(run_step_case(case, rounds=rounds, repeats=repeats, budget=budget, clock=clock))
        if on_record is not None:
            on_record(records)
    return records


def headdim_table(records):
    """Markdown: one row per case — times in ms, the fastest candidate, ours (best of auto/headdim) over
    SDPA, and the automatic path's ratio."""
    cols = ("auto", "headdim", "numba-dense", "sdpa")
    lines = ["| score | dtype | Q,K,V | n | d | " + " | ".join(f"{c} ms" for c in cols)
             + " | fastest | SDPA / ours | SDPA / auto (path) |",
             "|" + "---|" * (8 + len(cols))]
    for r in records:
        times = " | ".join(f"{1e3 * r[c + '_s']:.2f}" if c + "_s" in r else "–" for c in cols)
        lines.append(f"| {r['score']} | {r['dtype']} | {r['qkv']} | {r['n']} | {r['d']} | {times} | "
                     f"{r['fastest']} | {r['x_sdpa']:.2f}× | {r['x_sdpa_auto']:.2f}× ({r['auto_path']}) |")
    return "\n".join(lines)


def headdim_crossover(records):
    """{(score, qkv, dtype, d): smallest n from which headdim is the fastest candidate at every
    measured larger n (None: never)} — the measured dispatch of the d > 4 kernels."""
    table = {}
    for key in sorted({(r["score"], r["qkv"], r["dtype"], r["d"]) for r in records if "headdim_s" in r}):
        rows_ = sorted((r for r in records if (r["score"], r["qkv"], r["dtype"], r["d"]) == key),
                       key=lambda r: r["n"])
        start = None
        for r in reversed(rows_):
            if r["fastest"] != "headdim":
                break
            start = r["n"]
        table[key] = start
    return table


def headdim_markdown(records, machine, *, command, clock):
    """benchmarks/headdim.md: the machine, the step table and the crossover table."""
    m = machine
    rounds = len(records[0]["rounds"]["auto"]) if records else 0
    return (f"<!-- written by `{command}`, {time.strftime('%Y-%m-%d %H:%M')} -->\n\n"
            f"Machine: {m['cpu']} ({m['isa']}), {m['cores']} cores, 1-min load {m['load_average_1min']:.1f}; "
            f"numba {m['numba']} ({m['numba_threads']} threads, {m['numba_threading_layer']} layer, "
            f"{m.get('numba_vector_bits', '?')}-bit vectors), torch "
            f"{m['torch']} ({m['torch_threads']} threads), numpy {m['numpy']}, headdim BLAS: "
            f"{m['headdim_blas']}. Clock: {clock}, best over {rounds} interleaved rounds.\n\n"
            f"## Steps\n\n{headdim_table(records)}\n\n"
            f"## Crossover (measured dispatch)\n\n{crossover_markdown(records)}\n")


def measured_dispatch(records):
    """What the measurements say the d ≥ 5 dispatch should be: min_n (the largest crossover n over the
    Q = K = I cases, None if headdim never wins somewhere) and general_via_sdpa, the (score, dtype)
    whose general-Q,K,V cases SDPA won at most d."""
    cross = [n for (score, qkv, dtype, d), n in headdim_crossover(records).items() if qkv == "identity"]
    min_n = None if not cross or None in cross else max(cross)
    general = {}
    for r in records:
        if r["qkv"] == "general" and "headdim_s" in r:
            general.setdefault((r["score"], r["dtype"]), []).append(r["sdpa_s"] < r["headdim_s"])
    return dict(min_n=min_n, general_via_sdpa={k for k, wins in general.items() if 2 * sum(wins) > len(wins)})


def crossover_markdown(records):
    table = headdim_crossover(records)
    lines = ["| score | Q,K,V | dtype | d | headdim fastest from n = |", "|---|---|---|---|---|"]
    for (score, qkv, dtype, d), n in table.items():
        lines.append(f"| {score} | {qkv} | {dtype} | {d} | {n if n is not None else 'never (measured n)'} |")
    dispatch = measured_dispatch(records)
    general = ", ".join(f"{s} {t}" for s, t in sorted(dispatch["general_via_sdpa"])) or "none"
    lines += ["", f"Measured dispatch: headdim from n = {dispatch['min_n']} (Q = K = I, every d ≥ 5); "
              f"general Q, K, V sent to SDPA: {general}."]
    return "\n".join(lines)


# --- a GPU (or any torch device): the torch backend's step against the SDPA step there ----------


def device_cases(quick=False):
    """(model, params, dtype, n, d): dense softmax/rbf up to n = 10⁵ and a windowed top-k case."""
    if quick:
        return [("sa", {}, "float32", 256, 16), ("krause", {}, "float64", 256, 16),
                ("krause", dict(window=16, causal=True, top_k=4), "float32", 512, 3)]
    sizes = {"float32": (10**4, 3 * 10**4, 10**5), "float64": (10**4, 3 * 10**4)}
    dense = [(m, {}, dt, n, d) for m in ("sa", "krause") for dt in sizes for n in sizes[dt]
             for d in (3, 16, 64, 128)]
    window = dict(window=128, causal=True, top_k=32)
    return dense + [("krause", window, "float32", n, 3) for n in (10**5, 10**6)]


def run_device_case(model, params, dtype, n, d, device, *, repeats=5, budget=2.0):
    """One Euler step on the sphere on `device`: the torch backend's (particles.backends.torch) and,
    for dense cases, the same step on SDPA called directly; times synchronise the device."""
    import torch

    from particles.backends import torch as tb
    from particles.geometry import SPHERE
    from particles.integrate import euler

    dev = tb.resolve_device(device)
    it = make_interaction(model, **params)
    x = torch.from_numpy(sphere_state(n, d, dtype)).to(dev)[None]
    field = tb.TorchField(it, n, d, x.dtype, dev)

    def timed(step):
        def run():
            step()
            if dev.type == "cuda":
                torch.cuda.synchronize()
        return best_time(run, repeats=repeats, budget=budget)

    with torch.no_grad():
        rec = dict(model=model, params=params, dtype=dtype, n=n, d=d, device=str(dev), path=field.path,
                   ours_s=timed(lambda: euler(lambda y: SPHERE.tangent(y, field(y)), x, STEP_DT, SPHERE)))
        if not it.restricted:
            rec["sdpa_s"] = timed(lambda: sdpa_sphere_step(x, it))
            rec["x_sdpa"] = rec["sdpa_s"] / rec["ours_s"]
    rec["pairs_per_s"] = n * (n if not it.window else it.window) / rec["ours_s"]
    return rec


def device_markdown(records, device_name):
    lines = ["<!-- written by `ksync bench --device` -->", "", f"Device: {device_name}.", "",
             "| model | params | dtype | n | d | path | ours ms | SDPA ms | SDPA / ours | pairs/s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        sdpa = f"{1e3 * r['sdpa_s']:.2f} | {r['x_sdpa']:.2f}×" if "sdpa_s" in r else "– | –"
        lines.append(f"| {r['model']} | {r['params'] or ''} | {r['dtype']} | {r['n']} | {r['d']} | "
                     f"{r['path']} | {1e3 * r['ours_s']:.2f} | {sdpa} | {r['pairs_per_s']:.2e} |")
    return "\n".join(lines)


# --- machine ---------------------------------------------------------------------------------


def machine_summary():
    """CPU model and instruction set (lscpu), thread counts, library versions, the load average."""
    import numba
    import torch

    from particles.kernels import headdim
    from particles.vectors import vector_bits

    cpu, flags = platform.processor() or "", []
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in lscpu.splitlines():
            if line.startswith("Model name:"):
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("Flags:"):
                have = set(line.split(":", 1)[1].split())
                flags = [f for f in ISA_FLAGS if f in have]
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = float("nan")
    out = dict(cpu=cpu, isa=" ".join(flags), cores=os.cpu_count(), numba=numba.__version__,
               numba_threading_layer=numba.config.THREADING_LAYER, numpy=np.__version__,
               torch=torch.__version__, torch_threads=torch.get_num_threads(),
               numba_threads=numba.get_num_threads(), numba_vector_bits=vector_bits(),
               numpy_simd=numpy_simd(), torch_cpu_capability=torch.backends.cpu.get_cpu_capability(),
               headdim_blas=headdim.blas_addresses()["library"],
               python=platform.python_version(), load_average_1min=load)
    if keops_available():
        import pykeops

        out["pykeops"] = pykeops.__version__
    return out


def numpy_simd() -> str:
    """The widest of numpy's dispatch targets that this process runs ("AVX512_ICL", "X86_V3", …;
    NPY_DISABLE_CPU_FEATURES can lower it), "baseline" if none, "?" where numpy does not say."""
    try:
        from numpy._core._multiarray_umath import __cpu_dispatch__, __cpu_features__
    except ImportError:
        return "?"
    enabled = [t for t in __cpu_dispatch__ if __cpu_features__.get(t)]
    return enabled[-1] if enabled else "baseline"


ISA_FLAGS = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512dq", "avx512bw", "avx512vl", "avx512_bf16",
             "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8", "neon", "asimd", "sve")


def format_table(records):
    """The console table: ratios are the baseline's time over ours ("naive torch" = softmax(XXᵀ)X in
    plain torch ops, a reference column, not a baseline anyone tuning for speed would use)."""
    head = f"{'case':30s} {'n':>8s} {'d':>3s} {'dtype':7s} {'path':10s} {'pairs/s':>9s} {'ms/step':>9s} " \
           f"{'x numpy':>8s} {'x sdpa':>8s} {'x naive':>8s}  other"
    lines = [head, "-" * len(head)]

    def fmt(r, key):
        return f"{r[key]:8.1f}" if key in r else f"{'-':>8s}"

    for r in records:
        other = []
        if "x_keops" in r:
            other.append(f"x KeOps {r['x_keops']:.0f}")
        if "x_quadratic" in r:
            other.append(f"x O(n²) numpy {r['x_quadratic']:.0f} (extrap. from n={r['quadratic_n']})")
        if "x_dense_kernel" in r:
            other.append(f"x our dense kernel {r['x_dense_kernel']:.1f}")
        if "x_numpy_particle_order" in r:
            other.append(f"particle order: {1e3 * r['ours_particle_order_s']:.2f} ms, "
                         f"x numpy {r['x_numpy_particle_order']:.1f}")
        if r.get("kind") == "window" and "x_torch" in r:
            other.append(f"x torch unfold+topk {r['x_torch']:.1f}")
        naive = "x_torch" if r.get("kind") == "dense" else "-"
        lines.append(f"{r['case']:30s} {r['n']:8d} {r['d']:3d} {r['dtype']:7s} {r['path'] or '':10s} "
                     f"{r['pairs_per_s']:9.2e} {1e3 * r['ours_s']:9.2f} "
                     f"{fmt(r, 'x_numpy')} {fmt(r, 'x_sdpa')} {fmt(r, naive)}  "
                     + "; ".join(other))
    return "\n".join(lines)


# --- ensembles and small systems: whole trajectories through simulate (issue 20) ---------------
# (This section is the simulator core's: ensemble_cases … ensemble_markdown. ``ksync bench``
# runs it with --ensembles once analysis/cli/bench.py calls run_ensembles.)


def torch_ensemble_loop(x, beta, dt, steps):
    """The loop of Geshkovski et al.'s phase-diagrams.py on a batch (S, n, d) tensor:
    X ← normalise(X + dt·softmax(βXXᵀ)X) (the tangent projection would cost the same)."""
    import torch

    for _ in range(steps):
        a = torch.softmax(beta * (x @ x.transpose(1, 2)), dim=-1)
        x = torch.nn.functional.normalize(x + dt * (a @ x), dim=-1)
    return x


def numpy_ensemble_loop(x, beta, dt, steps):
    """The same batched step in numpy (stable softmax)."""
    for _ in range(steps):
        s = beta * (x @ np.swapaxes(x, 1, 2))
        s = np.exp(s - s.max(-1, keepdims=True))
        v = (s @ x) / s.sum(-1, keepdims=True)
        x = x + dt * v
        x = x / np.linalg.norm(x, axis=-1, keepdims=True)
    return x


def numpy_sphere_loop(x, beta, dt, steps):
    """A plain numpy loop of one SA system: x ← normalise(x + dt·P_x softmax(βxxᵀ)x)."""
    for _ in range(steps):
        s = beta * (x @ x.T)
        s = np.exp(s - s.max(1, keepdims=True))
        v = (s @ x) / s.sum(1, keepdims=True)
        v = v - (v * x).sum(1, keepdims=True) * x
        x = x + dt * v
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
    return x


def numpy_hk_loop(x, radius, steps):
    """`steps` vectorised numpy 1-D HK steps (argsort + cumsum + searchsorted each step)."""
    for _ in range(steps):
        x = numpy_hk_sorted(x, radius)
    return x


def ensemble_cases(quick=False):
    """The targets of issue 20: (name, simulate arguments, baseline names)."""
    S = 256 if quick else 2048
    hk_n = 10**5 if quick else 10**6
    ens = dict(model="sa", n=32, d=2, samples=S, steps=100, dt=0.1, beta=4.0, baselines=("torch", "numpy"))
    return [
        dict(name=f"SA ensemble {S}x32x2 fp64, 100 steps", dtype="float64", **ens),
        dict(name=f"SA ensemble {S}x32x2 fp32, 100 steps", dtype="float32", **ens),
        dict(name="SA n=64 d=3 fp64, 500 steps", model="sa", n=64, d=3, samples=None, steps=500, dt=0.1,
             beta=1.0, dtype="float64", baselines=("numpy",)),
        dict(name=f"HK 1-D n={hk_n:.0e} fp64, 10 steps", model="hk", n=hk_n, d=1, samples=None, steps=10,
             dt=1.0, radius=0.01, dtype="float64", baselines=("numpy",)),
    ]


def _ensemble_x0(case, seed=0):
    rng = np.random.default_rng(seed)
    shape = (case["n"], case["d"]) if case["samples"] is None else (case["samples"], case["n"], case["d"])
    if case["model"] == "hk":
        return rng.random(shape).astype(case["dtype"])
    x = rng.standard_normal(shape)
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(case["dtype"])


def run_ensemble_case(case, *, repeats=3, budget=6.0, clock=time.perf_counter, torch_threads=(2, 1)):
    """Time simulate (every step saved, as by default) against the case's baselines in one process,
    the calls interleaved (interleaved_best_times, at least `repeats` rounds). The torch loop is
    timed with each thread count of `torch_threads`; the fastest counts."""
    import torch

    from particles import simulate

    x0 = _ensemble_x0(case)
    params = {k: case[k] for k in ("beta", "radius") if k in case}
    run = dict(steps=case["steps"], dt=case["dt"], dtype=case["dtype"], **params)
    rec = dict(case=case["name"], model=case["model"], n=case["n"], d=case["d"], samples=case["samples"],
               steps=case["steps"], dtype=case["dtype"])
    fns = {"ours": lambda: simulate(case["model"], x0, **run)}
    previous = torch.get_num_threads()
    if "torch" in case["baselines"]:
        xt, beta, dt, steps = torch.from_numpy(x0), case["beta"], case["dt"], case["steps"]

        def torch_loop(threads):
            torch.set_num_threads(threads)
            try:
                return torch_ensemble_loop(xt, beta, dt, steps)
            finally:
                torch.set_num_threads(previous)

        for threads in torch_threads:
            fns[f"torch{threads}"] = lambda threads=threads: torch_loop(threads)
    if "numpy" in case["baselines"]:
        if case["model"] == "hk":
            fns["numpy"] = lambda: numpy_hk_loop(x0, case["radius"], case["steps"])
        elif case["samples"] is None:
            fns["numpy"] = lambda: numpy_sphere_loop(x0, case["beta"], case["dt"], case["steps"])
        else:
            fns["numpy"] = lambda: numpy_ensemble_loop(x0, case["beta"], case["dt"], case["steps"])
    best = interleaved_best_times(fns, rounds=repeats, budget=budget, clock=clock)
    rec["ours_s"] = best["ours"]
    if "torch" in case["baselines"]:
        times = {threads: best[f"torch{threads}"] for threads in torch_threads}
        rec["torch_threads"] = min(times, key=times.get)
        rec["torch_s"] = min(times.values())
    if "numpy" in case["baselines"]:
        rec["numpy_s"] = best["numpy"]
    for key in ("torch_s", "numpy_s"):
        if key in rec:
            rec["x_" + key[:-2]] = rec[key] / rec["ours_s"]
    return rec


def run_ensembles(quick=False, *, repeats=3, budget=6.0, clock=time.perf_counter, progress=True):
    """Every ensemble case (see run_ensemble_case); records in case order."""
    records = []
    for case in ensemble_cases(quick):
        records.append(run_ensemble_case(case, repeats=repeats, budget=budget, clock=clock))
        if progress:
            print(ensemble_table(records[-1:], head=not records[:-1]), flush=True)
    return records


def ensemble_table(records, head=True):
    """Console/markdown rows: our time and the baselines' time over ours."""
    lines = ["| case | ours [ms] | torch [ms] (threads) | x torch | numpy [ms] | x numpy |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"] if head else []
    for r in records:
        torch_cell = f"{1e3 * r['torch_s']:.0f} ({r['torch_threads']})" if "torch_s" in r else "–"
        x_torch = f"{r['x_torch']:.1f}" if "x_torch" in r else "–"
        numpy_cell = f"{1e3 * r['numpy_s']:.0f} | {r['x_numpy']:.1f}" if "numpy_s" in r else "– | –"
        lines.append(f"| {r['case']} | {1e3 * r['ours_s']:.1f} | {torch_cell} | {x_torch} | {numpy_cell} |")
    return "\n".join(lines)
