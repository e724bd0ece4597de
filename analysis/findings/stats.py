"""Spread over training seeds: t-intervals and the factorial effects of the ablation.

* :func:`mean_ci` — mean and the half-width of the two-sided t-interval, x̄ ± t_{n−1, 1−α/2} s/√n
  (s the sample standard deviation, n the number of seeds).
* :func:`effects` — the factorial effects of a 2^k design with independent runs per cell: for a set
  F of factors the contrast Σ_cells c_cell x̄_cell with c = Π_{f∈F} s_f / 2^{k−|F|} (s_f = +1 where f
  is on, −1 where off), i.e. a main effect is mean(on) − mean(off) over the other factors, a two-way
  interaction is the difference of differences averaged over the rest. Its CI uses the variance
  Σ c² s²_cell/n_cell with Welch–Satterthwaite degrees of freedom.
"""

from __future__ import annotations

import itertools
import warnings

import numpy as np
from scipy import stats


def mean_ci(values, axis: int = 0, level: float = 0.95):
    """(mean, half-width, n) of the t-interval over ``axis``; NaN entries are left out per position."""
    v = np.asarray(values, dtype=float)
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level!r}")
    n = np.sum(np.isfinite(v), axis=axis)
    with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # no seed / fewer than 2 seeds: NaN, reported
        mean = np.nanmean(v, axis=axis) if v.size else np.nan
        sd = np.nanstd(v, axis=axis, ddof=1)
        half = stats.t.ppf(0.5 + level / 2, n - 1) * sd / np.sqrt(n)
    half = np.where(n >= 2, half, np.nan)
    return mean, half, n


def _contrast(cells: dict, coef: dict, level: float):
    """Σ c x̄ with its t-interval half-width and Welch–Satterthwaite dof (NaN with < 2 runs in a cell)."""
    est, var, dof_den, short = 0.0, 0.0, 0.0, False
    for key, c in coef.items():
        x = np.asarray(cells[key], dtype=float)
        x = x[np.isfinite(x)]
        n = len(x)
        est += c * (x.mean() if n else np.nan)
        if n < 2:
            short = True
            continue
        term = c * c * x.var(ddof=1) / n
        var += term
        dof_den += term * term / (n - 1)
    if short:
        return est, np.nan, np.nan
    dof = var**2 / dof_den if dof_den > 0 else np.inf
    half = stats.t.ppf(0.5 + level / 2, dof) * np.sqrt(var) if var > 0 else 0.0
    return est, half, dof


def effects(cells: dict, factors: tuple[str, ...], level: float = 0.95) -> list[dict]:
    """Main effects and interactions of a 2^k design.

    cells: {tuple of k bools (factor on/off, in ``factors`` order): values over seeds}.
    Returns [{"effect": "A" / "A×B" / …, "estimate", "ci" (half-width), "dof"}] for every non-empty
    subset of factors (main effects first).
    """
    k = len(factors)
    keys = list(itertools.product((False, True), repeat=k))
    missing = [key for key in keys if key not in cells]
    if missing:
        raise ValueError(f"cells: missing {missing} of the 2^{k} design over {factors}")
    out = []
    for size in range(1, k + 1):
        for subset in itertools.combinations(range(k), size):
            coef = {key: np.prod([1 if key[f] else -1 for f in subset]) / 2 ** (k - size) for key in keys}
            est, half, dof = _contrast(cells, coef, level)
            out.append(dict(effect="×".join(factors[f] for f in subset), estimate=est, ci=half, dof=dof))
    return out
