"""Benchmark cases for the kernels behind ``particles.simulate`` and their numpy / torch baselines.

Every case times one velocity evaluation (the work of one Euler step) of our kernel and of the
baselines in the same process, best of several repeats (the machine is shared: ratios measured in
one run are what counts, not absolute times). ``ksync bench`` prints the table and writes JSON;
:func:`scaling` measures time per step against n for the log-log figure.

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


def best_time(fn, *, repeats=5, budget=2.0, max_repeats=50):
    """Best wall time of fn() (after a warm-up): at least `repeats` calls, more (up to max_repeats)
    while the total stays under `budget` seconds — fast calls get many tries on a noisy machine."""
    fn()
    times, start = [], time.perf_counter()
    while len(times) < repeats or (len(times) < max_repeats and time.perf_counter() - start < budget):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


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


def state_as_simulated(case: Case, x):
    """The state as particles.simulate holds it between steps: 1-D HK opinions in sorted order
    (simulate integrates them sorted and unsorts only saved steps), everything else as given."""
    return np.sort(x, axis=0) if case.kind == "hk1d" else x


def run_case(case: Case, *, repeats=5, budget=2.0, baselines=True):
    """Time our kernel (and, if asked, the baselines) on one case; returns a JSON-ready dict."""
    it = case.interaction()
    x = initial(case)
    field_ = velocity_field(it, case.n, case.d, case.dtype)
    state = state_as_simulated(case, x)
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
        rec["torch_s"] = best_time(lambda: torch_dense(xt, it), repeats=repeats, budget=budget)
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
    for key in ("numpy_s", "torch_s", "quadratic_s", "dense_kernel_s"):
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
    "dense softmax (torch)": ("dense", "torch", [256, 512, 1024, 2048, 4096, 8192]),
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
        f, state = velocity_field(it, case.n, case.d, case.dtype), state_as_simulated(case, x)
        return lambda: f(state)
    if which == "quadratic":
        return lambda: numpy_hk_quadratic(x, it.radius)
    if case.kind == "hk1d":
        return lambda: numpy_hk_sorted(x, it.radius)
    xt = torch.from_numpy(x)
    table = {("dense", "numpy"): lambda: numpy_dense(x, it), ("dense", "torch"): lambda: torch_dense(xt, it),
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
                  ls="-" if ours else ("--" if "numpy" in name and "O(n" not in name else ":"),
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


# --- machine ---------------------------------------------------------------------------------


def machine_summary():
    import numba
    import torch

    cpu = platform.processor() or ""
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in lscpu.splitlines():
            if line.startswith("Model name:"):
                cpu = line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = float("nan")
    return dict(cpu=cpu, cores=os.cpu_count(), numba=numba.__version__, numpy=np.__version__,
                torch=torch.__version__, torch_threads=torch.get_num_threads(),
                numba_threads=numba.get_num_threads(), python=platform.python_version(),
                load_average_1min=load)


def format_table(records):
    head = f"{'case':30s} {'n':>8s} {'d':>3s} {'dtype':7s} {'path':10s} {'pairs/s':>9s} {'ms/step':>9s} " \
           f"{'x numpy':>8s} {'x torch':>8s}  other"
    lines = [head, "-" * len(head)]

    def fmt(r, key):
        return f"{r[key]:8.1f}" if key in r else f"{'-':>8s}"

    for r in records:
        other = []
        if "x_quadratic" in r:
            other.append(f"x O(n²) numpy {r['x_quadratic']:.0f} (extrap. from n={r['quadratic_n']})")
        if "x_dense_kernel" in r:
            other.append(f"x our dense kernel {r['x_dense_kernel']:.1f}")
        if "x_numpy_particle_order" in r:
            other.append(f"particle order: {1e3 * r['ours_particle_order_s']:.2f} ms, "
                         f"x numpy {r['x_numpy_particle_order']:.1f}")

        lines.append(f"{r['case']:30s} {r['n']:8d} {r['d']:3d} {r['dtype']:7s} {r['path'] or '':10s} "
                     f"{r['pairs_per_s']:9.2e} {1e3 * r['ours_s']:9.2f} "
                     f"{fmt(r, 'x_numpy')} {fmt(r, 'x_torch')}  "
                     + "; ".join(other))
    return "\n".join(lines)
